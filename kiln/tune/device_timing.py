"""Device time of GPU kernels, free of host dispatch: the timer of ``kiln tune gemm`` and ``benchmarks/``.

A call that is timed alone with CUDA events measures launch latency plus host dispatch whenever the
host is slower than the kernel (e.g. ~15 us for a 5 us GEMM called through Python). Here a
``torch.cuda._sleep`` kernel holds the GPU while the host enqueues every timed call, so each call starts
when the previous one ends and the events bracket device time only. Host time per call is measured
separately. Variants are interleaved round-robin so they share clocks and thermal state.
"""
from __future__ import annotations

import math
import statistics
import time

import torch

__all__ = ["time_group", "CYCLES_PER_US"]

#: SM clock under load (MHz) of the H200 (``torch.cuda._sleep`` counts cycles).
CYCLES_PER_US = 1980


def time_group(variants, warmup: int, reps: int) -> dict:
    """Device time per call of each ``(name, fn, arg_sets)``, interleaved round-robin.

    A ``torch.cuda._sleep`` kernel first holds the GPU while the host enqueues every timed call, so
    that each call starts when the previous one ends: the CUDA events around a call then bracket
    device time, not host dispatch (which is reported separately as ``host_us_per_call``, measured
    with the launches queued behind another sleep). Interleaving gives every variant the same clock
    and thermal state. ``max_gap_us`` (largest idle gap between consecutive calls) checks that the
    queue never ran dry."""
    for _, fn, sets in variants:
        for i in range(warmup):
            fn(*sets[i % len(sets)])
    torch.cuda.synchronize()
    host = {}
    torch.cuda._sleep(int(20e3 * CYCLES_PER_US))
    for name, fn, sets in variants:
        h0 = time.perf_counter()
        for i in range(10):
            fn(*sets[i % len(sets)])
        host[name] = (time.perf_counter() - h0) / 10 * 1e6
    torch.cuda.synchronize()
    ev = {name: ([torch.cuda.Event(enable_timing=True) for _ in range(reps)],
                 [torch.cuda.Event(enable_timing=True) for _ in range(reps)]) for name, _, _ in variants}
    cover_us = min(300e3, 1.5 * reps * sum(host.values()) + 2000)
    torch.cuda._sleep(int(cover_us * CYCLES_PER_US))
    h0 = time.perf_counter()
    for r in range(reps):
        for name, fn, sets in variants:
            ev[name][0][r].record()
            fn(*sets[r % len(sets)])
            ev[name][1][r].record()
    enqueue_us = (time.perf_counter() - h0) * 1e6
    torch.cuda.synchronize()
    seq = [(ev[n][0][r], ev[n][1][r]) for r in range(reps) for n, _, _ in variants]
    gaps = [seq[i - 1][1].elapsed_time(seq[i][0]) * 1e3 for i in range(1, len(seq))]
    out = {}
    for name, _, sets in variants:
        ms = [s_.elapsed_time(e_) for s_, e_ in zip(*ev[name])]
        out[name] = {"median_us": statistics.median(ms) * 1e3, "p10_us": _pct(ms, 10) * 1e3,
                     "p90_us": _pct(ms, 90) * 1e3, "reps": reps, "input_sets": len(sets),
                     "host_us_per_call": host[name], "max_gap_us": max(gaps) if gaps else 0.0,
                     "enqueue_us": enqueue_us, "sleep_cover_us": cover_us}
    return out


def _pct(xs, q):
    s = sorted(xs)
    i = (len(s) - 1) * q / 100
    lo, hi = math.floor(i), math.ceil(i)
    return s[lo] + (s[hi] - s[lo]) * (i - lo)
