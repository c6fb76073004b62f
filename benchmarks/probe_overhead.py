"""Where does a kiln call's time go? BERT-Large fp16 seq 128: the loaded module called from torch vs the raw VM
call, with and without CUDA graphs, timed with CUDA events (median of 50 after 10 warm-ups).

    python3 benchmarks/probe_overhead.py [--batch 1] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch

import kiln
from kiln import zoo


def _events(fn, reps=50, warm=10):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def _wall(fn, reps=50):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    zm = zoo.get("bert", size="full", batch=a.batch)
    x = tuple(t.cuda() for t in zm.example_inputs)
    rows = {}
    for graph in (True, False):
        art = kiln.compile(zm.model, zm.example_inputs, target="cuda", dtype="float16", cuda_graph=graph)
        m = kiln.load(art.export(tempfile.mkdtemp() + "/a"))
        import tvm
        targs = [tvm.runtime.from_dlpack(t) for t in x]
        rows[f"cuda_graph={graph}"] = {
            "module_call_ms_events": _events(lambda: m(*x)),
            "raw_vm_ms_events": _events(lambda: m.run_tvm(*targs)),
            "module_call_ms_wall": _wall(lambda: m(*x)),
            "raw_vm_ms_wall": _wall(lambda: m.run_tvm(*targs)),
            "checks_only_ms_wall": _wall(lambda: m._to_tvm(x)),
        }
        print(f"cuda_graph={graph}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[f"cuda_graph={graph}"].items()), flush=True)
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
