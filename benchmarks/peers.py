"""One function per backend ("peer") of the benchmark; each returns a result row (a dict).

Every function takes a :class:`Case` (one model at one batch size, with its fixed input sets and the
torch-eager reference outputs) and never raises: a failure becomes a row whose ``status`` starts with
``FAILED`` and whose ``error`` holds the traceback. ``benchmarks/run.py`` drives them.

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
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from timing import (Stopwatch, compare, host_copy, input_sets, merge_compare, short_error, sync,
                    time_calls, to_device)

__all__ = ["BenchCfg", "Case", "eager", "inductor", "tvm_stock", "tvm_kiln_import", "kiln_row",
           "LlmCase", "llm_setup", "llm_eager", "llm_inductor", "llm_kiln_pending", "new_row", "cleanup"]

# CUDA target for stock TVM: sm_90 (NOT the nvidia/nvidia-h100 tag: its "sm_90a" makes dlight skip
# tensor cores), with the H100 tag's limits and the H200's 60 MiB L2.
CUDA_TARGET = {"kind": "cuda", "arch": "sm_90", "max_num_threads": 1024, "max_threads_per_block": 1024,
               "thread_warp_size": 32, "registers_per_block": 65536, "max_shared_memory_per_block": 49152,
               "l2_cache_size_bytes": 62914560}
LLVM_TARGET = {"kind": "llvm", "num-cores": os.cpu_count() or 1}


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
    model: torch.nn.Module                      # on cfg.device, eval, cfg.dtype
    sets_cpu: list                              # input sets (tuples of CPU tensors)
    sets: list = field(default_factory=list)    # the same on cfg.device
    refs: list | None = None                    # eager outputs per set (CPU fp32 lists)
    refs_hi: list | None = None                 # fp32 (fp64 on fp32 runs) model outputs per set
    info: dict = field(default_factory=dict)
    _export_model: torch.nn.Module | None = None

    def __post_init__(self):
        self.sets = [to_device(s, self.cfg.device) for s in self.sets_cpu]

    def export_model(self) -> torch.nn.Module:
        """The model as given to torch.export / kiln (a CPU copy by default on cuda runs)."""
        if self._export_model is None:
            dev = self.cfg.device if self.cfg.export_device == "device" else "cpu"
            self._export_model = self.model if dev == self.cfg.device else copy.deepcopy(self.model).to(dev)
        return self._export_model

    def export_inputs(self) -> tuple:
        return self.sets[0] if self.cfg.export_device == "device" else self.sets_cpu[0]


# --------------------------------------------------------------------------- shared helpers
def new_row(section: str, model: str, batch: int, backend: str, label: str, cfg: BenchCfg) -> dict:
    return {"section": section, "model": model, "batch": batch, "backend": backend, "label": label,
            "device": cfg.device, "dtype": str(cfg.dtype).replace("torch.", ""), "size": cfg.size,
            "status": "INCOMPLETE (run killed or crashed during this row)", "median_ms": None,
            "p10_ms": None, "p90_ms": None, "compile_s": None, "first_call_s": None,
            "max_abs_err": None, "max_abs_err_hi": None, "max_abs_ref": None, "rel_err": None,
            "notes": [], "extra": {}, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _row(case: Case, backend: str, label: str) -> dict:
    r = new_row(case.section, case.model_name, case.batch, backend, label, case.cfg)
    r["extra"]["input_shapes"] = [list(t.shape) for t in case.sets_cpu[0]]
    return r


def _fail(row: dict, stage: str, e: BaseException) -> dict:
    row["status"] = f"FAILED ({stage}): {short_error(e)}"
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


def _evaluate(case, fn: Callable, arg_sets: list) -> dict:
    """Run ``fn`` on every input set and compare with ``case.refs`` / ``case.refs_hi``
    (eager and hi-precision reference outputs, per set)."""
    vs_ref, vs_hi = [], []
    with torch.no_grad():
        for i, args in enumerate(arg_sets):
            out = host_copy(fn(*args))
            if case.refs is not None:
                vs_ref.append(compare(case.refs[i], out))
            if case.refs_hi is not None:
                vs_hi.append(compare(case.refs_hi[i], out))
    return {"ref": merge_compare(vs_ref) if vs_ref else None, "hi": merge_compare(vs_hi) if vs_hi else None}


def _fill(row: dict, case_cfg: BenchCfg, ev: dict, timing: dict | None) -> dict:
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
        for k in ("median_ms", "p10_ms", "p90_ms"):
            row[k] = timing[k]
        row["timing"] = timing
    status = "ok"
    if (ref and ref["nonfinite"]) or (hi and hi["nonfinite"]):
        status = "WRONG: NaN/Inf in output"
    elif err is not None and err != err:
        status = "WRONG: outputs could not be compared (see notes)"
    elif mref == 0:
        status = "ok (reference is all zero: error says nothing)"
    elif row["rel_err"] is not None and row["rel_err"] > case_cfg.rel_warn:
        status = f"SUSPECT: err/max|ref| = {row['rel_err']:.3g}"
    row["status"] = status
    return row


def _first_call(fn: Callable, args: tuple, device: str) -> float:
    with torch.no_grad(), Stopwatch(device) as sw:
        fn(*args)
    return sw.s


def _time(case_or_cfg, fn: Callable, arg_sets: list) -> dict:
    cfg = case_or_cfg.cfg if isinstance(case_or_cfg, (Case, LlmCase)) else case_or_cfg
    with torch.no_grad():
        return time_calls(fn, arg_sets, cfg.device, cfg.warmup, cfg.reps, cfg.blocks)


# --------------------------------------------------------------------------- torch eager
def eager(case: Case) -> dict:
    """Torch eager (the reference). Fills ``case.refs`` and ``case.refs_hi``; its own error is vs
    the fp32 copy of the same weights (fp64 on fp32 runs)."""
    row = _row(case, "eager", "torch eager")
    stage = "first call"
    try:
        model = case.model
        row["first_call_s"] = _first_call(model, case.sets[0], case.cfg.device)
        stage = "reference outputs"
        with torch.no_grad():
            case.refs = [host_copy(model(*s)) for s in case.sets]
        stage = "hi-precision reference"
        try:
            case.refs_hi = _hi_outputs(case.model, case.sets, case.cfg.hi_dtype)
            row["extra"]["hi_ref"] = str(case.cfg.hi_dtype).replace("torch.", "")
        except Exception as e:  # noqa: BLE001 - the row stays useful without it
            row["notes"].append(f"no {case.cfg.hi_dtype} reference: {short_error(e)}")
        stage = "timing"
        timing = _time(case, model, case.sets)
        ev = {"ref": None, "hi": None}
        if case.refs_hi is not None:
            ev["hi"] = merge_compare([compare(h, r) for h, r in zip(case.refs_hi, case.refs)])
        _fill(row, case.cfg, ev, timing)
        row["max_abs_err"] = 0.0
        if case.refs:
            row["max_abs_ref"] = max(float(t.abs().max()) for t in case.refs[0] if t.numel())
            row["rel_err"] = (row["max_abs_err_hi"] / row["max_abs_ref"]) if (
                row["max_abs_err_hi"] is not None and row["max_abs_ref"]) else None
            if row["max_abs_ref"] == 0:
                row["status"] = "ok (reference is all zero: error says nothing)"
        return row
    except Exception as e:  # noqa: BLE001
        return _fail(row, stage, e)


def _hi_outputs(model: torch.nn.Module, sets: list, hi: torch.dtype) -> list:
    m = copy.deepcopy(model).to(hi)
    try:
        with torch.no_grad():
            return [host_copy(m(*[t.to(hi) if t.is_floating_point() else t for t in s])) for s in sets]
    finally:
        del m
        cleanup()


# --------------------------------------------------------------------------- torch.compile
def inductor(case: Case, mode: str) -> dict:
    """``torch.compile(model, mode=mode, dynamic=False)`` after a dynamo reset; first call = compile."""
    backend = {"max-autotune": "inductor-max", "reduce-overhead": "inductor-ro"}[mode]
    row = _row(case, backend, f"torch.compile {mode}")
    if not case.cfg.cuda and not case.cfg.cpu_compile:
        row["status"] = "skipped: cpu (pass --cpu-compile to run)"
        return row
    stage = "compile (first call)"
    try:
        cleanup()
        cm = torch.compile(case.model, mode=mode, dynamic=False)
        row["first_call_s"] = row["compile_s"] = _first_call(cm, case.sets[0], case.cfg.device)
        stage = "check"
        ev = _evaluate(case, cm, case.sets)
        stage = "timing"
        _fill(row, case.cfg, ev, _time(case, cm, case.sets))
        return row
    except Exception as e:  # noqa: BLE001
        return _fail(row, stage, e)
    finally:
        cm = None
        cleanup()


# --------------------------------------------------------------------------- TVM
def _tvm_target(cfg: BenchCfg):
    import tvm
    return tvm.target.Target(CUDA_TARGET if cfg.cuda else LLVM_TARGET)


def _tvm_dev(cfg: BenchCfg):
    import tvm
    return tvm.cuda(0) if cfg.cuda else tvm.cpu(0)


def _run_vm(case: Case, row: dict, ex, extra_args: list) -> dict:
    """Load ``ex`` in a VM, check it on every input set, time it (CUDA events around the VM call)."""
    import tvm
    from tvm import relax
    stage = "vm load"
    t0 = time.perf_counter()
    vm = relax.VirtualMachine(ex, _tvm_dev(case.cfg))
    f = vm["main"]
    row["extra"]["vm_load_s"] = time.perf_counter() - t0
    tsets = [tuple(tvm.runtime.from_dlpack(t) for t in s) + tuple(extra_args) for s in case.sets]
    stage = "first call"
    row["first_call_s"] = _first_call(f, tsets[0], case.cfg.device)
    stage = "check"
    ev = _evaluate(case, f, tsets)
    stage = "timing"
    return _fill(row, case.cfg, ev, _time(case, f, tsets))


def tvm_stock(case: Case) -> dict:
    """Stock TVM: torch.export -> ``from_exported_program`` -> ``tvm.compile`` (default pipeline;
    on cuda that is dlight with WMMA tensor cores at sm_90) -> relax VM."""
    row = _row(case, "tvm", "stock TVM (from_exported_program + tvm.compile default/dlight)")
    stage = "import"
    try:
        import tvm
        from tvm.relax.frontend.torch import from_exported_program
        row["extra"]["target"] = str(_tvm_target(case.cfg).export())
        t0 = time.perf_counter()
        with torch.no_grad():
            ep = torch.export.export(case.export_model(), case.export_inputs())
        row["extra"]["export_s"] = time.perf_counter() - t0
        mod = from_exported_program(ep)
        row["extra"]["import_s"] = time.perf_counter() - t0
        del ep
        stage = "compile"
        t0 = time.perf_counter()
        ex = tvm.compile(mod, target=_tvm_target(case.cfg))
        row["compile_s"] = time.perf_counter() - t0
        stage = "run"
        return _run_vm(case, row, ex, [])
    except Exception as e:  # noqa: BLE001
        return _fail(row, stage, e)
    finally:
        cleanup()


def tvm_kiln_import(case: Case) -> dict:
    """The stock ``tvm.compile`` default pipeline on kiln's importer output
    (``kiln.frontend.import_torch``); weights bound as constants like the stock importer does
    (falls back to passing them as VM arguments if binding fails)."""
    row = _row(case, "tvm-kiln-import", "stock TVM pipeline on kiln's import")
    stage = "kiln import"
    try:
        import tvm
        from tvm import relax
        from kiln.frontend import import_torch
        row["extra"]["target"] = str(_tvm_target(case.cfg).export())
        inputs = case.export_inputs()
        t0 = time.perf_counter()
        res = import_torch(case.export_model(), inputs)
        row["extra"]["import_s"] = time.perf_counter() - t0
        mod, params = res.mod, list(res.params)
        extra_args: list = []
        stage = "bind params"
        pvars = list(mod["main"].params)[len(inputs):]
        if len(pvars) != len(params):
            raise ValueError(f"main has {len(pvars)} parameter slots after {len(inputs)} inputs, "
                             f"ImportResult has {len(params)} params")
        try:
            mod = relax.transform.BindParams("main", dict(zip(pvars, params)))(mod)
            row["extra"]["params"] = "bound as constants"
        except Exception as e:  # noqa: BLE001
            row["notes"].append(f"BindParams failed ({short_error(e, 120)}); params passed as VM args")
            dev = _tvm_dev(case.cfg)
            extra_args = [tvm.runtime.tensor(p, device=dev) for p in params]
        stage = "compile"
        t0 = time.perf_counter()
        ex = tvm.compile(mod, target=_tvm_target(case.cfg))
        row["compile_s"] = time.perf_counter() - t0
        stage = "run"
        return _run_vm(case, row, ex, extra_args)
    except Exception as e:  # noqa: BLE001
        return _fail(row, stage, e)
    finally:
        cleanup()


# --------------------------------------------------------------------------- kiln
def kiln_row(case: Case) -> dict:
    """kiln: ``kiln.compile`` -> ``art.export(dir)`` -> ``kiln.load(dir)``; the loaded module is timed."""
    row = _row(case, "kiln", "kiln (compile -> export -> load)")
    stage = "compile"
    tmp = None
    try:
        import kiln
        target = "cuda" if case.cfg.cuda else "llvm"
        t0 = time.perf_counter()
        art = kiln.compile(case.export_model(), case.export_inputs(), target=target, dtype=None)
        row["compile_s"] = time.perf_counter() - t0
        row["extra"]["timings"] = {k: float(v) for k, v in dict(getattr(art, "timings", {}) or {}).items()}
        stage = "export"
        base = case.cfg.artifacts
        if base:
            tmp = os.path.join(base, f"{case.model_name}-b{case.batch}-{case.cfg.size}")
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp = tempfile.mkdtemp(prefix="kiln-bench-")
        t0 = time.perf_counter()
        art.export(tmp)
        row["extra"]["export_s"] = time.perf_counter() - t0
        row["extra"]["artifact_bytes"] = sum(os.path.getsize(os.path.join(d, f))
                                             for d, _, fs in os.walk(tmp) for f in fs)
        del art
        stage = "load"
        t0 = time.perf_counter()
        m = kiln.load(tmp, device="cuda" if case.cfg.cuda else "cpu")
        row["extra"]["load_s"] = time.perf_counter() - t0
        stage = "first call"
        row["first_call_s"] = _first_call(m, case.sets[0], case.cfg.device)
        stage = "check"
        ev = _evaluate(case, m, case.sets)
        stage = "timing"
        return _fill(row, case.cfg, ev, _time(case, m, case.sets))
    except Exception as e:  # noqa: BLE001
        return _fail(row, stage, e)
    finally:
        if tmp and not case.cfg.artifacts:
            shutil.rmtree(tmp, ignore_errors=True)
        cleanup()


# --------------------------------------------------------------------------- LLM decode
# Llama-3.2-1B shape, used when the zoo gives no causal LM (rope scaling left at default: no effect on speed).
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                rms_norm_eps=1e-5, tie_word_embeddings=True)
LLAMA_TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                  tie_word_embeddings=True)


class Decode:
    """One batch-``b`` decode step on a transformers ``StaticCache`` prefilled to ``context`` tokens.

    Each step writes the new token's K/V at position ``context`` and attends over 0..context, so a
    step's output depends only on its input ids: eager and compiled steps share one cache.
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

    def step(self, ids: torch.Tensor) -> torch.Tensor:
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
    section: str = "llm"
    model_name: str = "llama"
    refs: list | None = None
    refs_hi: list | None = None


def _find_causal_lm(model: torch.nn.Module):
    for m in model.modules():
        if type(m).__name__.endswith("ForCausalLM") and hasattr(m, "config"):
            return m
    return None


def llm_setup(cfg: BenchCfg, batch: int = 1) -> LlmCase:
    """Build the Llama model (kiln zoo if it gives a ``*ForCausalLM``, else the Llama-3.2-1B shape from
    a config), cast it, prefill a StaticCache with ``cfg.context`` random tokens."""
    hf, source = None, ""
    try:
        from kiln import zoo
        zm = zoo.get("llama", size=cfg.size, batch=batch, seed=0)
        hf = _find_causal_lm(zm.model)
        source = f"kiln.zoo llama/{cfg.size}" if hf is not None else ""
    except Exception as e:  # noqa: BLE001
        source = f"(zoo unavailable: {short_error(e, 100)}) "
    if hf is None:
        from transformers import LlamaConfig, LlamaForCausalLM
        conf = LlamaConfig(**(LLAMA_1B if cfg.size == "full" else LLAMA_TINY))
        torch.manual_seed(0)
        with torch.device(cfg.device):
            hf = LlamaForCausalLM(conf)
        source += f"LlamaConfig {'Llama-3.2-1B shape' if cfg.size == 'full' else 'tiny'}"
    hf = hf.to(device=cfg.device, dtype=cfg.dtype).eval()
    vocab = hf.config.vocab_size
    g = torch.Generator().manual_seed(cfg.input_seed)
    prefill = torch.randint(0, vocab, (batch, cfg.context), generator=g)
    dec = Decode(hf, prefill, cfg.context, cfg.device)
    sets = [(torch.randint(0, vocab, (batch, 1), generator=g).to(cfg.device),) for _ in range(cfg.n_sets)]
    wbytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    return LlmCase(cfg, hf, dec, prefill, sets, wbytes, source, batch)


def _llm_row(lc: LlmCase, backend: str, label: str) -> dict:
    r = new_row(lc.section, lc.model_name, lc.batch, backend, label, lc.cfg)
    r["extra"].update(context=lc.cfg.context, weight_GB=lc.weight_bytes / 1e9, model_source=lc.source,
                      step="1 decode token per sequence, StaticCache")
    return r


def _llm_rates(row: dict, lc: LlmCase) -> None:
    if row.get("median_ms"):
        s = row["median_ms"] / 1e3
        row["extra"]["ms_per_token"] = row["median_ms"]  # one token per sequence per step
        row["extra"]["tokens_per_s"] = lc.batch / s
        row["extra"]["weight_TBps"] = lc.weight_bytes / s / 1e12


def llm_eager(lc: LlmCase) -> dict:
    row = _llm_row(lc, "eager", "torch eager")
    stage = "first call"
    try:
        row["first_call_s"] = _first_call(lc.dec.step, lc.sets[0], lc.cfg.device)
        with torch.no_grad():
            lc.refs = [host_copy(lc.dec.step(*s)) for s in lc.sets]
        stage = "hi-precision reference"
        ev = {"ref": None, "hi": None}
        try:
            hi = copy.deepcopy(lc.hf).to(lc.cfg.hi_dtype)
            dec_hi = Decode(hi, lc.prefill_ids, lc.cfg.context, lc.cfg.device)
            with torch.no_grad():
                lc.refs_hi = [host_copy(dec_hi.step(*s)) for s in lc.sets]
            del hi, dec_hi
            cleanup()
            ev["hi"] = merge_compare([compare(h, r) for h, r in zip(lc.refs_hi, lc.refs)])
        except Exception as e:  # noqa: BLE001
            row["notes"].append(f"no {lc.cfg.hi_dtype} reference: {short_error(e)}")
        stage = "timing"
        _fill(row, lc.cfg, ev, _time(lc, lc.dec.step, lc.sets))
        row["max_abs_err"] = 0.0
        row["max_abs_ref"] = max(float(t.abs().max()) for t in lc.refs[0])
        if row["max_abs_err_hi"] is not None and row["max_abs_ref"]:
            row["rel_err"] = row["max_abs_err_hi"] / row["max_abs_ref"]
        _llm_rates(row, lc)
        return row
    except Exception as e:  # noqa: BLE001
        return _fail(row, stage, e)


def llm_inductor(lc: LlmCase, mode: str) -> dict:
    backend = {"max-autotune": "inductor-max", "reduce-overhead": "inductor-ro"}[mode]
    row = _llm_row(lc, backend, f"torch.compile {mode} (CUDA graphs)")
    if not lc.cfg.cuda and not lc.cfg.cpu_compile:
        row["status"] = "skipped: cpu (pass --cpu-compile to run)"
        return row
    stage = "compile (first call)"
    cstep = None
    try:
        cleanup()
        cstep = torch.compile(lc.dec.step, mode=mode, dynamic=False)
        row["first_call_s"] = row["compile_s"] = _first_call(cstep, lc.sets[0], lc.cfg.device)
        stage = "check"
        ev = _evaluate(lc, cstep, lc.sets)
        stage = "timing"
        _fill(row, lc.cfg, ev, _time(lc, cstep, lc.sets))
        _llm_rates(row, lc)
        return row
    except Exception as e:  # noqa: BLE001
        return _fail(row, stage, e)
    finally:
        cstep = None
        cleanup()


def llm_kiln_pending(cfg: BenchCfg, batch: int = 1) -> dict:
    row = new_row("llm", "llama", batch, "kiln", "kiln", cfg)
    row["status"] = "pending (LLM issue)"
    row["extra"]["context"] = cfg.context
    return row


def make_case(section: str, model_name: str, batch: int, cfg: BenchCfg, model: torch.nn.Module,
              examples: tuple, vocab: int | None) -> Case:
    """A :class:`Case` with ``cfg.n_sets`` fresh input sets for ``batch`` (same seeds in every run)."""
    fdt = cfg.dtype
    sets = input_sets(examples, batch, cfg.n_sets, cfg.input_seed, vocab, fdt)
    return Case(section, model_name, batch, cfg, model, sets)

