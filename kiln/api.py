"""kiln's compile entry point: model in, :class:`CompiledModel` out (run it, export it, inspect it)."""
from __future__ import annotations

import os
import time
from typing import Any

from .options import CompileOptions
from .pipeline import CompileState, dump_stage, run_stages
from .progress import StageProgress

__all__ = ["compile", "CompiledModel"]


class CompiledModel:
    """The result of :func:`kiln.compile`.

    Attributes
    ----------
    executable : tvm.runtime.Executable
        The Relax VM executable (library + device code).
    params : list of numpy.ndarray
        Weights, passed after the inputs.
    signature : Signature
        Inputs/outputs with symbolic dims and their ranges.
    target : KilnTarget
        What it was built for.
    schedule_report : list of dict
        Per PrimFunc: the rule that scheduled it, whether it is a fallback, and every decline reason.
    notes : list of str
        Importer fixes and other decisions taken on the user's behalf.
    timings : dict
        Seconds per stage.
    """

    def __init__(self, state: CompileState):
        self.executable = state.executable
        self.params = state.params
        self.signature = state.signature
        self.target = state.target
        self.options = state.options
        self.schedule_report = state.schedule_report
        self.notes = list(state.notes)
        self.timings = dict(state.timings)
        self._module = None

    @property
    def uses_cuda_graph(self) -> bool:
        return self.target.name == "cuda" and self.options.cuda_graph and self.signature.is_bounded

    def target_json(self) -> dict:
        return {"name": self.target.name, "arch": self.target.arch, "device": self.target.device,
                "tvm_target": str(self.target.tvm_target)}

    def export(self, path: str) -> str:
        """Write the deployable artifact directory (library, weights, manifest.json) atomically."""
        from .target.artifact import write_artifact
        return write_artifact(self, path)

    def module(self, device: str | None = None):
        """A runnable :class:`KilnModule` in this process (needs the target's device here)."""
        from .target.runtime import KilnModule
        if self._module is None or (device and device != self._module.device):
            self._module = KilnModule(self.executable, self.params, self.signature, device or self.target.device)
        return self._module

    def __call__(self, *inputs):
        return self.module()(*inputs)

    def fallbacks(self) -> list[dict]:
        """Schedule-report entries served by a generic fallback rule."""
        return [r for r in self.schedule_report if r["fallback"] or r["rule"] is None]


def _is_onnx(model: Any) -> bool:
    if isinstance(model, (str, os.PathLike)):
        return str(model).endswith(".onnx")
    return type(model).__name__ == "ModelProto"


def _import(state: CompileState, model, example_inputs, dynamic_shapes, dtype) -> None:
    from .frontend import import_onnx, import_torch
    if _is_onnx(model):
        res = import_onnx(model, shapes=example_inputs if isinstance(example_inputs, dict) else None, dtype=dtype)
    else:
        if example_inputs is None:
            raise TypeError("kiln.compile: example_inputs is required for a torch model")
        if not isinstance(example_inputs, (tuple, list)):
            example_inputs = (example_inputs,)
        res = import_torch(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes, dtype=dtype)
    state.mod, state.params, state.signature = res.mod, list(res.params), res.signature
    state.notes.extend(res.notes)


def compile(model, example_inputs=None, target: str = "cuda", dynamic_shapes=None, dtype=None,
            dump_ir: str | None = None, strict: bool | None = None, cuda_graph: bool | None = None,
            progress: bool | None = None) -> CompiledModel:
    """Compile a PyTorch module or an ONNX model.

    Parameters
    ----------
    model : torch.nn.Module, str or onnx.ModelProto
        A module (captured with ``torch.export``), or an ``.onnx`` path / ModelProto.
    example_inputs : tuple of torch.Tensor, or dict
        Inputs for ``torch.export`` (a dict of input name -> shape for ONNX, optional).
    target : str
        ``"cuda"`` (sm_90a), ``"rocm"`` (gfx942) or ``"llvm"`` (host CPU).
    dynamic_shapes : optional
        ``torch.export`` dynamic shapes (``torch.export.Dim`` with min/max); one artifact then serves
        every shape in range.
    dtype : str or torch.dtype, optional
        Cast floating weights and inputs to ``float32``/``float16``/``bfloat16`` before import.
    dump_ir : str, optional
        Directory that receives the IR after every stage and the generated device code.
    strict : bool, optional
        Fail if a hot op (GEMM/conv) is served by a generic fallback schedule (default: knob ``strict``).
    cuda_graph : bool, optional
        CUDA graphs on cuda (default on, knob ``cuda_graph``) for static shapes, and for dynamic ones whose every
        symbolic dim has a maximum: memory is then planned at the bounds and one graph is captured per distinct
        value of the dims, at its first call.
    progress : bool, optional
        Progress display for compiles longer than a second (default on, knob ``progress``).

    Returns
    -------
    CompiledModel

    Raises
    ------
    UnsupportedOpsError
        Listing every unsupported operator with its count.
    ToolchainMissingError
        nvcc (cuda export) or ld.lld >= 17 (rocm) missing.
    StageInvariantError, ScheduleFallbackError
    """
    from .target import check_toolchain, resolve_target
    kt = resolve_target(target)
    check_toolchain(kt)
    options = CompileOptions.from_knobs(strict=strict, cuda_graph=cuda_graph, dump_ir=dump_ir, progress=progress)
    state = CompileState(target=kt, options=options)
    with StageProgress(options.progress) as prog:
        prog.stage("import")
        t0 = time.perf_counter()
        _import(state, model, example_inputs, dynamic_shapes, dtype)
        state.timings["import"] = round(time.perf_counter() - t0, 3)
        dump_stage(state, 1, "import")
        run_stages(state, on_stage=prog.stage, first_index=2)
    return CompiledModel(state)
