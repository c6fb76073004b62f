"""ROCm (gfx942 / MI300X) specifics: finding ld.lld, the build callbacks, the TIR pipeline fix.

The TVM 0.27 wheel generates AMDGPU code with its bundled LLVM 22 and links the code object
through Python callbacks. Without a ROCm install three things need help (measured, see
shared/notes/build-paths.md): the device-library bitcode lookup, the linker (code object v6
needs ld.lld >= 17), and ``LowerWarpMemory``, which lowers one warp-scope buffer per run.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from typing import Iterator

from .. import knobs
from ..errors import ToolchainMissingError
from .library import DeviceBlob, LibraryBin, export_packed, find_host_compiler, tool_version_text
from .targets import KilnTarget

__all__ = ["find_lld", "link_callbacks", "register_tir_pipeline", "TIR_PIPELINE", "export"]

MIN_LLD = 17
TIR_PIPELINE = "kiln_rocm"
_NEWEST_LLD = 22  # the LLVM major the TVM wheel is built with; newer lld would also do
_NEEDED_FOR = "link gfx942 code objects (rocm builds)"
_INSTALL_HINT = "apt-get install lld-19 (any lld >= 17), or set KILN_LLD=/path/to/ld.lld"


def _lld_major(path: str, mtime: float) -> "int | None":
    m = re.search(r"LLD (\d+)\.", tool_version_text(path, mtime) or "")
    return int(m.group(1)) if m else None


def _resolve(name: str) -> "str | None":
    if os.sep in name:
        return name if os.path.isfile(name) and os.access(name, os.X_OK) else None
    return shutil.which(name)


def find_lld() -> "tuple[str, int]":
    """Find an ``ld.lld`` >= 17: the ``lld`` knob if set, else ``ld.lld-22`` .. ``ld.lld-17``,
    then ``ld.lld``, on PATH.

    Returns
    -------
    (str, int)
        Path and major version.

    Raises
    ------
    kiln.errors.ToolchainMissingError
        None found (the message lists what was tried and why it was rejected). A knob pointing
        at a missing or old lld is an error, not a reason to search PATH.
    """
    knob = knobs.get("lld")
    names = [knob] if knob else [f"ld.lld-{v}" for v in range(_NEWEST_LLD, MIN_LLD - 1, -1)] + ["ld.lld"]
    tried = []
    for name in names:
        path = _resolve(name)
        if path is None:
            if knob:
                tried.append(f"{name} (not found)")
            continue
        major = _lld_major(path, os.path.getmtime(path))
        if major is not None and major >= MIN_LLD:
            return path, major
        tried.append(f"{path} ({'version not understood' if major is None else f'LLD {major}'})")
    if not knob and not tried:
        tried.append("ld.lld-22 .. ld.lld-17, ld.lld (none on PATH)")
    raise ToolchainMissingError(f"ld.lld >= {MIN_LLD}", _NEEDED_FOR,
                                f"tried {', '.join(tried)}; {_INSTALL_HINT}")


def _swap_global(name: str, func):
    """Register ``func`` as global ``name``; return a function that restores the previous one."""
    import tvm_ffi
    previous = tvm_ffi.get_global_func(name, allow_missing=True)
    tvm_ffi.register_global_func(name, func, override=True)

    def restore():
        if previous is not None:
            tvm_ffi.register_global_func(name, previous, override=True)
        else:
            tvm_ffi.remove_global_func(name)
    return restore


@contextlib.contextmanager
def link_callbacks() -> Iterator[str]:
    """Install the two ROCm build callbacks; yields the ld.lld path used.

    ``tvm_callback_rocm_bitcode_path`` returns no files: without ROCm there are no device
    libraries, and TVM's own lookup raises "Cannot find ROCm path" (kernels use LLVM intrinsics
    for math, which need none). ``tvm_callback_rocm_link`` links with the lld found by
    :func:`find_lld`, because TVM's own search takes a bare ``ld.lld`` that may be too old.
    """
    lld, _ = find_lld()

    def _bitcode_path(*_args):
        return []

    def _link(obj_bin):
        with tempfile.TemporaryDirectory(prefix="kiln-lld-") as d:
            obj, co = os.path.join(d, "kernel.o"), os.path.join(d, "kernel.co")
            with open(obj, "wb") as f:
                f.write(bytes(obj_bin))
            proc = subprocess.run([lld, "--no-undefined", "-shared", obj, "-o", co],
                                  capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"{lld} failed to link the gfx code object:\n"
                                   f"{(proc.stdout + proc.stderr).strip()[-4000:]}")
            with open(co, "rb") as f:
                return bytearray(f.read())

    restores = [_swap_global("tvm_callback_rocm_bitcode_path", _bitcode_path),
                _swap_global("tvm_callback_rocm_link", _link)]
    try:
        yield lld
    finally:
        for restore in reversed(restores):
            restore()


def _lower_warp_memory_to_fixpoint():
    import tvm
    import tvm_ffi
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="kiln.LowerWarpMemoryFixpoint")
    def _pass(mod, _ctx):
        # One LowerWarpMemory run rewrites only the first warp-scope buffer of a statement
        # sequence; the next one then fails in codegen ("Can only allocate shared or local
        # memory inside kernel"). Re-run until nothing changes (one run per warp buffer).
        lower = tirx.transform.LowerWarpMemory()
        for _ in range(64):
            new = lower(mod)
            if tvm_ffi.structural_equal(new, mod):
                return new
            mod = new
        raise RuntimeError("LowerWarpMemory did not reach a fixed point in 64 runs")
    return _pass


def register_tir_pipeline() -> str:
    """Register (once) and return the name of kiln's ROCm TIR pipeline.

    It is TVM's default ``s_tir`` pipeline with ``LowerWarpMemory`` run to a fixed point before
    TVM's own device finalization passes.

    Returns
    -------
    str
        The pipeline name, for ``tvm.relax.build(..., tir_pipeline=name)``.
    """
    import tvm
    from tvm.s_tir import pipeline as s_tir_pipeline
    from tvm.tirx import compilation_pipeline as tir_pipelines

    if TIR_PIPELINE not in tir_pipelines.PIPELINE_MAP:
        def factory(**_kwargs):
            main, finalize_host, finalize_device = s_tir_pipeline.default_s_tir_pipeline()

            def finalize_device_fixed():
                return tvm.transform.Sequential(
                    [_lower_warp_memory_to_fixpoint(), finalize_device()], name="kiln.rocm_device")
            return main, finalize_host, finalize_device_fixed
        tir_pipelines.register_tir_pipeline(TIR_PIPELINE, factory)
    return TIR_PIPELINE


def export(mod, path: str, t: KilnTarget) -> dict:
    """Export a rocm build: the hsaco code objects as TVM linked them, embedded unchanged.

    Parameters
    ----------
    mod : tvm.runtime.Module
        Root runtime module (``executable.mod``).
    path : str
        Output shared library.
    t : KilnTarget
        A rocm target.

    Returns
    -------
    dict
        See :func:`kiln.target.export_library`.
    """
    find_host_compiler()
    kernels, formats = [], set()

    def inspect(lib: LibraryBin, _workspace: str) -> None:
        for kind, body in lib.modules:
            if kind in ("hip", "rocm") and body is not None:
                blob = DeviceBlob.parse(body)
                if blob.fmt != "hsaco" or blob.code[:4] != b"\x7fELF":
                    raise ValueError(f"expected an hsaco code object in the {kind} module, "
                                     f"found format {blob.fmt!r}")
                formats.add(blob.fmt)
                kernels.extend(blob.kernels)

    export_packed(mod, path, inspect)
    return {"device_code": "hsaco" if formats else "none", "kernels": len(kernels),
            "nvcc": None, "arch": t.arch}
