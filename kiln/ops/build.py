"""Build-on-first-use for :mod:`kiln.ops`: target of a torch device, schedule, compile, export, cache, load.

An op describes one kernel as ``(op, params, sources, make)``: ``params`` are every value that changes the
code (shapes, dtypes, flags, tile config), ``sources`` the Python modules that write it (their SHA-256 is the
version stamp of the key), ``make(target)`` returns the ``IRModule`` to build plus a JSON-able ``info`` dict.
:func:`get_kernel` returns the loaded kernel, built at most once per key across processes
(:mod:`kiln.ops.cache`) and memoised in the process.

Scheduling: llvm needs none (the TE definitions are correct unscheduled; the CPU is kiln's reference).
For CUDA, functions that are not already scheduled (hand-written TIRx kernels are) go through kiln's rule
list (dlight's ``Matmul, GEMV, Reduction, GeneralReduction, Fallback``); a rule's schedule is accepted only
if it also *lowers* (dlight's ``Reduction`` accepts some functions whose schedule TVM then cannot lower), so
every decline has a reason and the rule that served each function is recorded in the entry's ``info``.
"""
from __future__ import annotations

import hashlib
import importlib
import threading
from typing import Callable, Sequence

import torch
import tvm

from .cache import CacheEntry, default_cache
from .checks import OpUnsupportedError

__all__ = ["Kernel", "get_kernel", "target_for", "cache_document", "build_module", "schedule_gpu",
           "compile_options", "stats", "forget", "source_stamp", "num_sms", "loaded_kernels"]

_MEMO: dict[tuple, "Kernel"] = {}
_MEMO_LOCK = threading.Lock()
_TARGETS: dict[str, object] = {}
_STAMPS: dict[str, str] = {}
_HITS = {"memo_hits": 0}
#: Modules that shape every kernel besides the op's own: this build driver (schedule acceptance), kiln's
#: rule list, and the CUDA pipeline/compile glue. Their hashes enter every key.
_COMMON_SOURCES = ("kiln.ops.build", "kiln.schedules", "kiln.schedules.rule", "kiln.target.cuda")


class Kernel:
    """A loaded kernel module and what its builder recorded.

    Attributes
    ----------
    key : str
        Cache key.
    info : dict
        The builder's info (which kernel/schedule serves the op, tile config, workspace, ...).
    source : str
        ``"built"`` (this process built it) or ``"disk"`` (loaded from the cache).
    """

    def __init__(self, entry: CacheEntry):
        self.key, self.module, self.source = entry.key, entry.module, entry.source
        self.info = entry.meta.get("info", {})
        self.path = entry.path
        self._fns: dict[str, object] = {}

    def __getitem__(self, name: str):
        fn = self._fns.get(name)
        if fn is None:
            fn = self._fns[name] = self.module[name]
        return fn


def target_for(device: torch.device):
    """kiln's target for a torch device: llvm for cpu, cuda with the device's arch (``sm_90a`` on Hopper,
    whose wgmma/TMA kernels need the arch-specific target)."""
    from ..target import resolve_target
    name = str(device)
    t = _TARGETS.get(name)
    if t is None:
        if device.type == "cpu":
            t = resolve_target("llvm")
        elif device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            arch = f"sm_{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")
            t = resolve_target({"kind": "cuda", "arch": arch})
        else:
            raise OpUnsupportedError(f"kiln.ops builds for cpu and cuda devices, not {device.type}")
        _TARGETS[name] = t
    return t


def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (sizes persistent grids and the tuned-table lookup)."""
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def source_stamp(modules: Sequence[str]) -> dict:
    """``{module: sha256 of its source file}``: the version stamp of the code that writes a kernel."""
    out = {}
    for name in modules:
        digest = _STAMPS.get(name)
        if digest is None:
            path = importlib.import_module(name).__file__
            with open(path, "rb") as f:
                digest = _STAMPS[name] = hashlib.sha256(f.read()).hexdigest()
        out[name] = digest
    return out


def _nvcc():
    from ..errors import ToolchainMissingError
    from ..target.cuda import find_nvcc
    try:
        return find_nvcc()
    except ToolchainMissingError:
        return None


def compile_options(t) -> dict:
    """What, besides the IR, changes the binary: for CUDA the device compiler, its version and flags
    (nvcc cubins through :mod:`kiln.target.cuda` when nvcc is found, else TVM's default source module
    that NVRTC compiles at load)."""
    if t.name != "cuda":
        return {}
    found = _nvcc()
    if found is None:
        return {"cuda_compiler": "tvm-default"}
    from ..target.cuda import nvcc_flags
    return {"cuda_compiler": "nvcc", "nvcc": found[1], "nvcc_flags": nvcc_flags(t.arch)}


def cache_document(op: str, params: dict, t, sources: Sequence[str]) -> dict:
    """The document whose SHA-256 is the cache key (see :mod:`kiln.ops.cache`)."""
    import tvm_ffi

    from .. import __version__
    return {"op": op, "params": params, "sources": source_stamp(tuple(sources) + _COMMON_SOURCES),
            "versions": {"kiln": __version__, "tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__},
            "target": t.to_dict(), "options": compile_options(t)}


def _lowering_error(func, t) -> str | None:
    """Why a scheduled PrimFunc does not lower with TVM's s_tir pipeline (None if it does)."""
    from tvm.s_tir import pipeline as s_tir_pipeline
    main, _, _ = s_tir_pipeline.default_s_tir_pipeline()
    mod = tvm.tirx.transform.BindTarget(t.tvm_target)(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}))
    try:
        with t.tvm_target:
            main(mod)
    except Exception as e:  # noqa: BLE001 - the reason is reported, the rule declined
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
    return None


def schedule_gpu(mod: tvm.IRModule, t) -> tuple[tvm.IRModule, list]:
    """Schedule every unscheduled PrimFunc of ``mod`` with the first rule whose schedule lowers.

    Returns
    -------
    (IRModule, list of dict)
        The module and, per function, ``{"func", "rule", "declined": [{"rule", "reason"}]}``.

    Raises
    ------
    OpUnsupportedError
        No rule gave a schedule that lowers (every reason is in the message).
    """
    from ..schedules import default_rules
    from ..schedules.dispatch import is_scheduled
    from ..schedules.rule import Declined
    rules = default_rules("cuda")
    reports, out = [], {}
    for gv, func in mod.functions_items():
        if is_scheduled(func):
            rule = str(func.attrs["kiln.rule"]) if "kiln.rule" in func.attrs else "hand-written"
            reports.append({"func": gv.name_hint, "rule": rule, "declined": []})
            out[gv] = func
            continue
        declined, chosen = [], None
        for rule in rules:
            with t.schedule_target:
                res = rule.apply(func, t.schedule_target)
            if isinstance(res, Declined):
                declined.append({"rule": res.rule, "reason": res.reason})
                continue
            cand = res.mod["main"].with_attr("tirx.is_scheduled", True)
            for k in ("global_symbol",):
                if k in func.attrs:
                    cand = cand.with_attr(k, func.attrs[k])
            err = _lowering_error(cand, t)
            if err:
                declined.append({"rule": rule.name, "reason": f"schedule does not lower: {err}"})
                continue
            chosen = (rule.name, cand)
            break
        if chosen is None:
            reasons = "; ".join(f"{d['rule']}: {d['reason']}" for d in declined)
            raise OpUnsupportedError(f"no CUDA schedule for {gv.name_hint}: {reasons}")
        reports.append({"func": gv.name_hint, "rule": chosen[0], "declined": declined})
        out[gv] = chosen[1]
    return tvm.IRModule(out, attrs=mod.attrs), reports


def build_module(mod: tvm.IRModule, t):
    """Schedule (CUDA) and compile ``mod`` for ``t``; return ``(executable, schedule reports)``.

    TIRx functions (attr ``kiln.tir_pipeline = "tirx"``) and scheduled s_tir functions go through kiln's
    mixed CUDA pipeline. On CUDA, when nvcc is available, the device code is compiled by kiln's nvcc
    callback if the build machine has a GPU (else at export).
    """
    from ..target import build_context, tir_pipeline
    reports = []
    if t.name == "cuda":
        mod, reports = schedule_gpu(mod, t)
        ctx = build_context(t) if _nvcc() is not None else t.tvm_target
        with ctx:
            ex = tvm.compile(mod, t.tvm_target, tir_pipeline=tir_pipeline(t))
    else:
        ex = tvm.compile(mod, t.tvm_target)
    return ex, reports


def _export(ex, path: str, t) -> dict:
    from ..target import export_library
    if t.name == "cuda" and _nvcc() is None:
        ex.export_library(path)
        return {"device_code": "cuda-source"}
    out = export_library(ex, path, t)
    return {"device_code": out.get("device_code")}


def get_kernel(op: str, params: dict, device: torch.device, sources: Sequence[str],
               make: Callable[[object], tuple]) -> Kernel:
    """The loaded kernel of ``op`` with ``params`` for ``device`` (memoised; built on first use).

    Parameters
    ----------
    op : str
        Op name (part of the key).
    params : dict
        JSON-able values (ints, floats, strings, bools, tuples) that change the code.
    device : torch.device
    sources : sequence of str
        Modules whose source writes the kernel (their hashes enter the key).
    make : callable
        ``make(target) -> (IRModule, info)``.

    Returns
    -------
    Kernel
    """
    from .. import knobs
    memo_key = (knobs.get("ops_cache_dir"), op, tuple(sorted(params.items())), str(device))
    kernel = _MEMO.get(memo_key)          # the per-call path: one dict lookup, no hashing of the document
    if kernel is not None:
        _HITS["memo_hits"] += 1
        return kernel
    with _MEMO_LOCK:
        kernel = _MEMO.get(memo_key)
        if kernel is not None:
            return kernel
        cache = default_cache()
        t = target_for(device)
        doc = cache_document(op, params, t, sources)

        def build(lib_path: str) -> dict:
            mod, info = make(t)
            ex, reports = build_module(mod, t)
            info = dict(info)
            info["schedules"] = reports
            info.update(_export(ex, lib_path, t))
            return info

        kernel = _MEMO[memo_key] = Kernel(cache.get(doc, build))
        return kernel


def loaded_kernels() -> list:
    """``[((op, params, device), Kernel)]`` of the kernels this process loaded from the current cache directory."""
    from .. import knobs
    root = knobs.get("ops_cache_dir")
    return [((k[1], k[2], k[3]), v) for k, v in list(_MEMO.items()) if k[0] == root]


def stats() -> dict:
    """Counters of this process: ``builds`` (made here), ``disk_loads`` (entries read from disk),
    ``memo_hits`` (calls served by an already loaded kernel), ``discarded`` (bad entries replaced),
    for the current cache directory."""
    c = default_cache()
    return {"builds": c.stats.builds, "disk_loads": c.stats.disk_loads, "memo_hits": _HITS["memo_hits"],
            "discarded": c.stats.discarded, "cache_dir": c.root}


def forget() -> None:
    """Drop every loaded kernel of this process (the next call reads the disk cache again)."""
    with _MEMO_LOCK:
        _MEMO.clear()
    default_cache().forget()
