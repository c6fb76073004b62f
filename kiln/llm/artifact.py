"""The LLM artifact: kiln's artifact format with several entry functions.

Same directory as :mod:`kiln.target.artifact` (``model.so``, ``weights.params`` with tensors ``p0..pN``,
``manifest.json`` with the SHA-256 of every file, written atomically), and a manifest that a generic kiln
manifest reader accepts (``format``, ``format_version``, ``versions``, ``target``, ``signature``, ``params``,
``files``) plus ``"kind": "llm"``, ``"entries"`` (the signature of ``prefill`` and of every ``decode_b{B}``)
and ``"llm"`` (config, dtype, weight format, cache length, decode batches, attention splits). ``signature``
and ``entry`` describe ``prefill``.

Loading needs only TVM's runtime: ``tvm.runtime.load_module`` + ``tvm.runtime.vm.VirtualMachine`` + the
weights file; ``prefill(ids, cache, *weights)`` and ``decode_b{B}(ids, pos, cache, *weights)`` are plain VM
functions (see :mod:`kiln.llm.runtime` for the buffers a decode loop must keep).
"""
from __future__ import annotations

import os

from ..errors import ArtifactError, SignatureMismatchError
from ..target.artifact import LIBRARY, WEIGHTS, check_params, read_manifest, verify_files
from .config import LLMConfig

__all__ = ["write_artifact", "load", "spec_from_manifest", "KIND"]

KIND = "llm"


def _versions() -> dict:
    import tvm
    import tvm_ffi

    from .. import __version__
    return {"kiln": __version__, "tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__}


def _spec_json(spec) -> dict:
    return {"config": spec.config.to_json(), "dtype": spec.dtype, "weight_format": spec.weight_format,
            "max_context": spec.max_context, "decode_batches": list(spec.decode_batches), "gpu": spec.gpu,
            "attn_splits": {str(k): v for k, v in spec.attn_splits.items()},
            "megakernel": list(spec.megakernel), "megakernel_config": _megakernel_config(spec)}


def _megakernel_config(spec):
    """The megakernel tunables the decode_b{B}_mk functions were built with (``kiln inspect`` re-derives the
    schedule from them), or ``None``."""
    if not spec.megakernel:
        return None
    from ..schedules.megakernel import SM90_MEGAKERNEL
    return SM90_MEGAKERNEL.to_json()


def spec_from_manifest(manifest: dict):
    """The :class:`~kiln.llm.model.ModelSpec` recorded in an LLM manifest."""
    from .model import ModelSpec
    d = manifest["llm"]
    return ModelSpec(LLMConfig.from_json(d["config"]), d["dtype"], d["weight_format"], int(d["max_context"]),
                     tuple(int(b) for b in d["decode_batches"]), bool(d["gpu"]),
                     {int(k): int(v) for k, v in d["attn_splits"].items()},
                     tuple(int(b) for b in d.get("megakernel", ())))


def _save_weights(params, path: str) -> None:
    import tvm

    from .runtime import _to_tvm
    cpu = tvm.cpu()
    tvm.runtime.save_param_dict_to_file({f"p{i}": _to_tvm(p, cpu) for i, p in enumerate(params)}, path)


def write_artifact(compiled, path: str) -> str:
    """Export a :class:`~kiln.llm.build.CompiledLLM` to directory ``path`` (atomically). Returns ``path``."""
    from ..target.artifact import write_artifact_dir

    def extra():
        sigs = {k: v.to_json() for k, v in compiled.signatures().items()}
        return {"kind": KIND, "entry": "prefill", "signature": sigs["prefill"], "entries": sigs,
                "llm": _spec_json(compiled.spec),
                "params": [{"name": f"p{i}", "weight": n, "shape": list(s), "dtype": d}
                           for i, (n, s, d) in enumerate(compiled.param_specs)]}

    return write_artifact_dir(compiled, path, lambda file: _save_weights(compiled.params, file), extra)


def _load_params(path: str, manifest: dict) -> list:
    import tvm
    return check_params(manifest, tvm.runtime.load_param_dict_from_file(os.path.join(path, WEIGHTS)))


def load(path: str, device: str | None = None):
    """Load an LLM artifact as a ready :class:`~kiln.llm.runtime.LLMSession`.

    Parameters
    ----------
    path : str
        Directory written by :meth:`CompiledLLM.export`.
    device : str, optional
        ``"cuda"`` (``"cuda:N"``) or ``"cpu"``; default: the artifact's target device.

    Raises
    ------
    ArtifactError
        Not an LLM artifact, wrong TVM version, or built for another device.
    ArtifactIntegrityError
        A file's SHA-256 differs from the manifest.
    SignatureMismatchError
        The weights file does not match the manifest, or an entry function is missing or has another arity.
    """
    import tvm

    from .. import knobs
    from .runtime import LLMSession
    manifest = read_manifest(path)
    if manifest.get("kind") != KIND:
        raise ArtifactError(f"{path!r} is a kiln artifact of kind {manifest.get('kind', 'model')!r}, not an LLM "
                            "artifact; load it with kiln.load")
    if knobs.get("verify_hashes"):
        verify_files(path, manifest)
    if manifest["versions"].get("tvm") != tvm.__version__:
        raise ArtifactError(f"artifact was built with TVM {manifest['versions'].get('tvm')}, but this runtime is "
                            f"TVM {tvm.__version__}")
    device = device or manifest["target"]["device"]
    if device.partition(":")[0] != manifest["target"]["device"]:
        raise ArtifactError(f"artifact was built for {manifest['target']['name']} ({manifest['target']['device']}); "
                            f"cannot load it on {device!r}")
    spec = spec_from_manifest(manifest)
    params = _load_params(path, manifest)
    lib = tvm.runtime.load_module(os.path.join(path, LIBRARY))
    sess = LLMSession(lib, params, spec, device)
    for name, sig in manifest["entries"].items():
        arity = int(sess.vm.module["get_function_arity"](name))
        want = len(sig["inputs"]) + len(params)
        if arity != want:
            raise SignatureMismatchError(f"compiled function {name!r} takes {arity} arguments, the manifest promises "
                                         f"{len(sig['inputs'])} input(s) + {len(params)} weight(s) = {want}")
    sess.manifest = manifest
    return sess
