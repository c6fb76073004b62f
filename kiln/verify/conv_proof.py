"""z3 proofs of the CNN rewrites: conv -> GEMM (:mod:`kiln.relax_passes.conv_to_gemm`) and batch-norm folding
(:mod:`kiln.relax_passes.fold_conv_bn`), each rule instance rebuilt at tiny shapes and proved with
:func:`kiln.verify.symbolic.prove_equivalent`.

* **conv -> GEMM** (:func:`prove_conv_rule`): the rule instance is what decides the emitted graph: kernel size,
  stride, padding and whether K is zero-padded (cuda pads K to a multiple of 8, llvm does not). ``before`` is the
  NHWC/OHWI ``nn.conv2d``; ``after`` is what :func:`~kiln.relax_passes.conv_to_gemm.emit_gemm` (the pass's own
  code) emits for it: the im2col gather (``pad``, the strided slices stacked per kernel row and column,
  ``permute_dims``, ``reshape``, K padding) and ``matmul(A, permute_dims(W2, [1, 0]))``. Shapes: batch 1, 2 input
  channels (3 with K padding, so that K really is padded), 2 filters, the smallest input giving at least a 2x3
  output (so a stride's skipped rows and columns are covered).
* **batch-norm folding** (:func:`prove_fold_rule`): a conv followed by a chain of per-channel ops (by default the
  decomposed inference batch norm ``((y - mean) / std) * gamma + beta`` with an fp16-style ``astype`` first)
  against :class:`~kiln.relax_passes.fold_conv_bn.FoldConvBN`'s output. ``mean``, ``gamma``, ``beta`` and the
  conv weight are symbolic weights; the divisor is a non-zero constant (batch norm's ``sqrt(var + eps)``: folding
  ``y / k`` into ``w * (1 / k)`` is exact only where ``k != 0``). The pass folds constant-only parts with numpy and
  stores them as fp32 constants, so the divisors here are powers of two (``1 / k`` exact in fp32): the proof is
  about the algebra, the rounding of ``1 / k`` is the numerics tests' job.

Exact real arithmetic: a proof says the rewrite computes the same function; rounding is bounded by the numerics
tests (``tests/test_conv_to_gemm.py``).
"""
from __future__ import annotations

import numpy as np
from tvm import relax

from .symbolic import Proof, SymbolicUnsupported, prove_equivalent

__all__ = ["conv_rule_key", "prove_conv_rule", "prove_fold_rule", "rule_refusal", "fold_rule_refusal",
           "prove_conv_record", "prove_fold_record"]


def conv_rule_key(p) -> tuple:
    """What decides the graph the conv -> GEMM rewrite emits for the problem ``p`` (a ``ConvProblem``)."""
    return (p.KH, p.KW, tuple(p.stride), tuple(p.padding), p.K_pad != p.K)


def _tiny_problem(kh: int, kw: int, stride, padding, pad_k: bool):
    from ..relax_passes.conv_to_gemm import K_ALIGN, ConvProblem
    sh, sw = stride
    pt, pl, pb, pr = padding
    # smallest input with >= 2 output rows and >= 3 output columns (odd sizes; the tail of a stride is covered)
    H = max(kh + sh - pt - pb, 1)
    W = max(kw + 2 * sw - pl - pr, 1)
    C = 3 if pad_k else 2       # pad_k implies KH*KW is not a multiple of 8, so neither is KH*KW*3
    align = K_ALIGN if pad_k else 1
    return ConvProblem(1, C, H, W, 2, kh, kw, (sh, sw), (pt, pl, pb, pr), "float32", "float32", align)


def _conv_modules(p):
    from ..relax_passes.conv_to_gemm import emit_gemm
    x = relax.Var("x", relax.TensorType([p.N, p.H, p.W, p.C], "float32"))
    w = relax.Var("w", relax.TensorType([p.O, p.KH, p.KW, p.C], "float32"))
    mods = []
    for rewritten in (False, True):
        bb = relax.BlockBuilder()
        with bb.function("main", [x, w]):
            with bb.dataflow():
                if rewritten:
                    y = bb.emit(emit_gemm(bb, x, w, p))
                else:
                    y = bb.emit(relax.op.nn.conv2d(x, w, strides=list(p.stride), padding=list(p.padding),
                                                   data_layout="NHWC", kernel_layout="OHWI", out_layout="NHWC"))
                out = bb.emit_output(y)
            bb.emit_func_output(out)
        mods.append(bb.get())
    return mods


def prove_conv_rule(kh: int, kw: int, stride=(1, 1), padding=(0, 0, 0, 0), pad_k: bool = False) -> Proof:
    """Prove the conv -> GEMM rewrite for one rule instance (see the module docstring)."""
    p = _tiny_problem(kh, kw, tuple(stride), tuple(padding), pad_k)
    before, after = _conv_modules(p)
    return prove_equivalent(before, after)


def _fold_modules(ops, cast: bool, layout: str):
    from ..relax_passes.fold_conv_bn import FoldConvBN
    O, C = 2, 2
    xs = [1, C, 4, 3] if layout == "NCHW" else [1, 4, 3, C]
    ws = [O, C, 2, 2] if layout == "NCHW" else [O, 2, 2, C]
    vshape = [1, O, 1, 1] if layout == "NCHW" else [O]
    x = relax.Var("x", relax.TensorType(xs, "float32"))
    w = relax.Var("w", relax.TensorType(ws, "float32"))
    params = [relax.Var(f"k{i}", relax.TensorType(vshape, "float32")) for i, op in enumerate(ops) if op != "divide"]
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w, *params]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, padding=[1, 0, 0, 1], data_layout=layout,
                                           kernel_layout="OIHW" if layout == "NCHW" else "OHWI"))
            if cast:
                y = bb.emit(relax.op.astype(y, "float32"))      # the fp16 import's cast (identity over the reals)
            it = iter(params)
            for op in ops:
                if op == "divide":
                    k = relax.const(np.array([2.0, -0.25], "float32").reshape(vshape))
                    y = bb.emit(relax.op.divide(y, k))
                elif op == "rsubtract":
                    y = bb.emit(relax.op.subtract(next(it), y))
                else:
                    y = bb.emit(getattr(relax.op, op)(y, next(it)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    before = bb.get()
    before["main"] = before["main"].with_attr("num_input", 1)
    return before, FoldConvBN(prove=False)(before)


def prove_fold_rule(ops=("subtract", "divide", "multiply", "add"), cast: bool = True,
                    layout: str = "NCHW") -> Proof:
    """Prove :class:`~kiln.relax_passes.fold_conv_bn.FoldConvBN` for a conv followed by ``ops`` (each of
    ``add``, ``subtract``, ``rsubtract`` (operand minus value), ``multiply``, ``divide``), per-channel operands."""
    before, after = _fold_modules(tuple(ops), cast, layout)
    if after.script().count("R.nn.conv2d(") != 1:
        return Proof("failed", 0.0, 0, detail="FoldConvBN did not leave exactly one conv")
    return prove_equivalent(before, after)


_RULE_CACHE: dict = {}


def rule_refusal(p) -> str | None:
    """``None`` when the conv -> GEMM rule instance of problem ``p`` is proved (cached per process), else the
    refusal reason :class:`~kiln.relax_passes.conv_to_gemm.ConvToGemm` records."""
    key = conv_rule_key(p)
    if key not in _RULE_CACHE:
        kh, kw, stride, padding, pad_k = key
        try:
            proof = prove_conv_rule(kh, kw, stride, padding, pad_k)
            _RULE_CACHE[key] = None if proof else f"equivalence proof {proof.status} ({proof.detail})"
        except SymbolicUnsupported as e:
            _RULE_CACHE[key] = f"equivalence proof not possible: {e}"
    return _RULE_CACHE[key]


def fold_rule_refusal(ops, cast: bool, layout: str) -> str | None:
    """``None`` when the batch-norm folding rule instance ``(ops, cast, layout)`` is proved (cached per process),
    else the reason :class:`~kiln.relax_passes.fold_conv_bn.FoldConvBN` records."""
    key = ("fold", tuple(ops), bool(cast), layout)
    if key not in _RULE_CACHE:
        try:
            proof = prove_fold_rule(tuple(ops), cast, layout)
            _RULE_CACHE[key] = None if proof else f"equivalence proof {proof.status} ({proof.detail})"
        except SymbolicUnsupported as e:
            _RULE_CACHE[key] = f"equivalence proof not possible: {e}"
    return _RULE_CACHE[key]


def prove_conv_record(rec: dict) -> Proof:
    """The proof of a converted conv of :func:`kiln.relax_passes.conv_to_gemm.fusion_report` (``kiln verify``)."""
    kh, kw = rec["kernel"]
    return prove_conv_rule(kh, kw, tuple(rec["stride"]), tuple(rec["padding"]), rec["K_pad"] != rec["K"])


def prove_fold_record(rec: dict) -> Proof:
    """The proof of a folded chain of :func:`kiln.relax_passes.fold_conv_bn.fusion_report` (``kiln verify``)."""
    return prove_fold_rule(tuple(rec["ops"]), rec["cast"], rec["layout"])
