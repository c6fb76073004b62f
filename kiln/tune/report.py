"""The tuning report: a text table (rich) and a bar chart PNG (matplotlib).

One row per (module, backend): status (``ok``, or why the candidate was refused), relative error vs
eager, build time, latency and throughput times, and a mark on the chosen backend of each module in
the plan. Modules above the plan's frontier are marked ``split`` (they run their own forward and
call their children).
"""
from __future__ import annotations

import io
import os

from .capture import display_name
from .strategy import EAGER

__all__ = ["report_rows", "report_text", "plot_png"]


def _fmt(v, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def _strategy(result) -> str:
    s = result.strategy
    return s if isinstance(s, str) else repr(s)


def report_rows(result) -> list[dict]:
    """The report as plain rows (what the table and the chart show)."""
    plan, table = result.plan.assign, result.table
    covered = set()
    for m in plan:
        covered |= {n for n in table.modules if n == m or (m == "" or n.startswith(m + "."))}
    rows = []
    for module in table.modules:
        for b in table.backends:
            r = table.get(module, b)
            if r is None:
                continue
            if plan.get(module) == b:
                choice = "chosen"
            elif module not in covered:
                choice = "split" if b == EAGER else ""
            else:
                choice = ""
            rows.append({"module": display_name(module), "backend": b, "ok": r.ok,
                         "status": "ok" if r.ok else r.reason, "rel_err": r.rel_err, "build_s": r.build_s,
                         "latency_ms": r.latency_ms, "throughput_ms": r.throughput_ms, "choice": choice})
    return rows


def report_text(result, width: int = 160) -> str:
    """The report as a rich-rendered text table, plus the plan and end-to-end lines."""
    from rich.console import Console
    from rich.table import Table as RichTable
    t = RichTable(title=f"kiln.tune: {_strategy(result)}")
    for col, just in (("module", "left"), ("backend", "left"), ("choice", "left"), ("rel err", "right"),
                      ("build s", "right"), ("latency ms", "right"), ("throughput ms", "right"), ("status", "left")):
        t.add_column(col, justify=just, overflow="fold")
    for r in report_rows(result):
        t.add_row(r["module"], r["backend"], r["choice"], _fmt(r["rel_err"]), _fmt(r["build_s"], ".2f"),
                  _fmt(r["latency_ms"], ".4g"), _fmt(r["throughput_ms"], ".4g"), r["status"])
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=False, color_system=None)
    console.print(t)
    p = result.plan
    lines = ["plan: " + ", ".join(f"{display_name(m)} -> {b}" for m, b in p.assign.items())]
    if p.latency_ms is not None:
        lines.append(f"estimate: latency {p.latency_ms:.4g} ms, throughput-sample {p.throughput_ms:.4g} ms")
    lines += [f"glue of {display_name(m)} (its forward with candidate children stubbed): {g[0]:.4g} / {g[1]:.4g} ms"
              for m, g in result.table.glue_ms.items()]
    lines += [f"note: {n}" for n in p.notes]
    e = result.end_to_end or {}
    if e.get("tuned_latency_ms") is not None:
        lines.append(f"end to end: eager {e['eager_latency_ms']:.4g} / {e['eager_throughput_ms']:.4g} ms, tuned "
                     f"{e['tuned_latency_ms']:.4g} / {e['tuned_throughput_ms']:.4g} ms (latency / throughput sample)")
    if e.get("rel_err") is not None:
        lines.append(f"tuned vs eager: max rel err {e['rel_err']:.3g}" +
                     (f"; PROBLEMS: {e['problems']}" if e.get("problems") else ""))
    return buf.getvalue() + "\n".join(lines) + "\n"


def plot_png(result, path: str) -> str:
    """Grouped horizontal bars per module (one per backend; latency and throughput panels; log time
    axis); refused candidates are drawn as an ``x`` with "failed", the chosen bar is hatched.
    Returns ``path``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("TuneResult.plot needs matplotlib (pip install matplotlib)") from e
    rows = report_rows(result)
    modules = list(dict.fromkeys(r["module"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    panels = [("latency_ms", "latency (smallest sample), ms")]
    if any(r["throughput_ms"] != r["latency_ms"] for r in rows):
        panels.append(("throughput_ms", "one forward at the largest sample, ms"))
    colors = plt.get_cmap("tab10")
    h = 0.8 / max(1, len(backends))
    height = 0.45 * len(modules) * max(1, len(backends)) + 1.5
    fig, axs = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 2, height), squeeze=False)
    for ax, (key, label) in zip(axs[0], panels):
        # log scale: eager and compiled times often differ by orders of magnitude
        low = min((r[key] for r in rows if r[key]), default=1.0) / 3
        for bi, b in enumerate(backends):
            for mi, m in enumerate(modules):
                r = next((r for r in rows if r["module"] == m and r["backend"] == b), None)
                if r is None:
                    continue
                y = mi + (bi - (len(backends) - 1) / 2) * h
                if r["ok"] and r[key] is not None:
                    chosen = r["choice"] == "chosen"
                    ax.barh(y, r[key] - low, left=low, height=h * 0.9, color=colors(bi), hatch="//" if chosen else None,
                            edgecolor="black" if chosen else colors(bi), label=b if mi == 0 else None)
                    ax.text(r[key], y, f" {r[key]:.3g}", va="center", fontsize=7)
                else:
                    ax.plot([low * 1.1], [y], marker="x", color=colors(bi), label=b if mi == 0 else None)
                    ax.text(low * 1.3, y, "failed" if not r["ok"] else "not timed", va="center", fontsize=7,
                            color="gray")
        ax.set_xscale("log")
        ax.set_xlim(left=low)
        ax.set_yticks(range(len(modules)))
        ax.set_yticklabels(modules)
        ax.invert_yaxis()
        ax.set_xlabel(label)
    axs[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"kiln.tune: {_strategy(result)} (hatched: chosen)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
