"""Fold inference batch norm (and any per-channel affine op chain) after a conv into the conv's weight and a bias.

After the cleanup stage's ``DecomposeOpsForInference`` an eval-mode ``BatchNorm2d`` is
``multiply(divide(subtract(y, mean), sqrt(var + eps)), gamma) + beta`` with per-channel operands; the fp16 import
puts ``astype`` between the fp32 conv and it, and a conv's own bias is one more per-channel add. Such a chain is
``y * s + t`` per output channel, so ``conv(x, w) * s + t = conv(x, w * s[:, None, None, None]) + t``. kiln keeps
weights as function parameters and the fusion stage folds weight-only sub-graphs into them
(:mod:`.fold_weights`), so the scaled weight and the bias cost nothing at run time, and the conv's epilogue shrinks
to one bias add (which :mod:`.fuse_gemm_epilogue` fuses once :mod:`.conv_to_gemm` made the conv a GEMM).

* **pattern** (:func:`_chain`): from each ``nn.conv2d`` binding, the single-consumer chain of ``add``,
  ``subtract`` (either side), ``multiply``, ``divide`` (the conv value as the dividend) and at most one
  ``astype``, inside the conv's dataflow block.
* **check**: the conv weight depends on weights only; each op's other operand depends on weights/constants only
  (function parameters after ``num_input``, constants, and values computed from them alone), is of the chain's
  dtype and is per-channel: it broadcasts to the conv's output with every axis but the channel axis of size 1.
  The chain stops at the first op that fails (the reason is recorded); the ops before it are folded. A conv
  whose chain folds nothing is reported refused with that reason (e.g. its output has a second consumer).
* **rewrite**: ``s`` and ``t`` are built in fp32 from the operands (``[O]`` vectors); the conv takes
  ``astype(astype(w, f32) * reshape(s, O-axis), w.dtype)`` and the chain's last binding becomes
  ``add(conv, bias)`` (then ``astype`` to the chain's dtype when it had one), with ``bias = t`` as a ``[O]``
  vector on NHWC outputs (the form the GEMM epilogue pass takes as a bias) and ``[1, O, 1, 1]``-like otherwise.
  When the chain casts an fp32 conv down, the bias is rounded to that dtype and cast up
  (``astype(astype(t, f16), f32)``): the GEMM kernel's bias operand has the input dtype.

Numerics: the scale is applied to the weights in fp32 and rounded once to their dtype; the per-op roundings of the
fp16 chain disappear. Differences are within the dtype's rounding of the unfolded graph.

Registered for cuda and llvm, with the conv -> GEMM rewrite it prepares. It is pure algebra and valid on any target;
rocm is left as it was (kiln's gfx942 rule already fuses the decomposed batch norm into its implicit-GEMM conv
epilogue, and nothing here could be measured there). Report: JSON module attr ``kiln.conv_bn_fold``
(:func:`fusion_report`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from . import drop_dead_code, proving, read_report, rewrite_functions
from .fuse_gemm_epilogue import _Graph, _dtype, _graph, _name, _op, _shape, _is_static

__all__ = ["FoldConvBN", "fusion_report", "weight_only_analysis", "rule_of", "REPORT_ATTR"]

#: Module attr holding the JSON report.
REPORT_ATTR = "kiln.conv_bn_fold"
_AFFINE = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide")


# ------------------------------------------------------------------------------------------ analysis
def weight_only_analysis(func: relax.Function, g: _Graph | None = None):
    """A predicate ``f(expr) -> bool``: does ``expr`` depend on weights and constants only?

    Weights are the parameters after the function's ``num_input`` attr (none without it, so every parameter is
    then an input). One pass over the bindings in order (SSA): a bound variable is weight-only when every variable
    its value reads is, and it reads no symbolic shape variable (those tie it to the inputs' shapes).
    """
    g = g or _graph(func)
    attrs = func.attrs or {}
    n = int(attrs["num_input"]) if "num_input" in attrs else len(func.params)
    known = set(list(func.params)[n:])
    for var, value in g.value.items():        # insertion order = binding order
        if not relax.analysis.free_symbolic_vars(value) and all(v in known for v in relax.analysis.free_vars(value)):
            known.add(var)

    def check(e) -> bool:
        if isinstance(e, tvm.ir.expr.Constant):
            return True
        if isinstance(e, relax.Var):
            return e in known
        return all(v in known for v in relax.analysis.free_vars(e))

    return check


# ------------------------------------------------------------------------------------------ pattern
@dataclass
class _Chain:
    conv: relax.Var
    ops: list = field(default_factory=list)      # (op name, operand, conv_value_is_lhs)
    cast: str | None = None                      # dtype of the chain's astype, if it has one
    end: relax.Var | None = None                 # last binding folded
    cut: str | None = None


def _channel_axis(call: relax.Call) -> int:
    layout = str(call.attrs.out_layout or call.attrs.data_layout)
    return layout.index("C")


def _per_channel(operand, out_shape, axis: int) -> str | None:
    """``None`` when ``operand`` broadcasts to ``out_shape`` varying along ``axis`` only, else why not."""
    s = _shape(operand)
    if not _is_static(s):
        return f"its shape {s} is not static"
    if len(s) > len(out_shape):
        return f"its shape {list(s)} has more axes than the conv output {list(out_shape)}"
    lead = len(out_shape) - len(s)
    for i, d in enumerate(s):
        ax = lead + i
        if d != 1 and not (ax == axis and d == out_shape[axis]):
            return f"its shape {list(s)} is not per-channel for the conv output {list(out_shape)} (channel axis {axis})"
    return None


def _chain(g: _Graph, conv: relax.Var, weight_only) -> _Chain:
    """Pattern + check: the foldable chain after ``conv`` (possibly empty, with ``cut`` saying why it stops)."""
    ch = _Chain(conv)
    call = g.value[conv]
    out_shape, axis = _shape(conv), _channel_axis(call)
    if out_shape is None or out_shape[axis] is None:        # (a symbolic batch or size is fine)
        ch.cut = f"the conv output's channel count is not static (shape {out_shape})"
        return ch
    if not weight_only(call.args[1]):
        ch.cut = f"the conv weight {_name(call.args[1])} is not weight-only (scaling it would cost a kernel per call)"
        return ch
    cur, dtype = conv, _dtype(conv)
    while True:
        users = g.consumers.get(cur, [])
        if len(users) != 1 or users[0] is None:
            what = "is a function output" if None in users else f"has {len(users)} consumers"
            ch.cut = f"{_name(cur)} {what}"
            break
        nxt = users[0]
        if g.block.get(nxt) != g.block.get(conv) or g.block.get(conv, -1) < 0:
            ch.cut = f"{_name(nxt)} is outside the dataflow block of the conv"
            break
        val, op = g.value[nxt], _op(g.value[nxt])
        if op == "relax.astype" and ch.cast is None and str(val.attrs.dtype) in ("float16", "bfloat16", "float32"):
            ch.cast, dtype = str(val.attrs.dtype), str(val.attrs.dtype)
        elif op in _AFFINE:
            a, b = val.args
            if a.same_as(cur) and b.same_as(cur):
                ch.cut = f"{_name(nxt)} combines the conv value with itself"
                break
            lhs = a.same_as(cur)
            other = b if lhs else a
            if op == "relax.divide" and not lhs:
                ch.cut = f"{_name(nxt)} divides by the conv value (not affine)"
                break
            why = None if weight_only(other) else "it depends on a model input"
            why = why or (None if _dtype(other) == dtype else f"its dtype {_dtype(other)} is not {dtype}")
            why = why or _per_channel(other, out_shape, axis)
            if why:
                ch.cut = f"{_name(nxt)} ({op[6:]}): operand {_name(other)} is not foldable: {why}"
                break
            bound = g.value.get(other) if isinstance(other, relax.Var) else None
            ch.ops.append((op, bound if isinstance(bound, tvm.ir.expr.Constant) else other, lhs))
        else:
            ch.cut = f"{_name(nxt)} ({op or type(val).__name__}) is not a per-channel affine op"
            break
        cur = nxt
        if ch.ops:
            ch.end = cur
    return ch


# ------------------------------------------------------------------------------------------ rewrite
# Values of the scale/shift algebra are numpy float64 arrays where they come from constants alone (folded here:
# a constant-only binding would reach FoldConstant, which compiles one kernel per op) and fp32 Relax values where
# they read weights (lifted into the weights by the fusion stage).
_NP = {"add": np.add, "subtract": np.subtract, "multiply": np.multiply, "divide": np.divide}


def _vec(bb, operand):
    """The per-channel operand as a flat vector (length ``O`` or 1)."""
    if isinstance(operand, tvm.ir.expr.Constant):
        return operand.value.numpy().astype("float64").reshape(-1)
    n = 1
    for d in _shape(operand):
        n *= d
    v = operand if _dtype(operand) == "float32" else bb.emit(relax.op.astype(operand, "float32"))
    return bb.emit(relax.op.reshape(v, relax.ShapeExpr([n])))


def _as_expr(v):
    return relax.const(np.asarray(v, "float32")) if isinstance(v, np.ndarray) else v


def _arith(bb, name: str, a, b):
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return _NP[name](a, b)
    return bb.emit(getattr(relax.op, name)(_as_expr(a), _as_expr(b)))


def _affine(bb, ops, O: int):
    """``(s, t)``, flat vectors (numpy or fp32 Relax; ``None`` for 1 and 0) with ``chain(y) = y * s + t``."""
    s = t = None
    one, minus_one = np.ones(1), -np.ones(1)
    for name, operand, lhs in ops:
        k = _vec(bb, operand)
        if name == "relax.add":
            t = k if t is None else _arith(bb, "add", t, k)
        elif name == "relax.subtract" and lhs:
            t = _arith(bb, "multiply", k, minus_one) if t is None else _arith(bb, "subtract", t, k)
        elif name == "relax.subtract":          # k - y
            s = minus_one if s is None else _arith(bb, "multiply", s, minus_one)
            t = k if t is None else _arith(bb, "subtract", k, t)
        elif name == "relax.multiply":
            s = k if s is None else _arith(bb, "multiply", s, k)
            t = None if t is None else _arith(bb, "multiply", t, k)
        else:                                   # divide, the conv value as the dividend
            s = _arith(bb, "divide", one if s is None else s, k)
            t = None if t is None else _arith(bb, "divide", t, k)
    return s, t


def _shaped(bb, v, shape, O: int):
    """``v`` (a flat vector of length ``O`` or 1) broadcast to ``O`` channels and reshaped to ``shape``."""
    if isinstance(v, np.ndarray):
        return relax.const(np.broadcast_to(v, (O,)).reshape(shape).astype("float32"))
    if _shape(v) != (O,):
        v = bb.emit(relax.op.broadcast_to(v, relax.ShapeExpr([O])))
    return v if list(shape) == [O] else bb.emit(relax.op.reshape(v, relax.ShapeExpr(list(shape))))


def _cast(bb, t, dtype: str):
    """``astype(t, dtype)``; a constant is cast with numpy (no constant-only binding)."""
    if isinstance(t, tvm.ir.expr.Constant):
        import ml_dtypes
        np_dt = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[dtype]
        return relax.const(t.value.numpy().astype(np_dt), dtype)
    return bb.emit(relax.op.astype(t, dtype))


@mutator
class _Rewriter(PyExprMutator):
    """At each folded chain's last binding: the scaled weight, a new conv, the bias add and the chain's cast.

    Everything is emitted there, not at the conv: the operands (e.g. the permuted batch-norm constants) may be
    bound after the conv. Nothing else reads the chain (one consumer per link), so moving the conv down is safe;
    the old conv and links are left dead for DCE.
    """

    def __init__(self, mod, chains):
        super().__init__(mod)
        self.chains = chains          # chain end var -> (conv call, _Chain)

    def visit_var_binding_(self, binding):
        hit = next((v for v in self.chains if v.same_as(binding.var)), None)
        if hit is None:
            super().visit_var_binding_(binding)
            return
        call, ch = self.chains[hit]
        bb, op = self.builder_, relax.op
        x, w = self.visit_expr(call.args[0]), self.visit_expr(call.args[1])
        axis, out = _channel_axis(call), _shape(ch.conv)
        O = out[axis]
        s, t = _affine(bb, [(n, self.visit_expr(k), lhs) for n, k, lhs in ch.ops], O)
        if s is not None:
            s = _shaped(bb, s, [O if c == "O" else 1 for c in str(call.attrs.kernel_layout)], O)
            w32 = w if _dtype(w) == "float32" else bb.emit(op.astype(w, "float32"))
            ws = bb.emit(op.multiply(w32, s))
            w = ws if _dtype(call.args[1]) == "float32" else bb.emit(op.astype(ws, _dtype(call.args[1])))
        y = relax.Call(call.op, [x, w], call.attrs)
        od, final = _dtype(ch.conv), _dtype(binding.var)
        if t is not None:
            y = bb.emit(y)
            t = _shaped(bb, t, [O] if axis == len(out) - 1 else [O if i == axis else 1 for i in range(len(out))], O)
            if final != od:
                # rounded to the chain's dtype and cast up: the GEMM epilogue pass takes ``astype(bias, f32)`` of an
                # input-dtype bias (the kernel's operand); for a constant bias this one cast is left to FoldConstant
                t = bb.emit(op.astype(_cast(bb, t, final), od))
            elif od != "float32":
                t = _cast(bb, t, od)
            y = op.add(y, t)
        if final != od:
            y = op.astype(bb.emit(y), final)
        bb.emit_normalized(relax.VarBinding(binding.var, bb.normalize(y)))


# ------------------------------------------------------------------------------------------ the pass
@tvm.transform.module_pass(opt_level=0, name="kiln.FoldConvBN")
class FoldConvBN:
    """Fold per-channel affine chains (inference batch norm, a conv's bias) after each conv into its weight.

    Parameters
    ----------
    prove : bool, optional
        Prove each distinct rule instance (op sequence, cast, channel axis) with z3 at tiny shapes
        (:func:`kiln.verify.conv_proof.fold_rule_refusal`) and leave the chains not proved unfolded; default: the
        ``prove_rewrites`` knob.
    """

    def __init__(self, prove: bool | None = None):
        self.prove = prove
        proving(prove)                # z3 missing: a typed error now, not a RuntimeError mid-pass
        self.report: list[dict] = []

    def _proving(self) -> bool:
        return proving(self.prove)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        records, chains = [], []
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            g = _graph(func)
            weight_only = weight_only_analysis(func, g)
            for var, value in g.value.items():
                if _op(value) != "relax.nn.conv2d":
                    continue
                ch = _chain(g, var, weight_only)
                rec = {"function": gv.name_hint, "conv": _name(var)}
                reason = ch.cut if not ch.ops else None
                rule = rule_of(ch, value)
                if reason is None and self._proving():
                    from ..verify.conv_proof import fold_rule_refusal
                    reason = fold_rule_refusal(*rule)
                if reason is None:
                    chains.append((value, ch))
                    rec.update(fused=True, ops=list(rule[0]), cast=rule[1], layout=rule[2], replaces=_name(ch.end),
                               cut=ch.cut)
                else:
                    rec.update(fused=False, reason=reason)
                records.append(rec)
        self.report = records
        if chains:
            rw = _Rewriter(mod, {ch.end: (call, ch) for call, ch in chains})
            mod = drop_dead_code(rewrite_functions(rw, mod))
        return mod.with_attr(REPORT_ATTR, json.dumps(records))


def rule_of(ch: _Chain, conv: relax.Call) -> tuple:
    """The rule instance of a chain: ``(ops, cast, layout)`` with ops named ``add``, ``subtract``, ``rsubtract``
    (operand minus the conv value), ``multiply``, ``divide``; layout ``NHWC`` when the channel axis is last, else
    ``NCHW`` (what :func:`kiln.verify.conv_proof.prove_fold_rule` rebuilds)."""
    ops = tuple(("r" if name == "relax.subtract" and not lhs else "") + name[6:] for name, _, lhs in ch.ops)
    rank = len(_shape(ch.conv) or ())
    return ops, ch.cast is not None, "NHWC" if _channel_axis(conv) == rank - 1 else "NCHW"


def fusion_report(mod: tvm.IRModule) -> list[dict]:
    """The records :class:`FoldConvBN` left on ``mod`` (``[]`` if it did not run); ``fused`` means folded."""
    return read_report(mod, REPORT_ATTR)
