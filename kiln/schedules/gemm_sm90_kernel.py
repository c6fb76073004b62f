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
  residual, scale) is applied per element and the result is stored as column pairs, predicated on
  ``row < M`` (and ``col < N`` when N is not a multiple of ``block_n``).

Tails: TMA zero-fills out-of-bounds rows/columns of A and B (and still counts the full box in the
transaction bytes), so M, N and K tails load zeros; only the stores are predicated.

Every mbarrier wait has a ~2 s watchdog that traps (a pipeline bug fails the launch, it does not hang
the GPU). Known cost (H200, 2026-11-21): the direct register->global epilogue (4-byte stores, half
of each 32-byte sector) is the main gap to cuBLAS at K=1024 (0.74x at 4096x4096x1024); staging the
tile in shared memory and storing it with TMA, overlapped with the next tile, is the next step.
"""
from __future__ import annotations

from typing import Callable

import tvm
from tvm.script import tirx as T

from .configs import GemmConfig

__all__ = ["build_gemm_kernel", "CUDA_HELPERS"]

_PTX_AB = {"float16": "f16", "bfloat16": "bf16"}
_TMA_LOAD = "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
_REG_PRODUCER = 40      # setmaxnreg for the producer warpgroup
_REG_CONSUMER = 232     # ... and for the consumers (128*40 + 256*232 = 64512 <= 65536)

# A by-reference register fence: keeps the compiler from moving accumulator reads/writes across the
# asynchronous wgmma (the wgmma helpers bind the accumulators with "+f", but wait_group does not
# mention them). T.cuda.wgmma.noop_barrier crashes in this wheel's codegen, hence inline CUDA.
_FENCE4_SRC = """
__forceinline__ __device__ void kiln_acc_fence4(float& a, float& b, float& c, float& d) {
  asm volatile("" : "+f"(a), "+f"(b), "+f"(c), "+f"(d) :: "memory");
}
"""
# mbarrier phase wait with a watchdog: spins on try_wait.parity (acquire, CTA scope) and traps after
# ~2 s (4e9 SM cycles at 1.98 GHz) so that a pipeline bug fails the launch instead of hanging the GPU.
_WAIT_SRC = """
__forceinline__ __device__ void kiln_mbar_wait(void* bar, int parity) {
  unsigned int addr = static_cast<unsigned int>(__cvta_generic_to_shared(bar));
  unsigned int ok;
  asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
               : "=r"(ok) : "r"(addr), "r"(parity) : "memory");
  if (ok) return;
  long long t0 = clock64();
  while (true) {
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(ok) : "r"(addr), "r"(parity) : "memory");
    if (ok) return;
    if (clock64() - t0 > 4000000000LL) __trap();
  }
}
"""
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
_STORE2_NAME = {"float16": "kiln_store2_f16", "bfloat16": "kiln_store2_bf16"}
CUDA_HELPERS = ("kiln_mbar_wait", "kiln_acc_fence4", "kiln_store2_f16", "kiln_store2_bf16")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def build_gemm_kernel(M: int, N: int, K: int, dtype: str, cfg: GemmConfig,
                      apply_epilogue: Callable, has_bias: bool, has_residual: bool,
                      name: str = "kiln_gemm_sm90", num_sms: int = 132) -> tvm.tirx.PrimFunc:
    """The PrimFunc ``(A[M,K], B[N,K], [bias[N]], [residual[M,N]], C[M,N])``.

    ``apply_epilogue(x, bias_value, residual_value) -> PrimExpr`` maps one fp32 accumulator value
    (with its column's bias and its residual element, both already fp32, or ``None``) to the fp32
    value that is cast to ``dtype`` and stored. Validity of (M, N, K, dtype, cfg) is the caller's job.
    With ``cfg.persistent`` (and more tiles than ``num_sms``) the grid is ``num_sms`` CTAs that walk
    the tiles ``bid, bid + num_sms, ...``; the ring's stage/phase counter runs on across tiles, so the
    producer loads the next tile while the consumers run the epilogue of the current one.
    """
    BM, BN, BK, S, NC = cfg.block_m, cfg.block_n, cfg.block_k, cfg.stages, cfg.consumers
    NT = cfg.threads
    num_m, num_n, num_k = _cdiv(M, BM), _cdiv(N, BN), _cdiv(K, BK)
    num_tiles = num_m * num_n
    persistent = cfg.persistent and num_tiles > num_sms
    GRID = min(num_tiles, num_sms) if persistent else num_tiles
    G = max(1, min(cfg.swizzle, num_m))                 # M-tile rows per raster group
    group_tiles = G * num_n
    A_STAGE, B_STAGE = BM * BK, BN * BK                 # elements per ring slot
    A_STAGE_B, B_STAGE_B = 2 * A_STAGE, 2 * B_STAGE      # bytes
    BAR_OFF = S * (A_STAGE_B + B_STAGE_B)               # byte offset of the 2*S mbarriers
    SMEM = BAR_OFF + 16 * S
    TX_BYTES = A_STAGE_B + B_STAGE_B
    ACC = BN // 2                                        # fp32 accumulators per consumer thread
    KSTEPS = BK // 16
    WG_ROWS_B = 64 * BK * 2                              # bytes of one consumer's 64 A rows
    wgmma = f"wgmma.mma_async.sync.aligned.m64n{BN}k16.f32.{_PTX_AB[dtype]}.{_PTX_AB[dtype]}"
    use_setmaxnreg = NC == 2
    row_guard = M % BM != 0
    col_guard = N % BN != 0
    store2 = _STORE2_NAME[dtype]
    store2_src = _STORE2_SRC[dtype]
    fence_src = _FENCE4_SRC
    wait_src = _WAIT_SRC
    # cuTensorMapEncodeTiled(map, dtype, rank, ptr, dims..., strides[1:]..., box..., elem_strides...,
    #                        interleave=0, swizzle=3 (128B), l2_promotion=2 (128B), oob_fill=0 (zeros))
    a_map_args = (K, M, K * 2, BK, BM, 1, 1, 0, 3, 2, 0)
    b_map_args = (K, N, K * 2, BK, BN, 1, 1, 0, 3, 2, 0)

    def epi(x, bias_buf, res_buf, row, col):
        b = T.Cast("float32", bias_buf[col]) if has_bias else None
        r = T.Cast("float32", res_buf[row, col]) if has_residual else None
        return apply_epilogue(x, b, r)

    # tile -> (m0, n0): groups of G M-tile rows, column-major inside a group (L2 reuse of A and B tiles)
    def tile_m0(tile):
        first_m = (tile // group_tiles) * G
        gsize = T.min(num_m - first_m, G)
        return (first_m + (tile % group_tiles) % gsize) * BM

    def tile_n0(tile):
        first_m = (tile // group_tiles) * G
        gsize = T.min(num_m - first_m, G)
        return ((tile % group_tiles) // gsize) * BN

    # tiles of CTA `bid`: bid, bid + GRID, ... (exactly one when not persistent)
    def local_tiles(bid):
        return (num_tiles - bid + GRID - 1) // GRID if persistent else 1

    def in_bounds(row, col):
        conds = ([row < M] if row_guard else []) + ([col < N] if col_guard else [])
        return tvm.tirx.all(*conds) if conds else True

    # fmt: off
    @T.prim_func
    def gemm(A: T.Buffer((M, K), dtype), B: T.Buffer((N, K), dtype), Bias: T.Buffer((N,), dtype),
             Res: T.Buffer((M, N), dtype), C: T.Buffer((M, N), dtype)):
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
                T.ptx.mbarrier.init.shared.b64(T.address_of(bars[S + s]), T.uint32(4 * NC))
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
                                         kt * BK, tile_m0(bid + lt * GRID), T.address_of(bars[it % S]))
                        T.ptx[_TMA_LOAD](T.address_of(Bs[(it % S) * B_STAGE]), T.address_of(B_map),
                                         kt * BK, tile_n0(bid + lt * GRID), T.address_of(bars[it % S]))
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
                m0 = tile_m0(bid + lt * GRID)
                n0 = tile_n0(bid + lt * GRID)
                for i in T.unroll(ACC):
                    acc[i] = T.float32(0)
                for i in T.unroll(ACC // 4):
                    T.cuda.func_call("kiln_acc_fence4", acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3],
                                     source_code=fence_src)
                for kt in T.serial(num_k):
                    it = lt * num_k + kt
                    T.cuda.func_call("kiln_mbar_wait", T.address_of(bars[it % S]), (it // S) % 2,
                                     source_code=wait_src)
                    T.ptx.wgmma.fence.sync.aligned()
                    for kk in T.unroll(KSTEPS):
                        T.ptx[wgmma](
                            *[acc[i] for i in range(ACC)],
                            desc_a + T.Cast("uint64", ((it % S) * A_STAGE_B + (wg - 1) * WG_ROWS_B + kk * 32) // 16),
                            desc_b + T.Cast("uint64", ((it % S) * B_STAGE_B + kk * 32) // 16),
                            True, 1, 1, 0, 0)
                    T.ptx.wgmma.commit_group.sync.aligned()
                    T.ptx.wgmma.wait_group.sync.aligned(1)
                    if kt > 0:              # the previous slot has been read by its wgmma: free it
                        if t % 32 == 0:
                            T.ptx.mbarrier.arrive.shared.b64(T.address_of(bars[S + (it - 1) % S]))
                T.ptx.wgmma.wait_group.sync.aligned(0)
                if t % 32 == 0:             # free the tile's last slot: the producer refills during the epilogue
                    T.ptx.mbarrier.arrive.shared.b64(T.address_of(bars[S + (lt * num_k + num_k - 1) % S]))
                for i in T.unroll(ACC // 4):
                    T.cuda.func_call("kiln_acc_fence4", acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3],
                                     source_code=fence_src)

                # fragment of m64nNk16 (f32): thread t holds rows r0 = 16*(t/32) + (t%32)/4 and r0 + 8, columns
                # 8*j + 2*(t%4) + {0, 1}, as acc[4j + {0, 1}] (row r0) and acc[4j + {2, 3}] (row r0 + 8)
                r0 = m0 + (wg - 1) * 64 + (t // 32) * 16 + (t % 32) // 4
                c0 = n0 + (t % 4) * 2
                for j in T.unroll(BN // 8):
                    for h in T.unroll(2):
                        if in_bounds(r0 + 8 * h, c0 + 8 * j):
                            T.cuda.func_call(
                                store2, T.address_of(C[r0 + 8 * h, c0 + 8 * j]),
                                epi(acc[4 * j + 2 * h], Bias, Res, r0 + 8 * h, c0 + 8 * j),
                                epi(acc[4 * j + 2 * h + 1], Bias, Res, r0 + 8 * h, c0 + 8 * j + 1),
                                source_code=store2_src)
    # fmt: on

    drop = set()
    if not has_bias:
        drop.add("Bias")
    if not has_residual:
        drop.add("Res")
    params = [p for p in gemm.params if p.name not in drop]
    func = tvm.tirx.PrimFunc(params, gemm.body, gemm.ret_type, gemm.attrs)
    return func.with_attr("global_symbol", name)
