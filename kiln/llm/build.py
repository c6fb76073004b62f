"""``kiln.llm.compile``: a transformers causal LM -> ``prefill`` + ``decode_b{B}`` through kiln's stages.

The stages are kiln's (:data:`kiln.pipeline.STAGES`), with three LLM-specific differences, each for a
reason:

* **DeadCodeElimination** keeps the module's entry functions (kiln's pass lists name ``main``, which an LLM
  module does not have; TVM's DCE raises on a missing entry name).
* **fusion** runs kiln's pattern passes (the sm_90a GEMM epilogue on cuda), then TVM's
  ``FuseTransposeMatmul`` (a Linear's ``permute_dims(W)`` becomes part of the matmul instead of a per-call
  transpose of every weight), then kiln's fusion passes. kiln's compile-time weight folding is not used:
  the weights are laid out by :mod:`kiln.llm.weights` (``[out, in]``, the layout the GEMV reads along K).
* **lower** marks every decode function ``num_input = 0`` before ``RewriteCUDAGraph`` (cuda): all of its
  arguments -- ids, positions, cache and weights -- are then "static", so the whole step from the embedding
  to the LM head is captured as one CUDA graph (only the kernel that writes the returned logits runs outside).
  That is a contract with the caller: every decode call passes the *same* tensors (the session keeps
  persistent id/position buffers and updates them in place). ``prefill`` (dynamic length) is not captured.
"""
from __future__ import annotations

import time

import tvm
from tvm import relax

from ..errors import KilnError
from ..options import CompileOptions
from ..pipeline import STAGES, CompileState, Stage, dump_stage, run_stages
from ..progress import StageProgress
from ..signature import Signature, TensorSpec
from .config import LLMConfig
from .decode_attention import SM90_DECODE_ATTENTION
from .model import WEIGHT_FORMATS, ModelSpec, cache_shape, export
from .weights import build_params

__all__ = ["CompiledLLM", "compile", "LLM_STAGES", "CPU_ATTENTION_SPLITS", "DTYPES"]

#: KV splits of the CPU decode attention: the split/merge arithmetic of the GPU kernel, with uneven chunks.
CPU_ATTENTION_SPLITS = 3
DTYPES = ("float32", "float16", "bfloat16")
_KILN = {s.name: s for s in STAGES}


def _entries(mod: tvm.IRModule) -> list[str]:
    return [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, relax.Function)]


def _with_entry_dce(mod: tvm.IRModule, passes: list) -> list:
    keep = _entries(mod)
    return [relax.transform.DeadCodeElimination(keep) if p.info.name == "DeadCodeElimination" else p
            for p in passes]


def _apply(state: CompileState, passes: list) -> None:
    with state.target.tvm_target:
        state.mod = tvm.transform.Sequential(passes)(state.mod)


def _cleanup(state: CompileState) -> None:
    from ..relax_passes import cleanup_passes
    _apply(state, _with_entry_dce(state.mod, cleanup_passes(state.target.name)))


def _fusion(state: CompileState) -> None:
    from ..relax_passes import fusion_passes, pattern_passes
    kind = state.target.name
    passes = pattern_passes(kind) + [relax.transform.FuseTransposeMatmul()] + fusion_passes(kind)
    _apply(state, _with_entry_dce(state.mod, passes))


def _uses_cuda_graph(state: CompileState) -> bool:
    return state.target.name == "cuda" and state.options.cuda_graph


def _lower(state: CompileState) -> None:
    from ..relax_passes import lower_passes
    if _uses_cuda_graph(state):
        for gv, func in list(state.mod.functions_items()):
            if isinstance(func, relax.Function) and gv.name_hint.startswith("decode_b"):
                state.mod[gv] = func.with_attr("num_input", 0)
    config = {"relax.backend.use_cuda_graph": _uses_cuda_graph(state)}
    with tvm.transform.PassContext(opt_level=3, config=config):
        _apply(state, lower_passes(state.target.name))


LLM_STAGES: tuple = (
    Stage("cleanup", _cleanup, _KILN["cleanup"].check),
    Stage("fusion", _fusion, _KILN["fusion"].check),
    _KILN["schedule"],
    Stage("lower", _lower, _KILN["lower"].check),
    _KILN["codegen"],
)


def signatures(spec: ModelSpec) -> dict:
    """kiln :class:`Signature` of every entry function (weights excluded)."""
    c, dt, C = spec.config, spec.dtype, spec.max_context
    logits = lambda b: TensorSpec("logits", (b, c.vocab_size), "float32")  # noqa: E731
    out = {"prefill": Signature(
        (TensorSpec("ids", ("batch", "n"), "int32"), TensorSpec("cache", tuple(cache_shape(spec, "batch")), dt)),
        (logits("batch"),), {"batch": (1, None), "n": (1, C)})}
    for b in spec.decode_batches:
        out[f"decode_b{b}"] = Signature(
            (TensorSpec("ids", (b, 1), "int32"), TensorSpec("pos", (b,), "int32"),
             TensorSpec("cache", tuple(cache_shape(spec, b)), dt)), (logits(b),), {})
    for b in getattr(spec, "megakernel", ()):
        out[f"decode_b{b}_mk"] = out[f"decode_b{b}"]
    return out


class CompiledLLM:
    """The result of :func:`kiln.llm.compile`: one executable with ``prefill`` and ``decode_b{B}``.

    Attributes
    ----------
    executable : tvm.runtime.Executable
    params : list of torch.Tensor
        Weights in parameter order (``param_specs``), passed after each function's inputs.
    param_specs : list of (str, tuple, str)
        Name, shape and dtype of every weight.
    spec : ModelSpec
        Architecture, dtype, weight format, cache length, decode batches, attention splits.
    target : KilnTarget
    schedule_report : list of dict
    notes : list of str
    timings : dict
        Seconds per stage.
    """

    def __init__(self, state: CompileState, spec: ModelSpec, param_specs: list):
        self.executable = state.executable
        self.params = state.params
        self.param_specs = param_specs
        self.spec = spec
        self.target = state.target
        self.options = state.options
        self.schedule_report = state.schedule_report
        self.notes = list(state.notes)
        self.timings = dict(state.timings)
        self._session = None

    @property
    def uses_cuda_graph(self) -> bool:
        """Decode functions are captured as CUDA graphs (cuda target, knob/option ``cuda_graph``)."""
        return self.target.name == "cuda" and self.options.cuda_graph

    def signatures(self) -> dict:
        return signatures(self.spec)

    def target_json(self) -> dict:
        return {"name": self.target.name, "arch": self.target.arch, "device": self.target.device,
                "tvm_target": str(self.target.tvm_target)}

    def export(self, path: str) -> str:
        """Write the artifact directory (``model.so``, ``weights.params``, ``manifest.json``) atomically."""
        from .artifact import write_artifact
        return write_artifact(self, path)

    def session(self, device: str | None = None):
        """A runnable :class:`~kiln.llm.runtime.LLMSession` in this process (one per CompiledLLM and device)."""
        from .runtime import LLMSession
        device = device or self.target.device
        if self._session is None or self._session.device != device:
            self._session = LLMSession(self.executable, self.params, self.spec, device)
        return self._session

    def fallbacks(self) -> list[dict]:
        """Schedule-report entries served by a generic fallback rule."""
        return [r for r in self.schedule_report if r["fallback"] or r["rule"] is None]


def _torch_dtype_name(model, dtype) -> str:
    if dtype is not None:
        name = str(dtype).replace("torch.", "")
    else:
        name = str(next(model.parameters()).dtype).replace("torch.", "")
    if name not in DTYPES:
        raise KilnError(f"dtype must be one of {DTYPES}, given {name!r}")
    return name


def _check_args(weights: str, max_context: int, decode_batches) -> tuple:
    if weights not in WEIGHT_FORMATS:
        raise KilnError(f"weights must be one of {WEIGHT_FORMATS}, given {weights!r}")
    if not isinstance(max_context, int) or max_context < 2:
        raise KilnError(f"max_context must be an int >= 2, given {max_context!r}")
    batches = tuple(sorted({int(b) for b in decode_batches}))
    if not batches or batches[0] < 1:
        raise KilnError(f"decode_batches must be positive ints, given {decode_batches!r}")
    return batches


def _attention_splits(kt, cfg: LLMConfig, batches: tuple, max_context: int, dtype: str) -> dict:
    if kt.name == "llvm":
        return {b: CPU_ATTENTION_SPLITS for b in batches}
    lay = SM90_DECODE_ATTENTION.layout(cfg.head_dim, cfg.group_size, dtype)
    if "declined" in lay:
        raise NotImplementedError(f"kiln.llm decode attention on {kt.name}: {lay['declined']}")
    return {b: SM90_DECODE_ATTENTION.splits(b, cfg.num_kv_heads, max_context) for b in batches}


def _add_megakernel(state: CompileState, spec: ModelSpec, strict: bool) -> ModelSpec:
    """Add ``decode_b{B}_mk`` functions (kiln.relax_passes.megakernel); notes for the batches refused."""
    from dataclasses import replace

    from ..relax_passes.megakernel import AddMegakernelDecode
    if state.target.name != "cuda":
        raise KilnError(f"megakernel=True needs target cuda (the kernel is sm_90a), given {state.target.name!r}")
    t0 = time.perf_counter()
    p = AddMegakernelDecode([f"decode_b{b}" for b in spec.decode_batches])
    state.mod = p(state.mod)
    state.timings["megakernel"] = round(time.perf_counter() - t0, 3)
    added = tuple(sorted(r["batch"] for r in p.report if r.get("added")))
    for r in p.report:
        if not r.get("added"):
            msg = f"megakernel: {r['function']} not added: {r['reason']}"
            if strict:
                raise KilnError(msg)
            state.notes.append(msg)
        else:
            state.notes.append(f"megakernel: {r['added']} ({r['tasks']} tasks, {r['counters']} counters, "
                               f"{r['workers']} workers; time model {r['predicted_ms']} ms at context "
                               f"{r['max_context']})")
    return replace(spec, megakernel=added)


def compile(model, *, target: str = "cuda", dtype=None, weights: str = "native", max_context: int = 4096,
            decode_batches=(1,), strict: bool | None = None, cuda_graph: bool | None = None,
            dump_ir: str | None = None, progress: bool | None = None, megakernel: bool = False) -> CompiledLLM:
    """Compile a transformers Llama / Qwen2 / Mistral causal LM to ``prefill`` + ``decode_b{B}``.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` or ``MistralForCausalLM`` (its ``config`` and
        ``state_dict()`` are read; the module is not run or modified).
    target : str
        ``"cuda"`` (sm_90a) or ``"llvm"`` (host CPU).
    dtype : str or torch.dtype, optional
        Compute dtype (``float32``/``float16``/``bfloat16``); default: the model's parameter dtype.
    weights : str
        ``"native"`` (weights in ``dtype``) or ``"fp8"`` (e4m3 weights, float32 scale per output channel).
    max_context : int
        KV-cache length per sequence (prompt + generated tokens).
    decode_batches : iterable of int
        Batch sizes that get a static ``decode_b{B}`` function.
    strict, cuda_graph, dump_ir, progress :
        As in :func:`kiln.compile`.
    megakernel : bool
        Also add ``decode_b{B}_mk`` per decode batch: the whole step as one persistent sm_90a kernel
        (:mod:`kiln.relax_passes.megakernel`; cuda only; off by default: not yet run on a GPU). A batch the kernel
        refuses gets a note with the reason (an error with ``strict``). ``LLMSession.set_megakernel()`` selects it.

    Returns
    -------
    CompiledLLM

    Raises
    ------
    UnsupportedConfigError
        A config field kiln does not implement (e.g. a Mistral ``sliding_window`` < ``max_context``).
    NotImplementedError
        Target ``rocm`` (the decode attention kernel is written for 32-lane warps).
    KilnError
        Bad arguments, or a state dict that does not match the config.
    """
    from ..target import check_toolchain, resolve_target
    kt = resolve_target(target)
    if kt.name not in ("cuda", "llvm"):
        raise NotImplementedError(f"kiln.llm targets cuda and llvm; {kt.name!r} is not implemented "
                                  "(the decode attention kernel assumes 32-lane warps)")
    check_toolchain(kt)
    batches = _check_args(weights, max_context, decode_batches)
    dt = _torch_dtype_name(model, dtype)
    cfg = LLMConfig.from_hf(model.config, max_context)
    spec = ModelSpec(cfg, dt, weights, max_context, batches, kt.is_gpu,
                     _attention_splits(kt, cfg, batches, max_context, dt))
    options = CompileOptions.from_knobs(strict=strict, cuda_graph=cuda_graph, dump_ir=dump_ir, progress=progress)
    state = CompileState(target=kt, options=options)
    with StageProgress(options.progress, title="kiln.llm compile") as prog:
        prog.stage("import")
        t0 = time.perf_counter()
        state.mod, param_specs = export(spec)
        state.params = build_params(spec, model.state_dict(), param_specs)
        state.timings["import"] = round(time.perf_counter() - t0, 3)
        state.notes.append(f"{cfg.arch}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads}/"
                           f"{cfg.num_kv_heads} heads x {cfg.head_dim}; {dt}, {weights} weights; static KV cache "
                           f"{cache_shape(spec, 'batch')}; decode batches {list(batches)}, attention splits "
                           f"{spec.attn_splits}")
        if weights == "fp8":
            state.notes.append(
                "fp8 (e4m3 + per-channel scale): decode linears with <= 16 rows run kiln's sm_90a GEMV (weights "
                "converted in registers); prefill and larger batches run kiln_fp8_linear (each weight converted "
                "inside a dlight-scheduled reduction)" if kt.name == "cuda" else
                "fp8 (e4m3 + per-channel scale): kiln_fp8_linear, each weight decoded from its bits inside the "
                "reduction (TVM's LLVM fp8 cast is wrong for zero and subnormals)")
        if megakernel:
            spec = _add_megakernel(state, spec, options.strict)
        dump_stage(state, 1, "import")
        run_stages(state, LLM_STAGES, on_stage=prog.stage, first_index=2)
    return CompiledLLM(state, spec, param_specs)
