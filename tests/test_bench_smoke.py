"""CPU smoke test of the benchmark harness ``benchmarks/run.py`` (no GPU needed).

Runs the whole harness logic on the tiny zoo BERT with target ``llvm``: torch eager (the reference),
stock TVM, and the stock TVM pipeline on kiln's import, into a temporary JSON, then checks the rows,
their errors, ``--merge`` and ``--table-only``. Needs ``kiln.zoo`` and ``kiln.frontend``.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str):
    path = os.path.join(ROOT, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"kiln_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # run.py puts benchmarks/ and the repo root on sys.path
    return mod


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_bench_helpers():
    import torch
    run = _load("run")  # noqa: F841 - sets sys.path for timing
    timing = _load("timing")
    s = timing.summarize([3.0, 1.0, 2.0, 4.0, 5.0])
    assert s["median_ms"] == 3.0 and s["p10_ms"] < s["median_ms"] < s["p90_ms"] and s["reps"] == 5

    ids = torch.randint(0, 50, (1, 8))
    mask = torch.ones(1, 8, dtype=torch.int64)
    px = torch.zeros(1, 3, 4, 4)
    a = timing.fresh_inputs((ids, mask, px), batch=3, seed=1, vocab=50, float_dtype=torch.float16)
    b = timing.fresh_inputs((ids, mask, px), batch=3, seed=2, vocab=50, float_dtype=torch.float16)
    assert [tuple(t.shape) for t in a] == [(3, 8), (3, 8), (3, 3, 4, 4)]
    assert int(a[0].min()) >= 0 and int(a[0].max()) < 50 and not torch.equal(a[0], b[0])
    assert torch.equal(a[1], torch.ones(3, 8, dtype=torch.int64))  # masks are kept, not randomised
    assert a[2].dtype == torch.float16 and a[2].abs().sum() > 0      # never zeros

    ref = [torch.tensor([1.0, -4.0])]
    c = timing.compare(ref, [torch.tensor([1.5, -4.0])])
    assert c["max_abs_err"] == 0.5 and c["max_abs_ref"] == 4.0 and not c["nonfinite"]
    assert timing.compare(ref, [torch.tensor([float("nan"), 0.0])])["nonfinite"]

    t = timing.time_calls(lambda x: x * 2, [(torch.ones(4),)], "cpu", warmup=1, reps=10, blocks=2)
    assert t["reps"] == 20 and len(t["block_medians_ms"]) == 2 and t["median_ms"] > 0


def test_bench_smoke_cpu_tiny(tmp_path, capsys):
    pytest.importorskip("tvm")
    run = _load("run")
    out = tmp_path / "bench.json"
    rc = run.main(["--device", "cpu", "--size", "tiny", "--sections", "bert", "--backends", "eager,tvm",
                   "--batches", "1", "--tvm-kiln-import", "always", "--reps", "10", "--warmup", "1",
                   "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["schema"] == run.SCHEMA and data["runs"][0]["torch"]
    rows = data["rows"]
    for backend in ("eager", "tvm", "tvm-kiln-import"):
        r = rows[f"bert/bert/b1/{backend}"]
        assert r["status"].startswith("ok"), f"{backend}: {r['status']}\n{r.get('error', '')}"
        assert _finite(r["median_ms"]) and r["median_ms"] > 0 and r["p10_ms"] <= r["p90_ms"]
        assert r["timing"]["reps"] >= 20
        assert _finite(r["max_abs_err"]) and _finite(r["max_abs_err_hi"]) and r["max_abs_ref"] > 0
        assert r["max_abs_err"] <= 1e-3 * r["max_abs_ref"], backend  # fp32 on llvm
    assert rows["bert/bert/b1/tvm"]["compile_s"] > 0

    # --merge keeps earlier rows; --table-only prints them all
    rc = run.main(["--device", "cpu", "--size", "tiny", "--sections", "llm", "--backends", "eager,kiln",
                   "--reps", "10", "--warmup", "1", "--context", "32", "--out", str(out), "--merge"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert "bert/bert/b1/tvm" in data["rows"] and len(data["runs"]) == 2
    assert data["rows"]["llm/llama/b1/kiln"]["status"] == "pending (LLM issue)"
    llm = data["rows"]["llm/llama/b1/eager"]
    assert llm["status"].startswith("ok"), llm.get("error")
    assert _finite(llm["max_abs_err_hi"]) and llm["extra"]["weight_TBps"] > 0
    capsys.readouterr()
    assert run.main(["--table-only", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bert/bert" in text and "tvm-kiln-import" in text and "pending (LLM issue)" in text
