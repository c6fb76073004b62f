"""Rewrite 2-D convolutions as GEMMs in NHWC orientation, so that kiln's GEMM kernel and its epilogue pass run them.

A conv ``out[n, oh, ow, o] = sum_{kh, kw, c} x[n, oh*s + kh - p, ow*s + kw - p, c] * w[o, kh, kw, c]`` (NHWC data,
OHWI kernel) is the GEMM ``out[N*OH*OW, O] = A[N*OH*OW, KH*KW*C] x W[O, KH*KW*C]^T`` with ``A`` the im2col matrix.
The pass emits it as ``matmul(A, permute_dims(W2, [1, 0]))``, the form :mod:`.fuse_gemm_epilogue` matches, so on
cuda the bias / residual / relu chain after the conv becomes the epilogue of kiln's sm_90a kernel.

* **pattern** (:func:`_match`): a binding ``y = nn.conv2d(x, w)``; the problem (:class:`ConvProblem`) is read
  through the data and kernel layout strings, so the same check serves NCHW convs (:mod:`.to_nhwc` asks it which
  convs to convert) and NHWC ones.
* **check** (:func:`check_conv`): groups 1, dilation 1, static shapes, ``x`` and ``w`` of one float dtype, the
  conv's out dtype fp32 or that dtype; on cuda also fp16/bf16, ``O`` a multiple of 8 and a GEMM the epilogue pass
  will take (a valid sm_90a config and ``M*N*K >= min_macs``, or ``M <= 16`` for its GEMV). The rewrite itself
  needs NHWC data/output and an OHWI kernel (:mod:`.to_nhwc` converts the accepted convs first).
* **rewrite** (:class:`_Rewriter`): ``A`` is

  - ``reshape(x, [M, C])`` for a 1x1 stride-1 unpadded conv (no copy);
  - ``reshape(strided_slice(x, H and W by the stride), [M, C])`` for an unpadded strided 1x1 conv;
  - otherwise the im2col gather: ``pad(x)``, then per kernel row ``kh`` the strided slice of rows
    ``oh*sh + kh`` stacked on a new axis (``concat`` of ``expand_dims``), the same for columns, ``permute_dims`` to
    ``[N, OH, OW, KH, KW, C]`` and ``reshape`` to ``[M, K]``. Affine layout ops only, so FuseOps makes it one
    injective kernel.

  On cuda K is zero-padded up to a multiple of 8 (TMA needs 16-byte row strides; the 7x7 stem has K = 147 -> 152,
  a 1x1 conv with C % 8 != 0 then needs the copy too), the weight padded to match.

  ``W2 = reshape(w, [O, KH*KW*C])`` (padded like ``A``) depends on weights only and is folded into them. The conv's
  binding becomes ``reshape(matmul(A, permute_dims(W2, [1, 0])), [N, OH, OW, O])``; the epilogue pass follows
  reshapes that keep the last axis, so the conv's bias add (a ``[O]`` vector after :mod:`.fold_conv_bn`) and what
  follows still fuse.

Targets: cuda (the point: kiln's wgmma kernel) and llvm (the rewrite is pure graph algebra, so the CPU tests and the
CPU reference of every CNN exercise it; measured on the 2-core dev box, tiny ResNet-50 fp32 batch 2: one call 1.6 s
instead of 7.0 s with the unscheduled convs, compile +3 s, all of it folding the weight transforms).
Not rocm: kiln's gfx942 rule already takes conv2d as an implicit GEMM (the im2col happens in its LDS fetch), which
a materialised im2col would only slow down.

What was converted and what was refused (with the reason) is the JSON module attr ``kiln.conv_to_gemm``
(:func:`fusion_report`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from . import drop_dead_code, proving, read_report, rewrite_functions, target_kind
from .fuse_gemm_epilogue import _graph, _name, _op, _shape, _dtype, _is_static

__all__ = ["ConvToGemm", "ConvProblem", "conv_problem", "check_conv", "emit_gemm", "fusion_report", "REPORT_ATTR",
           "K_ALIGN", "TARGETS"]

#: Module attr holding the JSON report.
REPORT_ATTR = "kiln.conv_to_gemm"
#: K (= KH*KW*C) is zero-padded to a multiple of this: TMA needs 16-byte aligned row strides of fp16/bf16 A and W.
K_ALIGN = 8
#: Target kinds the rewrite runs on (see the module docstring for why not rocm).
TARGETS = ("cuda", "llvm")
_FLOATS = ("float16", "bfloat16", "float32")
_KERNEL_DTYPES = ("float16", "bfloat16")


@dataclass(frozen=True)
class ConvProblem:
    """A 2-D convolution, layout-free: batch ``N``, input ``C x H x W``, ``O`` filters of ``KH x KW``."""

    N: int
    C: int
    H: int
    W: int
    O: int
    KH: int
    KW: int
    stride: tuple
    padding: tuple          # (top, left, bottom, right), as nn.conv2d's attr
    dtype: str
    out_dtype: str
    k_align: int = 1        # K is zero-padded to a multiple of this (K_ALIGN for kiln's kernel, 1 elsewhere)

    @property
    def OH(self) -> int:
        return (self.H + self.padding[0] + self.padding[2] - self.KH) // self.stride[0] + 1

    @property
    def OW(self) -> int:
        return (self.W + self.padding[1] + self.padding[3] - self.KW) // self.stride[1] + 1

    @property
    def M(self) -> int:
        return self.N * self.OH * self.OW

    @property
    def K(self) -> int:
        return self.KH * self.KW * self.C

    @property
    def K_pad(self) -> int:
        return -(-self.K // self.k_align) * self.k_align

    @property
    def gather(self) -> str:
        """How ``A`` is formed: ``reshape`` (no copy), ``strided_slice`` or ``im2col``."""
        if self.KH == self.KW == 1 and not any(self.padding):
            return "reshape" if self.stride == (1, 1) else "strided_slice"
        return "im2col"


def _layout_dims(shape, layout: str, letters: str) -> dict | None:
    if len(layout) != len(shape) or sorted(layout) != sorted(letters):
        return None
    return dict(zip(layout, shape))


def conv_problem(call: relax.Call) -> tuple[ConvProblem | None, str | None]:
    """``(problem, None)`` for an ``nn.conv2d`` call of static shape, else ``(None, reason)``."""
    a = call.attrs
    xs, ws = _shape(call.args[0]), _shape(call.args[1])
    if not _is_static(xs) or not _is_static(ws) or not _is_static(_shape(call)):
        return None, "non-static shapes: the GEMM is built per static shape"
    x = _layout_dims(xs, str(a.data_layout), "NCHW")
    w = _layout_dims(ws, str(a.kernel_layout), "OIHW")
    if x is None or w is None:
        return None, f"layouts {a.data_layout}/{a.kernel_layout} are not plain permutations of NCHW/OIHW"
    dt, od = _dtype(call.args[0]), _dtype(call)
    p = ConvProblem(x["N"], x["C"], x["H"], x["W"], w["O"], w["H"], w["W"],
                    tuple(int(s) for s in a.strides), tuple(int(v) for v in a.padding), dt, od)
    return p, None


def check_conv(call: relax.Call, target_kind: str, min_macs: int) -> tuple[ConvProblem | None, str | None]:
    """``(problem, None)`` when ``call`` (an ``nn.conv2d``, any layout) can become a GEMM on ``target_kind``,
    else ``(problem or None, reason)``. Layout is not checked here (:mod:`.to_nhwc` converts accepted convs)."""
    a = call.attrs
    if target_kind not in TARGETS:
        return None, f"target {target_kind!r}: conv -> GEMM runs on {', '.join(TARGETS)} only"
    groups, dil = int(a.groups), tuple(int(d) for d in a.dilation)
    if groups != 1:
        return None, f"groups={groups}: a grouped or depthwise conv is not one GEMM"
    if dil != (1, 1):
        return None, f"dilation {list(dil)}: the im2col gather handles dilation 1 only"
    p, reason = conv_problem(call)
    if p is None:
        return None, reason
    wdt = _dtype(call.args[1])
    if p.dtype not in _FLOATS or wdt != p.dtype:
        return p, f"dtype x={p.dtype} w={wdt}: both must be one of {', '.join(_FLOATS)}"
    if p.out_dtype not in ("float32", p.dtype):
        return p, f"conv out dtype {p.out_dtype} is neither float32 nor {p.dtype}"
    if p.OH < 1 or p.OW < 1:
        return p, f"empty output {p.OH}x{p.OW}"
    if target_kind == "cuda":
        p = replace(p, k_align=K_ALIGN)
        return p, _kernel_refusal(p, min_macs)
    return p, None


def _kernel_refusal(p: ConvProblem, min_macs: int) -> str | None:
    """Why the GEMM epilogue pass would not put this conv's GEMM on kiln's kernel (``None``: it would)."""
    from .fuse_gemm_epilogue import GEMV_MAX_M
    if p.dtype not in _KERNEL_DTYPES:
        return f"dtype {p.dtype}: kiln's GEMM kernel takes {' or '.join(_KERNEL_DTYPES)}"
    M, N, K = p.M, p.O, p.K_pad
    if N % 8:
        return f"O={N} output channels is not a multiple of 8 (the GEMM's N)"
    if M <= GEMV_MAX_M:
        from ..schedules.gemv_sm90 import select_gemv_config
        try:
            return select_gemv_config(M, N, K, p.dtype).check(M, N, K, p.dtype)
        except (NotImplementedError, ValueError) as e:
            return f"GEMV (M={M} <= {GEMV_MAX_M}): {e}"
    if M * N * K < min_macs:
        return f"M*N*K < {min_macs} (the GEMM epilogue pass's MIN_MACS: it would leave the GEMM to dlight)"
    from ..schedules.configs import select_sm90_config
    try:
        select_sm90_config(M, N, K, p.dtype)
    except NotImplementedError as e:
        return str(e)
    return None


def _layout_refusal(call: relax.Call) -> str | None:
    a = call.attrs
    layouts = (str(a.data_layout), str(a.kernel_layout), str(a.out_layout or a.data_layout))
    if layouts != ("NHWC", "OHWI", "NHWC"):
        return (f"layouts {'/'.join(layouts)}: the rewrite takes NHWC/OHWI/NHWC (ToNHWC converts accepted convs "
                "first; this one was not converted)")
    return None


# ------------------------------------------------------------------------------------------ pattern
def _match(value) -> bool:
    return _op(value) == "relax.nn.conv2d"


# ------------------------------------------------------------------------------------------ rewrite
def _taps(bb: relax.BlockBuilder, x: relax.Expr, axis: int, k: int, out: int, stride: int) -> relax.Expr:
    """``t[..., o, j, ...] = x[..., o * stride + j, ...]`` (new axis ``j`` of size ``k`` after ``axis``): one strided
    slice per tap, stacked. Only affine layout ops, so FuseOps makes the whole im2col one injective kernel (a
    ``take`` with an index table would be opaque to it, one kernel per op)."""
    op = relax.op
    parts = []
    for j in range(k):
        end = j + (out - 1) * stride + 1
        whole = j == 0 and stride == 1 and end == _shape(x)[axis]        # the slice would be the identity
        part = x if whole else bb.emit(op.strided_slice(x, axes=[axis], begin=[j], end=[end], strides=[stride]))
        parts.append(bb.emit(op.expand_dims(part, axis + 1)))
    return parts[0] if k == 1 else bb.emit(op.concat(parts, axis=axis + 1))


def emit_gemm(bb: relax.BlockBuilder, x: relax.Expr, w: relax.Expr, p: ConvProblem) -> relax.Expr:
    """Emit the GEMM form of the NHWC/OHWI conv ``p`` of ``x`` by ``w``; returns the ``[N, OH, OW, O]`` result
    (not yet emitted, so the caller can bind it to the conv's variable)."""
    op = relax.op
    M, K, Kp = p.M, p.K, p.K_pad
    if p.gather == "reshape":
        a = bb.emit(op.reshape(x, relax.ShapeExpr([M, K])))
    elif p.gather == "strided_slice":
        s = bb.emit(op.strided_slice(x, axes=[1, 2], begin=[0, 0], end=[p.H, p.W], strides=list(p.stride)))
        a = bb.emit(op.reshape(s, relax.ShapeExpr([M, K])))
    else:
        pt, pl, pb, pr = p.padding
        xp = bb.emit(op.nn.pad(x, [0, 0, pt, pb, pl, pr, 0, 0])) if any(p.padding) else x
        rows = _taps(bb, xp, 1, p.KH, p.OH, p.stride[0])          # [N, OH, KH, Wp, C]
        taps = _taps(bb, rows, 3, p.KW, p.OW, p.stride[1])        # [N, OH, KH, OW, KW, C]
        taps = bb.emit(op.permute_dims(taps, [0, 1, 3, 2, 4, 5]))  # [N, OH, OW, KH, KW, C]
        a = bb.emit(op.reshape(taps, relax.ShapeExpr([M, K])))
    if Kp != K:
        a = bb.emit(op.nn.pad(a, [0, 0, 0, Kp - K]))
    w2 = bb.emit(op.reshape(w, relax.ShapeExpr([p.O, K])))
    if Kp != K:
        w2 = bb.emit(op.nn.pad(w2, [0, 0, 0, Kp - K]))
    wt = bb.emit(op.permute_dims(w2, [1, 0]))
    y = bb.emit(op.matmul(a, wt, out_dtype=p.out_dtype))
    return op.reshape(y, relax.ShapeExpr([p.N, p.OH, p.OW, p.O]))


@mutator
class _Rewriter(PyExprMutator):
    """Replace each accepted conv binding by its GEMM form (same variable, same type)."""

    def __init__(self, mod, plans: dict):
        super().__init__(mod)
        self.plans = plans            # conv binding var -> ConvProblem

    def visit_var_binding_(self, binding):
        p = next((q for v, q in self.plans.items() if v.same_as(binding.var)), None)
        if p is None:
            super().visit_var_binding_(binding)
            return
        call = binding.value
        bb = self.builder_
        out = emit_gemm(bb, self.visit_expr(call.args[0]), self.visit_expr(call.args[1]), p)
        bb.emit_normalized(relax.VarBinding(binding.var, bb.normalize(out)))


# ------------------------------------------------------------------------------------------ the pass
def _min_macs(min_macs: int | None) -> int:
    if min_macs is not None:
        return int(min_macs)
    from . import fuse_gemm_epilogue
    return fuse_gemm_epilogue.MIN_MACS


def _record(fname: str, var, call, p: ConvProblem | None) -> dict:
    rec = {"function": fname, "conv": _name(var), "x_shape": str(_shape(call.args[0])),
           "layout": str(call.attrs.data_layout)}
    if p is not None:
        rec.update(N=p.N, C=p.C, H=p.H, W=p.W, O=p.O, kernel=[p.KH, p.KW], stride=list(p.stride),
                   padding=list(p.padding), M=p.M, K=p.K, K_pad=p.K_pad, gather=p.gather, dtype=p.dtype)
    return rec


@tvm.transform.module_pass(opt_level=0, name="kiln.ConvToGemm")
class ConvToGemm:
    """Rewrite accepted NHWC 2-D convs as ``matmul(A, permute_dims(W2, [1, 0]))`` (see the module docstring).

    Parameters
    ----------
    target_kind : str, optional
        ``"cuda"`` or ``"llvm"``; any other kind refuses every conv. Default: the current target.
    min_macs : int, optional
        On cuda, the smallest GEMM (M*N*K) converted: below it the GEMM epilogue pass would leave the GEMM to
        dlight, which schedules the conv itself at least as well. Default: ``fuse_gemm_epilogue.MIN_MACS`` (read
        at call time, so lowering that constant lowers both).
    prove : bool, optional
        Prove each distinct rewrite rule (kernel, stride, padding, K padding) with z3 at tiny shapes
        (:func:`kiln.verify.conv_proof.rule_refusal`) and refuse the ones not proved; default: the
        ``prove_rewrites`` knob.
    """

    def __init__(self, target_kind: str | None = None, min_macs: int | None = None, prove: bool | None = None):
        self.target_kind = target_kind
        self.min_macs = min_macs
        self.prove = prove
        proving(prove)                # z3 missing: a typed error now, not a RuntimeError mid-pass
        self.report: list[dict] = []

    def _proving(self) -> bool:
        return proving(self.prove)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        kind, min_macs = target_kind(self.target_kind), _min_macs(self.min_macs)
        records, plans = [], {}
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            g = _graph(func)
            for var, value in g.value.items():
                if not _match(value):
                    continue
                p, reason = check_conv(value, kind, min_macs)
                reason = reason or _layout_refusal(value)
                if reason is None and self._proving():
                    from ..verify.conv_proof import rule_refusal
                    reason = rule_refusal(p)
                rec = _record(gv.name_hint, var, value, p)
                if reason is None:
                    plans[var] = p
                    rec["fused"] = True
                else:
                    rec.update(fused=False, reason=reason)
                records.append(rec)
        self.report = records
        if plans:
            rw = _Rewriter(mod, plans)
            mod = drop_dead_code(rewrite_functions(rw, mod))
        return mod.with_attr(REPORT_ATTR, json.dumps(records))


def fusion_report(mod: tvm.IRModule) -> list[dict]:
    """The records :class:`ConvToGemm` left on ``mod`` (``[]`` if it did not run); ``fused`` means converted."""
    return read_report(mod, REPORT_ATTR)
