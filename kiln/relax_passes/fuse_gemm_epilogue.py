"""Fuse ``torch.nn.Linear`` GEMMs and their elementwise epilogue into kiln's sm_90a wgmma kernel (or, for
M <= 16, the decode GEMV of ``kiln/schedules/gemv_sm90.py``, same epilogue model).

The pass runs on the Relax graph after import/cleanup and **before** ``LegalizeOps``. It has three
separate parts:

* **pattern** (:func:`_match_chain`): ``matmul(x, permute_dims(w, axes=[1, 0]))`` (how the importer
  lowers a Linear; kiln's fp16/bf16 ``addmm`` override makes it ``matmul(..., out_dtype="float32")``
  then ``add(astype(bias, "float32"))`` then ``astype(dtype)``), followed by a single-consumer chain
  of: bias add (``[N]`` vector, possibly through ``astype`` to fp32), residual add (a tensor of the
  output's shape), ``nn.gelu``, ``nn.gelu_tanh``, ``nn.relu``, ``nn.silu``, multiply by a scalar constant,
  ``astype`` from fp32 back to the input dtype, and reshapes that keep the last axis (``[M, N]`` <->
  ``[B, S, N]``). The chain is cut at the first op that is not one of those, at a value with another
  consumer (or a function output) and at the end of the dataflow block; it is fused up to the last
  point where the value is in the input dtype (the kernel writes its input dtype, never fp32).
  ``nn.gelu`` (erf) and ``nn.gelu_tanh`` are distinct stages (``erff`` vs ``tanhf`` in the kernel).
* **check** (:func:`_check`): static N and K, fp16/bf16 ``x`` and ``w`` of the same dtype, ``x`` of rank
  2 or 3, ``w`` of rank 2, matmul out dtype fp32 or the input dtype, N and K multiples of 8, the
  transpose exactly ``[1, 0]``, target kind cuda, ``M*N*K >= MIN_MACS`` and a valid kernel config.
  M (the product of x's leading dims) may be symbolic (a dynamic batch or sequence): the call then goes to
  the dynamic-M kernel, whose tile is chosen for M's upper bound (``tir_var_upper_bound``; the report's
  ``M_max``) and which never takes the GEMV or split-K paths.
* **rewrite** (:class:`_Rewriter`): the chain's last binding becomes
  ``reshape(call_tir(gemm, [reshape(x, [M, K]), w, bias?, reshape(residual, [M, N])?]), out_shape)``
  (reshapes only where the rank differs); the dead intermediates are removed by DCE. Identical problems
  share one PrimFunc.

Numerics: the kernel applies the whole epilogue to the fp32 accumulator and rounds once. Where the graph
rounded in between (e.g. ``astype(f16)`` then ``gelu_tanh`` in fp16, or a residual add in fp16), the
fused result is the more accurate one; differences are within fp16 rounding of the unfused graph.

What was fused and what was refused (with the reason) is recorded on the module as the JSON string attr
``kiln.gemm_sm90_fusion`` (read it with :func:`fusion_report`) and on the pass object as ``.report``.

Threshold: ``MIN_MACS = 0`` (M*N*K): every static GEMM the kernel's configs accept is fused. Session 2 set it
to 128x1024x1024 (the smallest shape of its GEMM table) for want of a measurement below that size; the H200
measured in session 4 (``benchmarks/NOTES.md``) that the smaller GEMMs pay too: with 0, ResNet-50 fp16 batch 1
ran in 0.374 ms instead of 3.22 (its 53 convs become GEMMs through ``conv_to_gemm``, which reads this constant)
and ViT-B/16 batch 1 in 0.485 ms instead of 1.007 (its M=197 Linear layers). The mechanism stays for
experiments: set this module attribute (``fusion_passes`` reads it at call time) or pass ``min_macs``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from . import drop_dead_code, proving, read_report, rewrite_functions, target_kind

__all__ = ["FuseGemmEpilogueSM90", "fusion_report", "MIN_MACS", "RULE_NAME", "GEMV_RULE_NAME", "GEMV_MAX_M",
           "REPORT_ATTR"]

#: Smallest M*N*K handed to the sm_90a kernel (see the module docstring).
MIN_MACS = 0
#: The ``kiln.rule`` attr of the generated PrimFuncs (shown by the schedule report / ``kiln inspect``).
RULE_NAME = "kiln.gemm_sm90"
#: ... of the decode GEMV used for M <= GEMV_MAX_M.
GEMV_RULE_NAME = "kiln.gemv_sm90"
#: Largest M sent to the GEMV (kiln/schedules/gemv_sm90.py: M = 1..16 cost the same there).
GEMV_MAX_M = 16
#: Module attr holding the JSON report of the pass.
REPORT_ATTR = "kiln.gemm_sm90_fusion"
_DTYPES = ("float16", "bfloat16")
_ACTIVATIONS = {"relax.nn.gelu": "gelu", "relax.nn.gelu_tanh": "gelu_tanh", "relax.nn.relu": "relu",
                "relax.nn.silu": "silu"}
_OP_OPAQUE = 8  # relax OpPatternKind.kOpaque: FuseOps must not fuse anything into the kernel


# ------------------------------------------------------------------------------------------ helpers
def _op(expr) -> str | None:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def _ty(expr):
    ty = getattr(expr, "ty", None)
    return ty if isinstance(ty, relax.TensorType) else None


def _dtype(expr) -> str | None:
    ty = _ty(expr)
    return None if ty is None else str(ty.dtype)


def _shape(expr):
    """Static shape as a tuple of ints; ``None`` if unknown; a tuple holding ``None`` where symbolic."""
    ty = _ty(expr)
    if ty is None or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    return tuple(int(v.value) if isinstance(v, tvm.tirx.IntImm) else None for v in ty.shape.values)


def _is_static(shape) -> bool:
    return shape is not None and all(isinstance(v, int) for v in shape)


def _dims(expr):
    """Shape with ints where static and the PrimExpr where symbolic; ``None`` if unknown."""
    ty = _ty(expr)
    if ty is None or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    return tuple(int(v.value) if isinstance(v, tvm.tirx.IntImm) else v for v in ty.shape.values)


def _analyzer():
    from tvm.sym.analyzer import Analyzer    # (tvm.arith in TVM < 0.27)
    return Analyzer()


def _same_dim(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    return a.same_as(b) or _analyzer().can_prove_equal(a, b)


def _same_shape(a, b) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(_same_dim(x, y) for x, y in zip(a, b))


def _rows(dims):
    """Product of ``dims`` (the GEMM's M): an int when static, else a simplified int64 PrimExpr."""
    if all(isinstance(v, int) for v in dims):
        return _prod(dims)
    expr = None
    for v in dims:
        v = tvm.tirx.const(v, "int64") if isinstance(v, int) else v
        expr = v if expr is None else expr * v
    return _analyzer().simplify(expr)


def _prod(shape) -> int:
    out = 1
    for v in shape:
        out *= v
    return out


def _name(var) -> str:
    return str(getattr(var, "name", None) or getattr(var, "name_hint", "?"))


# ------------------------------------------------------------------------------------------ analysis
@dataclass
class _Graph:
    """Bindings of one Relax function: var -> value, var -> consumers, var -> dataflow block index."""

    value: dict = field(default_factory=dict)
    consumers: dict = field(default_factory=dict)  # var -> list of binding vars (None = function output)
    block: dict = field(default_factory=dict)


def _used_vars(expr) -> list:
    seen = []

    def visit(e):
        if isinstance(e, relax.Var) and not any(e.same_as(s) for s in seen):
            seen.append(e)
    relax.analysis.post_order_visit(expr, visit)
    return seen


def _graph(func: relax.Function) -> _Graph:
    g = _Graph()
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return g
    for bi, block in enumerate(body.blocks):
        for b in block.bindings:
            val = b.value
            g.value[b.var] = val
            g.block[b.var] = bi if isinstance(block, relax.DataflowBlock) else -1
            for v in _used_vars(val):
                g.consumers.setdefault(v, []).append(b.var)
    for v in _used_vars(body.body):
        g.consumers.setdefault(v, []).append(None)
    return g


# ------------------------------------------------------------------------------------------ pattern
@dataclass
class _Match:
    """One Linear-like GEMM and the epilogue chain fused into it."""

    matmul: relax.Var           # the matmul binding
    x: relax.Expr
    w: relax.Expr
    axes: tuple
    out_dtype: str
    end: relax.Var | None = None   # the binding the fused call replaces
    end_shape: tuple | None = None
    stages: list = field(default_factory=list)   # Epilogue stages, in order
    bias: relax.Expr | None = None
    residual: relax.Expr | None = None
    cut: str | None = None        # why the chain stopped (for the report)
    no_end: str | None = None     # set when no fusable end point exists
    splits: tuple | None = None   # column counts when the chain ends in a split (multi-output kernel)
    presplit: tuple | None = None  # (end, end_shape) before a split was absorbed (the GEMV path stops there)
    m_hint: int | None = None     # dynamic M: its upper bound (the tile is chosen for it), None if unbounded
    ends: list = field(default_factory=list)  # every end point, in chain order: (end, end_shape, stages, bias, residual)


def _transposed_weight(g: _Graph, b):
    """``(w, axes)`` when ``b`` is a var bound to ``permute_dims(w, axes)``, else ``None``."""
    if isinstance(b, relax.Var) and b in g.value and _op(g.value[b]) == "relax.permute_dims":
        call = g.value[b]
        axes = call.attrs.axes
        axes = None if axes is None else tuple(int(a) for a in axes)
        if axes is None:
            nd = len(_shape(call.args[0]) or ())
            axes = tuple(range(nd - 1, -1, -1))
        return call.args[0], axes
    return None


def _operand(g: _Graph, other, cur_dtype: str, dtype: str):
    """The tensor to feed the kernel for an add operand: itself, or its source through an fp32 upcast."""
    if cur_dtype == "float32" and isinstance(other, relax.Var) and _op(g.value.get(other)) == "relax.astype":
        src = g.value[other].args[0]
        if _dtype(src) == dtype and str(g.value[other].attrs.dtype) == "float32":
            return src
    if _dtype(other) == cur_dtype == dtype:
        return other
    return None


def _match_chain(g: _Graph, mm: relax.Var) -> _Match | None:
    """Pattern: the matmul-of-a-transposed-weight at ``mm`` and its fusable epilogue chain."""
    call = g.value[mm]
    if _op(call) != "relax.matmul":
        return None
    x, wt = call.args[0], call.args[1]
    tw = _transposed_weight(g, wt)
    if tw is None:
        return None
    w, axes = tw
    dtype = _dtype(x)
    od = call.attrs.out_dtype
    out_dtype = str(od) if od is not None and str(od) not in ("", "void") else dtype
    m = _Match(mm, x, w, axes, out_dtype)
    if dtype not in _DTYPES:
        return m
    out_shape = _dims(mm)       # leading (row) dims may be symbolic: a dynamic M
    if not out_shape or not isinstance(out_shape[-1], int):
        return m
    N = out_shape[-1]
    M = _rows(out_shape[:-1])
    cur, cur_dtype, cur_shape, stages = mm, out_dtype, out_shape, []
    bias = residual = None

    def mark_end():
        m.end, m.end_shape, m.stages, m.bias, m.residual = cur, cur_shape, list(stages), bias, residual
        m.ends.append((cur, cur_shape, list(stages), bias, residual))

    if cur_dtype == dtype:
        mark_end()
    while True:
        users = g.consumers.get(cur, [])
        if len(users) != 1 or users[0] is None:
            what = "a function output" if None in users else f"{len(users)} consumers"
            m.cut = f"{_name(cur)} ({cur_dtype}) has {what}" if len(users) != 1 else f"{_name(cur)} is {what}"
            break
        nxt = users[0]
        if g.block.get(nxt) != g.block.get(mm) or g.block.get(mm, -1) < 0:
            m.cut = f"{_name(nxt)} is outside the dataflow block of the matmul"
            break
        val = g.value[nxt]
        op = _op(val)
        if op == "relax.astype" and cur_dtype == "float32" and str(val.attrs.dtype) == dtype:
            cur_dtype = dtype
        elif op == "relax.reshape":
            shp = _dims(nxt)
            if not shp or not _same_dim(shp[-1], N) or not _same_dim(_rows(shp[:-1]), M):
                m.cut = f"reshape {_name(nxt)} to {shp} does not keep the last axis N={N}"
                break
            cur_shape = shp
        elif op == "relax.add":
            a, b = val.args
            if a.same_as(b):
                m.cut = f"{_name(nxt)} adds the GEMM result to itself"
                break
            other = b if a.same_as(cur) else a
            src = _operand(g, other, cur_dtype, dtype)
            oshape = _dims(other)
            if src is None:
                m.cut = f"add {_name(nxt)}: operand of dtype {_dtype(other)} is neither {dtype} nor its fp32 upcast"
                break
            if _same_shape(oshape, (N,)) and bias is None:
                bias = src
                stages.append(("bias",))
            elif _same_shape(oshape, cur_shape) and residual is None:
                residual = src
                stages.append(("residual",))
            else:
                m.cut = f"add {_name(nxt)}: operand shape {oshape} is neither a bias [{N}] nor a residual {cur_shape}"
                break
        elif op == "relax.split" and cur_dtype == dtype and residual is None:
            sizes = _split_sizes(val, N)
            if sizes is None:
                m.cut = f"split {_name(nxt)} is not a static split of the last axis N={N} into 2-3 parts"
                break
            m.presplit = (m.end, m.end_shape)
            cur = nxt
            mark_end()
            m.splits = sizes
            m.cut = f"the chain ends in split {_name(nxt)}: one output per part"
            break
        elif op in _ACTIVATIONS:
            stages.append((_ACTIVATIONS[op],))
        elif op == "relax.multiply" and any(isinstance(v, tvm.ir.expr.Constant) and _shape(v) == () for v in val.args):
            c = next(v for v in val.args if isinstance(v, tvm.ir.expr.Constant))
            stages.append(("scale", float(c.value.numpy())))
        else:
            m.cut = f"{_name(nxt)} ({op or type(val).__name__}) is not a fusable epilogue op"
            break
        cur = nxt
        if cur_dtype == dtype:
            mark_end()
    if m.end is None:
        m.no_end = (f"the {out_dtype} GEMM result never returns to {dtype} through a fusable chain"
                    + (f" ({m.cut})" if m.cut else ""))
    return m


def _split_sizes(call, N):
    """Part sizes of ``split(x, indices, axis=last)`` of a width-``N`` value, or ``None``."""
    nd = len(_shape(call.args[0]) or ())
    axis = int(call.attrs.axis)
    if axis not in (-1, nd - 1):
        return None
    ind = call.attrs.indices_or_sections
    if isinstance(ind, (tvm.tirx.IntImm, int)):
        k = int(ind)
        if k < 1 or N % k:
            return None
        sizes = (N // k,) * k
    else:
        cuts = [int(v) for v in ind]
        edges = [0] + cuts + [N]
        sizes = tuple(b - a for a, b in zip(edges, edges[1:]))
    return sizes if 2 <= len(sizes) <= 3 and all(n > 0 for n in sizes) else None


# ------------------------------------------------------------------------------------------ check
def _problem(m: _Match):
    """``(M, N, K)``; M is a PrimExpr when the rows are symbolic (``None`` when unknown)."""
    xs, ws = _dims(m.x), _shape(m.w)
    K = xs[-1] if xs else None
    N = ws[0] if ws else None
    M = _rows(xs[:-1]) if xs else None
    return M, N, K


def _dynamic(M) -> bool:
    return M is not None and not isinstance(M, int)


def m_hint(M, upper: dict) -> int | None:
    """The largest value of a symbolic M under the function's ``tir_var_upper_bound`` attrs (``upper``: var
    name -> int), or ``None`` when a variable of M is unbounded. The dynamic kernel's tile is chosen for it."""
    if not _dynamic(M):
        return M
    an = _analyzer()
    for v in tvm.tirx.analysis.undefined_vars(M):
        if v.name not in upper:
            return None
        an.bind(v, tvm.tirx.const(int(upper[v.name]), str(v.ty)))
    val = an.simplify(M)
    return int(val.value) if isinstance(val, tvm.tirx.IntImm) else None


def _check(m: _Match, target_kind: str, min_macs: int) -> str | None:
    """``None`` when ``m`` can run on the sm_90a kernel, else the reason."""
    if target_kind != "cuda":
        return f"target {target_kind!r} is not cuda (the kernel is sm_90a only)"
    if m.axes != (1, 0):
        return f"weight transpose permute_dims axes {list(m.axes)} is not [1, 0]"
    xs, ws, os_ = _dims(m.x), _shape(m.w), _dims(m.matmul)
    if not _is_static(ws) or not xs or not isinstance(xs[-1], int) or not os_ or not isinstance(os_[-1], int):
        return (f"symbolic N or K (x {_shape(m.x)}, w {ws}): the kernel is built per static (N, K); only M "
                "(the leading dims of x) may be dynamic")
    dt, wdt = _dtype(m.x), _dtype(m.w)
    if dt not in _DTYPES or wdt != dt:
        return f"dtype x={dt} w={wdt}: the kernel takes float16 or bfloat16 for both"
    if m.out_dtype not in ("float32", dt):
        return f"matmul out_dtype {m.out_dtype} is neither float32 nor {dt}"
    if len(xs) not in (2, 3) or len(ws) != 2:
        return f"ranks x={len(xs)} w={len(ws)}: x must be [M, K] or [B, S, K] and w [N, K]"
    M, N, K = _problem(m)
    if ws[1] != K:
        return f"w {ws} does not match K={K}"
    if N % 8:
        return f"N={N} is not a multiple of 8"
    if K % 8:
        return f"K={K} is not a multiple of 8"
    if m.no_end:
        return m.no_end
    if m.splits and any(n % 8 for n in m.splits):
        return f"split parts {list(m.splits)} are not all multiples of 8"
    if _dynamic(M):
        return _check_dynamic(m, M, N, K, dt)
    if M <= GEMV_MAX_M:
        from ..schedules.gemv_sm90 import select_gemv_config
        try:
            cfg = select_gemv_config(M, N, K, dt)
        except (NotImplementedError, ValueError) as e:
            return f"GEMV (M={M} <= {GEMV_MAX_M}): {e}"
        return cfg.check(M, N, K, dt)
    if M * N * K < min_macs:
        return f"M*N*K={M * N * K} < {min_macs}: below the size where the sm_90a kernel pays (MIN_MACS)"
    from ..schedules.configs import select_sm90_config
    try:
        select_sm90_config(M, N, K, dt)
    except NotImplementedError as e:
        return str(e)
    if m.splits and _config_for_splits(M, N, K, dt, m.splits) is None:
        return f"no tile config whose block_n divides every output part {list(m.splits)} (M={M}, N={N}, K={K})"
    return None


def _check_dynamic(m: _Match, M, N: int, K: int, dt: str) -> str | None:
    """The dynamic-M kernel's conditions: a tile for ``m.m_hint`` (whose block_n divides any split part) and
    32-bit indexing at M's upper bound (without a bound, the kernel asserts it at run time)."""
    from ..schedules.configs import select_sm90_dynamic_config
    try:
        select_sm90_dynamic_config(m.m_hint, N, K, dt, splits=m.splits or ())
    except NotImplementedError as e:
        return str(e)
    if m.m_hint is not None and m.m_hint * max(N, K) >= 2**31:
        return f"M <= {m.m_hint} (its upper bound) times max(N, K) = {max(N, K)} reaches 2^31: 32-bit indexing"
    return None


def _yield_shared_end(m: _Match, plans) -> str | None:
    """Two GEMMs whose chains meet in one residual add (a ResNet downsample block: conv3 + downsample) both reach
    the add and what follows; the plan made first keeps them, and ``m`` stops at its last end point before the
    shared part (the value the other kernel reads as its residual). ``None`` when ``m`` can still be fused."""
    def claimed(v):             # v is a fused value of a plan: one of its end points up to the one it uses
        for p in plans:
            ends = [e[0] for e in p[0].ends]
            upto = next(i for i, e in enumerate(ends) if e.same_as(p[0].end))
            if any(e.same_as(v) for e in ends[:upto + 1]):
                return True
        return False
    taken = [i for i, e in enumerate(m.ends) if claimed(e[0])]
    if not taken:
        return None
    if taken[0] == 0 or m.splits:
        return f"its epilogue end {_name(m.ends[taken[0]][0])} is taken by another GEMM's epilogue"
    m.end, m.end_shape, m.stages, m.bias, m.residual = m.ends[taken[0] - 1]
    m.cut = f"stops before {_name(m.ends[taken[0]][0])}, which another GEMM's epilogue took"
    return None


# ------------------------------------------------------------------------------------------ rewrite
def _kernel(m: _Match):
    """``(names, funcs, key)``: one kernel, or the split-K partial GEMM and its reduce+epilogue kernel."""
    from ..schedules.configs import lookup_sm90_config
    from ..schedules.gemm_sm90 import Epilogue, make_gemm_sm90_kernels
    M, N, K = _problem(m)
    dt = _dtype(m.x)
    epi = Epilogue(tuple(m.stages))
    epi_name = epi.name().replace('+', '_').replace('.', 'p')
    attrs = {"kiln.rule": RULE_NAME, "op_pattern": _OP_OPAQUE, "kiln.tir_pipeline": "tirx"}
    if _dynamic(M):             # one kernel for every M: its first buffer dim is a fresh variable
        from ..schedules.configs import select_sm90_dynamic_config
        cfg = select_sm90_dynamic_config(m.m_hint, N, K, dt, splits=m.splits or ())
        funcs = make_gemm_sm90_kernels(tvm.tirx.Var("m", "int64"), N, K, dt, epi, cfg, out_splits=m.splits)
        if m.splits:
            epi_name += "_x" + "_".join(str(n) for n in m.splits)
        name = f"gemm_sm90_dynM{m.m_hint or ''}x{N}x{K}_{dt}_{epi_name}"
        source = "dynamic M: heuristic at " + (f"M <= {m.m_hint}" if m.m_hint else "an unbounded M")
        return [name], [funcs[0].with_attrs({**attrs, "global_symbol": name, "kiln.config_source": source})], \
            _problem_key(m)
    if M <= GEMV_MAX_M:           # decode-sized: the bandwidth-bound GEMV (it writes one output: no split)
        from ..schedules.gemv_sm90 import make_gemv_sm90
        name = f"gemv_sm90_{M}x{N}x{K}_{dt}_{epi_name}"
        func = make_gemv_sm90(M, N, K, dt, None, epi)
        func = func.with_attrs({**attrs, "kiln.rule": GEMV_RULE_NAME, "global_symbol": name,
                                "kiln.config_source": "heuristic"})
        return [name], [func], _problem_key(m)
    cfg, source = lookup_sm90_config(M, N, K, dt, epi.name())
    if cfg.split_k > 1 and not (epi.has_bias or epi.has_residual):
        # the split-K reduce kernel would take one tensor, and TVM's RewriteDataflowReshape then analyses it as a
        # possible reshape and aborts on a TIRx body (an ICHECK in HasReshapePattern): run the K loop unsplit
        cfg, source = replace(cfg, split_k=1), source + " (split-K off: the reduce kernel would have one input)"
    if m.splits and cfg.split_k == 1 and any(n % cfg.block_n for n in m.splits):
        cfg, source = _config_for_splits(M, N, K, dt, m.splits), "heuristic (tiles must not straddle outputs)"
    funcs = make_gemm_sm90_kernels(M, N, K, dt, epi, cfg, out_splits=m.splits)
    if m.splits:
        epi_name += "_x" + "_".join(str(n) for n in m.splits)
    if len(funcs) == 1:
        names = [f"gemm_sm90_{M}x{N}x{K}_{dt}_{epi_name}"]
    else:
        split = funcs[0].attrs["kiln.gemm_config"].split("_k")[-1]
        names = [f"gemm_sm90_{M}x{N}x{K}_{dt}_splitk{split}", f"gemm_sm90_reduce_{M}x{N}_{dt}_k{split}_{epi_name}"]
    # (kiln.target.cuda's TIR pipeline sends these functions through TVM's "tirx" one)
    funcs = [f.with_attrs({**attrs, "global_symbol": n, "kiln.config_source": source}) for f, n in zip(funcs, names)]
    return names, funcs, _problem_key(m)


def _problem_key(m: _Match) -> tuple:
    """What decides the kernel(s) of a match (the key :func:`_kernel` returns, before building anything)."""
    M, N, K = _problem(m)
    if _dynamic(M):             # the kernel does not depend on M's expression, only on the tile it was chosen for
        M = ("dynamic", m.m_hint)
    return (M, N, K, _dtype(m.x), tuple(tuple(s) for s in m.stages), m.splits)


def _config_for_splits(M, N, K, dt, splits):
    """The heuristic's best config among those whose tile width divides every output part (``None``: there is none,
    which :func:`_check` turns into a refusal)."""
    from ..schedules.configs import estimate_sm90, sm90_candidates
    ok = [c for c in sm90_candidates(M, N, K, dt) if c.split_k > 1 or all(n % c.block_n == 0 for n in splits)]
    if not ok:
        return None
    return min(ok, key=lambda c: (estimate_sm90(c, M, N) / (c.split_k if c.split_k > 1 else 1.0), c.split_k))


@mutator
class _Rewriter(PyExprMutator):
    """Replace each matched chain's last binding with the fused ``call_tir``."""

    def __init__(self, mod, plans):
        super().__init__(mod)
        self.plans = plans            # list of (_Match, names, funcs, key)
        self.gvars = {}

    def _gvars(self, names, funcs, key):
        if key not in self.gvars:
            self.gvars[key] = [self.builder_.add_func(f, n) for f, n in zip(funcs, names)]
        return self.gvars[key]

    def visit_var_binding_(self, binding):
        plan = next((p for p in self.plans if p[0].end.same_as(binding.var)), None)
        if plan is None:
            super().visit_var_binding_(binding)
            return
        m, names, funcs, key = plan
        M, N, K = _problem(m)
        dt = _dtype(m.x)
        bb = self.builder_
        gvars = self._gvars(names, funcs, key)
        x = self.visit_expr(m.x)
        if len(_shape(m.x)) != 2:
            x = bb.emit(relax.op.reshape(x, relax.ShapeExpr([M, K])))
        args = [x, self.visit_expr(m.w)]
        if len(gvars) == 2:           # split-K: fp32 partials [split, M, N], then sum + epilogue
            split = int(funcs[0].params[-1].shape[0])
            part = bb.emit(relax.call_tir(gvars[0], args, relax.TensorType([split, M, N], "float32")))
            args = [part]
        if m.bias is not None:
            args.append(self.visit_expr(m.bias))
        if m.residual is not None:
            r = self.visit_expr(m.residual)
            if not _same_shape(_dims(m.residual), (M, N)):
                r = bb.emit(relax.op.reshape(r, relax.ShapeExpr([M, N])))
            args.append(r)
        if m.splits:              # one output per split part; the split's tuple is rebuilt from them
            outs = [relax.TensorType([M, n], dt) for n in m.splits]
            res = bb.emit(relax.call_tir(gvars[-1], args, outs))
            parts = []
            for i, n in enumerate(m.splits):
                piece = bb.emit(relax.TupleGetItem(res, i))
                shape = list(m.end_shape[:-1]) + [n]
                if len(shape) != 2:
                    piece = bb.emit(relax.op.reshape(piece, relax.ShapeExpr(shape)))
                parts.append(piece)
            bb.emit_normalized(relax.VarBinding(binding.var, relax.Tuple(parts)))
            return
        call = relax.call_tir(gvars[-1], args, relax.TensorType([M, N], dt))
        if not _same_shape(tuple(m.end_shape), (M, N)):
            call = relax.op.reshape(bb.emit(call), relax.ShapeExpr(list(m.end_shape)))
        bb.emit_normalized(relax.VarBinding(binding.var, bb.normalize(call)))


# ------------------------------------------------------------------------------------------ the pass
@tvm.transform.module_pass(opt_level=0, name="kiln.FuseGemmEpilogueSM90")
class FuseGemmEpilogueSM90:
    """Rewrite Linear GEMM + epilogue chains to calls of kiln's sm_90a wgmma kernel.

    Parameters
    ----------
    target_kind : str, optional
        ``"cuda"`` to fuse; any other kind refuses every candidate. Default: the current target.
    min_macs : int, optional
        Smallest M*N*K fused (default :data:`MIN_MACS`).
    prove : bool, optional
        Prove each distinct stage list's rewrite with z3 (:func:`kiln.verify.symbolic.rule_refusal`) and refuse
        the ones not proved; default: the ``prove_rewrites`` knob (on).
    """

    def __init__(self, target_kind: str | None = None, min_macs: int | None = None, prove: bool | None = None):
        self.target_kind = target_kind
        self.min_macs = MIN_MACS if min_macs is None else int(min_macs)
        self.prove = prove            # None: the ``prove_rewrites`` knob
        proving(prove)                # z3 missing: a typed error now, not a RuntimeError mid-pass
        self.report: list[dict] = []

    def _proving(self) -> bool:
        return proving(self.prove)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        kind = target_kind(self.target_kind)
        records, plans, names, built = [], [], {}, {}
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            g = _graph(func)
            upper = dict(func.attrs["tir_var_upper_bound"]) if func.attrs and "tir_var_upper_bound" in func.attrs \
                else {}
            for var in list(g.value):
                m = _match_chain(g, var)
                if m is None:
                    continue
                M, N, K = _problem(m) if _dims(m.x) and _shape(m.w) else (None, None, None)
                m.m_hint = m_hint(M, upper) if _dynamic(M) else None
                js = lambda v: v if v is None or isinstance(v, int) else str(v)  # noqa: E731 (symbolic: its text)
                rec = {"function": gv.name_hint, "matmul": _name(var), "M": js(M), "N": js(N), "K": js(K),
                       "dtype": _dtype(m.x)}
                if _dynamic(M):
                    rec["M_max"] = m.m_hint
                reason = _check(m, kind, self.min_macs) or _yield_shared_end(m, plans)
                if reason is None and self._proving():      # the stage list's rewrite rule must be proved
                    from ..verify.symbolic import rule_refusal
                    reason = rule_refusal("epilogue", tuple(tuple(st) for st in m.stages))
                if reason is None:
                    if m.splits and not _dynamic(M) and M <= GEMV_MAX_M:    # the GEMV writes one output: stop before the split
                        (m.end, m.end_shape), m.splits = m.presplit, None
                    key = _problem_key(m)
                    if key not in built:      # identical problems share one kernel: build it once
                        built[key] = _kernel(m)
                    knames, pfs, key = built[key]
                    knames = names.setdefault(key, knames)
                    plans.append((m, knames, pfs, key))
                    rec.update(fused=True, kernel=knames[-1] if len(knames) == 1 else knames,
                               config=str(pfs[0].attrs["kiln.gemm_config"] if "kiln.gemm_config" in pfs[0].attrs
                                          else pfs[0].attrs["kiln.gemv_config"]),
                               config_source=str(pfs[0].attrs["kiln.config_source"]),
                               epilogue=[list(s) for s in m.stages], replaces=_name(m.end), cut=m.cut)
                else:
                    rec.update(fused=False, reason=reason)
                records.append(rec)
        self.report = records
        if plans:
            rw = _Rewriter(mod, plans)
            mod = drop_dead_code(rewrite_functions(rw, mod))
        return mod.with_attr(REPORT_ATTR, json.dumps(records))


def fusion_report(mod: tvm.IRModule) -> list[dict]:
    """The records :class:`FuseGemmEpilogueSM90` left on ``mod`` (``[]`` if it did not run)."""
    return read_report(mod, REPORT_ATTR)
