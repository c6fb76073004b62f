"""The grouped GEMM of :func:`kiln.ops.fused_moe` on sm_90a: a TIRx kernel with TMA loads and ``wgmma``.

``y[r, :] = xs[r, :] @ w[e(r)]^T`` for the ``MP`` rows of the expert-sorted, per-expert padded activations
``xs [MP, K]``, with ``w [E, N, K]`` and ``e(r) = block_expert[r // block_m]`` (``-1``: the block is unused).

It is kiln's Hopper GEMM (:mod:`kiln.schedules.gemm_sm90_kernel`: warp-specialised, one producer
warpgroup issuing TMA loads into a ``stages``-deep shared-memory ring guarded by full/empty mbarriers,
``consumers`` warpgroups issuing ``wgmma.mma_async m64n{block_n}k16`` from 128-byte swizzled tiles, fp32
accumulators, quad-transposed 16-byte stores), cut down to what a grouped problem needs and extended in
two places:

* the grid is one CTA per (row block, N tile), row blocks fastest, and a CTA whose block has no expert
  (``block_expert < 0``: past the rows in use) returns before anything else, so the static ``MP`` bound
  costs a launch of idle CTAs, not their work;
* the weight is one 2-D tensor map over ``w`` viewed as ``[E * N, K]``: the B tile of the block's expert
  ``e`` starts at row ``e * N + n0``, read on the device from ``block_expert``. An N tail (``N`` not a
  multiple of ``block_n``) loads the next expert's first rows into columns that are never stored (the
  stores are predicated on ``col < N``); past the last expert TMA fills zeros.

Inline CUDA helpers and constants are those of the dense kernel (imported, not copied). No split-K, no
persistent or ping-pong schedules: a MoE GEMM has ``MP / block_m * N / block_n`` tiles, and at small ``T``
the weights (``E * N * K``) dominate the traffic either way.
"""
from __future__ import annotations

import tvm
from tvm.script import tirx as T

from ..schedules.configs import GEMM_DTYPES, GemmConfig
from ..schedules.gemm_sm90_kernel import (_FENCE4_SRC, _PTX_AB, _REG_CONSUMER, _REG_PRODUCER, _STORE_QUAD_FN,
                                          _STORE_QUAD_NAME, _TMA_LOAD, _WAIT_SRC)
from .moe_te import moe_rows

__all__ = ["moe_sm90_configs", "build_grouped_gemm_sm90", "MOE_SM90_SMALL", "MOE_SM90_LARGE"]

#: Tile of the grouped GEMM while experts get few rows each (decode, small batches): 64-row blocks
#: waste at most 63 padding rows per expert.
MOE_SM90_SMALL = GemmConfig(block_m=64, block_n=128, block_k=64, stages=4, consumers=1, swizzle=1)
#: ... and once the average expert gets >= 256 rows (prefill): 128-row blocks, two consumer warpgroups.
MOE_SM90_LARGE = GemmConfig(block_m=128, block_n=128, block_k=64, stages=4, consumers=2, swizzle=1)
_LARGE_ROWS = 256


def moe_sm90_configs(T_: int, H: int, I: int, E: int, topk: int, dtype: str) -> tuple:
    """``((config of GEMM 1, config of GEMM 2), reason)``: the tiles for a problem, or ``(None, why not)``."""
    if dtype not in GEMM_DTYPES:
        return None, f"dtype {dtype} (the sm_90a grouped GEMM takes {', '.join(GEMM_DTYPES)})"
    NA = T_ * topk
    cfg = MOE_SM90_LARGE if NA // min(E, NA) >= _LARGE_ROWS else MOE_SM90_SMALL
    MP = moe_rows(T_, E, topk, cfg.block_m)
    for what, (N, K) in (("GEMM 1 (x @ w1^T)", (2 * I, H)), ("GEMM 2 (act @ w2^T)", (H, I))):
        reason = cfg.check(MP, N, K, dtype)
        if reason:
            return None, f"{what}: {reason}"
        if E * N * K >= 2**31:
            return None, f"{what}: E*N*K = {E * N * K} >= 2^31 (32-bit indexing of the weights)"
    return (cfg, cfg), None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def build_grouped_gemm_sm90(MP: int, N: int, K: int, E: int, dtype: str, cfg: GemmConfig,
                            name: str) -> tvm.tirx.PrimFunc:
    """The PrimFunc ``(xs[MP, K], w[E, N, K], block_expert[MP / block_m] int32, y[MP, N])`` (see the module
    docstring). ``MP`` must be a multiple of ``block_m``; validity of the rest is :func:`moe_sm90_configs`'."""
    BM, BN, BK, S, NC = cfg.block_m, cfg.block_n, cfg.block_k, cfg.stages, cfg.consumers
    if MP % BM:
        raise ValueError(f"MP={MP} must be a multiple of block_m={BM}")
    NT = cfg.threads
    NB, num_n, num_k = MP // BM, _cdiv(N, BN), _cdiv(K, BK)
    GRID = NB * num_n
    A_STAGE, B_STAGE = BM * BK, BN * BK                 # elements per ring slot
    A_STAGE_B, B_STAGE_B = 2 * A_STAGE, 2 * B_STAGE      # bytes
    BAR_OFF = S * (A_STAGE_B + B_STAGE_B)
    SMEM = BAR_OFF + 16 * S
    TX_BYTES = A_STAGE_B + B_STAGE_B
    ACC = BN // 2
    KSTEPS = BK // 16
    wgmma = f"wgmma.mma_async.sync.aligned.m64n{BN}k16.f32.{_PTX_AB[dtype]}.{_PTX_AB[dtype]}"
    use_setmaxnreg = NC == 2
    col_guard = N % BN != 0
    quad, quad_src = _STORE_QUAD_NAME[dtype], _STORE_QUAD_FN[dtype]
    fence_src, wait_src = _FENCE4_SRC, _WAIT_SRC
    # cuTensorMapEncodeTiled(map, dtype, rank, ptr, dims..., strides[1:]..., box..., elem_strides...,
    #                        interleave=0, swizzle=3 (128B), l2_promotion=2 (128B), oob_fill=0 (zeros))
    a_map_args = (K, MP, K * 2, BK, BM, 1, 1, 0, 3, 2, 0)
    b_map_args = (K, E * N, K * 2, BK, BN, 1, 1, 0, 3, 2, 0)

    def col_ok(col):
        return col < N if col_guard else tvm.tirx.const(True, "bool")

    # fmt: off
    @T.prim_func
    def gemm(A: T.Buffer((MP, K), dtype), W: T.Buffer((E, N, K), dtype), BE: T.Buffer((NB,), "int32"),
             C: T.Buffer((MP, N), dtype)):
        A_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        T.call_packed("runtime.cuTensorMapEncodeTiled", A_map, dtype, 2, A.data, *a_map_args)
        B_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        T.call_packed("runtime.cuTensorMapEncodeTiled", B_map, dtype, 2, W.data, *b_map_args)

        T.device_entry()
        bid = T.cta_id([GRID])
        wg = T.warpgroup_id([1 + NC])
        tid = T.thread_id([NT])
        smem = T.alloc_buffer((SMEM,), "uint8", scope="shared.dyn", align=1024)
        As = T.decl_buffer((S * A_STAGE,), dtype, data=smem.data, elem_offset=0, scope="shared.dyn")
        Bs = T.decl_buffer((S * B_STAGE,), dtype, data=smem.data, elem_offset=S * A_STAGE, scope="shared.dyn")
        bars = T.decl_buffer((2 * S,), "uint64", data=smem.data, elem_offset=BAR_OFF // 8, scope="shared.dyn")

        if BE[bid % NB] >= 0:           # uniform per CTA: an unused block exits before any barrier
            if tid == 0:
                for s in T.unroll(S):
                    T.ptx.mbarrier.init.shared.b64(T.address_of(bars[s]), T.uint32(1))
                    T.ptx.mbarrier.init.shared.b64(T.address_of(bars[S + s]), T.uint32(4 * NC))
                T.ptx.fence.mbarrier_init.release.cluster()
            T.ptx.fence.proxy.async_.shared__cta()
            T.cuda.cta_sync()

            if wg == 0:
                # ---------------- producer: one thread issues the TMA loads of the block's rows and expert
                if use_setmaxnreg:
                    T.ptx["setmaxnreg.dec.sync.aligned.u32"](_REG_PRODUCER)
                if tid == 0:
                    for kt in T.serial(num_k):
                        T.cuda.func_call("kiln_mbar_wait", T.address_of(bars[S + kt % S]), ((kt // S) % 2) ^ 1,
                                         source_code=wait_src)
                        T.ptx.mbarrier.arrive.expect_tx.shared.b64(T.address_of(bars[kt % S]), T.uint32(TX_BYTES))
                        T.ptx[_TMA_LOAD](T.address_of(As[(kt % S) * A_STAGE]), T.address_of(A_map),
                                         kt * BK, (bid % NB) * BM, T.address_of(bars[kt % S]))
                        T.ptx[_TMA_LOAD](T.address_of(Bs[(kt % S) * B_STAGE]), T.address_of(B_map),
                                         kt * BK, BE[bid % NB] * N + (bid // NB) * BN, T.address_of(bars[kt % S]))
            else:
                # ---------------- consumers: wgmma from the ring, fp32 accumulators, 16-byte stores
                if use_setmaxnreg:
                    T.ptx["setmaxnreg.inc.sync.aligned.u32"](_REG_CONSUMER)
                acc = T.alloc_buffer((ACC,), "float32", scope="local")
                desc_a: T.uint64
                desc_b: T.uint64
                t = tid % 128
                T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc_a), T.address_of(As[0]), 1, 64, 3)
                T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc_b), T.address_of(Bs[0]), 1, 64, 3)
                for i in T.unroll(ACC):
                    acc[i] = T.float32(0)
                for i in T.unroll(ACC // 4):
                    T.cuda.func_call("kiln_acc_fence4", acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3],
                                     source_code=fence_src)
                for kt in T.serial(num_k):
                    T.cuda.func_call("kiln_mbar_wait", T.address_of(bars[kt % S]), (kt // S) % 2,
                                     source_code=wait_src)
                    T.ptx.wgmma.fence.sync.aligned()
                    for kk in T.unroll(KSTEPS):
                        T.ptx[wgmma](
                            *[acc[i] for i in range(ACC)],
                            desc_a + T.Cast("uint64", ((kt % S) * A_STAGE_B + (wg - 1) * 64 * BK * 2 + kk * 32) // 16),
                            desc_b + T.Cast("uint64", ((kt % S) * B_STAGE_B + kk * 32) // 16),
                            True, 1, 1, 0, 0)
                    T.ptx.wgmma.commit_group.sync.aligned()
                    T.ptx.wgmma.wait_group.sync.aligned(1)
                    if kt > 0:                  # the previous slot has been read by its wgmma: free it
                        if t % 32 == 0:
                            T.ptx.mbarrier.arrive.shared.b64(T.address_of(bars[S + (kt - 1) % S]))
                T.ptx.wgmma.wait_group.sync.aligned(0)
                for i in T.unroll(ACC // 4):
                    T.cuda.func_call("kiln_acc_fence4", acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3],
                                     source_code=fence_src)
                # fragment of m64nNk16 (f32): thread t holds rows r0 = 16*(t/32) + (t%32)/4 and r0 + 8, columns
                # 8*j + 2*(t%4) + {0, 1}, as acc[4j + {0, 1}] (row r0) and acc[4j + {2, 3}] (row r0 + 8)
                n0 = (bid // NB) * BN
                r0 = (bid % NB) * BM + (wg - 1) * 64 + (t // 32) * 16 + (t % 32) // 4
                for g in T.unroll(BN // 32):
                    for h in T.unroll(2):
                        T.cuda.func_call(
                            quad, T.address_of(C[r0 + 8 * h, n0 + 32 * g]), col_ok(n0 + 32 * g + 8 * (t % 4)),
                            *[acc[4 * (4 * g + jj) + 2 * h + e] for jj in range(4) for e in range(2)],
                            source_code=quad_src)
    # fmt: on
    return gemm.with_attrs({"global_symbol": name, "tirx.is_scheduled": True, "kiln.gemm_config": cfg.name()})
