"""``kiln::attention`` (prefill, BSHD) and ``kiln::decode_attention`` (one query token over a KV cache).

``attention(q, k, v, causal, scale, kpad)``: ``softmax(q k^T * scale + kpad + causal) v`` with q
``[B, Sq, Hq, D]``, k/v ``[B, Skv, Hkv, D]`` (GQA: query head ``h`` reads KV head ``h // (Hq/Hkv)``),
``kpad [B, Skv]`` float32 additive key bias, causal top-left aligned (``is_causal=True`` of SDPA). A row whose
keys are all ``-inf`` gives 0, not NaN. CUDA sm_90a, fp16/bf16, D in {64, 128}: kiln's TIRx flash kernel
(:mod:`kiln.schedules.attention_sm90`); otherwise the generic TE definition
(:func:`kiln.relax_passes.attention_te.make_attention_generic`: fp32 scores, materialised), unscheduled on
llvm, dlight-scheduled on CUDA (the reason the flash kernel declined is in the cache entry's info).

``decode_attention(q, k_cache, v_cache, seq_lens, scale)``: q ``[B, Hq, D]``, caches ``[B, Hkv, C, D]``
(head-major, as SDPA's ``[B, H, S, D]``), ``seq_lens [B]`` int32: sequence ``b`` attends to keys
``0 .. seq_lens[b] - 1`` (clamped to ``[0, C]``; 0 keys give 0). CUDA sm_90a: kiln.llm's split-KV
("flash-decoding") kernels over separate K/V caches (:func:`kiln.llm.decode_attention.decode_attention_kv_gpu`
plus the merge); otherwise three TE functions (scores, masked softmax, ``P V``) with fp32 intermediates,
dlight-scheduled on other GPUs (the reason is in the cache entry's info).
"""
import math
from typing import Optional

import torch
import tvm
from tvm import te, tirx

from .build import get_kernel, target_for
from .checks import FLOAT_DTYPES, OpInputError, check_same_device, check_tensor, dtype_name

__all__ = ["attention", "decode_attention", "make_decode_attention_te", "attention_plan", "decode_attention_plan"]

_SOURCES = ("kiln.ops.attention", "kiln.relax_passes.attention_te", "kiln.schedules.attention_sm90",
            "kiln.schedules.attention_sm90_kernel")
_DECODE_SOURCES = ("kiln.ops.attention", "kiln.llm.decode_attention", "kiln.llm.kernels")
_F32 = "float32"


def _scale_of(op: str, scale, D: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise OpInputError(op, "scale", "a finite float or None (1/sqrt(head_dim))", repr(scale))
    return float(scale)


# ------------------------------------------------------------------------------------------ prefill
def _check_attention(q, k, v, kpad, scale):
    op = "attention"
    check_tensor(op, "q", q, dtypes=FLOAT_DTYPES, ndim=4)
    B, _, Hq, D = q.shape
    check_tensor(op, "k", k, dtypes=(q.dtype,), shape=(B, None, None, D))
    check_tensor(op, "v", v, dtypes=(q.dtype,), shape=tuple(k.shape))
    Hkv = k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise OpInputError(op, "k", f"a head count dividing Hq={Hq} (GQA groups)", f"{Hkv} heads")
    if kpad is not None:
        check_tensor(op, "kpad", kpad, dtypes=(torch.float32,), shape=(B, k.shape[1]))
    _scale_of(op, scale, max(int(D), 1))
    return check_same_device(op, {"q": q, "k": k, "v": v, "kpad": kpad})


def attention_plan(B, Sq, Skv, Hq, Hkv, D, dtype, causal, has_kpad, device) -> tuple:
    """``(kernel, reason)``: ``"sm90a_flash"`` when kiln's flash kernel takes the problem on this device,
    else ``"te"`` with the reason it does not."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return "te", "not a CUDA device"
    arch = target_for(dev).arch
    if arch != "sm_90a":
        return "te", f"arch {arch} is not sm_90a"
    from ..schedules.attention_sm90 import check_flash_attention_sm90
    reason = check_flash_attention_sm90(B, Sq, Skv, Hq, Hkv, D, dtype, causal, has_kpad)
    return ("te", reason) if reason else ("sm90a_flash", None)


@torch.library.custom_op("kiln::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: Optional[float],
               kpad: Optional[torch.Tensor]) -> torch.Tensor:
    device = _check_attention(q, k, v, kpad, scale)
    B, Sq, Hq, D = (int(s) for s in q.shape)
    Skv, Hkv = int(k.shape[1]), int(k.shape[2])
    out = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if Skv == 0:   # no keys at all: every row is "all masked" -> 0 (the kernels' convention)
        return out.zero_()
    dtype = dtype_name(q.dtype)
    kernel, reason = attention_plan(B, Sq, Skv, Hq, Hkv, D, dtype, bool(causal), kpad is not None, str(device))
    params = {"B": B, "Sq": Sq, "Skv": Skv, "Hq": Hq, "Hkv": Hkv, "D": D, "dtype": dtype, "causal": bool(causal),
              "kpad": kpad is not None, "scale": _scale_of("attention", scale, D), "kernel": kernel}

    def make(t):
        if kernel == "sm90a_flash":
            from ..schedules.attention_sm90 import make_flash_attention_sm90
            f = make_flash_attention_sm90(B, Sq, Skv, Hq, Hkv, D, dtype, bool(causal), kpad is not None,
                                          params["scale"])
            f = f.with_attr("kiln.tir_pipeline", "tirx")
            name = str(f.attrs["global_symbol"])
            return tvm.IRModule({name: f}), {"kernel": "kiln.attention_sm90 (TIRx flash)", "funcs": [name],
                                             "config": str(f.attrs["kiln.attention_config"])}
        from ..relax_passes.attention_te import make_attention_generic
        f = make_attention_generic(B, Sq, Skv, Hq, Hkv, D, dtype, bool(causal), kpad is not None, params["scale"])
        info = {"kernel": "te (attention_te.make_attention_generic)", "funcs": ["kiln_attention"]}
        if reason:
            info["flash_declined"] = reason
        return tvm.IRModule({"kiln_attention": f.with_attr("global_symbol", "kiln_attention")}), info

    kern = get_kernel("attention", params, device, _SOURCES, make)
    args = [q.contiguous(), k.contiguous(), v.contiguous()] + ([kpad.contiguous()] if kpad is not None else [])
    kern[kern.info["funcs"][0]](*args, out)
    return out


@_attention.register_fake
def _(q, k, v, causal, scale, kpad):
    _check_attention(q, k, v, kpad, scale)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, scale: Optional[float] = None,
              kpad: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scaled dot-product attention in BSHD (prefill).

    Parameters
    ----------
    q : torch.Tensor
        ``[B, Sq, Hq, D]``, float32 / float16 / bfloat16.
    k, v : torch.Tensor
        ``[B, Skv, Hkv, D]``, ``Hq`` a multiple of ``Hkv``; same dtype and device.
    causal : bool
        Top-left aligned causal mask (query ``i`` sees keys ``j <= i``).
    scale : float, optional
        Default ``1/sqrt(D)``.
    kpad : torch.Tensor, optional
        ``[B, Skv]`` float32 additive key bias (0 / ``-inf`` for a padding mask).

    Returns
    -------
    torch.Tensor
        ``[B, Sq, Hq, D]``; rows whose keys are all ``-inf`` are 0.

    Raises
    ------
    OpInputError
        Wrong dtype / shape / device.
    """
    return torch.ops.kiln.attention(q, k, v, bool(causal), None if scale is None else float(scale), kpad)


# ------------------------------------------------------------------------------------------ decode
def make_decode_attention_te(B: int, Hq: int, Hkv: int, C: int, D: int, dtype: str, scale: float) -> list:
    """The three TE functions of decode attention, in launch order:

    * ``kiln_decode_scores(q[B,Hq,D], k[B,Hkv,C,D], s[B,Hq,C] f32)``: ``s = scale * q . k``;
    * ``kiln_decode_softmax(s, seq_lens[B] i32, p[B,Hq,C] f32)``: softmax over ``j < seq_lens[b]``, 0 elsewhere
      (an empty row is all 0);
    * ``kiln_decode_pv(p, v[B,Hkv,C,D], o[B,Hq,D])``.
    """
    g = Hq // Hkv
    q = te.placeholder((B, Hq, D), dtype, name="q")
    k = te.placeholder((B, Hkv, C, D), dtype, name="k_cache")
    d = te.reduce_axis((0, D), name="d")
    s = te.compute((B, Hq, C), lambda b, h, j: te.sum(q[b, h, d].astype(_F32) * k[b, h // g, j, d].astype(_F32),
                                                      axis=d), name="qk")
    s_scaled = te.compute((B, Hq, C), lambda b, h, j: s[b, h, j] * tirx.const(scale, _F32), name="s")
    f_scores = te.create_prim_func([q, k, s_scaled]).with_attr("global_symbol", "kiln_decode_scores")

    S = te.placeholder((B, Hq, C), _F32, name="s")
    L = te.placeholder((B,), "int32", name="seq_lens")
    neg = tirx.const(-3.0e38, _F32)
    zero = tirx.const(0.0, _F32)
    j1 = te.reduce_axis((0, C), name="j1")
    m = te.compute((B, Hq), lambda b, h: te.max(tirx.Select(j1 < L[b], S[b, h, j1], neg), axis=j1), name="row_max")
    e = te.compute((B, Hq, C), lambda b, h, j: tirx.Select(j < L[b], te.exp(S[b, h, j] - m[b, h]), zero), name="e")
    j2 = te.reduce_axis((0, C), name="j2")
    den = te.compute((B, Hq), lambda b, h: te.sum(e[b, h, j2], axis=j2), name="row_sum")
    p = te.compute((B, Hq, C), lambda b, h, j: tirx.Select(den[b, h] > zero, e[b, h, j] / den[b, h], zero), name="p")
    f_softmax = te.create_prim_func([S, L, p]).with_attr("global_symbol", "kiln_decode_softmax")

    P = te.placeholder((B, Hq, C), _F32, name="p")
    v = te.placeholder((B, Hkv, C, D), dtype, name="v_cache")
    j3 = te.reduce_axis((0, C), name="j3")
    o = te.compute((B, Hq, D), lambda b, h, dd: te.sum(P[b, h, j3] * v[b, h // g, j3, dd].astype(_F32), axis=j3),
                   name="o_acc")
    oc = te.compute((B, Hq, D), lambda b, h, dd: o[b, h, dd].astype(dtype), name="o")
    f_pv = te.create_prim_func([P, v, oc]).with_attr("global_symbol", "kiln_decode_pv")
    return [f_scores, f_softmax, f_pv]


def _check_decode(q, k_cache, v_cache, seq_lens, scale):
    op = "decode_attention"
    check_tensor(op, "q", q, dtypes=FLOAT_DTYPES, ndim=3)
    B, Hq, D = q.shape
    check_tensor(op, "k_cache", k_cache, dtypes=(q.dtype,), shape=(B, None, None, D))
    check_tensor(op, "v_cache", v_cache, dtypes=(q.dtype,), shape=tuple(k_cache.shape))
    Hkv = k_cache.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise OpInputError(op, "k_cache", f"a head count dividing Hq={Hq} (GQA groups)", f"{Hkv} heads")
    check_tensor(op, "seq_lens", seq_lens, dtypes=(torch.int32,), shape=(B,))
    _scale_of(op, scale, max(int(D), 1))
    return check_same_device(op, {"q": q, "k_cache": k_cache, "v_cache": v_cache, "seq_lens": seq_lens})


def decode_attention_plan(B, Hq, Hkv, C, D, dtype, device) -> tuple:
    """``(kernel, reason, splits)``: ``"split_kv"`` with its split count when kiln.llm's split-KV kernels take
    the problem on this device, else ``"te"``, the reason and 0."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return "te", "not a CUDA device", 0
    arch = target_for(dev).arch
    if arch != "sm_90a":
        return "te", f"arch {arch} is not sm_90a", 0
    from ..llm.decode_attention import SM90_DECODE_ATTENTION as cfg
    lay = cfg.layout(D, Hq // Hkv, dtype)
    if "declined" in lay:
        return "te", lay["declined"], 0
    return "split_kv", None, cfg.splits(B, Hkv, C)


@torch.library.custom_op("kiln::decode_attention", mutates_args=())
def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                      scale: Optional[float]) -> torch.Tensor:
    device = _check_decode(q, k_cache, v_cache, seq_lens, scale)
    B, Hq, D = (int(s) for s in q.shape)
    Hkv, C = int(k_cache.shape[1]), int(k_cache.shape[2])
    out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if C == 0:
        return out.zero_()
    dtype = dtype_name(q.dtype)
    kernel, reason, splits = decode_attention_plan(B, Hq, Hkv, C, D, dtype, str(device))
    params = {"B": B, "Hq": Hq, "Hkv": Hkv, "C": C, "D": D, "dtype": dtype,
              "scale": _scale_of("decode_attention", scale, D), "kernel": kernel, "splits": splits}

    def make(t):
        if kernel == "split_kv":
            from ..llm.decode_attention import decode_attention_kv_gpu, merge_attention_gpu
            funcs = {"kiln_decode_partial": decode_attention_kv_gpu(Hq, Hkv, D, C, dtype, splits, params["scale"]),
                     "kiln_decode_merge": merge_attention_gpu(Hq, D, dtype, splits, empty_is_zero=True)}
            mod = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})
            return mod, {"kernel": f"kiln.llm split-KV ({splits} splits) + merge", "funcs": list(funcs)}
        funcs = make_decode_attention_te(**{k: params[k] for k in ("B", "Hq", "Hkv", "C", "D", "dtype", "scale")})
        names = [str(f.attrs["global_symbol"]) for f in funcs]
        info = {"kernel": "te (3 functions)", "funcs": names}
        if reason:
            info["split_kv_declined"] = reason
        return tvm.IRModule(dict(zip(names, funcs))), info

    kern = get_kernel("decode_attention", params, device, _DECODE_SOURCES, make)
    if kernel == "split_kv":
        o_part = torch.empty((B, Hq, splits, D), dtype=torch.float32, device=q.device)
        ml_part = torch.empty((B, Hq, splits, 2), dtype=torch.float32, device=q.device)
        kern["kiln_decode_partial"](q.contiguous(), k_cache.contiguous(), v_cache.contiguous(), seq_lens.contiguous(),
                                    o_part, ml_part)
        kern["kiln_decode_merge"](o_part, ml_part, out)
        return out
    f_scores, f_softmax, f_pv = (kern[n] for n in kern.info["funcs"])
    s = torch.empty((B, Hq, C), dtype=torch.float32, device=q.device)
    p = torch.empty_like(s)
    f_scores(q.contiguous(), k_cache.contiguous(), s)
    f_softmax(s, seq_lens.contiguous(), p)   # the mask j < seq_lens[b] also clamps: j < C always, < 0 never
    f_pv(p, v_cache.contiguous(), out)
    return out


@_decode_attention.register_fake
def _(q, k_cache, v_cache, seq_lens, scale):
    _check_decode(q, k_cache, v_cache, seq_lens, scale)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Attention of one new query token per sequence over a (contiguous, per-sequence) KV cache.

    Parameters
    ----------
    q : torch.Tensor
        ``[B, Hq, D]``, float32 / float16 / bfloat16.
    k_cache, v_cache : torch.Tensor
        ``[B, Hkv, C, D]`` (``C`` = cache capacity), ``Hq`` a multiple of ``Hkv``.
    seq_lens : torch.Tensor
        ``[B]`` int32: keys ``0 .. seq_lens[b] - 1`` are valid (clamped to ``[0, C]``; 0 keys give 0).
    scale : float, optional
        Default ``1/sqrt(D)``.

    Returns
    -------
    torch.Tensor
        ``[B, Hq, D]``.

    Raises
    ------
    OpInputError
        Wrong dtype / shape / device.
    """
    return torch.ops.kiln.decode_attention(q, k_cache, v_cache, seq_lens, None if scale is None else float(scale))
