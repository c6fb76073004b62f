"""Symbolic equivalence of Relax rewrites at tiny shapes, with z3.

A Relax function is evaluated elementwise over z3 Reals: every input element is a fresh real variable (a z3
boolean for a ``bool`` input), and matmul, add, concat, split, permute, reshape, conv2d, softmax... build the
exact term of each output element (the ops are in :mod:`.symbolic_ops`). Two functions are proved equivalent
when the solver finds no assignment of the inputs that makes any output element differ.

Semantics, and what a proof therefore means:

* arithmetic is exact over the reals: ``astype`` between number types is the identity, so a proof says the
  rewrite computes the same mathematical function; rounding differences (fp16 accumulation order, where the
  cast happens) are the job of the differential numerics tests, not of the proof;
* ``exp``, ``tanh``, ``erf``, ``sigmoid``, GELU and SiLU are *uninterpreted* functions (one per op, the same on
  both sides): a proof holds for any function in their place, so it never relies on a property of them that was
  not stated (the attention proof, :mod:`.attention_proof`, states the exp axioms it needs);
  ``relu``/``maximum``/``minimum``/``max`` are ``If`` terms;
* ``-inf`` is a value (:mod:`.xreal`: ``exp(-inf) = 0``, ``max(-inf, x) = x``); ``+inf`` and NaN are not modelled
  (an op that would make one raises :class:`SymbolicUnsupported`); a softmax row that may be all ``-inf``
  (NaN) is excluded by a side condition that the proof reports and checks for satisfiability;
* shapes must be static (use tiny ones: the term size grows with the contraction length).

The public entry points are :func:`evaluate` (or :class:`Evaluator`), :func:`prove_equivalent`,
:func:`prove_epilogue_rule` (the GEMM epilogue pass's stage list against the Relax ops it replaces),
:func:`prove_sibling_rule` and :func:`rule_refusal` (the passes' gate, cached per rule instance).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

import tvm
from tvm import relax

from . import xreal as xr
from .symbolic_ops import OPS
from .xreal import SymbolicUnsupported

__all__ = ["SymbolicUnsupported", "Proof", "Evaluator", "evaluate", "prove_equivalent", "prove_epilogue_rule",
           "prove_sibling_rule", "rule_refusal", "check_outputs", "differ"]


@dataclass
class Proof:
    """Outcome of one equivalence check."""

    status: str                     # "proved", "failed" (counterexample found) or "unknown" (solver gave up)
    seconds: float
    outputs: int                    # output elements compared
    counterexample: dict = field(default_factory=dict)   # input element -> value, when failed
    detail: str = ""

    def __bool__(self) -> bool:
        return self.status == "proved"


def _z3():
    try:
        import z3
    except ImportError:  # pragma: no cover - z3-solver is a dependency
        raise SymbolicUnsupported("z3-solver is not installed (pip install z3-solver)") from None
    return z3


def _static_shape(ty, what: str) -> tuple:
    shape = getattr(ty, "shape", None)
    if not isinstance(shape, relax.ShapeExpr) or not all(isinstance(v, tvm.tirx.IntImm) for v in shape.values):
        raise SymbolicUnsupported(f"{what}: shape {shape} is not static")
    return tuple(int(v.value) for v in shape.values)


class Evaluator:
    """Evaluates Relax functions over z3 terms.

    Parameters
    ----------
    neg_threshold : float, optional
        Constants at or below it are read as ``-inf`` (the attention proof's masking axiom: a mask fill value
        ``<= -1e4`` is "masked", see :mod:`.attention_proof`). Default: only ``-inf`` itself is ``-inf``.
    kernels : dict, optional
        ``PrimFunc name -> callable(*evaluated args)``: models of the kernels ``call_tir`` calls.

    Attributes
    ----------
    assumptions : list
        Side conditions met while evaluating (a softmax row that may be all ``-inf`` is not).
    """

    def __init__(self, neg_threshold: float | None = None, kernels: dict | None = None):
        self.z3 = _z3()
        self.funcs: dict = {}
        self.neg_threshold = neg_threshold
        self.kernels = kernels or {}
        self.assumptions: list = []

    def fn(self, name):
        """The uninterpreted real function ``name`` (one per name and evaluator)."""
        if name not in self.funcs:
            self.funcs[name] = self.z3.Function(name, self.z3.RealSort(), self.z3.RealSort())
        return self.funcs[name]

    def scalar(self, v: float, dtype: str = "float32"):
        """One constant element: a z3 boolean, ``-inf``, or an exact real (the float's shortest decimal)."""
        if dtype == "bool":
            return self.z3.BoolVal(bool(v))
        v = float(v)
        if math.isnan(v) or v == math.inf:
            raise SymbolicUnsupported(f"constant {v} (NaN and +inf are not modelled)")
        if v == -math.inf or (self.neg_threshold is not None and v <= self.neg_threshold):
            return xr.NEG_INF
        return self.z3.RealVal(str(v))

    def const(self, c):
        arr = c.value.numpy()
        dt = str(c.value.dtype)
        out = np.empty(arr.shape, dtype=object)
        for idx in np.ndindex(arr.shape):
            out[idx] = self.scalar(arr[idx], "bool" if dt == "bool" else dt)
        return out

    def expr(self, e, env):
        if isinstance(e, relax.Var):
            return env[e]
        if isinstance(e, tvm.tirx.IntImm):
            return int(e.value)
        if isinstance(e, tvm.ir.expr.Constant):
            return self.const(e)
        if isinstance(e, relax.Tuple):
            return tuple(self.expr(f, env) for f in e.fields)
        if isinstance(e, relax.TupleGetItem):
            return self.expr(e.tuple_value, env)[e.index]
        if isinstance(e, relax.ShapeExpr):
            return tuple(int(v.value) for v in e.values)
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir":
            name = e.args[0].name_hint
            if name not in self.kernels:
                raise SymbolicUnsupported(f"call_tir of {name}: no model of that kernel")
            return self.kernels[name](*self.expr(e.args[1], env))
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            if e.op.name not in OPS:
                raise SymbolicUnsupported(f"op {e.op.name} is not modelled by kiln.verify.symbolic")
            return OPS[e.op.name](self, e, [self.expr(a, env) for a in e.args])
        raise SymbolicUnsupported(f"cannot evaluate {type(e).__name__} symbolically")

    def symbols(self, func: relax.Function) -> list:
        """Fresh variables ``<param>[i,j,...]`` for every parameter (z3 booleans for ``bool`` ones)."""
        out = []
        for p in func.params:
            shape = _static_shape(p.ty, f"parameter {_vname(p)}")
            mk = self.z3.Bool if str(p.ty.dtype) == "bool" else self.z3.Real
            arr = np.empty(shape, dtype=object)
            for idx in np.ndindex(shape):
                arr[idx] = mk(f"{_vname(p)}[{','.join(map(str, idx))}]" if shape else _vname(p))
            out.append(arr)
        return out

    def run(self, mod: tvm.IRModule, inputs=None, func: str = "main"):
        """Evaluate ``mod[func]`` on ``inputs`` (default: :meth:`symbols`); the output array or tuple."""
        f = mod[func]
        inputs = self.symbols(f) if inputs is None else inputs
        env = dict(zip(f.params, inputs))
        body = f.body
        for block in body.blocks:
            for b in block.bindings:
                env[b.var] = self.expr(b.value, env)
        return self.expr(body.body, env)


def _vname(v) -> str:
    return str(getattr(v, "name", None) or getattr(v, "name_hint", "v"))


def evaluate(mod: tvm.IRModule, inputs=None, func: str = "main"):
    """Evaluate ``mod[func]`` over z3 terms: ``inputs`` (object arrays of z3 terms, one per parameter) default
    to fresh variables named ``<param>[i,j,...]``. Returns the output (an array, or a tuple of them)."""
    return Evaluator().run(mod, inputs, func)


def _flatten(x):
    if isinstance(x, tuple):
        return [e for part in x for e in _flatten(part)]
    return list(np.asarray(x, dtype=object).reshape(-1))


def differ(z3, a, b):
    """``a != b`` for two output elements (booleans, reals or ``-inf``)."""
    if isinstance(a, z3.BoolRef) or isinstance(b, z3.BoolRef):
        return a != b
    return z3.Not(xr.compare("==", a, b))


def check_outputs(pairs, assumptions=(), timeout_ms: int = 60000, t0: float | None = None) -> Proof:
    """Prove ``a == b`` for every ``(a, b)`` in ``pairs`` under ``assumptions`` (side conditions).

    Elements z3 simplifies to the same term are equal outright; the rest go to the solver as one disjunction
    ``OR(a != b)``. The assumptions must be satisfiable on their own (else the proof would be vacuous: "failed").
    """
    z3 = _z3()
    t0 = time.perf_counter() if t0 is None else t0
    s = z3.Solver()
    s.set("timeout", timeout_ms)
    s.add(*assumptions)
    if assumptions and s.check() != z3.sat:
        return Proof("failed", time.perf_counter() - t0, len(pairs), detail="side conditions are unsatisfiable")
    diffs = [differ(z3, a, b) for a, b in pairs]
    diffs = [d for d in diffs if not z3.is_false(z3.simplify(d))]
    if not diffs:
        return Proof("proved", time.perf_counter() - t0, len(pairs), detail="equal after simplification")
    s.add(z3.Or(diffs))
    res = s.check()
    if res == z3.unsat:
        return Proof("proved", time.perf_counter() - t0, len(pairs), detail=f"{len(diffs)} outputs by the solver")
    if res == z3.sat:
        m = s.model()
        cex = {str(d): str(m[d]) for d in m.decls() if d.arity() == 0}
        return Proof("failed", time.perf_counter() - t0, len(pairs), cex, detail="the solver found differing outputs")
    return Proof("unknown", time.perf_counter() - t0, len(pairs), detail=str(s.reason_unknown()))


def prove_equivalent(before: tvm.IRModule, after: tvm.IRModule, func: str = "main",
                     timeout_ms: int = 60000) -> Proof:
    """Prove that ``after[func]`` computes exactly what ``before[func]`` does (same parameters, in order).

    Both are evaluated on the same symbolic inputs (:func:`check_outputs` compares them), under the side
    conditions either evaluation met.
    """
    t0 = time.perf_counter()
    fb, fa = before[func], after[func]
    shapes_b = [_static_shape(p.ty, _vname(p)) for p in fb.params]
    shapes_a = [_static_shape(p.ty, _vname(p)) for p in fa.params]
    if shapes_b != shapes_a:
        return Proof("failed", time.perf_counter() - t0, 0, detail=f"parameter shapes differ: {shapes_b} vs {shapes_a}")
    eb, ea = Evaluator(), Evaluator()
    ea.funcs = eb.funcs                       # the same uninterpreted functions on both sides
    inputs = eb.symbols(fb)
    ob, oa = _flatten(eb.run(before, inputs, func)), _flatten(ea.run(after, inputs, func))
    if len(ob) != len(oa):
        return Proof("failed", time.perf_counter() - t0, 0, detail=f"{len(ob)} vs {len(oa)} output elements")
    return check_outputs(list(zip(ob, oa)), eb.assumptions + ea.assumptions, timeout_ms, t0)


def prove_epilogue_rule(stages, M: int = 2, N: int = 3, K: int = 2) -> Proof:
    """Prove the GEMM epilogue rewrite for one stage list: the Relax chain the fusion pass matches
    (``matmul(x, permute_dims(w))`` then the stages' Relax ops) equals ``Epilogue(stages)`` applied to each
    accumulator, as the fused kernel computes it (``Epilogue.apply_z3`` semantics: the same formulas as
    ``apply_tir``, with GELU/SiLU as the uninterpreted functions the Relax ops map to)."""
    from ..schedules.gemm_sm90 import Epilogue
    t0 = time.perf_counter()
    epi = Epilogue(tuple(stages))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([M, K], "float32"))
    w = relax.Var("w", relax.TensorType([N, K], "float32"))
    b = relax.Var("b", relax.TensorType([N], "float32"))
    r = relax.Var("r", relax.TensorType([M, N], "float32"))
    with bb.function("main", [x, w, b, r]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w, [1, 0]))))
            for st in epi.stages:
                y = bb.emit(_relax_stage(st, y, b, r))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = bb.get()
    ev = Evaluator()
    ev_inputs = ev.symbols(mod["main"])
    chain = _flatten(ev.run(mod, ev_inputs))
    xs, ws, bs, rs = ev_inputs
    acc = np.matmul(xs, ws.T)
    fused = [_apply_stages(ev, epi, acc[i, j], bs[j], rs[i, j]) for i in range(M) for j in range(N)]
    proof = check_outputs(list(zip(chain, fused)), ev.assumptions, t0=t0)
    proof.detail = epi.name()
    return proof


def _relax_stage(st, y, b, r):
    op = st[0]
    if op == "bias":
        return relax.op.add(y, b)
    if op == "residual":
        return relax.op.add(y, r)
    if op == "scale":
        return relax.op.multiply(y, relax.const(st[1], "float32"))
    return {"relu": relax.op.nn.relu, "silu": relax.op.nn.silu, "gelu": relax.op.nn.gelu,
            "gelu_tanh": relax.op.nn.gelu_tanh}[op](y)


def _apply_stages(ev, epi, x, bias, residual):
    """The fused kernel's per-element epilogue (``Epilogue.apply_tir``'s stage semantics) over z3 terms."""
    z3 = ev.z3
    for st in epi.stages:
        op = st[0]
        if op == "bias":
            x = x + bias
        elif op == "residual":
            x = x + residual
        elif op == "scale":
            x = x * z3.RealVal(str(float(np.float32(st[1]))))     # the kernel's constant is float32
        elif op == "relu":
            x = z3.If(x >= 0, x, z3.RealVal(0))
        else:               # gelu / gelu_tanh / silu: the kernel evaluates exactly the function the Relax op names
            x = ev.fn(op)(x)
    return x


def prove_sibling_rule(n_parts: int, bias: bool) -> Proof:
    """Prove the sibling-GEMM rewrite for ``n_parts`` Linears (with or without biases) at tiny widths: the
    unfused Linears against what :class:`~kiln.relax_passes.fuse_sibling_gemms.FuseSiblingGemms` makes of them."""
    from ..relax_passes.fuse_sibling_gemms import FuseSiblingGemms
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([2, 3], "float32"))
    widths = [2] + [1] * (n_parts - 1)
    ws = [relax.Var(f"w{i}", relax.TensorType([n, 3], "float32")) for i, n in enumerate(widths)]
    bs = [relax.Var(f"b{i}", relax.TensorType([n], "float32")) for i, n in enumerate(widths)] if bias else []
    with bb.function("main", [x, *ws, *bs]):
        with bb.dataflow():
            outs = []
            for i, w in enumerate(ws):
                y = bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w, [1, 0]))))
                outs.append(bb.emit(relax.op.add(y, bs[i])) if bias else y)
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    before = bb.get()
    return prove_equivalent(before, FuseSiblingGemms(prove=False)(before))


_RULE_CACHE: dict = {}


def rule_refusal(kind: str, *key) -> str | None:
    """``None`` when the rule instance ``(kind, *key)`` is proved (cached per process), else the refusal reason
    a pass records. ``kind``: ``"epilogue"`` (key: the stage tuple), ``"sibling"`` (key: parts, bias) or
    ``"attention"`` (key: an :class:`~kiln.verify.attention_rule.AttentionRule`)."""
    k = (kind, *key)
    if k not in _RULE_CACHE:
        try:
            if kind == "attention":
                from .attention_proof import prove_attention_rule
                p = prove_attention_rule(key[0])
            elif kind == "epilogue":
                p = prove_epilogue_rule(key[0])
            else:
                p = prove_sibling_rule(*key)
            _RULE_CACHE[k] = None if p else f"equivalence proof {p.status} ({p.detail})"
        except SymbolicUnsupported as e:
            _RULE_CACHE[k] = f"equivalence proof not possible: {e}"
    return _RULE_CACHE[k]
