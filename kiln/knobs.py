"""The one registry of kiln's environment knobs (Triton ``knobs.py`` style).

Every ``KILN_*`` variable kiln reads is declared here, typed and documented; no other module reads
``os.environ`` for configuration. ``knobs.scope(name=value)`` overrides knobs in tests without leaking.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

__all__ = ["Knob", "knobs", "get", "scope", "describe"]


@dataclass(frozen=True)
class Knob:
    """One environment knob: ``env`` is read at each access, parsed by ``parse``."""

    name: str
    env: str
    default: Any
    parse: Callable[[str], Any]
    doc: str


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (1/0/true/false), got {s!r}")


def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"expected an integer, got {s!r}") from None


def _path(s: str) -> str:
    return os.path.expanduser(s)


_REGISTRY: dict[str, Knob] = {}
_OVERRIDES: dict[str, Any] = {}


def _declare(name, env, default, parse, doc):
    _REGISTRY[name] = Knob(name, env, default, parse, doc)


_declare("nvcc", "KILN_NVCC", "nvcc", _path, "nvcc used to precompile CUDA kernels to cubin at export.")
_declare("lld", "KILN_LLD", "", _path, "ld.lld (>= 17) used to link gfx942 code objects; empty = search PATH.")
_declare("cuda_fast_math", "KILN_CUDA_FAST_MATH", False, _bool,
         "Compile CUDA kernels with --use_fast_math (TVM's NVRTC default). Off: it turned the fp16 causal-mask "
         "softmax of GPT-2/Llama into NaN on the H200 and gained nothing on BERT (benchmarks/NOTES.md).")
_declare("progress", "KILN_PROGRESS", True, _bool, "Show a progress display for compiles longer than a second.")
_declare("tables_dir", "KILN_TABLES_DIR", "", _path,
         "Directory of tuned kernel tables (<arch>_<kernel>.csv); empty = the tables shipped in kiln/schedules/tables.")
_declare("cuda_graph", "KILN_CUDA_GRAPH", True, _bool, "Use CUDA graphs for static-shape cuda builds.")
_declare("prove_rewrites", "KILN_PROVE_REWRITES", True, _bool,
         "Prove each fusion rule instance (GEMM epilogue stage list, sibling-GEMM group form, attention rule "
         "instance) with z3 before a pass applies it; a rule whose proof does not succeed is refused with the "
         "reason (kiln/verify/symbolic.py, kiln/verify/attention_proof.py).")
_declare("verify_hashes", "KILN_VERIFY_HASHES", True, _bool, "Verify artifact SHA-256 on load.")
_declare("strict", "KILN_STRICT", False, _bool, "Make a generic-schedule fallback on a hot op an error.")
_declare("num_threads", "KILN_NUM_THREADS", 0, _int, "CPU threads for llvm builds (0 = all cores).")


def get(name: str) -> Any:
    """Current value of knob ``name``: a scope override, else the environment, else the default."""
    knob = _REGISTRY[name]
    if name in _OVERRIDES:
        return _OVERRIDES[name]
    raw = os.environ.get(knob.env)
    if raw is None:
        return knob.default
    try:
        return knob.parse(raw)
    except ValueError as e:
        raise ValueError(f"Unable to use {knob.env}={raw!r}: {e}") from None


@contextlib.contextmanager
def scope(**values: Any) -> Iterator[None]:
    """Override knobs inside a ``with`` block (tests)."""
    unknown = set(values) - set(_REGISTRY)
    if unknown:
        raise KeyError(f"unknown knob(s): {sorted(unknown)}; known: {sorted(_REGISTRY)}")
    saved = dict(_OVERRIDES)
    _OVERRIDES.update(values)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)


def describe() -> list[tuple[str, str, Any, str]]:
    """(name, env var, current value, doc) for every knob, for ``kiln inspect`` and the docs."""
    return [(k.name, k.env, get(k.name), k.doc) for k in _REGISTRY.values()]


class _Namespace:
    def __getattr__(self, name: str) -> Any:
        if name not in _REGISTRY:
            raise AttributeError(f"no knob named {name!r}")
        return get(name)


knobs = _Namespace()
_declare("tune_cache_dir", "KILN_TUNE_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "kiln", "tune"),
         _path, "Where kiln.jit keeps tuned models between processes (one directory per cache key).")
_declare("ops_cache_dir", "KILN_OPS_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "kiln", "ops"),
         _path, "Where kiln.ops keeps its built kernels between processes (one directory per cache key).")
