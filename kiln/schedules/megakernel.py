"""The whole decode step of a Llama-family model as a task graph for one persistent kernel (the "megakernel").

A decode step (``kiln.llm``'s ``decode_b{B}``) is a chain of weight streams: embedding, then per layer
``rms_norm -> qkv -> rope + KV append -> attention -> o_proj (+ residual) -> rms_norm -> gate_up -> silu * up
-> down (+ residual)``, then ``rms_norm -> LM head``. Here it becomes a list of **tasks** that a fixed set of
**workers** (one persistent CTA per SM) runs without a launch in between:

* ``embed`` (per sequence): ``x0[b] = E[ids[b]]``.
* ``qkv`` tiles (rows of the fused q|k|v weight): RMSNorm of ``x_l`` as the tile's prologue (every tile
  recomputes the row's ``rsqrt(mean(x^2) + eps)`` from ``x_l``: 2 * hidden bytes from L2, instead of a
  separate norm stage and its synchronisation), GEMV, bias, rounding.
* ``attn`` splits ``(b, kv_head, split)``: RoPE of the group's q heads and of the new k (fused: they read
  ``qkv`` directly), the KV append (the split whose key range holds position ``pos[b]`` writes the new k/v
  row to the cache and uses it from registers), and the split's online-softmax state over its keys.
* ``merge`` ``(b, kv_head)``: combines the splits' states into the attention output of the group's heads.
* ``o_proj`` tiles: GEMV + bias + residual ``x_l`` -> ``h_l``.
* ``gate_up`` tiles (columns of the MLP's inner dimension: the matching gate and up rows): RMSNorm prologue
  of ``h_l``, both GEMVs, ``silu(gate) * up`` -> ``act_l``.
* ``down`` tiles: GEMV + bias + residual ``h_l`` -> ``x_{l+1}``.
* ``lm_head`` tiles: RMSNorm prologue of ``x_L``, GEMV, rounding -> float32 logits.

Every activation buffer is written once per step (``x0, qkv0, attn0, h0, act0, x1, ...``), so the only
hazards are read-after-write and every dependency is a **counter**: a task signals (+1, release) its counters
when it is done, and a task that needs data waits (acquire) until a counter reaches a count. Counter
granularity follows the data: the attention of KV head ``h`` waits for the qkv tiles whose rows hold the q
heads of its group, k head ``h`` and v head ``h``; the GEMVs wait for the whole previous stage. The counters
are zero when a step starts (the megakernel decode function zeroes them with a tiny kernel before the launch).

**Assignment** (:func:`kiln.schedules.megakernel_schedule.assign`): tasks in stage order go to the worker that a simple time model says finishes
them first (list scheduling with per-worker bandwidth, a synchronisation latency and a prefetch window: a
worker may stream the weights of its next task into its shared-memory ring before that task's counters are
ready, ``MegakernelConfig.prefetch_bytes`` ahead). Each worker runs its tasks in global stage order, so the
schedule cannot deadlock when all workers are resident (:func:`check_graph` verifies it).

:mod:`kiln.schedules.megakernel_cpu` executes a graph in numpy with simulated workers in random interleavings
(the proof that the declared counters are complete); :mod:`kiln.schedules.megakernel_schedule` assigns the
tasks to workers and prints the schedule (``kiln inspect``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

__all__ = ["MegakernelConfig", "SM90_MEGAKERNEL", "CostModel", "SM90_COST", "DecodeShape", "Buffer", "Task",
           "TaskGraph", "TASK_KINDS", "GEMV_KINDS", "build_task_graph", "check_graph", "attention_splits"]

#: Task kinds in stage order within a layer (``embed`` first, ``lm_head`` last).
TASK_KINDS = ("embed", "qkv", "attn", "merge", "o_proj", "gate_up", "down", "lm_head")
#: Kinds that stream a weight matrix (GEMV tiles).
GEMV_KINDS = ("qkv", "o_proj", "gate_up", "down", "lm_head")
_LAYER_STAGES = ("qkv", "attn", "merge", "o_proj", "gate_up", "down")
_ELEM = {"float32": 4, "float16": 2, "bfloat16": 2}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------------------------------ tunables
@dataclass(frozen=True)
class MegakernelConfig:
    """Tunables of the decode-step megakernel on one GPU architecture.

    Attributes
    ----------
    workers : int
        Persistent CTAs (one per SM; the grid is fixed at build time).
    threads : int
        Threads per worker.
    tile_groups : int
        At most ``8 * tile_groups`` weight rows per GEMV task (a worker's share of one GEMV -- a near-equal
        split at row granularity, so shares differ by at most one row -- is cut into tasks of at most this
        size; each task costs a prologue and a reduction per 8-row group).
    chunk_bytes : int
        Bytes of one streamed weight chunk (``8 rows x chunk_bytes / 8 / elem`` columns; one ring slot).
    prefetch_chunks : int
        Ring slots: weight chunks a worker keeps in flight, also ahead of a counter wait (prefetch depth).
        8 (128 KB): on the H200 12 slots ran no faster (1B, batch 1: 1.226 vs 1.222 ms), and the 8-slot ring
        leaves room to stage batch-8 activations in shared memory.
    attn_min_keys : int
        An attention split covers at least this many keys of the compiled context.
    attn_max_splits : int
        Upper bound on the attention splits per (sequence, KV head).
    profile : bool
        Build the kernel with cycle counters (per worker: counter waits, weight-ring waits on both sides, busy
        time per task kind) written to the end of the scratch buffer; read them with
        :func:`kiln.schedules.megakernel_kernel.read_profile`. Off in production builds (the counters cost a
        few clock reads per chunk).
    """

    workers: int = 132
    threads: int = 256
    tile_groups: int = 64
    chunk_bytes: int = 16384
    prefetch_chunks: int = 8
    attn_min_keys: int = 128
    attn_max_splits: int = 16
    profile: bool = False

    @property
    def prefetch_bytes(self) -> int:
        return self.chunk_bytes * self.prefetch_chunks

    def check(self) -> str | None:
        """``None`` when valid, else the reason."""
        if not isinstance(self.workers, int) or self.workers < 1:
            return f"workers={self.workers!r}: at least one worker"
        if self.threads not in (128, 256, 512):
            return f"threads={self.threads}: 128, 256 or 512 threads per worker are supported"
        if not 1 <= self.tile_groups <= 4096:
            return f"tile_groups={self.tile_groups}: 1..4096 groups of 8 rows per GEMV task"
        if self.chunk_bytes % 256 or not 2048 <= self.chunk_bytes <= 65536:
            return f"chunk_bytes={self.chunk_bytes}: a multiple of 256 in 2048..65536"
        if not 2 <= self.prefetch_chunks <= 32:
            return f"prefetch_chunks={self.prefetch_chunks}: 2..32 ring slots"
        if self.prefetch_bytes > 200 * 1024:
            return f"ring of {self.prefetch_bytes} B exceeds the 200 KB of shared memory reserved for it"
        if self.attn_min_keys < 1 or self.attn_max_splits < 1:
            return f"attn_min_keys={self.attn_min_keys}, attn_max_splits={self.attn_max_splits}: must be >= 1"
        return None

    def to_json(self) -> dict:
        return asdict(self)


#: Hopper (H100/H200: 132 SMs, 227 KB of shared memory per SM).
SM90_MEGAKERNEL = MegakernelConfig()


@dataclass(frozen=True)
class CostModel:
    """The time model of :func:`assign` (and the ms/token prediction of :func:`summary`).

    Attributes
    ----------
    bandwidth : float
        Device copy bandwidth in bytes/s (H200: 4.26e12).
    efficiency : float
        Fraction of it a worker's weight stream reaches when all workers stream (the TIRx persistent-kernel
        probe of ``/work/shared/notes/megakernel-tirx.md`` reached 0.86).
    sync_s : float
        Latency from a counter's last release to a waiting worker's acquire (and its first dependent load).
    task_s : float
        Fixed cost of a task (prologue, cross-warp reduction, epilogue stores).
    """

    bandwidth: float = 4.26e12
    efficiency: float = 0.86
    sync_s: float = 1.0e-6
    task_s: float = 0.4e-6

    def worker_bw(self, workers: int) -> float:
        return self.bandwidth * self.efficiency / workers


#: H200 (copy bandwidth measured 2026-11-21; sync and task costs are estimates, not measured).
SM90_COST = CostModel()


# ------------------------------------------------------------------------------------------ the problem
@dataclass(frozen=True)
class DecodeShape:
    """What the task graph needs of a decoder: shapes, dtypes, biases, eps (no RoPE frequencies: the cos/sin
    tables are weights)."""

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    dtype: str
    weight_format: str = "native"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tied: bool = False

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def qkv_size(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def attn_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def elem(self) -> int:
        return _ELEM[self.dtype]

    @property
    def weight_elem(self) -> int:
        return 1 if self.weight_format == "fp8" else self.elem

    def check(self) -> str | None:
        if self.dtype not in _ELEM:
            return f"dtype {self.dtype!r} is not float32/float16/bfloat16"
        if self.weight_format not in ("native", "fp8"):
            return f"weight format {self.weight_format!r} is not native/fp8"
        if self.weight_format == "fp8" and self.tied:
            return "fp8 weights with a tied LM head (kiln.llm quantises an untied copy)"
        if self.num_heads % self.num_kv_heads or self.head_dim % 2:
            return f"heads {self.num_heads}/{self.num_kv_heads} x {self.head_dim}: need whole groups, even head_dim"
        for name in ("num_layers", "hidden", "intermediate", "num_heads", "num_kv_heads", "head_dim", "vocab"):
            if getattr(self, name) < 1:
                return f"{name}={getattr(self, name)} must be positive"
        return None

    @staticmethod
    def from_llm_config(cfg, dtype: str, weight_format: str = "native") -> "DecodeShape":
        """From :class:`kiln.llm.LLMConfig` (the head is tied only with native weights, as kiln.llm builds it)."""
        return DecodeShape(cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                           cfg.head_dim, cfg.vocab_size, float(cfg.rms_norm_eps), dtype, weight_format,
                           bool(cfg.qkv_bias), bool(cfg.o_bias), bool(cfg.mlp_bias),
                           bool(cfg.tie_word_embeddings) and weight_format == "native")

    def linear(self, kind: str, layer: int) -> tuple[str, int, int, bool]:
        """``(weight param prefix, N, K, has_bias)`` of a GEMV kind (kiln.llm's parameter names)."""
        p = f"model.layers.{layer}."
        return {"qkv": (p + "self_attn.qkv_proj", self.qkv_size, self.hidden, self.qkv_bias),
                "o_proj": (p + "self_attn.o_proj", self.hidden, self.attn_size, self.o_bias),
                "gate_up": (p + "mlp.gate_up_proj", 2 * self.intermediate, self.hidden, self.mlp_bias),
                "down": (p + "mlp.down_proj", self.hidden, self.intermediate, self.mlp_bias),
                "lm_head": ("model.embed_tokens" if self.tied else "lm_head", self.vocab, self.hidden, False)}[kind]

    def to_json(self) -> dict:
        return asdict(self)


def attention_splits(cfg: MegakernelConfig, batch: int, num_kv_heads: int, max_context: int) -> int:
    """KV splits per (sequence, KV head): enough tasks to occupy the workers, at least ``attn_min_keys`` keys each."""
    want = _cdiv(cfg.workers, batch * num_kv_heads)
    return max(1, min(want, cfg.attn_max_splits, _cdiv(max_context, cfg.attn_min_keys)))


# ------------------------------------------------------------------------------------------ the graph
@dataclass(frozen=True)
class Buffer:
    """A tensor of the step. ``role``: ``input`` (ids, pos), ``state`` (the KV cache, updated in place),
    ``weight``, ``activation`` (written once per step) or ``output`` (logits)."""

    name: str
    shape: tuple
    dtype: str
    role: str


@dataclass(frozen=True)
class Task:
    """One unit of work of one worker.

    ``index`` by kind: ``embed (b,)``; GEMVs ``(first, count)`` of output rows (``gate_up``: of the MLP's inner
    columns, i.e. gate rows ``first..`` and up rows ``intermediate + first..``); ``attn (b, kv_head, split)``;
    ``merge (b, kv_head)``. ``weights``: ``(param, first_row, rows)`` slices streamed. ``waits``: ``(counter,
    count)`` pairs that must hold before the task reads its inputs; ``signals``: counters it increments by one
    when its outputs are written.
    """

    id: int
    kind: str
    layer: int
    stage: int
    index: tuple
    weights: tuple
    weight_bytes: int
    reads: tuple
    writes: tuple
    waits: tuple
    signals: tuple

    def label(self) -> str:
        where = f"L{self.layer} " if self.layer >= 0 else ""
        if self.kind in GEMV_KINDS:
            return f"{where}{self.kind}[{self.index[0]}:{self.index[0] + self.index[1]}]"
        return f"{where}{self.kind}{list(self.index)}"


@dataclass(frozen=True)
class TaskGraph:
    """The decode step of one model at one batch size: buffers, counters, tasks and their assignment.

    ``tasks`` are in global stage order; ``workers[w]`` lists the task ids worker ``w`` runs, in order;
    ``counter_totals[c]`` is how many signals counter ``c`` receives per step; ``estimate`` holds the time
    model's per-task start/finish (seconds) and the predicted step time.
    """

    shape: DecodeShape
    batch: int
    max_context: int
    splits: int
    config: MegakernelConfig
    buffers: dict
    counters: tuple
    counter_totals: tuple
    tasks: tuple
    workers: tuple
    estimate: dict = field(default_factory=dict, compare=False)

    def worker_of(self) -> list[int]:
        out = [-1] * len(self.tasks)
        for w, ids in enumerate(self.workers):
            for t in ids:
                out[t] = w
        return out


class _Builder:
    """Accumulates buffers, counters and tasks in stage order."""

    def __init__(self, shape: DecodeShape, batch: int, max_context: int):
        self.s, self.B, self.C = shape, batch, max_context
        self.buffers: dict = {}
        self.counters: list[str] = []
        self.totals: list[int] = []
        self.tasks: list[dict] = []

    def buf(self, name, shape, dtype, role):
        self.buffers[name] = Buffer(name, tuple(shape), dtype, role)
        return name

    def counter(self, name: str) -> int:
        self.counters.append(name)
        self.totals.append(0)
        return len(self.counters) - 1

    def task(self, kind, layer, stage, index, weights=(), reads=(), writes=(), waits=(), signals=()):
        wb = sum(self.weight_slice_bytes(*w) for w in weights)
        for c in signals:
            self.totals[c] += 1
        self.tasks.append(dict(kind=kind, layer=layer, stage=stage, index=tuple(index), weights=tuple(weights),
                               weight_bytes=wb, reads=tuple(reads), writes=tuple(writes), waits=tuple(waits),
                               signals=tuple(signals)))
        return len(self.tasks) - 1

    def weight_slice_bytes(self, name: str, first: int, rows: int) -> int:
        b = self.buffers[name]
        per_row = math.prod(b.shape[1:]) if len(b.shape) > 1 else 1
        return rows * per_row * (1 if b.dtype.startswith("float8") else _ELEM[b.dtype])


def _row_tiles(n_rows: int, unit: int, parts: int, max_units: int) -> list[tuple[int, int]]:
    """Cut ``n_rows`` into at most ``parts`` near-equal contiguous tiles of whole ``unit``-row groups (the last
    group may be short), none longer than ``max_units`` groups."""
    groups = _cdiv(n_rows, unit)
    parts = max(1, min(parts, groups))
    tiles = []
    for p in range(parts):
        g0, g1 = p * groups // parts, (p + 1) * groups // parts
        while g0 < g1:
            g = min(g1, g0 + max_units)
            tiles.append((g0 * unit, min(g * unit, n_rows) - g0 * unit))
            g0 = g
    return [t for t in tiles if t[1] > 0]


def _declare_weights(b: _Builder) -> None:
    s = b.s
    wdt = "float8_e4m3fn" if s.weight_format == "fp8" else s.dtype
    b.buf("model.embed_tokens.weight", (s.vocab, s.hidden), s.dtype, "weight")
    for layer in range(s.num_layers):
        p = f"model.layers.{layer}."
        b.buf(p + "input_layernorm.weight", (s.hidden,), s.dtype, "weight")
        b.buf(p + "post_attention_layernorm.weight", (s.hidden,), s.dtype, "weight")
        for kind in ("qkv", "o_proj", "gate_up", "down"):
            _declare_linear(b, *s.linear(kind, layer), wdt)
    b.buf("model.norm.weight", (s.hidden,), s.dtype, "weight")
    if not s.tied:
        _declare_linear(b, *s.linear("lm_head", -1), wdt)
    b.buf("rope_cos", (b.C, s.head_dim // 2), "float32", "weight")
    b.buf("rope_sin", (b.C, s.head_dim // 2), "float32", "weight")


def _declare_linear(b: _Builder, prefix: str, n: int, k: int, bias: bool, wdt: str) -> None:
    b.buf(prefix + ".weight", (n, k), wdt, "weight")
    if wdt.startswith("float8"):
        b.buf(prefix + ".weight_scale", (n,), "float32", "weight")
    if bias:
        b.buf(prefix + ".bias", (n,), b.s.dtype, "weight")


def _gemv_weights(b: _Builder, kind: str, layer: int, first: int, count: int) -> list[tuple]:
    """The weight slices a GEMV tile streams (weight rows, per-channel scales, bias)."""
    s = b.s
    prefix, n, _, bias = s.linear(kind, layer)
    spans = [(first, count)] if kind != "gate_up" else [(first, count), (s.intermediate + first, count)]
    out = []
    for f, c in spans:
        out.append((prefix + ".weight", f, c))
        if s.weight_format == "fp8":
            out.append((prefix + ".weight_scale", f, c))
        if bias:
            out.append((prefix + ".bias", f, c))
    return out


def _overlaps(a0: int, a1: int, b0: int, b1: int) -> bool:
    return a0 < b1 and b0 < a1


def build_task_graph(cfg, batch: int, max_context: int, dtype: str | None = None, weight_format: str = "native",
                     config: MegakernelConfig = SM90_MEGAKERNEL, cost: CostModel = SM90_COST,
                     context: int | None = None) -> TaskGraph:
    """The decode step of ``cfg`` at ``batch`` sequences over a ``max_context`` KV cache, assigned to workers.

    Parameters
    ----------
    cfg : kiln.llm.LLMConfig or DecodeShape
        The architecture (an ``LLMConfig`` needs ``dtype``).
    batch, max_context : int
        Sequences per step and the compiled cache length (``decode_b{batch}``).
    dtype, weight_format : str
        Activation dtype and ``"native"`` / ``"fp8"`` (used with an ``LLMConfig``).
    config : MegakernelConfig
    cost : CostModel
        The time model of the assignment.
    context : int, optional
        Keys per sequence the time model assumes (default ``max_context``).

    Raises
    ------
    ValueError
        An invalid config or shape (the reason is in the message).
    """
    shape = cfg if isinstance(cfg, DecodeShape) else DecodeShape.from_llm_config(cfg, dtype, weight_format)
    bad = config.check() or shape.check()
    if bad:
        raise ValueError(f"megakernel task graph: {bad}")
    if batch < 1 or max_context < 2:
        raise ValueError(f"megakernel task graph: batch {batch} >= 1 and max_context {max_context} >= 2 expected")
    b = _Builder(shape, batch, max_context)
    s, B, W = shape, batch, config.workers
    S = attention_splits(config, B, s.num_kv_heads, max_context)
    b.buf("ids", (B,), "int32", "input")
    b.buf("pos", (B,), "int32", "input")
    b.buf("cache", (s.num_layers, 2, B, s.num_kv_heads, max_context, s.head_dim), s.dtype, "state")
    _declare_weights(b)
    x = b.buf("x0", (B, s.hidden), s.dtype, "activation")
    ready = b.counter("x0")
    for bi in range(B):
        b.task("embed", -1, 0, (bi,), reads=("ids", "model.embed_tokens.weight"), writes=(x,), signals=(ready,))
    ready_n = B
    tiles = lambda n, unit=1: _row_tiles(n, unit, W, 8 * config.tile_groups)  # noqa: E731
    for layer in range(s.num_layers):
        x, ready, ready_n = _layer(b, layer, x, ready, ready_n, S, tiles)
    stage = 1 + len(_LAYER_STAGES) * s.num_layers
    logits = b.buf("logits", (B, s.vocab), "float32", "output")
    for first, count in tiles(s.vocab):
        b.task("lm_head", -1, stage, (first, count), _gemv_weights(b, "lm_head", -1, first, count),
               reads=(x, "model.norm.weight"), writes=(logits,), waits=((ready, ready_n),))
    tasks = tuple(Task(id=i, **t) for i, t in enumerate(b.tasks))
    graph = TaskGraph(s, B, max_context, S, config, b.buffers, tuple(b.counters), tuple(b.totals), tasks, ())
    from .megakernel_schedule import assign
    return assign(graph, cost, context if context is not None else max_context)


def _layer(b: _Builder, layer: int, x: str, ready: int, ready_n: int, S: int, tiles):
    """Append one decoder layer's tasks; returns (its output buffer, the counter and count that mark it ready)."""
    s, B, D, G, KVH = b.s, b.B, b.s.head_dim, b.s.group, b.s.num_kv_heads
    st = 1 + len(_LAYER_STAGES) * layer
    p = f"model.layers.{layer}."
    qkv = b.buf(f"qkv{layer}", (B, s.qkv_size), s.dtype, "activation")
    o_part = b.buf(f"attn_o{layer}", (B, s.num_heads, S, D), "float32", "activation")
    ml_part = b.buf(f"attn_ml{layer}", (B, s.num_heads, S, 2), "float32", "activation")
    attn = b.buf(f"attn{layer}", (B, s.attn_size), s.dtype, "activation")
    h = b.buf(f"h{layer}", (B, s.hidden), s.dtype, "activation")
    act = b.buf(f"act{layer}", (B, s.intermediate), s.dtype, "activation")
    x_next = b.buf(f"x{layer + 1}", (B, s.hidden), s.dtype, "activation")

    # qkv tiles: each signals the counter of every KV head whose q group, k or v rows it overlaps
    head_rows = [((k * G * D, (k + 1) * G * D), (s.attn_size + k * D, s.attn_size + (k + 1) * D),
                  (s.attn_size + (KVH + k) * D, s.attn_size + (KVH + k + 1) * D)) for k in range(KVH)]
    head_ready = [b.counter(f"L{layer}.qkv.h{k}") for k in range(KVH)]
    per_head = [0] * KVH
    for first, count in tiles(s.qkv_size):
        sig = [head_ready[k] for k in range(KVH)
               if any(_overlaps(first, first + count, r0, r1) for r0, r1 in head_rows[k])]
        for c in sig:
            per_head[head_ready.index(c)] += 1
        b.task("qkv", layer, st, (first, count), _gemv_weights(b, "qkv", layer, first, count),
               reads=(x, p + "input_layernorm.weight"), writes=(qkv,), waits=((ready, ready_n),), signals=tuple(sig))

    split_done = {}
    for bi in range(B):
        for k in range(KVH):
            c = split_done[bi, k] = b.counter(f"L{layer}.attn.b{bi}.h{k}")
            for sp in range(S):
                b.task("attn", layer, st + 1, (bi, k, sp), reads=(qkv, "cache", "pos", "rope_cos", "rope_sin"),
                       writes=("cache", o_part, ml_part), waits=((head_ready[k], per_head[k]),), signals=(c,))
    merged = b.counter(f"L{layer}.merge")
    for bi in range(B):
        for k in range(KVH):
            b.task("merge", layer, st + 2, (bi, k), reads=(o_part, ml_part), writes=(attn,),
                   waits=((split_done[bi, k], S),), signals=(merged,))

    o_done = b.counter(f"L{layer}.o_proj")
    o_tiles = tiles(s.hidden)
    for first, count in o_tiles:
        b.task("o_proj", layer, st + 3, (first, count), _gemv_weights(b, "o_proj", layer, first, count),
               reads=(attn, x), writes=(h,), waits=((merged, B * KVH),), signals=(o_done,))
    gu_done = b.counter(f"L{layer}.gate_up")
    gu_tiles = tiles(s.intermediate)
    for first, count in gu_tiles:
        b.task("gate_up", layer, st + 4, (first, count), _gemv_weights(b, "gate_up", layer, first, count),
               reads=(h, p + "post_attention_layernorm.weight"), writes=(act,), waits=((o_done, len(o_tiles)),),
               signals=(gu_done,))
    down_done = b.counter(f"L{layer}.down")
    down_tiles = tiles(s.hidden)
    for first, count in down_tiles:
        b.task("down", layer, st + 5, (first, count), _gemv_weights(b, "down", layer, first, count),
               reads=(act, h), writes=(x_next,), waits=((gu_done, len(gu_tiles)),), signals=(down_done,))
    return x_next, down_done, len(down_tiles)


def check_graph(graph: TaskGraph) -> list[str]:
    """Static checks of a graph; returns the problems found (empty when sound).

    * every task is on exactly one worker, and each worker's tasks are in global (stage) order;
    * every wait ``(c, n)`` is satisfiable by signals of tasks *earlier* in the global order (with all workers
      resident, the earliest unfinished task can always run: no deadlock);
    * each counter's per-step total matches the signals declared;
    * GEMV tiles of each (layer, kind) cover the output rows exactly once; attention splits and merges cover
      every (sequence, KV head, split) once.
    """
    problems = []
    seen = [0] * len(graph.tasks)
    for w, ids in enumerate(graph.workers):
        if list(ids) != sorted(ids):
            problems.append(f"worker {w} runs its tasks out of global order")
        for t in ids:
            seen[t] += 1
    problems += [f"task {t} ({graph.tasks[t].label()}) is assigned {n} times" for t, n in enumerate(seen) if n != 1]
    signalled = [0] * len(graph.counters)
    totals = [0] * len(graph.counters)
    for t in graph.tasks:
        for c in t.signals:
            totals[c] += 1
    for t in graph.tasks:          # tasks are in global order: signals so far come from earlier tasks
        for c, n in t.waits:
            if signalled[c] < n:
                problems.append(f"{t.label()} waits for {graph.counters[c]} >= {n}, but only {signalled[c]} "
                                "earlier task(s) signal it")
        for c in t.signals:
            signalled[c] += 1
    if tuple(totals) != tuple(graph.counter_totals):
        problems.append("counter totals differ from the signals declared")
    problems += _coverage(graph)
    return problems


def _coverage(graph: TaskGraph) -> list[str]:
    s, out = graph.shape, []
    rows = {"qkv": s.qkv_size, "o_proj": s.hidden, "gate_up": s.intermediate, "down": s.hidden, "lm_head": s.vocab}
    spans: dict = {}
    cells: dict = {}
    for t in graph.tasks:
        if t.kind in GEMV_KINDS:
            spans.setdefault((t.layer, t.kind), []).append(t.index)
        else:
            cells.setdefault((t.layer, t.kind), []).append(t.index)
    layers = range(s.num_layers)
    for key in [(layer, k) for layer in layers for k in ("qkv", "o_proj", "gate_up", "down")] + [(-1, "lm_head")]:
        covered = sorted(spans.get(key, []))
        pos = 0
        for first, count in covered:
            if first != pos or count < 1:
                out.append(f"{key[1]} tiles of layer {key[0]} do not partition rows 0..{rows[key[1]]} (at {pos})")
                break
            pos += count
        else:
            if pos != rows[key[1]]:
                out.append(f"{key[1]} tiles of layer {key[0]} cover {pos} of {rows[key[1]]} rows")
    B, KVH, S = graph.batch, s.num_kv_heads, graph.splits
    want = {"attn": sorted((b, k, sp) for b in range(B) for k in range(KVH) for sp in range(S)),
            "merge": sorted((b, k) for b in range(B) for k in range(KVH))}
    for layer in layers:
        for kind, cells_want in want.items():
            if sorted(cells.get((layer, kind), [])) != cells_want:
                out.append(f"{kind} tasks of layer {layer} do not cover every (sequence, KV head[, split]) once")
    if sorted(cells.get((-1, "embed"), [])) != [(b,) for b in range(B)]:
        out.append("embed tasks do not cover every sequence once")
    return out
