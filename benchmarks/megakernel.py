"""The decode-step megakernel alone on the GPU: time per step vs the time model and the copy-bandwidth floor, and
where each worker's time goes (a ``MegakernelConfig(profile=True)`` build's cycle counters).

Random weights of the Llama-3.2-1B / Llama-3-8B shapes (numerics are the tests' job: tests/test_megakernel.py),
a KV cache at ``--context`` keys. Per (model, batch) one table row:

* ``ms``: median launch time (CUDA events around ``sync.zero_()`` + the launch, which is what a decode step runs);
* ``model ms`` / ``floor ms``: the time model of the assignment and bytes / 4.26 TB/s;
* from the profile build (a separate launch): per worker, mean microseconds spent waiting on task counters,
  waiting for weight chunks to land (``full``), the producer waiting for a free ring slot (``empty``), and busy
  time per task kind.

    source .device/setup-tvm .device && python3 benchmarks/megakernel.py --models 1b,8b --batches 1,8 \
        --out $OUT/megakernel.json
CPU check of the script (builds only, no launch): ``python3 benchmarks/megakernel.py --dry-run --models 1b``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kiln.schedules.megakernel import DecodeShape, MegakernelConfig, build_task_graph  # noqa: E402
from kiln.schedules.megakernel_schedule import summary  # noqa: E402
from timing import time_calls  # noqa: E402  (benchmarks/timing.py: synchronised CUDA-event timing)

SHAPES = {"1b": DecodeShape(16, 2048, 8192, 32, 8, 64, 128256, 1e-5, "float16", tied=True),
          "8b": DecodeShape(32, 4096, 14336, 32, 8, 128, 128256, 1e-5, "float16")}


def _inputs(graph, context, torch):
    """Random weights (std 0.02; cos/sin tables in [-1, 1]), a zero cache, ids, positions at ``context``."""
    from kiln.schedules.megakernel_kernel import weight_order
    g = torch.Generator(device="cuda").manual_seed(0)
    ws = []
    for n in weight_order(graph):
        b = graph.buffers[n]
        dt = getattr(torch, b.dtype)
        t = torch.empty(b.shape, dtype=dt, device="cuda")
        if n.startswith("rope_"):
            t.uniform_(-1, 1, generator=g)
        elif dt.is_floating_point and dt.itemsize >= 2:
            t.normal_(0, 0.02, generator=g)
        else:
            t.zero_()
        ws.append(t)
    cache = torch.zeros(graph.buffers["cache"].shape, dtype=getattr(torch, graph.shape.dtype), device="cuda")
    B = graph.batch
    return dict(ids=torch.randint(0, graph.shape.vocab, (B, 1), dtype=torch.int32, device="cuda", generator=g),
                pos=torch.full((B,), context, dtype=torch.int32, device="cuda"), cache=cache, weights=ws,
                logits=torch.empty(B, graph.shape.vocab, device="cuda"), **_graph_buffers(graph, torch))


def _graph_buffers(graph, torch):
    """What depends on the graph itself (program, counters, scratch): a profile build of the same model reuses
    the weights and cache and gets only these anew."""
    from kiln.schedules.megakernel_kernel import encode_program, scratch_layout
    return dict(prog=torch.from_numpy(encode_program(graph)).cuda(),
                sync=torch.zeros(len(graph.counters), dtype=torch.int32, device="cuda"),
                scratch=torch.zeros(scratch_layout(graph).total, dtype=torch.uint8, device="cuda"))


def _launcher(graph, name, x):
    import tvm
    from kiln.schedules.megakernel_kernel import build_megakernel_module
    f = build_megakernel_module(graph, name)[name]
    dl = tvm.runtime.from_dlpack
    args = [dl(x["ids"]), dl(x["pos"]), dl(x["cache"]), dl(x["prog"]), dl(x["sync"]), *[dl(w) for w in x["weights"]],
            dl(x["logits"]), dl(x["scratch"])]

    def step():
        x["sync"].zero_()
        f(*args)
    return step


def run_one(model, batch, context, reps, torch, ring=None):
    from kiln.schedules.megakernel_kernel import read_profile, xs_bytes
    shape = SHAPES[model]
    base = MegakernelConfig() if ring is None else MegakernelConfig(prefetch_chunks=ring)
    row = {"model": model, "batch": batch, "context": context, "ring": base.prefetch_chunks}
    graph = build_task_graph(shape, batch, context + 64, context=context, config=base)
    row["staged_bytes"] = xs_bytes(graph)
    info = summary(graph)
    row.update(tasks=info["tasks"], model_ms=info["predicted_ms"], floor_ms=info["floor_ms"],
               bytes=info["bytes"]["total"])
    x = _inputs(graph, context, torch)
    t0 = time.perf_counter()
    step = _launcher(graph, f"mk_{model}_b{batch}_r{base.prefetch_chunks}", x)
    row["build_s"] = round(time.perf_counter() - t0, 2)
    row["ms"] = time_calls(step, [()], "cuda", warmup=3, reps=reps, blocks=1)["median_ms"]
    row["TBps"] = row["bytes"] / (row["ms"] * 1e-3) / 1e12
    del step
    pgraph = build_task_graph(shape, batch, context + 64, context=context,
                              config=MegakernelConfig(prefetch_chunks=base.prefetch_chunks, profile=True))
    px = dict(x, **_graph_buffers(pgraph, torch))
    pstep = _launcher(pgraph, f"mkp_{model}_b{batch}_r{base.prefetch_chunks}", px)
    pstep()
    torch.cuda.synchronize()
    pstep()
    torch.cuda.synchronize()
    row["profile"] = read_profile(pgraph, px["scratch"].cpu().numpy())
    return row


def table(rows) -> str:
    head = (f"{'model':5} {'B':>2} {'ring':>4} {'ctx':>5} {'ms':>7} {'TB/s':>5} {'model ms':>8} {'floor ms':>8} "
            f"{'prof step us':>12} {'cnt wait':>8} {'full wait':>9} {'empty wait':>10} {'signal':>6} {'stage':>6} "
            f"{'reduce':>6}  busy us per kind (mean/worker)")
    out = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            out.append(f"{r['model']:5} {r['batch']:>2} {r.get('ring', ''):>4} {r['context']:>5}  error: {r['error']}")
            continue
        p = r["profile"]
        w = p["per_worker_us"]
        kinds = " ".join(f"{k} {v:.0f}" for k, v in p["kind_us"].items() if v > 0)
        out.append(f"{r['model']:5} {r['batch']:>2} {r['ring']:>4} {r['context']:>5} {r['ms']:7.3f} {r['TBps']:5.2f} "
                   f"{r['model_ms']:8.3f} {r['floor_ms']:8.3f} {p['step_us']:12.1f} {w['counter_wait'][1]:8.1f} "
                   f"{w['full_wait'][1]:9.1f} {w['producer_empty_wait'][1]:10.1f} {w['signal'][1]:6.0f} {w['stage'][1]:6.0f} "
                   f"{w['reduce_epilogue'][1]:6.0f}  {kinds}")
    out.append("ms: median of launches incl. the counter reset; waits are per-worker means (us) from the profile "
               "build's cycle counters at 1.98 GHz; cnt = task counters, full = consumers waiting for weights, "
               "empty = producer waiting for a free ring slot")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="1b,8b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--rings", default="", help="comma list of prefetch_chunks to compare (default: the config's)")
    ap.add_argument("--out")
    ap.add_argument("--dry-run", action="store_true", help="build the kernels on the CPU, no launch")
    a = ap.parse_args(argv)
    models, batches = a.models.split(","), [int(b) for b in a.batches.split(",")]
    rings = [int(r) for r in a.rings.split(",")] if a.rings else [None]
    if a.dry_run:
        from kiln.schedules.megakernel_kernel import build_megakernel
        for m in models:
            for b in batches:
                for prof in (False, True):
                    g = build_task_graph(SHAPES[m], b, a.context + 64, context=a.context,
                                         config=MegakernelConfig(profile=prof))
                    build_megakernel(g, f"mk_{m}_b{b}")
                    print(f"{m} b{b} profile={prof}: built; {summary(g)['tasks']} tasks, "
                          f"time model {summary(g)['predicted_ms']:.3f} ms")
        return 0
    import torch
    rows = []
    for m in models:
        for b in batches:
            for ring in rings:
                try:
                    rows.append(run_one(m, b, a.context, a.reps, torch, ring))
                except Exception as e:  # one failing row must not lose the others
                    rows.append({"model": m, "batch": b, "context": a.context, "ring": ring,
                                 "error": f"{type(e).__name__}: {e}"[:500]})
                print(json.dumps(rows[-1]), flush=True)
                if a.out:
                    with open(a.out, "w") as f:
                        json.dump({"rows": rows, "torch": torch.__version__}, f, indent=1)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
