"""Recognise kiln.llm's decode step as one region and turn it into the megakernel's task graph.

The pass looks at every Relax function of a module and accepts the ones that are exactly kiln.llm's static
decode step (``kiln/llm/model.py``, ``Decoder._decode_for``), as exported, before kiln's fusion passes:

``x0 = reshape(take(E, reshape(ids, [B]), clip), [B, 1, H])``, then per layer ``l``::

    qkv  = linear(rms_norm(x_l, w_in), W_qkv [, b])                   # linear: matmul(x, permute_dims(W), f32)
    c, q = call_tir_inplace(kiln_rope_kv_append, cache_{l-1}, qkv, cos, sin, reshape(pos, [B, 1]), l)
    o, ml = call_tir(kiln_decode_attn_partial_s{S}, reshape(q, [B, Hq, D]), c, pos, l)   #  [+ bias] [-> astype]
    a    = reshape(call_tir(kiln_decode_attn_merge_s{S}, o, ml), [B, 1, Hq * D])
    h_l  = x_l + linear(a, W_o [, b])
    g, u = split(linear(rms_norm(h_l, w_post), W_gate_up [, b]), 2, axis=-1)
    x_{l+1} = h_l + linear(silu(g) * u, W_down [, b])

and ``logits = [astype f32] linear(rms_norm(reshape(x_L, [B, H]), w_norm), W_head)`` (``W_head`` is ``E`` when
tied). The kiln kernels are recognised by their ``kiln.op`` attr, not their names.

Three parts, apart:

* **pattern** (:class:`_Matcher`): a walk backwards from the function's output through the chain above; each
  step names what it expected when the IR differs;
* **check** (during the walk and :func:`_check_region`): static batch, one dtype (float32/float16/bfloat16) for
  activations and weights, every weight a function parameter of the shape the dimensions imply, layers
  ``0..L-1`` in order over one cache chain starting at the ``cache`` parameter, one RMSNorm eps, and **nothing
  else reads an intermediate**: every binding of the function belongs to the region and its only output is
  the logits tensor;
* **result**: a :class:`DecodeRegion` (shapes, the parameter index of every weight under kiln.llm's names) and
  its :func:`~kiln.schedules.megakernel.build_task_graph`.

Matches and refusals (with the reason) are recorded on the module as the JSON attr ``kiln.megakernel_region``
(read it with :func:`region_report`) and on the pass object (``.report``, ``.regions``).
:class:`FormMegakernelRegion` does not rewrite the module. :class:`AddMegakernelDecode` (the **rewrite**, what
``kiln.llm.compile(..., megakernel=True)`` runs) adds, for every match the sm_90a kernel accepts
(:func:`kiln.schedules.megakernel_kernel.kernel_check`), a function ``decode_b{B}_mk`` with the decode step's
signature whose body is two calls: a tiny kernel that zeroes the counter words (it reads ``pos`` so that no
pass folds it into a constant the megakernel would then write), and the megakernel (``call_tir_inplace``: the
cache and the counters in place; the program a constant; logits and the activation scratch as outputs). The
layer-by-layer ``decode_b{B}`` stays as it is.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import tvm
from tvm import relax

from ..schedules.megakernel import SM90_COST, SM90_MEGAKERNEL, CostModel, DecodeShape, MegakernelConfig, \
    build_task_graph

__all__ = ["FormMegakernelRegion", "AddMegakernelDecode", "DecodeRegion", "match_decode", "region_report",
           "REPORT_ATTR", "MK_SUFFIX"]

#: Module attr holding the JSON report of the pass.
REPORT_ATTR = "kiln.megakernel_region"
#: Suffix of the megakernel decode function added next to a matched ``decode_b{B}``.
MK_SUFFIX = "_mk"
_DTYPES = ("float32", "float16", "bfloat16")


class _NoMatch(Exception):
    """The function is not the decode step; the message says where and why."""


@dataclass
class DecodeRegion:
    """A matched decode step.

    Attributes
    ----------
    function : str
    batch, max_context, attn_splits : int
        Static batch, cache length, and the split count of the layer-by-layer attention kernels.
    shape : DecodeShape
    params : dict
        kiln.llm weight name (``model.layers.0.self_attn.qkv_proj.weight``, ``rope_cos``, ...) -> index of the
        function parameter that holds it.
    inputs : tuple of int
        Parameter indices of ``ids``, ``pos`` and ``cache``.
    """

    function: str
    batch: int
    max_context: int
    attn_splits: int
    shape: DecodeShape
    params: dict = field(default_factory=dict)
    inputs: tuple = ()

    def task_graph(self, config: MegakernelConfig = SM90_MEGAKERNEL, cost: CostModel = SM90_COST, context=None):
        return build_task_graph(self.shape, self.batch, self.max_context, config=config, cost=cost, context=context)


# ------------------------------------------------------------------------------------------ helpers
def _op(e) -> str | None:
    return e.op.name if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) else None


def _shape(e):
    ty = getattr(e, "ty", None)
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    return tuple(int(v.value) if isinstance(v, tvm.tirx.IntImm) else None for v in ty.shape.values)


def _dtype(e) -> str | None:
    ty = getattr(e, "ty", None)
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def _name(v) -> str:
    return str(getattr(v, "name", None) or getattr(v, "name_hint", "?"))


def _int(e) -> int | None:
    if isinstance(e, tvm.tirx.IntImm):
        return int(e.value)
    if isinstance(e, relax.PrimValue) and isinstance(e.value, tvm.tirx.IntImm):
        return int(e.value.value)
    return None


# ------------------------------------------------------------------------------------------ pattern
class _Matcher:
    """Backward walk over one function's bindings; collects the region's bindings, parameters and roles."""

    def __init__(self, mod: tvm.IRModule, func: relax.Function):
        self.mod, self.func = mod, func
        self.value: dict = {}          # var -> bound value
        self.order: list = []          # binding vars in program order
        self.params = {p: i for i, p in enumerate(func.params)}
        self.used: set = set()         # binding vars that belong to the region
        self.roles: dict = {}          # kiln weight name -> parameter var
        self.eps: set = set()
        self.dtype: str | None = None
        body = func.body
        if not isinstance(body, relax.SeqExpr):
            raise _NoMatch("the function body is not a sequence of bindings")
        for block in body.blocks:
            for b in block.bindings:
                if not isinstance(b, relax.VarBinding):
                    raise _NoMatch(f"binding {_name(b.var)} is a match-cast, not a plain binding")
                self.value[b.var] = b.value
                self.order.append(b.var)
        self.out = body.body

    # ---- primitives
    def val(self, e, what: str):
        """The value bound to ``e`` (following var-to-var aliases); marks the binding as part of the region."""
        while isinstance(e, relax.Var) and e in self.value:
            self.used.add(e)
            e = self.value[e]
            if not isinstance(e, relax.Var):
                return e
        raise _NoMatch(f"{what}: expected a computed value, found {'parameter ' + _name(e) if e in self.params else e}")

    def call(self, e, op: str, what: str):
        v = self.val(e, what)
        if _op(v) != op:
            raise _NoMatch(f"{what}: expected {op}, found {_op(v) or type(v).__name__} ({_name(e)})")
        return v

    def param(self, e, role: str, shape: tuple, what: str):
        if e not in self.params:
            raise _NoMatch(f"{what}: weight {role} must be a function parameter, found a computed value {_name(e)}")
        if role in self.roles and not self.roles[role].same_as(e):
            raise _NoMatch(f"{what}: {role} is bound to two different parameters")
        got = _shape(e)
        if got != tuple(shape):
            raise _NoMatch(f"{what}: weight {role} ({_name(e)}) has shape {list(got or ())}, expected {list(shape)}")
        self.roles[role] = e
        return e

    def dt(self, e, what: str):
        d = _dtype(e)
        if self.dtype is None:
            self.dtype = d
        if d != self.dtype:
            raise _NoMatch(f"{what}: dtype {d} differs from the step's {self.dtype}")
        return e

    def kiln_call(self, e, op_attr: str, what: str, inplace: bool = False):
        """``call_tir[_inplace](f, args)`` of a PrimFunc whose ``kiln.op`` attr is ``op_attr``; returns (call, args)."""
        v = self.call(e, "relax.call_tir_inplace" if inplace else "relax.call_tir", what)
        gv = v.args[0]
        f = self.mod[gv] if isinstance(gv, tvm.ir.GlobalVar) else None
        got = None if f is None or f.attrs is None or "kiln.op" not in f.attrs else str(f.attrs["kiln.op"])
        if got != op_attr:
            raise _NoMatch(f"{what}: expected a call of kiln's {op_attr} kernel, found {_name(gv)} (kiln.op {got})")
        return v, list(v.args[1].fields)

    def tuple_item(self, e, index: int, what: str):
        v = self.val(e, what)
        if not isinstance(v, relax.TupleGetItem) or int(v.index) != index:
            raise _NoMatch(f"{what}: expected item {index} of a tuple, found {type(v).__name__} ({_name(e)})")
        return v.tuple_value

    def reshape(self, e, shape: tuple, what: str):
        v = self.call(e, "relax.reshape", what)
        if _shape(e) != tuple(shape):
            raise _NoMatch(f"{what}: reshape to {list(_shape(e) or ())}, expected {list(shape)}")
        return v.args[0]

    def astype(self, e, dtype: str, what: str):
        v = self.call(e, "relax.astype", what)
        if str(v.attrs.dtype) != dtype:
            raise _NoMatch(f"{what}: astype to {v.attrs.dtype}, expected {dtype}")
        return v.args[0]

    def rms_norm(self, e, role: str, hidden: int, what: str):
        v = self.call(e, "relax.nn.rms_norm", what)
        axes = [int(a) for a in v.attrs.axes]
        if axes not in ([-1], [len(_shape(e) or ()) - 1]):
            raise _NoMatch(f"{what}: rms_norm over axes {axes}, expected the last axis")
        self.eps.add(float(v.attrs.epsilon))
        self.param(v.args[1], role, (hidden,), what)
        return v.args[0]

    def linear(self, e, role: str, n: int, k: int, what: str) -> tuple:
        """kiln.llm's ``_Linear``: ``[astype dt] ([matmul(x, permute_dims(W), f32)] [+ astype f32 bias])``.
        Returns ``(x, has_bias)``."""
        dt = self.dtype
        v = e
        if dt != "float32":
            v = self.astype(v, dt, what)
        bias = False
        if _op(self.val(v, what)) == "relax.add":
            add = self.val(v, what)
            b = add.args[1]
            if dt != "float32":
                b = self.astype(b, "float32", what + " bias")
            self.param(b, role.replace(".weight", ".bias"), (n,), what + " bias")
            v, bias = add.args[0], True
        mm = self.call(v, "relax.matmul", what)
        od = mm.attrs.out_dtype
        if str(od) not in ("float32",) and not (dt == "float32" and str(od) in ("", "void")):
            raise _NoMatch(f"{what}: matmul out_dtype {od}, expected float32 accumulation")
        pd = self.call(mm.args[1], "relax.permute_dims", what + " weight transpose")
        axes = pd.attrs.axes
        if axes is not None and [int(a) for a in axes] != [1, 0]:
            raise _NoMatch(f"{what}: weight transpose axes {list(axes)}, expected [1, 0]")
        w = pd.args[0]
        if _dtype(w) != dt:
            raise _NoMatch(f"{what}: weight dtype {_dtype(w)}, expected the activation dtype {dt} (native weights)")
        self.param(w, role, (n, k), what)
        return mm.args[0], bias


def _fp8_present(func: relax.Function) -> bool:
    return any(str(_dtype(p) or "").startswith("float8") for p in func.params)


def match_decode(mod: tvm.IRModule, name: str) -> DecodeRegion:
    """Match function ``name`` of ``mod`` as kiln.llm's decode step.

    Raises
    ------
    ValueError
        It is not (the message says what differs, where).
    """
    func = mod[name]
    try:
        return _match(mod, name, func)
    except _NoMatch as e:
        raise ValueError(str(e)) from None


def _match(mod, name: str, func: relax.Function) -> DecodeRegion:
    if _fp8_present(func):
        raise _NoMatch("fp8 weights: the megakernel region takes native (float16/bfloat16/float32) weights only")
    if len(func.params) < 4:
        raise _NoMatch(f"{len(func.params)} parameters: expected ids, pos, cache and the weights")
    ids, pos, cache = func.params[:3]
    ids_s, cache_s = _shape(ids), _shape(cache)
    if ids_s is None or len(ids_s) != 2 or None in ids_s or ids_s[1] != 1:
        raise _NoMatch(f"ids shape {list(ids_s or ())}: expected a static [batch, 1] (one token per sequence)")
    if cache_s is None or len(cache_s) != 6 or None in cache_s:
        raise _NoMatch(f"cache shape {list(cache_s or ())}: expected a static [layers, 2, batch, kv_heads, context, head_dim]")
    L, two, B, KVH, C, D = cache_s
    if two != 2 or B != ids_s[0] or _shape(pos) != (B,) or _dtype(ids) != "int32" or _dtype(pos) != "int32":
        raise _NoMatch(f"ids {ids_s} / pos {_shape(pos)} / cache {list(cache_s)} disagree on the batch or dtypes")
    m = _Matcher(mod, func)
    m.dtype = _dtype(cache)
    if m.dtype not in _DTYPES:
        raise _NoMatch(f"cache dtype {m.dtype}: expected one of {_DTYPES}")
    # ---- logits
    out = m.out
    if isinstance(out, relax.Var) and out in m.value and isinstance(m.value[out], relax.Var):
        m.used.add(out)
        out = m.value[out]
    logits_s = _shape(out)
    if logits_s is None or len(logits_s) != 2 or logits_s[0] != B or _dtype(out) != "float32":
        raise _NoMatch(f"output {list(logits_s or ())} {_dtype(out)}: expected float32 logits [{B}, vocab]")
    V = logits_s[1]
    e = out
    if m.dtype != "float32":
        e = m.astype(e, "float32", "logits")
    head_w = _head_weight(m, e)
    if head_w is None:
        raise _NoMatch("LM head: expected matmul(rms_norm(x), permute_dims(W))")
    e_w = _embedding(m)
    H = _shape(e_w)[1]
    tied = head_w.same_as(e_w)
    head_role = "model.embed_tokens.weight" if tied else "lm_head.weight"
    xn, bias = m.linear(e, head_role, V, H, "LM head")
    if bias:
        raise _NoMatch("LM head: a bias is not part of kiln.llm's decoder")
    x = m.reshape(m.rms_norm(xn, "model.norm.weight", H, "final norm"), (B, H), "final norm input")
    # ---- layers, last to first
    dims = {}
    for layer in range(L - 1, -1, -1):
        x = _layer(m, x, layer, B, H, KVH, C, D, cache, pos, dims)
    x0 = m.reshape(x, (B, 1, H), "embedding")
    take = m.call(x0, "relax.take", "embedding")
    if not take.args[0].same_as(e_w) or str(take.attrs.mode) != "clip" or int(take.attrs.axis) != 0:
        raise _NoMatch("embedding: expected take(embed_tokens, ids, axis=0, mode='clip')")
    if not m.reshape(take.args[1], (B,), "embedding ids").same_as(ids):
        raise _NoMatch("embedding: the token ids are not the ids parameter")
    m.param(e_w, "model.embed_tokens.weight", (V, H), "embedding")
    _check_region(m, func)
    Hq, I, S = dims["heads"], dims["intermediate"], dims["splits"]
    shape = DecodeShape(L, H, I, Hq, KVH, D, V, m.eps.pop(), m.dtype, "native", dims["qkv_bias"], dims["o_bias"],
                        dims["mlp_bias"], tied)
    return DecodeRegion(name, B, C, S, shape, {r: m.params[v] for r, v in m.roles.items()}, (0, 1, 2))


def _head_weight(m: _Matcher, e):
    """The weight parameter of the LM head's matmul (to tell a tied head), without consuming the bindings."""
    v = e
    while isinstance(v, relax.Var) and v in m.value:
        v = m.value[v]
        if _op(v) in ("relax.astype",):
            v = v.args[0]
        elif _op(v) == "relax.matmul":
            pd = m.value.get(v.args[1])
            return pd.args[0] if _op(pd) == "relax.permute_dims" else None
    return None


def _embedding(m: _Matcher):
    """The embedding table: the first ``take`` over the ids (checked in full by the caller)."""
    for var in m.order:
        v = m.value[var]
        if _op(v) == "relax.take":
            return v.args[0]
    raise _NoMatch("embedding: no take() of the token ids")


def _layer(m: _Matcher, x, layer, B, H, KVH, C, D, cache, pos, dims):
    """Match layer ``layer`` backwards from its output ``x``; returns its input."""
    p = f"model.layers.{layer}."
    w = f"layer {layer}"
    add = m.call(x, "relax.add", f"{w} MLP residual")
    h, y = add.args
    m.dt(h, f"{w} residual")
    act, bias_d = _linear_auto(m, y, p + "mlp.down_proj.weight", H, f"{w} down_proj")
    I = _shape(act)[-1]
    mul = m.call(act, "relax.multiply", f"{w} silu(gate) * up")
    silu = m.call(mul.args[0], "relax.nn.silu", f"{w} silu(gate)")
    gate = m.tuple_item(silu.args[0], 0, f"{w} gate")
    if not m.tuple_item(mul.args[1], 1, f"{w} up").same_as(gate):
        raise _NoMatch(f"{w}: gate and up are not the two halves of one split")
    sp = m.call(gate, "relax.split", f"{w} gate_up split")
    ind = sp.attrs.indices_or_sections
    if not isinstance(ind, (int, tvm.tirx.IntImm)) or int(ind) != 2 or int(sp.attrs.axis) not in (-1, 2):
        raise _NoMatch(f"{w}: gate_up split must be 2 equal parts of the last axis")
    hn, bias_gu = m.linear(sp.args[0], p + "mlp.gate_up_proj.weight", 2 * I, H, f"{w} gate_up_proj")
    if not m.rms_norm(hn, p + "post_attention_layernorm.weight", H, f"{w} post-attention norm").same_as(h):
        raise _NoMatch(f"{w}: the post-attention norm does not read the attention residual")
    add = m.call(h, "relax.add", f"{w} attention residual")
    x_in, y = add.args
    a, bias_o = _linear_auto(m, y, p + "self_attn.o_proj.weight", H, f"{w} o_proj")
    Hq = _shape(a)[-1] // D
    merged = m.reshape(a, (B, 1, Hq * D), f"{w} attention output")
    mcall, margs = m.kiln_call(merged, "decode_attn_merge", f"{w} attention merge")
    part = m.tuple_item(margs[0], 0, f"{w} attention partial o")
    if not m.tuple_item(margs[1], 1, f"{w} attention partial (m, l)").same_as(part):
        raise _NoMatch(f"{w}: the merge reads two different partial calls")
    pcall, pargs = m.kiln_call(part, "decode_attn_partial", f"{w} attention partial")
    S = _shape(margs[0])[2]
    if _int(pargs[3]) != layer or not pargs[2].same_as(pos):
        raise _NoMatch(f"{w}: attention partial reads layer {_int(pargs[3])} / positions {_name(pargs[2])}, "
                       f"expected layer {layer} and pos")
    rope = m.tuple_item(m.reshape(pargs[0], (B, Hq, D), f"{w} q"), 1, f"{w} rotated q")
    if not m.tuple_item(pargs[1], 0, f"{w} cache after the append").same_as(rope):
        raise _NoMatch(f"{w}: the attention does not read the cache written by this layer's append")
    rcall, rargs = m.kiln_call(rope, "rope_kv_append", f"{w} RoPE + KV append", inplace=True)
    prev_cache, qkv, cos, sin, pos2d, lay = rargs
    if _int(lay) != layer:
        raise _NoMatch(f"{w}: RoPE + KV append writes cache layer {_int(lay)}, expected {layer}")
    if not m.reshape(pos2d, (B, 1), f"{w} positions").same_as(pos):
        raise _NoMatch(f"{w}: RoPE positions are not the pos parameter")
    m.param(cos, "rope_cos", (C, D // 2), f"{w} RoPE cos")
    m.param(sin, "rope_sin", (C, D // 2), f"{w} RoPE sin")
    xn, bias_qkv = m.linear(qkv, p + "self_attn.qkv_proj.weight", (Hq + 2 * KVH) * D, H, f"{w} qkv_proj")
    if not m.rms_norm(xn, p + "input_layernorm.weight", H, f"{w} input norm").same_as(x_in):
        raise _NoMatch(f"{w}: the input norm does not read the layer input")
    if "cache_src" in dims and not rope.same_as(dims["cache_src"]):
        raise _NoMatch(f"layer {layer + 1}: its KV append does not update the cache written by layer {layer}")
    if layer == 0:
        if not prev_cache.same_as(cache):
            raise _NoMatch("layer 0: RoPE + KV append does not update the cache parameter")
    else:
        dims["cache_src"] = m.tuple_item(prev_cache, 0, f"{w} cache chain")
    got = {"heads": Hq, "intermediate": I, "splits": S, "qkv_bias": bias_qkv, "o_bias": bias_o,
           "mlp_bias": bias_gu}
    for k, v in got.items():
        if dims.setdefault(k, v) != v:
            raise _NoMatch(f"{w}: {k} {v} differs from the other layers' {dims[k]}")
    if bias_d != bias_gu:
        raise _NoMatch(f"{w}: gate_up and down disagree on the MLP bias")
    return x_in


def _linear_auto(m: _Matcher, y, role, n, what):
    """A linear whose input width is read from the matmul (o_proj, down_proj)."""
    v = y
    while isinstance(v, relax.Var) and v in m.value and _op(m.value[v]) != "relax.matmul":
        nxt = m.value[v]
        v = nxt.args[0] if isinstance(nxt, relax.Call) and nxt.args else None
    k = _shape(m.value[v].args[0])[-1] if v is not None and v in m.value else None
    if k is None:
        raise _NoMatch(f"{what}: no matmul found")
    return m.linear(y, role, n, k, what)


# ------------------------------------------------------------------------------------------ check
def _check_region(m: _Matcher, func: relax.Function) -> None:
    """Nothing outside the region: every binding belongs to it (the output, a single tensor, is the logits, so no
    intermediate is read by anything else), one eps, every parameter after the inputs is a weight of it."""
    extra = [v for v in m.order if v not in m.used]
    if extra:
        v = extra[0]
        raise _NoMatch(f"binding {_name(v)} ({_op(m.value[v]) or type(m.value[v]).__name__}) is not part of the "
                       f"decode step ({len(extra)} such binding(s))")
    if len(m.eps) != 1:
        raise _NoMatch(f"RMSNorm eps differ across norms: {sorted(m.eps)}")
    unused = [m.func.params[i] for i in range(3, len(func.params)) if func.params[i] not in m.roles.values()]
    if unused:
        raise _NoMatch(f"parameter {_name(unused[0])} is not a weight of the decode step")


# ------------------------------------------------------------------------------------------ the pass
@tvm.transform.module_pass(opt_level=0, name="kiln.FormMegakernelRegion")
class FormMegakernelRegion:
    """Find kiln.llm decode steps; record matches and refusals; keep the regions (no rewrite).

    Parameters
    ----------
    functions : iterable of str, optional
        Functions to consider (default: every Relax function).
    config : MegakernelConfig
        Tunables of the task graphs built for the matches.
    """

    def __init__(self, functions=None, config: MegakernelConfig = SM90_MEGAKERNEL):
        self.functions = None if functions is None else set(functions)
        self.config = config
        self.report: list[dict] = []
        self.regions: dict = {}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        self.report, self.regions = _find(mod, self.functions, self.config)
        return mod.with_attr(REPORT_ATTR, json.dumps(self.report))


def _find(mod: tvm.IRModule, functions, config: MegakernelConfig) -> tuple[list, dict]:
    """Match every (selected) Relax function: the report records and ``name -> (region, task graph)``."""
    records, regions = [], {}
    for gv, func in mod.functions_items():
        name = gv.name_hint
        if not isinstance(func, relax.Function) or (functions is not None and name not in functions):
            continue
        try:
            region = _match(mod, name, func)
        except _NoMatch as e:
            records.append({"function": name, "matched": False, "reason": str(e)})
            continue
        graph = region.task_graph(config)
        regions[name] = (region, graph)
        s = region.shape
        records.append({"function": name, "matched": True, "batch": region.batch, "max_context": region.max_context,
                        "layers": s.num_layers, "hidden": s.hidden, "dtype": s.dtype, "tasks": len(graph.tasks),
                        "counters": len(graph.counters), "workers": len(graph.workers), "splits": graph.splits,
                        "predicted_ms": round(graph.estimate["step_s"] * 1e3, 4)})
    return records, regions


def region_report(mod: tvm.IRModule) -> list[dict]:
    """The records :class:`FormMegakernelRegion` left on ``mod`` (``[]`` if it did not run)."""
    attrs = mod.attrs
    if attrs is None or REPORT_ATTR not in attrs:
        return []
    return json.loads(str(attrs[REPORT_ATTR]))


# ------------------------------------------------------------------------------------------ rewrite
def _counter_reset(num_counters: int, batch: int):
    """``sync[:] = 0`` on the GPU (one thread per word); ``pos`` is an argument only as a data dependency."""
    from tvm.script import tirx as T

    from ..schedules.megakernel_kernel import KERNEL_RULE
    blocks = -(-num_counters // 256)

    @T.prim_func(private=True, s_tir=True)
    def reset(pos: T.Buffer((batch,), "int32"), sync: T.Buffer((num_counters,), "int32")):
        for bx in T.thread_binding(blocks, thread="blockIdx.x"):
            for tx in T.thread_binding(256, thread="threadIdx.x"):
                with T.sblock("reset"):
                    T.reads(pos[0])
                    T.writes(sync[0:num_counters])
                    if bx * 256 + tx < num_counters:
                        sync[bx * 256 + tx] = 0
    return reset.with_attrs({"tirx.is_scheduled": True, "kiln.rule": KERNEL_RULE, "op_pattern": 8,
                             "tirx.noalias": True})


def _add_decode(mod: tvm.IRModule, name: str, region: DecodeRegion, graph) -> tvm.IRModule:
    """``mod`` plus ``{name}_mk`` (same parameters as ``name``) calling the megakernel of ``graph``."""
    import numpy as np

    from ..schedules.megakernel_kernel import build_megakernel, encode_program, scratch_layout, weight_order
    func = mod[name]
    kname = f"kiln_megakernel_{name}"
    bb = relax.BlockBuilder(mod)
    mk_gv = bb.add_func(build_megakernel(graph, kname), kname)
    reset_gv = bb.add_func(_counter_reset(len(graph.counters), region.batch), f"kiln_megakernel_reset_{name}")
    params = [relax.Var(_name(p), p.ty) for p in func.params]
    s = region.shape
    attrs = {k: func.attrs[k] for k in func.attrs.keys()} if func.attrs else {}
    attrs["global_symbol"] = name + MK_SUFFIX
    with bb.function(name + MK_SUFFIX, params, attrs=attrs):
        with bb.dataflow():
            ids, pos, cache = (params[i] for i in region.inputs)
            sync_ty = relax.TensorType([len(graph.counters)], "int32")
            sync = bb.emit(relax.call_tir(reset_gv, relax.Tuple([pos]), sync_ty))
            prog = relax.const(np.asarray(encode_program(graph), "int32"))
            weights = [params[region.params[n]] for n in weight_order(graph)]
            outs = [cache.ty, sync_ty, relax.TensorType([region.batch, s.vocab], "float32"),
                    relax.TensorType([scratch_layout(graph).total], "uint8")]
            res = bb.emit(relax.call_tir_inplace(mk_gv, relax.Tuple([ids, pos, cache, prog, sync, *weights]),
                                                 [2, 4, -1, -1], outs))
            logits = bb.emit_output(relax.TupleGetItem(res, 2))
        bb.emit_func_output(logits)
    return bb.get()


@tvm.transform.module_pass(opt_level=0, name="kiln.AddMegakernelDecode")
class AddMegakernelDecode:
    """Add ``decode_b{B}_mk`` (the whole step as one persistent kernel) next to every matched decode function that
    the sm_90a kernel accepts; the report records matches, kernel refusals (``added: None`` and the reason) and
    the functions added.

    Parameters
    ----------
    functions, config :
        As :class:`FormMegakernelRegion`.
    """

    def __init__(self, functions=None, config: MegakernelConfig = SM90_MEGAKERNEL):
        self.functions = None if functions is None else set(functions)
        self.config = config
        self.report: list[dict] = []
        self.regions: dict = {}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        from ..schedules.megakernel_kernel import kernel_check
        records, self.regions = _find(mod, self.functions, self.config)
        self.report = []
        for rec in records:
            name = rec["function"]
            if rec["matched"]:
                region, graph = self.regions[name]
                reason = kernel_check(graph)
                if reason:
                    rec = dict(rec, added=None, reason=f"kernel: {reason}")
                else:
                    mod = _add_decode(mod, name, region, graph)
                    rec = dict(rec, added=name + MK_SUFFIX)
            self.report.append(rec)
        return mod.with_attr(REPORT_ATTR, json.dumps(self.report))
