#!/usr/bin/env python3
"""kiln's sm_90a GEMM (TIRx, TMA + wgmma) vs cuBLAS (torch) at BERT-Large linear shapes and 8192^3.

For each shape (M, N, K), fp16 by default, C = A @ W^T with A [M,K], W [N,K] (torch Linear layout):
  * every valid kiln tile config is built, checked (NaN-poisoned output, fresh random inputs, relative
    Frobenius error vs an fp32 torch reference) and timed; the fastest is reported, with the
    default (tuned table, else heuristic: ``lookup_sm90_config``) beside it;
  * kiln with the fused ``bias + gelu_tanh`` epilogue (best plain config) is checked and timed;
  * torch: ``F.linear(a, w)`` and ``F.gelu(F.linear(a, w, b), approximate="tanh")`` (cuBLAS + a
    separate GELU kernel).
Timing: CUDA events around each call, calls enqueued back to back (no sync between them) after a
warm-up, input sets rotated (enough sets to exceed the 60 MB L2 where memory allows), median of
``--reps`` (>= 20). The host wall time per call is kept to flag host-bound rows. TFLOP/s counts
2*M*N*K (epilogue flops not counted). One table is printed last; the JSON (written after each shape)
goes to ``--out``.

With ``--fp8``: kiln's fp8 (e4m3) GEMM (``kiln.schedules.gemm_fp8_sm90``, bf16 out) per scale mode at 8192^3
and the M >= 1024 BERT-Large / Llama-3-8B shapes, against ``torch._scaled_mm`` (per-tensor and row-wise scales,
``use_fast_accum`` True and False) and, for the DeepSeek block scales (A 1x128, B 128x128), against torch's
dequantise + bf16 matmul (and ``_scaled_mm``'s block-wise path where this torch/cuBLAS has it). kiln's kernel
without promotion is compared with the fast-accumulation peer, the promoting one with the default peer.

Run on the GPU machine from the repository root:
    source .device/setup-tvm .device && python3 benchmarks/gemm.py --out $OUT/gemm.json
    source .device/setup-tvm .device && python3 benchmarks/gemm.py --fp8 --out $OUT/gemm_fp8.json
CPU-only smoke test (builds the kernels, no timing): ``python3 benchmarks/gemm.py [--fp8] --dry-run``;
table of a result file: ``python3 benchmarks/gemm.py --table-only benchmarks/results/<dir>/gemm.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
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

from kiln.schedules.configs import (SM90_GEMM_CONFIGS, SM90_PERSISTENT_CONFIGS, lookup_sm90_config,  # noqa: E402
                                    sm90_candidates)
from kiln.schedules.gemm_sm90 import Epilogue, GemmSM90, torch_reference  # noqa: E402
from kiln.tune.device_timing import time_group  # noqa: E402

SCHEMA = "kiln-gemm-bench/1"
BERT_NK = [(1024, 1024), (3072, 1024), (4096, 1024), (1024, 4096)]
SHAPES = [(8192, 8192, 8192)] + [(M, N, K) for M in (128, 1024, 4096) for (N, K) in BERT_NK]
DEVICE = "cuda"
COPY_TBPS = 4.26          # measured device-to-device copy bandwidth of the H200 (h200-anchors.json)
CUBLAS_TFLOPS = 748.7     # measured cuBLAS fp16 8192^3 on the same H200: the practical matrix ceiling
BIAS_GELU = Epilogue(("bias", "gelu_tanh"))


def floors(M: int, N: int, K: int, elem: int = 2) -> dict:
    flops = 2 * M * N * K
    nbytes = elem * (M * K + N * K + M * N)
    t_c, t_m = flops / (CUBLAS_TFLOPS * 1e12), nbytes / (COPY_TBPS * 1e12)
    return {"flops": flops, "bytes": nbytes, "t_compute_us": t_c * 1e6, "t_memory_us": t_m * 1e6,
            "floor_us": max(t_c, t_m) * 1e6, "bound": "compute" if t_c >= t_m else "memory"}


def rel_err(out, ref) -> float:
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def make_sets(M, N, K, dtype, n_sets, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        a = torch.randn(M, K, device=DEVICE, generator=g).to(dtype)
        w = (torch.randn(N, K, device=DEVICE, generator=g) / math.sqrt(K)).to(dtype)
        b = torch.randn(N, device=DEVICE, generator=g).to(dtype)
        sets.append((a, w, b))
    return sets


def kiln_check(g: GemmSM90, sets, epi: Epilogue, refs) -> tuple[dict, list]:
    """Check ``g`` on the first two input sets (NaN-poisoned outputs); return the row and the TVM
    bound launchers (one per input set) for timing through ``_launch``."""
    row = {"config": g.config.name(), "epilogue": epi.name()}
    errs = []
    for (a, w, b), ref in zip(sets[:2], refs):
        out = torch.full((g.M, g.N), float("nan"), dtype=a.dtype, device=DEVICE)
        g(a, w, bias=b if epi.has_bias else None, out=out)
        torch.cuda.synchronize()
        errs.append(rel_err(out, ref))
    row["rel_err"] = max(errs) if not any(math.isnan(e) for e in errs) else float("nan")
    row["status"] = "ok" if row["rel_err"] <= 1e-2 else "WRONG"
    outs = [torch.empty((g.M, g.N), dtype=a.dtype, device=DEVICE) for a, _, _ in sets]
    targs = [(g.bind(a, w, b if epi.has_bias else None, out=o),) for (a, w, b), o in zip(sets, outs)]
    return row, targs


def _launch(bound):
    bound()


def sass_summary(src: str) -> dict:
    """nvcc + cuobjdump on the generated source (where the tools exist): instruction counts."""
    if not (shutil.which("nvcc") and shutil.which("cuobjdump")):
        return {"skipped": "nvcc/cuobjdump not found"}
    with tempfile.TemporaryDirectory() as d:
        cu, cub = os.path.join(d, "k.cu"), os.path.join(d, "k.cubin")
        open(cu, "w").write(src)
        r = subprocess.run(["nvcc", "--cubin", "-gencode", "arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
                            "-diag-suppress", "177,1046", "-o", cub, cu], capture_output=True, text=True, timeout=240)
        if r.returncode:
            return {"nvcc_error": r.stderr[-1500:]}
        sass = subprocess.run(["cuobjdump", "-sass", cub], capture_output=True, text=True, timeout=120).stdout
        info = {k: sass.count(k) for k in ("HGMMA", "UTMALDG", "USETMAXREG", "SYNCS", "LDL", "STL", "STG")}
        info["ptxas"] = [ln.strip() for ln in r.stderr.splitlines() if "registers" in ln or "spill" in ln]
        return info


def run_shape(M, N, K, dtype, args, log) -> dict:
    tdt = getattr(torch, dtype)
    row = {"M": M, "N": N, "K": K, "dtype": dtype, **floors(M, N, K), "kiln": [], "notes": []}
    set_bytes = 2 * (M * K + N * K + M * N)
    n_sets = int(min(args.max_sets, max(2, math.ceil(180e6 / set_bytes))))
    sets = make_sets(M, N, K, tdt, n_sets, seed=args.seed + M + 3 * N + 7 * K)
    refs_plain = [torch_reference(a, w) for a, w, _ in sets[:2]]
    refs_epi = [torch_reference(a, w, BIAS_GELU, bias=b) for a, w, b in sets[:2]]
    flops = row["flops"]
    tf = lambda us: flops / (us * 1e-6) / 1e12  # noqa: E731

    F = torch.nn.functional
    torch_plain = lambda a, w, b: F.linear(a, w)  # noqa: E731
    torch_epi = lambda a, w, b: F.gelu(F.linear(a, w, b), approximate="tanh")  # noqa: E731
    row["torch_linear"] = {"rel_err": rel_err(torch_plain(*sets[0]), refs_plain[0])}
    row["torch_linear_bias_gelu"] = {"rel_err": rel_err(torch_epi(*sets[0]), refs_epi[0])}

    # 1. sweep: every valid config, checked, then timed alone (sweep_reps)
    heur, source = lookup_sm90_config(M, N, K, dtype)
    row["heuristic_config"], row["heuristic_source"] = heur.name(), source
    cfgs = sm90_candidates(M, N, K, dtype)
    if args.configs == "heuristic":
        cfgs = [heur]
    best = None                               # (median_us, GemmSM90, targs)
    kept = {}
    for cfg in cfgs:
        if time.perf_counter() - args.t0 > args.budget_s and cfg != heur and best is not None:
            row["notes"].append(f"budget: skipped config {cfg.name()}")
            continue
        t0 = time.perf_counter()
        try:
            g = GemmSM90(M, N, K, dtype, None, cfg)
            build_s = time.perf_counter() - t0
            r, targs = kiln_check(g, sets, Epilogue(()), refs_plain)
            r["build_s"] = build_s
            if r["status"] == "ok":
                r.update(time_group([(cfg.name(), _launch, targs)], args.warmup, args.sweep_reps)[cfg.name()])
                r["tflops"] = tf(r["median_us"])
                kept[cfg] = (g, targs)
                if best is None or r["median_us"] < best[0]:
                    best = (r["median_us"], g, targs)
        except Exception as e:  # noqa: BLE001
            r = {"config": cfg.name(), "status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            log(traceback.format_exc())
        row["kiln"].append(r)
        log(f"  {cfg.name():24s} {r.get('status')} {r.get('median_us', float('nan')):9.2f} us "
            f"{r.get('tflops', float('nan')):7.1f} TF/s err {r.get('rel_err', float('nan')):.2e}")
    if best is None:
        return row

    # 2. final, interleaved: kiln best (+ heuristic if different), kiln best + fused bias/gelu, torch x2
    _, gb, targs_b = best
    variants = [("kiln", _launch, targs_b)]
    if heur in kept and heur != gb.config:
        variants.append(("kiln_heuristic", _launch, kept[heur][1]))
    try:
        ge = GemmSM90(M, N, K, dtype, BIAS_GELU, gb.config)
        re_, targs_e = kiln_check(ge, sets, BIAS_GELU, refs_epi)
        if re_["status"] == "ok":
            variants.append(("kiln_bias_gelu", _launch, targs_e))
    except Exception as e:  # noqa: BLE001
        re_ = {"config": gb.config.name(), "status": f"error: {type(e).__name__}: {str(e)[:200]}"}
        log(traceback.format_exc())
    variants += [("torch_linear", torch_plain, sets), ("torch_linear_bias_gelu", torch_epi, sets)]
    times = time_group(variants, args.warmup, args.reps)
    row["kiln_best"] = {"config": gb.config.name(), "rel_err": next(x["rel_err"] for x in row["kiln"]
                                                                     if x["config"] == gb.config.name())}
    row["kiln_bias_gelu"] = re_
    for name, dst in (("kiln", row["kiln_best"]), ("kiln_bias_gelu", re_), ("torch_linear", row["torch_linear"]),
                      ("torch_linear_bias_gelu", row["torch_linear_bias_gelu"])):
        if name in times:
            dst.update(times[name])
            dst["tflops"] = tf(times[name]["median_us"])
    if "kiln_heuristic" in times:
        row["kiln_heuristic"] = {"config": heur.name(), **times["kiln_heuristic"],
                                 "tflops": tf(times["kiln_heuristic"]["median_us"])}
    if args.sass and (M, N, K) == (8192, 8192, 8192):
        row["sass"] = sass_summary(gb.source)
    return row


def fmt_table(rows) -> str:
    """One table: kiln's best config vs cuBLAS (plain) and vs linear+bias+gelu (fused), device time per call."""
    hdr = (f"{'shape MxNxK':>16} {'floor us':>8} {'kiln cfg':>22} {'kiln TF/s':>9} {'heur TF/s':>9} "
           f"{'cuBLAS TF/s':>11} {'ratio':>6} {'kiln+b+gelu':>11} {'torch+b+gelu':>12} {'ratio':>6} "
           f"{'host us kiln/torch':>18} {'max rel err':>11}")
    lines = [hdr, "-" * len(hdr)]
    nan = float("nan")
    for r in rows:
        if "error" in r:
            lines.append(f"{r['M']:>5}x{r['N']:>5}x{r['K']:>4}  ERROR {r['error'][:100]}")
            continue
        b, e = r.get("kiln_best") or {}, r.get("kiln_bias_gelu") or {}
        tl, te = r.get("torch_linear", {}), r.get("torch_linear_bias_gelu", {})
        kt, ct = b.get("tflops", nan), tl.get("tflops", nan)
        ket, cet = e.get("tflops", nan), te.get("tflops", nan)
        ht = (r.get("kiln_heuristic") or b).get("tflops", nan)
        errs = [x.get("rel_err", nan) for x in (r.get("kiln") or []) + [e] if x.get("status") == "ok"]
        bad = [x for x in (r.get("kiln") or []) + [e] if x and x.get("status") != "ok"]
        err = max(errs) if errs else nan
        host = f"{b.get('host_us_per_call', nan):.1f}/{tl.get('host_us_per_call', nan):.1f}"
        starved = " *" if max(b.get("max_gap_us", 0), tl.get("max_gap_us", 0)) > 5.0 else ""
        lines.append(f"{r['M']:>5}x{r['N']:>5}x{r['K']:>4} {r['floor_us']:8.2f} {b.get('config', '-'):>22} {kt:9.1f} "
                     f"{ht:9.1f} {ct:11.1f} {kt / ct:6.2f} {ket:11.1f} {cet:12.1f} {ket / cet:6.2f} {host:>18} "
                     f"{err:11.2e}" + (f"  FAILED: {len(bad)}" if bad else "") + starved)
    lines.append("TF/s = 2MNK / median device time per call (CUDA events, queue kept full, variants interleaved); "
                 "heur = kiln's heuristic config; * = an idle gap > 5 us between timed calls (the queue ran dry; "
                 "~2.4 us is the normal launch-to-launch gap)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ fp8 (e4m3)
#: The H200's dense fp8 tensor-core peak (spec, 1979 TFLOP/s; ``_scaled_mm`` measured 1335 at 8192^3 on the same
#: H200, h200-anchors.json): the FLOP floor uses the spec, the "practical" column the measured peer.
FP8_PEAK_TFLOPS = 1979.0
FP8_SCALED_MM_TFLOPS = 1335.3
LLAMA_NK = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]     # Llama-3-8B qkv, o, gate_up, down
FP8_SHAPES = [(8192, 8192, 8192)] + [(M, N, K) for M in (1024, 4096) for (N, K) in BERT_NK + LLAMA_NK]
#: bench mode -> (scale mode of A, of B)
FP8_MODES = {"tensor": ("tensor", "tensor"), "rowwise": ("row", "row"), "block": ("group", "block")}


def fp8_floors(M: int, N: int, K: int) -> dict:
    """FLOP floor at the fp8 spec peak, the time at ``_scaled_mm``'s measured 8192^3 rate, and the byte floor
    (e4m3 A and B once, bf16 C) at the copy bandwidth."""
    flops = 2 * M * N * K
    nbytes = M * K + N * K + 2 * M * N
    t_c, t_m = flops / (FP8_PEAK_TFLOPS * 1e12), nbytes / (COPY_TBPS * 1e12)
    return {"flops": flops, "bytes": nbytes, "t_compute_us": t_c * 1e6, "t_memory_us": t_m * 1e6,
            "t_practical_us": flops / (FP8_SCALED_MM_TFLOPS * 1e12) * 1e6,
            "floor_us": max(t_c, t_m) * 1e6, "bound": "compute" if t_c >= t_m else "memory"}


def make_fp8_sets(M, N, K, modes, n_sets, seed):
    """Input sets ``(a, b, sa, sb)``: e4m3 values of N(0, 2), scales in [0.25, 1.25) (B's over sqrt(K))."""
    from kiln.schedules.gemm_fp8_sm90 import fp8_scale_shape
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    ma, mb = modes
    sets = []
    for _ in range(n_sets):
        a = (torch.randn(M, K, device=DEVICE, generator=g) * 2).to(torch.float8_e4m3fn)
        b = (torch.randn(N, K, device=DEVICE, generator=g) * 2).to(torch.float8_e4m3fn)
        sa = torch.rand(fp8_scale_shape(ma, M, K, False), device=DEVICE, generator=g) + 0.25
        sb = (torch.rand(fp8_scale_shape(mb, N, K, True), device=DEVICE, generator=g) + 0.25) / math.sqrt(K)
        sets.append((a, b, sa, sb))
    return sets


def _fp8_torch_peers(modes, M, N, K) -> list:
    """``(name, fn(a, b, sa, sb))`` of the torch peers of a scale mode."""
    from kiln.schedules.gemm_fp8_sm90 import dequantize_fp8
    bf16 = torch.bfloat16
    if modes == ("tensor", "tensor"):
        return [(f"torch_scaled_mm{'_fast' if fast else ''}",
                 lambda a, b, sa, sb, fast=fast: torch._scaled_mm(a, b.t(), sa.reshape(()), sb.reshape(()),
                                                                   out_dtype=bf16, use_fast_accum=fast))
                for fast in (True, False)]
    if modes == ("row", "row"):
        return [(f"torch_scaled_mm{'_fast' if fast else ''}",
                 lambda a, b, sa, sb, fast=fast: torch._scaled_mm(a, b.t(), sa.reshape(M, 1), sb.reshape(1, N),
                                                                   out_dtype=bf16, use_fast_accum=fast))
                for fast in (True, False)]
    # block: dequantise both operands to bf16, then cuBLAS; and _scaled_mm's block-wise path (cuBLASLt >= 12.9:
    # scale_a [M, K/128] outer-dim-major, scale_b [K/128, N/128])
    return [("torch_dequant_matmul", lambda a, b, sa, sb: dequantize_fp8(a, sa, modes[0], False).to(bf16)
             @ dequantize_fp8(b, sb, modes[1], True).to(bf16).t()),
            ("torch_scaled_mm_blockwise", lambda a, b, sa, sb: torch._scaled_mm(
                a, b.t(), sa.t().contiguous().t(), sb.t(), out_dtype=bf16))]


def run_fp8_shape(M, N, K, mode, args, log) -> dict:
    """One shape and scale mode: kiln's heuristic config (and the promoting one for tensor/row scales, every
    candidate with ``--fp8-configs all``), checked against the fp32 dequantised reference, timed interleaved with
    the torch peers."""
    from kiln.schedules.configs import fp8_candidates, select_fp8_config
    from kiln.schedules.gemm_fp8_sm90 import GemmFp8SM90, fp8_reference
    modes = FP8_MODES[mode]
    row = {"M": M, "N": N, "K": K, "fp8_mode": mode, "scales": list(modes), **fp8_floors(M, N, K), "kiln": [],
           "notes": []}
    set_bytes = M * K + N * K + 2 * M * N
    n_sets = int(min(args.max_sets, max(2, math.ceil(180e6 / set_bytes))))
    sets = make_fp8_sets(M, N, K, modes, n_sets, seed=args.seed + M + 3 * N + 7 * K)
    refs = [fp8_reference(*st, *modes) for st in sets[:2]]
    tf = lambda us: row["flops"] / (us * 1e-6) / 1e12  # noqa: E731
    cfgs = [select_fp8_config(M, N, K, "bfloat16", *modes)]
    if modes[0] != "group":
        cfgs.append(select_fp8_config(M, N, K, "bfloat16", *modes, promote=True))
    row["heuristic_config"] = cfgs[0].name()
    if args.fp8_configs == "all":
        cfgs += [c for c in fp8_candidates(M, N, K, "bfloat16", *modes) if c not in cfgs]
    variants = []
    for cfg in cfgs:
        r = {"config": cfg.name()}
        try:
            t0 = time.perf_counter()
            g = GemmFp8SM90(M, N, K, "bfloat16", *modes, None, cfg)
            r["build_s"] = time.perf_counter() - t0
            errs = []
            for st, ref in zip(sets[:2], refs):
                out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=DEVICE)
                g(*st, out=out)
                torch.cuda.synchronize()
                errs.append(rel_err(out, ref))
            r["rel_err"] = max(errs)
            r["status"] = "ok" if r["rel_err"] <= 2e-2 else "WRONG"
            if r["status"] == "ok":
                outs = [torch.empty((M, N), dtype=torch.bfloat16, device=DEVICE) for _ in sets]
                variants.append((cfg.name(), _launch, [(g.bind(*st, out=o),) for st, o in zip(sets, outs)]))
        except Exception as e:  # noqa: BLE001
            r["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            log(traceback.format_exc())
        row["kiln"].append(r)
    for name, fn in _fp8_torch_peers(modes, M, N, K):
        try:
            row[name] = {"rel_err": rel_err(fn(*sets[0]), refs[0])}
            variants.append((name, fn, sets))
        except Exception as e:  # noqa: BLE001 - e.g. no block-wise _scaled_mm in this torch / cuBLAS
            row[name] = {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    times = time_group(variants, args.warmup, args.reps) if variants else {}
    for r in row["kiln"]:
        if r["config"] in times:
            r.update(times[r["config"]])
            r["tflops"] = tf(r["median_us"])
    for name, _ in _fp8_torch_peers(modes, M, N, K):
        if name in times:
            row[name].update(times[name])
            row[name]["tflops"] = tf(times[name]["median_us"])
    for r in row["kiln"]:
        log(f"  {mode:8s} {r['config']:30s} {r.get('status')} {r.get('tflops', float('nan')):7.1f} TF/s "
            f"err {r.get('rel_err', float('nan')):.2e}")
    return row


def fmt_fp8_table(rows) -> str:
    """kiln fp8 per scale mode: the fast (non-promoting) and promoting kernels vs their torch peers."""
    nan = float("nan")
    hdr = (f"{'shape MxNxK':>16} {'mode':>8} {'floor us':>8} {'kiln cfg':>30} {'kiln TF/s':>9} {'peer':>26} "
           f"{'peer TF/s':>9} {'ratio':>6} {'kiln pr TF/s':>12} {'peer TF/s':>9} {'ratio':>6} {'max rel err':>11}")
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        shape = f"{r['M']:>5}x{r['N']:>5}x{r['K']:>4}"
        if "error" in r:
            lines.append(f"{shape} {r.get('fp8_mode', '?'):>8} ERROR {r['error'][:100]}")
            continue
        ok = [k for k in r["kiln"] if "tflops" in k]
        fast = max((k for k in ok if not k["config"].endswith("_pr")), key=lambda k: k["tflops"], default={})
        prom = max((k for k in ok if k["config"].endswith("_pr")), key=lambda k: k["tflops"], default={})
        if r["fp8_mode"] == "block":
            peer_f = "torch_scaled_mm_blockwise" if "tflops" in r.get("torch_scaled_mm_blockwise", {}) \
                else "torch_dequant_matmul"
            fast, peer_p = prom, None
        else:
            peer_f, peer_p = "torch_scaled_mm_fast", "torch_scaled_mm"
        pf = r.get(peer_f, {}).get("tflops", nan)
        pp = r.get(peer_p, {}).get("tflops", nan) if peer_p else nan
        kp = prom.get("tflops", nan) if peer_p else nan
        errs = [k.get("rel_err", nan) for k in r["kiln"] if "rel_err" in k]
        bad = [k for k in r["kiln"] if k.get("status") != "ok"]
        lines.append(f"{shape} {r['fp8_mode']:>8} {r['floor_us']:8.2f} {fast.get('config', '-'):>30} "
                     f"{fast.get('tflops', nan):9.1f} {peer_f:>26} {pf:9.1f} {fast.get('tflops', nan) / pf:6.2f} "
                     f"{kp:12.1f} {pp:9.1f} {kp / pp:6.2f} {max(errs) if errs else nan:11.2e}"
                     + (f"  FAILED: {len(bad)}" if bad else ""))
    lines.append("TF/s = 2MNK / median device time per call (CUDA events, variants interleaved); tensor/rowwise: kiln "
                 "without promotion vs _scaled_mm(use_fast_accum=True), kiln promoting (pr) vs _scaled_mm default; "
                 "block: kiln (always promoting) vs _scaled_mm block-wise where available, else dequant + matmul")
    return "\n".join(lines)


def fp8_main(args) -> int:
    """``--fp8``: build (``--dry-run``) or check and time kiln's fp8 GEMM per shape and scale mode."""
    log = lambda s: print(s, flush=True)  # noqa: E731
    shapes = FP8_SHAPES if not args.shapes else [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    modes = [m for m in args.fp8_modes.split(",") if m]
    unknown = [m for m in modes if m not in FP8_MODES]
    if unknown:
        log(f"unknown --fp8-modes {unknown}; known: {', '.join(FP8_MODES)}")
        return 2
    if args.dry_run:
        from kiln.schedules.configs import select_fp8_config
        from kiln.schedules.gemm_fp8_sm90 import make_gemm_fp8_sm90
        from kiln.schedules.gemm_sm90 import build_gemm_sm90, cuda_source
        for M, N, K in shapes:
            built = []
            for m in modes:
                ma, mb = FP8_MODES[m]
                for promote in (False, True) if ma != "group" else (True,):
                    cfg = select_fp8_config(M, N, K, "bfloat16", ma, mb, promote)
                    src = cuda_source(build_gemm_sm90(make_gemm_fp8_sm90(M, N, K, "bfloat16", ma, mb, None, cfg)))
                    assert f"m64n{cfg.block_n}k32.f32.e4m3.e4m3" in src and "cp.async.bulk.tensor" in src
                    built.append(f"{ma} x {mb}: {cfg.name()}")
            log(f"{M}x{N}x{K}: built fp8 kernels ({'; '.join(built)})")
        return 0
    if not torch.cuda.is_available():
        log("no CUDA device")
        return 2
    if args.reps < 20:
        log("--reps must be >= 20")
        return 2
    import tvm
    from timing import env_info
    t0 = time.perf_counter()
    doc = {"schema": SCHEMA, "kind": "fp8", "env": env_info("cuda"),
           "args": {k: v for k, v in vars(args).items()},
           "ceilings": {"copy_TBps": COPY_TBPS, "fp8_peak_TFLOPs": FP8_PEAK_TFLOPS,
                        "scaled_mm_fp8_8192_TFLOPs": FP8_SCALED_MM_TFLOPS},
           "tvm_cuda": bool(tvm.cuda(0).exist), "rows": []}
    for M, N, K in shapes:
        for m in modes:
            log(f"== fp8 {m} {M}x{N}x{K}")
            if time.perf_counter() - t0 > args.budget_s:
                doc["rows"].append({"M": M, "N": N, "K": K, "fp8_mode": m, **fp8_floors(M, N, K),
                                    "error": "skipped: --budget-s spent"})
                continue
            try:
                row = run_fp8_shape(M, N, K, m, args, log)
            except Exception as e:  # noqa: BLE001
                log(traceback.format_exc())
                row = {"M": M, "N": N, "K": K, "fp8_mode": m, **fp8_floors(M, N, K),
                       "error": f"{type(e).__name__}: {str(e)[:300]}"}
            doc["rows"].append(row)
            doc["wall_s"] = time.perf_counter() - t0
            if args.out:
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "w") as f:
                    json.dump(doc, f, indent=1, default=str)
    doc["table"] = fmt_fp8_table(doc["rows"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1, default=str)
    log(doc["table"])
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON results path")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--configs", default="all", choices=["all", "heuristic"])
    ap.add_argument("--shapes", default=None, help="comma list MxNxK (default: BERT-Large set + 8192^3)")
    ap.add_argument("--reps", type=int, default=50, help="timed calls per variant in the final comparison")
    ap.add_argument("--sweep-reps", type=int, default=30, help="timed calls per config in the sweep")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--max-sets", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=270.0, help="stop trying extra configs after this")
    ap.add_argument("--sass", action="store_true", help="nvcc+cuobjdump summary of the 8192^3 kernel")
    ap.add_argument("--dry-run", action="store_true", help="build every kernel on the CPU, no GPU work")
    ap.add_argument("--table-only", default=None, help="print the table of an existing result JSON and exit")
    ap.add_argument("--fp8", action="store_true", help="the fp8 (e4m3) GEMM per scale mode instead (see above)")
    ap.add_argument("--fp8-modes", default=",".join(FP8_MODES), help=f"comma list of {', '.join(FP8_MODES)}")
    ap.add_argument("--fp8-configs", default="heuristic", choices=["heuristic", "all"],
                    help="fp8: the heuristic's config (+ its promoting variant), or every candidate (slow: ~2 s "
                         "of build per config)")
    args = ap.parse_args(argv)
    if args.table_only:
        with open(args.table_only) as f:
            rows = json.load(f)["rows"]
        print(fmt_fp8_table(rows) if rows and "fp8_mode" in rows[0] else fmt_table(rows))
        return 0
    if args.fp8:
        return fp8_main(args)
    args.t0 = time.perf_counter()
    shapes = SHAPES if not args.shapes else [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    if args.reps < 20 or args.sweep_reps < 20:
        ap.error("--reps and --sweep-reps must be >= 20")
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.dry_run:
        from kiln.schedules.gemm_sm90 import build_gemm_sm90, cuda_source, make_gemm_sm90
        for M, N, K in shapes:
            for cfg in SM90_GEMM_CONFIGS + SM90_PERSISTENT_CONFIGS:
                if cfg.check(M, N, K, args.dtype) is None:
                    for epi in (None, BIAS_GELU):
                        src = cuda_source(build_gemm_sm90(make_gemm_sm90(M, N, K, args.dtype, epi, cfg)))
                        assert "wgmma.mma_async" in src and "cp.async.bulk.tensor" in src
            log(f"{M}x{N}x{K}: built {args.dtype} kernels for every valid config")
        return 0
    if not torch.cuda.is_available():
        log("no CUDA device")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    import tvm
    from timing import env_info
    doc = {"schema": SCHEMA, "env": env_info("cuda"), "args": {k: v for k, v in vars(args).items() if k != "t0"},
           "ceilings": {"copy_TBps": COPY_TBPS, "cublas_fp16_8192_TFLOPs": CUBLAS_TFLOPS},
           "tvm_cuda": bool(tvm.cuda(0).exist), "rows": []}
    for M, N, K in shapes:
        log(f"== {M}x{N}x{K} {args.dtype}")
        try:
            row = run_shape(M, N, K, args.dtype, args, log)
        except Exception as e:  # noqa: BLE001
            log(traceback.format_exc())
            row = {"M": M, "N": N, "K": K, **floors(M, N, K), "error": f"{type(e).__name__}: {str(e)[:300]}"}
        doc["rows"].append(row)
        doc["wall_s"] = time.perf_counter() - args.t0
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(doc, f, indent=1, default=str)
    table = fmt_table(doc["rows"])
    doc["table"] = table
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1, default=str)
    log(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
