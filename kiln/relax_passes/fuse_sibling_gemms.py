"""Fuse sibling Linear layers that read the same input into one wider GEMM (Q/K/V, gate/up).

Runs on high-level Relax before :mod:`.fuse_gemm_epilogue` (on every target: it is pure graph algebra).

* **pattern** (:func:`_branch`): a Linear as the importer emits it, ``matmul(x, permute_dims(w, [1, 0]))``
  optionally followed by a bias add (``add(., b)`` or ``add(., astype(b, "float32"))``) and a cast back to
  the input dtype, where ``x`` is a variable or ``reshape(v, shape)`` of one (the importer reshapes the same
  activation once per Linear). Branches are grouped by (source of ``x``, its shape, dtype, out dtype, K,
  chain form).
* **check** (:func:`_check`): static K and N (the rows of ``x`` may be symbolic), rank-2 weights transposed exactly ``[1, 0]``, a ``[N]`` bias, every
  intermediate with one consumer (not a function output) and in the dataflow block of the matmul, at least
  two branches; groups of more than :data:`MAX_BRANCHES` are fused in chunks (the multi-output GEMM kernel
  writes at most three outputs).
* **rewrite** (:class:`_Rewriter`): at the first branch's matmul, ``y = chain(matmul(x, permute_dims(
  concat(w_i), [1, 0])), concat(b_i))`` and ``parts = split(y, offsets, axis=-1)``; each branch's last binding
  becomes ``parts[i]``. The weight and bias concatenations depend on weights only, so the fusion stage folds
  them into the exported weights (``fold_weights``); on cuda the GEMM pass then writes the parts directly
  as separate outputs of one kernel (no split copy).

Numerics: each output column is the same dot product as before (the concatenation only stacks weight rows),
so results are bitwise those of the unfused graph on the same kernel.

The report (JSON module attr ``kiln.sibling_gemm_fusion``, :func:`fusion_report`) lists every group fused or
refused with the reason.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from . import drop_dead_code, read_report
from .fuse_gemm_epilogue import _dtype, _graph, _name, _op, _shape, _is_static, _transposed_weight

__all__ = ["FuseSiblingGemms", "fusion_report", "REPORT_ATTR", "MAX_BRANCHES"]

#: Module attr holding the JSON report.
REPORT_ATTR = "kiln.sibling_gemm_fusion"
#: Most branches fused into one GEMM (the multi-output GEMM writes at most three outputs).
MAX_BRANCHES = 3


@dataclass
class _Branch:
    matmul: relax.Var
    x: relax.Expr
    src: relax.Expr              # x, or the variable x reshapes
    w: relax.Expr
    bias: relax.Expr | None = None
    bias_cast: str | None = None  # the dtype the bias was cast to before the add, if it was
    cast: str | None = None       # the dtype the result was cast back to, if it was
    end: relax.Var | None = None
    nodes: list = field(default_factory=list)
    refusal: str | None = None

    def key(self):
        xs = _shape(self.x)
        return (self.src, xs, _dtype(self.x), _dtype(self.matmul), self.bias is not None, self.bias_cast, self.cast)


def _single_user(g, var):
    users = g.consumers.get(var, [])
    if len(users) != 1 or users[0] is None:
        return None
    return users[0]


def _branch(g, mm) -> _Branch | None:
    """Pattern: the Linear chain starting at matmul ``mm``, or ``None`` if ``mm`` is not a Linear."""
    call = g.value[mm]
    if _op(call) != "relax.matmul":
        return None
    tw = _transposed_weight(g, call.args[1])
    if tw is None:
        return None
    w, axes = tw
    x = call.args[0]
    src = x
    if isinstance(x, relax.Var) and _op(g.value.get(x)) == "relax.reshape":
        src = g.value[x].args[0]
    br = _Branch(mm, x, src, w, end=mm, nodes=[mm])
    if axes != (1, 0):
        br.refusal = f"weight transpose axes {list(axes)} is not [1, 0]"
        return br
    cur = mm
    nxt = _single_user(g, cur)
    if nxt is not None and g.block.get(nxt) == g.block.get(mm) and _op(g.value[nxt]) == "relax.add":
        a, b = g.value[nxt].args
        other = b if a.same_as(cur) else a
        bias, cast = other, None
        if isinstance(other, relax.Var) and _op(g.value.get(other)) == "relax.astype":
            bias, cast = g.value[other].args[0], str(g.value[other].attrs.dtype)
        if _shape(bias) is not None and len(_shape(bias)) == 1 and not a.same_as(b):
            br.bias, br.bias_cast = bias, cast
            cur = nxt
            br.nodes.append(cur)
            nxt = _single_user(g, cur)
    if nxt is not None and g.block.get(nxt) == g.block.get(mm) and _op(g.value[nxt]) == "relax.astype":
        br.cast = str(g.value[nxt].attrs.dtype)
        cur = nxt
        br.nodes.append(cur)
    br.end = cur
    return br


def _check(g, br: _Branch) -> str | None:
    """``None`` when the branch may join a sibling group, else the reason."""
    if br.refusal:
        return br.refusal
    xs, ws, es = _shape(br.x), _shape(br.w), _shape(br.end)
    if not xs or xs[-1] is None or not _is_static(ws) or not es or es[-1] is None:
        return f"symbolic K or N (x {xs}, w {ws}): only the leading (row) dims may be dynamic"
    if len(ws) != 2 or ws[1] != xs[-1]:
        return f"weight {ws} is not [N, K={xs[-1]}]"
    if br.bias is not None and _shape(br.bias) != (ws[0],):
        return f"bias {_shape(br.bias)} is not [N={ws[0]}]"
    if g.block.get(br.matmul, -1) < 0:
        return "the matmul is not in a dataflow block"
    for node in br.nodes[:-1]:
        if _single_user(g, node) is None:
            return f"{_name(node)} has another consumer or is a function output"
    return None


def _groups(g, branches):
    """Branches with equal keys, in binding order, chunked to MAX_BRANCHES; singletons dropped."""
    order = {v: i for i, v in enumerate(g.value)}
    by_key = []
    for br in sorted(branches, key=lambda b: order[b.matmul]):
        for key, members in by_key:
            if key[0].same_as(br.key()[0]) and key[1:] == br.key()[1:]:
                members.append(br)
                break
        else:
            by_key.append((br.key(), [br]))
    out = []
    for _, members in by_key:
        for i in range(0, len(members), MAX_BRANCHES):
            chunk = members[i:i + MAX_BRANCHES]
            if len(chunk) >= 2:
                out.append(chunk)
    return out


@mutator
class _Rewriter(PyExprMutator):
    """Emit the fused chain at the first branch's matmul; bind each branch's end to its part."""

    def __init__(self, mod, groups):
        super().__init__(mod)
        self.first = {grp[0].matmul: grp for grp in groups}
        self.ends = {br.end: (gi, i) for gi, grp in enumerate(groups) for i, br in enumerate(grp)}
        self.index = {id(grp): gi for gi, grp in enumerate(groups)}
        self.drop = {n for grp in groups for br in grp for n in br.nodes if not n.same_as(br.end)}
        self.parts = {}

    def _emit_group(self, grp):
        bb = self.builder_
        br0 = grp[0]
        x = self.visit_expr(br0.x)
        w = bb.emit(relax.op.concat([self.visit_expr(b.w) for b in grp], axis=0))
        wt = bb.emit(relax.op.permute_dims(w, [1, 0]))
        call0 = br0.matmul
        od = _dtype(call0)
        y = bb.emit(relax.op.matmul(x, wt, out_dtype=od))
        if br0.bias is not None:
            bias = bb.emit(relax.op.concat([self.visit_expr(b.bias) for b in grp], axis=0))
            if br0.bias_cast:
                bias = bb.emit(relax.op.astype(bias, br0.bias_cast))
            y = bb.emit(relax.op.add(y, bias))
        if br0.cast:
            y = bb.emit(relax.op.astype(y, br0.cast))
        offsets, acc = [], 0
        for b in grp[:-1]:
            acc += _shape(b.w)[0]
            offsets.append(acc)
        return bb.emit(relax.op.split(y, offsets, axis=-1))

    def visit_var_binding_(self, binding):
        var = binding.var
        if var in self.first:
            grp = self.first[var]
            self.parts[self.index[id(grp)]] = self._emit_group(grp)
        if var in self.ends:
            gi, i = self.ends[var]
            self.builder_.emit_normalized(relax.VarBinding(var, relax.TupleGetItem(self.parts[gi], i)))
            return
        if var in self.drop or any(var.same_as(g[0].matmul) for g in self.first.values()):
            return      # an intermediate of a fused branch (dead once the ends are rebound)
        super().visit_var_binding_(binding)


@tvm.transform.module_pass(opt_level=0, name="kiln.FuseSiblingGemms")
class FuseSiblingGemms:
    """Fuse Linear layers that share their input into one GEMM with concatenated weights + ``split``.

    ``prove``: prove each group form's rewrite (number of parts, bias or not) with z3 first and leave groups whose
    proof does not succeed unfused, with the reason; default: the ``prove_rewrites`` knob (on).
    """

    def __init__(self, prove: bool | None = None):
        self.prove = prove            # None: the ``prove_rewrites`` knob
        self.report: list[dict] = []

    def _proving(self) -> bool:
        return _proving_default(self.prove)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        records, all_groups = [], []
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            g = _graph(func)
            ok = []
            for var in list(g.value):
                br = _branch(g, var)
                if br is None:
                    continue
                reason = _check(g, br)
                if reason is None:
                    ok.append(br)
                else:
                    records.append({"function": gv.name_hint, "matmul": _name(var), "fused": False,
                                    "reason": reason})
            groups = _groups(g, ok)
            if self._proving():            # a group whose rule instance is not proved stays unfused
                kept = []
                for grp in groups:
                    why = _rule_refusal("sibling", len(grp), grp[0].bias is not None)
                    if why is None:
                        kept.append(grp)
                    else:
                        records.append({"function": gv.name_hint, "fused": False, "reason": why,
                                        "matmuls": [_name(b.matmul) for b in grp]})
                refused = {id(b) for grp in groups if grp not in kept for b in grp}
                groups = kept
            else:
                refused = set()
            grouped = {id(b) for grp in groups for b in grp} | refused
            for br in ok:
                if id(br) not in grouped:
                    records.append({"function": gv.name_hint, "matmul": _name(br.matmul), "fused": False,
                                    "reason": "no sibling Linear reads the same input with the same form"})
            for grp in groups:
                records.append({"function": gv.name_hint, "fused": True, "matmuls": [_name(b.matmul) for b in grp],
                                "N": [int(_shape(b.w)[0]) for b in grp], "K": int(_shape(grp[0].w)[1]),
                                "bias": grp[0].bias is not None})
            all_groups.append((gv, groups))
        self.report = records
        if any(groups for _, groups in all_groups):
            for gv, groups in all_groups:
                if groups:
                    rw = _Rewriter(mod, groups)
                    rw.builder_.update_func(gv, rw.visit_expr(mod[gv]))
                    mod = rw.builder_.get()
            mod = drop_dead_code(mod)
        return mod.with_attr(REPORT_ATTR, json.dumps(records))


def _proving_default(flag) -> bool:
    from .. import knobs
    return knobs.get("prove_rewrites") if flag is None else bool(flag)


def _rule_refusal(kind, *key):
    from ..verify.symbolic import rule_refusal
    return rule_refusal(kind, *key)


def fusion_report(mod: tvm.IRModule) -> list[dict]:
    """The records :class:`FuseSiblingGemms` left on ``mod`` (``[]`` if it did not run)."""
    return read_report(mod, REPORT_ATTR)
