"""The CLI end to end on the CPU: compile a zoo model, run it against torch, inspect it, and its errors."""
import json
import os

import pytest

from kiln.cli import main


def test_compile_run_inspect(tmp_path, capsys):
    out = str(tmp_path / "bert")
    assert main(["compile", "bert", "--size", "tiny", "--target", "llvm", "--out", out, "--batch", "2"]) == 0
    assert "compiled bert for llvm" in capsys.readouterr().out
    assert main(["run", out, "--iters", "2"]) == 0
    text = capsys.readouterr().out
    assert "max abs error vs torch fp32" in text and "latency: median" in text
    err = float(text.split("max abs error vs torch fp32: ")[1].split()[0])
    assert err < 1e-3
    assert main(["inspect", out]) == 0
    text = capsys.readouterr().out
    assert "target llvm" in text and "input_ids int64[2, " in text and "sha256 verified" in text
    assert main(["inspect", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "kiln-artifact"


def test_cli_factory_and_dump_ir(tmp_path, capsys, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()).eval(), (torch.randn(2, 8),)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out, dump = str(tmp_path / "fac"), str(tmp_path / "ir")
    assert main(["compile", "mymodels:make", "--target", "llvm", "--out", out, "--dump-ir", dump]) == 0
    assert "05_lower.py" in os.listdir(dump)
    assert main(["run", out, "--iters", "1"]) == 0
    assert "outputs: (2, 4) float32" in capsys.readouterr().out


def test_cli_errors_are_typed_and_named(tmp_path, capsys):
    assert main(["compile", "nosuchmodel", "--target", "llvm", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "UnknownModelError" in err and "'bert'" in err
    assert main(["inspect", str(tmp_path)]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
