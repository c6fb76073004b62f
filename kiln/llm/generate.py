"""``kiln.llm.generate``: prefill, then one decode step per new token (greedy or sampled), stopping at EOS.

Token selection runs in torch on the logits the compiled functions return (on the device, no host copy per
step): greedy is ``argmax``; sampling applies ``temperature``, then ``top_k``, then ``top_p`` (the order
transformers uses) and draws with ``torch.multinomial`` from a ``torch.Generator`` seeded with ``seed``, so
a seed reproduces the tokens on the same device.
"""
from __future__ import annotations

import os

__all__ = ["generate", "select_next"]


def _session(model):
    from .build import CompiledLLM
    from .runtime import LLMSession
    if isinstance(model, LLMSession):
        return model
    if isinstance(model, CompiledLLM):
        return model.session()
    if isinstance(model, (str, os.PathLike)):
        from .artifact import load
        return load(os.fspath(model))
    raise TypeError(f"generate: expected a CompiledLLM, an LLMSession or an artifact path, given {type(model).__name__}")


def _prompt(prompt_ids):
    import torch
    ids = torch.as_tensor(prompt_ids)
    if ids.dim() == 1:
        ids = ids[None, :]
    if ids.dim() != 2 or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"prompt_ids must be integer token ids of shape [length] or [batch, length], "
                        f"given {ids.dtype} {tuple(ids.shape)}")
    return ids


def _check_sampling(temperature, top_k, top_p) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, given {temperature!r}")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, given {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, given {top_p!r}")


def select_next(logits, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator=None):
    """The next token of each row of ``logits [B, vocab]``: argmax, or a sample after temperature/top-k/top-p."""
    import torch
    if not do_sample:
        return torch.argmax(logits, dim=-1)
    x = logits.float() / temperature
    if top_k is not None and top_k < x.shape[-1]:
        kth = torch.topk(x, int(top_k), dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        cum = torch.softmax(sorted_x, dim=-1).cumsum(dim=-1)
        drop = cum > top_p
        drop[:, 1:] = drop[:, :-1].clone()     # keep the token that crosses top_p
        drop[:, 0] = False
        x = x.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(x, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def generate(model, prompt_ids, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             eos_token_id=None):
    """Generate ``max_new_tokens`` tokens after each prompt.

    Parameters
    ----------
    model : CompiledLLM, LLMSession or str
        A compiled model, a loaded session, or an artifact directory.
    prompt_ids : torch.Tensor, numpy array or list
        ``[batch, length]`` (or ``[length]``) integer token ids; all prompts of a batch have one length.
    max_new_tokens : int
        Tokens to generate per sequence (fewer if every sequence reached EOS).
    do_sample : bool
        Sample instead of greedy argmax.
    temperature, top_k, top_p :
        Sampling filters (ignored when ``do_sample`` is False).
    seed : int, optional
        Seeds the sampling generator (reproducible tokens); ``None`` draws from torch's global RNG.
    eos_token_id : int or list of int, optional
        Stop a sequence at any of these ids; later positions of a stopped sequence repeat its EOS id.

    Returns
    -------
    torch.Tensor
        ``[batch, length + generated]`` int64 on the CPU: the prompts followed by the new tokens.

    Raises
    ------
    ContextLengthError
        The prompt plus ``max_new_tokens`` does not fit the compiled KV cache.
    BatchSizeError
        No decode function was compiled for this batch size.
    """
    import torch
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, given {max_new_tokens!r}")
    if do_sample:
        _check_sampling(temperature, top_k, top_p)
    sess = _session(model)
    ids = _prompt(prompt_ids)
    b, n = ids.shape
    sess.check(b, n, max_new_tokens)
    dev = sess.torch_device
    gen = None
    if do_sample and seed is not None:
        gen = torch.Generator(device=dev).manual_seed(int(seed))
    eos = None
    if eos_token_id is not None:
        eos = torch.as_tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    last = torch.zeros(b, dtype=torch.int64, device=dev)
    new = []
    logits = sess.prefill(ids)
    for step in range(max_new_tokens):
        tok = select_next(logits, do_sample, temperature, top_k, top_p, gen)
        if eos is not None:
            tok = torch.where(done, last, tok)
            done = done | torch.isin(tok, eos)
            last = tok
        new.append(tok)
        if step == max_new_tokens - 1 or (eos is not None and bool(done.all())):
            break
        logits = sess.decode(tok, check=False)
    return torch.cat([ids.to(torch.int64).cpu(), torch.stack(new, dim=1).cpu()], dim=1)
