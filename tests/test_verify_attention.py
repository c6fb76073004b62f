"""z3 proof of the attention fusion rule (kiln.verify.attention_proof): every mask form, GQA, nn.attention, the
safe-softmax guard and the scale forms are proved for the flash kernel's online softmax and for the generic
kernel; the zoo models' rule instances (BERT, ViT, Llama-style causal GQA) are proved; deliberately wrong kernel
models (no rescale, another scale, causal off by one, the key bias read per query, the wrong KV head, a skipped
key block) fail with a counterexample; the attention pass refuses a rule whose proof fails."""
from __future__ import annotations

import numpy as np
import pytest

z3 = pytest.importorskip("z3")        # CI has it; the GPU machine does not (proofs are CPU facts)

from tvm import relax  # noqa: E402

from kiln.relax_passes import fuse_attention as fa  # noqa: E402
from kiln.verify.attention_proof import FlashAttentionModel, GenericAttentionModel, prove_attention_rule  # noqa: E402
from kiln.verify.attention_rule import AttentionRule, build_left  # noqa: E402
from kiln.verify.casesplit import exp_axioms, prove_by_cases  # noqa: E402

LLAMA = dict(mask="add_where", causal=True, gqa="repeat_kv", layouts=("bhsd", "bhsd", "bshd", "bshd"))
BERT = dict(mask="add_where")                       # BERT / ViT: an all-ones mask, scores * 0.25
RULES = {
    "none": dict(mask="none"),
    "bert-vit": BERT,
    "llama-causal-gqa": LLAMA,
    "gpt2-causal": dict(mask="add_where", causal=True),
    "const-causal+kpad": dict(mask="add_const", causal=True, const_kpad=True),
    "where-keep-causal+kpad": dict(mask="add_where", causal=True, const_kpad=True, keep=True),
    "where-masked-keep-inf": dict(mask="add_where_neg", keep=True, neg_inf=True),
    "runtime-bias-bhsd": dict(mask="add_bias", bias=True, layouts=("bhsd",) * 4),
    "sdpa-fill-causal-gqa-safe": dict(mask="fill", causal=True, keep=True, neg_inf=True, safe_softmax=True,
                                      gqa="repeat_kv", scale_ops=(("q", "mul", 0.5), ("k", "mul", 0.5))),
    "mqa-broadcast": dict(mask="add_where", causal=True, gqa="broadcast"),
    "gqa-k-repeat-v-broadcast": dict(gqa="repeat_kv/broadcast", layouts=("bshd", "bhsd", "bhsd", "bhsd")),
    "scale-rounded": dict(scale_ops=(("k", "mul", 0.5), ("scores", "div", 3.0))),    # the pass: fp64(0.5 / 3)
    "masked-fill-neg-div": dict(mask="fill_neg", keep=True, scale_ops=(("scores", "div", 4.0),)),
    "negative-scale": dict(scale_ops=(("scores", "mul", -0.5),)),
    "nn.attention-causal": dict(pattern="nn.attention", scale=0.5, causal=True, causal_mask="TopLeft", scale_ops=()),
    "nn.attention-default-scale": dict(pattern="nn.attention", scale_ops=()),
}


@pytest.mark.parametrize("kernel", ["flash", "generic"])
@pytest.mark.parametrize("name", list(RULES))
def test_rule_is_proved(name, kernel):
    proof = prove_attention_rule(AttentionRule(kernel, **RULES[name]))
    assert proof.status == "proved", proof
    assert proof.seconds < 10, proof


def test_a_rounded_scale_is_taken_as_the_graphs():
    """The pass's float scale (0.5 / 3 rounded) is taken as the graph's exact 1/6 (within 2^-22), and said so."""
    proof = prove_attention_rule(AttentionRule("flash", **RULES["scale-rounded"]))
    assert proof.status == "proved" and "the graph's to 2^-22" in proof.detail, proof


@pytest.mark.parametrize("name", [n for n in RULES if "nn.attention" not in n])
def test_rule_key_round_trips_through_the_pass(name):
    """The key the pass records for the rebuilt graph is the rule it was rebuilt from (so the proof is about
    the form the pass saw)."""
    rule = AttentionRule("generic", **RULES[name])
    out = fa.FuseAttention("llvm", prove=False)(build_left(rule))
    (rec,) = fa.fusion_report(out)
    assert rec["fused"] and AttentionRule.from_dict(rec["proof_rule"]) == rule, rec


def test_zoo_llama_rule_is_the_proved_one():
    """The tiny Llama zoo model (causal, GQA 4/2, RoPE'd BHSD q/k) records the Llama rule proved above."""
    import tvm

    from kiln import zoo
    from kiln.frontend import import_torch
    from kiln.relax_passes import cleanup_passes
    zm = zoo.get("llama", size="tiny", batch=2)
    mod = tvm.transform.Sequential(cleanup_passes("llvm"))(import_torch(zm.model, zm.example_inputs,
                                                                        dtype="float16").mod)
    recs = fa.fusion_report(fa.FuseAttention("llvm")(mod))
    assert [r["fused"] for r in recs] == [True, True], recs
    assert {AttentionRule.from_dict(r["proof_rule"]) for r in recs} == {AttentionRule("generic", **LLAMA)}


# ------------------------------------------------------------------------------------------ wrong models fail
class NoRescale(FlashAttentionModel):
    def rescale(self, acc, alpha):                  # forgets acc *= exp(m_old - m_new)
        return acc


class CausalOffByOne(FlashAttentionModel):
    def causal_masked(self, i, j):                  # lets query i see key i + 1
        return self.causal and j > i + 1


class GenericCausalOffByOne(GenericAttentionModel):
    def causal_masked(self, i, j):                  # masks the diagonal too
        return self.causal and j >= i


class BiasPerQuery(FlashAttentionModel):
    def key_bias(self, kpad, b, i, j):              # the key-padding bias read along the query axis
        return kpad[b, i]


class WrongKVHead(GenericAttentionModel):
    def kv_head(self, h, group):                    # h % group instead of h // group
        return h % group


class SkipsLastBlock(FlashAttentionModel):
    def __init__(self, **kw):                       # key blocks of 2 but one block fewer than the keys need
        super().__init__(**kw)
        self.block_n = 2

    def __call__(self, ev, q, k, v, kpad=None):
        return super().__call__(ev, q, k[:, :2], v[:, :2], None if kpad is None else kpad[:, :2])


def _twice_the_scale(cls):
    return lambda **kw: cls(**{**kw, "scale": kw["scale"] * 2})


WRONG = [
    ("no-rescale", "flash", RULES["none"], NoRescale),
    ("scale", "flash", RULES["bert-vit"], _twice_the_scale(FlashAttentionModel)),
    ("scale-generic", "generic", RULES["bert-vit"], _twice_the_scale(GenericAttentionModel)),
    ("causal-off-by-one", "flash", RULES["gpt2-causal"], CausalOffByOne),
    ("causal-off-by-one-generic", "generic", RULES["gpt2-causal"], GenericCausalOffByOne),
    ("mask-on-query-axis", "flash", RULES["where-masked-keep-inf"], BiasPerQuery),
    ("mask-on-query-axis-bias", "flash", RULES["runtime-bias-bhsd"], BiasPerQuery),
    ("gqa-head", "generic", RULES["llama-causal-gqa"], WrongKVHead),
    ("skipped-block", "flash", RULES["none"], SkipsLastBlock),
]


@pytest.mark.parametrize("name,kernel,rule,model", WRONG, ids=[w[0] for w in WRONG])
def test_wrong_kernel_model_fails_with_counterexample(name, kernel, rule, model):
    proof = prove_attention_rule(AttentionRule(kernel, **rule), model=model)
    assert proof.status == "failed" and proof.counterexample, proof
    assert any(k.startswith(("q[", "k[", "v[")) for k in proof.counterexample), proof.counterexample


def test_unsatisfiable_preconditions_fail_instead_of_proving_vacuously():
    class Vacuous(GenericAttentionModel):
        def __call__(self, ev, *args):
            ev.assumptions.append(z3.BoolVal(False))
            return super().__call__(ev, *args)

    proof = prove_attention_rule(AttentionRule("generic"), model=Vacuous)
    assert proof.status == "failed" and "unsatisfiable" in proof.detail, proof


# ------------------------------------------------------------------------------------------ the case split
def test_exp_axioms_are_instantiated_only_on_occurring_sums():
    f = z3.Function("exp", z3.RealSort(), z3.RealSort())
    a, b = z3.Reals("a b")
    apps = [f(a - b), f(b), f(a), f(a + b)]
    ax = exp_axioms(apps)
    assert sum(z3.is_gt(x) for x in ax) == 4                    # exp(t) > 0 for each term
    products = {str(x) for x in ax if z3.is_eq(x)}
    assert products == {str(f(a - b) * f(b) == f(a)), str(f(b) * f(a) == f(a + b))}, products


def test_ties_and_shift_invariance_are_proved_and_a_missing_shift_is_not():
    """softmax with the max taken either way round (ties included) equals exp(x - c) / sum for c = x0: the
    case split covers a == b; dropping the shift on one term is refuted."""
    f = z3.Function("exp", z3.RealSort(), z3.RealSort())
    x0, x1, v0, v1 = z3.Reals("x0 x1 v0 v1")
    m1, m2 = z3.If(x0 >= x1, x0, x1), z3.If(x1 >= x0, x1, x0)
    left = (f(x0 - m1) * v0 + f(x1 - m1) * v1) / (f(x0 - m1) + f(x1 - m1))
    right = (f(x0 - m2) * v0 + f(x1 - m2) * v1) / (f(x0 - m2) + f(x1 - m2))
    assert prove_by_cases(left != right, [], f)["status"] == "proved"
    wrong = (f(z3.RealVal(0)) * v0 + f(x1 - x0) * v1) / (f(z3.RealVal(0)) + f(x1))
    res = prove_by_cases(left != wrong, [], f)
    assert res["status"] == "failed" and res["model"] is not None


# ------------------------------------------------------------------------------------------ the pass's gate
def _two_layers():
    """Two identical attentions (one rule instance) in one function."""
    bb = relax.BlockBuilder()
    xs = [relax.Var(n, relax.TensorType([1, 4, 5, 8], "float32")) for n in ("q", "k", "v")]
    with bb.function("main", xs):
        with bb.dataflow():
            o = xs[0]
            for _ in range(2):
                kt = bb.emit(relax.op.permute_dims(xs[1], [0, 1, 3, 2]))
                s = bb.emit(relax.op.multiply(bb.emit(relax.op.matmul(o, kt)), relax.const(0.25, "float32")))
                p = bb.emit(relax.op.nn.softmax(s, axis=-1))
                o = bb.emit(relax.op.matmul(p, xs[2]))
            out = bb.emit_output(o)
        bb.emit_func_output(out)
    return bb.get()


def test_pass_proves_once_per_rule_and_refuses_what_is_not_proved(monkeypatch):
    import kiln.verify.attention_proof as ap
    import kiln.verify.symbolic as sym
    calls = []
    real = ap.prove_attention_rule

    def counting(rule, **kw):
        calls.append(rule)
        return real(rule, **kw)
    monkeypatch.setattr(sym, "_RULE_CACHE", {})
    monkeypatch.setattr(ap, "prove_attention_rule", counting)
    p = fa.FuseAttention("llvm")
    recs = fa.fusion_report(p(_two_layers()))
    assert [r["fused"] for r in recs] == [True, True] and len(calls) == 1, (recs, calls)
    assert p.timings["proof_s"] > 0
    fa.FuseAttention("llvm")(_two_layers())                     # cached for the process
    assert len(calls) == 1

    monkeypatch.setattr(sym, "_RULE_CACHE", {})
    monkeypatch.setattr(ap, "prove_attention_rule", lambda rule, **kw: sym.Proof("failed", 0.0, 1, detail="forced"))
    before = _two_layers()
    after = fa.FuseAttention("llvm")(before)
    recs = fa.fusion_report(after)
    assert [r["fused"] for r in recs] == [False, False], recs
    assert all(r["reason"] == "equivalence proof failed (forced)" and "proof_rule" in r for r in recs), recs
    assert "R.nn.softmax" in after["main"].script()
    assert all(r["fused"] for r in fa.fusion_report(fa.FuseAttention("llvm", prove=False)(before)))


def _num(t) -> float:
    """A closed z3 term (numbers, exp of numbers, arithmetic, If) as a float, with exp = math.exp."""
    import math
    t = z3.simplify(t)
    if z3.is_rational_value(t):
        return float(t.as_fraction())
    if z3.is_true(t) or z3.is_false(t):
        return z3.is_true(t)
    k, ch = t.decl().kind(), t.children()
    if k == z3.Z3_OP_UNINTERPRETED and t.decl().name() == "exp":
        return math.exp(_num(ch[0]))
    if k == z3.Z3_OP_ITE:
        return _num(ch[1]) if _num(ch[0]) else _num(ch[2])
    vals = [_num(c) for c in ch]
    ops = {z3.Z3_OP_ADD: sum, z3.Z3_OP_MUL: math.prod, z3.Z3_OP_DIV: lambda v: v[0] / v[1],
           z3.Z3_OP_SUB: lambda v: v[0] - sum(v[1:]), z3.Z3_OP_UMINUS: lambda v: -v[0],
           z3.Z3_OP_LE: lambda v: v[0] <= v[1], z3.Z3_OP_GE: lambda v: v[0] >= v[1],
           z3.Z3_OP_LT: lambda v: v[0] < v[1], z3.Z3_OP_GT: lambda v: v[0] > v[1], z3.Z3_OP_EQ: lambda v: v[0] == v[1],
           z3.Z3_OP_NOT: lambda v: not v[0], z3.Z3_OP_AND: all, z3.Z3_OP_OR: any}
    return ops[k](vals)


@pytest.mark.parametrize("model", [FlashAttentionModel, GenericAttentionModel])
def test_kernel_models_compute_attention_on_numbers(model):
    """The models on numbers (exp = math.exp) give causal GQA attention as numpy computes it: they are the
    kernels' algorithm, not only something the prover accepts."""
    from kiln.verify.symbolic import Evaluator
    rng = np.random.default_rng(0)
    q, k, v = rng.integers(-2, 3, (1, 3, 4, 2)), rng.integers(-2, 3, (1, 3, 2, 2)), rng.integers(-2, 3, (1, 3, 2, 2))
    z = [np.vectorize(lambda t: z3.RealVal(int(t)), otypes=[object])(a) for a in (q, k, v)]
    out = model(causal=True, scale=0.25, has_kpad=False)(Evaluator(), *z)
    got = np.vectorize(_num, otypes=[float])(out)
    qh, kh, vh = (a.transpose(0, 2, 1, 3).astype(float) for a in (q, np.repeat(k, 2, 2), np.repeat(v, 2, 2)))
    s = qh @ kh.transpose(0, 1, 3, 2) * 0.25 + np.where(np.tril(np.ones((3, 3))), 0, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(got, ((p / p.sum(-1, keepdims=True)) @ vh).transpose(0, 2, 1, 3), rtol=1e-12)
