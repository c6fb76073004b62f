"""``kiln::rms_norm``, ``kiln::layer_norm`` and their fused-residual forms (vLLM / FlashInfer semantics).

Over the last dim ``N`` of ``x [..., N]`` (any float dtype; the statistics and the affine in fp32, one cast
at the end):

* ``rms_norm(x, w, eps) = x * rsqrt(mean(x^2) + eps) * w``
* ``layer_norm(x, w, b, eps) = (x - mean) * rsqrt(var + eps) * w + b`` (two-pass variance; ``w``/``b``
  optional, as in ``F.layer_norm``)
* with ``residual``: ``h = x + residual`` (added in fp32, rounded to the dtype) is the new residual stream,
  and the norm is taken of ``h``, so ``(out, h)`` equals the unfused ``h = x + residual; norm(h)``.

Optional fp8 output (``quant_scale``): the normed value divided by a per-tensor float32 scale, saturated to
+-448 and rounded to nearest even into ``torch.float8_e4m3fn`` (vLLM's static fp8 quant after the norm).

Kernels: one TE definition per variant (``M`` rows, static); llvm builds it unscheduled, CUDA with kiln's
row schedule (:func:`schedule_norm_cuda`: one CTA per row, cross-thread reductions; dlight declines the
fused-residual form, and its fallback would run one thread per row).
"""
import math
from typing import Optional

import torch
from tvm import te, tirx

from .build import get_kernel
from .checks import FLOAT_DTYPES, OpInputError, check_same_device, check_tensor, dtype_name
from .fp8 import f32_to_e4m3

__all__ = ["rms_norm", "layer_norm", "make_norm_te", "schedule_norm_cuda"]

_SOURCES = ("kiln.ops.norm", "kiln.ops.fp8")
_F32 = "float32"


def make_norm_te(kind: str, M: int, N: int, dtype: str, wdtype: str | None, bdtype: str | None, eps: float,
                 residual: bool, quant: bool = False) -> tirx.PrimFunc:
    """The TE PrimFunc of one norm problem.

    Parameters: ``(x[M,N], [residual[M,N]], [w[N]], [b[N]], [quant_scale[1] f32], y[M,N], [h[M,N]])``
    (``h`` = new residual; with ``quant``, ``y`` is the float8 e4m3fn bytes of ``norm / quant_scale`` as uint8,
    saturated, round-to-nearest-even: :func:`kiln.ops.fp8.f32_to_e4m3`).
    The reductions read ``x`` (+ ``residual``) directly and ``y``/``h`` are one two-output stage, so every
    stage depends only on the inputs and the row statistics (what :func:`schedule_norm_cuda` needs: one
    CTA per row, no global round trip between stages).

    Parameters
    ----------
    kind : {"rms", "layer"}
    M, N : int
    dtype : str
        x / residual / outputs.
    wdtype, bdtype : str or None
        Weight / bias dtype (None: absent).
    eps : float
    residual : bool
    quant : bool
    """
    x = te.placeholder((M, N), dtype, name="x")
    r = te.placeholder((M, N), dtype, name="residual") if residual else None
    w = te.placeholder((N,), wdtype, name="w") if wdtype else None
    b = te.placeholder((N,), bdtype, name="b") if bdtype else None
    qs = te.placeholder((1,), _F32, name="quant_scale") if quant else None

    def h(i, j):          # the (new) residual stream, in the I/O dtype
        if r is None:
            return x[i, j]
        return (x[i, j].astype(_F32) + r[i, j].astype(_F32)).astype(dtype)

    def hf(i, j):
        return h(i, j).astype(_F32)

    inv_n = tirx.const(1.0 / N, _F32)
    e = tirx.const(eps, _F32)
    k1 = te.reduce_axis((0, N), name="k1")
    if kind == "rms":
        ss = te.compute((M,), lambda i: te.sum(hf(i, k1) * hf(i, k1), axis=k1), name="stat0")

        def norm(i, j):
            return hf(i, j) * te.rsqrt(ss[i] * inv_n + e)
    else:
        total = te.compute((M,), lambda i: te.sum(hf(i, k1), axis=k1), name="stat0")
        k2 = te.reduce_axis((0, N), name="k2")
        var = te.compute((M,), lambda i: te.sum((hf(i, k2) - total[i] * inv_n) * (hf(i, k2) - total[i] * inv_n),
                                                axis=k2), name="stat1")

        def norm(i, j):
            return (hf(i, j) - total[i] * inv_n) * te.rsqrt(var[i] * inv_n + e)

    def out(i, j):
        v = norm(i, j)
        if w is not None:
            v = v * w[j].astype(_F32)
        if b is not None:
            v = v + b[j].astype(_F32)
        if qs is not None:
            return f32_to_e4m3(v / qs[0])
        return v.astype(dtype)

    if r is not None:
        y, hout = te.compute((M, N), lambda i, j: [out(i, j), h(i, j)], name="y")
        outs = [y, hout]
    else:
        outs = [te.compute((M, N), out, name="y")]
    args = [x] + ([r] if r is not None else []) + [t for t in (w, b, qs) if t is not None] + outs
    return te.create_prim_func(args).with_attr("global_symbol", "kiln_norm")


#: Threads per row (CTA) at most; longer rows loop (a row is one CTA whatever its length).
_MAX_THREADS = 256


def schedule_norm_cuda(func: tirx.PrimFunc, N: int, dtype: str) -> tirx.PrimFunc:
    """kiln's GPU schedule of :func:`make_norm_te`: one CTA per row.

    Each row statistic is a cross-thread reduction (threads stride the row, coalesced; warp shuffles +
    shared staging, lowered by TVM) kept in shared memory; the output stage then walks the row with
    4-element vectors when ``N`` allows. dlight declines the fused-residual form (two outputs) and its
    ``Fallback`` would give one thread per row, hence this schedule.
    """
    from tvm import s_tir
    # 4 lanes: TVM's CUDA codegen broadcasts a float32 scalar to 8 lanes with an invalid
    # make_ulonglong4(8 args) (nvcc: "too many arguments"), so fp16 rows use 8-byte vectors.
    vec = 4 if N % 4 == 0 else 1
    lanes = -(-N // vec)                                     # vectors per row
    threads = min(_MAX_THREADS, max(32, -(-lanes // 32) * 32))
    sch = s_tir.Schedule(func)
    names = [b.name_hint for b in _sblocks(sch)]
    out = sch.get_sblock("y_v0" if "y_v0" in names else "y")
    i, j = sch.get_loops(out)
    _, jt, jv = sch.split(j, [None, threads, vec])
    sch.bind(i, "blockIdx.x")
    sch.bind(jt, "threadIdx.x")
    sch.vectorize(jv)
    for stat in reversed([n for n in names if n.startswith("stat")]):
        blk = sch.get_sblock(stat)
        sch.compute_at(blk, i)
        sch.set_scope(blk, 0, "shared")
        _, kt = sch.split(sch.get_loops(blk)[-1], [None, threads])
        sch.bind(kt, "threadIdx.x")
    return sch.mod["main"].with_attrs({"tirx.is_scheduled": True, "kiln.rule": "kiln.ops.norm_rows",
                                       "global_symbol": "kiln_norm"})


def _sblocks(sch):
    return [sch.get(rv) for rv in sch.get_child_blocks(sch.get_sblock("root"))]


def _check(op: str, x, residual, weight, bias, eps, quant_scale=None):
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    N = x.shape[-1]
    if residual is not None:
        check_tensor(op, "residual", residual, dtypes=(x.dtype,), shape=tuple(x.shape))
    if weight is not None:
        check_tensor(op, "weight", weight, dtypes=FLOAT_DTYPES, shape=(N,))
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=FLOAT_DTYPES, shape=(N,))
    if quant_scale is not None:
        check_tensor(op, "quant_scale", quant_scale, dtypes=(torch.float32,))
        if quant_scale.numel() != 1:
            raise OpInputError(op, "quant_scale", "one float32 element (a per-tensor scale)",
                               f"shape {tuple(quant_scale.shape)}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise OpInputError(op, "eps", "a finite float >= 0", repr(eps))
    return check_same_device(op, {"x": x, "residual": residual, "weight": weight, "bias": bias,
                                  "quant_scale": quant_scale})


def _run(kind: str, x, residual, weight, bias, eps, quant_scale):
    op = f"{kind}_norm"
    device = _check(op, x, residual, weight, bias, eps, quant_scale)
    N = int(x.shape[-1])
    x2 = x.reshape(-1, N).contiguous()
    M = int(x2.shape[0])
    quant = quant_scale is not None
    y = torch.empty_like(x2, dtype=torch.float8_e4m3fn if quant else x.dtype)
    h = torch.empty_like(x2) if residual is not None else None
    if M == 0 or N == 0:   # nothing to compute: every output has zero elements
        return y.view(x.shape), (None if h is None else h.view(x.shape))
    params = {"kind": kind, "M": M, "N": N, "dtype": dtype_name(x.dtype),
              "wdtype": dtype_name(weight.dtype) if weight is not None else "",
              "bdtype": dtype_name(bias.dtype) if bias is not None else "",
              "eps": float(eps), "residual": residual is not None, "quant": quant}

    def make(t):
        f = make_norm_te(kind, M, N, params["dtype"], params["wdtype"] or None, params["bdtype"] or None,
                         float(eps), residual is not None, quant)
        if t.name == "cuda":
            return _module(schedule_norm_cuda(f, N, params["dtype"])), {"kernel": "te + kiln.ops.norm_rows schedule"}
        return _module(f), {"kernel": "te"}

    k = get_kernel(op, params, device, _SOURCES, make)
    args = [x2] + ([residual.reshape(-1, N).contiguous()] if residual is not None else [])
    args += [t.contiguous() for t in (weight, bias) if t is not None]
    args += [quant_scale.reshape(1).contiguous()] if quant else []
    args += [y.view(torch.uint8) if quant else y] + ([h] if h is not None else [])
    k["kiln_norm"](*args)
    return y.view(x.shape), (None if h is None else h.view(x.shape))


def _module(func):
    import tvm
    return tvm.IRModule({"kiln_norm": func})


def _fake_out(x, quant_scale):
    return torch.empty_like(x, memory_format=torch.contiguous_format,
                            dtype=torch.float8_e4m3fn if quant_scale is not None else x.dtype)


# ------------------------------------------------------------------------------------------ torch.library
@torch.library.custom_op("kiln::rms_norm", mutates_args=())
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, quant_scale: Optional[torch.Tensor]) -> torch.Tensor:
    return _run("rms", x, None, weight, None, eps, quant_scale)[0]


@_rms_norm.register_fake
def _(x, weight, eps, quant_scale):
    _check("rms_norm", x, None, weight, None, eps, quant_scale)
    return _fake_out(x, quant_scale)


@torch.library.custom_op("kiln::fused_add_rms_norm", mutates_args=())
def _fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        quant_scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _run("rms", x, residual, weight, None, eps, quant_scale)


@_fused_add_rms_norm.register_fake
def _(x, residual, weight, eps, quant_scale):
    _check("rms_norm", x, residual, weight, None, eps, quant_scale)
    return _fake_out(x, quant_scale), torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("kiln::layer_norm", mutates_args=())
def _layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                quant_scale: Optional[torch.Tensor]) -> torch.Tensor:
    return _run("layer", x, None, weight, bias, eps, quant_scale)[0]


@_layer_norm.register_fake
def _(x, weight, bias, eps, quant_scale):
    _check("layer_norm", x, None, weight, bias, eps, quant_scale)
    return _fake_out(x, quant_scale)


@torch.library.custom_op("kiln::fused_add_layer_norm", mutates_args=())
def _fused_add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                          bias: Optional[torch.Tensor], eps: float,
                          quant_scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _run("layer", x, residual, weight, bias, eps, quant_scale)


@_fused_add_layer_norm.register_fake
def _(x, residual, weight, bias, eps, quant_scale):
    _check("layer_norm", x, residual, weight, bias, eps, quant_scale)
    return _fake_out(x, quant_scale), torch.empty_like(x, memory_format=torch.contiguous_format)


# ------------------------------------------------------------------------------------------ public API
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: Optional[torch.Tensor] = None,
             quant_scale: Optional[torch.Tensor] = None):
    """RMSNorm over the last dim, optionally fused with the residual add and an fp8 quantisation.

    Parameters
    ----------
    x : torch.Tensor
        ``[..., N]``, float32 / float16 / bfloat16, on cpu or cuda.
    weight : torch.Tensor
        ``[N]`` (any float dtype).
    eps : float
    residual : torch.Tensor, optional
        Same shape and dtype as ``x``.
    quant_scale : torch.Tensor, optional
        One float32 element: the normed output is returned as ``torch.float8_e4m3fn`` =
        ``(norm / quant_scale)`` saturated to +-448, rounded to nearest even (static per-tensor quantisation,
        the input of :func:`kiln.ops.fp8_gemm` with ``scale_a = quant_scale``).

    Returns
    -------
    torch.Tensor or (torch.Tensor, torch.Tensor)
        ``rms_norm(x) * weight``; with ``residual``: ``(rms_norm(h) * weight, h)`` where
        ``h = x + residual`` (the new residual stream, in ``x``'s dtype).

    Raises
    ------
    OpInputError
        Wrong dtype, shape or device (names expected vs given).
    """
    if residual is None:
        return torch.ops.kiln.rms_norm(x, weight, float(eps), quant_scale)
    return torch.ops.kiln.fused_add_rms_norm(x, residual, weight, float(eps), quant_scale)


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               eps: float = 1e-5, residual: Optional[torch.Tensor] = None, quant_scale: Optional[torch.Tensor] = None):
    """LayerNorm over the last dim (``F.layer_norm(x, x.shape[-1:], weight, bias, eps)``), optionally fused
    with the residual add and an fp8 quantisation.

    Parameters
    ----------
    x : torch.Tensor
        ``[..., N]``, float32 / float16 / bfloat16, on cpu or cuda.
    weight, bias : torch.Tensor, optional
        ``[N]`` (any float dtype).
    eps : float
    residual : torch.Tensor, optional
        Same shape and dtype as ``x``.
    quant_scale : torch.Tensor, optional
        As for :func:`rms_norm`: the normed output becomes ``torch.float8_e4m3fn``.

    Returns
    -------
    torch.Tensor or (torch.Tensor, torch.Tensor)
        The normed tensor; with ``residual``: ``(layer_norm(h), h)`` with ``h = x + residual``.

    Raises
    ------
    OpInputError
        Wrong dtype, shape or device.
    """
    if residual is None:
        return torch.ops.kiln.layer_norm(x, weight, bias, float(eps), quant_scale)
    return torch.ops.kiln.fused_add_layer_norm(x, residual, weight, bias, float(eps), quant_scale)
