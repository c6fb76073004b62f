"""The deployable artifact: one directory with the compiled library, the weights and ``manifest.json``.

``manifest.json`` records kiln/TVM versions, the target, the input/output signature (symbolic dims
included), the weights' specs and the SHA-256 of every file. Writing is atomic: the directory is built
under a temporary name beside the destination and renamed into place, so a failed export leaves nothing.
Loading verifies hashes, versions, device and signature, each with a typed error.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from ..errors import ArtifactError, ArtifactIntegrityError, SignatureMismatchError
from ..signature import Signature
from .runtime import KilnModule

__all__ = ["LIBRARY", "WEIGHTS", "MANIFEST", "FORMAT_VERSION", "write_artifact", "read_manifest", "load",
           "sha256_file"]

LIBRARY, WEIGHTS, MANIFEST = "model.so", "weights.params", "manifest.json"
FORMAT_VERSION = 1


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    import tvm
    import tvm_ffi

    from .. import __version__
    return {"kiln": __version__, "tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__}


def _param_specs(params) -> list[dict]:
    return [{"name": f"p{i}", "shape": [int(s) for s in p.shape], "dtype": str(p.dtype)} for i, p in enumerate(params)]


def replace_dir(tmp: str, dest: str) -> None:
    """Move the finished ``tmp`` to ``dest``; an existing kiln artifact there is replaced, anything else refused."""
    if os.path.lexists(dest):
        if not os.path.isdir(dest) or (os.listdir(dest) and not os.path.exists(os.path.join(dest, MANIFEST))):
            raise ArtifactError(f"{dest!r} exists and is not a kiln artifact; refusing to overwrite it")
        old = tempfile.mkdtemp(prefix=".kiln-old-", dir=os.path.dirname(dest) or ".")
        os.rename(dest, os.path.join(old, "a"))
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)


def write_artifact_dir(compiled, path: str, save_weights, extra_manifest) -> str:
    """The atomic export shared by kiln's artifact kinds: library + weights + manifest in a temp dir beside
    ``path``, then swapped in (:func:`replace_dir`); a failure leaves nothing behind.

    ``save_weights(file)`` writes ``weights.params``; ``extra_manifest()`` returns the kind-specific manifest
    keys (entry, signature(s), params, ...), merged over the common ones (versions, target, device code,
    options, stage timings, schedule report, notes, file hashes).
    """
    from . import export_library
    dest = os.path.abspath(path)
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.tmp-", dir=parent)
    try:
        code_info = export_library(compiled.executable, os.path.join(tmp, LIBRARY), compiled.target)
        save_weights(os.path.join(tmp, WEIGHTS))
        manifest = {
            "format": "kiln-artifact", "format_version": FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
            "target": compiled.target_json(),
            **extra_manifest(),
            "cuda_graph": compiled.uses_cuda_graph,
            "device_code": code_info,
            "options": compiled.options.to_json(),
            "stage_timings_s": compiled.timings,
            "schedule_report": compiled.schedule_report,
            "notes": compiled.notes,
            "files": {name: sha256_file(os.path.join(tmp, name)) for name in (LIBRARY, WEIGHTS)},
        }
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_artifact(compiled, path: str) -> str:
    """Export a :class:`kiln.api.CompiledModel` to directory ``path`` (atomically). Returns ``path``."""
    import tvm

    def save_weights(file):
        tensors = {f"p{i}": (p if isinstance(p, tvm.runtime.Tensor) else tvm.runtime.tensor(p))
                   for i, p in enumerate(compiled.params)}
        tvm.runtime.save_param_dict_to_file(tensors, file)

    return write_artifact_dir(compiled, path, save_weights, lambda: {
        "entry": "main", "signature": compiled.signature.to_json(), "params": _param_specs(compiled.params)})


def read_manifest(path: str) -> dict:
    """Parse and sanity-check ``manifest.json`` of the artifact at ``path``."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise ArtifactError(f"{path!r} is not a kiln artifact: {MANIFEST} is missing")
    try:
        with open(mpath) as f:
            m = json.load(f)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath}: not valid JSON ({e})") from None
    if m.get("format") != "kiln-artifact":
        raise ArtifactError(f"{mpath}: not a kiln manifest (format={m.get('format')!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: format version {m.get('format_version')} unsupported, expected {FORMAT_VERSION}")
    missing = [k for k in ("versions", "target", "signature", "params", "files") if k not in m]
    if missing:
        raise ArtifactError(f"{mpath}: missing key(s) {missing}")
    return m


def verify_files(path: str, manifest: dict) -> None:
    """Every file the manifest lists exists and has its recorded SHA-256."""
    for name, want in manifest["files"].items():
        fpath = os.path.join(path, name)
        if not os.path.isfile(fpath):
            raise ArtifactError(f"artifact {path!r}: file {name!r} listed in the manifest is missing")
        got = sha256_file(fpath)
        if got != want:
            raise ArtifactIntegrityError(name, want, got)


def _check_versions(manifest: dict) -> None:
    import tvm
    built = manifest["versions"].get("tvm")
    if built != tvm.__version__:
        raise ArtifactError(f"artifact was built with TVM {built}, but this runtime is TVM {tvm.__version__}")


def _check_device(manifest: dict, device: str) -> None:
    want = manifest["target"]["device"]
    kind = device.partition(":")[0]
    if kind != want:
        raise ArtifactError(f"artifact was built for {manifest['target']['name']} ({want}); cannot load it on {device!r}")


def check_params(manifest: dict, params: dict) -> list:
    """The weights of ``params`` (name -> tensor) in the manifest's order, each checked against its spec
    (name, shape, dtype); a mismatch raises ``SignatureMismatchError`` naming the weight (and the model weight
    it came from, when the manifest records it)."""
    specs = manifest["params"]
    if len(params) != len(specs):
        raise SignatureMismatchError(f"weights file holds {len(params)} tensors, the manifest lists {len(specs)}")
    out = []
    for spec in specs:
        p = params.get(spec["name"])
        what = spec["name"] + (f" ({spec['weight']})" if spec.get("weight") else "")
        if p is None:
            raise SignatureMismatchError(f"weights file lacks {what}")
        if list(p.shape) != spec["shape"] or str(p.dtype) != spec["dtype"]:
            raise SignatureMismatchError(
                f"weight {what}: manifest says {spec['dtype']}{spec['shape']}, file holds {p.dtype}{list(p.shape)}")
        out.append(p)
    return out


def load(path: str, device: str | None = None, signature: Signature | None = None) -> KilnModule:
    """Load a kiln artifact for execution.

    Parameters
    ----------
    path : str
        Artifact directory written by :meth:`CompiledModel.export`.
    device : str, optional
        ``"cuda"``, ``"rocm"``, ``"cpu"`` (with optional ``:index``); default: the artifact's target device.
    signature : Signature, optional
        If given, the artifact's signature must equal it.

    Raises
    ------
    ArtifactError, ArtifactIntegrityError, SignatureMismatchError

    An LLM artifact (``kiln.llm``; manifest ``kind: "llm"``) loads as a ``kiln.llm.LLMSession``.
    """
    import tvm
    manifest = read_manifest(path)
    if manifest.get("kind") == "llm":           # prefill + decode entries over a KV cache: kiln.llm's session
        from ..llm.artifact import load as load_llm
        return load_llm(path, device)
    from .. import knobs
    if knobs.get("verify_hashes"):
        verify_files(path, manifest)
    _check_versions(manifest)
    device = device or manifest["target"]["device"]
    _check_device(manifest, device)
    sig = Signature.from_json(manifest["signature"])
    if signature is not None and signature != sig:
        raise SignatureMismatchError(f"artifact signature {sig.to_json()} differs from the expected {signature.to_json()}")
    params = check_params(manifest, tvm.runtime.load_param_dict_from_file(os.path.join(path, WEIGHTS)))
    lib = tvm.runtime.load_module(os.path.join(path, LIBRARY))
    module = KilnModule(lib, params, sig, device)
    arity = int(module._vm.module["get_function_arity"](manifest["entry"]))
    want = len(sig.inputs) + len(params)
    if arity != want:
        raise SignatureMismatchError(
            f"compiled function {manifest['entry']!r} takes {arity} arguments, the manifest promises "
            f"{len(sig.inputs)} input(s) + {len(params)} weight(s) = {want}")
    module.manifest = manifest
    return module
