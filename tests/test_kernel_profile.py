"""CPU tests of the per-kernel profiler ``benchmarks/kernel_profile.py`` (no GPU needed).

* the trace -> table arithmetic on a synthetic CUPTI-like chrome trace (calls and time per step, TFLOP/s, GB/s, share
  of the floors, tile use, step windows, categories, the kernel-name join);
* the static facts it reads from a real cuda compile (``--compile-only``: M/N/K, configs, bytes, launches);
* the whole script on cpu (``--device cpu --size tiny``): the llvm functions are the rows, each launched PrimFunc
  appears with as many calls per step as the lowered module has call sites;
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "kernel_profile.py")


def _load():
    name = "kiln_bench_profile"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod          # dataclasses need the module registered while it executes
        spec.loader.exec_module(mod)
    return sys.modules[name]


def test_categories_and_kernel_join():
    p = _load()
    assert p.categorize("gemm_sm90_128x64x64_float16_bias", "kiln.gemm_sm90") == "gemm_sm90"
    assert p.categorize("gemv_sm90_8x1024x1024_float16_bias", "kiln.gemv_sm90") == "gemm_sm90"
    assert p.categorize("kiln_flash_attn_sm90_b8", "kiln.attention_sm90") == "attention"
    assert p.categorize("fused_reshape3_pad2_strided_slice14_expand_dims2_concatenate2_transpose2_reshape4",
                        "dlight.Fallback") == "im2col/gather"
    assert p.categorize("fused_transpose6_reshape25", "dlight.Fallback") == "transpose/layout"
    assert p.categorize("reshape10", "dlight.Fallback") == "transpose/layout"
    assert p.categorize("layer_norm", "dlight.GeneralReduction") == "reduction"
    assert p.categorize("max_pool2d", "dlight.Fallback") == "reduction"
    assert p.categorize("fused_reshape18_add10_relu7", "dlight.Fallback") == "elementwise"
    assert p.categorize("fused_matmul_add_cast", "dlight.Matmul") == "gemm_other"
    assert p.categorize("fused_conv2d_add", "dlight.GeneralReduction", hot=True) == "gemm_other"
    assert p.categorize("vm.builtin.alloc_tensor") == "vm builtin"
    funcs = {"mean": None, "gemm_sm90_1x8x8_float16_none": None}
    assert p.kernel_func("mean_kernel", funcs) == "mean"
    assert p.kernel_func("mean_kernel_1", funcs) == "mean"
    assert p.kernel_func("mean", funcs) == "mean"                                 # a cpu VM-call range
    assert p.kernel_func("gemm_sm90_1x8x8_float16_none_kernel", funcs) == "gemm_sm90_1x8x8_float16_none"
    assert p.kernel_func("void at::native::vectorized_elementwise_kernel<4>", funcs) is None


def _ev(name, ts, dur, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_rows_from_synthetic_trace():
    p = _load()
    M, N, K = 4096, 256, 128
    gemm = p.FuncInfo("gemm_sm90_4096x256x128_float16_bias", "gemm_sm90", "kiln.gemm_sm90", detail={
        "gemm_config": "128x128x64_s6_c2_g8", "config_source": "heuristic"}, calls=2,
        in_bytes=(M * K + N * K + N) * 2, out_bytes=M * N * 2, mnk=(M, N, K))
    gather = p.FuncInfo("fused_pad_strided_slice_concatenate_reshape", "im2col/gather", "dlight.Fallback",
                        fallback=True, calls=1, in_bytes=1_000_000, out_bytes=9_000_000)
    funcs = {f.name: f for f in (gemm, gather)}
    evs = []
    for s, t0 in enumerate((0.0, 1000.0)):           # two steps; each: gemm, gather, gemm, a torch kernel
        evs.append(_ev(p.STEP_MARK, t0, 500.0, "user_annotation"))
        evs += [_ev(gemm.name + "_kernel", t0 + 10, 20.0), _ev(gather.name + "_kernel", t0 + 40, 10.0 + s),
                _ev(gemm.name + "_kernel", t0 + 60, 20.0), _ev("Memcpy DtoD (Device -> Device)", t0 + 90, 5.0,
                                                               "gpu_memcpy")]
        evs.append(_ev("aten::add", t0 + 1, 3.0, "cpu_op"))               # host ops are not device work
    prof = p.parse_trace({"traceEvents": evs}, steps=2, gpu=True)
    assert prof["per_step"] == [{"count": 4, "sum_us": 55.0, "span_us": 85.0, "host_us": 500.0},
                                {"count": 4, "sum_us": 56.0, "span_us": 85.0, "host_us": 500.0}]
    rows = p.build_rows(prof, funcs, step_us=200.0)
    by = {r["kernel"]: r for r in rows}
    g = by[gemm.name + "_kernel"]
    assert [r["kernel"] for r in rows][0] == gemm.name + "_kernel"          # sorted by time per step
    assert g["func"] == gemm.name and g["calls"] == 2 and g["us"] == 40.0 and g["pct"] == 20.0
    assert math.isclose(g["tflops"], 2 * M * N * K / 20e-6 / 1e12)
    floor = max(2 * M * N * K / (p.PEAK_TFLOPS * 1e12), gemm.bytes / (p.PEAK_TBPS * 1e12)) * 1e6
    assert math.isclose(g["floor_us"], floor) and math.isclose(g["pct_floor"], 100 * floor / 20.0)
    assert g["mn_use"] == 1.0 and g["k_use"] == 1.0 and g["k_tiles"] == 2 and g["ctas"] == 32 * 2
    assert g["rule"] == "kiln.gemm_sm90" and not g["fallback"]
    ga = by[gather.name + "_kernel"]
    assert ga["calls"] == 1 and ga["us"] == 10.5 and ga["fallback"] and ga["category"] == "im2col/gather"
    assert math.isclose(ga["gbps"], 10e6 / 10.5e-6 / 1e9) and "tflops" not in ga
    mc = by["Memcpy DtoD (Device -> Device)"]
    assert mc["func"] is None and mc["category"] == "other"
    cats = {c["category"]: c for c in p.category_rows(rows, 200.0)}
    assert set(cats) == {"gemm_sm90", "im2col/gather", "other"}
    assert cats["im2col/gather"]["fallback_us"] == 10.5 and cats["gemm_sm90"]["fallback_us"] == 0.0
    assert math.isclose(sum(c["us"] for c in cats.values()), 55.5)
    assert [r["kernel"] for r in p.gemm_rows(rows)] == [gemm.name + "_kernel"]
    assert [r["kernel"] for r in p.traffic_rows(rows)] == [gather.name + "_kernel"]
    text = p.render({"kernels": rows, "categories": list(cats.values()), "step_us": 200.0, "gpu": True,
                     "notes": ["n1"]}, top=2)
    assert "(1 more)" in text and "sm_90a GEMMs" in text and "128x128x64_s6_c2_g8" in text and "note: n1" in text
    assert "dlight.Fallback FALLBACK" in text
    # the cuda-only summary lines and the CUDA-graph note
    res = {"timing": {"no_graph": {"median_ms": 0.2}, "graph": {"median_ms": 0.15}}, "kernels": rows}
    notes = []
    p._summary(res, prof, funcs, notes, cuda=True)
    assert res["profile_step"] == {"count": 4, "sum_us": 55.5, "span_us": 85.0, "host_us": 500.0}
    assert any("GPU busy span 85.0 us (gaps between kernels 29.5 us)" in n for n in notes)
    assert any("1 device event name(s) match no PrimFunc" in n for n in notes)
    assert not any("call sites" in n for n in notes)          # 2 + 1 launches attributed = 2 + 1 call sites
    gather.calls, notes = 2, []
    p._summary(res, prof, funcs, notes, cuda=True)
    assert any("launches per step: 3 attributed in the profile vs 4 call sites" in n for n in notes)
    seen = p.parse_trace({"traceEvents": [e for e in evs if e["cat"] != "kernel"]}, steps=2, gpu=True)
    assert "hides kernels" in p.graph_note(0.15, prof, seen) and "visible" in p.graph_note(0.15, prof, prof)


def test_tile_use_counts_padding():
    p = _load()
    stem = p.FuncInfo("g", "gemm_sm90", "kiln.gemm_sm90", detail={"gemm_config": "64x64x64_s6_c1_g8"},
                      mnk=(100, 72, 152))
    t = p.tile_use(stem)
    assert t["tile"] == "64x64" and t["k_tiles"] == 3 and t["ctas"] == 2 * 2
    assert math.isclose(t["mn_use"], 100 * 72 / (128 * 128)) and math.isclose(t["k_use"], 152 / 192)
    split = p.FuncInfo("g", "gemm_sm90", "kiln.gemm_sm90", detail={"gemm_config": "64x128x64_s4_c1_g8_k2"},
                       mnk=(1024, 1024, 4096))
    assert p.tile_use(split)["k_tiles"] == 32 and p.tile_use(split)["ctas"] == 16 * 8 * 2
    assert p.tile_use(p.FuncInfo("x", "elementwise")) == {}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed (cuda compiles check for it)")
def test_compile_only_reads_gemm_facts_from_the_ir(tmp_path, monkeypatch, capsys):
    """Tiny BERT for cuda with every Linear sent to the sm_90a kernel: M/N/K, bytes and launches come from the IR."""
    p = _load()
    from kiln import knobs
    from kiln.relax_passes import fuse_gemm_epilogue
    monkeypatch.setattr(fuse_gemm_epilogue, "MIN_MACS", 1)
    out = tmp_path / "static.json"
    with knobs.scope(prove_rewrites=False):
        assert p.main(["bert", "--size", "tiny", "--batch", "2", "--device", "cuda", "--compile-only",
                       "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    text = capsys.readouterr().out
    gemms = [f for f in res["static"] if f["category"] == "gemm_sm90" and f["name"].startswith("gemm_sm90_")]
    assert gemms, text
    for f in gemms:
        M, N, K = (int(v) for v in re.match(r"gemm_sm90_(\d+)x(\d+)x(\d+)_", f["name"]).groups())
        assert f["mnk"] == [M, N, K] and f["rule"] == "kiln.gemm_sm90" and f["detail"]["gemm_config"]
        assert f["calls"] == 2                       # one per encoder layer
        assert f["in_bytes"] >= (M * K + N * K) * 2 and f["out_bytes"] == M * N * 2
        assert 0 < f["tile"]["mn_use"] <= 1 and f["floor_us"] > 0
        assert f["name"][:40] in text
    launched = [f for f in res["static"] if f["calls"]]
    assert any(f["category"] == "reduction" and f["rule"] == "dlight.GeneralReduction" for f in launched)
    assert "sum of floors x launches" in text


def test_cpu_tiny_smoke(tmp_path, capsys):
    p = _load()
    out = tmp_path / "prof.json"
    assert p.main(["resnet50", "--device", "cpu", "--size", "tiny", "--batch", "1", "--steps", "2", "--reps", "3",
                   "--warmup", "1", "--top", "12", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["schema"] == "kiln-profile/1" and not res["gpu"]
    assert res["timing"]["no_graph"]["median_ms"] > 0 and res["check"]["max_abs_err"] < 1e-3
    rows = {r["kernel"]: r for r in res["kernels"]}
    static = {f["name"]: f for f in res["static"] if f["calls"]}
    assert static and set(static) <= set(rows)        # every launched llvm function is a row
    for name, f in static.items():
        assert rows[name]["calls"] == f["calls"] and rows[name]["func"] == name and rows[name]["us"] > 0
    cats = {c["category"] for c in res["categories"]}
    assert {"gemm_other", "im2col/gather", "elementwise", "vm builtin"} <= cats
    assert math.isclose(sum(c["us"] for c in res["categories"]), sum(r["us"] for r in res["kernels"]))
    stem = next(f for f in static.values() if f["category"] == "im2col/gather" and "transpose_pad" in f["name"])
    assert stem["in_bytes"] == 1 * 3 * 32 * 32 * 4          # the NCHW fp32 image, read once
    assert "by category" in text and "record_function" in text
    assert f"top 12 of {len(rows)}" in text and f"({len(rows) - 12} more)" in text
