"""Saving a tuned model and restoring it in a later process, with no re-tuning.

Layout of a saved directory::

    manifest.json          format "kiln-tuned": versions, device, model fingerprint, plan, the whole
                           measured table, per replaced module its backend, payload folder, output
                           structure and weights digest, and the SHA-256 of every other file
    modules/000/...        payload of the first replaced module (kiln: a kiln artifact; tvm: stock.so)
    modules/001/...

Eager choices need nothing. kiln choices load their artifact (no compile, no warm-up compile).
Stock-TVM choices load their shared library (device code compiled to cubin at save). inductor
choices have no portable compiled form: the module is wrapped in ``torch.compile`` again and torch
compiles it on its first call (from inductor's on-disk cache when that is warm).

Writing is atomic (a temporary directory beside the destination, renamed into place). Loading
checks every file's SHA-256 (knob ``verify_hashes``; a changed file raises
:class:`~kiln.errors.ArtifactIntegrityError`), the model's module tree and parameter shapes, each
replaced module's weights (a digest of its parameters and buffers), and the device kind
(:class:`~kiln.errors.TunedModelMismatchError`).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile

import torch

from .. import knobs
from ..errors import ArtifactError, ArtifactIntegrityError, TuneError, TunedModelMismatchError
from ..target.artifact import MANIFEST, replace_dir, sha256_file
from .backends import get_backend
from .capture import Axis, OutSpec, display_name
from .core import TuneResult, _check_not_tuned, apply_plan
from .strategy import Plan, Table

__all__ = ["save", "load_tuned", "FORMAT", "FORMAT_VERSION", "structure_digest", "weights_digest"]

FORMAT, FORMAT_VERSION = "kiln-tuned", 1


def _versions() -> dict:
    import tvm
    import tvm_ffi

    from .. import __version__
    return {"kiln": __version__, "tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__, "torch": torch.__version__}


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``module``'s parameters and buffers."""
    h = hashlib.sha256()
    for name, t in module.state_dict(keep_vars=True).items():
        if isinstance(t, torch.Tensor):
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(_tensor_bytes(t))
    return h.hexdigest()


def _structure(model: torch.nn.Module) -> list:
    mods = [[p, f"{type(m).__module__}.{type(m).__qualname__}"] for p, m in model.named_modules()]
    state = [[k, str(v.dtype), list(v.shape)] for k, v in model.state_dict(keep_vars=True).items()
             if isinstance(v, torch.Tensor)]
    return [mods, state]


def structure_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the module tree (names and classes) and of every parameter/buffer name, dtype and shape."""
    return hashlib.sha256(json.dumps(_structure(model)).encode()).hexdigest()


# --------------------------------------------------------------------------- save
def _write_payloads(result: TuneResult, tmp: str) -> list:
    entries = []
    for i, (path, backend) in enumerate(sorted(result.plan.replaced.items())):
        if path not in result.builds:
            raise TuneError(f"no build kept for module {display_name(path)!r}; only a TuneResult from kiln.tune "
                            "or kiln.load_tuned can be saved")
        _, built, req = result.builds[path]
        b = get_backend(backend)
        if b.save is None or b.load is None:
            raise TuneError(f"module {display_name(path)!r} runs on backend {backend!r}, which registered no "
                            "save/load functions; it cannot be saved")
        rel = f"modules/{i:03d}"
        os.makedirs(os.path.join(tmp, rel))
        meta = b.save(built, os.path.join(tmp, rel), req)
        entries.append({"module": path, "backend": backend, "dir": rel, "meta": meta,
                        "out_spec": req.out_spec.to_json(), "weights_sha256": weights_digest(req.module)})
    return entries


def save(result: TuneResult, path: str) -> str:
    """Write a tuned model to directory ``path`` (atomically; an existing kiln directory is replaced).

    Parameters
    ----------
    result : TuneResult
        From :func:`kiln.tune` (or :func:`load_tuned`).
    path : str

    Returns
    -------
    str
        ``path``.

    Raises
    ------
    TuneError
        A chosen backend has no save function.
    """
    if not isinstance(result, TuneResult):
        raise TuneError(f"kiln.save takes the TuneResult of kiln.tune, given {type(result).__name__}")
    dest = os.path.abspath(path)
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.tmp-", dir=parent)
    try:
        if result.loaded_from:
            entries = _copy_loaded(result, tmp)
        else:
            entries = _write_payloads(result, tmp)
        files = {}
        for root, _, names in os.walk(tmp):
            for n in names:
                full = os.path.join(root, n)
                files[os.path.relpath(full, tmp).replace(os.sep, "/")] = sha256_file(full)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(), "device": result.device,
            "model": {"class": f"{type(result.model).__module__}.{type(result.model).__qualname__}",
                      "structure_sha256": structure_digest(result.model)},
            "strategy": repr(result.strategy), "plan": result.plan.to_json(), "table": result.table.to_json(),
            "axes": [a.to_json() | {"sizes": list(a.sizes)} for a in result.axes],
            "inputs": [[d, list(s)] for d, s in result.inputs], "end_to_end": result.end_to_end,
            "modules": entries, "files": files,
        }
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, default=str)
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _copy_loaded(result: TuneResult, tmp: str) -> list:
    src = result.loaded_from
    man = read_manifest(src)
    for e in man["modules"]:
        shutil.copytree(os.path.join(src, e["dir"]), os.path.join(tmp, e["dir"]))
    return man["modules"]


# --------------------------------------------------------------------------- load
def read_manifest(path: str) -> dict:
    """Parse ``manifest.json`` of a saved tuned model and check its format."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise ArtifactError(f"{path!r} is not a saved tuned model: {MANIFEST} is missing")
    try:
        with open(mpath) as f:
            m = json.load(f)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath}: not valid JSON ({e})") from None
    if m.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: format {m.get('format')!r}, expected {FORMAT!r} (kiln.load reads "
                            "single-model artifacts, kiln.load_tuned tuned models)")
    if m.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: format version {m.get('format_version')} unsupported, expected {FORMAT_VERSION}")
    missing = [k for k in ("versions", "device", "model", "plan", "table", "modules", "files") if k not in m]
    if missing:
        raise ArtifactError(f"{mpath}: missing key(s) {missing}")
    return m


def _verify(path: str, manifest: dict) -> None:
    for name, want in manifest["files"].items():
        full = os.path.join(path, *name.split("/"))
        if not os.path.isfile(full):
            raise ArtifactError(f"saved tuned model {path!r}: file {name!r} listed in the manifest is missing")
        got = sha256_file(full)
        if got != want:
            raise ArtifactIntegrityError(name, want, got)


def _check_model(model: torch.nn.Module, manifest: dict) -> None:
    want = manifest["model"]["structure_sha256"]
    if structure_digest(model) != want:
        raise TunedModelMismatchError(
            f"the model ({type(model).__module__}.{type(model).__qualname__}) differs from the tuned one "
            f"({manifest['model']['class']}): module tree, classes or parameter shapes/dtypes changed")


def _check_device(manifest: dict, device: str) -> None:
    if device.partition(":")[0] != manifest["device"].partition(":")[0]:
        raise TunedModelMismatchError(f"tuned for device {manifest['device']!r}; cannot load on {device!r}")


def load_tuned(model: torch.nn.Module, path: str, device: str | None = None, check_weights: bool = True) -> TuneResult:
    """Restore a saved plan into ``model`` in place: no tuning, no warm-up compile.

    Parameters
    ----------
    model : torch.nn.Module
        The same architecture (and weights) as the tuned model, in eval mode, not tuned already.
    path : str
        A directory written by :func:`save`.
    device : str, optional
        Default: the device it was tuned on.
    check_weights : bool
        Compare each replaced module's weights with the digest saved with it (compiled backends
        carry their own copy of the weights, so a model with other weights would silently mix).

    Returns
    -------
    TuneResult
        ``source == "loaded"``; ``table`` and ``plan`` as measured when tuning; ``strategy`` is the
        strategy's repr.

    Raises
    ------
    ArtifactError, ArtifactIntegrityError, TunedModelMismatchError
    """
    manifest = read_manifest(path)
    if knobs.get("verify_hashes"):
        _verify(path, manifest)
    _check_model(model, manifest)
    device = device or manifest["device"]
    _check_device(manifest, device)
    _check_not_tuned(model)
    runners = {}
    for e in manifest["modules"]:
        module = model.get_submodule(e["module"]) if e["module"] else model
        if check_weights and weights_digest(module) != e["weights_sha256"]:
            raise TunedModelMismatchError(f"module {display_name(e['module'])!r}: its weights differ from the ones "
                                          f"it was tuned (and compiled) with")
        fn = get_backend(e["backend"]).load(e["meta"], os.path.join(path, e["dir"]), module, device,
                                            OutSpec.from_json(e["out_spec"]))
        if fn is not None:
            runners[e["module"]] = (e["backend"], fn)
    apply_plan(model, runners)
    p = manifest["plan"]
    plan = Plan(dict(p["assign"]), p.get("latency_ms"), p.get("throughput_ms"), tuple(p.get("notes", ())))
    axes = [Axis(a["name"], tuple(tuple(m) for m in a["members"]), tuple(a.get("sizes", ())), a["lo"], a["hi"])
            for a in manifest.get("axes", [])]
    inputs = [(d, tuple(s)) for d, s in manifest.get("inputs", [])]
    return TuneResult(model, plan, Table.from_json(manifest["table"]), manifest.get("strategy", "?"), axes, inputs,
                      device, {}, {}, manifest.get("end_to_end"), loaded_from=os.path.abspath(path))
