"""Symbolic equivalence of Relax rewrites at tiny shapes, with z3.

A Relax function is evaluated elementwise over z3 Reals: every input element is a fresh real variable, and
matmul, add, concat, split, permute, reshape... build the exact polynomial of each output element. Two functions
are proved equivalent when the solver finds no assignment of the inputs that makes any output element differ.

Semantics, and what a proof therefore means:

* arithmetic is exact over the reals: ``astype`` is the identity, so a proof says the rewrite computes the same
  mathematical function; rounding differences (fp16 accumulation order, where the cast happens) are the job of
  the differential numerics tests, not of the proof;
* ``exp``, ``tanh``, ``erf``, ``sigmoid``, GELU and SiLU are *uninterpreted* functions (one per op, the same on
  both sides): a proof holds for any function in their place, so it never relies on a property of them that was
  not stated; ``relu``/``maximum``/``minimum`` are ``If`` terms;
* shapes must be static (use tiny ones: the term size grows with the contraction length).

The public entry points are :func:`evaluate`, :func:`prove_equivalent` and :func:`prove_epilogue_rule` (the GEMM
epilogue pass's stage list against the Relax ops it replaces).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

import tvm
from tvm import relax

__all__ = ["SymbolicUnsupported", "Proof", "evaluate", "prove_equivalent", "prove_epilogue_rule",
           "prove_sibling_rule", "rule_refusal"]


class SymbolicUnsupported(NotImplementedError):
    """The function uses an op (or a dynamic shape) the symbolic evaluator does not model."""


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


_UNINTERPRETED = {"relax.exp": "exp", "relax.tanh": "tanh", "relax.erf": "erf", "relax.sigmoid": "sigmoid",
                  "relax.nn.gelu": "gelu", "relax.nn.gelu_tanh": "gelu_tanh", "relax.nn.silu": "silu"}
_BINARY = {"relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply,
           "relax.divide": np.divide}


def _static_shape(ty, what: str) -> tuple:
    shape = getattr(ty, "shape", None)
    if not isinstance(shape, relax.ShapeExpr) or not all(isinstance(v, tvm.tirx.IntImm) for v in shape.values):
        raise SymbolicUnsupported(f"{what}: shape {shape} is not static")
    return tuple(int(v.value) for v in shape.values)


class _Evaluator:
    def __init__(self, z3):
        self.z3 = z3
        self.funcs = {}

    def fn(self, name):
        if name not in self.funcs:
            self.funcs[name] = self.z3.Function(name, self.z3.RealSort(), self.z3.RealSort())
        return self.funcs[name]

    def const(self, c: tvm.ir.expr.Constant):
        arr = c.value.numpy()
        out = np.empty(arr.shape, dtype=object)
        for idx in np.ndindex(arr.shape):
            out[idx] = self.z3.RealVal(str(float(arr[idx])))
        return out

    def expr(self, e, env):
        if isinstance(e, relax.Var):
            return env[e]
        if isinstance(e, tvm.ir.expr.Constant):
            return self.const(e)
        if isinstance(e, relax.Tuple):
            return tuple(self.expr(f, env) for f in e.fields)
        if isinstance(e, relax.TupleGetItem):
            return self.expr(e.tuple_value, env)[e.index]
        if isinstance(e, relax.ShapeExpr):
            return tuple(int(v.value) for v in e.values)
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            return self.call(e, [self.expr(a, env) for a in e.args])
        raise SymbolicUnsupported(f"cannot evaluate {type(e).__name__} symbolically")

    def call(self, call, args):
        z3, op, a = self.z3, call.op.name, call.attrs
        if op in _BINARY:
            return _BINARY[op](args[0], args[1])
        if op == "relax.matmul":
            return np.matmul(args[0], args[1])
        if op == "relax.astype":
            return args[0]                                   # exact arithmetic: casts are the identity
        if op == "relax.permute_dims":
            axes = None if a.axes is None else [int(v) for v in a.axes]
            return np.transpose(args[0], axes)
        if op == "relax.reshape":
            return np.reshape(args[0], args[1])
        if op == "relax.concat":
            return np.concatenate(args[0], axis=int(a.axis))
        if op == "relax.split":
            ind = a.indices_or_sections
            ind = int(ind) if isinstance(ind, (int, tvm.tirx.IntImm)) else [int(v) for v in ind]
            return tuple(np.split(args[0], ind, axis=int(a.axis)))
        if op in ("relax.nn.relu", "relax.maximum", "relax.minimum"):
            x, y = (args[0], np.zeros_like(args[0])) if op == "relax.nn.relu" else np.broadcast_arrays(*args)
            pick = (lambda p, q: z3.If(p >= q, p, q)) if op != "relax.minimum" else (lambda p, q: z3.If(p <= q, p, q))
            return np.vectorize(lambda p, q: pick(p, q if not isinstance(q, int) else z3.RealVal(q)),
                                otypes=[object])(x, y)
        if op in _UNINTERPRETED:
            f = self.fn(_UNINTERPRETED[op])
            return np.vectorize(lambda v: f(v), otypes=[object])(args[0])
        raise SymbolicUnsupported(f"op {op} is not modelled by kiln.verify.symbolic")


def _vname(v) -> str:
    return str(getattr(v, "name", None) or getattr(v, "name_hint", "v"))


def _symbols(z3, func: relax.Function):
    out = []
    for p in func.params:
        shape = _static_shape(p.ty, f"parameter {_vname(p)}")
        arr = np.empty(shape, dtype=object)
        for idx in np.ndindex(shape):
            arr[idx] = z3.Real(f"{_vname(p)}[{','.join(map(str, idx))}]" if shape else _vname(p))
        out.append(arr)
    return out


def evaluate(mod: tvm.IRModule, inputs=None, func: str = "main"):
    """Evaluate ``mod[func]`` over z3 terms: ``inputs`` (object arrays of z3 reals, one per parameter) default
    to fresh variables named ``<param>[i,j,...]``. Returns the output (an array, or a tuple of them)."""
    z3 = _z3()
    f = mod[func]
    inputs = _symbols(z3, f) if inputs is None else inputs
    ev = _Evaluator(z3)
    env = dict(zip(f.params, inputs))
    body = f.body
    for block in body.blocks:
        for b in block.bindings:
            env[b.var] = ev.expr(b.value, env)
    return ev.expr(body.body, env)


def _flatten(x):
    if isinstance(x, tuple):
        return [e for part in x for e in _flatten(part)]
    return list(np.asarray(x, dtype=object).reshape(-1))


def prove_equivalent(before: tvm.IRModule, after: tvm.IRModule, func: str = "main",
                     timeout_ms: int = 60000) -> Proof:
    """Prove that ``after[func]`` computes exactly what ``before[func]`` does (same parameters, in order).

    Both are evaluated on the same symbolic inputs; outputs that z3 simplifies to the same term are equal
    outright, the rest go to the solver as one disjunction ``OR(out_before[i] != out_after[i])``.
    """
    z3 = _z3()
    t0 = time.perf_counter()
    fb, fa = before[func], after[func]
    shapes_b = [_static_shape(p.ty, _vname(p)) for p in fb.params]
    shapes_a = [_static_shape(p.ty, _vname(p)) for p in fa.params]
    if shapes_b != shapes_a:
        return Proof("failed", time.perf_counter() - t0, 0, detail=f"parameter shapes differ: {shapes_b} vs {shapes_a}")
    inputs = _symbols(z3, fb)
    ob, oa = _flatten(evaluate(before, inputs, func)), _flatten(evaluate(after, inputs, func))
    if len(ob) != len(oa):
        return Proof("failed", time.perf_counter() - t0, 0, detail=f"{len(ob)} vs {len(oa)} output elements")
    diffs = [b != a for b, a in zip(ob, oa) if not z3.eq(z3.simplify(b), z3.simplify(a))]
    if not diffs:
        return Proof("proved", time.perf_counter() - t0, len(ob), detail="equal after simplification")
    s = z3.Solver()
    s.set("timeout", timeout_ms)
    s.add(z3.Or(diffs))
    res = s.check()
    if res == z3.unsat:
        return Proof("proved", time.perf_counter() - t0, len(ob), detail=f"{len(diffs)} outputs by the solver")
    if res == z3.sat:
        m = s.model()
        cex = {str(d): str(m[d]) for d in m.decls() if d.arity() == 0}
        return Proof("failed", time.perf_counter() - t0, len(ob), cex, detail="the solver found differing outputs")
    return Proof("unknown", time.perf_counter() - t0, len(ob), detail=str(s.reason_unknown()))


def prove_epilogue_rule(stages, M: int = 2, N: int = 3, K: int = 2) -> Proof:
    """Prove the GEMM epilogue rewrite for one stage list: the Relax chain the fusion pass matches
    (``matmul(x, permute_dims(w))`` then the stages' Relax ops) equals ``Epilogue(stages)`` applied to each
    accumulator, as the fused kernel computes it (``Epilogue.apply_z3`` semantics: the same formulas as
    ``apply_tir``, with GELU/SiLU as the uninterpreted functions the Relax ops map to)."""
    from ..schedules.gemm_sm90 import Epilogue
    z3 = _z3()
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
    ev_inputs = _symbols(z3, mod["main"])
    chain = _flatten(evaluate(mod, ev_inputs))
    xs, ws, bs, rs = ev_inputs
    acc = np.matmul(xs, ws.T)
    ev = _Evaluator(z3)
    fused = [_apply_stages(ev, epi, acc[i, j], bs[j], rs[i, j]) for i in range(M) for j in range(N)]
    diffs = [c != f for c, f in zip(chain, fused) if not z3.eq(z3.simplify(c), z3.simplify(f))]
    if not diffs:
        return Proof("proved", time.perf_counter() - t0, len(chain), detail=epi.name())
    s = z3.Solver()
    s.add(z3.Or(diffs))
    res = s.check()
    status = "proved" if res == z3.unsat else "failed" if res == z3.sat else "unknown"
    return Proof(status, time.perf_counter() - t0, len(chain), detail=epi.name())


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
    a pass records. ``kind``: ``"epilogue"`` (key: the stage tuple) or ``"sibling"`` (key: parts, bias)."""
    k = (kind, *key)
    if k not in _RULE_CACHE:
        try:
            p = prove_epilogue_rule(key[0]) if kind == "epilogue" else prove_sibling_rule(*key)
            _RULE_CACHE[k] = None if p else f"equivalence proof {p.status} ({p.detail})"
        except SymbolicUnsupported as e:
            _RULE_CACHE[k] = f"equivalence proof not possible: {e}"
    return _RULE_CACHE[k]
