"""``kiln.tune``: build every candidate module with every backend, validate, time, choose, apply.

For each candidate module (see :mod:`kiln.tune.capture`):

1. eager reference outputs on every captured call (samples and bound sets) -- fresh clones of the
   captured inputs each time, so a module writing into its inputs cannot skew the next candidate;
2. per backend: build (:class:`BuildRequest`), run on every captured call and compare with the
   reference at the per-dtype tolerance (``kiln.verify.TOLERANCES``, fp32 1e-4, fp16 2e-2,
   bf16 6e-2; integer outputs exactly), dtype, shape and device included; then compare every kept
   output once more after all calls (a backend that reuses output buffers across calls fails);
   any exception or mismatch is recorded with its reason and the candidate is never chosen;
3. time the valid candidates (one forward's worth of calls at the smallest and the largest sample).

The strategy then turns the :class:`Table` into a :class:`Plan`, and the plan is applied in place:
each replaced module gets an instance ``forward`` that runs its build (``del module.forward``, i.e.
:meth:`TuneResult.restore`, undoes it). The module tree, parameters and ``state_dict`` are untouched.
"""
from __future__ import annotations

import logging
import math
import time
import traceback
from typing import Callable, Sequence

import torch

from ..errors import TuneError
from ..verify import TOLERANCES, compare, flatten_outputs
from .backends import BuildRequest, Built, get_backend, original_forward, resolve_backends
from .capture import (Axis, OutSpec, Site, bound_sets, candidate_tree, capture, detect_axes, display_name,
                      normalize_samples, select_modules)
from .strategy import EAGER, Measurement, MinLatency, OneBackend, Plan, Strategy, Table
from .timing import TimingConfig, calls_runner, time_runs

__all__ = ["tune", "TuneResult", "Replacement", "apply_plan", "restore_plan", "root_instead", "DEFAULT_BACKENDS"]

log = logging.getLogger("kiln.tune")

DEFAULT_BACKENDS = ("kiln", "torch", "inductor", "tvm")


class Replacement:
    """What a replaced module's ``forward`` becomes: its build, called with positional tensors."""

    def __init__(self, fn: Callable, backend: str, path: str):
        self.fn, self.backend, self.path = fn, backend, path

    def __call__(self, *args, **kwargs):
        if kwargs:
            raise TypeError(f"module {display_name(self.path)!r} runs on {self.backend}, which takes positional "
                            f"tensors only; given keyword arguments {sorted(kwargs)}")
        return self.fn(*args)

    def __repr__(self) -> str:
        return f"Replacement({display_name(self.path)!r} on {self.backend})"


def _module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    return model.get_submodule(path) if path else model


def apply_plan(model: torch.nn.Module, runners: dict) -> None:
    """Patch ``forward`` of each module in ``runners`` (path -> (backend, fn))."""
    for path, (backend, fn) in runners.items():
        _module(model, path).forward = Replacement(fn, backend, path)


def restore_plan(model: torch.nn.Module, paths) -> None:
    """Give the modules at ``paths`` their class's forward back."""
    for path in paths:
        m = _module(model, path)
        if isinstance(m.__dict__.get("forward"), Replacement):
            del m.forward


def _check_not_tuned(model: torch.nn.Module) -> None:
    patched = [display_name(p) for p, m in model.named_modules() if isinstance(m.__dict__.get("forward"), Replacement)]
    if patched:
        raise TuneError(f"the model is already tuned (replaced modules: {patched}); call restore() on its "
                        "TuneResult first")


# --------------------------------------------------------------------------- validation
def _tolerance(dtype: torch.dtype, overrides: dict) -> float:
    name = str(dtype).replace("torch.", "")
    if name in overrides:
        return float(overrides[name])
    return TOLERANCES.get(name, 0.0) if dtype.is_floating_point else 0.0


def _shapes(args) -> str:
    return ", ".join("x".join(map(str, a.shape)) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args)


def _check(outs: list, refs: list, tols: dict) -> tuple[float, str | None]:
    """(worst relative error, problem or None) of flat outputs against flat references."""
    if len(outs) != len(refs):
        return math.inf, f"{len(outs)} output tensor(s), eager gives {len(refs)}"
    worst = 0.0
    for i, (o, r) in enumerate(zip(outs, refs)):
        if not isinstance(o, torch.Tensor):
            return math.inf, f"output {i} is a {type(o).__name__}, eager gives a tensor"
        if o.dtype != r.dtype or tuple(o.shape) != tuple(r.shape) or o.device != r.device:
            return math.inf, (f"output {i} is {str(o.dtype)[6:]}{list(o.shape)} on {o.device}, eager gives "
                              f"{str(r.dtype)[6:]}{list(r.shape)} on {r.device}")
        c = compare([o], [r])
        rel, tol = c["rel_err"], _tolerance(r.dtype, tols)
        if rel != rel:
            return math.inf, f"output {i} has NaN/Inf"
        worst = max(worst, rel)
        if rel > tol:
            return worst, f"output {i}: max|err|/max|ref| = {rel:.3g} > tolerance {tol:g} ({str(r.dtype)[6:]})"
    return worst, None


def _validate(fn: Callable, site: Site, refs: list, tols: dict) -> tuple[float, str | None]:
    worst, kept = 0.0, []
    with torch.no_grad():
        for k, calls in enumerate(site.calls):
            for j, call in enumerate(calls):
                outs = flatten_outputs(fn(*call.fresh()))
                rel, problem = _check(outs, refs[k][j], tols)
                worst = max(worst, rel)
                if problem:
                    return worst, f"wrong on inputs ({_shapes(call.args)}): {problem}"
                kept.append((k, j, outs))
        for k, j, outs in kept:
            _, problem = _check(outs, refs[k][j], tols)
            if problem:
                return worst, f"outputs change after later calls (output buffers reused): {problem}"
    return worst, None


def _ms(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def _short(e: BaseException, limit: int = 400) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------- the result
class TuneResult:
    """What :func:`kiln.tune` returns: the tuned model (changed in place) and how it was decided.

    Attributes
    ----------
    model : torch.nn.Module
        The caller's model, with the plan applied. ``result(*inputs)`` calls it.
    plan : Plan
    table : Table
        Every candidate's validity, error, times and build time.
    strategy : Strategy
    axes : list of Axis
        The root inputs' dynamic axes and their ranges.
    inputs : list of (dtype, shape)
        The root inputs of the first sample (dynamic dims replaced by axis names).
    device : str
    end_to_end : dict
        Eager vs tuned model times (ms) at the smallest / largest sample, and the tuned model's
        error vs eager (``rel_err``), when the strategy timed candidates.
    """

    def __init__(self, model, plan: Plan, table: Table, strategy: Strategy, axes: list, inputs: list, device: str,
                 builds: dict, sites: dict, end_to_end: dict | None = None, loaded_from: str | None = None):
        self.model, self.plan, self.table, self.strategy = model, plan, table, strategy
        self.axes, self.inputs, self.device = axes, inputs, device
        self.builds = builds          # path -> (backend name, Built, BuildRequest)   (tune only)
        self.sites = sites            # path -> JSON-able info (example shapes, axes, out spec)
        self.end_to_end = end_to_end or {}
        self.loaded_from = loaded_from  # the saved directory, for a result of kiln.load_tuned

    @property
    def source(self) -> str:
        """``"tuned"`` (kiln.tune) or ``"loaded"`` (kiln.load_tuned)."""
        return "loaded" if self.loaded_from else "tuned"

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def restore(self) -> None:
        """Undo the plan: every replaced module runs its own forward again."""
        restore_plan(self.model, self.plan.replaced)

    def accepts(self, args: Sequence) -> bool:
        """Whether ``args`` fit the tuned inputs (dtypes, static dims, dynamic axes within range)."""
        if len(args) != len(self.inputs):
            return False
        ranges = {a.name: (a.lo, a.hi) for a in self.axes}
        for x, (dtype, shape) in zip(args, self.inputs):
            if not isinstance(x, torch.Tensor) or str(x.dtype) != dtype or x.dim() != len(shape):
                return False
            for got, want in zip(x.shape, shape):
                if isinstance(want, str):
                    lo, hi = ranges[want]
                    if not lo <= got <= hi:
                        return False
                elif got != want:
                    return False
        return True

    def report(self) -> str:
        """The candidates table as text (see :mod:`kiln.tune.report`)."""
        from .report import report_text
        return report_text(self)

    def plot(self, path: str) -> str:
        """Write a bar chart PNG of every module's candidates to ``path`` (needs matplotlib)."""
        from .report import plot_png
        return plot_png(self, path)

    def save(self, path: str) -> str:
        """Same as :func:`kiln.save`."""
        from .store import save
        return save(self, path)

    def to_json(self) -> dict:
        return {"plan": self.plan.to_json(), "table": self.table.to_json(), "strategy": repr(self.strategy),
                "axes": [a.to_json() for a in self.axes], "inputs": [[d, list(s)] for d, s in self.inputs],
                "device": self.device, "end_to_end": self.end_to_end, "source": self.source}

    def __repr__(self) -> str:
        choice = ", ".join(f"{display_name(m)}: {b}" for m, b in self.plan.assign.items())
        return f"TuneResult({choice})"


# --------------------------------------------------------------------------- tune
def _device_of(sets: Sequence[tuple]) -> str:
    devs = {str(x.device) for s in sets for x in s}
    if len(devs) != 1:
        raise TuneError(f"all sample tensors must be on one device, given {sorted(devs)}")
    return devs.pop()


def _numel(s: tuple) -> int:
    return sum(x.numel() for x in s)


def _input_specs(sets: Sequence[tuple], axes: Sequence[Axis]) -> list:
    names = {m: a.name for a in axes for m in a.members}
    return [(str(x.dtype), tuple(names.get((i, d), int(n)) for d, n in enumerate(x.shape)))
            for i, x in enumerate(sets[0])]


class _Tuner:
    """One tuning run (kept apart from :func:`tune` so each step reads on its own)."""

    def __init__(self, model, sets, n_samples, backends, strategy, tolerances, timing):
        self.model, self.sets, self.n_samples = model, sets, n_samples
        self.backends, self.strategy = backends, strategy
        self.tols, self.timing = dict(tolerances or {}), timing or TimingConfig()
        self.device = _device_of(sets)
        sizes = [_numel(s) for s in sets[:n_samples]]
        self.lat_k, self.thr_k = sizes.index(min(sizes)), sizes.index(max(sizes))
        self.builds: dict = {}

    def _times(self, fn: Callable, site: Site) -> tuple[float, float]:
        def at(k):
            args = [c.fresh() for c in site.calls[k]]
            return time_runs(calls_runner(fn, args), self.device, self.timing)["median_ms"]
        lat = at(self.lat_k)
        return lat, (lat if self.thr_k == self.lat_k else at(self.thr_k))

    def references(self, site: Site) -> list:
        fwd = original_forward(site.module)
        with torch.no_grad():
            return [[fwd(*c.fresh(), **c.kwargs) for c in calls] for calls in site.calls]

    def eager(self, site: Site) -> Measurement:
        m = Measurement(site.path, EAGER, True, "reference")
        if self.strategy.needs_timing:
            fwd = original_forward(site.module)
            if site.reason is None:
                m.latency_ms, m.throughput_ms = self._times(fwd, site)
            else:  # keyword / non-tensor arguments: time the calls as they were made
                def at(k):
                    calls = site.calls[k]
                    return time_runs(lambda: [fwd(*c.fresh(), **c.kwargs) for c in calls], self.device,
                                     self.timing)["median_ms"]
                m.latency_ms = at(self.lat_k)
                m.throughput_ms = m.latency_ms if self.thr_k == self.lat_k else at(self.thr_k)
            m.rel_err = 0.0
        return m

    def candidate(self, site: Site, backend: str, refs: list, spec: OutSpec) -> Measurement:
        m = Measurement(site.path, backend, False)
        k = site.example_set()
        req = BuildRequest(site.path, site.module, site.calls[k][0].fresh(), site.dynamic_shapes(), self.device, spec)
        t0 = time.perf_counter()
        try:
            built = get_backend(backend).build(req)
            built = built if isinstance(built, Built) else Built(built)
        except Exception as e:  # noqa: BLE001 - recorded; never chosen
            m.build_s, m.reason = time.perf_counter() - t0, f"build failed: {_short(e)}"
            log.debug("%s on %s: build failed\n%s", site.name, backend, traceback.format_exc())
            return m
        m.build_s = time.perf_counter() - t0
        try:
            m.rel_err, problem = _validate(built.fn, site, refs, self.tols)
            if problem:
                m.reason = problem
                return m
            if self.strategy.needs_timing:
                m.latency_ms, m.throughput_ms = self._times(built.fn, site)
        except Exception as e:  # noqa: BLE001
            m.reason = f"run failed: {_short(e)}"
            log.debug("%s on %s: run failed\n%s", site.name, backend, traceback.format_exc())
            return m
        m.ok = True
        self.builds[(site.path, backend)] = (backend, built, req)
        return m

    def glue(self, site: Site, kids: list[Site], outs: dict) -> tuple[float, float] | None:
        """``site``'s forward timed with every candidate child answering from its captured outputs
        (in call order): the time the module spends outside its children."""
        if site.reason is not None or any(k.reason is not None for k in kids):
            return None
        box = {"k": 0}

        def stub(path):
            seen = {"n": 0}

            def answer(*args, **kwargs):
                got = outs[path][box["k"]]
                seen["n"] += 1
                return got[(seen["n"] - 1) % len(got)]
            return answer
        try:
            for kid in kids:
                kid.module.forward = stub(kid.path)

            def at(k):
                box["k"] = k
                return time_runs(calls_runner(original_forward(site.module), [c.fresh() for c in site.calls[k]]),
                                 self.device, self.timing)["median_ms"]
            lat = at(self.lat_k)
            return lat, (lat if self.thr_k == self.lat_k else at(self.thr_k))
        finally:
            for kid in kids:
                kid.module.__dict__.pop("forward", None)

    def measure(self, sites: list[Site], table: Table) -> None:
        outs = {}
        for site in sites:
            refs_tree = self.references(site)
            outs[site.path] = refs_tree
            spec = None
            if site.reason is None:
                try:
                    spec = OutSpec.of(refs_tree[0][0])
                except TuneError as e:
                    site.reason = str(e)
            refs = [[flatten_outputs(r) for r in calls] for calls in refs_tree]
            table.add(self.eager(site))
            for b in self.backends:
                if b == EAGER:
                    continue
                if site.reason is not None:
                    table.add(Measurement(site.path, b, False, f"not built: {site.reason}"))
                    continue
                log.info("kiln.tune: building %s with %s", site.name, b)
                m = self.candidate(site, b, refs, spec)
                log.info("kiln.tune: %s on %s: %s (build %.1f s, %s / %s ms)", site.name, b, "ok" if m.ok else m.reason,
                         m.build_s or 0.0, _ms(m.latency_ms), _ms(m.throughput_ms))
                table.add(m)
        if self.strategy.needs_timing:
            by_path = {s.path: s for s in sites}
            for site in sites:
                kids = [by_path[c] for c in table.children.get(site.path, [])]
                g = self.glue(site, kids, outs) if kids else None
                if g is not None:
                    table.glue_ms[site.path] = g

    def end_to_end(self, result: TuneResult, eager_root: Measurement, root_refs: list) -> dict:
        fwd = self.model
        out: dict = {"eager_latency_ms": eager_root.latency_ms, "eager_throughput_ms": eager_root.throughput_ms}
        with torch.no_grad():
            worst, problems = 0.0, []
            for k, s in enumerate(self.sets):
                rel, problem = _check(flatten_outputs(fwd(*s)), root_refs[k], self.tols)
                worst = max(worst, rel)
                if problem:
                    problems.append(f"input set {k}: {problem}")
        out["rel_err"], out["problems"] = worst, problems
        if self.strategy.needs_timing:
            def at(k):
                s = self.sets[k]
                return time_runs(lambda: fwd(*s), self.device, self.timing)["median_ms"]
            out["tuned_latency_ms"] = at(self.lat_k)
            out["tuned_throughput_ms"] = out["tuned_latency_ms"] if self.thr_k == self.lat_k else at(self.thr_k)
            out["speedup_latency"] = eager_root.latency_ms / out["tuned_latency_ms"]
            out["speedup_throughput"] = eager_root.throughput_ms / out["tuned_throughput_ms"]
        return out


def _check_plan(plan: Plan, table: Table, builds: dict, strategy: Strategy) -> None:
    """A plan names candidate modules, none inside another, each on a backend that passed validation."""
    chosen = list(plan.assign)
    for m, b in plan.assign.items():
        if m not in table.children:
            raise TuneError(f"{strategy!r} chose module {display_name(m)!r}, which is not a candidate")
        if b != EAGER and (m, b) not in builds:
            raise TuneError(f"{strategy!r} chose {b!r} for module {display_name(m)!r}, which did not pass "
                            f"validation ({table.get(m, b).reason if table.get(m, b) else 'not built'})")
        inner = [o for o in chosen if o != m and (m == "" or o.startswith(m + "."))]
        if inner:
            raise TuneError(f"{strategy!r} chose module {display_name(m)!r} whole and also its descendants {inner}")


_PLAN = "<tuned plan>"


def root_instead(strategy: Strategy, table: Table, e2e: dict) -> str | None:
    """The backend the strategy prefers on the whole model once a split plan's end-to-end time is measured, or
    ``None`` to keep the plan. A split plan is chosen on summed per-module estimates; the root rows and the
    end-to-end time both measure the whole model, so the strategy re-decides between them. Not for
    :class:`OneBackend` (its plan is one backend by construction) nor without end-to-end times."""
    if isinstance(strategy, OneBackend) or not strategy.needs_timing or e2e.get("tuned_latency_ms") is None:
        return None
    check = Table({"": []}, tuple(table.backends) + (_PLAN,))
    for b in table.backends:
        if table.get("", b) is not None:
            check.add(table.get("", b))
    check.add(Measurement("", _PLAN, True, "", e2e.get("rel_err"), e2e["tuned_latency_ms"], e2e["tuned_throughput_ms"]))
    choice = strategy.choose(check).assign.get("", EAGER)
    return None if choice == _PLAN else choice


def tune(model: torch.nn.Module, samples, backends: Sequence[str] = DEFAULT_BACKENDS, strategy: Strategy | None = None,
         *, modules: Sequence[str] | None = None, depth: int = 1, min_params: int = 1,
         dynamic_bounds: dict | None = None, tolerances: dict | None = None, timing: TimingConfig | None = None,
         check_end_to_end: bool = True) -> TuneResult:
    """Choose a backend per module of ``model`` and apply the choice in place.

    Parameters
    ----------
    model : torch.nn.Module
        In eval mode. Changed in place: replaced modules get an instance ``forward``
        (:meth:`TuneResult.restore` undoes it); parameters and the module tree are untouched.
    samples : tensor, tuple of tensors, or list of them
        Model inputs. A list of samples of two sizes (e.g. batch 1 and 16) makes the dims that
        differ dynamic axes (``batch`` for an axis made of dim-0 entries, else ``dyn1``...); one
        sample size tunes static shapes. Latency is timed at the smallest sample, throughput at
        the largest.
    backends : sequence of str
        Registered backend names (:func:`kiln.tune.backend_names`), in preference order (only
        :class:`FirstWins` reads the order). ``"torch"`` is added if absent: it is the reference.
    strategy : Strategy, optional
        :class:`MinLatency` (default), :class:`HighestThroughput`, :class:`LatencyBudget`,
        :class:`OneBackend` or :class:`FirstWins`.
    modules : sequence of str, optional
        Candidate module names (``named_modules`` names); the root is always one. Default: the
        root and every module up to ``depth`` levels down with at least ``min_params`` parameters.
    depth, min_params : int
        See ``modules``.
    dynamic_bounds : dict, optional
        Axis name -> ``(lo, hi)`` to widen a detected axis beyond the samples; inputs at both bounds
        are synthesised (slicing / tiling the first sample) and every candidate is validated there.
    tolerances : dict, optional
        dtype name -> max relative error, overriding ``kiln.verify.TOLERANCES``.
    timing : TimingConfig, optional
    check_end_to_end : bool
        After applying the plan, run the whole model on every input set and compare with eager
        (recorded in ``end_to_end``), and time it when the strategy times candidates. A plan that splits
        the model across backends and then measures worse (for the strategy) than a backend on the whole
        model is replaced by that backend, with a note in ``plan.notes`` (:func:`root_instead`).

    Returns
    -------
    TuneResult

    Raises
    ------
    TuneError
        Bad samples, modules, backends, bounds or strategy; a model in training mode or already tuned.
    """
    if not isinstance(model, torch.nn.Module):
        raise TuneError(f"model must be a torch.nn.Module, given {type(model).__name__}")
    if model.training:
        raise TuneError("model is in training mode; call model.eval() before tuning (dropout and batch-norm "
                        "statistics must not be compiled into an inference plan)")
    strategy = MinLatency() if strategy is None else strategy
    if not isinstance(strategy, Strategy):
        raise TuneError(f"strategy must be a kiln.tune Strategy (e.g. MinLatency()), given {type(strategy).__name__}")
    _check_not_tuned(model)
    names = resolve_backends(backends)
    samples = normalize_samples(samples)
    axes = detect_axes(samples, dynamic_bounds)
    sets = samples + bound_sets(samples, axes)
    paths = select_modules(model, modules, depth, min_params)
    tuner = _Tuner(model, sets, len(samples), names, strategy, tolerances, timing)
    sites = capture(model, sets, paths)
    table = Table(candidate_tree(paths), names)
    tuner.measure(sites, table)
    plan = strategy.choose(table)
    _check_plan(plan, table, tuner.builds, strategy)
    runners = {p: (b, tuner.builds[(p, b)][1].fn) for p, b in plan.replaced.items()}
    builds = {p: tuner.builds[(p, b)] for p, b in plan.replaced.items()}
    split = any(m != "" for m in plan.assign)
    # a split plan keeps the whole-model candidates until its end-to-end time is compared with them
    roots = {b: v for (p, b), v in tuner.builds.items() if p == ""} if split and check_end_to_end else {}
    tuner.builds.clear()  # free the candidates not chosen
    with torch.no_grad():
        root_refs = [flatten_outputs(original_forward(model)(*s)) for s in sets]
    apply_plan(model, runners)
    site_info = {s.path: {"axes": [a.to_json() for a in s.axes], "reason": s.reason} for s in sites}
    result = TuneResult(model, plan, table, strategy, axes, _input_specs(samples, axes), tuner.device, builds,
                        site_info)
    if check_end_to_end:
        result.end_to_end = tuner.end_to_end(result, table.get("", EAGER), root_refs)
        alt = root_instead(strategy, table, result.end_to_end) if split else None
        if alt is not None:
            e2e = result.end_to_end
            note = (f"the split plan measured {e2e['tuned_latency_ms']:.4g} / {e2e['tuned_throughput_ms']:.4g} ms "
                    f"end to end, worse for {strategy!r} than {alt} on the whole model: {alt} kept")
            log.info("kiln.tune: %s", note)
            result.restore()
            plan = Plan({"": alt}, *table.estimate({"": alt}), notes=tuple(plan.notes) + (note,))
            builds = {"": roots[alt]} if alt != EAGER else {}
            apply_plan(model, {"": (alt, roots[alt][1].fn)} if alt != EAGER else {})
            result = TuneResult(model, plan, table, strategy, axes, _input_specs(samples, axes), tuner.device, builds,
                                site_info)
            result.end_to_end = tuner.end_to_end(result, table.get("", EAGER), root_refs)
        roots.clear()
        for p in result.end_to_end["problems"]:
            log.warning("kiln.tune: the tuned model differs from eager on %s", p)
    return result
