"""The CUDA device code of the decode-step megakernel (:mod:`kiln.schedules.megakernel_kernel` wraps it in a TIRx
kernel and calls it through ``T.cuda.func_call``, as kiln's other hand-written kernels call their helpers).

One CTA per SM runs its worker's task list (:mod:`kiln.schedules.megakernel`) from an int32 *program*:

* **producer warp** (the last warp; lane 0): walks the task list and, for every GEMV task, streams its weight
  chunks (8 rows x ``KC`` columns) with 1-D TMA bulk copies (``cp.async.bulk ... mbarrier::complete_tx``, L2
  evict-first) into a ring of ``RING`` shared-memory slots guarded by full/empty mbarriers. It never waits on a
  task counter: weights are static, so it runs ahead of the consumers by up to the ring -- across task
  boundaries and across the counter waits of the next task (the prefetch that hides the synchronisation).
* **consumer warps** (the others): per task, thread 0 waits (acquire, gpu scope) until the task's counter
  reaches its count, a named barrier releases the warps, the task runs, another named barrier, then thread 0
  increments the task's counters with a release reduction. GEMV: ``mma.sync.m16n8k16`` with the activation rows
  as A (rows >= batch are zero) and 8 weight rows as B, k permuted so that both operands come from whole 16-byte
  loads (as kiln's GEMV), two accumulator chains; the warps split each chunk's columns; per 8-row group the warps'
  partial sums are reduced through shared memory and the epilogue (bias, rounding, residual, silu*up, logits) is
  applied. The activation rows are staged in shared memory once per task (``XS_BYTES``, shared with the attention
  scratch) and RMS-normalised there for qkv / gate_up / LM-head tasks; rows too large to stage are loaded from
  L2 one chunk ahead of their use, with the norm applied at use. (The H200 profile that led to this: NOTES,
  session 4.) Attention: RoPE of the group's q heads and of the new k into shared memory, the KV append
  by the split that owns position ``pos[b]``, then thread groups of ``D / 8`` lanes walk the split's keys
  with a base-2 online softmax per head, combined across the warp by shuffles and across warps through
  shared memory. Merge and embedding are element loops.

Activations written in this launch are read with ``ld.global.cg`` (L2, never a stale L1 line); every spin
loop (counter, mbarrier) traps after ~2 s so a schedule bug fails the launch instead of hanging the GPU.
"""
from __future__ import annotations

__all__ = ["DEVICE_CODE"]

# The namespace token MKNS is replaced by a per-kernel name; MKCONST by the instance's constants and its dtype
# functions (f32, cvt, pack2, unpack2, mma), so that kernels of several batch sizes / dtypes share one module.
DEVICE_CODE = r"""
namespace MKNS {
MKCONST
constexpr int NT = NCW * 32;                 // consumer threads
constexpr int ROWB = KC * ELEM + 64;         // smem bytes per weight row in a slot: +64 B moves the next row 16
                                             // banks, so the two rows one 8-lane phase of lds.128 reads never collide
constexpr int XPAD = 32;                     // the same for staged activation rows (elements)
constexpr int SLOT = 8 * ROWB;
constexpr int KCW = KC / NCW;                // columns of a chunk per consumer warp
constexpr int LD = D / 8;                    // lanes per key in attention
constexpr int KPW = 32 / LD;                 // keys per warp per step
constexpr int NG = NT / LD;                  // key groups per CTA
constexpr int QKVN = (HQ + 2 * KVH) * D;
constexpr float NEG = -1.0e30f;
constexpr long long WATCHDOG = 4000000000LL; // ~2 s at 1.98 GHz
enum { K_EMBED = 0, K_QKV = 1, K_ATTN = 2, K_MERGE = 3, K_O = 4, K_GU = 5, K_DOWN = 6, K_HEAD = 7 };
enum { P_IN = 0, P_QKVW = 1, P_QKVB = 2, P_OW = 3, P_OB = 4, P_POST = 5, P_GUW = 6, P_GUB = 7, P_DW = 8, P_DB = 9 };
constexpr int P_EMBED = 10 * L, P_NORM = 10 * L + 1, P_HEAD = 10 * L + 2, P_COS = 10 * L + 3, P_SIN = 10 * L + 4;
constexpr int NP = 10 * L + 5;

__device__ __forceinline__ float rnd(float v) { return f32(cvt(v)); }
__device__ __forceinline__ uint4 ldcg16(const void* p) {
  uint4 r;
  asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}
__device__ __forceinline__ float ldcgf(const float* p) {
  float r;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(r) : "l"(p));
  return r;
}
__device__ __forceinline__ dt ldcgh(const dt* p) {
  unsigned short r;
  asm volatile("ld.global.cg.u16 %0, [%1];" : "=h"(r) : "l"(p));
  return *reinterpret_cast<dt*>(&r);
}
__device__ __forceinline__ uint4 lds16(unsigned a) {
  uint4 r;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "r"(a));
  return r;
}
__device__ __forceinline__ unsigned smem_addr(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" :: "n"(NT) : "memory"); }

// ---- mbarriers (ring) and counters (tasks); every spin has a watchdog
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
  unsigned ok;
  long long t0 = 0;
  while (true) {
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(ok) : "r"(bar), "r"(parity) : "memory");
    if (ok) return;
    if (t0 == 0) t0 = clock64(); else if (clock64() - t0 > WATCHDOG) __trap();
  }
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_expect(unsigned bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_load(unsigned dst, const void* src, unsigned bytes, unsigned bar, unsigned long long pol) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
               :: "r"(dst), "l"(src), "r"(bytes), "r"(bar), "l"(pol) : "memory");
}
__device__ __forceinline__ void wait_counter(const unsigned* c, unsigned n) {
  long long t0 = 0;
  while (true) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(c) : "memory");
    if (v >= n) return;
    if (t0 == 0) t0 = clock64(); else if (clock64() - t0 > WATCHDOG) __trap();
    __nanosleep(32);
  }
}
// The task's writes (all consumer threads, ordered before thread 0 by the bar.sync that ends the task) are
// published by the release increment itself (PTX release is cumulative): no separate fence.sc (__threadfence),
// which the H200 profile showed costing microseconds per task.
__device__ __forceinline__ void signal_counter(unsigned* c) {
  asm volatile("red.release.gpu.global.add.u32 [%0], 1;" :: "l"(c) : "memory");
}

// ---- the GEMV shape of a task kind: rows N of W, reduction K, weight slot
struct Gemv { int n, k, w, part_rows; };
__device__ __forceinline__ Gemv gemv_of(int kind, int layer) {
  switch (kind) {
    case K_QKV: return {QKVN, H, 10 * layer + P_QKVW, 0};
    case K_O:   return {H, HQ * D, 10 * layer + P_OW, 0};
    case K_GU:  return {2 * I, H, 10 * layer + P_GUW, I};
    case K_DOWN: return {H, I, 10 * layer + P_DW, 0};
    default:    return {V, H, P_HEAD, 0};
  }
}
__device__ __forceinline__ bool is_gemv(int kind) {
  return kind == K_QKV || kind == K_O || kind == K_GU || kind == K_DOWN || kind == K_HEAD;
}

// ---- scratch activations (byte offsets; every buffer 256-byte aligned)
struct Act {
  unsigned char* base;
  __device__ dt* x(int l) const { return reinterpret_cast<dt*>(base + (l == 0 ? 0 : OFF_X0 + (l - 1) * LAYER_B + OFF_XN)); }
  __device__ dt* qkv(int l) const { return reinterpret_cast<dt*>(base + OFF_X0 + l * LAYER_B + OFF_QKV); }
  __device__ float* opart(int l) const { return reinterpret_cast<float*>(base + OFF_X0 + l * LAYER_B + OFF_OP); }
  __device__ float* mlpart(int l) const { return reinterpret_cast<float*>(base + OFF_X0 + l * LAYER_B + OFF_ML); }
  __device__ dt* attn(int l) const { return reinterpret_cast<dt*>(base + OFF_X0 + l * LAYER_B + OFF_ATTN); }
  __device__ dt* h(int l) const { return reinterpret_cast<dt*>(base + OFF_X0 + l * LAYER_B + OFF_H); }
  __device__ dt* act(int l) const { return reinterpret_cast<dt*>(base + OFF_X0 + l * LAYER_B + OFF_ACT); }
};

// ---- producer: stream the weight chunks of every GEMV task of this worker, in order
__device__ void producer(const int* rows, int ntasks, const void* const* tab, unsigned ring, unsigned bars,
                         long long* prof) {
  long long empty = 0, t_start = PROF ? clock64() : 0;
  unsigned long long pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  int slot = 0, phase = 0;
  for (int t = 0; t < ntasks; ++t) {
    const int* r = rows + 8 * t;
    int kind = r[0];
    if (!is_gemv(kind)) continue;
    Gemv gv = gemv_of(kind, r[1]);
    const unsigned char* w = static_cast<const unsigned char*>(tab[gv.w]);
    int first = r[2], count = r[3];
    int parts = gv.part_rows ? 2 : 1;
    for (int g = 0; g * 8 < count; ++g) {
      int valid = min(8, count - 8 * g);
      for (int p = 0; p < parts; ++p) {
        int row0 = first + 8 * g + p * gv.part_rows;
        for (int k0 = 0; k0 < gv.k; k0 += KC) {
          int kc = min(KC, gv.k - k0);
          long long tw = PROF ? clock64() : 0;
          mbar_wait(bars + 8 * (RING + slot), phase ^ 1);             // slot free
          if (PROF) empty += clock64() - tw;
          unsigned full = bars + 8 * slot;
          mbar_expect(full, valid * kc * ELEM);
          for (int rr = 0; rr < valid; ++rr)
            bulk_load(ring + slot * SLOT + rr * ROWB, w + ((size_t)(row0 + rr) * gv.k + k0) * ELEM, kc * ELEM, full, pol);
          if (++slot == RING) { slot = 0; phase ^= 1; }
        }
      }
    }
  }
  if (PROF) { prof[3] = empty; prof[15] = clock64() - t_start; }
}

// ---- consumer pieces
struct Ring { unsigned base, bars; int slot, phase; };
// PROF builds only: clock64 cycles of thread 0 (and of the producer lane), written to the scratch's PROF block
// (24 x int64 per worker: total, counter waits, full-slot waits, producer empty-slot waits, busy per task kind
// [8], tasks, globaltimer start/end ns, producer total, signalling, activation staging, reductions + epilogues)
struct Prof { long long full, counter, kind[8], signal, stage, reduce; };

__device__ void norm_rows(const dt* x, int k, float* rstd, int warp, int lane) {
  // rstd[m] = rsqrt(mean(x[m]^2) + eps) for m < B (one warp per row). The loads are L2 round trips (x was written
  // in this launch): a lane issues NU of them before it uses any, so a 4096-wide row costs 2 round trips, not 16.
  constexpr int NU = 8;
  for (int m = warp; m < B; m += NCW) {
    float s = 0.f;
    for (int c0 = lane * 8; c0 < k; c0 += 256 * NU) {
      uint4 v[NU];
#pragma unroll
      for (int u = 0; u < NU; ++u) v[u] = c0 + u * 256 < k ? ldcg16(x + (size_t)m * k + c0 + u * 256) : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
      for (int u = 0; u < NU; ++u) {
        unsigned w4[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
#pragma unroll
        for (int e = 0; e < 4; ++e) { float a, b; unpack2(w4[e], a, b); s += a * a + b * b; }
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) rstd[m] = rsqrtf(s / (float)k + EPS);
  }
}

// The activation operand of one weight chunk for this lane: rows g8 (and g8 + 8 when B > 8), 8 columns per
// slice j. fetch_x issues the chunk's L2 loads (x was written in this launch, by other SMs) one chunk ahead of
// its use, so the consumers never wait on an L2 round trip per chunk; norm_x applies the RMSNorm prologue at use
// (the norm weight is read-only and L1-resident after the first 8-row group).
constexpr int NJ = KC / NCW / 32;
struct XChunk { uint4 a[NJ]; uint4 b[NJ]; };
__device__ __forceinline__ void fetch_x(XChunk& f, const dt* x, int k, int k0, int kc, int warp, int g8, int q) {
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
    int col = warp * (KC / NCW) + j * 32 + q * 8;
    f.a[j] = col < kc && g8 < B ? ldcg16(x + (size_t)g8 * k + k0 + col) : make_uint4(0u, 0u, 0u, 0u);
    if (B > 8) f.b[j] = col < kc && g8 + 8 < B ? ldcg16(x + (size_t)(g8 + 8) * k + k0 + col) : make_uint4(0u, 0u, 0u, 0u);
  }
}
__device__ __forceinline__ void norm_x(uint4 v, int m, int c, const dt* nw, const float* rstd, unsigned* out) {
  out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
  if (nw != nullptr && m < B) {
    uint4 wv = *reinterpret_cast<const uint4*>(nw + c);
    unsigned ww[4] = {wv.x, wv.y, wv.z, wv.w};
    float r = rstd[m];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float a, b, wa, wb;
      unpack2(out[e], a, b);
      unpack2(ww[e], wa, wb);
      out[e] = pack2(r * a * wa, r * b * wb);
    }
  }
}

// Stage the task's activation rows in shared memory (row stride k + XPAD: rows 16 banks apart) when they
// fit in XS_BYTES (the attention scratch, unused by GEMV tasks), RMS-normalised and rounded once per task: the
// chunk loop then reads them with ld.shared instead of an L2 round trip (and the norm math) per weight chunk.
__device__ __forceinline__ uint4 norm8(uint4 v, uint4 wv, float r) {
  unsigned x4[4] = {v.x, v.y, v.z, v.w}, w4[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    float a, b, wa, wb;
    unpack2(x4[e], a, b);
    unpack2(w4[e], wa, wb);
    x4[e] = pack2(r * a * wa, r * b * wb);
  }
  return make_uint4(x4[0], x4[1], x4[2], x4[3]);
}
__device__ void stage_x(const dt* x, int k, const dt* nw, dt* xs, float* rstd, int warp, int lane) {
  constexpr int NU = 4;
  const int t = warp * 32 + lane, per_row = k / 8, n = B * per_row;
  for (int i0 = t; i0 < n; i0 += NT * NU) {         // every load of a sweep issued before the first store
    uint4 v[NU];
#pragma unroll
    for (int u = 0; u < NU; ++u) {
      int i = i0 + u * NT;
      v[u] = i < n ? ldcg16(x + (size_t)(i / per_row) * k + (i % per_row) * 8) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < NU; ++u) {
      int i = i0 + u * NT;
      if (i < n) *reinterpret_cast<uint4*>(xs + (i / per_row) * (k + XPAD) + (i % per_row) * 8) = v[u];
    }
  }
  consumers_sync();
  if (nw == nullptr) return;
  for (int m = warp; m < B; m += NCW) {             // rstd[m] from the staged row (one warp per row)
    float s = 0.f;
    for (int c = lane * 8; c < k; c += 256) {
      uint4 v = *reinterpret_cast<const uint4*>(xs + m * (k + XPAD) + c);
      unsigned w4[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) { float a, b; unpack2(w4[e], a, b); s += a * a + b * b; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) rstd[m] = rsqrtf(s / (float)k + EPS);
  }
  consumers_sync();
  for (int i0 = t; i0 < n; i0 += NT * NU) {         // x * rstd * w in place (norm weight loads first)
    uint4 wv[NU];
#pragma unroll
    for (int u = 0; u < NU; ++u) {
      int i = i0 + u * NT;
      wv[u] = i < n ? *reinterpret_cast<const uint4*>(nw + (i % per_row) * 8) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < NU; ++u) {
      int i = i0 + u * NT;
      if (i < n) {
        uint4* p = reinterpret_cast<uint4*>(xs + (i / per_row) * (k + XPAD) + (i % per_row) * 8);
        *p = norm8(*p, wv[u], rstd[i / per_row]);
      }
    }
  }
  consumers_sync();
}

__device__ void gemv_task(int kind, int layer, int first, int count, const void* const* tab, const Act& act,
                          float* logits, Ring& rg, float* red, float* gtmp, float* rstd, dt* xs, int warp, int lane,
                          Prof& pf) {
  Gemv gv = gemv_of(kind, layer);
  const dt* x;
  const dt* nw = nullptr;
  const dt* bias = nullptr;
  if (kind == K_QKV) { x = act.x(layer); nw = (const dt*)tab[10 * layer + P_IN]; bias = (const dt*)tab[10 * layer + P_QKVB]; }
  else if (kind == K_O) { x = act.attn(layer); bias = (const dt*)tab[10 * layer + P_OB]; }
  else if (kind == K_GU) { x = act.h(layer); nw = (const dt*)tab[10 * layer + P_POST]; bias = (const dt*)tab[10 * layer + P_GUB]; }
  else if (kind == K_DOWN) { x = act.act(layer); bias = (const dt*)tab[10 * layer + P_DB]; }
  else { x = act.x(L); nw = (const dt*)tab[P_NORM]; }
  const bool staged = B * (gv.k + XPAD) * ELEM <= XS_BYTES;
  const unsigned xsa = smem_addr(xs);
  long long ts = PROF ? clock64() : 0;
  if (staged) stage_x(x, gv.k, nw, xs, rstd, warp, lane);
  else if (nw != nullptr) { norm_rows(x, gv.k, rstd, warp, lane); consumers_sync(); }
  if (PROF) pf.stage += clock64() - ts;
  int g8 = lane >> 2, q = lane & 3;
  int parts = gv.part_rows ? 2 : 1;
  int buf = 0;
  const int nk = (gv.k + KC - 1) / KC, nchunks = ((count + 7) / 8) * parts * nk;
  XChunk cur;
  if (!staged) fetch_x(cur, x, gv.k, 0, min(KC, gv.k), warp, g8, q);
  int ci = 0;
  for (int g = 0; g * 8 < count; ++g) {
    for (int p = 0; p < parts; ++p) {
      float acc[4] = {0.f, 0.f, 0.f, 0.f}, acc2[4] = {0.f, 0.f, 0.f, 0.f};   // two chains: half the mma latency
      int t = warp * 32 + lane;
      // the residual of this thread's epilogue output, loaded now so its round trip overlaps the chunks
      float resid = 0.f;
      if ((kind == K_O || kind == K_DOWN) && t < B * 8 && 8 * g + (t & 7) < count)
        resid = f32(ldcgh((kind == K_O ? act.x(layer) : act.h(layer)) + (t >> 3) * H + first + 8 * g + (t & 7)));
      for (int k0 = 0; k0 < gv.k; k0 += KC, ++ci) {
        int kc = min(KC, gv.k - k0);
        long long tw = PROF ? clock64() : 0;
        mbar_wait(rg.bars + 8 * rg.slot, rg.phase);
        if (PROF) pf.full += clock64() - tw;
        unsigned sl = rg.base + rg.slot * SLOT;
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
          int col = warp * KCW + j * 32 + q * 8;
          if (col < kc) {
            uint4 wv = lds16(sl + g8 * ROWB + col * ELEM);
            unsigned xa[4], xb[4] = {0u, 0u, 0u, 0u};
            if (staged) {
              const uint4 z = make_uint4(0u, 0u, 0u, 0u);
              norm_x(g8 < B ? lds16(xsa + (g8 * (gv.k + XPAD) + k0 + col) * ELEM) : z, g8, 0, nullptr, rstd, xa);
              if (B > 8) norm_x(g8 + 8 < B ? lds16(xsa + ((g8 + 8) * (gv.k + XPAD) + k0 + col) * ELEM) : z, g8 + 8, 0,
                                nullptr, rstd, xb);
            } else {
              norm_x(cur.a[j], g8, k0 + col, nw, rstd, xa);
              if (B > 8) norm_x(cur.b[j], g8 + 8, k0 + col, nw, rstd, xb);
            }
            mma(acc, xa[0], xb[0], xa[1], xb[1], wv.x, wv.y);
            mma(acc2, xa[2], xb[2], xa[3], xb[3], wv.z, wv.w);
          }
        }
        if (!staged && ci + 1 < nchunks) {           // the next chunk's activations, in flight during the handoff
          int kn = k0 + KC < gv.k ? k0 + KC : 0;
          fetch_x(cur, x, gv.k, kn, min(KC, gv.k - kn), warp, g8, q);
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(rg.bars + 8 * (RING + rg.slot));
        if (++rg.slot == RING) { rg.slot = 0; rg.phase ^= 1; }
      }
      // reduce the warps' partial sums of this 8-row group, then the epilogue (one thread per output)
      long long tr = PROF ? clock64() : 0;
      float* rb = red + buf * (NCW * 128);
      *reinterpret_cast<float4*>(rb + warp * 128 + lane * 4) =
          make_float4(acc[0] + acc2[0], acc[1] + acc2[1], acc[2] + acc2[2], acc[3] + acc2[3]);
      consumers_sync();
      if (t < B * 8) {
        int m = t >> 3, n = t & 7;
        int src = ((m & 7) * 4 + (n >> 1)) * 4 + (n & 1) + 2 * (m >> 3);
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < NCW; ++w) s += rb[w * 128 + src];
        int col = first + 8 * g + n;                       // output column (gate_up: inner column)
        if (col < first + count) {
          int wrow = col + p * gv.part_rows;                 // weight row
          if (bias != nullptr) s += f32(bias[wrow]);
          float y = rnd(s);
          if (kind == K_QKV) act.qkv(layer)[m * QKVN + col] = cvt(y);
          else if (kind == K_O) act.h(layer)[m * H + col] = cvt(resid + y);
          else if (kind == K_DOWN) act.x(layer + 1)[m * H + col] = cvt(resid + y);
          else if (kind == K_HEAD) logits[(size_t)m * V + col] = y;
          else if (p == 0) gtmp[t] = y;
          else {
            float gt = gtmp[t];
            float silu = rnd(gt / (1.f + __expf(-gt)));
            act.act(layer)[m * I + col] = cvt(silu * y);
          }
        }
      }
      buf ^= 1;
      if (PROF) pf.reduce += clock64() - tr;
    }
  }
}

__device__ void attn_task(int layer, int b, int kvh, int sp, const int* pos, dt* cache, const void* const* tab,
                          const Act& act, float* qs, float* part, int warp, int lane) {
  int t = warp * 32 + lane;
  int p = min(max(pos[b], 0), C - 1);
  int length = p + 1, chunk = (length + S - 1) / S;
  int start = sp * chunk, end = min(start + chunk, length);
  float* ks = qs + G * D;
  float* vs = ks + D;
  const dt* qkv = act.qkv(layer) + (size_t)b * QKVN;
  const float* cosr = static_cast<const float*>(tab[P_COS]) + (size_t)p * (D / 2);
  const float* sinr = static_cast<const float*>(tab[P_SIN]) + (size_t)p * (D / 2);
  // RoPE (transformers' x * cos + rotate_half(x) * sin, float32, rounded) of the q heads and the new k; v as is
  for (int i = t; i < (G + 2) * D; i += NT) {
    int hh = i / D, d = i % D, half = D / 2, di = d < half ? d : d - half;
    int base = hh < G ? (kvh * G + hh) * D : (hh == G ? (HQ + kvh) * D : (HQ + KVH + kvh) * D);
    float xv = f32(ldcgh(qkv + base + d));
    if (hh <= G) {
      float other = d < half ? -f32(ldcgh(qkv + base + d + half)) : f32(ldcgh(qkv + base + d - half));
      xv = rnd(xv * cosr[di] + other * sinr[di]);
    }
    qs[i] = hh < G ? xv * LOG2E_RSQRT_D : xv;   // q pre-scaled (base-2 softmax); qs[G*D .. +D) = k, then v
  }
  consumers_sync();
  dt* kc = cache + ((((size_t)layer * 2 + 0) * B + b) * KVH + kvh) * (size_t)C * D;
  dt* vc = cache + ((((size_t)layer * 2 + 1) * B + b) * KVH + kvh) * (size_t)C * D;
  if (start <= p && p < end) {
    for (int d = t; d < D; d += NT) { kc[(size_t)p * D + d] = cvt(ks[d]); vc[(size_t)p * D + d] = cvt(vs[d]); }
  }
  float* o_out = act.opart(layer);
  float* ml_out = act.mlpart(layer);
  if (end <= start) {                   // an empty split: (m, l) = (-inf, 0), o = 0
    for (int i = t; i < G * D; i += NT) {
      int hq = kvh * G + i / D;
      o_out[(((size_t)b * HQ + hq) * S + sp) * D + i % D] = 0.f;
      if (i % D == 0) { ml_out[(((size_t)b * HQ + hq) * S + sp) * 2] = NEG; ml_out[(((size_t)b * HQ + hq) * S + sp) * 2 + 1] = 0.f; }
    }
    return;
  }
  int li = t % LD, kg = t / LD, d0 = li * 8;
  float ov[G][8], mv[G], lv[G];              // q stays in shared memory (registers go to the K/V prefetch)
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int e = 0; e < 8; ++e) ov[g][e] = 0.f;
    mv[g] = NEG; lv[g] = 0.f;
  }
  // K/V rows are loaded one key step ahead of their use (each step is otherwise a full memory round trip)
  uint4 a_next = *reinterpret_cast<const uint4*>(kc + (size_t)min(start + kg, end - 1) * D + d0);
  uint4 c_next = *reinterpret_cast<const uint4*>(vc + (size_t)min(start + kg, end - 1) * D + d0);
  for (int jb = start; jb < end; jb += NG) {      // a uniform trip count: every lane reaches the shuffles
    int j = jb + kg;
    bool valid = j < end;
    j = min(j, end - 1);                          // out-of-range keys read a valid row and are masked
    uint4 a = a_next, c = c_next;
    if (jb + NG < end) {
      int jn = min(jb + NG + kg, end - 1);
      a_next = *reinterpret_cast<const uint4*>(kc + (size_t)jn * D + d0);
      c_next = *reinterpret_cast<const uint4*>(vc + (size_t)jn * D + d0);
    }
    float kv[8], vv[8];
    if (j == p) {                                 // the new key: from shared memory (its cache row may be stale here)
#pragma unroll
      for (int e = 0; e < 8; ++e) { kv[e] = ks[d0 + e]; vv[e] = vs[d0 + e]; }
    } else {
      unpack2(a.x, kv[0], kv[1]); unpack2(a.y, kv[2], kv[3]); unpack2(a.z, kv[4], kv[5]); unpack2(a.w, kv[6], kv[7]);
      unpack2(c.x, vv[0], vv[1]); unpack2(c.y, vv[2], vv[3]); unpack2(c.z, vv[4], vv[5]); unpack2(c.w, vv[6], vv[7]);
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float s = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) s += qs[g * D + d0 + e] * kv[e];
#pragma unroll
      for (int o = 1; o < LD; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      s = valid ? s : NEG;
      float mn = fmaxf(mv[g], s), al = exp2f(mv[g] - mn), pe = valid ? exp2f(s - mn) : 0.f;
      lv[g] = lv[g] * al + pe;
#pragma unroll
      for (int e = 0; e < 8; ++e) ov[g][e] = ov[g][e] * al + pe * vv[e];
      mv[g] = mn;
    }
  }
  // combine the warp's KPW key groups (lanes differing in the bits above LD), then the warps through smem
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int o = LD; o < 32; o <<= 1) {
      float m2 = __shfl_xor_sync(0xffffffffu, mv[g], o), l2 = __shfl_xor_sync(0xffffffffu, lv[g], o);
      float mn = fmaxf(mv[g], m2), a1 = exp2f(mv[g] - mn), a2 = exp2f(m2 - mn);
      lv[g] = lv[g] * a1 + l2 * a2;
#pragma unroll
      for (int e = 0; e < 8; ++e) ov[g][e] = ov[g][e] * a1 + __shfl_xor_sync(0xffffffffu, ov[g][e], o) * a2;
      mv[g] = mn;
    }
    if (lane < LD) {
      float* dst = part + (warp * G + g) * (D + 2);
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[d0 + e] = ov[g][e];
      if (lane == 0) { dst[D] = mv[g]; dst[D + 1] = lv[g]; }
    }
  }
  consumers_sync();
  for (int i = t; i < G * D; i += NT) {
    int g = i / D, d = i % D, hq = kvh * G + g;
    float mm = NEG;
#pragma unroll
    for (int w = 0; w < NCW; ++w) mm = fmaxf(mm, part[(w * G + g) * (D + 2) + D]);
    float ll = 0.f, oo = 0.f;
#pragma unroll
    for (int w = 0; w < NCW; ++w) {
      const float* src = part + (w * G + g) * (D + 2);
      float f = exp2f(src[D] - mm);
      ll += src[D + 1] * f;
      oo += src[d] * f;
    }
    o_out[(((size_t)b * HQ + hq) * S + sp) * D + d] = oo;
    if (d == 0) { ml_out[(((size_t)b * HQ + hq) * S + sp) * 2] = mm; ml_out[(((size_t)b * HQ + hq) * S + sp) * 2 + 1] = ll; }
  }
}

__device__ void merge_task(int layer, int b, int kvh, const Act& act, int t) {
  const float* o = act.opart(layer);
  const float* ml = act.mlpart(layer);
  for (int i = t; i < G * D; i += NT) {
    int hq = kvh * G + i / D, d = i % D;
    const float* mrow = ml + ((size_t)b * HQ + hq) * S * 2;
    float mm = NEG;
    for (int s = 0; s < S; ++s) mm = fmaxf(mm, ldcgf(mrow + 2 * s));
    float ll = 0.f, oo = 0.f;
    for (int s = 0; s < S; ++s) {
      float f = exp2f(ldcgf(mrow + 2 * s) - mm);
      ll += ldcgf(mrow + 2 * s + 1) * f;
      oo += ldcgf(o + (((size_t)b * HQ + hq) * S + s) * D + d) * f;
    }
    act.attn(layer)[(size_t)b * HQ * D + hq * D + d] = cvt(oo / ll);
  }
}

__device__ void embed_task(int b, const int* ids, const void* const* tab, const Act& act, int t) {
  int id = min(max(ids[b], 0), V - 1);
  const dt* e = static_cast<const dt*>(tab[P_EMBED]) + (size_t)id * H;
  for (int i = t; i < H; i += NT) act.x(0)[(size_t)b * H + i] = e[i];
}

__device__ void run(unsigned char* smem, const void* const* tab, const int* ids, const int* pos, dt* cache,
                    const int* prog, unsigned* sync, float* logits, unsigned char* scratch) {
  int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  if (prog[0] != MAGIC || prog[2] != W || prog[3] != NTASKS || prog[4] != NC || gridDim.x != W) __trap();
  unsigned ring = smem_addr(smem);
  unsigned bars = ring + RING * SLOT;
  float* red = reinterpret_cast<float*>(smem + RING * SLOT + 16 * RING);
  float* gtmp = red + 2 * NCW * 128;
  float* rstd = gtmp + 128;
  float* attn_smem = rstd + 16;
  if (tid == 0) {
    for (int s = 0; s < RING; ++s) { mbar_init(bars + 8 * s, 1); mbar_init(bars + 8 * (RING + s), NCW); }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const int* woff = prog + 16;
  const int* rows = prog + 16 + (W + 1) + 8 * woff[blockIdx.x];
  int ntasks = woff[blockIdx.x + 1] - woff[blockIdx.x];
  const int* sigs = prog + 16 + (W + 1) + 8 * NTASKS;
  long long* prof = reinterpret_cast<long long*>(scratch + OFF_PROF) + PROF_WORDS * blockIdx.x;
  if (warp == NCW) {
    if (lane == 0) producer(rows, ntasks, tab, ring, bars, prof);
    return;
  }
  Act act{scratch};
  Ring rg{ring, bars, 0, 0};
  Prof pf{0, 0, {0, 0, 0, 0, 0, 0, 0, 0}, 0, 0, 0};
  long long t_run = PROF ? clock64() : 0;
  unsigned long long ns0 = 0;
  if (PROF) asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns0));
  for (int i = 0; i < ntasks; ++i) {
    const int* r = rows + 8 * i;
    int kind = r[0], layer = r[1];
    long long tw = PROF ? clock64() : 0;
    if (tid == 0 && r[5] >= 0) wait_counter(sync + r[5], (unsigned)r[6]);
    consumers_sync();
    long long tb = PROF ? clock64() : 0;
    if (PROF) pf.counter += tb - tw;
    if (is_gemv(kind))
      gemv_task(kind, layer, r[2], r[3], tab, act, logits, rg, red, gtmp, rstd, reinterpret_cast<dt*>(attn_smem), warp,
                lane, pf);
    else if (kind == K_ATTN) attn_task(layer, r[2], r[3], r[4], pos, cache, tab, act, attn_smem, attn_smem + (G + 2) * D, warp, lane);
    else if (kind == K_MERGE) merge_task(layer, r[2], r[3], act, tid);
    else embed_task(r[2], ids, tab, act, tid);
    consumers_sync();
    if (PROF) pf.kind[kind] += clock64() - tb;
    if (tid == 0) {
      long long tg = PROF ? clock64() : 0;
      const int* sg = sigs + r[7];
      for (int k = 1; k <= sg[0]; ++k) signal_counter(sync + sg[k]);
      if (PROF) pf.signal += clock64() - tg;
    }
  }
  if (PROF && tid == 0) {
    unsigned long long ns1;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns1));
    prof[0] = clock64() - t_run; prof[1] = pf.counter; prof[2] = pf.full;
    for (int k = 0; k < 8; ++k) prof[4 + k] = pf.kind[k];
    prof[12] = ntasks; prof[13] = (long long)ns0; prof[14] = (long long)ns1;
    prof[16] = pf.signal; prof[17] = pf.stage; prof[18] = pf.reduce;
  }
}
}  // namespace MKNS
"""
