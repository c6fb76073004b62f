"""transformers ``state_dict`` -> the weights of :class:`kiln.llm.model.Decoder`, in its parameter order.

What changes on the way: q/k/v (and gate/up) rows are concatenated so each is one GEMM; weights are cast to
the compile dtype; fp8 layers are quantised to e4m3 with one float32 scale per output channel
(``scale = max|W[n, :]| / 448``, the e4m3 maximum); the RoPE cos/sin tables are computed as transformers
computes them (float32 ``position * inv_freq``, times ``attention_scaling``). The work runs in torch on the
tensors' own device, so a model already on the GPU is converted there.
"""
from __future__ import annotations

from ..errors import KilnError
from .config import LLMConfig

__all__ = ["E4M3_MAX", "quantize_fp8", "rope_tables", "build_params"]

#: Largest finite float8_e4m3fn value.
E4M3_MAX = 448.0
_TORCH_DTYPES = ("float32", "float16", "bfloat16")


def _tdt(name: str):
    import torch
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def quantize_fp8(w):
    """Per-output-channel e4m3 quantisation of ``w [out, in]``: ``(w8, scale)`` with ``w ~= w8 * scale[:, None]``."""
    import torch
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / E4M3_MAX).clamp(min=1e-12)
    w8 = (w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return w8, scale.to(torch.float32)


def rope_tables(cfg: LLMConfig, max_context: int, device=None):
    """``cos, sin [max_context, head_dim / 2] float32``, as transformers' rotary embedding computes them."""
    import torch
    inv = torch.tensor(cfg.inv_freq, dtype=torch.float32, device=device)
    freqs = torch.arange(max_context, device=device).float()[:, None] * inv[None, :]
    return (freqs.cos() * cfg.rope_scaling).contiguous(), (freqs.sin() * cfg.rope_scaling).contiguous()


class _Sources:
    """Name lookup in a transformers state dict, with one error listing what is missing."""

    def __init__(self, state_dict):
        self.sd = dict(state_dict)

    def get(self, name: str):
        if name not in self.sd:
            near = sorted(k for k in self.sd if k.rsplit(".", 2)[0] == name.rsplit(".", 2)[0])[:6]
            raise KilnError(f"state_dict has no {name!r}" + (f" (same module: {near})" if near else ""))
        return self.sd[name].detach()


def build_params(spec, state_dict, expected: list) -> list:
    """The decoder's weights in parameter order.

    Parameters
    ----------
    spec : kiln.llm.model.ModelSpec
    state_dict : dict of str -> torch.Tensor
        A transformers ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``MistralForCausalLM`` state dict.
    expected : list of (name, shape, dtype)
        The exported parameters (:func:`kiln.llm.model.export`).

    Returns
    -------
    list of torch.Tensor

    Raises
    ------
    KilnError
        A tensor is missing from the state dict, or has another shape than the config implies.
    """
    import torch
    c, dt = spec.config, _tdt(spec.dtype)
    src = _Sources(state_dict)
    out: dict = {}

    def linear(name: str, w, b=None):
        if spec.weight_format == "fp8":
            out[f"{name}.weight"], out[f"{name}.weight_scale"] = quantize_fp8(w)
        else:
            out[f"{name}.weight"] = w.to(dt)
        if b is not None:
            out[f"{name}.bias"] = b.to(dt)

    embed = src.get("model.embed_tokens.weight")
    out["model.embed_tokens.weight"] = embed.to(dt)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = src.get(p + "input_layernorm.weight").to(dt)
        out[p + "post_attention_layernorm.weight"] = src.get(p + "post_attention_layernorm.weight").to(dt)
        qkv = [src.get(f"{p}self_attn.{n}_proj.weight") for n in "qkv"]
        qkv_b = torch.cat([src.get(f"{p}self_attn.{n}_proj.bias") for n in "qkv"]) if c.qkv_bias else None
        linear(p + "self_attn.qkv_proj", torch.cat(qkv), qkv_b)
        linear(p + "self_attn.o_proj", src.get(p + "self_attn.o_proj.weight"),
               src.get(p + "self_attn.o_proj.bias") if c.o_bias else None)
        gate_up = torch.cat([src.get(p + "mlp.gate_proj.weight"), src.get(p + "mlp.up_proj.weight")])
        gate_up_b = (torch.cat([src.get(p + "mlp.gate_proj.bias"), src.get(p + "mlp.up_proj.bias")])
                     if c.mlp_bias else None)
        linear(p + "mlp.gate_up_proj", gate_up, gate_up_b)
        linear(p + "mlp.down_proj", src.get(p + "mlp.down_proj.weight"),
               src.get(p + "mlp.down_proj.bias") if c.mlp_bias else None)
    out["model.norm.weight"] = src.get("model.norm.weight").to(dt)
    if any(name.startswith("lm_head.") for name, _, _ in expected):
        head = embed if c.tie_word_embeddings else src.get("lm_head.weight")
        linear("lm_head", head)
    out["rope_cos"], out["rope_sin"] = rope_tables(c, spec.max_context, device=embed.device)
    return _in_order(out, expected)


def _in_order(out: dict, expected: list) -> list:
    names = [n for n, _, _ in expected]
    if set(out) != set(names):
        raise KilnError(f"weight set mismatch: built but not a parameter {sorted(set(out) - set(names))}, "
                        f"parameter not built {sorted(set(names) - set(out))}")
    params = []
    for name, shape, dtype in expected:
        t = out[name].contiguous()
        got = str(t.dtype).replace("torch.", "")
        if tuple(t.shape) != tuple(shape) or got != dtype:
            raise KilnError(f"weight {name}: the config implies {dtype}{list(shape)}, the state_dict gives "
                            f"{got}{list(t.shape)}")
        params.append(t)
    return params
