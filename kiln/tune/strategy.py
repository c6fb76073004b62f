"""The measured table of a tuning run and the strategies that turn it into a plan.

Strategies are pure functions of a :class:`Table`, so they are tested on synthetic timings.

The table holds one :class:`Measurement` per (candidate module, backend). Candidate modules form a
tree (each linked to its nearest candidate ancestor; ``""`` is the root). A :class:`Plan` assigns a
backend to a *frontier* of that tree: a module in the plan runs whole on its backend and none of its
descendants is replaced separately; a module above the frontier runs its own forward eagerly and
calls its children (the "glue"). ``"torch"`` (eager) is always measured and valid: it is the
reference every candidate is validated against, and the fallback.

Times per candidate: ``latency_ms`` is one forward at the smallest sample, ``throughput_ms`` one
forward at the largest (the two coincide with a single sample size). The glue of a split module is
measured (``Table.glue_ms``: its forward with the candidate children stubbed out) or, failing that,
its eager time minus its candidate children's eager times (clamped at 0). A plan's time is the sum
of its frontier's times and the glue above them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

from ..errors import TuneError

__all__ = ["Measurement", "Table", "Plan", "Strategy", "FirstWins", "OneBackend", "HighestThroughput",
           "MinLatency", "LatencyBudget", "EAGER"]

EAGER = "torch"


@dataclass
class Measurement:
    """One candidate: module ``module`` built with ``backend``.

    Attributes
    ----------
    ok : bool
        Built, ran and matched eager on every captured input set. Only ``ok`` candidates are chosen.
    reason : str
        Why not ok (the exception, or the error vs the tolerance), or a note.
    rel_err : float or None
        Worst max|out - ref| / max|ref| over outputs and input sets.
    latency_ms, throughput_ms : float or None
        Median time of one forward at the smallest / largest sample.
    build_s : float or None
        Seconds to build (compile) the candidate.
    """

    module: str
    backend: str
    ok: bool
    reason: str = ""
    rel_err: float | None = None
    latency_ms: float | None = None
    throughput_ms: float | None = None
    build_s: float | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "Measurement":
        return Measurement(**d)


@dataclass
class Table:
    """Every measurement of a tuning run plus the candidate tree.

    Attributes
    ----------
    children : dict[str, list[str]]
        Candidate module -> its nearest candidate descendants; ``""`` is the root.
    backends : tuple of str
        Backend names in the caller's order (``"torch"`` included).
    rows : dict[(str, str), Measurement]
    glue_ms : dict[str, (float, float)]
        Measured glue of a module with candidate children: its forward timed with every candidate
        child answering instantly from its captured outputs. Without an entry, the glue is
        estimated as the module's eager time minus its children's (noisier: two differences of
        independent measurements).
    """

    children: dict
    backends: tuple
    rows: dict = field(default_factory=dict)
    glue_ms: dict = field(default_factory=dict)

    def add(self, m: Measurement) -> None:
        self.rows[(m.module, m.backend)] = m

    def get(self, module: str, backend: str) -> Measurement | None:
        return self.rows.get((module, backend))

    @property
    def modules(self) -> list[str]:
        return list(self.children)

    def glue(self, module: str) -> tuple[float, float]:
        """Eager time of ``module`` not spent in its candidate children: (latency, throughput) ms."""
        if module in self.glue_ms:
            return tuple(self.glue_ms[module])
        me = self._eager(module)
        kids = [self._eager(c) for c in self.children.get(module, [])]
        return (max(0.0, me.latency_ms - sum(k.latency_ms for k in kids)),
                max(0.0, me.throughput_ms - sum(k.throughput_ms for k in kids)))

    def _eager(self, module: str) -> Measurement:
        m = self.get(module, EAGER)
        if m is None or not m.ok or m.latency_ms is None or m.throughput_ms is None:
            raise TuneError(f"the table has no eager timing of module {module!r}; strategies that compare "
                            "times need it (eager is the reference and the fallback)")
        return m

    def estimate(self, assign: dict) -> tuple[float | None, float | None]:
        """(latency, throughput) ms of a plan from the table, or ``(None, None)`` without timings."""
        def est(node):
            if node in assign:
                m = self.get(node, assign[node])
                return m.latency_ms, m.throughput_ms
            g = self.glue(node)
            parts = [est(c) for c in self.children.get(node, [])]
            return g[0] + sum(p[0] for p in parts), g[1] + sum(p[1] for p in parts)
        try:
            return est("")
        except (TuneError, TypeError):
            return None, None

    def to_json(self) -> dict:
        return {"children": self.children, "backends": list(self.backends),
                "rows": [m.to_json() for m in self.rows.values()],
                "glue_ms": {k: list(v) for k, v in self.glue_ms.items()}}

    @staticmethod
    def from_json(d: dict) -> "Table":
        t = Table({k: list(v) for k, v in d["children"].items()}, tuple(d["backends"]),
                  glue_ms={k: tuple(v) for k, v in d.get("glue_ms", {}).items()})
        for r in d["rows"]:
            t.add(Measurement.from_json(r))
        return t


@dataclass(frozen=True)
class Plan:
    """Which module runs on which backend.

    Attributes
    ----------
    assign : dict[str, str]
        Frontier module -> backend (``"torch"`` entries stay as they are).
    latency_ms, throughput_ms : float or None
        The table's estimate of one forward at the smallest / largest sample.
    notes : tuple of str
    """

    assign: dict
    latency_ms: float | None = None
    throughput_ms: float | None = None
    notes: tuple = ()

    @property
    def replaced(self) -> dict:
        """The modules that a compiled backend replaces."""
        return {m: b for m, b in self.assign.items() if b != EAGER}

    def to_json(self) -> dict:
        return {"assign": self.assign, "latency_ms": self.latency_ms, "throughput_ms": self.throughput_ms,
                "notes": list(self.notes)}


# --------------------------------------------------------------------------- plan search
@dataclass(frozen=True)
class _Opt:
    lat: float
    thr: float
    assign: tuple


def _pareto(opts: list[_Opt]) -> list[_Opt]:
    """Options not beaten on both latency and throughput; among exact ties the first generated wins
    (whole modules before splits, backends in the caller's order)."""
    out, best_thr = [], float("inf")
    for o in sorted(opts, key=lambda o: (o.lat, o.thr)):
        if o.thr < best_thr:
            out.append(o)
            best_thr = o.thr
    return out


def _options(table: Table, node: str, allowed: Sequence[str]) -> list[_Opt]:
    own = []
    for b in table.backends:
        m = table.get(node, b)
        if b in allowed and m is not None and m.ok and m.latency_ms is not None and m.throughput_ms is not None:
            own.append(_Opt(m.latency_ms, m.throughput_ms, ((node, b),)))
    kids = table.children.get(node, [])
    if kids:
        gl, gt = table.glue(node)
        combos = [_Opt(gl, gt, ())]
        for c in kids:
            combos = _pareto([_Opt(a.lat + o.lat, a.thr + o.thr, a.assign + o.assign)
                              for a in combos for o in _options(table, c, allowed)])
        own += combos
    return _pareto(own)


def _front(table: Table, allowed: Sequence[str]) -> list[_Opt]:
    for node in table.modules:
        table._eager(node)  # every node needs its eager time (glue, fallback)
    return _options(table, "", tuple(allowed) + (EAGER,))


def _plan(opt: _Opt, notes=()) -> Plan:
    return Plan(dict(opt.assign), opt.lat, opt.thr, tuple(notes))


class Strategy:
    """Base class: ``choose(table) -> Plan``; ``needs_timing`` says whether candidates must be timed."""

    needs_timing = True

    def choose(self, table: Table) -> Plan:
        raise NotImplementedError(f"{type(self).__name__} does not implement choose()")


@dataclass(frozen=True)
class MinLatency(Strategy):
    """The plan with the lowest latency (one forward at the smallest sample); ties: throughput."""

    def choose(self, table: Table) -> Plan:
        return _plan(min(_front(table, table.backends), key=lambda o: (o.lat, o.thr)))


@dataclass(frozen=True)
class HighestThroughput(Strategy):
    """The plan with the lowest time per forward at the largest sample; ties: latency."""

    def choose(self, table: Table) -> Plan:
        return _plan(min(_front(table, table.backends), key=lambda o: (o.thr, o.lat)))


@dataclass(frozen=True)
class LatencyBudget(Strategy):
    """The highest-throughput plan whose latency is at most ``budget_ms``; if none fits, the lowest
    latency plan, with a note saying the budget was not met."""

    budget_ms: float

    def __post_init__(self):
        if not self.budget_ms > 0:
            raise TuneError(f"LatencyBudget needs budget_ms > 0, given {self.budget_ms}")

    def choose(self, table: Table) -> Plan:
        front = _front(table, table.backends)
        fits = [o for o in front if o.lat <= self.budget_ms]
        if fits:
            return _plan(min(fits, key=lambda o: (o.thr, o.lat)))
        best = min(front, key=lambda o: (o.lat, o.thr))
        return _plan(best, [f"latency budget {self.budget_ms:g} ms not met: best plan takes {best.lat:.4g} ms"])


@dataclass(frozen=True)
class OneBackend(Strategy):
    """Every replaced module uses the same backend (the rest stays eager).

    With ``backend`` given, that one; otherwise the backend whose best plan wins on ``metric``
    (``"latency"`` or ``"throughput"``), all-eager included; ties go to the caller's order.
    """

    backend: str | None = None
    metric: str = "latency"

    def __post_init__(self):
        if self.metric not in ("latency", "throughput"):
            raise TuneError(f"OneBackend metric must be 'latency' or 'throughput', given {self.metric!r}")

    def _key(self, o: _Opt):
        return (o.lat, o.thr) if self.metric == "latency" else (o.thr, o.lat)

    def choose(self, table: Table) -> Plan:
        if self.backend is not None and self.backend not in table.backends:
            raise TuneError(f"OneBackend({self.backend!r}): not among the tuned backends {list(table.backends)}")
        names = [self.backend] if self.backend else list(table.backends)
        best, best_b = None, None
        for b in names:
            o = min(_front(table, [b]), key=self._key)
            if best is None or self._key(o) < self._key(best):
                best, best_b = o, b
        return _plan(best, [f"one backend: {best_b}"])


@dataclass(frozen=True)
class FirstWins(Strategy):
    """No timing: from the root down, a module takes the first backend in the caller's order that
    passed validation; if that is ``"torch"`` and the module has candidate children, it stays eager
    and the children are decided the same way."""

    needs_timing = False

    def choose(self, table: Table) -> Plan:
        assign: dict = {}

        def walk(node: str) -> None:
            first = next((b for b in table.backends if (m := table.get(node, b)) is not None and m.ok), EAGER)
            if first == EAGER and table.children.get(node):
                for c in table.children[node]:
                    walk(c)
            else:
                assign[node] = first
        walk("")
        lat, thr = table.estimate(assign)
        return Plan(assign, lat, thr, ("first valid backend in order: " + ", ".join(table.backends),))
