"""Per-module backend selection: ``kiln.tune(model, samples, backends=..., strategy=...)``.

``kiln.tune`` is this package, and the package is callable: ``kiln.tune(...)`` is
:func:`kiln.tune.tune`. Keeping the name a module (rather than rebinding ``kiln.tune`` to a function)
leaves ``kiln.tune.<submodule>`` importable, e.g. a future ``kiln.tune.gemm``.

>>> result = kiln.tune(model, [x_small, x_large], backends=("kiln", "torch", "inductor", "tvm"),
...                    strategy=kiln.tune.MinLatency())
>>> print(result.report())
>>> kiln.save(result, "out/tuned")
>>> kiln.load_tuned(fresh_model, "out/tuned")     # in another process: no tuning, no warm-up compile
>>> fast = kiln.jit(model)                        # tunes on the first call, cached on disk

Modules: :mod:`~kiln.tune.capture` (candidates, captured inputs, dynamic axes),
:mod:`~kiln.tune.backends` (the backend registry), :mod:`~kiln.tune.strategy` (table, plans,
strategies), :mod:`~kiln.tune.timing`, :mod:`~kiln.tune.core` (the driver), :mod:`~kiln.tune.store`
(save / load), :mod:`~kiln.tune.jit_cache`, :mod:`~kiln.tune.report`, :mod:`~kiln.tune.stock_tvm`.
"""
from __future__ import annotations

import inspect as _inspect
import sys as _sys
import types as _types

from .backends import (Backend, BuildRequest, Built, backend_names, get_backend, inductor_backend, register_backend,
                       unregister_backend)
from .capture import Axis, OutSpec
from .core import DEFAULT_BACKENDS, TuneResult, tune
from .jit_cache import JitModel, cache_key, jit
from .store import load_tuned, save
from .strategy import (FirstWins, HighestThroughput, LatencyBudget, Measurement, MinLatency, OneBackend, Plan,
                       Strategy, Table)
from .timing import TimingConfig

__all__ = [
    "tune", "save", "load_tuned", "jit", "JitModel", "cache_key", "TuneResult", "DEFAULT_BACKENDS",
    "Strategy", "FirstWins", "OneBackend", "HighestThroughput", "MinLatency", "LatencyBudget",
    "Table", "Measurement", "Plan", "TimingConfig", "Axis", "OutSpec",
    "Backend", "BuildRequest", "Built", "register_backend", "unregister_backend", "get_backend", "backend_names",
    "inductor_backend",
]


class _CallableModule(_types.ModuleType):
    """The type of this package: calling it calls :func:`tune`."""

    def __call__(self, *args, **kwargs):
        return tune(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
__signature__ = _inspect.signature(tune)
