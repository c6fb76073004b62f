"""``kiln.gather`` (kiln/schedules/gather_cuda.py): conv_to_gemm's im2col gathers get the 8-channels-per-thread
schedule on cuda; the 3-channel stem and non-gather kernels are declined with the reason. (GPU numerics: the
ResNet tests of tests/test_conv_to_gemm.py and tests/test_gpu.py run these kernels.)"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import kiln


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 7, stride=2, padding=3)        # C = 3: no 8-wide channel vectors
        self.body = nn.Conv2d(8, 16, 3, padding=1)                 # C = 8: one vector per tap

    def forward(self, x):
        return self.body(torch.relu(self.stem(x)))


@pytest.fixture(scope="module")
def report():
    mp = pytest.MonkeyPatch()
    mp.setenv("KILN_PROVE_REWRITES", "0")     # the proofs have their own tests; this is about the schedule
    try:
        art = kiln.compile(TwoConvs().eval(), (torch.randn(2, 3, 32, 32),), target="cuda", dtype="float16")
    finally:
        mp.undo()
    return list(art.schedule_report)


def _gathers(report):
    return [r for r in report if "concatenate" in r["func"]]


def test_fires_on_the_im2col_gather(report):
    rules = {r["rule"] for r in _gathers(report)}
    assert "kiln.gather" in rules, _gathers(report)


def test_declines_the_three_channel_stem_and_other_kernels_with_reasons(report):
    stem = [r for r in _gathers(report) if r["rule"] != "kiln.gather"]
    assert len(stem) == 1
    reasons = [d["reason"] for d in stem[0]["declined"] if d["rule"] == "kiln.gather"]
    assert reasons and ("channels 3" in reasons[0] or "cannot inline" in reasons[0]), stem[0]
    other = [r for r in report if "concatenate" not in r["func"] and r["declined"]]
    assert any(d["rule"] == "kiln.gather" and "not an im2col gather" in d["reason"]
               for r in other for d in r["declined"])


def test_declines_plain_elementwise_and_non_cuda():
    import tvm
    from kiln.schedules.gather_cuda import GatherRule
    from kiln.schedules.rule import Declined
    rule = GatherRule()
    assert isinstance(rule.apply(_elementwise(), tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})), Declined)
    assert isinstance(rule.apply(_elementwise(), tvm.target.Target("llvm")), Declined)


def _elementwise():
    import tvm
    from tvm import te
    a = te.placeholder((16, 64), "float16", name="a")
    b = te.compute((16, 64), lambda i, j: a[i, j] * tvm.tirx.const(2, "float16"), name="b")
    return te.create_prim_func([a, b])


def test_declines_a_concat_and_transpose_that_tvm_cannot_vectorise():
    """Tiny Llama's RoPE (a rotate-half concat) fused with the head transpose looks like a gather to the rule, but
    TVM's VectorizeLoop raises on it (a vector index on a non-last axis): the rule declines with the reason instead
    of failing the compile (seen on the H200, session 5)."""
    from kiln import zoo
    zm = zoo.get("llama", size="tiny", batch=2)
    art = kiln.compile(zm.model, zm.example_inputs, target="cuda", dtype="bfloat16")
    declined = [d["reason"] for r in art.schedule_report for d in r["declined"] if d["rule"] == "kiln.gather"]
    assert any(reason.startswith("vectorising it fails in TVM") for reason in declined), declined
