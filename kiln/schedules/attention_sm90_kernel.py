"""The TIRx kernel of kiln's sm_90a flash attention (forward), written by hand.

``O = softmax(Q K^T * scale + kpad + causal_mask) V`` for one ``(query block, head, batch)`` per CTA,
``128 * (1 + consumers)`` threads:

* warpgroup 0 is the **producer** (``setmaxnreg.dec``): one thread loads the CTA's Q tile once, then
  walks the KV tiles: per tile it waits for a free ring slot (``empty`` mbarriers), arms the slot's
  ``full`` mbarrier with the byte count and issues 4-D TMA loads (``cp.async.bulk.tensor.4d``,
  128-byte swizzle, one load per 64-column panel of the head dim) of the K and the V tile. K and V
  have separate full/empty barriers so that ``Q K^T`` starts before V has landed.
* warpgroups 1..consumers are **consumers** (``setmaxnreg.inc``), each owning 64 query rows:
  ``S = Q K^T`` by ``wgmma m64n{block_n}k16`` with both operands in shared memory (K-major
  descriptors), the online softmax on the fp32 fragment in registers (``ex2.approx`` with
  ``log2(e)`` folded into the scale, row max/sum across the 4 threads of a quad by shuffles), P cast
  to 16-bit in registers and ``O += P V`` by ``wgmma m64n{head_dim}k16`` with A from registers (the
  S accumulator fragment of 16 keys *is* the A fragment of one k16 step, so no shuffle is needed)
  and V read transposed (MN-major descriptor, ``imm-trans-b = 1``) from its natural ``[kv, d]``
  row-major tile.
* ``overlap`` (FA3's intra-warpgroup pipelining): tile n's ``Q K^T`` and tile n-1's ``P V`` are
  issued back to back, and tile n's softmax runs while ``P V`` is on the tensor cores.
  ``pingpong`` (2 or 3 consumers): named barriers let the consumers take turns (round robin) issuing
  their GEMMs, so one warpgroup's softmax overlaps the others' GEMMs.
* epilogue: ``O / l`` (0 where ``l == 0``, i.e. every key of the row was masked with ``-inf``),
  cast, staged in the (no longer needed) Q tile in the 128-byte swizzled layout and stored by a
  4-D TMA store (rows past ``seq_q`` are clipped by TMA), or with ``tma_store=False`` stored from
  registers as column pairs predicated on ``row < seq_q``.
* ``persistent``: a grid of ``num_sms`` CTAs walks the tiles; Q has an ``empty`` mbarrier (released
  after the tile's last ``Q K^T``), the K/V ring counters run on across tiles and O is staged in its
  own buffer, so the next tile's loads overlap this tile's last ``P V`` and epilogue.

Masking: a KV tile that may contain masked keys (the sequence tail without ``kpad``; the causal
diagonal) runs a masked copy of the softmax; the other tiles run the unmasked copy. TMA zero-fills
rows past ``seq_kv`` (K and V) and past ``seq_q`` (Q). With ``kpad`` the bias is read per key
(``-inf`` past ``seq_kv``); ``kpad * log2(e)`` is clamped to ``-FLT_MAX`` so that a large finite
bias (``torch.finfo(float32).min``) stays finite, as in torch, and only ``-inf`` masks a key.

Every mbarrier wait has a ~2 s watchdog that traps (a pipeline bug fails the launch instead of
hanging the GPU).
"""
from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .cuda_snippets import mbar_wait_flag_src, mbar_wait_src, trap_if_src

__all__ = ["build_attention_kernel", "LOG2E", "CONSUMER_REGS"]

LOG2E = 1.4426950408889634
_FLT_MAX = 3.4028234663852886e38
_NEG_INF = float("-inf")
_PTX_AB = {"float16": "f16", "bfloat16": "bf16"}
_TMA_LOAD4 = "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
_TMA_STORE4 = "cp.async.bulk.tensor.4d.global.shared::cta.bulk_group"
#: consumers -> (producer, consumer) setmaxnreg values (128*p + 128*c*n <= 65536), None: not used
CONSUMER_REGS = {1: (None, 255), 2: (24, 240), 3: (32, 160)}

# the producer's mbarrier wait, with the trapping ~2 s watchdog
_WAIT_SRC = mbar_wait_src("kiln_fa_wait")
# The consumers' wait: a `trap` anywhere in the wgmma code makes ptxas ignore the setmaxnreg budget
# there (spills and serialised wgmma, C7512), so on timeout it sets a sticky flag and returns (later
# waits return at once); the consumer traps after its last wgmma.
_WAIT_FLAG_SRC = mbar_wait_flag_src("kiln_fa_wait_flag")
_TRAP_IF_SRC = trap_if_src("kiln_fa_trap_if")
# By-reference register fences: the wgmma helpers bind accumulators ("+f") and the A fragment ("r")
# at issue time, but wgmma.wait_group names no register; these pin reads after the wait and keep
# the P registers alive (unrenamed) until the wgmma that reads them has completed.
_FENCE_F_SRC = """
__forceinline__ __device__ void kiln_fa_fence_f(float& a, float& b, float& c, float& d) {
  asm volatile("" : "+f"(a), "+f"(b), "+f"(c), "+f"(d) :: "memory");
}
"""
_FENCE_U_SRC = """
__forceinline__ __device__ void kiln_fa_fence_u(unsigned int& a, unsigned int& b, unsigned int& c, unsigned int& d) {
  asm volatile("" : "+r"(a), "+r"(b), "+r"(c), "+r"(d) :: "memory");
}
"""
_EX2_SRC = """
__forceinline__ __device__ float kiln_fa_ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
"""
# Row statistics: a row of the m64 fragment lives in the 4 threads of a quad (lanes 4r..4r+3).
_QUAD_MAX_SRC = """
__forceinline__ __device__ float kiln_fa_quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}
"""
_QUAD_SUM_SRC = """
__forceinline__ __device__ float kiln_fa_quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}
"""
_PACK_SRC = {
    "float16": """
__forceinline__ __device__ unsigned int kiln_fa_pack_f16(float a, float b) {
  __half2 v = __floats2half2_rn(a, b);
  return *reinterpret_cast<unsigned int*>(&v);
}
""",
    "bfloat16": """
__forceinline__ __device__ unsigned int kiln_fa_pack_bf16(float a, float b) {
  __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<unsigned int*>(&v);
}
""",
}
_PACK_NAME = {"float16": "kiln_fa_pack_f16", "bfloat16": "kiln_fa_pack_bf16"}
_STORE_SRC = """
__forceinline__ __device__ void kiln_fa_store_u32(void* p, unsigned int v) {
  *reinterpret_cast<unsigned int*>(p) = v;
}
"""


def _wgmma_zero_init(n: int, ab: str) -> tuple[str, str]:
    """``D = A B`` (scale-d 0) for the first k16 step of ``S = Q K^T``, with the accumulators bound as
    outputs only (``"=f"``). The table's wgmma binds them ``"+f"``, which keeps the previous tile's
    (already converted) S values alive across the loop and runs the kernel out of registers (ptxas
    then serialises every wgmma, C7512)."""
    regs = n // 2
    name = f"kiln_fa_wgmma_m64n{n}k16_{ab}_zero"
    params = ", ".join(f"float& d{i}" for i in range(regs))
    outs = ", ".join(f"%{i}" for i in range(regs))
    cons = ", ".join(f'"=f"(d{i})' for i in range(regs))
    src = (f"\n__forceinline__ __device__ void {name}({params}, unsigned long long da, unsigned long long db) {{\n"
           f"  asm volatile(\"{{ .reg .pred p; setp.ne.b32 p, %{regs + 2}, 0; "
           f"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ab}.{ab} {{{outs}}}, "
           f"%{regs}, %{regs + 1}, p, 1, 1, 0, 0; }}\"\n"
           f"               : {cons} : \"l\"(da), \"l\"(db), \"r\"(0));\n}}\n")
    return name, src


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tree(vals, op):
    """Balanced reduction tree (short dependency chains for the row max / row sum)."""
    vals = list(vals)
    while len(vals) > 1:
        nxt = [op(vals[i], vals[i + 1]) for i in range(0, len(vals) - 1, 2)]
        if len(vals) % 2:
            nxt.append(vals[-1])
        vals = nxt
    return vals[0]


def build_attention_kernel(B: int, SQ: int, SKV: int, HQ: int, HKV: int, D: int, dtype: str,
                           causal: bool, has_kpad: bool, scale: float, cfg,
                           name: str = "kiln_flash_attention_sm90", num_sms: int = 132) -> tvm.tirx.PrimFunc:
    """The PrimFunc ``(Q[B,SQ,HQ,D], K[B,SKV,HKV,D], V[B,SKV,HKV,D], [kpad[B,SKV] f32], O[B,SQ,HQ,D])``.

    Validity of the problem and of ``cfg`` (an ``AttentionConfig``) is the caller's job. With
    ``cfg.persistent`` (and more tiles than ``num_sms``) the grid is ``num_sms`` CTAs that walk the
    (query block, head, batch) tiles ``bid, bid + num_sms, ...``: the K/V ring's stage/phase counter runs
    on across tiles, Q has an ``empty`` barrier (released after the tile's last ``Q K^T``) so the next
    tile's Q and K/V load during this tile's last ``P V`` and epilogue, and O is staged in its own buffer.
    """
    BM, BN, S, NC = cfg.block_m, cfg.block_n, cfg.stages, cfg.consumers
    NT = 128 * (1 + NC)
    NP = D // 64                                    # 64-column (128-byte) panels of the head dim
    num_m, num_n = _cdiv(SQ, BM), _cdiv(SKV, BN)
    dynamic = not isinstance(B, int)     # B a tirx.Var: one kernel for every batch, on the persistent grid
    if dynamic and not getattr(cfg, "persistent", False):
        raise ValueError("a dynamic-batch attention kernel needs a persistent config (its grid cannot depend on B)")
    # tile arithmetic in int32 (Relax shape variables are int64)
    BH = (tvm.tirx.Cast("int32", B) if dynamic and str(B.ty) != "int32" else B) * HQ
    NUM_TILES = num_m * BH
    persistent = bool(getattr(cfg, "persistent", False)) and (dynamic or NUM_TILES > num_sms)
    GRID = num_sms if persistent else NUM_TILES
    b_limit_msg = (f"kiln flash attention: batch * {max(SQ * HQ, SKV * HKV) * D} elements must be < 2^31 "
                   "(32-bit indexing)")
    GROUP = HQ // HKV
    Q_PANEL, KV_PANEL = BM * 128, BN * 128          # bytes of one panel (rows x 128 B)
    Q_BYTES, KV_BYTES = NP * Q_PANEL, NP * KV_PANEL
    K_OFF = Q_BYTES
    V_OFF = Q_BYTES + S * KV_BYTES
    O_OFF = V_OFF + S * KV_BYTES if persistent else 0   # O staging: own buffer, or the finished Q tile
    BAR_OFF = V_OFF + S * KV_BYTES + (Q_BYTES if persistent else 0)
    NBAR = 2 + 4 * S                                # q_full, q_empty, k_full[S], k_empty[S], v_full[S], v_empty[S]
    SMEM = BAR_OFF + 8 * NBAR
    QF, QE, KF, KE, VF, VE = 0, 1, 2, 2 + S, 2 + 2 * S, 2 + 3 * S
    SACC, OACC, PREG = BN // 2, D // 2, BN // 4
    ab = _PTX_AB[dtype]
    wgmma_qk = f"wgmma.mma_async.sync.aligned.m64n{BN}k16.f32.{ab}.{ab}"
    wgmma_pv = f"wgmma.mma_async.sync.aligned.m64n{D}k16.f32.{ab}.{ab}"
    reg_prod, reg_cons = CONSUMER_REGS[NC]
    use_setmaxnreg = reg_prod is not None
    overlap, pingpong, tma_store = cfg.overlap, cfg.pingpong and NC >= 2, cfg.tma_store
    # named barriers: 0 = __syncthreads, 1 + c = consumer c's issue turn, 1 + NC + c = its epilogue
    sl2 = float(scale) * LOG2E
    # prescale: x = S*scale*log2e (+ bias) is formed before the row max (needed with a bias, or a
    # scale <= 0); otherwise the max is taken on raw S and the scale folded into one FFMA with ex2.
    prescale = has_kpad or not scale > 0
    tail_mask = SKV % BN != 0 and not has_kpad       # with kpad, keys past SKV read a -inf bias
    mask_code = tail_mask or causal
    pack, pack_src = _PACK_NAME[dtype], _PACK_SRC[dtype]
    qk_zero, qk_zero_src = _wgmma_zero_init(BN, ab)
    f32 = lambda v: tvm.tirx.const(v, "float32")  # noqa: E731
    neg_inf = f32(_NEG_INF)

    # cuTensorMapEncodeTiled(map, dtype, rank 4, ptr, dims (D, H, S, B) innermost first, byte strides
    # of dims 1..3, box, element strides, interleave 0, swizzle 3 (128B), L2 promotion 2, OOB fill 0)
    q_map_args = (D, HQ, SQ, B, D * 2, HQ * D * 2, SQ * HQ * D * 2, 64, 1, BM, 1, 1, 1, 1, 1, 0, 3, 2, 0)
    kv_map_args = (D, HKV, SKV, B, D * 2, HKV * D * 2, SKV * HKV * D * 2, 64, 1, BN, 1, 1, 1, 1, 1, 0, 3, 2, 0)
    o_map_args = (D, HQ, SQ, B, D * 2, HQ * D * 2, SQ * HQ * D * 2, 64, 1, 64, 1, 1, 1, 1, 1, 0, 3, 2, 0)

    # tile -> (query block, batch*head); the query block is the slowest index so that the CTAs of one
    # wave share K/V heads in L2; causal runs the longest (last) query blocks first.
    def tile_m0(tile):
        mi = tile // BH
        return ((num_m - 1 - mi) if causal else mi) * BM

    def kv_tiles(m0):
        return (T.min(m0 + BM, SKV) + (BN - 1)) // BN if causal else num_n

    def local_tiles(bid):
        return (NUM_TILES - bid + (GRID - 1)) // GRID if persistent else 1

    def tile_needs_mask(n, m0, c):
        conds = []
        if tail_mask:
            conds.append((n + 1) * BN > SKV)
        if causal:
            conds.append((n + 1) * BN - 1 > m0 + 64 * c)
        return tvm.tirx.any(*conds)

    def masked(x, col, row):
        conds = []
        if tail_mask:
            conds.append(col >= SKV)
        if causal:
            conds.append(col > row)
        return T.if_then_else(tvm.tirx.any(*conds), neg_inf, x)

    def kpad_log2(kp, b, col):
        v = T.if_then_else(col < SKV, kp[b, col], neg_inf) if SKV % BN else kp[b, col]
        return T.if_then_else(v == neg_inf, neg_inf, T.max(v * f32(LOG2E), f32(-_FLT_MAX)))

    def wait(bar, parity):
        return T.cuda.func_call("kiln_fa_wait", T.address_of(bar), parity, source_code=_WAIT_SRC)

    def cwait(bar, parity, flag):
        return T.cuda.func_call("kiln_fa_wait_flag", T.address_of(bar), parity, flag, source_code=_WAIT_FLAG_SRC)

    def ex2(x):
        return T.cuda.func_call("kiln_fa_ex2", x, source_code=_EX2_SRC, return_type="float32")

    def quad_max(x):
        return T.cuda.func_call("kiln_fa_quad_max", x, source_code=_QUAD_MAX_SRC, return_type="float32")

    def quad_sum(x):
        return T.cuda.func_call("kiln_fa_quad_sum", x, source_code=_QUAD_SUM_SRC, return_type="float32")

    def pack2(a, b):
        return T.cuda.func_call(pack, a, b, source_code=pack_src, return_type="uint32")

    # fmt: off
    @T.prim_func
    def attn(Q: T.Buffer((B, SQ, HQ, D), dtype), K: T.Buffer((B, SKV, HKV, D), dtype),
             V: T.Buffer((B, SKV, HKV, D), dtype), Kpad: T.Buffer((B, SKV), "float32"),
             O: T.Buffer((B, SQ, HQ, D), dtype)):
        if dynamic:
            assert T.Cast("int64", B) * (max(SQ * HQ, SKV * HKV) * D) < 2**31, b_limit_msg
        Q_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        T.call_packed("runtime.cuTensorMapEncodeTiled", Q_map, dtype, 4, Q.data, *q_map_args)
        K_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        T.call_packed("runtime.cuTensorMapEncodeTiled", K_map, dtype, 4, K.data, *kv_map_args)
        V_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        T.call_packed("runtime.cuTensorMapEncodeTiled", V_map, dtype, 4, V.data, *kv_map_args)
        O_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        T.call_packed("runtime.cuTensorMapEncodeTiled", O_map, dtype, 4, O.data, *o_map_args)

        T.device_entry()
        # __launch_bounds__(threads, 1): without the min-blocks bound ptxas allocates every warpgroup
        # 65536/threads registers (168 for 384 threads) and spills, whatever setmaxnreg grants.
        T.attr({"tirx.launch_bounds_min_blocks_per_sm": 1})
        bid = T.cta_id([GRID])
        wg = T.warpgroup_id([1 + NC])
        tid = T.thread_id([NT])
        smem = T.alloc_buffer((SMEM,), "uint8", scope="shared.dyn", align=1024)
        Qs = T.decl_buffer((Q_BYTES // 2,), dtype, data=smem.data, elem_offset=0, scope="shared.dyn")
        Os = T.decl_buffer((Q_BYTES // 4,), "uint32", data=smem.data, elem_offset=O_OFF // 4, scope="shared.dyn")
        Oh = T.decl_buffer((Q_BYTES // 2,), dtype, data=smem.data, elem_offset=O_OFF // 2, scope="shared.dyn")
        Ks = T.decl_buffer((S * KV_BYTES // 2,), dtype, data=smem.data, elem_offset=K_OFF // 2, scope="shared.dyn")
        Vs = T.decl_buffer((S * KV_BYTES // 2,), dtype, data=smem.data, elem_offset=V_OFF // 2, scope="shared.dyn")
        bars = T.decl_buffer((NBAR,), "uint64", data=smem.data, elem_offset=BAR_OFF // 8, scope="shared.dyn")

        if tid == 0:
            T.ptx.mbarrier.init.shared.b64(T.address_of(bars[QF]), T.uint32(1))
            T.ptx.mbarrier.init.shared.b64(T.address_of(bars[QE]), T.uint32(4 * NC))
            for s in T.unroll(S):
                T.ptx.mbarrier.init.shared.b64(T.address_of(bars[KF + s]), T.uint32(1))
                T.ptx.mbarrier.init.shared.b64(T.address_of(bars[KE + s]), T.uint32(4 * NC))
                T.ptx.mbarrier.init.shared.b64(T.address_of(bars[VF + s]), T.uint32(1))
                T.ptx.mbarrier.init.shared.b64(T.address_of(bars[VE + s]), T.uint32(4 * NC))
            T.ptx.fence.mbarrier_init.release.cluster()
        T.ptx.fence.proxy.async_.shared__cta()
        T.cuda.cta_sync()

        if wg == 0:
            # ---------------- producer: one thread issues every TMA load, running ahead across tiles
            if use_setmaxnreg:
                T.ptx["setmaxnreg.dec.sync.aligned.u32"](reg_prod)
            if tid == 0:
                pkv = T.alloc_buffer((1,), "int32", scope="local")     # KV tiles loaded by earlier tiles
                pkv[0] = 0
                for lt in T.serial(local_tiles(bid)):
                    ptile = bid + lt * GRID
                    pbh = ptile % BH
                    pm0 = tile_m0(ptile)
                    wait(bars[QE], (lt % 2) ^ 1)
                    T.ptx.mbarrier.arrive.expect_tx.shared.b64(T.address_of(bars[QF]), T.uint32(Q_BYTES))
                    for p in T.unroll(NP):
                        T.ptx[_TMA_LOAD4](T.address_of(Qs[p * (Q_PANEL // 2)]), T.address_of(Q_map),
                                          p * 64, pbh % HQ, pm0, pbh // HQ, T.address_of(bars[QF]))
                    for n in T.serial(kv_tiles(pm0)):
                        it = pkv[0] + n
                        wait(bars[KE + it % S], ((it // S) % 2) ^ 1)
                        T.ptx.mbarrier.arrive.expect_tx.shared.b64(T.address_of(bars[KF + it % S]), T.uint32(KV_BYTES))
                        for p in T.unroll(NP):
                            T.ptx[_TMA_LOAD4](T.address_of(Ks[(it % S) * (KV_BYTES // 2) + p * (KV_PANEL // 2)]),
                                              T.address_of(K_map), p * 64, (pbh % HQ) // GROUP, n * BN, pbh // HQ,
                                              T.address_of(bars[KF + it % S]))
                        wait(bars[VE + it % S], ((it // S) % 2) ^ 1)
                        T.ptx.mbarrier.arrive.expect_tx.shared.b64(T.address_of(bars[VF + it % S]), T.uint32(KV_BYTES))
                        for p in T.unroll(NP):
                            T.ptx[_TMA_LOAD4](T.address_of(Vs[(it % S) * (KV_BYTES // 2) + p * (KV_PANEL // 2)]),
                                              T.address_of(V_map), p * 64, (pbh % HQ) // GROUP, n * BN, pbh // HQ,
                                              T.address_of(bars[VF + it % S]))
                    pkv[0] = pkv[0] + kv_tiles(pm0)
        else:
            # ---------------- consumers: 64 query rows each
            if use_setmaxnreg:
                T.ptx["setmaxnreg.inc.sync.aligned.u32"](reg_cons)
            c = wg - 1
            t = tid % 128
            lane = t % 32
            tig = lane % 4
            sacc = T.alloc_buffer((SACC,), "float32", scope="local")
            oacc = T.alloc_buffer((OACC,), "float32", scope="local")
            preg = T.alloc_buffer((PREG,), "uint32", scope="local")
            m_i = T.alloc_buffer((2,), "float32", scope="local")
            l_i = T.alloc_buffer((2,), "float32", scope="local")
            alpha = T.alloc_buffer((2,), "float32", scope="local")
            timed_out = T.alloc_buffer((1,), "int32", scope="local")
            kv = T.alloc_buffer((1,), "int32", scope="local")           # KV tiles consumed by earlier tiles
            desc_q: T.uint64
            desc_k: T.uint64
            desc_v: T.uint64
            # Q, K: K-major, 128B swizzle (LBO unused, SBO = 1024 B between 8-row groups); +32 B per k16
            # step inside a 128-byte panel. V: MN-major (read transposed): LBO = one panel (the next 64
            # head-dim columns), SBO = 1024 B (the next 8 keys); +2048 B per k16 step (16 keys).
            T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc_q), T.address_of(Qs[0]), 1, 64, 3)
            T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc_k), T.address_of(Ks[0]), 1, 64, 3)
            T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc_v), T.address_of(Vs[0]), KV_PANEL // 16, 64, 3)

            @T.inline
            def fence_s():
                for i in T.unroll(SACC // 4):
                    T.cuda.func_call("kiln_fa_fence_f", sacc[4 * i], sacc[4 * i + 1], sacc[4 * i + 2],
                                     sacc[4 * i + 3], source_code=_FENCE_F_SRC)

            @T.inline
            def fence_o():
                for i in T.unroll(OACC // 4):
                    T.cuda.func_call("kiln_fa_fence_f", oacc[4 * i], oacc[4 * i + 1], oacc[4 * i + 2],
                                     oacc[4 * i + 3], source_code=_FENCE_F_SRC)

            @T.inline
            def fence_p():
                for i in T.unroll(PREG // 4):
                    T.cuda.func_call("kiln_fa_fence_u", preg[4 * i], preg[4 * i + 1], preg[4 * i + 2],
                                     preg[4 * i + 3], source_code=_FENCE_U_SRC)

            @T.inline
            def release(idx):
                if t % 32 == 0:
                    T.ptx.mbarrier.arrive.shared.b64(T.address_of(bars[idx]))

            @T.inline
            def issue_qk(it):
                cwait(bars[KF + it % S], (it // S) % 2, timed_out[0])
                if pingpong:
                    T.ptx.bar.sync(T.Cast("uint32", 1 + c), 256)              # this consumer's turn to issue
                T.ptx.wgmma.fence.sync.aligned()
                T.cuda.func_call(qk_zero, *[sacc[i] for i in range(SACC)], desc_q + T.Cast("uint64", c * 512),
                                 desc_k + T.Cast("uint64", (it % S) * (KV_BYTES // 16)), source_code=qk_zero_src)
                for kk in T.unroll(1, D // 16):
                    T.ptx[wgmma_qk](
                        *[sacc[i] for i in range(SACC)],
                        desc_q + T.Cast("uint64", ((kk // 4) * Q_PANEL + c * 8192 + (kk % 4) * 32) // 16),
                        desc_k + T.Cast("uint64", ((it % S) * KV_BYTES + (kk // 4) * KV_PANEL + (kk % 4) * 32) // 16),
                        True, 1, 1, 0, 0)
                T.ptx.wgmma.commit_group.sync.aligned()

            @T.inline
            def issue_pv(it):
                cwait(bars[VF + it % S], (it // S) % 2, timed_out[0])
                T.ptx.wgmma.fence.sync.aligned()
                for kk in T.unroll(BN // 16):
                    T.ptx[wgmma_pv](
                        *[oacc[i] for i in range(OACC)],
                        preg[4 * kk], preg[4 * kk + 1], preg[4 * kk + 2], preg[4 * kk + 3],
                        desc_v + T.Cast("uint64", ((it % S) * KV_BYTES + kk * 2048) // 16),
                        True, 1, 1, 1)
                T.ptx.wgmma.commit_group.sync.aligned()

            @T.inline
            def softmax_body(n, b, row0, with_mask):
                # fragment of m64nNk16 (f32): element 4j + 2hh + e is row row0 + 8hh, column 8j + 2tig + e
                if has_kpad:
                    # one bias per key (column), shared by the thread's two rows
                    for j in T.unroll(BN // 8):
                        for e in T.unroll(2):
                            bias_v = kpad_log2(Kpad, b, n * BN + 8 * j + 2 * tig + e)
                            for hh in T.unroll(2):
                                sacc[4 * j + 2 * hh + e] = sacc[4 * j + 2 * hh + e] * f32(sl2) + bias_v
                elif prescale:
                    for i in T.unroll(SACC):
                        sacc[i] = sacc[i] * f32(sl2)
                if with_mask:
                    for j in T.unroll(BN // 8):
                        for hh in T.unroll(2):
                            for e in T.unroll(2):
                                sacc[4 * j + 2 * hh + e] = masked(sacc[4 * j + 2 * hh + e],
                                                                  n * BN + 8 * j + 2 * tig + e, row0 + 8 * hh)
                for hh in T.unroll(2):
                    mx = quad_max(_tree([sacc[4 * j + 2 * hh + e] for j in range(BN // 8) for e in range(2)],
                                        tvm.tirx.max))
                    if prescale:
                        m_new = T.max(m_i[hh], mx)
                    else:
                        m_new = T.max(m_i[hh], mx * f32(sl2))
                    m_use = T.if_then_else(m_new == neg_inf, f32(0.0), m_new)   # a fully masked row so far
                    alpha[hh] = ex2(m_i[hh] - m_use)
                    m_i[hh] = m_new
                    for j in T.unroll(BN // 8):
                        for e in T.unroll(2):
                            if prescale:
                                sacc[4 * j + 2 * hh + e] = ex2(sacc[4 * j + 2 * hh + e] - m_use)
                            else:
                                sacc[4 * j + 2 * hh + e] = ex2(sacc[4 * j + 2 * hh + e] * f32(sl2) - m_use)
                    l_i[hh] = l_i[hh] * alpha[hh] + _tree(
                        [sacc[4 * j + 2 * hh + e] for j in range(BN // 8) for e in range(2)], lambda x, y: x + y)

            @T.inline
            def softmax(n, b, m0, row0):
                if mask_code:
                    if tile_needs_mask(n, m0, c):
                        softmax_body(n, b, row0, True)
                    else:
                        softmax_body(n, b, row0, False)
                else:
                    softmax_body(n, b, row0, False)

            @T.inline
            def rescale():
                for j in T.unroll(D // 8):
                    for hh in T.unroll(2):
                        for e in T.unroll(2):
                            oacc[4 * j + 2 * hh + e] = oacc[4 * j + 2 * hh + e] * alpha[hh]

            @T.inline
            def convert():
                # the S fragment of keys 16kk..16kk+15 (elements 8kk..8kk+7) is the A fragment of k-step kk
                for i in T.unroll(PREG):
                    preg[i] = pack2(sacc[2 * i], sacc[2 * i + 1])

            timed_out[0] = 0
            kv[0] = 0
            if pingpong:
                if c == NC - 1:
                    T.ptx.bar.arrive(1, 256)            # consumer 0 issues first
            for lt in T.serial(local_tiles(bid)):
                tile = bid + lt * GRID
                bh = tile % BH
                b = bh // HQ
                h = bh % HQ
                m0 = tile_m0(tile)
                n_tiles = kv_tiles(m0)
                row0 = m0 + c * 64 + (t // 32) * 16 + lane // 4          # this thread's rows: row0, row0 + 8
                for i in T.unroll(OACC):
                    oacc[i] = f32(0.0)
                for hh in T.unroll(2):
                    m_i[hh] = neg_inf
                    l_i[hh] = f32(0.0)
                    alpha[hh] = f32(0.0)
                fence_o()
                cwait(bars[QF], lt % 2, timed_out[0])

                if overlap:
                    # tile 0: S, softmax; then per tile n: issue S_n and P_{n-1} V_{n-1}, softmax S_n meanwhile
                    issue_qk(kv[0])
                    if pingpong:
                        T.ptx.bar.arrive(T.Cast("uint32", 1 + (c + 1) % NC), 256)
                    T.ptx.wgmma.wait_group.sync.aligned(0)
                    fence_s()
                    release(KE + kv[0] % S)
                    if n_tiles == 1:
                        release(QE)                         # Q is free once the tile's last Q K^T is done
                    softmax(0, b, m0, row0)
                    convert()
                    for n in T.serial(1, n_tiles):
                        issue_qk(kv[0] + n)
                        rescale()
                        issue_pv(kv[0] + n - 1)
                        if pingpong:
                            T.ptx.bar.arrive(T.Cast("uint32", 1 + (c + 1) % NC), 256)   # the next consumer's turn
                        T.ptx.wgmma.wait_group.sync.aligned(1)
                        fence_s()
                        release(KE + (kv[0] + n) % S)
                        if n == n_tiles - 1:
                            release(QE)
                        softmax(n, b, m0, row0)
                        T.ptx.wgmma.wait_group.sync.aligned(0)
                        fence_o()
                        fence_p()
                        release(VE + (kv[0] + n - 1) % S)
                        convert()
                    rescale()
                    issue_pv(kv[0] + n_tiles - 1)
                    T.ptx.wgmma.wait_group.sync.aligned(0)
                    fence_o()
                    fence_p()
                    release(VE + (kv[0] + n_tiles - 1) % S)
                else:
                    for n in T.serial(n_tiles):
                        issue_qk(kv[0] + n)
                        T.ptx.wgmma.wait_group.sync.aligned(0)
                        fence_s()
                        release(KE + (kv[0] + n) % S)
                        if n == n_tiles - 1:
                            release(QE)
                        softmax(n, b, m0, row0)
                        rescale()
                        convert()
                        issue_pv(kv[0] + n)
                        T.ptx.wgmma.wait_group.sync.aligned(0)
                        fence_o()
                        fence_p()
                        release(VE + (kv[0] + n) % S)
                kv[0] = kv[0] + n_tiles

                # ---------------- epilogue: O / l (0 for a row whose every key was masked with -inf)
                for hh in T.unroll(2):
                    l_tot = quad_sum(l_i[hh])
                    alpha[hh] = T.if_then_else(l_tot > f32(0.0), f32(1.0) / l_tot, f32(0.0))
                if tma_store:
                    if persistent:
                        # the previous tile's TMA store must have read the staging buffer
                        if t == 0:
                            T.ptx["cp.async.bulk.wait_group.read"](0)
                        T.ptx.bar.sync(T.Cast("uint32", 1 + NC + c), 128)
                    # stage this consumer's 64 rows (128B-swizzled like the TMA box: 16-byte chunk index
                    # XOR row % 8), then one thread stores each 64-column panel
                    for j in T.unroll(D // 8):
                        for hh in T.unroll(2):
                            Os[((j // 8) * Q_PANEL + (c * 64 + (t // 32) * 16 + lane // 4 + 8 * hh) * 128
                                + T.bitwise_xor(j % 8, lane // 4) * 16 + tig * 4) // 4] = pack2(
                                oacc[4 * j + 2 * hh] * alpha[hh], oacc[4 * j + 2 * hh + 1] * alpha[hh])
                    T.ptx.fence.proxy.async_.shared__cta()
                    T.ptx.bar.sync(T.Cast("uint32", 1 + NC + c), 128)
                    if t == 0:
                        for p in T.unroll(NP):
                            T.ptx[_TMA_STORE4](T.address_of(O_map), p * 64, h, m0 + c * 64, b,
                                               T.address_of(Oh[(p * Q_PANEL + c * 8192) // 2]))
                        T.ptx["cp.async.bulk.commit_group"]()
                else:
                    for j in T.unroll(D // 8):
                        for hh in T.unroll(2):
                            if row0 + 8 * hh < SQ:
                                T.cuda.func_call(
                                    "kiln_fa_store_u32", T.address_of(O[b, row0 + 8 * hh, h, 8 * j + 2 * tig]),
                                    pack2(oacc[4 * j + 2 * hh] * alpha[hh], oacc[4 * j + 2 * hh + 1] * alpha[hh]),
                                    source_code=_STORE_SRC)
            if tma_store:
                if t == 0:
                    T.ptx["cp.async.bulk.wait_group.read"](0)     # smem must outlive the last store's reads
            T.cuda.func_call("kiln_fa_trap_if", timed_out[0], source_code=_TRAP_IF_SRC)
    # fmt: on

    params = [p for p in attn.params if has_kpad or p.name != "Kpad"]
    func = tvm.tirx.PrimFunc(params, attn.body, attn.ret_type, attn.attrs)
    return func.with_attr("global_symbol", name)
