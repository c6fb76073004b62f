"""Attention-mask analysis for :mod:`.fuse_attention`: what a mask in the graph means, or why it is refused.

A fused attention kernel takes the mask in two forms only: **causal** (top-left: query ``i`` sees keys
``j <= i``) and a **key-padding bias** ``kpad[B, Skv]`` (fp32, added to every score of key ``j`` in batch
``b``, for every head and query). :func:`analyse_mask` maps the mask the graph applies to the scores onto
those, soundly:

* a mask that depends on no function parameter (transformers 5 builds its causal and "all ones" masks from
  ``arange``/compare/``where``/``index_tensor`` on constants) is **evaluated** at compile time (the
  sub-graph is built and run for llvm, once per mask) and classified from its values: all zeros -> no
  mask; equal over queries -> constant key bias; masked (``<= NEG_THRESHOLD`` or ``-inf``) exactly above
  the diagonal with the rest equal over queries -> causal (+ constant key bias);
* a mask that depends on runtime data must be a key bias by **shape**: its data varies over batch and key
  only (``[B|1, 1, 1, Skv]`` once broadcasts are looked through);
* ``where(keep, 0, neg)`` (and ``where(masked, neg, 0)``, and ``masked_fill`` on the scores) is split into
  its conjuncts (``&``, De Morgan through ``~``/``|``): constant ones are evaluated and classified as above,
  runtime ones must be key-shaped; that is how ``causal & padding`` (Llama/GPT-2 with an attention_mask)
  becomes causal + ``kpad = where(padding, 0, neg)``.

Anything else (a mask that varies over heads, a runtime mask over queries, a relative-position bias,
``+inf``/NaN fill values, a mask built from weights) is refused with the reason.

Numerics: a masked score ``<= NEG_THRESHOLD`` (-1e4) becomes ``-inf`` in the causal part (exp underflows to
0 in fp32 either way unless the scores spread over ~1e4). Rows whose *every* key is masked differ: the graph
averages V uniformly over all keys (finite fill) or gives NaN/0 (``-inf`` fill), the kernel averages over the
keys it does not mask causally, or gives 0 for an all ``-inf`` row; such rows are padding queries whose
output is meaningless either way.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant as _Constant

__all__ = ["NEG_THRESHOLD", "MaskPlan", "MaskRefused", "ConstEvaluator", "analyse_mask"]

#: A constant mask value at or below this is "masked" (the causal part becomes -inf in the kernel).
NEG_THRESHOLD = -1.0e4

_AND = ("relax.logical_and", "relax.bitwise_and")
_OR = ("relax.logical_or", "relax.bitwise_or")
_NOT = ("relax.logical_not", "relax.bitwise_not")
_ELEMWISE = _AND + _OR + _NOT + ("relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.where",
                                 "relax.astype", "relax.equal", "relax.not_equal", "relax.less", "relax.less_equal",
                                 "relax.greater", "relax.greater_equal", "relax.negative", "relax.maximum",
                                 "relax.minimum")


class MaskRefused(Exception):
    """The mask cannot be expressed as causal + key bias; the message is the reason."""


@dataclass
class MaskPlan:
    """What the kernel gets for one mask.

    Attributes
    ----------
    causal : bool
        Top-left causal masking.
    kpad_const : numpy.ndarray or None
        Constant part of the key bias, ``[B, Skv]`` float32.
    keep_terms : list of (relax.Expr, bool)
        Runtime boolean conditions ``(expr, negated)`` AND-ed into "key is kept"; each broadcasts to
        ``[B|1, 1, 1, Skv]`` (after its last broadcasts are looked through). Kept keys get 0, others ``neg``.
    bias_terms : list of relax.Expr
        Runtime additive key-shaped biases (summed, in fp32).
    neg : float
        The fill value of masked keys in ``keep_terms`` (the graph's own: ``-inf``, ``finfo.min``, -1e4 ...).
    kind : str
        ``"none"``, ``"causal"``, ``"kpad"`` or ``"causal+kpad"`` (for the report).
    source : str
        How the mask was read (for the report).
    """

    causal: bool = False
    kpad_const: np.ndarray | None = None
    keep_terms: list = field(default_factory=list)
    bias_terms: list = field(default_factory=list)
    neg: float = float("-inf")
    kind: str = "none"
    source: str = "none"

    @property
    def has_kpad(self) -> bool:
        return self.kpad_const is not None or bool(self.keep_terms) or bool(self.bias_terms)

    def finish(self) -> "MaskPlan":
        if self.kpad_const is not None and not np.any(self.kpad_const):
            self.kpad_const = None
        self.kind = ("causal" if self.causal else "") + ("+kpad" if self.has_kpad and self.causal else
                                                        "kpad" if self.has_kpad else "")
        self.kind = self.kind or "none"
        return self


# ------------------------------------------------------------------------------------------ helpers
def _op(expr) -> str | None:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def _shape(expr) -> tuple | None:
    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    return tuple(int(v.value) if isinstance(v, tvm.tirx.IntImm) else None for v in ty.shape.values)


def _name(e) -> str:
    return str(getattr(e, "name", None) or type(e).__name__)


def _scalar(expr) -> float | None:
    """The value of a constant with one element, else None."""
    if isinstance(expr, _Constant):
        arr = expr.value.numpy()
        if arr.size == 1:
            return float(np.asarray(arr, dtype=np.float64).reshape(()))
    return None


def _pad4(shape: tuple) -> tuple:
    return (1,) * (4 - len(shape)) + tuple(shape)


# ------------------------------------------------------------------------------------------ evaluation
class ConstEvaluator:
    """Evaluate parameter-free sub-graphs of one Relax function (built and run for llvm, cached per var).

    Parameters
    ----------
    value : dict
        ``var -> bound value`` for the function's bindings, in binding order.
    """

    def __init__(self, value: dict):
        self.value = value
        self.order = {v: i for i, v in enumerate(value)}
        self.cache: dict = {}
        self.closure: dict = {}
        self.evaluations = 0
        self.seconds = 0.0

    def _deps(self, expr) -> list | None:
        """Bound vars ``expr`` depends on (transitively), or None if it depends on a parameter or an impure call."""
        out, stack, seen = [], [expr], set()
        while stack:
            e = stack.pop()
            vars_ = []
            ok = [True]

            def visit(n):
                if isinstance(n, relax.Var):
                    vars_.append(n)
                elif isinstance(n, relax.Call) and not isinstance(n.op, tvm.ir.Op):
                    ok[0] = False
                elif isinstance(n, relax.Call) and n.op.name.startswith(("relax.call_", "relax.builtin", "relax.vm")):
                    ok[0] = False
            relax.analysis.post_order_visit(e, visit)
            if not ok[0]:
                return None
            for v in vars_:
                if v in seen:
                    continue
                seen.add(v)
                if v not in self.value:
                    return None   # a function parameter (input or weight): not a compile-time constant
                out.append(v)
                stack.append(self.value[v])
        return sorted(out, key=self.order.__getitem__)

    def is_constant(self, expr) -> bool:
        if isinstance(expr, _Constant):
            return True
        if expr not in self.closure:
            self.closure[expr] = self._deps(expr)
        return self.closure[expr] is not None

    def __call__(self, expr) -> np.ndarray:
        """The value of a constant tensor expression as a numpy array (bf16 as float32)."""
        return self.many([expr])[0]

    def many(self, exprs: list) -> list:
        """The values of several constant tensor expressions, built and run as one function."""
        todo = [e for e in exprs if not isinstance(e, _Constant) and e not in self.cache]
        for e in todo:
            if not self.is_constant(e):
                raise ValueError(f"{_name(e)} depends on a function parameter")
        if todo:
            t0 = time.perf_counter()
            deps = sorted({v for e in todo for v in self.closure[e]}, key=self.order.__getitem__)
            bindings = [relax.VarBinding(v, self.value[v]) for v in deps]
            outs = relax.Tuple(todo)
            out = relax.Var("out", relax.TupleType([e.ty for e in todo]))
            bindings.append(relax.VarBinding(out, outs))
            func = relax.Function([], relax.SeqExpr([relax.DataflowBlock(bindings)], out), out.ty)
            func = func.with_attr("global_symbol", "main")
            ex = tvm.compile(tvm.IRModule({"main": func}), tvm.target.Target({"kind": "llvm"}))
            res = relax.VirtualMachine(ex, tvm.cpu())["main"]()
            for i, e in enumerate(todo):
                self.cache[e] = _to_numpy(res[i].numpy())
            self.evaluations += 1
            self.seconds += time.perf_counter() - t0
        return [_to_numpy(e.value.numpy()) if isinstance(e, _Constant) else self.cache[e] for e in exprs]


def _to_numpy(arr) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.kind == "V" or "bfloat16" in str(arr.dtype):
        arr = arr.astype(np.float32)
    return arr


# ------------------------------------------------------------------------------------------ classification
def classify_dense(arr: np.ndarray, B: int, H: int, Sq: int, Skv: int) -> tuple[bool, np.ndarray | None]:
    """``(causal, kpad [B, Skv] or None)`` for a constant additive mask, or :class:`MaskRefused`."""
    a = np.asarray(arr, dtype=np.float32)
    if a.ndim > 4:
        raise MaskRefused(f"constant mask of rank {a.ndim} > 4")
    a = a.reshape(_pad4(a.shape))
    want = (B, H, Sq, Skv)
    if any(s not in (1, w) for s, w in zip(a.shape, want)):
        raise MaskRefused(f"constant mask of shape {list(a.shape)} does not broadcast to {list(want)}")
    if np.isnan(a).any() or np.isposinf(a).any():
        raise MaskRefused("constant mask holds NaN or +inf")
    if a.shape[1] > 1 and not (a == a[:, :1]).all():
        raise MaskRefused("constant mask varies over heads (the kernels take one mask for all heads)")
    a = np.broadcast_to(a[:, 0], (a.shape[0], Sq, Skv))
    if (a <= NEG_THRESHOLD).all(axis=-1).any():
        raise MaskRefused("constant mask masks every key of some query row (the kernels give such a row 0, the "
                          "graph a uniform average or NaN)")
    if (a == a[:, :1, :]).all():                       # the same for every query: a key bias (or nothing)
        return False, np.broadcast_to(a[:, 0, :], (B, Skv)).copy()
    i, j = np.arange(Sq)[:, None], np.arange(Skv)[None, :]
    upper = j > i
    if not (a[:, upper] <= NEG_THRESHOLD).all():
        raise MaskRefused("constant mask varies over queries and is not causal (top-left): some key after the "
                          f"query is not masked (<= {NEG_THRESHOLD:g})")
    diag = np.zeros((a.shape[0], Skv), np.float32)
    n = min(Sq, Skv)
    diag[:, :n] = a[:, np.arange(n), np.arange(n)]
    lower = ~upper
    if not (np.broadcast_to(diag[:, None, :], a.shape)[:, lower] == a[:, lower]).all():
        raise MaskRefused("constant mask is causal above the diagonal but varies over queries below it")
    return True, np.broadcast_to(diag, (B, Skv)).copy()


def _eff_shape(value: dict, expr) -> tuple | None:
    """Shape of the smallest tensor ``expr`` is a broadcast of (through broadcasts and elementwise ops)."""
    shp = _shape(expr)
    if shp is None or None in shp:
        return None
    val = value.get(expr) if isinstance(expr, relax.Var) else None
    op = _op(val)
    if op == "relax.broadcast_to":
        inner = _eff_shape(value, val.args[0])
        return None if inner is None else (1,) * (len(shp) - len(inner)) + inner
    if op in _ELEMWISE:
        dims = [1] * len(shp)
        for a in val.args:
            if not isinstance(a, (relax.Var, _Constant)):
                continue
            s = _eff_shape(value, a) if isinstance(a, relax.Var) else _shape(a)
            if s is None:
                return shp
            s = (1,) * (len(shp) - len(s)) + tuple(s)
            dims = [max(x, y) for x, y in zip(dims, s)]
        return tuple(dims)
    return shp


def _key_shaped(value: dict, expr, B: int, Skv: int) -> str | None:
    """None when ``expr`` varies over batch and key only (broadcastable to ``[B, 1, 1, Skv]``), else why not."""
    shp = _shape(expr)
    if shp is None or None in shp or len(shp) > 4:
        return f"{_name(expr)} has a non-static shape {shp}"
    eff = _pad4(_eff_shape(value, expr) or shp)
    if eff[1] != 1 or eff[2] != 1 or eff[0] not in (1, B) or eff[3] not in (1, Skv):
        return (f"runtime mask {_name(expr)} (data shape {list(eff)}) is not a key-padding mask broadcast over "
                f"heads and queries ([B|1, 1, 1, {Skv}])")
    return None


def _terms(value: dict, cond, negated: bool, out: list) -> None:
    """Flatten ``cond`` (or ``~cond``) into AND-ed leaves ``(expr, negated)``."""
    val = value.get(cond) if isinstance(cond, relax.Var) else None
    op = _op(val)
    if op in _NOT and (op == "relax.logical_not" or str(cond.ty.dtype) == "bool"):
        _terms(value, val.args[0], not negated, out)
    elif (op in _AND and not negated) or (op in _OR and negated):
        for a in val.args:
            _terms(value, a, negated, out)
    elif op == "relax.broadcast_to":
        _terms(value, val.args[0], negated, out)
    else:
        out.append((cond, negated))


def _split_fill(value: dict, ev: ConstEvaluator, cond, negated: bool, neg: float, B, H, Sq, Skv,
                plan: MaskPlan) -> MaskPlan:
    """``keep = cond`` (or ``~cond``) and masked keys get ``neg``: constant conjuncts -> causal/kpad_const,
    runtime conjuncts -> keep_terms."""
    if np.isnan(neg) or neg > 0:
        raise MaskRefused(f"masked-score fill value {neg} is not a negative number")
    leaves: list = []
    if ev.is_constant(cond):   # one evaluation of the whole condition (shared by every layer using it)
        leaves.append((cond, negated))
    else:
        _terms(value, cond, negated, leaves)
    const_leaves = [(e, n) for e, n in leaves if ev.is_constant(e)]
    const_keep = None
    for (expr, neg_leaf), arr in zip(const_leaves, ev.many([e for e, _ in const_leaves])):
        arr = arr.astype(bool)
        arr = ~arr if neg_leaf else arr
        const_keep = arr if const_keep is None else np.logical_and(const_keep, arr)
    for expr, neg_leaf in leaves:
        if not ev.is_constant(expr):
            why = _key_shaped(value, expr, B, Skv)
            if why:
                raise MaskRefused(why)
            plan.keep_terms.append((expr, neg_leaf))
    plan.neg = float(neg)
    if const_keep is not None:
        dense = np.where(const_keep, np.float32(0), np.float32(neg))
        plan.causal, plan.kpad_const = classify_dense(dense, B, H, Sq, Skv)
    return plan


def analyse_mask(value: dict, ev: ConstEvaluator, mask, B: int, H: int, Sq: int, Skv: int) -> MaskPlan:
    """Read the mask applied to the ``[B, H, Sq, Skv]`` scores.

    Parameters
    ----------
    value : dict
        ``var -> bound value`` of the function.
    ev : ConstEvaluator
        Evaluator of the same function.
    mask : tuple or None
        ``None`` (no mask), ``("add", expr)`` (an additive mask) or ``("fill", cond, negated, neg)`` (the
        scores are replaced by ``neg`` where ``cond`` -- or ``~cond`` when ``negated`` -- is false).
    B, H, Sq, Skv : int
        Score shape.

    Returns
    -------
    MaskPlan

    Raises
    ------
    MaskRefused
        With the reason the mask is not causal + a key bias.
    """
    plan = MaskPlan()
    if mask is None:
        return plan.finish()
    if mask[0] == "fill":
        _, cond, negated, neg = mask
        plan.source = "masked_fill"
        return _split_fill(value, ev, cond, negated, neg, B, H, Sq, Skv, plan).finish()
    expr = mask[1]
    shp = _shape(expr)
    if shp is None or None in shp:
        raise MaskRefused(f"mask {_name(expr)} has a non-static shape {shp}")
    val = value.get(expr) if isinstance(expr, relax.Var) else None
    if _op(val) == "relax.where":
        cond, a, b = val.args
        va, vb = _scalar(a), _scalar(b)
        const = " (constant, evaluated)" if ev.is_constant(cond) else ""
        if va == 0.0 and vb is not None:
            plan.source = "where(keep, 0, neg)" + const
            return _split_fill(value, ev, cond, False, vb, B, H, Sq, Skv, plan).finish()
        if vb == 0.0 and va is not None:
            plan.source = "where(masked, neg, 0)" + const
            return _split_fill(value, ev, cond, True, va, B, H, Sq, Skv, plan).finish()
    if _op(val) == "relax.astype" and str(expr.ty.dtype) in ("float32", "float16", "bfloat16"):
        inner = analyse_mask(value, ev, ("add", val.args[0]), B, H, Sq, Skv)
        if not inner.bias_terms:     # the cast of a where/constant mask: the same mask (fill value cast)
            return inner
    if ev.is_constant(expr):
        plan.source = "constant (evaluated)"
        plan.causal, plan.kpad_const = classify_dense(ev(expr), B, H, Sq, Skv)
        return plan.finish()
    why = _key_shaped(value, expr, B, Skv)
    if why:
        raise MaskRefused(why)
    plan.source = "runtime additive"
    plan.bias_terms.append(expr)
    return plan.finish()
