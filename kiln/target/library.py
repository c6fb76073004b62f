"""The exported library's packed device blob: read it from an ``.so``, rewrite it, embed it again.

TVM packs imported device modules into one ``__tvm_ffi__library_bin`` blob (``ModulePackImportsToTensor``,
read back by tvm_ffi's ``ProcessLibraryBin``). kiln rewrites that blob at export (CUDA source -> cubin) and
reads it in tests without loading the library, so this layout is pinned to the TVM/tvm-ffi versions in
pyproject.toml and parsed strictly: a layout change fails loudly.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import struct
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..errors import ToolchainMissingError

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


def _check_device_kinds(mod, t) -> None:
    wrong = sorted({m.kind for m in import_tree(mod)
                    if m.kind in _DEVICE_KINDS and _DEVICE_KINDS[m.kind] != t.name})
    if wrong:
        raise ValueError(f"module holds {'/'.join(wrong)} device code; it was not built for "
                         f"target {t.name!r}")


@functools.lru_cache(maxsize=32)
def tool_version_text(path: str, mtime: float) -> "str | None":
    """``path --version`` output (stdout + stderr), or None if it does not run.

    Cached per (path, mtime), so a reinstalled tool is looked at again but repeated builds do not re-run it.
    """
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout + out.stderr if out.returncode == 0 else None


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
