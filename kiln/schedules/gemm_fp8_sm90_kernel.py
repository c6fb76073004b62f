"""The TIRx kernel of kiln's sm_90a fp8 GEMM: C = epilogue(scale(A @ B^T)), A and B float8 e4m3, written by hand.

It has the structure of :mod:`.gemm_sm90_kernel` (read that first): one TMA producer warpgroup, 1-2 wgmma
consumer warpgroups of 64 rows each, a ``stages``-deep full/empty mbarrier ring with 128-byte swizzle,
optional persistent tile loop, the same 16-byte quad-transpose stores. What differs:

* a k-tile is 128 e4m3 values = 128 bytes, one swizzle row, so a ring slot has the byte layout of the fp16
  kernel's 64-element k-tile (same descriptors: SBO 1024 B, +32 B per k-step); each k-step is one
  ``wgmma.mma_async m64n{block_n}k32.f32.e4m3.e4m3`` (both operands K-major in shared memory);
* A and B are passed as their bytes (``uint8``; TMA copies bytes and zero-fills out-of-bounds boxes, and
  0x00 is e4m3 +0.0);
* **scales**. Per tensor (``sa[1]``, ``sb[1]``) and per row (``sa[M]`` per token, ``sb[N]`` per output channel)
  multiply the fp32 accumulator in the epilogue, before the epilogue stages (bias, activations, residual).
  The k-dependent modes, A ``group`` (``sa[M, ceil(K/128)]``, 1x128) and B ``block``
  (``sb[ceil(N/128), ceil(K/128)]``, 128x128), need **promotion** (``cfg.promote``): each k-tile's four wgmma
  start a fresh accumulator (``scale-d`` false on the first), the consumer waits for them (``wait_group 0``),
  frees the slot, and adds ``acc * sa(row, kb) * sb(col / 128, kb)`` into a second fp32 accumulator (DeepSeek-V3's
  recipe against the tensor cores' short fp8 accumulation). The scales of k-tile ``kb`` are loaded from global
  memory before its full-barrier wait, so their latency overlaps the wait and the wgmma. Two consumer
  warpgroups overlap one's promotion with the other's wgmma.
* N need not be a multiple of 8: then the output rows are not 16-byte aligned and the epilogue stores
  element by element (predicated) instead of the quad-transposed 16-byte vectors.

Not here (declined by :class:`~.configs.Fp8GemmConfig`): split-K, ping-pong, multi-output; e5m2 inputs.
Runs on the H200 (``tests/test_gemm_fp8.py -m gpu``); the CPU tests check the CUDA source and that ptxas
accepts it for sm_90a with no spills.
"""
from __future__ import annotations

from typing import Callable

import tvm
from tvm.script import tirx as T

from .configs import FP8_GROUP, Fp8GemmConfig, fp8_needs_promotion
from .cuda_snippets import mbar_wait_flag_src, trap_if_src
from .gemm_sm90_kernel import _FENCE4_SRC, _STORE_QUAD_FN, _STORE_QUAD_NAME, _WAIT_SRC

__all__ = ["build_fp8_gemm_kernel", "fp8_scale_shape"]

_TMA_LOAD = "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
_REG_PRODUCER = 40      # setmaxnreg of the producer warpgroup
_REG_CONSUMER = 232     # ... and of the two consumers (128*40 + 256*232 = 64512 <= 65536)
_KSTEP = 32             # K of one fp8 wgmma (32 bytes of a 128-byte swizzle row)

# The consumers' mbarrier wait. A `trap` reachable in the wgmma code makes ptxas ignore the setmaxnreg.inc
# budget there (checked: the 128x192 promoting tile then spills exactly as if compiled with 168 registers),
# so on timeout (~2 s) this wait sets a sticky flag and returns (later waits return at once) and the consumer
# traps after its tile loop (the same scheme as the attention kernel's consumers).
_WAIT_FLAG_SRC = mbar_wait_flag_src("kiln_fp8_wait_flag")
_TRAP_IF_SRC = trap_if_src("kiln_fp8_trap_if")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def fp8_scale_shape(mode: str, rows: int, K: int, block_rows: bool) -> tuple:
    """Shape of the fp32 scale tensor of an operand with ``rows`` rows: ``(1,)`` per tensor, ``(rows,)`` per row,
    ``(rows, ceil(K/128))`` per 1x128 group (A) or ``(ceil(rows/128), ceil(K/128))`` per 128x128 block (B)."""
    kb = _cdiv(K, FP8_GROUP)
    if mode == "tensor":
        return (1,)
    if mode == "row":
        return (rows,)
    if mode in ("group", "block"):
        return (_cdiv(rows, FP8_GROUP) if block_rows else rows, kb)
    raise ValueError(f"unknown fp8 scale mode {mode!r}")


def build_fp8_gemm_kernel(M: int, N: int, K: int, out_dtype: str, cfg: Fp8GemmConfig, mode_a: str, mode_b: str,
                          apply_epilogue: Callable, has_bias: bool, has_residual: bool,
                          name: str = "kiln_gemm_fp8_sm90", num_sms: int = 132) -> tvm.tirx.PrimFunc:
    """The PrimFunc ``(A[M,K] u8, B[N,K] u8, SA, SB, [bias[N]], [residual[M,N]], C[M,N])``.

    ``A``/``B`` hold e4m3 bytes; ``SA``/``SB`` are fp32 of :func:`fp8_scale_shape` (``mode_a`` in
    tensor/row/group, ``mode_b`` in tensor/row/block); bias, residual and C are ``out_dtype``.
    ``apply_epilogue(x, bias_value, residual_value)`` maps the scaled fp32 value to the stored one (as in
    :func:`.gemm_sm90_kernel.build_gemm_kernel`). Validity of the problem and ``cfg`` is the caller's job
    (:meth:`Fp8GemmConfig.check`).
    """
    BM, BN, BK, S, NC = cfg.block_m, cfg.block_n, cfg.block_k, cfg.stages, cfg.consumers
    NT = cfg.threads
    PROMO = cfg.promote
    A_K, B_K = mode_a == "group", mode_b == "block"          # scales applied per k-block (promotion)
    assert PROMO or not fp8_needs_promotion(mode_a, mode_b), "group/block scales need cfg.promote"
    num_m, num_n, num_k = _cdiv(M, BM), _cdiv(N, BN), _cdiv(K, BK)
    num_tiles = num_m * num_n
    persistent = cfg.persistent and num_tiles > num_sms
    GRID = min(num_tiles, num_sms) if persistent else num_tiles
    G = max(1, min(cfg.swizzle, num_m))
    group_tiles = G * num_n
    A_STAGE_B, B_STAGE_B = BM * BK, BN * BK             # bytes (= elements) per ring slot
    BAR_OFF = S * (A_STAGE_B + B_STAGE_B)
    SMEM = BAR_OFF + 16 * S
    TX_BYTES = A_STAGE_B + B_STAGE_B
    ACC = BN // 2
    TOT = ACC if PROMO else 1                            # the promoted (second) accumulator
    KSTEPS = BK // _KSTEP
    NB = cfg.b_blocks_per_tile() if B_K else 1           # B scale blocks one tile touches
    NBLK = _cdiv(N, FP8_GROUP)
    wgmma = f"wgmma.mma_async.sync.aligned.m64n{BN}k32.f32.e4m3.e4m3"
    use_setmaxnreg = NC == 2
    row_guard = M % BM != 0
    col_guard = N % BN != 0
    vec_store = N % 8 == 0                               # 16-byte aligned output rows
    quad, quad_src = _STORE_QUAD_NAME[out_dtype], _STORE_QUAD_FN[out_dtype]
    SA_SHAPE = fp8_scale_shape(mode_a, M, K, False)
    SB_SHAPE = fp8_scale_shape(mode_b, N, K, True)
    # cuTensorMapEncodeTiled(map, dtype, rank, ptr, dims..., strides[1:]..., box..., elem_strides...,
    #                        interleave=0, swizzle=3 (128B), l2_promotion=2 (128B), oob_fill=0 (zeros))
    a_map_args = (K, M, K, BK, BM, 1, 1, 0, 3, 2, 0)
    b_map_args = (K, N, K, BK, BN, 1, 1, 0, 3, 2, 0)
    one = tvm.tirx.const(1.0, "float32")

    def clamp_row(row):
        return T.min(row, M - 1) if row_guard else row

    def clamp_col(col):
        return T.min(col, N - 1) if col_guard or not vec_store else col

    # k-independent scale of row `row` (A per tensor / per row, times B per tensor): kept in a register per tile
    def row_scale(sa, sb, row):
        f = sa[0] if mode_a == "tensor" else (sa[clamp_row(row)] if mode_a == "row" else one)
        return f * sb[0] if mode_b == "tensor" else f

    HAS_ROW_SCALE = mode_a in ("tensor", "row") or mode_b == "tensor"

    def epi(x, rs, sb, bias_buf, res_buf, h, row, col):
        # every lane computes its values (the 16-byte store shuffles need all lanes): reads past the edge are clamped
        row, col = clamp_row(row), clamp_col(col)
        if HAS_ROW_SCALE:
            x = x * rs[h]
        if mode_b == "row":
            x = x * sb[col]
        b = T.Cast("float32", bias_buf[col]) if has_bias else None
        r = T.Cast("float32", res_buf[row, col]) if has_residual else None
        return apply_epilogue(x, b, r)

    # promotion factor of accumulator column chunk j (8 columns) and row half h: fs[h * NB + (B block of chunk j)]
    def promo_factor(fs, n0, j, h):
        if NB == 1:
            return fs[h]
        return T.if_then_else(n0 % FP8_GROUP + 8 * j >= FP8_GROUP, fs[h * 2 + 1], fs[h * 2])

    def tile_m0(tile):
        first_m = (tile // group_tiles) * G
        gsize = T.min(num_m - first_m, G)
        return (first_m + (tile % group_tiles) % gsize) * BM

    def tile_n0(tile):
        first_m = (tile // group_tiles) * G
        gsize = T.min(num_m - first_m, G)
        return ((tile % group_tiles) // gsize) * BN

    def local_tiles(bid):
        return (num_tiles - bid + GRID - 1) // GRID if persistent else 1

    def in_bounds(row, col):
        conds = ([row < M] if row_guard else []) + ([col < N] if col_guard or not vec_store else [])
        return tvm.tirx.all(*conds) if conds else tvm.tirx.const(True, "bool")

    K0 = 1 if PROMO else 0              # k-steps issued before the unrolled loop (the promoting first one)

    def a_off(it, wg, kk):              # descriptor start-address offset (16-byte units) of A's k-step kk
        return T.Cast("uint64", ((it % S) * A_STAGE_B + (wg - 1) * 64 * BK + kk * _KSTEP) // 16)

    def b_off(it, kk):
        return T.Cast("uint64", ((it % S) * B_STAGE_B + kk * _KSTEP) // 16)

    def fin(acc, tot, i):               # the accumulator the epilogue reads
        return tot[i] if PROMO else acc[i]

    # fmt: off
    @T.prim_func
    def gemm(A: T.Buffer((M, K), "uint8"), B: T.Buffer((N, K), "uint8"), SA: T.Buffer(SA_SHAPE, "float32"),
             SB: T.Buffer(SB_SHAPE, "float32"), Bias: T.Buffer((N,), out_dtype), Res: T.Buffer((M, N), out_dtype),
             C: T.Buffer((M, N), out_dtype)):
        A_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        T.call_packed("runtime.cuTensorMapEncodeTiled", A_map, "uint8", 2, A.data, *a_map_args)
        B_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        T.call_packed("runtime.cuTensorMapEncodeTiled", B_map, "uint8", 2, B.data, *b_map_args)

        T.device_entry()
        bid = T.cta_id([GRID])
        wg = T.warpgroup_id([1 + NC])
        tid = T.thread_id([NT])
        smem = T.alloc_buffer((SMEM,), "uint8", scope="shared.dyn", align=1024)
        As = T.decl_buffer((S * A_STAGE_B,), "uint8", data=smem.data, elem_offset=0, scope="shared.dyn")
        Bs = T.decl_buffer((S * B_STAGE_B,), "uint8", data=smem.data, elem_offset=S * A_STAGE_B, scope="shared.dyn")
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
                                         source_code=_WAIT_SRC)
                        T.ptx.mbarrier.arrive.expect_tx.shared.b64(T.address_of(bars[it % S]), T.uint32(TX_BYTES))
                        T.ptx[_TMA_LOAD](T.address_of(As[(it % S) * A_STAGE_B]), T.address_of(A_map),
                                         kt * BK, tile_m0(bid + lt * GRID), T.address_of(bars[it % S]))
                        T.ptx[_TMA_LOAD](T.address_of(Bs[(it % S) * B_STAGE_B]), T.address_of(B_map),
                                         kt * BK, tile_n0(bid + lt * GRID), T.address_of(bars[it % S]))
        else:
            # ---------------- consumers: wgmma from the ring (promoting per k-tile or not), epilogue in registers
            if use_setmaxnreg:
                T.ptx["setmaxnreg.inc.sync.aligned.u32"](_REG_CONSUMER)
            acc = T.alloc_buffer((ACC,), "float32", scope="local")
            tot = T.alloc_buffer((TOT,), "float32", scope="local")
            fs = T.alloc_buffer((2 * NB,), "float32", scope="local")      # promotion factors of one k-tile
            rs = T.alloc_buffer((2,), "float32", scope="local")           # k-independent row scales
            timed_out = T.alloc_buffer((1,), "int32", scope="local")      # sticky watchdog flag of the waits
            timed_out[0] = 0
            desc_a: T.uint64
            desc_b: T.uint64
            t = tid % 128
            # descriptors of ring slot 0 (K-major, 128B swizzle: LBO 16 B (unused), SBO 1024 B); slot s / k-step kk /
            # consumer c are added to the 14-bit start address (16-byte units)
            T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc_a), T.address_of(As[0]), 1, 64, 3)
            T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc_b), T.address_of(Bs[0]), 1, 64, 3)
            for lt in T.serial(local_tiles(bid)):
                m0 = tile_m0(bid + lt * GRID)
                n0 = tile_n0(bid + lt * GRID)
                # fragment of m64nNk32 (f32): thread t holds rows r0 = 16*(t/32) + (t%32)/4 and r0 + 8, columns
                # 8*j + 2*(t%4) + {0, 1}, as acc[4j + {0, 1}] (row r0) and acc[4j + {2, 3}] (row r0 + 8)
                r0 = m0 + (wg - 1) * 64 + (t // 32) * 16 + (t % 32) // 4
                c0 = n0 + (t % 4) * 2
                for i in T.unroll(ACC):
                    acc[i] = T.float32(0)
                if PROMO:
                    for i in T.unroll(TOT):
                        tot[i] = T.float32(0)
                for i in T.unroll(ACC // 4):
                    T.cuda.func_call("kiln_acc_fence4", acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3],
                                     source_code=_FENCE4_SRC)
                for kt in T.serial(num_k):
                    it = lt * num_k + kt
                    if A_K or B_K:              # this k-tile's scales: loads in flight during the wait and the wgmma
                        for h in T.unroll(2):
                            for bi in T.unroll(NB):
                                fs[h * NB + bi] = (
                                    (SA[clamp_row(r0 + 8 * h), kt] if A_K else one)
                                    * (SB[T.min(n0 // FP8_GROUP + bi, NBLK - 1), kt] if B_K else one))
                    T.cuda.func_call("kiln_fp8_wait_flag", T.address_of(bars[it % S]), (it // S) % 2, timed_out[0],
                                     source_code=_WAIT_FLAG_SRC)
                    T.ptx.wgmma.fence.sync.aligned()
                    if PROMO:                   # a fresh accumulator per k-tile: scale-d false on its first k-step
                        T.ptx[wgmma](*[acc[i] for i in range(ACC)], desc_a + a_off(it, wg, 0), desc_b + b_off(it, 0),
                                     False, 1, 1)
                    for kk in T.unroll(KSTEPS - K0):
                        T.ptx[wgmma](*[acc[i] for i in range(ACC)], desc_a + a_off(it, wg, kk + K0),
                                     desc_b + b_off(it, kk + K0), True, 1, 1)
                    T.ptx.wgmma.commit_group.sync.aligned()
                    if PROMO:
                        # this k-tile's product is complete: free its slot, then add it (scaled) into tot
                        T.ptx.wgmma.wait_group.sync.aligned(0)
                        for i in T.unroll(ACC // 4):
                            T.cuda.func_call("kiln_acc_fence4", acc[4 * i], acc[4 * i + 1], acc[4 * i + 2],
                                             acc[4 * i + 3], source_code=_FENCE4_SRC)
                        if t % 32 == 0:
                            T.ptx.mbarrier.arrive.shared.b64(T.address_of(bars[S + it % S]))
                        for j in T.unroll(BN // 8):
                            for h in T.unroll(2):
                                for e in T.unroll(2):
                                    if A_K or B_K:
                                        tot[4 * j + 2 * h + e] = (tot[4 * j + 2 * h + e]
                                                                  + acc[4 * j + 2 * h + e] * promo_factor(fs, n0, j, h))
                                    else:
                                        tot[4 * j + 2 * h + e] = tot[4 * j + 2 * h + e] + acc[4 * j + 2 * h + e]
                    else:
                        T.ptx.wgmma.wait_group.sync.aligned(1)
                        if kt > 0:              # the previous slot has been read by its wgmma: free it
                            if t % 32 == 0:
                                T.ptx.mbarrier.arrive.shared.b64(T.address_of(bars[S + (it - 1) % S]))
                if not PROMO:
                    T.ptx.wgmma.wait_group.sync.aligned(0)
                    if t % 32 == 0:             # free the tile's last slot: the producer refills during the epilogue
                        T.ptx.mbarrier.arrive.shared.b64(T.address_of(bars[S + (lt * num_k + num_k - 1) % S]))
                    for i in T.unroll(ACC // 4):
                        T.cuda.func_call("kiln_acc_fence4", acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3],
                                         source_code=_FENCE4_SRC)

                if HAS_ROW_SCALE:
                    for h in T.unroll(2):
                        rs[h] = row_scale(SA, SB, r0 + 8 * h)
                if vec_store:                   # quad transpose, then 16-byte stores
                    for g in T.unroll(BN // 32):
                        for h in T.unroll(2):
                            T.cuda.func_call(
                                quad, T.address_of(C[clamp_row(r0 + 8 * h), n0 + 32 * g]),
                                in_bounds(r0 + 8 * h, n0 + 32 * g + 8 * (t % 4)),
                                *[epi(fin(acc, tot, 4 * (4 * g + jj) + 2 * h + e), rs, SB, Bias, Res, h, r0 + 8 * h,
                                      c0 + 8 * (4 * g + jj) + e) for jj in range(4) for e in range(2)],
                                source_code=quad_src)
                else:                           # N % 8 != 0: rows are not 16-byte aligned, element stores
                    for j in T.unroll(BN // 8):
                        for h in T.unroll(2):
                            for e in T.unroll(2):
                                if in_bounds(r0 + 8 * h, c0 + 8 * j + e):
                                    C[r0 + 8 * h, c0 + 8 * j + e] = T.Cast(out_dtype, epi(
                                        fin(acc, tot, 4 * j + 2 * h + e), rs, SB, Bias, Res, h, r0 + 8 * h,
                                        c0 + 8 * j + e))
            T.cuda.func_call("kiln_fp8_trap_if", timed_out[0], source_code=_TRAP_IF_SRC)
    # fmt: on

    drop = set()
    if not has_bias:
        drop.add("Bias")
    if not has_residual:
        drop.add("Res")
    params = [p for p in gemm.params if p.name not in drop]
    func = tvm.tirx.PrimFunc(params, gemm.body, gemm.ret_type, gemm.attrs)
    return func.with_attr("global_symbol", name)
