"""The TIRx kernel of kiln's decode GEMV: ``Y[M,N] = epilogue((X[M,K] @ W[N,K]^T) [* scale[n]])``, M <= 16.

Decode is a weight stream: every weight byte is read once, so the kernel is built around keeping
enough bytes in flight, and the arithmetic goes to the tensor cores where it costs nothing.

* **Tensor cores for any M <= 16.** Each warp runs ``mma.sync.m16n8k16`` (f32 accumulate) with X as
  the A operand (rows >= M are zero registers, so M = 1..16 cost the same) and 8 weight rows as B.
  The reduction over k does not care in which order the k's are summed, so the k's are *permuted*
  so that both operands come straight out of 16-byte loads: lane ``l`` (``g = l/4``, ``q = l%4``)
  loads ``W[n0+g, k0+q*E : +E]`` (E = 8 fp16/bf16 or 16 fp8 elements) and ``X[g (and g+8), k0+q*E
  : +E]``; mma step ``s`` takes elements ``4s..4s+3`` of both as its k-pairs ``(2q, 2q+1)`` and
  ``(2q+8, 2q+9)``. One 16-byte weight load per lane feeds E/4 mma steps with no shuffles.
* **fp8 e4m3 weights** are converted in registers (``cvt.rn.f16x2.e4m3x2``, exact) to f16 pairs
  (bf16 activations: through f32 to bf16, also exact); the per-channel scale is applied to the
  fp32 sum in the epilogue.
* **Bytes in flight.** A CTA of ``warps`` warps (1 CTA per SM, ``__launch_bounds__(threads, 1)``)
  owns a contiguous range of 8-row groups and walks them in batches of ``rows`` groups; inside a
  batch the warps split K (chunk ``c`` of 4E k's goes to warp ``c % warps``, so at any time a CTA
  reads one contiguous span of each row). Two load paths (``cfg.stages``):

  - registers (``stages == 0``): each lane issues ``rows * unroll`` independent 16-byte weight loads
    (``ld.global.nc.L1::no_allocate``) and its X loads (L1-cached: every group of the CTA reads the
    same X) before the first mma of the trip. Whether ptxas keeps them all up front is checked in
    the SASS (it does for fp16/bf16; for fp8 it interleaves once a trip has more than ~8).
  - cp.async ring (``stages >= 2``): each warp copies its trips global -> shared memory with
    ``cp.async`` (weights ``.cg`` + L2 prefetch, X ``.ca``) into a private ring of ``stages`` trips,
    always ``stages - 1`` trips ahead of the one it computes; each lane reads back exactly the bytes
    it copied (``ld.shared.v4``), so no barrier is needed, and the depth in flight does not depend on
    ptxas scheduling.
* **Reduction and epilogue.** Each warp writes its fp32 partial sums (M rows x 8 columns per group)
  to its own shared-memory slot; after a CTA barrier the threads sum the ``warps`` slots in a fixed
  order (deterministic), apply the scale and the epilogue stages and store column pairs. One slot per
  batch and one barrier at the end, or (cp.async path short of shared memory) two alternating slots
  reduced batch by batch while the ring's copies stay in flight.

Tails: K (any multiple of 8) and the chunk count are handled by predicated loads that zero-fill;
N needs no tail code (a multiple of 8 is whole row groups); a CTA's last partial batch has its
missing groups predicated off.
"""
from __future__ import annotations

from typing import Callable

import tvm
from tvm.script import tirx as T

__all__ = ["build_gemv_kernel", "gemv_smem_bytes", "CUDA_HELPERS"]

# 16-byte weight load: read-only path, no L1 allocation (weights are streamed once), optional L2
# prefetch hint (the CTA's warps read adjacent 64-byte pieces of the same row). Zero when ``pred`` is 0.
def _ldw_helper(l2_prefetch: int) -> tuple[str, str]:
    hint = f".L2::{l2_prefetch}B" if l2_prefetch else ""
    name = f"kiln_ldw16_p{l2_prefetch}"
    src = f"""
__forceinline__ __device__ void {name}(unsigned& a, unsigned& b, unsigned& c, unsigned& d,
                                           const void* p, int pred) {{
  asm volatile("{{\\n .reg .pred p;\\n setp.ne.b32 p, %5, 0;\\n"
               " mov.b32 %0, 0;\\n mov.b32 %1, 0;\\n mov.b32 %2, 0;\\n mov.b32 %3, 0;\\n"
               " @p ld.global.nc.L1::no_allocate{hint}.v4.u32 {{%0, %1, %2, %3}}, [%4];\\n}}"
               : "=r"(a), "=r"(b), "=r"(c), "=r"(d) : "l"(p), "r"(pred));
}}
"""
    return name, src


# The same 16 bytes as two 8-byte loads (fp8 rows with K % 16 == 8 are only 8-byte aligned; each half
# has its own K-tail predicate).
_LDW8_SRC = """
__forceinline__ __device__ void kiln_ldw8x2(unsigned& a, unsigned& b, unsigned& c, unsigned& d,
                                            const void* p, int pred0, int pred1) {
  asm volatile("{\\n .reg .pred p, q;\\n setp.ne.b32 p, %5, 0;\\n setp.ne.b32 q, %6, 0;\\n"
               " mov.b32 %0, 0;\\n mov.b32 %1, 0;\\n mov.b32 %2, 0;\\n mov.b32 %3, 0;\\n"
               " @p ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%4];\\n"
               " @q ld.global.nc.L1::no_allocate.v2.u32 {%2, %3}, [%4+8];\\n}"
               : "=r"(a), "=r"(b), "=r"(c), "=r"(d) : "l"(p), "r"(pred0), "r"(pred1));
}
"""
# 16-byte activation load: read-only path, L1-cached (every row group of the CTA reads the same X).
_LDX_SRC = """
__forceinline__ __device__ void kiln_ldx16(unsigned& a, unsigned& b, unsigned& c, unsigned& d,
                                           const void* p, int pred) {
  asm volatile("{\\n .reg .pred p;\\n setp.ne.b32 p, %5, 0;\\n"
               " mov.b32 %0, 0;\\n mov.b32 %1, 0;\\n mov.b32 %2, 0;\\n mov.b32 %3, 0;\\n"
               " @p ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\\n}"
               : "=r"(a), "=r"(b), "=r"(c), "=r"(d) : "l"(p), "r"(pred));
}
"""
_MMA_SRC = {
    "float16": """
__forceinline__ __device__ void kiln_mma16816_f16(float& d0, float& d1, float& d2, float& d3,
    unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
""",
    "bfloat16": """
__forceinline__ __device__ void kiln_mma16816_bf16(float& d0, float& d1, float& d2, float& d3,
    unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
""",
}
_MMA_NAME = {"float16": "kiln_mma16816_f16", "bfloat16": "kiln_mma16816_bf16"}
# 4 fp8 e4m3 (one 32-bit word, element 0 in the low byte) -> two f16x2 words (elements 0,1 and 2,3).
# Every e4m3 value is exact in f16 (and in bf16).
_CVT_SRC = {
    "float16": """
__forceinline__ __device__ void kiln_e4m3x4_to_f16x4(unsigned& lo, unsigned& hi, unsigned v) {
  asm("{ .reg .b16 l, h;\\n mov.b32 {l, h}, %2;\\n cvt.rn.f16x2.e4m3x2 %0, l;\\n cvt.rn.f16x2.e4m3x2 %1, h;\\n}"
      : "=r"(lo), "=r"(hi) : "r"(v));
}
""",
    "bfloat16": """
__forceinline__ __device__ unsigned kiln_f16x2_to_bf16x2(unsigned h2) {
  unsigned r;
  asm("{ .reg .f16 a, b;\\n .reg .f32 fa, fb;\\n mov.b32 {a, b}, %1;\\n cvt.f32.f16 fa, a;\\n cvt.f32.f16 fb, b;\\n"
      " cvt.rn.bf16x2.f32 %0, fb, fa;\\n}" : "=r"(r) : "r"(h2));
  return r;
}
__forceinline__ __device__ void kiln_e4m3x4_to_bf16x4(unsigned& lo, unsigned& hi, unsigned v) {
  unsigned l2, h2;
  asm("{ .reg .b16 l, h;\\n mov.b32 {l, h}, %2;\\n cvt.rn.f16x2.e4m3x2 %0, l;\\n cvt.rn.f16x2.e4m3x2 %1, h;\\n}"
      : "=r"(l2), "=r"(h2) : "r"(v));
  lo = kiln_f16x2_to_bf16x2(l2);
  hi = kiln_f16x2_to_bf16x2(h2);
}
""",
}
_CVT_NAME = {"float16": "kiln_e4m3x4_to_f16x4", "bfloat16": "kiln_e4m3x4_to_bf16x4"}
_STORE2_SRC = {
    "float16": """
__forceinline__ __device__ void kiln_gemv_store2_f16(void* p, float a, float b) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
}
""",
    "bfloat16": """
__forceinline__ __device__ void kiln_gemv_store2_bf16(void* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}
""",
}
_STORE2_NAME = {"float16": "kiln_gemv_store2_f16", "bfloat16": "kiln_gemv_store2_bf16"}


# ---- cp.async path (``stages`` > 0): weight and X pieces go global -> shared memory asynchronously,
# so the bytes in flight are set by the ring depth, not by how ptxas schedules register loads.
# Predicated-off pieces are zero-filled (src-size 0) from a safe in-bounds address.
def _cpw_helper(l2_prefetch: int) -> tuple[str, str]:
    hint = f".L2::{l2_prefetch}B" if l2_prefetch else ""
    name = f"kiln_cp16_w_p{l2_prefetch}"
    src = f"""
__forceinline__ __device__ void {name}(void* dst, const void* src, const void* safe, int pred) {{
  unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const void* s = pred ? src : safe;
  asm volatile("cp.async.cg.shared.global{hint} [%0], [%1], 16, %2;" :: "r"(d), "l"(s), "r"(pred ? 16 : 0) : "memory");
}}
"""
    return name, src


_CPX_SRC = """
__forceinline__ __device__ void kiln_cp16_x(void* dst, const void* src, const void* safe, int pred) {
  unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const void* s = pred ? src : safe;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;" :: "r"(d), "l"(s), "r"(pred ? 16 : 0) : "memory");
}
"""
_CPW8_SRC = """
__forceinline__ __device__ void kiln_cp8x2_w(void* dst, const void* src, const void* safe, int pred0, int pred1) {
  unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const char* s0 = pred0 ? static_cast<const char*>(src) : static_cast<const char*>(safe);
  const char* s1 = pred1 ? static_cast<const char*>(src) + 8 : static_cast<const char*>(safe);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" :: "r"(d), "l"(s0), "r"(pred0 ? 8 : 0) : "memory");
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" :: "r"(d + 8), "l"(s1), "r"(pred1 ? 8 : 0) : "memory");
}
"""
_COMMIT_SRC = """
__forceinline__ __device__ void kiln_cp_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
"""


def _wait_helper(n: int) -> tuple[str, str]:
    name = f"kiln_cp_wait_{n}"
    return name, f"""
__forceinline__ __device__ void {name}() {{
  asm volatile("cp.async.wait_group {n};" ::: "memory");
}}
"""


_LDS_SRC = """
__forceinline__ __device__ void kiln_lds16(unsigned& a, unsigned& b, unsigned& c, unsigned& d, void* p) {
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(a), "=r"(b), "=r"(c), "=r"(d) : "r"(s) : "memory");
}
"""
CUDA_HELPERS = ("kiln_ldw16_p*", "kiln_ldw8x2", "kiln_ldx16", "kiln_cp16_w_p*", "kiln_cp16_x", "kiln_cp8x2_w",
                "kiln_cp_commit", "kiln_cp_wait_*", "kiln_lds16", "kiln_mma16816_f16", "kiln_mma16816_bf16",
                "kiln_e4m3x4_to_f16x4", "kiln_e4m3x4_to_bf16x4", "kiln_gemv_store2_f16", "kiln_gemv_store2_bf16")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemv_smem_bytes(M: int, weight_dtype: str, cfg, groups_per_cta: int,
                    total_budget: int = 200 * 1024) -> tuple[int, int, int]:
    """(partial-sum bytes, cp.async ring bytes, partial-sum slots) of one CTA's shared memory.

    One slot per batch (the warps' partials of all batches are kept and summed once at the end, one
    CTA barrier) unless the cp.async ring leaves too little room within ``total_budget``; then two
    slots, reduced batch by batch (one barrier per batch, the ring's copies stay in flight)."""
    fp8 = weight_dtype == "float8_e4m3fn"
    batches = _cdiv(groups_per_cta, cfg.rows)
    slot = cfg.rows * cfg.warps * M * 8 * 4
    pieces = cfg.rows * cfg.unroll + cfg.unroll * (2 if M > 8 else 1) * (2 if fp8 else 1)
    ring = cfg.warps * cfg.stages * pieces * 512 if cfg.stages else 0
    slots = batches if not cfg.stages or batches * slot + ring <= total_budget else min(batches, 2)
    return slots * slot, ring, slots


def build_gemv_kernel(M: int, N: int, K: int, dtype: str, weight_dtype: str, cfg, groups_per_cta: int,
                      apply_epilogue: Callable, has_bias: bool, has_residual: bool,
                      name: str = "kiln_gemv_sm90") -> tvm.tirx.PrimFunc:
    """The PrimFunc ``(X[M,K], W[N,K], [scale[N]], [bias[N]], [residual[M,N]], Y[M,N])``.

    ``weight_dtype`` is ``dtype`` or ``"float8_e4m3fn"`` (then the fp32 ``scale`` is a parameter).
    ``cfg`` (a ``GemvConfig``) gives ``warps`` (K split), ``rows`` (8-row groups per batch),
    ``unroll`` (chunks per lane and loop trip), ``stages`` (0: 16-byte loads straight into
    registers; >= 2: a cp.async shared-memory ring of that many trips per warp) and
    ``l2_prefetch``; each CTA owns ``groups_per_cta`` 8-row groups (grid ``ceil(N/8 / groups_per_cta)``).
    ``apply_epilogue(x, bias, residual) -> PrimExpr`` maps one fp32 value (after the scale) to the
    value stored. Validity of the arguments is the caller's job (``GemvConfig.check``).
    """
    fp8 = weight_dtype == "float8_e4m3fn"
    NW, R, U, RG, S = cfg.warps, cfg.rows, cfg.unroll, groups_per_cta, cfg.stages
    NT = 32 * NW
    G = N // 8                                   # 8-row groups
    GRID = _cdiv(G, RG)
    NB = _cdiv(RG, R)                            # batches per CTA
    E = 16 if fp8 else 8                         # weight elements per 16-byte lane load
    CH = 4 * E                                   # k's per chunk (4 lanes of a row)
    C = _cdiv(K, CH)                             # chunks along K
    ITERS = _cdiv(_cdiv(C, NW), U)               # loop trips per warp per batch
    TRIPS = NB * ITERS                           # trips per warp (cp.async path: one pipeline over all)
    XV = E // 8                                  # 16-byte X loads per row half per chunk
    XR = 4 * XV                                  # X registers per row half per chunk
    XH = 2 if M > 8 else 1                       # live row halves of the A operand (rows 0-7, 8-15)
    HI = M > 8
    STEPS = E // 4                               # mma k16 steps per chunk
    SLOT = M * 8                                 # floats of one warp's partial of one group
    PART_B, RING_B, SLOTS = gemv_smem_bytes(M, weight_dtype, cfg, RG)
    PER_BATCH = SLOTS < NB                       # cp.async path short of shared memory: reduce per batch
    SMEM_B = PART_B + RING_B
    PIECES = R * U + U * XH * XV                 # 512-byte pieces (16 B per lane) per warp per trip
    XP0 = R * U                                  # first X piece
    EP = RG * M * 4                              # epilogue items (column pairs) per CTA (register path)
    EP_IT = _cdiv(EP, NT)
    BEP = R * M * 4                              # ... per batch (when reduced batch by batch)
    BEP_IT = _cdiv(BEP, NT)
    split8 = fp8 and K % 16 != 0                 # fp8 rows only 8-byte aligned: two 8-byte loads
    if S:
        ldw, ldw_src = ("kiln_cp8x2_w", _CPW8_SRC) if split8 else _cpw_helper(cfg.l2_prefetch)
        wait, wait_src = _wait_helper(S - 1)
    else:
        ldw, ldw_src = ("kiln_ldw8x2", _LDW8_SRC) if split8 else _ldw_helper(cfg.l2_prefetch)
        wait, wait_src = None, None
    ldx_src, cpx_src, commit_src, lds_src = _LDX_SRC, _CPX_SRC, _COMMIT_SRC, _LDS_SRC
    mma, mma_src = _MMA_NAME[dtype], _MMA_SRC[dtype]
    cvt, cvt_src = _CVT_NAME[dtype], _CVT_SRC[dtype]
    store2, store2_src = _STORE2_NAME[dtype], _STORE2_SRC[dtype]
    all_ = tvm.tirx.all

    def i32(cond):
        return T.Cast("int32", cond)

    def epi(x, n, m, scale_buf, bias_buf, res_buf):
        if fp8:
            x = x * scale_buf[n]
        b = T.Cast("float32", bias_buf[n]) if has_bias else None
        r = T.Cast("float32", res_buf[m, n]) if has_residual else None
        return apply_epilogue(x, b, r)

    # index helpers (PrimExprs): ring: u32 index of this lane's 16 bytes of ``piece`` in ring stage
    # ``stage`` of warp ``warp``; part: float index of a warp's partial sum (slot, group r of the batch,
    # row m, column); W pieces are ``r * U + u``, X pieces follow from XP0; X registers of (u, h, v).
    def ring_at(warp, lane, stage, piece):
        return ((warp * S + stage) * PIECES + piece) * 128 + lane * 4

    def part_at(slot, warp, r, m, col):
        return (((slot * NW + warp) * R + r) * M + m) * 8 + col

    def xpiece(u, h, v):
        return XP0 + (u * XH + h) * XV + v

    def xreg(u, h, v):
        return (u * 2 + h) * XR + 4 * v

    def w_ok(k, g0, grp):                        # weight piece in range: k < K, group in this CTA and in N
        return i32(all_(k < K, grp < RG, g0 + grp < G))

    def x_ok(k, row):
        return i32(all_(k < K, row < M))

    @T.macro
    def dot_trip(acc, xr, wr, wc):
        # tensor-core dot products of one trip: mma step s takes elements 4s..4s+3 of the lane's X and W
        for u in T.unroll(U):
            for r in T.unroll(R):
                if fp8:
                    for j in T.unroll(4):
                        T.cuda.func_call(cvt, wc[2 * j], wc[2 * j + 1], wr[(r * U + u) * 4 + j], source_code=cvt_src)
                for s in T.unroll(STEPS):
                    T.cuda.func_call(
                        mma, acc[4 * r], acc[4 * r + 1], acc[4 * r + 2], acc[4 * r + 3],
                        xr[xreg(u, 0, 0) + 2 * s], xr[xreg(u, 1, 0) + 2 * s] if HI else T.uint32(0),
                        xr[xreg(u, 0, 0) + 2 * s + 1], xr[xreg(u, 1, 0) + 2 * s + 1] if HI else T.uint32(0),
                        wc[2 * s] if fp8 else wr[(r * U + u) * 4 + 2 * s],
                        wc[2 * s + 1] if fp8 else wr[(r * U + u) * 4 + 2 * s + 1], source_code=mma_src)

    @T.macro
    def flush_batch(part, acc, slot, warp, g8, q):
        # this warp's partial sums of a batch -> its own slot (rows < M only); restart the accumulators
        for r in T.unroll(R):
            for h in T.unroll(XH):
                if g8 + 8 * h < M:
                    for e in T.unroll(2):
                        part[part_at(slot, warp, r, g8 + 8 * h, 2 * q + e)] = acc[4 * r + 2 * h + e]
        for i in T.unroll(R * 4):
            acc[i] = T.float32(0)

    @T.macro
    def reduce_store(part, Y, Scale, Bias, Res, tid, g0, gl_first, slot_of, r_of, n_groups):
        # every thread sums column pairs of the warps' partials in a fixed warp order, scales, applies
        # the epilogue and stores them; ``n_groups`` groups of R from ``gl_first``
        for i in T.serial(_cdiv(n_groups * M * 4, NT)):
            item = i * NT + tid
            gl = gl_first + item // (4 * M)
            m = (item // 4) % M
            p = item % 4
            n = (g0 + gl) * 8 + 2 * p
            if all_(item < n_groups * M * 4, gl < RG, g0 + gl < G):
                s0 = T.float32(0)
                s1 = T.float32(0)
                for w in T.unroll(NW):
                    s0 = s0 + part[part_at(slot_of(gl), w, r_of(gl), m, 2 * p)]
                    s1 = s1 + part[part_at(slot_of(gl), w, r_of(gl), m, 2 * p + 1)]
                T.cuda.func_call(store2, T.address_of(Y[m, n]), epi(s0, n, m, Scale, Bias, Res),
                                 epi(s1, n + 1, m, Scale, Bias, Res), source_code=store2_src)

    # fmt: off
    @T.prim_func
    def gemv(X: T.Buffer((M, K), dtype), W: T.Buffer((N, K), weight_dtype), Scale: T.Buffer((N,), "float32"),
             Bias: T.Buffer((N,), dtype), Res: T.Buffer((M, N), dtype), Y: T.Buffer((M, N), dtype)):
        T.device_entry()
        T.attr({"tirx.launch_bounds_min_blocks_per_sm": 1})
        bid = T.cta_id([GRID])
        warp = T.warp_id([NW])
        lane = T.lane_id([32])
        smem = T.alloc_buffer((SMEM_B,), "uint8", scope="shared.dyn", align=16)
        part = T.decl_buffer((PART_B // 4,), "float32", data=smem.data, elem_offset=0, scope="shared.dyn")
        ring = T.decl_buffer((max(RING_B // 4, 1),), "uint32", data=smem.data, elem_offset=PART_B // 4,
                             scope="shared.dyn")
        wr = T.alloc_buffer((R * U * 4,), "uint32", scope="local")
        xr = T.alloc_buffer((U * 2 * XR,), "uint32", scope="local")
        acc = T.alloc_buffer((R * 4,), "float32", scope="local")
        wc = T.alloc_buffer((8,), "uint32", scope="local")
        g8 = lane // 4
        q = lane % 4
        g0 = bid * RG
        for i in T.unroll(R * 4):
            acc[i] = T.float32(0)
        if S > 0:
            # ================= cp.async ring: trip t is issued at step t and consumed at step t + S - 1
            for tt in T.serial(TRIPS + S - 1):
                if tt < TRIPS:
                    for u in T.unroll(U):
                        kk = (((tt % ITERS) * U + u) * NW + warp) * CH + q * E
                        for h in T.unroll(XH):
                            for v in T.unroll(XV):
                                T.cuda.func_call(
                                    "kiln_cp16_x", T.address_of(ring[ring_at(warp, lane, tt % S, xpiece(u, h, v))]),
                                    T.address_of(X[g8 + 8 * h, kk + 8 * v]), T.address_of(X[0, 0]),
                                    x_ok(kk + 8 * v, g8 + 8 * h), source_code=cpx_src)
                        for r in T.unroll(R):
                            if split8:
                                T.cuda.func_call(
                                    ldw, T.address_of(ring[ring_at(warp, lane, tt % S, r * U + u)]),
                                    T.address_of(W[(g0 + (tt // ITERS) * R + r) * 8 + g8, kk]), T.address_of(W[0, 0]),
                                    w_ok(kk, g0, (tt // ITERS) * R + r), w_ok(kk + 8, g0, (tt // ITERS) * R + r),
                                    source_code=ldw_src)
                            else:
                                T.cuda.func_call(
                                    ldw, T.address_of(ring[ring_at(warp, lane, tt % S, r * U + u)]),
                                    T.address_of(W[(g0 + (tt // ITERS) * R + r) * 8 + g8, kk]), T.address_of(W[0, 0]),
                                    w_ok(kk, g0, (tt // ITERS) * R + r), source_code=ldw_src)
                T.cuda.func_call("kiln_cp_commit", source_code=commit_src)
                if tt >= S - 1:
                    T.cuda.func_call(wait, source_code=wait_src)
                    for u in T.unroll(U):
                        for h in T.unroll(XH):
                            for v in T.unroll(XV):
                                T.cuda.func_call(
                                    "kiln_lds16", xr[xreg(u, h, v)], xr[xreg(u, h, v) + 1], xr[xreg(u, h, v) + 2],
                                    xr[xreg(u, h, v) + 3],
                                    T.address_of(ring[ring_at(warp, lane, (tt - S + 1) % S, xpiece(u, h, v))]),
                                    source_code=lds_src)
                        for r in T.unroll(R):
                            T.cuda.func_call(
                                "kiln_lds16", wr[(r * U + u) * 4], wr[(r * U + u) * 4 + 1], wr[(r * U + u) * 4 + 2],
                                wr[(r * U + u) * 4 + 3],
                                T.address_of(ring[ring_at(warp, lane, (tt - S + 1) % S, r * U + u)]),
                                source_code=lds_src)
                    dot_trip(acc, xr, wr, wc)
                    if (tt - S + 1) % ITERS == ITERS - 1:
                        # end of a batch. With PER_BATCH (two slots, alternating): one CTA barrier, then
                        # every thread sums and stores part of the batch (the next S - 1 trips' copies are
                        # in flight meanwhile); a slot is rewritten two batches later, after the next
                        # barrier, i.e. after every thread has read it.
                        flush_batch(part, acc, ((tt - S + 1) // ITERS) % SLOTS, warp, g8, q)
                        if PER_BATCH:
                            T.cuda.cta_sync()
                            reduce_store(part, Y, Scale, Bias, Res, warp * 32 + lane, g0,
                                         (tt - S + 1) // ITERS * R, lambda gl: (gl // R) % SLOTS,
                                         lambda gl: gl % R, R)
            T.cuda.func_call(_wait_helper(0)[0], source_code=_wait_helper(0)[1])
        else:
            # ================= 16-byte loads straight into registers, all of a trip before its first mma
            for b in T.serial(NB):
                for it in T.serial(ITERS):
                    for u in T.unroll(U):
                        kk = ((it * U + u) * NW + warp) * CH + q * E
                        for h in T.unroll(XH):
                            for v in T.unroll(XV):
                                T.cuda.func_call(
                                    "kiln_ldx16", xr[xreg(u, h, v)], xr[xreg(u, h, v) + 1], xr[xreg(u, h, v) + 2],
                                    xr[xreg(u, h, v) + 3], T.address_of(X[g8 + 8 * h, kk + 8 * v]),
                                    x_ok(kk + 8 * v, g8 + 8 * h), source_code=ldx_src)
                        for r in T.unroll(R):
                            if split8:
                                T.cuda.func_call(
                                    ldw, wr[(r * U + u) * 4], wr[(r * U + u) * 4 + 1], wr[(r * U + u) * 4 + 2],
                                    wr[(r * U + u) * 4 + 3], T.address_of(W[(g0 + b * R + r) * 8 + g8, kk]),
                                    w_ok(kk, g0, b * R + r), w_ok(kk + 8, g0, b * R + r), source_code=ldw_src)
                            else:
                                T.cuda.func_call(
                                    ldw, wr[(r * U + u) * 4], wr[(r * U + u) * 4 + 1], wr[(r * U + u) * 4 + 2],
                                    wr[(r * U + u) * 4 + 3], T.address_of(W[(g0 + b * R + r) * 8 + g8, kk]),
                                    w_ok(kk, g0, b * R + r), source_code=ldw_src)
                    dot_trip(acc, xr, wr, wc)
                flush_batch(part, acc, b, warp, g8, q)
        if not PER_BATCH:
            # one slot per batch: one barrier, then the whole CTA's groups
            T.cuda.cta_sync()
            reduce_store(part, Y, Scale, Bias, Res, warp * 32 + lane, g0, 0, lambda gl: gl // R,
                         lambda gl: gl % R, RG)
    # fmt: on

    drop = set()
    if not fp8:
        drop.add("Scale")
    if not has_bias:
        drop.add("Bias")
    if not has_residual:
        drop.add("Res")
    params = [p for p in gemv.params if p.name not in drop]
    func = tvm.tirx.PrimFunc(params, gemv.body, gemv.ret_type, gemv.attrs)
    return func.with_attr("global_symbol", name)
