"""Resolve a MODEL argument (CLI): an ``.onnx`` file, a ``module:factory`` path, or a zoo name."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

from .errors import UnknownModelError

__all__ = ["ResolvedModel", "resolve_model"]


@dataclass
class ResolvedModel:
    """A model ready for :func:`kiln.compile`, plus where it came from (recorded in the manifest)."""

    model: Any
    example_inputs: Any
    dynamic_shapes: Any
    source: dict


def _from_factory(spec: str, **kw) -> ResolvedModel:
    modname, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(modname), attr)
    except (ImportError, AttributeError) as e:
        raise UnknownModelError(f"cannot import factory {spec!r}: {e}") from None
    made = fn()
    # A factory returns (model, example_inputs[, dynamic_shapes]) or an object with those attributes.
    if isinstance(made, tuple):
        model, inputs, dyn = (made + (None,))[:3]
    elif hasattr(made, "model") and hasattr(made, "example_inputs"):
        model, inputs, dyn = made.model, made.example_inputs, getattr(made, "dynamic_shapes", None)
    else:
        raise UnknownModelError(
            f"factory {spec!r} returned {type(made).__name__}; expected (model, example_inputs[, dynamic_shapes])")
    return ResolvedModel(model, inputs, dyn, {"kind": "factory", "spec": spec})


def resolve_model(spec: str, size: str = "tiny", batch: int = 1, seq: int | None = None, dynamic: bool = False,
                  seed: int = 0) -> ResolvedModel:
    """Turn a CLI MODEL string into a model, example inputs and (optionally) dynamic shapes.

    Raises
    ------
    UnknownModelError
        Naming the three accepted forms and the zoo's names.
    """
    from . import zoo
    if spec.endswith(".onnx"):
        if not os.path.isfile(spec):
            raise UnknownModelError(f"ONNX file {spec!r} does not exist")
        return ResolvedModel(spec, None, None, {"kind": "onnx", "path": os.path.abspath(spec)})
    if ":" in spec:
        return _from_factory(spec)
    if spec in zoo.names():
        zm = zoo.get(spec, size=size, batch=batch, seq=seq, seed=seed)
        src = {"kind": "zoo", "name": spec, "size": size, "batch": batch, "seq": seq, "seed": seed}
        return ResolvedModel(zm.model, zm.example_inputs, zm.dynamic_shapes if dynamic else None, src)
    raise UnknownModelError(
        f"unknown model {spec!r}: give an .onnx file, a module:factory path, or one of the zoo's {zoo.names()}")
