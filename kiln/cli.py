"""``kiln`` command line: compile, run, inspect, demo, verify, tune."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

__all__ = ["main"]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="an .onnx file, a module:factory path, or a zoo name (bert, gpt2, llama, vit, resnet50)")
    p.add_argument("--size", default="tiny", choices=["tiny", "full"], help="zoo model size")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--dynamic", action="store_true", help="symbolic batch/seq dims (zoo models)")


def _best_target() -> str:
    try:
        import torch
        if torch.cuda.is_available() and torch.version.cuda:
            return "cuda"
    except ImportError:
        pass
    return "llvm"


def _resolve_target(name: str) -> str:
    return _best_target() if name == "auto" else name


def cmd_compile(a) -> int:
    import kiln
    from kiln.models import resolve_model
    rm = resolve_model(a.model, size=a.size, batch=a.batch, seq=a.seq, dynamic=a.dynamic)
    art = kiln.compile(rm.model, rm.example_inputs, target=_resolve_target(a.target), dynamic_shapes=rm.dynamic_shapes,
                       dtype=a.dtype, dump_ir=a.dump_ir, strict=a.strict or None)
    art.notes.append("source: " + json.dumps(dict(rm.source, dtype=a.dtype, dynamic=a.dynamic)))
    art.export(a.out)
    total = sum(art.timings.values())
    print(f"compiled {a.model} for {art.target.name} ({art.target.arch}) in {total:.1f}s -> {a.out}")
    fb = art.fallbacks()
    print(f"{len(art.schedule_report)} kernels scheduled, {len(fb)} by a fallback rule (see `kiln inspect {a.out}`)")
    return 0


def _source(manifest: dict) -> dict | None:
    for n in manifest.get("notes", []):
        if n.startswith("source: "):
            return json.loads(n[len("source: "):])
    return None


def _random_inputs(sig, device: str, dims: dict):
    import torch
    g = torch.Generator().manual_seed(0)
    env = {k: dims.get(k, lo) for k, (lo, _hi) in sig.dims.items()}
    out = []
    for spec in sig.inputs:
        shape = [d if isinstance(d, int) else env[d] for d in spec.shape]
        dt = getattr(torch, spec.dtype)
        if dt.is_floating_point:
            x = torch.randn(shape, generator=g).to(dt)
        elif dt == torch.bool:
            x = torch.ones(shape, dtype=torch.bool)
        else:
            x = torch.randint(0, 2, shape, generator=g).to(dt)  # 0/1 are valid token ids and mask values
        out.append(x.to("cuda" if device.startswith(("cuda", "rocm")) else "cpu"))
    return tuple(out)


def _zoo_inputs(src: dict):
    from kiln.models import resolve_model
    return resolve_model(src["name"], size=src["size"], batch=src["batch"], seq=src["seq"], seed=src.get("seed", 0))


def _time(fn, iters: int, sync) -> list[float]:
    fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def cmd_run(a) -> int:
    import kiln
    import torch
    from kiln.verify import cast_inputs, compare, torch_reference
    m = kiln.load(a.artifact, device=a.device)
    src = _source(m.manifest)
    dev = m.device
    dims = dict(kv.split("=") for kv in a.dim)
    dims = {k: int(v) for k, v in dims.items()}
    rm = _zoo_inputs(src) if src and src.get("kind") == "zoo" and not dims else None
    tdev = "cuda" if dev.startswith(("cuda", "rocm")) else "cpu"
    if rm is not None:
        dtype = getattr(torch, src["dtype"]) if src.get("dtype") else None
        inputs = cast_inputs(rm.example_inputs, dtype, tdev)
    else:
        inputs = _random_inputs(m.signature, dev, dims)
    out = m(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    print("outputs:", ", ".join(f"{tuple(o.shape)} {str(o.dtype).replace('torch.', '')}" for o in outs))
    if rm is not None:
        ref = torch_reference(rm.model, rm.example_inputs, dtype=None, device="cpu")
        c = compare(outs, ref)
        print(f"max abs error vs torch fp32: {c['max_abs_err']:.3g} (max |ref| {c['max_abs_ref']:.3g}, rel {c['rel_err']:.3g})")
    sync = torch.cuda.synchronize if tdev == "cuda" else (lambda: None)
    times = _time(lambda: m(*inputs), a.iters, sync)
    print(f"latency: median {statistics.median(times):.3f} ms over {a.iters} runs (min {min(times):.3f})")
    return 0


def cmd_inspect(a) -> int:
    from kiln.target.artifact import read_manifest, verify_files
    m = read_manifest(a.artifact)
    if a.json:
        print(json.dumps(m, indent=1))
        return 0
    verify_files(a.artifact, m)
    v, t = m["versions"], m["target"]
    print(f"kiln {v['kiln']}  tvm {v['tvm']}  tvm-ffi {v['tvm_ffi']}  built {m['created']}")
    print(f"target {t['name']} ({t['arch']}), device code: {m['device_code'].get('device_code')}, cuda graph: {m['cuda_graph']}")
    print("inputs:  " + "; ".join(f"{s['name']} {s['dtype']}{s['shape']}" for s in m["signature"]["inputs"]))
    print("outputs: " + "; ".join(f"{s['name']} {s['dtype']}{s['shape']}" for s in m["signature"]["outputs"]))
    if m["signature"]["dims"]:
        print("dims:    " + ", ".join(f"{k} in [{lo}, {hi}]" for k, (lo, hi) in m["signature"]["dims"].items()))
    nbytes = sum(os.path.getsize(os.path.join(a.artifact, f)) for f in m["files"])
    print(f"files (sha256 verified, {nbytes / 1e6:.1f} MB): " + ", ".join(m["files"]))
    print("stages:  " + ", ".join(f"{k} {v:.2f}s" for k, v in m["stage_timings_s"].items()))
    rep = m["schedule_report"]
    if rep:
        fb = [r for r in rep if r["fallback"] or r["rule"] is None]
        print(f"\nschedules: {len(rep)} kernels, {len(fb)} fallback(s) ({sum(r['hot'] for r in fb)} on hot ops)")
        print(f"  {'kernel':48s} {'rule':22s} {'hot':4s} declined by")
        for r in rep:
            flag = " FALLBACK" if r["fallback"] else ""
            dec = "; ".join(f"{d['rule']}: {d['reason']}" for d in r["declined"]) if a.verbose else \
                ", ".join(d["rule"] for d in r["declined"])
            print(f"  {r['func'][:48]:48s} {str(r['rule']) + flag:22s} {'yes' if r['hot'] else '':4s} {dec}")
            if a.verbose and r.get("detail"):
                print("      " + ", ".join(f"{k} {v}" for k, v in r["detail"].items()))
    else:
        print("\nschedules: none (llvm target builds unscheduled TensorIR)")
    for n in m.get("notes", []):
        print("note:", n)
    if m.get("kind") == "llm" and (m.get("llm") or {}).get("megakernel"):
        from kiln.schedules.megakernel_schedule import render_manifest
        print("\nmegakernel task schedule" + ("" if a.schedule else " (workers 0-1, 12 tasks each; --schedule: all)"))
        print(render_manifest(m, workers=None if a.schedule else [0, 1], max_tasks=None if a.schedule else 12))
    return 0


def cmd_demo(a) -> int:
    """The README's main job: compile a bundled model, export, reload, run, report error and time."""
    import tempfile

    import kiln
    import torch
    from kiln import zoo
    from kiln.verify import cast_inputs, compare, torch_reference
    target = _resolve_target(a.target)
    dtype = a.dtype or ("float16" if target == "cuda" else "float32")
    zm = zoo.get(a.model, size=a.size, batch=a.batch)
    print(f"kiln demo: {zm.description}; target {target}, {dtype}", flush=True)
    t0 = time.perf_counter()
    art = kiln.compile(zm.model, zm.example_inputs, target=target, dtype=dtype)
    print(f"compiled in {time.perf_counter() - t0:.1f}s (" + ", ".join(f"{k} {v:.1f}s" for k, v in art.timings.items()) + ")")
    out_dir = a.out or os.path.join(tempfile.mkdtemp(prefix="kiln-demo-"), a.model)
    art.export(out_dir)
    m = kiln.load(out_dir)
    print(f"exported and reloaded {out_dir} ({', '.join(sorted(os.listdir(out_dir)))})")
    tdev = "cuda" if m.device.startswith("cuda") else "cpu"
    inputs = cast_inputs(zm.example_inputs, getattr(torch, dtype), tdev)
    out = m(*inputs)
    ref = torch_reference(zm.model, zm.example_inputs, dtype=torch.float32, device="cpu")
    c = compare(out if isinstance(out, tuple) else (out,), ref)
    sync = torch.cuda.synchronize if tdev == "cuda" else (lambda: None)
    times = _time(lambda: m(*inputs), a.iters, sync)
    print(f"max abs error vs torch fp32: {c['max_abs_err']:.3g} (max |ref| {c['max_abs_ref']:.3g}, rel {c['rel_err']:.3g})")
    print(f"latency: median {statistics.median(times):.3f} ms over {a.iters} runs")
    tol = kiln.verify.TOLERANCES[dtype]
    if not c["rel_err"] <= tol:
        print(f"FAILED: relative error {c['rel_err']:.3g} above the {dtype} tolerance {tol}", file=sys.stderr)
        return 1
    return 0


def cmd_tune_gemm(a) -> int:
    from kiln.tune.gemm import parse_problems, tune_gemm
    try:
        problems = parse_problems(a.problems, a.dtype)
    except ValueError as e:
        print(f"kiln tune gemm: error: {e}", file=sys.stderr)
        return 2
    try:
        results = tune_gemm(problems, table_path=a.table, seed=a.seed)
    except RuntimeError as e:
        print(f"kiln tune gemm: error: {e}", file=sys.stderr)
        return 2
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{**r, "problem": r["problem"].__dict__} for r in results], f, indent=1, default=str)
    failed = [r["problem"].label() for r in results if r["best"] is None]
    print(f"tuned {len(results) - len(failed)}/{len(results)} problems"
          + (f"; every candidate failed for: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def cmd_verify(a) -> int:
    from kiln.models import resolve_model
    from kiln.verify.regions import format_table, to_json, verify_model
    rm = resolve_model(a.model, size=a.size, batch=a.batch, seq=a.seq)
    rows = verify_model(rm.model, rm.example_inputs, target=_resolve_target(a.target), dtype=a.dtype)
    print(format_table(rows))
    if a.json:
        with open(a.json, "w") as f:
            f.write(to_json(rows))
    return 1 if any(r.status in ("failed", "unknown") for r in rows) else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", description="kiln: an inference compiler on Apache TVM")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="compile MODEL and export an artifact directory")
    _add_model_args(c)
    c.add_argument("--target", default="auto", choices=["auto", "cuda", "rocm", "llvm"])
    c.add_argument("--out", required=True)
    c.add_argument("--dump-ir", default=None, help="directory for each stage's IR")
    c.add_argument("--strict", action="store_true", help="fail if a hot op falls back to a generic schedule")
    c.set_defaults(fn=cmd_compile)
    r = sub.add_parser("run", help="load an artifact, run it, check it and time it")
    r.add_argument("artifact")
    r.add_argument("--device", default=None)
    r.add_argument("--iters", type=int, default=20)
    r.add_argument("--dim", action="append", default=[], help="NAME=VALUE for symbolic dims")
    r.set_defaults(fn=cmd_run)
    i = sub.add_parser("inspect", help="show an artifact's manifest, stages and schedule decisions")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true")
    i.add_argument("-v", "--verbose", action="store_true", help="print every decline reason")
    i.add_argument("--schedule", action="store_true", help="LLM artifacts: every worker's megakernel tasks")
    i.set_defaults(fn=cmd_inspect)
    d = sub.add_parser("demo", help="compile, export, reload and run a bundled example model")
    d.add_argument("--model", default="bert")
    d.add_argument("--size", default="tiny", choices=["tiny", "full"])
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    d.add_argument("--target", default="auto", choices=["auto", "cuda", "rocm", "llvm"])
    d.add_argument("--out", default=None)
    d.add_argument("--iters", type=int, default=20)
    d.set_defaults(fn=cmd_demo)
    v = sub.add_parser("verify", help="prove (z3) or test every region kiln's fusion passes rewrite in MODEL")
    _add_model_args(v)
    v.add_argument("--target", default="cuda", choices=["cuda", "rocm", "llvm"],
                   help="whose fusion passes to verify (no GPU needed: nothing is run on it)")
    v.add_argument("--json", default=None, help="also write the rows to this JSON file")
    v.set_defaults(fn=cmd_verify)
    t = sub.add_parser("tune", help="fill kiln's tuned kernel tables on this GPU")
    tsub = t.add_subparsers(dest="what", required=True)
    tg = tsub.add_parser("gemm", help="tune the sm_90a GEMM tile table (needs an H100/H200)")
    tg.add_argument("--problems", default="bert-large",
                    help="comma list of presets (bert-large, vit-b16, square) or MxNxK[:bias+gelu+...]")
    tg.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    tg.add_argument("--table", default=None, help="CSV to merge into (default: the shipped sm90a table)")
    tg.add_argument("--seed", type=int, default=0)
    tg.add_argument("--json", default=None, help="also write every attempt to this JSON file")
    tg.set_defaults(fn=cmd_tune_gemm)
    return p


def main(argv=None) -> int:
    from kiln.errors import KilnError
    a = build_parser().parse_args(argv)
    try:
        return a.fn(a)
    except KilnError as e:
        print(f"kiln {a.cmd}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
