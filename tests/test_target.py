"""Tests for kiln.target: target resolution, toolchain checks, cuda/rocm/llvm build and export.

CPU only except the ``gpu``-marked test. The cuda tests need nvcc (they are the point of the
export path); the rocm tests are skipped only when no ld.lld >= 17 exists.
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tvm
from tvm import relax
import tvm.s_tir.dlight as dl
from tvm.script import ir as I
from tvm.script import relax as R

from kiln import knobs
from kiln.errors import ToolchainMissingError
from kiln.target import (
    TARGET_NAMES, KilnTarget, build_context, check_toolchain, device_code, export_library,
    resolve_target, tir_pipeline,
)
from kiln.target import cuda as kcuda
from kiln.target import rocm as krocm
from kiln.target.library import LibraryBin, device_blobs, import_tree, read_library_bin


# fp16 GEMM with f32 accumulation + relu: dlight's Matmul rule tensorizes this shape (M, N, K > 64).
@I.ir_module
class MatmulRelu:
    @R.function
    def main(x: R.Tensor((1024, 1024), "float16"), w: R.Tensor((1024, 1024), "float16")):
        with R.dataflow():
            y = R.matmul(x, w, out_dtype="float32")
            z = R.astype(R.nn.relu(y), "float16")
            R.output(z)
        return z


def _fused(mod):
    return tvm.transform.Sequential([
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR(),
    ])(mod)


def _scheduled(mod, schedule_target):
    with schedule_target:
        return dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.Fallback())(_fused(mod))


def _build(t: KilnTarget, schedule_target=None):
    mod = _scheduled(MatmulRelu, schedule_target or t.schedule_target)
    with build_context(t):
        return tvm.relax.build(mod, t.tvm_target, tir_pipeline=tir_pipeline(t))


def _has_lld() -> bool:
    try:
        krocm.find_lld()
        return True
    except ToolchainMissingError:
        return False


needs_lld = pytest.mark.skipif(not _has_lld(), reason="no ld.lld >= 17 (apt-get install lld-19)")


@pytest.fixture(scope="module")
def cuda_exec():
    return _build(resolve_target("cuda"))


@pytest.fixture(scope="module")
def rocm_exec():
    return _build(resolve_target("rocm"))


# ----------------------------------------------------------------------------- resolution

def test_resolve_three_names():
    cu, ro, ll = resolve_target("cuda"), resolve_target("rocm"), resolve_target("llvm")
    assert (cu.name, cu.arch, cu.device, cu.is_gpu) == ("cuda", "sm_90a", "cuda", True)
    assert cu.tvm_target.kind.name == "cuda" and str(cu.tvm_target.attrs["arch"]) == "sm_90a"
    assert int(cu.tvm_target.attrs["max_shared_memory_per_block"]) == 227 * 1024
    # schedule_target differs only in the arch
    sched = dict(cu.to_dict()["schedule_target"])
    assert sched.pop("arch") == "sm_90"
    code = dict(cu.to_dict()["tvm_target"])
    code.pop("arch")
    assert sched == code
    assert (ro.name, ro.arch, ro.device, ro.is_gpu) == ("rocm", "gfx942", "rocm", True)
    assert str(ro.tvm_target.attrs["mcpu"]) == "gfx942"
    assert int(ro.tvm_target.attrs["thread_warp_size"]) == 64
    assert int(ro.tvm_target.attrs["max_threads_per_block"]) == 256
    assert (ll.name, ll.device, ll.is_gpu) == ("llvm", "cpu", False)
    assert ll.tvm_target.kind.name == "llvm" and ll.arch
    assert resolve_target("cpu") == ll
    assert resolve_target(cu) is cu


def test_resolve_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        resolve_target("tpu")
    for name in ("cuda", "rocm", "llvm", "cpu"):
        assert name in str(err.value)
    assert set(("cuda", "rocm", "llvm", "cpu")) <= set(TARGET_NAMES)
    with pytest.raises(ValueError, match="valid kinds"):
        resolve_target({"kind": "vulkan"})


def test_resolve_dict_overrides_and_round_trip():
    t = resolve_target({"kind": "llvm", "num-cores": 3})
    assert int(t.tvm_target.attrs["num-cores"]) == 3
    for name in ("cuda", "rocm", "llvm"):
        t = resolve_target(name)
        back = resolve_target(t.to_dict())
        assert back == t and hash(back) == hash(t)
    with pytest.raises(ValueError, match="flat-work-group-size"):
        resolve_target({"kind": "rocm", "max_threads_per_block": 1024})


# ----------------------------------------------------------------------------- cuda

def test_dlight_sm_version_parse_drops_sm_90a():
    # The claim behind schedule_target: dlight parses "90a" with int() and gets -1.
    from tvm.s_tir.dlight.gpu.matmul import check_sm_version
    assert check_sm_version("sm_90a") == -1
    assert check_sm_version("sm_90") == 90


def test_dlight_tensor_cores_only_under_schedule_target(cuda_exec):
    t = resolve_target("cuda")
    (fmt, src), = device_code(cuda_exec)
    assert fmt == "cuda" and "wmma" in src  # scheduled under sm_90: tensor cores
    plain = _build(t, schedule_target=tvm.target.Target("nvidia/nvidia-h100"))
    (_, src_tag), = device_code(plain)
    assert "wmma" not in src_tag and "__global__" in src_tag  # the sm_90a tag: plain SIMT


def test_cuda_export_embeds_sm90a_cubin_and_no_source(cuda_exec, tmp_path):
    t = resolve_target("cuda")
    path = tmp_path / "mm.so"
    info = export_library(cuda_exec, path, t)
    assert info["device_code"] == "cubin" and info["kernels"] >= 1
    assert info["nvcc"] and info["arch"] == "sm_90a"
    assert sorted(os.listdir(tmp_path)) == ["mm.so"]  # no temp file left behind
    data = path.read_bytes()
    assert b'extern "C" __global__' not in data and b"nvcuda::wmma" not in data
    blobs = device_blobs(read_library_bin(str(path)))
    assert [k for k, _ in blobs] == ["cuda"]
    blob = blobs[0][1]
    assert blob.fmt == "cubin" and len(blob.kernels) == info["kernels"]
    cubin = blob.code
    assert cubin[:4] == b"\x7fELF"
    assert struct.unpack_from("<H", cubin, 18)[0] == 190  # EM_CUDA
    assert (struct.unpack_from("<I", cubin, 48)[0] >> 8) & 0xFF == 90  # SM 90 in e_flags
    assert b"-arch sm_90a" in cubin  # nvcc's tool note: the arch-specific variant
    assert cubin in data


def _packed_bytes(ex) -> bytes:
    import tvm_ffi
    return tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(ex.mod).numpy().tobytes()


def _packed(ex) -> LibraryBin:
    return LibraryBin.parse(_packed_bytes(ex))


def _needs_source_form(ex):
    # Where the CUDA runtime loads (a GPU machine), TVM compiles kernels during the build, through
    # kiln's nvcc callback, and the module never holds source.
    (_, blob), = device_blobs(_packed(ex))
    if blob.fmt != "cuda":
        pytest.skip(f"kernels were compiled during the build ({blob.fmt}): CUDA runtime present")


def test_library_bin_codec_round_trips(cuda_exec):
    raw = _packed_bytes(cuda_exec)
    lib = LibraryBin.parse(raw)
    assert lib.to_bytes() == raw
    (kind, blob), = device_blobs(lib)
    assert kind == "cuda" and blob.to_bytes() == lib.modules[-1][1]
    assert blob.fmt in ("cuda", "cubin") and blob.kernels
    if blob.fmt == "cuda":
        assert blob.code.decode() == device_code(cuda_exec)[0][1]


def test_cuda_missing_nvcc_raises_and_writes_nothing(cuda_exec, tmp_path):
    t = resolve_target("cuda")
    path = tmp_path / "out" / "mm.so"
    with knobs.scope(nvcc="/nonexistent/nvcc"):
        with pytest.raises(ToolchainMissingError, match="nvcc") as err:
            export_library(cuda_exec, path, t)
        assert "KILN_NVCC" in str(err.value) and "CUDA toolkit" in str(err.value)
        with pytest.raises(ToolchainMissingError):
            check_toolchain(t)
    assert not path.exists()
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_cuda_nvcc_failure_leaves_no_partial_file(cuda_exec, tmp_path):
    # an nvcc that runs (--version) but fails to compile: the error surfaces, nothing at path
    _needs_source_form(cuda_exec)
    fake = tmp_path / "nvcc"
    real = kcuda.find_nvcc()[0]
    fake.write_text(f'#!/bin/sh\nif [ "$1" = "--version" ]; then exec {real} --version; fi\n'
                    'echo "fake nvcc: compile refused" >&2; exit 2\n')
    fake.chmod(0o755)
    path = tmp_path / "lib" / "mm.so"
    with knobs.scope(nvcc=str(fake)):
        with pytest.raises(RuntimeError, match="compile refused"):
            export_library(cuda_exec, path, resolve_target("cuda"))
    assert os.listdir(tmp_path / "lib") == []


def test_build_context_cuda_restores_compile_callback():
    import tvm_ffi
    name = "tvm_callback_cuda_compile"
    before = tvm_ffi.get_global_func(name, allow_missing=True)
    with build_context("cuda") as t:
        assert tvm.target.Target.current().kind.name == "cuda" and t.name == "cuda"
        cubin = tvm_ffi.get_global_func(name)(
            'extern "C" __global__ void k(float* x) { x[threadIdx.x] = 1.0f; }')
        assert bytes(cubin)[:4] == b"\x7fELF"
    after = tvm_ffi.get_global_func(name, allow_missing=True)
    assert (before is None) == (after is None)
    assert tvm.target.Target.current(allow_none=True) is None


# ----------------------------------------------------------------------------- rocm

@needs_lld
def test_rocm_build_is_hsaco(rocm_exec, tmp_path):
    kinds = [m.kind for m in import_tree(rocm_exec)]
    assert "hip" in kinds
    (fmt, asm), = device_code(rocm_exec)
    assert fmt == "asm" and "amdgcn" in asm and "gfx942" in asm
    path = tmp_path / "mm_rocm.so"
    info = export_library(rocm_exec, path, resolve_target("rocm"))
    assert info == {"device_code": "hsaco", "kernels": info["kernels"], "nvcc": None,
                    "arch": "gfx942"} and info["kernels"] >= 1
    (kind, blob), = device_blobs(read_library_bin(str(path)))
    assert (kind, blob.fmt) == ("hip", "hsaco")
    assert blob.code[:4] == b"\x7fELF" and b"gfx942" in blob.code
    assert sorted(os.listdir(tmp_path)) == ["mm_rocm.so"]


@needs_lld
def test_rocm_mfma_needs_the_warp_memory_pipeline():
    # MFMA tensorization uses three warp-scope buffers; TVM's pipeline lowers only the first.
    from tvm import te
    from tvm.s_tir.tensor_intrin import rocm as intrin
    from tvm.testing.tir import mfma_schedule

    n = 256
    a = te.placeholder((n, n), "float16", name="A")
    b = te.placeholder((n, n), "float16", name="B")
    k = te.reduce_axis((0, n), name="k")
    c = te.compute((n, n), lambda i, j: te.sum(
        a[i, k].astype("float32") * b[k, j].astype("float32"), axis=[k]), name="C")

    def tile_map(layout):
        return lambda i, j: (i // 16, j // 16, *layout(i % 16, j % 16))

    sch = mfma_schedule(
        te.create_prim_func([a, b, c]), 16, "float16", False, [1, 2, 2, 4, 1], [1, 4, 2, 1, 2],
        [8, 2, 1], tile_map(intrin.shared_16x16_to_local_64x4_layout_A),
        tile_map(intrin.shared_16x16_to_local_64x4_layout_B),
        tile_map(intrin.shared_16x16_to_local_64x4_layout_C),
        intrin.ROCM_MFMA_LOAD_16x16_A_SHARED_f16_INTRIN, intrin.ROCM_MFMA_LOAD_16x16_B_SHARED_f16_INTRIN,
        intrin.ROCM_MFMA_f16f16f32_INTRIN, intrin.ROCM_MFMA_fill_16x16_f32_INTRIN,
        intrin.ROCM_MFMA_STORE_16x16_f32_INTRIN)
    t = resolve_target("rocm")
    with build_context(t):
        with pytest.raises(Exception, match="Can only allocate shared or local memory"):
            tvm.compile(sch.mod["main"], target=t.tvm_target, tir_pipeline="default")
        ex = tvm.compile(sch.mod["main"], target=t.tvm_target, tir_pipeline=tir_pipeline(t))
    (_, asm), = device_code(ex)
    assert "v_mfma_f32_16x16x16" in asm


@needs_lld
def test_build_context_rocm_restores_state():
    import tvm_ffi
    with build_context("rocm"):
        assert list(tvm_ffi.get_global_func("tvm_callback_rocm_bitcode_path")()) == []
        assert tvm.transform.PassContext.current().config["tirx.disable_cse_tir"]
    assert "tirx.disable_cse_tir" not in tvm.transform.PassContext.current().config
    # TVM's own bitcode lookup is back (it fails without a ROCm install, ours never does)
    own = tvm_ffi.get_global_func("tvm_callback_rocm_bitcode_path", allow_missing=True)
    if own is not None and not os.path.isdir("/opt/rocm"):
        with pytest.raises(Exception):
            own()


def test_rocm_missing_lld(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no ld.lld at all
    with knobs.scope(lld="/nonexistent"):
        with pytest.raises(ToolchainMissingError, match="ld.lld >= 17") as err:
            check_toolchain("rocm")
        assert "lld-19" in str(err.value) and "/nonexistent" in str(err.value)
        with pytest.raises(ToolchainMissingError):
            with build_context("rocm"):
                pass
    with knobs.scope(lld=""):
        with pytest.raises(ToolchainMissingError, match="none on PATH"):
            check_toolchain("rocm")


def test_rocm_old_lld_rejected(tmp_path):
    old = tmp_path / "ld.lld"
    old.write_text('#!/bin/sh\necho "Debian LLD 14.0.6 (compatible with GNU linkers)"\n')
    old.chmod(0o755)
    with knobs.scope(lld=str(old)):
        with pytest.raises(ToolchainMissingError, match="LLD 14"):
            check_toolchain("rocm")


# ----------------------------------------------------------------------------- llvm

def test_llvm_build_export_load_run(tmp_path):
    @I.ir_module
    class AddRelu:
        @R.function
        def main(x: R.Tensor((4, 8), "float32"), y: R.Tensor((4, 8), "float32")):
            with R.dataflow():
                z = R.nn.relu(R.add(x, y))
                R.output(z)
            return z

    t = resolve_target("llvm")
    check_toolchain(t)
    assert tir_pipeline(t) == "default"
    with build_context(t):
        ex = tvm.relax.build(AddRelu, t.tvm_target)
    assert device_code(ex) == []
    info = export_library(ex, tmp_path / "add.so", t)
    assert info == {"device_code": "none", "kernels": 0, "nvcc": None, "arch": t.arch}
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "add.so")), tvm.cpu())
    x, y = np.random.randn(4, 8).astype("float32"), np.random.randn(4, 8).astype("float32")
    out = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y)).numpy()
    np.testing.assert_allclose(out, np.maximum(x + y, 0), rtol=1e-6)


def test_export_rejects_wrong_target(cuda_exec, tmp_path):
    with pytest.raises(ValueError, match="not built for target 'rocm'"):
        export_library(cuda_exec, tmp_path / "x.so", resolve_target("rocm"))
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- gpu

_RUN_ON_GPU = textwrap.dedent("""
    import sys, numpy as np, tvm, tvm_ffi
    from tvm import relax
    def refuse(*_):
        raise RuntimeError("a CUDA compiler was called at load time")
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", refuse, override=True)
    vm = relax.VirtualMachine(tvm.runtime.load_module(sys.argv[1]), tvm.cuda(0))
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1024, 1024)) / 8).astype("float16")
    w = (rng.standard_normal((1024, 1024)) / 8).astype("float16")
    dev = tvm.cuda(0)
    out = vm["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev)).numpy()
    ref = np.maximum(x.astype("float32") @ w.astype("float32"), 0)
    err = float(np.abs(out.astype("float32") - ref).max() / np.abs(ref).max())
    print("rel err", err)
    assert err < 1e-2, err
""")


@pytest.mark.gpu
def test_gpu_exported_cubin_loads_and_runs_without_compiler(tmp_path):
    t = resolve_target("cuda")
    ex = _build(t)  # on a GPU machine TVM compiles during the build, through kiln's nvcc callback
    path = tmp_path / "mm_gpu.so"
    info = export_library(ex, path, t)
    assert info["device_code"] == "cubin"
    env = dict(os.environ, PATH="/usr/bin:/bin", TVM_CUDA_COMPILE_MODE="none")
    proc = subprocess.run([sys.executable, "-c", _RUN_ON_GPU, str(path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
