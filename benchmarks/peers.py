"""One function per backend ("peer") of the benchmark; each returns a result row (a dict).

Every function takes a :class:`Case` (one model at one batch size, with its fixed input sets and the
torch-eager reference outputs) and never raises: a failure becomes a row whose ``status`` starts with
``FAILED (stage)`` and whose ``error`` holds the traceback. ``benchmarks/run.py`` drives them.

Backends: ``eager`` (the reference; its own error is measured against an fp32 copy of the model),
``inductor-max`` / ``inductor-ro`` (``torch.compile`` max-autotune / reduce-overhead, static shapes),
``tvm`` (stock TVM: ``from_exported_program`` + ``tvm.compile`` default pipeline = dlight on sm_90),
``tvm-kiln-import`` (the same stock pipeline on ``kiln.frontend.import_torch``'s module, measured when
stock import/compile fails), ``kiln`` (``kiln.compile`` -> export -> ``kiln.load``, the deployable path).
LLM decode: :func:`llm_eager`, :func:`llm_inductor`, :func:`llm_kiln_pending`.
"""
from __future__ import annotations

import copy
import gc
import inspect
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from timing import (Stopwatch, compare, host_copy, input_sets, merge_compare, short_error, sync,
                    time_calls, to_device)

__all__ = ["BenchCfg", "Case", "make_case", "prepare_models", "eager", "inductor", "tvm_stock",
           "tvm_kiln_import", "kiln_row", "LlmCase", "llm_setup", "llm_eager", "llm_inductor",
           "llm_kiln_pending", "new_row", "cleanup"]

from kiln.tune.stock_tvm import CUDA_TARGET, LLVM_TARGET  # noqa: E402
COMPILE_BACKEND = {"max-autotune": "inductor-max", "reduce-overhead": "inductor-ro"}


@dataclass
class BenchCfg:
    device: str = "cuda"
    dtype: torch.dtype = torch.float16
    size: str = "full"
    warmup: int = 10
    reps: int = 50
    blocks: int = 2
    n_sets: int = 3
    input_seed: int = 20261121
    cpu_compile: bool = False          # run torch.compile rows on cpu too
    export_device: str = "cpu"         # where the model copy given to torch.export / kiln lives
    tvm_kiln_import: str = "auto"      # auto: only when stock TVM fails; always; never
    artifacts: str | None = None       # where kiln artifacts go (default: a temp dir, removed)
    context: int = 512                 # LLM: KV-cache length before the timed decode step
    rel_warn: float = 0.05             # flag rows whose err / max|ref| exceeds this
    torch_attn: str = "sdpa"           # attention implementation of the torch peers' copy ("zoo": unchanged)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def hi_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == torch.float32 else torch.float32


@dataclass
class Case:
    section: str
    model_name: str
    batch: int
    cfg: BenchCfg
    model: torch.nn.Module                      # torch peers' copy: on cfg.device, eval, cfg.dtype
    export_model: torch.nn.Module               # given to torch.export / kiln (CPU copy by default)
    sets_cpu: list                              # input sets (tuples of CPU tensors)
    sets: list = field(default_factory=list)    # the same on cfg.device
    refs: list | None = None                    # eager outputs per set (CPU fp32 lists)
    refs_hi: list | None = None                 # fp32 (fp64 on fp32 runs) model outputs per set
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.sets = [to_device(s, self.cfg.device) for s in self.sets_cpu]

    def export_inputs(self) -> tuple:
        return self.sets[0] if self.cfg.export_device == "device" else self.sets_cpu[0]


def make_case(section: str, model_name: str, batch: int, cfg: BenchCfg, model: torch.nn.Module,
              export_model: torch.nn.Module, examples: tuple, vocab: int | None) -> Case:
    """A :class:`Case` with ``cfg.n_sets`` fresh input sets for ``batch`` (same seeds in every run)."""
    sets = input_sets(examples, batch, cfg.n_sets, cfg.input_seed, vocab, cfg.dtype)
    return Case(section, model_name, batch, cfg, model, export_model, sets)


def prepare_models(base: torch.nn.Module, cfg: BenchCfg) -> tuple:
    """(torch peers' model, export model) from the zoo's CPU model.

    The export copy keeps the zoo's attention implementation (what kiln and TVM import); the torch
    peers' copy gets ``cfg.torch_attn`` (default ``sdpa``: torch at its best, as the anchors measured).
    """
    base = base.eval().to(cfg.dtype)
    model = copy.deepcopy(base).to(cfg.device)
    set_attn(model, cfg.torch_attn)
    export = base if cfg.export_device == "cpu" else copy.deepcopy(base).to(cfg.device)
    return model, export


def set_attn(model: torch.nn.Module, impl: str | None) -> str | None:
    """Switch a transformers model's attention implementation; returns the one in use (None: not HF)."""
    conf = getattr(model, "config", None)
    if conf is None or not hasattr(conf, "_attn_implementation"):
        return None
    if impl and impl != "zoo" and conf._attn_implementation != impl:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(impl)
        else:
            for m in model.modules():
                if hasattr(getattr(m, "config", None), "_attn_implementation"):
                    m.config._attn_implementation = impl
    return conf._attn_implementation


# --------------------------------------------------------------------------- rows
def new_row(section: str, model: str, batch: int, backend: str, label: str, cfg: BenchCfg) -> dict:
    return {"section": section, "model": model, "batch": batch, "backend": backend, "label": label,
            "device": cfg.device, "dtype": str(cfg.dtype).replace("torch.", ""), "size": cfg.size,
            "status": "INCOMPLETE (run killed or crashed during this row)", "median_ms": None,
            "p10_ms": None, "p90_ms": None, "compile_s": None, "first_call_s": None,
            "max_abs_err": None, "max_abs_err_hi": None, "max_abs_ref": None, "rel_err": None,
            "notes": [], "extra": {}, "stage": "start",
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _row(case: Case, backend: str, label: str) -> dict:
    r = new_row(case.section, case.model_name, case.batch, backend, label, case.cfg)
    r["extra"]["input_shapes"] = [list(t.shape) for t in case.sets_cpu[0]]
    attn = case.info.get("torch_attn" if backend in ("eager", *COMPILE_BACKEND.values()) else "export_attn")
    if attn:
        r["extra"]["attn"] = attn
    if case.info.get("description"):
        r["extra"]["model_description"] = case.info["description"]
    return r


def _fail(row: dict, e: BaseException) -> dict:
    row["status"] = f"FAILED ({row.get('stage', '?')}): {short_error(e)}"
    row["error"] = traceback.format_exc()[-6000:]
    return row


def cleanup() -> None:
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _evaluate(holder, fn: Callable, arg_sets: list) -> dict:
    """Run ``fn`` on every input set; compare with ``holder.refs`` / ``holder.refs_hi`` (per set)."""
    vs_ref, vs_hi = [], []
    with torch.no_grad():
        for i, args in enumerate(arg_sets):
            out = host_copy(fn(*args))
            if holder.refs is not None:
                vs_ref.append(compare(holder.refs[i], out))
            if holder.refs_hi is not None:
                vs_hi.append(compare(holder.refs_hi[i], out))
    return {"ref": merge_compare(vs_ref) if vs_ref else None, "hi": merge_compare(vs_hi) if vs_hi else None}


def _fill(row: dict, cfg: BenchCfg, ev: dict, timing: dict | None) -> dict:
    """Put errors and timings into ``row`` and set its status."""
    ref, hi = ev.get("ref"), ev.get("hi")
    if ref is not None:
        row["max_abs_err"], row["max_abs_ref"] = ref["max_abs_err"], ref["max_abs_ref"]
        row["notes"] += ref["notes"]
    if hi is not None:
        row["max_abs_err_hi"] = hi["max_abs_err"]
        if row["max_abs_ref"] is None:
            row["max_abs_ref"] = hi["max_abs_ref"]
        row["notes"] += [n for n in hi["notes"] if n not in row["notes"]]
    err = row["max_abs_err"] if row["max_abs_err"] is not None else row["max_abs_err_hi"]
    mref = row["max_abs_ref"]
    if err is not None and mref:
        row["rel_err"] = err / mref
    if timing:
        row.update(median_ms=timing["median_ms"], p10_ms=timing["p10_ms"], p90_ms=timing["p90_ms"], timing=timing)
    status = "ok"
    if (ref and ref["nonfinite"]) or (hi and hi["nonfinite"]):
        status = "WRONG: NaN/Inf in output"
    elif err is not None and err != err:
        status = "WRONG: outputs could not be compared (see notes)"
    elif mref == 0:
        status = "ok (reference is all zero: error says nothing)"
    elif row["rel_err"] is not None and row["rel_err"] > cfg.rel_warn:
        status = f"SUSPECT: err/max|ref| = {row['rel_err']:.3g}"
    row["status"] = status
    row.pop("stage", None)
    return row


def _first_call(fn: Callable, args: tuple, device: str) -> float:
    with torch.no_grad(), Stopwatch(device) as sw:
        fn(*args)
    return sw.s


def _time(cfg: BenchCfg, fn: Callable, arg_sets: list) -> dict:
    with torch.no_grad():
        return time_calls(fn, arg_sets, cfg.device, cfg.warmup, cfg.reps, cfg.blocks)


def _measure(row: dict, holder, fn: Callable, arg_sets: list, cfg: BenchCfg, first_is_compile=False) -> dict:
    """First call (timed), check on every input set, timing: the tail shared by every backend."""
    row["stage"] = "first call"
    row["first_call_s"] = _first_call(fn, arg_sets[0], cfg.device)
    if first_is_compile:
        row["compile_s"] = row["first_call_s"]
    row["stage"] = "check"
    ev = _evaluate(holder, fn, arg_sets)
    row["stage"] = "timing"
    return _fill(row, cfg, ev, _time(cfg, fn, arg_sets))


# --------------------------------------------------------------------------- torch eager / torch.compile
def _eager(row: dict, holder, fn: Callable, sets: list, cfg: BenchCfg, hi_refs: Callable) -> dict:
    """Eager reference: fills ``holder.refs`` (and ``holder.refs_hi`` from ``hi_refs()``); the row's
    own error is vs the hi-precision copy."""
    row["stage"] = "first call"
    row["first_call_s"] = _first_call(fn, sets[0], cfg.device)
    row["stage"] = "reference outputs"
    with torch.no_grad():
        holder.refs = [host_copy(fn(*s)) for s in sets]
    row["stage"] = "hi-precision reference"
    ev = {"ref": None, "hi": None}
    try:
        holder.refs_hi = hi_refs()
        ev["hi"] = merge_compare([compare(h, r) for h, r in zip(holder.refs_hi, holder.refs)])
        row["extra"]["hi_ref"] = str(cfg.hi_dtype).replace("torch.", "")
    except Exception as e:  # noqa: BLE001 - the row stays useful without it
        holder.refs_hi = None
        row["notes"].append(f"no {cfg.hi_dtype} reference: {short_error(e)}")
    finally:
        cleanup()
    row["stage"] = "timing"
    _fill(row, cfg, ev, _time(cfg, fn, sets))
    row["max_abs_err"] = 0.0
    row["max_abs_ref"] = max((float(t.abs().max()) for ts in holder.refs for t in ts if t.numel()), default=0.0)
    row["rel_err"] = (row["max_abs_err_hi"] / row["max_abs_ref"]) if (
        row["max_abs_err_hi"] is not None and row["max_abs_ref"]) else None
    if row["max_abs_ref"] == 0:
        row["status"] = "ok (reference is all zero: error says nothing)"
    return row


class _NoTF32:
    """Full-precision fp32 (no TF32 in cuBLAS/cuDNN) while computing the hi-precision reference."""

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def _hi_copy_outputs(model: torch.nn.Module, sets: list, hi: torch.dtype) -> list:
    m = copy.deepcopy(model).to(hi)
    with torch.no_grad(), _NoTF32():
        return [host_copy(m(*[t.to(hi) if t.is_floating_point() else t for t in s])) for s in sets]


def eager(case: Case) -> dict:
    """Torch eager, the reference; its own error is vs an fp32 copy of the weights (fp64 on fp32 runs)."""
    row = _row(case, "eager", "torch eager")
    try:
        return _eager(row, case, case.model, case.sets, case.cfg,
                      lambda: _hi_copy_outputs(case.model, case.sets, case.cfg.hi_dtype))
    except Exception as e:  # noqa: BLE001
        return _fail(row, e)


def _compiled(row: dict, holder, fn: Callable, sets: list, cfg: BenchCfg, mode: str) -> dict:
    if not cfg.cuda and not cfg.cpu_compile:
        row["status"] = "skipped: cpu (pass --cpu-compile to run)"
        row.pop("stage", None)
        return row
    try:
        cleanup()
        cm = torch.compile(fn, mode=mode, dynamic=False)
        return _measure(row, holder, cm, sets, cfg, first_is_compile=True)
    except Exception as e:  # noqa: BLE001
        return _fail(row, e)
    finally:
        cm = None
        cleanup()


def inductor(case: Case, mode: str) -> dict:
    """``torch.compile(model, mode=mode, dynamic=False)`` after a dynamo reset; first call = compile."""
    row = _row(case, COMPILE_BACKEND[mode], f"torch.compile {mode}")
    return _compiled(row, case, case.model, case.sets, case.cfg, mode)


# --------------------------------------------------------------------------- TVM
def _tvm_target(cfg: BenchCfg):
    import tvm
    return tvm.target.Target(CUDA_TARGET if cfg.cuda else LLVM_TARGET)


def _device_code_stats(ex) -> dict:
    """Best effort: kernels and tensor-core instructions in the CUDA source of an executable
    (shows e.g. that dlight's WMMA path is on)."""
    stats: dict = {}
    todo = [ex.mod if hasattr(ex, "mod") else ex]
    while todo:
        m = todo.pop()
        todo.extend(getattr(m, "imports", []))
        if getattr(m, "kind", "") != "cuda":
            continue
        try:
            src = m.inspect_source("cuda") or m.inspect_source()
        except Exception:  # noqa: BLE001
            src = ""
        for k, pat in (("kernels", "__global__"), ("wmma", "wmma::mma_sync"), ("mma_sync", "mma.sync"),
                       ("wgmma", "wgmma"), ("ldmatrix", "ldmatrix"), ("cp_async", "cp.async")):
            stats[k] = stats.get(k, 0) + src.count(pat)
        stats["source_chars"] = stats.get("source_chars", 0) + len(src)
    return stats


def _code_stats(row: dict, ex, cfg: BenchCfg) -> None:
    if cfg.cuda and ex is not None:
        try:
            row["extra"]["device_code"] = _device_code_stats(ex)
        except Exception as e:  # noqa: BLE001
            row["notes"].append(f"device code stats: {short_error(e, 100)}")


def _run_vm(case: Case, row: dict, ex, extra_args: list) -> dict:
    """Load ``ex`` in a VM, check it on every input set, time it (CUDA events around the VM call;
    inputs passed zero-copy through DLPack)."""
    import tvm
    from tvm import relax
    _code_stats(row, ex, case.cfg)
    row["stage"] = "vm load"
    t0 = time.perf_counter()
    f = relax.VirtualMachine(ex, tvm.cuda(0) if case.cfg.cuda else tvm.cpu(0))["main"]
    row["extra"]["vm_load_s"] = time.perf_counter() - t0
    tsets = [tuple(tvm.runtime.from_dlpack(t) for t in s) + tuple(extra_args) for s in case.sets]
    return _measure(row, case, f, tsets, case.cfg)


def _tvm_compile(row: dict, mod, cfg: BenchCfg):
    import tvm
    row["stage"] = "compile"
    row["extra"]["target"] = str(_tvm_target(cfg).export())
    t0 = time.perf_counter()
    ex = tvm.compile(mod, target=_tvm_target(cfg))
    row["compile_s"] = time.perf_counter() - t0
    return ex


def tvm_stock(case: Case) -> dict:
    """Stock TVM: torch.export -> ``from_exported_program`` -> ``tvm.compile`` (default pipeline;
    on cuda that is dlight with WMMA tensor cores at sm_90) -> relax VM."""
    row = _row(case, "tvm", "stock TVM (from_exported_program + tvm.compile default/dlight)")
    try:
        row["stage"] = "import"
        from tvm.relax.frontend.torch import from_exported_program
        t0 = time.perf_counter()
        with torch.no_grad():
            ep = torch.export.export(case.export_model, case.export_inputs())
        row["extra"]["export_s"] = time.perf_counter() - t0
        mod = from_exported_program(ep)
        row["extra"]["import_s"] = time.perf_counter() - t0
        del ep
        return _run_vm(case, row, _tvm_compile(row, mod, case.cfg), [])
    except Exception as e:  # noqa: BLE001
        return _fail(row, e)
    finally:
        cleanup()


def tvm_kiln_import(case: Case) -> dict:
    """The stock ``tvm.compile`` default pipeline on kiln's importer output (``kiln.frontend.import_torch``);
    weights bound as constants like the stock importer does (VM arguments if binding fails)."""
    row = _row(case, "tvm-kiln-import", "stock TVM pipeline on kiln's import")
    try:
        row["stage"] = "kiln import"
        import tvm
        from tvm import relax
        from kiln.frontend import import_torch
        inputs = case.export_inputs()
        t0 = time.perf_counter()
        res = import_torch(case.export_model, inputs)
        row["extra"]["import_s"] = time.perf_counter() - t0
        if getattr(res, "notes", None):
            row["extra"]["kiln_notes"] = [str(n) for n in res.notes][:20]
        mod, params, extra_args = res.mod, list(res.params), []
        row["stage"] = "bind params"
        pvars = list(mod["main"].params)[len(inputs):]
        if len(pvars) != len(params):
            raise ValueError(f"main has {len(pvars)} parameter slots after {len(inputs)} inputs, "
                             f"ImportResult has {len(params)} params")
        try:
            mod = relax.transform.BindParams("main", dict(zip(pvars, params)))(mod)
            row["extra"]["params"] = "bound as constants"
        except Exception as e:  # noqa: BLE001
            row["notes"].append(f"BindParams failed ({short_error(e, 120)}); params passed as VM args")
            dev = tvm.cuda(0) if case.cfg.cuda else tvm.cpu(0)
            extra_args = [tvm.runtime.tensor(p, device=dev) for p in params]
        return _run_vm(case, row, _tvm_compile(row, mod, case.cfg), extra_args)
    except Exception as e:  # noqa: BLE001
        return _fail(row, e)
    finally:
        cleanup()


# --------------------------------------------------------------------------- kiln
def kiln_row(case: Case) -> dict:
    """kiln: ``kiln.compile`` -> ``art.export(dir)`` -> ``kiln.load(dir)``; the loaded module is timed."""
    row = _row(case, "kiln", "kiln (compile -> export -> load)")
    tmp = None
    try:
        row["stage"] = "compile"
        import kiln
        kw = {}
        try:  # no progress display in a log
            if "progress" in inspect.signature(kiln.compile).parameters:
                kw["progress"] = False
        except (TypeError, ValueError):
            pass
        t0 = time.perf_counter()
        art = kiln.compile(case.export_model, case.export_inputs(), target="cuda" if case.cfg.cuda else "llvm",
                           dtype=None, **kw)
        row["compile_s"] = time.perf_counter() - t0
        row["extra"]["timings"] = {k: float(v) for k, v in dict(getattr(art, "timings", {}) or {}).items()}
        _code_stats(row, getattr(art, "executable", None), case.cfg)
        if getattr(art, "notes", None):
            row["extra"]["kiln_notes"] = [str(n) for n in art.notes][:20]
        row["stage"] = "export"
        if case.cfg.artifacts:
            path = tmp = os.path.join(case.cfg.artifacts, f"{case.model_name}-b{case.batch}-{case.cfg.size}")
            shutil.rmtree(path, ignore_errors=True)
        else:
            tmp = tempfile.mkdtemp(prefix="kiln-bench-")
            path = os.path.join(tmp, "artifact")
        t0 = time.perf_counter()
        art.export(path)
        row["extra"]["export_s"] = time.perf_counter() - t0
        row["extra"]["artifact_bytes"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path)
                                             for f in fs)
        del art
        row["stage"] = "load"
        t0 = time.perf_counter()
        m = kiln.load(path, device="cuda" if case.cfg.cuda else "cpu")
        row["extra"]["load_s"] = time.perf_counter() - t0
        return _measure(row, case, m, case.sets, case.cfg)
    except Exception as e:  # noqa: BLE001
        return _fail(row, e)
    finally:
        if tmp and not case.cfg.artifacts:
            shutil.rmtree(tmp, ignore_errors=True)
        cleanup()


# --------------------------------------------------------------------------- LLM decode
class Decode:
    """One batch-``b`` decode step on a transformers ``StaticCache`` prefilled to ``context`` tokens.

    Each step writes the new token's K/V at position ``context`` and attends over 0..context, so a
    step's output depends only on its input ids: eager and compiled steps share one cache (checked
    by running the first input set twice).
    """

    def __init__(self, hf: torch.nn.Module, prefill_ids: torch.Tensor, context: int, device: str):
        from transformers import StaticCache
        self.hf = hf
        try:
            self.cache = StaticCache(config=hf.config, max_cache_len=context + 64)
        except TypeError:  # older transformers
            self.cache = StaticCache(config=hf.config, max_batch_size=prefill_ids.shape[0],
                                     max_cache_len=context + 64, device=device, dtype=hf.dtype)
        self.pos = torch.tensor([context], device=device)
        with torch.no_grad():
            hf(input_ids=prefill_ids.to(device), past_key_values=self.cache,
               cache_position=torch.arange(context, device=device), use_cache=True)
        sync(device)
        # transformers 5.2x's StaticLayer writes at its own counter `cumulative_length` (not at
        # cache_position) and advances it every call: rewind it inside the step (one foreach kernel).
        self.lens = [ly.cumulative_length for ly in getattr(self.cache, "layers", [])
                     if isinstance(getattr(ly, "cumulative_length", None), torch.Tensor)]
        self.ctx_vals = [torch.full_like(t, context) for t in self.lens]

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        if self.lens:
            torch._foreach_copy_(self.lens, self.ctx_vals)
        return self.hf(input_ids=ids, past_key_values=self.cache, cache_position=self.pos, use_cache=True).logits


@dataclass
class LlmCase:
    cfg: BenchCfg
    hf: torch.nn.Module
    dec: Decode
    prefill_ids: torch.Tensor
    sets: list
    weight_bytes: int
    source: str
    batch: int = 1
    context: int = 512
    refs: list | None = None
    refs_hi: list | None = None


def llm_setup(cfg: BenchCfg, batch: int = 1) -> LlmCase:
    """The zoo's Llama (``full``: Llama-3.2-1B shape), cast, torch peers' attention, and a StaticCache
    prefilled with ``cfg.context`` random tokens."""
    from kiln import zoo
    zm = zoo.get("llama", size=cfg.size, batch=batch, seed=0)
    hf = next((m for m in zm.model.modules() if type(m).__name__.endswith("ForCausalLM")), None)
    if hf is None:
        raise TypeError(f"zoo llama gives no *ForCausalLM module ({type(zm.model).__name__})")
    hf = hf.to(device=cfg.device, dtype=cfg.dtype).eval()
    source = f"kiln.zoo llama/{cfg.size}: {zm.description}; attention {set_attn(hf, cfg.torch_attn)}"
    vocab, context = hf.config.vocab_size, cfg.context
    maxpos = getattr(hf.config, "max_position_embeddings", None)
    if maxpos and context + 64 > maxpos:  # tiny models: keep the cache inside the position range
        context = max(1, maxpos - 64)
        source += f"; context capped to {context} (max_position_embeddings {maxpos})"
    g = torch.Generator().manual_seed(cfg.input_seed)
    prefill = torch.randint(0, vocab, (batch, context), generator=g)
    dec = Decode(hf, prefill, context, cfg.device)
    sets = [(torch.randint(0, vocab, (batch, 1), generator=g).to(cfg.device),) for _ in range(cfg.n_sets)]
    wbytes = sum(p.numel() * p.element_size() for p in hf.parameters())  # tied embeddings counted once
    return LlmCase(cfg, hf, dec, prefill, sets, wbytes, source, batch, context)


def llm_row(lc: LlmCase, backend: str, label: str) -> dict:
    r = new_row("llm", "llama", lc.batch, backend, label, lc.cfg)
    r["extra"].update(context=lc.context, weight_GB=lc.weight_bytes / 1e9, model_source=lc.source,
                      step="1 decode token per sequence, StaticCache")
    return r


def _llm_rates(row: dict, lc: LlmCase) -> dict:
    if row.get("median_ms"):
        s = row["median_ms"] / 1e3
        row["extra"].update(ms_per_token=row["median_ms"], tokens_per_s=lc.batch / s,
                            weight_TBps=lc.weight_bytes / s / 1e12)
    return row


def _llm_hi_refs(lc: LlmCase) -> list:
    hi = copy.deepcopy(lc.hf).to(lc.cfg.hi_dtype)
    with torch.no_grad(), _NoTF32():
        dec = Decode(hi, lc.prefill_ids, lc.context, lc.cfg.device)
        return [host_copy(dec.step(*s)) for s in lc.sets]


def llm_eager(lc: LlmCase) -> dict:
    row = llm_row(lc, "eager", "torch eager")
    try:
        _eager(row, lc, lc.dec.step, lc.sets, lc.cfg, lambda: _llm_hi_refs(lc))
        with torch.no_grad():
            again = compare(lc.refs[0], host_copy(lc.dec.step(*lc.sets[0])))
        row["extra"]["repeat_step_max_abs_diff"] = again["max_abs_err"]
        if not again["max_abs_err"] <= 1e-3 * max(again["max_abs_ref"], 1e-6):
            row["status"] = (f"WRONG: the same ids twice differ by {again['max_abs_err']:.3g} "
                             "(KV-cache position leaks between steps)")
        return _llm_rates(row, lc)
    except Exception as e:  # noqa: BLE001
        return _fail(row, e)


def llm_inductor(lc: LlmCase, mode: str) -> dict:
    row = llm_row(lc, COMPILE_BACKEND[mode], f"torch.compile {mode} (CUDA graphs)")
    return _llm_rates(_compiled(row, lc, lc.dec.step, lc.sets, lc.cfg, mode), lc)


def llm_kiln_pending(cfg: BenchCfg, batch: int = 1) -> dict:
    row = new_row("llm", "llama", batch, "kiln", "kiln", cfg)
    row.update(status="pending (LLM issue)")
    row.pop("stage", None)
    row["extra"]["context"] = cfg.context
    return row
