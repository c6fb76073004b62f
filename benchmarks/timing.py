"""Timing, input and comparison helpers for the benchmark harness (``benchmarks/run.py``).

Method (see the device METHOD notes): fresh random inputs (never zeros), several input sets rotated
during timing, warm-up first, CUDA events around each call (GPU idle before each call, so the number
is the single-call latency a caller sees, host dispatch included), >= 20 repetitions in two blocks,
median reported with p10/p90; a host wall clock around each synchronised call is kept as a
cross-check that the events bracket work launched by other runtimes (TVM) too.
"""
from __future__ import annotations

import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "summarize", "time_calls", "to_tensors", "compare", "find_vocab_size", "fresh_inputs",
    "input_sets", "to_device", "env_info", "sync", "short_error", "Stopwatch",
]


# --------------------------------------------------------------------------- statistics
def _pct(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of a non-empty list (q in [0, 100])."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(ms: Sequence[float]) -> dict:
    """median / p10 / p90 / min / max / mean of a list of times in milliseconds."""
    return {"median_ms": statistics.median(ms), "p10_ms": _pct(ms, 10), "p90_ms": _pct(ms, 90),
            "min_ms": min(ms), "max_ms": max(ms), "mean_ms": statistics.fmean(ms), "reps": len(ms)}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Stopwatch:
    """``with Stopwatch(device) as sw: ...``; ``sw.s`` = wall seconds, device synchronised at both ends."""

    def __init__(self, device: str = "cpu"):
        self.device, self.s = device, float("nan")

    def __enter__(self):
        sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            sync(self.device)
        self.s = time.perf_counter() - self.t0
        return False


def time_calls(fn: Callable, arg_sets: Sequence[tuple], device: str, warmup: int = 10, reps: int = 50,
               blocks: int = 2) -> dict:
    """Time ``fn(*args)`` rotating over ``arg_sets``.

    Each call starts with the device idle (synchronise, record start event, call, record end event,
    synchronise). Returns :func:`summarize` of all calls plus ``block_medians_ms`` (one median per
    block of ``reps`` calls: their spread shows run-to-run noise) and ``wall_median_ms`` (host clock
    around the synchronised call).
    """
    if reps < 1 or not arg_sets:
        raise ValueError("need reps >= 1 and at least one input set")
    cuda = device.startswith("cuda")
    k = len(arg_sets)
    for i in range(warmup):
        fn(*arg_sets[i % k])
    sync(device)
    ev_ms: list[float] = []
    wall_ms: list[float] = []
    block_medians: list[float] = []
    i = 0
    for _ in range(blocks):
        block: list[float] = []
        if cuda:
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for r in range(reps):
            args = arg_sets[i % k]
            i += 1
            if cuda:
                torch.cuda.synchronize()
                h0 = time.perf_counter()
                starts[r].record()
                fn(*args)
                ends[r].record()
                torch.cuda.synchronize()
                wall_ms.append((time.perf_counter() - h0) * 1e3)
            else:
                h0 = time.perf_counter()
                fn(*args)
                t = (time.perf_counter() - h0) * 1e3
                wall_ms.append(t)
                block.append(t)
        if cuda:
            block = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        ev_ms.extend(block)
        block_medians.append(statistics.median(block))
    out = summarize(ev_ms)
    out["block_medians_ms"] = block_medians
    out["wall_median_ms"] = statistics.median(wall_ms)
    out["timer"] = "cuda-events" if cuda else "perf_counter"
    out["warmup"] = warmup
    out["input_sets"] = k
    return out


# --------------------------------------------------------------------------- outputs and errors
def to_tensors(obj: Any) -> list:
    """Flatten a model / runtime output into a list of torch tensors.

    Handles torch tensors, tuples/lists, dicts, transformers ``ModelOutput`` (``to_tuple``), and
    anything speaking DLPack (TVM tensors; TVM ``Array`` is iterated).
    """
    if obj is None:
        return []
    if isinstance(obj, torch.Tensor):
        return [obj]
    if hasattr(obj, "to_tuple") and callable(obj.to_tuple):
        return to_tensors(tuple(obj.to_tuple()))
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in to_tensors(v)]
    if hasattr(obj, "__dlpack__"):
        return [torch.from_dlpack(obj)]
    if isinstance(obj, (tuple, list)) or (hasattr(obj, "__len__") and hasattr(obj, "__getitem__")):
        return [t for i in range(len(obj)) for t in to_tensors(obj[i])]
    if isinstance(obj, (int, float)):
        return [torch.tensor(obj)]
    raise TypeError(f"cannot turn a {type(obj).__name__} output into tensors")


def host_copy(obj: Any) -> list:
    """Outputs as float32 CPU tensors (copies: safe against CUDA-graph / VM buffer reuse)."""
    return [t.detach().to("cpu", torch.float32) if t.is_floating_point() else t.detach().cpu()
            for t in to_tensors(obj)]


def compare(ref: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> dict:
    """Max abs error of ``out`` vs ``ref`` (lists of CPU tensors) over all outputs, and max |ref|.

    Outputs are paired by position; a count or shape mismatch is reported in ``notes`` and the
    unpaired outputs are skipped (an empty pairing gives ``nan``).
    """
    notes = []
    if len(ref) != len(out):
        notes.append(f"{len(out)} outputs vs {len(ref)} in reference; compared the first {min(len(ref), len(out))}")
    err, mref, nan, pairs = 0.0, 0.0, False, 0
    for i, (r, o) in enumerate(zip(ref, out)):
        if tuple(r.shape) != tuple(o.shape):
            if r.numel() == o.numel():
                o = o.reshape(r.shape)
                notes.append(f"output {i}: shape {tuple(out[i].shape)} reshaped to {tuple(r.shape)}")
            else:
                notes.append(f"output {i}: shape {tuple(o.shape)} vs reference {tuple(r.shape)}; skipped")
                continue
        r64, o64 = r.double(), o.double()
        if torch.isnan(o64).any() or (torch.isinf(o64).any() and not torch.isinf(r64).any()):
            nan = True
        d = (o64 - r64).abs()
        d = d[torch.isfinite(r64)] if d.numel() else d
        if d.numel():
            err = max(err, float(d.max()))
        if r64.numel():
            mref = max(mref, float(r64.abs()[torch.isfinite(r64)].max()) if torch.isfinite(r64).any() else 0.0)
        pairs += 1
    if nan:
        err = float("nan")
    if pairs == 0:
        err = float("nan")
    return {"max_abs_err": err, "max_abs_ref": mref, "nonfinite": nan, "notes": notes}


def merge_compare(results: Sequence[dict]) -> dict:
    """Combine :func:`compare` results over several input sets (max of maxima)."""
    if not results:
        return {"max_abs_err": float("nan"), "max_abs_ref": float("nan"), "nonfinite": False, "notes": []}
    errs = [r["max_abs_err"] for r in results]
    err = float("nan") if any(math.isnan(e) for e in errs) else max(errs)
    notes = sorted({n for r in results for n in r["notes"]})
    return {"max_abs_err": err, "max_abs_ref": max(r["max_abs_ref"] for r in results),
            "nonfinite": any(r["nonfinite"] for r in results), "notes": notes}


# --------------------------------------------------------------------------- inputs
def find_vocab_size(model: torch.nn.Module) -> int | None:
    """``config.vocab_size`` of the model or of its first submodule that has one."""
    for m in model.modules():
        v = getattr(getattr(m, "config", None), "vocab_size", None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def fresh_inputs(examples: Sequence[torch.Tensor], batch: int | None, seed: int, vocab: int | None,
                 float_dtype: torch.dtype | None = None) -> tuple:
    """New random CPU inputs shaped like ``examples`` (batch dim 0 replaced by ``batch``).

    * float tensors: standard normal (cast to ``float_dtype`` if given);
    * integer tensors whose values are all 0/1 (masks, token types): copied, rows repeated to ``batch``;
    * other integer tensors (token ids): uniform in ``[0, vocab)`` (``vocab`` = model vocab size, or
      the example's max + 1: out-of-range ids make TVM's gather read out of bounds);
    * bool tensors: copied like masks.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for ex in examples:
        ex = ex.detach().cpu()
        shape = tuple(ex.shape)
        if batch is not None and len(shape) >= 1:
            shape = (batch,) + shape[1:]
        if ex.is_floating_point():
            t = torch.randn(shape, generator=g, dtype=torch.float32)
            out.append(t.to(float_dtype or ex.dtype))
        elif ex.dtype == torch.bool or (ex.numel() and int(ex.min()) >= 0 and int(ex.max()) <= 1):
            out.append(_repeat_rows(ex, shape))
        else:
            hi = vocab if vocab else int(ex.max()) + 1
            hi = max(hi, 2)
            out.append(torch.randint(0, hi, shape, generator=g, dtype=ex.dtype))
    return tuple(out)


def _repeat_rows(ex: torch.Tensor, shape: tuple) -> torch.Tensor:
    if tuple(ex.shape) == shape or ex.dim() == 0:
        return ex.clone()
    reps = -(-shape[0] // ex.shape[0])
    return ex.repeat((reps,) + (1,) * (ex.dim() - 1))[: shape[0]].clone()


def input_sets(examples: Sequence[torch.Tensor], batch: int | None, n: int, base_seed: int,
               vocab: int | None, float_dtype: torch.dtype | None) -> list[tuple]:
    """``n`` independent fresh input sets; seeds depend on (base_seed, set index, batch) only, so
    separate runs (different sections, merged later) use the same inputs."""
    return [fresh_inputs(examples, batch, base_seed + 1009 * i + 17 * (batch or 0), vocab, float_dtype)
            for i in range(n)]


def to_device(ts: Sequence[torch.Tensor], device: str) -> tuple:
    return tuple(t.to(device).contiguous() for t in ts)


# --------------------------------------------------------------------------- environment
def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except Exception:  # noqa: BLE001 - best effort
        return None


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
        return str(getattr(m, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        return f"unavailable ({type(e).__name__}: {str(e)[:80]})"


def env_info(device: str) -> dict:
    """GPU, driver, library versions, host: stored with every run in the JSON."""
    info: dict[str, Any] = {
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": socket.gethostname(),
        "python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "device": device, "argv": sys.argv,
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "transformers": _version("transformers"), "triton": _version("triton"),
        "tvm": _version("tvm"), "tvm_ffi": _version("tvm_ffi"), "kiln": _version("kiln"),
        "env": {k: os.environ[k] for k in ("TVM_CUDA_COMPILE_MODE", "TVM_USE_RUNTIME_LIB", "CUDA_VISIBLE_DEVICES",
                                           "PYTHONPATH", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR",
                                           "KILN_CACHE_DIR", "KILN_CUDA_GRAPH", "KILN_STRICT")
                if k in os.environ},
    }
    here = os.path.dirname(os.path.abspath(__file__))
    info["git_commit"] = _run(["git", "-C", here, "rev-parse", "HEAD"])
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_capability=f"{p.major}.{p.minor}",
                    gpu_sms=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2**30, 1))
        q = _run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,"
                  "temperature.gpu,power.draw,memory.used", "--format=csv,noheader"])
        info["nvidia_smi"] = q
        if q:
            info["driver"] = q.split(",")[1].strip() if "," in q else q
    return info


def short_error(e: BaseException, limit: int = 240) -> str:
    """``Type: first informative line`` of an exception, for a table cell."""
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    skip = ("traceback", "file \"", "  file", "^", "~")
    cand = [ln for ln in lines if not ln.lower().startswith(skip)]
    # TVM errors often end with the informative line; Python errors start with it
    line = cand[0] if cand else (lines[0] if lines else "")
    for ln in cand:
        if any(w in ln for w in ("Check failed", "Error:", "error:", "must", "mismatch", "not supported",
                                 "Unsupported", "unsupported")):
            line = ln
            break
    msg = f"{type(e).__name__}: {line}"
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"
