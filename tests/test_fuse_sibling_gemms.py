"""Sibling-GEMM (horizontal) fusion: it fires on Q/K/V, the result still matches torch, it refuses near misses,
and on cuda the GEMM epilogue pass turns the fused GEMM + split into one multi-output sm_90a kernel."""
from __future__ import annotations

import pytest
import torch

import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

import kiln
from kiln import zoo
from kiln.relax_passes import fuse_gemm_epilogue as fge
from kiln.relax_passes.fuse_sibling_gemms import FuseSiblingGemms, fusion_report
from kiln.verify import TOLERANCES, compare, torch_reference


def _ops(mod) -> list[str]:
    names = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            names.append(e.op.name)
    relax.analysis.post_order_visit(mod["main"], visit)
    return names


@I.ir_module
class QKV:
    @R.function
    def main(x: R.Tensor((2, 8, 64), "float32"), wq: R.Tensor((64, 64), "float32"), wk: R.Tensor((32, 64), "float32"),
             wv: R.Tensor((32, 64), "float32"), bq: R.Tensor((64,), "float32"), bk: R.Tensor((32,), "float32"),
             bv: R.Tensor((32,), "float32")):
        with R.dataflow():
            x2 = R.reshape(x, R.shape([16, 64]))
            q = R.add(R.matmul(x2, R.permute_dims(wq, [1, 0])), bq)
            x3 = R.reshape(x, R.shape([16, 64]))
            k = R.add(R.matmul(x3, R.permute_dims(wk, [1, 0])), bk)
            v = R.add(R.matmul(x2, R.permute_dims(wv, [1, 0])), bv)
            out = R.concat((q, k, v), axis=1)
            R.output(out)
        return out


def _run(mod, *args):
    ex = tvm.compile(mod, tvm.target.Target("llvm"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a.numpy()) for a in args]).numpy()


def test_fires_on_qkv_and_stays_exact():
    mod = relax.transform.Normalize()(QKV)
    p = FuseSiblingGemms()
    out = p(mod)
    rep = fusion_report(out)
    assert [r["N"] for r in rep if r["fused"]] == [[64, 32, 32]]
    ops = _ops(out)
    assert ops.count("relax.matmul") == 1 and ops.count("relax.split") == 1 and ops.count("relax.concat") == 3
    torch.manual_seed(0)
    args = [torch.randn(*[int(d) for d in v.ty.shape]) for v in mod["main"].params]
    before, after = _run(mod, *args), _run(out, *args)
    assert abs(before - after).max() <= 1e-6


@pytest.mark.parametrize("body,needle", [
    # v reads another tensor: no sibling for v, q/k still fuse
    ("v = R.add(R.matmul(y, R.permute_dims(wv, [1, 0])), bv)", None),
    # the transpose is not [1, 0]
    ("v = R.add(R.matmul(x2, R.permute_dims(wv, [0, 1])), bv)", "is not [1, 0]"),
])
def test_near_misses(body, needle):
    src = f"""
@I.ir_module
class M:
    @R.function
    def main(x: R.Tensor((16, 64), "float32"), y: R.Tensor((16, 64), "float32"), wq: R.Tensor((64, 64), "float32"),
             wk: R.Tensor((64, 64), "float32"), wv: R.Tensor((64, 64), "float32"), bq: R.Tensor((64,), "float32"),
             bk: R.Tensor((64,), "float32"), bv: R.Tensor((64,), "float32")):
        with R.dataflow():
            x2 = x
            q = R.add(R.matmul(x2, R.permute_dims(wq, [1, 0])), bq)
            k = R.add(R.matmul(x2, R.permute_dims(wk, [1, 0])), bk)
            {body}
            out = R.concat((q, k, v), axis=1)
            R.output(out)
        return out
"""
    mod = tvm.script.from_source(src)
    out = FuseSiblingGemms()(relax.transform.Normalize()(mod))
    rep = fusion_report(out)
    fused = [r for r in rep if r["fused"]]
    assert len(fused) == 1 and len(fused[0]["matmuls"]) == 2, rep      # q and k only
    refused = [r["reason"] for r in rep if not r["fused"]]
    if needle:
        assert any(needle in r for r in refused), refused
    else:
        assert any("no sibling Linear reads the same input" in r for r in refused), refused


def test_intermediate_with_another_consumer_is_refused():
    @I.ir_module
    class M:
        @R.function
        def main(x: R.Tensor((16, 64), "float32"), wq: R.Tensor((64, 64), "float32"), wk: R.Tensor((64, 64), "float32"),
                 bq: R.Tensor((64,), "float32"), bk: R.Tensor((64,), "float32")):
            with R.dataflow():
                mq = R.matmul(x, R.permute_dims(wq, [1, 0]))
                q = R.add(mq, bq)
                k = R.add(R.matmul(x, R.permute_dims(wk, [1, 0])), bk)
                out = R.concat((q, k, mq), axis=1)          # mq is used twice
                R.output(out)
            return out

    rep = fusion_report(FuseSiblingGemms()(relax.transform.Normalize()(M)))
    assert not any(r["fused"] for r in rep), rep


def test_bert_tiny_cpu_matches_torch(tmp_path):
    zm = zoo.get("bert", size="tiny", batch=2)
    art = kiln.compile(zm.model, zm.example_inputs, target="llvm", dump_ir=str(tmp_path / "ir"))
    fusion_ir = (tmp_path / "ir" / "03_fusion.py").read_text()
    assert fusion_ir.count('\\"fused\\": true, \\"matmuls\\"') == 2          # Q/K/V of both layers
    m = kiln.load(art.export(str(tmp_path / "bert")))
    c = compare(m(*zm.example_inputs), torch_reference(zm.model, zm.example_inputs, dtype=torch.float32))
    assert c["rel_err"] <= TOLERANCES["float32"], c


def test_cuda_qkv_becomes_one_multi_output_kernel(monkeypatch, tmp_path):
    monkeypatch.setattr(fge, "MIN_MACS", 0)
    zm = zoo.get("bert", size="tiny", batch=1)
    art = kiln.compile(zm.model, zm.example_inputs, target="cuda", dtype="float16", dump_ir=str(tmp_path / "ir"))
    fusion_ir = (tmp_path / "ir" / "03_fusion.py").read_text()
    qkv = [ln for ln in fusion_ir.splitlines() if "R.call_tir(cls.gemm_sm90_128x192x64_float16_bias_x64_64_64" in ln]
    assert len(qkv) == 2 and qkv[0].count('R.Tensor((128, 64), dtype="float16")') == 3, qkv
    assert "R.split(" not in fusion_ir                       # no split copy left
    assert any(r["func"] == "gemm_sm90_128x192x64_float16_bias_x64_64_64" for r in art.schedule_report)


@pytest.mark.gpu
def test_gpu_bert_tiny_fp16_with_fused_qkv_matches_torch(monkeypatch, tmp_path):
    from kiln.verify import cast_inputs
    monkeypatch.setattr(fge, "MIN_MACS", 0)
    zm = zoo.get("bert", size="tiny", batch=2)
    art = kiln.compile(zm.model, zm.example_inputs, target="cuda", dtype="float16")
    assert any("_x64_64_64" in r["func"] for r in art.schedule_report)
    m = kiln.load(art.export(str(tmp_path / "bert")), device="cuda")
    out = m(*cast_inputs(zm.example_inputs, torch.float16, "cuda"))
    c = compare(out if isinstance(out, tuple) else (out,), torch_reference(zm.model, zm.example_inputs,
                                                                           dtype=torch.float32))
    assert c["rel_err"] <= TOLERANCES["float16"], c
