"""Relax passes of kiln's compile stages.

Each stage's pass list is a plain function of the target kind, in order, so the pipeline is readable in one
place. kiln's own fusion passes (GEMM epilogues, attention, norms, megakernel regions) slot into
``fusion_passes`` ahead of TVM's generic ``FuseOps``/``FuseTIR`` as they land.
"""
from __future__ import annotations

import tvm
from tvm import relax

__all__ = ["cleanup_passes", "fusion_passes", "lower_passes"]


def cleanup_passes(kind: str) -> list[tvm.transform.Pass]:
    """Graph cleanup right after import: inference-only decompositions, dead code, canonical bindings."""
    from .legalize_bool import LegalizeBoolArith  # noqa: WPS433 - kept next to the importer fixes

    return [
        LegalizeBoolArith(),
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.FoldConstant(),
        relax.transform.DeadCodeElimination(["main"]),
    ]


def fusion_passes(kind: str) -> list[tvm.transform.Pass]:
    """Library dispatch, legalization to TensorIR, then operator fusion."""
    return [
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(["main"]),
    ]


def lower_passes(kind: str) -> list[tvm.transform.Pass]:
    """Dataflow lowering and VM finalisation (memory planning, CUDA-graph rewrite, shape lowering)."""
    return [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
        relax.transform.RewriteCUDAGraph(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]
