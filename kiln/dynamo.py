"""``torch.compile(model, backend="kiln")``: every graph TorchDynamo captures is compiled with kiln.

Importing this module registers the backend under the name ``"kiln"`` (pyproject also declares the
``torch_dynamo_backends`` entry point, so torch finds it without an import once the package metadata
is installed). Per captured FX graph :func:`kiln_backend`:

1. refuses graphs kiln cannot take faithfully: in-place writes into graph inputs (kiln computes
   functionally, the caller's tensor would not change), non-tensor outputs, non-tensor inputs
   other than sizes, symbolic sizes that are not plain tensor dims;
2. exports the ``GraphModule`` with the real example inputs through :func:`kiln.compile` (cuda for
   inputs on a CUDA device, else llvm; option ``target``). Dynamic graphs (dynamo's automatic
   dynamic shapes) become kiln ``Dim``\\ s with dynamo's ranges; their size arguments are read off the
   tensors at run time;
3. checks the compiled graph against the graph run eagerly on (clones of) the example inputs, at
   ``kiln.verify.TOLERANCES``, and that the eager run left its inputs unchanged (option ``check``,
   default on).

Any refusal or failure (unsupported op, import error, mismatch, ...) falls back to running the
``GraphModule`` eagerly, logs the reason at WARNING on logger ``kiln.dynamo``, and is recorded:
:func:`fallbacks` lists ``(graph id, reason)``, :func:`graphs` every graph's record.

Options (``torch.compile(m, backend="kiln", options={...})``): ``target`` (``"cuda"``/``"llvm"``/...),
``check`` (bool), ``freeze`` (bool, default False: bind the graph's parameter inputs into the compiled
module as weights, so kiln can fold them; weights changed later are then NOT seen).
"""
from __future__ import annotations

import inspect
import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import KilnError
from .verify import TOLERANCES, compare

__all__ = ["kiln_backend", "fallbacks", "graphs", "reset", "GraphRecord", "register"]

log = logging.getLogger("kiln.dynamo")

_OPTIONS = ("target", "check", "freeze")


class GraphRefused(KilnError, NotImplementedError):
    """A captured graph kiln cannot compile faithfully (the reason says why)."""


@dataclass
class GraphRecord:
    """One captured graph: ``status`` is ``"kiln"`` or ``"eager"`` (fallback, with ``reason``)."""

    graph_id: int
    status: str
    reason: str = ""
    num_nodes: int = 0
    input_shapes: list = field(default_factory=list)
    dynamic_dims: dict = field(default_factory=dict)
    frozen: int = 0
    compile_s: float | None = None


_LOCK = threading.Lock()
_IDS = itertools.count()
_RECORDS: list[GraphRecord] = []


def graphs() -> list[GraphRecord]:
    """Every graph handled since the last :func:`reset`, in order."""
    with _LOCK:
        return list(_RECORDS)


def fallbacks() -> list[tuple[int, str]]:
    """``(graph id, reason)`` of every graph that fell back to eager."""
    return [(r.graph_id, r.reason) for r in graphs() if r.status == "eager"]


def reset() -> None:
    """Forget the records (graph ids keep counting)."""
    with _LOCK:
        _RECORDS.clear()


def _record(r: GraphRecord) -> None:
    with _LOCK:
        _RECORDS.append(r)


# --------------------------------------------------------------------------- checks
def _inplace_on_inputs(gm: torch.fx.GraphModule) -> list[str]:
    """In-place ops (``add_``, ``inplace=True``) whose target is a graph input: kiln computes
    functionally, so the caller's tensor would not be written. In-place ops on intermediates
    (``ReLU(inplace=True)`` after a conv) are fine; writes through views of inputs are caught at
    run time by :func:`_check`."""
    out = []
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method") or not n.args:
            continue
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        inplace = (name.endswith("_") and not name.endswith("__")) or n.kwargs.get("inplace") is True
        first = n.args[0]
        if inplace and isinstance(first, torch.fx.Node) and first.op == "placeholder":
            out.append(f"{name} on {first.name}")
    return sorted(set(out))


def _symbol(size) -> object | None:
    """The sympy symbol of a SymInt that is a plain symbol; None for ints."""
    if not isinstance(size, torch.SymInt):
        return None
    expr = size.node.expr
    if not getattr(expr, "is_Symbol", False):
        raise GraphRefused(f"symbolic size {expr} is not a plain dim (derived sizes are not supported)")
    return expr


def _finite(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError, AttributeError, OverflowError):  # sympy infinities (int_oo)
        return None


def _range(size) -> tuple[int, int | None]:
    """Dynamo's value range of a size symbol; at least 2 (dynamo specialises 0 and 1 anyway)."""
    vr = size.node.shape_env.var_to_range.get(size.node.expr)
    lo = _finite(vr.lower) if vr is not None else None
    hi = _finite(vr.upper) if vr is not None else None
    return max(lo or 2, 2), hi


@dataclass
class _Layout:
    """How the graph's example inputs map onto the compiled module's inputs."""

    tensor_idx: list          # graph input index of each compiled-module input
    frozen_idx: list          # graph input index of each frozen weight
    size_src: dict            # graph input index of a size argument -> (graph input index, dim)
    dims: dict                # symbol name -> (lo, hi)
    dyn: dict                 # graph input index -> {dim: symbol name}


def _layout(gm: torch.fx.GraphModule, example_inputs, freeze: bool) -> _Layout:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise GraphRefused(f"{len(placeholders)} placeholders but {len(example_inputs)} example inputs")
    lay = _Layout([], [], {}, {}, {})
    where: dict = {}
    sym_inputs = {}
    for i, (node, ex) in enumerate(zip(placeholders, example_inputs)):
        fake = node.meta.get("example_value", ex)
        if isinstance(ex, torch.Tensor):
            if freeze and isinstance(ex, torch.nn.Parameter):
                lay.frozen_idx.append(i)
                continue
            lay.tensor_idx.append(i)
            for d, size in enumerate(getattr(fake, "shape", ex.shape)):
                sym = _symbol(size)
                if sym is not None:
                    where.setdefault(str(sym), (i, d))
                    lay.dyn.setdefault(i, {})[d] = str(sym)
                    lay.dims[str(sym)] = _range(size)
        elif isinstance(ex, (torch.SymInt, int)):
            sym = _symbol(fake) if isinstance(fake, torch.SymInt) else None
            if sym is None:
                raise GraphRefused(f"input {i} ({node.name}) is a Python int, not a tensor")
            sym_inputs[i] = str(sym)
        else:
            raise GraphRefused(f"input {i} ({node.name}) is a {type(ex).__name__}, not a tensor")
    for i, sym in sym_inputs.items():
        if sym not in where:
            raise GraphRefused(f"size input {i} ({sym}) is not the size of any tensor input")
        lay.size_src[i] = where[sym]
    return lay


# --------------------------------------------------------------------------- compile
class _Graph(torch.nn.Module):
    """The graph as a module taking only its tensor inputs (sizes read off them; frozen weights as buffers)."""

    def __init__(self, gm: torch.fx.GraphModule, lay: _Layout, example_inputs):
        super().__init__()
        self.gm, self.lay = gm, lay
        self.n = len(example_inputs)
        for j, i in enumerate(lay.frozen_idx):
            self.register_buffer(f"w{j}", example_inputs[i].detach())
        # torch.export binds dynamic_shapes to forward's parameters: a *tensors forward would take
        # one nested spec; give this instance a forward with one named parameter per tensor input.
        run = type(self).forward.__get__(self, type(self))

        def forward(*tensors):
            return run(*tensors)

        forward.__signature__ = inspect.Signature(
            [inspect.Parameter(f"x{k}", inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in range(len(lay.tensor_idx))])
        self.forward = forward

    def forward(self, *tensors):
        args: list = [None] * self.n
        for t, i in zip(tensors, self.lay.tensor_idx):
            args[i] = t
        for j, i in enumerate(self.lay.frozen_idx):
            args[i] = getattr(self, f"w{j}")
        for i, (src, d) in self.lay.size_src.items():
            args[i] = args[src].shape[d]
        return tuple(self.gm(*args))


def _dynamic_shapes(lay: _Layout):
    if not lay.dyn:
        return None
    dims = {name: torch.export.Dim(name, min=lo, max=hi) if hi is not None else torch.export.Dim(name, min=lo)
            for name, (lo, hi) in lay.dims.items()}
    return tuple({d: dims[s] for d, s in lay.dyn.get(i, {}).items()} or None for i in lay.tensor_idx)


def _target(example_inputs, options: dict) -> str:
    if options.get("target"):
        return str(options["target"])
    cuda = any(isinstance(x, torch.Tensor) and x.device.type == "cuda" for x in example_inputs)
    return "cuda" if cuda else "llvm"


def _concrete(example_inputs) -> list:
    """Example inputs with sizes as plain ints (the hint: ``int()`` would add a guard)."""
    return [x.node.hint if isinstance(x, torch.SymInt) else x for x in example_inputs]


def _check(runner: Callable, gm, example_inputs, n_out: int) -> None:
    """Compiled vs eager graph on the example inputs; the eager run on clones must leave them unchanged."""
    args = _concrete(example_inputs)
    clones = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
    with torch.no_grad():
        ref = list(gm(*clones))
        out = runner(*args)
    for i, (a, c) in enumerate(zip(args, clones)):
        if isinstance(a, torch.Tensor) and not torch.equal(a.detach(), c):
            raise GraphRefused(f"graph writes into its input {i} (kiln computes functionally)")
    if len(out) != len(ref):
        raise GraphRefused(f"compiled graph gives {len(out)} outputs, eager {len(ref)}")
    for k, (o, r) in enumerate(zip(out, ref)):
        if o.dtype != r.dtype or o.shape != r.shape:
            raise GraphRefused(f"output {k}: compiled {o.dtype}{list(o.shape)}, eager {r.dtype}{list(r.shape)}")
        tol = TOLERANCES.get(str(r.dtype).replace("torch.", ""), 0.0)
        rel = compare([o], [r])["rel_err"]
        if not rel <= tol:
            raise GraphRefused(f"output {k}: max|err|/max|ref| = {rel:.3g} > tolerance {tol:g} vs the eager graph")


def _compile(gm: torch.fx.GraphModule, example_inputs, options: dict, rec: GraphRecord) -> Callable:
    import time

    import kiln
    bad = _inplace_on_inputs(gm)
    if bad:
        raise GraphRefused(f"graph writes into its inputs in place ({', '.join(bad)})")
    outs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    outs = outs if isinstance(outs, (tuple, list)) else [outs]
    out_vals = [getattr(o, "meta", {}).get("example_value") for o in outs]
    if not all(isinstance(v, torch.Tensor) for v in out_vals):
        raise GraphRefused("graph returns non-tensor outputs")
    lay = _layout(gm, example_inputs, bool(options.get("freeze", False)))
    rec.dynamic_dims = {k: list(v) for k, v in lay.dims.items()}
    rec.frozen = len(lay.frozen_idx)
    module = _Graph(gm, lay, _concrete(example_inputs))
    tensors = tuple(example_inputs[i].detach() for i in lay.tensor_idx)
    t0 = time.perf_counter()
    # Outside dynamo's tracing context: torch.export would otherwise add its own guards (on its
    # inputs' names) to the frame dynamo is compiling, which then fails its guard self-check.
    with torch._guards.tracing(None):
        art = kiln.compile(module, tensors, target=_target(example_inputs, options),
                           dynamic_shapes=_dynamic_shapes(lay), progress=False)
    rec.compile_s = time.perf_counter() - t0
    kmod = art.module()
    idx = lay.tensor_idx

    def runner(*args):
        res = kmod(*[args[i].detach() for i in idx])
        return [res] if isinstance(res, torch.Tensor) else list(res)

    if options.get("check", True):
        _check(runner, gm, example_inputs, len(out_vals))
    return runner


def kiln_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, **kwargs) -> Callable:
    """The ``torch.compile`` backend: compile ``gm`` with kiln, or fall back to it with a logged reason.

    Parameters
    ----------
    gm : torch.fx.GraphModule
        A graph captured by TorchDynamo.
    example_inputs : list
        Its real example inputs (tensors, parameters, and ``SymInt`` sizes for dynamic graphs).
    options : dict, optional
        ``target``, ``check``, ``freeze`` (see the module docstring). Unknown keys are refused.

    Returns
    -------
    callable
        Same inputs and outputs as ``gm``.
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise KilnError(f"unknown kiln backend option(s) {unknown}; known: {list(_OPTIONS)}")
    rec = GraphRecord(next(_IDS), "kiln", num_nodes=len(gm.graph.nodes),
                      input_shapes=[list(x.shape) if isinstance(x, torch.Tensor) else str(x) for x in example_inputs])
    try:
        fn = _compile(gm, list(example_inputs), options, rec)
    except Exception as e:  # noqa: BLE001 - every failure falls back, with its reason
        rec.status, rec.reason = "eager", f"{type(e).__name__}: {e}".replace("\n", " ")[:500]
        log.warning("kiln.dynamo: graph %d falls back to eager: %s", rec.graph_id, rec.reason)
        _record(rec)
        return gm.forward
    log.info("kiln.dynamo: graph %d compiled with kiln (%d nodes, %.2f s)", rec.graph_id, rec.num_nodes,
             rec.compile_s or 0.0)
    _record(rec)
    return fn


def register() -> None:
    """Register :func:`kiln_backend` with TorchDynamo as ``"kiln"`` (idempotent).

    Leaves the name alone when torch found it through the ``torch_dynamo_backends`` entry point:
    torch registers the entry point's function itself right after importing this module.
    """
    from torch._dynamo.backends import registry
    if registry._BACKENDS.get("kiln") is not None:  # an EntryPoint torch is about to load
        return
    if "kiln" in registry._COMPILER_FNS:
        return
    registry.register_backend(kiln_backend, name="kiln")


register()
