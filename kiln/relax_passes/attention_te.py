"""The generic (any-target) attention PrimFunc that :mod:`.fuse_attention` calls where no tuned kernel exists.

``O = softmax(Q K^T * scale + kpad + causal) V`` in BSHD, written in TE with fp32 scores, softmax and
accumulation, the same interface as kiln's sm_90a flash kernel
(:func:`kiln.schedules.attention_sm90.make_flash_attention_sm90`):
``(Q[B,Sq,Hq,D], K[B,Skv,Hkv,D], V[B,Skv,Hkv,D], [kpad[B,Skv] float32], O[B,Sq,Hq,D])``; query head ``h``
reads KV head ``h // (Hq/Hkv)`` (GQA); causal is top-left (query ``i`` sees keys ``j <= i``); a row whose
every key is ``-inf`` gives 0 (the flash kernel's and torch's safe-softmax convention), not NaN.

It is a plain TE function (an unscheduled ``s_tir`` PrimFunc): correct on llvm without a schedule, which
is what it is for (the CPU target is kiln's reference, and the tests check the attention rewrite with it).
It materialises the ``[B, Hq, Sq, Skv]`` fp32 scores, so it is not a flash kernel: GPU targets get a
dedicated kernel or keep the unfused graph (dlight would schedule this one poorly).
"""
from __future__ import annotations

import math

import tvm
from tvm import te

__all__ = ["GENERIC_DTYPES", "make_attention_generic"]

#: Input/output dtypes of the generic kernel (fp32 inside whatever the I/O dtype).
GENERIC_DTYPES = ("float16", "bfloat16", "float32")


def _check_args(dims: dict, dtype: str) -> None:
    for nm, v in dims.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{nm} must be a static positive int, given {v!r}")
    if dtype not in GENERIC_DTYPES:
        raise ValueError(f"dtype must be one of {GENERIC_DTYPES}, given {dtype!r}")
    if dims["heads_q"] % dims["heads_kv"]:
        raise ValueError(f"heads_q={dims['heads_q']} is not a multiple of heads_kv={dims['heads_kv']}")


def make_attention_generic(batch: int, seq_q: int, seq_kv: int, heads_q: int, heads_kv: int, head_dim: int,
                           dtype: str = "float32", causal: bool = False, has_kpad: bool = False,
                           scale: float | None = None) -> tvm.tirx.PrimFunc:
    """Build the generic attention PrimFunc for one static problem.

    Parameters
    ----------
    batch, seq_q, seq_kv, heads_q, heads_kv, head_dim : int
        Static problem shape; ``heads_q`` a multiple of ``heads_kv``.
    dtype : {"float16", "bfloat16", "float32"}
        Dtype of Q, K, V and O.
    causal : bool
        Top-left causal mask.
    has_kpad : bool
        Take a ``[B, Skv]`` float32 additive key bias after V.
    scale : float, optional
        Score scale (default ``1/sqrt(head_dim)``).

    Returns
    -------
    tvm.tirx.PrimFunc
        Parameters ``(Q, K, V, [kpad], O)``, no attrs beyond TE's.

    Raises
    ------
    ValueError
        A non-static or non-positive dim, an unsupported dtype, or heads that do not group.
    """
    _check_args(dict(batch=batch, seq_q=seq_q, seq_kv=seq_kv, heads_q=heads_q, heads_kv=heads_kv,
                     head_dim=head_dim), dtype)
    sc = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if not math.isfinite(sc):
        raise ValueError(f"scale must be finite, given {scale!r}")
    B, Sq, Skv, Hq, Hkv, D = batch, seq_q, seq_kv, heads_q, heads_kv, head_dim
    group = Hq // Hkv
    f32 = "float32"
    neg_inf = tvm.tirx.const(float("-inf"), f32)
    zero = tvm.tirx.const(0.0, f32)

    q = te.placeholder((B, Sq, Hq, D), dtype, name="Q")
    k = te.placeholder((B, Skv, Hkv, D), dtype, name="K")
    v = te.placeholder((B, Skv, Hkv, D), dtype, name="V")
    kpad = te.placeholder((B, Skv), f32, name="kpad") if has_kpad else None

    d = te.reduce_axis((0, D), name="d")
    qk = te.compute((B, Hq, Sq, Skv), lambda b, h, i, j: te.sum(
        q[b, i, h, d].astype(f32) * k[b, j, h // group, d].astype(f32), axis=d), name="qk")

    def score(b, h, i, j):
        s = qk[b, h, i, j] * tvm.tirx.const(sc, f32)
        if kpad is not None:
            s = s + kpad[b, j]
        if causal:
            s = tvm.tirx.Select(j > i, neg_inf, s)
        return s

    s = te.compute((B, Hq, Sq, Skv), score, name="score")
    j1 = te.reduce_axis((0, Skv), name="j1")
    row_max = te.compute((B, Hq, Sq), lambda b, h, i: te.max(s[b, h, i, j1], axis=j1), name="row_max")
    # exp(s - max) with the all--inf row guarded: such a row gets p = 0 (not exp(nan)).
    p = te.compute((B, Hq, Sq, Skv), lambda b, h, i, j: tvm.tirx.Select(
        row_max[b, h, i] == neg_inf, zero, te.exp(s[b, h, i, j] - row_max[b, h, i])), name="p")
    j2 = te.reduce_axis((0, Skv), name="j2")
    row_sum = te.compute((B, Hq, Sq), lambda b, h, i: te.sum(p[b, h, i, j2], axis=j2), name="row_sum")
    j3 = te.reduce_axis((0, Skv), name="j3")
    acc = te.compute((B, Sq, Hq, D), lambda b, i, h, e: te.sum(
        p[b, h, i, j3] * v[b, j3, h // group, e].astype(f32), axis=j3), name="acc")
    out = te.compute((B, Sq, Hq, D), lambda b, i, h, e: tvm.tirx.Select(
        row_sum[b, h, i] > zero, acc[b, i, h, e] / row_sum[b, h, i], zero).astype(dtype), name="O")
    args = [q, k, v] + ([kpad] if kpad is not None else []) + [out]
    return te.create_prim_func(args)
