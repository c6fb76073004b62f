"""Fuse attention -- ``softmax(Q K^T * scale + mask) V`` -- into one BSHD attention call.

The pass runs on the Relax graph after import/cleanup (after the GEMM pass on cuda) and **before**
``LegalizeOps``. Its three parts:

* **pattern** (:mod:`.attention_pattern`): anchored on ``nn.softmax`` whose input comes from a ``matmul``
  and whose output feeds one (anything else is not attention and not reported):

  - scores: ``matmul(q, k^T)`` then, in any order before the softmax, ``astype``, head-merge reshapes
    (``[B*H, S, S]`` <-> ``[B, H, S, S]``), no-op ``broadcast_to``, scale by a constant scalar (``multiply``
    or ``divide``; also on q and k, as torch's SDPA decomposition applies ``sqrt(scale)`` to both) and
    at most one mask: ``add(scores, mask)`` or a ``where`` masked-fill; the mask is read by
    :mod:`.attention_mask` (none / causal / key-padding bias);
  - probabilities: ``softmax`` -> ``astype`` / torch's safe-softmax guard (``where(all keys -inf, 0, p)``)
    / head-merge reshape -> ``matmul(p, v)`` -> ``astype`` / reshape / ``permute_dims`` up to the last
    ``[B, H, S, D]`` (BHSD) or ``[B, S, H, D]`` (BSHD) tensor in the input dtype (the replaced binding);
  - q, k, v are traced back through head-merge reshapes, no-op broadcasts, exact fp32 upcasts, scalar
    scales (q, k), ``permute_dims`` (composed) and GQA repeats (``repeat_kv``: ``expand_dims`` +
    ``broadcast_to`` + reshape, or a head broadcast) to a BSHD tensor (taken as is: the usual
    ``reshape(x, [B, S, H, D])`` before ``permute_dims([0, 2, 1, 3])``) or a BHSD one (e.g. a RoPE
    output: it gets a ``permute_dims([0, 2, 1, 3])``, which TVM's FuseOps fuses into its producer);
  - ``R.nn.attention`` (already BSHD) is matched too.

* **check** (:func:`_check_pattern`, :func:`_check`): softmax over the key axis; the scale a compile-time
  scalar; the mask causal (top-left) and/or a key bias ``[B, Skv]``, or none; static shapes; q/k/v of one
  float dtype and the output in it; value head dim = key head dim; ``Hq`` a multiple of ``Hkv``; no
  intermediate (scores, probabilities, the output before the replaced binding) with a consumer outside the
  pattern or returned by the function, all in one dataflow block; then the kernel's own check: on cuda
  :func:`kiln.schedules.attention_sm90.check_flash_attention_sm90` (fp16/bf16, head dim 64/128), elsewhere
  the generic kernel's (fp16/bf16/fp32, any head dim).

* **rewrite** (:class:`_Rewriter`): the replaced binding becomes
  ``call_tir(attn, [q_bshd, k_bshd, v_bshd, kpad?], [B, Sq, Hq, D])`` (+ ``permute_dims`` back when the
  graph wanted BHSD); the dead scores, mask and permutes are removed by DCE. Identical problems share one
  PrimFunc. Kernels: on **cuda** the sm_90a flash kernel (``kiln.rule = "kiln.attention_sm90"``, built with
  tirx, ``op_pattern`` opaque so FuseOps leaves it alone); if it declines, the graph stays as it was and the
  refusal is reported -- no fallback to the generic kernel, which dlight would schedule badly. On **every
  other target** the generic TE kernel of :mod:`.attention_te` (``kiln.rule = "kiln.attention_generic"``).

Numerics: the kernels compute scores, softmax and P V in fp32 and round once, where the fp16 graphs of
transformers round the scores and probabilities to fp16 in between: the fused result is the more accurate
one. Masked scores (``<= -1e4``) become ``-inf`` in the causal part; rows with every key masked differ (see
:mod:`.attention_mask`), those are padding queries.

Proof gate: each match's rule instance (:func:`kiln.verify.attention_rule.attention_rule`: pattern, kernel,
mask form and parts, GQA, safe-softmax guard, layouts, scale factors) is recorded as ``proof_rule``; with the
``prove_rewrites`` knob on (default) it must be proved with z3 first
(:func:`kiln.verify.attention_proof.prove_attention_rule`, cached per rule instance and process: a model with
24 layers proves once), else the match is refused with the reason.

What was fused and refused (with the reason) is the JSON string module attr ``kiln.attention_fusion``
(:func:`fusion_report`), also on the pass object as ``.report``; ``.timings`` has the pass's seconds.
"""
from __future__ import annotations

import json
import time

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant as _Constant
from tvm.relax.expr_functor import PyExprMutator, mutator

from . import drop_dead_code, proving, read_report, rewrite_functions, target_kind
from .attention_mask import ConstEvaluator, MaskRefused, analyse_mask
from .attention_pattern import (FLOATS, Graph, Match, Operand, Refused, build_graph, dtype_of, match_nn_attention,
                                match_softmax, name_of, op_name, shape_of)

__all__ = ["FuseAttention", "fusion_report", "report_note", "RULE_SM90", "RULE_GENERIC", "REPORT_ATTR"]

#: ``kiln.rule`` of the sm_90a flash kernel (set by :mod:`kiln.schedules.attention_sm90`).
RULE_SM90 = "kiln.attention_sm90"
#: ``kiln.rule`` of the generic TE kernel.
RULE_GENERIC = "kiln.attention_generic"
#: Module attr holding the JSON report of the pass.
REPORT_ATTR = "kiln.attention_fusion"
_OP_OPAQUE = 8  # relax OpPatternKind.kOpaque: FuseOps must not fuse anything into the kernel


# ------------------------------------------------------------------------------------------ check
def _check_pattern(g: Graph, ev: ConstEvaluator, m: Match) -> None:
    """Graph-level conditions (raise :class:`Refused`); fills ``m.plan``."""
    B, Sq, Skv, Hq, Hkv, D = m.dims
    for o in (m.k, m.v):
        if o.dim("b") != B:
            raise Refused(f"{o.role} batch {o.dim('b')} != q batch {B}")
        if o.dim("h") * o.rep != Hq:
            raise Refused(f"{o.role} has {o.dim('h')} heads x {o.rep} repeats, q has {Hq}")
    if (m.k.dim("h"), m.k.dim("s")) != (m.v.dim("h"), m.v.dim("s")):
        raise Refused(f"k heads/seq ({m.k.dim('h')}, {m.k.dim('s')}) != v ({m.v.dim('h')}, {m.v.dim('s')})")
    if m.k.dim("d") != D or m.v.dim("d") != D:
        raise Refused(f"head dims differ: q {D}, k {m.k.dim('d')}, v {m.v.dim('d')}")
    dts = {dtype_of(o.base) for o in (m.q, m.k, m.v)} | {dtype_of(m.end)}
    if len(dts) != 1 or m.dtype not in FLOATS:
        raise Refused(f"dtypes q/k/v/out {[dtype_of(o.base) for o in (m.q, m.k, m.v)] + [dtype_of(m.end)]}: one of "
                      f"{FLOATS} for all is needed")
    if m.pattern == "decomposed":
        xs = shape_of(g.value[m.anchor].args[0])
        if xs != (B, Hq, Sq, Skv):
            raise Refused(f"scores {list(xs)} are not [B, H, Sq, Skv] = {[B, Hq, Sq, Skv]}")
    inside = {v for v, _ in m.internal} | {m.end}
    for v, role in m.internal:
        users = g.users(v)
        outside = [u for u in users if u is None or u not in inside]
        if outside:
            what = "is a function output" if None in outside else \
                f"has a consumer outside the attention ({', '.join(name_of(u) for u in outside)})"
            raise Refused(f"{role} {name_of(v)} {what}")
        if g.block.get(v, -1) < 0 or g.block.get(v) != g.block.get(m.end):
            raise Refused(f"{name_of(v)} is not in the dataflow block of {name_of(m.end)}")
    if B is None and m.mask is not None:
        raise Refused("a mask with a dynamic batch is not supported yet (the mask analysis evaluates [B, ...] "
                      "constants)")
    try:
        m.plan = analyse_mask(g.value, ev, m.mask, B, Hq, Sq, Skv)
    except MaskRefused as e:
        raise Refused(f"mask: {e}") from None
    m.plan.causal = m.plan.causal or m.causal_attr
    m.plan.finish()


def _check(m: Match, kind: str) -> str | None:
    """Kernel-level conditions: ``None`` when the target's kernel takes the problem, else the reason.

    Before the mask is analysed (``m.plan`` unset) it declines only what the kernel declines whatever
    the mask, so that a refused problem costs no mask evaluation.
    """
    B, Sq, Skv, Hq, Hkv, D = m.dims
    if kind == "cuda":
        from ..schedules.attention_sm90 import check_flash_attention_sm90
        flags = [(m.plan.causal, m.plan.has_kpad)] if m.plan else [(c, p) for c in (False, True) for p in (False, True)]
        reasons = [check_flash_attention_sm90(B, Sq, Skv, Hq, Hkv, D, m.dtype, c, p) for c, p in flags]
        return None if None in reasons else f"sm_90a flash attention declines: {reasons[0]}"
    from .attention_te import GENERIC_DTYPES
    if B is None:
        return "dynamic batch: the generic kernel is built per static shape"
    if m.dtype not in GENERIC_DTYPES:
        return f"dtype {m.dtype} is not one of the generic kernel's {GENERIC_DTYPES}"
    return None


# ------------------------------------------------------------------------------------------ rewrite
def _kernel_key(m: Match, kind: str) -> tuple:
    """Identity of the kernel ``m`` needs: matches with equal keys share one PrimFunc."""
    scale = m.scale if m.scale is not None else 1.0 / float(np.sqrt(m.dims[5]))
    return (kind == "cuda", *m.dims, m.dtype, m.plan.causal, m.plan.has_kpad, round(scale, 12))


def _kernel(m: Match, kind: str):
    """``(base name, PrimFunc)`` of the kernel for ``m`` on ``kind``."""
    B, Sq, Skv, Hq, Hkv, D = m.dims
    causal, has_kpad = m.plan.causal, m.plan.has_kpad
    scale = m.scale if m.scale is not None else 1.0 / float(np.sqrt(D))
    if kind == "cuda":
        from ..schedules.attention_sm90 import make_flash_attention_sm90
        func = make_flash_attention_sm90(B, Sq, Skv, Hq, Hkv, D, m.dtype, causal, has_kpad, scale)
        name = str(func.attrs["global_symbol"])
        # kiln.target.cuda's TIR pipeline sends this function through TVM's "tirx" one
        func = func.with_attrs({"op_pattern": _OP_OPAQUE, "kiln.tir_pipeline": "tirx"})
    else:
        from .attention_te import make_attention_generic
        func = make_attention_generic(B, Sq, Skv, Hq, Hkv, D, m.dtype, causal, has_kpad, scale)
        dt = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}[m.dtype]
        name = (f"attention_generic_b{B}_q{Sq}_k{Skv}_h{Hq}x{Hkv}_d{D}_{dt}" + ("_causal" if causal else "")
                + ("_kpad" if has_kpad else ""))
        func = func.with_attrs({"kiln.rule": RULE_GENERIC, "op_pattern": _OP_OPAQUE})
    return name, func


@mutator
class _Rewriter(PyExprMutator):
    """Replace each match's end binding with the attention ``call_tir``."""

    def __init__(self, mod, plans: dict, blocks: dict):
        super().__init__(mod)
        self.plans = plans            # end var -> (Match, name, func, key)
        self.blocks = blocks          # end var -> dataflow block index (scopes the kpad cache)
        self.gvars: dict = {}
        self.kpad_cache: dict = {}

    def _gvar(self, name, func, key):
        if key not in self.gvars:
            self.gvars[key] = self.builder_.add_func(func.with_attr("global_symbol", name), name)
        return self.gvars[key]

    def _emit(self, expr):
        return self.builder_.emit(expr)

    def _bshd(self, o: Operand):
        x = self.visit_expr(o.base)
        return x if o.layout == "bshd" else self._emit(relax.op.permute_dims(x, [0, 2, 1, 3]))

    def _key_slice(self, expr):
        """``expr`` (key-shaped data, any rank <= 4) as ``[B|1, 1, 1, Skv|1]``."""
        x = self.visit_expr(expr)
        shp = shape_of(expr)
        if len(shp) < 4:
            x = self._emit(relax.op.reshape(x, (1,) * (4 - len(shp)) + tuple(shp)))
            shp = (1,) * (4 - len(shp)) + tuple(shp)
        if shp[1] != 1 or shp[2] != 1:
            x = self._emit(relax.op.strided_slice(x, [1, 2], [0, 0], [1, 1], assume_inbound=True))
        return x

    def _kpad(self, m: Match, block):
        B, Skv = m.dims[0], m.dims[2]
        plan = m.plan
        key = (block, tuple(plan.keep_terms), tuple(plan.bias_terms), plan.neg,
               None if plan.kpad_const is None else plan.kpad_const.tobytes())
        if key in self.kpad_cache:
            return self.kpad_cache[key]
        f32 = "float32"
        parts = []
        if plan.keep_terms:
            keep = None
            for expr, negated in plan.keep_terms:
                c = self._key_slice(expr)
                if negated:
                    c = self._emit(relax.op.logical_not(c))
                keep = c if keep is None else self._emit(relax.op.logical_and(keep, c))
            parts.append(self._emit(relax.op.where(keep, relax.const(0.0, f32), relax.const(plan.neg, f32))))
        for expr in plan.bias_terms:
            b = self._key_slice(expr)
            parts.append(b if dtype_of(expr) == f32 else self._emit(relax.op.astype(b, f32)))
        if plan.kpad_const is not None:
            const = relax.const(np.ascontiguousarray(plan.kpad_const, dtype=np.float32).reshape(B, 1, 1, Skv))
            parts.append(const)
        if len(parts) == 1 and isinstance(parts[0], _Constant):
            out = relax.const(np.ascontiguousarray(plan.kpad_const, dtype=np.float32))
        else:
            bias = parts[0]
            for p in parts[1:]:
                bias = self._emit(relax.op.add(bias, p))
            if shape_of(bias) != (B, 1, 1, Skv):
                bias = self._emit(relax.op.broadcast_to(bias, (B, 1, 1, Skv)))
            out = self._emit(relax.op.reshape(bias, (B, Skv)))
        self.kpad_cache[key] = out
        return out

    def visit_var_binding_(self, binding):
        plan = self.plans.get(binding.var)
        if plan is None:
            super().visit_var_binding_(binding)
            return
        m, name, func, key = plan
        B, Sq, Skv, Hq, Hkv, D = m.dims
        args = [self._bshd(m.q), self._bshd(m.k), self._bshd(m.v)]
        if m.plan.has_kpad:
            args.append(self._kpad(m, self.blocks.get(binding.var)))
        bdim = m.batch_expr if B is None else B
        call = relax.call_tir(self._gvar(name, func, key), args, relax.TensorType([bdim, Sq, Hq, D], m.dtype))
        if m.end_layout == "bhsd":
            call = relax.op.permute_dims(self._emit(call), [0, 2, 1, 3])
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(call)))


# ------------------------------------------------------------------------------------------ the pass
def _record(fname: str, m: Match | None, anchor) -> dict:
    rec = {"function": fname, "anchor": name_of(anchor)}
    if m is None or not m.dims:
        return rec
    B, Sq, Skv, Hq, Hkv, D = m.dims
    rec.update(pattern=m.pattern, B=B, Sq=Sq, Skv=Skv, Hq=Hq, Hkv=Hkv, D=D, dtype=m.dtype,
               scale=None if m.scale is None else round(m.scale, 9),
               layouts={o.role: o.layout for o in (m.q, m.k, m.v)} | {"out": m.end_layout})
    return rec


@tvm.transform.module_pass(opt_level=0, name="kiln.FuseAttention")
class FuseAttention:
    """Rewrite attention sub-graphs to one BSHD attention kernel call.

    Parameters
    ----------
    target_kind : str, optional
        ``"cuda"``: kiln's sm_90a flash kernel (problems it declines stay unfused, with the reason);
        any other kind: the generic TE kernel of :mod:`.attention_te`. Default: the current target
        (``llvm`` without one).
    prove : bool, optional
        Prove each rule instance with z3 (:func:`kiln.verify.symbolic.rule_refusal`) and refuse the matches
        whose proof does not succeed; default: the ``prove_rewrites`` knob (on).

    Attributes
    ----------
    report : list of dict
        One record per attention found: ``fused`` and the kernel, or the refusal ``reason``.
    timings : dict
        Seconds spent matching, evaluating constant masks, building kernels and rewriting.
    """

    def __init__(self, target_kind: str | None = None, prove: bool | None = None):
        self.target_kind = target_kind
        self.prove = prove            # None: the ``prove_rewrites`` knob
        proving(prove)                # z3 missing: a typed error now, not a RuntimeError mid-pass
        self.report: list[dict] = []
        self.timings: dict = {}
        self._proof_s = 0.0

    def _proving(self) -> bool:
        return proving(self.prove)

    def _gate(self, g, m, kind, rec) -> str | None:
        """Record the match's rule instance; with proving on, the refusal reason when it is not proved."""
        from ..verify.attention_rule import attention_rule
        rule = attention_rule(g, m, kind)
        rec["proof_rule"] = rule.to_dict()
        if not self._proving():
            return None
        from ..verify.symbolic import rule_refusal
        t0 = time.perf_counter()
        reason = rule_refusal("attention", rule)
        self._proof_s += time.perf_counter() - t0
        return reason

    def _matches(self, gv, func, kind, records, plans, names, blocks):
        g = build_graph(func)
        ev = ConstEvaluator(g.value)
        t_build = 0.0
        for var, val in list(g.value.items()):
            op = op_name(val)
            if op not in ("relax.nn.softmax", "relax.nn.attention"):
                continue
            m = None
            try:
                m = match_softmax(g, var) if op == "relax.nn.softmax" else match_nn_attention(g, var)
                if m is None:
                    continue
                reason = _check(m, kind)
                if reason is None:
                    _check_pattern(g, ev, m)
                    reason = _check(m, kind)
            except Refused as e:
                reason = str(e)
            rec = _record(gv.name_hint, m, var)
            if reason is None:
                reason = self._gate(g, m, kind, rec)
            if reason is None:
                key = _kernel_key(m, kind)
                if key not in names:
                    t0 = time.perf_counter()
                    base, pf = _kernel(m, kind)
                    t_build += time.perf_counter() - t0
                    taken, name, i = {n for n, _ in names.values()}, base, 1
                    while name in taken:   # same shape, other scale: a second PrimFunc
                        i += 1
                        name = f"{base}_{i}"
                    names[key] = (name, pf)
                name, pf = names[key]
                plans[m.end] = (m, name, pf, key)
                blocks[m.end] = g.block.get(m.end)
                rec.update(fused=True, kernel=name, rule=RULE_SM90 if kind == "cuda" else RULE_GENERIC,
                           causal=m.plan.causal, mask=m.plan.kind, mask_source=m.plan.source,
                           safe_softmax=m.safe_softmax, replaces=name_of(m.end))
                if m.plan.causal and (m.plan.keep_terms or m.plan.bias_terms):
                    rec["note"] = ("causal + runtime key padding: a query row whose keys j <= i are all padded "
                                   "(a left-padding position) averages V over j <= i instead of over all keys")
            else:
                rec.update(fused=False, reason=reason)
            records.append(rec)
        return ev, t_build

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        kind = target_kind(self.target_kind, "llvm")
        t0 = time.perf_counter()
        self._proof_s = 0.0
        records, plans, names, blocks = [], {}, {}, {}
        eval_s, build_s, evals = 0.0, 0.0, 0
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                ev, tb = self._matches(gv, func, kind, records, plans, names, blocks)
                eval_s, build_s, evals = eval_s + ev.seconds, build_s + tb, evals + ev.evaluations
        t1 = time.perf_counter()
        if plans:
            rw = _Rewriter(mod, plans, blocks)
            mod = drop_dead_code(rewrite_functions(rw, mod))
        self.report = records
        self.timings = {"total_s": round(time.perf_counter() - t0, 3),
                        "match_s": round(t1 - t0 - build_s - self._proof_s, 3), "proof_s": round(self._proof_s, 3),
                        "mask_eval_s": round(eval_s, 3), "mask_evaluations": evals,
                        "kernel_build_s": round(build_s, 3), "rewrite_s": round(time.perf_counter() - t1, 3)}
        return mod.with_attr(REPORT_ATTR, json.dumps(records))


def fusion_report(mod: tvm.IRModule) -> list[dict]:
    """The records :class:`FuseAttention` left on ``mod`` (``[]`` if it did not run)."""
    return read_report(mod, REPORT_ATTR)


def report_note(mod: tvm.IRModule) -> str | None:
    """One line for ``CompiledModel.notes`` / ``kiln inspect``: counts and each distinct refusal reason."""
    recs = fusion_report(mod)
    if not recs:
        return None
    fused = [r for r in recs if r.get("fused")]
    reasons: dict = {}
    for r in recs:
        if not r.get("fused"):
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    kernels = sorted({r["kernel"] for r in fused})
    text = f"attention fusion: {len(fused)}/{len(recs)} fused" + (f" ({', '.join(kernels)})" if kernels else "")
    if reasons:
        text += "; refused: " + "; ".join(f"{n}x {why}" for why, n in reasons.items())
    return text
