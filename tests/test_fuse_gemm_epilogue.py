"""The sm_90a GEMM epilogue fusion pass (``kiln/relax_passes/fuse_gemm_epilogue.py``) and its use by
``kiln.compile(target="cuda")``.

CPU: the pass fires on Linear(+bias)(+gelu_tanh) graphs and tiny BERT, the rewritten Relax is exactly the
handwritten expected module, near-misses are refused with their reason, and a full compile + export (nvcc
cubins, kiln's nvcc flags) works with the generated CUDA containing ``wgmma.mma_async``.
GPU (``-m gpu``): tiny BERT fp16 and Linear+bias+GELU(tanh) at odd M match torch fp32.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch

import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import kiln
from kiln import knobs, zoo
from kiln.relax_passes import fuse_gemm_epilogue as fge
from kiln.relax_passes import fusion_passes, pattern_passes
from kiln.schedules.configs import select_sm90_dynamic_config
from kiln.schedules.gemm_sm90 import Epilogue, make_gemm_sm90, make_gemm_sm90_kernels
from kiln.target import device_code
from kiln.verify import TOLERANCES, cast_inputs, compare, torch_reference


@pytest.fixture
def no_threshold(monkeypatch):
    """Tiny test shapes are far below MIN_MACS; fuse them anyway."""
    monkeypatch.setattr(fge, "MIN_MACS", 0)


def run_pass(mod, kind="cuda", min_macs=0):
    out = fge.FuseGemmEpilogueSM90(kind, min_macs=min_macs)(mod)
    relax.analysis.well_formed(out)
    return out, fge.fusion_report(out)


def sm90_calls(mod) -> list[str]:
    """Names of the sm_90a GEMM PrimFuncs called from Relax (one entry per call)."""
    names = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir":
            gv = e.args[0]
            f = mod[gv]
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "kiln.rule" in f.attrs:
                assert str(f.attrs["kiln.rule"]) == fge.RULE_NAME
                names.append(gv.name_hint)
    for _, f in mod.functions_items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f, visit)
    return names


def kernel_names(cuda_src: str) -> list[str]:
    return re.findall(r"__global__ void __launch_bounds__\([^)]*\) (\w+)\(", cuda_src)


# ------------------------------------------------------------------------------------------ handwritten IR
@I.ir_module
class LinearBiasGeluTanh:
    """What the importer emits for fp16 ``gelu(Linear(x), approximate="tanh")`` with a 3-D x."""

    @R.function
    def main(x: R.Tensor((4, 8, 64), "float16"), w: R.Tensor((128, 64), "float16"),
             b: R.Tensor((128,), "float16")) -> R.Tensor((4, 8, 128), "float16"):
        with R.dataflow():
            x2 = R.reshape(x, R.shape([32, 64]))
            wt = R.permute_dims(w, axes=[1, 0])
            mm = R.matmul(x2, wt, out_dtype="float32")
            bf = R.astype(b, "float32")
            y = R.add(mm, bf)
            z = R.astype(y, "float16")
            z3 = R.reshape(z, R.shape([4, 8, 128]))
            g = R.nn.gelu_tanh(z3)
            R.output(g)
        return g


def expected_linear_bias_gelu_tanh(before):
    pf = make_gemm_sm90(32, 128, 64, "float16", Epilogue(("bias", "gelu_tanh")))
    name = "gemm_sm90_32x128x64_float16_bias_gelu_tanh"
    pf = pf.with_attrs({"global_symbol": name, "kiln.rule": fge.RULE_NAME, "op_pattern": 8,
                        "kiln.tir_pipeline": "tirx", "kiln.config_source": "heuristic"})
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([4, 8, 64], "float16"))
    w = relax.Var("w", relax.TensorType([128, 64], "float16"))
    b = relax.Var("b", relax.TensorType([128], "float16"))
    with bb.function("main", [x, w, b], attrs=dict(before["main"].attrs or {})):
        with bb.dataflow():
            gv = bb.add_func(pf, name)
            x2 = bb.emit(relax.op.reshape(x, relax.ShapeExpr([32, 64])))
            o = bb.emit(relax.call_tir(gv, [x2, w, b], relax.TensorType([32, 128], "float16")))
            g = bb.emit_output(relax.op.reshape(o, relax.ShapeExpr([4, 8, 128])))
        bb.emit_func_output(g)
    return bb.get()


def test_rewrite_matches_handwritten_expected():
    after, report = run_pass(LinearBiasGeluTanh)
    funcs = dict(after.functions_items())
    tvm.ir.assert_structural_equal(tvm.IRModule(funcs), expected_linear_bias_gelu_tanh(LinearBiasGeluTanh))
    assert len(report) == 1 and report[0]["fused"], report
    assert report[0]["epilogue"] == [["bias"], ["gelu_tanh"]]
    assert (report[0]["M"], report[0]["N"], report[0]["K"]) == (32, 128, 64)
    # the ops it replaced are gone
    text = after.script()
    for op in ("R.matmul", "R.permute_dims", "R.nn.gelu_tanh", "R.astype"):
        assert op not in text, op


@I.ir_module
class LinearReluResidualShared:
    """Two Linears sharing one problem: relu + scale + residual, and a plain fp16-out matmul."""

    @R.function
    def main(x: R.Tensor((32, 64), "float16"), w: R.Tensor((64, 64), "float16"),
             r: R.Tensor((32, 64), "float16")) -> R.Tensor((32, 64), "float16"):
        with R.dataflow():
            wt = R.permute_dims(w, axes=[1, 0])
            mm = R.matmul(x, wt)
            a = R.nn.relu(mm)
            s = R.multiply(a, R.const(0.5, "float16"))
            y = R.add(r, s)
            mm2 = R.matmul(y, wt)
            R.output(mm2)
        return mm2


def test_epilogue_order_residual_scale_and_kernel_sharing():
    after, report = run_pass(LinearReluResidualShared)
    assert [r["fused"] for r in report] == [True, True], report
    assert report[0]["epilogue"] == [["relu"], ["scale", 0.5], ["residual"]]
    assert report[1]["epilogue"] == []
    calls = sm90_calls(after)
    assert len(calls) == 2 and len(set(calls)) == 2  # different epilogues: two PrimFuncs


@I.ir_module
class Rank3BiasSilu:
    """A 3-D x straight into matmul (fp16 out), fp16 bias add, silu."""

    @R.function
    def main(x: R.Tensor((3, 7, 64), "bfloat16"), w: R.Tensor((32, 64), "bfloat16"),
             b: R.Tensor((32,), "bfloat16")) -> R.Tensor((3, 7, 32), "bfloat16"):
        with R.dataflow():
            wt = R.permute_dims(w, axes=[1, 0])
            mm = R.matmul(x, wt)
            y = R.add(mm, b)
            s = R.nn.silu(y)
            R.output(s)
        return s


def test_rank3_input_is_reshaped_to_2d_and_back():
    after, report = run_pass(Rank3BiasSilu)
    assert report[0]["fused"] and report[0]["epilogue"] == [["bias"], ["silu"]], report
    assert (report[0]["M"], report[0]["N"], report[0]["K"], report[0]["dtype"]) == (21, 32, 64, "bfloat16")
    text = after["main"].script()
    assert "R.reshape(x, R.shape([21, 64]))" in text and "R.shape([3, 7, 32])" in text, text
    assert sm90_calls(after) == ["gemm_sm90_21x32x64_bfloat16_bias_silu"]


# ------------------------------------------------------------------------------------------ dynamic M
@I.ir_module
class DynamicBatchBiasResidual:
    """A dynamic batch (``b`` <= 64) and a static sequence: M = b * 8, a bias and a residual of the same shape."""

    @R.function
    def main(x: R.Tensor(("b", 8, 64), "float16"), w: R.Tensor((64, 64), "float16"),
             bias: R.Tensor((64,), "float16")) -> R.Tensor(("b", 8, 64), "float16"):
        b = T.int64()
        R.func_attr({"tir_var_upper_bound": {"b": 64}})
        with R.dataflow():
            wt = R.permute_dims(w, axes=[1, 0])
            mm = R.matmul(x, wt)
            y = R.add(mm, bias)
            z = R.add(y, x)
            R.output(z)
        return z


def expected_dynamic_batch(before):
    m = tvm.tirx.Var("m", "int64")
    pf = make_gemm_sm90_kernels(m, 64, 64, "float16", Epilogue(("bias", "residual")),
                                select_sm90_dynamic_config(512, 64, 64, "float16"))[0]
    name = "gemm_sm90_dynM512x64x64_float16_bias_residual"
    pf = pf.with_attrs({"global_symbol": name, "kiln.rule": fge.RULE_NAME, "op_pattern": 8,
                        "kiln.tir_pipeline": "tirx", "kiln.config_source": "dynamic M: heuristic at M <= 512"})
    bb = relax.BlockBuilder()
    bvar = tvm.tirx.Var("b", "int64")
    x = relax.Var("x", relax.TensorType([bvar, 8, 64], "float16"))
    w = relax.Var("w", relax.TensorType([64, 64], "float16"))
    bias = relax.Var("bias", relax.TensorType([64], "float16"))
    with bb.function("main", [x, w, bias], attrs=dict(before["main"].attrs)):
        with bb.dataflow():
            gv = bb.add_func(pf, name)
            x2 = bb.emit(relax.op.reshape(x, relax.ShapeExpr([bvar * 8, 64])))
            r2 = bb.emit(relax.op.reshape(x, relax.ShapeExpr([bvar * 8, 64])))
            o = bb.emit(relax.call_tir(gv, [x2, w, bias, r2], relax.TensorType([bvar * 8, 64], "float16")))
            z = bb.emit_output(relax.op.reshape(o, relax.ShapeExpr([bvar, 8, 64])))
        bb.emit_func_output(z)
    return bb.get()


def test_dynamic_m_rewrite_matches_handwritten_expected():
    """M = b * 8 is symbolic: one dynamic-M kernel, its tile chosen at the bound (64 * 8 = 512), the residual
    recognised through the symbolic shape."""
    after, report = run_pass(DynamicBatchBiasResidual)
    assert len(report) == 1 and report[0]["fused"], report
    assert (report[0]["M"], report[0]["M_max"], report[0]["epilogue"]) == ("b * T.int64(8)", 512,
                                                                          [["bias"], ["residual"]]), report
    tvm.ir.assert_structural_equal(tvm.IRModule(dict(after.functions_items())),
                                   expected_dynamic_batch(DynamicBatchBiasResidual))


def test_dynamic_m_kernel_never_splits_k_or_takes_the_gemv():
    """Unbounded M: the tile is chosen at DYNAMIC_M_HINT, persistent (a fixed grid), K unsplit even where a static
    small M would split; the kernel's host code asserts 32-bit indexing at run time."""
    from kiln.schedules.configs import DYNAMIC_M_HINT
    cfg = select_sm90_dynamic_config(None, 1024, 4096, "float16")
    assert cfg.persistent and cfg.split_k == 1
    assert cfg == select_sm90_dynamic_config(DYNAMIC_M_HINT, 1024, 4096, "float16")
    small = select_sm90_dynamic_config(8, 1024, 4096, "float16")
    assert small.split_k == 1 and small.block_m == 64      # a GEMV-sized bound still gets a (small) GEMM tile
    with pytest.raises(NotImplementedError, match="no tile width divides"):
        select_sm90_dynamic_config(None, 96, 64, "float16", splits=(48, 48))
    with pytest.raises(NotImplementedError, match="does not split K"):
        make_gemm_sm90_kernels(tvm.tirx.Var("m", "int64"), 128, 4096, "float16", None,
                               replace(cfg, split_k=2, persistent=False))


# ------------------------------------------------------------------------------------------ near misses
@I.ir_module
class DynamicK:
    @R.function
    def main(x: R.Tensor((16, "k"), "float16"), w: R.Tensor((128, "k"), "float16")):
        with R.dataflow():
            wt = R.permute_dims(w, axes=[1, 0])
            mm = R.matmul(x, wt, out_dtype="float32")
            y = R.astype(mm, "float16")
            R.output(y)
        return y


@I.ir_module
class Fp32:
    @R.function
    def main(x: R.Tensor((16, 64), "float32"), w: R.Tensor((128, 64), "float32")):
        with R.dataflow():
            wt = R.permute_dims(w, axes=[1, 0])
            mm = R.matmul(x, wt)
            R.output(mm)
        return mm


@I.ir_module
class KNotMultipleOf8:
    @R.function
    def main(x: R.Tensor((16, 60), "float16"), w: R.Tensor((128, 60), "float16")):
        with R.dataflow():
            wt = R.permute_dims(w, axes=[1, 0])
            mm = R.matmul(x, wt, out_dtype="float32")
            y = R.astype(mm, "float16")
            R.output(y)
        return y


@I.ir_module
class NNotMultipleOf8:
    @R.function
    def main(x: R.Tensor((16, 64), "float16"), w: R.Tensor((100, 64), "float16")):
        with R.dataflow():
            wt = R.permute_dims(w, axes=[1, 0])
            mm = R.matmul(x, wt, out_dtype="float32")
            y = R.astype(mm, "float16")
            R.output(y)
        return y


@I.ir_module
class MatmulUsedTwice:
    """The fp32 GEMM result has a second consumer: the kernel cannot produce the fp32 tensor."""

    @R.function
    def main(x: R.Tensor((16, 64), "float16"), w: R.Tensor((128, 64), "float16")):
        with R.dataflow():
            wt = R.permute_dims(w, axes=[1, 0])
            mm = R.matmul(x, wt, out_dtype="float32")
            y = R.astype(mm, "float16")
            s = R.sum(mm)
            R.output(y, s)
        return (y, s)


@I.ir_module
class OtherAxes:
    """A weight that is *not* transposed (permute_dims with identity axes [0, 1]: w is [K, N])."""

    @R.function
    def main(x: R.Tensor((16, 64), "float16"), w: R.Tensor((64, 64), "float16")):
        with R.dataflow():
            wt = R.permute_dims(w, axes=[0, 1])
            mm = R.matmul(x, wt, out_dtype="float32")
            y = R.astype(mm, "float16")
            R.output(y)
        return y


@pytest.mark.parametrize("mod,needle", [
    (DynamicK, "symbolic N or K"),
    (Fp32, "dtype x=float32"),
    (KNotMultipleOf8, "K=60 is not a multiple of 8"),
    (NNotMultipleOf8, "N=100 is not a multiple of 8"),
    (MatmulUsedTwice, "has 2 consumers"),
    (OtherAxes, "axes [0, 1] is not [1, 0]"),
], ids=["dynamic", "fp32", "K%8", "N%8", "second-consumer", "axes"])
def test_refuses_near_misses_with_reason(mod, needle):
    after, report = run_pass(mod)
    assert len(report) == 1 and not report[0]["fused"], report
    assert needle in report[0]["reason"], report[0]["reason"]
    assert sm90_calls(after) == []
    tvm.ir.assert_structural_equal(tvm.IRModule(dict(after.functions_items())), mod)


def test_refuses_other_targets_and_small_problems():
    _, report = run_pass(LinearBiasGeluTanh, kind="llvm")
    assert "target 'llvm' is not cuda" in report[0]["reason"]
    _, report = run_pass(LinearBiasGeluTanh, min_macs=128 * 1024 * 1024)
    assert "below the size" in report[0]["reason"] and "16*" not in report[0]["reason"]
    assert fge.MIN_MACS == 0          # measured: every static GEMM the kernel takes pays (module docstring)


def test_only_cuda_gets_the_pass():
    names = lambda kind: [p.info.name for p in pattern_passes(kind) + fusion_passes(kind)]  # noqa: E731
    assert names("cuda").count("kiln.FuseGemmEpilogueSM90") == 1
    assert "kiln.FuseGemmEpilogueSM90" not in names("rocm")
    assert "kiln.FuseGemmEpilogueSM90" not in names("llvm")


# ------------------------------------------------------------------------------------------ torch models
class LinearGelu(torch.nn.Module):
    def __init__(self, k=64, n=128, approximate="tanh"):
        super().__init__()
        self.fc = torch.nn.Linear(k, n)
        self.approximate = approximate

    def forward(self, x):
        return torch.nn.functional.gelu(self.fc(x), approximate=self.approximate)


def test_fires_on_torch_linear_gelu_and_exports(no_threshold, tmp_path):
    torch.manual_seed(0)
    model = LinearGelu().half().eval()
    x = torch.randn(2, 9, 64).half()
    art = kiln.compile(model, (x,), target="cuda")
    rep = [r for r in art.schedule_report if r["rule"] == fge.RULE_NAME]
    assert [r["func"] for r in rep] == ["gemm_sm90_18x128x64_float16_bias_gelu_tanh"], art.schedule_report
    assert rep[0]["hot"] and not rep[0]["fallback"]
    src = "\n".join(text for fmt, text in device_code(art.executable) if fmt == "cuda")
    assert "wgmma.mma_async.sync.aligned.m64n" in src  # (setmaxnreg only in the 2-consumer configs)
    assert "gemm_sm90_18x128x64_float16_bias_gelu_tanh_kernel" in kernel_names(src)
    path = art.export(str(tmp_path / "lin"))
    manifest = json.load(open(f"{path}/manifest.json"))
    text = json.dumps(manifest)
    assert "cubin" in text and "-O3" in text and "--use_fast_math" not in text  # fast math off: NaN on fp16 masks


def test_bert_tiny_fp16_fuses(no_threshold, tmp_path):
    zm = zoo.get("bert", size="tiny", batch=1)
    art = kiln.compile(zm.model, zm.example_inputs, target="cuda", dtype="float16", dump_ir=str(tmp_path / "ir"))
    fusion_ir = (tmp_path / "ir" / "03_fusion.py").read_text()
    # 2 layers x (q+k+v as one multi-output GEMM, attn-out, ffn-in, ffn-out) = 8 GEMMs for 12 Linears; the
    # pooler reads the CLS row only (M = 1): the GEMV
    assert fusion_ir.count("R.call_tir(cls.gemm_sm90_") == 8
    assert fusion_ir.count("R.call_tir(cls.gemv_sm90_1x64x64_float16_bias") == 1
    # BERT's gelu is the erf one: the FFN-in GEMM takes bias + gelu (erf) as its epilogue
    calls = [ln for ln in fusion_ir.splitlines() if "call_tir(cls.gemm" in ln]
    assert sum("_bias_gelu, (" in ln for ln in calls) == 2, calls
    assert not any("gelu_tanh" in ln for ln in calls)
    assert "R.nn.gelu(" not in fusion_ir
    rep = [r for r in art.schedule_report if r["rule"] == fge.RULE_NAME]
    assert len(rep) == 4, rep  # distinct problems: qkv, attn-out+residual, ffn-in, ffn-out+residual
    assert [r["func"] for r in art.schedule_report if r["rule"] == fge.GEMV_RULE_NAME] == [
        "gemv_sm90_1x64x64_float16_bias"]  # the pooler (tanh is not an epilogue stage)
    src = "\n".join(text for fmt, text in device_code(art.executable) if fmt == "cuda")
    assert "wgmma.mma_async.sync.aligned.m64n" in src
    assert len({k for k in kernel_names(src) if k.startswith("gemm_sm90_")}) == 4, kernel_names(src)
    art.export(str(tmp_path / "bert"))


def test_small_m_linear_is_split_k_with_epilogue_in_the_reduce_kernel(tmp_path):
    """BERT-Large bs1's FFN-out shape (128x1024x4096): 32 tiles cannot fill 132 SMs and K is long, so the
    heuristic splits K 8 ways and the bias + erf-GELU epilogue runs in the reduce kernel after the fp32
    partials (no tuned table here, so the heuristic decides)."""
    torch.manual_seed(0)
    model = LinearGelu(k=4096, n=1024, approximate="none").half().eval()
    x = torch.randn(1, 128, 4096).half()
    with knobs.scope(tables_dir=str(tmp_path)):
        art = kiln.compile(model, (x,), target="cuda", dump_ir=str(tmp_path / "ir"))
    fusion_ir = (tmp_path / "ir" / "03_fusion.py").read_text()
    calls = [ln.strip() for ln in fusion_ir.splitlines() if "R.call_tir(cls.gemm_sm90" in ln]
    assert len(calls) == 2, calls
    assert "gemm_sm90_128x1024x4096_float16_splitk8" in calls[0] and 'R.Tensor((8, 128, 1024), dtype="float32")' in calls[0]
    assert "gemm_sm90_reduce_128x1024_float16_k8_bias_gelu" in calls[1]
    rep = [r for r in art.schedule_report if r["rule"] == fge.RULE_NAME]
    assert sorted(r["func"] for r in rep) == ["gemm_sm90_128x1024x4096_float16_splitk8",
                                              "gemm_sm90_reduce_128x1024_float16_k8_bias_gelu"], rep
    assert '\\"config_source\\": \\"heuristic\\"' in fusion_ir
    assert all(r["detail"]["config_source"] == "heuristic" and r["detail"]["gemm_config"].endswith("_k8")
               for r in rep), rep


def test_decode_sized_linears_go_to_the_gemv(tmp_path):
    """M <= 16 (decode): the GEMV kernel takes the Linear with its epilogue, whatever MIN_MACS says; a fused
    sibling group at M = 1 runs one GEMV and keeps the split (the GEMV writes one output)."""

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(256, 512), torch.nn.Linear(256, 256), torch.nn.Linear(512, 256)

        def forward(self, x):
            return self.c(torch.nn.functional.silu(self.a(x))) + self.b(x)

    model = TwoHeads().half().eval()
    art = kiln.compile(model, (torch.randn(1, 256).half(),), target="cuda", dump_ir=str(tmp_path / "ir"))
    rep = [r for r in art.schedule_report if r["rule"] == fge.GEMV_RULE_NAME]
    assert sorted(r["func"] for r in rep) == ["gemv_sm90_1x256x512_float16_bias_residual",
                                              "gemv_sm90_1x768x256_float16_bias"]
    assert all("gemv_config" in r["detail"] for r in rep), rep
    fusion_ir = (tmp_path / "ir" / "03_fusion.py").read_text()
    assert "R.call_tir(cls.split" in fusion_ir          # the sibling split (legalized), after the GEMV


# ------------------------------------------------------------------------------------------ GPU numerics
@pytest.mark.gpu
def test_gpu_bert_tiny_fp16_matches_torch(no_threshold, tmp_path):
    zm = zoo.get("bert", size="tiny", batch=2)
    art = kiln.compile(zm.model, zm.example_inputs, target="cuda", dtype="float16")
    assert any(r["rule"] == fge.RULE_NAME for r in art.schedule_report)
    m = kiln.load(art.export(str(tmp_path / "bert")), device="cuda")
    ref = torch_reference(zm.model, zm.example_inputs, dtype=torch.float32)
    for _ in range(2):  # the second call replays the CUDA graph
        out = m(*cast_inputs(zm.example_inputs, torch.float16, "cuda"))
        c = compare(out if isinstance(out, tuple) else (out,), ref)
        assert c["rel_err"] <= TOLERANCES["float16"], c


@pytest.mark.gpu
@pytest.mark.parametrize("M,approximate", [(7, "tanh"), (129, "tanh"), (129, "none")])
def test_gpu_linear_bias_gelu_odd_m_matches_torch(no_threshold, M, approximate, tmp_path):
    torch.manual_seed(M)
    model = LinearGelu(k=256, n=512, approximate=approximate).eval()
    x = torch.randn(M, 256)
    art = kiln.compile(model, (x,), target="cuda", dtype="float16")
    rule = fge.GEMV_RULE_NAME if M <= fge.GEMV_MAX_M else fge.RULE_NAME
    assert [r["rule"] for r in art.schedule_report].count(rule) == 1, art.schedule_report
    m = kiln.load(art.export(str(tmp_path / f"lin{M}")), device="cuda")
    ref = torch_reference(model, (x,), dtype=torch.float32)
    out = m(*cast_inputs((x,), torch.float16, "cuda"))
    c = compare(out if isinstance(out, tuple) else (out,), ref)
    assert c["rel_err"] <= TOLERANCES["float16"], c


class Mlp(torch.nn.Module):
    """Linear + GELU + Linear + residual on [batch, seq, 256]."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


@pytest.mark.gpu
def test_gpu_dynamic_batch_and_seq_mlp_matches_torch(tmp_path):
    """Batch and sequence both dynamic (M = batch * seq): one exported build on the dynamic-M kernels, run at
    several (batch, seq), each against torch fp32."""
    torch.manual_seed(3)
    model = Mlp().eval()
    x = torch.randn(2, 24, 256)
    dyn = ({0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("seq", min=1, max=512)},)
    art = kiln.compile(model, (x,), target="cuda", dtype="float16", dynamic_shapes=dyn, strict=True)
    funcs = [r["func"] for r in art.schedule_report if r["rule"] == fge.RULE_NAME]
    assert len(funcs) == 2 and all(f.startswith("gemm_sm90_dynM") for f in funcs), art.schedule_report
    m = kiln.load(art.export(str(tmp_path / "mlp")), device="cuda")
    for b, sq in ((1, 1), (3, 7), (2, 24), (16, 129), (64, 300)):
        xi = torch.randn(b, sq, 256)
        out = m(*cast_inputs((xi,), torch.float16, "cuda"))
        c = compare(out if isinstance(out, tuple) else (out,), torch_reference(model, (xi,), dtype=torch.float32))
        assert c["rel_err"] <= TOLERANCES["float16"], (b, sq, c)


@pytest.mark.gpu
def test_gpu_split_k_linear_gelu_matches_torch(tmp_path):
    torch.manual_seed(1)
    model = LinearGelu(k=4096, n=1024, approximate="none").eval()
    x = torch.randn(2, 65, 4096)
    with knobs.scope(tables_dir=str(tmp_path)):
        art = kiln.compile(model, (x,), target="cuda", dtype="float16")
    assert any("splitk" in r["func"] for r in art.schedule_report), art.schedule_report
    m = kiln.load(art.export(str(tmp_path / "lin")), device="cuda")
    ref = torch_reference(model, (x,), dtype=torch.float32)
    for _ in range(2):  # the second call replays the CUDA graph (the partials buffer is reused)
        out = m(*cast_inputs((x,), torch.float16, "cuda"))
        c = compare(out if isinstance(out, tuple) else (out,), ref)
        assert c["rel_err"] <= TOLERANCES["float16"], c


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 5, 16])
def test_gpu_decode_linear_gelu_on_gemv_matches_torch(M, tmp_path):
    torch.manual_seed(M)
    model = LinearGelu(k=1024, n=512, approximate="none").eval()
    x = torch.randn(M, 1024)
    art = kiln.compile(model, (x,), target="cuda", dtype="float16")
    assert [r["rule"] for r in art.schedule_report].count(fge.GEMV_RULE_NAME) == 1, art.schedule_report
    m = kiln.load(art.export(str(tmp_path / f"lin{M}")), device="cuda")
    out = m(*cast_inputs((x,), torch.float16, "cuda"))
    c = compare(out if isinstance(out, tuple) else (out,), torch_reference(model, (x,), dtype=torch.float32))
    assert c["rel_err"] <= TOLERANCES["float16"], c


def test_split_k_is_off_without_epilogue_inputs(tmp_path):
    """A bias-free Linear at a split-K shape: the one-input reduce kernel would crash TVM's RewriteDataflowReshape
    (HasReshapePattern on a TIRx body), so the GEMM runs unsplit and says why; the compile goes through."""
    model = torch.nn.Linear(4096, 1024, bias=False).half().eval()
    with knobs.scope(tables_dir=str(tmp_path)):
        art = kiln.compile(model, (torch.randn(128, 4096).half(),), target="cuda")
    rep = [r for r in art.schedule_report if r["rule"] == fge.RULE_NAME]
    assert [r["func"] for r in rep] == ["gemm_sm90_128x1024x4096_float16_none"], rep
    assert "split-K off" in rep[0]["detail"]["config_source"]


def test_dynamic_m_linear_compiles_to_the_wgmma_kernel():
    """A dynamic batch (M = batch * 16 <= 512): the Linear + GELU goes to the dynamic-M sm_90a kernel (one kernel
    for every batch; wgmma in the CUDA source), not a fallback, so a strict compile takes it."""
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU()).eval()
    x = torch.randn(2, 16, 256)
    dyn = ({0: torch.export.Dim("batch", min=1, max=32)},)
    art = kiln.compile(model, (x,), target="cuda", dtype="float16", dynamic_shapes=dyn, strict=True)
    hot = [r for r in art.schedule_report if r["hot"]]
    assert [(r["rule"], r["func"], r["fallback"]) for r in hot] == [
        (fge.RULE_NAME, "gemm_sm90_dynM512x512x256_float16_bias_gelu", False)], hot
    assert hot[0]["detail"]["gemm_config"].endswith("_p")          # the fixed persistent grid
    src = "\n".join(text for fmt, text in device_code(art.executable) if fmt == "cuda")
    assert "wgmma.mma_async.sync.aligned.m64n" in src
    assert re.search(r"gemm_sm90_dynM512x512x256_float16_bias_gelu_kernel\([^)]*int(64_t)? m\)", src), "M is a kernel arg"


def test_dynamic_m_linear_the_kernel_refuses_gets_dlight_simt_matmul_reported_as_fallback():
    """N = 500 (not a multiple of 8) with a dynamic batch: the kernel refuses; dlight's tensor-core matmul raises on
    it; the SIMT matmul schedule takes it (before: the general-reduction schedule, ~20x slower on the H200), and
    the report calls it a fallback, so strict compiles refuse it."""
    from kiln.errors import ScheduleFallbackError
    model = torch.nn.Sequential(torch.nn.Linear(256, 500), torch.nn.GELU()).eval()
    x = torch.randn(2, 16, 256)
    dyn = ({0: torch.export.Dim("batch", min=1, max=32)},)
    art = kiln.compile(model, (x,), target="cuda", dtype="float16", dynamic_shapes=dyn)
    assert "N=500 is not a multiple of 8" in " ".join(art.notes), art.notes
    hot = [r for r in art.schedule_report if r["hot"]]
    assert [(r["rule"], r["fallback"]) for r in hot] == [("dlight.Matmul[sm_60]", True)], hot
    assert "ScheduleError" in " ".join(d["reason"] for d in hot[0]["declined"])        # dlight.Matmul (tensor cores)
    with pytest.raises(ScheduleFallbackError, match="fell back to a generic schedule"):
        kiln.compile(model, (x,), target="cuda", dtype="float16", dynamic_shapes=dyn, strict=True)
