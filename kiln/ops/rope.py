"""``kiln::rope``: rotary position embedding, Llama / GPT-NeoX "rotate half" form, on q and k at once.

For a head vector ``x`` of ``D`` elements, rotary dim ``R = 2 * cos.shape[-1] <= D`` and position ``p``::

    y[i]       = x[i] * cos[p, i] - x[i + R/2] * sin[p, i]        (i < R/2)
    y[i + R/2] = x[i + R/2] * cos[p, i] + x[i] * sin[p, i]
    y[i]       = x[i]                                            (i >= R: partial rotary passes through)

which is transformers' ``x * cos + rotate_half(x) * sin`` with its duplicated ``[.., R]`` tables given here
as their first half ``[max_pos, R/2]``. fp32 arithmetic, one cast. Positions are clamped to
``[0, max_pos - 1]`` in the kernel (a device-side index check would need a host sync).

Kernel: one TE function with two outputs; llvm unscheduled, CUDA through dlight.
"""
import torch
import tvm
from tvm import te, tirx

from .build import get_kernel
from .checks import FLOAT_DTYPES, OpInputError, check_same_device, check_tensor, dtype_name

__all__ = ["rope", "make_rope_te"]

_SOURCES = ("kiln.ops.rope",)
_F32 = "float32"


def make_rope_te(T: int, Hq: int, Hkv: int, D: int, R: int, P: int, dtype: str, table_dtype: str,
                 pos_dtype: str) -> tvm.tirx.PrimFunc:
    """``(q[T,Hq,D], k[T,Hkv,D], cos[P,R/2], sin[P,R/2], pos[T], q_out, k_out)``."""
    half = R // 2
    q = te.placeholder((T, Hq, D), dtype, name="q")
    k = te.placeholder((T, Hkv, D), dtype, name="k")
    cos = te.placeholder((P, half), table_dtype, name="cos")
    sin = te.placeholder((P, half), table_dtype, name="sin")
    pos = te.placeholder((T,), pos_dtype, name="pos")

    def rotate(x):
        def f(t, h, d):
            p = tirx.max(tirx.min(pos[t], tirx.const(P - 1, pos_dtype)), tirx.const(0, pos_dtype))
            lo = d < half
            i = tirx.Select(lo, d, d - half)
            i = tirx.min(tirx.max(i, 0), half - 1)           # keep the table index in range for d >= R too
            partner = x[t, h, tirx.Select(lo, d + half, d - half)]   # in range for every d < D
            c = cos[p, i].astype(_F32)
            s = sin[p, i].astype(_F32)
            xv = x[t, h, d].astype(_F32)
            other = tirx.Select(lo, -partner.astype(_F32), partner.astype(_F32))
            rotated = xv * c + other * s
            return tirx.Select(d < R, rotated, xv).astype(dtype)
        return f

    qo = te.compute((T, Hq, D), rotate(q), name="q_out")
    ko = te.compute((T, Hkv, D), rotate(k), name="k_out")
    return te.create_prim_func([q, k, cos, sin, pos, qo, ko]).with_attr("global_symbol", "kiln_rope")


def _check(q, k, cos, sin, positions):
    op = "rope"
    check_tensor(op, "q", q, dtypes=FLOAT_DTYPES, min_ndim=2)
    lead, D = tuple(q.shape[:-2]), q.shape[-1]
    check_tensor(op, "k", k, dtypes=(q.dtype,), shape=lead + (None, D))
    check_tensor(op, "cos", cos, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor(op, "sin", sin, dtypes=(cos.dtype,), shape=tuple(cos.shape))
    half = cos.shape[1]
    if half < 1 or 2 * half > D:
        raise OpInputError(op, "cos", f"[max_pos, R/2] with 1 <= R/2 <= head_dim/2 = {D // 2}",
                           f"shape {tuple(cos.shape)}")
    check_tensor(op, "positions", positions, dtypes=(torch.int32, torch.int64), shape=lead)
    return check_same_device(op, {"q": q, "k": k, "cos": cos, "sin": sin, "positions": positions})


@torch.library.custom_op("kiln::rope", mutates_args=())
def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    device = _check(q, k, cos, sin, positions)
    Hq, Hkv, D = int(q.shape[-2]), int(k.shape[-2]), int(q.shape[-1])
    q2, k2 = q.reshape(-1, Hq, D).contiguous(), k.reshape(-1, Hkv, D).contiguous()
    T = int(q2.shape[0])
    qo, ko = torch.empty_like(q2), torch.empty_like(k2)
    if T == 0 or D == 0 or int(cos.shape[0]) == 0:
        if T and D:
            raise OpInputError("rope", "cos", "at least one position row", f"shape {tuple(cos.shape)}")
        return qo.view(q.shape), ko.view(k.shape)
    params = {"T": T, "Hq": Hq, "Hkv": Hkv, "D": D, "R": 2 * int(cos.shape[1]), "P": int(cos.shape[0]),
              "dtype": dtype_name(q.dtype), "table_dtype": dtype_name(cos.dtype), "pos_dtype": dtype_name(positions.dtype)}

    def make(t):
        return tvm.IRModule({"kiln_rope": make_rope_te(**params)}), {"kernel": "te"}

    kern = get_kernel("rope", params, device, _SOURCES, make)
    kern["kiln_rope"](q2, k2, cos.contiguous(), sin.contiguous(), positions.reshape(-1).contiguous(), qo, ko)
    return qo.view(q.shape), ko.view(k.shape)


@_rope.register_fake
def _(q, k, cos, sin, positions):
    _check(q, k, cos, sin, positions)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format))


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor):
    """Rotary embedding (rotate-half) of queries and keys.

    Parameters
    ----------
    q : torch.Tensor
        ``[..., Hq, D]`` (e.g. ``[tokens, Hq, D]`` or BSHD ``[B, S, Hq, D]``), float32 / float16 / bfloat16.
    k : torch.Tensor
        ``[..., Hkv, D]``, same leading dims and dtype.
    cos, sin : torch.Tensor
        ``[max_pos, R/2]`` tables (``R`` = rotary dim, even, ``<= D``), any float dtype.
    positions : torch.Tensor
        int32 / int64 of shape ``q.shape[:-2]``.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        Rotated ``q`` and ``k`` (new tensors).

    Raises
    ------
    OpInputError
        Wrong dtype / shape / device.
    """
    return torch.ops.kiln.rope(q, k, cos, sin, positions)
