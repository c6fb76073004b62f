"""The backends :func:`kiln.tune` can build a module with: a small registry, name -> :class:`Backend`.

Built in:

``"torch"``
    Eager, the module as it is: the reference every candidate is validated against, and the
    fallback (always part of a tuning run).
``"kiln"``
    :func:`kiln.compile` (target ``cuda`` for a module on a CUDA device, ``llvm`` on the CPU), with
    the module's detected dynamic axes as ``torch.export`` dims. Saved as a kiln artifact.
``"inductor"``
    ``torch.compile`` (default mode; ``dynamic=True`` when the module has dynamic axes). The build
    calls it once so the compile time lands in ``build_s``. Not serialisable: a loaded plan wraps
    the module again and torch compiles it on its first call (from inductor's own cache when warm).
    :func:`inductor_backend` makes variants (``mode="max-autotune"``, ``"reduce-overhead"``).
``"tvm"``
    Stock TVM (:mod:`kiln.tune.stock_tvm`). Saved as one shared library.

A builder takes a :class:`BuildRequest` and returns a callable with the module's positional
signature and output structure (or a :class:`Built`). Tests register deliberately wrong backends
with :func:`register_backend`; validation keeps them from ever being chosen.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..errors import TuneError
from .capture import OutSpec
from .strategy import EAGER

__all__ = ["BuildRequest", "Built", "Backend", "register_backend", "unregister_backend", "get_backend",
           "backend_names", "resolve_backends", "inductor_backend", "original_forward", "kiln_target"]


@dataclass
class BuildRequest:
    """Everything a builder gets.

    Attributes
    ----------
    path : str
        The module's qualified name (``""``: the root).
    module : torch.nn.Module
        The module, unchanged (its ``forward`` is the original one).
    example_args : tuple of torch.Tensor
        Positional inputs captured from the samples (the largest set whose dynamic dims are >= 2).
    dynamic_shapes : tuple of dict or None
        ``torch.export`` dynamic_shapes, one ``{dim: Dim}`` per input; None when static.
    device : str
        ``"cpu"`` or ``"cuda[:N]"``: where the inputs live.
    out_spec : OutSpec
        The structure of the module's result (flat backends rebuild it with ``out_spec.rebuild``).
    """

    path: str
    module: torch.nn.Module
    example_args: tuple
    dynamic_shapes: Any
    device: str
    out_spec: OutSpec


@dataclass
class Built:
    """A built candidate: ``fn`` runs it; ``payload`` is what the backend's ``save`` needs."""

    fn: Callable
    payload: Any = None
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Backend:
    """A registered backend.

    Attributes
    ----------
    name : str
    build : callable
        ``build(req: BuildRequest) -> Built | callable``.
    save : callable or None
        ``save(built, directory, req) -> dict`` writes the payload's files into ``directory`` and
        returns JSON metadata; None: choices of this backend cannot be saved.
    load : callable or None
        ``load(meta, directory, module, device, out_spec) -> callable or None`` restores the runner
        (None: keep the module's own forward).
    description : str
    """

    name: str
    build: Callable
    save: Callable | None = None
    load: Callable | None = None
    description: str = ""


_REGISTRY: dict[str, Backend] = {}


def register_backend(name: "str | Backend", build: Callable | None = None, save: Callable | None = None,
                     load: Callable | None = None, description: str = "", replace: bool = False) -> Backend:
    """Add a backend (a :class:`Backend`, or its name and functions); ``replace=True`` overwrites one.

    Returns
    -------
    Backend
    """
    b = name if isinstance(name, Backend) else Backend(name, build, save, load, description)
    if not b.name or not isinstance(b.name, str):
        raise TuneError(f"a backend name must be a non-empty string, given {b.name!r}")
    if not callable(b.build):
        raise TuneError(f"backend {b.name!r}: build must be callable, given {type(b.build).__name__}")
    if b.name in _REGISTRY and not replace:
        raise TuneError(f"backend {b.name!r} is already registered (pass replace=True to overwrite it)")
    _REGISTRY[b.name] = b
    return b


def unregister_backend(name: str) -> None:
    """Remove a backend added with :func:`register_backend` (the built-in ones stay)."""
    if name in _BUILTIN:
        raise TuneError(f"backend {name!r} is built in and cannot be removed")
    _REGISTRY.pop(name, None)


def get_backend(name: str) -> Backend:
    if name not in _REGISTRY:
        raise TuneError(f"unknown backend {name!r}; registered: {backend_names()}")
    return _REGISTRY[name]


def backend_names() -> list[str]:
    return list(_REGISTRY)


def resolve_backends(names: Sequence[str]) -> tuple[str, ...]:
    """Check ``names`` against the registry, drop repeats, and add ``"torch"`` at the end if absent."""
    if isinstance(names, str) or not names:
        raise TuneError(f"backends must be a non-empty sequence of names, given {names!r}")
    out: list[str] = []
    for n in names:
        get_backend(n)
        if n not in out:
            out.append(n)
    if EAGER not in out:
        out.append(EAGER)
    return tuple(out)


# --------------------------------------------------------------------------- helpers
def original_forward(module: torch.nn.Module) -> Callable:
    """The class's ``forward`` bound to ``module``: unaffected by a ``forward`` patched onto the instance."""
    return type(module).forward.__get__(module, type(module))


def _flat_list(res) -> list:
    if isinstance(res, torch.Tensor):
        return [res]
    return list(res)


def _structured(flat_fn: Callable, spec: OutSpec) -> Callable:
    """Wrap a runner returning flat tensors so it returns the module's structure."""
    def run(*args):
        return spec.rebuild(_flat_list(flat_fn(*[a.detach() for a in args])))
    return run


def kiln_target(device: str) -> str:
    """kiln's compile target for tensors on ``device``."""
    return "cuda" if str(device).startswith("cuda") else "llvm"


# --------------------------------------------------------------------------- torch (eager)
def _torch_build(req: BuildRequest) -> Built:
    return Built(original_forward(req.module))


def _torch_save(built, directory, req) -> dict:
    return {}


def _torch_load(meta, directory, module, device, spec):
    return None


# --------------------------------------------------------------------------- inductor
def inductor_backend(mode: str | None = None, name: str | None = None) -> Backend:
    """A ``torch.compile`` backend with ``mode`` (e.g. ``"max-autotune"``), named ``inductor-<mode>``
    unless ``name`` is given; add it with ``register_backend(inductor_backend("max-autotune"))``."""
    label = name or ("inductor" if mode is None else f"inductor-{mode}")

    def compile_fn(module, dynamic: bool):
        return torch.compile(original_forward(module), mode=mode, dynamic=dynamic)

    def build(req: BuildRequest) -> Built:
        fn = compile_fn(req.module, req.dynamic_shapes is not None)
        with torch.no_grad():
            fn(*req.example_args)  # compile now, so build_s holds the compile time
        return Built(fn, payload=None, info={"mode": mode or "default"})

    def save(built, directory, req) -> dict:
        return {"mode": mode, "dynamic": req.dynamic_shapes is not None}

    def load(meta, directory, module, device, spec):
        return compile_fn(module, bool(meta.get("dynamic")))

    return Backend(label, build, save, load, f"torch.compile (mode {mode or 'default'}); rebuilt lazily on load")


# --------------------------------------------------------------------------- kiln
def _kiln_build(req: BuildRequest) -> Built:
    import kiln
    art = kiln.compile(req.module, req.example_args, target=kiln_target(req.device),
                       dynamic_shapes=req.dynamic_shapes, progress=False)
    runner = art.module(req.device if str(req.device).startswith("cuda") else "cpu")
    return Built(_structured(runner, req.out_spec), payload=art,
                 info={"fallbacks": len(art.fallbacks()), "notes": list(art.notes)})


def _kiln_save(built, directory, req) -> dict:
    built.payload.export(os.path.join(directory, "artifact"))
    return {"artifact": "artifact"}


def _kiln_load(meta, directory, module, device, spec):
    import kiln
    runner = kiln.load(os.path.join(directory, meta["artifact"]), device=device if device.startswith("cuda") else "cpu")
    return _structured(runner, spec)


# --------------------------------------------------------------------------- stock TVM
def _tvm_build(req: BuildRequest) -> Built:
    from .stock_tvm import StockRunner, compile_stock
    ex = compile_stock(req.module, req.example_args, req.dynamic_shapes, req.device)
    return Built(_structured(StockRunner(ex, req.device), req.out_spec), payload=ex)


def _tvm_save(built, directory, req) -> dict:
    from .stock_tvm import export_stock
    info = export_stock(built.payload, os.path.join(directory, "stock.so"), req.device)
    return {"library": "stock.so", "device_code": info.get("device_code")}


def _tvm_load(meta, directory, module, device, spec):
    from .stock_tvm import load_stock
    return _structured(load_stock(os.path.join(directory, meta["library"]), device), spec)


_BUILTIN = ("torch", "kiln", "inductor", "tvm")
register_backend("torch", _torch_build, _torch_save, _torch_load, "eager PyTorch (reference and fallback)")
register_backend("kiln", _kiln_build, _kiln_save, _kiln_load, "kiln.compile (cuda or llvm)")
register_backend(inductor_backend())
register_backend("tvm", _tvm_build, _tvm_save, _tvm_load, "stock TVM (from_exported_program + tvm.compile)")
