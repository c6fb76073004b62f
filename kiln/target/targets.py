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
import shutil
import struct
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import tvm

from .. import knobs
from ..errors import ToolchainMissingError

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

    ``"default"`` for cuda and llvm. For rocm, the name of a registered pipeline equal to TVM's
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

_DEVICE_KINDS = {"cuda": "cuda", "hip": "rocm", "rocm": "rocm"}
LIBRARY_BIN_SYMBOL = "__tvm_ffi__library_bin"


def import_tree(executable_or_module) -> list:
    """Every runtime module reachable from ``executable_or_module`` (root first, depth first)."""
    root = executable_or_module.mod if hasattr(executable_or_module, "mod") else executable_or_module
    seen, order, stack = set(), [], [root]
    while stack:
        m = stack.pop()
        if m in seen:
            continue
        seen.add(m)
        order.append(m)
        stack.extend(reversed(list(m.imports)))
    return order


def _check_device_kinds(mod, t: KilnTarget) -> None:
    wrong = sorted({m.kind for m in import_tree(mod)
                    if m.kind in _DEVICE_KINDS and _DEVICE_KINDS[m.kind] != t.name})
    if wrong:
        raise ValueError(f"module holds {'/'.join(wrong)} device code; it was not built for "
                         f"target {t.name!r}")


def find_host_compiler() -> str:
    """The C++ compiler TVM links shared libraries with; ToolchainMissingError if there is none."""
    from tvm.support import cc as _cc
    found = _cc.get_cc()
    if not found or not shutil.which(found.split()[0]):
        raise ToolchainMissingError("a C++ compiler (g++)", "link the exported shared library",
                                    "apt-get install g++, or set CXX")
    return found


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# The blob TVM embeds in an exported library as ``__tvm_ffi__library_bin`` (tvm_ffi's
# ProcessLibraryBin reads it at load):
#   <nbytes: u64> <indptr: vec<u64>> <children: vec<u64>> then per module
#   <kind: str> [<bytes: str>]   (no bytes for the "_lib" placeholder of the host DSO)
# A device module's bytes (CUDAModuleNode/ROCMModuleNode::SaveToBytes) are
#   <fmt: str> <fmap: map<str, FunctionInfo>> <code: str> [tail]
# FunctionInfo = <name: str> <arg_types: vec<4-byte DLDataType>> <launch_param_tags: vec<str>>
#   <arg_extra_tags: vec<i32>>. Little endian; str and vec are length-prefixed with a u64.
# This is a TVM-internal layout: parsing is strict and fails loudly if the pinned versions change.

class _Reader:
    def __init__(self, data: bytes, what: str):
        self.data, self.pos, self.what = data, 0, what

    def u64(self) -> int:
        if self.pos + 8 > len(self.data):
            raise ValueError(f"truncated {self.what} at byte {self.pos}")
        (v,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return v

    def raw(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"truncated {self.what}: need {n} bytes at {self.pos}")
        v = self.data[self.pos:self.pos + n]
        self.pos += n
        return v

    def str(self) -> bytes:
        return self.raw(self.u64())

    def u64s(self) -> list:
        n = self.u64()
        return list(struct.unpack("<%dQ" % n, self.raw(8 * n)))


def _w_str(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


@dataclass
class LibraryBin:
    """Decoded ``__tvm_ffi__library_bin``: import tree and (kind, bytes-or-None) per module."""

    indptr: list
    children: list
    modules: list  # [kind, bytes | None]

    @classmethod
    def parse(cls, blob: bytes) -> "LibraryBin":
        """Decode a library binary (including its leading u64 size)."""
        r = _Reader(blob, "library binary")
        nbytes = r.u64()
        if nbytes + 8 != len(blob):
            raise ValueError(f"library binary says {nbytes} bytes, has {len(blob) - 8}")
        indptr, children = r.u64s(), r.u64s()
        modules = []
        for _ in range(len(indptr) - 1):
            kind = r.str().decode()
            modules.append([kind, None if kind == "_lib" else r.str()])
        if r.pos != len(blob):
            raise ValueError(f"library binary has {len(blob) - r.pos} unparsed trailing bytes")
        return cls(indptr, children, modules)

    def to_bytes(self) -> bytes:
        """Encode back; ``LibraryBin.parse(b).to_bytes() == b``."""
        parts = [struct.pack("<Q", len(self.indptr)), struct.pack("<%dQ" % len(self.indptr), *self.indptr),
                 struct.pack("<Q", len(self.children)),
                 struct.pack("<%dQ" % len(self.children), *self.children)]
        for kind, body in self.modules:
            parts.append(_w_str(kind.encode()))
            if body is not None:
                parts.append(_w_str(body))
        payload = b"".join(parts)
        return struct.pack("<Q", len(payload)) + payload


@dataclass
class DeviceBlob:
    """A serialized cuda/hip module: format, kernel names, raw fmap, code and trailing bytes."""

    fmt: str
    kernels: list
    fmap: bytes
    code: bytes
    tail: bytes = field(default=b"")

    @classmethod
    def parse(cls, body: bytes) -> "DeviceBlob":
        """Decode one device module's bytes (strict; raises ValueError on an unknown layout)."""
        r = _Reader(body, "device module")
        fmt = r.str().decode()
        start = r.pos
        kernels = []
        for _ in range(r.u64()):
            r.str()                       # map key
            kernels.append(r.str().decode())  # FunctionInfo.name
            r.raw(4 * r.u64())            # arg_types
            for _ in range(r.u64()):      # launch_param_tags
                r.str()
            r.raw(4 * r.u64())            # arg_extra_tags
        fmap = body[start:r.pos]
        code = r.str()
        return cls(fmt, kernels, fmap, code, body[r.pos:])

    def to_bytes(self) -> bytes:
        """Encode back to module bytes."""
        return _w_str(self.fmt.encode()) + self.fmap + _w_str(self.code) + self.tail


def device_blobs(lib: LibraryBin) -> "list[tuple[str, DeviceBlob]]":
    """(kind, DeviceBlob) for each cuda/hip module of a library binary."""
    return [(kind, DeviceBlob.parse(body)) for kind, body in lib.modules
            if kind in _DEVICE_KINDS and body is not None]


def read_library_bin(path: str) -> LibraryBin:
    """Extract and decode ``__tvm_ffi__library_bin`` from an exported ELF shared library.

    Reads the ELF symbol tables directly (no loading, so no CUDA/ROCm runtime is needed).
    """
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    for sec in secs:
        if sec[1] not in (2, 11):  # SHT_SYMTAB, SHT_DYNSYM
            continue
        strtab = secs[sec[6]]
        for off in range(sec[4], sec[4] + sec[5], 24):
            st_name, _, _, st_shndx, st_value, _ = struct.unpack_from("<IBBHQQ", data, off)
            s0 = strtab[4] + st_name
            name = data[s0:data.index(b"\0", s0)]
            if name == LIBRARY_BIN_SYMBOL.encode() and 0 < st_shndx < shnum:
                host = secs[st_shndx]
                pos = host[4] + (st_value - host[3])
                nbytes, = struct.unpack_from("<Q", data, pos)
                return LibraryBin.parse(data[pos:pos + 8 + nbytes])
    raise ValueError(f"{path} has no {LIBRARY_BIN_SYMBOL} symbol (no imported modules?)")


def _embed_blob(blob: bytes, workspace: str) -> str:
    """Write an assembly file defining ``__tvm_ffi__library_bin`` = blob; return its path.

    ``.incbin`` keeps export fast when the blob is large (weights embedded in the VM executable):
    TVM's C-array form would make the compiler chew through hundreds of MB of initializers.
    """
    if not sys.platform.startswith("linux"):
        raise NotImplementedError("kiln exports cuda/rocm libraries on Linux (ELF) only")
    bin_path = os.path.join(workspace, "kiln_devc.bin")
    with open(bin_path, "wb") as f:
        f.write(blob)
    src = os.path.join(workspace, "kiln_devc.S")
    sym = LIBRARY_BIN_SYMBOL
    with open(src, "w") as f:
        f.write(f"""    .section .rodata.kiln_library_bin,"a",%progbits
    .globl {sym}
    .type {sym}, %object
    .balign 16
{sym}:
    .incbin {json.dumps(bin_path)}
    .size {sym}, . - {sym}
    .section .note.GNU-stack,"",%progbits
""")
    return src


def export_packed(mod, path: str, rewrite: "Callable[[LibraryBin, str], None]") -> None:
    """``mod.export_library(path)`` with the library binary passed through ``rewrite`` first.

    ``rewrite(lib, workspace)`` edits the decoded :class:`LibraryBin` in place. Uses
    ``export_library(fpack_imports=...)`` and TVM's ``runtime.ModulePackImportsToTensor``.
    """
    import tvm_ffi
    pack = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")

    def fpack_imports(m, is_system_lib, _prefix, workspace):
        if is_system_lib:
            raise ValueError("kiln does not export system-lib modules")
        lib = LibraryBin.parse(pack(m).numpy().tobytes())
        rewrite(lib, workspace)
        return _embed_blob(lib.to_bytes(), workspace)

    with atomic_output(path) as tmp:
        mod.export_library(tmp, fpack_imports=fpack_imports)
