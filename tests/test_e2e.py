"""compile -> run -> export -> load round trips on the CPU (llvm), and every way loading must refuse."""
import json
import os

import numpy as np
import pytest
import torch

import kiln
from kiln.errors import (ArtifactError, ArtifactIntegrityError, InputMismatchError, SignatureMismatchError,
                         ToolchainMissingError)
from kiln.signature import Signature


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(24, 48), torch.nn.Linear(48, 10)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return MLP().eval(), (torch.randn(3, 24),)


@pytest.fixture(scope="module")
def mlp_art(mlp, tmp_path_factory):
    model, inputs = mlp
    dump = tmp_path_factory.mktemp("dump")
    art = kiln.compile(model, inputs, target="llvm", dump_ir=str(dump))
    return art, dump


def test_compile_runs_and_matches_torch(mlp, mlp_art):
    model, _ = mlp
    art, _ = mlp_art
    x = torch.randn(3, 24)
    np.testing.assert_allclose(art(x).numpy(), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_stages_are_named_timed_and_dumped(mlp_art):
    art, dump = mlp_art
    assert list(art.timings) == ["import", "cleanup", "fusion", "schedule", "lower", "codegen"]
    files = sorted(os.listdir(dump))
    for i, name in enumerate(["import", "cleanup", "fusion", "schedule", "lower"], start=1):
        assert f"{i:02d}_{name}.py" in files
    assert "R.call_tir" in (dump / "03_fusion.py").read_text()
    assert "R.nn.gelu" in (dump / "01_import.py").read_text() or "gelu" in (dump / "01_import.py").read_text()


def test_export_load_round_trip(mlp, mlp_art, tmp_path):
    model, _ = mlp
    art, _ = mlp_art
    out = art.export(str(tmp_path / "mlp"))
    assert sorted(os.listdir(out)) == ["manifest.json", "model.so", "weights.params"]
    man = json.loads((tmp_path / "mlp" / "manifest.json").read_text())
    assert man["versions"]["tvm"] == "0.27.0.post1" and man["target"]["name"] == "llvm"
    assert set(man["files"]) == {"model.so", "weights.params"} and all(len(h) == 64 for h in man["files"].values())
    assert man["signature"]["inputs"][0] == {"name": "x", "shape": [3, 24], "dtype": "float32"}
    m = kiln.load(out)
    x = torch.randn(3, 24)
    np.testing.assert_allclose(m(x).numpy(), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_plain_tvm_runtime_loads_the_library(mlp, mlp_art, tmp_path):
    """The artifact needs no kiln to run: load_module + VirtualMachine + the weights file."""
    import tvm
    from tvm import relax
    model, _ = mlp
    art, _ = mlp_art
    out = art.export(str(tmp_path / "plain"))
    lib = tvm.runtime.load_module(os.path.join(out, "model.so"))
    vm = relax.VirtualMachine(lib, tvm.cpu())
    params = tvm.runtime.load_param_dict_from_file(os.path.join(out, "weights.params"))
    x = np.random.randn(3, 24).astype("float32")
    y = vm["main"](tvm.runtime.tensor(x), *[params[f"p{i}"] for i in range(len(params))])
    ref = model(torch.from_numpy(x)).detach().numpy()
    assert len(y) == 1  # main returns the tuple of the model's outputs
    np.testing.assert_allclose(y[0].numpy(), ref, rtol=1e-4, atol=1e-5)


def test_corrupted_file_is_rejected(mlp_art, tmp_path):
    art, _ = mlp_art
    out = art.export(str(tmp_path / "bad"))
    with open(os.path.join(out, "weights.params"), "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ArtifactIntegrityError, match="weights.params"):
        kiln.load(out)


def test_missing_file_and_not_an_artifact(mlp_art, tmp_path):
    art, _ = mlp_art
    out = art.export(str(tmp_path / "gone"))
    os.remove(os.path.join(out, "model.so"))
    with pytest.raises(ArtifactError, match="model.so"):
        kiln.load(out)
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        kiln.load(str(tmp_path))


def test_wrong_signature_is_rejected(mlp_art, tmp_path):
    art, _ = mlp_art
    out = art.export(str(tmp_path / "sig"))
    wrong = Signature.from_json(dict(art.signature.to_json(), inputs=[{"name": "x", "shape": [4, 24], "dtype": "float32"}]))
    with pytest.raises(SignatureMismatchError, match="differs from the expected"):
        kiln.load(out, signature=wrong)
    # A manifest edited to promise a second input no longer matches the compiled function's arity.
    mpath = os.path.join(out, "manifest.json")
    man = json.load(open(mpath))
    man["signature"]["inputs"].append({"name": "y", "shape": [3], "dtype": "float32"})
    json.dump(man, open(mpath, "w"))
    with pytest.raises(SignatureMismatchError, match="takes 5 arguments"):
        kiln.load(out)


def test_wrong_inputs_name_expected_vs_given(mlp_art):
    art, _ = mlp_art
    with pytest.raises(InputMismatchError, match=r"expected shape \(3, 24\), given \(3, 25\)"):
        art(torch.randn(3, 25))
    with pytest.raises(InputMismatchError, match="expected dtype float32, given float64"):
        art(torch.randn(3, 24, dtype=torch.float64))
    with pytest.raises(InputMismatchError, match=r"expected 1 input\(s\) \['x'\], given 2"):
        art(torch.randn(3, 24), torch.randn(3, 24))


def test_wrong_device_is_named(mlp_art, tmp_path):
    art, _ = mlp_art
    out = art.export(str(tmp_path / "dev"))
    with pytest.raises(ArtifactError, match="built for llvm"):
        kiln.load(out, device="cuda")


def test_failed_export_leaves_nothing(mlp, tmp_path):
    model, inputs = mlp
    with kiln.knobs.scope(nvcc="/nonexistent/nvcc"):
        with pytest.raises(ToolchainMissingError, match="nvcc"):
            kiln.compile(model, inputs, target="cuda")
    assert os.listdir(tmp_path) == []


def test_export_refuses_to_clobber_foreign_directory(mlp_art, tmp_path):
    art, _ = mlp_art
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("x")
    with pytest.raises(ArtifactError, match="not a kiln artifact"):
        art.export(str(tmp_path / "data"))
    assert (tmp_path / "data" / "precious.txt").read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == ["data"]


def test_dynamic_shapes_one_artifact_many_shapes(tmp_path):
    from torch.export import Dim
    torch.manual_seed(1)
    model = MLP().eval()
    batch = Dim("batch", min=1, max=64)
    art = kiln.compile(model, (torch.randn(4, 24),), target="llvm", dynamic_shapes=({0: batch},))
    assert art.signature.inputs[0].shape == ("batch", 24)
    assert art.signature.dims == {"batch": (1, 64)}
    m = kiln.load(art.export(str(tmp_path / "dyn")))
    for b in (1, 7, 64):
        x = torch.randn(b, 24)
        np.testing.assert_allclose(m(x).numpy(), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(InputMismatchError, match=r"\[1, 64\], given 65"):
        m(torch.randn(65, 24))
