"""The schedule-rule protocol: a rule returns a schedule, or a decline with its reason.

dlight's rules return ``None`` with no reason; ``DlightRule`` wraps one so that every decline is recorded
and surfaces in ``kiln inspect``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import tvm
from tvm import s_tir, tirx

__all__ = ["Declined", "ScheduleRule", "DlightRule", "RuleResult"]


@dataclass(frozen=True)
class Declined:
    """A rule's refusal, with the reason a person can act on."""

    rule: str
    reason: str


RuleResult = Union[s_tir.Schedule, Declined]


class ScheduleRule:
    """Base of kiln's schedule rules. ``fallback`` marks generic rules whose use is reported as a fallback."""

    name: str = "rule"
    fallback: bool = False

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target) -> RuleResult:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.apply")


class DlightRule(ScheduleRule):
    """Adapter for one dlight rule (``tvm.s_tir.dlight``)."""

    def __init__(self, rule, fallback: bool = False, fallback_on_hot: bool = False, arch: str | None = None):
        self.rule = rule
        self.name = f"dlight.{type(rule).__name__}" + (f"[{arch}]" if arch else "")
        self.fallback = fallback
        self.arch = arch        # schedule as for this arch (dlight picks its non-tensor-core path below sm_70)
        # a rule that is fine for its own pattern but generic for a contraction (GeneralReduction taking a GEMM
        # that dlight.Matmul refused: no tensor cores, measured 20x slower on the H200) reports a fallback there
        self.fallback_on_hot = fallback_on_hot

    def apply(self, func, target):
        if self.arch is not None:
            target = tvm.target.Target({**dict(target.export()), "arch": self.arch})
        try:
            space = self.rule.apply(func, target, False)
        except Exception as e:  # a rule crashing on a func it mis-recognised is a decline, not a failed compile
            return Declined(self.name, f"raised {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        if space is None:
            return Declined(self.name, "pattern not recognised (rule returned None)")
        if isinstance(space, (list, tuple)):
            space = space[0]
        return space
