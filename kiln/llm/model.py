"""The Llama-family decoder as a ``tvm.relax.frontend.nn`` module: the one definition of the architecture.

:class:`Decoder` mirrors transformers' ``LlamaForCausalLM`` (and Qwen2 / Mistral, which differ only in
config fields that :class:`~kiln.llm.config.LLMConfig` carries) and exports two kinds of Relax functions
over a static KV cache (``[layers, 2, batch, kv_heads, max_context, head_dim]``):

* ``prefill(ids [batch, n] int32, cache)`` -> logits of the last position ``[batch, vocab] float32``; the
  prompt's K/V are written to positions ``0..n-1``. ``batch`` and ``n`` are symbolic.
* ``decode_b{B}(ids [B, 1] int32, pos [B] int32, cache)`` -> ``[B, vocab] float32``: one token per
  sequence at position ``pos[b]``, static shapes (CUDA-graph capturable; ``pos`` is data, not a shape).

Per layer both run the sequence the later megakernel pass matches:
``rms_norm -> qkv (one GEMM, q|k|v concatenated) -> kiln_rope_kv_append (RoPE of q and k, k/v written to
the cache in place) -> attention -> o_proj (+ residual) -> rms_norm -> gate_up (one GEMM) -> silu(gate) * up -> down
(+ residual)``, then ``rms_norm -> lm_head``. Attention is ``kiln_decode_attn_partial`` +
``kiln_decode_attn_merge`` in decode and Relax matmul/softmax over the cache prefix in prefill.

Linear layers are ``matmul(x, permute_dims(W), out_dtype=float32) [+ bias] -> astype [+ residual]`` (what
kiln's GEMM/GEMV epilogue pass matches; fp32 accumulation as cuBLAS does). fp8 layers hold e4m3 weights and
a float32 scale per output channel: on cuda, decode-sized ones call kiln's sm_90a GEMV directly (fp8 is not a
Relax matmul form that pass matches); the others compute ``(x @ float(W)^T) * scale`` in one TensorIR
function (``kiln_fp8_linear``: the dequantisation happens inside the reduction).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import tvm
from tvm import relax, te
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from . import kernels as K
from .config import LLMConfig
from .kernels import OP_PATTERN_OPAQUE

__all__ = ["ModelSpec", "Decoder", "WEIGHT_FORMATS", "FP8_DTYPE", "export", "cache_shape", "e4m3_to_float32"]

#: ``"native"``: weights in the activation dtype. ``"fp8"``: e4m3 weights + float32 per-channel scales.
WEIGHT_FORMATS = ("native", "fp8")
FP8_DTYPE = "float8_e4m3fn"


@dataclass(frozen=True)
class ModelSpec:
    """What one compiled decoder is: architecture, dtype, weight format, cache length, decode batches.

    Attributes
    ----------
    config : LLMConfig
    dtype : str
        Activation (and native weight) dtype: ``float32``, ``float16`` or ``bfloat16``.
    weight_format : str
        One of :data:`WEIGHT_FORMATS`.
    max_context : int
        KV-cache length (prompt + generated tokens per sequence).
    decode_batches : tuple of int
        One static ``decode_b{B}`` function per batch size.
    gpu : bool
        Build the GPU kernels (thread-bound) rather than the CPU ones.
    attn_splits : dict
        Decode-attention KV splits per batch size.
    megakernel : tuple of int
        Batch sizes that also have ``decode_b{B}_mk``: the whole step as one persistent kernel
        (``kiln.llm.compile(..., megakernel=True)``; :mod:`kiln.relax_passes.megakernel`).
    """

    config: LLMConfig
    dtype: str
    weight_format: str
    max_context: int
    decode_batches: tuple
    gpu: bool
    attn_splits: dict
    megakernel: tuple = ()

    def entry_names(self) -> list[str]:
        return (["prefill"] + [f"decode_b{b}" for b in self.decode_batches]
                + [f"decode_b{b}_mk" for b in self.megakernel])


def _ph(shape, dtype):
    return nn.Tensor.placeholder(list(shape), dtype)


def _out_astype(y, dtype):
    return y if dtype == "float32" else op.astype(y, dtype)


class _Linear(nn.Module):
    """``y = x W^T (+ b) (+ residual)``, accumulated in float32 and rounded once to ``dtype``.

    ``logits=True`` (the LM head) returns float32 values of the ``dtype``-rounded result, as transformers'
    fp16 models produce fp16 logits: the matmul -> astype(dtype) chain is the form kiln's GEMV/GEMM epilogue
    pass takes over (the head is the largest single weight of a small model)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: str, logits: bool = False):
        super().__init__()
        self.weight = nn.Parameter((out_features, in_features), dtype)
        self.bias = nn.Parameter((out_features,), dtype) if bias else None
        self.dtype, self.logits = dtype, logits

    def forward(self, x, residual=None):
        y = op.matmul(x, op.permute_dims(self.weight), out_dtype="float32")
        if self.bias is not None:
            y = y + _out_astype_f32(self.bias)
        y = _out_astype(y, self.dtype)
        if residual is not None:
            y = residual + y
        return _out_astype_f32(y) if self.logits else y


def _out_astype_f32(t):
    return t if t.dtype == "float32" else op.astype(t, "float32")


def e4m3_to_float32(v):
    """float8_e4m3fn -> float32 from the bits. The CPU build uses it because TVM 0.27's LLVM lowering of the
    cast is wrong for zero and the subnormals (0x00 -> 2^-7); the CUDA build uses the hardware conversion."""
    b = tvm.tirx.reinterpret("uint8", v).astype("int32")
    e = (b >> 3) & 15
    m = (b & 7).astype("float32")
    normal = (m * tvm.tirx.const(0.125, "float32") + tvm.tirx.const(1.0, "float32")) * tvm.tirx.reinterpret(
        "float32", (e + 120) << 23)                                   # (1 + m/8) * 2^(e - 7)
    mag = tvm.tirx.Select(e == 0, m * tvm.tirx.const(2.0 ** -9, "float32"), normal)
    return tvm.tirx.Select((b >> 7) == 1, -mag, mag)


def _fp8_linear_te(x, w, scale, *bias, out_dtype: str, native_cast: bool):
    """TE: ``(sum_k float(x[..., k]) * float(w[n, k])) * scale[n] (+ bias[n])`` -> ``out_dtype``."""
    *lead, kdim = x.shape
    n = w.shape[0]
    k = te.reduce_axis((0, kdim), name="k")
    wf = (lambda v: v.astype("float32")) if native_cast else e4m3_to_float32
    acc = te.compute((*lead, n), lambda *i: te.sum(x[(*i[:-1], k)].astype("float32") * wf(w[i[-1], k]), axis=k),
                     name="fp8_matmul")

    def epilogue(*i):
        v = acc[i] * scale[i[-1]]
        if bias:
            v = v + bias[0][i[-1]].astype("float32")
        return v.astype(out_dtype)
    return te.compute((*lead, n), epilogue, name="fp8_scale")


class _FP8Linear(nn.Module):
    """e4m3 weight ``[out, in]`` with a float32 scale per output channel.

    cuda, static rows <= ``GEMV_MAX_M`` (decode): kiln's sm_90a GEMV (``kiln.schedules.gemv_sm90``, fp8
    weights converted in registers, scale / bias / residual in its epilogue). Otherwise (prefill, CPU, larger
    batches): ``kiln_fp8_linear``, a TensorIR reduction that converts each weight inside the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: str, logits: bool = False,
                 gpu: bool = False):
        super().__init__()
        self.gpu = gpu
        self.weight = nn.Parameter((out_features, in_features), FP8_DTYPE)
        self.weight_scale = nn.Parameter((out_features,), "float32")
        self.bias = nn.Parameter((out_features,), dtype) if bias else None
        self.dtype, self.logits = dtype, logits

    def forward(self, x, residual=None):
        gemv = self._gemv(x, residual) if self.gpu else None
        if gemv is not None:
            return _out_astype_f32(gemv) if self.logits else gemv
        args = [x, self.weight, self.weight_scale] + ([self.bias] if self.bias is not None else [])
        y = op.tensor_expr_op(lambda *a: _fp8_linear_te(*a, out_dtype=self.dtype, native_cast=self.gpu),
                              "kiln_fp8_linear", args)
        if residual is not None:
            y = residual + y
        return _out_astype_f32(y) if self.logits else y

    def _gemv(self, x, residual):
        """The sm_90a GEMV call for a static ``x`` of at most ``GEMV_MAX_M`` rows, else ``None``."""
        from ..relax_passes.fuse_gemm_epilogue import GEMV_MAX_M
        lead = [int(d) if isinstance(d, (int, tvm.tirx.IntImm)) else None for d in x.shape[:-1]]
        if None in lead:
            return None
        M, (N, K) = math.prod(lead), (int(d) for d in self.weight.shape)
        if M > GEMV_MAX_M:
            return None
        stages = (("bias",) if self.bias is not None else ()) + (("residual",) if residual is not None else ())
        func = _gemv_kernel(M, N, K, self.dtype, tuple((s,) for s in stages))
        if func is None:
            return None
        args = [op.reshape(x, [M, K]), self.weight, self.weight_scale]
        args += [self.bias] if self.bias is not None else []
        args += [op.reshape(residual, [M, N])] if residual is not None else []
        y = op.tensor_ir_op(func, str(func.attrs["global_symbol"]), args, out=_ph([M, N], self.dtype))
        return op.reshape(y, [*lead, N])


@functools.lru_cache(maxsize=None)
def _gemv_kernel(M: int, N: int, K: int, dtype: str, stages: tuple):
    """kiln's fp8 decode GEMV PrimFunc (attrs as kiln's GEMM epilogue pass sets them), ``None`` when the
    kernel declines the problem (e.g. float32 activations)."""
    from ..relax_passes.fuse_gemm_epilogue import GEMV_RULE_NAME
    from ..schedules.gemm_sm90 import Epilogue
    from ..schedules.gemv_sm90 import make_gemv_sm90
    epi = Epilogue(stages)
    try:
        func = make_gemv_sm90(M, N, K, dtype, FP8_DTYPE, epi)
    except NotImplementedError:
        return None
    name = f"gemv_sm90_{M}x{N}x{K}_{dtype}_fp8_{epi.name().replace('+', '_').replace('.', 'p')}"
    return func.with_attrs({"global_symbol": name, "kiln.rule": GEMV_RULE_NAME, "op_pattern": OP_PATTERN_OPAQUE,
                            "kiln.tir_pipeline": "tirx", "kiln.config_source": "heuristic"})


def _linear(spec: ModelSpec, in_f: int, out_f: int, bias: bool, logits: bool = False) -> nn.Module:
    if spec.weight_format == "fp8":
        return _FP8Linear(in_f, out_f, bias, spec.dtype, logits, gpu=spec.gpu)
    return _Linear(in_f, out_f, bias, spec.dtype, logits)


class _RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: str):
        super().__init__()
        self.weight = nn.Parameter((size,), dtype)
        self.eps = eps

    def forward(self, x):
        return op.rms_norm(x, self.weight, axes=[-1], epsilon=self.eps)


class _Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        c = spec.config
        self.qkv_proj = _linear(spec, c.hidden_size, c.qkv_size, c.qkv_bias)
        self.o_proj = _linear(spec, c.num_heads * c.head_dim, c.hidden_size, c.o_bias)


class _MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        c = spec.config
        self.gate_up_proj = _linear(spec, c.hidden_size, 2 * c.intermediate_size, c.mlp_bias)
        self.down_proj = _linear(spec, c.intermediate_size, c.hidden_size, c.mlp_bias)

    def forward(self, x, residual=None):
        gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(op.silu(gate) * up, residual=residual)


class _Layer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        c = spec.config
        self.input_layernorm = _RMSNorm(c.hidden_size, c.rms_norm_eps, spec.dtype)
        self.self_attn = _Attention(spec)
        self.post_attention_layernorm = _RMSNorm(c.hidden_size, c.rms_norm_eps, spec.dtype)
        self.mlp = _MLP(spec)


class _Embedding(nn.Module):
    def __init__(self, vocab: int, size: int, dtype: str):
        super().__init__()
        self.weight = nn.Parameter((vocab, size), dtype)


class _Backbone(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        c = spec.config
        self.embed_tokens = _Embedding(c.vocab_size, c.hidden_size, spec.dtype)
        self.layers = nn.ModuleList([_Layer(spec) for _ in range(c.num_layers)])
        self.norm = _RMSNorm(c.hidden_size, c.rms_norm_eps, spec.dtype)


class Decoder(nn.Module):
    """Llama-family causal LM over kiln's static KV cache. Parameter names follow transformers', except the
    fused ``qkv_proj`` (q|k|v rows) and ``gate_up_proj`` (gate|up rows) and the RoPE tables ``rope_cos`` /
    ``rope_sin`` ``[max_context, head_dim/2] float32``; :mod:`kiln.llm.weights` builds them."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        c = spec.config
        self.spec = spec
        self.model = _Backbone(spec)
        tied = c.tie_word_embeddings and spec.weight_format == "native"
        self.lm_head = None if tied else _linear(spec, c.hidden_size, c.vocab_size, False, logits=True)
        self.rope_cos = nn.Parameter((spec.max_context, c.head_dim // 2), "float32")
        self.rope_sin = nn.Parameter((spec.max_context, c.head_dim // 2), "float32")
        self._kernels = _kernels(spec)
        for b in spec.decode_batches:
            setattr(self, f"decode_b{b}", self._decode_for(b))

    # ----------------------------------------------------------------------------------- pieces
    def _embed(self, ids):
        b, n = ids.shape
        flat = op.reshape(ids, [b * n])
        # "clip" rather than nn.op.take's "fast": an out-of-range id must not read outside the table
        x = op.wrap_nested(relax.op.take(self.model.embed_tokens.weight._expr, flat._expr, axis=0, mode="clip"),
                           "embed")
        return op.reshape(x, [b, n, self.spec.config.hidden_size])

    def _logits(self, x):
        """``x [B, hidden]`` (the last position of each sequence) -> ``[B, vocab] float32``."""
        x = self.model.norm(x)
        if self.lm_head is None:   # tied: the same matmul -> astype chain as _Linear(logits=True)
            y = op.matmul(x, op.permute_dims(self.model.embed_tokens.weight), out_dtype="float32")
            return _out_astype_f32(_out_astype(y, self.spec.dtype))
        return self.lm_head(x)

    def _qkv_rope_append(self, i, layer, h, pos2d, cache):
        c = self.spec.config
        b, n = h.shape[0], h.shape[1]
        qkv = layer.self_attn.qkv_proj(layer.input_layernorm(h))
        cache, q = op.tensor_ir_inplace_op(
            self._kernels["rope_kv_append"], "kiln_rope_kv_append",
            [cache, qkv, self.rope_cos, self.rope_sin, pos2d, _i64(i)], inplace_indices=[0, -1],
            out=[_ph(cache.shape, cache.dtype), _ph([b, n, c.num_heads, c.head_dim], self.spec.dtype)])
        return q, cache

    def _block_tail(self, layer, x, attn):
        x = layer.self_attn.o_proj(attn, residual=x)
        return layer.mlp(layer.post_attention_layernorm(x), residual=x)

    def _prefill_attention(self, i, q, cache):
        """Causal attention of the ``n`` prompt positions over the cache prefix ``0..n-1`` (Relax ops)."""
        c, dt = self.spec.config, self.spec.dtype
        b, n = q.shape[0], q.shape[1]
        G, KVH, D = c.group_size, c.num_kv_heads, c.head_dim
        k, v = op.tensor_ir_op(self._kernels["kv_read"], "kiln_kv_read", [cache, _i64(i)],
                               out=[_ph([b, KVH, n, D], dt), _ph([b, KVH, n, D], dt)])
        qg = op.reshape(op.permute_dims(q, [0, 2, 1, 3]), [b, KVH, G * n, D])  # rows r = g * n + position
        s = op.matmul(qg, op.permute_dims(k, [0, 1, 3, 2]), out_dtype="float32")
        s = op.multiply(s, nn.Tensor.from_const(_f32(1.0 / math.sqrt(D))))
        s = op.tensor_expr_op(_causal_mask_te, "kiln_causal_mask", [s])
        p = _out_astype(op.softmax(s, axis=-1), dt)
        o = _out_astype(op.matmul(p, v, out_dtype="float32"), dt)        # [b, KVH, G*n, D]
        o = op.permute_dims(op.reshape(o, [b, c.num_heads, n, D]), [0, 2, 1, 3])
        return op.reshape(o, [b, n, c.num_heads * D])

    def _decode_attention(self, i, q, pos, cache, splits):
        c, dt, k = self.spec.config, self.spec.dtype, self._kernels
        b = q.shape[0]
        q3 = op.reshape(q, [b, c.num_heads, c.head_dim])
        o_part, ml = op.tensor_ir_op(
            k[f"attn_partial_{splits}"], f"kiln_decode_attn_partial_s{splits}", [q3, cache, pos, _i64(i)],
            out=[_ph([b, c.num_heads, splits, c.head_dim], "float32"), _ph([b, c.num_heads, splits, 2], "float32")])
        o = op.tensor_ir_op(k[f"attn_merge_{splits}"], f"kiln_decode_attn_merge_s{splits}", [o_part, ml],
                            out=_ph([b, c.num_heads, c.head_dim], dt))
        return op.reshape(o, [b, 1, c.num_heads * c.head_dim])

    # ----------------------------------------------------------------------------------- entry points
    def prefill(self, ids, cache):
        """``ids [batch, n] int32``, ``cache`` -> logits of position ``n - 1``, ``[batch, vocab] float32``."""
        x = self._embed(ids)
        pos2d = op.tensor_expr_op(_positions_te, "kiln_positions", [ids])
        for i, layer in enumerate(self.model.layers):
            q, cache = self._qkv_rope_append(i, layer, x, pos2d, cache)
            x = self._block_tail(layer, x, self._prefill_attention(i, q, cache))
        last = op.tensor_expr_op(_last_position_te, "kiln_last_position", [x])
        return self._logits(last)

    def _decode_for(self, batch: int):
        splits = self.spec.attn_splits[batch]

        def decode(ids, pos, cache):
            """``ids [B, 1] int32``, ``pos [B] int32`` (position of the new token), ``cache`` -> ``[B, vocab]``."""
            x = self._embed(ids)
            pos2d = op.reshape(pos, [batch, 1])
            for i, layer in enumerate(self.model.layers):
                q, cache = self._qkv_rope_append(i, layer, x, pos2d, cache)
                x = self._block_tail(layer, x, self._decode_attention(i, q, pos, cache, splits))
            return self._logits(op.reshape(x, [batch, self.spec.config.hidden_size]))
        return decode


def _i64(v: int):
    return tvm.tirx.IntImm("int64", v)


def _f32(v: float):
    import numpy as np
    return np.array(v, dtype="float32")


def _positions_te(ids):
    return te.compute(ids.shape, lambda b, n: n.astype("int32"), name="positions")


def _last_position_te(x):
    b, n, h = x.shape
    return te.compute((b, h), lambda i, j: x[i, n - 1, j], name="last_position")


def _causal_mask_te(s):
    """``s [B, KVH, G*n, n]``: row ``r`` is query position ``r % n``; keys after it get the float32 minimum."""
    n = s.shape[3]
    low = tvm.tirx.min_value("float32")
    return te.compute(s.shape, lambda b, h, r, j: tvm.tirx.Select(j <= r % n, s[b, h, r, j], low), name="causal_mask")


def _kernels(spec: ModelSpec) -> dict:
    """The TensorIR kernels one export needs (decode attention once per distinct split count)."""
    from .decode_attention import decode_attention_gpu, merge_attention_gpu
    c, C, dt, gpu = spec.config, spec.max_context, spec.dtype, spec.gpu
    ks = {
        "rope_kv_append": K.rope_kv_append(c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, C, dt, gpu),
        "kv_read": K.kv_read(c.num_layers, c.num_kv_heads, c.head_dim, C, dt, gpu),
    }
    for s in sorted(set(spec.attn_splits.values())):
        if gpu:
            ks[f"attn_partial_{s}"] = decode_attention_gpu(c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, C, dt, s)
            ks[f"attn_merge_{s}"] = merge_attention_gpu(c.num_heads, c.head_dim, dt, s)
        else:
            ks[f"attn_partial_{s}"] = K.decode_attention_cpu(c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim,
                                                             C, dt, s)
            ks[f"attn_merge_{s}"] = K.merge_attention_cpu(c.num_heads, c.head_dim, dt, s)
    return ks


def cache_shape(spec: ModelSpec, batch) -> list:
    c = spec.config
    return [c.num_layers, 2, batch, c.num_kv_heads, spec.max_context, c.head_dim]


def export(spec: ModelSpec):
    """Export :class:`Decoder` to an IRModule with ``prefill`` and ``decode_b{B}`` functions.

    Returns
    -------
    (tvm.IRModule, list of (str, tuple, str))
        The module (each function: inputs, then the weights in order, attr ``num_input``) and each weight's
        (name, shape, dtype) in that order.
    """
    model = Decoder(spec)
    dt = spec.dtype
    none = {"param_mode": "plain", "effect_mode": "none"}
    mspec = {"prefill": {"ids": nn.spec.Tensor(["batch", "n"], "int32"),
                         "cache": nn.spec.Tensor(cache_shape(spec, "batch"), dt), "$": none}}
    for b in spec.decode_batches:
        mspec[f"decode_b{b}"] = {"ids": nn.spec.Tensor([b, 1], "int32"), "pos": nn.spec.Tensor([b], "int32"),
                                 "cache": nn.spec.Tensor(cache_shape(spec, b), dt), "$": none}
    mod, named = model.export_tvm(spec=mspec)
    return mod, [(name, tuple(int(d) for d in p.shape), str(p.dtype)) for name, p in named]
