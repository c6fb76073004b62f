#!/usr/bin/env python3
"""kiln's sm_90a decode GEMV vs torch at the Llama-3-8B decode shapes (M = 1, 4, 16 rows).

Y = X @ W^T with X [M, K], W [N, K] for (N, K) in {(6144, 4096), (4096, 4096), (28672, 4096),
(4096, 14336)} (qkv, o, gate+up, down), weights fp16 / bf16 / fp8 e4m3 with a per-channel fp32 scale.

Per row: kiln (heuristic config; at M = 1 a few other configs too, the best is reported beside the
heuristic), and the torch peers: ``F.linear`` (cuBLAS) for fp16/bf16 weights; for fp8 weights
``F.linear(x, w8.to(dtype)) * scale`` (dequantize, then cuBLAS) and ``torch._scaled_mm`` (cuBLASLt
fp8; it needs M padded to 16 rows and X quantized to fp8 too; the padding and quantization of X are
done once outside the timed call, so it is timed at its most favourable).
Numbers: median device time per call (CUDA events around each call, the queue kept full behind a
``torch.cuda._sleep`` so that host dispatch is not timed), effective TB/s = the GEMV's minimum bytes
(W + X + Y (+ scale)) / time, % of the 4.26 TB/s copy bandwidth measured on the same H200, and the
max error vs an fp32 reference (max |out - ref| / max |ref|). The weights rotate over enough distinct
copies (>= 4x the 60 MB L2, >= 2 copies) that every call streams W from HBM, for kiln and the peers.
Two more timings per variant (M = 1 rows, kiln's heuristic and the peers): ``b2b`` = events around
blocks of 20 back-to-back calls (per-call launch gaps included, no per-call events), and ``graph`` =
20 calls captured in one CUDA graph, replayed (what a decode step under CUDA graphs sees). References
in the same scheme: an empty kernel per call, and a device copy moving the same number of bytes
(read + write) as the GEMV, so the fixed per-call cost is visible next to the floor.

Run on the GPU machine from the repository root (< 4 min):
    source .device/setup-tvm .device && python3 benchmarks/gemv.py --out $OUT/gemv.json
CPU smoke test (builds every kernel, no timing): ``python3 benchmarks/gemv.py --dry-run``;
table of a result file: ``python3 benchmarks/gemv.py --table-only FILE.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from kiln.schedules.gemv_sm90 import (GemvConfig, GemvSM90, build_gemv_sm90, cuda_source, gemv_bytes,  # noqa: E402
                                      gemv_reference, make_gemv_sm90, select_gemv_config)
from kiln.tune.device_timing import CYCLES_PER_US, time_group  # noqa: E402

SCHEMA = "kiln-gemv-bench/1"
FP8 = "float8_e4m3fn"
SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
#: (activation dtype, weight dtype, Ms); the first two kinds are the targets, swept at M = 1
KINDS = [("float16", "float16", (1, 4, 16)), ("float16", FP8, (1, 4, 16)),
         ("bfloat16", "bfloat16", (1, 4, 16)), ("bfloat16", FP8, (1,))]


def sweep_configs(heur: GemvConfig, fp8: bool) -> list:
    """Variants timed at M = 1 beside the heuristic (same ``rows``): the register path with 8 / 16 warps
    and 8 / 12 / 16 loads per lane, and cp.async rings of 3..6 stages with 4 or 8 loads per trip."""
    R = heur.rows
    c = lambda loads: max(1, -(-loads // R))  # noqa: E731
    if fp8:
        out = [GemvConfig(16, R, c(8)), GemvConfig(16, R, 1, 256, 3), GemvConfig(8, R, c(8), 256, 3),
               GemvConfig(8, R, c(4), 256, 6), GemvConfig(16, R, c(4), 256, 4)]
    else:
        out = [GemvConfig(8, R, c(16)), GemvConfig(16, R, c(12)), GemvConfig(8, R, c(4), 256, 4),
               GemvConfig(16, R, c(4), 256, 3), GemvConfig(8, R, c(8), 256, 3)]
    seen, uniq = {heur}, []
    for cfg in out:
        if cfg not in seen:
            seen.add(cfg)
            uniq.append(cfg)
    return uniq


def alt_config(heur: GemvConfig, M, N, K, dtype, wdt):
    """The best-guess config of the other load path than ``heur`` (timed beside it at M > 1)."""
    R = heur.rows
    c = lambda loads: max(1, -(-loads // R))  # noqa: E731
    cands = ([GemvConfig(16, R, c(8)), GemvConfig(8, R, c(16)), GemvConfig(8, R, c(8))] if heur.stages else
             [GemvConfig(8, R, c(4), 256, 4), GemvConfig(8, R, c(4), 256, 3), GemvConfig(16, R, c(4), 256, 3)])
    return next((cfg for cfg in cands if cfg.check(M, N, K, dtype, wdt) is None), None)


COPY_TBPS = 4.26          # device-to-device copy bandwidth of the H200 (h200-anchors.json)
L2_BYTES = 60 * 2**20
DEVICE = "cuda"


def time_calls(fn, arg_sets, warmup: int, reps: int) -> dict:
    """Median device time of ``fn(*arg_sets[i % n])`` with the launch queue kept full (kiln's timer:
    :func:`kiln.tune.device_timing.time_group`, so the events bracket device work only)."""
    return time_group([("f", fn, arg_sets)], warmup, reps)["f"]


def time_b2b(fn, arg_sets, blocks: int = 10, n: int = 20) -> dict:
    """Per-call time of ``n`` back-to-back calls between two events (median over ``blocks``)."""
    for i in range(n):
        fn(*arg_sets[i % len(arg_sets)])
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(blocks)]
    torch.cuda._sleep(int(min(400e3, blocks * n * 30 + 2000) * CYCLES_PER_US))
    for b in range(blocks):
        ev[b][0].record()
        for i in range(n):
            fn(*arg_sets[(b * n + i) % len(arg_sets)])
        ev[b][1].record()
    torch.cuda.synchronize()
    return {"b2b_us": statistics.median(s.elapsed_time(e) * 1e3 / n for s, e in ev)}


def time_graph(fn, arg_sets, tvm_stream: bool, n: int = 20, reps: int = 20) -> dict:
    """Per-call time of ``n`` calls captured in one CUDA graph (median over ``reps`` replays). TVM
    kernels are captured through ``tvm_ffi.use_torch_stream`` (TVM launches on torch's capture stream)."""
    try:
        g = torch.cuda.CUDAGraph()
        ctx = torch.cuda.graph(g)
        if tvm_stream:
            import tvm_ffi
            ctx = tvm_ffi.use_torch_stream(ctx)
        with ctx:
            for i in range(n):
                fn(*arg_sets[i % len(arg_sets)])
        g.replay()
        torch.cuda.synchronize()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for s_, e_ in ev:
            s_.record()
            g.replay()
            e_.record()
        torch.cuda.synchronize()
        out = {"graph_us": statistics.median(s_.elapsed_time(e_) * 1e3 / n for s_, e_ in ev)}
        del g
        return out
    except Exception as e:  # noqa: BLE001
        torch.cuda.synchronize()
        return {"graph_error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


def max_err(out, ref) -> float:
    out = out.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).abs().max() / ref.abs().max()).item()


def make_weights(N, K, dtype, wdt, copies, seed):
    """``copies`` distinct weight sets (and fp8 scales), as a list of (w, scale)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    out = []
    for _ in range(copies):
        wf = torch.randn(N, K, device=DEVICE, generator=g).div_(math.sqrt(K))
        if wdt == FP8:
            scale = wf.abs().amax(dim=1).clamp_min(1e-12) / 448.0
            w = (wf / scale[:, None]).to(torch.float8_e4m3fn)
        else:
            scale, w = None, wf.to(getattr(torch, dtype))
        del wf
        out.append((w, scale))
    return out


def perf(row_bytes, t):
    tbps = row_bytes / (t["median_us"] * 1e-6) / 1e12
    return {"TBps": tbps, "pct_copy": 100 * tbps / COPY_TBPS}


def run_kiln(M, N, K, dtype, wdt, cfg, weights, x, ref, args, extra: bool = False) -> dict:
    """Build, check on weight copy 0 (NaN-poisoned output), time over all copies."""
    t0 = time.perf_counter()
    g = GemvSM90(M, N, K, dtype, wdt, None, cfg)
    tdt = getattr(torch, dtype)
    out = torch.full((M, N), float("nan"), dtype=tdt, device=DEVICE)
    w0, s0 = weights[0]
    g(x, w0, scale=s0, out=out)
    torch.cuda.synchronize()
    r = {"config": g.config.name(), "build_s": time.perf_counter() - t0, "max_err": max_err(out, ref)}
    r["status"] = "ok" if r["max_err"] <= (2e-2 if dtype == "float16" else 6e-2) else "WRONG"
    outs = [torch.empty((M, N), dtype=tdt, device=DEVICE) for _ in weights]
    targs = [g.tvm_args(x, w, s, out=o) for (w, s), o in zip(weights, outs)]
    r.update(time_calls(g._f, targs, args.warmup, args.reps))
    if extra:
        r.update(time_b2b(g._f, targs))
        r.update(time_graph(g._f, targs, tvm_stream=True))
    return r


def run_peers(M, N, K, dtype, wdt, weights, x, ref, args) -> dict:
    F = torch.nn.functional
    tdt = getattr(torch, dtype)
    peers = {}
    if wdt != FP8:
        fn = lambda w, s: F.linear(x, w)  # noqa: E731
        peers["torch_linear"] = (fn, "F.linear (cuBLAS)")
    else:
        fn = lambda w, s: (F.linear(x, w.to(tdt)) * s).to(tdt)  # noqa: E731
        peers["torch_dequant_linear"] = (fn, "F.linear(x, w8.to(dtype)) * scale")
    out = {}
    for name, (fn, what) in peers.items():
        try:
            err = max_err(fn(*weights[0]), ref)
            out[name] = {"what": what, "max_err": err, **time_calls(fn, weights, args.warmup, args.reps)}
            if M == 1:
                out[name].update(time_b2b(fn, weights))
                out[name].update(time_graph(fn, weights, tvm_stream=False))
        except Exception as e:  # noqa: BLE001
            out[name] = {"what": what, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    if wdt == FP8:
        out["torch_scaled_mm"] = scaled_mm_peer(M, N, dtype, weights, x, ref, args)
    return out


def scaled_mm_peer(M, N, dtype, weights, x, ref, args) -> dict:
    """``torch._scaled_mm``: X padded to 16 rows and quantized per row to e4m3 (outside the timing),
    per-channel weight scale (rowwise scaling; it may require a bf16 output, then the result is cast)."""
    tdt = getattr(torch, dtype)
    xp = torch.zeros(16, x.shape[1], dtype=torch.float32, device=DEVICE)
    xp[:M] = x.float()
    sa = (xp.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 448.0)
    xq = (xp / sa).to(torch.float8_e4m3fn)
    tried = []
    for out_dt, rowwise in ((tdt, True), (torch.bfloat16, True), (tdt, False)):
        try:
            if rowwise:
                fn = lambda w, s: torch._scaled_mm(xq, w.t(), scale_a=sa, scale_b=s.view(1, -1),  # noqa: E731
                                                   out_dtype=out_dt)
            else:
                one = torch.ones((), device=DEVICE)
                fn = lambda w, s: torch._scaled_mm(xq, w.t(), scale_a=one, scale_b=one,  # noqa: E731
                                                   out_dtype=out_dt)
            y = fn(*weights[0])
            err = max_err(y[:M].to(tdt), ref) if rowwise else float("nan")
            note = (f"M padded to 16, X quantized to e4m3 per row (outside timing), "
                    f"{'rowwise' if rowwise else 'tensorwise (scale not applied; timing only)'} scaling, "
                    f"out {str(out_dt).replace('torch.', '')}")
            r = {"what": "torch._scaled_mm", "note": note, "max_err": err,
                 **time_calls(fn, weights, args.warmup, args.reps)}
            if M == 1:
                r.update(time_b2b(fn, weights))
                r.update(time_graph(fn, weights, tvm_stream=False))
            return r
        except Exception as e:  # noqa: BLE001
            tried.append(f"{str(out_dt)} rowwise={rowwise}: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
    return {"what": "torch._scaled_mm", "error": " | ".join(tried)}


def sass_summary(src: str) -> dict:
    """nvcc (TVM's NVRTC flags: fast math, ptxas register-usage-level 10) + cuobjdump on a kernel:
    registers, spills, and how many 16-byte weight loads are issued before the first mma."""
    if not (shutil.which("nvcc") and shutil.which("cuobjdump")):
        return {"skipped": "nvcc/cuobjdump not found"}
    with tempfile.TemporaryDirectory() as d:
        cu, cub = os.path.join(d, "k.cu"), os.path.join(d, "k.cubin")
        with open(cu, "w") as f:
            f.write(src)
        r = subprocess.run(["nvcc", "--cubin", "-gencode", "arch=compute_90a,code=sm_90a", "--use_fast_math",
                            "-Xptxas", "-v,--register-usage-level=10", "-diag-suppress", "177,1046", "-o", cub, cu],
                           capture_output=True, text=True, timeout=120)
        if r.returncode:
            return {"nvcc_error": r.stderr[-800:]}
        sass = subprocess.run(["cuobjdump", "-sass", cub], capture_output=True, text=True, timeout=60).stdout
        lines = [ln for ln in sass.splitlines() if "LDG" in ln or "HMMA" in ln]
        first = next((i for i, ln in enumerate(lines) if "HMMA" in ln), len(lines))
        return {"ptxas": [ln.strip() for ln in r.stderr.splitlines() if "registers" in ln or "spill" in ln],
                "w_loads_before_first_mma": sum(".NA" in ln for ln in lines[:first]),
                "w_loads_total": sum(".NA" in ln for ln in lines),
                "LDGSTS": sass.count("LDGSTS"), "LDS.128": sass.count("LDS.128"),
                "HMMA": sum("HMMA" in ln for ln in lines), "LDL/STL": sass.count("LDL") + sass.count("STL")}


def copy_reference(nbytes, weights, args) -> dict:
    """A device copy moving ``nbytes`` in total (nbytes/2 read from a rotating weight copy, nbytes/2
    written), timed like the GEMV: the per-call ceiling at this size."""
    half = nbytes // 2 // 16 * 16
    srcs = [(w.view(torch.uint8).view(-1)[:half],) for w, _ in weights]
    dst = torch.empty(half, dtype=torch.uint8, device=DEVICE)
    fn = lambda src: dst.copy_(src)  # noqa: E731
    r = {"what": f"dst.copy_(src), {half} B read + {half} B written", **time_calls(fn, srcs, args.warmup, args.reps)}
    r.update(time_b2b(fn, srcs))
    r.update(time_graph(fn, srcs, tvm_stream=False))
    return r


def run_group(N, K, dtype, wdt, Ms, args, doc, log):
    """One (shape, dtype) group: weights allocated once, every M, the sweep at M = 1."""
    wbytes = N * K * (1 if wdt == FP8 else 2)
    copies = max(2, min(args.max_copies, math.ceil(4 * L2_BYTES / wbytes)))
    weights = make_weights(N, K, dtype, wdt, copies, seed=args.seed + N + 7 * K + (wdt == FP8))
    tdt = getattr(torch, dtype)
    for M in Ms:
        if time.perf_counter() - args.t0 > args.budget_s:
            doc["skipped"].append(f"M={M} N={N} K={K} {dtype}/{wdt}: time budget")
            continue
        g = torch.Generator(device=DEVICE).manual_seed(args.seed + M)
        x = torch.randn(M, K, device=DEVICE, generator=g).to(tdt)
        w0, s0 = weights[0]
        ref = gemv_reference(x, w0, s0).double()
        row = {"M": M, "N": N, "K": K, "dtype": dtype, "weight_dtype": wdt, "weight_copies": copies,
               "bytes": gemv_bytes(M, N, K, wdt)}
        row["floor_us"] = row["bytes"] / (COPY_TBPS * 1e12) * 1e6
        try:
            heur = select_gemv_config(M, N, K, dtype, wdt)
            row["kiln"] = run_kiln(M, N, K, dtype, wdt, heur, weights, x, ref, args, extra=M == 1)
            row["kiln"].update(perf(row["bytes"], row["kiln"]))
            row["sweep"] = []
            if M == 1 and wdt in ("float16", FP8) and dtype == "float16" and not args.no_sweep:
                for cfg in sweep_configs(heur, wdt == FP8):
                    if cfg.check(M, N, K, dtype, wdt):
                        continue
                    if time.perf_counter() - args.t0 > args.budget_s:
                        row["sweep"].append({"config": cfg.name(), "status": "skipped: time budget"})
                        continue
                    try:
                        r = run_kiln(M, N, K, dtype, wdt, cfg, weights, x, ref, args)
                        r.update(perf(row["bytes"], r))
                    except Exception as e:  # noqa: BLE001
                        r = {"config": cfg.name(), "status": f"error: {type(e).__name__}: {str(e)[:200]}"}
                    row["sweep"].append(r)
            if M > 1 and not args.no_sweep:                  # the other path (register loads / cp.async ring)
                alt = alt_config(heur, M, N, K, dtype, wdt)
                if alt is not None and time.perf_counter() - args.t0 <= args.budget_s:
                    try:
                        r = run_kiln(M, N, K, dtype, wdt, alt, weights, x, ref, args)
                        r.update(perf(row["bytes"], r))
                    except Exception as e:  # noqa: BLE001
                        r = {"config": alt.name(), "status": f"error: {type(e).__name__}: {str(e)[:200]}"}
                    row["sweep"].append(r)
            if args.sass and M == 1:
                row["sass"] = sass_summary(GemvSM90(M, N, K, dtype, wdt, None, heur).source)
            row["peers"] = run_peers(M, N, K, dtype, wdt, weights, x, ref, args)
            if M == 1:
                row["copy_same_bytes"] = copy_reference(row["bytes"], weights, args)
            for p in [row["kiln"], row.get("copy_same_bytes", {})] + list(row["peers"].values()):
                if "median_us" in p:
                    p.update(perf(row["bytes"], p))
                for key in ("b2b_us", "graph_us"):
                    if key in p:
                        p[key.replace("_us", "_pct_copy")] = 100 * row["bytes"] / (p[key] * 1e-6) / 1e12 / COPY_TBPS
        except Exception as e:  # noqa: BLE001
            log(traceback.format_exc())
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        doc["rows"].append(row)
        log(fmt_row(row))
        write(doc, args)
    del weights
    torch.cuda.empty_cache()


def _best(row):
    cands = [r for r in [row.get("kiln", {})] + row.get("sweep", []) if r.get("status") == "ok" and "median_us" in r]
    return min(cands, key=lambda r: r["median_us"]) if cands else {}


def _cell(p, nan=float("nan")) -> str:
    """``us (% of copy)`` per call, then ``g us (%)`` under a CUDA graph where measured."""
    if "median_us" not in p:
        return "ERROR" if p else "-"
    out = f"{p['median_us']:6.2f} ({p['pct_copy']:3.0f}%)"
    if "graph_us" in p:
        out += f" g{p['graph_us']:6.2f} ({p['graph_pct_copy']:3.0f}%)"
    return out


def fmt_row(r) -> str:
    nan = float("nan")
    wd = "fp8" if r["weight_dtype"] == FP8 else {"float16": "fp16", "bfloat16": "bf16"}[r["weight_dtype"]]
    ad = {"float16": "fp16", "bfloat16": "bf16"}[r["dtype"]]
    head = f"{r['M']:>2} {r['N']:>5}x{r['K']:<5} {ad}/{wd:<4} {r['floor_us']:6.2f}"
    if "error" in r:
        return head + f"  ERROR {r['error'][:120]}"
    k, b = r.get("kiln", {}), _best(r)
    peers = r.get("peers", {})
    cells = []
    for name in ("torch_linear", "torch_dequant_linear", "torch_scaled_mm"):
        p = peers.get(name)
        if p is not None:
            short = {"torch_linear": "cuBLAS", "torch_dequant_linear": "deq+lin", "torch_scaled_mm": "scaled_mm"}[name]
            cells.append(f"{short} {_cell(p)} err {p.get('max_err', nan):.0e}")
    kcell = f"{k.get('config', '-'):>18} {_cell(k)} err {k.get('max_err', nan):.0e} {k.get('status', '')}"
    best = f" | best {b['config']} {b['median_us']:.2f} ({b['pct_copy']:.0f}%)" if b and b is not k else ""
    copy = r.get("copy_same_bytes")
    tail = f" | copy {_cell(copy)}" if copy else ""
    return head + " | kiln " + kcell + best + " | " + " | ".join(cells) + tail


def fmt_table(rows, empty=None) -> str:
    hdr = (" M     NxK      dtype  floor | kiln heuristic: us per call (% of 4.26 TB/s copy) [g: per call in a "
           "CUDA graph of 20], max err | best swept config | peers | copy of the same bytes")
    lines = [hdr, "-" * len(hdr)] + [fmt_row(r) for r in rows]
    lines.append("us = median device time per call (CUDA events around each call, queue kept full); % = floor bytes "
                 "(W + X + Y + fp8 scale) / time / 4.26 TB/s; err = max|out - ref| / max|ref| vs fp32; weights "
                 "rotate over >= 4x L2 of distinct copies; scaled_mm: M padded to 16, X pre-quantized (untimed)")
    if empty:
        lines.append(f"empty kernel in the same scheme: {empty.get('median_us', float('nan')):.2f} us per call, "
                     f"{empty.get('b2b_us', float('nan')):.2f} us back-to-back, "
                     f"{empty.get('graph_us', float('nan')):.2f} us in a graph")
    return "\n".join(lines)


def write(doc, args):
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        doc["wall_s"] = time.perf_counter() - args.t0
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1, default=str)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON results path")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--max-copies", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=200.0, help="skip remaining rows / sweep configs after this")
    ap.add_argument("--no-sweep", action="store_true", help="time only the heuristic config")
    ap.add_argument("--sass", action="store_true", help="nvcc + cuobjdump summary of the M=1 kernels")
    ap.add_argument("--dry-run", action="store_true", help="build every kernel on the CPU, no GPU work")
    ap.add_argument("--table-only", default=None, help="print the table of an existing result JSON and exit")
    args = ap.parse_args(argv)
    if args.table_only:
        with open(args.table_only) as f:
            d = json.load(f)
            print(fmt_table(d["rows"], d.get("empty_kernel")))
        return 0
    if args.reps < 20:
        ap.error("--reps must be >= 20")
    args.t0 = time.perf_counter()
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.dry_run:
        n = 0
        for N, K in SHAPES:
            for dtype, wdt, Ms in KINDS:
                for M in Ms:
                    cfgs = [select_gemv_config(M, N, K, dtype, wdt)]
                    if M == 1 and dtype == "float16":
                        cfgs += [c for c in sweep_configs(cfgs[0], wdt == FP8) if c.check(M, N, K, dtype, wdt) is None]
                    for cfg in cfgs:
                        src = cuda_source(build_gemv_sm90(make_gemv_sm90(M, N, K, dtype, wdt, None, cfg)))
                        assert "mma.sync.aligned.m16n8k16" in src
                        n += 1
        log(f"built {n} kernels in {time.perf_counter() - args.t0:.1f} s")
        return 0
    if not torch.cuda.is_available():
        log("no CUDA device")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    import tvm
    from timing import env_info
    doc = {"schema": SCHEMA, "env": env_info("cuda"), "args": {k: v for k, v in vars(args).items() if k != "t0"},
           "ceilings": {"copy_TBps": COPY_TBPS}, "tvm_cuda": bool(tvm.cuda(0).exist), "rows": [], "skipped": []}
    empty = lambda: torch.cuda._sleep(0)  # noqa: E731
    doc["empty_kernel"] = {**time_calls(empty, [()], args.warmup, args.reps), **time_b2b(empty, [()]),
                           **time_graph(empty, [()], tvm_stream=False)}
    order = [(N, K, dt, wdt, Ms) for dt, wdt, Ms in KINDS for N, K in SHAPES]
    for N, K, dtype, wdt, Ms in order:
        run_group(N, K, dtype, wdt, Ms, args, doc, log)
    doc["table"] = fmt_table(doc["rows"], doc["empty_kernel"])
    write(doc, args)
    log(doc["table"])
    if doc["skipped"]:
        log("skipped: " + "; ".join(doc["skipped"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
