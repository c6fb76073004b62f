"""z3 equivalence proofs of rewrites (kiln.verify.symbolic): the sibling-GEMM fusion is proved on its real output,
every GEMM epilogue rule the fusion pass uses is proved, and a wrong rewrite is caught with a counterexample."""
from __future__ import annotations

import pytest

from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from kiln.relax_passes.fuse_sibling_gemms import FuseSiblingGemms
from kiln.verify.symbolic import SymbolicUnsupported, evaluate, prove_epilogue_rule, prove_equivalent


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
    class Softmax:
        @R.function
        def main(x: R.Tensor((2, 3), "float32")):
            with R.dataflow():
                y = R.nn.softmax(x)
                R.output(y)
            return y

    with pytest.raises(SymbolicUnsupported, match="relax.nn.softmax"):
        evaluate(Softmax)

    @I.ir_module
    class Dyn:
        @R.function
        def main(x: R.Tensor(("n", 3), "float32")):
            return x

    with pytest.raises(SymbolicUnsupported, match="not static"):
        evaluate(Dyn)


# ------------------------------------------------------------------------------------------ kiln verify MODEL
def test_kiln_verify_proves_bert_regions_and_tests_attention(capsys):
    from kiln.cli import main
    assert main(["verify", "bert", "--size", "tiny", "--dtype", "float16", "--target", "cuda"]) == 0
    out = capsys.readouterr().out
    assert out.count("sibling GEMMs") == 2 and "GEMM epilogue [bias]" in out and "3 proved" in out, out
    assert main(["verify", "gpt2", "--size", "tiny", "--target", "llvm"]) == 0
    out = capsys.readouterr().out
    assert out.count("attention") == 2 and "2 tested" in out, out


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
