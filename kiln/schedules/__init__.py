"""Schedules: kiln's rules for the hot ops, then dlight, every decision reported.

Today's rule list is dlight's (with sm_90a's tensor cores re-enabled by scheduling under
``KilnTarget.schedule_target``); kiln's own rules go ahead of it: on rocm, ``kiln.gemm_gfx942``
(:mod:`.gemm_gfx942`, matmuls on MFMA). The Hopper GEMM is applied earlier, as a fusion pass.
"""
from __future__ import annotations

from tvm.s_tir import dlight as dl

from .dispatch import FuncReport, apply_rules, is_hot, is_scheduled
from .rule import Declined, DlightRule, ScheduleRule

__all__ = ["Declined", "ScheduleRule", "DlightRule", "FuncReport", "apply_rules", "default_rules",
           "is_hot", "is_scheduled"]


def default_rules(target_kind: str) -> list[ScheduleRule]:
    """Rules in priority order for a target kind (``"cuda"``, ``"rocm"``, ``"llvm"``)."""
    kiln_rules: list[ScheduleRule] = []
    if target_kind == "rocm":  # the gfx942 MFMA GEMM first; it declines (with reasons) what it cannot take
        from .gemm_gfx942 import GemmGfx942Rule
        kiln_rules.append(GemmGfx942Rule())
    if target_kind == "cuda":  # conv_to_gemm's im2col gathers, 8 channels per thread (dlight: 1 element)
        from .gather_cuda import GatherRule
        kiln_rules.append(GatherRule())
    if target_kind in ("cuda", "rocm"):
        return kiln_rules + [
            DlightRule(dl.gpu.Matmul()),
            # cuda: dlight's tensor-core matmul raises on dynamic-M GEMMs with an epilogue (a ScheduleError in
            # compute-at); its SIMT tiling (chosen for archs below sm_70) takes them: a fallback, but far better
            # than the general-reduction schedule they got before (tune_mixed's head: 21.9 ms vs inductor's 1.0)
            *([DlightRule(dl.gpu.Matmul(), fallback=True, arch="sm_60")] if target_kind == "cuda" else []),
            DlightRule(dl.gpu.GEMV()), DlightRule(dl.gpu.Reduction()),
            DlightRule(dl.gpu.GeneralReduction(), fallback_on_hot=True), DlightRule(dl.gpu.Fallback(), fallback=True)]
    # llvm needs no schedule to be correct; the CPU target is kiln's reference, not a speed target.
    return []
