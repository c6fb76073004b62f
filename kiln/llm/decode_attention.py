"""Split-KV ("flash-decoding") attention of one new token per sequence over the static KV cache, for GPUs.

Two kernels per layer, both CUDA-graph friendly (static grid; the key count is read from ``pos`` on device):

* **partial** -- grid ``(batch * kv_heads, splits)``. The ``pos[b] + 1`` keys of a sequence are cut into
  ``splits`` contiguous chunks; a CTA handles one chunk for the ``G`` query heads that share a KV head.
  Threads are ``(lanes, keys_per_warp, warps)``: ``lanes = D / VEC`` threads split a key's head dim, each
  holding ``VEC`` elements (one 16-byte load), so a warp reads ``keys_per_warp`` whole, adjacent cache rows
  per load and every thread group streams its own keys. Each thread group loads ``unroll`` K and V rows
  before using them (bytes in flight), reduces the ``G`` dot products across its lanes with warp shuffles
  (``tvm_thread_allreduce``), and keeps an online softmax per query head (base 2, ``log2 e / sqrt(D)``
  folded into q). At the end the thread groups' states are combined through shared memory and the CTA
  writes ``o = sum 2^(s - m) v`` (unnormalised) and ``(m, l)`` of its chunk.
* **merge** -- grid ``batch * heads``, one thread per head-dim element: ``out = sum_s 2^(m_s - M) o_s /
  sum_s 2^(m_s - M) l_s``.

Out-of-range keys (the last step of a chunk) are loaded from a clamped, valid row and masked out of the
softmax, so neither garbage nor ``-inf - -inf`` reaches the arithmetic. The CPU build uses the serial
kernels of :mod:`kiln.llm.kernels`, which compute the same split states.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from tvm.script import tirx as T

from .kernels import LOG2E, NEG_INF, finish

__all__ = ["DecodeAttentionConfig", "SM90_DECODE_ATTENTION", "decode_attention_gpu", "decode_attention_kv_gpu",
           "merge_attention_gpu"]

_WARP = 32
_MAX_SMEM = 48 * 1024


@dataclass(frozen=True)
class DecodeAttentionConfig:
    """Tunables of the split-KV decode attention on one GPU architecture.

    Attributes
    ----------
    warps : int
        Warps per CTA of the partial kernel.
    unroll : int
        K/V rows each thread group loads before using them (loads in flight per thread: ``2 * unroll``).
    target_ctas : int
        Splits are chosen so that ``batch * kv_heads * splits`` reaches this (two waves of 132 SMs).
    max_splits : int
        Upper bound on splits (the merge reads ``splits`` partial states per output).
    min_keys_per_split : int
        A split covers at least this many keys of the compiled context (fewer splits for short caches).
    """

    warps: int = 4
    unroll: int = 4
    target_ctas: int = 264
    max_splits: int = 32
    min_keys_per_split: int = 64

    def splits(self, batch: int, num_kv_heads: int, max_context: int) -> int:
        """Number of KV chunks per sequence for a decode step of ``batch`` sequences."""
        want = -(-self.target_ctas // (batch * num_kv_heads))
        return max(1, min(want, self.max_splits, max_context // self.min_keys_per_split))

    def layout(self, head_dim: int, group: int, dtype: str) -> dict:
        """Thread layout for a head dim / group size / dtype, or ``{"declined": reason}``."""
        elem = {"float16": 2, "bfloat16": 2, "float32": 4}.get(dtype)
        if elem is None:
            return {"declined": f"dtype {dtype!r} is not float16/bfloat16/float32"}
        vec = 16 // elem
        if head_dim % vec or _WARP % (head_dim // vec):
            return {"declined": f"head_dim {head_dim} is not {vec} x a divisor of 32 (16-byte lanes, whole warps)"}
        lanes = head_dim // vec
        kpw = _WARP // lanes
        warps = self.warps
        while warps > 1 and self._smem(kpw * warps, group, head_dim) > _MAX_SMEM:
            warps //= 2
        if self._smem(kpw * warps, group, head_dim) > _MAX_SMEM:
            return {"declined": f"group size {group} x head_dim {head_dim} needs more than 48 KB of shared memory"}
        return {"vec": vec, "lanes": lanes, "keys_per_warp": kpw, "warps": warps, "unroll": self.unroll}

    @staticmethod
    def _smem(groups: int, group: int, head_dim: int) -> int:
        return groups * group * (head_dim + 2) * 4

    def to_json(self) -> dict:
        return asdict(self)


#: Hopper (H100/H200, 132 SMs).
SM90_DECODE_ATTENTION = DecodeAttentionConfig()


def _layout(num_heads: int, num_kv_heads: int, head_dim: int, dtype: str, cfg: DecodeAttentionConfig) -> dict:
    lay = cfg.layout(head_dim, num_heads // num_kv_heads, dtype)
    if "declined" in lay:
        raise NotImplementedError(f"decode attention on GPU: {lay['declined']}")
    return lay


def _partial_macro(H: int, KVH: int, D: int, S: int, dtype: str, lay: dict, scale: float):
    """The partial kernel's body, shared by the cache-layout kernel (kiln.llm) and the separate-K/V one
    (``kiln.ops.decode_attention``). It reads ``q``, ``o_part``, ``ml_part`` and the thread/block indices of
    its call site (passed in); ``k_at``/``v_at(b, kvh, j, d)`` load one cache element and ``n_keys(b)`` is the number of
    valid keys of sequence ``b`` (0 allowed: the split then writes ``m = NEG_INF``, ``l = 0``)."""
    G = H // KVH
    VEC, LD, KPW, W, U = lay["vec"], lay["lanes"], lay["keys_per_warp"], lay["warps"], lay["unroll"]
    NG = KPW * W            # thread groups (one key each per load step)
    KS = U * NG             # keys per CTA step
    NT = LD * NG            # threads per CTA

    @T.macro
    def attn(q, o_part, ml_part, bx, sy, tz, ty, tx, k_at, v_at, n_keys):
        q_loc = T.sblock_alloc_buffer((G * VEC,), "float32", scope="local")
        o_loc = T.sblock_alloc_buffer((G * VEC,), "float32", scope="local")
        m_loc = T.sblock_alloc_buffer((G,), "float32", scope="local")
        l_loc = T.sblock_alloc_buffer((G,), "float32", scope="local")
        k_loc = T.sblock_alloc_buffer((U * VEC,), dtype, scope="local")
        v_loc = T.sblock_alloc_buffer((U * VEC,), dtype, scope="local")
        s_loc = T.sblock_alloc_buffer((U * G,), "float32", scope="local")
        red = T.sblock_alloc_buffer((1,), "float32", scope="local")
        red_out = T.sblock_alloc_buffer((1,), "float32", scope="local")
        tmp = T.sblock_alloc_buffer((3,), "float32", scope="local")  # new m, alpha, p
        sm_o = T.sblock_alloc_buffer((NG, G, D), "float32", scope="shared")
        sm_ml = T.sblock_alloc_buffer((NG, G, 2), "float32", scope="shared")

        b: T.let[T.int64] = bx // KVH
        kvh: T.let[T.int64] = bx % KVH
        grp: T.let[T.int64] = tz * KPW + ty
        length: T.let[T.int64] = n_keys(b)
        chunk: T.let[T.int64] = (length + S - 1) // S
        start: T.let[T.int64] = sy * chunk
        end: T.let[T.int64] = T.min(start + chunk, length)
        steps: T.let[T.int64] = (T.max(end - start, T.int64(0)) + KS - 1) // KS

        for g in T.unroll(G):
            for e in T.unroll(VEC):
                q_loc[g * VEC + e] = T.Cast("float32", q[b, kvh * G + g, tx * VEC + e]) * T.float32(scale)
            for e in T.unroll(VEC):
                o_loc[g * VEC + e] = T.float32(0)
            m_loc[g] = T.float32(NEG_INF)
            l_loc[g] = T.float32(0)

        for it in T.serial(steps):
            for u in T.unroll(U):
                for e in T.vectorized(VEC):
                    k_loc[u * VEC + e] = k_at(b, kvh, T.min(start + it * KS + u * NG + grp, end - 1), tx * VEC + e)
                for e in T.vectorized(VEC):
                    v_loc[u * VEC + e] = v_at(b, kvh, T.min(start + it * KS + u * NG + grp, end - 1), tx * VEC + e)
            # one allreduce per (key, head). The loop is unrolled by nvcc (#pragma unroll),
            # not by TVM: the allreduce lowering cannot take several copies of one buffer.
            for ug in T.unroll(U * G, annotations={"pragma_unroll_explicit": 0}):
                red[0] = T.float32(0)
                for e in T.unroll(VEC):
                    red[0] = red[0] + q_loc[ug % G * VEC + e] * T.Cast("float32", k_loc[ug // G * VEC + e])
                with T.sblock("score_allreduce"):
                    T.reads(red[0])
                    T.writes(red_out[0])
                    T.attr(T.comm_reducer(lambda x0, y0: x0 + y0, [T.float32(0)]),
                           "reduce_scope", T.reinterpret("handle", T.uint64(0)))
                    T.tvm_thread_allreduce(T.uint32(1), red[0], True, red_out[0], tx, dtype="void")
                s_loc[ug // G * G + ug % G] = T.if_then_else(start + it * KS + ug // G * NG + grp < end, red_out[0], T.float32(NEG_INF))
            for g in T.unroll(G):
                tmp[0] = m_loc[g]
                for u in T.unroll(U):
                    tmp[0] = T.max(tmp[0], s_loc[u * G + g])
                tmp[1] = T.exp2(m_loc[g] - tmp[0])
                l_loc[g] = l_loc[g] * tmp[1]
                for e in T.unroll(VEC):
                    o_loc[g * VEC + e] = o_loc[g * VEC + e] * tmp[1]
                for u in T.unroll(U):
                    tmp[2] = T.if_then_else(start + it * KS + u * NG + grp < end, T.exp2(s_loc[u * G + g] - tmp[0]), T.float32(0))
                    l_loc[g] = l_loc[g] + tmp[2]
                    for e in T.unroll(VEC):
                        o_loc[g * VEC + e] = o_loc[g * VEC + e] + tmp[2] * T.Cast("float32", v_loc[u * VEC + e])
                m_loc[g] = tmp[0]

        # combine the NG thread groups' states of this CTA
        for g in T.unroll(G):
            for e in T.unroll(VEC):
                sm_o[grp, g, tx * VEC + e] = o_loc[g * VEC + e]
            if tx == 0:
                sm_ml[grp, g, 0] = m_loc[g]
                sm_ml[grp, g, 1] = l_loc[g]
        T.tvm_storage_sync("shared")
        for r in T.serial((G * D + NT - 1) // NT):
            if r * NT + grp * LD + tx < G * D:
                tmp[0] = T.float32(NEG_INF)
                for k in T.serial(NG):
                    tmp[0] = T.max(tmp[0], sm_ml[k, (r * NT + grp * LD + tx) // D, 0])
                tmp[1] = T.float32(0)
                tmp[2] = T.float32(0)
                for k in T.serial(NG):
                    tmp[1] = tmp[1] + sm_ml[k, (r * NT + grp * LD + tx) // D, 1] * T.exp2(sm_ml[k, (r * NT + grp * LD + tx) // D, 0] - tmp[0])
                    tmp[2] = tmp[2] + sm_o[k, (r * NT + grp * LD + tx) // D, (r * NT + grp * LD + tx) % D] * T.exp2(sm_ml[k, (r * NT + grp * LD + tx) // D, 0] - tmp[0])
                o_part[b, kvh * G + (r * NT + grp * LD + tx) // D, sy, (r * NT + grp * LD + tx) % D] = tmp[2]
                if (r * NT + grp * LD + tx) % D == 0:
                    ml_part[b, kvh * G + (r * NT + grp * LD + tx) // D, sy, 0] = tmp[0]
                    ml_part[b, kvh * G + (r * NT + grp * LD + tx) // D, sy, 1] = tmp[1]

    return attn


def decode_attention_gpu(num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int, max_context: int,
                         dtype: str, splits: int, cfg: DecodeAttentionConfig = SM90_DECODE_ATTENTION):
    """The partial kernel (see the module docstring).

    Buffers: ``q [B, H, D]`` (RoPE applied), ``cache [L, 2, B, KVH, C, D]``, ``pos [B] int32``, scalar
    ``layer`` -> ``o_part [B, H, S, D] float32``, ``ml_part [B, H, S, 2] float32``.

    Raises
    ------
    NotImplementedError
        The head dim / group size has no thread layout (the reason is in the message).
    """
    L, H, KVH, D, C, S = num_layers, num_heads, num_kv_heads, head_dim, max_context, splits
    lay = _layout(H, KVH, D, dtype, cfg)
    W, KPW, LD = lay["warps"], lay["keys_per_warp"], lay["lanes"]
    attn = _partial_macro(H, KVH, D, S, dtype, lay, LOG2E / math.sqrt(head_dim))

    @T.prim_func(private=True, s_tir=True)
    def kernel(q_h: T.handle, cache_h: T.handle, pos_h: T.handle, layer: T.int64, o_h: T.handle, ml_h: T.handle):
        B = T.int64()
        q = T.match_buffer(q_h, (B, H, D), dtype)
        cache = T.match_buffer(cache_h, (L, 2, B, KVH, C, D), dtype)
        pos = T.match_buffer(pos_h, (B,), "int32")
        o_part = T.match_buffer(o_h, (B, H, S, D), "float32")
        ml_part = T.match_buffer(ml_h, (B, H, S, 2), "float32")
        for bx in T.thread_binding(B * KVH, thread="blockIdx.x"):
            for sy in T.thread_binding(T.int64(S), thread="blockIdx.y"):
                for tz in T.thread_binding(T.int64(W), thread="threadIdx.z"):
                    for ty in T.thread_binding(T.int64(KPW), thread="threadIdx.y"):
                        for tx in T.thread_binding(T.int64(LD), thread="threadIdx.x"):
                            with T.sblock("attn"):
                                T.reads(q[0:B, 0:H, 0:D], cache[layer, 0:2, 0:B, 0:KVH, 0:C, 0:D], pos[0:B])
                                T.writes(o_part[0:B, 0:H, 0:S, 0:D], ml_part[0:B, 0:H, 0:S, 0:2])
                                attn(q, o_part, ml_part, bx, sy, tz, ty, tx,
                                     lambda b, h, j, d: cache[layer, 0, b, h, j, d],
                                     lambda b, h, j, d: cache[layer, 1, b, h, j, d],
                                     lambda b: T.Cast("int64", T.min(T.max(pos[b], 0), C - 1)) + 1)

    return finish(kernel, "decode_attn_partial", True)


def decode_attention_kv_gpu(num_heads: int, num_kv_heads: int, head_dim: int, capacity: int, dtype: str,
                            splits: int, scale: float, cfg: DecodeAttentionConfig = SM90_DECODE_ATTENTION):
    """The partial kernel over separate caches (``kiln.ops.decode_attention``'s layout).

    Buffers: ``q [B, H, D]``, ``k [B, KVH, C, D]``, ``v [B, KVH, C, D]``, ``seq_lens [B] int32`` (valid keys,
    clamped to ``[0, C]``) -> ``o_part``, ``ml_part`` as in :func:`decode_attention_gpu`. ``scale`` is the
    softmax scale (``log2 e`` is folded in here).

    Raises
    ------
    NotImplementedError
        The head dim / group size has no thread layout (the reason is in the message).
    """
    H, KVH, D, C, S = num_heads, num_kv_heads, head_dim, capacity, splits
    lay = _layout(H, KVH, D, dtype, cfg)
    W, KPW, LD = lay["warps"], lay["keys_per_warp"], lay["lanes"]
    attn = _partial_macro(H, KVH, D, S, dtype, lay, LOG2E * scale)

    @T.prim_func(private=True, s_tir=True)
    def kernel(q_h: T.handle, k_h: T.handle, v_h: T.handle, lens_h: T.handle, o_h: T.handle, ml_h: T.handle):
        B = T.int64()
        q = T.match_buffer(q_h, (B, H, D), dtype)
        k = T.match_buffer(k_h, (B, KVH, C, D), dtype)
        v = T.match_buffer(v_h, (B, KVH, C, D), dtype)
        seq_lens = T.match_buffer(lens_h, (B,), "int32")
        o_part = T.match_buffer(o_h, (B, H, S, D), "float32")
        ml_part = T.match_buffer(ml_h, (B, H, S, 2), "float32")
        for bx in T.thread_binding(B * KVH, thread="blockIdx.x"):
            for sy in T.thread_binding(T.int64(S), thread="blockIdx.y"):
                for tz in T.thread_binding(T.int64(W), thread="threadIdx.z"):
                    for ty in T.thread_binding(T.int64(KPW), thread="threadIdx.y"):
                        for tx in T.thread_binding(T.int64(LD), thread="threadIdx.x"):
                            with T.sblock("attn"):
                                T.reads(q[0:B, 0:H, 0:D], k[0:B, 0:KVH, 0:C, 0:D], v[0:B, 0:KVH, 0:C, 0:D],
                                        seq_lens[0:B])
                                T.writes(o_part[0:B, 0:H, 0:S, 0:D], ml_part[0:B, 0:H, 0:S, 0:2])
                                attn(q, o_part, ml_part, bx, sy, tz, ty, tx,
                                     lambda b, h, j, d: k[b, h, j, d], lambda b, h, j, d: v[b, h, j, d],
                                     lambda b: T.Cast("int64", T.min(T.max(seq_lens[b], 0), C)))

    return finish(kernel, "decode_attn_partial_kv", True)

def merge_attention_gpu(num_heads: int, head_dim: int, dtype: str, splits: int, empty_is_zero: bool = False):
    """The merge kernel: ``o_part [B, H, S, D]``, ``ml_part [B, H, S, 2]`` -> ``out [B, H, D]`` in ``dtype``.

    ``empty_is_zero``: a row with no valid key at all (``l = 0`` in every split, which kiln.llm's cache never
    has) gives 0 instead of ``0 / 0``."""
    H, D, S = num_heads, head_dim, splits

    @T.prim_func(private=True, s_tir=True)
    def kernel(o_h: T.handle, ml_h: T.handle, out_h: T.handle):
        B = T.int64()
        o_part = T.match_buffer(o_h, (B, H, S, D), "float32")
        ml_part = T.match_buffer(ml_h, (B, H, S, 2), "float32")
        out = T.match_buffer(out_h, (B, H, D), dtype)
        for bx in T.thread_binding(B * H, thread="blockIdx.x"):
            for tx in T.thread_binding(T.int64(D), thread="threadIdx.x"):
                with T.sblock("merge"):
                    T.reads(o_part[bx // H, bx % H, 0:S, tx], ml_part[bx // H, bx % H, 0:S, 0:2])
                    T.writes(out[bx // H, bx % H, tx])
                    st = T.sblock_alloc_buffer((3,), "float32", scope="local")  # M, L, acc
                    st[0] = T.float32(NEG_INF)
                    for s in T.serial(S):
                        st[0] = T.max(st[0], ml_part[bx // H, bx % H, s, 0])
                    st[1] = T.float32(0)
                    st[2] = T.float32(0)
                    for s in T.serial(S):
                        st[1] = st[1] + ml_part[bx // H, bx % H, s, 1] * T.exp2(ml_part[bx // H, bx % H, s, 0] - st[0])
                        st[2] = st[2] + o_part[bx // H, bx % H, s, tx] * T.exp2(ml_part[bx // H, bx % H, s, 0] - st[0])
                    if empty_is_zero:
                        out[bx // H, bx % H, tx] = T.Cast(dtype, T.if_then_else(st[1] > T.float32(0), st[2] / st[1], T.float32(0)))
                    else:
                        out[bx // H, bx % H, tx] = T.Cast(dtype, st[2] / st[1])

    return finish(kernel, "decode_attn_merge", True)
