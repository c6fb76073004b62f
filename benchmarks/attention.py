#!/usr/bin/env python3
"""kiln's sm_90a flash attention (TIRx, TMA + wgmma) vs torch SDPA (flash and cuDNN backends).

Points (fp16, H = 16): seq {512 (B 16), 2048 (B 4), 8192 (B 1)} x D {64, 128} x {full, causal}, and the
BERT case: B {1, 8, 32}, S = 128, D = 64, non-causal with a key-padding bias ``kpad[B, S]`` (25% of the
keys of each batch masked with -inf). kiln takes BSHD tensors; torch takes its preferred contiguous
BHSD copies (made once, not timed). For the BERT points torch's flash backend cannot take a mask: its
column is flash *without* the mask (same work, different semantics), and ``sdpa`` is torch's default
backend choice *with* the mask (reported beside it).

For each point every candidate kiln config (``--configs all``) is built (CUDA compiled in parallel
worker processes, ``--workers``), checked on fresh random inputs with a NaN-poisoned output against an
fp32 reference (max |err| / max |ref|), and timed; the fastest checked config is reported, the
heuristic's choice beside it. Timing: ``kiln.tune.device_timing.time_group`` (CUDA events per call,
queue kept full behind a sleep kernel, variants interleaved, median of ``--reps``). TFLOP/s counts
``4*B*H*Sq*Skv*D``, halved for causal. One table is printed last; ``--out`` writes the JSON.

Run on the GPU machine from the repository root (< 4 min):
    source .device/setup-tvm .device && python3 benchmarks/attention.py --out $OUT/attention.json
Quick device check of one kernel (used first, under ``timeout``): ``--smoke``.
CPU-only: ``--dry-run`` builds every kernel's CUDA source; ``--table-only FILE.json`` reprints a table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from kiln.schedules.attention_sm90 import (SM90_ATTENTION_CONFIGS, AttentionConfig, FlashAttentionSM90,  # noqa: E402
                                           attention_flops, attention_reference, select_attention_config)

SCHEMA = "kiln-attention-bench/1"
H = 16
LONG_POINTS = [(B, S, D, causal) for B, S in ((16, 512), (4, 2048), (1, 8192)) for D in (64, 128)
               for causal in (False, True)]
BERT_POINTS = [(B, 128, 64, False) for B in (1, 8, 32)]
PEAK_TFLOPS = 750.0       # practical dense fp16 matrix ceiling of the H200 (cuBLAS 8192^3: 749)
#: extra configs tried per head dim besides SM90_ATTENTION_CONFIGS. Dropped after the first sweep
#: (2026-11-21, all slower at every point): no pingpong with 2 consumers (-1..-20%), no overlap
#: (-3..-19%), 3 stages (= 2 stages within 1%).
EXTRA_CONFIGS = {64: (AttentionConfig(128, 192, 2, 2),), 128: ()}
#: persistent variants (grid = #SMs), tried unless --persistent no
PERSISTENT_CONFIGS = {64: (AttentionConfig(128, 128, 2, 2, persistent=True),
                           AttentionConfig(192, 128, 2, 3, pingpong=False, persistent=True),
                           AttentionConfig(192, 128, 2, 3, persistent=True)),
                      128: (AttentionConfig(128, 128, 2, 2, persistent=True),)}


def problem(B, S, D, causal, kpad):
    return (B, S, S, H, H, D, "float16", causal, kpad)


def candidates(B, S, D, causal, kpad, mode, persistent=True):
    heur = select_attention_config(*problem(B, S, D, causal, kpad))
    if mode == "heuristic":
        return heur, [heur]
    pool = SM90_ATTENTION_CONFIGS[D] + EXTRA_CONFIGS[D] + (PERSISTENT_CONFIGS[D] if persistent else ())
    cfgs = [heur] + [c for c in pool if c != heur]
    return heur, [c for c in cfgs if c.check(D, "float16") is None]


# --------------------------------------------------------------------------- parallel CUDA compile
def _compile_worker(job):
    """In a worker process: build the PrimFunc, take its CUDA source, compile it to a cubin (NVRTC,
    the same compiler TVM's load-time JIT uses). Returns (sha256 of the source, cubin or error)."""
    prob, cfg_dict = job
    try:
        from tvm.support.nvcc import compile_cuda

        from kiln.schedules.attention_sm90 import (build_flash_attention_sm90, cuda_source,
                                                   make_flash_attention_sm90)
        func = make_flash_attention_sm90(*prob, config=AttentionConfig(**cfg_dict))
        src = cuda_source(build_flash_attention_sm90(func))
        cubin = compile_cuda(src, target_format="cubin", arch="sm_90a", compiler="nvrtc")
        return hashlib.sha256(src.encode()).hexdigest(), bytes(cubin), None
    except Exception as e:  # noqa: BLE001
        return None, None, f"{type(e).__name__}: {str(e)[:300]}"


def precompile(jobs, workers, log):
    """Compile every kernel's CUDA in parallel and make TVM's JIT callback serve them from memory."""
    import multiprocessing as mp

    import tvm_ffi
    from tvm.support import nvcc
    cache, t0 = {}, time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        for key, cubin, err in pool.map(_compile_worker, jobs):
            if err:
                log(f"  precompile error: {err}")
            else:
                cache[key] = cubin
    log(f"precompiled {len(cache)}/{len(jobs)} kernels in {time.perf_counter() - t0:.1f} s ({workers} workers)")
    fallback = nvcc.tvm_callback_cuda_compile
    stats = {"hits": 0, "misses": 0}

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _cached_compile(code, *rest):
        hit = cache.get(hashlib.sha256(code.encode()).hexdigest())
        stats["hits" if hit is not None else "misses"] += 1
        return bytearray(hit) if hit is not None else fallback(code, *rest)

    return stats


# --------------------------------------------------------------------------- inputs, checks, timing
def make_inputs(B, S, D, kpad, n_sets, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        q, k, v = (torch.randn(B, S, H, D, device="cuda", generator=g).half() for _ in range(3))
        kp = None
        if kpad:
            kp = torch.zeros(B, S, device="cuda")
            kp[torch.rand(B, S, device="cuda", generator=g) < 0.25] = float("-inf")
            kp[:, 0] = 0.0                                           # every row keeps at least one key
        sets.append((q, k, v, kp))
    return sets


def rel_err(out, ref) -> float:
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def torch_variants(sets, causal, kpad):
    """(name, fn, arg_sets) for torch SDPA; args are BHSD contiguous copies (+ the additive mask)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    F = torch.nn.functional
    # the 0 / -inf key padding as a boolean "may attend" mask (an fp32 -inf additive mask gives NaN there)
    bhsd = [tuple(t.transpose(1, 2).contiguous() for t in s[:3])
            + (None if s[3] is None else (s[3] == 0)[:, None, None, :],) for s in sets]

    def with_backend(backend, use_mask):
        def fn(q, k, v, m):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=m if use_mask else None, is_causal=causal)
        return fn

    out = [("flash", with_backend(SDPBackend.FLASH_ATTENTION, False), bhsd),
           ("cudnn", with_backend(SDPBackend.CUDNN_ATTENTION, kpad), bhsd)]
    if kpad:
        out.append(("sdpa_masked", lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), bhsd))
    return out


def run_point(B, S, D, causal, kpad, args, log) -> dict:
    from kiln.tune.device_timing import time_group
    flops = attention_flops(B, S, S, H, D, causal)
    row = {"B": B, "S": S, "H": H, "D": D, "causal": causal, "kpad": kpad, "flops": flops,
           "floor_us": flops / (PEAK_TFLOPS * 1e12) * 1e6, "kiln": [], "notes": []}
    tf = lambda us: flops / (us * 1e-6) / 1e12  # noqa: E731
    sets = make_inputs(B, S, D, kpad, 2, seed=args.seed + 7 * B + S + D + causal)
    refs = [attention_reference(q, k, v, causal=causal, kpad=kp) for q, k, v, kp in sets[:1]]
    heur, cfgs = candidates(B, S, D, causal, kpad, args.configs, args.persistent == "yes")
    row["heuristic_config"] = heur.name()
    variants, names = [], {}
    for cfg in cfgs:
        r = {"config": cfg.name()}
        try:
            t0 = time.perf_counter()
            fa = FlashAttentionSM90(*problem(B, S, D, causal, kpad), config=cfg)
            out = torch.full((B, S, H, D), float("nan"), dtype=torch.float16, device="cuda")
            q, k, v, kp = sets[0]
            fa(q, k, v, kpad=kp, out=out)
            torch.cuda.synchronize()
            r["build_s"] = time.perf_counter() - t0
            r["err"] = rel_err(out, refs[0])
            r["status"] = "ok" if r["err"] <= 2e-2 else "WRONG"
            if r["status"] == "ok":
                import tvm
                outs = [torch.empty_like(out) for _ in sets]
                targs = [tuple(tvm.runtime.from_dlpack(t) for t in (s[:3] + ((s[3],) if kpad else ()) + (o,)))
                         for s, o in zip(sets, outs)]
                variants.append((cfg.name(), fa._f, targs))
                names[cfg.name()] = r
        except Exception as e:  # noqa: BLE001
            r["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            log(traceback.format_exc())
        row["kiln"].append(r)
    tv = torch_variants(sets, causal, kpad)
    for name, fn, targs in tv:
        try:
            o = fn(*targs[0]).transpose(1, 2)
            torch.cuda.synchronize()
            row[name] = {"err": rel_err(o, refs[0])}
            variants.append((name, fn, targs))
        except Exception as e:  # noqa: BLE001
            row[name] = {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
    times = time_group(variants, args.warmup, args.reps)
    for name, t in times.items():
        dst = names.get(name) or row[name]
        dst.update(t)
        dst["tflops"] = tf(t["median_us"])
    ok = [r for r in row["kiln"] if r.get("status") == "ok" and "median_us" in r]
    if ok:
        best = min(ok, key=lambda r: r["median_us"])
        row["kiln_best"] = best["config"]
    for r in row["kiln"]:
        log(f"  {r['config']:24s} {r.get('status')} {r.get('median_us', float('nan')):9.1f} us "
            f"{r.get('tflops', float('nan')):6.1f} TF/s err {r.get('err', float('nan')):.2e}")
    for name, _, _ in tv:
        t = row.get(name, {})
        log(f"  torch {name:18s} {t.get('median_us', float('nan')):9.1f} us {t.get('tflops', float('nan')):6.1f} "
            f"TF/s err {t.get('err', float('nan')):.2e} {t.get('status', '')}")
    return row


def fmt_table(rows) -> str:
    nan = float("nan")
    hdr = (f"{'point':>26} {'floor us':>8} {'kiln cfg':>20} {'kiln us':>8} {'TF/s':>6} {'heur us':>8} "
           f"{'flash us':>8} {'TF/s':>6} {'best/flash':>10} {'heur/flash':>10} {'cudnn us':>8} {'best/cudnn':>10} "
           f"{'masked us':>9} "
           f"{'kiln err':>8} {'flash err':>9} {'cudnn err':>9}")
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        pt = f"B{r['B']} S{r['S']} D{r['D']} " + ("causal" if r["causal"] else "full") + (" kpad" if r["kpad"] else "")
        if "error" in r:
            lines.append(f"{pt:>26} ERROR {r['error'][:100]}")
            continue
        by = {k["config"]: k for k in r["kiln"]}
        best = by.get(r.get("kiln_best"), {})
        # the current heuristic's pick when this run measured it (else the one recorded at run time)
        cur = select_attention_config(*problem(r["B"], r["S"], r["D"], r["causal"], r["kpad"])).name()
        heur = by.get(cur) or by.get(r.get("heuristic_config"), {})
        fl, cu, sm = r.get("flash", {}), r.get("cudnn", {}), r.get("sdpa_masked", {})
        ku, fu, cuu = best.get("median_us", nan), fl.get("median_us", nan), cu.get("median_us", nan)
        bad = [k for k in r["kiln"] if k.get("status") != "ok"]
        lines.append(f"{pt:>26} {r['floor_us']:8.1f} {r.get('kiln_best', '-'):>20} {ku:8.1f} "
                     f"{best.get('tflops', nan):6.1f} "
                     f"{heur.get('median_us', nan):8.1f} {fu:8.1f} {fl.get('tflops', nan):6.1f} {fu / ku:10.2f} "
                     f"{fu / heur.get('median_us', nan):10.2f} "
                     f"{cuu:8.1f} {cuu / ku:10.2f} {sm.get('median_us', nan):9.1f} {best.get('err', nan):8.1e} "
                     f"{fl.get('err', nan):9.1e} {cu.get('err', nan):9.1e}"
                     + (f"  FAILED configs: {len(bad)}" if bad else ""))
    lines.append("us = median device time per call (CUDA events, queue kept full, variants interleaved); "
                 "best = kiln's fastest config, heur = the config select_attention_config picks; x/flash > 1 = kiln "
                 "faster; floor = FLOPs at 750 TFLOP/s; err = max|out-ref|/max|ref| vs fp32; "
                 "BERT rows: flash runs WITHOUT the mask, 'masked' = torch default SDPA with the mask")
    return "\n".join(lines)


def smoke(args, log) -> int:
    """A few small kernels (each head dim, the persistent variants), run once and checked: the first
    thing run on a fresh machine, under ``timeout``. Exit status 0 = all correct."""
    rc = 0
    cases = [(64, True, True, None), (128, False, False, None),
             (64, True, True, AttentionConfig(128, 128, 2, 2, persistent=True)),
             (64, False, False, AttentionConfig(192, 128, 2, 3, persistent=True)),
             (128, True, False, AttentionConfig(128, 128, 2, 2, persistent=True))]
    B, S, Hq, Hkv = 4, 1000, 8, 2                       # 256 tiles of 128 rows: > 132, so persistent is on
    for D, causal, kpad, cfg in cases:
        fa = FlashAttentionSM90(B, S, S, Hq, Hkv, D, "float16", causal, kpad, config=cfg)
        g = torch.Generator(device="cuda").manual_seed(D)
        q = torch.randn(B, S, Hq, D, device="cuda", generator=g).half()
        k, v = (torch.randn(B, S, Hkv, D, device="cuda", generator=g).half() for _ in range(2))
        kp = torch.zeros(B, S, device="cuda") if kpad else None
        if kpad:
            kp[1, 100:] = float("-inf")
        out = torch.full((B, S, Hq, D), float("nan"), dtype=torch.float16, device="cuda")
        fa(q, k, v, kpad=kp, out=out)
        torch.cuda.synchronize()
        err = rel_err(out, attention_reference(q, k, v, causal=causal, kpad=kp))
        log(f"smoke D={D} causal={causal} kpad={kpad} {fa.config_name}: max err/max ref {err:.3e}")
        rc |= not err <= 2e-2
    return int(rc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--points", default="all", choices=["all", "long", "bert"])
    ap.add_argument("--configs", default="all", choices=["all", "heuristic"])
    ap.add_argument("--persistent", default="yes", choices=["yes", "no"], help="also sweep the persistent configs")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--budget-s", type=float, default=220.0, help="skip the remaining points after this")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="build every kernel's CUDA source on the CPU")
    ap.add_argument("--table-only", default=None)
    args = ap.parse_args(argv)
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.table_only:
        with open(args.table_only) as f:
            print(fmt_table(json.load(f)["rows"]))
        return 0
    pts = {"all": LONG_POINTS + [p for p in BERT_POINTS], "long": LONG_POINTS, "bert": BERT_POINTS}[args.points]
    points = [(B, S, D, causal, (B, S, D, causal) in BERT_POINTS) for B, S, D, causal in pts]
    if args.dry_run:
        from kiln.schedules.attention_sm90 import build_flash_attention_sm90, cuda_source, make_flash_attention_sm90
        for B, S, D, causal, kpad in points:
            for cfg in candidates(B, S, D, causal, kpad, args.configs, args.persistent == "yes")[1]:
                src = cuda_source(build_flash_attention_sm90(make_flash_attention_sm90(*problem(B, S, D, causal, kpad),
                                                                                      config=cfg)))
                assert "wgmma.mma_async" in src and "cp.async.bulk.tensor.4d" in src
            log(f"B{B} S{S} D{D} causal={causal} kpad={kpad}: built")
        return 0
    if not torch.cuda.is_available():
        log("no CUDA device")
        return 2
    if args.smoke:
        return smoke(args, log)
    t0 = time.perf_counter()
    jobs = [(problem(B, S, D, causal, kpad), cfg.as_dict()) for B, S, D, causal, kpad in points
            for cfg in candidates(B, S, D, causal, kpad, args.configs, args.persistent == "yes")[1]]
    stats = precompile(jobs, args.workers, log)
    import tvm
    from timing import env_info
    doc = {"schema": SCHEMA, "env": env_info("cuda"), "args": vars(args), "tvm_cuda": bool(tvm.cuda(0).exist),
           "peak_tflops": PEAK_TFLOPS, "rows": []}
    for B, S, D, causal, kpad in points:
        if time.perf_counter() - t0 > args.budget_s:
            doc["rows"].append({"B": B, "S": S, "H": H, "D": D, "causal": causal, "kpad": kpad,
                                "error": "skipped: budget"})
            continue
        log(f"== B{B} S{S} H{H} D{D} {'causal' if causal else 'full'}{' kpad' if kpad else ''}")
        try:
            row = run_point(B, S, D, causal, kpad, args, log)
        except Exception as e:  # noqa: BLE001
            log(traceback.format_exc())
            row = {"B": B, "S": S, "H": H, "D": D, "causal": causal, "kpad": kpad,
                   "error": f"{type(e).__name__}: {e}"[:300]}
        doc["rows"].append(row)
        doc["wall_s"] = time.perf_counter() - t0
        doc["jit_cache"] = dict(stats)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(doc, f, indent=1, default=str)
    doc["table"] = fmt_table(doc["rows"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1, default=str)
    log(doc["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
