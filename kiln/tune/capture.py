"""What :func:`kiln.tune` tunes: the candidate modules, their captured inputs, and their dynamic axes.

Flow:

1. :func:`normalize_samples` turns the caller's samples into a list of input tuples and checks that
   they agree on count, dtype and rank.
2. :func:`detect_axes` finds the root's dynamic axes: every (input, dim) whose size differs between
   samples. Dims whose sizes move together across all samples are one axis (a batch shared by two
   inputs must be one ``torch.export.Dim``); the axis made only of dim-0 entries is ``batch``.
3. :func:`bound_sets` synthesises extra input sets at the axes' bounds (if the caller widened them
   beyond the samples) by slicing or tiling the first sample along each axis.
4. :func:`select_modules` picks the candidate modules and :func:`candidate_tree` links each to its
   nearest candidate ancestor.
5. :func:`capture` runs the model eagerly once per input set with forward pre-hooks on every
   candidate and keeps a detached clone of every call's arguments (clones: a later in-place op,
   e.g. ``ReLU(inplace=True)``, must not change what was captured).
6. :func:`module_axes` derives each module's own dynamic dims (names and ranges) from its captured
   calls, so a root batch range of [1, 64] becomes the range of every module input it flows into.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import TuneError

__all__ = ["Axis", "Call", "Site", "OutSpec", "normalize_samples", "detect_axes", "bound_sets", "select_modules",
           "candidate_tree", "capture", "module_axes", "display_name"]


def display_name(path: str) -> str:
    """How a module path is shown to people: the root is ``<root>``."""
    return path or "<root>"


# --------------------------------------------------------------------------- samples and root axes
def normalize_samples(samples) -> list[tuple]:
    """The caller's samples as a list of input tuples.

    A tensor is one single-input sample; a tuple is one sample; a list holds several samples, each a
    tensor or a tuple. Raises :class:`TuneError` on anything else, or when samples disagree on the
    number, dtype or rank of their inputs.
    """
    if isinstance(samples, torch.Tensor):
        sets = [(samples,)]
    elif isinstance(samples, tuple):
        sets = [samples]
    elif isinstance(samples, list) and samples:
        sets = [s if isinstance(s, tuple) else (s,) for s in samples]
    else:
        raise TuneError(f"samples must be a tensor, a tuple of tensors or a non-empty list of them, "
                        f"given {type(samples).__name__}")
    first = sets[0]
    for k, s in enumerate(sets):
        for i, x in enumerate(s):
            if not isinstance(x, torch.Tensor):
                raise TuneError(f"sample {k}, input {i}: expected a torch.Tensor, given {type(x).__name__}")
        if len(s) != len(first):
            raise TuneError(f"sample {k} has {len(s)} inputs, sample 0 has {len(first)}")
        for i, (a, b) in enumerate(zip(s, first)):
            if a.dtype != b.dtype or a.dim() != b.dim():
                raise TuneError(f"sample {k}, input {i}: {a.dtype} rank {a.dim()}, sample 0 has "
                                f"{b.dtype} rank {b.dim()}")
    return sets


@dataclass(frozen=True)
class Axis:
    """A dynamic axis: the (input, dim) pairs whose sizes move together, and its [lo, hi] range."""

    name: str
    members: tuple[tuple[int, int], ...]
    sizes: tuple[int, ...]          # the size in each input set it was detected on
    lo: int
    hi: int

    def to_json(self) -> dict:
        return {"name": self.name, "members": [list(m) for m in self.members], "lo": self.lo, "hi": self.hi}


def _group_axes(shape_lists: list[list[tuple[int, ...]]], prefer_batch: bool = True) -> list[Axis]:
    """Axes of inputs seen with ``shape_lists[k][i]`` = shape of input i in observation k."""
    groups: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for i, shape in enumerate(shape_lists[0]):
        for d in range(len(shape)):
            sizes = tuple(obs[i][d] for obs in shape_lists)
            if len(set(sizes)) > 1:
                groups.setdefault(sizes, []).append((i, d))
    axes, n = [], 0
    for sizes, members in groups.items():
        if prefer_batch and all(d == 0 for _, d in members) and not any(a.name == "batch" for a in axes):
            name = "batch"
        else:
            n += 1
            name = f"dyn{n}"
        axes.append(Axis(name, tuple(members), sizes, min(sizes), max(sizes)))
    return axes


def detect_axes(sets: Sequence[tuple], bounds: dict | None = None) -> list[Axis]:
    """Dynamic axes of the root inputs, with ranges: observed min/max unless ``bounds[name]`` is given.

    Raises
    ------
    TuneError
        ``bounds`` names an axis that was not detected, or a range that excludes an observed size.
    """
    axes = _group_axes([[tuple(x.shape) for x in s] for s in sets])
    bounds = dict(bounds or {})
    unknown = set(bounds) - {a.name for a in axes}
    if unknown:
        raise TuneError(f"dynamic_bounds names axes {sorted(unknown)}; detected axes: "
                        f"{[a.name for a in axes] or 'none (give samples of two sizes)'}")
    out = []
    for a in axes:
        lo, hi = (int(v) for v in bounds.get(a.name, (a.lo, a.hi)))
        if lo < 1 or lo > a.lo or hi < a.hi:
            raise TuneError(f"dynamic_bounds[{a.name!r}] = ({lo}, {hi}) must be >= 1 and contain the sample "
                            f"sizes {sorted(set(a.sizes))}")
        out.append(Axis(a.name, a.members, a.sizes, lo, hi))
    return out


def _resize(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """``x`` sliced or tiled along ``dim`` to size ``n`` (tiling keeps integer ids valid)."""
    if n <= x.shape[dim]:
        return x.narrow(dim, 0, n).clone()
    reps = -(-n // x.shape[dim])
    return torch.cat([x] * reps, dim=dim).narrow(dim, 0, n).clone()


def bound_sets(sets: Sequence[tuple], axes: Sequence[Axis]) -> list[tuple]:
    """Input sets with every axis at its lower bound, and at its upper bound, unless a sample has them."""
    if not axes:
        return []
    have = {tuple(tuple(x.shape) for x in s) for s in sets}
    out = []
    for pick in (lambda a: a.lo, lambda a: a.hi):
        new = list(sets[0])
        for a in axes:
            for i, d in a.members:
                new[i] = _resize(new[i], d, pick(a))
        if tuple(tuple(x.shape) for x in new) not in have:
            have.add(tuple(tuple(x.shape) for x in new))
            out.append(tuple(new))
    return out


# --------------------------------------------------------------------------- candidate modules
def _param_count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def select_modules(model: torch.nn.Module, modules: Sequence[str] | None = None, depth: int = 1,
                   min_params: int = 1) -> list[str]:
    """Candidate module paths (``""`` is the root), parents before children.

    Default: the root plus every module at most ``depth`` levels below it that holds at least
    ``min_params`` parameters (parameter-free glue such as activations is not worth a build).
    ``modules`` (qualified names as in ``named_modules``) replaces the default; the root is always
    a candidate.
    """
    named = dict(model.named_modules())
    if modules is not None:
        missing = [m for m in modules if m not in named]
        if missing:
            raise TuneError(f"modules {missing} are not in the model; some valid names: {list(named)[1:8]}")
        picked = {""} | set(modules)
    else:
        if depth < 0:
            raise TuneError(f"depth must be >= 0, given {depth}")
        picked = {p for p, m in named.items()
                  if p == "" or (p.count(".") < depth and _param_count(m) >= min_params)}
    return [p for p in named if p in picked]  # named_modules order: parents first


def _is_ancestor(a: str, b: str) -> bool:
    return a == "" and b != "" or b.startswith(a + ".")


def candidate_tree(paths: Sequence[str]) -> dict[str, list[str]]:
    """Each candidate's nearest candidate descendants (its children in the tuning tree)."""
    children: dict[str, list[str]] = {p: [] for p in paths}
    for p in paths:
        if p == "":
            continue
        parent = max((q for q in paths if _is_ancestor(q, p)), key=len)
        children[parent].append(p)
    return children


# --------------------------------------------------------------------------- capture
@dataclass
class Call:
    """One captured call of a module: positional and keyword arguments (tensors detached and cloned)."""

    args: tuple
    kwargs: dict

    def fresh(self) -> tuple:
        """Clones of the positional arguments (a module may write into its inputs)."""
        return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in self.args)


@dataclass
class Site:
    """A candidate module and everything captured about it.

    Attributes
    ----------
    path : str
        Qualified name (``""``: the root).
    module : torch.nn.Module
    calls : list of list of Call
        ``calls[k]``: the calls made while the model ran on input set ``k``.
    reason : str or None
        Why only eager can run it (keyword or non-tensor arguments, not called, ...).
    axes : list of Axis
        Its own dynamic axes (members index its positional inputs).
    """

    path: str
    module: torch.nn.Module
    calls: list = field(default_factory=list)
    reason: str | None = None
    axes: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return display_name(self.path)

    def example_set(self) -> int:
        """The input set to build from: the largest whose dynamic dims are all >= 2 (torch.export
        specialises sizes 0 and 1), else the largest."""
        def size(k):
            return sum(a.numel() for c in self.calls[k] for a in c.args if isinstance(a, torch.Tensor))
        ok = [k for k in range(len(self.calls))
              if all(self.calls[k][0].args[i].shape[d] >= 2 for a in self.axes for i, d in a.members)]
        return max(ok or range(len(self.calls)), key=size)

    def dynamic_shapes(self) -> tuple | None:
        """``torch.export`` dynamic_shapes (one dict per positional input) or None when static."""
        if not self.axes:
            return None
        dims = {a.name: torch.export.Dim(a.name, min=a.lo, max=a.hi) for a in self.axes}
        per_input: list[dict] = [{} for _ in self.calls[0][0].args]
        for a in self.axes:
            for i, d in a.members:
                per_input[i][d] = dims[a.name]
        return tuple(per_input)


def _clone(v):
    return v.detach().clone() if isinstance(v, torch.Tensor) else v


def capture(model: torch.nn.Module, sets: Sequence[tuple], paths: Sequence[str]) -> list[Site]:
    """Run ``model`` on every input set, recording the calls of every candidate module."""
    named = dict(model.named_modules())
    sites = [Site(p, named[p], [[] for _ in sets]) for p in paths]
    current = [0]
    handles = []

    def hook_for(site):
        def pre(_mod, args, kwargs):
            site.calls[current[0]].append(Call(tuple(_clone(a) for a in args),
                                               {k: _clone(v) for k, v in kwargs.items()}))
        return pre

    try:
        for s in sites:
            handles.append(s.module.register_forward_pre_hook(hook_for(s), with_kwargs=True))
        with torch.no_grad():
            for k, inputs in enumerate(sets):
                current[0] = k
                model(*inputs)
    finally:
        for h in handles:
            h.remove()
    for s in sites:
        s.reason = _ineligible(s)
        if s.reason is None:
            s.axes = module_axes(s)
    return sites


def _ineligible(site: Site) -> str | None:
    counts = {len(c) for c in site.calls}
    if counts == {0}:
        return "not called on the samples"
    if len(counts) != 1:
        return f"called a different number of times per input set ({sorted(counts)})"
    for calls in site.calls:
        for c in calls:
            if c.kwargs:
                return f"called with keyword arguments {sorted(c.kwargs)} (compiled backends take positional tensors)"
            bad = [type(a).__name__ for a in c.args if not isinstance(a, torch.Tensor)]
            if bad:
                return f"called with non-tensor arguments ({', '.join(bad)})"
    ranks = [[(a.dtype, a.dim()) for a in c.args] for calls in site.calls for c in calls]
    if any(r != ranks[0] for r in ranks):
        return "calls disagree on the number, dtype or rank of their inputs"
    return None


def module_axes(site: Site) -> list[Axis]:
    """A module's dynamic dims from all its captured calls; ranges are the observed min/max.

    A module called several times per forward at different shapes gets those dims dynamic too:
    one build must serve every call."""
    obs = [[tuple(a.shape) for a in c.args] for calls in site.calls for c in calls]
    return _group_axes(obs)


# --------------------------------------------------------------------------- output structure
class OutSpec:
    """The nesting of a forward's result, so flat backend outputs can be rebuilt into it.

    Tensors are leaves, in the order :func:`kiln.verify.flatten_outputs` gives them (tuple/list
    order, dict insertion order, ``None`` skipped); ``None``, bools, ints, floats and strings are
    kept as constants. Dict subclasses (``OrderedDict``, transformers ``ModelOutput``) are rebuilt
    with their class.
    """

    def __init__(self, tree):
        self.tree = tree

    @staticmethod
    def of(obj) -> "OutSpec":
        return OutSpec(OutSpec._spec(obj))

    @staticmethod
    def _spec(o):
        if isinstance(o, torch.Tensor):
            return ["T"]
        if o is None or isinstance(o, (bool, int, float, str)):
            return ["C", o]
        if isinstance(o, (tuple, list)):
            return ["tuple" if isinstance(o, tuple) else "list", [OutSpec._spec(v) for v in o]]
        if isinstance(o, dict):
            cls = type(o)
            return ["dict", f"{cls.__module__}:{cls.__qualname__}", [[k, OutSpec._spec(v)] for k, v in o.items()]]
        raise TuneError(f"a forward output of type {type(o).__name__} cannot be rebuilt (tensors, tuples, lists, "
                        "dicts and None only)")

    @property
    def num_tensors(self) -> int:
        def count(t):
            if t[0] == "T":
                return 1
            if t[0] in ("tuple", "list"):
                return sum(count(v) for v in t[1])
            if t[0] == "dict":
                return sum(count(v) for _, v in t[2])
            return 0
        return count(self.tree)

    def rebuild(self, flat: Sequence[torch.Tensor]):
        """The structured result from its tensors in flat order."""
        if len(flat) != self.num_tensors:
            raise TuneError(f"expected {self.num_tensors} output tensor(s), given {len(flat)}")
        it = iter(flat)

        def build(t):
            kind = t[0]
            if kind == "T":
                return next(it)
            if kind == "C":
                return t[1]
            if kind in ("tuple", "list"):
                vals = [build(v) for v in t[1]]
                return tuple(vals) if kind == "tuple" else vals
            items = [(k, build(v)) for k, v in t[2]]
            cls = _import_class(t[1])
            return cls(**dict(items)) if _kw_constructible(cls) else cls(items)
        return build(self.tree)

    def to_json(self):
        return self.tree

    @staticmethod
    def from_json(tree) -> "OutSpec":
        return OutSpec(tree)


def _kw_constructible(cls) -> bool:
    # transformers ModelOutput takes fields as keywords; dict/OrderedDict take an item list.
    return cls.__module__.split(".")[0] not in ("builtins", "collections")


@functools.lru_cache(maxsize=None)
def _import_class(name: str):
    mod, _, qual = name.partition(":")
    obj: Any = importlib.import_module(mod)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj
