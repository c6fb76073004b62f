"""kiln's Hopper flash attention (forward): ``O = softmax(Q K^T * scale + kpad + causal) V``, TIRx for sm_90a.

Semantics are those of ``torch.nn.functional.scaled_dot_product_attention`` with these inputs:

* layout BSHD, as a ``Linear`` output reshaped to heads (no permutes needed):
  Q ``[B, Sq, Hq, D]``, K and V ``[B, Skv, Hkv, D]``, O ``[B, Sq, Hq, D]``;
  fp16 or bf16 in and out, fp32 accumulation and fp32 softmax statistics;
* ``D`` in {64, 128}; GQA: ``Hq`` a multiple of ``Hkv`` (query head h reads KV head ``h // (Hq/Hkv)``);
* ``causal``: top-left aligned like torch's ``is_causal=True`` (query i sees keys j <= i);
* optional key-padding bias ``kpad[B, Skv]`` fp32, added to every query row of its batch (a BERT
  padding mask becomes ``0`` / ``-inf`` or ``0`` / a large negative number);
* ``scale`` is a compile-time float (``None``: ``1/sqrt(D)``); static shapes, any ``Sq, Skv >= 1``, except
  that the batch may be a run-time variable.

**Rows whose keys are all masked** (every key ``-inf`` through ``kpad``) give **0, not NaN** (torch gives
NaN). A large *finite* bias (``torch.finfo(torch.float32).min``) is not a mask: such keys get the
weight torch gives them (a row whose keys all carry it averages V uniformly, like torch).

Kernel structure: ``attention_sm90_kernel.py`` (TMA producer warpgroup, 1-3 wgmma consumer
warpgroups of 64 query rows, online softmax in registers, P V with P from registers, optionally a
persistent grid). Measured on an H200 (``benchmarks/attention.py``, results in
``benchmarks/results/2026-11-21-h200/s2-attention.json``, fp16, H = 16): 1.36-2.33x torch SDPA's flash
backend and 0.78-1.25x its cuDNN backend at seq 512-8192, D 64/128, causal or not (430-630 TFLOP/s
from seq 2048 on); BERT S = 128 with the padding bias: 6.4 / 8.1 / 16.2 us at batch 1 / 8 / 32.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import tvm

from .attention_sm90_kernel import CONSUMER_REGS, build_attention_kernel
from .configs import SM90_NUM_SMS, SM90_SMEM_BYTES
from .gemm_sm90 import SM90A_TARGET, cuda_source

__all__ = ["AttentionConfig", "ATTENTION_DTYPES", "ATTENTION_HEAD_DIMS", "SM90_ATTENTION_CONFIGS",
           "select_attention_config", "check_flash_attention_sm90", "make_flash_attention_sm90",
           "build_flash_attention_sm90", "FlashAttentionSM90", "attention_reference", "attention_flops",
           "cuda_source"]

#: Input/output dtypes (fp32 accumulation and softmax statistics inside).
ATTENTION_DTYPES = ("float16", "bfloat16")
#: Head dims: one or two 128-byte (64-element) swizzled panels per row.
ATTENTION_HEAD_DIMS = (64, 128)
_REG_OVERHEAD = 24        # registers per consumer thread beyond the S, O and P fragments (estimate)


@dataclass(frozen=True)
class AttentionConfig:
    """Tile configuration of the sm_90a flash-attention kernel.

    Attributes
    ----------
    block_m : int
        Query rows per CTA, ``64 * consumers`` (each consumer warpgroup issues m64 wgmma).
    block_n : int
        Keys per KV tile: the N of ``S = Q K^T`` (wgmma N, multiple of 16, <= 256) and the K of ``P V``.
    stages : int
        Depth of the K and of the V shared-memory ring (one full/empty mbarrier pair each per stage).
    consumers : int
        Consumer (wgmma + softmax) warpgroups, 1-3; one more warpgroup is the TMA producer.
    overlap : bool
        FA3's intra-warpgroup pipelining: tile n's ``Q K^T`` is issued with tile n-1's ``P V`` and
        tile n's softmax runs while ``P V`` computes.
    pingpong : bool
        With 2 or 3 consumers and ``overlap``: the consumers take turns (round robin, named
        barriers) issuing their GEMMs, so one's softmax overlaps the others' GEMMs.
    tma_store : bool
        Stage O in shared memory and write it with a TMA store (else: 4-byte stores from registers).
    persistent : bool
        One CTA per SM walking the (query block, head, batch) tiles (when there are more tiles than
        SMs): the next tile's Q/K/V load during this tile's last ``P V`` and epilogue; O is staged in
        its own buffer (``block_m * head_dim * 2`` more bytes of shared memory).
    """

    block_m: int = 128
    block_n: int = 128
    stages: int = 2
    consumers: int = 2
    overlap: bool = True
    pingpong: bool = True
    tma_store: bool = True
    persistent: bool = False

    @property
    def threads(self) -> int:
        return 128 * (1 + self.consumers)

    def smem_bytes(self, head_dim: int) -> int:
        """Dynamic shared memory: the Q tile (+ the O staging tile when persistent), the K and V rings,
        2 + 4*stages mbarriers."""
        rows = self.block_m * (2 if self.persistent else 1) + 2 * self.stages * self.block_n
        return rows * head_dim * 2 + 8 * (2 + 4 * self.stages)

    def regs_estimate(self, head_dim: int) -> int:
        """Registers per consumer thread: S (fp32), O (fp32), P (16-bit pairs) fragments + overhead."""
        return self.block_n // 2 + head_dim // 2 + self.block_n // 4 + _REG_OVERHEAD

    def check(self, head_dim: int = 128, dtype: str = "float16") -> str | None:
        """``None`` if this tile config can run head dim ``head_dim`` in ``dtype``, else the reason."""
        if dtype not in ATTENTION_DTYPES:
            return f"dtype {dtype!r} is not supported (supported: {', '.join(ATTENTION_DTYPES)})"
        if head_dim not in ATTENTION_HEAD_DIMS:
            return f"head_dim={head_dim} is not supported (supported: {ATTENTION_HEAD_DIMS})"
        if self.consumers not in CONSUMER_REGS:
            return f"consumers={self.consumers}: 1, 2 or 3 consumer warpgroups are supported"
        if self.block_m != 64 * self.consumers:
            return (f"block_m={self.block_m} must be 64 * consumers = {64 * self.consumers} "
                    "(each consumer warpgroup owns 64 query rows)")
        if self.block_n % 16 or not 16 <= self.block_n <= 256:
            return f"block_n={self.block_n} must be a multiple of 16 in [16, 256] (wgmma N and the k16 steps of P V)"
        if self.stages < 2:
            return f"stages={self.stages}: at least 2 are needed to overlap the TMA loads with compute"
        if self.pingpong and (self.consumers < 2 or not self.overlap):
            return "pingpong needs consumers >= 2 and overlap=True (the turns bracket the two GEMMs of one tile)"
        smem = self.smem_bytes(head_dim)
        if smem > SM90_SMEM_BYTES:
            q_tiles = "2 x " if self.persistent else ""
            return (f"needs {smem} B of shared memory (({q_tiles}block_m {self.block_m} + 2 x {self.stages} stages x "
                    f"block_n {self.block_n}) x {head_dim} x 2 B + barriers) > {SM90_SMEM_BYTES} B (227 KB)")
        regs, limit = self.regs_estimate(head_dim), CONSUMER_REGS[self.consumers][1]
        if regs > limit:
            return (f"needs ~{regs} registers per consumer thread (S {self.block_n // 2} + O {head_dim // 2} + "
                    f"P {self.block_n // 4} + {_REG_OVERHEAD}) > {limit} with {self.consumers} consumer(s)")
        return None

    def as_dict(self) -> dict:
        return asdict(self)

    def name(self) -> str:
        flags = "".join(f for f, on in (("o", self.overlap), ("p", self.pingpong), ("t", self.tma_store)) if on)
        return (f"{self.block_m}x{self.block_n}_s{self.stages}_c{self.consumers}" + (f"_{flags}" if flags else "")
                + ("_pers" if self.persistent else ""))


#: Configs the heuristic picks from, per head dim (see :func:`select_attention_config`); every one is
#: checked on the GPU by ``tests/test_attention_sm90.py``.
SM90_ATTENTION_CONFIGS: dict[int, tuple[AttentionConfig, ...]] = {
    64: (AttentionConfig(128, 128, 2, 2), AttentionConfig(192, 128, 2, 3, pingpong=False),
         AttentionConfig(192, 128, 2, 3), AttentionConfig(64, 128, 2, 1, pingpong=False),
         AttentionConfig(128, 128, 2, 2, persistent=True), AttentionConfig(192, 128, 2, 3, persistent=True)),
    128: (AttentionConfig(128, 128, 2, 2), AttentionConfig(128, 176, 2, 2),
          AttentionConfig(64, 128, 2, 1, pingpong=False), AttentionConfig(128, 128, 2, 2, persistent=True)),
}
_BY_NAME = {c.name(): c for cs in SM90_ATTENTION_CONFIGS.values() for c in cs}
#: From this many keys on, causal runs non-persistent: the static tile walk of the persistent grid
#: cannot balance causal tiles of very unequal length (H200, s8192 causal: -8% D=128, -13% D=64).
_CAUSAL_NONPERSISTENT_KV = 4096


def _dynamic(batch) -> bool:
    """``batch`` is a run-time variable (``None`` or a ``tirx.Var``): one kernel for every batch."""
    return batch is None or isinstance(batch, tvm.tirx.Var)


def _problem_reason(batch, seq_q, seq_kv, heads_q, heads_kv, head_dim, dtype, causal, has_kpad) -> str | None:
    if _dynamic(batch):
        if batch is not None and str(batch.ty) not in ("int32", "int64"):
            return f"batch={batch!r}: a dynamic batch must be an int32/int64 tirx.Var"
    dims = (("seq_q", seq_q), ("seq_kv", seq_kv), ("heads_q", heads_q), ("heads_kv", heads_kv), ("head_dim", head_dim))
    for nm, v in ((("batch", batch),) if not _dynamic(batch) else ()) + dims:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            return f"{nm}={v!r}: shapes must be static positive ints"
    for nm, v in (("causal", causal), ("has_kpad", has_kpad)):
        if not isinstance(v, bool):
            return f"{nm}={v!r} must be a bool"
    if dtype not in ATTENTION_DTYPES:
        return f"dtype {dtype!r} is not supported (supported: {', '.join(ATTENTION_DTYPES)})"
    if head_dim not in ATTENTION_HEAD_DIMS:
        return f"head_dim={head_dim} is not supported (supported: {ATTENTION_HEAD_DIMS})"
    if heads_q % heads_kv:
        return f"heads_q={heads_q} is not a multiple of heads_kv={heads_kv} (GQA needs whole groups)"
    if not _dynamic(batch) and batch * max(seq_q * heads_q, seq_kv * heads_kv) * head_dim >= 2**31:
        return (f"Q/K/V/O of {batch}x{max(seq_q * heads_q, seq_kv * heads_kv)}x{head_dim} elements "
                ">= 2^31: 32-bit indexing")
    return None


def select_attention_config(batch: int, seq_q: int, seq_kv: int, heads_q: int, heads_kv: int, head_dim: int,
                            dtype: str = "float16", causal: bool = False, has_kpad: bool = False,
                            num_sms: int = SM90_NUM_SMS) -> AttentionConfig:
    """Heuristic default config, from the H200 sweep of ``benchmarks/attention.py`` (2026-11-21, run 2,
    ``benchmarks/results/2026-11-21-h200/s2-attention.json``); it picks the measured-fastest config at
    14 of the 15 points and one within 2.3% at the last (s8192 D=64 full):

    * fewer than half a wave of 128-row CTAs (BERT batch 1): 64-row tiles, one consumer;
    * D = 64: 192 query rows (three consumers, round-robin turns), or 128 rows for causal and for a
      single KV tile (BERT, S = 128);
    * D = 128: 128 x 128, two consumers (pingpong);
    * persistent (grid = #SMs, next tile's loads overlap this tile's epilogue; 7-20% faster at
      s512-s2048 and BERT batch 32), except causal with >= 4096 keys (see ``_CAUSAL_NONPERSISTENT_KV``);
    * a dynamic ``batch`` (``None`` or a ``tirx.Var``): always persistent, no batch-1 small tile.
    """
    if not _dynamic(batch) and -(-seq_q // 128) * batch * heads_q < num_sms // 2:
        return _BY_NAME["64x128_s2_c1_ot"]
    # a dynamic batch always runs the persistent grid (its launch cannot depend on B)
    persistent = _dynamic(batch) or not (causal and seq_kv >= _CAUSAL_NONPERSISTENT_KV)
    if head_dim == 64:
        name = "128x128_s2_c2_opt" if (causal and persistent) or seq_kv <= 128 else "192x128_s2_c3_opt"
    else:
        name = "128x128_s2_c2_opt"
    return _BY_NAME[name + ("_pers" if persistent else "")]


def check_flash_attention_sm90(batch: int, seq_q: int, seq_kv: int, heads_q: int, heads_kv: int, head_dim: int,
                               dtype: str, causal: bool, has_kpad: bool) -> str | None:
    """``None`` if :func:`make_flash_attention_sm90` supports the problem, else the reason (a sentence)."""
    reason = _problem_reason(batch, seq_q, seq_kv, heads_q, heads_kv, head_dim, dtype, causal, has_kpad)
    if reason:
        return reason
    cfg = select_attention_config(batch, seq_q, seq_kv, heads_q, heads_kv, head_dim, dtype, causal, has_kpad)
    return cfg.check(head_dim, dtype)


def _default_scale(head_dim: int, scale) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None (1/sqrt(head_dim)), given {scale!r}")
    return float(scale)


def _symbol(batch, seq_q, seq_kv, heads_q, heads_kv, head_dim, dtype, causal, has_kpad) -> str:
    dt = {"float16": "f16", "bfloat16": "bf16"}[dtype]
    return (f"kiln_flash_attn_sm90_b{'dyn' if _dynamic(batch) else batch}_q{seq_q}_k{seq_kv}_h{heads_q}x{heads_kv}_d{head_dim}_{dt}"
            + ("_causal" if causal else "") + ("_kpad" if has_kpad else ""))


def make_flash_attention_sm90(batch: int, seq_q: int, seq_kv: int, heads_q: int, heads_kv: int, head_dim: int,
                              dtype: str = "float16", causal: bool = False, has_kpad: bool = False,
                              scale: float | None = None, config: AttentionConfig | None = None
                              ) -> tvm.tirx.PrimFunc:
    """The TIRx PrimFunc of flash attention for sm_90a.

    Parameters: ``(Q[B,Sq,Hq,D], K[B,Skv,Hkv,D], V[B,Skv,Hkv,D], [kpad[B,Skv] float32], O[B,Sq,Hq,D])``.
    ``batch`` may be ``None`` or an int32/int64 ``tirx.Var`` (a dynamic batch): B is then a run-time dimension,
    the grid persistent, and the host code asserts 32-bit indexing.
    Attributes: ``kiln.rule = "kiln.attention_sm90"``, ``kiln.attention_config``,
    ``tirx.is_scheduled = True``, ``global_symbol`` (names the problem). A query row whose keys are
    all masked (every ``kpad`` ``-inf``) gets 0, not NaN. ``scale=None`` means ``1/sqrt(head_dim)``. Raises
    ``NotImplementedError`` (with the reason of :func:`check_flash_attention_sm90`) for an unsupported
    problem and ``ValueError`` for an invalid config or scale.
    """
    reason = _problem_reason(batch, seq_q, seq_kv, heads_q, heads_kv, head_dim, dtype, causal, has_kpad)
    if reason:
        raise NotImplementedError(f"sm_90a flash attention: {reason}")
    cfg = config if config is not None else select_attention_config(
        batch, seq_q, seq_kv, heads_q, heads_kv, head_dim, dtype, causal, has_kpad)
    if _dynamic(batch):
        cfg = replace(cfg, persistent=True)
        batch = tvm.tirx.Var("b", "int64") if batch is None else batch
    bad = cfg.check(head_dim, dtype)
    if bad:
        raise ValueError(f"invalid sm_90a attention config {cfg.name()} for head_dim={head_dim} {dtype}: {bad}")
    sc = _default_scale(head_dim, scale)
    name = _symbol(batch, seq_q, seq_kv, heads_q, heads_kv, head_dim, dtype, causal, has_kpad)
    func = build_attention_kernel(batch, seq_q, seq_kv, heads_q, heads_kv, head_dim, dtype, causal, has_kpad,
                                  sc, cfg, name=name)
    return func.with_attrs({"kiln.rule": "kiln.attention_sm90", "kiln.attention_config": cfg.name(),
                            "tirx.is_scheduled": True})


def build_flash_attention_sm90(func: tvm.tirx.PrimFunc):
    """``tvm.compile`` the PrimFunc for sm_90a with the TIRx pipeline (CUDA source; JIT-compiled
    when the module is loaded on a GPU)."""
    name = str(func.attrs["global_symbol"])
    return tvm.compile(tvm.IRModule({name: func}), tvm.target.Target(SM90A_TARGET), tir_pipeline="tirx")


def attention_flops(batch: int, seq_q: int, seq_kv: int, heads: int, head_dim: int, causal: bool) -> float:
    """``4 * B * H * Sq * Skv * D`` (the two GEMMs), halved for causal (the usual convention)."""
    f = 4.0 * batch * heads * seq_q * seq_kv * head_dim
    return f / 2 if causal else f


def attention_reference(q, k, v, causal: bool = False, kpad=None, scale: float | None = None):
    """fp32 reference in BSHD: ``softmax(q k^T * scale + kpad + causal) v``; rows whose keys are all
    ``-inf`` give 0 (the kernel's convention; torch gives NaN). Returns ``[B, Sq, Hq, D]`` float32."""
    import torch
    B, Sq, Hq, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    sc = _default_scale(D, scale)
    qf = q.float().permute(0, 2, 1, 3)
    kf = k.float().permute(0, 2, 1, 3).repeat_interleave(Hq // Hkv, dim=1)
    vf = v.float().permute(0, 2, 1, 3).repeat_interleave(Hq // Hkv, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * sc
    if kpad is not None:
        s = s + kpad.float()[:, None, None, :]
    if causal:
        i = torch.arange(Sq, device=q.device)[:, None]
        j = torch.arange(Skv, device=q.device)[None, :]
        s = s.masked_fill(j > i, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)
    return (p @ vf).permute(0, 2, 1, 3).contiguous()


class FlashAttentionSM90:
    """A built kernel callable on CUDA torch tensors: ``fa(q, k, v, kpad=None, out=None) -> out``.

    ``batch=None`` builds the dynamic-batch kernel (one build, any batch per call).

    Tensors are passed zero-copy through DLPack (contiguous BSHD); the launch goes to TVM's current
    stream of the device (the default stream, torch's default stream too).
    """

    def __init__(self, batch: int, seq_q: int, seq_kv: int, heads_q: int, heads_kv: int, head_dim: int,
                 dtype: str = "float16", causal: bool = False, has_kpad: bool = False,
                 scale: float | None = None, config: AttentionConfig | None = None):
        self.batch, self.seq_q, self.seq_kv = batch, seq_q, seq_kv
        self.heads_q, self.heads_kv, self.head_dim = heads_q, heads_kv, head_dim
        self.dtype, self.causal, self.has_kpad = dtype, causal, has_kpad
        self.scale = _default_scale(head_dim, scale) if isinstance(head_dim, int) else scale
        self.func = make_flash_attention_sm90(batch, seq_q, seq_kv, heads_q, heads_kv, head_dim, dtype, causal,
                                              has_kpad, scale, config)
        self.config_name = str(self.func.attrs["kiln.attention_config"])
        self.ex = build_flash_attention_sm90(self.func)
        self._f = None

    @property
    def source(self) -> str:
        return cuda_source(self.ex)

    def __call__(self, q, k, v, kpad=None, out=None):
        import torch
        if self._f is None:
            self._f = self.ex[str(self.func.attrs["global_symbol"])]
        tdt = getattr(torch, self.dtype)
        B, Sq, Skv, Hq, Hkv, D = self.batch, self.seq_q, self.seq_kv, self.heads_q, self.heads_kv, self.head_dim
        if _dynamic(B):          # one kernel for every batch: the call's batch is q's
            B = int(q.shape[0]) if q is not None and q.dim() == 4 and q.shape[0] >= 1 else -1
        want = {"q": (q, (B, Sq, Hq, D), tdt), "k": (k, (B, Skv, Hkv, D), tdt), "v": (v, (B, Skv, Hkv, D), tdt)}
        if self.has_kpad:
            want["kpad"] = (kpad, (B, Skv), torch.float32)
        elif kpad is not None:
            raise ValueError("kpad given but the kernel was built with has_kpad=False")
        if out is None:
            out = torch.empty((B, Sq, Hq, D), dtype=tdt, device=q.device)
        want["out"] = (out, (B, Sq, Hq, D), tdt)
        for nm, (t, shape, dt) in want.items():
            if t is None or tuple(t.shape) != shape or t.dtype != dt or not t.is_cuda or not t.is_contiguous():
                got = None if t is None else (tuple(t.shape), t.dtype, str(t.device), t.is_contiguous())
                raise ValueError(f"{nm}: expected a contiguous CUDA {dt} tensor of shape {shape}, "
                                 f"got (shape, dtype, device, contiguous) = {got}")
        self._f(*[tvm.runtime.from_dlpack(x) for x in (t for t, _, _ in want.values())])
        return out
