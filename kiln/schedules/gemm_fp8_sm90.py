"""kiln's Hopper fp8 GEMM: ``C = epilogue(scale(A @ B^T))`` with e4m3 A and B on ``wgmma ... e4m3.e4m3`` (TIRx).

* A: ``[M, K]`` row-major float8 e4m3 (activations), B: ``[N, K]`` row-major e4m3 (the ``nn.Linear`` weight
  layout), fp32 accumulate, output bfloat16 or float16.
* Scales (fp32), by mode (the names of :func:`kiln.ops.fp8.scale_mode`):

  ======  =========  ==================================  ==========================================
  operand  mode      shape                               applied
  ======  =========  ==================================  ==========================================
  A       tensor     ``(1,)``                            epilogue, on the fp32 accumulator
  A       row        ``(M,)`` (per token)                epilogue
  A       group      ``(M, ceil(K/128))`` (1x128)        per 128-wide k-block (promotion)
  B       tensor     ``(1,)``                            epilogue
  B       row        ``(N,)`` (per output channel)       epilogue
  B       block      ``(ceil(N/128), ceil(K/128))``      per 128-wide k-block (promotion)
  ======  =========  ==================================  ==========================================

  ``C[m, n] = epilogue(sum_kb sa(m, kb) sb(n, kb) sum_{k in kb} a[m, k] b[n, k])``; the epilogue stages
  (:class:`~.gemm_sm90.Epilogue`: bias, activations, residual, in the output dtype) run after the scales.
* Supported: any M >= 1, any N >= 1 (N % 8 != 0 stores element by element), K a multiple of 16 (TMA row
  strides); static shapes. Anything else raises ``NotImplementedError`` naming the case
  (:meth:`~.configs.Fp8GemmConfig.check` gives the reason).

Kernel: ``gemm_fp8_sm90_kernel.py``; tile configs and the heuristic: ``configs.py`` (:class:`Fp8GemmConfig`).
Measured on the H200 (session 4, ``benchmarks/gemm.py --fp8``; ``benchmarks/NOTES.md``): 1228 TFLOP/s at 8192^3
per-tensor (0.98x ``torch._scaled_mm`` with fast accumulation), 0.89-0.98x for per-tensor/rowwise at the M >= 1024
shapes, 0.83-1.09x for 128x128 blocks; ``tests/test_gemm_fp8.py -m gpu`` checks the numerics. ``kiln.ops.fp8_gemm``
runs it on sm_90a.
"""
from __future__ import annotations

from typing import Any

import tvm

from .configs import (FP8_GROUP, FP8_OUT_DTYPES, FP8_SCALE_MODES_A, FP8_SCALE_MODES_B, SM90_NUM_SMS, Fp8GemmConfig,
                      select_fp8_config)
from .gemm_fp8_sm90_kernel import build_fp8_gemm_kernel, fp8_scale_shape
from .gemm_sm90 import _as_epilogue, build_gemm_sm90, cuda_source

__all__ = ["make_gemm_fp8_sm90", "GemmFp8SM90", "fp8_reference", "fp8_scale_shape", "dequantize_fp8"]


def _valid_config(M, N, K, out_dtype, mode_a, mode_b, config, promote, num_sms) -> Fp8GemmConfig:
    if out_dtype not in FP8_OUT_DTYPES:
        raise NotImplementedError(f"sm_90a fp8 GEMM: out_dtype {out_dtype!r} unsupported "
                                  f"(supported: {', '.join(FP8_OUT_DTYPES)})")
    if mode_a not in FP8_SCALE_MODES_A or mode_b not in FP8_SCALE_MODES_B:
        raise ValueError(f"sm_90a fp8 GEMM: scale modes ({mode_a!r}, {mode_b!r}); expected A in "
                         f"{FP8_SCALE_MODES_A} and B in {FP8_SCALE_MODES_B}")
    cfg = config if config is not None else select_fp8_config(M, N, K, out_dtype, mode_a, mode_b, promote, num_sms)
    bad_tile = cfg.check_tile()
    if bad_tile:
        raise ValueError(f"invalid sm_90a fp8 GEMM config {cfg}: {bad_tile}")
    reason = cfg.check(M, N, K, out_dtype, mode_a, mode_b)
    if reason:
        raise NotImplementedError(f"sm_90a fp8 GEMM M={M} N={N} K={K} {out_dtype} scales ({mode_a}, {mode_b}) "
                                  f"with {cfg.name()}: {reason}")
    return cfg


def make_gemm_fp8_sm90(M: int, N: int, K: int, out_dtype: str = "bfloat16", scale_a: str = "tensor",
                       scale_b: str = "tensor", epilogue: Any = None, config: Fp8GemmConfig | None = None,
                       promote: bool = False, num_sms: int = SM90_NUM_SMS) -> tvm.tirx.PrimFunc:
    """The TIRx PrimFunc ``(A[M,K] u8, B[N,K] u8, sa, sb, [bias[N]], [residual[M,N]], C[M,N])`` for sm_90a.

    ``A``/``B`` are the e4m3 bytes (``uint8``), ``sa``/``sb`` fp32 of :func:`fp8_scale_shape` for the modes
    ``scale_a`` (tensor/row/group) and ``scale_b`` (tensor/row/block); bias, residual and C in ``out_dtype``.
    ``config`` defaults to :func:`~.configs.select_fp8_config` (``promote`` asks for per-k-block fp32
    promotion in the tensor/row modes; the group/block modes always promote). Raises ``ValueError`` for an
    invalid tile and ``NotImplementedError`` (with the reason) for a problem the kernel does not handle.
    """
    epi = _as_epilogue(epilogue)
    cfg = _valid_config(M, N, K, out_dtype, scale_a, scale_b, config, promote, num_sms)
    func = build_fp8_gemm_kernel(M, N, K, out_dtype, cfg, scale_a, scale_b, epi.apply_tir, epi.has_bias,
                                 epi.has_residual, num_sms=num_sms)
    return func.with_attrs({"kiln.gemm_config": cfg.name(), "kiln.epilogue": epi.name(),
                            "kiln.fp8_scales": f"{scale_a}x{scale_b}", "tirx.is_scheduled": True})


def _expand_scale(s, mode: str, rows: int, K: int):
    """The fp32 ``[rows, K]`` factor of a scale tensor (for the reference)."""
    if mode == "tensor":
        return s.reshape(()).float().expand(rows, K)
    if mode == "row":
        return s.reshape(rows, 1).float().expand(rows, K)
    per_k = s.float().repeat_interleave(FP8_GROUP, dim=1)[:, :K]          # group: [rows, K]; block: [rows/128, K]
    return per_k.repeat_interleave(FP8_GROUP, dim=0)[:rows] if mode == "block" else per_k


def dequantize_fp8(x, s, mode: str, block_rows: bool):
    """``x.float() * scale`` elementwise: the fp32 values an e4m3 tensor ``x [rows, K]`` with scales ``s`` in
    ``mode`` stands for (``block_rows``: the operand is B, whose k-dependent mode is 128x128 ``block``)."""
    rows, K = x.shape
    if mode not in (FP8_SCALE_MODES_B if block_rows else FP8_SCALE_MODES_A):
        raise ValueError(f"scale mode {mode!r} is not one of {FP8_SCALE_MODES_B if block_rows else FP8_SCALE_MODES_A}")
    return x.float() * _expand_scale(s, mode, rows, K)


def fp8_reference(a, b, scale_a, scale_b, mode_a: str = "tensor", mode_b: str = "tensor", epilogue: Any = None,
                  bias=None, residual=None):
    """fp32 reference of the scaled fp8 GEMM: ``epilogue(dequant(a) @ dequant(b)^T)`` (the result stays fp32)."""
    epi = _as_epilogue(epilogue)
    acc = dequantize_fp8(a, scale_a, mode_a, False) @ dequantize_fp8(b, scale_b, mode_b, True).t()
    return epi.apply_torch(acc, None if bias is None else bias.float(), None if residual is None else residual.float())


class GemmFp8SM90:
    """A built fp8 GEMM callable on CUDA torch tensors: ``g(a, b, scale_a, scale_b, bias=None, residual=None,
    out=None)``.

    ``a``/``b`` are ``torch.float8_e4m3fn`` (or their ``uint8`` views), contiguous and 16-byte aligned;
    ``scale_a``/``scale_b`` contiguous float32 of the modes' shapes (``[1]``/``[]`` per tensor, ``[rows]`` or
    ``[rows, 1]`` per row, 2-D for group/block). Tensors go zero-copy through DLPack (``uint8`` views for
    the e4m3 data); the launch goes to TVM's current stream (the default stream, torch's too).
    """

    def __init__(self, M: int, N: int, K: int, out_dtype: str = "bfloat16", scale_a: str = "tensor",
                 scale_b: str = "tensor", epilogue: Any = None, config: Fp8GemmConfig | None = None,
                 promote: bool = False):
        self.M, self.N, self.K, self.out_dtype = M, N, K, out_dtype
        self.mode_a, self.mode_b = scale_a, scale_b
        self.epilogue = _as_epilogue(epilogue)
        self.func = make_gemm_fp8_sm90(M, N, K, out_dtype, scale_a, scale_b, self.epilogue, config, promote)
        self.config = Fp8GemmConfig.from_name(str(self.func.attrs["kiln.gemm_config"]))
        self.ex = build_gemm_sm90(self.func)
        self._f = None

    @property
    def source(self) -> str:
        return cuda_source(self.ex)

    def tvm_args(self, a, b, scale_a, scale_b, bias=None, residual=None, out=None) -> list:
        """Checked TVM tensors in parameter order (``out`` is required)."""
        import torch
        M, N, K = self.M, self.N, self.K
        odt = getattr(torch, self.out_dtype)
        sa_shape = fp8_scale_shape(self.mode_a, M, K, False)
        sb_shape = fp8_scale_shape(self.mode_b, N, K, True)
        fp8 = (torch.float8_e4m3fn, torch.uint8)
        want = {"a": (a, (M, K), fp8), "b": (b, (N, K), fp8),
                "scale_a": (_scale_view(scale_a, sa_shape), sa_shape, (torch.float32,)),
                "scale_b": (_scale_view(scale_b, sb_shape), sb_shape, (torch.float32,))}
        if self.epilogue.has_bias:
            want["bias"] = (bias, (N,), (odt,))
        if self.epilogue.has_residual:
            want["residual"] = (residual, (M, N), (odt,))
        want["out"] = (out, (M, N), (odt,))
        for nm, (t, shape, dts) in want.items():                # what the kernel was built for, then where
            if t is None or tuple(t.shape) != shape or t.dtype not in dts or not t.is_contiguous():
                got = None if t is None else (tuple(t.shape), t.dtype, "contiguous" if t.is_contiguous() else "strided")
                raise ValueError(f"{nm}: expected a contiguous tensor of dtype {' or '.join(str(d) for d in dts)} "
                                 f"and shape {shape}, got {got}")
        for nm, (t, _, _) in want.items():
            if not t.is_cuda or t.data_ptr() % 16:
                raise ValueError(f"{nm}: expected a CUDA tensor, 16-byte aligned (TMA), got device {t.device}, "
                                 f"address % 16 = {t.data_ptr() % 16}")
        dl = tvm.runtime.from_dlpack
        return [dl(t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t) for t, _, _ in want.values()]

    def _fn(self):
        if self._f is None:
            self._f = self.ex[str(self.func.attrs["global_symbol"])]
        return self._f

    def bind(self, a, b, scale_a, scale_b, bias=None, residual=None, out=None):
        """A zero-argument launcher on these tensors, converted and checked once (for timing loops)."""
        args = self.tvm_args(a, b, scale_a, scale_b, bias, residual, out)
        f = self._fn()
        return lambda: f(*args)

    def __call__(self, a, b, scale_a, scale_b, bias=None, residual=None, out=None):
        import torch
        if out is None:
            out = torch.empty((self.M, self.N), dtype=getattr(torch, self.out_dtype), device=a.device)
        self._fn()(*self.tvm_args(a, b, scale_a, scale_b, bias, residual, out))
        return out


def _scale_view(s, shape: tuple):
    """``s`` viewed as ``shape`` when it holds the same elements in the same order (``[]``/``[1]`` for one scalar,
    ``[rows, 1]`` for ``[rows]``); else ``s`` unchanged (the shape check then names the mismatch)."""
    if s is None or not s.is_contiguous():
        return s
    same = (s.numel() == 1 and shape == (1,)) or (tuple(s.shape) == shape + (1,) and len(shape) == 1)
    return s.reshape(shape) if same else s
