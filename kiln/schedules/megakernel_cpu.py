"""A numpy executor of the megakernel's task graph (:mod:`kiln.schedules.megakernel`) with simulated workers.

Each simulated worker runs its task list in order; before a task it waits until every declared counter
``(c, n)`` holds ``counters[c] >= n``; after it, it increments its signals. Which runnable worker moves next is
chosen by a policy:

* ``"random"`` (with a seed): any runnable worker, uniformly -- many seeds explore many interleavings;
* ``"ahead"``: the runnable worker whose next task is the latest in global order (workers drift apart as far
  as the counters allow);
* ``"in_order"``: the lowest-numbered runnable worker.

Activation buffers are poisoned with NaN at the start of every step, so a task that runs before the data it
reads was written produces NaN (or, for the cache, a wrong value) instead of a lucky right answer. At the end
of a step every counter must equal its declared total; the executor then zeroes them for the next step (on the
GPU the decode function zeroes them before each launch). The task arithmetic is kiln.llm's decode (``kiln/llm/model.py``, ``kernels.py``): float32
accumulation, rounding to the activation dtype where the layer-by-layer graph rounds, the base-2 online
softmax of the split-KV attention.
"""
from __future__ import annotations

import math

import numpy as np

from .megakernel import TaskGraph

__all__ = ["Deadlock", "execute_step", "round_to", "POLICIES"]

POLICIES = ("random", "ahead", "in_order")
_NEG_INF = -1.0e30
_LOG2E = math.log2(math.e)


class Deadlock(RuntimeError):
    """No worker can run its next task and not every task has run (a wait that is never satisfied)."""


def round_to(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a`` (float32) rounded to ``dtype`` and back: what storing a value in that dtype does."""
    if dtype == "float32":
        return np.asarray(a, np.float32)
    if dtype == "float16":
        return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        import ml_dtypes
        return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
    raise ValueError(f"round_to: dtype {dtype!r} is not float32/float16/bfloat16")


class _State:
    """The step's tensors as float32 numpy arrays (weights, cache, activations) plus ids/pos."""

    def __init__(self, graph: TaskGraph, weights: dict, cache: np.ndarray, ids, pos):
        self.g, self.s = graph, graph.shape
        self.w = weights
        self.cache = cache
        self.ids = np.asarray(ids, np.int64).reshape(-1)
        self.pos = np.asarray(pos, np.int64).reshape(-1)
        self.buf = {}
        for name, b in graph.buffers.items():
            if b.role in ("activation", "output"):
                self.buf[name] = np.full(b.shape, np.nan, np.float32)

    def rnd(self, a):
        return round_to(a, self.s.dtype)

    def weight(self, name: str, first: int | None = None, rows: int | None = None) -> np.ndarray:
        w = self.w[name]
        return w if first is None else w[first:first + rows]

    def rms(self, x: np.ndarray, wname: str) -> np.ndarray:
        """kiln.llm's rms_norm: float32 ``x * rsqrt(mean(x^2) + eps) * w``, rounded to the dtype."""
        r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32) + np.float32(self.s.eps))
        return self.rnd(x * r.astype(np.float32) * self.w[wname])

    def linear(self, kind: str, layer: int, x: np.ndarray, first: int, rows: int) -> np.ndarray:
        """float32 ``x @ W[first:first+rows]^T`` (* fp8 scale) (+ bias), rounded to the dtype."""
        prefix, _, _, bias = self.s.linear(kind, layer)
        acc = x @ self.weight(prefix + ".weight", first, rows).T
        if self.s.weight_format == "fp8":
            acc = acc * self.weight(prefix + ".weight_scale", first, rows)
        if bias:
            acc = acc + self.weight(prefix + ".bias", first, rows)
        return self.rnd(acc.astype(np.float32))


# ------------------------------------------------------------------------------------------ task kinds
def _embed(st: _State, t):
    (b,) = t.index
    row = int(np.clip(st.ids[b], 0, st.s.vocab - 1))
    st.buf["x0"][b] = st.w["model.embed_tokens.weight"][row]


def _qkv(st: _State, t):
    first, rows = t.index
    x = st.rms(st.buf[f"x{t.layer}"], f"model.layers.{t.layer}.input_layernorm.weight")
    st.buf[f"qkv{t.layer}"][:, first:first + rows] = st.linear("qkv", t.layer, x, first, rows)


def _rope(st: _State, v: np.ndarray, p: int) -> np.ndarray:
    """transformers' ``v * cos + rotate_half(v) * sin`` at position ``p`` (float32), rounded to the dtype."""
    half = v.shape[-1] // 2
    cos, sin = st.w["rope_cos"][p], st.w["rope_sin"][p]
    lo, hi = v[..., :half], v[..., half:]
    return st.rnd(np.concatenate([lo * cos - hi * sin, hi * cos + lo * sin], axis=-1))


def _attn(st: _State, t):
    s, layer = st.s, t.layer
    b, k, sp = t.index
    D, G, H, KVH, S, C = s.head_dim, s.group, s.num_heads, s.num_kv_heads, st.g.splits, st.g.max_context
    qkv = st.buf[f"qkv{layer}"][b]
    p = int(np.clip(st.pos[b], 0, C - 1))
    q = _rope(st, qkv[k * G * D:(k + 1) * G * D].reshape(G, D), p)
    k_new = _rope(st, qkv[(H + k) * D:(H + k + 1) * D], p)
    v_new = qkv[(H + KVH + k) * D:(H + KVH + k + 1) * D]
    length = p + 1
    chunk = -(-length // S)
    start, end = sp * chunk, min(sp * chunk + chunk, length)
    o_part, ml_part = st.buf[f"attn_o{layer}"], st.buf[f"attn_ml{layer}"]
    heads = slice(k * G, (k + 1) * G)
    if end <= start:
        o_part[b, heads, sp] = 0.0
        ml_part[b, heads, sp] = (_NEG_INF, 0.0)
        return
    keys = st.cache[layer, 0, b, k, start:end].copy()
    vals = st.cache[layer, 1, b, k, start:end].copy()
    if start <= p < end:                   # this split owns the new position: append, use it from "registers"
        st.cache[layer, 0, b, k, p] = k_new
        st.cache[layer, 1, b, k, p] = v_new
        keys[p - start], vals[p - start] = k_new, v_new
    scores = (q @ keys.T) * np.float32(_LOG2E / math.sqrt(D))          # [G, keys]
    m = scores.max(axis=1, keepdims=True)
    e = np.exp2(scores - m)
    o_part[b, heads, sp] = e @ vals
    ml_part[b, heads, sp, 0] = m[:, 0]
    ml_part[b, heads, sp, 1] = e.sum(axis=1)


def _merge(st: _State, t):
    s, layer = st.s, t.layer
    b, k = t.index
    G, D = s.group, s.head_dim
    heads = slice(k * G, (k + 1) * G)
    o = st.buf[f"attn_o{layer}"][b, heads]          # [G, S, D]
    ml = st.buf[f"attn_ml{layer}"][b, heads]        # [G, S, 2]
    big = ml[..., 0].max(axis=1, keepdims=True)
    f = np.exp2(ml[..., 0] - big)
    out = (o * f[..., None]).sum(axis=1) / (ml[..., 1] * f).sum(axis=1, keepdims=True)
    st.buf[f"attn{layer}"][b, k * G * D:(k + 1) * G * D] = st.rnd(out).reshape(-1)


def _o_proj(st: _State, t):
    first, rows = t.index
    y = st.linear("o_proj", t.layer, st.buf[f"attn{t.layer}"], first, rows)
    st.buf[f"h{t.layer}"][:, first:first + rows] = st.rnd(st.buf[f"x{t.layer}"][:, first:first + rows] + y)


def _gate_up(st: _State, t):
    first, cols = t.index
    x = st.rms(st.buf[f"h{t.layer}"], f"model.layers.{t.layer}.post_attention_layernorm.weight")
    gate = st.linear("gate_up", t.layer, x, first, cols)
    up = st.linear("gate_up", t.layer, x, st.s.intermediate + first, cols)
    silu = st.rnd(gate / (1.0 + np.exp(-gate)))
    st.buf[f"act{t.layer}"][:, first:first + cols] = st.rnd(silu * up)


def _down(st: _State, t):
    first, rows = t.index
    y = st.linear("down", t.layer, st.buf[f"act{t.layer}"], first, rows)
    st.buf[f"x{t.layer + 1}"][:, first:first + rows] = st.rnd(st.buf[f"h{t.layer}"][:, first:first + rows] + y)


def _lm_head(st: _State, t):
    first, rows = t.index
    x = st.rms(st.buf[f"x{st.s.num_layers}"], "model.norm.weight")
    st.buf["logits"][:, first:first + rows] = st.linear("lm_head", -1, x, first, rows)


_RUN = {"embed": _embed, "qkv": _qkv, "attn": _attn, "merge": _merge, "o_proj": _o_proj, "gate_up": _gate_up,
        "down": _down, "lm_head": _lm_head}


# ------------------------------------------------------------------------------------------ the executor
def _as_f32(weights: dict) -> dict:
    out = {}
    for k, v in weights.items():
        a = v.detach().cpu().float().numpy() if hasattr(v, "detach") else np.asarray(v)
        out[k] = np.asarray(a, np.float32)
    return out


def execute_step(graph: TaskGraph, weights: dict, cache: np.ndarray, ids, pos, policy: str = "random",
                 seed: int | None = 0, counters: np.ndarray | None = None, drop_wait: int | None = None) -> np.ndarray:
    """Run one decode step of ``graph`` with simulated workers; returns the float32 logits ``[batch, vocab]``.

    Parameters
    ----------
    graph : TaskGraph
    weights : dict
        Parameter name -> array (kiln.llm's names; torch tensors or numpy, any float dtype).
    cache : numpy.ndarray
        ``[layers, 2, batch, kv_heads, max_context, head_dim]`` float32, updated in place (the new K/V rows).
    ids, pos : array-like
        ``[batch]`` token ids and their positions.
    policy : str
        One of :data:`POLICIES`.
    seed : int, optional
        Seeds the ``random`` policy.
    counters : numpy.ndarray, optional
        The counter words (``len(graph.counters)`` int64), carried across steps like the kernel's; must be
        zero on entry and are zero on return.
    drop_wait : int, optional
        Test hook: ignore the waits of this task id (a deliberately incomplete graph).

    Raises
    ------
    Deadlock
        A wait can never be satisfied.
    RuntimeError
        Counters not zero on entry, or not at their declared totals at the end of the step.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, given {policy!r}")
    if cache.dtype != np.float32 or tuple(cache.shape) != graph.buffers["cache"].shape:
        raise ValueError(f"cache must be float32 {list(graph.buffers['cache'].shape)}, given {cache.dtype} "
                         f"{list(cache.shape)}")
    cnt = np.zeros(len(graph.counters), np.int64) if counters is None else counters
    if cnt.any():
        raise RuntimeError("counters must be zero at the start of a step")
    st = _State(graph, weights if all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in weights.values())
                else _as_f32(weights), cache, ids, pos)
    rng = np.random.default_rng(seed)
    pc = [0] * len(graph.workers)
    lists = graph.workers
    remaining = len(graph.tasks)

    def runnable(w):
        if pc[w] >= len(lists[w]):
            return False
        t = graph.tasks[lists[w][pc[w]]]
        return t.id == drop_wait or all(cnt[c] >= n for c, n in t.waits)

    while remaining:
        ready = [w for w in range(len(lists)) if runnable(w)]
        if not ready:
            stuck = [graph.tasks[lists[w][pc[w]]].label() for w in range(len(lists)) if pc[w] < len(lists[w])]
            raise Deadlock(f"no runnable worker; blocked tasks: {stuck[:8]}")
        if policy == "random":
            w = ready[int(rng.integers(len(ready)))]
        elif policy == "ahead":
            w = max(ready, key=lambda v: (lists[v][pc[v]], v))
        else:
            w = ready[0]
        t = graph.tasks[lists[w][pc[w]]]
        _RUN[t.kind](st, t)
        for c in t.signals:
            cnt[c] += 1
        pc[w] += 1
        remaining -= 1
    bad = [graph.counters[c] for c in range(len(cnt)) if cnt[c] != graph.counter_totals[c]]
    if bad:
        raise RuntimeError(f"counters off their declared totals at the end of the step: {bad[:8]}")
    cnt[:] = 0                       # the kernel's last worker zeroes them for the next step
    return st.buf["logits"]
