"""The attention fusion pass (``kiln/relax_passes/fuse_attention.py``), on CPU.

It fires on the tiny zoo models (BERT and ViT without a mask, GPT-2 causal, Llama causal + GQA with a RoPE'd
BHSD q/k) and on torch's SDPA and masked_fill forms; the rewritten modules built for llvm (generic kernel)
match torch at the per-dtype tolerance on odd sequence lengths; on cuda the sm_90a flash kernel is called
(head dim 64) or the graph is left alone with the kernel's reason (head dim 16); the rewrite of a small
hand-written attention is exactly the expected module; near misses are refused with their reason.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

import kiln
from kiln import zoo
from kiln.frontend import import_torch
from kiln.relax_passes import cleanup_passes, pattern_passes
from kiln.relax_passes import fuse_attention as fa
from kiln.relax_passes.attention_te import make_attention_generic
from kiln.verify import TOLERANCES, cast_inputs, compare, torch_reference

LLVM = tvm.target.Target({"kind": "llvm"})


def run_pass(mod, kind="llvm"):
    out = fa.FuseAttention(kind)(mod)
    relax.analysis.well_formed(out)
    return out, fa.fusion_report(out)


def attention_calls(mod, rule) -> list[str]:
    """Names of the PrimFuncs with ``kiln.rule == rule`` called from Relax (one entry per call)."""
    names = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir":
            f = mod[e.args[0]]
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and str(f.attrs.get("kiln.rule", "")) == rule:
                names.append(e.args[0].name_hint)
    for _, f in mod.functions_items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f, visit)
    return names


def funcs_only(mod) -> tvm.IRModule:
    return tvm.IRModule(dict(mod.functions_items()))


def imported(model, inputs, dtype, kind="llvm"):
    res = import_torch(model, inputs, dtype=dtype)
    return tvm.transform.Sequential(cleanup_passes(kind))(res.mod)


# ------------------------------------------------------------------------------------------ zoo models
ZOO_CASES = [  # name, dtype, expected (mask, Hq, Hkv, q layout)
    ("bert", "float32", ("none", 4, 4, "bshd")),
    ("bert", "float16", ("none", 4, 4, "bshd")),
    ("gpt2", "float32", ("causal", 4, 4, "bshd")),
    ("llama", "float16", ("causal", 4, 2, "bhsd")),   # GQA 4/2; q/k come out of RoPE in BHSD
    ("vit", "float32", ("none", 4, 4, "bshd")),
]


@pytest.mark.parametrize("name,dtype,expected", ZOO_CASES, ids=[f"{n}-{d}" for n, d, _ in ZOO_CASES])
def test_fires_on_zoo_models(name, dtype, expected):
    zm = zoo.get(name, size="tiny", batch=2)
    after, report = run_pass(imported(zm.model, zm.example_inputs, dtype))
    mask, hq, hkv, q_layout = expected
    assert len(report) == 2 and all(r["fused"] for r in report), report   # 2 layers
    for r in report:
        assert (r["mask"], r["Hq"], r["Hkv"], r["D"], r["dtype"]) == (mask, hq, hkv, 16, dtype), r
        assert r["layouts"]["q"] == q_layout and r["layouts"]["out"] == "bshd" and r["scale"] == 0.25, r
    calls = attention_calls(after, fa.RULE_GENERIC)
    assert len(calls) == 2 and len(set(calls)) == 1, calls           # both layers share one kernel
    text = after["main"].script()
    assert "R.nn.softmax" not in text and "R.cumsum" not in text     # scores and the mask graph are gone


def test_cuda_refuses_tiny_head_dim_and_leaves_graph():
    zm = zoo.get("gpt2", size="tiny", batch=2)
    before = imported(zm.model, zm.example_inputs, "float16", kind="cuda")
    after, report = run_pass(before, kind="cuda")
    assert len(report) == 2 and not any(r["fused"] for r in report), report
    assert all("sm_90a flash attention declines: head_dim=16 is not supported" in r["reason"] for r in report)
    tvm.ir.assert_structural_equal(funcs_only(after), funcs_only(before))


def _bert_d64():
    from transformers import BertConfig, BertModel
    cfg = BertConfig(hidden_size=128, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                     vocab_size=1000, max_position_embeddings=256)
    cfg._attn_implementation = "eager"
    return BertModel(cfg).eval()


def _llama_d64():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=256, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=1000, max_position_embeddings=256, use_cache=False)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("build,mask,hq,hkv", [(_bert_d64, "none", 2, 2), (_llama_d64, "causal", 4, 2)],
                         ids=["bert", "llama-gqa"])
def test_cuda_calls_the_sm90_flash_kernel(build, mask, hq, hkv):
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 129))
    mod = imported(build(), (ids,), "float16", kind="cuda")
    passes = pattern_passes("cuda")
    assert [p.info.name for p in passes][-1] == "kiln.FuseAttention"   # after the GEMM pass
    after = tvm.transform.Sequential(passes)(mod)
    report = fa.fusion_report(after)
    assert [r["fused"] for r in report] == [True], report
    assert (report[0]["mask"], report[0]["Hkv"], report[0]["D"], report[0]["scale"]) == (mask, hkv, 64, 0.125)
    calls = attention_calls(after, fa.RULE_SM90)
    assert len(calls) == 1, calls
    f = after[calls[0]]
    assert int(f.attrs["op_pattern"]) == 8 and str(f.attrs["kiln.tir_pipeline"]) == "tirx"
    assert bool(f.attrs["tirx.is_scheduled"]) and str(f.attrs["global_symbol"]) == calls[0]
    shapes = [tuple(int(x) for x in p.shape) for p in f.params]
    assert shapes == [(2, 129, hq, 64), (2, 129, hkv, 64), (2, 129, hkv, 64), (2, 129, hq, 64)], shapes
    assert "R.nn.softmax" not in after["main"].script()


def test_registration():
    names = lambda kind: [p.info.name for p in pattern_passes(kind)]  # noqa: E731
    assert names("cuda").count("kiln.FuseAttention") == 1
    assert names("cuda").index("kiln.FuseGemmEpilogueSM90") < names("cuda").index("kiln.FuseAttention")
    assert names("llvm").count("kiln.FuseAttention") == 1
    assert "kiln.FuseAttention" not in names("rocm")


# ------------------------------------------------------------------------------------------ numerics (llvm)
@pytest.mark.parametrize("name,dtype,seq", [("bert", "float32", 129), ("gpt2", "float16", 7),
                                            ("llama", "bfloat16", 129), ("vit", "float32", None)])
def test_zoo_compile_matches_torch(name, dtype, seq, tmp_path):
    zm = zoo.get(name, size="tiny", batch=2, seq=seq, seed=3)
    art = kiln.compile(zm.model, zm.example_inputs, target="llvm", dtype=dtype, dump_ir=str(tmp_path))
    fusion_ir = (tmp_path / "03_fusion.py").read_text()
    assert fusion_ir.count("R.call_tir(cls.attention_generic_") == 2, fusion_ir[:2000]
    out = art(*cast_inputs(zm.example_inputs, getattr(torch, dtype)))
    c = compare(out if isinstance(out, tuple) else (out,),
                torch_reference(zm.model, zm.example_inputs, dtype=torch.float32))
    assert c["rel_err"] <= TOLERANCES[dtype], c


class Attn(torch.nn.Module):
    """Projections + attention in three spellings: torch SDPA with a key mask, SDPA causal GQA, masked_fill."""

    def __init__(self, mode, d=64, h=4, hkv=4):
        super().__init__()
        self.h, self.hkv, self.dh, self.mode = h, hkv, d // h, mode
        self.q = torch.nn.Linear(d, d)
        self.k = torch.nn.Linear(d, hkv * self.dh)
        self.v = torch.nn.Linear(d, hkv * self.dh)

    def forward(self, x, keep):
        B, S, _ = x.shape
        q = self.q(x).view(B, S, self.h, self.dh).transpose(1, 2)
        k = self.k(x).view(B, S, self.hkv, self.dh).transpose(1, 2)
        v = self.v(x).view(B, S, self.hkv, self.dh).transpose(1, 2)
        if self.mode == "sdpa_kpad":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep.bool()[:, None, None, :], scale=0.3)
        elif self.mode == "sdpa_causal_gqa":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            s = (q @ k.transpose(-1, -2)) / 4.0
            s = s.masked_fill(~keep.bool()[:, None, None, :], float("-inf"))
            o = torch.softmax(s, dim=-1) @ v
        return o.transpose(1, 2).reshape(B, S, -1)


@pytest.mark.parametrize("mode,dtype,seq,mask", [("sdpa_kpad", "float32", 7, "kpad"),
                                                 ("sdpa_causal_gqa", "float16", 129, "causal"),
                                                 ("masked_fill", "float16", 7, "kpad")])
def test_torch_attention_forms_match_torch(mode, dtype, seq, mask):
    torch.manual_seed(seq)
    model = Attn(mode, hkv=2 if "gqa" in mode else 4).eval()
    x = torch.randn(2, seq, 64)
    keep = torch.ones(2, seq, dtype=torch.int64)
    keep[1, -2:] = 0
    after, report = run_pass(imported(model, (x, keep), dtype))
    assert [(r["fused"], r["mask"]) for r in report] == [(True, mask)], report
    assert report[0]["safe_softmax"] == mode.startswith("sdpa")   # torch's SDPA decomposition guards -inf rows
    art = kiln.compile(model, (x, keep), target="llvm", dtype=dtype)
    out = art(x.to(getattr(torch, dtype)), keep)
    c = compare((out,), torch_reference(model, (x, keep), dtype=torch.float32))
    assert c["rel_err"] <= TOLERANCES[dtype], c


# ------------------------------------------------------------------------------------------ golden IR
@I.ir_module
class KeyMaskedAttention:
    """Q/K/V split into heads and permuted to BHSD, 4-D matmuls, scale by division, additive [B,1,1,S] mask."""

    @R.function
    def main(xq: R.Tensor((2, 7, 64), "float32"), xk: R.Tensor((2, 7, 64), "float32"),
             xv: R.Tensor((2, 7, 64), "float32"), mask: R.Tensor((2, 1, 1, 7), "float32")
             ) -> R.Tensor((2, 7, 64), "float32"):
        with R.dataflow():
            q = R.reshape(xq, R.shape([2, 7, 4, 16]))
            qt = R.permute_dims(q, axes=[0, 2, 1, 3])
            k = R.reshape(xk, R.shape([2, 7, 4, 16]))
            kt = R.permute_dims(k, axes=[0, 2, 1, 3])
            v = R.reshape(xv, R.shape([2, 7, 4, 16]))
            vt = R.permute_dims(v, axes=[0, 2, 1, 3])
            ktt = R.permute_dims(kt, axes=[0, 1, 3, 2])
            s = R.matmul(qt, ktt)
            s2 = R.divide(s, R.const(4.0, "float32"))
            s3 = R.add(s2, mask)
            p = R.nn.softmax(s3, axis=-1)
            o = R.matmul(p, vt)
            ot = R.permute_dims(o, axes=[0, 2, 1, 3])
            out = R.reshape(ot, R.shape([2, 7, 64]))
            R.output(out)
        return out


def expected_key_masked(before):
    name = "attention_generic_b2_q7_k7_h4x4_d16_f32_kpad"
    pf = make_attention_generic(2, 7, 7, 4, 4, 16, "float32", causal=False, has_kpad=True, scale=0.25)
    pf = pf.with_attrs({"global_symbol": name, "kiln.rule": fa.RULE_GENERIC, "op_pattern": 8})
    bb = relax.BlockBuilder()
    xs = [relax.Var(n, relax.TensorType([2, 7, 64], "float32")) for n in ("xq", "xk", "xv")]
    mask = relax.Var("mask", relax.TensorType([2, 1, 1, 7], "float32"))
    with bb.function("main", [*xs, mask], attrs=dict(before["main"].attrs or {})):
        with bb.dataflow():
            gv = bb.add_func(pf, name)
            q, k, v = (bb.emit(relax.op.reshape(x, relax.ShapeExpr([2, 7, 4, 16]))) for x in xs)
            kp = bb.emit(relax.op.reshape(mask, relax.ShapeExpr([2, 7])))
            o = bb.emit(relax.call_tir(gv, [q, k, v, kp], relax.TensorType([2, 7, 4, 16], "float32")))
            out = bb.emit_output(relax.op.reshape(o, relax.ShapeExpr([2, 7, 64])))
        bb.emit_func_output(out)
    return bb.get()


def test_rewrite_matches_handwritten_expected():
    after, report = run_pass(KeyMaskedAttention)
    tvm.ir.assert_structural_equal(funcs_only(after), expected_key_masked(KeyMaskedAttention))
    assert len(report) == 1 and report[0]["fused"], report
    r = report[0]
    assert (r["mask"], r["mask_source"], r["scale"], r["replaces"]) == ("kpad", "runtime additive", 0.25, "ot")


@I.ir_module
class NNAttentionCausal:
    @R.function
    def main(q: R.Tensor((1, 9, 2, 8), "float32"), k: R.Tensor((1, 9, 2, 8), "float32"),
             v: R.Tensor((1, 9, 2, 8), "float32")) -> R.Tensor((1, 9, 2, 8), "float32"):
        with R.dataflow():
            o = R.nn.attention(q, k, v, scale=0.5, causal_mask="TopLeft")
            R.output(o)
        return o


def test_nn_attention_is_fused_and_matches_its_legalization():
    after, report = run_pass(NNAttentionCausal)
    assert [(r["fused"], r["pattern"], r["mask"], r["scale"]) for r in report] == [(True, "nn.attention", "causal", 0.5)]
    rng = np.random.default_rng(0)
    args = [rng.standard_normal((1, 9, 2, 8)).astype("float32") for _ in range(3)]

    def run(mod):
        vm = relax.VirtualMachine(tvm.compile(mod, LLVM), tvm.cpu())
        return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()
    np.testing.assert_allclose(run(after), run(NNAttentionCausal), rtol=1e-5, atol=1e-5)


def _const_masked_attention():
    """BHSD q/k/v with a constant additive mask: causal and key 4 padded (as a numpy constant)."""
    keep = np.tril(np.ones((5, 5), bool)) & (np.arange(5) != 4)[None, :]
    mask = np.where(keep, 0.0, -1e9).astype("float32").reshape(1, 1, 5, 5)
    bb = relax.BlockBuilder()
    q, k, v = (relax.Var(n, relax.TensorType([1, 2, 5, 8], "float32")) for n in "qkv")
    with bb.function("main", [q, k, v]):
        with bb.dataflow():
            kt = bb.emit(relax.op.permute_dims(k, [0, 1, 3, 2]))
            s = bb.emit(relax.op.multiply(bb.emit(relax.op.matmul(q, kt)), relax.const(0.5, "float32")))
            p = bb.emit(relax.op.nn.softmax(bb.emit(relax.op.add(s, relax.const(mask))), axis=-1))
            o = bb.emit_output(relax.op.matmul(p, v))
        bb.emit_func_output(o)
    return bb.get()


def test_constant_causal_and_key_mask_is_read_and_matches():
    before = _const_masked_attention()
    after, report = run_pass(before)
    assert [(r["fused"], r["mask"], r["mask_source"], r["layouts"]["out"]) for r in report] == \
        [(True, "causal+kpad", "constant (evaluated)", "bhsd")], report
    rng = np.random.default_rng(1)
    args = [rng.standard_normal((1, 2, 5, 8)).astype("float32") for _ in range(3)]

    def run(mod):
        vm = relax.VirtualMachine(tvm.compile(mod, LLVM), tvm.cpu())
        return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()
    np.testing.assert_allclose(run(after), run(before), rtol=1e-5, atol=1e-5)


def test_dynamic_sequence_is_refused():
    zm = zoo.get("bert", size="tiny", batch=2)
    res = import_torch(zm.model, zm.example_inputs, dynamic_shapes=zm.dynamic_shapes)
    _, report = run_pass(res.mod, "cuda")
    assert len(report) == 2 and all("non-static shapes" in r["reason"] and "only a [B, H, Sq, Skv] batch" in r["reason"]
                                    for r in report), report


class PlainAttn(torch.nn.Module):
    """Projections, then ``softmax(q k^T / 4) v`` in BHSD through batched matmuls (the bmm path merges heads into
    the batch and splits them again), optionally with a key mask."""

    def __init__(self, d=128, h=2, masked=False, seq=24):
        super().__init__()
        self.h, self.dh, self.masked = h, d // h, masked
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.register_buffer("causal", torch.triu(torch.full((seq, seq), float("-inf")), 1))

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.h, self.dh).permute(2, 0, 3, 1, 4).unbind(0)
        s = (q @ k.transpose(-1, -2)) / 4.0
        if self.masked:
            s = s + self.causal
        return (torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(B, S, -1)


def _dynamic_batch(model, dtype="float16", kind="cuda"):
    x = torch.randn(2, 24, 128)
    res = import_torch(model.eval(), (x,), dtype=dtype, dynamic_shapes=({0: torch.export.Dim("b", min=1, max=16)},))
    return run_pass(tvm.transform.Sequential(cleanup_passes(kind))(res.mod), kind)


def test_dynamic_batch_calls_the_sm90_flash_kernel():
    """Only the batch symbolic: the cuda flash kernel is called with B a run-time dim (one ``bdyn`` kernel)."""
    after, report = _dynamic_batch(PlainAttn())
    assert [(r["fused"], r["B"], r["Sq"], r["kernel"]) for r in report] == [
        (True, None, 24, "kiln_flash_attn_sm90_bdyn_q24_k24_h2x2_d64_f16")], report
    assert attention_calls(after, fa.RULE_SM90) == ["kiln_flash_attn_sm90_bdyn_q24_k24_h2x2_d64_f16"]
    assert "R.nn.softmax" not in after.script()


def test_dynamic_batch_refusals():
    """A mask with a symbolic batch (the mask analysis evaluates [B, ...] constants) and the generic (llvm) kernel
    (built per static shape) are refused, with the reason, and the graph is left as it was."""
    _, report = _dynamic_batch(PlainAttn(masked=True))
    assert [r["fused"] for r in report] == [False] and "a mask with a dynamic batch" in report[0]["reason"], report
    _, report = _dynamic_batch(PlainAttn(), "float32", "llvm")
    assert [r["fused"] for r in report] == [False] and "generic kernel is built per static shape" in \
        report[0]["reason"], report


# ------------------------------------------------------------------------------------------ near misses
@I.ir_module
class SoftmaxWrongAxis:
    @R.function
    def main(q: R.Tensor((2, 4, 7, 16), "float32"), k: R.Tensor((2, 4, 7, 16), "float32"),
             v: R.Tensor((2, 4, 7, 16), "float32")):
        with R.dataflow():
            kt = R.permute_dims(k, axes=[0, 1, 3, 2])
            s = R.matmul(q, kt)
            s2 = R.multiply(s, R.const(0.25, "float32"))
            p = R.nn.softmax(s2, axis=2)
            o = R.matmul(p, v)
            R.output(o)
        return o


@I.ir_module
class ScoresUsedTwice:
    @R.function
    def main(q: R.Tensor((2, 4, 7, 16), "float32"), k: R.Tensor((2, 4, 7, 16), "float32"),
             v: R.Tensor((2, 4, 7, 16), "float32")):
        with R.dataflow():
            kt = R.permute_dims(k, axes=[0, 1, 3, 2])
            s = R.matmul(q, kt)
            s2 = R.multiply(s, R.const(0.25, "float32"))
            p = R.nn.softmax(s2, axis=-1)
            o = R.matmul(p, v)
            m = R.max(s2, axis=[-1])
            R.output(o, m)
        return (o, m)


@I.ir_module
class ProbsUsedTwice:
    @R.function
    def main(q: R.Tensor((2, 4, 7, 16), "float32"), k: R.Tensor((2, 4, 7, 16), "float32"),
             v: R.Tensor((2, 4, 7, 16), "float32")):
        with R.dataflow():
            kt = R.permute_dims(k, axes=[0, 1, 3, 2])
            s = R.matmul(q, kt)
            s2 = R.multiply(s, R.const(0.25, "float32"))
            p = R.nn.softmax(s2, axis=-1)
            o = R.matmul(p, v)
            ps = R.sum(p, axis=[-1])
            R.output(o, ps)
        return (o, ps)


@I.ir_module
class ProbsReturned:
    @R.function
    def main(q: R.Tensor((2, 4, 7, 16), "float32"), k: R.Tensor((2, 4, 7, 16), "float32"),
             v: R.Tensor((2, 4, 7, 16), "float32")):
        with R.dataflow():
            kt = R.permute_dims(k, axes=[0, 1, 3, 2])
            s = R.matmul(q, kt)
            s2 = R.multiply(s, R.const(0.25, "float32"))
            p = R.nn.softmax(s2, axis=-1)
            o = R.matmul(p, v)
            R.output(o, p)
        return (o, p)


@I.ir_module
class RuntimeScale:
    @R.function
    def main(q: R.Tensor((2, 4, 7, 16), "float32"), k: R.Tensor((2, 4, 7, 16), "float32"),
             v: R.Tensor((2, 4, 7, 16), "float32"), scale: R.Tensor((), "float32")):
        with R.dataflow():
            kt = R.permute_dims(k, axes=[0, 1, 3, 2])
            s = R.matmul(q, kt)
            s2 = R.multiply(scale, s)
            p = R.nn.softmax(s2, axis=-1)
            o = R.matmul(p, v)
            R.output(o)
        return o


@I.ir_module
class PerHeadMask:
    @R.function
    def main(q: R.Tensor((2, 4, 7, 16), "float32"), k: R.Tensor((2, 4, 7, 16), "float32"),
             v: R.Tensor((2, 4, 7, 16), "float32"), mask: R.Tensor((2, 4, 1, 7), "float32")):
        with R.dataflow():
            kt = R.permute_dims(k, axes=[0, 1, 3, 2])
            s = R.matmul(q, kt)
            s2 = R.multiply(s, R.const(0.25, "float32"))
            s3 = R.add(s2, mask)
            p = R.nn.softmax(s3, axis=-1)
            o = R.matmul(p, v)
            R.output(o)
        return o


@I.ir_module
class OtherPermute:
    """q split as [S, B, H, D] and permuted with [1, 2, 0, 3]: not the [0, 2, 1, 3] head split."""

    @R.function
    def main(x: R.Tensor((7, 2, 64), "float32"), k: R.Tensor((2, 4, 7, 16), "float32"),
             v: R.Tensor((2, 4, 7, 16), "float32")):
        with R.dataflow():
            x4 = R.reshape(x, R.shape([7, 2, 4, 16]))
            q = R.permute_dims(x4, axes=[1, 2, 0, 3])
            kt = R.permute_dims(k, axes=[0, 1, 3, 2])
            s = R.matmul(q, kt)
            s2 = R.multiply(s, R.const(0.25, "float32"))
            p = R.nn.softmax(s2, axis=-1)
            o = R.matmul(p, v)
            R.output(o)
        return o


@I.ir_module
class AntiCausalConstMask:
    """A constant mask that hides the *past* (triu): varies over queries without being causal."""

    @R.function
    def main(q: R.Tensor((1, 2, 4, 8), "float32"), k: R.Tensor((1, 2, 4, 8), "float32"),
             v: R.Tensor((1, 2, 4, 8), "float32")):
        with R.dataflow():
            i = R.reshape(R.arange(0, 4, 1, dtype="int64"), R.shape([4, 1]))
            j = R.reshape(R.arange(0, 4, 1, dtype="int64"), R.shape([1, 4]))
            keep = R.greater_equal(j, i)
            mask = R.where(keep, R.const(0.0, "float32"), R.const(-1e9, "float32"))
            kt = R.permute_dims(k, axes=[0, 1, 3, 2])
            s = R.matmul(q, kt)
            s2 = R.multiply(s, R.const(0.25, "float32"))
            s3 = R.add(s2, mask)
            p = R.nn.softmax(s3, axis=-1)
            o = R.matmul(p, v)
            R.output(o)
        return o


@I.ir_module
class ScaleAfterMask:
    @R.function
    def main(q: R.Tensor((2, 4, 7, 16), "float32"), k: R.Tensor((2, 4, 7, 16), "float32"),
             v: R.Tensor((2, 4, 7, 16), "float32"), mask: R.Tensor((2, 1, 1, 7), "float32")):
        with R.dataflow():
            kt = R.permute_dims(k, axes=[0, 1, 3, 2])
            s = R.matmul(q, kt)
            s2 = R.add(s, mask)
            s3 = R.multiply(s2, R.const(0.25, "float32"))
            p = R.nn.softmax(s3, axis=-1)
            o = R.matmul(p, v)
            R.output(o)
        return o


@pytest.mark.parametrize("mod,needle", [
    (SoftmaxWrongAxis, "softmax p is over axis 2, not the key axis 3"),
    (ScoresUsedTwice, "scores s2 has a consumer outside the attention (m)"),
    (ProbsUsedTwice, "probabilities p has 2 consumers"),
    (ProbsReturned, "probabilities p is a function output"),
    (RuntimeScale, "scaled by scale, a runtime tensor, not a compile-time constant scalar"),
    (PerHeadMask, "(data shape [2, 4, 1, 7]) is not a key-padding mask broadcast over heads and queries"),
    (OtherPermute, "q x4 has axes (s, b, h, d) through permute_dims axes [1, 2, 0, 3]: neither BSHD"),
    (AntiCausalConstMask, "varies over queries and is not causal (top-left)"),
    (ScaleAfterMask, "scores s2 are scaled after the mask is added"),
], ids=["softmax-axis", "scores-consumer", "probs-consumer", "probs-output", "runtime-scale", "per-head-mask", "permute",
        "anti-causal", "scale-after-mask"])
def test_refuses_near_misses_with_reason(mod, needle):
    after, report = run_pass(mod)
    assert len(report) == 1 and not report[0]["fused"], report
    assert needle in report[0]["reason"], report[0]["reason"]
    tvm.ir.assert_structural_equal(funcs_only(after), mod)
    assert fa.report_note(after).startswith("attention fusion: 0/1 fused; refused: 1x ")


# ------------------------------------------------------------------------------------------ GPU numerics
class WithMask(torch.nn.Module):
    """``model(input_ids, attention_mask)`` with both as positional inputs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.gpu
def test_gpu_dynamic_batch_attention_matches_torch(tmp_path):
    """One exported build with a dynamic batch (flash kernel + dynamic-M GEMM, CUDA graph per batch), run at batch
    1, 5, 16 and 1 again against torch fp32."""
    torch.manual_seed(5)
    model = PlainAttn().eval()
    x = torch.randn(2, 24, 128)
    art = kiln.compile(model, (x,), target="cuda", dtype="float16",
                       dynamic_shapes=({0: torch.export.Dim("b", min=1, max=16)},))
    assert [r["rule"] for r in art.schedule_report].count(fa.RULE_SM90) == 1, art.schedule_report
    m = kiln.load(art.export(str(tmp_path / "dynattn")), device="cuda")
    for b in (1, 5, 16, 1):
        xi = torch.randn(b, 24, 128)
        out = m(*cast_inputs((xi,), torch.float16, "cuda"))
        c = compare(out if isinstance(out, tuple) else (out,), torch_reference(model, (xi,), dtype=torch.float32))
        assert c["rel_err"] <= TOLERANCES["float16"], (b, c)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["bert-kpad", "llama-causal-gqa"])
def test_gpu_flash_attention_models_match_torch(case, tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 129))
    if case == "bert-kpad":   # right padding: every query row keeps some keys
        keep = torch.ones_like(ids)
        keep[1, -5:] = 0
        model, inputs = WithMask(_bert_d64()), (ids, keep)
    else:
        model, inputs = _llama_d64(), (ids,)
    art = kiln.compile(model, inputs, target="cuda", dtype="float16")
    assert [r["rule"] for r in art.schedule_report].count(fa.RULE_SM90) == 1, art.schedule_report
    m = kiln.load(art.export(str(tmp_path / case)), device="cuda")
    ref = torch_reference(model, inputs, dtype=torch.float32)
    for _ in range(2):  # the second call replays the CUDA graph
        out = m(*cast_inputs(inputs, torch.float16, "cuda"))
        c = compare(out if isinstance(out, tuple) else (out,), ref)
        assert c["rel_err"] <= TOLERANCES["float16"], c
