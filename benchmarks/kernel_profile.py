#!/usr/bin/env python3
"""Per-kernel profile of a kiln-compiled zoo model: where one forward's time goes, kernel by kernel.

Compiles the model as ``benchmarks/run.py``'s kiln row does (kiln's compile stages -> export -> ``kiln.load``), times
it warm (CUDA events), then profiles a few steps with ``torch.profiler``. On cuda CUPTI records every kernel of the
process, TVM's too; on cpu torch.profiler cannot see into TVM, so a VM instrument opens one ``record_function`` range
per VM call and the llvm functions are those ranges. Each kernel (``<func>_kernel``) is joined with its PrimFunc: the
schedule report (kiln rule or dlight rule, fallback flag, GEMM config) and facts read from the IR (launches per step,
bytes in/out, M/N/K). Printed: the kernel table, per-category totals, the sm_90a GEMMs (TFLOP/s, tile use, share of
the floor) and the memory-bound kernels (bytes, GB/s, share of copy bandwidth). The table comes from a build without
CUDA graphs (every kernel launched, and attributed, one by one); ``--cuda-graph both`` (cuda default) also builds and
times the graph variant and says whether the profiler saw its kernels.

Reproduce (H200, repository root, one device call per line)::

    source .device/setup-tvm .device && KILN_PROVE_REWRITES=0 python3 benchmarks/kernel_profile.py resnet50 --batch 32 \
        --out $OUT/prof-resnet32.json
    source .device/setup-tvm .device && KILN_PROVE_REWRITES=0 python3 benchmarks/kernel_profile.py bert --batch 8 \
        --out $OUT/prof-bert8.json

Static view without a GPU (compile for cuda; kernels, launches, bytes, GEMM tiles, floors):
``KILN_PROVE_REWRITES=0 python3 benchmarks/kernel_profile.py resnet50 --batch 32 --compile-only``.
CPU smoke test: ``python3 benchmarks/kernel_profile.py resnet50 --device cpu --size tiny``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

__all__ = ["FuncInfo", "categorize", "static_info", "kernel_func", "parse_trace", "build_rows", "category_rows",
           "gemm_rows", "traffic_rows", "render", "render_static", "graph_note", "tile_use", "compile_variants",
           "run_profile", "main", "PEAK_TFLOPS", "PEAK_TBPS", "CATEGORIES"]

SCHEMA = "kiln-profile/1"
STEP_MARK = "kiln_profile_step"
_KERNEL = re.compile(r"_kernel(?:_?\d+)?$")


def _log(msg: str) -> None:
    print(msg, flush=True)


def _load_sibling(stem: str):
    """``benchmarks/<stem>.py``, loaded by path (run as a script, benchmarks/ is on sys.path; imported, maybe not)."""
    import importlib.util
    name = f"kiln_bench_{stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, f"{stem}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _load_timing():
    return _load_sibling("timing")


_ir = _load_sibling("kernel_profile_ir")
FuncInfo, categorize, static_info, tile_use = _ir.FuncInfo, _ir.categorize, _ir.static_info, _ir.tile_use
PEAK_TFLOPS, PEAK_TBPS, CATEGORIES = _ir.PEAK_TFLOPS, _ir.PEAK_TBPS, _ir.CATEGORIES


# --------------------------------------------------------------------------- compile
def compile_variants(model, inputs, target: str, graphs: list) -> tuple[dict, dict, dict]:
    """Run kiln's compile stages once up to scheduling, then lower + codegen once per CUDA-graph setting.

    Returns ``({graph_on: CompiledModel}, {func: FuncInfo}, {"timings", "notes", "schedule_report"})``. The same
    steps as :func:`kiln.compile` (whose schedule-stage module it keeps, to read the IR facts).
    """
    from kiln import api
    from kiln.options import CompileOptions
    from kiln.pipeline import STAGES, CompileState, run_stages
    from kiln.target import check_toolchain, resolve_target
    kt = resolve_target(target)
    check_toolchain(kt)
    state = CompileState(target=kt, options=CompileOptions.from_knobs(progress=False, cuda_graph=False))
    t0 = time.perf_counter()
    api._import(state, model, tuple(inputs), None, None)
    state.timings["import"] = round(time.perf_counter() - t0, 3)
    cut = [s.name for s in STAGES].index("schedule") + 1
    run_stages(state, STAGES[:cut])
    scheduled = state.mod
    arts, lowered = {}, None
    for g in graphs:
        s = copy.copy(state)
        s.options, s.timings, s.notes = replace(state.options, cuda_graph=g), dict(state.timings), list(state.notes)
        run_stages(s, STAGES[cut:], first_index=cut + 2)
        arts[g] = api.CompiledModel(s)
        if not g or lowered is None:
            lowered = s.mod                  # the profiled (graph-off) build's launches
    meta = {"timings": arts[graphs[0]].timings, "notes": list(state.notes), "schedule_report": state.schedule_report}
    return arts, static_info(scheduled, lowered, state.schedule_report), meta


# --------------------------------------------------------------------------- profiling
class _VMRanges:
    """VM instrument: one torch.profiler ``record_function`` range per VM call (how llvm functions get rows)."""

    def __init__(self):
        import torch
        self._rf = torch.autograd.profiler.record_function
        self.stack = []

    def __call__(self, func, symbol, before, ret, *args):
        if before:
            r = self._rf(str(symbol))
            r.__enter__()
            self.stack.append(r)
        elif self.stack:
            self.stack.pop().__exit__(None, None, None)
        return 0


def run_profile(fn, device: str, steps: int, vm=None, trace_path: str | None = None) -> dict:
    """``steps`` calls of ``fn`` under torch.profiler (each in a ``STEP_MARK`` range, synchronised); returns the
    parsed trace (:func:`parse_trace`). ``vm``: a relax VirtualMachine to instrument (cpu attribution)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    cuda = device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if vm is not None:
        import tvm_ffi
        vm.set_instrument(tvm_ffi.convert(_VMRanges()))
    with profile(activities=acts) as prof:
        for _ in range(steps):
            with record_function(STEP_MARK):
                fn()
                if cuda:
                    torch.cuda.synchronize()
    path = trace_path or os.path.join(tempfile.mkdtemp(prefix="kiln-prof-"), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        trace = json.load(f)
    if not trace_path:
        os.remove(path)
    return parse_trace(trace, steps, gpu=cuda)


def kernel_func(kernel: str, funcs) -> str | None:
    """The PrimFunc a device kernel (``<func>_kernel``, ``<func>_kernel_1``) or a VM call came from."""
    if kernel in funcs:
        return kernel
    base = _KERNEL.sub("", kernel)
    return base if base in funcs else None


def parse_trace(trace: dict, steps: int, gpu: bool) -> dict:
    """Per-name totals of a chrome trace: GPU kernels / memcpys / memsets (``gpu``), else the VM-call ranges.

    Returns ``{"steps", "names": {name: {"calls", "total_us"}}, "per_step": [{"sum_us", "span_us",
    "count", "host_us"}]}``; a step is the ``STEP_MARK`` range, device work assigned to it by start time.
    """
    evs = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    marks = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in evs
                   if e.get("name") == STEP_MARK and e.get("cat") in ("user_annotation", "cpu_op"))
    cats = ("kernel", "gpu_memcpy", "gpu_memset") if gpu else ("user_annotation",)
    work = [e for e in evs if e.get("cat") in cats and e.get("name") != STEP_MARK]
    names: dict = {}
    for e in work:
        d = names.setdefault(e["name"], {"calls": 0, "total_us": 0.0})
        d["calls"] += 1
        d["total_us"] += float(e.get("dur", 0))
    per_step = []
    for a, b in marks:
        inside = [e for e in work if a <= float(e["ts"]) <= b]
        t0 = min((float(e["ts"]) for e in inside), default=0.0)
        t1 = max((float(e["ts"]) + float(e.get("dur", 0)) for e in inside), default=0.0)
        per_step.append({"count": len(inside), "sum_us": sum(float(e.get("dur", 0)) for e in inside),
                         "span_us": t1 - t0, "host_us": b - a})
    return {"steps": steps, "names": names, "per_step": per_step, "events": len(work)}


# --------------------------------------------------------------------------- tables
def build_rows(prof: dict, funcs: dict, step_us: float, floors: bool = True) -> list[dict]:
    """One row per kernel name, joined with its PrimFunc facts; sorted by time per step. ``floors``: compare with
    the H200 floors (``PEAK_TFLOPS``, ``PEAK_TBPS``; off for cpu profiles)."""
    steps = max(1, prof["steps"])
    rows = []
    for kname, d in prof["names"].items():
        fname = kernel_func(kname, funcs)
        info = funcs.get(fname) if fname else None
        us = d["total_us"] / steps
        row = {"kernel": kname, "func": fname, "calls": d["calls"] / steps, "us": us,
               "us_per_call": d["total_us"] / d["calls"] if d["calls"] else 0.0,
               "pct": 100.0 * us / step_us if step_us else None,
               "category": info.category if info else ("vm builtin" if kname.startswith("vm.builtin") else "other"),
               "rule": info.rule if info else None, "fallback": bool(info and info.fallback), "detail": {},
               "static_calls": info.calls if info else None}
        if info:
            row.update(detail=info.detail, in_bytes=info.in_bytes, out_bytes=info.out_bytes, mnk=info.mnk,
                       flops=info.flops, floor_us=info.floor_us())
            t = row["us_per_call"] * 1e-6
            if info.flops and t > 0:
                row["tflops"] = info.flops / t / 1e12
            if info.bytes and t > 0:
                row["gbps"] = info.bytes / t / 1e9
            if floors and row["floor_us"] and row["us_per_call"]:
                row["pct_floor"] = 100.0 * row["floor_us"] / row["us_per_call"]
            row.update(tile_use(info))
        rows.append(row)
    rows.sort(key=lambda r: -r["us"])
    return rows


def category_rows(rows: list, step_us: float) -> list[dict]:
    out = {}
    for r in rows:
        c = out.setdefault(r["category"], {"category": r["category"], "kernels": 0, "calls": 0.0, "us": 0.0,
                                           "fallback_us": 0.0, "floor_us": 0.0})
        c["kernels"] += 1
        if r.get("pct_floor") is not None:     # floors compared (cuda) and known for this kernel
            c["floor_us"] += r["floor_us"] * r["calls"]
        c["calls"] += r["calls"]
        c["us"] += r["us"]
        c["fallback_us"] += r["us"] if r["fallback"] else 0.0
    res = sorted(out.values(), key=lambda c: (CATEGORIES.index(c["category"]) if c["category"] in CATEGORIES else 99))
    for c in res:
        c["pct"] = 100.0 * c["us"] / step_us if step_us else None
    return res


def gemm_rows(rows: list) -> list[dict]:
    return [r for r in rows if r.get("mnk")]


def traffic_rows(rows: list) -> list[dict]:
    """Memory-bound kernels worth a bandwidth check: gathers, layout copies, elementwise and reductions."""
    keep = ("im2col/gather", "transpose/layout", "elementwise", "reduction")
    return [r for r in rows if r["category"] in keep and r.get("in_bytes") is not None]


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else name[: width - 9] + "…" + name[-8:]


def _table(head: list, body: list, left=(0,)) -> str:
    w = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w[i]) if i in left else c.rjust(w[i])  # noqa: E731
                                  for i, c in enumerate(cells)).rstrip()
    return "\n".join([fmt(head), fmt(["-" * x for x in w])] + [fmt(r) for r in body])


def _n(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _mb(x) -> str:
    return _n(None if x is None else x / 1e6)


def _pct(x) -> str:
    return _n(None if x is None else 100 * x, "{:.0f}")


def _rule(r: dict) -> str:
    s = r["rule"] or ("- (no schedule rule)" if r["func"] else "(not a kiln PrimFunc)")
    if r["fallback"]:
        s += " FALLBACK"
    cfg = r["detail"].get("gemm_config") or r["detail"].get("gemv_config")
    return s + (f" [{cfg}]" if cfg else "")


def render(res: dict, top: int) -> str:
    """The printed report of a result dict (what ``--out`` holds)."""
    rows, out = res["kernels"], []
    unit = "GPU kernels (CUPTI)" if res["gpu"] else "VM calls (host clock, instrumented)"
    out.append(f"kernels by time per step: top {min(top, len(rows))} of {len(rows)} {unit}")
    body = [[str(i + 1), _short(r["kernel"], 58), _n(r["calls"], "{:g}"), _n(r["us"]), _n(r["pct"]), r["category"],
             _rule(r)] for i, r in enumerate(rows[:top])]
    if len(rows) > top:
        rest = rows[top:]
        body.append(["", f"({len(rest)} more)", _n(sum(r["calls"] for r in rest), "{:g}"),
                     _n(sum(r["us"] for r in rest)), _n(sum(r["pct"] or 0 for r in rest)), "", ""])
    out.append(_table(["#", "kernel", "calls", "us/step", "% step", "category", "rule [config]"], body, left=(1, 5, 6)))
    cats = res["categories"]
    out.append("\nby category")
    body = [[c["category"], str(c["kernels"]), _n(c["calls"], "{:g}"), _n(c["us"]), _n(c["pct"]),
             _n(c["floor_us"]) if c["floor_us"] else "-", _n(c["fallback_us"]) if c["fallback_us"] else "-"]
            for c in cats]
    total, floor = sum(c["us"] for c in cats), sum(c["floor_us"] for c in cats)
    body.append(["total", str(sum(c["kernels"] for c in cats)), _n(sum(c["calls"] for c in cats), "{:g}"),
                 _n(total), _n(100.0 * total / res["step_us"] if res["step_us"] else None),
                 _n(floor) if floor else "-", _n(sum(c["fallback_us"] for c in cats) or None)])
    out.append(_table(["category", "kernels", "calls", "us/step", "% step", "floor us", "of it fallback us"], body))
    g = gemm_rows(rows)
    if g:
        out.append(f"\nsm_90a GEMMs (floor = max(FLOPs / {PEAK_TFLOPS:g} TF/s, bytes / {PEAK_TBPS:g} TB/s))")
        body = [[_short(r["kernel"], 44), "x".join(map(str, r["mnk"])), r["detail"].get("gemm_config", "-"),
                 r["detail"].get("config_source", "-"), _n(r["calls"], "{:g}"), _n(r["us_per_call"]),
                 _n(r.get("tflops")), _n(r.get("pct_floor")), _pct(r.get("mn_use")), _pct(r.get("k_use")),
                 _n(r.get("k_tiles"), "{:g}"), _n(r.get("waves"), "{:.2f}")] for r in g]
        out.append(_table(["kernel", "MxNxK", "config", "source", "calls", "us/call", "TFLOP/s", "% floor", "MN use %",
                           "K use %", "k-tiles", "waves"], body, left=(0, 1, 2, 3)))
    t = traffic_rows(rows)
    if t:
        out.append(f"\nmemory-bound kernels (bytes = inputs read once + outputs written once, whole inputs: an "
                   f"overestimate for lookups such as take; copy peak {PEAK_TBPS:g} TB/s)")
        body = [[_short(r["kernel"], 58), r["category"], _n(r["calls"], "{:g}"), _mb(r["in_bytes"]),
                 _mb(r["out_bytes"]), _n(r["us_per_call"]), _n(r.get("gbps"), "{:.0f}"), _n(r.get("pct_floor"))]
                for r in t]
        out.append(_table(["kernel", "category", "calls", "in MB", "out MB", "us/call", "GB/s", "% floor"], body,
                          left=(0, 1)))
    out += [""] + [f"note: {n}" for n in res["notes"]]
    return "\n".join(out)


def render_static(funcs: dict) -> str:
    """The compile-only view: every launched PrimFunc with its launches, rule, bytes, GEMM tile use, floor."""
    body = []
    for f in sorted(funcs.values(), key=lambda f: -(f.floor_us() or 0) * max(f.calls, 1)):
        if not f.calls:
            continue
        tu = tile_use(f)
        rule = (f.rule or "-") + (" FALLBACK" if f.fallback else "")
        body.append([_short(f.name, 58), str(f.calls), f.category, rule,
                     f.detail.get("gemm_config", "-"), "x".join(map(str, f.mnk)) if f.mnk else "-",
                     _mb(f.in_bytes), _mb(f.out_bytes), _pct(tu.get("mn_use")), _pct(tu.get("k_use")),
                     _n(tu.get("waves"), "{:.2f}"), _n(f.floor_us(), "{:.2f}"),
                     _n(f.floor_us() * f.calls if f.floor_us() is not None else None)])
    tot = sum((f.floor_us() or 0) * f.calls for f in funcs.values())
    return (_table(["func", "calls", "category", "rule", "config", "MxNxK", "in MB", "out MB", "MN use %", "K use %",
                    "waves", "floor us/call", "x calls"], body, left=(0, 2, 3, 4, 5))
            + f"\nsum of floors x launches: {tot:.1f} us per forward ({PEAK_TFLOPS:g} TF/s, {PEAK_TBPS:g} TB/s)")


# --------------------------------------------------------------------------- driver
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="zoo model: bert, gpt2, llama, vit, resnet50")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=None, help="sequence length of text models (zoo default)")
    p.add_argument("--size", default="full", choices=["full", "tiny"])
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="default float16 on cuda, float32 on cpu")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda if available")
    p.add_argument("--out", default=None, help="write the result (rows, categories, static facts) to this JSON")
    p.add_argument("--trace", default=None, help="also keep the profiled chrome trace here")
    p.add_argument("--top", type=int, default=30, help="kernel rows printed (the JSON has all)")
    p.add_argument("--steps", type=int, default=None, help="profiled steps (default 5 cuda, 3 cpu)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 10 cuda, 2 cpu)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per block, 2 blocks (default 25 cuda, 5 cpu)")
    p.add_argument("--cuda-graph", default=None, choices=["off", "both"],
                   help="off: build, time and profile without CUDA graphs only; both (default on cuda): also build "
                        "and time the graph variant (the table always comes from the graph-off build)")
    p.add_argument("--min-macs", type=int, default=None,
                   help="experiment: override kiln.relax_passes.fuse_gemm_epilogue.MIN_MACS (smallest M*N*K sent to "
                        "the sm_90a GEMM, also the conv -> GEMM gate) for this compile")
    p.add_argument("--compile-only", action="store_true",
                   help="compile (for --device, cuda without a GPU is fine) and print the static kernel facts only")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """CLI entry point (tests call it); restores grad mode."""
    a = parse_args(argv)
    if ROOT not in sys.path:        # kiln from this checkout (benchmarks/run.py does the same)
        sys.path.insert(0, ROOT)
    import torch
    grad = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        return _main(a)
    finally:
        torch.set_grad_enabled(grad)


def _main(a) -> int:
    import torch

    from kiln import zoo
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available() and not a.compile_only:
        _log("error: --device cuda but torch sees no CUDA device (use --compile-only for the static view)")
        return 2
    dtype = a.dtype or ("float16" if cuda else "float32")
    graphs = [False, True] if cuda and (a.cuda_graph or "both") == "both" and not a.compile_only else [False]
    t0 = time.perf_counter()
    zm = zoo.get(a.model, size=a.size, batch=a.batch, seq=a.seq, dtype=dtype, seed=0)
    _log(f"kiln profile: {zm.description}, batch {a.batch}, {dtype}, {device}")
    from kiln.relax_passes import fuse_gemm_epilogue as fge
    saved = fge.MIN_MACS
    if a.min_macs is not None:      # read at call time by the pattern passes (their docstring's testing hook)
        fge.MIN_MACS = a.min_macs
    try:
        arts, funcs, meta = compile_variants(zm.model, zm.example_inputs, "cuda" if cuda else "llvm", graphs)
    finally:
        fge.MIN_MACS = saved
    meta["min_macs"] = saved if a.min_macs is None else a.min_macs
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in meta["timings"].items())
    _log(f"compiled in {time.perf_counter() - t0:.1f} s ({stages}); {sum(1 for f in funcs.values() if f.calls)} "
         f"PrimFuncs launched, {sum(f.calls for f in funcs.values())} launches per forward")
    for n in meta["notes"]:
        _log(f"  compile note: {n}")
    if a.min_macs is not None:
        _log(f"  MIN_MACS overridden: {a.min_macs} (default {saved})")
    res = {"schema": SCHEMA, "model": a.model, "size": a.size, "batch": a.batch, "dtype": dtype, "device": device,
           "description": zm.description, "gpu": cuda, "compile": meta, "notes": [],
           "static": [dict(asdict(f), floor_us=f.floor_us(), tile=tile_use(f)) for f in funcs.values()]}
    if a.compile_only:
        _log(render_static(funcs))
    else:
        tmp = tempfile.mkdtemp(prefix="kiln-prof-")
        try:
            _measure(a, res, zm, arts, funcs, device, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _log("")
        _log(render(res, a.top))
    return _write(a.out, res)


def _measure(a, res: dict, zm, arts: dict, funcs: dict, device: str, tmp: str) -> None:
    """Export + load each build (the deployable path, as benchmarks/run.py's kiln row), check it, time it, profile
    the graph-off build (and count what the profiler sees of the graph build); fills ``res``."""
    import torch

    import kiln
    timing, cuda = _load_timing(), device == "cuda"
    res["env"] = timing.env_info(device)
    mods = {}
    for g, art in arts.items():
        art.export(os.path.join(tmp, f"graph-{int(g)}"))
        mods[g] = kiln.load(os.path.join(tmp, f"graph-{int(g)}"), device=device)
    sets = timing.input_sets(zm.example_inputs, a.batch, 2, 20261121, timing.find_vocab_size(zm.model),
                             getattr(torch, res["dtype"]))
    sets = [timing.to_device(s, device) for s in sets]
    res["check"] = _check(zm.model, mods[False], sets[0], device, timing)
    warm, reps = a.warmup if a.warmup is not None else (10 if cuda else 2), a.reps or (25 if cuda else 5)
    res["timing"] = {("graph" if g else "no_graph"): timing.time_calls(m, sets, device, warm, reps, 2)
                     for g, m in mods.items()}
    steps, m = a.steps or (5 if cuda else 3), mods[False]
    prof = run_profile(lambda: m(*sets[0]), device, steps, vm=None if cuda else m._vm, trace_path=a.trace)
    # % of step: of the uninstrumented CUDA-event step on cuda; on cpu of the instrumented step (the VM ranges'
    # overhead is in the rows, so the uninstrumented step would not hold them)
    step_us = (res["timing"]["no_graph"]["median_ms"] * 1e3 if cuda or not prof["per_step"]
               else statistics.median(s["host_us"] for s in prof["per_step"]))
    res.update(step_us=step_us, profile={k: v for k, v in prof.items() if k != "names"})
    res["kernels"] = build_rows(prof, funcs, step_us, floors=cuda)
    res["categories"] = category_rows(res["kernels"], step_us)
    _summary(res, prof, funcs, res["notes"], cuda)
    if True in mods:
        gp = run_profile(lambda: mods[True](*sets[0]), device, steps)
        res["profile_graph"] = {k: v for k, v in gp.items() if k != "names"}
        res["notes"].append(graph_note(res["timing"]["graph"]["median_ms"], prof, gp))


def graph_note(graph_ms: float, prof: dict, graph_prof: dict) -> str:
    """What the profiler saw of the CUDA-graph build, compared with the graph-off build's device events."""
    med = lambda p: statistics.median([s["count"] for s in p["per_step"]]) if p["per_step"] else 0  # noqa: E731
    seen, want = med(graph_prof), med(prof)
    return (f"CUDA-graph build: {graph_ms:.3f} ms per step (CUDA events); under the profiler {seen:g} device events "
            f"per step vs {want:g} without the graph ("
            + ("its kernels are visible to CUPTI one by one" if seen >= want > 0 else
               "the graph hides kernels from the profiler, hence the graph-off table") + ")")


def _check(model, mod, inputs, device: str, timing) -> dict:
    """Max abs error of the compiled module vs the torch model on one input set (a profile of wrong code is moot)."""
    ref = timing.host_copy(copy.deepcopy(model).to(device)(*inputs))
    c = timing.compare(ref, timing.host_copy(mod(*inputs)))
    _log(f"check vs torch eager ({device}): max abs err {c['max_abs_err']:.3g}, max |ref| {c['max_abs_ref']:.3g}")
    return {k: c[k] for k in ("max_abs_err", "max_abs_ref", "nonfinite")}


def _summary(res: dict, prof: dict, funcs: dict, notes: list, cuda: bool) -> None:
    t, per = res["timing"], prof["per_step"]
    if cuda:
        line = f"step: {t['no_graph']['median_ms']:.3f} ms without CUDA graphs (the profiled build)"
        _log(line + (f", {t['graph']['median_ms']:.3f} ms with" if "graph" in t else "") + " (median of CUDA events)")
    else:
        _log(f"step: {t['no_graph']['median_ms']:.3f} ms (median, host clock, uninstrumented)")
    if per:
        med = {k: statistics.median([s[k] for s in per]) for k in ("count", "sum_us", "span_us", "host_us")}
        res["profile_step"] = med
        what = "kernels" if cuda else "instrumented VM calls"
        notes.append(f"profiled steps: {med['count']:g} {what} per step, {med['sum_us']:.1f} us of them, "
                     + (f"GPU busy span {med['span_us']:.1f} us (gaps between kernels "
                        f"{med['span_us'] - med['sum_us']:.1f} us), host time of the call {med['host_us']:.1f} us"
                        if cuda else f"host time of the instrumented call {med['host_us']:.1f} us"))
    if cuda:
        notes.append("the table is from the build without CUDA graphs (kernels launched one by one, so each one is "
                     "attributed); kernel times do not depend on graphs, launch gaps do")
    else:
        notes.append("cpu: torch.profiler cannot see inside TVM's VM, so a VM instrument opens one record_function "
                     "range per call; rows are llvm functions (and VM builtins) timed by the host clock, instrument "
                     "overhead included; the step time above is uninstrumented")
    static = sum(f.calls for f in funcs.values())
    seen = sum(r["calls"] for r in res["kernels"] if r["func"] and r["category"] != "vm builtin")
    if static and abs(seen - static) > 0.5:
        notes.append(f"launches per step: {seen:g} attributed in the profile vs {static} call sites in the lowered "
                     "module (a PrimFunc may launch several kernels, or a call may be skipped)")
    other = [r["kernel"] for r in res["kernels"] if not r["func"] and r["category"] != "vm builtin"]
    if other:
        notes.append(f"{len(other)} device event name(s) match no PrimFunc (torch or runtime work): "
                     + ", ".join(_short(o, 40) for o in other[:5]))


def _write(path: str | None, res: dict) -> int:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(res, f, indent=1, default=str)
        _log(f"\nresult: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
