"""Per-architecture tile configurations for kiln's hand-written kernels (frozen dataclasses).

A config is data: the same object is a default, a point of a tuning space and a row of a results
table. ``GemmConfig.check(M, N, K, dtype)`` says *why* a config cannot run a problem (``None`` when
it can), so a caller that declines a config can report the reason.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

__all__ = ["GemmConfig", "SM90_SMEM_BYTES", "SM90_NUM_SMS", "SM90_GEMM_CONFIGS", "SM90_DEFAULT",
           "GEMM_DTYPES", "select_sm90_config", "estimate_sm90", "SM90_PERSISTENT_CONFIGS", "sm90_candidates",
           "lookup_sm90_config", "SM90_PINGPONG_CONFIGS", "Fp8GemmConfig", "FP8_OUT_DTYPES", "FP8_SCALE_MODES_A",
           "FP8_SCALE_MODES_B", "FP8_GROUP", "SM90_FP8_CONFIGS", "SM90_FP8_PERSISTENT_CONFIGS", "fp8_needs_promotion",
           "fp8_candidates", "select_fp8_config", "select_sm90_dynamic_config", "DYNAMIC_M_HINT"]

#: Largest dynamic shared memory one block may opt into on sm_90 (227 KB).
SM90_SMEM_BYTES = 227 * 1024
#: Multiprocessors of an H100 SXM / H200 (used only by the tile-count heuristic).
SM90_NUM_SMS = 132
#: Input dtypes of the sm_90a GEMM (fp32 accumulate, output in the same dtype).
GEMM_DTYPES = ("float16", "bfloat16")
_NAME_RE = re.compile(r"(\d+)x(\d+)x(\d+)_s(\d+)_c(\d+)_g(\d+)(_p)?(_pp)?(?:_k(\d+))?")
_MAX_ACC_REGS = 128      # fp32 accumulator registers per consumer thread (of <= 232 after setmaxnreg)


@dataclass(frozen=True)
class GemmConfig:
    """Tile configuration of the warp-specialised sm_90a GEMM (C = A @ B^T).

    Attributes
    ----------
    block_m, block_n, block_k : int
        CTA tile. Each consumer warpgroup owns 64 rows, so ``block_m == 64 * consumers``;
        ``block_n`` is the wgmma N (16..256, multiple of 16); ``block_k`` is 64 (one 128-byte
        swizzle row of fp16/bf16, the TMA box width).
    stages : int
        Depth of the TMA -> wgmma shared-memory ring (full/empty mbarrier pair per stage).
    consumers : int
        Consumer (wgmma) warpgroups; one more warpgroup is the TMA producer.
    swizzle : int
        CTA rasterisation swizzle: tiles are visited in groups of ``swizzle`` M-tile rows so that
        concurrently running CTAs share A and B tiles in L2 (1 = plain row-major order). The
        shared-memory layouts always use the 128-byte TMA/wgmma swizzle; that is not a knob.
    persistent : bool
        One CTA per SM looping over tiles (when there are more tiles than SMs): the TMA producer
        fills the next tile's stages while the consumers run the epilogue.
    pingpong : bool
        Two consumer warpgroups that own *alternate whole tiles* of ``block_m = 64`` rows instead of
        sharing each tile: named barriers order their K loops, so one runs its epilogue while the other
        runs wgmma (CUTLASS's "ping-pong" schedule). Needs ``consumers = 2`` and ``persistent``.
    split_k : int
        Split the K loop over ``split_k`` CTAs per output tile (small-M problems whose tiles cannot
        fill the SMs). Each split writes an fp32 partial tile to a workspace ``[split_k, M, N]``; a
        second small kernel sums the partials and applies the epilogue. ``num_k_tiles % split_k == 0``.
    """

    block_m: int = 128
    block_n: int = 256
    block_k: int = 64
    stages: int = 4
    consumers: int = 2
    swizzle: int = 8
    persistent: bool = False
    split_k: int = 1
    pingpong: bool = False

    @property
    def threads(self) -> int:
        return 128 * (1 + self.consumers)

    def smem_bytes(self, elem_bytes: int = 2) -> int:
        """Dynamic shared memory: the stage ring plus 2 mbarriers (8 B each) per stage."""
        ring = self.stages * (self.block_m + self.block_n) * self.block_k * elem_bytes
        return ring + 16 * self.stages

    def occupancy(self) -> int:
        """CTAs per SM allowed by shared memory (227 KB), threads (2048) and registers (64 K)."""
        regs = 168 if self.consumers == 2 else 128       # per thread, at most (launch bounds)
        return max(1, min(SM90_SMEM_BYTES // self.smem_bytes(), 2048 // self.threads,
                          65536 // (regs * self.threads)))

    def tiles(self, M: int, N: int) -> int:
        return -(-M // self.block_m) * -(-N // self.block_n)

    def check(self, M: int, N: int, K: int, dtype: str = "float16") -> str | None:
        """``None`` if this config can run ``C[M,N] = A[M,K] @ B[N,K]^T`` in ``dtype``, else the reason."""
        if dtype not in GEMM_DTYPES:
            return f"dtype {dtype!r} is not supported (supported: {', '.join(GEMM_DTYPES)})"
        reason = self.check_tile()
        if reason:
            return reason
        for name, v in (("M", M), ("N", N), ("K", K)):
            if not isinstance(v, int) or v < 1:
                return f"{name}={v!r}: shapes must be static positive ints"
        if K % 8:
            return f"K={K} is not a multiple of 8 (TMA needs 16-byte aligned row strides of A and B)"
        if N % 8:
            return f"N={N} is not a multiple of 8 (the epilogue stores column pairs and TMA needs 16-byte rows)"
        if M * max(N, K) * self.split_k >= 2**31 or N * K >= 2**31:
            return f"M*N*split_k, M*K or N*K >= 2^31 (M={M}, N={N}, K={K}): 32-bit indexing"
        if self.split_k > 1:
            num_k = -(-K // self.block_k)
            if num_k % self.split_k:
                return (f"split_k={self.split_k} does not divide the {num_k} k-tiles of K={K} "
                        f"(block_k={self.block_k})")
        return None

    def check_tile(self) -> str | None:
        """Problem-independent validity of the tile itself (``None`` when valid)."""
        if self.consumers not in (1, 2):
            return f"consumers={self.consumers}: 1 or 2 consumer warpgroups are supported"
        if self.pingpong:
            if self.consumers != 2 or self.block_m != 64 or not self.persistent or self.split_k != 1:
                return (f"pingpong needs consumers=2, block_m=64, persistent and no split-K "
                        f"(given consumers={self.consumers}, block_m={self.block_m}, persistent={self.persistent}, "
                        f"split_k={self.split_k})")
        elif self.block_m != 64 * self.consumers:
            return (f"block_m={self.block_m} must be 64 * consumers = {64 * self.consumers} "
                    "(each consumer warpgroup issues m64 wgmma)")
        if self.block_n % 32 or not 32 <= self.block_n <= 256:
            # wgmma takes N % 16 == 0, but the 16-bit epilogue stores whole 32-column groups (block_n // 32 of
            # them): with block_n = 48, 80, ... the last 16 columns of every tile would never be written
            return (f"block_n={self.block_n} must be a multiple of 32 in [32, 256] (wgmma N / TMA box; the "
                    "epilogue stores 32-column groups)")
        if self.block_n // 2 > _MAX_ACC_REGS:
            return f"block_n={self.block_n} needs {self.block_n // 2} accumulator registers per thread"
        if self.block_k != 64:
            return f"block_k={self.block_k}: only 64 (one 128-byte swizzled row of a 2-byte dtype) is supported"
        if self.stages < 2:
            return f"stages={self.stages}: at least 2 are needed to overlap TMA with wgmma"
        if self.swizzle < 1:
            return f"swizzle={self.swizzle} must be >= 1"
        if self.split_k < 1:
            return f"split_k={self.split_k} must be >= 1"
        if self.split_k > 1 and self.persistent:
            return "split_k > 1 with persistent=True: the split-K grid is one CTA per (tile, split)"
        smem = self.smem_bytes()
        if smem > SM90_SMEM_BYTES:
            return (f"needs {smem} B of shared memory ({self.stages} stages x "
                    f"({self.block_m}+{self.block_n}) x {self.block_k} x 2 B) > {SM90_SMEM_BYTES} B (227 KB)")
        return None

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_name(cls, name: str) -> "GemmConfig":
        """Inverse of :meth:`name` (how tuned tables store a config)."""
        m = _NAME_RE.fullmatch(name)
        if m is None:
            raise ValueError(f"not a GemmConfig name: {name!r} (expected like '128x256x64_s4_c2_g8[_p][_k4]')")
        bm, bn, bk, st, co, sw, p, pp, sk = m.groups()
        return cls(int(bm), int(bn), int(bk), int(st), int(co), int(sw), p is not None, int(sk or 1), pp is not None)

    def name(self) -> str:
        return (f"{self.block_m}x{self.block_n}x{self.block_k}_s{self.stages}_c{self.consumers}"
                f"_g{self.swizzle}" + ("_p" if self.persistent else "") + ("_pp" if self.pingpong else "")
                + (f"_k{self.split_k}" if self.split_k > 1 else ""))


#: The sm_90a configs, largest tile first. The first is the 8192^3 workhorse (the shape measured at
#: 706-716 TFLOP/s on the H200 in the probe); the smaller ones exist so that small problems still
#: spread over the 132 SMs (the 64-row ones use <= 96 KB so that two CTAs share an SM).
SM90_GEMM_CONFIGS: tuple[GemmConfig, ...] = (
    GemmConfig(128, 256, 64, 4, 2, 8),
    GemmConfig(128, 128, 64, 6, 2, 8),
    GemmConfig(64, 128, 64, 4, 1, 8),
    GemmConfig(64, 64, 64, 6, 1, 8),
)
SM90_DEFAULT = SM90_GEMM_CONFIGS[0]
#: Persistent variants of the 128-row tiles (grid = #SMs, the producer loads the next tile during
#: the epilogue); ``select_sm90_config`` picks them for 1-8 waves of tiles.
SM90_PERSISTENT_CONFIGS: tuple[GemmConfig, ...] = (
    GemmConfig(128, 256, 64, 4, 2, 8, True),
    GemmConfig(128, 128, 64, 6, 2, 8, True),
)
#: Ping-pong variants (64-row tiles alternating between the two consumers; in the tuning space, not yet
#: chosen by the heuristic).
SM90_PINGPONG_CONFIGS: tuple[GemmConfig, ...] = (
    GemmConfig(64, 256, 64, 5, 2, 8, True, pingpong=True),
    GemmConfig(64, 128, 64, 8, 2, 8, True, pingpong=True),
)

# Relative throughput per SM of each tile shape, measured on the H200 at 8192^3 (2026-11-21, sweep:
# 698 / 579 / 456 / 320 TFLOP/s; the 64-row tiles run 2 CTAs per SM, which the figure includes).
_TILE_EFF = {(128, 256): 1.0, (128, 128): 0.83, (64, 128): 0.65, (64, 64): 0.46}
#: Persistent (grid = #SMs) variants win when there are a few waves of 128-row tiles: measured +6-8% at
#: 4096x{3072,4096}x1024 (3-4 waves), +4-6% for 128x128 at 256 tiles, -0.8% (noise) at 8192^3 (15.5 waves).
_PERSISTENT_MAX_WAVES = 8


def estimate_sm90(cfg: GemmConfig, M: int, N: int, num_sms: int = SM90_NUM_SMS) -> float:
    """Relative time of ``cfg`` on an (M, N) output: waves of CTAs x per-wave cost of one SM."""
    occ = cfg.occupancy()
    waves = -(-cfg.tiles(M, N) // (num_sms * occ))
    return waves * cfg.block_m * cfg.block_n * occ / _TILE_EFF.get((cfg.block_m, cfg.block_n), 0.5)


def sm90_candidates(M: int, N: int, K: int, dtype: str = "float16",
                    num_sms: int = SM90_NUM_SMS) -> list[GemmConfig]:
    """The tuning space of one problem: every valid base and persistent config, plus split-K variants
    (2, 4, 8) of the non-persistent ones that keep >= 2 k-tiles per split and at most 2 waves of CTAs."""
    out = [c for c in SM90_GEMM_CONFIGS + SM90_PERSISTENT_CONFIGS + SM90_PINGPONG_CONFIGS
           if c.check(M, N, K, dtype) is None and (not c.pingpong or c.tiles(M, N) > num_sms)]
    num_k = -(-K // 64)
    for c in SM90_GEMM_CONFIGS:
        for sk in (2, 4, 8):
            v = replace(c, split_k=sk)
            if (v.check(M, N, K, dtype) is None and num_k // sk >= 2
                    and c.tiles(M, N) * sk <= 2 * num_sms * c.occupancy()):
                out.append(v)
    return out


def lookup_sm90_config(M: int, N: int, K: int, dtype: str = "float16", epilogue: str = "none",
                       num_sms: int = SM90_NUM_SMS) -> tuple[GemmConfig, str]:
    """``(config, source)``: the tuned table's config for this problem (``source`` "table"), else the
    heuristic's (``source`` "heuristic"; the miss is recorded in ``kiln.schedules.tables.untuned()``).
    The shipped table was tuned on a 132-SM H200, so other SM counts always use the heuristic."""
    from .tables import load_table, record_miss
    key = ("sm90a", M, N, K, dtype, "TN", epilogue)
    if num_sms == SM90_NUM_SMS:
        row = load_table("sm90a").lookup(*key)
        if row is not None:
            cfg = GemmConfig.from_name(row.config)
            if cfg.check(M, N, K, dtype) is None:
                return cfg, "table"
    record_miss(key)
    return select_sm90_config(M, N, K, dtype, num_sms), "heuristic"


def select_sm90_config(M: int, N: int, K: int, dtype: str = "float16",
                       num_sms: int = SM90_NUM_SMS) -> GemmConfig:
    """Heuristic default: the valid config with the lowest :func:`estimate_sm90` (wave
    quantisation x measured tile efficiency), larger tiles first on ties; its persistent variant
    when it has 128-row tiles and between 1 and 8 waves of them. On the 13 benchmark shapes this
    picks the measured-fastest config or one within 2.1% (run-to-run noise of the same kernel is
    ~2%). Raises ``NotImplementedError`` with the reason when no config is valid."""
    valid = [c for c in SM90_GEMM_CONFIGS if c.check(M, N, K, dtype) is None]
    if not valid:
        raise NotImplementedError(f"sm_90a GEMM M={M} N={N} K={K} {dtype}: "
                                  f"{SM90_GEMM_CONFIGS[0].check(M, N, K, dtype)}")
    best = min(valid, key=lambda c: estimate_sm90(c, M, N, num_sms))
    if best.consumers == 2 and num_sms < best.tiles(M, N) <= _PERSISTENT_MAX_WAVES * num_sms:
        best = replace(best, persistent=True)
    split = _split_k(best, M, N, K, num_sms)
    return replace(best, split_k=split) if split > 1 else best


#: The M a dynamic-M GEMM's tile is chosen for when nothing bounds it (the kernel runs any M; this only picks the tile).
DYNAMIC_M_HINT = 4096


def select_sm90_dynamic_config(m_hint: int | None, N: int, K: int, dtype: str = "float16",
                               num_sms: int = SM90_NUM_SMS, splits: tuple = ()) -> GemmConfig:
    """The tile of a GEMM whose M is only known at run time: the heuristic's choice at ``m_hint`` (an upper
    bound or typical M; ``None``: :data:`DYNAMIC_M_HINT`) without split-K, made persistent (the dynamic kernel
    always runs a fixed grid of every CTA slot walking the tiles, so that the grid does not depend on M).
    ``splits``: output column counts a tile must not straddle (``block_n`` divides each). Raises
    ``NotImplementedError`` when no config fits (N, K, dtype, splits)."""
    m = max(1, int(m_hint or DYNAMIC_M_HINT))
    valid = [c for c in SM90_GEMM_CONFIGS if c.check(m, N, K, dtype) is None]
    if not valid:
        raise NotImplementedError(f"sm_90a GEMM M=<dynamic> N={N} K={K} {dtype}: "
                                  f"{SM90_GEMM_CONFIGS[0].check(m, N, K, dtype)}")
    valid = [c for c in valid if all(n % c.block_n == 0 for n in splits)]
    if not valid:
        raise NotImplementedError(f"sm_90a GEMM M=<dynamic> N={N} K={K}: no tile width divides every output "
                                  f"part {list(splits)}")
    return replace(min(valid, key=lambda c: estimate_sm90(c, m, N, num_sms)), persistent=True)


#: Fewest k-tiles a split-K CTA keeps. Measured on the H200 (benchmarks/NOTES.md, session 2): at K = 1024
#: (16 k-tiles) every split lost to the unsplit kernel (the reduce kernel's launch and the fp32 partials
#: cost more than the shorter K loop saves); at K = 4096 a split of 8 (8 k-tiles each) won at M = 128.
_SPLIT_MIN_K_TILES = 8
#: ... and splits only K loops of at least this many k-tiles (K >= 2048 at block_k 64), for the same reason.
_SPLIT_MIN_TOTAL_K_TILES = 32


def _split_k(cfg: GemmConfig, M: int, N: int, K: int, num_sms: int) -> int:
    """Largest power-of-two split (<= 8) that keeps the grid within one wave of CTA slots and each split
    at >= 8 k-tiles; 1 when the tiles already fill half the slots or K has < 32 k-tiles (then
    splitting only adds the partial-sum traffic and the reduce kernel)."""
    slots = num_sms * cfg.occupancy()
    tiles = cfg.tiles(M, N)
    num_k = -(-K // cfg.block_k)
    if cfg.persistent or 2 * tiles > slots or num_k < _SPLIT_MIN_TOTAL_K_TILES:
        return 1
    split = 1
    for s in (2, 4, 8):
        if tiles * s <= slots and num_k % s == 0 and num_k // s >= _SPLIT_MIN_K_TILES:
            split = s
    return split


# ---------------------------------------------------------------------------------------------------- fp8 (e4m3)
#: Output dtypes of the fp8 GEMM (fp32 accumulate; the inputs are e4m3).
FP8_OUT_DTYPES = ("bfloat16", "float16")
#: Scale modes of A ``[M, K]``: one scalar, one per row (token), one per row and 128-wide k-block (DeepSeek 1x128).
FP8_SCALE_MODES_A = ("tensor", "row", "group")
#: Scale modes of B ``[N, K]``: one scalar, one per row (output channel), one per 128x128 block (DeepSeek).
FP8_SCALE_MODES_B = ("tensor", "row", "block")
#: Edge of a scale group / block along K (and along N for B's blocks).
FP8_GROUP = 128
_FP8_NAME_RE = re.compile(r"fp8_(\d+)x(\d+)x(\d+)_s(\d+)_c(\d+)_g(\d+)(_p)?(_pr)?")
_FP8_MAX_ACC_REGS = 192  # fp32 accumulator registers per consumer thread (both accumulators when promoting)


def fp8_needs_promotion(mode_a: str, mode_b: str) -> bool:
    """Whether a scale mode varies along K (A ``group`` or B ``block``): then every 128-wide k-block's product
    is scaled and added into a separate fp32 sum (DeepSeek's promotion)."""
    return mode_a == "group" or mode_b == "block"


@dataclass(frozen=True)
class Fp8GemmConfig:
    """Tile configuration of the warp-specialised sm_90a fp8 (e4m3) GEMM (C = A @ B^T, scaled).

    The kernel has the structure of :class:`GemmConfig`'s (one TMA producer warpgroup, 1-2 wgmma consumer
    warpgroups of 64 rows each, a full/empty mbarrier ring, 128-byte swizzle); a k-tile is 128 e4m3 values
    (128 bytes, one swizzle row), issued as four ``wgmma m64n{block_n}k32`` per consumer.

    Attributes
    ----------
    block_m, block_n, block_k : int
        CTA tile; ``block_m == 64 * consumers``, ``block_n`` a multiple of 32 in [32, 256] (the epilogue
        stores 32-column groups), ``block_k`` 128.
    stages, consumers, swizzle, persistent : int, int, int, bool
        As in :class:`GemmConfig`.
    promote : bool
        Accumulate each 128-wide k-block in a fresh wgmma accumulator, then add it (scaled, for the
        ``group``/``block`` modes) into a second fp32 accumulator (DeepSeek's "promotion": the
        tensor cores' fp8 accumulation keeps fewer bits than fp32). Needs registers for two accumulators
        (``block_n <= 192``) and waits for each k-block's wgmma (no wgmma of the next k-block in flight
        in the same warpgroup). Required by the ``group``/``block`` scale modes; optional otherwise
        (``False`` is ``torch._scaled_mm(use_fast_accum=True)``'s accuracy class, ``True`` its default).
    """

    block_m: int = 128
    block_n: int = 256
    block_k: int = 128
    stages: int = 4
    consumers: int = 2
    swizzle: int = 8
    persistent: bool = False
    promote: bool = False

    @property
    def threads(self) -> int:
        return 128 * (1 + self.consumers)

    def acc_regs(self) -> int:
        """fp32 accumulator registers per consumer thread."""
        return (self.block_n // 2) * (2 if self.promote else 1)

    def smem_bytes(self) -> int:
        """Dynamic shared memory: the stage ring (1 byte per element) plus 2 mbarriers per stage."""
        return self.stages * (self.block_m + self.block_n) * self.block_k + 16 * self.stages

    def occupancy(self) -> int:
        """CTAs per SM allowed by shared memory, threads and registers (as :meth:`GemmConfig.occupancy`)."""
        regs = 168 if self.consumers == 2 else 128
        return max(1, min(SM90_SMEM_BYTES // self.smem_bytes(), 2048 // self.threads,
                          65536 // (regs * self.threads)))

    def tiles(self, M: int, N: int) -> int:
        return -(-M // self.block_m) * -(-N // self.block_n)

    def b_blocks_per_tile(self) -> int:
        """128-column scale blocks of B that one tile can touch (1 when ``block_n`` divides 128)."""
        return 1 if FP8_GROUP % self.block_n == 0 else 2

    def check_tile(self) -> str | None:
        """Problem-independent validity of the tile (``None`` when valid)."""
        if self.consumers not in (1, 2):
            return f"consumers={self.consumers}: 1 or 2 consumer warpgroups are supported"
        if self.block_m != 64 * self.consumers:
            return (f"block_m={self.block_m} must be 64 * consumers = {64 * self.consumers} "
                    "(each consumer warpgroup issues m64 wgmma)")
        if self.block_n % 32 or not 32 <= self.block_n <= 256:
            return f"block_n={self.block_n} must be a multiple of 32 in [32, 256] (wgmma N; 32-column store groups)"
        if self.block_k != FP8_GROUP:
            return f"block_k={self.block_k}: only 128 (one 128-byte swizzled row of e4m3, one scale block) is supported"
        if self.acc_regs() > (_FP8_MAX_ACC_REGS if self.promote else _MAX_ACC_REGS):
            what = "two accumulators (promote)" if self.promote else "the accumulator"
            return f"block_n={self.block_n}: {what} need {self.acc_regs()} registers per thread"
        if self.stages < 2:
            return f"stages={self.stages}: at least 2 are needed to overlap TMA with wgmma"
        if self.swizzle < 1:
            return f"swizzle={self.swizzle} must be >= 1"
        smem = self.smem_bytes()
        if smem > SM90_SMEM_BYTES:
            return (f"needs {smem} B of shared memory ({self.stages} stages x ({self.block_m}+{self.block_n}) x "
                    f"{self.block_k} B) > {SM90_SMEM_BYTES} B (227 KB)")
        return None

    def check(self, M: int, N: int, K: int, out_dtype: str = "bfloat16", mode_a: str = "tensor",
              mode_b: str = "tensor") -> str | None:
        """``None`` if this config can run the scaled ``C[M,N] = A[M,K] @ B[N,K]^T`` (e4m3 in, ``out_dtype`` out),
        else the reason."""
        if out_dtype not in FP8_OUT_DTYPES:
            return f"out_dtype {out_dtype!r} is not supported (supported: {', '.join(FP8_OUT_DTYPES)})"
        if mode_a not in FP8_SCALE_MODES_A:
            return f"scale mode of A {mode_a!r} unknown (known: {', '.join(FP8_SCALE_MODES_A)})"
        if mode_b not in FP8_SCALE_MODES_B:
            return f"scale mode of B {mode_b!r} unknown (known: {', '.join(FP8_SCALE_MODES_B)})"
        reason = self.check_tile()
        if reason:
            return reason
        for name, v in (("M", M), ("N", N), ("K", K)):
            if not isinstance(v, int) or v < 1:
                return f"{name}={v!r}: shapes must be static positive ints"
        if K % 16:
            return f"K={K} is not a multiple of 16 (TMA needs 16-byte aligned row strides of the e4m3 A and B)"
        if M * max(N, K) >= 2**31 or N * K >= 2**31:
            return f"M*N, M*K or N*K >= 2^31 (M={M}, N={N}, K={K}): 32-bit indexing"
        if fp8_needs_promotion(mode_a, mode_b) and not self.promote:
            return (f"scale modes ({mode_a}, {mode_b}) vary along K: they need promote=True "
                    "(each 128-wide k-block scaled into a separate fp32 accumulator)")
        if mode_b == "block" and self.block_n > FP8_GROUP + _gcd(self.block_n, FP8_GROUP):
            return (f"block_n={self.block_n}: a tile could span 3 of B's 128-column scale blocks "
                    "(at most 2 are supported)")
        return None

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_name(cls, name: str) -> "Fp8GemmConfig":
        """Inverse of :meth:`name`."""
        m = _FP8_NAME_RE.fullmatch(name)
        if m is None:
            raise ValueError(f"not an Fp8GemmConfig name: {name!r} (expected like 'fp8_128x256x128_s4_c2_g8[_p][_pr]')")
        bm, bn, bk, st, co, sw, p, pr = m.groups()
        return cls(int(bm), int(bn), int(bk), int(st), int(co), int(sw), p is not None, pr is not None)

    def name(self) -> str:
        return (f"fp8_{self.block_m}x{self.block_n}x{self.block_k}_s{self.stages}_c{self.consumers}_g{self.swizzle}"
                + ("_p" if self.persistent else "") + ("_pr" if self.promote else ""))


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


#: The fp8 configs, largest tile first. A k-tile of 128 e4m3 bytes has the byte layout of the fp16 kernel's
#: 64-element k-tile, so the 128x256 / 4-stage tile uses the same 192 KB ring as the fp16 workhorse. The
#: promoting tiles keep two accumulators: block_n <= 192 (2 x 96 registers).
SM90_FP8_CONFIGS: tuple[Fp8GemmConfig, ...] = (
    Fp8GemmConfig(128, 256, 128, 4, 2, 8),
    Fp8GemmConfig(128, 128, 128, 6, 2, 8),
    Fp8GemmConfig(64, 128, 128, 4, 1, 8),
    Fp8GemmConfig(64, 64, 128, 6, 1, 8),
    Fp8GemmConfig(128, 192, 128, 5, 2, 8, promote=True),
    Fp8GemmConfig(128, 128, 128, 6, 2, 8, promote=True),
    Fp8GemmConfig(64, 128, 128, 4, 1, 8, promote=True),
    Fp8GemmConfig(64, 64, 128, 6, 1, 8, promote=True),
)
#: Persistent variants of the 128-row tiles.
SM90_FP8_PERSISTENT_CONFIGS: tuple[Fp8GemmConfig, ...] = tuple(
    replace(c, persistent=True) for c in SM90_FP8_CONFIGS if c.consumers == 2)

# Relative per-SM throughput of the fp8 tiles: predicted from the shared-memory/L2 bytes per flop (a 128x128
# tile loads 1.5x the bytes per flop of 128x256) and from the promotion's stall per k-block. The H200 run of
# session 4 measured only the heuristic's picks (128x256 at ~1200-1400 TFLOP/s, 128x192 promoting at ~800-1070),
# not a sweep, so the table is not refitted yet.
_FP8_TILE_EFF = {(128, 256, False): 1.0, (128, 128, False): 0.8, (64, 128, False): 0.6, (64, 64, False): 0.42,
                 (128, 192, True): 0.85, (128, 128, True): 0.72, (64, 128, True): 0.5, (64, 64, True): 0.36}


def _estimate_fp8(cfg: Fp8GemmConfig, M: int, N: int, num_sms: int) -> float:
    occ = cfg.occupancy()
    waves = -(-cfg.tiles(M, N) // (num_sms * occ))
    return waves * cfg.block_m * cfg.block_n * occ / _FP8_TILE_EFF.get((cfg.block_m, cfg.block_n, cfg.promote), 0.3)


def fp8_candidates(M: int, N: int, K: int, out_dtype: str = "bfloat16", mode_a: str = "tensor",
                   mode_b: str = "tensor", num_sms: int = SM90_NUM_SMS) -> list[Fp8GemmConfig]:
    """The tuning space of one fp8 problem: every valid base and persistent config (promoting and not,
    where the scale modes allow both)."""
    return [c for c in SM90_FP8_CONFIGS + SM90_FP8_PERSISTENT_CONFIGS
            if c.check(M, N, K, out_dtype, mode_a, mode_b) is None and (not c.persistent or c.tiles(M, N) > num_sms)]


def select_fp8_config(M: int, N: int, K: int, out_dtype: str = "bfloat16", mode_a: str = "tensor",
                      mode_b: str = "tensor", promote: bool = False, num_sms: int = SM90_NUM_SMS) -> Fp8GemmConfig:
    """Heuristic default (as :func:`select_sm90_config`: waves x predicted tile efficiency, persistent for 1-8
    waves of 128-row tiles). ``promote`` asks for promotion in the per-tensor/per-row modes (the group/block
    modes always promote). Raises ``NotImplementedError`` with the reason when no config is valid."""
    promote = promote or fp8_needs_promotion(mode_a, mode_b)
    pool = [c for c in SM90_FP8_CONFIGS if c.promote == promote]
    valid = [c for c in pool if c.check(M, N, K, out_dtype, mode_a, mode_b) is None]
    if not valid:
        raise NotImplementedError(f"sm_90a fp8 GEMM M={M} N={N} K={K} {out_dtype} scales ({mode_a}, {mode_b}): "
                                  f"{pool[0].check(M, N, K, out_dtype, mode_a, mode_b)}")
    best = min(valid, key=lambda c: _estimate_fp8(c, M, N, num_sms))
    if best.consumers == 2 and num_sms < best.tiles(M, N) <= _PERSISTENT_MAX_WAVES * num_sms:
        best = replace(best, persistent=True)
    return best
