"""Relax passes of kiln's compile stages.

Each stage's pass list is a plain function of the target kind, in order, so the pipeline is readable in one
place. kiln's own fusion passes (GEMM epilogues, attention, norms, megakernel regions) go in ``pattern_passes``,
which the fusion stage runs before folding weight-only work into the weights and before TVM's generic
``FuseOps``/``FuseTIR``.
"""
from __future__ import annotations

import tvm
from tvm import relax

__all__ = ["cleanup_passes", "pattern_passes", "fusion_passes", "lower_passes", "drop_dead_code", "target_kind", "proving",
           "rewrite_functions", "read_report"]


def drop_dead_code(mod: tvm.IRModule) -> tvm.IRModule:
    """DCE keeping every Relax entry function (the ones with a ``global_symbol``): what a rewriting pass runs
    after replacing bindings, whatever the module's entries are called."""
    entries = [gv.name_hint for gv, f in mod.functions_items()
               if isinstance(f, relax.Function) and "global_symbol" in (f.attrs or {})]
    return relax.transform.DeadCodeElimination(entries or None)(mod)


def rewrite_functions(rw, mod: tvm.IRModule) -> tvm.IRModule:
    """Run the mutator ``rw`` (built on ``mod``) over every Relax function; the module its builder holds after."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rw.builder_.update_func(gv, rw.visit_expr(func))
    return rw.builder_.get()


def read_report(mod: tvm.IRModule, attr: str, empty=list):
    """The JSON report a pattern pass left in module attr ``attr``; ``empty()`` when the pass did not run."""
    import json
    attrs = mod.attrs
    if attrs is None or attr not in attrs:
        return empty()
    return json.loads(str(attrs[attr]))


def target_kind(explicit: str | None, default: str = "none") -> str:
    """The target kind a pattern pass rewrites for: the one it was given, else the current target's (the pipeline
    runs the passes under ``with target``), else ``default``."""
    if explicit:
        return explicit
    cur = tvm.target.Target.current(allow_none=True)
    return cur.kind.name if cur is not None else default


def proving(prove: bool | None) -> bool:
    """Whether a pass proves its rewrites: ``prove``, or the ``prove_rewrites`` knob when it is None.

    When proving is on and z3 is not installed this raises :class:`~kiln.errors.ToolchainMissingError`. The
    passes call it in their constructors, in Python: raised later, from inside ``transform_module``, TVM's FFI
    would turn it into a bare ``RuntimeError``.
    """
    from .. import knobs
    on = knobs.get("prove_rewrites") if prove is None else bool(prove)
    if on:
        import importlib.util
        if importlib.util.find_spec("z3") is None:
            from ..errors import ToolchainMissingError
            raise ToolchainMissingError(
                "z3 (pip install z3-solver)", "prove fusion rewrites before they are applied",
                "install it, or set KILN_PROVE_REWRITES=0 (or pass prove=False) to apply rewrites checked by the "
                "numerics tests only")
    return on


def cleanup_passes(kind: str) -> list[tvm.transform.Pass]:
    """Graph cleanup right after import: inference-only decompositions, dead code, canonical bindings.

    (``LegalizeBoolArith`` is not repeated here: both importers run it and record what it rewrote.)
    """
    return [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.FoldConstant(),
        relax.transform.DeadCodeElimination(["main"]),
    ]


def pattern_passes(kind: str) -> list[tvm.transform.Pass]:
    """kiln's own pattern fusions, on high-level Relax, before weight folding and legalization.

    Every target: Linear layers that read the same input (Q/K/V, gate/up) become one GEMM with concatenated
    weights and a ``split`` (:mod:`.fuse_sibling_gemms`; the concatenations are folded into the weights).

    cuda: Linear GEMMs and their elementwise epilogue become calls of kiln's sm_90a wgmma kernel (a GEMM
    ending in such a split writes its parts as separate outputs) (:mod:`.fuse_gemm_epilogue`; it matches ``matmul(x, permute_dims(w, [1, 0]))``, which weight folding
    would otherwise turn into a matmul with a pre-transposed weight, and must run before ``LegalizeOps``).
    Then attention (``softmax(Q K^T * s + mask) V``, decomposed or ``nn.attention``) becomes one call of
    kiln's sm_90a flash kernel in BSHD (:mod:`.fuse_attention`); problems the kernel declines stay unfused.

    cuda and llvm: CNNs go to NHWC once (:mod:`.to_nhwc`), per-channel affine chains after convs (inference batch
    norm, conv biases) fold into the conv weights (:mod:`.fold_conv_bn`) and 2-D convs become
    ``matmul(A, permute_dims(W2))`` GEMMs (:mod:`.conv_to_gemm`), which the GEMM epilogue pass then takes on cuda.

    llvm: attention becomes one call of the generic TE kernel (:mod:`.attention_te`, fp32 softmax): the
    same rewrite is thereby exercised by every CPU compile, the compile is faster (the mask sub-graphs are
    evaluated once and removed) and the result at least as accurate. rocm: nothing yet (dlight would
    schedule the generic kernel poorly; it awaits an MFMA attention kernel).
    """
    from .fuse_sibling_gemms import FuseSiblingGemms  # noqa: WPS433
    from . import fuse_gemm_epilogue as fge  # noqa: WPS433
    passes: list[tvm.transform.Pass] = [FuseSiblingGemms()]
    if kind in ("cuda", "llvm"):    # CNNs: NHWC once, batch norm into the weights, convs as GEMMs (conv_to_gemm.py)
        from .conv_to_gemm import ConvToGemm  # noqa: WPS433
        from .fold_conv_bn import FoldConvBN  # noqa: WPS433
        from .to_nhwc import ToNHWC  # noqa: WPS433
        passes += [ToNHWC(kind, min_macs=fge.MIN_MACS), FoldConvBN(), ConvToGemm(kind, min_macs=fge.MIN_MACS)]
    if kind == "cuda":
        passes.append(fge.FuseGemmEpilogueSM90("cuda", min_macs=fge.MIN_MACS))
    if kind in ("cuda", "llvm"):
        from .fuse_attention import FuseAttention  # noqa: WPS433
        passes.append(FuseAttention(kind))
    return passes


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
