"""CUDA specifics: finding nvcc, compiling kernels to cubin, and exporting with cubins embedded.

Why: the TVM 0.27 wheel, on a machine where the CUDA runtime library cannot load (no driver),
stores CUDA *source* in the built module and leaves compilation to load time (NVRTC through
``cuda-bindings``, or nvcc). kiln compiles at export instead, so a deployed library needs only
the CUDA driver.
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

__all__ = ["find_nvcc", "nvcc_flags", "compile_cubin", "compile_callback", "export", "register_tir_pipeline",
           "TIR_PIPELINE", "TIRX_FUNC_ATTR"]

_MIN_NVCC = (12, 0)  # first CUDA release with sm_90a
_INSTALL_HINT = ("install the CUDA toolkit >= 12.0 (it provides nvcc) and put it on PATH, "
                 "or set KILN_NVCC=/path/to/nvcc")
_NEEDED_FOR = "compile CUDA kernels to sm_90a cubins (cuda export)"


def _nvcc_version(path: str, mtime: float) -> "str | None":
    m = re.search(r"release (\d+)\.(\d+), V([\d.]+)", tool_version_text(path, mtime) or "")
    return m.group(3) if m else None


def find_nvcc() -> "tuple[str, str]":
    """Locate nvcc (knob ``nvcc``: a name on PATH or a path) and check it runs and is >= 12.0.

    Returns
    -------
    (str, str)
        Absolute path and version (e.g. ``"13.0.88"``).

    Raises
    ------
    kiln.errors.ToolchainMissingError
        nvcc is missing, does not run, or is too old for sm_90a.
    """
    want = knobs.get("nvcc")
    path = shutil.which(want) if os.sep not in want else (want if os.access(want, os.X_OK) else None)
    if not path:
        raise ToolchainMissingError("nvcc", _NEEDED_FOR, f"{want!r} was not found; {_INSTALL_HINT}")
    version = _nvcc_version(path, os.path.getmtime(path))
    if version is None:
        raise ToolchainMissingError("nvcc", _NEEDED_FOR,
                                    f"{path} --version failed or was not understood; {_INSTALL_HINT}")
    if tuple(int(x) for x in version.split(".")[:2]) < _MIN_NVCC:
        raise ToolchainMissingError(f"nvcc >= {_MIN_NVCC[0]}.{_MIN_NVCC[1]}", _NEEDED_FOR,
                                    f"{path} is {version}; {_INSTALL_HINT}")
    return path, version


def nvcc_flags(arch: str) -> "list[str]":
    """nvcc options kiln compiles TVM's generated CUDA with, for ``arch`` such as ``"sm_90a"``.

    Parameters
    ----------
    arch : str
        ``sm_XY`` or ``sm_XYa``.

    Returns
    -------
    list of str
    """
    suffix = arch[len("sm_"):]
    return [
        "--cubin", "-O3", "-gencode", f"arch=compute_{suffix},code=sm_{suffix}",
        # Same language switches as TVM's own nvcc path (tvm.support.nvcc): TVM's source uses the
        # half/bf16 operators that cuda_fp16.h hides under these macros.
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
        "--expt-relaxed-constexpr", "--expt-extended-lambda",
        # TVM's own nvcc/NVRTC paths add --use_fast_math; kiln does not by default: on the H200 it made
        # the fp16 causal-mask softmax of GPT-2 and Llama NaN, and it gained nothing on BERT-Large
        # (benchmarks/NOTES.md). ptxas --register-usage-level=10 is TVM's default too.
        *(["--use_fast_math"] if knobs.get("cuda_fast_math") else []),
        "--ptxas-options=--register-usage-level=10",
    ]


def compile_cubin(source: str, arch: str, workdir: "str | None" = None) -> bytes:
    """Compile TVM-generated CUDA source to a cubin with nvcc.

    Parameters
    ----------
    source : str
        CUDA C++ source of one TVM CUDA module.
    arch : str
        Target arch, e.g. ``"sm_90a"``.
    workdir : str, optional
        Folder for the temporary .cu/.cubin files (a fresh temp dir if None).

    Returns
    -------
    bytes
        The cubin (an ELF file).

    Raises
    ------
    kiln.errors.ToolchainMissingError
        nvcc is missing.
    RuntimeError
        nvcc rejected the source; the message has nvcc's output.
    """
    nvcc, _ = find_nvcc()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="kiln-nvcc-"))
        fd, src = tempfile.mkstemp(suffix=".cu", dir=workdir)
        with os.fdopen(fd, "w") as f:
            f.write(source)
        out = src[:-3] + ".cubin"
        try:
            proc = subprocess.run([nvcc, *nvcc_flags(arch), "-o", out, src],
                                  capture_output=True, text=True, timeout=3600)
        except FileNotFoundError:
            raise ToolchainMissingError("nvcc", _NEEDED_FOR, _INSTALL_HINT) from None
        if proc.returncode != 0:
            log = (proc.stdout + proc.stderr).strip()
            raise RuntimeError(f"nvcc failed ({proc.returncode}) compiling {src} for {arch}:\n"
                               f"{log[-4000:]}")
        with open(out, "rb") as f:
            cubin = f.read()
    if cubin[:4] != b"\x7fELF":
        raise RuntimeError(f"nvcc produced no ELF cubin for {arch}")
    return cubin


@contextlib.contextmanager
def compile_callback(t: KilnTarget) -> Iterator[None]:
    """Route TVM's ``tvm_callback_cuda_compile`` to :func:`compile_cubin` for ``t.arch``.

    Only a build on a machine whose CUDA runtime loads calls it (TVM compiles there during the
    build); on a CPU-only machine the module keeps source and :func:`export` compiles it. Either
    way the artifact ends up with the same nvcc cubin. The previous callback is restored on exit.
    """
    import tvm_ffi
    name = "tvm_callback_cuda_compile"
    previous = tvm_ffi.get_global_func(name, allow_missing=True)

    def _compile(code):
        return bytearray(compile_cubin(str(code), t.arch))

    tvm_ffi.register_global_func(name, _compile, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(name, previous, override=True)
        else:
            tvm_ffi.remove_global_func(name)


def export(mod, path: str, t: KilnTarget) -> dict:
    """Export ``mod`` to ``path`` with every CUDA-source blob replaced by an nvcc cubin.

    Blobs already compiled at build time (``cubin``/``fatbin``/``ptx``, from a machine with a
    CUDA driver) are kept. Called through :func:`kiln.target.export_library`.

    Parameters
    ----------
    mod : tvm.runtime.Module
        Root runtime module (``executable.mod``).
    path : str
        Output shared library.
    t : KilnTarget
        A cuda target.

    Returns
    -------
    dict
        See :func:`kiln.target.export_library`.
    """
    _, version = find_nvcc()   # fail before anything is written
    find_host_compiler()
    formats, kernels = set(), []

    def rewrite(lib: LibraryBin, workspace: str) -> None:
        for entry in lib.modules:
            if entry[0] != "cuda":
                continue
            blob = DeviceBlob.parse(entry[1])
            if blob.tail:
                raise ValueError("unrecognized CUDA module layout (trailing bytes after code); "
                                 "kiln supports apache-tvm 0.27's layout only")
            if blob.fmt == "cuda":
                blob.code = compile_cubin(blob.code.decode(), t.arch, workspace)
                blob.fmt = "cubin"
                entry[1] = blob.to_bytes()
            formats.add(blob.fmt)
            kernels.extend(blob.kernels)

    export_packed(mod, path, rewrite)
    device = "cubin" if formats <= {"cubin"} else "+".join(sorted(formats))
    return {"device_code": device if formats else "none", "kernels": len(kernels),
            "nvcc": version, "nvcc_flags": nvcc_flags(t.arch), "arch": t.arch}


# --------------------------------------------------------------------------------------------
# TIR pipeline for modules mixing s_tir (dlight-scheduled) and TIRx (hand-written) kernels.
# --------------------------------------------------------------------------------------------

#: Name under which kiln's mixed CUDA TIR pipeline is registered with ``tvm.tirx``.
TIR_PIPELINE = "kiln.cuda_mixed"
#: PrimFunc attr naming the TIR pipeline a function needs (``"tirx"`` for kiln's sm_90a GEMM).
TIRX_FUNC_ATTR = "kiln.tir_pipeline"


def _wants_tirx(func) -> bool:
    import tvm
    return (isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and TIRX_FUNC_ATTR in func.attrs
            and str(func.attrs[TIRX_FUNC_ATTR]) == "tirx")


def register_tir_pipeline() -> str:
    """Register (once) and return the name of kiln's CUDA TIR pipeline.

    Neither of TVM's pipelines builds a module that mixes both kinds of kernel: ``"default"`` (s_tir)
    fails on TIRx kernels (``MakePackedAPI``: "variables (tid, bid, wg) are used, but are not passed in
    as API arguments") and ``"tirx"`` fails on dlight's sblock schedules ("Failed to lower the TIRx
    program"). This pipeline splits the module: PrimFuncs whose ``kiln.tir_pipeline`` attr is
    ``"tirx"`` go through TVM's ``tirx`` main pass, every other function through ``s_tir``'s, and the
    two results are merged (each main pass ends in ``SplitHostDevice`` + ``MakePackedAPI``, so the
    halves are independent). The host/device finalisation passes of the two pipelines are the same
    (``LowerTVMBuiltin, LowerIntrin`` / ``LowerWarpMemory, StmtSimplify, LowerIntrin``) and are shared.
    A module without TIRx functions goes through ``s_tir`` unchanged (same as ``"default"``).

    Returns
    -------
    str
        The pipeline name, for ``tvm.relax.build(..., tir_pipeline=name)``.
    """
    import tvm
    from tvm.s_tir import pipeline as s_tir_pipeline
    from tvm.tirx import compilation_pipeline as tir_pipelines

    if TIR_PIPELINE in tir_pipelines.PIPELINE_MAP:
        return TIR_PIPELINE

    def factory(**_kwargs):
        s_main, finalize_host, finalize_device = s_tir_pipeline.default_s_tir_pipeline()
        x_main, _, _ = tir_pipelines.tirx_pipeline()

        @tvm.transform.module_pass(opt_level=0, name="kiln.cuda_mixed_tir")
        def _pipeline(mod, _ctx):
            tirx_funcs = {gv: f for gv, f in mod.functions_items() if _wants_tirx(f)}
            if not tirx_funcs:
                return s_main(mod)
            rest = {gv: f for gv, f in mod.functions_items() if gv not in tirx_funcs}
            attrs = mod.attrs
            out, names = {}, set()
            for part, main in ((rest, s_main), (tirx_funcs, x_main)):
                if not part:
                    continue
                sub = main(tvm.IRModule(part, attrs=attrs))
                for gv, f in sub.functions_items():
                    if gv.name_hint in names:
                        raise ValueError(f"kiln.cuda_mixed: function {gv.name_hint} produced by both halves")
                    names.add(gv.name_hint)
                    out[gv] = f
            return tvm.IRModule(out, attrs=attrs)

        return _pipeline, finalize_host, finalize_device

    tir_pipelines.register_tir_pipeline(TIR_PIPELINE, factory)
    return TIR_PIPELINE
