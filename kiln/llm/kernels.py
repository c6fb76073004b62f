"""TensorIR kernels of the decoder that Relax has no operator for: RoPE with the in-place KV-cache append,
the cache read of prefill, and the CPU decode attention.

The KV cache is one tensor ``[layers, 2, batch, kv_heads, max_context, head_dim]`` (2 = K, V). Every
kernel takes the layer as a scalar argument, so one PrimFunc serves all layers, and reads the token
positions from an int32 tensor, so the decode step keeps static shapes (what CUDA-graph capture needs).

Kernels are written once in block form. On GPU targets the element-wise ones are scheduled here (fuse all
loops, 256 threads per block) because dlight's rules do not accept a store through a data-dependent index
(the cache append); they carry ``tirx.is_scheduled`` and a ``kiln.rule`` attr that the schedule report
shows, and the op pattern ``opaque`` so that ``FuseOps`` leaves them alone.
"""
from __future__ import annotations

import math

import tvm
from tvm import s_tir
from tvm.script import tirx as T

__all__ = ["RULE", "NEG_INF", "OP_PATTERN_OPAQUE", "rope_kv_append", "kv_read", "decode_attention_cpu", "merge_attention_cpu", "finish"]

#: ``kiln.rule`` attr of the kernels of this package (``kiln inspect`` / schedule report).
RULE = "kiln.llm"
#: Finite stand-in for -inf in online softmax state: exp2(NEG_INF - m) is 0 for any real m, no NaN.
NEG_INF = -1.0e30
OP_PATTERN_OPAQUE = 8  # relax OpPatternKind.kOpaque: FuseOps leaves the kernel alone
_THREADS = 256        # threads per block of the element-wise GPU kernels
LOG2E = math.log2(math.e)


def finish(func: tvm.tirx.PrimFunc, op: str, scheduled: bool) -> tvm.tirx.PrimFunc:
    """Attach the attrs every kernel of this package carries: ``kiln.op`` names the operation (what a later
    pass matches; the PrimFunc's own name may get a numeric suffix), ``op_pattern`` opaque keeps FuseOps off."""
    attrs = {"kiln.op": op, "op_pattern": OP_PATTERN_OPAQUE, "tirx.noalias": True}
    if scheduled:
        attrs.update({"tirx.is_scheduled": True, "kiln.rule": RULE})
    return func.with_attrs(attrs)


def _schedule_elementwise(func: tvm.tirx.PrimFunc, block: str) -> tvm.tirx.PrimFunc:
    """One thread per element: fuse every loop of ``block``, split by ``_THREADS``, bind to the grid."""
    sch = s_tir.Schedule(func)
    blk = sch.get_sblock(block)
    fused = sch.fuse(*sch.get_loops(blk))
    bx, tx = sch.split(fused, [None, _THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    return sch.mod["main"]


def _rotated(buf, b, n, base, d, half: int, cos, sin, p, dtype: str):
    """RoPE of element ``d`` of the head vector at ``buf[b, n, base : base + 2 * half]`` (transformers'
    ``x * cos + rotate_half(x) * sin`` with cos/sin tables of ``half`` columns), in float32."""
    i = T.if_then_else(d < half, d, d - half)
    x = T.Cast("float32", buf[b, n, base + d])
    other = T.if_then_else(d < half, -T.Cast("float32", buf[b, n, base + d + half]),
                           T.Cast("float32", buf[b, n, base + d - half]))
    return T.Cast(dtype, x * cos[p, i] + other * sin[p, i])


def rope_kv_append(num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int, max_context: int,
                   dtype: str, gpu: bool):
    """RoPE of q and k and the in-place KV append, one kernel (one thread per q/k element of a token).

    Buffers: ``cache [L, 2, B, KVH, C, D]`` (updated in place: the call's first output aliases it), ``qkv
    [B, N, (H + 2 KVH) D]`` (the fused projection, q | k | v heads), ``cos, sin [C, D/2] float32``,
    ``pos [B, N] int32``, scalar ``layer`` -> ``q [B, N, H, D]`` (rotated). Writes
    ``cache[layer, 0, b, h, pos[b, n]] = rope(k)`` and ``cache[layer, 1, b, h, pos[b, n]] = v``. ``B`` and ``N``
    are symbolic: one kernel for prefill and every decode batch. Positions are clamped to the cache (the
    runtime refuses prompts that do not fit before any kernel runs).
    """
    L, H, KVH, D, C, half = num_layers, num_heads, num_kv_heads, head_dim, max_context, head_dim // 2
    QKV = (num_heads + 2 * num_kv_heads) * head_dim

    @T.prim_func(private=True, s_tir=True)
    def kernel(cache_h: T.handle, qkv_h: T.handle, cos_h: T.handle, sin_h: T.handle, pos_h: T.handle,
               layer: T.int64, q_h: T.handle):
        B, N = T.int64(), T.int64()
        cache = T.match_buffer(cache_h, (L, 2, B, KVH, C, D), dtype)
        qkv = T.match_buffer(qkv_h, (B, N, QKV), dtype)
        cos = T.match_buffer(cos_h, (C, half), "float32")
        sin = T.match_buffer(sin_h, (C, half), "float32")
        pos = T.match_buffer(pos_h, (B, N), "int32")
        q = T.match_buffer(q_h, (B, N, H, D), dtype)
        for b, n, h, d in T.grid(B, N, T.int64(H + KVH), T.int64(D)):
            with T.sblock("rope_kv_append"):
                vb, vn, vh, vd = T.axis.remap("SSSS", [b, n, h, d])
                T.reads(qkv[vb, vn, 0:QKV], pos[vb, vn], cos[0:C, 0:half], sin[0:C, 0:half])
                T.writes(q[vb, vn, 0:H, vd], cache[layer, 0:2, vb, 0:KVH, 0:C, vd])
                p: T.let[T.int64] = T.Cast("int64", T.min(T.max(pos[vb, vn], 0), C - 1))
                # q heads and k heads are contiguous in qkv: head h (q: h < H, k: h - H) starts at h * D
                if vh < H:
                    q[vb, vn, vh, vd] = _rotated(qkv, vb, vn, vh * D, vd, half, cos, sin, p, dtype)
                else:
                    cache[layer, 0, vb, vh - H, p, vd] = _rotated(qkv, vb, vn, vh * D, vd, half, cos, sin, p, dtype)
                    cache[layer, 1, vb, vh - H, p, vd] = qkv[vb, vn, (KVH + vh) * D + vd]

    func = _schedule_elementwise(kernel, "rope_kv_append") if gpu else kernel
    return finish(func, "rope_kv_append", gpu)


def kv_read(num_layers: int, num_kv_heads: int, head_dim: int, max_context: int, dtype: str, gpu: bool):
    """Prefill's view of the cache: ``k, v [B, KVH, N, D] = cache[layer, 0/1, :, :, :N]`` (N from the outputs)."""
    L, KVH, D, C = num_layers, num_kv_heads, head_dim, max_context

    @T.prim_func(private=True, s_tir=True)
    def kernel(cache_h: T.handle, layer: T.int64, k_h: T.handle, v_h: T.handle):
        B, N = T.int64(), T.int64()
        cache = T.match_buffer(cache_h, (L, 2, B, KVH, C, D), dtype)
        k = T.match_buffer(k_h, (B, KVH, N, D), dtype)
        v = T.match_buffer(v_h, (B, KVH, N, D), dtype)
        for b, h, n, d in T.grid(B, T.int64(KVH), N, T.int64(D)):
            with T.sblock("kv_read"):
                vb, vh, vn, vd = T.axis.remap("SSSS", [b, h, n, d])
                T.reads(cache[layer, 0:2, vb, vh, vn, vd])
                T.writes(k[vb, vh, vn, vd], v[vb, vh, vn, vd])
                k[vb, vh, vn, vd] = cache[layer, 0, vb, vh, vn, vd]
                v[vb, vh, vn, vd] = cache[layer, 1, vb, vh, vn, vd]

    func = _schedule_elementwise(kernel, "kv_read") if gpu else kernel
    return finish(func, "kv_read", gpu)


def decode_attention_cpu(num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int, max_context: int,
                         dtype: str, splits: int):
    """Split-KV decode attention, partial pass (CPU): the same arithmetic as the GPU kernel, serial loops.

    For query head ``h`` of sequence ``b`` (one new token at position ``pos[b]``), keys ``0..pos[b]`` are
    cut into ``splits`` contiguous chunks; chunk ``s`` yields the online-softmax state of its keys:
    ``o_part[b, h, s] = sum_j 2^(s_j - m) v_j``, ``ml_part[b, h, s] = (m, sum_j 2^(s_j - m))`` with scores
    ``s_j = q . k_j / sqrt(D) * log2(e)``. An empty chunk yields ``(NEG_INF, 0)`` and zeros.
    """
    L, H, KVH, D, C, S = num_layers, num_heads, num_kv_heads, head_dim, max_context, splits
    G = num_heads // num_kv_heads
    scale = LOG2E / math.sqrt(head_dim)

    @T.prim_func(private=True, s_tir=True)
    def kernel(q_h: T.handle, cache_h: T.handle, pos_h: T.handle, layer: T.int64, o_h: T.handle, ml_h: T.handle):
        B = T.int64()
        q = T.match_buffer(q_h, (B, H, D), dtype)
        cache = T.match_buffer(cache_h, (L, 2, B, KVH, C, D), dtype)
        pos = T.match_buffer(pos_h, (B,), "int32")
        o_part = T.match_buffer(o_h, (B, H, S, D), "float32")
        ml_part = T.match_buffer(ml_h, (B, H, S, 2), "float32")
        for b, h, s in T.grid(B, T.int64(H), T.int64(S)):
            with T.sblock("partial"):
                vb, vh, vs = T.axis.remap("SSS", [b, h, s])
                T.reads(q[vb, vh, 0:D], cache[layer, 0:2, vb, vh // G, 0:C, 0:D], pos[vb])
                T.writes(o_part[vb, vh, vs, 0:D], ml_part[vb, vh, vs, 0:2])
                acc = T.sblock_alloc_buffer((D,), "float32")
                st = T.sblock_alloc_buffer((4,), "float32")  # m, l, score, new m
                length: T.let[T.int64] = T.Cast("int64", T.min(T.max(pos[vb], 0), C - 1)) + 1
                chunk: T.let[T.int64] = (length + S - 1) // S
                start: T.let[T.int64] = vs * chunk
                end: T.let[T.int64] = T.min(start + chunk, length)
                st[0] = T.float32(NEG_INF)
                st[1] = T.float32(0)
                for d in range(D):
                    acc[d] = T.float32(0)
                for j in range(T.max(end - start, T.int64(0))):
                    st[2] = T.float32(0)
                    for d in range(D):
                        st[2] = st[2] + T.Cast("float32", q[vb, vh, d]) * T.Cast(
                            "float32", cache[layer, 0, vb, vh // G, start + j, d])
                    st[2] = st[2] * T.float32(scale)
                    st[3] = T.max(st[0], st[2])
                    st[1] = st[1] * T.exp2(st[0] - st[3]) + T.exp2(st[2] - st[3])
                    for d in range(D):
                        acc[d] = acc[d] * T.exp2(st[0] - st[3]) + T.exp2(st[2] - st[3]) * T.Cast(
                            "float32", cache[layer, 1, vb, vh // G, start + j, d])
                    st[0] = st[3]
                for d in range(D):
                    o_part[vb, vh, vs, d] = acc[d]
                ml_part[vb, vh, vs, 0] = st[0]
                ml_part[vb, vh, vs, 1] = st[1]

    return finish(kernel, "decode_attn_partial", False)


def merge_attention_cpu(num_heads: int, head_dim: int, dtype: str, splits: int):
    """Combine the split states: ``out[b, h] = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s``, ``M = max m_s``."""
    H, D, S = num_heads, head_dim, splits

    @T.prim_func(private=True, s_tir=True)
    def kernel(o_h: T.handle, ml_h: T.handle, out_h: T.handle):
        B = T.int64()
        o_part = T.match_buffer(o_h, (B, H, S, D), "float32")
        ml_part = T.match_buffer(ml_h, (B, H, S, 2), "float32")
        out = T.match_buffer(out_h, (B, H, D), dtype)
        for b, h in T.grid(B, T.int64(H)):
            with T.sblock("merge"):
                vb, vh = T.axis.remap("SS", [b, h])
                T.reads(o_part[vb, vh, 0:S, 0:D], ml_part[vb, vh, 0:S, 0:2])
                T.writes(out[vb, vh, 0:D])
                st = T.sblock_alloc_buffer((2,), "float32")  # M, L
                acc = T.sblock_alloc_buffer((D,), "float32")
                st[0] = T.float32(NEG_INF)
                for s in range(S):
                    st[0] = T.max(st[0], ml_part[vb, vh, s, 0])
                st[1] = T.float32(0)
                for d in range(D):
                    acc[d] = T.float32(0)
                for s in range(S):
                    st[1] = st[1] + ml_part[vb, vh, s, 1] * T.exp2(ml_part[vb, vh, s, 0] - st[0])
                    for d in range(D):
                        acc[d] = acc[d] + o_part[vb, vh, s, d] * T.exp2(ml_part[vb, vh, s, 0] - st[0])
                for d in range(D):
                    out[vb, vh, d] = T.Cast(dtype, acc[d] / st[1])

    return finish(kernel, "decode_attn_merge", False)
