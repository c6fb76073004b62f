"""kiln's gfx942 (MI300) GEMM: ``C = epilogue(A @ B^T)`` on MFMA, as a ``tvm.s_tir`` schedule rule.

* Inputs fp16 or bf16 (``v_mfma_f32_16x16x16_{f16,bf16}``) or fp8 e4m3 in gfx942's FNUZ encoding
  (``float8_e4m3fnuz``, ``v_mfma_f32_16x16x32_fp8_fp8``, through the LLVM intrinsic: TVM registers
  no bf16 or fp8 MFMA); fp32 accumulate; the function's elementwise consumers (bias, residual,
  activations, the output cast) are applied between the accumulator and the store.
* Any M, N and K, static or symbolic (dynamic shapes): every axis is padded to the tile in the kernel.
* The rule (:class:`GemmGfx942Rule`, ``kiln.gemm_gfx942``) takes the matmul PrimFuncs that kiln's
  Relax pipeline produces (Linear with a ``[K, N]`` or ``[N, K]`` weight, batched matmul, and
  conv2d as an implicit GEMM: the im2col happens in the LDS fetch) and declines, with the
  reason, anything else.

**ROCm is compiled, not run**: there is no AMD GPU here. What is proven: the gfx942 code object
holds the MFMA instructions (tests count them in the asm), and the *same* schedule, with each MFMA
intrinsic replaced by its own description, computes the right numbers on the CPU. The hardware's
operand layout and the kernel's speed are not verified (``benchmarks/NOTES.md``, gfx942 section).

Schedule steps: ``gemm_gfx942_schedule.py``; intrinsics: ``gemm_gfx942_intrin.py``.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import tvm
from tvm import te, tirx

from . import gemm_gfx942_intrin as gi
from .gemm_gfx942_schedule import GemmDecline, GemmProblem, _first_line, analyze, schedule_gemm
from .gemm_sm90 import Epilogue
from .rule import Declined, RuleResult, ScheduleRule

__all__ = ["GemmConfigGfx942", "GFX942_GEMM_CONFIGS", "GFX942_LDS_BYTES", "GFX942_MAX_THREADS",
           "MFMA_INSTRUCTIONS", "GEMM_GFX942_DTYPES", "select_gfx942_config", "make_gemm_gfx942",
           "schedule_gfx942", "build_gfx942", "build_reference", "mfma_counts", "gfx942_asm",
           "GemmGfx942Rule", "GemmDecline", "GemmProblem"]

#: LDS one workgroup may use on gfx942.
GFX942_LDS_BYTES = 64 * 1024
#: Threads per block: TVM stamps "amdgpu-flat-work-group-size 1,256" when no ROCm device is present
#: at build time, so larger blocks would compile and then fail to launch.
GFX942_MAX_THREADS = 256
GEMM_GFX942_DTYPES = tuple(gi.MFMA_SHAPES)
#: input dtype -> the instruction its kernel must contain
MFMA_INSTRUCTIONS = {"float16": "v_mfma_f32_16x16x16_f16", "bfloat16": "v_mfma_f32_16x16x16_bf16",
                     gi.FP8_DTYPE: "v_mfma_f32_16x16x32_fp8_fp8"}
_MAX_ACC_VGPRS = 128


@dataclass(frozen=True)
class GemmConfigGfx942:
    """Tile configuration of the gfx942 MFMA GEMM.

    Attributes
    ----------
    block_m, block_n, block_k : int
        Workgroup tile; A ``[block_m, block_k]`` and B ``[block_n, block_k]`` are staged in LDS per
        K step, and the fp32 ``[block_m, block_n]`` accumulator tile passes through LDS once for the
        epilogue.
    warps_m, warps_n : int
        Waves (64 lanes) along M and N; each owns a ``block_m / warps_m`` x ``block_n / warps_n``
        sub-tile of 16x16 MFMA tiles.
    mfma : tuple of int
        (m, n, k) of the MFMA instruction: (16, 16, 16) for fp16/bf16, (16, 16, 32) for fp8.
    vector_bytes : int
        Bytes each lane moves per global->LDS load.
    """

    block_m: int = 128
    block_n: int = 64
    block_k: int = 32
    warps_m: int = 2
    warps_n: int = 2
    mfma: tuple = (16, 16, 16)
    vector_bytes: int = 16

    @property
    def threads(self) -> int:
        return gi.WARP * self.warps_m * self.warps_n

    @property
    def wave_tile(self) -> tuple:
        return self.block_m // self.warps_m, self.block_n // self.warps_n

    def acc_vgprs(self) -> int:
        """fp32 accumulator registers per lane (4 per 16x16 MFMA tile)."""
        wm, wn = self.wave_tile
        return (wm // self.mfma[0]) * (wn // self.mfma[1]) * 4

    def lds_bytes(self, dtype: str = "float16") -> int:
        """A and B tiles (rows padded by one vector) plus the fp32 epilogue tile."""
        elem = tvm.DataType(dtype).bits // 8
        row = (self.block_k + self.vector_bytes // elem) * elem
        return (self.block_m + self.block_n) * row + self.block_m * self.block_n * 4

    def check_tile(self, dtype: str = "float16") -> str | None:
        """Problem-independent validity of this tile for ``dtype`` (``None`` when valid)."""
        if dtype not in gi.MFMA_SHAPES:
            return f"dtype {dtype!r} is not supported (supported: {', '.join(GEMM_GFX942_DTYPES)})"
        if tuple(self.mfma) != gi.MFMA_SHAPES[dtype]:
            return f"mfma={tuple(self.mfma)} but {dtype} uses {gi.MFMA_SHAPES[dtype]}"
        if self.threads > GFX942_MAX_THREADS:
            return (f"{self.warps_m}x{self.warps_n} waves = {self.threads} threads > {GFX942_MAX_THREADS} "
                    "(TVM's AMDGPU codegen caps the workgroup at 256 without a ROCm device)")
        mm, mn, mk = self.mfma
        if self.block_m % (mm * self.warps_m) or self.block_n % (mn * self.warps_n):
            return (f"block {self.block_m}x{self.block_n} is not a whole number of {mm}x{mn} MFMA "
                    f"tiles per wave ({self.warps_m}x{self.warps_n} waves)")
        if self.block_k % mk:
            return f"block_k={self.block_k} is not a multiple of the MFMA k={mk}"
        elem = tvm.DataType(dtype).bits // 8
        if self.vector_bytes not in (4, 8, 16) or (self.block_k * elem) % self.vector_bytes:
            return f"vector_bytes={self.vector_bytes} must be 4, 8 or 16 and divide a {self.block_k * elem}-byte row"
        for rows, what in ((self.block_m, "A"), (self.block_n, "B")):
            if (rows * self.block_k * elem) % (self.threads * self.vector_bytes):
                return (f"{what} tile ({rows}x{self.block_k}) is not a whole number of "
                        f"{self.vector_bytes}-byte loads for {self.threads} threads")
        wm, wn = self.wave_tile
        if (wm * wn) % (gi.WARP * 4):
            return f"wave tile {wm}x{wn} is not a whole number of 4-element epilogue stores per lane"
        if self.acc_vgprs() > _MAX_ACC_VGPRS:
            return f"wave tile {wm}x{wn} needs {self.acc_vgprs()} accumulator VGPRs per lane (> {_MAX_ACC_VGPRS})"
        lds = self.lds_bytes(dtype)
        if lds > GFX942_LDS_BYTES:
            return f"needs {lds} B of LDS > {GFX942_LDS_BYTES} B"
        return None

    def check(self, M: Any, N: Any, K: Any, dtype: str = "float16") -> str | None:
        """``None`` if this config can run ``C[M,N] = A[M,K] @ B[N,K]^T`` in ``dtype``, else the reason.

        Any of M, N, K may be symbolic (a ``tirx`` expression): every axis is padded to the tile.
        """
        reason = self.check_tile(dtype)
        if reason:
            return reason
        for name, v in (("M", M), ("N", N), ("K", K)):
            if isinstance(v, int) and v < 1:
                return f"{name}={v}: must be >= 1"
            if not isinstance(v, (int, tvm.ir.Expr)):
                return f"{name}={v!r}: expected an int or a tirx expression"
        return None

    def as_dict(self) -> dict:
        return asdict(self)

    def name(self) -> str:
        return (f"{self.block_m}x{self.block_n}x{self.block_k}_w{self.warps_m}x{self.warps_n}"
                f"_mfma{'x'.join(map(str, self.mfma))}")


#: The configs the default heuristic picks from (none measured: there is no MI300 here). 128x128
#: tiles would need 80 KB of LDS with the fp32 epilogue tile, more than gfx942's 64 KB.
GFX942_GEMM_CONFIGS: tuple[GemmConfigGfx942, ...] = (
    GemmConfigGfx942(128, 64, 32, 2, 2, (16, 16, 16)),
    GemmConfigGfx942(64, 128, 32, 2, 2, (16, 16, 16)),
    GemmConfigGfx942(64, 64, 32, 2, 2, (16, 16, 16)),
    GemmConfigGfx942(128, 64, 64, 2, 2, (16, 16, 32)),
    GemmConfigGfx942(64, 128, 64, 2, 2, (16, 16, 32)),
    GemmConfigGfx942(64, 64, 64, 2, 2, (16, 16, 32)),
)


def select_gfx942_config(M: Any, N: Any, K: Any, dtype: str = "float16") -> GemmConfigGfx942:
    """Heuristic default: among the valid configs, the least padded work ``ceil(M/bm) bm x
    ceil(N/bn) bn``, then the larger tile; a symbolic M or N counts as large. A guess
    from the tile arithmetic, not a measurement. Raises ``NotImplementedError`` with the reason
    when no config is valid."""
    valid = [c for c in GFX942_GEMM_CONFIGS if c.check(M, N, K, dtype) is None]
    if not valid:
        first = next((c for c in GFX942_GEMM_CONFIGS if tuple(c.mfma) == gi.MFMA_SHAPES.get(dtype)),
                     GFX942_GEMM_CONFIGS[0])
        raise NotImplementedError(f"gfx942 GEMM M={M} N={N} K={K} {dtype}: {first.check(M, N, K, dtype)}")
    rows, cols = (v if isinstance(v, int) else 1 << 20 for v in (M, N))

    def cost(c):
        padded = -(-rows // c.block_m) * c.block_m * (-(-cols // c.block_n) * c.block_n)
        return padded, -c.block_m * c.block_n, -c.block_m
    return min(valid, key=cost)


def _out_dtype(dtype: str) -> str:
    return "float16" if dtype == gi.FP8_DTYPE else dtype


def _as_f32(load, dtype: str):
    """A bias/residual element as float32. bf16 is widened by a bit shift, not a cast: TVM 0.27's
    BF16ComputeLegalize does not visit the values of ``Let`` (Epilogue binds one for gelu/silu), so
    a bf16 cast there would later be applied to the raw storage bits (measured: outputs ~1.6e4)."""
    if dtype != "bfloat16":
        return load.astype("float32")
    bits = tirx.Cast("uint32", tirx.reinterpret("uint16", load)) << tirx.const(16, "uint32")
    return tirx.reinterpret("float32", bits)


def make_gemm_gfx942(M: Any, N: int, K: int, dtype: str = "float16", epilogue: Any = None,
                     b_layout: str = "nk", out_dtype: str | None = None) -> tirx.PrimFunc:
    """The PrimFunc of ``C = epilogue(A @ B^T)`` in the form Relax legalization produces (fp32
    accumulate, epilogue stages as elementwise blocks, then the cast to ``out_dtype``).

    Parameters
    ----------
    M : int or str
        Rows; a string makes M a symbolic (dynamic) dimension of that name.
    N, K : int
    dtype : str
        ``float16``, ``bfloat16`` or ``float8_e4m3fnuz``.
    epilogue : Epilogue or sequence of stages, optional
        See :class:`kiln.schedules.gemm_sm90.Epilogue`; ``bias`` ``[N]`` and ``residual``
        ``[M, N]`` are inputs in ``out_dtype``.
    b_layout : str
        ``"nk"``: B is ``[N, K]`` (the Linear weight); ``"kn"``: B is ``[K, N]``.
    out_dtype : str, optional
        Output dtype (default: the input dtype; float16 for fp8).

    Returns
    -------
    PrimFunc
        Parameters ``(A, B, [bias], [residual], C)``.
    """
    if dtype not in gi.MFMA_SHAPES:
        raise NotImplementedError(f"gfx942 GEMM: dtype {dtype!r} unsupported "
                                  f"(supported: {', '.join(GEMM_GFX942_DTYPES)})")
    if b_layout not in ("nk", "kn"):
        raise ValueError(f"b_layout must be 'nk' or 'kn', given {b_layout!r}")
    epi = epilogue if isinstance(epilogue, Epilogue) else Epilogue(tuple(epilogue or ()))
    odt = out_dtype or _out_dtype(dtype)
    if isinstance(M, str):  # one index dtype throughout, as Relax legalization writes it
        m, N, K = tirx.Var(M, "int64"), tirx.IntImm("int64", N), tirx.IntImm("int64", K)
    else:
        m = M
    A = te.placeholder((m, K), dtype, name="A")
    B = te.placeholder((N, K) if b_layout == "nk" else (K, N), dtype, name="B")
    k = te.reduce_axis((0, K), name="k")
    b_at = (lambda j, kk: B[j, kk]) if b_layout == "nk" else (lambda j, kk: B[kk, j])
    acc = te.compute((m, N), lambda i, j: te.sum(
        A[i, k].astype("float32") * b_at(j, k).astype("float32"), axis=k), name="matmul")
    ins = [A, B]
    bias = residual = None
    if epi.has_bias:
        bias = te.placeholder((N,), odt, name="bias")
        ins.append(bias)
    if epi.has_residual:
        residual = te.placeholder((m, N), odt, name="residual")
        ins.append(residual)
    out = te.compute((m, N), lambda i, j: epi.apply_tir(
        acc[i, j], None if bias is None else _as_f32(bias[j], odt),
        None if residual is None else _as_f32(residual[i, j], odt)).astype(odt), name="epilogue")
    func = te.create_prim_func(ins + [out])
    return func.with_attrs({"global_symbol": "gemm_gfx942", "kiln.epilogue": epi.name()})


def schedule_gfx942(func: tirx.PrimFunc, config: GemmConfigGfx942 | None = None, mode: str = "rocm"):
    """Schedule a matmul PrimFunc; returns a ``tvm.s_tir.Schedule``.

    ``mode="reference"`` applies the identical schedule without thread binding and with every
    intrinsic replaced by its description, for the CPU. Raises ``NotImplementedError`` with the
    reason when the function or the config is not supported.
    """
    try:
        prob = analyze(func)
    except GemmDecline as e:
        raise NotImplementedError(f"gfx942 GEMM: {e}") from e
    cfg = config or select_gfx942_config(prob.M, prob.N, prob.K, prob.dtype)
    reason = cfg.check(prob.M, prob.N, prob.K, prob.dtype)
    if reason:
        raise NotImplementedError(f"gfx942 GEMM {prob} with {cfg.name()}: {reason}")
    try:
        return schedule_gemm(func, cfg, mode)
    except GemmDecline as e:
        raise NotImplementedError(f"gfx942 GEMM {prob} with {cfg.name()}: {e}") from e


def _as_module(func_or_sch) -> tvm.IRModule:
    if isinstance(func_or_sch, tirx.PrimFunc):
        return tvm.IRModule({"main": func_or_sch})
    return func_or_sch.mod


def build_gfx942(func_or_sch):
    """``tvm.compile`` a scheduled GEMM for gfx942 with kiln's ROCm build path (needs ld.lld >= 17)."""
    from ..target import build_context, resolve_target, tir_pipeline
    t = resolve_target("rocm")
    with build_context(t):
        return tvm.compile(_as_module(func_or_sch), target=t.tvm_target, tir_pipeline=tir_pipeline(t))


def build_reference(func_or_sch):
    """``tvm.compile`` a ``mode="reference"`` schedule for the host CPU."""
    return tvm.compile(_as_module(func_or_sch), target=tvm.target.Target({"kind": "llvm"}))


def gfx942_asm(executable) -> str:
    """The gfx942 assembly of a built module (all ROCm device modules concatenated)."""
    from ..target import device_code
    return "\n".join(text for fmt, text in device_code(executable) if fmt == "asm")


def mfma_counts(asm: str) -> Counter:
    """How many of each ``v_mfma_*`` instruction the assembly holds."""
    return Counter(re.findall(r"^\s*(v_mfma_\w+)", asm, flags=re.M))


class GemmGfx942Rule(ScheduleRule):
    """``kiln.gemm_gfx942``: matmul PrimFuncs on rocm/gfx942 -> the MFMA schedule, or a decline.

    Parameters
    ----------
    min_m : int
        Static M below this is left to dlight (GEMV or SIMT Matmul): a 16-row MFMA tile would
        mostly multiply padding. M = 1 never reaches the rule's shape check: it is not a matmul
        in dlight's analysis (the M axis is trivial) and is declined as a matrix-vector product.
    """

    name = "kiln.gemm_gfx942"

    def __init__(self, min_m: int = 8):
        self.min_m = min_m

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target) -> RuleResult:
        try:
            return self._apply(func, target)
        except Exception as e:  # noqa: BLE001 - a rule crashing on a func it mis-recognised is a decline
            return Declined(self.name, f"raised {type(e).__name__}: {_first_line(e)}")

    def _apply(self, func: tirx.PrimFunc, target: tvm.target.Target) -> RuleResult:
        kind = target.kind.name
        if kind != "rocm":
            return Declined(self.name, f"target kind {kind!r}: the MFMA schedule is for rocm")
        mcpu = str(target.attrs.get("mcpu", ""))
        if not mcpu.startswith("gfx94"):
            return Declined(self.name, f"mcpu {mcpu!r}: needs CDNA3 (gfx940-gfx942) for fp8/bf16 MFMA")
        try:
            prob = analyze(func)
        except GemmDecline as e:
            return Declined(self.name, str(e))
        if isinstance(prob.M, int) and prob.M < self.min_m:
            return Declined(self.name, f"M={prob.M} < {self.min_m}: nearly a matrix-vector product, "
                                       "left to dlight (16-row MFMA tiles would mostly multiply padding)")
        try:
            cfg = select_gfx942_config(prob.M, prob.N, prob.K, prob.dtype)
        except NotImplementedError as e:
            return Declined(self.name, str(e))
        try:
            sch = schedule_gemm(func, cfg, "rocm")
        except GemmDecline as e:
            return Declined(self.name, f"{cfg.name()}: {e}")
        tagged = sch.mod["main"].with_attrs({"kiln.gemm_config": cfg.name(),
                                             "kiln.mfma": MFMA_INSTRUCTIONS[prob.dtype]})
        return tvm.s_tir.Schedule(tagged)
