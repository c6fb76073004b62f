"""GPU checks (marker gpu): run on the H200 with the full TVM carried; skipped without a GPU."""
import os

import numpy as np
import pytest
import torch

import kiln
from kiln import zoo
from kiln.errors import InputMismatchError
from kiln.verify import TOLERANCES, cast_inputs, compare, torch_reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name,dtype", [("bert", "float16"), ("bert", "bfloat16"), ("resnet50", "float16"),
                                        ("vit", "float16"), ("gpt2", "float16"), ("llama", "bfloat16")])
def test_zoo_on_cuda_matches_torch(name, dtype, tmp_path):
    zm = zoo.get(name, size="tiny", batch=2)
    art = kiln.compile(zm.model, zm.example_inputs, target="cuda", dtype=dtype)
    assert art.uses_cuda_graph
    m = kiln.load(art.export(str(tmp_path / name)), device="cuda")
    inputs = cast_inputs(zm.example_inputs, getattr(torch, dtype), "cuda")
    ref = torch_reference(zm.model, zm.example_inputs, dtype=torch.float32)
    first = m(*inputs)
    again = m(*inputs)  # the second call replays the captured CUDA graph
    for out in (first, again):
        c = compare(out if isinstance(out, tuple) else (out,), ref)
        assert c["rel_err"] <= TOLERANCES[dtype], c


def test_dynamic_shapes_on_cuda(tmp_path):
    """Bounded dynamic batch and sequence: dynamic-M GEMM kernels and one CUDA graph captured per (batch, seq),
    replayed on a later call of the same shape after other shapes ran (each output checked)."""
    zm = zoo.get("bert", size="tiny", batch=2)
    art = kiln.compile(zm.model, zm.example_inputs, target="cuda", dtype="float16", dynamic_shapes=zm.dynamic_shapes)
    assert art.uses_cuda_graph
    assert any(r["func"].startswith("gemm_sm90_dynM") for r in art.schedule_report), art.schedule_report
    m = kiln.load(art.export(str(tmp_path / "dyn")), device="cuda")
    for batch, seq in ((1, 8), (3, 37), (1, 8), (3, 37), (2, 128), (1, 8)):
        z2 = zoo.get("bert", size="tiny", batch=batch, seq=seq)
        ref = torch_reference(z2.model, z2.example_inputs, dtype=torch.float32)
        out = m(*cast_inputs(z2.example_inputs, torch.float16, "cuda"))
        c = compare(out if isinstance(out, tuple) else (out,), ref)
        assert c["rel_err"] <= TOLERANCES["float16"], (batch, seq, c)


def test_plain_tvm_runtime_on_cuda(tmp_path):
    import tvm
    from tvm.runtime.vm import VirtualMachine
    zm = zoo.get("resnet50", size="tiny", batch=1)
    out = kiln.compile(zm.model, zm.example_inputs, target="cuda", dtype="float16").export(str(tmp_path / "r"))
    assert kiln.load(out).manifest["device_code"]["device_code"] == "cubin"
    lib = tvm.runtime.load_module(os.path.join(out, "model.so"))
    vm = VirtualMachine(lib, tvm.cuda())
    params = tvm.runtime.load_param_dict_from_file(os.path.join(out, "weights.params"))
    x = zm.example_inputs[0].half()
    y = vm["main"](tvm.runtime.tensor(x.numpy(), tvm.cuda()), *[params[f"p{i}"].copyto(tvm.cuda()) for i in range(len(params))])
    ref = torch_reference(zm.model, zm.example_inputs, dtype=torch.float32)[0].numpy()
    y = y[0]  # main returns the tuple of outputs
    assert np.abs(y.numpy().astype("float64") - ref).max() / np.abs(ref).max() <= TOLERANCES["float16"]


def test_cpu_tensor_to_cuda_module_is_named(tmp_path):
    zm = zoo.get("resnet50", size="tiny", batch=1)
    art = kiln.compile(zm.model, zm.example_inputs, target="cuda", dtype="float16")
    with pytest.raises(InputMismatchError, match="expected a tensor on cuda"):
        art(zm.example_inputs[0].half())


def test_runtime_only_tvm_loads_artifact(tmp_path):
    """A subprocess with TVM's runtime library alone (no compiler mapped, compile callback raising) runs it."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    from deploy_check import write_expected
    zm = zoo.get("bert", size="tiny", batch=2)
    out = kiln.compile(zm.model, zm.example_inputs, target="cuda", dtype="float16").export(str(tmp_path / "arts" / "bert"))
    write_expected(out, zm.example_inputs, torch_reference(zm.model, zm.example_inputs, dtype=torch.float32))
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    res = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "deploy_check.py"), "check",
                          str(tmp_path / "arts"), "--json", str(tmp_path / "rt.json")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    import json
    rep = json.load(open(tmp_path / "rt.json"))
    assert rep["runtime_only"] and all(r["ok"] and r["runtime_only"] for r in rep["rows"]), rep


@pytest.mark.gpu
def test_model_with_weights_on_the_gpu_compiles_and_matches(tmp_path):
    """A model (and inputs) already on cuda: kiln exports a CPU copy (constants must not stay on the GPU for the
    host-side folding) and the artifact runs on the GPU."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 16 * 16, 10)).eval()
    x = torch.randn(2, 3, 16, 16)
    ref = torch_reference(model, (x,), dtype=torch.float32)
    art = kiln.compile(model.cuda(), (x.cuda(),), target="cuda")
    assert any("exported a CPU copy" in n for n in art.notes), art.notes
    m = kiln.load(art.export(str(tmp_path / "m")), device="cuda")
    c = compare(m(x.cuda()), ref)
    assert c["rel_err"] <= 1e-4, c
