"""``kiln::fp8_gemm``: ``C = (A @ B^T) * scales (+ bias)`` for float8 e4m3 inputs with every common scale mode.

``a [..., K]`` and ``b [N, K]`` are ``torch.float8_e4m3fn``; the scales are float32 and their shapes pick
the mode (as in vLLM's ``cutlass_scaled_mm`` / DeepSeek-V3 block quantisation):

============  ==========================  ===========================================
operand       scale shape                 meaning
============  ==========================  ===========================================
``a``         ``[]`` or ``[1]``           per tensor
``a``         ``[M]`` or ``[M, 1]``       per token (row)
``a``         ``[M, ceil(K/128)]``        per 1 x 128 group of each row
``b``         ``[]`` or ``[1]``           per tensor
``b``         ``[N]`` or ``[N, 1]``       per output channel (row of ``b``)
``b``         ``[ceil(N/128), ceil(K/128)]``  per 128 x 128 block
============  ==========================  ===========================================

``C[m, n] = sum_k a[m,k] * sa(m,k) * b[n,k] * sb(n,k) (+ bias[n])``, fp32 accumulation, in ``out_dtype``
(bfloat16, float16 or float32; ``bias`` in ``out_dtype``). Shapes that are ambiguous (one 128-group, one
block) mean the same thing under either reading.

Kernels (chosen per problem by :func:`fp8_gemm_plan`; the choice and every decline reason are in
:func:`kiln.ops.kernel_info`):

* CUDA sm_90a, when kiln's fp8 GEMM takes the problem (``out_dtype`` fp16/bf16, ``K`` a multiple of 16, 32-bit
  indexing; any ``M``, ``N``; all nine scale-mode pairs): :mod:`kiln.schedules.gemm_fp8_sm90` (TIRx, TMA +
  ``wgmma ... e4m3.e4m3``) on the e4m3 bytes directly, tile config from
  :func:`~kiln.schedules.configs.select_fp8_config` (``kernel`` = ``kiln.gemm_fp8_sm90 ...``, ``config``,
  ``promote``). The per-tensor / per-row scales multiply the fp32 accumulator in the epilogue and the wgmma
  accumulate without promotion (``torch._scaled_mm(use_fast_accum=True)``'s accuracy class); any ``group`` or
  ``block`` scale promotes (each 128-wide k-block scaled into a second fp32 sum, DeepSeek-V3's recipe).
  ``bias`` is the kernel's epilogue. A and B are passed zero-copy (copied only when their address is not
  16-byte aligned, which TMA needs).
* CUDA sm_90a, problems the fp8 kernel declines (``fp8_declined`` says why) but with ``out_dtype`` fp16/bf16
  and ``N``, ``K`` multiples of 8: two dequantise kernels (``a * sa`` and ``b * sb`` rounded to ``out_dtype``;
  e4m3 values are exact in bf16/fp16, the scaled values are rounded once, a relative 2^-9 / 2^-12) then kiln's
  sm_90a bf16/fp16 GEMM (wgmma, tuned table, ``bias`` epilogue).
* otherwise (CPU, fp32 output, other shapes/archs): one TE definition with the scales inside the fp32 sum,
  unscheduled on llvm, dlight on CUDA (``sm90a_declined`` / ``fp8_declined`` say why on CUDA).
"""
import functools
import math
from typing import Optional

import torch
import tvm
from tvm import te, tirx

from .build import get_kernel, num_sms, target_for
from .checks import OpInputError, check_same_device, check_tensor, dtype_name

__all__ = ["fp8_gemm", "fp8_gemm_plan", "make_fp8_gemm_te", "make_fp8_dequant_te", "scale_mode", "e4m3_to_f32",
           "f32_to_e4m3", "E4M3_MAX", "FP8_GROUP"]

#: Modules whose source writes the kernels of this op (their hashes enter the cache key).
_SOURCES = ("kiln.ops.fp8", "kiln.schedules.gemm_sm90", "kiln.schedules.gemm_sm90_kernel", "kiln.schedules.configs",
            "kiln.schedules.gemm_fp8_sm90", "kiln.schedules.gemm_fp8_sm90_kernel", "kiln.schedules.cuda_snippets")
#: ``params["kernel"]`` of the three kernels.
_FP8, _DEQUANT, _TE = "sm90a_fp8", "sm90a_dequant", "te"
#: TMA reads A and B from global addresses aligned to this many bytes.
_TMA_ALIGN = 16
_F32 = "float32"
#: Group / block edge of the block-scaled modes.
FP8_GROUP = 128
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scale_mode(op_arg: str, scale: torch.Tensor, rows: int, K: int, block_rows: bool) -> str:
    """``"tensor"``, ``"row"`` or ``"group"`` (a: 1 x 128 groups) / ``"block"`` (b: 128 x 128 blocks) from
    the scale's shape; :class:`OpInputError` listing the accepted shapes otherwise."""
    check_tensor("fp8_gemm", op_arg, scale, dtypes=(torch.float32,))
    shape = tuple(int(s) for s in scale.shape)
    kg = _cdiv(K, FP8_GROUP)
    brows = _cdiv(rows, FP8_GROUP) if block_rows else rows
    if shape in ((), (1,)):
        return "tensor"
    if shape in ((rows,), (rows, 1)):
        return "row"
    if shape == (brows, kg):
        return "block" if block_rows else "group"
    what = f"[{brows}, {kg}] (128x128 blocks)" if block_rows else f"[{rows}, {kg}] (1x128 groups)"
    raise OpInputError("fp8_gemm", op_arg, f"shape [] or [1] (per tensor), [{rows}] or [{rows}, 1] (per row) "
                       f"or {what}", f"shape {shape}")


def _scale_shape(mode: str, rows: int, K: int) -> tuple:
    return {"tensor": (1,), "row": (rows,), "group": (rows, _cdiv(K, FP8_GROUP)),
            "block": (_cdiv(rows, FP8_GROUP), _cdiv(K, FP8_GROUP))}[mode]


def _scale_at(s, mode: str):
    """The scale of element ``(r, k)`` as a TE expression builder."""
    g = FP8_GROUP
    return {"tensor": lambda r, k: s[0], "row": lambda r, k: s[r], "group": lambda r, k: s[r, k // g],
            "block": lambda r, k: s[r // g, k // g]}[mode]


def e4m3_to_f32(byte):
    """The float32 value of a float8 e4m3fn bit pattern (a uint8 TIR expression), decoded by hand.

    Why: TVM 0.27's own ``float8_e4m3fn -> float32`` cast on llvm gets zero, the subnormals and NaN wrong
    (0x00 -> 0.0078125, 0x7f -> 480), so the kernels take the bytes as uint8 and decode them here:
    normal ``(1 + m/8) 2^(e-7)`` (rebuilt as float32 bits), subnormal ``m 2^-9``, ``0x7f``/``0xff`` NaN.
    """
    b = byte.astype("uint32")
    sign, e, m = b >> tirx.const(7, "uint32"), (b >> tirx.const(3, "uint32")) & tirx.const(15, "uint32"), \
        b & tirx.const(7, "uint32")
    bits = (sign << tirx.const(31, "uint32")) | ((e + tirx.const(120, "uint32")) << tirx.const(23, "uint32")) \
        | (m << tirx.const(20, "uint32"))
    normal = tirx.reinterpret(_F32, bits)
    sub = m.astype(_F32) * tirx.const(2.0 ** -9, _F32)
    sub = tirx.Select(sign == tirx.const(1, "uint32"), -sub, sub)
    val = tirx.Select(e == tirx.const(0, "uint32"), sub, normal)
    nan = tirx.reinterpret(_F32, tirx.const(0x7FC00000, "uint32"))
    return tirx.Select((e == tirx.const(15, "uint32")) & (m == tirx.const(7, "uint32")), nan, val)


#: Largest finite float8 e4m3fn value; quantisation saturates to it.
E4M3_MAX = 448.0


def f32_to_e4m3(v):
    """The float8 e4m3fn byte (uint8 TIR expression) of a float32 expression: saturated to +-448,
    round-to-nearest-even, NaN -> 0x7f, sign kept (-0.0 -> 0x80). The same bytes as torch's
    ``x.clamp(-448, 448).to(torch.float8_e4m3fn)``.

    Normal range (|v| >= 2^-6): the float32 bits are rounded at bit 20 (RNE: add ``0x7ffff`` plus the
    lowest kept bit; a carry moves into the exponent), then re-biased (127 -> 7). Subnormals: ``|v| * 2^9``
    (exact) rounded half-to-even to an integer 0..8 with floor (8 is the smallest normal, 0x08). Written out
    because TVM folds the ``(t + 2^23) - 2^23`` rounding trick and ``v != v``, and its own fp8 casts are
    wrong on llvm (see :func:`e4m3_to_f32`).
    """
    u32 = "uint32"
    c = lambda x: tirx.const(x, u32)  # noqa: E731
    bits = tirx.reinterpret(u32, v)
    sign = (bits >> c(31)) << c(7)
    a = tirx.min(tirx.abs(v), tirx.const(E4M3_MAX, _F32))
    abits = tirx.reinterpret(u32, a)
    r = abits + c(0x7FFFF) + ((abits >> c(20)) & c(1))
    normal = (((r >> c(23)) - c(120)) << c(3)) | ((r >> c(20)) & c(7))
    t = a * tirx.const(512.0, _F32)                      # exact; < 8 on the subnormal path
    fl = tirx.floor(t)
    frac = t - fl
    odd = tirx.floormod(fl.astype("int32"), 2) == 1
    up = tirx.Or(frac > tirx.const(0.5, _F32), tirx.And(frac == tirx.const(0.5, _F32), odd))
    sub = fl.astype(u32) + tirx.Select(up, c(1), c(0))
    mag = tirx.Select(a < tirx.const(2.0 ** -6, _F32), sub, normal)
    code = tirx.Select(tirx.isnan(v), c(0x7F), sign | mag)
    return code.astype("uint8")


def make_fp8_gemm_te(M: int, N: int, K: int, mode_a: str, mode_b: str, out_dtype: str,
                     has_bias: bool) -> tvm.tirx.PrimFunc:
    """TE definition ``(A[M,K], B[N,K], sa, sb, [bias[N]], C[M,N])`` with A and B the e4m3 bytes as uint8
    (see :func:`e4m3_to_f32`); the scales are applied inside the fp32 sum when they depend on ``k`` (group /
    block modes), after it otherwise."""
    a = te.placeholder((M, K), "uint8", name="A")
    b = te.placeholder((N, K), "uint8", name="B")
    sa = te.placeholder(_scale_shape(mode_a, M, K), _F32, name="scale_a")
    sb = te.placeholder(_scale_shape(mode_b, N, K), _F32, name="scale_b")
    bias = te.placeholder((N,), out_dtype, name="bias") if has_bias else None
    fa, fb = _scale_at(sa, mode_a), _scale_at(sb, mode_b)
    k = te.reduce_axis((0, K), name="k")
    if mode_a in ("group",) or mode_b in ("block",):
        acc = te.compute((M, N), lambda i, j: te.sum(e4m3_to_f32(a[i, k]) * fa(i, k) * (e4m3_to_f32(b[j, k]) * fb(j, k)),
                                                     axis=k), name="acc")
        scaled = acc
    else:
        acc = te.compute((M, N), lambda i, j: te.sum(e4m3_to_f32(a[i, k]) * e4m3_to_f32(b[j, k]), axis=k), name="acc")
        scaled = te.compute((M, N), lambda i, j: acc[i, j] * fa(i, 0) * fb(j, 0), name="scaled")
    if bias is not None:
        c = te.compute((M, N), lambda i, j: (scaled[i, j] + bias[j].astype(_F32)).astype(out_dtype), name="C")
    else:
        c = te.compute((M, N), lambda i, j: scaled[i, j].astype(out_dtype), name="C")
    args = [a, b, sa, sb] + ([bias] if bias is not None else []) + [c]
    return te.create_prim_func(args).with_attr("global_symbol", "kiln_fp8_gemm")


def make_fp8_dequant_te(R: int, K: int, mode: str, dtype: str, name: str) -> tvm.tirx.PrimFunc:
    """``(X[R,K] e4m3 bytes as uint8, scale, Y[R,K] dtype)``: ``Y = X * scale(r, k)`` rounded to ``dtype``."""
    x = te.placeholder((R, K), "uint8", name="X")
    s = te.placeholder(_scale_shape(mode, R, K), _F32, name="scale")
    f = _scale_at(s, mode)
    y = te.compute((R, K), lambda r, k: (e4m3_to_f32(x[r, k]) * f(r, k)).astype(dtype), name="Y")
    return te.create_prim_func([x, s, y]).with_attr("global_symbol", name)


def fp8_gemm_plan(M: int, N: int, K: int, mode_a: str, mode_b: str, out_dtype: str, has_bias: bool,
                  device_type: str = "cuda", arch: str = "sm_90a", num_sms: int = 132) -> dict:
    """The kernel parameters of one problem (every value that changes the code: the build-cache key).

    Tries, in order, kiln's sm_90a fp8 wgmma GEMM, the dequantise + sm_90a bf16/fp16 GEMM and the TE
    definition; each one that declines leaves its reason (``fp8_declined``, ``sm90a_declined``). A pure
    function of its arguments (no device needed), so the dispatch is testable on any machine.

    Parameters
    ----------
    M, N, K : int
        ``C[M, N] = A[M, K] @ B[N, K]^T``.
    mode_a, mode_b : str
        Scale modes (:func:`scale_mode`): A ``tensor``/``row``/``group``, B ``tensor``/``row``/``block``.
    out_dtype : str
        ``"bfloat16"``, ``"float16"`` or ``"float32"``.
    has_bias : bool
    device_type, arch : str
        torch device type (``"cuda"``, ``"cpu"``) and, for CUDA, kiln's arch name (``"sm_90a"`` on Hopper).
    num_sms : int
        Multiprocessors (sizes persistent grids and the tile heuristics).

    Returns
    -------
    dict
        ``kernel`` (``"sm90a_fp8"``, ``"sm90a_dequant"`` or ``"te"``), the problem, ``declined`` (why the
        kernel that runs is not the first choice, ``""`` when it is) and the chosen kernel's config.
    """
    params = {"M": M, "N": N, "K": K, "mode_a": mode_a, "mode_b": mode_b, "out_dtype": out_dtype,
              "bias": has_bias, "kernel": _TE}
    if device_type != "cuda":
        why = "not a CUDA device"
    elif arch != "sm_90a":
        why = f"arch {arch} is not sm_90a"
    else:
        why = _plan_fp8(params, num_sms)
        if why is None:
            params["declined"] = ""
            return params
        params["fp8_declined"] = why
        why = _plan_dequant(params, num_sms)
        if why is None:
            params["declined"] = params["fp8_declined"]
            return params
    params["declined"] = why
    return params


def _plan_fp8(params: dict, num_sms: int) -> str | None:
    """Take kiln's fp8 wgmma GEMM into ``params`` (None) or say why it declines. No promotion for the tensor /
    row scales (fast accumulation, as ``_scaled_mm(use_fast_accum=True)``); the group / block scales force it."""
    from ..schedules.configs import select_fp8_config
    M, N, K, out = params["M"], params["N"], params["K"], params["out_dtype"]
    mode_a, mode_b = params["mode_a"], params["mode_b"]
    try:
        cfg = select_fp8_config(M, N, K, out, mode_a, mode_b, promote=False, num_sms=num_sms)
    except NotImplementedError as e:         # no valid tile config: its reason
        return str(e)
    why = cfg.check(M, N, K, out, mode_a, mode_b)
    if why is None:
        params.update(kernel=_FP8, config=cfg.name(), config_source="heuristic", promote=cfg.promote,
                      num_sms=num_sms)
    return why


def _plan_dequant(params: dict, num_sms: int) -> str | None:
    """Take dequantise + kiln's sm_90a GEMM into ``params`` (None) or say why it declines."""
    M, N, K, out = params["M"], params["N"], params["K"], params["out_dtype"]
    if out not in ("bfloat16", "float16"):
        return f"out_dtype {out} (the sm_90a GEMM writes bfloat16/float16)"
    from ..schedules.configs import lookup_sm90_config
    try:
        cfg, source = lookup_sm90_config(M, N, K, out, "bias" if params["bias"] else "none", num_sms)
    except NotImplementedError as e:
        return str(e)
    why = cfg.check(M, N, K, out)
    if why is None:
        params.update(kernel=_DEQUANT, config=cfg.name(), config_source=source, split_k=cfg.split_k,
                      num_sms=num_sms)
    return why


@functools.lru_cache(maxsize=4096)
def _plan_cached(M, N, K, mode_a, mode_b, out_dtype, has_bias, device) -> tuple:
    dev = torch.device(device)
    arch, sms = "", 0
    if dev.type == "cuda":
        arch = target_for(dev).arch
        sms = num_sms(dev) if arch == "sm_90a" else 0
    return tuple(sorted(fp8_gemm_plan(M, N, K, mode_a, mode_b, out_dtype, has_bias, dev.type, arch, sms).items()))


def _make(params: dict):
    def make(t):
        M, N, K, out = params["M"], params["N"], params["K"], params["out_dtype"]
        if params["kernel"] == _FP8:
            return _make_fp8(params)
        if params["kernel"] == _DEQUANT:
            from ..schedules.configs import GemmConfig
            from ..schedules.gemm_sm90 import make_gemm_sm90_kernels
            cfg = GemmConfig.from_name(params["config"])
            gemm = make_gemm_sm90_kernels(M, N, K, out, ("bias",) if params["bias"] else (), cfg, params["num_sms"])
            gemm = [f.with_attr("kiln.tir_pipeline", "tirx").with_attr("kiln.rule", "kiln.gemm_sm90") for f in gemm]
            deq = [make_fp8_dequant_te(M, K, params["mode_a"], out, "kiln_fp8_dequant_a"),
                   make_fp8_dequant_te(N, K, params["mode_b"], out, "kiln_fp8_dequant_b")]
            funcs = deq + gemm
            names = [str(f.attrs["global_symbol"]) for f in funcs]
            info = {"kernel": f"dequantise to {out} + kiln.gemm_sm90 (TIRx)", "config": params["config"],
                    "config_source": params["config_source"], "funcs": names}
            if params.get("fp8_declined"):
                info["fp8_declined"] = params["fp8_declined"]
            return tvm.IRModule(dict(zip(names, funcs))), info
        f = make_fp8_gemm_te(M, N, K, params["mode_a"], params["mode_b"], out, params["bias"])
        info = {"kernel": "te", "funcs": ["kiln_fp8_gemm"]}
        if params["declined"]:
            info["sm90a_declined"] = params["declined"]
        if params.get("fp8_declined"):
            info["fp8_declined"] = params["fp8_declined"]
        return tvm.IRModule({"kiln_fp8_gemm": f}), info
    return make


def _make_fp8(params: dict):
    """The fp8 wgmma kernel ``(A u8, B u8, sa, sb, [bias], C)`` of ``params`` and its info."""
    from ..schedules.configs import Fp8GemmConfig
    from ..schedules.gemm_fp8_sm90 import make_gemm_fp8_sm90
    cfg = Fp8GemmConfig.from_name(params["config"])
    f = make_gemm_fp8_sm90(params["M"], params["N"], params["K"], params["out_dtype"], params["mode_a"],
                           params["mode_b"], ("bias",) if params["bias"] else (), cfg, cfg.promote, params["num_sms"])
    f = f.with_attr("kiln.tir_pipeline", "tirx").with_attr("kiln.rule", "kiln.gemm_fp8_sm90")
    name = str(f.attrs["global_symbol"])
    info = {"kernel": "kiln.gemm_fp8_sm90 (TIRx, TMA + wgmma e4m3)", "config": params["config"],
            "config_source": params["config_source"], "promote": cfg.promote,
            "scales": f"{params['mode_a']}x{params['mode_b']}", "funcs": [name]}
    return tvm.IRModule({name: f}), info


def _tma_aligned(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when TMA can read it in place (16-byte aligned address), else an aligned copy."""
    return x if x.data_ptr() % _TMA_ALIGN == 0 else x.clone()


def _check(a, b, scale_a, scale_b, bias, out_dtype):
    op = "fp8_gemm"
    check_tensor(op, "a", a, dtypes=(torch.float8_e4m3fn,), min_ndim=1)
    K = int(a.shape[-1])
    M = math.prod(int(s) for s in a.shape[:-1])
    check_tensor(op, "b", b, dtypes=(torch.float8_e4m3fn,), shape=(None, K))
    N = int(b.shape[0])
    if out_dtype not in _OUT_DTYPES:
        raise OpInputError(op, "out_dtype", "torch.bfloat16, torch.float16 or torch.float32", str(out_dtype))
    mode_a = scale_mode("scale_a", scale_a, M, K, block_rows=False)
    mode_b = scale_mode("scale_b", scale_b, N, K, block_rows=True)
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=(out_dtype,), shape=(N,))
    device = check_same_device(op, {"a": a, "b": b, "scale_a": scale_a, "scale_b": scale_b, "bias": bias})
    return device, M, N, K, mode_a, mode_b


@torch.library.custom_op("kiln::fp8_gemm", mutates_args=())
def _fp8_gemm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
              bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    device, M, N, K, mode_a, mode_b = _check(a, b, scale_a, scale_b, bias, out_dtype)
    out_shape = tuple(a.shape[:-1]) + (N,)
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out.view(out_shape)
    if K == 0:
        from .checks import OpUnsupportedError
        raise OpUnsupportedError("kiln.ops.fp8_gemm: K = 0 (an empty reduction) is not supported")
    params = dict(_plan_cached(M, N, K, mode_a, mode_b, dtype_name(out_dtype), bias is not None, str(device)))
    kern = get_kernel("fp8_gemm", params, device, _SOURCES, _make(params))
    a2, b2 = a.reshape(M, K).contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    sa = scale_a.reshape(_scale_shape(mode_a, M, K)).contiguous()
    sb = scale_b.reshape(_scale_shape(mode_b, N, K)).contiguous()
    extra = [bias.contiguous()] if bias is not None else []
    names = kern.info["funcs"]
    if params["kernel"] == _FP8:
        kern[names[0]](_tma_aligned(a2), _tma_aligned(b2), sa, sb, *extra, out)
    elif params["kernel"] == _DEQUANT:
        ad = torch.empty((M, K), dtype=out_dtype, device=a.device)
        bd = torch.empty((N, K), dtype=out_dtype, device=a.device)
        kern[names[0]](a2, sa, ad)
        kern[names[1]](b2, sb, bd)
        if params["split_k"] > 1:
            ws = torch.empty((params["split_k"], M, N), dtype=torch.float32, device=a.device)
            kern[names[2]](ad, bd, ws)
            kern[names[3]](ws, *extra, out)
        else:
            kern[names[2]](ad, bd, *extra, out)
    else:
        kern[names[0]](a2, b2, sa, sb, *extra, out)
    return out.view(out_shape)


@_fp8_gemm.register_fake
def _(a, b, scale_a, scale_b, bias, out_dtype):
    _, M, N, K, _, _ = _check(a, b, scale_a, scale_b, bias, out_dtype)
    return a.new_empty(tuple(a.shape[:-1]) + (N,), dtype=out_dtype)


def fp8_gemm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
             bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Scaled float8 (e4m3) GEMM ``(a * scale_a) @ (b * scale_b)^T (+ bias)``.

    Parameters
    ----------
    a : torch.Tensor
        ``[..., K]`` ``torch.float8_e4m3fn``.
    b : torch.Tensor
        ``[N, K]`` ``torch.float8_e4m3fn`` (``nn.Linear.weight`` layout).
    scale_a : torch.Tensor
        float32: ``[]``/``[1]`` per tensor, ``[M]``/``[M, 1]`` per token, ``[M, ceil(K/128)]`` per 1x128 group.
    scale_b : torch.Tensor
        float32: ``[]``/``[1]`` per tensor, ``[N]``/``[N, 1]`` per channel, ``[ceil(N/128), ceil(K/128)]``
        per 128x128 block.
    bias : torch.Tensor, optional
        ``[N]`` in ``out_dtype``.
    out_dtype : torch.dtype
        bfloat16 (default), float16 or float32.

    Returns
    -------
    torch.Tensor
        ``[..., N]`` in ``out_dtype``.

    Raises
    ------
    OpInputError
        Wrong dtype / shape / device, or a scale shape that is none of the modes.
    """
    return torch.ops.kiln.fp8_gemm(a, b, scale_a, scale_b, bias, out_dtype)
