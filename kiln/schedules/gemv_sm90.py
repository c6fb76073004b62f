"""kiln's decode GEMV for sm_90a: ``Y = epilogue((X @ W^T) [* scale[n]])`` for 1 <= M <= 16 rows of X.

* X: ``[M, K]`` fp16 or bf16; W: ``[N, K]`` (the ``torch.nn.Linear`` weight layout) in X's dtype,
  or fp8 e4m3 (``float8_e4m3fn``) with a per-output-channel fp32 ``scale[N]``; fp32 accumulate;
  Y in X's dtype. The epilogue is the GEMM's :class:`~kiln.schedules.gemm_sm90.Epilogue` (bias,
  residual, gelu_tanh, relu, silu, scale), applied after the fp8 scale.
* Static shapes; K and N multiples of 8 (tails handled), M in 1..16. Anything else raises
  ``NotImplementedError`` naming the case (``GemvConfig.check`` gives the reason).

Decode GEMV is a weight stream (every weight byte is read once), so the kernel is a bandwidth
kernel: 16-byte weight loads, many in flight per lane, the arithmetic on the tensor cores
(``mma.sync.m16n8k16``, so M = 1..16 cost the same). Kernel structure: ``gemv_sm90_kernel.py``.
Floor: ``bytes = N*K*w_bytes + M*K*2 + M*N*2 (+ 4N scale, + 2N bias, + 2MN residual)`` at the
H200's 4.26 TB/s copy bandwidth; ``benchmarks/gemv.py`` measures it against cuBLAS.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import tvm

from .configs import SM90_NUM_SMS
from .gemm_sm90 import SM90A_TARGET, Epilogue, cuda_source
from .gemv_sm90_kernel import build_gemv_kernel, gemv_smem_bytes

__all__ = ["GemvConfig", "GEMV_DTYPES", "GEMV_WEIGHT_DTYPES", "GEMV_MAX_M", "select_gemv_config",
           "make_gemv_sm90", "build_gemv_sm90", "GemvSM90", "gemv_reference", "gemv_bytes", "cuda_source"]

#: Activation (and output) dtypes.
GEMV_DTYPES = ("float16", "bfloat16")
#: Weight dtypes besides the activation dtype itself (fp8 takes a per-channel fp32 scale).
GEMV_WEIGHT_DTYPES = ("float8_e4m3fn",)
#: Largest M (rows of X): one m16n8k16 A operand.
GEMV_MAX_M = 16
#: Shared memory the per-warp partial sums may take, and the whole CTA (partials + cp.async ring);
#: the rest of the 256 KB stays L1 (X is re-read by every row group of a CTA).
_SMEM_BUDGET = 160 * 1024
_SMEM_TOTAL = 200 * 1024
_MAX_REGS = 255
_FP8 = "float8_e4m3fn"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class GemvConfig:
    """Tiling of the sm_90a decode GEMV (one CTA per SM, ``32 * warps`` threads).

    Attributes
    ----------
    warps : int
        Warps per CTA; they split K (chunk ``c`` of 32 fp16 / 64 fp8 k's goes to warp ``c % warps``).
    rows : int
        8-row weight groups a warp works on at once (they share the X fragments).
    unroll : int
        K chunks per lane per loop trip. A lane has ``rows * unroll`` independent 16-byte weight
        loads in flight; that product (with ``warps``) sets the bytes in flight per SM.
    l2_prefetch : int
        L2 prefetch hint of the weight loads (0 = none, 64, 128 or 256 bytes).
    stages : int
        0: the 16-byte loads go straight into registers (ptxas decides how many it issues before
        the first mma). >= 2: each warp streams its trips through a cp.async shared-memory ring of
        ``stages`` trips, so ``stages - 1`` trips are always in flight, whatever ptxas schedules.
    """

    warps: int = 8
    rows: int = 4
    unroll: int = 4
    l2_prefetch: int = 256
    stages: int = 0

    @property
    def threads(self) -> int:
        return 32 * self.warps

    def loads_in_flight(self) -> int:
        """16-byte weight loads a lane has in flight: one trip (register path) or ``stages - 1``
        trips (cp.async ring)."""
        return self.rows * self.unroll * max(1, self.stages - 1)

    def groups_per_cta(self, M: int, N: int, num_sms: int = SM90_NUM_SMS) -> int:
        """8-row groups each CTA owns: an even share over ``num_sms`` CTAs, fewer (more CTAs) when
        the partial sums would not fit the shared-memory budget."""
        G = N // 8
        rg = _cdiv(G, num_sms)
        per_group = self.warps * M * 8 * 4                 # bytes of partials per group per CTA
        cap = max(1, _SMEM_BUDGET // per_group)
        if rg > cap:
            rg = max(self.rows, cap - cap % self.rows)
        return rg

    def smem_bytes(self, M: int, N: int, num_sms: int = SM90_NUM_SMS, weight_dtype: str = "float16") -> int:
        """Dynamic shared memory of a CTA: per-warp partial sums (+ the cp.async ring)."""
        part, ring, _ = gemv_smem_bytes(M, weight_dtype, self, self.groups_per_cta(M, N, num_sms), _SMEM_TOTAL)
        return part + ring

    def est_registers(self, M: int, weight_dtype: str) -> int:
        """Rough register need per thread: weight and X fragments, accumulators, addresses."""
        fp8 = weight_dtype == _FP8
        x_regs = self.unroll * (8 if fp8 else 4) * (2 if M > 8 else 1)
        return 4 * self.rows * self.unroll + x_regs + 4 * self.rows + (8 if fp8 else 0) + 24

    def check(self, M: int, N: int, K: int, dtype: str = "float16", weight_dtype: str | None = None) -> str | None:
        """``None`` if this config can run the problem, else the reason."""
        wdt = dtype if weight_dtype is None else weight_dtype
        if dtype not in GEMV_DTYPES:
            return f"dtype {dtype!r} is not supported (supported: {', '.join(GEMV_DTYPES)})"
        if wdt != dtype and wdt not in GEMV_WEIGHT_DTYPES:
            return (f"weight dtype {wdt!r} is not supported with {dtype} activations "
                    f"(supported: {dtype}, {', '.join(GEMV_WEIGHT_DTYPES)})")
        bad = self.check_tile()
        if bad:
            return bad
        for name, v in (("M", M), ("N", N), ("K", K)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                return f"{name}={v!r}: shapes must be static positive ints"
        if M > GEMV_MAX_M:
            return f"M={M} > {GEMV_MAX_M}: the GEMV covers decode batches of 1..16 rows (use the GEMM)"
        if K % 8:
            return f"K={K} is not a multiple of 8 (16-byte aligned rows of X)"
        if N % 8:
            return f"N={N} is not a multiple of 8 (weights are read in groups of 8 rows)"
        if N * K >= 2**31 or M * max(N, K) >= 2**31:
            return f"N*K or M*max(N,K) >= 2^31 (M={M}, N={N}, K={K}): 32-bit indexing"
        part, ring, _ = gemv_smem_bytes(M, wdt, self, self.groups_per_cta(M, N), _SMEM_TOTAL)
        if part > _SMEM_BUDGET:
            return f"partial sums need {part} B of shared memory > {_SMEM_BUDGET} B"
        if part + ring > _SMEM_TOTAL:
            return (f"partial sums ({part} B) + cp.async ring ({ring} B: {self.stages} stages) need more than "
                    f"{_SMEM_TOTAL} B of shared memory")
        limit = min(_MAX_REGS, 65536 // self.threads)
        regs = self.est_registers(M, wdt)
        if regs > limit:
            return (f"needs ~{regs} registers per thread (rows*unroll={self.loads_in_flight()} weight loads, "
                    f"M={M}) > {limit} for {self.threads} threads per SM: it would spill")
        return None

    def check_tile(self) -> str | None:
        """Problem-independent validity (``None`` when valid)."""
        if self.warps not in (4, 8, 16):
            return f"warps={self.warps}: 4, 8 or 16 warps per CTA are supported"
        if not 1 <= self.rows <= 8:
            return f"rows={self.rows}: 1..8 groups of 8 weight rows per warp are supported"
        if not 1 <= self.unroll <= 16:
            return f"unroll={self.unroll}: 1..16 chunks per loop trip are supported"
        if self.l2_prefetch not in (0, 64, 128, 256):
            return f"l2_prefetch={self.l2_prefetch}: 0, 64, 128 or 256 (bytes) are supported"
        if self.stages == 1 or not 0 <= self.stages <= 8:
            return f"stages={self.stages}: 0 (register loads) or 2..8 (cp.async ring) are supported"
        return None

    def as_dict(self) -> dict:
        return asdict(self)

    def name(self) -> str:
        return (f"w{self.warps}_r{self.rows}_u{self.unroll}_p{self.l2_prefetch}"
                + (f"_s{self.stages}" if self.stages else ""))


#: (warps, 16-byte weight loads per lane per trip (cp.async: per trip and stage), cp.async stages) the
#: heuristic tries, in order; the first that is valid and fits one wave of CTAs wins. Measured on the H200
#: (M = 1, the four Llama-3-8B shapes; benchmarks/results/2026-11-21-h200/s2-gemv-run1.json and
#: s2-gemv.json): for fp16/bf16, 16 warps x 8+ register loads (64-112 KB in flight per SM) was fastest or
#: within 1% (8 warps x 16 loads: 1-7% slower; cp.async rings: within 1-2%). For fp8, ptxas interleaves
#: register loads with the e4m3 conversions once a trip has more than ~8 (6-9 of 16 issued before the
#: first mma); the cp.async ring (8 warps, 4 stages) was 2-6% faster than 16 warps x 8 register loads
#: at rows <= 4 (4096 x 4096, 4096 x 14336), tied at rows = 6 and 2.5% slower at rows = 7 (28672 x 4096).
#: Later entries are fallbacks when shared memory (M = 16 partial sums, the ring) does not fit.
_CANDIDATES = {"fp16": ((16, 8, 0), (8, 16, 0)),
               "fp8_small_rows": ((8, 4, 4), (8, 4, 3), (16, 8, 0), (8, 8, 0)),
               "fp8": ((16, 8, 0), (8, 4, 4), (8, 4, 3), (8, 8, 0))}


def select_gemv_config(M: int, N: int, K: int, dtype: str = "float16", weight_dtype: str | None = None,
                       num_sms: int = SM90_NUM_SMS) -> GemvConfig:
    """Heuristic default. Per candidate ``(warps, loads, stages)``: ``rows`` = the largest divisor (<= 8)
    of the CTA's share of 8-row groups (no idle batch slots); register path: ``unroll`` so that a lane
    has about ``loads`` 16-byte weight loads per trip, cp.async path: per trip and stage (no more than
    the K chunks a warp has; fewer when the register estimate says it would spill). The first valid
    candidate whose CTAs fit one wave is taken (else the first valid one). Raises
    ``NotImplementedError`` with the reason when the problem is not supported."""
    wdt = dtype if weight_dtype is None else weight_dtype
    G = N // 8 if isinstance(N, int) else 0
    picked, reason = None, None
    rows_of = lambda rg: max(r for r in range(1, min(rg, 8) + 1) if rg % r == 0)  # noqa: E731
    kind = "fp16"
    if wdt == _FP8:
        small = GemvConfig().check(M, N, K, dtype, wdt) is None and rows_of(GemvConfig().groups_per_cta(M, N)) <= 4
        kind = "fp8_small_rows" if small else "fp8"
    for warps, loads, stages in _CANDIDATES[kind]:
        base = GemvConfig(warps=warps, rows=1, unroll=1)
        reason = base.check(M, N, K, dtype, wdt)
        if reason:
            continue
        rg = base.groups_per_cta(M, N, num_sms)
        rows = rows_of(rg)
        chunks_per_warp = _cdiv(_cdiv(K, 64 if wdt == _FP8 else 32), warps)
        unroll = max(1, min(_cdiv(loads, rows), chunks_per_warp, 16))
        cfg = GemvConfig(warps=warps, rows=rows, unroll=unroll, stages=stages)
        while cfg.check(M, N, K, dtype, wdt) and cfg.unroll > 1:      # too many registers: fewer loads
            cfg = GemvConfig(warps=warps, rows=rows, unroll=cfg.unroll - 1, stages=stages)
        reason = cfg.check(M, N, K, dtype, wdt)
        if reason:
            continue
        if rg >= _cdiv(G, num_sms):                                   # one wave of CTAs: take it
            return cfg
        picked = picked or cfg
    if picked is None:
        raise NotImplementedError(f"sm_90a GEMV M={M} N={N} K={K} {dtype}/{wdt}: {reason}")
    return picked


def _as_epilogue(epilogue) -> Epilogue:
    if epilogue is None:
        return Epilogue()
    return epilogue if isinstance(epilogue, Epilogue) else Epilogue(tuple(epilogue))


def make_gemv_sm90(M: int, N: int, K: int, dtype: str = "float16", weight_dtype: str | None = None,
                   epilogue: Any = None, config: GemvConfig | None = None,
                   num_sms: int = SM90_NUM_SMS) -> tvm.tirx.PrimFunc:
    """The TIRx PrimFunc of ``Y = epilogue((X @ W^T) [* scale])`` for sm_90a.

    Parameters: ``(X[M,K], W[N,K], [scale[N] fp32 if W is fp8], [bias[N]], [residual[M,N]], Y[M,N])``;
    X, bias, residual and Y in ``dtype``, W in ``weight_dtype`` (default: ``dtype``).
    ``config`` defaults to :func:`select_gemv_config`. Raises ``ValueError`` for an invalid config
    and ``NotImplementedError`` (with the reason) for a problem the kernel does not handle.
    """
    epi = _as_epilogue(epilogue)
    wdt = dtype if weight_dtype is None else weight_dtype
    cfg = config if config is not None else select_gemv_config(M, N, K, dtype, wdt, num_sms)
    bad = cfg.check_tile()
    if bad:
        raise ValueError(f"invalid sm_90a GEMV config {cfg}: {bad}")
    reason = cfg.check(M, N, K, dtype, wdt)
    if reason:
        raise NotImplementedError(f"sm_90a GEMV M={M} N={N} K={K} {dtype}/{wdt} with {cfg.name()}: {reason}")
    func = build_gemv_kernel(M, N, K, dtype, wdt, cfg, cfg.groups_per_cta(M, N, num_sms), epi.apply_tir,
                             epi.has_bias, epi.has_residual)
    return func.with_attrs({"kiln.rule": "kiln.gemv_sm90", "kiln.gemv_config": cfg.name(),
                            "kiln.epilogue": epi.name(), "tirx.is_scheduled": True})


def build_gemv_sm90(func: tvm.tirx.PrimFunc):
    """``tvm.compile`` the PrimFunc for sm_90a with the TIRx pipeline (CUDA source only; it is JIT
    compiled when the module is loaded on a GPU)."""
    name = str(func.attrs["global_symbol"])
    return tvm.compile(tvm.IRModule({name: func}), tvm.target.Target(SM90A_TARGET), tir_pipeline="tirx")


def gemv_bytes(M: int, N: int, K: int, weight_dtype: str = "float16", epilogue: Any = None) -> int:
    """Bytes the GEMV must move at least: W once, X once, Y once, plus scale / bias / residual."""
    epi = _as_epilogue(epilogue)
    wb = 1 if weight_dtype == _FP8 else 2
    n = N * K * wb + M * K * 2 + M * N * 2
    n += 4 * N if weight_dtype == _FP8 else 0
    n += 2 * N if epi.has_bias else 0
    n += 2 * M * N if epi.has_residual else 0
    return n


def gemv_reference(x, w, scale=None, epilogue: Any = None, bias=None, residual=None):
    """fp32 reference of ``epilogue((x @ w^T) [* scale])`` (inputs upcast; the result stays fp32)."""
    epi = _as_epilogue(epilogue)
    acc = x.float() @ w.float().t()
    if scale is not None:
        acc = acc * scale.float()
    return epi.apply_torch(acc, None if bias is None else bias.float(),
                           None if residual is None else residual.float())


def _tvm_tensor(t, dtype: str):
    """DLPack view of a torch tensor; fp8 goes through a uint8 view where torch's DLPack has no fp8."""
    if dtype == _FP8:
        import torch
        try:
            v = tvm.runtime.from_dlpack(t)
            if str(v.dtype) == _FP8:
                return v
        except Exception:  # noqa: BLE001 - older torch: no float8 in DLPack
            pass
        return tvm.runtime.from_dlpack(t.view(torch.uint8))._create_view(tuple(t.shape), _FP8)
    return tvm.runtime.from_dlpack(t)


class GemvSM90:
    """A built GEMV callable on CUDA torch tensors: ``g(x, w, scale=None, bias=None, residual=None, out=None)``.

    Tensors are passed zero-copy through DLPack (contiguous, 16-byte aligned); the launch goes to
    TVM's current stream of the device (the default stream, which is torch's default stream too).
    """

    def __init__(self, M: int, N: int, K: int, dtype: str = "float16", weight_dtype: str | None = None,
                 epilogue: Any = None, config: GemvConfig | None = None):
        self.M, self.N, self.K, self.dtype = M, N, K, dtype
        self.weight_dtype = dtype if weight_dtype is None else weight_dtype
        self.epilogue = _as_epilogue(epilogue)
        self.config = config if config is not None else select_gemv_config(M, N, K, dtype, self.weight_dtype)
        self.func = make_gemv_sm90(M, N, K, dtype, self.weight_dtype, self.epilogue, self.config)
        self.ex = build_gemv_sm90(self.func)
        self._f = None

    @property
    def source(self) -> str:
        return cuda_source(self.ex)

    def tvm_args(self, x, w, scale=None, bias=None, residual=None, out=None) -> list:
        """Checked TVM tensors in parameter order (``out`` allocated when ``None``)."""
        import torch
        fp8 = self.weight_dtype == _FP8
        want = {"x": (x, (self.M, self.K), self.dtype), "w": (w, (self.N, self.K), self.weight_dtype)}
        if fp8:
            want["scale"] = (scale, (self.N,), "float32")
        elif scale is not None:
            raise ValueError(f"scale: given, but the weights are {self.weight_dtype} (only fp8 weights take a scale)")
        if self.epilogue.has_bias:
            want["bias"] = (bias, (self.N,), self.dtype)
        if self.epilogue.has_residual:
            want["residual"] = (residual, (self.M, self.N), self.dtype)
        if out is None:
            out = torch.empty((self.M, self.N), dtype=getattr(torch, self.dtype), device=x.device)
        want["out"] = (out, (self.M, self.N), self.dtype)
        for nm, (t, shape, dt) in sorted(want.items(), key=lambda kv: kv[1][0] is not None):  # missing first
            tdt = getattr(torch, dt)
            if (t is None or tuple(t.shape) != shape or t.dtype != tdt or not t.is_cuda or not t.is_contiguous()
                    or t.data_ptr() % 16):
                got = None if t is None else (tuple(t.shape), t.dtype, str(t.device),
                                              "contiguous" if t.is_contiguous() else "strided",
                                              f"ptr%16={t.data_ptr() % 16}")
                raise ValueError(f"{nm}: expected a contiguous, 16-byte aligned CUDA {dt} tensor of shape "
                                 f"{shape}, got {got}")
        return [_tvm_tensor(t, dt) for t, _, dt in want.values()]

    def __call__(self, x, w, scale=None, bias=None, residual=None, out=None):
        import torch
        if out is None:
            out = torch.empty((self.M, self.N), dtype=getattr(torch, self.dtype), device=x.device)
        args = self.tvm_args(x, w, scale, bias, residual, out)
        if self._f is None:
            self._f = self.ex[str(self.func.attrs["global_symbol"])]
        self._f(*args)
        return out
