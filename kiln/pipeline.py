"""The compile as a visible sequence of named stages, with invariants checked between them.

import -> cleanup -> fusion -> schedule -> lower -> codegen. Each stage is a function of a
:class:`CompileState`; ``dump_ir`` writes every stage's IR; ``check_*`` functions are the invariants
that must hold after a stage (e.g. no unscheduled GPU PrimFunc reaches codegen).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import tvm
from tvm import relax, tirx

from .errors import StageInvariantError
from .options import CompileOptions
from .schedules import apply_rules, default_rules, is_scheduled
from .signature import Signature

__all__ = ["CompileState", "Stage", "STAGES", "run_stages", "check_legalized", "check_scheduled"]

# Relax ops that may remain after legalization: calls into TensorIR, packed functions and VM builtins.
_LOWERED_OP_PREFIXES = ("relax.call_tir", "relax.call_dps_packed", "relax.call_pure_packed", "relax.call_packed",
                        "relax.builtin.", "relax.memory.", "relax.vm.", "relax.null_value", "relax.shape_of",
                        "relax.tensor_to_shape", "relax.shape_to_tensor", "relax.call_builtin_with_ctx",
                        "relax.call_inplace_packed", "relax.hint_on_device", "relax.to_vdevice", "relax.print",
                        "relax.assert_op", "relax.invoke_closure", "relax.make_closure", "relax.match_cast")


@dataclass
class CompileState:
    """Everything a stage reads or writes."""

    target: Any                       # KilnTarget
    options: CompileOptions
    mod: tvm.IRModule | None = None
    params: list = field(default_factory=list)
    signature: Signature | None = None
    executable: Any = None
    schedule_report: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[CompileState], None]
    check: Callable[[CompileState], None] | None = None


def _apply(state: CompileState, passes) -> None:
    with state.target.tvm_target:
        state.mod = tvm.transform.Sequential(passes)(state.mod)


def _well_formed(stage: str):
    def check(state: CompileState) -> None:
        try:
            relax.analysis.well_formed(state.mod)
        except Exception as e:  # raises on the first violation, with the offending node
            raise StageInvariantError(stage, f"the Relax module is not well formed: {str(e).splitlines()[-1][:300]}") from e
    return check


def check_legalized(state: CompileState) -> None:
    """After fusion every high-level Relax op is lowered to TensorIR (or to a VM builtin)."""
    left: dict[str, int] = {}

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and not e.op.name.startswith(_LOWERED_OP_PREFIXES):
            left[e.op.name] = left.get(e.op.name, 0) + 1

    for _, func in state.mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    if left:
        raise StageInvariantError("fusion", "Relax ops without a TensorIR legalization remain",
                                  [f"{k} (x{v})" for k, v in sorted(left.items())])


def check_scheduled(state: CompileState) -> None:
    """On GPU targets no unscheduled PrimFunc may reach codegen (it would run on one thread, or fail to bind)."""
    if not state.target.is_gpu:
        return
    unscheduled = [gv.name_hint for gv, f in state.mod.functions_items()
                   if isinstance(f, tirx.PrimFunc) and not is_scheduled(f)]
    if unscheduled:
        raise StageInvariantError("schedule", "GPU PrimFuncs without a schedule", unscheduled)


def _cleanup(state: CompileState) -> None:
    from .relax_passes import cleanup_passes
    _apply(state, cleanup_passes(state.target.name))


def _fusion(state: CompileState) -> None:
    from .relax_passes import fusion_passes, pattern_passes
    from .relax_passes.fold_weights import fold_weight_transforms
    # kiln's pattern fusions first: they match the weight layouts the importer produced (Linear as
    # matmul(x, permute_dims(W))); then weight-only work is folded into the weights; then TVM's generic fusion.
    _apply(state, pattern_passes(state.target.name))
    state.notes.extend(_fusion_notes(state.mod))
    folded = fold_weight_transforms(state.mod, state.params)
    state.mod, state.params = folded.mod, folded.params
    state.notes.append(folded.note)
    _apply(state, fusion_passes(state.target.name))


def _fusion_notes(mod) -> list[str]:
    """One line per pattern pass that ran: what it fused and, grouped, why it refused the rest."""
    from .relax_passes import conv_to_gemm, fold_conv_bn, fuse_gemm_epilogue, fuse_sibling_gemms, to_nhwc
    from .relax_passes.fuse_attention import report_note
    notes = [n for n in (to_nhwc.report_note(mod),) if n]
    for title, recs in (("sibling GEMM fusion", fuse_sibling_gemms.fusion_report(mod)),
                        ("conv batch-norm folding", fold_conv_bn.fusion_report(mod)),
                        ("conv to GEMM", conv_to_gemm.fusion_report(mod)),
                        ("GEMM epilogue fusion", fuse_gemm_epilogue.fusion_report(mod))):
        if recs:
            why: dict = {}
            for r in recs:
                if not r.get("fused"):
                    why[r["reason"]] = why.get(r["reason"], 0) + 1
            line = f"{title}: {sum(bool(r.get('fused')) for r in recs)}/{len(recs)} fused"
            notes.append(line + ("; refused: " + "; ".join(f"{n}x {w}" for w, n in why.items()) if why else ""))
    att = report_note(mod)
    return notes + ([att] if att else [])


def _schedule(state: CompileState) -> None:
    rules = default_rules(state.target.name)
    if not rules:
        state.schedule_report = []
        return
    state.mod, reports = apply_rules(state.mod, state.target.schedule_target, rules, strict=state.options.strict)
    state.schedule_report = [r.to_json() for r in reports]


def _use_cuda_graph(state: CompileState) -> bool:
    return state.target.name == "cuda" and state.options.cuda_graph and state.signature.is_bounded


#: Relax function attr: the symbolic vars RewriteCUDAGraph may capture by value (one graph per distinct value).
_CAPTURE_VARS = "relax.rewrite_cuda_graph.capture_symbolic_vars"


def _capture_symbolic_vars(mod):
    """Mark each function's upper-bounded symbolic vars as capturable: without the attr RewriteCUDAGraph takes
    no region that depends on a symbolic shape, so a dynamic-batch model would launch every kernel one by one."""
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function) and func.attrs and "tir_var_upper_bound" in func.attrs:
            names = sorted(str(k) for k in func.attrs["tir_var_upper_bound"].keys())
            mod[gv] = func.with_attr(_CAPTURE_VARS, names)
    return mod


def _lower(state: CompileState) -> None:
    from .relax_passes import lower_passes
    if _use_cuda_graph(state) and not state.signature.is_static:
        state.mod = _capture_symbolic_vars(state.mod)
    config = {"relax.backend.use_cuda_graph": _use_cuda_graph(state)}
    with tvm.transform.PassContext(opt_level=3, config=config):
        _apply(state, lower_passes(state.target.name))


def _codegen(state: CompileState) -> None:
    from .target import build_context, tir_pipeline
    with build_context(state.target):
        state.executable = relax.build(state.mod, state.target.tvm_target, relax_pipeline=None,
                                       tir_pipeline=tir_pipeline(state.target))


STAGES: tuple[Stage, ...] = (
    Stage("cleanup", _cleanup, _well_formed("cleanup")),
    Stage("fusion", _fusion, check_legalized),
    Stage("schedule", _schedule, check_scheduled),
    Stage("lower", _lower, _well_formed("lower")),
    Stage("codegen", _codegen),
)


def dump_stage(state: CompileState, index: int, name: str) -> None:
    """Write one stage's IR (and, after codegen, the device code) under ``options.dump_ir``."""
    root = state.options.dump_ir
    if not root:
        return
    os.makedirs(root, exist_ok=True)
    if state.executable is not None:
        from .target import device_code
        for i, (fmt, text) in enumerate(device_code(state.executable)):
            with open(os.path.join(root, f"{index:02d}_{name}.{i}.{fmt}"), "w") as f:
                f.write(text)
        return
    with open(os.path.join(root, f"{index:02d}_{name}.py"), "w") as f:
        f.write(state.mod.script(show_meta=False))


def run_stages(state: CompileState, stages=STAGES, on_stage: Callable[[str], None] | None = None,
               first_index: int = 1) -> CompileState:
    """Run ``stages`` in order, timing each, checking its invariant and dumping its IR."""
    for i, stage in enumerate(stages, start=first_index):
        if on_stage:
            on_stage(stage.name)
        t0 = time.perf_counter()
        stage.run(state)
        state.timings[stage.name] = round(time.perf_counter() - t0, 3)
        if stage.check:
            stage.check(state)
        dump_stage(state, i, stage.name)
    return state
