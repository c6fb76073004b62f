"""z3 equivalence proofs of rewrites (kiln.verify.symbolic): the sibling-GEMM fusion is proved on its real output,
every GEMM epilogue rule the fusion pass uses is proved, and a wrong rewrite is caught with a counterexample."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("z3")             # CI has it; the GPU machine does not (proofs are CPU facts)

from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from kiln.relax_passes.fuse_sibling_gemms import FuseSiblingGemms
from kiln.verify.symbolic import Evaluator, SymbolicUnsupported, evaluate, prove_epilogue_rule, prove_equivalent


@I.ir_module
class QKV:
    @R.function
    def main(x: R.Tensor((2, 3), "float32"), wq: R.Tensor((2, 3), "float32"), wk: R.Tensor((1, 3), "float32"),
             wv: R.Tensor((1, 3), "float32"), bq: R.Tensor((2,), "float32"), bk: R.Tensor((1,), "float32"),
             bv: R.Tensor((1,), "float32")):
        with R.dataflow():
            q = R.add(R.matmul(x, R.permute_dims(wq, [1, 0])), bq)
            k = R.add(R.matmul(x, R.permute_dims(wk, [1, 0])), bk)
            v = R.add(R.matmul(x, R.permute_dims(wv, [1, 0])), bv)
            out = (R.nn.gelu(q), k, v)
            R.output(out)
        return out


def test_sibling_fusion_is_proved():
    before = relax.transform.Normalize()(QKV)
    after = FuseSiblingGemms()(before)
    assert "R.split" in after.script()
    proof = prove_equivalent(before, after)
    assert proof.status == "proved" and proof.outputs == 2 * 2 + 2 + 2, proof


def test_a_wrong_rewrite_is_refuted_with_a_counterexample():
    before = relax.transform.Normalize()(QKV)

    @I.ir_module
    class Swapped:          # k and v computed from each other's weights: wrong
        @R.function
        def main(x: R.Tensor((2, 3), "float32"), wq: R.Tensor((2, 3), "float32"), wk: R.Tensor((1, 3), "float32"),
                 wv: R.Tensor((1, 3), "float32"), bq: R.Tensor((2,), "float32"), bk: R.Tensor((1,), "float32"),
                 bv: R.Tensor((1,), "float32")):
            with R.dataflow():
                w = R.concat((wq, wv, wk), axis=0)
                b = R.concat((bq, bk, bv), axis=0)
                y = R.add(R.matmul(x, R.permute_dims(w, [1, 0])), b)
                parts = R.split(y, [2, 3], axis=-1)
                out = (R.nn.gelu(parts[0]), parts[1], parts[2])
                R.output(out)
            return out

    proof = prove_equivalent(before, Swapped)
    assert proof.status == "failed" and proof.counterexample, proof


@pytest.mark.parametrize("hidden,parts", [(4, (4, 4, 4)), (3, (2, 1, 1)), (2, (3, 5))])
def test_sibling_fusion_is_proved_for_bias_free_groups(hidden, parts):
    """Bias-free siblings (Llama's q/k/v and gate/up) of several widths: the rule does not depend on the sizes."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([2, hidden], "float32"))
    ws = [relax.Var(f"w{i}", relax.TensorType([n, hidden], "float32")) for i, n in enumerate(parts)]
    with bb.function("main", [x, *ws]):
        with bb.dataflow():
            outs = [bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w, [1, 0])))) for w in ws]
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    before = bb.get()
    after = FuseSiblingGemms()(before)
    assert "R.split" in after.script()
    assert prove_equivalent(before, after)


@pytest.mark.parametrize("stages", [(), ("bias",), ("bias", "gelu"), ("bias", "residual"), ("bias", "gelu_tanh"),
                                    ("relu",), ("silu", ("scale", 0.125)),
                                    ("bias", "relu", "residual", ("scale", 0.1), "silu", "gelu_tanh")])
def test_every_epilogue_rule_is_proved(stages):
    proof = prove_epilogue_rule(stages)
    assert proof.status == "proved", proof
    assert proof.seconds < 10


def test_unsupported_op_and_dynamic_shape_are_named():
    @I.ir_module
    class LayerNorm:
        @R.function
        def main(x: R.Tensor((2, 3), "float32"), g: R.Tensor((3,), "float32"), b: R.Tensor((3,), "float32")):
            with R.dataflow():
                y = R.nn.layer_norm(x, g, b, axes=[-1])
                R.output(y)
            return y

    with pytest.raises(SymbolicUnsupported, match="relax.nn.layer_norm"):
        evaluate(LayerNorm)

    @I.ir_module
    class Dyn:
        @R.function
        def main(x: R.Tensor(("n", 3), "float32")):
            return x

    with pytest.raises(SymbolicUnsupported, match="not static"):
        evaluate(Dyn)


# ------------------------------------------------------------------------------------------ layout and conv ops
def _numeric(mod, *arrays):
    """``mod`` evaluated by the symbolic evaluator on concrete inputs (integers: exact), as float64 arrays."""
    import z3
    ins = [np.vectorize(lambda v: z3.RealVal(int(v)), otypes=[object])(a) for a in arrays]
    out = evaluate(mod, ins)
    return np.vectorize(lambda t: float(z3.simplify(t).as_fraction()), otypes=[np.float64])(out)


def _one_op(shapes, make):
    bb = relax.BlockBuilder()
    xs = [relax.Var(f"x{i}", relax.TensorType(list(s), "float32")) for i, s in enumerate(shapes)]
    with bb.function("main", xs):
        with bb.dataflow():
            out = bb.emit_output(make(*xs))
        bb.emit_func_output(out)
    return bb.get()


CONVS = [  # data layout, kernel layout, strides, padding (top, left, bottom, right), dilation
    ("NCHW", "OIHW", (1, 1), (0, 0, 0, 0), (1, 1)),
    ("NCHW", "OIHW", (2, 1), (1, 0, 2, 1), (1, 2)),
    ("NHWC", "OHWI", (2, 2), (1, 1, 1, 1), (1, 1)),
    ("NHWC", "OIHW", (1, 2), (0, 2, 1, 0), (2, 1)),
]


@pytest.mark.parametrize("dl,kl,strides,padding,dilation", CONVS)
def test_conv2d_matches_torch(dl, kl, strides, padding, dilation):
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, (2, 3, 6, 5))              # NCHW
    w = rng.integers(-3, 4, (4, 3, 3, 2))              # OIHW
    xd = x.transpose(0, 2, 3, 1) if dl == "NHWC" else x
    wd = w.transpose(0, 2, 3, 1) if kl == "OHWI" else w
    mod = _one_op([xd.shape, wd.shape], lambda a, b: relax.op.nn.conv2d(
        a, b, strides=strides, padding=padding, dilation=dilation, data_layout=dl, kernel_layout=kl))
    got = _numeric(mod, xd, wd)
    pt, pl, pb, pr = padding
    xp = torch.nn.functional.pad(torch.tensor(x, dtype=torch.float64), (pl, pr, pt, pb))
    ref = torch.nn.functional.conv2d(xp, torch.tensor(w, dtype=torch.float64), stride=strides, dilation=dilation)
    ref = ref.numpy().transpose(0, 2, 3, 1) if dl == "NHWC" else ref.numpy()
    np.testing.assert_array_equal(got, ref)


def test_conv2d_layout_change_is_proved_and_wrong_padding_fails():
    """conv2d NCHW/OIHW against permute + conv2d NHWC/OHWI + permute back: proved; with the padding of the
    rewrite mirrored (bottom/right instead of top/left) the solver finds a counterexample."""
    def nchw(pad):
        return _one_op([(1, 2, 4, 3), (2, 2, 2, 2)], lambda x, w: relax.op.nn.conv2d(x, w, padding=pad))

    def nhwc(pad):
        bb = relax.BlockBuilder()
        x = relax.Var("x0", relax.TensorType([1, 2, 4, 3], "float32"))
        w = relax.Var("x1", relax.TensorType([2, 2, 2, 2], "float32"))
        with bb.function("main", [x, w]):
            with bb.dataflow():
                xt = bb.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
                wt = bb.emit(relax.op.permute_dims(w, [0, 2, 3, 1]))
                y = bb.emit(relax.op.nn.conv2d(xt, wt, padding=pad, data_layout="NHWC", kernel_layout="OHWI"))
                out = bb.emit_output(relax.op.permute_dims(y, [0, 3, 1, 2]))
            bb.emit_func_output(out)
        return bb.get()

    assert prove_equivalent(nchw((1, 1, 0, 0)), nhwc((1, 1, 0, 0))).status == "proved"
    bad = prove_equivalent(nchw((1, 1, 0, 0)), nhwc((0, 0, 1, 1)))
    assert bad.status == "failed" and bad.counterexample, bad


LAYOUT_OPS = [  # name, input shape, relax builder, numpy reference
    ("pad", (2, 3), lambda x: relax.op.nn.pad(x, [1, 0, 2, 1]), lambda a: np.pad(a, ((1, 0), (2, 1)))),
    ("strided_slice", (4, 5), lambda x: relax.op.strided_slice(x, [0, 1], [1, 4], [4, 0], [2, -2]),
     lambda a: a[1:4:2, 4:0:-2]),
    ("strided_slice-neg", (4, 5), lambda x: relax.op.strided_slice(x, [1], [-3], [-1]), lambda a: a[:, -3:-1]),
    ("take", (3, 4), lambda x: relax.op.take(x, relax.const(np.array([[2, 0], [1, 1]], "int64")), axis=1),
     lambda a: np.take(a, [[2, 0], [1, 1]], axis=1)),
    ("zeros", (2, 3), lambda x: relax.op.add(x, relax.op.zeros((1, 3), "float32")), lambda a: a),
    ("expand_dims", (2, 3), lambda x: relax.op.expand_dims(x, [0, -1]), lambda a: a[None, :, :, None]),
    ("squeeze", (1, 3, 1), lambda x: relax.op.squeeze(x, [2]), lambda a: a[:, :, 0]),
    ("squeeze-all", (1, 3, 1), lambda x: relax.op.squeeze(x), lambda a: a[0, :, 0]),
    ("broadcast_to", (3, 1), lambda x: relax.op.broadcast_to(x, (2, 3, 4)), lambda a: np.broadcast_to(a, (2, 3, 4))),
    ("repeat", (2, 3), lambda x: relax.op.repeat(x, 2, axis=0), lambda a: np.repeat(a, 2, axis=0)),
    ("tile", (2, 3), lambda x: relax.op.tile(x, [2, 1, 2]), lambda a: np.tile(a, (2, 1, 2))),
    ("sum-max", (2, 3, 4), lambda x: relax.op.add(relax.op.sum(x, axis=[0, 2], keepdims=True),
                                                  relax.op.max(x, axis=[0, 2], keepdims=True)),
     lambda a: a.sum(axis=(0, 2), keepdims=True) + a.max(axis=(0, 2), keepdims=True)),
]


@pytest.mark.parametrize("name,shape,make,ref", LAYOUT_OPS, ids=[c[0] for c in LAYOUT_OPS])
def test_layout_ops_match_numpy(name, shape, make, ref):
    a = np.random.default_rng(1).integers(-9, 10, shape)
    got = _numeric(_one_op([shape], make), a)
    np.testing.assert_array_equal(got, ref(a))


def test_minus_inf_semantics():
    """``-inf`` is a value: a masked softmax entry gets exactly 0, max skips it; an all ``-inf`` row is excluded
    by a side condition (a runtime mask), or refused (a constant one)."""
    import z3

    @I.ir_module
    class Masked:
        @R.function
        def main(x: R.Tensor((2, 3), "float32"), keep: R.Tensor((2, 3), "bool")):
            with R.dataflow():
                s = R.where(keep, x, R.const(float("-inf"), "float32"))
                p = R.nn.softmax(s, axis=-1)
                m = R.max(s, axis=[-1])
                R.output(p, m)
            return (p, m)

    ev = Evaluator()
    x, keep = ev.symbols(Masked["main"])
    p, m = ev.run(Masked, [x, keep])
    assert len(ev.assumptions) == 2                     # each row keeps some key
    sub = [(keep[0, j], z3.BoolVal(j != 1)) for j in range(3)]     # row 0: key 1 masked

    def at(t):
        return z3.simplify(z3.substitute(t, *sub))
    assert z3.is_true(at(ev.assumptions[0])) and at(p[0, 1]).arg(0).eq(z3.RealVal(0))   # 0 / sum
    assert z3.is_true(at(m[0].fin)) and at(m[0].val).eq(z3.simplify(z3.If(x[0, 0] >= x[0, 2], x[0, 0], x[0, 2])))

    @I.ir_module
    class AllMasked:
        @R.function
        def main(x: R.Tensor((1, 2), "float32")):
            with R.dataflow():
                p = R.nn.softmax(R.add(x, R.const(np.array([[0.0, -1e9]], "float32"))), axis=-1)
                q = R.nn.softmax(R.add(x, R.const(np.full((1, 2), float("-inf"), "float32"))), axis=-1)
                R.output(p, q)
            return (p, q)

    with pytest.raises(SymbolicUnsupported, match="every entry is -inf"):
        evaluate(AllMasked)
    with pytest.raises(SymbolicUnsupported, match="every entry is -inf"):   # -1e9 read as -inf too
        Evaluator(neg_threshold=-1e4).run(AllMasked)


# ------------------------------------------------------------------------------------------ kiln verify MODEL
def test_kiln_verify_proves_bert_regions_and_attention(capsys):
    """BERT on cuda: the GEMM regions proved; GPT-2 on llvm: both causal attention regions proved (the online
    softmax proof of kiln.verify.attention_proof) and the whole-model numerics row tested."""
    from kiln.cli import main
    assert main(["verify", "bert", "--size", "tiny", "--dtype", "float16", "--target", "cuda"]) == 0
    out = capsys.readouterr().out
    # MIN_MACS = 0: every tiny GEMM is a region too (2 sibling groups, 9 epilogues incl. the pooler GEMV)
    assert out.count("sibling GEMMs") == 2 and "GEMM epilogue [bias+gelu]" in out and "11 proved" in out, out
    assert main(["verify", "gpt2", "--size", "tiny", "--target", "llvm"]) == 0
    out = capsys.readouterr().out
    assert out.count("attention [causal]") == 2 and "attention numerics" in out, out
    assert "2 proved, 1 tested" in out and "generic decomposed mask=add_where causal" in out, out


def test_kiln_verify_fails_when_a_proof_fails(monkeypatch, capsys):
    import kiln.verify.symbolic as sym
    from kiln.cli import main
    real = sym.prove_epilogue_rule

    def broken(stages, **kw):
        p = real(stages, **kw)
        p.status = "failed"
        return p
    monkeypatch.setattr(sym, "prove_epilogue_rule", broken)
    assert main(["verify", "bert", "--size", "tiny", "--dtype", "float16", "--target", "cuda"]) == 1
    assert "failed" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ proofs gate the passes
def test_a_rule_whose_proof_fails_is_not_applied(monkeypatch):
    """The passes prove each rule instance before rewriting; a failing proof leaves the graph unfused, with the
    reason in the report (here the prover is made to fail; with the real prover every used rule is proved)."""
    import kiln.verify.symbolic as sym
    from kiln.relax_passes import fuse_gemm_epilogue as fge
    from kiln.relax_passes.fuse_sibling_gemms import fusion_report

    before = relax.transform.Normalize()(QKV)
    assert any(r["fused"] for r in fusion_report(FuseSiblingGemms()(before)))     # proved: applied
    monkeypatch.setattr(sym, "_RULE_CACHE", {})
    monkeypatch.setattr(sym, "prove_sibling_rule", lambda n, bias: sym.Proof("failed", 0.0, 1, detail="forced"))
    rep = fusion_report(FuseSiblingGemms()(before))
    assert not any(r["fused"] for r in rep)
    assert any("equivalence proof failed (forced)" in r.get("reason", "") for r in rep), rep

    @I.ir_module
    class Lin:
        @R.function
        def main(x: R.Tensor((32, 64), "float16"), w: R.Tensor((128, 64), "float16")):
            with R.dataflow():
                y = R.nn.relu(R.matmul(x, R.permute_dims(w, [1, 0])))
                R.output(y)
            return y

    monkeypatch.setattr(sym, "prove_epilogue_rule", lambda stages: sym.Proof("failed", 0.0, 1, detail="forced"))
    out = fge.FuseGemmEpilogueSM90("cuda", min_macs=0)(Lin)
    assert fge.fusion_report(out)[0]["reason"] == "equivalence proof failed (forced)"
    assert fge.fusion_report(fge.FuseGemmEpilogueSM90("cuda", min_macs=0, prove=False)(Lin))[0]["fused"]
