"""CNNs on kiln's GEMM: ToNHWC, FoldConvBN and ConvToGemm (``kiln/relax_passes/{to_nhwc,fold_conv_bn,conv_to_gemm}.py``)
and their z3 proofs (``kiln/verify/conv_proof.py``).

CPU: the passes fire on the zoo's ResNet-50 (full widths, reduced input) for cuda and llvm; a small CNN with odd
sizes, strides, paddings and kernels compiled for llvm at fp32 matches torch; the rewritten Relax of one conv is
exactly the handwritten expected module (both passes); near-misses are refused with their reason; every rule
instance is proved and a wrong rewrite is refuted; a cuda compile of ResNet-50's stage-first blocks (real widths)
schedules the convs with kiln's GEMM rule and emits wgmma.
GPU (``-m gpu``): ResNet-50 fp16 on cuda matches torch fp32, with every conv on kiln's GEMM (bs1, threshold off)
and at the default threshold (bs32).
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

import kiln
from kiln import zoo
from kiln.frontend.torch_export import import_torch
from kiln.relax_passes import cleanup_passes, pattern_passes
from kiln.relax_passes import conv_to_gemm as c2g
from kiln.relax_passes import fold_conv_bn as fcb
from kiln.relax_passes import fuse_gemm_epilogue as fge
from kiln.relax_passes import to_nhwc
from kiln.target import device_code
from kiln.verify import TOLERANCES, cast_inputs, compare, torch_reference


@pytest.fixture
def no_threshold(monkeypatch):
    """Test shapes are below MIN_MACS; convert and fuse them anyway (ConvToGemm reads the same constant)."""
    monkeypatch.setattr(fge, "MIN_MACS", 0)


def cnn_passes(mod, kind="llvm", min_macs=0, prove=False):
    out = tvm.transform.Sequential([to_nhwc.ToNHWC(kind, min_macs), fcb.FoldConvBN(prove=prove),
                                    c2g.ConvToGemm(kind, min_macs, prove=prove)])(mod)
    relax.analysis.well_formed(out)
    return out


def ops_of(mod) -> list:
    names = []
    relax.analysis.post_order_visit(mod["main"], lambda e: names.append(e.op.name) if isinstance(e, relax.Call)
                                    and isinstance(e.op, tvm.ir.Op) else None)
    return names


# ------------------------------------------------------------------------------------------ the zoo's ResNet-50
@pytest.fixture(scope="module")
def resnet50_fp16():
    """Full-width ResNet-50 imported at fp16 on a 64x64 input (every conv kind of the 224 model, smaller M)."""
    zm = zoo.get("resnet50", size="full", batch=1)
    res = import_torch(zm.model, (torch.randn(1, 3, 64, 64),), dtype="float16")
    return tvm.transform.Sequential(cleanup_passes("cuda"))(res.mod)


@pytest.fixture(scope="module")
def resnet50_cuda_patterns(resnet50_fp16):
    """The pattern passes for cuda (threshold off) on it."""
    with pytest.MonkeyPatch.context() as mp, tvm.target.Target({"kind": "cuda", "arch": "sm_90a"}):
        mp.setattr(fge, "MIN_MACS", 0)
        return tvm.transform.Sequential(pattern_passes("cuda"))(resnet50_fp16)


def test_fires_on_zoo_resnet50_for_cuda(resnet50_cuda_patterns):
    mod = resnet50_cuda_patterns
    nhwc = to_nhwc.fusion_report(mod)
    assert len(nhwc["nhwc"]) == 53 and not nhwc["kept"] and nhwc["activation_transposes"] == 2, nhwc
    folds = fcb.fusion_report(mod)
    assert len(folds) == 53 and all(r["fused"] and r["ops"] == ["subtract", "divide", "multiply", "add"]
                                    and r["cast"] and r["layout"] == "NHWC" for r in folds), folds
    convs = c2g.fusion_report(mod)
    assert len(convs) == 53 and all(r["fused"] for r in convs)
    gathers = [r["gather"] for r in convs]
    # 1x1 stride-1 convs are a reshape, the 3 strided downsamples a strided slice, the 3x3s and the stem im2col
    assert (gathers.count("reshape"), gathers.count("strided_slice"), gathers.count("im2col")) == (33, 3, 17)
    stem = convs[0]
    assert (stem["kernel"], stem["K"], stem["K_pad"]) == ([7, 7], 147, 152)        # K padded for TMA
    assert "R.nn.conv2d" not in mod.script(show_meta=False)
    gemms = [r for r in fge.fusion_report(mod) if r["N"] != 1000]       # (the classifier is a Linear)
    assert len(gemms) == 53 and all(r["fused"] and r["epilogue"][0] == ["bias"] for r in gemms)


def test_zoo_resnet50_every_conv_gemm_is_a_kiln_kernel(resnet50_cuda_patterns):
    script = resnet50_cuda_patterns.script(show_meta=False)
    assert "R.matmul(" not in script
    epilogues = {tuple(s[0] for s in r["epilogue"]) for r in fge.fusion_report(resnet50_cuda_patterns)}
    assert ("bias",) in epilogues        # the GEMM that yields the shared add ends at its bias


def test_fires_on_zoo_resnet50_for_llvm_without_k_padding(resnet50_fp16):
    mod = tvm.transform.Sequential(pattern_passes("llvm"))(resnet50_fp16)
    convs = c2g.fusion_report(mod)
    assert len(convs) == 53 and all(r["fused"] and r["K_pad"] == r["K"] for r in convs)
    assert ops_of(mod).count("relax.matmul") == 54 and "relax.nn.conv2d" not in ops_of(mod)


def test_a_threshold_leaves_small_convs_to_dlight(resnet50_fp16, monkeypatch):
    """With MIN_MACS at its session-2 value (128M; the default is 0 since the H200 measured ResNet-50 and ViT at
    batch 1), a 64x64 ResNet-50's convs are too small for the GEMM kernel except those with M = N*OH*OW <= 16
    (layers 3 and 4), which the GEMM epilogue pass sends to its GEMV: only these go NHWC."""
    monkeypatch.setattr(fge, "MIN_MACS", 128 * 1024 * 1024)
    with tvm.target.Target({"kind": "cuda", "arch": "sm_90a"}):
        mod = tvm.transform.Sequential(pattern_passes("cuda"))(resnet50_fp16)
    convs = c2g.fusion_report(mod)
    small = [r for r in convs if r["M"] <= fge.GEMV_MAX_M]
    assert len(small) == 28 and all(r["fused"] for r in small)
    assert all(not r["fused"] and "MIN_MACS" in r["reason"] for r in convs if r["M"] > fge.GEMV_MAX_M)
    assert len(to_nhwc.fusion_report(mod)["nhwc"]) == 28
    assert all(r["fused"] for r in fcb.fusion_report(mod))
    assert ops_of(mod).count("relax.nn.conv2d") == 53 - 28


# ------------------------------------------------------------------------------------------ numerics on llvm
class SmallCNN(nn.Module):
    """Odd channel counts, a 7x7 s2 p3 stem, 3x3 s1 p1, 1x1 s2 (two branches: a residual of two convs), a
    biased 3x3 s2 p0 conv without batch norm, a 2x3 kernel with stride (1, 2) and asymmetric padding."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(6, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
                                  nn.Conv2d(5, 7, 1, stride=2, bias=False), nn.BatchNorm2d(7))
        self.down = nn.Sequential(nn.Conv2d(6, 7, 1, stride=2, bias=False), nn.BatchNorm2d(7))
        self.head = nn.Conv2d(7, 4, 3, stride=2)
        self.odd = nn.Conv2d(4, 3, (2, 3), stride=(1, 2), padding=(1, 2))
        gen = torch.Generator().manual_seed(0)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):        # non-trivial statistics, or the fold would be a no-op
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.2)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.body(x) + self.down(x))
        return self.odd(torch.relu(self.head(x))).mean(dim=(2, 3))


@pytest.mark.parametrize("hw", [(13, 13), (19, 15)])
def test_small_cnn_llvm_fp32_matches_torch(hw):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(2, 3, *hw)
    art = kiln.compile(model, (x,), target="llvm", progress=False)
    notes = "\n".join(art.notes)
    assert "conv to GEMM: 6/6 fused" in notes and "conv batch-norm folding: 6/6 fused" in notes, notes
    assert "NHWC layout: 6/6 convs; activation transposes added: 1" in notes, notes
    c = compare([art(x)], torch_reference(model, (x,), dtype=torch.float32))
    assert c["rel_err"] <= TOLERANCES["float32"], c


# ------------------------------------------------------------------------------------------ IR golden
@I.ir_module
class OneConv:
    @R.function
    def main(x: R.Tensor((1, 4, 5, 3), "float16"), w: R.Tensor((8, 2, 1, 3), "float16")):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            y = R.nn.conv2d(x, w, strides=[2, 1], padding=[1, 0, 0, 0], data_layout="NHWC", kernel_layout="OHWI",
                            out_dtype="float32")
            z = R.astype(y, "float16")
            R.output(z)
        return z


@I.ir_module
class OneConvAsGemm:
    @R.function
    def main(x: R.Tensor((1, 4, 5, 3), "float16"), w: R.Tensor((8, 2, 1, 3), "float16")):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            xp = R.nn.pad(x, pad_width=[0, 0, 1, 0, 0, 0, 0, 0])
            r0 = R.expand_dims(R.strided_slice(xp, (1,), (0,), (3,), (2,)), axis=[2])        # rows 0, 2
            r1 = R.expand_dims(R.strided_slice(xp, (1,), (1,), (4,), (2,)), axis=[2])        # rows 1, 3
            rows = R.concat((r0, r1), axis=2)                                               # [1, 2, 2, 5, 3]
            taps = R.permute_dims(R.expand_dims(rows, axis=[4]), axes=[0, 1, 3, 2, 4, 5])   # [1, 2, 5, 2, 1, 3]
            a = R.nn.pad(R.reshape(taps, R.shape([10, 6])), pad_width=[0, 0, 0, 2])       # K 6 -> 8
            w2 = R.nn.pad(R.reshape(w, R.shape([8, 6])), pad_width=[0, 0, 0, 2])
            mm = R.matmul(a, R.permute_dims(w2, axes=[1, 0]), out_dtype="float32")
            y = R.reshape(mm, R.shape([1, 2, 5, 8]))
            z = R.astype(y, "float16")
            R.output(z)
        return z


def test_one_conv_rewrite_is_exactly_the_expected_gemm():
    out = c2g.ConvToGemm("cuda", min_macs=0, prove=False)(OneConv)
    tvm.ir.assert_structural_equal(out["main"], relax.transform.Normalize()(OneConvAsGemm)["main"])
    (rec,) = c2g.fusion_report(out)
    assert rec["fused"] and (rec["M"], rec["K"], rec["K_pad"], rec["gather"]) == (10, 6, 8, "im2col")
    llvm = c2g.ConvToGemm("llvm", min_macs=0, prove=False)(OneConv)          # no K padding off cuda
    assert "R.nn.pad(lv8" not in llvm.script() and c2g.fusion_report(llvm)[0]["K_pad"] == 6


@I.ir_module
class ConvBN:
    @R.function
    def main(x: R.Tensor((1, 5, 5, 8), "float16"), w: R.Tensor((8, 3, 3, 8), "float16"),
             mean: R.Tensor((8,), "float16"), gamma: R.Tensor((8,), "float16"), beta: R.Tensor((8,), "float16")):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1], data_layout="NHWC", kernel_layout="OHWI", out_dtype="float32")
            h = R.astype(y, "float16")
            z = R.add(R.multiply(R.subtract(h, mean), gamma), beta)
            R.output(z)
        return z


@I.ir_module
class ConvBNFolded:
    @R.function
    def main(x: R.Tensor((1, 5, 5, 8), "float16"), w: R.Tensor((8, 3, 3, 8), "float16"),
             mean: R.Tensor((8,), "float16"), gamma: R.Tensor((8,), "float16"), beta: R.Tensor((8,), "float16")):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            t0 = R.multiply(R.reshape(R.astype(mean, "float32"), R.shape([8])), R.const([-1.0], "float32"))
            s = R.reshape(R.astype(gamma, "float32"), R.shape([8]))
            t1 = R.multiply(t0, s)
            t = R.add(t1, R.reshape(R.astype(beta, "float32"), R.shape([8])))
            s4 = R.reshape(s, R.shape([8, 1, 1, 1]))
            ws = R.multiply(R.astype(w, "float32"), s4)
            y = R.nn.conv2d(x, R.astype(ws, "float16"), padding=[1, 1, 1, 1], data_layout="NHWC",
                            kernel_layout="OHWI", out_dtype="float32")
            b = R.astype(R.astype(t, "float16"), "float32")      # the GEMM kernel's bias operand is fp16
            z = R.astype(R.add(y, b), "float16")
            R.output(z)
        return z


def test_batch_norm_fold_is_exactly_the_expected_graph():
    out = fcb.FoldConvBN(prove=False)(ConvBN)
    tvm.ir.assert_structural_equal(out["main"], relax.transform.Normalize()(ConvBNFolded)["main"])
    (rec,) = fcb.fusion_report(out)
    assert rec["fused"] and rec["ops"] == ["subtract", "multiply", "add"] and rec["cast"] and rec["layout"] == "NHWC"


# ------------------------------------------------------------------------------------------ refusals
def _conv_module(x_shape, w_shape, groups=1, dilation=1, dtype="float32", chain=None, inputs=("x",)):
    """``main(x, s, w)`` (the names in ``inputs`` first: they are the model inputs, the rest weights): one NCHW conv
    of ``x`` by ``w``, then ``chain(bb, y, s) -> out``; ``s`` is a per-channel ``[1, O, 1, 1]`` tensor."""
    x = relax.Var("x", relax.TensorType(x_shape, dtype))
    sc = relax.Var("s", relax.TensorType([1, w_shape[0], 1, 1], dtype))
    w = relax.Var("w", relax.TensorType(w_shape, dtype))
    params = sorted([x, sc, w], key=lambda v: (v.name not in inputs, ["x", "s", "w"].index(v.name)))
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, padding=[1, 1, 1, 1], groups=groups, dilation=dilation))
            out = bb.emit_output(chain(bb, y, sc) if chain else y)
        bb.emit_func_output(out)
    mod = bb.get()
    mod["main"] = mod["main"].with_attr("num_input", len(inputs))
    return mod


def _bn(bb, y, scale):
    return bb.emit(relax.op.add(bb.emit(relax.op.multiply(y, scale)), relax.const(0.5, "float32")))


@pytest.mark.parametrize("kw,reason", [
    (dict(x_shape=[1, 8, 9, 9], w_shape=[8, 4, 3, 3], groups=2), "groups=2: a grouped or depthwise conv"),
    (dict(x_shape=[1, 8, 9, 9], w_shape=[8, 1, 3, 3], groups=8), "groups=8: a grouped or depthwise conv"),
    (dict(x_shape=[1, 8, 9, 9], w_shape=[8, 8, 3, 3], dilation=2), "dilation [2, 2]"),
    (dict(x_shape=[tvm.tirx.Var("n", "int64"), 8, 9, 9], w_shape=[8, 8, 3, 3]), "non-static shapes"),
])
def test_conv_near_misses_are_refused_with_reason(kw, reason):
    mod = _conv_module(**kw)
    out = cnn_passes(mod)
    (rec,) = c2g.fusion_report(out)
    assert not rec["fused"] and reason in rec["reason"], rec
    assert to_nhwc.fusion_report(out)["kept"][0]["reason"] == rec["reason"]
    assert ops_of(out).count("relax.nn.conv2d") == 1 and "relax.matmul" not in ops_of(out)


@pytest.mark.parametrize("kind,kw,reason", [
    ("cuda", dict(x_shape=[1, 8, 9, 9], w_shape=[8, 8, 3, 3]), "dtype float32: kiln's GEMM kernel takes"),
    ("cuda", dict(x_shape=[1, 8, 9, 9], w_shape=[12, 8, 3, 3], dtype="float16"), "O=12 output channels"),
    ("rocm", dict(x_shape=[1, 8, 9, 9], w_shape=[8, 8, 3, 3], dtype="float16"), "target 'rocm'"),
])
def test_target_specific_refusals(kind, kw, reason):
    (rec,) = c2g.fusion_report(cnn_passes(_conv_module(**kw), kind=kind))
    assert not rec["fused"] and reason in rec["reason"], rec
    mod = _conv_module(x_shape=[1, 8, 9, 9], w_shape=[8, 8, 3, 3], dtype="float16")
    (rec,) = c2g.fusion_report(cnn_passes(mod, kind="cuda", min_macs=128 * 1024 * 1024))
    assert not rec["fused"] and "MIN_MACS" in rec["reason"]


def test_accepted_and_refused_convs_share_one_graph():
    """A refused (grouped) conv keeps NCHW between two NHWC GEMM convs; the model stays correct on llvm."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=4),
                          nn.ReLU(), nn.Conv2d(8, 5, 1)).eval()
    x = torch.randn(1, 4, 7, 9)
    art = kiln.compile(model, (x,), target="llvm", progress=False)
    notes = "\n".join(art.notes)
    assert "conv to GEMM: 2/3 fused; refused: 1x groups=4" in notes and "NHWC layout: 2/3 convs" in notes, notes
    c = compare([art(x)], torch_reference(model, (x,), dtype=torch.float32))
    assert c["rel_err"] <= TOLERANCES["float32"], c


def test_layout_conversion_failure_is_declined_with_reason(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("layout rule missing")
    monkeypatch.setattr(relax.transform, "ConvertLayout", broken)
    mod = cnn_passes(_conv_module([1, 8, 9, 9], [8, 8, 3, 3]))
    rep = to_nhwc.fusion_report(mod)
    assert not rep["nhwc"] and "ConvertLayout raised RuntimeError: layout rule missing" in rep["failed"]
    (rec,) = c2g.fusion_report(mod)
    assert not rec["fused"] and "layouts NCHW/OIHW/NCHW" in rec["reason"], rec
    assert "ConvertLayout raised" in to_nhwc.report_note(mod)


def test_dynamic_batch_folds_batch_norm_but_keeps_the_conv():
    n = tvm.tirx.Var("n", "int64")
    mod = cnn_passes(_conv_module([n, 8, 9, 9], [8, 8, 3, 3], chain=_bn))
    (frec,) = fcb.fusion_report(mod)
    (crec,) = c2g.fusion_report(mod)
    assert frec["fused"] and frec["ops"] == ["multiply", "add"], frec
    assert not crec["fused"] and "non-static shapes" in crec["reason"], crec


def _fold_record(mod):
    out = fcb.FoldConvBN(prove=False)(mod)
    (rec,) = fcb.fusion_report(out)
    return rec, out


def test_batch_norm_folds_weight_only_scales():
    rec, out = _fold_record(_conv_module([1, 8, 9, 9], [8, 8, 3, 3], chain=_bn))
    assert rec["fused"] and rec["ops"] == ["multiply", "add"] and not rec["cast"], rec
    assert ops_of(out).count("relax.nn.conv2d") == 1 and ops_of(out).count("relax.add") == 1


@pytest.mark.parametrize("case,reason", [
    ("scale is an input", "operand s is not foldable: it depends on a model input"),
    ("weight is an input", "the conv weight w is not weight-only"),
    ("second consumer", "has 2 consumers"),
    ("per-pixel operand", "is not per-channel for the conv output"),
    ("divided by the conv", "divides by the conv value"),
])
def test_batch_norm_near_misses_are_not_folded(case, reason):
    chain, inputs = _bn, ("x",)
    if case == "scale is an input":
        inputs = ("x", "s")
    elif case == "weight is an input":
        inputs = ("x", "w")
    elif case == "second consumer":
        chain = lambda bb, y, s: relax.Tuple([_bn(bb, y, s), bb.emit(relax.op.nn.relu(y))])  # noqa: E731
    elif case == "per-pixel operand":
        chain = lambda bb, y, s: bb.emit(relax.op.add(y, relax.const(torch.randn(1, 1, 9, 9).numpy())))  # noqa: E731
    else:
        chain = lambda bb, y, s: bb.emit(relax.op.divide(s, y))  # noqa: E731
    mod = _conv_module([1, 8, 9, 9], [8, 8, 3, 3], chain=chain, inputs=inputs)
    rec, out = _fold_record(mod)
    assert not rec["fused"] and reason in rec["reason"], rec
    tvm.ir.assert_structural_equal(out["main"], mod["main"])          # untouched


# ------------------------------------------------------------------------------------------ proofs
@pytest.mark.parametrize("rule", [(1, 1, (1, 1), (0, 0, 0, 0), False), (1, 1, (2, 2), (0, 0, 0, 0), False),
                                  (1, 1, (1, 1), (0, 0, 0, 0), True), (3, 3, (1, 1), (1, 1, 1, 1), False),
                                  (3, 3, (2, 2), (1, 1, 1, 1), True), (7, 7, (2, 2), (3, 3, 3, 3), True),
                                  (2, 3, (1, 2), (1, 2, 0, 1), False)])
def test_conv_to_gemm_rule_is_proved(rule):
    from kiln.verify import conv_proof          # z3: CPU CI has it, the GPU machine does not
    proof = conv_proof.prove_conv_rule(*rule)
    assert proof.status == "proved" and proof.outputs >= 12, proof


def test_a_wrong_im2col_is_refuted(monkeypatch):
    from kiln.verify import conv_proof
    real = c2g._taps

    def reversed_columns(bb, x, axis, k, out, stride):
        taps = real(bb, x, axis, k, out, stride)
        if axis == 1:
            return taps
        parts = [bb.emit(relax.op.strided_slice(taps, axes=[axis + 1], begin=[j], end=[j + 1])) for j in range(k)]
        return bb.emit(relax.op.concat(parts[::-1], axis=axis + 1))

    monkeypatch.setattr(c2g, "_taps", reversed_columns)
    proof = conv_proof.prove_conv_rule(3, 3, (1, 1), (1, 1, 1, 1))     # kernel columns taken in reverse order
    assert proof.status == "failed" and proof.counterexample, proof


@pytest.mark.parametrize("ops,cast,layout", [(("subtract", "divide", "multiply", "add"), True, "NCHW"),
                                             (("subtract", "divide", "multiply", "add"), True, "NHWC"),
                                             (("add",), False, "NCHW"), (("rsubtract", "multiply"), False, "NHWC"),
                                             (("add", "divide", "subtract"), True, "NHWC")])
def test_batch_norm_fold_rule_is_proved(ops, cast, layout):
    from kiln.verify import conv_proof          # z3: CPU CI has it, the GPU machine does not
    proof = conv_proof.prove_fold_rule(ops, cast, layout)
    assert proof.status == "proved", proof


def test_passes_refuse_what_is_not_proved(monkeypatch):
    from kiln.verify import conv_proof          # z3: CPU CI has it, the GPU machine does not
    from kiln.verify.symbolic import Proof
    forced = lambda *a: Proof("failed", 0.0, 1, detail="forced")  # noqa: E731
    monkeypatch.setattr(conv_proof, "_RULE_CACHE", {})
    monkeypatch.setattr(conv_proof, "prove_conv_rule", forced)
    monkeypatch.setattr(conv_proof, "prove_fold_rule", forced)
    out = c2g.ConvToGemm("llvm", prove=True)(OneConv)
    (rec,) = c2g.fusion_report(out)
    assert not rec["fused"] and rec["reason"] == "equivalence proof failed (forced)"
    assert "R.nn.conv2d" in out.script()
    (rec,) = fcb.fusion_report(fcb.FoldConvBN(prove=True)(ConvBN))
    assert not rec["fused"] and rec["reason"] == "equivalence proof failed (forced)"
    monkeypatch.undo()
    monkeypatch.setattr(conv_proof, "_RULE_CACHE", {})
    assert c2g.fusion_report(c2g.ConvToGemm("llvm", prove=True)(OneConv))[0]["fused"]      # the real proofs pass
    assert fcb.fusion_report(fcb.FoldConvBN(prove=True)(ConvBN))[0]["fused"]


def test_report_records_are_provable():
    """What ``kiln verify`` would run per region: the records of both reports map to proofs."""
    from kiln.verify import conv_proof
    mod = cnn_passes(relax.transform.Normalize()(ConvBN), kind="llvm")
    (crec,) = c2g.fusion_report(mod)
    (frec,) = fcb.fusion_report(mod)
    assert conv_proof.prove_conv_record(crec).status == "proved"
    assert conv_proof.prove_fold_record(frec).status == "proved"


# ------------------------------------------------------------------------------------------ cuda compile (CPU)
class ResNet50Convs(nn.Module):
    """ResNet-50's conv kinds at their real shapes (224x224, bs1): the 7x7 s2 stem + max pool, a 1x1 widening
    conv, one stride-1 bottleneck with its residual (layer1's blocks 2-3), layer2's 3x3 s2 and 1x1 s2 convs.
    (No downsample block: the zoo test above covers its two GEMMs meeting in one add.)"""

    def __init__(self):
        super().__init__()
        r = zoo.ResNet50(base=64, layers=(1, 1, 1, 1))
        self.stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool)
        self.widen = nn.Sequential(nn.Conv2d(64, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU())
        self.block = zoo._Bottleneck(256, 64, stride=1)
        self.down = nn.Sequential(nn.Conv2d(256, 128, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(128),
                                  nn.ReLU(), nn.Conv2d(128, 512, 1, stride=2, bias=False), nn.BatchNorm2d(512))

    def forward(self, x):
        return self.down(self.block(self.widen(self.stem(x))))


@pytest.fixture(scope="module")
def resnet50_convs_cuda():
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fge, "MIN_MACS", 0)
        return kiln.compile(ResNet50Convs().eval(), (torch.randn(1, 3, 224, 224),), target="cuda", dtype="float16",
                            progress=False)


def test_cuda_compile_schedules_resnet50_convs_on_kiln_gemm(resnet50_convs_cuda, tmp_path):
    art = resnet50_convs_cuda
    rep = art.schedule_report
    assert "conv to GEMM: 7/7 fused" in "\n".join(art.notes), art.notes
    assert not [r for r in rep if "conv2d" in r["func"]], rep
    hot = [r for r in rep if r["hot"]]
    assert all(r["rule"] == fge.RULE_NAME and not r["fallback"] for r in hot), [(r["func"], r["rule"]) for r in hot]
    kiln_gemms = {r["func"] for r in hot}
    for name in ("gemm_sm90_12544x64x152_float16_bias_relu",           # the 7x7 stem, K 147 -> 152
                 "gemm_sm90_3136x256x64_float16_bias_relu",            # 1x1
                 "gemm_sm90_3136x64x576_float16_bias_relu",            # 3x3 stride 1
                 "gemm_sm90_3136x256x64_float16_bias_residual_relu",   # 1x1 + residual + relu
                 "gemm_sm90_784x128x2304_float16",                     # 3x3 stride 2 (split K + reduce kernel)
                 "gemm_sm90_196x512x128_float16_bias"):                # 1x1 stride 2
        assert any(f.startswith(name) for f in kiln_gemms), sorted(kiln_gemms)
    src = "\n".join(text for fmt, text in device_code(art.executable) if fmt == "cuda")
    assert "wgmma.mma_async.sync.aligned.m64n" in src
    manifest = json.load(open(f"{art.export(str(tmp_path / 'r50'))}/manifest.json"))   # nvcc: every kernel builds
    assert manifest["device_code"]["device_code"] == "cubin", manifest["device_code"]


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("batch,threshold_off", [(1, True), (32, False)])
def test_resnet50_fp16_on_cuda_matches_torch(batch, threshold_off, monkeypatch, tmp_path):
    if threshold_off:
        monkeypatch.setattr(fge, "MIN_MACS", 0)
    zm = zoo.get("resnet50", size="full", batch=batch)
    art = kiln.compile(zm.model, zm.example_inputs, target="cuda", dtype="float16", progress=False)
    assert "conv to GEMM: 53/53 fused" in "\n".join(art.notes), art.notes
    m = kiln.load(art.export(str(tmp_path / "resnet50")), device="cuda")
    inputs = cast_inputs(zm.example_inputs, torch.float16, "cuda")
    ref = torch_reference(zm.model, zm.example_inputs, dtype=torch.float32)
    for out in (m(*inputs), m(*inputs)):        # the second call replays the CUDA graph
        c = compare(out if isinstance(out, tuple) else (out,), ref)
        assert c["rel_err"] <= TOLERANCES["float16"], c


def test_registration():
    names = lambda kind: [p.info.name for p in pattern_passes(kind)]  # noqa: E731
    ours = ["kiln.ToNHWC", "kiln.FoldConvBN", "kiln.ConvToGemm"]
    for kind in ("cuda", "llvm"):
        assert [n for n in names(kind) if n in ours] == ours
    assert names("cuda").index("kiln.ConvToGemm") < names("cuda").index("kiln.FuseGemmEpilogueSM90")
    assert not set(ours) & set(names("rocm"))


def test_proving_without_z3_is_a_typed_error_up_front(monkeypatch):
    """No z3 with proving on: ToolchainMissingError from the constructor naming the knob, not a RuntimeError from
    inside TVM's FFI halfway through a compile; with proving off nothing needs z3."""
    import importlib.util
    from kiln.errors import ToolchainMissingError
    from kiln.relax_passes import fuse_attention, proving
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "z3" else real(name, *a))
    for make in (lambda p: fcb.FoldConvBN(prove=p), lambda p: c2g.ConvToGemm("llvm", prove=p),
                 lambda p: fge.FuseGemmEpilogueSM90("llvm", prove=p), lambda p: fuse_attention.FuseAttention("llvm", prove=p)):
        with pytest.raises(ToolchainMissingError, match="KILN_PROVE_REWRITES=0"):
            make(True)
        make(False)
    monkeypatch.setenv("KILN_PROVE_REWRITES", "0")
    assert proving(None) is False
