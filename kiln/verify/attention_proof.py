"""z3 proof of the attention fusion rule: the Relax sub-graph the attention pass matches computes what the fused
kernel computes, at tiny shapes, for one rule instance (:class:`~kiln.verify.attention_rule.AttentionRule`).

**Left side.** :func:`~kiln.verify.attention_rule.build_left` rebuilds the matched form (pattern, mask form and
parts, fill value, GQA by ``repeat_kv`` or a head broadcast, safe-softmax guard, layouts, scale factors) with
``B <= 2, Sq = Skv = 3, Hq <= 4, Hkv <= 2, D = 2``; :class:`~kiln.verify.symbolic.Evaluator` evaluates it
(softmax is ``exp(x - max) / sum(exp(x - max))``, ``nn.attention`` its definition).

**Right side.** :class:`~kiln.relax_passes.fuse_attention.FuseAttention` itself rewrites that graph (llvm, so
the rewrite's argument plumbing -- layouts, ``permute_dims``, the ``kpad`` it builds from the mask -- is the pass's
own output), and the ``call_tir`` of the kernel is evaluated by a model of the kernel the rule names:

* :class:`FlashAttentionModel` (``kernel="flash"``, :mod:`kiln.schedules.attention_sm90_kernel`) is the kernel's
  algorithm for one query row ``i`` of head ``h`` (KV head ``h // (Hq/Hkv)``), with query blocks of ``block_m``
  rows split into consumer slabs of ``slab`` rows and key blocks of ``block_n`` keys (here 2, 1, 2; the kernel's
  64/128, 64, 64..176): with ``c = scale * log2(e)``, ``m = -inf``, ``l = 0``, ``acc = 0``, for each key block
  ``n`` the kernel visits (causal: only blocks starting before the query block ends)::

      S_j = q_i . k_j                        (k_j = v_j = 0 past Skv: TMA zero fill)
      x_j = S_j c + clamp(kpad_j log2 e)     with a key bias (kpad past Skv is -inf), else S_j c
                                             (S_j when scale > 0, c applied after the max)
      x_j = -inf                             if the block needs a mask (tail block, or a causal block
                                             reaching past the slab's first row) and j > i (causal) or j >= Skv
      m' = max(m, max_j x_j);   u = m' if m' > -inf else 0
      alpha = 2^(m - u);   p_j = 2^(x_j - u);   l = l alpha + sum_j p_j;   acc = acc alpha + sum_j p_j v_j
      m = m'
    out_i = acc / l if l > 0 else 0

  (the overlapped schedule applies the same recurrence, the ``P V`` of a block one step later; each thread's
  partial ``l`` is rescaled by the quad's common ``alpha``, so their sum is this ``l``).

* :class:`GenericAttentionModel` (``kernel="generic"``, :mod:`kiln.relax_passes.attention_te`): scores
  ``S_j scale + kpad_j``, ``-inf`` above the diagonal when causal, ``max`` from TE's identity ``-FLT_MAX``,
  ``p_j = exp(x_j - max)``, ``out = sum p_j v_j / sum p_j`` (0 when the sum is 0).

**What "proved" means.** For every real assignment of the inputs (q, k, v, the runtime key bias; every boolean
assignment of a runtime key mask) satisfying the preconditions, every output element of the left side equals
the model's, where:

* arithmetic is exact over the reals; ``exp`` is an uninterpreted function with exactly these **axioms**:
  ``exp(t) > 0`` and ``exp(a) exp(b) = exp(a + b)`` (instantiated on the ``exp`` terms that occur, for pairs whose
  sum occurs: :func:`~kiln.verify.casesplit.exp_axioms`); the kernel's ``ex2`` is ``2^y = exp(y / log2 e)``
  (the axiom ``exp2(x log2 e) = exp(x)``); ``log2 e`` is the kernel's constant as a rational;
* **masking axiom**: ``-inf`` is a value (``exp(-inf) = 0``, ``max(x, -inf) = x``, IEEE), and a mask constant at
  or below ``NEG_THRESHOLD`` (-1e4: ``finfo.min``, -1e9, -65504...) is read as ``-inf`` on both sides, which
  is how the pass reads it (:mod:`kiln.relax_passes.attention_mask`). Justification: the masked score
  ``s + neg`` minus the row max is below -1e4 + (score spread), so its ``exp`` is below fp32's smallest
  subnormal (``exp(-104) < 2^-149``) and rounds to exactly 0 unless the unmasked scores of a row spread over
  ~1e4; the masked key then contributes exactly 0 to the sum and to ``P V``, as ``-inf`` does;
* **preconditions**: every query row keeps at least one key (a row whose every key is masked is a padding
  query: the graph gives a uniform average or NaN, the kernels 0 -- see :mod:`.attention_mask`); a runtime
  key bias ``b`` of the flash kernel satisfies ``b log2 e >= -FLT_MAX`` (the kernel clamps below that, which
  exact arithmetic cannot reproduce; fp32 rounds both to a masked key);
* the scale the kernel gets (the pass's float) equals the graph's product of scale constants to within
  ``2^-22`` relative (checked outside the solver, then the graph's exact value is used): the kernel's fp32
  constants (``scale``, ``scale * log2 e``) are roundings, like every other cast;
* ties are covered (``max(a, b) = If(a >= b, a, b)``; the case split puts ``a == b`` in a branch);
* the block sizes are the tiny ones above, the shapes the tiny ones; the CUDA code itself (fragments, shuffles,
  barriers, fp16 P) is covered by the GPU numerics tests, rounding by the llvm numerics tests;
* the proof starts from the mask as the pass classified it (causal, constant key bias, runtime key mask or bias:
  the rule's parts): how a model's own mask graph was read -- a constant mask evaluated and classified exactly,
  a runtime one accepted by its shape -- is :mod:`kiln.relax_passes.attention_mask`'s job and its tests'; casts
  (fp16 graphs) are not in the rule, being the identity in exact arithmetic.

**Method.** Per output row, :func:`~kiln.verify.casesplit.prove_by_cases` splits on the ``If`` conditions (every
max, every runtime mask bit), keeping the feasible branches, and hands each leaf, with the exp axioms
instantiated on its terms and ``exp`` removed by Ackermann's reduction, to z3; rows that are the same formula up
to a renaming of the inputs (other heads, other batches of a runtime mask) are proved once. A proof can fail: a
wrong model (no rescale, another scale, a causal off-by-one, the key bias read per query, the wrong KV head, a
skipped key block) gives ``failed`` with a counterexample (``tests/test_verify_attention.py``).
"""
from __future__ import annotations

import math
import time
from fractions import Fraction

import numpy as np
import z3

from ..schedules.attention_sm90_kernel import LOG2E     # the kernel's constant (log2 e folded into the scale)
from . import xreal as xr
from .attention_rule import AttentionRule, build_left, tiny_dims
from .casesplit import prove_by_cases, variables
from .symbolic import Evaluator, Proof, differ

__all__ = ["FlashAttentionModel", "GenericAttentionModel", "prove_attention_rule", "LOG2E", "FLT_MAX"]

FLT_MAX = 3.4028234663852886e38
_L = Fraction(LOG2E)          # one exact rational for log2(e) wherever the model uses it
_SCALE_RTOL = 2.0 ** -22


def _real(v) -> z3.ArithRef:
    return z3.RealVal(str(Fraction(v)) if isinstance(v, Fraction) else str(float(v)))


def _dot(a, b):
    out = a[0] * b[0]
    for x, y in zip(a[1:], b[1:]):
        out = out + x * y
    return out


class _Model:
    """Shared parts of the kernel models: head mapping, masks, key bias (steps a test may override)."""

    def __init__(self, causal: bool, scale, has_kpad: bool):
        self.causal, self.has_kpad = bool(causal), bool(has_kpad)
        self.scale = Fraction(scale)

    def kv_head(self, h: int, group: int) -> int:
        return h // group

    def causal_masked(self, i: int, j: int) -> bool:
        """Top-left causal: query ``i`` sees keys ``j <= i``."""
        return self.causal and j > i

    def key_bias(self, kpad, b: int, i: int, j: int):
        return kpad[b, j]


class GenericAttentionModel(_Model):
    """The generic TE kernel (:func:`kiln.relax_passes.attention_te.make_attention_generic`) over z3 terms."""

    def __call__(self, ev, q, k, v, kpad=None):
        B, Sq, Hq, D = q.shape
        Skv, Hkv = k.shape[1], k.shape[2]
        f, sc, lowest = ev.fn("exp"), _real(self.scale), _real(-FLT_MAX)
        out = np.empty(q.shape, dtype=object)
        for b, h, i in np.ndindex(B, Hq, Sq):
            g = self.kv_head(h, Hq // Hkv)
            xs = []
            for j in range(Skv):
                x = _dot(q[b, i, h], k[b, j, g]) * sc
                if kpad is not None:
                    x = xr.add(x, self.key_bias(kpad, b, i, j))
                xs.append(xr.NEG_INF if self.causal_masked(i, j) else x)
            mx = lowest                               # te.max starts from the lowest finite float
            for x in xs:
                mx = xr.maximum(mx, x)
            is_inf = xr.compare("==", mx, xr.NEG_INF)
            p = [xr.where(is_inf, z3.RealVal(0), xr.exp(f, xr.sub(x, mx))) for x in xs]
            total = p[0]
            for t in p[1:]:
                total = total + t
            for e in range(D):
                acc = _dot(p, [v[b, j, g, e] for j in range(Skv)])
                out[b, i, h, e] = z3.If(total > 0, acc / total, z3.RealVal(0))
        return out


class FlashAttentionModel(_Model):
    """The sm_90a flash kernel's online softmax (:func:`kiln.schedules.attention_sm90_kernel.build_attention_kernel`)
    over z3 terms, with query blocks of ``block_m`` rows, consumer slabs of ``slab`` rows, key blocks of
    ``block_n`` keys (the module docstring gives the algorithm)."""

    def __init__(self, causal: bool, scale, has_kpad: bool, block_m: int = 2, slab: int = 1, block_n: int = 2):
        super().__init__(causal, scale, has_kpad)
        self.block_m, self.slab, self.block_n = block_m, slab, block_n

    def ex2(self, f, y):
        """``2^y = exp(y / log2 e)``."""
        return xr.exp(f, xr.div(y, _real(_L)))

    def rescale(self, acc, alpha):
        return acc * alpha

    def kpad_log2(self, ev, kp):
        """``kpad * log2 e`` clamped to ``-FLT_MAX`` (``-inf`` stays ``-inf``); the precondition that the clamp
        does not act goes to ``ev.assumptions``."""
        if kp is xr.NEG_INF:
            return kp
        val = xr.val_of(kp) * _real(_L)
        fin = xr.fin_of(kp)
        floor = _real(-FLT_MAX)
        ev.assumptions.append(val >= floor if fin is True else z3.Implies(fin, val >= floor))
        return xr.make(fin, z3.If(val >= floor, val, floor))

    def __call__(self, ev, q, k, v, kpad=None):
        B, Sq, Hq, D = q.shape
        Skv, Hkv = k.shape[1], k.shape[2]
        BM, SL, BN = self.block_m, self.slab, self.block_n
        f = ev.fn("exp")
        sl2 = _real(self.scale * _L)
        prescale = self.has_kpad or not self.scale > 0
        tail = Skv % BN != 0 and not self.has_kpad
        zero = z3.RealVal(0)
        bias = {}
        if kpad is not None:
            for b, j in np.ndindex(B, Skv):
                bias[b, j] = self.kpad_log2(ev, kpad[b, j])
        out = np.empty(q.shape, dtype=object)
        for b, h, i in np.ndindex(B, Hq, Sq):
            g = self.kv_head(h, Hq // Hkv)
            m0 = (i // BM) * BM
            row0 = m0 + ((i - m0) // SL) * SL                  # first row of this consumer's slab
            n_tiles = -(-min(m0 + BM, Skv) // BN) if self.causal else -(-Skv // BN)
            m, l, acc = xr.NEG_INF, zero, [zero] * D
            for n in range(n_tiles):
                cols = range(n * BN, (n + 1) * BN)
                needs_mask = (tail and (n + 1) * BN > Skv) or (self.causal and (n + 1) * BN - 1 > row0)
                xs = []
                for j in cols:
                    s = _dot(q[b, i, h], k[b, j, g]) if j < Skv else zero
                    if self.has_kpad:
                        kb = xr.NEG_INF if j >= Skv else (self.key_bias(bias, b, i, j) if bias else zero)
                        x = xr.add(s * sl2, kb)
                    else:
                        x = s * sl2 if prescale else s
                    if needs_mask and ((tail and j >= Skv) or self.causal_masked(i, j)):
                        x = xr.NEG_INF
                    xs.append(x)
                mx = xs[0]
                for x in xs[1:]:
                    mx = xr.maximum(mx, x)
                m_new = xr.maximum(m, mx if prescale else xr.mul(mx, sl2))
                use = xr.where(xr.compare("==", m_new, xr.NEG_INF), zero, xr.val_of(m_new))
                alpha = self.ex2(f, xr.sub(m, use))
                m = m_new
                p = [self.ex2(f, xr.sub(x if prescale else xr.mul(x, sl2), use)) for x in xs]
                l = l * alpha + sum(p[1:], p[0])
                vs = [[v[b, j, g, e] if j < Skv else zero for j in cols] for e in range(D)]
                acc = [self.rescale(acc[e], alpha) + _dot(p, vs[e]) for e in range(D)]
            for e in range(D):
                out[b, i, h, e] = z3.If(l > 0, acc[e] / l, zero)
        return out


# ------------------------------------------------------------------------------------------ the proof
def _graph_scale(rule: AttentionRule, D: int) -> Fraction:
    """The scale the rebuilt graph applies, exactly (its fp32 constants read as the evaluator reads them)."""
    if rule.pattern == "nn.attention":
        return Fraction(str(float(rule.scale) if rule.scale is not None else 1.0 / math.sqrt(D)))
    out = Fraction(1)
    for _, op, val in rule.scale_ops:
        c = Fraction(str(float(np.float32(val))))
        out = out * c if op == "mul" else out / c
    return out


def _kernel_call(mod):
    """``(PrimFunc name, has_kpad)`` of the one attention ``call_tir`` in ``mod["main"]``."""
    import tvm
    from tvm import relax
    calls = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir":
            calls.append(e)
    relax.analysis.post_order_visit(mod["main"], visit)
    if len(calls) != 1:
        return None, False
    return calls[0].args[0].name_hint, len(calls[0].args[1].fields) == 4


def _pass_scale(before) -> float | None:
    """The scale the pass reads from ``before`` (its own pattern code)."""
    from ..relax_passes.attention_pattern import build_graph, match_nn_attention, match_softmax, op_name
    g = build_graph(before["main"])
    for var, val in g.value.items():
        op = op_name(val)
        if op == "relax.nn.softmax":
            return match_softmax(g, var).scale
        if op == "relax.nn.attention":
            return match_nn_attention(g, var).scale
    return None


def _canonical(goal, assumptions: list) -> str:
    """``goal`` and its assumptions with the variables renamed by first occurrence: rows that differ only in
    which inputs they read (other heads, other batches of a runtime mask) get one key and one proof."""
    f = z3.And(goal, *assumptions)
    vs = variables(f)
    fresh = [z3.Const(f"_v{i}", v.sort()) for i, v in enumerate(vs)]
    return z3.substitute(f, *zip(vs, fresh)).sexpr() if vs else f.sexpr()


def prove_attention_rule(rule: AttentionRule, model=None, timeout_ms: int = 20000) -> Proof:
    """Prove one attention rule instance (the module docstring says what that means).

    Parameters
    ----------
    rule : AttentionRule
    model : callable, optional
        ``model(causal=, scale=, has_kpad=)`` returning the kernel model; default :class:`FlashAttentionModel`
        or :class:`GenericAttentionModel` by ``rule.kernel`` (tests pass deliberately wrong ones).
    timeout_ms : int
        Per solver call.
    """
    from ..relax_passes.attention_mask import NEG_THRESHOLD
    from ..relax_passes.fuse_attention import FuseAttention, fusion_report
    t0 = time.perf_counter()
    B, Sq, Skv, Hq, Hkv, D = tiny_dims(rule)
    before = build_left(rule)
    after = FuseAttention("llvm", prove=False)(before)
    recs = fusion_report(after)
    if len(recs) != 1 or not recs[0].get("fused"):
        why = recs[0].get("reason") if recs else "no attention found"
        return Proof("failed", time.perf_counter() - t0, 0,
                     detail=f"the pass does not fuse the rebuilt instance: {why}")
    name, has_kpad = _kernel_call(after)
    exact, given = _graph_scale(rule, D), _pass_scale(before)
    given = given if given is not None else 1.0 / math.sqrt(D)
    scale = exact if abs(Fraction(given) - exact) <= _SCALE_RTOL * abs(exact) else Fraction(given)
    make = model or (FlashAttentionModel if rule.kernel == "flash" else GenericAttentionModel)
    kmodel = make(causal=recs[0]["causal"], scale=scale, has_kpad=has_kpad)
    ev_l = Evaluator(neg_threshold=NEG_THRESHOLD)
    ev_r = Evaluator(neg_threshold=NEG_THRESHOLD, kernels={name: lambda *a: kmodel(ev_r, *a)})
    ev_r.funcs = ev_l.funcs
    inputs = ev_l.symbols(before["main"])
    left = np.asarray(ev_l.run(before, inputs), dtype=object)
    right = np.asarray(ev_r.run(after, inputs), dtype=object)
    if left.shape != right.shape:
        return Proof("failed", time.perf_counter() - t0, 0, detail=f"output shapes {left.shape} vs {right.shape}")
    assumptions = ev_l.assumptions + ev_r.assumptions
    s = z3.Solver()
    s.add(*assumptions)
    if s.check() != z3.sat:
        return Proof("failed", time.perf_counter() - t0, left.size, detail="the preconditions are unsatisfiable")
    exp, cases, done = ev_l.fn("exp"), 0, set()
    rows = left.reshape(-1, left.shape[-1]), right.reshape(-1, right.shape[-1])
    for lrow, rrow in zip(*rows):
        goal = z3.Or([differ(z3, a, b_) for a, b_ in zip(lrow, rrow)])
        names = {str(v) for v in variables(goal)}
        relevant = [a for a in assumptions if {str(v) for v in variables(a)} & names]
        key = _canonical(goal, relevant)
        if key in done:
            continue
        done.add(key)
        res = prove_by_cases(goal, relevant, exp, timeout_ms=timeout_ms)
        cases += res["leaves"]
        if res["status"] != "proved":
            m = res["model"]
            cex = {} if m is None else {str(d): str(m[d]) for d in m.decls() if d.arity() == 0 and "!" not in str(d)}
            return Proof(res["status"], time.perf_counter() - t0, left.size, cex,
                         detail=f"{rule.name()}: {res['detail']}")
    note = "" if scale == Fraction(given) else f"; kernel scale {given!r} = the graph's to 2^-22"
    rows_n = left.size // left.shape[-1]
    return Proof("proved", time.perf_counter() - t0, left.size,
                 detail=f"{rule.name()}: {rows_n} rows ({len(done)} distinct), {cases} cases{note}")
