"""kiln's three compile targets and the per-target glue around ``tvm.relax.build``.

A :class:`KilnTarget` bundles the TVM target used for code generation with the (possibly different)
target under which dlight schedules are applied, plus the names the rest of kiln needs (arch,
torch/DLPack device kind). The dispatchers at the bottom route to :mod:`kiln.target.cuda` and
:mod:`kiln.target.rocm`.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
from dataclasses import dataclass
from typing import Any, Iterator

import tvm

from .. import knobs

__all__ = [
    "KilnTarget", "TARGET_NAMES", "resolve_target", "check_toolchain", "build_context",
    "tir_pipeline", "export_library", "device_code",
]

# Name -> canonical target. The error for an unknown name lists these.
_ALIASES = {
    "cuda": "cuda", "nvidia": "cuda", "h100": "cuda", "h200": "cuda", "sm_90a": "cuda",
    "rocm": "rocm", "amd": "rocm", "hip": "rocm", "mi300x": "rocm", "gfx942": "rocm",
    "llvm": "llvm", "cpu": "llvm",
}
TARGET_NAMES = tuple(_ALIASES)

# Hopper: 228 KB shared memory per SM, 227 KB per block with opt-in. The nvidia/nvidia-h100 tag
# says 49152 (the no-opt-in limit), which makes dlight's GEMV rules skip shared-memory staging.
# TVM's CUDA runtime opts a kernel in (cuFuncSetAttribute) when its launch needs >= 48 KB. Read
# on an H200: 227 KB opt-in, 132 SMs, 60 MiB L2; a kiln-exported sm_90a cubin with 64 KB of
# static shared memory launched and computed correctly.
HOPPER_SMEM_PER_BLOCK = 227 * 1024
H200_L2_BYTES = 60 * 1024 * 1024  # H100: 50 MB, as in the tag; no TVM 0.27 pass reads it
_CUDA_BASE_TAG = "nvidia/nvidia-h100"
_CUDA_DEFAULT_ARCH = "sm_90a"

# MI300X (gfx942): wavefront 64, 64 KB LDS per workgroup. The hardware allows 1024 work-items
# per workgroup, but TVM's AMDGPU codegen stamps every kernel "amdgpu-flat-work-group-size"=
# "1,256" when no ROCm device is present at build time (DetectROCMmaxThreadsPerBlock), so a
# schedule using more than 256 threads would compile and then fail to launch. Keep 256.
# (CU count, 304, is not a TVM target attribute; neither is the H200's SM count, 132.)
_ROCM_DEFAULTS = {
    "kind": "rocm",
    "mcpu": "gfx942",
    "mtriple": "amdgcn-amd-amdhsa-hcc",
    "thread_warp_size": 64,
    "max_shared_memory_per_block": 65536,
    "max_threads_per_block": 256,
    "max_num_threads": 256,
}
_ROCM_CODEGEN_MAX_THREADS = 256


@dataclass(frozen=True, eq=False)
class KilnTarget:
    """One kiln compile target.

    Attributes
    ----------
    name : str
        ``"cuda"``, ``"rocm"`` or ``"llvm"``.
    tvm_target : tvm.target.Target
        Target for code generation (``tvm.relax.build``).
    schedule_target : tvm.target.Target
        Target under which dlight schedule rules are applied. For cuda it equals ``tvm_target``
        except that the arch has no feature suffix (``sm_90`` for ``sm_90a``): dlight's
        ``check_sm_version`` does ``int("90a")`` -> -1 and silently skips tensor cores.
    arch : str
        ``"sm_90a"``, ``"gfx942"`` or the host machine (e.g. ``"x86_64"``).
    device : str
        torch/DLPack device kind: ``"cuda"``, ``"rocm"`` or ``"cpu"``.
    """

    name: str
    tvm_target: tvm.target.Target
    schedule_target: tvm.target.Target
    arch: str
    device: str

    @property
    def is_gpu(self) -> bool:
        """Whether kernels run on a GPU (cuda or rocm)."""
        return self.device != "cpu"

    def to_dict(self) -> dict:
        """JSON-able description; ``resolve_target(t.to_dict())`` rebuilds an equal target."""
        return {
            "name": self.name, "arch": self.arch, "device": self.device,
            "tvm_target": _target_config(self.tvm_target),
            "schedule_target": _target_config(self.schedule_target),
        }

    def _key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def __eq__(self, other: object) -> bool:
        # tvm Targets compare by handle; compare by content instead.
        return isinstance(other, KilnTarget) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"KilnTarget(name={self.name!r}, arch={self.arch!r}, device={self.device!r})"


def _target_config(t: tvm.target.Target) -> dict:
    """A Target's attributes as a plain dict that ``tvm.target.Target(...)`` accepts back."""
    cfg = json.loads(json.dumps(dict(t.export()), default=list))
    cfg.pop("tag", None)
    if isinstance(cfg.get("host"), dict):
        cfg["host"].pop("tag", None)
    return cfg


def _cuda(overrides: dict) -> KilnTarget:
    cfg = _target_config(tvm.target.Target(_CUDA_BASE_TAG))
    cfg["arch"] = _CUDA_DEFAULT_ARCH
    cfg["max_shared_memory_per_block"] = HOPPER_SMEM_PER_BLOCK
    cfg["l2_cache_size_bytes"] = H200_L2_BYTES
    user_smem = "max_shared_memory_per_block" in overrides
    cfg.update(overrides)
    arch = str(cfg["arch"])
    if not arch.startswith("sm_") or not arch[3:].rstrip("af").isdigit():
        raise ValueError(f"cuda arch must look like 'sm_90a' or 'sm_80', got {arch!r}")
    if not arch.startswith("sm_9") and not user_smem:
        cfg["max_shared_memory_per_block"] = 49152  # the Hopper figure is wrong elsewhere
    # dlight parses the arch with int(); give it the digits only (sm_90a -> sm_90).
    sched = dict(cfg, arch="sm_" + arch[3:].rstrip("af"))
    return KilnTarget("cuda", tvm.target.Target(cfg), tvm.target.Target(sched), arch, "cuda")


def _rocm(overrides: dict) -> KilnTarget:
    cfg = dict(_ROCM_DEFAULTS)
    cfg.update(overrides)
    if int(cfg.get("max_threads_per_block", 256)) > _ROCM_CODEGEN_MAX_THREADS:
        raise ValueError(
            f"rocm max_threads_per_block={cfg['max_threads_per_block']} is not supported: TVM's "
            f"AMDGPU codegen emits amdgpu-flat-work-group-size 1,{_ROCM_CODEGEN_MAX_THREADS} when "
            f"no ROCm device is present at build time, so larger blocks would fail to launch")
    t = tvm.target.Target(cfg)
    return KilnTarget("rocm", t, t, str(cfg["mcpu"]), "rocm")


def _llvm(overrides: dict) -> KilnTarget:
    cfg: dict[str, Any] = {"kind": "llvm"}
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    if cpu and cpu != "generic":
        cfg["mcpu"] = cpu
    cores = knobs.get("num_threads") or os.cpu_count() or 1
    cfg["num-cores"] = int(cores)
    cfg.update(overrides)
    t = tvm.target.Target(cfg)
    return KilnTarget("llvm", t, t, platform.machine() or "unknown", "cpu")


_BUILDERS = {"cuda": _cuda, "rocm": _rocm, "llvm": _llvm}


def resolve_target(t: "str | KilnTarget | dict") -> KilnTarget:
    """Turn a target name, a TVM target config dict, or a KilnTarget into a KilnTarget.

    Parameters
    ----------
    t : str or KilnTarget or dict
        A name (``"cuda"``, ``"rocm"``, ``"llvm"``/``"cpu"``, or an alias in ``TARGET_NAMES``);
        a TVM config dict whose ``"kind"`` is cuda/rocm/llvm, whose other keys override kiln's
        defaults (e.g. ``{"kind": "llvm", "num-cores": 4}``); or the output of
        :meth:`KilnTarget.to_dict`.

    Returns
    -------
    KilnTarget

    Raises
    ------
    ValueError
        Unknown name or kind; the message lists the valid names.
    """
    if isinstance(t, KilnTarget):
        return t
    if isinstance(t, str):
        key = t.strip().lower()
        if key not in _ALIASES:
            raise ValueError(f"unknown target {t!r}; valid names: {', '.join(TARGET_NAMES)}")
        return _BUILDERS[_ALIASES[key]]({})
    if isinstance(t, dict):
        if "tvm_target" in t and "name" in t:  # KilnTarget.to_dict() round trip
            return KilnTarget(
                t["name"], tvm.target.Target(t["tvm_target"]),
                tvm.target.Target(t["schedule_target"]), t["arch"], t["device"])
        overrides = dict(t)
        kind = str(overrides.pop("kind", "")).lower()
        if kind not in _BUILDERS:
            raise ValueError(
                f"unknown target kind {kind!r} in {t!r}; valid kinds: {', '.join(_BUILDERS)}")
        return _BUILDERS[kind](overrides)
    raise TypeError(f"expected a target name, dict or KilnTarget, got {type(t).__name__}")


def check_toolchain(t: "str | KilnTarget | dict") -> None:
    """Check that the external tools the target needs are installed.

    cuda: nvcc (knob ``nvcc``) runs and is >= 12.0 (needed at export, and at build on a GPU
    machine). rocm: an ``ld.lld`` >= 17 (knob ``lld``, else ``ld.lld-22`` .. ``ld.lld-17``,
    ``ld.lld`` on PATH). llvm: nothing.

    Parameters
    ----------
    t : str or KilnTarget or dict
        The target.

    Raises
    ------
    kiln.errors.ToolchainMissingError
        Names the tool, what needs it and how to install it.
    """
    t = resolve_target(t)
    if t.name == "cuda":
        from . import cuda
        cuda.find_nvcc()
    elif t.name == "rocm":
        from . import rocm
        rocm.find_lld()


@contextlib.contextmanager
def build_context(t: "str | KilnTarget | dict") -> Iterator[KilnTarget]:
    """Everything ``tvm.relax.build(mod, t.tvm_target, tir_pipeline=tir_pipeline(t))`` needs.

    All targets: ``with t.tvm_target`` (nvcc/NVRTC arch detection without a GPU). cuda: also
    routes ``tvm_callback_cuda_compile`` to kiln's nvcc so that a build on a machine with a CUDA
    driver produces the same sm_90a cubin as an export from a CPU-only machine. rocm: ROCm device
    bitcode and link callbacks, and ``tirx.disable_cse_tir``. Previous global callbacks and the
    enclosing PassContext settings are restored on exit.

    Parameters
    ----------
    t : str or KilnTarget or dict
        The target.

    Yields
    ------
    KilnTarget
        The resolved target.
    """
    t = resolve_target(t)
    with contextlib.ExitStack() as stack:
        stack.enter_context(t.tvm_target)
        if t.name == "cuda":
            from . import cuda
            stack.enter_context(cuda.compile_callback(t))
        elif t.name == "rocm":
            from . import rocm
            stack.enter_context(rocm.link_callbacks())
            stack.enter_context(pass_config({"tirx.disable_cse_tir": True}))
        yield t


@contextlib.contextmanager
def pass_config(extra: dict) -> Iterator[tvm.transform.PassContext]:
    """Enter a PassContext equal to the current one plus the config entries in ``extra``."""
    cur = tvm.transform.PassContext.current()
    ctx = tvm.transform.PassContext(
        opt_level=cur.opt_level, required_pass=list(cur.required_pass),
        disabled_pass=list(cur.disabled_pass), instruments=list(cur.instruments),
        config={**dict(cur.config), **extra})
    with ctx:
        yield ctx


def tir_pipeline(t: "str | KilnTarget | dict") -> str:
    """The ``tir_pipeline`` argument to pass to ``tvm.relax.build`` for this target.

    ``"default"`` for llvm. For cuda, kiln's mixed pipeline (:func:`kiln.target.cuda.register_tir_pipeline`:
    TIRx kernels such as the sm_90a GEMM through TVM's ``tirx`` pipeline, dlight kernels through the
    default one). For rocm, the name of a registered pipeline equal to TVM's
    default except that ``LowerWarpMemory`` runs to a fixed point (TVM's single run lowers only
    the first warp-scope buffer of a statement sequence, which breaks MFMA schedules).

    Parameters
    ----------
    t : str or KilnTarget or dict
        The target.

    Returns
    -------
    str
    """
    t = resolve_target(t)
    if t.name == "rocm":
        from . import rocm
        return rocm.register_tir_pipeline()
    if t.name == "cuda":
        from . import cuda
        return cuda.register_tir_pipeline()
    return "default"


def export_library(executable, path: "str | os.PathLike", t: "str | KilnTarget | dict") -> dict:
    """Write the built module as one shared library, device code compiled in.

    cuda: every CUDA-source kernel blob is replaced by a cubin that nvcc compiles for the target
    arch (``-gencode arch=compute_90a,code=sm_90a``), so loading needs neither nvcc nor NVRTC.
    rocm: the hsaco code object as TVM linked it. llvm: plain export. The file appears at ``path``
    only when complete (written to a temporary name in the same folder, then renamed).

    Parameters
    ----------
    executable : tvm.runtime.Executable or tvm.runtime.Module
        Result of ``tvm.relax.build`` / ``tvm.compile`` (or its ``.mod``).
    path : str or os.PathLike
        Output shared library.
    t : str or KilnTarget or dict
        The target it was built for.

    Returns
    -------
    dict
        ``{"device_code": "cubin" | "hsaco" | "none", "kernels": int, "nvcc": str | None,
        "arch": str}``.

    Raises
    ------
    kiln.errors.ToolchainMissingError
        nvcc (cuda) or the host C++ compiler is missing.
    ValueError
        The module holds device code of another target.
    """
    t = resolve_target(t)
    path = os.fspath(path)
    mod = executable.mod if hasattr(executable, "mod") else executable
    _check_device_kinds(mod, t)
    if t.name == "cuda":
        from . import cuda
        return cuda.export(mod, path, t)
    if t.name == "rocm":
        from . import rocm
        return rocm.export(mod, path, t)
    find_host_compiler()
    with atomic_output(path) as tmp:
        mod.export_library(tmp)
    return {"device_code": "none", "kernels": 0, "nvcc": None, "arch": t.arch}


def device_code(executable_or_module) -> "list[tuple[str, str]]":
    """(format, text) of each device module imported by a built module, for tests and inspection.

    cuda: ``("cuda", source)`` while the module holds CUDA source (``("ptx", text)`` for PTX;
    compiled cubins have no text and are skipped). rocm: ``("asm", gfx assembly)``.

    Parameters
    ----------
    executable_or_module : tvm.runtime.Executable or tvm.runtime.Module

    Returns
    -------
    list of (str, str)
    """
    out = []
    for m in import_tree(executable_or_module):
        if m.kind == "cuda":
            for fmt in ("cuda", "ptx"):
                text = _inspect_text(m, fmt)
                if text:
                    out.append((fmt, text))
                    break
        elif m.kind in ("hip", "rocm"):
            text = _inspect_text(m, "asm")
            if text:
                out.append(("asm", text))
    return out


def _inspect_text(m, fmt: str) -> str:
    # inspect_source decodes to str; binary formats (cubin, hsaco) raise UnicodeDecodeError.
    try:
        return str(m.inspect_source(fmt))
    except Exception:  # noqa: BLE001 - any failure just means "no text in this format"
        return ""


# --------------------------------------------------------------------------------------------
# Export plumbing shared by the cuda and rocm paths.
# --------------------------------------------------------------------------------------------


from .library import _check_device_kinds, atomic_output, find_host_compiler, import_tree  # noqa: E402
