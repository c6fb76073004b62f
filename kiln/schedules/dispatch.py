"""The schedule stage: apply rules in priority order to every PrimFunc and report what happened."""
from __future__ import annotations

from dataclasses import dataclass, field

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight import normalize_prim_func

from ..errors import ScheduleFallbackError
from .rule import Declined, ScheduleRule

__all__ = ["FuncReport", "apply_rules", "is_hot", "is_scheduled"]

#: PrimFunc attrs of kiln's hand-written kernels copied into the schedule report (``kiln inspect -v``).
_DETAIL_ATTRS = ("kiln.gemm_config", "kiln.gemv_config", "kiln.config_source", "kiln.epilogue",
                 "kiln.attention_config", "kiln.mfma")


@dataclass
class FuncReport:
    """What the schedule stage did to one PrimFunc."""

    func: str
    rule: str | None
    fallback: bool
    hot: bool
    declined: list = field(default_factory=list)
    detail: dict = field(default_factory=dict)     # e.g. the tile config and whether a tuned table chose it

    def to_json(self) -> dict:
        return {"func": self.func, "rule": self.rule, "fallback": self.fallback, "hot": self.hot,
                "declined": [{"rule": d.rule, "reason": d.reason} for d in self.declined], "detail": self.detail}


def is_scheduled(func: tirx.PrimFunc) -> bool:
    return "tirx.is_scheduled" in func.attrs and int(func.attrs["tirx.is_scheduled"]) == 1


def _loads(expr) -> set:
    """Names of the buffers an expression reads (through casts)."""
    if isinstance(expr, tvm.ir.TensorLoad):  # what tirx.BufferLoad builds in TVM 0.27
        return {str(expr.source)}
    if isinstance(expr, tirx.Cast):
        return _loads(expr.value)
    return set()


def _is_mac(value) -> bool:
    """``acc + a[..] * b[..]`` with a and b distinct buffers: a contraction, not a sum of squares."""
    if not isinstance(value, tirx.Add):
        return False
    for term in (value.a, value.b):
        term = term.value if isinstance(term, tirx.Cast) else term
        if isinstance(term, tirx.Mul):
            a, b = _loads(term.a), _loads(term.b)
            if a and b and a != b:
                return True
    return False


def is_hot(func: tirx.PrimFunc) -> bool:
    """A PrimFunc is hot when it holds a multiply-accumulate reduction (GEMM, conv, batched matmul).

    Those are the ops whose generic schedule costs whole-model speed, so ``strict`` compiles refuse to let
    them fall back.
    """
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:  # not in the normal form dlight needs: no rule can treat it as a GEMM either
        return False
    for info in infos:
        block = sch.get(info.block_rv)
        if info.is_reduction() and isinstance(block.body, tirx.BufferStore) and _is_mac(block.body.value):
            return True
    return False


def apply_rules(mod: tvm.IRModule, target: tvm.target.Target, rules: list[ScheduleRule],
                strict: bool = False) -> tuple[tvm.IRModule, list[FuncReport]]:
    """Schedule every unscheduled PrimFunc of ``mod`` with the first rule that accepts it.

    Parameters
    ----------
    mod : IRModule
        Module after fusion.
    target : Target
        Target the rules see (``KilnTarget.schedule_target``).
    rules : list of ScheduleRule
        In priority order; the last is normally a fallback that accepts everything.
    strict : bool
        Raise :class:`ScheduleFallbackError` when a hot PrimFunc is scheduled by a fallback rule.

    Returns
    -------
    (IRModule, list of FuncReport)
    """
    reports, updated = [], {}
    with target:
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if is_scheduled(func):
                # Already scheduled by a kiln fusion pass (e.g. the sm_90a GEMM): report it under the
                # rule named by its "kiln.rule" attr; other pre-scheduled PrimFuncs stay unreported.
                if func.attrs is not None and "kiln.rule" in func.attrs:
                    detail = {k[len("kiln."):]: str(func.attrs[k]) for k in _DETAIL_ATTRS if k in func.attrs}
                    reports.append(FuncReport(gvar.name_hint, str(func.attrs["kiln.rule"]), False, True,
                                              detail=detail))
                continue
            rep = FuncReport(gvar.name_hint, None, False, is_hot(func))
            for rule in rules:
                res = rule.apply(func, target)
                if isinstance(res, Declined):
                    rep.declined.append(res)
                    continue
                rep.rule = rule.name
                rep.fallback = rule.fallback or (rep.hot and getattr(rule, "fallback_on_hot", False))
                updated[gvar] = res.mod["main"].with_attr("tirx.is_scheduled", True)
                attrs = updated[gvar].attrs
                rep.detail = {k[len("kiln."):]: str(attrs[k]) for k in _DETAIL_ATTRS if k in attrs}
                break
            reports.append(rep)
    bad = [r.func for r in reports if strict and r.hot and (r.fallback or r.rule is None)]
    if bad:
        raise ScheduleFallbackError(
            f"strict compile: {len(bad)} hot PrimFunc(s) fell back to a generic schedule: {', '.join(bad)}; "
            "see `kiln inspect` for each rule's decline reason")
    for gvar, func in updated.items():
        mod[gvar] = func
    return mod, reports
