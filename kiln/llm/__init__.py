"""kiln's LLM path: Llama-family decoders (Llama 2/3, Qwen2, Mistral) compiled to one artifact with a
``prefill`` function and static-shape ``decode_b{B}`` functions over a static KV cache.

>>> llm = kiln.llm.compile(hf_model, target="cuda", dtype="float16", max_context=4096, decode_batches=(1, 8))
>>> tokens = kiln.llm.generate(llm, prompt_ids, max_new_tokens=64)              # greedy
>>> tokens = kiln.llm.generate(llm, prompt_ids, 64, do_sample=True, top_p=0.9, seed=0)
>>> llm.export("out/llama")
>>> session = kiln.llm.load("out/llama")                                        # runtime only

See the kiln.llm section of ``benchmarks/NOTES.md`` for the design (why a static cache, what is captured by CUDA graphs, the
kernels) and what is not done yet.
"""
from __future__ import annotations

from .artifact import load
from .build import CompiledLLM, compile
from .config import ARCHITECTURES, ROPE_TYPES, LLMConfig
from .errors import BatchSizeError, ContextLengthError, UnsupportedConfigError
from .generate import generate, select_next
from .model import WEIGHT_FORMATS, ModelSpec
from .runtime import LLMSession

__all__ = [
    "compile", "generate", "load", "select_next", "CompiledLLM", "LLMSession", "LLMConfig", "ModelSpec",
    "ARCHITECTURES", "ROPE_TYPES", "WEIGHT_FORMATS",
    "UnsupportedConfigError", "ContextLengthError", "BatchSizeError",
]
