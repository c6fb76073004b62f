"""Static facts of a kiln compile for :mod:`kernel_profile` (split from it: that script is the driver and the
trace tables): per PrimFunc its category, schedule rule, launches per forward, bytes in/out, GEMM problem and the
time at the H200 floors, plus the tile geometry of the sm_90a GEMMs."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["FuncInfo", "categorize", "static_info", "tile_use", "PEAK_TFLOPS", "PEAK_TBPS", "CATEGORIES"]

#: Compute floor: cuBLAS fp16 at 8192^3 on the H200 (benchmarks/NOTES.md, "Ceilings"), TFLOP/s.
PEAK_TFLOPS = 749.0
#: Memory floor: H200 copy bandwidth (bytes read + written per second, same source), TB/s.
PEAK_TBPS = 4.26
#: Row categories, in print order.
CATEGORIES = ("gemm_sm90", "gemm_other", "attention", "im2col/gather", "transpose/layout", "elementwise",
              "reduction", "vm builtin", "other")
_GATHER = re.compile(r"concatenate|strided_slice|take|gather|split|index_tensor|dynamic_slice")
_LAYOUT = re.compile(r"(?:fused_)?(?:(?:transpose|permute_dims|reshape|layout_transform|squeeze|expand_dims|flatten|pad"
                     r"|broadcast_to)\d*_?)+")
_REDUCE = re.compile(r"mean|sum|max_pool|avg_pool|adaptive|softmax|norm|variance|argmax|reduce")


# --------------------------------------------------------------------------- static facts from the IR
@dataclass
class FuncInfo:
    """What the compiler knows about one PrimFunc (one GPU kernel, or one llvm function)."""

    name: str
    category: str
    rule: str | None = None          # schedule rule (kiln.* attr or dlight rule); None on llvm
    fallback: bool = False
    hot: bool = False
    detail: dict = field(default_factory=dict)   # gemm_config, config_source, epilogue, ...
    calls: int = 0                   # launches per forward (call sites in the lowered module)
    in_bytes: int | None = None      # input buffers, each read once
    out_bytes: int | None = None     # output buffers, each written once
    mnk: tuple | None = None         # GEMM problem (kiln sm_90a GEMM / GEMV kernels)

    @property
    def bytes(self) -> int | None:
        return None if self.in_bytes is None or self.out_bytes is None else self.in_bytes + self.out_bytes

    @property
    def flops(self) -> int | None:
        return None if self.mnk is None else 2 * self.mnk[0] * self.mnk[1] * self.mnk[2]

    def floor_us(self) -> float | None:
        """Time at the compute floor or the copy-bandwidth floor, whichever is longer."""
        if self.bytes is None:
            return None
        return max((self.flops or 0) / (PEAK_TFLOPS * 1e12), self.bytes / (PEAK_TBPS * 1e12)) * 1e6


def categorize(name: str, rule: str | None = None, hot: bool = False) -> str:
    """The row category of a PrimFunc (or VM call) from its schedule rule, hotness and fused-op name."""
    rule = rule or ""
    if rule.startswith(("kiln.gemm_sm90", "kiln.gemv_sm90", "kiln.gemm_fp8")):
        return "gemm_sm90"
    if rule.startswith("kiln.attention"):
        return "attention"
    if name.startswith("vm.builtin"):
        return "vm builtin"
    if hot or rule.startswith("dlight.Matmul") or re.search(r"matmul|conv2d|dense", name):
        return "gemm_other"
    if _GATHER.search(name):
        return "im2col/gather"
    if _LAYOUT.fullmatch(name):
        return "transpose/layout"
    if rule.startswith(("dlight.Reduction", "dlight.GeneralReduction", "dlight.GEMV", "dlight.RMSNorm")) \
            or _REDUCE.search(name):
        return "reduction"
    return "elementwise"


def _nbytes(var) -> int | None:
    try:
        n = 1
        for d in var.shape:
            n *= int(d)
    except (TypeError, ValueError):          # symbolic dim
        return None
    import tvm
    return n * max(1, tvm.runtime.DataType(str(var.dtype)).bits // 8)


def _call_sites(mod) -> tuple[dict, dict]:
    """``(launches, n_inputs)`` per PrimFunc name: direct calls (lowered module) and ``call_tir`` input counts."""
    import tvm
    from tvm import relax, tirx
    prim = {gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    calls: dict = {}
    n_in: dict = {}

    def visit(e):
        if not isinstance(e, relax.Call):
            return
        if isinstance(e.op, tvm.ir.GlobalVar) and e.op.name_hint in prim:
            calls[e.op.name_hint] = calls.get(e.op.name_hint, 0) + 1
        elif isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir" and isinstance(e.args[1], relax.Tuple):
            n_in[e.args[0].name_hint] = len(e.args[1].fields)
            calls[e.args[0].name_hint] = calls.get(e.args[0].name_hint, 0) + 1

    for _, f in mod.functions_items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f, visit)
    return calls, n_in


def static_info(scheduled, lowered, report: list) -> dict:
    """``{PrimFunc name: FuncInfo}`` from the module after the schedule stage (``call_tir`` sites tell inputs from
    outputs), the lowered module (what is really launched: reshapes became views there) and the schedule report."""
    from tvm import tirx
    rep = {r["func"]: r for r in report}
    _, n_in = _call_sites(scheduled)
    launches, _ = _call_sites(lowered)
    out = {}
    for gv, f in scheduled.functions_items():
        if not isinstance(f, tirx.PrimFunc):
            continue
        name = gv.name_hint
        r = rep.get(name, {})
        attrs = f.attrs or {}
        rule = r.get("rule") or (str(attrs["kiln.rule"]) if "kiln.rule" in attrs else None)
        info = FuncInfo(name, categorize(name, rule, bool(r.get("hot"))), rule, bool(r.get("fallback")),
                        bool(r.get("hot")), dict(r.get("detail") or {}), launches.get(name, 0))
        sizes = [_nbytes(p) for p in f.params]
        k = n_in.get(name)
        if k is not None and None not in sizes:
            info.in_bytes, info.out_bytes = sum(sizes[:k]), sum(sizes[k:])
        ps = list(f.params)
        if (info.category == "gemm_sm90" and not name.startswith("gemm_sm90_reduce") and len(ps) >= 3
                and len(ps[0].shape) == 2 and len(ps[1].shape) == 2):
            try:
                (m, k0), (n, k1) = [int(d) for d in ps[0].shape], [int(d) for d in ps[1].shape]
                if k0 == k1:
                    info.mnk = (m, n, k0)
            except (TypeError, ValueError):
                pass
        out[name] = info
    return out


def tile_use(info: FuncInfo) -> dict:
    """Tile geometry of an sm_90a GEMM: output-tile and K-tile utilisation (1 - padding), CTAs, waves."""
    from kiln.schedules.configs import SM90_NUM_SMS, GemmConfig
    cfg_name = info.detail.get("gemm_config")
    if info.mnk is None or not cfg_name:
        return {}
    try:
        cfg = GemmConfig.from_name(cfg_name)
    except ValueError:
        return {}
    M, N, K = info.mnk
    tm, tn, tk = -(-M // cfg.block_m), -(-N // cfg.block_n), -(-K // cfg.block_k)
    ctas = tm * tn * cfg.split_k
    return {"tile": f"{cfg.block_m}x{cfg.block_n}", "mn_use": M * N / (tm * cfg.block_m * tn * cfg.block_n),
            "k_use": K / (tk * cfg.block_k), "k_tiles": tk // cfg.split_k, "ctas": ctas,
            "waves": ctas / (SM90_NUM_SMS * cfg.occupancy()), "persistent": cfg.persistent}
