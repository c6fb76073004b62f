"""The decode-step megakernel for sm_90a: one persistent TIRx kernel (grid = workers, one CTA per SM) that runs the
task graph of :mod:`kiln.schedules.megakernel` with device-side counters.

* :func:`kernel_check` -- the reason a graph cannot run on this kernel (``None`` when it can).
* :func:`encode_program` -- the graph as an int32 *program*: a header, per-worker task ranges, one 8-int row per
  task (``kind, layer, i0, i1, i2, wait counter (-1: none), wait count, offset of its signal list``) in
  worker-major order, then the signal lists (``count, counter ids...``).
* :func:`scratch_layout` -- byte offsets of the step's activation buffers in one scratch tensor (each buffer
  written once per step; 256-byte aligned, so no two buffers share a cache line).
* :func:`build_megakernel` -- the TIRx PrimFunc ``(ids, pos, cache, program, sync, *weights, logits, scratch)``:
  ``T.device_entry``, ``__launch_bounds__(threads + 32, 1)``, cooperative launch (the driver refuses a grid that
  cannot be co-resident instead of deadlocking), dynamic shared memory for the weight ring, and one call of
  the device code of :mod:`kiln.schedules.megakernel_cuda` through ``T.cuda.func_call``. ``cache`` is updated in
  place (the new K/V rows); ``sync`` (``len(graph.counters)`` int32) must be zero at launch and holds the
  counters' totals afterwards (the Relax caller zeroes it before every launch, inside the CUDA graph).

Correctness on a GPU is checked by ``tests/test_megakernel.py -m gpu``; on the CPU only the build, the source
and ptxas (sm_90a, no spills) are checked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .megakernel import TASK_KINDS, TaskGraph
from .megakernel_cuda import DEVICE_CODE

__all__ = ["KERNEL_RULE", "MAGIC", "SMEM_LIMIT", "kernel_check", "encode_program", "decode_program", "scratch_layout", "ScratchLayout",
           "weight_order", "smem_bytes", "device_source", "build_megakernel", "build_megakernel_module",
           "PROF_WORDS", "read_profile", "xs_bytes"]

#: int64 words per worker in the profile block of a ``profile=True`` build (see :func:`read_profile`).
PROF_WORDS = 24
#: ``kiln.rule`` attr of the kernel (schedule report, ``kiln inspect``).
KERNEL_RULE = "kiln.megakernel_sm90"
#: First word of a program (the kernel traps on a program built for another graph).
MAGIC = 0x6B4D4B31
#: Dynamic + static shared memory one CTA may use on sm_90 (227 KB).
SMEM_LIMIT = 227 * 1024
# Shared memory the driver reserves per CTA on sm_90 (cudaDevAttrReservedSharedMemoryPerBlock): a kernel that
# asks for SMEM_LIMIT - static bytes of dynamic memory is refused at launch ("Failed to set the allowed dynamic
# shared memory size", measured on the H200), plus 512 B of slack for static shared variables the compiler adds
# beyond the pointer table.
_RESERVED_SMEM = 1024 + 512
_HEADER = 16
_ROW = 8
_KIND_CODE = {k: i for i, k in enumerate(TASK_KINDS)}
_DT = {"float16": ("__half", "__half2", "f16"), "bfloat16": ("__nv_bfloat16", "__nv_bfloat162", "bf16")}
_ELEM = {"float16": 2, "bfloat16": 2}


def _align(n: int, a: int = 256) -> int:
    return -(-n // a) * a


def _chunk_cols(graph: TaskGraph) -> int:
    return graph.config.chunk_bytes // (8 * _ELEM.get(graph.shape.dtype, 2))


def smem_bytes(graph: TaskGraph) -> int:
    """Dynamic shared memory of a CTA: the weight ring (8 rows x (KC columns + 64 B) per slot), its mbarriers,
    the GEMV reduction slots, the gate values, rstd, and the attention scratch (RoPE'd q/k/v, per-warp states);
    plus the static pointer table."""
    return _fixed_smem(graph) + max(_attn_smem(graph), xs_bytes(graph))


def _fixed_smem(graph: TaskGraph) -> int:
    cfg = graph.config
    ncw = cfg.threads // 32
    slot = 8 * (_chunk_cols(graph) * 2 + 64)
    return cfg.prefetch_chunks * slot + 16 * cfg.prefetch_chunks + (2 * ncw * 128 + 128 + 16) * 4


def _attn_smem(graph: TaskGraph) -> int:
    s, ncw = graph.shape, graph.config.threads // 32
    return ((s.group + 2) * s.head_dim + ncw * s.group * (s.head_dim + 2)) * 4


def xs_bytes(graph: TaskGraph) -> int:
    """Shared memory for staged GEMV activations (shares the attention scratch): the largest ``B x (K + 32)``
    row block of the step's GEMVs (``+ 32``: the device code's XPAD), capped by what the ring and the rest leave of :data:`SMEM_LIMIT`. A GEMV whose
    rows fit is staged (normalised once per task); the others prefetch their activations from L2 per chunk."""
    s, B = graph.shape, graph.batch
    need = max(B * (k + 32) * s.elem for k in (s.hidden, s.attn_size, s.intermediate))
    room = SMEM_LIMIT - _RESERVED_SMEM - _static_smem(graph) - _fixed_smem(graph)
    return max(0, min(need, room)) // 16 * 16


def _static_smem(graph: TaskGraph) -> int:
    return 8 * (10 * graph.shape.num_layers + 5)


def kernel_check(graph: TaskGraph) -> str | None:
    """``None`` when the sm_90a megakernel can run ``graph``, else the reason."""
    s, cfg, B = graph.shape, graph.config, graph.batch
    if s.dtype not in _DT:
        return f"dtype {s.dtype}: the kernel takes float16 or bfloat16 activations"
    if s.weight_format != "native":
        return f"weight format {s.weight_format}: the kernel streams native float16/bfloat16 weights (fp8 is not done)"
    if B > 16:
        return f"batch {B} > 16: one m16n8k16 A operand holds the batch rows"
    lanes = s.head_dim // 8
    if s.head_dim % 8 or lanes > 32 or 32 % lanes:
        return f"head_dim {s.head_dim}: must be 8 x a power of two <= 32 (16-byte lanes, whole warps)"
    if s.group > 8:
        return f"group size {s.group} > 8: the attention keeps 2 x 8 x group floats per thread"
    for name, k in (("hidden", s.hidden), ("intermediate", s.intermediate), ("attention width", s.attn_size)):
        if k % 8:
            return f"{name} {k} is not a multiple of 8 (16-byte rows of activations and weights)"
    if cfg.threads != 256:
        return f"threads {cfg.threads}: the kernel is written for 8 consumer warps (256 threads) + 1 producer warp"
    kc = _chunk_cols(graph)
    if kc % (32 * (cfg.threads // 32)):
        return f"chunk of {kc} columns is not a multiple of {32 * (cfg.threads // 32)} (32 per consumer warp)"
    need = smem_bytes(graph) + _static_smem(graph) + _RESERVED_SMEM
    if need > SMEM_LIMIT:
        return f"needs {need} B of shared memory > {SMEM_LIMIT} B (fewer prefetch_chunks or smaller chunk_bytes)"
    if any(len(t.waits) > 1 for t in graph.tasks):
        return "a task waits on more than one counter (the program row has one wait)"
    if len(graph.tasks) >= 2 ** 31 // _ROW:
        return "too many tasks for 32-bit program offsets"
    return None


def encode_program(graph: TaskGraph) -> np.ndarray:
    """The int32 program the kernel interprets (see the module docstring)."""
    W, T = len(graph.workers), len(graph.tasks)
    head = np.zeros(_HEADER, np.int32)
    head[:6] = [MAGIC, 1, W, T, len(graph.counters), graph.batch]
    woff = np.zeros(W + 1, np.int32)
    rows = np.zeros((T, _ROW), np.int32)
    sigs: list[int] = []
    r = 0
    for w, ids in enumerate(graph.workers):
        woff[w] = r
        for tid in ids:
            t = graph.tasks[tid]
            idx = list(t.index) + [0] * (3 - len(t.index))
            wc, wn = t.waits[0] if t.waits else (-1, 0)
            rows[r] = [_KIND_CODE[t.kind], t.layer, *idx, wc, wn, len(sigs)]
            sigs += [len(t.signals), *t.signals]
            r += 1
    woff[W] = r
    return np.concatenate([head, woff, rows.reshape(-1), np.asarray(sigs, np.int32)]).astype(np.int32)


def decode_program(prog: np.ndarray) -> list[list[tuple]]:
    """Per worker, its tasks as ``(kind, layer, (i0, i1, i2), wait or None, signals)`` read back from a program
    (what the kernel will execute; tests compare it with the graph)."""
    prog = np.asarray(prog, np.int64)
    if int(prog[0]) != MAGIC:
        raise ValueError(f"not a megakernel program (magic {int(prog[0]):#x})")
    W, T = int(prog[2]), int(prog[3])
    woff = prog[_HEADER:_HEADER + W + 1]
    rows = prog[_HEADER + W + 1:_HEADER + W + 1 + _ROW * T].reshape(T, _ROW)
    sigs = prog[_HEADER + W + 1 + _ROW * T:]
    out = []
    for w in range(W):
        tasks = []
        for r in rows[int(woff[w]):int(woff[w + 1])]:
            off = int(r[7])
            wait = None if r[5] < 0 else (int(r[5]), int(r[6]))
            tasks.append((TASK_KINDS[int(r[0])], int(r[1]), tuple(int(v) for v in r[2:5]), wait,
                          tuple(int(c) for c in sigs[off + 1:off + 1 + int(sigs[off])])))
        out.append(tasks)
    return out


@dataclass(frozen=True)
class ScratchLayout:
    """Byte offsets of the activations: ``x0`` at 0, then one block per layer (``LAYER_B`` bytes) holding qkv,
    the attention partials (o, (m, l)), the attention output, h, act and the layer's output x."""

    x0: int
    layer: int
    offsets: dict
    total: int
    prof: int = 0


def scratch_layout(graph: TaskGraph) -> ScratchLayout:
    s, B, S = graph.shape, graph.batch, graph.splits
    e = s.elem
    x0 = _align(B * s.hidden * e)
    sizes = [("QKV", B * s.qkv_size * e), ("OP", B * s.num_heads * S * s.head_dim * 4),
             ("ML", B * s.num_heads * S * 2 * 4), ("ATTN", B * s.attn_size * e), ("H", B * s.hidden * e),
             ("ACT", B * s.intermediate * e), ("XN", B * s.hidden * e)]
    off, pos = {}, 0
    for name, n in sizes:
        off[name] = pos
        pos += _align(n)
    total = x0 + s.num_layers * pos
    if not graph.config.profile:
        return ScratchLayout(x0, pos, off, total)
    return ScratchLayout(x0, pos, off, total + PROF_WORDS * 8 * len(graph.workers), prof=total)


def weight_order(graph: TaskGraph) -> list[str]:
    """The weight parameters of the kernel, in order (the graph's weight buffers minus an unused embedding copy)."""
    return [n for n, b in graph.buffers.items() if b.role == "weight"]


def _slot(name: str, graph: TaskGraph) -> list[int]:
    """Pointer-table slots of a weight (the device code's P_* indices)."""
    L = graph.shape.num_layers
    if name.startswith("model.layers."):
        layer, rest = name[len("model.layers."):].split(".", 1)
        key = {"input_layernorm.weight": 0, "self_attn.qkv_proj.weight": 1, "self_attn.qkv_proj.bias": 2,
               "self_attn.o_proj.weight": 3, "self_attn.o_proj.bias": 4, "post_attention_layernorm.weight": 5,
               "mlp.gate_up_proj.weight": 6, "mlp.gate_up_proj.bias": 7, "mlp.down_proj.weight": 8,
               "mlp.down_proj.bias": 9}[rest]
        return [10 * int(layer) + key]
    base = {"model.embed_tokens.weight": [10 * L], "model.norm.weight": [10 * L + 1], "lm_head.weight": [10 * L + 2],
            "rope_cos": [10 * L + 3], "rope_sin": [10 * L + 4]}[name]
    if name == "model.embed_tokens.weight" and graph.shape.tied:
        base = base + [10 * L + 2]
    return base


def _prelude(graph: TaskGraph) -> str:
    """The instance's constants and dtype functions (inside its namespace)."""
    s, cfg, lay = graph.shape, graph.config, scratch_layout(graph)
    dt, dt2, mma_t = _DT[s.dtype]
    if s.dtype == "float16":
        conv = ("__half2float(v)", "__float2half_rn(v)", "__floats2half2_rn(a, b)", "__low2float(h)", "__high2float(h)")
    else:
        conv = ("__bfloat162float(v)", "__float2bfloat16_rn(v)", "__floats2bfloat162_rn(a, b)", "__low2float(h)",
                "__high2float(h)")
    consts = dict(NCW=cfg.threads // 32, KC=_chunk_cols(graph), ELEM=s.elem, RING=cfg.prefetch_chunks, B=graph.batch,
                  H=s.hidden, I=s.intermediate, HQ=s.num_heads, KVH=s.num_kv_heads, D=s.head_dim, G=s.group,
                  V=s.vocab, L=s.num_layers, C=graph.max_context, S=graph.splits, W=len(graph.workers),
                  NTASKS=len(graph.tasks), NC=len(graph.counters), MAGIC=MAGIC, OFF_X0=lay.x0, LAYER_B=lay.layer,
                  OFF_PROF=lay.prof, PROF=int(cfg.profile), PROF_WORDS=PROF_WORDS, XS_BYTES=xs_bytes(graph),
                  **{f"OFF_{k}": v for k, v in lay.offsets.items()})
    lines = [f"constexpr int {k} = {v};" for k, v in consts.items()]
    lines += [f"constexpr float EPS = {s.eps!r}f;",
              f"constexpr float LOG2E_RSQRT_D = {math.log2(math.e) / math.sqrt(s.head_dim)!r}f;",
              f"using dt = {dt};", f"using dt2 = {dt2};",
              f"__device__ __forceinline__ float f32(dt v) {{ return {conv[0]}; }}",
              f"__device__ __forceinline__ dt cvt(float v) {{ return {conv[1]}; }}",
              "__device__ __forceinline__ unsigned pack2(float a, float b) {",
              f"  dt2 h = {conv[2]};", "  return *reinterpret_cast<unsigned*>(&h);", "}",
              "__device__ __forceinline__ void unpack2(unsigned w, float& a, float& b) {",
              "  dt2 h = *reinterpret_cast<dt2*>(&w);", f"  a = {conv[3]};", f"  b = {conv[4]};", "}",
              "__device__ __forceinline__ void mma(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3,"
              " unsigned b0, unsigned b1) {",
              f'  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.{mma_t}.{mma_t}.f32 {{%0, %1, %2, %3}}, '
              '{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"',
              '               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3),'
              ' "r"(b0), "r"(b1));', "}"]
    return "\n".join(lines)


def device_source(graph: TaskGraph, name: str) -> tuple[str, str]:
    """``(entry function name, CUDA source)`` of one kernel instance (namespace ``name``)."""
    ns, entry = f"{name}_ns", f"{name}_entry"
    weights = weight_order(graph)
    body = DEVICE_CODE.replace("MKNS", ns).replace("MKCONST", _prelude(graph))
    args = ", ".join(["void* smem", "void* ids", "void* pos", "void* cache", "void* prog", "void* sync",
                      "void* logits", "void* scratch"] + [f"void* w{i}" for i in range(len(weights))])
    sets = []
    for i, wname in enumerate(weights):
        sets += [f"    tab[{k}] = w{i};" for k in _slot(wname, graph)]
    src = body + f"""
__forceinline__ __device__ void {entry}({args}) {{
  __shared__ const void* tab[{ns}::NP];
  if (threadIdx.x == 0) {{
    for (int i = 0; i < {ns}::NP; ++i) tab[i] = nullptr;
{chr(10).join(sets)}
  }}
  __syncthreads();
  {ns}::run(static_cast<unsigned char*>(smem), tab, static_cast<const int*>(ids), static_cast<const int*>(pos),
            static_cast<{ns}::dt*>(cache), static_cast<const int*>(prog), static_cast<unsigned*>(sync),
            static_cast<float*>(logits), static_cast<unsigned char*>(scratch));
}}
"""
    return entry, src


def build_megakernel(graph: TaskGraph, name: str = "kiln_megakernel"):
    """The TIRx PrimFunc of the megakernel for ``graph`` (attrs as kiln's other hand-written kernels carry).

    Parameters: ``ids [B, 1] int32, pos [B] int32, cache, program [P] int32, sync [NC] int32, *weights
    (weight_order), logits [B, V] float32, scratch [bytes] uint8``.

    Raises
    ------
    NotImplementedError
        :func:`kernel_check`'s reason.
    """
    import tvm
    from tvm.script import tirx as T
    bad = kernel_check(graph)
    if bad:
        raise NotImplementedError(f"sm_90a megakernel: {bad}")
    s, B = graph.shape, graph.batch
    entry, src = device_source(graph, name)
    prog_len = int(encode_program(graph).shape[0])
    buffers = graph.buffers
    weights = weight_order(graph)
    params = [f'ids: T.Buffer(({B}, 1), "int32")', f'pos: T.Buffer(({B},), "int32")',
              f'cache: T.Buffer({tuple(buffers["cache"].shape)}, "{s.dtype}")',
              f'prog: T.Buffer(({prog_len},), "int32")', f'sync: T.Buffer(({len(graph.counters)},), "int32")']
    params += [f'w{i}: T.Buffer({tuple(buffers[n].shape)}, "{buffers[n].dtype}")' for i, n in enumerate(weights)]
    params += [f'logits: T.Buffer(({B}, {s.vocab}), "float32")',
               f'scratch: T.Buffer(({scratch_layout(graph).total},), "uint8")']

    def first(n, shape):
        return f"T.address_of({n}[{', '.join('0' for _ in shape)}])"
    args = [first("smem", (0,)), first("ids", (0, 0)), first("pos", (0,)), first("cache", buffers["cache"].shape),
            first("prog", (0,)), first("sync", (0,)), first("logits", (0, 0)), first("scratch", (0,))]
    args += [first(f"w{i}", buffers[n].shape) for i, n in enumerate(weights)]
    text = f"""
@T.prim_func
def {name}({", ".join(params)}):
    T.func_attr({{"global_symbol": "{name}", "tirx.kernel_launch_params": ["tirx.use_cooperative_launch"]}})
    T.device_entry()
    T.attr({{"tirx.launch_bounds_min_blocks_per_sm": 1}})
    bid = T.cta_id([{len(graph.workers)}])
    tid = T.thread_id([{graph.config.threads + 32}])
    smem = T.alloc_buffer(({smem_bytes(graph)},), "uint8", scope="shared.dyn", align=128)
    T.cuda.func_call("{entry}", {", ".join(args)}, source_code=SRC)
"""
    func = tvm.script.from_source(text, extra_vars={"T": T, "SRC": src})
    return func.with_attrs({"kiln.rule": KERNEL_RULE, "tirx.is_scheduled": True, "op_pattern": 8,
                            "kiln.tir_pipeline": "tirx", "kiln.config_source": "heuristic",
                            "kiln.megakernel": f"{len(graph.tasks)} tasks, {len(graph.workers)} workers"})


def build_megakernel_module(graph: TaskGraph, name: str = "kiln_megakernel"):
    """``tvm.compile`` the kernel alone for sm_90a (CUDA source; JIT-compiled when loaded on a GPU)."""
    import tvm

    from .gemm_sm90 import SM90A_TARGET
    func = build_megakernel(graph, name)
    return tvm.compile(tvm.IRModule({name: func}), tvm.target.Target(SM90A_TARGET), tir_pipeline="tirx")



def read_profile(graph: TaskGraph, scratch, clock_hz: float = 1.98e9) -> dict:
    """The cycle counters of a ``profile=True`` launch, from its scratch buffer (a uint8 array/tensor on the host),
    summed over workers and as per-worker extremes.

    Returns ``{"step_us"  (globaltimer, first start to last end), "per_worker_us": {name: [min, mean, max]},
    "kind_us": {task kind: mean busy us per worker}}``; cycles are converted at ``clock_hz``. Counter waits are
    time thread 0 spins on a dependency; ``full`` is consumer time waiting for weights to land (bandwidth- or
    latency-bound streaming); ``empty`` is producer time waiting for the consumers to free a slot (compute- or
    latency-bound consumers).
    """
    if not graph.config.profile:
        raise ValueError("the graph was not built with MegakernelConfig(profile=True)")
    lay, W = scratch_layout(graph), len(graph.workers)
    raw = np.asarray(scratch, dtype=np.uint8)[lay.prof:lay.prof + PROF_WORDS * 8 * W]
    p = raw.view(np.int64).reshape(W, PROF_WORDS).astype(np.float64)
    us = p / clock_hz * 1e6

    def stat(col):
        return [float(col.min()), float(col.mean()), float(col.max())]
    names = {"total": 0, "counter_wait": 1, "full_wait": 2, "producer_empty_wait": 3, "producer_total": 15,
             "signal": 16, "stage": 17, "reduce_epilogue": 18}
    return {"step_us": float((p[:, 14].max() - p[:, 13].min()) / 1e3),
            "per_worker_us": {k: stat(us[:, i]) for k, i in names.items()},
            "kind_us": {TASK_KINDS[k]: float(us[:, 4 + k].mean()) for k in range(len(TASK_KINDS))},
            "tasks": stat(p[:, 12])}
