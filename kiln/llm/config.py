"""The decoder architecture kiln compiles, read from a transformers config (Llama, Qwen2, Mistral).

:class:`LLMConfig` is the one description of the architecture that the model definition
(:mod:`kiln.llm.model`), the weight loader (:mod:`kiln.llm.weights`) and the runtime read. It is built
from a transformers ``PretrainedConfig`` by :meth:`LLMConfig.from_hf`, which refuses every field whose
value kiln does not implement with an :class:`UnsupportedConfigError` naming it, instead of compiling
a model that silently computes something else.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import UnsupportedConfigError

__all__ = ["LLMConfig", "ARCHITECTURES", "ROPE_TYPES"]

#: transformers ``model_type`` values kiln compiles.
ARCHITECTURES = ("llama", "qwen2", "mistral")
#: RoPE variants whose frequencies do not depend on the sequence length (a table fixed at compile time).
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class LLMConfig:
    """A Llama-family decoder: embedding, N x [RMSNorm, attention, RMSNorm, SwiGLU MLP], RMSNorm, LM head.

    Attributes
    ----------
    arch : str
        ``"llama"``, ``"qwen2"`` or ``"mistral"`` (the transformers ``model_type``).
    vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim : int
        Shapes (grouped-query attention when ``num_kv_heads < num_heads``).
    rms_norm_eps : float
    qkv_bias, o_bias, mlp_bias : bool
        Biases of the q/k/v, output and MLP projections (Qwen2: q/k/v only).
    tie_word_embeddings : bool
        The LM head reuses the embedding matrix.
    rope_type : str
        One of :data:`ROPE_TYPES`.
    inv_freq : tuple of float
        RoPE inverse frequencies (``head_dim / 2`` values, as transformers computes them in float32).
    rope_scaling : float
        transformers' ``attention_scaling`` applied to cos/sin (1 except for yarn).
    eos_token_id : tuple of int
        End-of-sequence ids from the config (may be empty).
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    rope_type: str = "default"
    inv_freq: tuple = field(default=(), repr=False)
    rope_scaling: float = 1.0
    eos_token_id: tuple = ()

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def qkv_size(self) -> int:
        """Width of the fused q/k/v projection output."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def num_weight_elements(self) -> int:
        """Parameters the decode step reads (the LM head counted once even when tied)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        layer = h * self.qkv_size + self.num_heads * d * h + 2 * h * i + i * h + 2 * h
        return self.num_layers * layer + h + self.vocab_size * h

    def to_json(self) -> dict:
        d = asdict(self)
        d["inv_freq"] = list(self.inv_freq)
        d["eos_token_id"] = list(self.eos_token_id)
        return d

    @staticmethod
    def from_json(d: dict) -> "LLMConfig":
        d = dict(d)
        d["inv_freq"] = tuple(d.get("inv_freq", ()))
        d["eos_token_id"] = tuple(d.get("eos_token_id", ()))
        return LLMConfig(**d)

    @staticmethod
    def from_hf(hf_config, max_context: int | None = None) -> "LLMConfig":
        """Read a transformers ``LlamaConfig`` / ``Qwen2Config`` / ``MistralConfig``.

        Parameters
        ----------
        hf_config : transformers.PretrainedConfig
            The model's config (``model.config``).
        max_context : int, optional
            KV-cache length the model will be compiled for; a Mistral ``sliding_window`` at least this
            long is the same as full attention and is accepted.

        Returns
        -------
        LLMConfig

        Raises
        ------
        UnsupportedConfigError
            Naming the first field whose value kiln does not implement.
        """
        c = hf_config
        arch = getattr(c, "model_type", None)
        if arch not in ARCHITECTURES:
            raise UnsupportedConfigError("model_type", arch, f"kiln compiles {', '.join(ARCHITECTURES)}")
        act = getattr(c, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedConfigError("hidden_act", act, "the MLP is SwiGLU (silu(gate) * up)")
        heads, kv_heads = int(c.num_attention_heads), int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
        if heads % kv_heads:
            raise UnsupportedConfigError("num_key_value_heads", kv_heads,
                                         f"must divide num_attention_heads={heads}")
        head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // heads)
        if head_dim % 2:
            raise UnsupportedConfigError("head_dim", head_dim, "RoPE needs an even head dim")
        _check_attention_window(c, arch, max_context)
        partial = getattr(c, "partial_rotary_factor", 1.0)
        if partial not in (None, 1, 1.0):
            raise UnsupportedConfigError("partial_rotary_factor", partial, "only full-width RoPE is implemented")
        rope_type, inv_freq, scaling = _rope(c, head_dim)
        qkv_bias = arch == "qwen2" or bool(getattr(c, "attention_bias", False))
        eos = getattr(c, "eos_token_id", None)
        eos = () if eos is None else (tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),))
        return LLMConfig(
            arch=arch, vocab_size=int(c.vocab_size), hidden_size=int(c.hidden_size),
            intermediate_size=int(c.intermediate_size), num_layers=int(c.num_hidden_layers),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rms_norm_eps=float(c.rms_norm_eps),
            qkv_bias=qkv_bias, o_bias=arch == "llama" and bool(getattr(c, "attention_bias", False)),
            mlp_bias=arch == "llama" and bool(getattr(c, "mlp_bias", False)),
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            rope_type=rope_type, inv_freq=inv_freq, rope_scaling=scaling, eos_token_id=eos)


def _check_attention_window(c, arch: str, max_context: int | None) -> None:
    """Sliding-window attention is refused unless the window covers the whole compiled context."""
    window = getattr(c, "sliding_window", None)
    uses_window = window is not None and (arch != "qwen2" or bool(getattr(c, "use_sliding_window", False)))
    if uses_window and (max_context is None or int(window) < int(max_context)):
        raise UnsupportedConfigError(
            "sliding_window", window,
            f"sliding-window attention is not implemented; a window >= max_context (given {max_context}) "
            "equals full attention and is accepted")
    kinds = set(getattr(c, "layer_types", None) or ())
    if kinds - {"full_attention"} and uses_window:
        raise UnsupportedConfigError("layer_types", sorted(kinds), "only full_attention layers are implemented")


def _rope(c, head_dim: int) -> tuple[str, tuple, float]:
    """(rope_type, inv_freq, attention_scaling) exactly as transformers computes them."""
    import torch
    params = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise UnsupportedConfigError("rope_parameters.rope_type", rope_type,
                                     f"frequencies must not depend on the sequence length; supported: {ROPE_TYPES}")
    if rope_type == "default":
        theta = float(params.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        scaling = 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](c, None)
    inv = inv.float()
    if inv.numel() != head_dim // 2:
        raise UnsupportedConfigError("rope_parameters", params, f"gives {inv.numel()} frequencies for head_dim {head_dim}")
    return rope_type, tuple(float(v) for v in inv.tolist()), float(scaling)
