"""The rule instance of an attention fusion: what decides the graph the attention pass matched and the kernel
it called, and the tiny Relax graph of that form (the left side of :mod:`.attention_proof`).

An :class:`AttentionRule` is read from a :class:`~kiln.relax_passes.attention_pattern.Match` by
:func:`attention_rule` (cheap: no z3), so that 24 layers of one model share one key and one proof. It keeps what
changes the proof: the pattern, the kernel, how the mask is applied (added, or a ``where`` fill; from which
parts: causal, a constant key bias, a runtime boolean key mask, a runtime additive key bias), the fill value
(``-inf`` or a finite one), GQA, torch's safe-softmax guard, the q/k/v/output layouts and the scale factors
(where they are applied, multiplied or divided). Shapes, dtype and the number of heads do not enter: the
rebuilt graph uses tiny ones (:func:`tiny_dims`), and casts are the identity in exact arithmetic.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["AttentionRule", "attention_rule", "tiny_dims", "build_left", "FINFO32_MIN"]

#: The finite fill value of the rebuilt masks (``torch.finfo(torch.float32).min``, what transformers uses).
FINFO32_MIN = float(np.finfo(np.float32).min)

_MASK_FORMS = ("none", "add_const", "add_where", "add_where_neg", "add_bias", "fill", "fill_neg")
_GQA_FORMS = ("repeat_kv", "broadcast")


@dataclass(frozen=True)
class AttentionRule:
    """One attention rule instance.

    Attributes
    ----------
    kernel : {"flash", "generic"}
        The sm_90a flash kernel (online softmax over key blocks) or the generic TE kernel (whole-row softmax).
    pattern : {"decomposed", "nn.attention"}
    mask : str
        How the graph applies the mask to the scores: ``none``; ``add_const`` (a constant tensor);
        ``add_where`` / ``add_where_neg`` (``where(keep, 0, neg)`` / ``where(masked, neg, 0)``); ``add_bias`` (a
        runtime float tensor); ``fill`` / ``fill_neg`` (``where(keep, scores, neg)`` / ``where(masked, neg,
        scores)``).
    causal, const_kpad, keep, bias : bool
        The parts of the mask: top-left causal, a constant key-padding part, a runtime boolean key mask, a
        runtime additive key bias (the pass's :class:`~kiln.relax_passes.attention_mask.MaskPlan`).
    neg_inf : bool
        The fill value of a ``where`` mask is ``-inf`` (else a finite value at or below ``NEG_THRESHOLD``).
    gqa : str
        How key/value heads are shared by query heads: ``""`` (they are not), ``"repeat_kv"`` (transformers'
        ``expand_dims`` + ``broadcast_to`` + ``reshape``), ``"broadcast"`` (one KV head broadcast over all
        query heads), or ``"<k form>/<v form>"`` when k and v differ.
    safe_softmax : bool
        torch's guard ``where(all keys -inf, 0, p)`` after the softmax.
    layouts : tuple of str
        ``bshd``/``bhsd`` of q, k, v and of the output.
    scale_ops : tuple
        ``(site, op, value)`` per scalar scale in the graph: ``site`` one of ``scores``, ``q``, ``k``; ``op``
        ``mul`` or ``div``.
    scale : float or None
        ``nn.attention``'s scale attribute (``None``: ``1/sqrt(D)``).
    causal_mask : str or None
        ``nn.attention``'s ``causal_mask`` attribute.
    """

    kernel: str
    pattern: str = "decomposed"
    mask: str = "none"
    causal: bool = False
    const_kpad: bool = False
    keep: bool = False
    bias: bool = False
    neg_inf: bool = False
    gqa: str = ""
    safe_softmax: bool = False
    layouts: tuple = ("bshd", "bshd", "bshd", "bshd")
    scale_ops: tuple = (("scores", "mul", 0.25),)
    scale: float | None = None
    causal_mask: str | None = None

    def __post_init__(self):
        if self.kernel not in ("flash", "generic"):
            raise ValueError(f"kernel must be 'flash' or 'generic', given {self.kernel!r}")
        if self.pattern not in ("decomposed", "nn.attention"):
            raise ValueError(f"pattern must be 'decomposed' or 'nn.attention', given {self.pattern!r}")
        if self.mask not in _MASK_FORMS:
            raise ValueError(f"mask must be one of {_MASK_FORMS}, given {self.mask!r}")
        if any(f not in _GQA_FORMS for f in self.gqa_forms()):
            raise ValueError(f"gqa must be '' or forms of {_GQA_FORMS} (k/v), given {self.gqa!r}")
        object.__setattr__(self, "layouts", tuple(self.layouts))
        object.__setattr__(self, "scale_ops", tuple(tuple(op) for op in self.scale_ops))

    def gqa_forms(self) -> tuple:
        """``(k form, v form)`` of the head sharing (``()`` without GQA)."""
        if not self.gqa:
            return ()
        parts = self.gqa.split("/")
        return (parts[0], parts[-1])

    def to_dict(self) -> dict:
        """JSON-able form (the attention pass's report records it)."""
        d = asdict(self)
        d["layouts"], d["scale_ops"] = list(self.layouts), [list(op) for op in self.scale_ops]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AttentionRule":
        return cls(**{**d, "layouts": tuple(d["layouts"]), "scale_ops": tuple(tuple(o) for o in d["scale_ops"])})

    def name(self) -> str:
        parts = [self.kernel, self.pattern, f"mask={self.mask}"]
        parts += [p for p in ("causal", "const_kpad", "keep", "bias", "safe_softmax") if getattr(self, p)]
        parts += [f"gqa={self.gqa}"] if self.gqa else []
        return " ".join(parts)


# ------------------------------------------------------------------------------------------ key from a match
def _operand_scales(g, start, base) -> list:
    """Scalar multiplies/divides met from a matmul operand back to the tensor the kernel reads."""
    from ..relax_passes.attention_pattern import op_name, scalar_of
    out, e = [], start
    for _ in range(64):
        if e.same_as(base):
            break
        val = g.val(e)
        if val is None or not getattr(val, "args", None):
            break
        op = op_name(val)
        if op in ("relax.multiply", "relax.divide"):
            c1 = scalar_of(val.args[1])
            c0 = scalar_of(val.args[0]) if op == "relax.multiply" else None
            if c1 is not None:
                out.append(("mul" if op == "relax.multiply" else "div", c1))
                e = val.args[0]
                continue
            if c0 is not None:
                out.append(("mul", c0))
                e = val.args[1]
                continue
            break
        e = val.args[0]
    return out[::-1]


def _share_form(g, start, base) -> str:
    """How the heads of a k/v operand are shared on the way from the matmul back to ``base``."""
    from ..relax_passes.attention_pattern import op_name, shape_of
    e = start
    for _ in range(64):
        if e.same_as(base):
            break
        val = g.val(e)
        if val is None or not getattr(val, "args", None):
            break
        if op_name(val) == "relax.reshape" and len(shape_of(val.args[0]) or ()) == 5:
            return "repeat_kv"
        e = val.args[0]
    return "broadcast"


def _gqa(g, m, qk, pv) -> str:
    if m.k.rep == 1:
        return ""
    fk, fv = _share_form(g, qk.args[1], m.k.base), _share_form(g, pv.args[1], m.v.base)
    return fk if fk == fv else f"{fk}/{fv}"


def _pv(g, m):
    """The ``P V`` matmul of a decomposed match: the first binding of its output chain, or its end."""
    from ..relax_passes.attention_pattern import op_name
    for v in [v for v, role in m.internal if role == "attention output"] + [m.end]:
        if op_name(g.value[v]) == "relax.matmul":
            return v
    raise ValueError(f"no P V matmul in the attention at {m.anchor}")


def _mask_form(m) -> str:
    if m.mask is None:
        return "none"
    if m.mask[0] == "fill":
        return "fill_neg" if m.mask[2] else "fill"
    src = m.plan.source
    if src.startswith("where(keep"):
        return "add_where"
    if src.startswith("where(masked"):
        return "add_where_neg"
    return "add_const" if src.startswith("constant") else "add_bias"


def attention_rule(g, m, kind: str) -> AttentionRule:
    """The rule instance of the checked match ``m`` (``m.plan`` set) in graph ``g`` on target kind ``kind``."""
    from ..relax_passes.attention_pattern import op_name, scalar_of
    plan = m.plan
    kernel = "flash" if kind == "cuda" else "generic"
    layouts = (m.q.layout, m.k.layout, m.v.layout, m.end_layout)
    if m.pattern == "nn.attention":
        attrs = g.value[m.anchor].attrs
        cm = None if attrs.causal_mask is None else str(attrs.causal_mask)
        return AttentionRule(kernel, "nn.attention", "none", causal=plan.causal, layouts=layouts, scale_ops=(),
                             scale=m.scale, causal_mask=cm)
    ops, qk = [], None
    for v, role in m.internal:            # the score chain, from the softmax input back to Q K^T
        val = g.value[v]
        if role != "scores":
            continue
        op = op_name(val)
        if op == "relax.matmul":
            qk = val
            ops = [("q", *o) for o in _operand_scales(g, val.args[0], m.q.base)] + \
                  [("k", *o) for o in _operand_scales(g, val.args[1], m.k.base)] + ops[::-1]
            break
        if op in ("relax.multiply", "relax.divide"):
            c = scalar_of(val.args[1])
            c = c if c is not None else scalar_of(val.args[0])
            ops.append(("scores", "mul" if op == "relax.multiply" else "div", c))
    form = _mask_form(m)
    filled = form in ("add_where", "add_where_neg", "fill", "fill_neg")       # a where mask with a fill value
    return AttentionRule(kernel, "decomposed", form, causal=plan.causal,
                         const_kpad=plan.kpad_const is not None, keep=bool(plan.keep_terms),
                         bias=bool(plan.bias_terms), gqa=_gqa(g, m, qk, g.value[_pv(g, m)]),
                         neg_inf=filled and plan.neg == float("-inf"),
                         safe_softmax=m.safe_softmax, layouts=layouts, scale_ops=tuple(ops))


# ------------------------------------------------------------------------------------------ the tiny left side
def tiny_dims(rule: AttentionRule) -> tuple:
    """``(B, Sq, Skv, Hq, Hkv, D)`` of the rebuilt instance: two batches when a key mask varies over the batch,
    two KV heads each read by two query heads with ``repeat_kv`` GQA (so ``h // group`` and ``h % group``
    differ; one KV head for a head broadcast), three queries and keys (two key blocks of 2, the second with a
    tail key), head dim 2."""
    B = 2 if (rule.const_kpad or rule.keep or rule.bias) else 1
    if "broadcast" in rule.gqa_forms():
        return B, 3, 3, 2, 1, 2
    return B, 3, 3, (4 if rule.gqa else 2), 2, 2


def _bhsd(bb, x, layout):
    from tvm import relax
    return x if layout == "bhsd" else bb.emit(relax.op.permute_dims(x, [0, 2, 1, 3]))


def _repeat_kv(bb, x, B, Hkv, rep, S, D):
    """transformers' ``repeat_kv``: ``[B, Hkv, S, D] -> [B, Hkv * rep, S, D]``."""
    from tvm import relax
    x = bb.emit(relax.op.expand_dims(x, [2]))
    x = bb.emit(relax.op.broadcast_to(x, (B, Hkv, rep, S, D)))
    return bb.emit(relax.op.reshape(x, (B, Hkv * rep, S, D)))


def _share_heads(bb, x, form, B, Hkv, Hq, S, D):
    from tvm import relax
    if form == "repeat_kv":
        return _repeat_kv(bb, x, B, Hkv, Hq // Hkv, S, D)
    return bb.emit(relax.op.broadcast_to(x, (B, Hq, S, D)))


def _scale(bb, x, op, value):
    from tvm import relax
    c = relax.const(value, "float32")
    return bb.emit(relax.op.multiply(x, c) if op == "mul" else relax.op.divide(x, c))


def _mask_parts(rule, B, Sq, Skv):
    """The constant boolean keep masks: causal ``[1, 1, Sq, Skv]`` (key ``j <= i``) and the constant key
    padding ``[B, 1, 1, Skv]`` (batch 1 loses its last key)."""
    causal = np.tril(np.ones((Sq, Skv), bool)).reshape(1, 1, Sq, Skv) if rule.causal else None
    kpad = None
    if rule.const_kpad:
        kpad = np.ones((B, 1, 1, Skv), bool)
        kpad[B - 1, 0, 0, Skv - 1] = False
    return causal, kpad


def _apply_mask(bb, rule, s, keep_rt, bias_rt, B, Sq, Skv):
    from tvm import relax
    if rule.mask == "none":
        return s
    if rule.mask == "add_bias":
        return bb.emit(relax.op.add(s, bias_rt))
    neg = float("-inf") if rule.neg_inf else FINFO32_MIN
    causal, kpad = _mask_parts(rule, B, Sq, Skv)
    if rule.mask == "add_const":       # finite key biases where kept (one non-zero), neg where masked
        keep = np.ones((B if kpad is not None else 1, 1, Sq, Skv), bool)
        for part in (causal, kpad):
            keep = keep & part if part is not None else keep
        vals = np.zeros(keep.shape, np.float32)
        vals[..., 0] = -0.5
        return bb.emit(relax.op.add(s, relax.const(np.where(keep, vals, np.float32(neg)).astype("float32"))))
    const = None                       # the constant parts, combined here (the pass evaluates them as one)
    for part in (causal, kpad):
        if part is not None:
            const = part if const is None else const & part
    if const is None and keep_rt is None:
        const = np.ones((1, 1, 1, Skv), bool)      # an all-true constant mask (BERT/ViT without padding)
    negc, zero = relax.const(neg, "float32"), relax.const(0.0, "float32")
    if rule.mask.endswith("_neg"):     # "masked" = ~keep: ~const | ~keep_rt
        masked = None if const is None else relax.const(~const)
        if keep_rt is not None:
            nk = bb.emit(relax.op.logical_not(keep_rt))
            masked = nk if masked is None else bb.emit(relax.op.logical_or(masked, nk))
        if rule.mask == "fill_neg":
            return bb.emit(relax.op.where(masked, negc, s))
        return bb.emit(relax.op.add(s, bb.emit(relax.op.where(masked, negc, zero))))
    cond = None if const is None else relax.const(const)
    if keep_rt is not None:
        cond = keep_rt if cond is None else bb.emit(relax.op.logical_and(cond, keep_rt))
    if rule.mask == "fill":
        return bb.emit(relax.op.where(cond, s, negc))
    return bb.emit(relax.op.add(s, bb.emit(relax.op.where(cond, zero, negc))))


def _safe_softmax(bb, s, p):
    """torch's guard: ``where(all(s == -inf, -1), 0, p)``, spelled as its decomposition reaches Relax."""
    from tvm import relax
    eq = bb.emit(relax.op.equal(s, relax.const(float("-inf"), "float32")))
    ne = bb.emit(relax.op.logical_not(eq))
    anyk = bb.emit(relax.op.max(bb.emit(relax.op.astype(ne, "int8")), axis=[-1], keepdims=True))
    allm = bb.emit(relax.op.logical_not(bb.emit(relax.op.astype(anyk, "bool"))))
    return bb.emit(relax.op.where(allm, relax.const(0.0, "float32"), p))


def build_left(rule: AttentionRule, dims: tuple | None = None):
    """The Relax function the attention pass matches for ``rule``, at ``dims`` (default :func:`tiny_dims`):
    parameters ``q, k, v`` (in their layouts), then ``keep`` (bool ``[B, 1, 1, Skv]``) and/or ``bias``
    (float32 ``[B, 1, 1, Skv]``) when the mask has those runtime parts."""
    from tvm import relax
    B, Sq, Skv, Hq, Hkv, D = dims or tiny_dims(rule)
    f32 = "float32"

    def shape(layout, S, H):
        return [B, S, H, D] if layout == "bshd" else [B, H, S, D]
    lq, lk, lv, lo = rule.layouts
    if rule.pattern == "nn.attention":
        lq = lk = lv = lo = "bshd"
    q = relax.Var("q", relax.TensorType(shape(lq, Sq, Hq), f32))
    k = relax.Var("k", relax.TensorType(shape(lk, Skv, Hkv), f32))
    v = relax.Var("v", relax.TensorType(shape(lv, Skv, Hkv), f32))
    params = [q, k, v]
    keep_rt = relax.Var("keep", relax.TensorType([B, 1, 1, Skv], "bool")) if rule.keep else None
    bias_rt = relax.Var("bias", relax.TensorType([B, 1, 1, Skv], f32)) if rule.bias else None
    params += [p for p in (keep_rt, bias_rt) if p is not None]
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            if rule.pattern == "nn.attention":
                out = bb.emit_output(relax.op.nn.attention(q, k, v, scale=rule.scale, causal_mask=rule.causal_mask))
            else:
                qh, kh, vh = _bhsd(bb, q, lq), _bhsd(bb, k, lk), _bhsd(bb, v, lv)
                for site, op, val in rule.scale_ops:
                    if site == "q":
                        qh = _scale(bb, qh, op, val)
                    elif site == "k":
                        kh = _scale(bb, kh, op, val)
                if rule.gqa:
                    fk, fv = rule.gqa_forms()
                    kh = _share_heads(bb, kh, fk, B, Hkv, Hq, Skv, D)
                    vh = _share_heads(bb, vh, fv, B, Hkv, Hq, Skv, D)
                s = bb.emit(relax.op.matmul(qh, bb.emit(relax.op.permute_dims(kh, [0, 1, 3, 2]))))
                for site, op, val in rule.scale_ops:
                    if site == "scores":
                        s = _scale(bb, s, op, val)
                s = _apply_mask(bb, rule, s, keep_rt, bias_rt, B, Sq, Skv)
                p = bb.emit(relax.op.nn.softmax(s, axis=-1))
                if rule.safe_softmax:
                    p = _safe_softmax(bb, s, p)
                o = bb.emit(relax.op.matmul(p, vh))
                out = bb.emit_output(o if lo == "bhsd" else relax.op.permute_dims(o, [0, 2, 1, 3]))
        bb.emit_func_output(out)
    return bb.get()
