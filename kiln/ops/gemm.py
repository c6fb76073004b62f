"""``kiln::gemm``: ``C = epilogue(A @ B^T)`` with the epilogue fused, dispatched per shape.

* ``a [..., K]``, ``b [N, K]`` (the ``nn.Linear`` weight layout), same float dtype; fp32 accumulation;
  ``C [..., N]`` in that dtype. The epilogue is :class:`kiln.schedules.gemm_sm90.Epilogue`'s stage list
  (``bias``, ``residual``, ``gelu``, ``gelu_tanh``, ``relu``, ``silu``, ``("scale", s)``), applied in fp32.
* CUDA sm_90a, fp16/bf16: kiln's hand-written TIRx GEMM (TMA + wgmma, split-K for small M) with the tile
  config of the tuned table (:func:`kiln.schedules.configs.lookup_sm90_config`: the exact problem, else the
  heuristic). Problems it declines (fp32, ``N`` or ``K`` not a multiple of 8, another arch) get a TE
  definition scheduled by dlight; the reason is kept in the cache entry's info (``sm90a_declined``).
* CPU: the TE definition built for llvm (unscheduled: kiln's reference, not a speed target).
"""
import functools
from typing import Optional

import torch
import tvm
from tvm import te

from ..schedules.gemm_sm90 import EPILOGUE_STAGES, Epilogue
from .build import get_kernel, num_sms, target_for
from .checks import FLOAT_DTYPES, OpInputError, OpUnsupportedError, check_same_device, check_tensor, dtype_name

__all__ = ["gemm", "make_gemm_te", "encode_epilogue", "decode_epilogue", "gemm_plan"]

_SOURCES = ("kiln.ops.gemm", "kiln.schedules.gemm_sm90", "kiln.schedules.gemm_sm90_kernel", "kiln.schedules.configs")
_F32 = "float32"


def encode_epilogue(epilogue) -> str:
    """The canonical string of an epilogue (the op schema takes a string): stages joined by ``+``, a scale
    as ``scale:<repr>`` (``"bias+gelu"``, ``"scale:0.125+relu"``; ``""`` = none)."""
    if epilogue is None:
        return ""
    if isinstance(epilogue, str):
        epilogue = decode_epilogue(epilogue)
    epi = epilogue if isinstance(epilogue, Epilogue) else Epilogue(tuple(epilogue))
    return "+".join(s[0] if len(s) == 1 else f"{s[0]}:{s[1]!r}" for s in epi.stages)


def decode_epilogue(text: str) -> Epilogue:
    """Inverse of :func:`encode_epilogue` (also accepts ``"bias,gelu"``)."""
    stages = []
    for part in filter(None, (p.strip() for p in text.replace(",", "+").split("+"))):
        name, _, arg = part.partition(":")
        if name not in EPILOGUE_STAGES:
            raise OpInputError("gemm", "epilogue", f"stages from {', '.join(EPILOGUE_STAGES)}", repr(text))
        if EPILOGUE_STAGES[name]:
            try:
                stages.append((name, float(arg)))
            except ValueError:
                raise OpInputError("gemm", "epilogue", f"'{name}:<float>'", repr(part)) from None
        else:
            stages.append((name,))
    return Epilogue(tuple(stages))


def make_gemm_te(M: int, N: int, K: int, dtype: str, epi: Epilogue) -> tvm.tirx.PrimFunc:
    """TE definition: ``(A[M,K], B[N,K], [bias[N]], [residual[M,N]], C[M,N])``, fp32 accumulate."""
    a = te.placeholder((M, K), dtype, name="A")
    b = te.placeholder((N, K), dtype, name="B")
    bias = te.placeholder((N,), dtype, name="bias") if epi.has_bias else None
    res = te.placeholder((M, N), dtype, name="residual") if epi.has_residual else None
    k = te.reduce_axis((0, K), name="k")
    acc = te.compute((M, N), lambda i, j: te.sum(a[i, k].astype(_F32) * b[j, k].astype(_F32), axis=k), name="acc")
    bias32, res32 = bias, res
    if dtype == "bfloat16":
        # TVM's bf16 legalization (llvm) reads a bf16 load inside a Let as its raw bits: the epilogue binds
        # its input with Let, so widen bias/residual to fp32 in their own stages first.
        bias32 = te.compute((N,), lambda j: bias[j].astype(_F32), name="bias_f32") if bias is not None else None
        res32 = te.compute((M, N), lambda i, j: res[i, j].astype(_F32), name="res_f32") if res is not None else None
    c = te.compute((M, N), lambda i, j: epi.apply_tir(
        acc[i, j], bias32[j].astype(_F32) if bias32 is not None else None,
        res32[i, j].astype(_F32) if res32 is not None else None).astype(dtype), name="C")
    args = [a, b] + [t for t in (bias, res) if t is not None] + [c]
    return te.create_prim_func(args).with_attr("global_symbol", "kiln_gemm")


@functools.lru_cache(maxsize=4096)
def gemm_plan(M: int, N: int, K: int, dtype: str, epi_text: str, device: str) -> tuple:
    """``(params, reason)``: the kernel parameters of one problem on one device (the sm_90a config from
    the tuned table when the TIRx GEMM takes it; ``reason`` says why it did not, else None)."""
    dev = torch.device(device)
    epi = decode_epilogue(epi_text)
    params = {"M": M, "N": N, "K": K, "dtype": dtype, "epilogue": epi_text, "kernel": "te"}
    if dev.type != "cuda":
        return params, "not a CUDA device"
    t = target_for(dev)
    if t.arch != "sm_90a":
        return params, f"arch {t.arch} is not sm_90a"
    from ..schedules.configs import GEMM_DTYPES, lookup_sm90_config
    if dtype not in GEMM_DTYPES:
        return params, f"dtype {dtype} (the sm_90a GEMM takes {', '.join(GEMM_DTYPES)})"
    sms = num_sms(dev)
    try:
        cfg, source = lookup_sm90_config(M, N, K, dtype, epi.name(), sms)
    except NotImplementedError as e:      # no valid tile config (e.g. K not a multiple of 8): the reason
        return params, str(e)
    reason = cfg.check(M, N, K, dtype)
    if reason:
        return params, reason
    params.update(kernel="sm90a", config=cfg.name(), config_source=source, split_k=cfg.split_k, num_sms=sms)
    return params, None


def _make(params: dict, reason):
    def make(t):
        M, N, K, dtype = params["M"], params["N"], params["K"], params["dtype"]
        epi = decode_epilogue(params["epilogue"])
        if params["kernel"] == "sm90a":
            from ..schedules.configs import GemmConfig
            from ..schedules.gemm_sm90 import make_gemm_sm90_kernels
            cfg = GemmConfig.from_name(params["config"])
            funcs = make_gemm_sm90_kernels(M, N, K, dtype, epi, cfg, params["num_sms"])
            funcs = [f.with_attr("kiln.tir_pipeline", "tirx").with_attr("kiln.rule", "kiln.gemm_sm90") for f in funcs]
            names = [str(f.attrs["global_symbol"]) for f in funcs]
            info = {"kernel": "kiln.gemm_sm90 (TIRx, TMA + wgmma)", "config": params["config"],
                    "config_source": params["config_source"], "funcs": names}
            return tvm.IRModule(dict(zip(names, funcs))), info
        info = {"kernel": "te", "funcs": ["kiln_gemm"]}
        if reason:
            info["sm90a_declined"] = reason
        return tvm.IRModule({"kiln_gemm": make_gemm_te(M, N, K, dtype, epi)}), info
    return make


def _check(a, b, bias, residual, epi_text):
    op = "gemm"
    check_tensor(op, "a", a, dtypes=FLOAT_DTYPES, min_ndim=1)
    K = a.shape[-1]
    check_tensor(op, "b", b, dtypes=(a.dtype,), shape=(None, K))
    N = b.shape[0]
    epi = decode_epilogue(epi_text)
    if epi.has_bias:
        if bias is None:
            raise OpInputError(op, "bias", f"a [{N}] tensor (the epilogue {epi_text!r} adds a bias)", "None")
        check_tensor(op, "bias", bias, dtypes=(a.dtype,), shape=(N,))
    elif bias is not None:
        raise OpInputError(op, "bias", f"None (the epilogue {epi_text!r} has no 'bias' stage)", "a tensor")
    out_shape = tuple(a.shape[:-1]) + (N,)
    if epi.has_residual:
        if residual is None:
            raise OpInputError(op, "residual", f"a {out_shape} tensor (the epilogue {epi_text!r} adds it)", "None")
        check_tensor(op, "residual", residual, dtypes=(a.dtype,), shape=out_shape)
    elif residual is not None:
        raise OpInputError(op, "residual", f"None (the epilogue {epi_text!r} has no 'residual' stage)", "a tensor")
    device = check_same_device(op, {"a": a, "b": b, "bias": bias, "residual": residual})
    return device, out_shape


@torch.library.custom_op("kiln::gemm", mutates_args=())
def _gemm(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
          epilogue: str) -> torch.Tensor:
    device, out_shape = _check(a, b, bias, residual, epilogue)
    N, K = int(b.shape[0]), int(b.shape[1])
    a2 = a.reshape(-1, K).contiguous()
    M = int(a2.shape[0])
    out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return out.view(out_shape)
    if K == 0:
        raise OpUnsupportedError("kiln.ops.gemm: K = 0 (an empty reduction) is not supported")
    params, reason = gemm_plan(M, N, K, dtype_name(a.dtype), epilogue, str(device))
    kern = get_kernel("gemm", params, device, _SOURCES, _make(params, reason))
    extra = [t.contiguous() for t in (bias, residual.reshape(M, N) if residual is not None else None) if t is not None]
    names = kern.info["funcs"]
    if params.get("split_k", 1) > 1:
        ws = torch.empty((params["split_k"], M, N), dtype=torch.float32, device=a.device)
        kern[names[0]](a2, b.contiguous(), ws)
        kern[names[1]](ws, *extra, out)
    else:
        kern[names[0]](a2, b.contiguous(), *extra, out)
    return out.view(out_shape)


@_gemm.register_fake
def _(a, b, bias, residual, epilogue):
    _, out_shape = _check(a, b, bias, residual, epilogue)
    return a.new_empty(out_shape)


def gemm(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
         epilogue=None) -> torch.Tensor:
    """``epilogue(a @ b^T)`` with the epilogue fused into the GEMM.

    Parameters
    ----------
    a : torch.Tensor
        ``[..., K]``, float16 / bfloat16 / float32, cpu or cuda.
    b : torch.Tensor
        ``[N, K]`` (``nn.Linear.weight`` layout), same dtype and device.
    bias : torch.Tensor, optional
        ``[N]``, same dtype.
    residual : torch.Tensor, optional
        ``[..., N]``, same dtype.
    epilogue : sequence of stages, Epilogue or str, optional
        E.g. ``("bias", "gelu")``, ``[("scale", 0.5), "relu"]``, ``"bias+gelu_tanh"``. Default: ``bias``
        if ``bias`` is given, then ``residual`` if ``residual`` is given (a plain GEMM with neither).

    Returns
    -------
    torch.Tensor
        ``[..., N]`` in ``a``'s dtype.

    Raises
    ------
    OpInputError
        Wrong dtype / shape / device, or an epilogue that disagrees with the tensors given.
    """
    if epilogue is None:
        epilogue = tuple(s for s, t in (("bias", bias), ("residual", residual)) if t is not None)
    return torch.ops.kiln.gemm(a, b, bias, residual, encode_epilogue(epilogue))
