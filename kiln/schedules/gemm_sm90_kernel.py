"""The TIRx kernel of kiln's sm_90a GEMM: C = epilogue(A @ B^T), written by hand.

Structure (one CTA per ``block_m x block_n`` output tile, or with ``persistent`` one CTA per SM looping
over tiles; ``128 * (1 + consumers)`` threads):

* warpgroup 0 is the **producer**: after ``setmaxnreg.dec`` one thread walks K and, per k-tile, waits
  for a free ring slot (``empty`` mbarrier), arms the slot's ``full`` mbarrier with the byte count and
  issues two TMA loads (``cp.async.bulk.tensor.2d``, 128-byte swizzle) of the A and B tiles.
* warpgroups 1..consumers are **consumers** (``setmaxnreg.inc``): each owns 64 rows of the tile,
  waits on ``full``, issues ``block_k / 16`` ``wgmma.mma_async m64n{block_n}k16`` from shared memory
  (K-major descriptors), keeps one wgmma group in flight (``wait_group 1``) and frees the previous
  slot (one ``empty`` arrival per warp).
* the **epilogue** runs in registers on the fp32 accumulators: the stage list (bias, activations,
  residual, scale) is applied per element; each quad of lanes transposes its packed pairs with 4
  shuffles so that every lane stores 16 contiguous bytes (full 32-byte sectors), predicated on
  ``row < M`` (and on the 8-column chunk being ``< N`` when N is not a multiple of ``block_n``).
* **split-K** (``cfg.split_k > 1``, small M): CTA ``bid`` computes tile ``bid % tiles`` over the k-tiles
  of split ``bid // tiles`` and stores fp32 partials (float2 stores: full sectors already) to a
  ``[split_k, M, N]`` workspace; :func:`build_splitk_reduce_kernel` sums them and runs the epilogue.

Tails: TMA zero-fills out-of-bounds rows/columns of A and B (and still counts the full box in the
transaction bytes), so M, N and K tails load zeros; only the stores are predicated.

Every mbarrier wait has a ~2 s watchdog that traps (a pipeline bug fails the launch, it does not hang
the GPU). Known cost (H200, 2026-11-21): the epilogue is not overlapped with the next tile's
wgmma (the producer only prefetches), which is the remaining gap to cuBLAS at K=1024 (0.85x at
4096x4096x1024 with 16-byte stores, benchmarks/NOTES.md); a ping-pong consumer schedule or a
TMA-store epilogue is the next step.
"""
from __future__ import annotations

from typing import Callable

import tvm
from tvm.script import tirx as T

from .configs import GemmConfig
from .cuda_snippets import mbar_wait_src

__all__ = ["build_gemm_kernel", "build_splitk_reduce_kernel", "CUDA_HELPERS"]

_PTX_AB = {"float16": "f16", "bfloat16": "bf16"}
_TMA_LOAD = "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
_REG_PRODUCER = 40      # setmaxnreg for the producer warpgroup
_REG_CONSUMER = 232     # ... and for the consumers (128*40 + 256*232 = 64512 <= 65536)
_ORDER_BAR = 8          # named barriers 8 and 9 order the ping-pong consumers' K loops (0 is __syncthreads)

# A by-reference register fence: keeps the compiler from moving accumulator reads/writes across the
# asynchronous wgmma (the wgmma helpers bind the accumulators with "+f", but wait_group does not
# mention them). T.cuda.wgmma.noop_barrier crashes in this wheel's codegen, hence inline CUDA.
_FENCE4_SRC = """
__forceinline__ __device__ void kiln_acc_fence4(float& a, float& b, float& c, float& d) {
  asm volatile("" : "+f"(a), "+f"(b), "+f"(c), "+f"(d) :: "memory");
}
"""
_WAIT_SRC = mbar_wait_src("kiln_mbar_wait")      # mbarrier wait with a ~2 s trapping watchdog
# Paired output stores (4 bytes per thread instead of two 2-byte stores).
_STORE2_SRC = {
    "float16": """
__forceinline__ __device__ void kiln_store2_f16(void* p, float a, float b) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
}
""",
    "bfloat16": """
__forceinline__ __device__ void kiln_store2_bf16(void* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}
""",
}
_STORE2_SRC["float32"] = """
__forceinline__ __device__ void kiln_store2_f32(void* p, float a, float b) {
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
"""
_STORE2_NAME = {"float16": "kiln_store2_f16", "bfloat16": "kiln_store2_bf16", "float32": "kiln_store2_f32"}
# 16-byte stores of a 16-bit tile. In the wgmma fragment the 4 lanes of a quad hold one row's columns
# 8j + 2q + {0,1} (q = lane % 4): per j, a quad covers 16 contiguous bytes, half a 32-byte sector, with
# 4-byte stores. Over 4 consecutive j (32 columns, 64 bytes) the quad transposes its 4x4 matrix of
# packed pairs with 4 shuffles, so that lane q stores the 8 columns of j = q as one 16-byte vector: full
# sectors and a quarter of the store instructions. All 32 lanes must call it (shuffles); `ok` masks the
# store of a lane whose row or 8-column chunk is out of bounds.
_STORE_QUAD_SRC = """
__forceinline__ __device__ unsigned kiln_sel4_PK(unsigned x0, unsigned x1, unsigned x2, unsigned x3, int i) {
  return i == 0 ? x0 : (i == 1 ? x1 : (i == 2 ? x2 : x3));
}
__forceinline__ __device__ void kiln_store_quad_PK(void* row_base, bool ok, float a0, float a1, float b0,
                                                   float b1, float c0, float c1, float d0, float d1) {
  int lane = threadIdx.x & 31, q = lane & 3;
  HALF2 h0 = CVT(a0, a1), h1 = CVT(b0, b1), h2 = CVT(c0, c1), h3 = CVT(d0, d1);
  unsigned p0 = *reinterpret_cast<unsigned*>(&h0), p1 = *reinterpret_cast<unsigned*>(&h1);
  unsigned p2 = *reinterpret_cast<unsigned*>(&h2), p3 = *reinterpret_cast<unsigned*>(&h3);
  unsigned r[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {   // step k: lane q receives from lane (q+k)%4 its pair of column group j=q
    unsigned send = kiln_sel4_PK(p0, p1, p2, p3, (q - k) & 3);
    r[k] = __shfl_sync(0xffffffffu, send, (lane & ~3) | ((q + k) & 3));
  }
  uint4 v = make_uint4(kiln_sel4_PK(r[0], r[1], r[2], r[3], (0 - q) & 3), kiln_sel4_PK(r[0], r[1], r[2], r[3], (1 - q) & 3),
                       kiln_sel4_PK(r[0], r[1], r[2], r[3], (2 - q) & 3), kiln_sel4_PK(r[0], r[1], r[2], r[3], (3 - q) & 3));
  if (ok) *(reinterpret_cast<uint4*>(row_base) + q) = v;
}
"""
_QUAD = {"float16": ("f16", "__half2", "__floats2half2_rn"), "bfloat16": ("bf16", "__nv_bfloat162", "__floats2bfloat162_rn")}
_STORE_QUAD_NAME = {dt: f"kiln_store_quad_{pk}" for dt, (pk, _, _) in _QUAD.items()}
_STORE_QUAD_FN = {dt: _STORE_QUAD_SRC.replace("_PK", f"_{pk}").replace("HALF2", h2).replace("CVT", cvt)
                  for dt, (pk, h2, cvt) in _QUAD.items()}
CUDA_HELPERS = ("kiln_mbar_wait", "kiln_acc_fence4", "kiln_store2_f16", "kiln_store2_bf16", "kiln_store2_f32",
                "kiln_sel4_f16", "kiln_sel4_bf16", "kiln_store_quad_f16", "kiln_store_quad_bf16", "kiln_sel_ptr")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_splits(N: int, out_splits, unit: int) -> tuple:
    """The output column counts (``(N,)`` for one output); each a multiple of ``unit`` (the column block one
    tile or thread stores, so that none straddles two outputs)."""
    if not out_splits:
        return (N,)
    outs = tuple(int(n) for n in out_splits)
    if sum(outs) != N or not 1 <= len(outs) <= 3 or any(n % unit for n in outs):
        raise ValueError(f"out_splits {outs} must be 1-3 sizes summing to N={N}, each a multiple of {unit}")
    return outs


def _out_addr(bufs, outs, row, col0, dcol):
    """Address of column ``col0 + dcol`` of the logical ``[M, N]`` output in the output buffer holding
    ``col0`` (``col0`` is the first column of a block that lies in one output; the choice is uniform per
    tile, or per thread in the reduce kernel)."""
    addr = T.address_of(bufs[len(outs) - 1][row, col0 - sum(outs[:-1]) + dcol])
    for k in range(len(outs) - 2, -1, -1):
        off = sum(outs[:k])
        addr = T.cuda.func_call("kiln_sel_ptr", col0 < off + outs[k], T.address_of(bufs[k][row, col0 - off + dcol]),
                                addr, source_code=_SEL_PTR_SRC, return_type="handle")
    return addr


# (tirx.if_then_else rejects address_of operands in this wheel; a ternary in CUDA does the same)
_SEL_PTR_SRC = """
__forceinline__ __device__ void* kiln_sel_ptr(bool c, void* a, void* b) { return c ? a : b; }
"""


def build_gemm_kernel(M: int, N: int, K: int, dtype: str, cfg: GemmConfig,
                      apply_epilogue: Callable, has_bias: bool, has_residual: bool,
                      name: str = "kiln_gemm_sm90", num_sms: int = 132,
                      out_splits: tuple | None = None) -> tvm.tirx.PrimFunc:
    """The PrimFunc ``(A[M,K], B[N,K], [bias[N]], [residual[M,N]], C[M,N])``.

    ``apply_epilogue(x, bias_value, residual_value) -> PrimExpr`` maps one fp32 accumulator value
    (with its column's bias and its residual element, both already fp32, or ``None``) to the fp32
    value that is cast to ``dtype`` and stored. Validity of (M, N, K, dtype, cfg) is the caller's job.
    With ``cfg.persistent`` (and more tiles than ``num_sms``) the grid is ``num_sms`` CTAs that walk
    the tiles ``bid, bid + num_sms, ...``; the ring's stage/phase counter runs on across tiles, so the
    producer loads the next tile while the consumers run the epilogue of the current one.
    With ``cfg.split_k > 1`` the output is the fp32 workspace ``C[split_k, M, N]`` of partial sums (CTA
    ``bid`` runs tile ``bid % tiles`` over k-tiles of split ``bid // tiles``); the epilogue must then be
    empty (it runs in :func:`build_splitk_reduce_kernel`).
    ``out_splits`` (sizes summing to N, each a multiple of ``block_n``, at most 3) writes the columns
    to that many separate ``[M, N_i]`` outputs instead of one (sibling GEMMs fused horizontally, e.g.
    Q/K/V: one launch, no split copy afterwards); each tile lies in one output.
    """
    BM, BN, BK, S, NC = cfg.block_m, cfg.block_n, cfg.block_k, cfg.stages, cfg.consumers
    NT = cfg.threads
    SPLIT = cfg.split_k
    PP = cfg.pingpong
    dynamic = not isinstance(M, int)     # M a tirx.Var: one kernel for every M, on a fixed persistent grid
    if SPLIT > 1 and (has_bias or has_residual):
        raise ValueError("split-K writes fp32 partials; the epilogue belongs to the reduce kernel")
    if dynamic and SPLIT > 1:
        raise ValueError("a dynamic-M GEMM does not split K (the grid is fixed; the tile count is not)")
    # tile and row arithmetic in int32 (TMA coordinates are 32-bit; Relax shape variables are int64)
    Mi = tvm.tirx.Cast("int32", M) if dynamic and str(M.ty) != "int32" else M
    num_m, num_n, num_k = (Mi + (BM - 1)) // BM if dynamic else _cdiv(M, BM), _cdiv(N, BN), _cdiv(K, BK) // SPLIT
    num_tiles = num_m * num_n
    if dynamic:     # every CTA slot of the SMs, each walking tiles bid, bid + GRID, ... (zero when M is small)
        persistent, GRID = True, num_sms * cfg.occupancy()
    else:
        persistent = cfg.persistent and num_tiles > num_sms and SPLIT == 1
        GRID = min(num_tiles, num_sms) if persistent else num_tiles * SPLIT
    out_dtype = "float32" if SPLIT > 1 else dtype
    OUTS = _check_splits(N, out_splits if SPLIT == 1 else None, BN)
    C_SHAPE = (SPLIT, M, N) if SPLIT > 1 else (M, OUTS[0])
    C1_SHAPE, C2_SHAPE = ((M, OUTS[1]) if len(OUTS) > 1 else (1, 8)), ((M, OUTS[2]) if len(OUTS) > 2 else (1, 8))
    G = cfg.swizzle if dynamic else max(1, min(cfg.swizzle, num_m))     # M-tile rows per raster group
    group_tiles = G * num_n
    A_STAGE, B_STAGE = BM * BK, BN * BK                 # elements per ring slot
    A_STAGE_B, B_STAGE_B = 2 * A_STAGE, 2 * B_STAGE      # bytes
    BAR_OFF = S * (A_STAGE_B + B_STAGE_B)               # byte offset of the 2*S mbarriers
    SMEM = BAR_OFF + 16 * S
    TX_BYTES = A_STAGE_B + B_STAGE_B
    ACC = BN // 2                                        # fp32 accumulators per consumer thread
    KSTEPS = BK // 16
    wgmma = f"wgmma.mma_async.sync.aligned.m64n{BN}k16.f32.{_PTX_AB[dtype]}.{_PTX_AB[dtype]}"
    use_setmaxnreg = NC == 2
    row_guard = dynamic or M % BM != 0
    col_guard = N % BN != 0
    store2 = _STORE2_NAME[out_dtype]
    store2_src = _STORE2_SRC[out_dtype]
    quad, quad_src = _STORE_QUAD_NAME[dtype], _STORE_QUAD_FN[dtype]
    fence_src = _FENCE4_SRC
    wait_src = _WAIT_SRC
    # cuTensorMapEncodeTiled(map, dtype, rank, ptr, dims..., strides[1:]..., box..., elem_strides...,
    #                        interleave=0, swizzle=3 (128B), l2_promotion=2 (128B), oob_fill=0 (zeros))
    a_map_args = (K, M, K * 2, BK, BM, 1, 1, 0, 3, 2, 0)
    b_map_args = (K, N, K * 2, BK, BN, 1, 1, 0, 3, 2, 0)

    def epi(x, bias_buf, res_buf, row, col):
        # every lane computes its values (the 16-byte store shuffles need all lanes), so reads of rows or
        # columns past the edge are clamped; those values are never stored
        row = T.min(row, Mi - 1) if row_guard else row
        col = T.min(col, N - 1) if col_guard else col
        b = T.Cast("float32", bias_buf[col]) if has_bias else None
        r = T.Cast("float32", res_buf[row, col]) if has_residual else None
        return apply_epilogue(x, b, r)

    m_limit_msg = f"kiln sm_90a GEMM: M * {max(N, K)} must be < 2^31 (32-bit indexing); M is too large"

    # tile -> (m0, n0): groups of G M-tile rows, column-major inside a group (L2 reuse of A and B tiles)
    def tile_m0(tile):
        first_m = (tile // group_tiles) * G
        gsize = T.min(num_m - first_m, G)
        return (first_m + (tile % group_tiles) % gsize) * BM

    def tile_n0(tile):
        first_m = (tile // group_tiles) * G
        gsize = T.min(num_m - first_m, G)
        return ((tile % group_tiles) // gsize) * BN

    # ping-pong: consumer wg owns the whole (64-row) tiles lt = wg - 1, wg + 1, ...; otherwise both consumers
    # share every tile, 64 rows each
    def mine(lt, wg):
        return lt % 2 == wg - 1 if PP else tvm.tirx.const(True, "bool")

    def wg_row0(wg):
        return 0 if PP else (wg - 1) * 64

    # tiles of CTA `bid`: bid, bid + GRID, ... (exactly one when not persistent)
    def local_tiles(bid):
        return (num_tiles - bid + GRID - 1) // GRID if persistent else 1

    # the tile of CTA `bid` at its lt-th step, and its first k-tile (split-K: bid // num_tiles picks the split)
    def cta_tile(bid, lt):
        return bid % num_tiles if SPLIT > 1 else bid + lt * GRID

    def k_tile0(bid):
        return (bid // num_tiles) * num_k if SPLIT > 1 else 0

    def c_addr(buf, bid, row, col):
        return T.address_of(buf[bid // num_tiles, row, col] if SPLIT > 1 else buf[row, col])

    def in_bounds(row, col):
        conds = ([row < Mi] if row_guard else []) + ([col < N] if col_guard else [])
        return tvm.tirx.all(*conds) if conds else tvm.tirx.const(True, "bool")

    # fmt: off
    @T.prim_func
    def gemm(A: T.Buffer((M, K), dtype), B: T.Buffer((N, K), dtype), Bias: T.Buffer((N,), dtype),
             Res: T.Buffer((M, N), dtype), C: T.Buffer(C_SHAPE, out_dtype), C1: T.Buffer(C1_SHAPE, out_dtype),
             C2: T.Buffer(C2_SHAPE, out_dtype)):
        if dynamic:     # 32-bit row/column arithmetic in the kernel
            assert T.Cast("int64", M) * max(N, K) < 2**31, m_limit_msg
        A_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        T.call_packed("runtime.cuTensorMapEncodeTiled", A_map, dtype, 2, A.data, *a_map_args)
        B_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        T.call_packed("runtime.cuTensorMapEncodeTiled", B_map, dtype, 2, B.data, *b_map_args)

        T.device_entry()
        bid = T.cta_id([GRID])
        wg = T.warpgroup_id([1 + NC])
        tid = T.thread_id([NT])
        smem = T.alloc_buffer((SMEM,), "uint8", scope="shared.dyn", align=1024)
        As = T.decl_buffer((S * A_STAGE,), dtype, data=smem.data, elem_offset=0, scope="shared.dyn")
        Bs = T.decl_buffer((S * B_STAGE,), dtype, data=smem.data, elem_offset=S * A_STAGE, scope="shared.dyn")
        bars = T.decl_buffer((2 * S,), "uint64", data=smem.data, elem_offset=BAR_OFF // 8, scope="shared.dyn")

        if tid == 0:
            for s in T.unroll(S):
                T.ptx.mbarrier.init.shared.b64(T.address_of(bars[s]), T.uint32(1))
                T.ptx.mbarrier.init.shared.b64(T.address_of(bars[S + s]), T.uint32(4 if PP else 4 * NC))
            T.ptx.fence.mbarrier_init.release.cluster()
        T.ptx.fence.proxy.async_.shared__cta()
        T.cuda.cta_sync()

        if wg == 0:
            # ---------------- producer: one thread issues all TMA loads, running ahead across tiles
            if use_setmaxnreg:
                T.ptx["setmaxnreg.dec.sync.aligned.u32"](_REG_PRODUCER)
            if tid == 0:
                for lt in T.serial(local_tiles(bid)):
                    for kt in T.serial(num_k):
                        it = lt * num_k + kt
                        T.cuda.func_call("kiln_mbar_wait", T.address_of(bars[S + it % S]), ((it // S) % 2) ^ 1,
                                         source_code=wait_src)
                        T.ptx.mbarrier.arrive.expect_tx.shared.b64(T.address_of(bars[it % S]), T.uint32(TX_BYTES))
                        T.ptx[_TMA_LOAD](T.address_of(As[(it % S) * A_STAGE]), T.address_of(A_map),
                                         (k_tile0(bid) + kt) * BK, tile_m0(cta_tile(bid, lt)),
                                         T.address_of(bars[it % S]))
                        T.ptx[_TMA_LOAD](T.address_of(Bs[(it % S) * B_STAGE]), T.address_of(B_map),
                                         (k_tile0(bid) + kt) * BK, tile_n0(cta_tile(bid, lt)),
                                         T.address_of(bars[it % S]))
        else:
            # ---------------- consumers: wgmma from the ring, epilogue in registers
            if use_setmaxnreg:
                T.ptx["setmaxnreg.inc.sync.aligned.u32"](_REG_CONSUMER)
            acc = T.alloc_buffer((ACC,), "float32", scope="local")
            desc_a: T.uint64
            desc_b: T.uint64
            t = tid % 128
            # descriptors of ring slot 0 (K-major, 128B swizzle: LBO 16 B (unused), SBO 1024 B);
            # slot s / k-step kk / consumer c are added to the 14-bit start address (16-byte units)
            T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc_a), T.address_of(As[0]), 1, 64, 3)
            T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc_b), T.address_of(Bs[0]), 1, 64, 3)
            for lt in T.serial(local_tiles(bid)):
                if mine(lt, wg):
                    m0 = tile_m0(cta_tile(bid, lt))
                    n0 = tile_n0(cta_tile(bid, lt))
                    for i in T.unroll(ACC):
                        acc[i] = T.float32(0)
                    for i in T.unroll(ACC // 4):
                        T.cuda.func_call("kiln_acc_fence4", acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3],
                                         source_code=fence_src)
                    if PP:                      # ping-pong: wait until the other consumer's K loop of tile lt-1 ended
                        if lt >= 1:
                            T.ptx["bar.sync"](T.uint32(_ORDER_BAR + wg - 1), T.uint32(256))
                    for kt in T.serial(num_k):
                        it = lt * num_k + kt
                        T.cuda.func_call("kiln_mbar_wait", T.address_of(bars[it % S]), (it // S) % 2,
                                         source_code=wait_src)
                        T.ptx.wgmma.fence.sync.aligned()
                        for kk in T.unroll(KSTEPS):
                            T.ptx[wgmma](
                                *[acc[i] for i in range(ACC)],
                                desc_a + T.Cast("uint64", ((it % S) * A_STAGE_B + wg_row0(wg) * BK * 2 + kk * 32) // 16),
                                desc_b + T.Cast("uint64", ((it % S) * B_STAGE_B + kk * 32) // 16),
                                True, 1, 1, 0, 0)
                        T.ptx.wgmma.commit_group.sync.aligned()
                        T.ptx.wgmma.wait_group.sync.aligned(1)
                        if kt > 0:              # the previous slot has been read by its wgmma: free it
                            if t % 32 == 0:
                                T.ptx.mbarrier.arrive.shared.b64(T.address_of(bars[S + (it - 1) % S]))
                    if PP:                      # ... and let the other consumer start tile lt+1's K loop
                        if lt + 1 < local_tiles(bid):
                            T.ptx["bar.arrive"](T.uint32(_ORDER_BAR + 2 - wg), T.uint32(256))
                    T.ptx.wgmma.wait_group.sync.aligned(0)
                    if t % 32 == 0:             # free the tile's last slot: the producer refills during the epilogue
                        T.ptx.mbarrier.arrive.shared.b64(T.address_of(bars[S + (lt * num_k + num_k - 1) % S]))
                    for i in T.unroll(ACC // 4):
                        T.cuda.func_call("kiln_acc_fence4", acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3],
                                         source_code=fence_src)

                    # fragment of m64nNk16 (f32): thread t holds rows r0 = 16*(t/32) + (t%32)/4 and r0 + 8, columns
                    # 8*j + 2*(t%4) + {0, 1}, as acc[4j + {0, 1}] (row r0) and acc[4j + {2, 3}] (row r0 + 8)
                    r0 = m0 + wg_row0(wg) + (t // 32) * 16 + (t % 32) // 4
                    c0 = n0 + (t % 4) * 2
                    if SPLIT > 1:               # fp32 partials: a quad's float2 stores already fill 32-byte sectors
                        for j in T.unroll(BN // 8):
                            for h in T.unroll(2):
                                if in_bounds(r0 + 8 * h, c0 + 8 * j):
                                    T.cuda.func_call(
                                        store2, c_addr(C, bid, r0 + 8 * h, c0 + 8 * j),
                                        acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1], source_code=store2_src)
                    else:                       # 16-bit output: quad transpose, then 16-byte stores
                        for g in T.unroll(BN // 32):
                            for h in T.unroll(2):
                                T.cuda.func_call(
                                    quad, _out_addr((C, C1, C2), OUTS, T.min(r0 + 8 * h, Mi - 1), n0, 32 * g),
                                    in_bounds(r0 + 8 * h, n0 + 32 * g + 8 * (t % 4)),
                                    *[epi(acc[4 * (4 * g + jj) + 2 * h + e], Bias, Res, r0 + 8 * h,
                                          c0 + 8 * (4 * g + jj) + e) for jj in range(4) for e in range(2)],
                                    source_code=quad_src)
    # fmt: on

    drop = set(("C1", "C2")[len(OUTS) - 1:])
    if not has_bias:
        drop.add("Bias")
    if not has_residual:
        drop.add("Res")
    params = [p for p in gemm.params if p.name not in drop]
    func = tvm.tirx.PrimFunc(params, gemm.body, gemm.ret_type, gemm.attrs)
    return func.with_attr("global_symbol", name)


_RED_THREADS = 256
_RED_VEC = 4            # output columns per thread (N is a multiple of 8)


def build_splitk_reduce_kernel(M: int, N: int, split: int, dtype: str, apply_epilogue: Callable,
                               has_bias: bool, has_residual: bool,
                               name: str = "kiln_gemm_sm90_reduce", out_splits: tuple | None = None) -> tvm.tirx.PrimFunc:
    """The second kernel of a split-K GEMM: ``C = epilogue(sum_s P[s])`` for ``P[split, M, N]`` fp32.

    Params ``(P, [bias[N]], [residual[M, N]], C[M, N])``. One thread per 4 output columns of a row: it
    sums the ``split`` partials in fp32 (in a fixed order, so results are deterministic), applies the
    epilogue and stores column pairs. Its traffic is ``4 * split * M * N`` bytes read (mostly from L2,
    the partials were just written) plus the output.
    """
    V, NT = _RED_VEC, _RED_THREADS
    OUTS = _check_splits(N, out_splits, V)
    C1_SHAPE, C2_SHAPE = ((M, OUTS[1]) if len(OUTS) > 1 else (1, 8)), ((M, OUTS[2]) if len(OUTS) > 2 else (1, 8))
    total = M * N // V
    GRID = _cdiv(total, NT)
    store2, store2_src = _STORE2_NAME[dtype], _STORE2_SRC[dtype]

    def epi(x, bias_buf, res_buf, row, col):
        b = T.Cast("float32", bias_buf[col]) if has_bias else None
        r = T.Cast("float32", res_buf[row, col]) if has_residual else None
        return apply_epilogue(x, b, r)

    # fmt: off
    @T.prim_func
    def reduce(P: T.Buffer((split, M, N), "float32"), Bias: T.Buffer((N,), dtype), Res: T.Buffer((M, N), dtype),
               C: T.Buffer((M, OUTS[0]), dtype), C1: T.Buffer(C1_SHAPE, dtype), C2: T.Buffer(C2_SHAPE, dtype)):
        T.device_entry()
        bid = T.cta_id([GRID])
        tid = T.thread_id([NT])
        acc = T.alloc_buffer((V,), "float32", scope="local")
        i = bid * NT + tid
        if i < total:
            row = i // (N // V)
            col = (i % (N // V)) * V
            for v in T.unroll(V):
                acc[v] = P[0, row, col + v]
            for s in T.unroll(split - 1):
                for v in T.unroll(V):
                    acc[v] = acc[v] + P[s + 1, row, col + v]
            for v in T.unroll(V // 2):
                T.cuda.func_call(store2, _out_addr((C, C1, C2), OUTS, row, col, 2 * v),
                                 epi(acc[2 * v], Bias, Res, row, col + 2 * v),
                                 epi(acc[2 * v + 1], Bias, Res, row, col + 2 * v + 1),
                                 source_code=store2_src)
    # fmt: on

    drop = ({"Bias"} if not has_bias else set()) | ({"Res"} if not has_residual else set()) \
        | set(("C1", "C2")[len(OUTS) - 1:])
    params = [p for p in reduce.params if p.name not in drop]
    func = tvm.tirx.PrimFunc(params, reduce.body, reduce.ret_type, reduce.attrs)
    return func.with_attr("global_symbol", name)
