"""Assignment of a megakernel task graph to workers, its time model, and its text rendering.

:func:`assign` is the list scheduler :func:`kiln.schedules.megakernel.build_task_graph` ends with; :func:`step_bytes`
and :func:`summary` give the bytes a step must move, the floors at the copy bandwidth and the time model's
prediction; :func:`render` prints the schedule per worker (tasks, weight bytes, waits), and
:func:`render_manifest` re-derives it from an LLM artifact's manifest for ``kiln inspect``.
"""
from __future__ import annotations

from dataclasses import asdict

from .megakernel import GEMV_KINDS, SM90_COST, SM90_MEGAKERNEL, CostModel, DecodeShape, MegakernelConfig, Task, \
    TaskGraph, build_task_graph

__all__ = ["assign", "step_bytes", "summary", "render", "render_manifest"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------------------------------ assignment
def _task_time(t: Task, g: TaskGraph, cost: CostModel, context: int) -> tuple[float, float]:
    """``(streamed bytes, seconds at one worker's bandwidth share)`` of a task under the time model."""
    s = g.shape
    if t.kind == "attn":
        keys = _cdiv(min(context, g.max_context), g.splits)
        nbytes = 2 * keys * s.head_dim * s.elem
    elif t.kind == "merge":
        nbytes = s.group * g.splits * (s.head_dim + 2) * 4
    elif t.kind == "embed":
        nbytes = s.hidden * s.elem
    else:
        nbytes = t.weight_bytes
    return nbytes, nbytes / cost.worker_bw(g.config.workers) + cost.task_s


def assign(graph: TaskGraph, cost: CostModel = SM90_COST, context: int | None = None) -> TaskGraph:
    """List-schedule ``graph.tasks`` (in stage order) onto the workers; returns the graph with ``workers`` set.

    Time model per worker: a *loader* streams GEMV weights into the shared-memory ring in task order, running
    ahead of the computation by at most the ring (``prefetch_bytes``), also across counter waits; the
    *consumer* starts a task when the worker is free and the task's counters are ready (``sync_s`` after their
    last signal). A GEMV task's loads end at ``max(loader free + bytes / bw, consumer start + (bytes - ring) /
    bw)``; attention/merge/embed loads are not prefetched (they read activations). Each task goes to the
    worker that finishes it first (ties: the lower id): every stage is spread evenly and the workers that
    carried attention splits get fewer GEMV rows of the next stage.
    """
    import numpy as np
    ctx = graph.max_context if context is None else context
    W = graph.config.workers
    ring = float(graph.config.prefetch_bytes)
    bw = cost.worker_bw(W)
    busy = np.zeros(W)         # consumer free at
    loaded = np.zeros(W)       # loader free at
    queue = [[] for _ in range(W)]
    counter_times: list[list[float]] = [[] for _ in graph.counters]
    start, finish = [0.0] * len(graph.tasks), [0.0] * len(graph.tasks)
    for t in graph.tasks:
        ready = 0.0
        for c, n in t.waits:
            times = sorted(counter_times[c])
            ready = max(ready, times[n - 1] + cost.sync_s)
        nbytes, _ = _task_time(t, graph, cost, ctx)
        cs = np.maximum(busy, ready)
        if t.kind in GEMV_KINDS:
            le = np.maximum(loaded + nbytes / bw, cs + max(0.0, nbytes - ring) / bw)
        else:
            le = np.maximum(loaded, cs) + nbytes / bw
        fin = np.maximum(le, cs) + cost.task_s
        w = int(np.argmin(fin))
        start[t.id], finish[t.id] = float(cs[w]), float(fin[w])
        busy[w], loaded[w] = fin[w], le[w]
        queue[w].append(t.id)
        for c in t.signals:
            counter_times[c].append(float(fin[w]))
    est = {"start_s": start, "finish_s": finish, "step_s": max(finish) if finish else 0.0, "context": ctx,
           "cost": asdict(cost)}
    return TaskGraph(graph.shape, graph.batch, graph.max_context, graph.splits, graph.config, graph.buffers,
                     graph.counters, graph.counter_totals, graph.tasks, tuple(tuple(q) for q in queue), est)


# ------------------------------------------------------------------------------------------ bytes and text
def step_bytes(shape: DecodeShape, batch: int, context: int) -> dict:
    """Bytes one decode step must move at least: every weight once (the LM head once even when tied; the
    embedding only its ``batch`` rows), the K/V of ``context + 1`` positions read, one new K/V row written."""
    s = shape
    weights = s.vocab * s.hidden * s.weight_elem + s.hidden * s.elem   # LM head + final norm
    for kind in ("qkv", "o_proj", "gate_up", "down"):
        _, n, k, bias = s.linear(kind, 0)
        weights += s.num_layers * (n * k * s.weight_elem + (n * s.elem if bias else 0)
                                   + (4 * n if s.weight_format == "fp8" else 0))
    weights += s.num_layers * 2 * s.hidden * s.elem
    if s.weight_format == "fp8":
        weights += s.vocab * 4
    embed = batch * s.hidden * s.elem
    kv = s.num_layers * 2 * batch * s.num_kv_heads * (context + 1) * s.head_dim * s.elem
    return {"weights": weights, "embedding_rows": embed, "kv": kv, "total": weights + embed + kv}


def summary(graph: TaskGraph, bandwidth: float = SM90_COST.bandwidth) -> dict:
    """Counts, bytes, floors and the time model's prediction of one graph."""
    s, ctx = graph.shape, graph.estimate.get("context", graph.max_context)
    nb = step_bytes(s, graph.batch, ctx)
    kinds: dict = {}
    for t in graph.tasks:
        kinds[t.kind] = kinds.get(t.kind, 0) + 1
    per_worker = [sum(graph.tasks[t].weight_bytes for t in ids) for ids in graph.workers]
    return {"tasks": len(graph.tasks), "by_kind": kinds, "counters": len(graph.counters), "workers": len(graph.workers),
            "splits": graph.splits, "bytes": nb, "floor_ms": nb["total"] / bandwidth * 1e3,
            "floor85_ms": nb["total"] / (0.85 * bandwidth) * 1e3,
            "predicted_ms": graph.estimate.get("step_s", 0.0) * 1e3,
            "worker_weight_bytes": {"min": min(per_worker, default=0), "max": max(per_worker, default=0)}}


def render(graph: TaskGraph, workers=None, max_tasks: int | None = None) -> str:
    """The schedule as text: a header (tasks, counters, bytes, floors, prediction), then per worker its tasks in
    order with the weight bytes each streams and what it waits for.

    ``workers``: the worker ids to list (default all); ``max_tasks``: tasks shown per worker (default all)."""
    info = summary(graph)
    s = graph.shape
    lines = [f"megakernel decode step: {s.num_layers} layers, hidden {s.hidden}, {s.num_heads}/{s.num_kv_heads} heads "
             f"x {s.head_dim}, {s.dtype} ({s.weight_format} weights), batch {graph.batch}, cache "
             f"{graph.max_context}, {graph.splits} attention split(s)",
             f"  {info['tasks']} tasks ({', '.join(f'{k} {v}' for k, v in info['by_kind'].items())}), "
             f"{info['counters']} counters, {info['workers']} workers",
             f"  bytes/step {info['bytes']['total'] / 1e6:.2f} MB (weights {info['bytes']['weights'] / 1e6:.2f}, "
             f"KV {info['bytes']['kv'] / 1e6:.2f} at context {graph.estimate.get('context')}); floor "
             f"{info['floor_ms']:.3f} ms at {SM90_COST.bandwidth / 1e12:.2f} TB/s, {info['floor85_ms']:.3f} ms at 85%; "
             f"time model {info['predicted_ms']:.3f} ms",
             f"  weight bytes per worker {info['worker_weight_bytes']['min'] / 1e3:.1f}.."
             f"{info['worker_weight_bytes']['max'] / 1e3:.1f} KB; ring {graph.config.prefetch_chunks} x "
             f"{graph.config.chunk_bytes // 1024} KB prefetched ahead of counter waits"]
    start = graph.estimate.get("start_s")
    for w in (range(len(graph.workers)) if workers is None else workers):
        ids = graph.workers[w]
        wb = sum(graph.tasks[t].weight_bytes for t in ids)
        lines.append(f"worker {w}: {len(ids)} tasks, {wb / 1e3:.1f} KB of weights")
        for t in ids[:max_tasks] if max_tasks is not None else ids:
            task = graph.tasks[t]
            waits = ", ".join(f"{graph.counters[c]}>={n}" for c, n in task.waits) or "-"
            at = f" @{start[t] * 1e6:8.1f}us" if start else ""
            lines.append(f"  {t:6d}{at} {task.label():28s} {task.weight_bytes / 1e3:8.1f} KB  wait {waits}")
        if max_tasks is not None and len(ids) > max_tasks:
            lines.append(f"  ... {len(ids) - max_tasks} more")
    return "\n".join(lines)


def render_manifest(manifest: dict, workers=None, max_tasks: int | None = 12) -> str:
    """The megakernel schedules of an LLM artifact (``kiln inspect``): re-derived from the manifest's model spec and
    the recorded tunables (the schedule is a deterministic function of them). ``""`` when it has none."""
    from ..llm.artifact import spec_from_manifest
    llm = manifest.get("llm") or {}
    if not llm.get("megakernel"):
        return ""
    spec = spec_from_manifest(manifest)
    config = MegakernelConfig(**llm["megakernel_config"]) if llm.get("megakernel_config") else SM90_MEGAKERNEL
    out = []
    for b in spec.megakernel:
        g = build_task_graph(spec.config, b, spec.max_context, spec.dtype, spec.weight_format, config=config)
        out.append(f"decode_b{b}_mk:\n" + render(g, workers=workers, max_tasks=max_tasks))
    return "\n".join(out)
