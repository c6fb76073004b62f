"""Timing for :func:`kiln.tune`: warm-up, then the median of repeated runs.

On a CUDA device each run is bracketed by CUDA events with the device idle before it (the latency a
caller sees, host dispatch included); on the CPU by ``time.perf_counter``. A run is one *forward's
worth* of calls (a module called twice per forward is timed as both calls), so module times add up
to a model time. ``budget_s`` stops the repetitions early on slow modules (at least ``min_reps``).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = ["TimingConfig", "time_runs"]


@dataclass(frozen=True)
class TimingConfig:
    """How candidates are timed.

    Attributes
    ----------
    warmup : int
        Untimed runs first (caches, lazy initialisation, CUDA graph capture).
    reps : int
        Timed runs at most.
    min_reps : int
        Timed runs at least, whatever ``budget_s`` says.
    budget_s : float
        Stop timing a candidate once this many seconds went into its timed runs.
    """

    warmup: int = 3
    reps: int = 20
    min_reps: int = 3
    budget_s: float = 1.0

    def __post_init__(self):
        if self.warmup < 0 or self.min_reps < 1 or self.reps < self.min_reps or self.budget_s <= 0:
            raise ValueError(f"invalid TimingConfig {self}: need warmup >= 0, 1 <= min_reps <= reps, budget_s > 0")


def _is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def time_runs(run: Callable[[], object], device: str, cfg: TimingConfig = TimingConfig()) -> dict:
    """Time ``run()`` and return ``{"median_ms", "min_ms", "max_ms", "reps", "timer"}``."""
    cuda = _is_cuda(device) and torch.cuda.is_available()
    with torch.no_grad():
        for _ in range(cfg.warmup):
            run()
        if cuda:
            torch.cuda.synchronize()
        times: list[float] = []
        spent = 0.0
        while len(times) < cfg.reps and (len(times) < cfg.min_reps or spent < cfg.budget_s):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                run()
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                run()
                ms = (time.perf_counter() - t0) * 1e3
            times.append(ms)
            spent += ms / 1e3
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": len(times),
            "timer": "cuda-events" if cuda else "perf_counter"}


def calls_runner(fn: Callable, calls: Sequence[tuple]) -> Callable[[], None]:
    """A zero-argument run of ``fn`` over one forward's worth of argument tuples."""
    def run():
        for args in calls:
            fn(*args)
    return run
