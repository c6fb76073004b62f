"""Schedules: kiln's rules for the hot ops, then dlight, every decision reported.

Today's rule list is dlight's (with sm_90a's tensor cores re-enabled by scheduling under
``KilnTarget.schedule_target``); kiln's own Hopper/MFMA rules are inserted ahead of it as they land.
"""
from __future__ import annotations

from tvm.s_tir import dlight as dl

from .dispatch import FuncReport, apply_rules, is_hot, is_scheduled
from .rule import Declined, DlightRule, ScheduleRule

__all__ = ["Declined", "ScheduleRule", "DlightRule", "FuncReport", "apply_rules", "default_rules",
           "is_hot", "is_scheduled"]


def default_rules(target_kind: str) -> list[ScheduleRule]:
    """Rules in priority order for a target kind (``"cuda"``, ``"rocm"``, ``"llvm"``)."""
    if target_kind in ("cuda", "rocm"):
        return [DlightRule(dl.gpu.Matmul()), DlightRule(dl.gpu.GEMV()), DlightRule(dl.gpu.Reduction()),
                DlightRule(dl.gpu.GeneralReduction()), DlightRule(dl.gpu.Fallback(), fallback=True)]
    # llvm needs no schedule to be correct; the CPU target is kiln's reference, not a speed target.
    return []
