"""``kiln.jit``: tune on the first call, keep the result on disk, reuse it in later processes.

The cache directory (argument, else knob ``tune_cache_dir``) holds one saved tuned model
(:func:`kiln.save` layout) per key. The key is a SHA-256 over everything that changes the answer:
the module tree and classes, every parameter/buffer name, dtype, shape and bytes, the source of
every module class's ``forward``, the input dtypes and shapes of every sample, the backends (in
order), the strategy and the other tuning options, the kiln / TVM / TVM-FFI / torch versions and the
device (with the GPU's name). A hit is loaded with :func:`kiln.load_tuned` (no tuning, no warm-up
compile for kiln and eager choices); a miss is tuned and saved. An unreadable or tampered entry is
logged at WARNING and tuned again (the entry is then replaced).

A call whose inputs do not fit the tuned inputs (:meth:`TuneResult.accepts`) restores the model and
prepares again for those inputs (from the cache or by tuning).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os

import torch

from .. import knobs
from ..errors import ArtifactError, TuneError
from ..target.artifact import MANIFEST
from .backends import resolve_backends
from .capture import normalize_samples
from .core import DEFAULT_BACKENDS, TuneResult, tune
from .store import _structure, _versions, load_tuned, save, weights_digest

__all__ = ["JitModel", "jit", "cache_key"]

log = logging.getLogger("kiln.tune")


def _forward_sources(model: torch.nn.Module) -> list:
    out = {}
    for m in model.modules():
        cls = type(m)
        name = f"{cls.__module__}.{cls.__qualname__}"
        if name not in out:
            try:
                out[name] = inspect.getsource(cls.forward)
            except (OSError, TypeError):
                code = getattr(cls.forward, "__code__", None)
                out[name] = code.co_code.hex() if code is not None else repr(cls.forward)
    return sorted(out.items())


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def cache_key(model: torch.nn.Module, samples, backends=DEFAULT_BACKENDS, strategy=None, **options) -> str:
    """The JIT cache key (hex SHA-256) of tuning ``model`` on ``samples`` with these settings."""
    sets = normalize_samples(samples)
    device = str(sets[0][0].device)
    doc = {
        "structure": _structure(model),
        "weights": weights_digest(model),
        "forward": [[n, hashlib.sha256(src.encode()).hexdigest()] for n, src in _forward_sources(model)],
        "samples": [[[str(x.dtype), list(x.shape)] for x in s] for s in sets],
        "backends": list(resolve_backends(backends)),
        "strategy": repr(strategy) if strategy is not None else "MinLatency()",
        "options": {k: repr(v) for k, v in sorted(options.items())},
        "versions": _versions(),
        "device": _device_name(device),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


class JitModel(torch.nn.Module):
    """``model`` behind a first-call tuner; see :func:`jit`.

    Attributes
    ----------
    model : torch.nn.Module
        The wrapped model (tuned in place once prepared).
    result : TuneResult or None
    source : str or None
        ``"tuned"`` or ``"cache"`` for the current preparation.
    """

    def __init__(self, model: torch.nn.Module, cache_dir: str | None = None, extra_samples=None,
                 backends=DEFAULT_BACKENDS, strategy=None, **options):
        super().__init__()
        self.model = model
        self.train(model.training)  # the wrapper follows the model (tuning refuses training mode)
        self.cache_dir = os.path.abspath(cache_dir or knobs.get("tune_cache_dir"))
        self.extra_samples = normalize_samples(extra_samples) if extra_samples is not None else []
        self.backends, self.strategy, self.options = backends, strategy, options
        self.result: TuneResult | None = None
        self.source: str | None = None
        self.cache_path: str | None = None

    def forward(self, *args, **kwargs):
        if kwargs:
            raise TuneError(f"kiln.jit models take positional tensors only; given keyword arguments {sorted(kwargs)}")
        if self.result is None or not self.result.accepts(args):
            self.prepare(args)
        return self.model(*args)

    def prepare(self, args) -> TuneResult:
        """Tune (or load from the cache) for ``args`` plus the extra samples."""
        if self.result is not None:
            self.result.restore()
            self.result = None
        samples = [tuple(args)] + list(self.extra_samples)
        key = cache_key(self.model, samples, self.backends, self.strategy, **self.options)
        path = os.path.join(self.cache_dir, key[:40])
        self.cache_path = path
        if os.path.isfile(os.path.join(path, MANIFEST)):
            try:
                self.result, self.source = load_tuned(self.model, path), "cache"
                log.info("kiln.jit: loaded the tuned plan from %s", path)
                return self.result
            except ArtifactError as e:
                log.warning("kiln.jit: cache entry %s is unusable (%s); tuning again", path, e)
        self.result = tune(self.model, samples, self.backends, self.strategy, **self.options)
        self.source = "tuned"
        save(self.result, path)
        log.info("kiln.jit: tuned and saved the plan to %s", path)
        return self.result


def jit(model: torch.nn.Module, cache_dir: str | None = None, extra_samples=None,
        backends=DEFAULT_BACKENDS, strategy=None, **options) -> JitModel:
    """Wrap ``model`` so its first call tunes it (:func:`kiln.tune`) and later processes reuse the result.

    Parameters
    ----------
    model : torch.nn.Module
        In eval mode; tuned in place on the first call.
    cache_dir : str, optional
        Default: knob ``tune_cache_dir`` (``KILN_TUNE_CACHE_DIR``, ``~/.cache/kiln/tune``).
    extra_samples : optional
        More samples tuned together with the first call's inputs (e.g. another batch size, which
        makes that axis dynamic).
    backends, strategy, **options
        As for :func:`kiln.tune`.

    Returns
    -------
    JitModel
    """
    if not isinstance(model, torch.nn.Module):
        raise TuneError(f"kiln.jit takes a torch.nn.Module, given {type(model).__name__}")
    return JitModel(model, cache_dir, extra_samples, backends, strategy, **options)
