#!/usr/bin/env python3
"""kiln vs torch eager vs torch.compile (max-autotune, reduce-overhead) vs stock TVM: one table.

Models (kiln zoo, ``--size full``): BERT-Large fp16 seq 128 (batch 1/8/32), ResNet-50 fp16 (1/32),
ViT-B/16 fp16 (1/32), and a Llama-3.2-1B-shaped fp16 decode step at batch 1 on a StaticCache of
context 512 (eager and torch.compile peers; kiln's row is "pending (LLM issue)").
Each row: median / p10 / p90 ms (CUDA events, warm-up, fresh random inputs rotated, >= 20 reps),
compile or first-call seconds, max abs error vs torch eager on the same inputs, vs an fp32 copy of
the same weights, max |ref|, status. Rows are written to the JSON after each one finishes.

Reproduce (H200, repository root; TVM carried as ``.device/``, made here by
``/work/shared/device/pack-tvm .device``). One device call per line (each < 9 min; ``--budget-s``
skips rows that would start too late; a killed run keeps every finished row in its JSON):

    source .device/setup-tvm .device &&
    python3 benchmarks/run.py --sections bert --backends eager,inductor-ro,inductor-max --budget-s 430 --out $OUT/bert-torch.json
    python3 benchmarks/run.py --sections bert --backends eager,tvm,kiln --batches 1 --budget-s 390 --out $OUT/bert-tvm-b1.json
    python3 benchmarks/run.py --sections bert --backends eager,tvm,kiln --batches 8 --budget-s 390 --out $OUT/bert-tvm-b8.json
    python3 benchmarks/run.py --sections bert --backends eager,tvm,kiln --batches 32 --budget-s 390 --out $OUT/bert-tvm-b32.json
    python3 benchmarks/run.py --sections resnet --backends eager,inductor-ro,inductor-max --budget-s 400 --out $OUT/resnet-torch.json
    python3 benchmarks/run.py --sections resnet --backends eager,tvm,kiln --budget-s 420 --out $OUT/resnet-tvm.json
    python3 benchmarks/run.py --sections vit --backends eager,inductor-ro,inductor-max,tvm,kiln --budget-s 420 --out $OUT/vit.json
    python3 benchmarks/run.py --sections llm --backends eager,inductor-ro,inductor-max,kiln --budget-s 400 --out $OUT/llm.json
then, on the dev machine, merge the returned parts into one file and print the combined table:
    python3 benchmarks/run.py --table-only PART.json [PART.json ...] --out benchmarks/results/h200.json

CPU smoke test of the whole harness: ``python3 benchmarks/run.py --device cpu --size tiny``.
``--merge`` adds rows to an existing ``--out`` file (keyed section/model/batch/backend);
``--table-only FILE...`` prints the table of one or more result files (and merges them into ``--out``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):  # kiln (repository root) and the sibling modules timing/peers
    if _p not in sys.path:
        sys.path.insert(0, _p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")       # the GPU machine has no network; weights are random
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SCHEMA = "kiln-bench/1"
SECTIONS = {  # section -> zoo name, default batches (full, tiny), fixed sequence length
    "bert": {"model": "bert", "batches": [1, 8, 32], "tiny": [1, 2], "seq": 128},
    "resnet": {"model": "resnet50", "batches": [1, 32], "tiny": [1, 2], "seq": None},
    "vit": {"model": "vit", "batches": [1, 32], "tiny": [1, 2], "seq": None},
    "llm": {"model": "llama", "batches": [1], "tiny": [1], "seq": None},
}
BACKENDS = ["eager", "inductor-ro", "tvm", "tvm-kiln-import", "kiln", "inductor-max"]  # run order
TABLE_ORDER = ["eager", "inductor-ro", "inductor-max", "tvm", "tvm-kiln-import", "kiln"]
DTYPES = {"float16": "float16", "fp16": "float16", "float32": "float32", "fp32": "float32",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- results file
def row_key(r: dict) -> str:
    return f"{r['section']}/{r['model']}/b{r['batch']}/{r['backend']}"


def load_results(path: str) -> dict:
    """A results file; committed ones are xz-compressed (``.json.xz``: the repo travels to the GPU in 64 MiB)."""
    import lzma
    with (lzma.open(path, "rt") if path.endswith(".xz") else open(path)) as f:
        data = json.load(f)
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a {SCHEMA} file (schema={data.get('schema')!r})")
    return data


def merge_row(old: dict | None, new: dict) -> dict:
    """``new`` wins, except that a skipped/unfinished row never hides an earlier measurement; earlier
    timings of the same key are kept in ``history`` (the run-to-run spread)."""
    if not old:
        return new
    if (old.get("median_ms") is not None and new.get("median_ms") is None
            and str(new.get("status", "")).startswith(("skipped", "INCOMPLETE"))):
        return dict(old, last_attempt={"status": new.get("status"), "started_utc": new.get("started_utc")})
    hist = [h for h in old.get("history", []) + new.get("history", [])]
    if old.get("median_ms") is not None and old.get("started_utc") != new.get("started_utc"):
        hist.append({"median_ms": old["median_ms"], "started_utc": old.get("started_utc")})
    seen, uniq = set(), []
    for h in hist:
        if h.get("started_utc") not in seen and h.get("started_utc") != new.get("started_utc"):
            seen.add(h.get("started_utc"))
            uniq.append(h)
    if uniq:
        new = dict(new, history=uniq)
    return new


def merge_results(datas: list) -> dict:
    """Later files win per row key (earlier timings kept in ``history``); run metadata is concatenated."""
    out = {"schema": SCHEMA, "runs": [], "rows": {}}
    for d in datas:
        out["runs"] += d.get("runs", [])
        for k, r in d.get("rows", {}).items():
            out["rows"][k] = merge_row(out["rows"].get(k), r)
    return out


class Store:
    """The JSON results file, rewritten atomically after every row."""

    def __init__(self, path: str, merge: bool, run_info: dict):
        self.path = path
        if merge and os.path.exists(path):
            self.data = load_results(path)
            log(f"merging into {path} ({len(self.data['rows'])} rows already)")
        else:
            self.data = {"schema": SCHEMA, "runs": [], "rows": {}}
        self.data["runs"].append(run_info)
        self.write()

    def put(self, row: dict) -> None:
        row["run"] = len(self.data["runs"]) - 1
        key = row_key(row)
        self.data["rows"][key] = merge_row(self.data["rows"].get(key), row)
        self.write()

    def write(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------- table
def _f(x, fmt: str = "{:.3g}") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return fmt.format(x)


def _ms(x) -> str:
    return "-" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.2f}" if x < 100 else f"{x:.1f}")


def table_rows(data: dict) -> list:
    rows = list(data["rows"].values())
    sec = {s: i for i, s in enumerate(SECTIONS)}
    be = {b: i for i, b in enumerate(TABLE_ORDER)}
    rows.sort(key=lambda r: (sec.get(r["section"], 99), r["model"], r["batch"], be.get(r["backend"], 99)))
    eager = {(r["section"], r["model"], r["batch"]): r.get("median_ms") for r in rows if r["backend"] == "eager"}
    out = []
    for r in rows:
        e = eager.get((r["section"], r["model"], r["batch"]))
        speed = (e / r["median_ms"]) if (e and r.get("median_ms")) else None
        comp = r.get("compile_s") if r.get("compile_s") is not None else r.get("first_call_s")
        x = r.get("extra") or {}
        note = ""
        if "weight_TBps" in x:
            note = f"{x['ms_per_token']:.3f} ms/tok, {x['weight_TBps']:.2f} TB/s"
        if r.get("history") and r.get("median_ms") is not None:
            note += (", " if note else "") + "other runs " + "/".join(_ms(h["median_ms"]) for h in r["history"][-3:])
        t = r.get("timing") or {}
        if t.get("wall_median_ms") and r.get("median_ms") and t["wall_median_ms"] > 1.5 * r["median_ms"] + 0.05:
            note += (", " if note else "") + f"wall {t['wall_median_ms']:.3f} ms"
        status = r.get("status", "")
        out.append([f"{r['section']}/{r['model']}", str(r["batch"]), r["backend"], _ms(r.get("median_ms")),
                    f"{_ms(r.get('p10_ms'))}-{_ms(r.get('p90_ms'))}" if r.get("p10_ms") is not None else "-",
                    _f(speed, "{:.2f}x"), _f(comp, "{:.1f}"), _f(r.get("max_abs_err")), _f(r.get("max_abs_err_hi")),
                    _f(r.get("max_abs_ref")), note, status if len(status) <= 90 else status[:89] + "…"])
    return out


def format_table(data: dict) -> str:
    head = ["model", "batch", "backend", "median ms", "p10-p90 ms", "vs eager", "compile s",
            "err vs eager", "err vs fp32", "max|ref|", "notes", "status"]
    body = table_rows(data)
    w = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w[i]) if i in (0, 2, 10, 11) else c.rjust(w[i])  # noqa: E731
                                   for i, c in enumerate(cells)).rstrip()
    out = [line(head), line(["-" * x for x in w])]
    prev = None
    for r in body:
        if prev is not None and (r[0], r[1]) != prev:
            out.append("")
        prev = (r[0], r[1])
        out.append(line(r))
    envs = []
    for run in data.get("runs", []):
        desc = (f"{run.get('gpu') or run.get('device')} driver {run.get('driver', '-')}, torch {run.get('torch')}, "
                f"tvm {run.get('tvm')}, tvm-ffi {run.get('tvm_ffi')}, kiln {run.get('kiln')}, "
                f"transformers {run.get('transformers')}")
        if desc not in envs:
            envs.append(desc)
    out += [""] + [f"env: {e}" for e in envs]
    out.append("err vs eager / vs fp32: max abs error on the same fresh inputs (fp32: the same weights upcast; "
               "fp64 on fp32 runs); compile s: compile wall time (first-call time for torch.compile).")
    return "\n".join(out)


# --------------------------------------------------------------------------- running
def _dtype(name: str):
    import torch
    return getattr(torch, DTYPES[name])


def _summary(r: dict) -> str:
    t = f"{_ms(r['median_ms'])} ms (p10 {_ms(r['p10_ms'])}, p90 {_ms(r['p90_ms'])})" if r.get("median_ms") else "-"
    c = r.get("compile_s") if r.get("compile_s") is not None else r.get("first_call_s")
    return (f"  -> {r['backend']}: {t}, compile/first call {_f(c, '{:.1f}')} s, "
            f"err {_f(r.get('max_abs_err'))} (vs fp32 {_f(r.get('max_abs_err_hi'))}) max|ref| {_f(r.get('max_abs_ref'))}"
            f" | {r['status']}")


class Runner:
    def __init__(self, args, cfg, store):
        self.args, self.cfg, self.store = args, cfg, store
        self.t0 = time.perf_counter()

    def over_budget(self) -> bool:
        return bool(self.args.budget_s) and time.perf_counter() - self.t0 > self.args.budget_s

    def do(self, placeholder: dict, fn, *a) -> dict:
        """Run one row: placeholder first (so a killed run shows where), then the result."""
        import peers
        if self.over_budget():
            placeholder["status"] = f"skipped: time budget (--budget-s {self.args.budget_s})"
            placeholder.pop("stage", None)
            self.store.put(placeholder)
            log(_summary(placeholder))
            return placeholder
        log(f"[{placeholder['section']}/{placeholder['model']} b={placeholder['batch']}] {placeholder['backend']} ...")
        self.store.put(placeholder)
        t = time.perf_counter()
        try:
            row = fn(*a)
        except BaseException as e:  # noqa: BLE001 - peers catch their own; this is the last net
            if isinstance(e, KeyboardInterrupt):
                raise
            placeholder["stage"] = "harness"
            row = peers._fail(placeholder, e)
        row["row_wall_s"] = time.perf_counter() - t
        self.store.put(row)
        log(_summary(row))
        return row

    def section(self, name: str) -> None:
        import peers
        from timing import find_vocab_size, short_error
        cfg, spec, want = self.cfg, SECTIONS[name], self.args.backends
        batches = self.args.batches or (spec["batches"] if cfg.size == "full" else spec["tiny"])
        if name == "llm":
            return self.llm(batches)
        log(f"== section {name}: {spec['model']} ({cfg.size}, {str(cfg.dtype)[6:]}, {cfg.device}), batches {batches}")
        try:
            from kiln import zoo
            kw = {"size": cfg.size, "batch": batches[0], "seed": 0}
            seq = self.args.seq or (spec["seq"] if cfg.size == "full" else None)
            if seq:
                kw["seq"] = seq
            t = time.perf_counter()
            zm = zoo.get(spec["model"], **kw)
            export_attn = getattr(getattr(zm.model, "config", None), "_attn_implementation", None)
            model, export_model = peers.prepare_models(zm.model, cfg)
            torch_attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
            examples = tuple(zm.example_inputs)
            log(f"  model ready in {time.perf_counter() - t:.1f} s: {getattr(zm, 'description', '')}"
                + (f"; attention: torch peers {torch_attn}, export {export_attn}" if torch_attn else ""))
        except Exception as e:  # noqa: BLE001
            for b in batches:
                r = peers.new_row(name, spec["model"], b, "setup", "model setup", cfg)
                r["status"] = f"FAILED (zoo): {short_error(e)}"
                r["error"] = traceback.format_exc()[-6000:]
                r.pop("stage", None)
                self.store.put(r)
                log(_summary(r))
            return
        vocab = find_vocab_size(model)
        for b in batches:
            case = peers.make_case(name, spec["model"], b, cfg, model, export_model, examples, vocab)
            case.info.update(description=getattr(zm, "description", ""), torch_attn=torch_attn,
                             export_attn=export_attn)
            ph = lambda be, lab: peers._row(case, be, lab)  # noqa: E731
            self.do(ph("eager", "torch eager"), peers.eager, case)  # always: it is the reference
            stock_failed = False
            for be in BACKENDS[1:]:
                if be == "tvm-kiln-import":
                    mode = cfg.tvm_kiln_import
                    implied = "tvm" in want and (mode == "always" or (mode == "auto" and stock_failed))
                    if be in want or implied:
                        self.do(ph(be, "stock TVM pipeline on kiln's import"), peers.tvm_kiln_import, case)
                    continue
                if be not in want:
                    continue
                if be == "inductor-ro":
                    self.do(ph(be, "torch.compile reduce-overhead"), peers.inductor, case, "reduce-overhead")
                elif be == "inductor-max":
                    self.do(ph(be, "torch.compile max-autotune"), peers.inductor, case, "max-autotune")
                elif be == "tvm":
                    r = self.do(ph(be, "stock TVM"), peers.tvm_stock, case)
                    stock_failed = not r["status"].startswith("ok")
                elif be == "kiln":
                    self.do(ph(be, "kiln"), peers.kiln_row, case)
            del case
            peers.cleanup()
        del model, export_model, zm
        peers.cleanup()

    def llm(self, batches: list) -> None:
        import peers
        from timing import short_error
        cfg, want = self.cfg, self.args.backends
        log(f"== section llm: llama decode ({cfg.size}, {str(cfg.dtype)[6:]}, {cfg.device}), context {cfg.context}, "
            f"batches {batches}")
        if "tvm" in want or "tvm-kiln-import" in want:
            log("  (no stock-TVM decode row: the issue asks for eager and torch.compile peers only)")
        for b in batches:
            try:
                t = time.perf_counter()
                lc = peers.llm_setup(cfg, b)
                log(f"  model ready in {time.perf_counter() - t:.1f} s: {lc.source}, "
                    f"{lc.weight_bytes / 1e9:.2f} GB of weights")
            except Exception as e:  # noqa: BLE001
                r = peers.new_row("llm", "llama", b, "setup", "model setup", cfg)
                r["status"] = f"FAILED (setup): {short_error(e)}"
                r["error"] = traceback.format_exc()[-6000:]
                r.pop("stage", None)
                self.store.put(r)
                log(_summary(r))
                continue
            ph = lambda be, lab: peers.llm_row(lc, be, lab)  # noqa: E731
            self.do(ph("eager", "torch eager"), peers.llm_eager, lc)
            if "inductor-ro" in want:
                self.do(ph("inductor-ro", "torch.compile reduce-overhead"), peers.llm_inductor, lc, "reduce-overhead")
            if "inductor-max" in want:
                self.do(ph("inductor-max", "torch.compile max-autotune"), peers.llm_inductor, lc, "max-autotune")
            if "kiln" in want:
                r = peers.llm_kiln_pending(cfg, b)
                self.store.put(r)
                log(_summary(r))
            del lc
            peers.cleanup()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--sections", default="bert,resnet,vit,llm", help="comma list of " + ",".join(SECTIONS))
    p.add_argument("--backends", default="kiln,eager,inductor-max,inductor-ro,tvm",
                   help="comma list of " + ",".join(TABLE_ORDER) + " (eager always runs: it is the reference)")
    p.add_argument("--batches", default=None, help="comma list; default per section (bert 1,8,32; resnet/vit 1,32; llm 1)")
    p.add_argument("--size", default="full", choices=["full", "tiny"])
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda if available")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default float16 on cuda, float32 on cpu")
    p.add_argument("--out", default=None, help="JSON results file (default benchmarks/results/bench-DEVICE-SIZE-UTC.json)")
    p.add_argument("--merge", action="store_true", help="add to the rows already in --out instead of replacing it")
    p.add_argument("--table-only", nargs="+", metavar="FILE", help="print the table of these result files and exit")
    p.add_argument("--seq", type=int, default=None, help="BERT sequence length (default 128 full, zoo default tiny)")
    p.add_argument("--context", type=int, default=512, help="LLM decode: tokens already in the KV cache")
    p.add_argument("--reps", type=int, default=None, help="timed calls per block (default 50 cuda, 10 cpu)")
    p.add_argument("--blocks", type=int, default=2, help="timed blocks (total calls = reps x blocks, >= 20)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 10 cuda, 2 cpu)")
    p.add_argument("--sets", type=int, default=3, help="fresh random input sets rotated while timing")
    p.add_argument("--input-seed", type=int, default=20261121)
    p.add_argument("--cpu-compile", action="store_true", help="run torch.compile rows on cpu too")
    p.add_argument("--export-device", default="cpu", choices=["cpu", "device"],
                   help="model copy given to torch.export / kiln: a CPU copy (default) or the benchmark device")
    p.add_argument("--tvm-kiln-import", default="auto", choices=["auto", "always", "never"],
                   help="also run stock TVM's pipeline on kiln's import: when stock TVM fails (auto), always, never")
    p.add_argument("--artifacts", default=None, help="keep kiln artifacts under this directory")
    p.add_argument("--torch-attn", default="sdpa", choices=["sdpa", "eager", "zoo"],
                   help="attention implementation of the torch peers' copy (the export copy keeps the zoo's)")
    p.add_argument("--warm-compile-cache", action="store_true",
                   help="keep the default torch.compile/Triton/kiln caches (default: fresh, cold caches per run)")
    p.add_argument("--budget-s", type=float, default=None, help="skip rows that would start after this many seconds")
    a = p.parse_args(argv)
    a.sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    a.backends = [s.strip() for s in a.backends.split(",") if s.strip()]
    a.batches = [int(b) for b in a.batches.split(",")] if a.batches else None
    bad = [s for s in a.sections if s not in SECTIONS] + [b for b in a.backends if b not in TABLE_ORDER]
    if bad:
        p.error(f"unknown section/backend: {', '.join(bad)}")
    return a


def main(argv=None) -> int:
    """CLI entry point; restores grad mode and the compile-cache variables it changes (tests call it)."""
    saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "KILN_CACHE_DIR",
                                            "KILN_PROGRESS")}
    grad = None
    if "torch" in sys.modules:
        grad = sys.modules["torch"].is_grad_enabled()
    try:
        return _main(argv)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if grad is not None:
            sys.modules["torch"].set_grad_enabled(grad)


def _main(argv=None) -> int:
    args = parse_args(argv)
    if args.table_only:
        data = merge_results([load_results(f) for f in args.table_only])
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(data, f, indent=1, default=str)
            log(f"merged {len(data['rows'])} rows into {args.out}")
        log(format_table(data))
        return 0

    os.environ.setdefault("KILN_PROGRESS", "0")  # no progress display in a log
    if not args.warm_compile_cache:  # cold torch.compile / Triton / kiln caches: compile times are reproducible
        import tempfile
        cache = tempfile.mkdtemp(prefix="kiln-bench-compile-cache-")
        for var, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton"),
                         ("KILN_CACHE_DIR", "kiln")):
            os.environ[var] = os.path.join(cache, sub)
    import torch
    import peers
    from timing import env_info
    torch.set_grad_enabled(False)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        log("error: --device cuda but torch sees no CUDA device")
        return 2
    dtype = _dtype(args.dtype or ("float16" if device == "cuda" else "float32"))
    cuda = device == "cuda"
    cfg = peers.BenchCfg(device=device, dtype=dtype, size=args.size,
                         warmup=args.warmup if args.warmup is not None else (10 if cuda else 2),
                         reps=args.reps or (50 if cuda else 10), blocks=args.blocks, n_sets=args.sets,
                         input_seed=args.input_seed, cpu_compile=args.cpu_compile, export_device=args.export_device,
                         tvm_kiln_import=args.tvm_kiln_import, artifacts=args.artifacts, context=args.context,
                         torch_attn=args.torch_attn)
    if cfg.reps * cfg.blocks < 20:
        log(f"note: {cfg.reps} x {cfg.blocks} < 20 timed calls")
    out = args.out or os.path.join(HERE, "results", f"bench-{device}-{args.size}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    info = env_info(device)
    info["config"] = {k: (str(v) if k == "dtype" else v) for k, v in cfg.__dict__.items()}
    info["sections"], info["backends"], info["batches"] = args.sections, args.backends, args.batches
    store = Store(out, args.merge, info)
    log(f"kiln bench: {info.get('gpu') or device}, torch {info['torch']}, tvm {info['tvm']}, kiln {info['kiln']}; "
        f"results -> {out}")
    runner = Runner(args, cfg, store)
    for s in args.sections:
        runner.section(s)
    store.data["runs"][-1]["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    store.data["runs"][-1]["wall_s"] = time.perf_counter() - runner.t0
    store.write()
    log("")
    log(format_table(store.data))
    log(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
