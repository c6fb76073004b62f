"""Small random Llama-family configs shared by the kiln.llm and megakernel tests."""
import torch


def llama_config(**kw):
    """A 2-layer, 64-wide LlamaConfig (GQA 4/2) with eager attention; ``kw`` overrides any field."""
    from transformers import LlamaConfig
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, vocab_size=500, max_position_embeddings=256)
    base.update(kw)
    cfg = LlamaConfig(**base)
    cfg._attn_implementation = "eager"
    return cfg


def random_biases(model, std=0.3):
    """Give every bias a random value: freshly built models have zero biases, which would hide a bias bug."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, std)
    return model
