"""The pattern half of :mod:`.fuse_attention`: find attention around ``nn.softmax`` / ``nn.attention``.

:func:`match_softmax` returns a :class:`Match` (q/k/v traced to the tensors the kernel reads, the scale,
the raw mask, the binding the fused call replaces and every binding it makes dead), ``None`` when the
softmax is not attention (no matmul on both sides), or raises :class:`Refused` with the reason when it
is attention of a form the fused call cannot express. The module docstring of :mod:`.fuse_attention`
lists the forms.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant as _Constant

from .attention_mask import MaskPlan

__all__ = ["Refused", "Graph", "build_graph", "Operand", "Match", "match_softmax", "match_nn_attention",
           "op_name", "dtype_of", "shape_of", "name_of", "scalar_of", "FLOATS"]

FLOATS = ("float16", "bfloat16", "float32")
_BSHD, _BHSD = ("b", "s", "h", "d"), ("b", "h", "s", "d")
_START = {"q": _BHSD, "kt": ("b", "h", "d", "s"), "v": _BHSD}   # logical axes of each matmul operand
_ROLE = {"q": "q", "kt": "k", "v": "v"}


class Refused(Exception):
    """An attention that cannot be fused; the message is the reason."""


# ------------------------------------------------------------------------------------------ helpers
def op_name(expr) -> str | None:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def dtype_of(expr) -> str | None:
    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def shape_of(expr) -> tuple | None:
    """Static shape as a tuple of ints; ``None`` if unknown; a tuple holding ``None`` where symbolic."""
    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    return tuple(int(v.value) if isinstance(v, tvm.tirx.IntImm) else None for v in ty.shape.values)


def name_of(e) -> str:
    return str(getattr(e, "name", None) or type(e).__name__)


def scalar_of(expr) -> float | None:
    """The value of a constant with one element, else None."""
    if isinstance(expr, _Constant) and expr.value.numpy().size == 1:
        return float(np.asarray(expr.value.numpy(), dtype=np.float64).reshape(()))
    return None


def _size1(expr) -> bool:
    shp = shape_of(expr)
    return shp is not None and None not in shp and int(np.prod(shp or (1,))) == 1


@dataclass
class Graph:
    """Bindings of one Relax function: var -> value, var -> consumers, var -> dataflow block index."""

    value: dict = field(default_factory=dict)
    consumers: dict = field(default_factory=dict)  # var -> binding vars using it (None = function output)
    block: dict = field(default_factory=dict)

    def users(self, var) -> list:
        return self.consumers.get(var, [])

    def val(self, e):
        return self.value.get(e) if isinstance(e, relax.Var) else None


def build_graph(func: relax.Function) -> Graph:
    g = Graph()
    if not isinstance(func.body, relax.SeqExpr):
        return g
    for bi, block in enumerate(func.body.blocks):
        for b in block.bindings:
            if not isinstance(b, relax.VarBinding):
                continue
            g.value[b.var] = b.value
            g.block[b.var] = bi if isinstance(block, relax.DataflowBlock) else -1
            for v in relax.analysis.free_vars(b.value):
                g.consumers.setdefault(v, []).append(b.var)
    for v in relax.analysis.free_vars(func.body.body):
        g.consumers.setdefault(v, []).append(None)
    return g


def _is_noop_broadcast(val, var) -> bool:
    return op_name(val) == "relax.broadcast_to" and shape_of(val.args[0]) == shape_of(var)


def _is_head_merge(val, var) -> bool:
    """``reshape`` between ``[B*H, a, b]`` and ``[B, H, a, b]`` (either direction)."""
    if op_name(val) != "relax.reshape":
        return False
    s_in, s_out = shape_of(val.args[0]), shape_of(var)
    if not s_in or not s_out or None in s_in[1:] or None in s_out[1:]:
        return False
    three, four = (s_in, s_out) if len(s_in) == 3 else (s_out, s_in)
    if len(three) != 3 or len(four) != 4 or four[2:] != three[1:]:
        return False
    if None not in (three[0], four[0]):
        return four[0] * four[1] == three[0]
    # a dynamic batch: the merged dim must be exactly B * H
    from tvm.sym.analyzer import Analyzer
    e3, e4 = (val.args[0].ty.shape.values, var.ty.shape.values)[::1 if len(s_in) == 3 else -1]
    return Analyzer().can_prove_equal(e3[0], e4[0] * e4[1])


# ------------------------------------------------------------------------------------------ pattern
@dataclass
class Operand:
    """q, k or v traced back to the tensor the kernel reads."""

    role: str
    base: relax.Expr
    labels: tuple | None       # logical axis of each base axis ("b", "h", "s", "d")
    rep: int = 1               # query heads per stored head (GQA repeat seen on the way)
    perm: tuple | None = None  # last permute_dims axes passed (for the report)

    @property
    def layout(self) -> str | None:
        return {_BSHD: "bshd", _BHSD: "bhsd"}.get(self.labels)

    def dim(self, label: str) -> int:
        return shape_of(self.base)[self.labels.index(label)]

    def dim_expr(self, label: str):
        """The dim as the PrimExpr of the base's shape (a symbolic batch is a ``tirx`` expression)."""
        return self.base.ty.shape.values[self.labels.index(label)]

    def static_but_batch(self) -> bool:
        s = shape_of(self.base)
        return s is not None and all(v is not None or self.labels[i] == "b" for i, v in enumerate(s))


@dataclass
class Match:
    """One attention and everything its rewrite needs."""

    pattern: str
    anchor: relax.Var
    q: Operand
    k: Operand
    v: Operand
    scale: float | None
    mask: tuple | None
    end: relax.Var
    end_layout: str
    internal: list             # (var, role) of every binding the rewrite makes dead
    causal_attr: bool = False
    safe_softmax: bool = False
    plan: MaskPlan | None = None
    dims: tuple = ()           # B, Sq, Skv, Hq, Hkv, D (B None: a dynamic batch, then batch_expr holds it)
    dtype: str = ""
    batch_expr: object = None  # the symbolic batch (a tirx expression of q's shape) when B is None


def _reaches_qk(g: Graph, e, depth: int = 12) -> bool:
    """``e`` comes from a matmul through the ops the score chain allows (to tell scores from a mask)."""
    for _ in range(depth):
        val = g.val(e)
        op = op_name(val)
        if op == "relax.matmul":
            return True
        if op in ("relax.astype", "relax.reshape", "relax.broadcast_to", "relax.divide"):
            e = val.args[0]
        elif op in ("relax.add", "relax.multiply"):
            return _reaches_qk(g, val.args[0], depth - 1) or _reaches_qk(g, val.args[1], depth - 1)
        elif op == "relax.where":
            return _reaches_qk(g, val.args[1], depth - 1) or _reaches_qk(g, val.args[2], depth - 1)
        else:
            return False
    return False


def _feeds_matmul(g: Graph, var, depth: int = 8) -> bool:
    """Some consumer path of ``var`` of at most ``depth`` bindings ends in a matmul."""
    frontier = [var]
    for _ in range(depth):
        nxt = [u for v in frontier for u in g.users(v) if u is not None]
        if any(op_name(g.value[u]) == "relax.matmul" for u in nxt):
            return True
        frontier = nxt
    return False


def _score_chain(g: Graph, x):
    """From the softmax input back to the ``Q K^T`` matmul: ``(qk, chain, scale, mask)``."""
    chain, scale, mask, cur, seen_scale = [], 1.0, None, x, False
    while True:
        val = g.val(cur)
        if val is None:
            raise Refused(f"scores {name_of(cur)} are not computed by a matmul in this function")
        chain.append(cur)
        op = op_name(val)
        if op == "relax.matmul":
            return cur, chain, scale, mask
        if op == "relax.astype" and str(val.attrs.dtype) in FLOATS:
            cur = val.args[0]
        elif _is_noop_broadcast(val, cur) or _is_head_merge(val, cur):
            cur = val.args[0]
        elif op in ("relax.multiply", "relax.divide"):
            a, b = val.args
            cb, ca = scalar_of(b), (scalar_of(a) if op == "relax.multiply" else None)
            if cb is None and ca is None:
                other = b if _reaches_qk(g, a) else a
                if _size1(other):
                    raise Refused(f"scores {name_of(cur)} are scaled by {name_of(other)}, a runtime tensor, not a "
                                  "compile-time constant scalar")
                raise Refused(f"scores {name_of(cur)} are {op[6:]}d by the tensor {name_of(other)}, not by a scalar")
            seen_scale = True
            factor = cb if cb is not None else ca
            scale *= (1.0 / factor) if op == "relax.divide" else factor
            cur = a if cb is not None else b
        elif op == "relax.add":
            a, b = val.args
            t, m = (a, b) if _reaches_qk(g, a) else (b, a)
            if mask is not None:
                raise Refused(f"a second mask is added to the scores at {name_of(cur)}")
            if seen_scale:   # walking backwards: a scale met before the mask is applied after it
                raise Refused(f"scores {name_of(cur)} are scaled after the mask is added")
            mask, cur = ("add", m), t
        elif op == "relax.where" and (scalar_of(val.args[1]) is None) != (scalar_of(val.args[2]) is None):
            c, a, b = val.args
            if mask is not None or seen_scale:
                raise Refused(f"a second mask, or a scale after the mask, at {name_of(cur)}")
            if scalar_of(b) is not None:        # where(keep, scores, neg)
                mask, cur = ("fill", c, False, scalar_of(b)), a
            else:                               # where(masked, neg, scores)
                mask, cur = ("fill", c, True, scalar_of(a)), b
        else:
            raise Refused(f"{name_of(cur)} ({op or type(val).__name__}) between the Q K^T matmul and the softmax is "
                          "not a cast, reshape, scale or mask")


def _safe_softmax_guard(g: Graph, val, p, x) -> list | None:
    """The vars of torch's safe-softmax guard ``where(all(x == -inf, -1), 0, p)``, or None."""
    cond, zero, keep = val.args
    if not keep.same_as(p) or not isinstance(zero, _Constant) or np.any(zero.value.numpy()):
        return None
    want = [("relax.logical_not", None), ("relax.astype", "bool"), ("relax.max", None), ("relax.astype", None),
            ("relax.logical_not", None), ("relax.equal", None)]
    chain, cur = [], cond
    for op, dt in want:
        v = g.val(cur)
        if op_name(v) != op or (dt and str(v.attrs.dtype) != dt):
            return None
        chain.append(cur)
        if op == "relax.max":
            axes = [int(a) for a in (v.attrs.axis or [])]
            if not v.attrs.keepdims or axes not in ([-1], [len(shape_of(x)) - 1]):
                return None
        cur = v.args[0]
    eq = g.value[chain[-1]]
    if not eq.args[0].same_as(x) or scalar_of(eq.args[1]) != float("-inf"):
        return None
    return chain


def _prob_chain(g: Graph, sm, x):
    """From the softmax output to the ``P V`` matmul: ``(pv, chain, guard_vars)``."""
    chain, guard, cur = [], [], sm
    while True:
        users = g.users(cur)
        if len(users) != 1 or users[0] is None:
            what = "is a function output" if None in users else f"has {len(users)} consumers"
            raise Refused(f"probabilities {name_of(cur)} {what}")
        nxt = users[0]
        val = g.value[nxt]
        op = op_name(val)
        if op == "relax.matmul":
            if not val.args[0].same_as(cur):
                raise Refused(f"probabilities {name_of(cur)} are the right operand of matmul {name_of(nxt)}")
            return nxt, chain, guard
        if op == "relax.where" and not guard and (found := _safe_softmax_guard(g, val, cur, x)) is not None:
            guard = found
        elif not (op == "relax.astype" and str(val.attrs.dtype) in FLOATS) and not _is_noop_broadcast(val, nxt) \
                and not _is_head_merge(val, nxt):
            raise Refused(f"probabilities {name_of(cur)} go through {op or type(val).__name__} ({name_of(nxt)}) "
                          "before the P V matmul")
        chain.append(nxt)
        cur = nxt


def _compose(labels: tuple, axes: tuple) -> tuple:
    """Labels of ``x`` given the labels of ``permute_dims(x, axes)``."""
    out = [None] * len(axes)
    for i, a in enumerate(axes):
        out[a] = labels[i]
    return tuple(out)


def _axes(val) -> tuple:
    axes = val.attrs.axes
    nd = len(shape_of(val.args[0]))
    return tuple(range(nd - 1, -1, -1)) if axes is None else tuple(int(a) for a in axes)


def _gqa_source(g: Graph, val, var, hi: int):
    """``(W, rep)`` when ``var = reshape(broadcast_to(expand_dims(W, hi+1)), ...)`` merges heads
    ``[Hkv, rep] -> Hkv*rep`` at axis ``hi`` (transformers' ``repeat_kv``), else None."""
    src = val.args[0]
    s5, s4 = shape_of(src), shape_of(var)
    if s5 is None or len(s5) != 5 or s5[:hi] != s4[:hi] or s5[hi + 2:] != s4[hi + 1:] or s5[hi] * s5[hi + 1] != s4[hi]:
        return None
    bval = g.val(src)
    if op_name(bval) != "relax.broadcast_to":
        return None
    inner = bval.args[0]
    si = shape_of(inner)
    if si is None or si[hi + 1] != 1 or si[:hi + 1] != s5[:hi + 1] or si[hi + 2:] != s5[hi + 2:]:
        return None
    ival = g.val(inner)
    if op_name(ival) == "relax.expand_dims" and [int(a) for a in ival.attrs.axis] in ([hi + 1], [hi + 1 - 5]):
        return ival.args[0], s5[hi + 1]
    if op_name(ival) == "relax.reshape" and shape_of(ival.args[0]) == si[:hi + 1] + si[hi + 2:]:
        return ival.args[0], s5[hi + 1]
    return None


def _peel(g: Graph, e, role: str):
    """Trace a matmul operand back to the tensor the kernel reads: ``(Operand, scale factor)``."""
    labels = _START[role] if len(shape_of(e) or ()) == 4 else None
    scale, rep, perm = 1.0, 1, None
    while (val := g.val(e)) is not None:
        op = op_name(val)
        src = val.args[0] if isinstance(val, relax.Call) and val.args else None
        if op == "relax.astype" and str(val.attrs.dtype) == "float32" and dtype_of(src) in FLOATS:
            e = src                                 # an exact upcast: the kernel reads the narrow tensor
        elif op in ("relax.multiply", "relax.divide") and role != "v" and \
                (scalar_of(val.args[1]) is not None or (op == "relax.multiply" and scalar_of(val.args[0]) is not None)):
            c = scalar_of(val.args[1])
            if c is not None:
                scale, e = scale * (1.0 / c if op == "relax.divide" else c), val.args[0]
            else:
                scale, e = scale * scalar_of(val.args[0]), val.args[1]
        elif _is_noop_broadcast(val, e):
            e = src
        elif op == "relax.broadcast_to" and labels is not None and role != "q":
            hi, s_src, s_out = labels.index("h"), shape_of(src), shape_of(e)
            if s_src is None or len(s_src) != 4 or s_src[hi] != 1 or \
                    any(a != b for i, (a, b) in enumerate(zip(s_src, s_out)) if i != hi):
                break
            rep, e = rep * s_out[hi], src           # one KV head broadcast over all query heads (MQA)
        elif op == "relax.reshape" and labels is None and _is_head_merge(val, e):
            labels, e = _START[role], src
        elif op == "relax.reshape" and labels is not None and role != "q" and \
                (gqa := _gqa_source(g, val, e, labels.index("h"))) is not None:
            e, rep = gqa[0], rep * gqa[1]
        elif op == "relax.permute_dims" and labels is not None:
            perm = _axes(val)
            labels, e = _compose(labels, perm), src
        else:
            break
    return Operand(_ROLE[role], e, labels, rep, perm), scale


def _output_chain(g: Graph, pv, dims: tuple, dtype: str):
    """From the ``P V`` matmul to the last BHSD/BSHD tensor in ``dtype``: ``(end, layout, internal)``."""
    B, Hq, Sq, D = dims
    cur = pv
    labels = _BHSD if shape_of(pv) == (B, Hq, Sq, D) else None
    chain, best = [pv], None

    def candidate():
        layout = {_BSHD: "bshd", _BHSD: "bhsd"}.get(labels)
        return (cur, layout, len(chain) - 1) if layout and dtype_of(cur) == dtype else None

    best = candidate() or best
    while True:
        users = g.users(cur)
        if len(users) != 1 or users[0] is None or g.block.get(users[0]) != g.block.get(pv):
            break
        nxt = users[0]
        val = g.value[nxt]
        op = op_name(val)
        if op == "relax.astype" and str(val.attrs.dtype) in FLOATS or _is_noop_broadcast(val, nxt):
            pass
        elif op == "relax.reshape" and labels is None and shape_of(nxt) == (B, Hq, Sq, D) and _is_head_merge(val, nxt):
            labels = _BHSD
        elif op == "relax.permute_dims" and labels is not None:
            labels = tuple(labels[a] for a in _axes(val))
        else:
            break
        chain.append(nxt)
        cur = nxt
        best = candidate() or best
    if best is None:
        raise Refused(f"the output of P V matmul {name_of(pv)} never becomes a [B, H, S, D] or [B, S, H, D] "
                      f"{dtype} tensor through casts, reshapes and permutes")
    end, layout, idx = best
    return end, layout, chain[:idx]


def match_softmax(g: Graph, sm) -> Match | None:
    """Pattern of a decomposed attention around softmax binding ``sm`` (None: not attention)."""
    call = g.value[sm]
    x = call.args[0]
    if not _reaches_qk(g, x) or not _feeds_matmul(g, sm):
        return None
    xs = shape_of(x)
    if xs is None or None in xs[1:] or (xs[0] is None and len(xs) != 4):
        raise Refused(f"non-static shapes (scores {xs}): the kernels are built per static shape (only a [B, H, Sq, "
                      "Skv] batch may be dynamic)")
    axis = int(call.attrs.axis)
    rank = len(xs)
    if axis not in (-1, rank - 1):
        raise Refused(f"softmax {name_of(sm)} is over axis {axis}, not the key axis {rank - 1}")
    qk, schain, scale, mask = _score_chain(g, x)
    pv, pchain, guard = _prob_chain(g, sm, x)
    q, sq = _peel(g, g.value[qk].args[0], "q")
    k, sk = _peel(g, g.value[qk].args[1], "kt")
    v, _ = _peel(g, g.value[pv].args[1], "v")
    for o in (q, k, v):
        if o.labels is None:
            raise Refused(f"{o.role} operand {name_of(o.base)} is 3-D without a [B, H, S, D] form (heads merged into "
                          "the batch before the attention)")
        if o.layout is None:
            via = f"permute_dims axes {list(o.perm)}" if o.perm else "its producer"
            raise Refused(f"{o.role} {name_of(o.base)} has axes ({', '.join(o.labels)}) through {via}: neither "
                          "BSHD (a permute_dims [0, 2, 1, 3] of it) nor BHSD")
    if q.rep != 1:
        raise Refused(f"q {name_of(q.base)} is broadcast over heads")
    dtype = dtype_of(q.base)
    shapes = [shape_of(o.base) for o in (q, k, v)] + [xs]
    if not all(o.static_but_batch() for o in (q, k, v)):
        raise Refused(f"non-static shapes (q {shapes[0]}, k {shapes[1]}, v {shapes[2]}, scores {xs}): the "
                      "kernels are built per static shape (only the batch may be dynamic)")
    batch = _dynamic_batch((q, k, v), x.ty.shape.values[0] if xs[0] is None else None)
    B, Sq, Hq, D = (q.dim(a) for a in "bshd")
    end, layout, ochain = _output_chain(g, pv, (B, Hq, Sq, v.dim("d")), dtype)
    internal = ([(c, "scores") for c in schain] + [(c, "probabilities") for c in [sm] + pchain + guard]
                + [(c, "attention output") for c in ochain])
    m = Match("decomposed", sm, q, k, v, scale * sq * sk, mask, end, layout, internal, safe_softmax=bool(guard))
    m.dims, m.dtype, m.batch_expr = (B, Sq, k.dim("s"), Hq, k.dim("h"), D), dtype, batch
    return m


def _dynamic_batch(ops, scores_batch=None):
    """The symbolic batch shared by q, k, v (and the scores), ``None`` when static; ``Refused`` when they differ."""
    exprs = [o.dim_expr("b") for o in ops] + ([scores_batch] if scores_batch is not None else [])
    if all(isinstance(e, tvm.tirx.IntImm) for e in exprs):
        return None
    from tvm.sym.analyzer import Analyzer
    an = Analyzer()
    if any(isinstance(e, tvm.tirx.IntImm) or not (e.same_as(exprs[0]) or an.can_prove_equal(e, exprs[0]))
           for e in exprs[1:]):
        raise Refused(f"q, k, v (and scores) have different batch dims {[str(e) for e in exprs]}")
    return exprs[0]


def match_nn_attention(g: Graph, var) -> Match:
    """Pattern of ``R.nn.attention(q, k, v, bias?)`` (BSHD already)."""
    call = g.value[var]
    q, k, v = (Operand(r, a, _BSHD) for r, a in zip("qkv", call.args[:3]))
    bias = call.args[3] if len(call.args) > 3 else None
    shapes = [shape_of(o.base) for o in (q, k, v)]
    if not all(o.static_but_batch() for o in (q, k, v)):
        raise Refused(f"non-static shapes (q {shapes[0]}, k {shapes[1]}, v {shapes[2]}): only the batch may be "
                      "dynamic")
    batch = _dynamic_batch((q, k, v))
    attrs = call.attrs
    if attrs.window_size is not None:
        raise Refused(f"nn.attention {name_of(var)} has a sliding window ({attrs.window_size})")
    causal = str(attrs.causal_mask) if attrs.causal_mask is not None else None
    B, Sq, Hq, D = shapes[0]
    Skv = shapes[1][1]
    if causal not in (None, "TopLeft") and not (causal == "BottomRight" and Sq == Skv):
        raise Refused(f"nn.attention causal_mask={causal!r} with Sq={Sq} != Skv={Skv} is bottom-right aligned; the "
                      "kernels are top-left")
    scale = float(attrs.scale.value) if attrs.scale is not None else None
    m = Match("nn.attention", var, q, k, v, scale, ("add", bias) if bias is not None else None, var, "bshd", [],
               causal_attr=causal is not None)
    m.dims, m.dtype, m.batch_expr = (B, Sq, Skv, Hq, shapes[1][2], D), dtype_of(q.base), batch
    return m
