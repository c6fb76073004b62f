"""``kiln::fused_moe``: top-k routed mixture of experts with SiLU-gated experts (vLLM's ``fused_moe``).

``fused_moe(hidden_states [T, H], w1 [E, 2I, H], w2 [E, H, I], gating_output [T, E], topk, renormalize)``:
per token, softmax over the ``E`` router logits (fp32), the ``topk`` largest experts (ties to the lower id),
their probabilities renormalised to sum to 1 when ``renormalize``; each chosen expert ``e`` computes
``(silu(x @ w1[e, :I]^T) * (x @ w1[e, I:]^T)) @ w2[e]^T`` and the token's output is the probability-weighted
sum (fp32) over its experts, in ``hidden_states``' dtype. ``w1`` stacks gate then up rows.

Stages (one kernel module per problem, built on first use and cached on disk like every ``kiln.ops`` op;
definitions in :mod:`kiln.ops.moe_te`):

1. ``route``: softmax + top-k (+ renormalise);
2. token sort into ``BM``-row blocks, one expert per block (vLLM's ``moe_align_block_size``, deterministic,
   no atomics): ``count`` (per chunk and expert), ``offsets`` (chunk prefixes, padded expert starts),
   ``pos`` (sorted row of each (token, slot) pair), ``block_expert``, ``scatter`` (token of each row);
3. ``gather`` of the hidden states into sorted order; grouped GEMM 1 (``[MP, 2I]``); ``act``
   (``silu(gate) * up``); grouped GEMM 2 (``[MP, H]``); ``combine`` (top-k weighted sum back to ``[T, H]``).

``MP`` (:func:`kiln.ops.moe_te.moe_rows`) is a static bound of the padded rows, so shapes stay static and
there is no host sync; blocks past the rows in use are skipped by the sm_90a GEMM (their expert is -1).

GEMM kernels, per problem (``kernel_info("fused_moe")`` says which ran, and why sm_90a declined):

* CUDA sm_90a, fp16/bf16, ``H`` and ``I`` multiples of 8: kiln's grouped TIRx GEMM
  (:mod:`kiln.ops.moe_sm90`: TMA + ``wgmma`` tensor cores, one CTA per (block, N-tile), the expert's weight
  rows addressed through the block's expert id read on the device);
* otherwise (fp32, other shapes or archs): the TE grouped GEMM (a gathered-weight contraction that
  dlight's ``Matmul`` does not recognise), scheduled by kiln's rule list on CUDA -- a **SIMT** schedule, no
  tensor cores -- and unscheduled on llvm (CPU is kiln's reference, not a speed target).

The small stages run on CUDA with :func:`kiln.ops.moe_te.schedule_threads_cuda` (one thread per output).
"""
from __future__ import annotations

import functools

import torch
import tvm

from .build import get_kernel, target_for
from .checks import FLOAT_DTYPES, OpInputError, OpUnsupportedError, check_same_device, check_tensor, dtype_name
from . import moe_te as M

__all__ = ["fused_moe", "moe_plan", "make_moe_module", "MOE_FUNCS"]

_SOURCES = ("kiln.ops.moe", "kiln.ops.moe_te", "kiln.ops.moe_sm90", "kiln.schedules.gemm_sm90_kernel",
            "kiln.schedules.configs")
#: Launch order of the module's functions.
MOE_FUNCS = ("kiln_moe_route", "kiln_moe_count", "kiln_moe_offsets", "kiln_moe_pos", "kiln_moe_block_expert",
             "kiln_moe_scatter", "kiln_moe_gather", "kiln_moe_gemm1", "kiln_moe_act", "kiln_moe_gemm2",
             "kiln_moe_combine")
#: Rows per expert block of the TE grouped GEMM (padding waste is small; the SIMT schedule does not tile M).
_TE_BM = 16


@functools.lru_cache(maxsize=1024)
def moe_plan(T_: int, H: int, I: int, E: int, topk: int, dtype: str, device: str) -> tuple:
    """``(gemm kernel params, reason)``: the sm_90a grouped GEMM's block size and tile configs when it
    takes the problem on this device, else the TE GEMM with the reason it does not (``None`` if it does)."""
    te_params = {"BM": _TE_BM, "kernel": "te"}
    dev = torch.device(device)
    if dev.type != "cuda":
        return te_params, "not a CUDA device"
    arch = target_for(dev).arch
    if arch != "sm_90a":
        return te_params, f"arch {arch} is not sm_90a"
    from .moe_sm90 import moe_sm90_configs
    cfgs, reason = moe_sm90_configs(T_, H, I, E, topk, dtype)
    if reason:
        return te_params, reason
    c1, c2 = cfgs
    return {"BM": c1.block_m, "kernel": "sm90a", "config1": c1.name(), "config2": c2.name()}, None


def make_moe_module(params: dict, target_name: str, reason) -> tuple:
    """``(IRModule, info)`` of one problem: the functions of :data:`MOE_FUNCS`, scheduled for CUDA when
    ``target_name == "cuda"`` (the TE GEMMs are left to kiln's rule list)."""
    T_, H, I, E, topk = (params[k] for k in ("T", "H", "I", "E", "topk"))
    dtype, BM = params["dtype"], params["BM"]
    NA = T_ * topk
    MP = M.moe_rows(T_, E, topk, BM)
    small = {
        "kiln_moe_route": M.make_route_te(T_, E, topk, params["gdtype"], params["renormalize"]),
        "kiln_moe_count": M.make_count_te(NA, E),
        "kiln_moe_offsets": M.make_offsets_te(NA, E, BM),
        "kiln_moe_pos": M.make_pos_te(NA, E),
        "kiln_moe_block_expert": M.make_block_expert_te(E, MP // BM, BM),
        "kiln_moe_scatter": M.make_scatter_tir(NA, MP, T_, topk),
        "kiln_moe_gather": M.make_gather_te(T_, MP, H, dtype),
        "kiln_moe_act": M.make_act_te(MP, I, dtype),
        "kiln_moe_combine": M.make_combine_te(T_, H, topk, MP, dtype),
    }
    if target_name == "cuda":
        small = {n: M.schedule_threads_cuda(f) for n, f in small.items()}
    info = {"MP": MP, "BM": BM, "funcs": list(MOE_FUNCS)}
    if params["kernel"] == "sm90a":
        from ..schedules.configs import GemmConfig
        from .moe_sm90 import build_grouped_gemm_sm90
        gemms = {"kiln_moe_gemm1": build_grouped_gemm_sm90(MP, 2 * I, H, E, dtype, GemmConfig.from_name(
                     params["config1"]), "kiln_moe_gemm1"),
                 "kiln_moe_gemm2": build_grouped_gemm_sm90(MP, H, I, E, dtype, GemmConfig.from_name(
                     params["config2"]), "kiln_moe_gemm2")}
        gemms = {n: f.with_attr("kiln.tir_pipeline", "tirx").with_attr("kiln.rule", "kiln.moe_sm90")
                 for n, f in gemms.items()}
        info.update(kernel="kiln.moe_sm90 grouped GEMM (TIRx, TMA + wgmma)", config1=params["config1"],
                    config2=params["config2"])
    else:
        gemms = {"kiln_moe_gemm1": M.make_grouped_gemm_te(MP, 2 * I, H, E, BM, dtype, "kiln_moe_gemm1"),
                 "kiln_moe_gemm2": M.make_grouped_gemm_te(MP, H, I, E, BM, dtype, "kiln_moe_gemm2")}
        info["kernel"] = "te grouped GEMM" + (" (SIMT schedule, no tensor cores)" if target_name == "cuda" else "")
        if reason:
            info["sm90a_declined"] = reason
    funcs = {**small, **gemms}
    return tvm.IRModule({n: funcs[n] for n in MOE_FUNCS}), info


# ------------------------------------------------------------------------------------------ checks
def _check(hidden_states, w1, w2, gating_output, topk, renormalize):
    op = "fused_moe"
    check_tensor(op, "hidden_states", hidden_states, dtypes=FLOAT_DTYPES, ndim=2)
    T_, H = (int(s) for s in hidden_states.shape)
    check_tensor(op, "w1", w1, dtypes=(hidden_states.dtype,), ndim=3)
    E, I2 = int(w1.shape[0]), int(w1.shape[1])
    check_tensor(op, "w1", w1, shape=(None, None, H))
    if E < 1:
        raise OpInputError(op, "w1", "at least one expert ([E >= 1, 2I, H])", f"shape {tuple(w1.shape)}")
    if I2 % 2:
        raise OpInputError(op, "w1", "an even dim 1 (gate and up stacked: [E, 2I, H])", f"shape {tuple(w1.shape)}")
    check_tensor(op, "w2", w2, dtypes=(hidden_states.dtype,), shape=(E, H, I2 // 2))
    check_tensor(op, "gating_output", gating_output, dtypes=FLOAT_DTYPES, shape=(T_, E))
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= E:
        raise OpInputError(op, "topk", f"an int in [1, {E}] (the number of experts)", repr(topk))
    if not isinstance(renormalize, bool):
        raise OpInputError(op, "renormalize", "a bool", repr(renormalize))
    device = check_same_device(op, {"hidden_states": hidden_states, "w1": w1, "w2": w2,
                                    "gating_output": gating_output})
    return device, (T_, H, I2 // 2, E)


# ------------------------------------------------------------------------------------------ torch.library
@torch.library.custom_op("kiln::fused_moe", mutates_args=())
def _fused_moe(hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, gating_output: torch.Tensor,
               topk: int, renormalize: bool) -> torch.Tensor:
    device, (T_, H, I, E) = _check(hidden_states, w1, w2, gating_output, topk, renormalize)
    out = torch.empty((T_, H), dtype=hidden_states.dtype, device=device)
    if T_ == 0 or H == 0:
        return out
    if I == 0:
        raise OpUnsupportedError("kiln.ops.fused_moe: I = 0 (experts with an empty intermediate dim) is not supported")
    dtype = dtype_name(hidden_states.dtype)
    gemm, reason = moe_plan(T_, H, I, E, topk, dtype, str(device))
    params = {"T": T_, "H": H, "I": I, "E": E, "topk": topk, "renormalize": renormalize, "dtype": dtype,
              "gdtype": dtype_name(gating_output.dtype), **gemm}
    kern = get_kernel("fused_moe", params, device, _SOURCES,
                      lambda t: make_moe_module(params, t.name, reason))
    BM, MP = kern.info["BM"], kern.info["MP"]
    NA, NC = T_ * topk, -(-T_ * topk // M.CHUNK)
    i32, f32 = dict(dtype=torch.int32, device=device), dict(dtype=torch.float32, device=device)
    act = dict(dtype=hidden_states.dtype, device=device)
    topk_w, topk_ids = torch.empty((T_, topk), **f32), torch.empty((T_, topk), **i32)
    counts, prefix = torch.empty((NC, E), **i32), torch.empty((NC, E), **i32)
    off, pos = torch.empty((E + 1,), **i32), torch.empty((NA,), **i32)
    block_expert, token = torch.empty((MP // BM,), **i32), torch.empty((MP,), **i32)
    xs, y1 = torch.empty((MP, H), **act), torch.empty((MP, 2 * I), **act)
    a, y2 = torch.empty((MP, I), **act), torch.empty((MP, H), **act)
    w1c, w2c = w1.contiguous(), w2.contiguous()
    ids = topk_ids.view(NA)
    kern["kiln_moe_route"](gating_output.contiguous(), topk_w, topk_ids)
    kern["kiln_moe_count"](ids, counts)
    kern["kiln_moe_offsets"](counts, prefix, off)
    kern["kiln_moe_pos"](ids, prefix, off, pos)
    kern["kiln_moe_block_expert"](off, block_expert)
    kern["kiln_moe_scatter"](pos, token)
    kern["kiln_moe_gather"](hidden_states.contiguous(), token, xs)
    kern["kiln_moe_gemm1"](xs, w1c, block_expert, y1)
    kern["kiln_moe_act"](y1, a)
    kern["kiln_moe_gemm2"](a, w2c, block_expert, y2)
    kern["kiln_moe_combine"](y2, pos, topk_w, out)
    return out


@_fused_moe.register_fake
def _(hidden_states, w1, w2, gating_output, topk, renormalize):
    _, (T_, H, _, _) = _check(hidden_states, w1, w2, gating_output, topk, renormalize)
    return hidden_states.new_empty((T_, H))


# ------------------------------------------------------------------------------------------ public API
def fused_moe(hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, gating_output: torch.Tensor,
              topk: int, renormalize: bool = True) -> torch.Tensor:
    """Top-k routed mixture of SiLU-gated experts (vLLM's ``fused_moe`` interface).

    Parameters
    ----------
    hidden_states : torch.Tensor
        ``[T, H]``, float16 / bfloat16 (float32 too: TE GEMM, no tensor cores), cpu or cuda.
    w1 : torch.Tensor
        ``[E, 2 * I, H]``: per expert the gate rows ``[:I]`` then the up rows ``[I:]``; same dtype.
    w2 : torch.Tensor
        ``[E, H, I]`` (down projection); same dtype.
    gating_output : torch.Tensor
        ``[T, E]`` router logits, any float dtype (softmax in fp32).
    topk : int
        Experts per token, ``1 <= topk <= E``.
    renormalize : bool
        Rescale each token's ``topk`` probabilities to sum to 1.

    Returns
    -------
    torch.Tensor
        ``[T, H]`` in ``hidden_states``' dtype: ``sum_j p_j * (silu(x W_g^T) * (x W_u^T)) W_2^T`` over the
        token's experts ``j``, intermediates (``x W_1^T`` and the activation) rounded to the dtype as vLLM does.

    Raises
    ------
    OpInputError
        Wrong dtype, shape or device of an argument, or ``topk`` out of range (names expected vs given).
    OpUnsupportedError
        ``I = 0``.
    """
    if isinstance(topk, bool) or not isinstance(topk, int):      # the schema would raise an untyped error
        raise OpInputError("fused_moe", "topk", "an int", repr(topk))
    if not isinstance(renormalize, bool):
        raise OpInputError("fused_moe", "renormalize", "a bool", repr(renormalize))
    return torch.ops.kiln.fused_moe(hidden_states, w1, w2, gating_output, topk, renormalize)
