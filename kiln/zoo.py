"""Built-in example models: transformers configs with random weights, plus a plain-torch ResNet-50.

Nothing is downloaded: every model is built from a config and initialised from ``seed``. ``size="tiny"``
models are narrow enough to compile for llvm in a few seconds; ``size="full"`` gives the real
architecture shapes (BERT-Large, GPT-2 small, Llama-3.2-1B, ViT-B/16, ResNet-50).

GPT-2 and Llama are deliberately run *without* an ``attention_mask``: that is the transformers-5
causal-mask path that emits bool ``cumsum``/``eq`` (fixed by ``LegalizeBoolArith``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import UnknownModelError

__all__ = ["ZooModel", "names", "get"]


@dataclass
class ZooModel:
    """A ready-to-export model with example inputs.

    Attributes
    ----------
    name : str
        Zoo name (``"bert"``, ...).
    model : torch.nn.Module
        The model, in eval mode.
    example_inputs : tuple
        Positional example inputs for ``model.forward``.
    dynamic_shapes : object or None
        ``torch.export`` dynamic_shapes for ``example_inputs`` (symbolic batch, and seq for text models).
    description : str
        One line describing the architecture and size.
    """

    name: str
    model: torch.nn.Module
    example_inputs: tuple
    dynamic_shapes: object | None
    description: str


# ---------------------------------------------------------------------------------------------
# ResNet-50 in plain torch (torchvision is not a dependency).
# ---------------------------------------------------------------------------------------------
class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 (Bottleneck blocks [3, 4, 6, 3]); ``base`` is the stem width (64 in the real model)."""

    def __init__(self, base: int = 64, num_classes: int = 1000, layers=(3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, cin = [], base
        for i, n in enumerate(layers):
            width = base * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(_Bottleneck(cin, width, stride=2 if (j == 0 and i > 0) else 1))
                cin = width * _Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, pixel_values):
        x = self.maxpool(self.relu(self.bn1(self.conv1(pixel_values))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    # Fresh BatchNorm stats are mean 0 / var 1, which makes the folded affine a no-op and hides
    # numeric bugs; give them random (but sane) running statistics instead.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


# ---------------------------------------------------------------------------------------------
# Builders: (size, batch, seq, gen) -> (model, example_inputs, dynamic_shapes, description)
# ---------------------------------------------------------------------------------------------
def _text_dims(max_batch: int, max_seq: int) -> dict:
    # Example inputs of size 1 are fine: import_torch widens them for export (torch specialises 0/1).
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    seq = torch.export.Dim("seq", min=1, max=max_seq)
    return {0: batch, 1: seq}


def _ids(gen, batch, seq, vocab):
    return torch.randint(0, vocab, (batch, seq), generator=gen, dtype=torch.int64)


def _bert(size, batch, seq, gen):
    from transformers import BertConfig, BertModel
    if size == "full":
        cfg = BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    else:
        cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                         vocab_size=1000, max_position_embeddings=256)
    cfg._attn_implementation = "eager"
    seq = seq or 128
    model = BertModel(cfg, add_pooling_layer=True)
    # BertModel builds the all-ones attention_mask itself when none is given, so input_ids suffice.
    return (model, (_ids(gen, batch, seq, cfg.vocab_size),),
            {"input_ids": _text_dims(64, cfg.max_position_embeddings)},
            f"BertModel ({size}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, seq {seq})")


def _gpt2(size, batch, seq, gen):
    from transformers import GPT2Config, GPT2LMHeadModel
    if size == "full":
        cfg = GPT2Config(use_cache=False)
    else:
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=256, use_cache=False,
                         bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    seq = seq or (128 if size == "full" else 32)
    model = GPT2LMHeadModel(cfg)
    return (model, (_ids(gen, batch, seq, cfg.vocab_size),),
            {"input_ids": _text_dims(64, cfg.n_positions)},
            f"GPT2LMHeadModel ({size}: {cfg.n_layer} layers, hidden {cfg.n_embd}, seq {seq}, no attention_mask)")


def _llama(size, batch, seq, gen):
    from transformers import LlamaConfig, LlamaForCausalLM
    if size == "full":  # Llama-3.2-1B shapes
        cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                          intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
                          rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                          tie_word_embeddings=True, use_cache=False)
    else:  # GQA (4 query heads over 2 kv heads) kept on purpose
        cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=1000, max_position_embeddings=256, use_cache=False)
    cfg._attn_implementation = "eager"
    seq = seq or (128 if size == "full" else 32)
    model = LlamaForCausalLM(cfg)
    return (model, (_ids(gen, batch, seq, cfg.vocab_size),),
            {"input_ids": _text_dims(64, min(cfg.max_position_embeddings, 4096))},
            f"LlamaForCausalLM ({size}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
            f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, seq {seq}, no attention_mask)")


def _vit(size, batch, seq, gen):
    from transformers import ViTConfig, ViTModel
    if size == "full":  # ViT-B/16, 224x224
        cfg = ViTConfig()
    else:
        cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        image_size=32, patch_size=8)
    cfg._attn_implementation = "eager"
    model = ViTModel(cfg)
    px = torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=gen)
    return (model, (px,), {"pixel_values": {0: torch.export.Dim("batch", min=1, max=64)}},
            f"ViTModel ({size}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
            f"{cfg.image_size}x{cfg.image_size}/{cfg.patch_size})")


def _resnet50(size, batch, seq, gen):
    base, classes, image = (64, 1000, 224) if size == "full" else (4, 10, 32)
    model = ResNet50(base=base, num_classes=classes)
    _randomize_bn(model, gen)
    px = torch.randn(batch, 3, image, image, generator=gen)
    return (model, (px,), {"pixel_values": {0: torch.export.Dim("batch", min=1, max=64)}},
            f"ResNet-50 ({size}: stem width {base}, {image}x{image}, {classes} classes)")


_BUILDERS: dict[str, Callable] = {"bert": _bert, "gpt2": _gpt2, "llama": _llama, "vit": _vit, "resnet50": _resnet50}


def names() -> list[str]:
    """Names of the built-in models, in a stable order."""
    return list(_BUILDERS)


def get(name: str, size: str = "tiny", batch: int = 1, seq: int | None = None, dtype=None,
        seed: int = 0) -> ZooModel:
    """Build a zoo model with random weights.

    Parameters
    ----------
    name : str
        One of :func:`names`.
    size : {"tiny", "full"}
        ``tiny`` compiles on CPU in seconds; ``full`` has the real architecture's shapes.
    batch : int
        Batch of the example inputs.
    seq : int, optional
        Sequence length of text models (default 128 for BERT and full models, 32 for tiny GPT-2/Llama).
        Ignored by vision models.
    dtype : str or torch.dtype, optional
        Cast floating weights, buffers and example inputs to this dtype (``None`` keeps float32).
    seed : int
        Seeds the weights and the example inputs.

    Returns
    -------
    ZooModel

    Raises
    ------
    UnknownModelError
        ``name`` or ``size`` is not known.
    """
    if name not in _BUILDERS:
        raise UnknownModelError(f"unknown zoo model {name!r}; expected one of {names()}")
    if size not in ("tiny", "full"):
        raise UnknownModelError(f"unknown zoo size {size!r}; expected 'tiny' or 'full'")
    gen = torch.Generator().manual_seed(seed)
    with _seeded(seed):
        model, inputs, dyn, desc = _BUILDERS[name](size, batch, seq, gen)
    model = model.eval()
    if dtype is not None:
        tdt = _torch_dtype(dtype)
        model = model.to(tdt)
        inputs = tuple(x.to(tdt) if x.is_floating_point() else x for x in inputs)
    return ZooModel(name, model, inputs, copy.copy(dyn), desc)


class _seeded:
    """Seed torch's global RNG (weight init uses it) and restore the previous state afterwards."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        torch.random.set_rng_state(self.state)


def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[str(dtype)]
    except KeyError:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, given {dtype!r}") from None
