"""kiln's sm_90a decode GEMV (M <= 16; fp16 / bf16 / fp8-e4m3 weights): configs, codegen, numerics.

CPU: config reasons, the heuristic on the Llama-3-8B decode shapes, the byte floor, argument checks
of the torch wrapper, generated CUDA (16-byte streaming weight loads, mma.sync m16n8k16, the fp8
conversion, launch bounds) and, where nvcc exists, that ptxas accepts it for sm_90a with no spills.
GPU (``-m gpu``): results vs an fp32 torch reference on fresh random inputs with a NaN-poisoned
output, at odd M / N / K (K tails, N = 8), all weight dtypes and several epilogues.
"""
from __future__ import annotations

import math
import re
import shutil

import pytest
import torch

from _ptxas import ptxas_sm90a
from kiln.schedules.gemm_sm90 import Epilogue
from kiln.schedules.gemv_sm90 import (GemvConfig, GemvSM90, build_gemv_sm90, cuda_source, gemv_bytes,
                                      gemv_reference, make_gemv_sm90, select_gemv_config)
from kiln.verify import TOLERANCES

FP8 = "float8_e4m3fn"
LLAMA_NK = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


# --------------------------------------------------------------------------- configs
@pytest.mark.parametrize("cfg,problem,needle", [
    (GemvConfig(), (1, 4096, 4096, "float32", None), "dtype 'float32'"),
    (GemvConfig(), (1, 4096, 4096, "float16", "int8"), "weight dtype 'int8'"),
    (GemvConfig(), (1, 4096, 4096, "float16", "bfloat16"), "weight dtype 'bfloat16'"),
    (GemvConfig(), (0, 4096, 4096, "float16", None), "M=0"),
    (GemvConfig(), (17, 4096, 4096, "float16", None), "M=17 > 16"),
    (GemvConfig(), (1, 4096, 100, "float16", None), "K=100 is not a multiple of 8"),
    (GemvConfig(), (1, 250, 4096, "float16", FP8), "N=250 is not a multiple of 8"),
    (GemvConfig(), (1, 65536, 65536, "float16", None), "32-bit indexing"),
    (GemvConfig(warps=3), (1, 4096, 4096, "float16", None), "warps=3"),
    (GemvConfig(rows=9), (1, 4096, 4096, "float16", None), "rows=9"),
    (GemvConfig(unroll=0), (1, 4096, 4096, "float16", None), "unroll=0"),
    (GemvConfig(l2_prefetch=100), (1, 4096, 4096, "float16", None), "l2_prefetch=100"),
    (GemvConfig(warps=16, rows=8, unroll=16), (16, 4096, 4096, "float16", FP8), "it would spill"),
])
def test_config_check_reasons(cfg, problem, needle):
    reason = cfg.check(*problem)
    assert reason is not None and needle in reason, reason


@pytest.mark.parametrize("wdt", ["float16", "bfloat16", FP8])
@pytest.mark.parametrize("M", [1, 4, 16])
@pytest.mark.parametrize("N,K", LLAMA_NK)
def test_heuristic_llama_shapes(N, K, M, wdt):
    dt = "bfloat16" if wdt == "bfloat16" else "float16"
    cfg = select_gemv_config(M, N, K, dt, wdt)
    assert cfg.check(M, N, K, dt, wdt) is None
    rg = cfg.groups_per_cta(M, N)
    assert rg % cfg.rows == 0, (rg, cfg)                         # no idle batch slots
    assert -(-(N // 8) // rg) <= 132                             # one wave of CTAs
    assert (N // 8) / 132 / rg >= 0.95                          # balanced over the 132 SMs
    assert cfg.loads_in_flight() * 16 * cfg.threads >= 48 * 1024, cfg     # >= 48 KB of weight loads in flight per SM


def test_heuristic_small_problems():
    cfg = select_gemv_config(1, 8, 1000)                          # one group of 8 rows, K = 1000
    assert cfg.rows == 1 and cfg.groups_per_cta(1, 8) == 1
    assert cfg.warps == 16 and cfg.unroll == 2                    # 32 chunks of 32 k over 16 warps
    cfg = select_gemv_config(1, 4096, 4096, "float16", FP8)       # fp8: the cp.async ring
    assert cfg.stages == 4 and cfg.warps == 8
    cfg = select_gemv_config(16, 28672, 4096, "float16", FP8)     # 4 stages do not fit beside the partials
    assert cfg.stages == 3 and cfg.smem_bytes(16, 28672, weight_dtype=FP8) <= 200 * 1024
    cfg = select_gemv_config(16, 28672, 4096)                     # 16 warps' partials would need 2 waves
    assert cfg.warps == 8 and -(-(28672 // 8) // cfg.groups_per_cta(16, 28672)) <= 132


def test_unsupported_problem_raises():
    with pytest.raises(NotImplementedError, match="K=100"):
        make_gemv_sm90(1, 64, 100)
    with pytest.raises(NotImplementedError, match="M=17"):
        select_gemv_config(17, 64, 64)
    with pytest.raises(NotImplementedError, match="float32"):
        make_gemv_sm90(1, 64, 64, "float32")
    with pytest.raises(ValueError, match="warps=5"):
        make_gemv_sm90(1, 64, 64, config=GemvConfig(warps=5))


def test_gemv_bytes_floor():
    assert gemv_bytes(1, 4096, 4096) == 4096 * 4096 * 2 + 4096 * 2 + 4096 * 2
    assert gemv_bytes(4, 4096, 4096, FP8) == 4096 * 4096 + 4 * 4096 * 2 + 4 * 4096 * 2 + 4 * 4096
    assert gemv_bytes(2, 64, 64, "float16", Epilogue(("bias", "residual"))) == \
        64 * 64 * 2 + 2 * 64 * 2 + 2 * 64 * 2 + 64 * 2 + 2 * 64 * 2


def test_wrapper_checks_arguments():
    g = GemvSM90(3, 64, 1000, "float16", FP8, Epilogue(("bias",)))
    x = torch.zeros(3, 1000, dtype=torch.float16)
    w = torch.zeros(64, 1000, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="x: expected a contiguous, 16-byte aligned CUDA float16 tensor"):
        g.tvm_args(x, w, torch.ones(64), torch.zeros(64, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"scale: expected .* float32 tensor of shape \(64,\), got None"):
        g.tvm_args(x, w, None, torch.zeros(64, dtype=torch.float16))
    g16 = GemvSM90(1, 64, 64)
    with pytest.raises(ValueError, match="only fp8 weights take a scale"):
        g16.tvm_args(torch.zeros(1, 64, dtype=torch.float16), torch.zeros(64, 64, dtype=torch.float16),
                     torch.ones(64))


# --------------------------------------------------------------------------- codegen (CPU)
CP4 = GemvConfig(8, 4, 1, 256, 4)
_CODEGEN_CASES = [                                # (M, N, K, dtype, weight dtype, epilogue, config or heuristic)
    (1, 4096, 4096, "float16", "float16", None, None),
    (16, 28672, 4096, "float16", FP8, Epilogue(("bias", "silu")), None),
    (3, 1000, 1000, "bfloat16", FP8, Epilogue(("residual", "relu")), None),     # K % 16 == 8: split 8-byte loads
    (16, 6144, 4104, "bfloat16", "bfloat16", Epilogue(("gelu_tanh", ("scale", 0.5))), None),
    (4, 4096, 14336, "float16", FP8, None, None),
    (1, 4096, 4096, "float16", "float16", None, CP4),                          # cp.async ring
    (16, 1000, 1000, "bfloat16", FP8, Epilogue(("bias",)), GemvConfig(8, 1, 2, 0, 3)),
]


def _case_id(c):
    return f"{c[0]}x{c[1]}x{c[2]}-{c[3]}-{c[4]}" + (f"-{c[6].name()}" if c[6] else "")


@pytest.fixture(scope="module")
def built():
    out = {}
    for case in _CODEGEN_CASES:
        M, N, K, dt, wdt, epi, cfg = case
        cfg = cfg or select_gemv_config(M, N, K, dt, wdt)
        func = make_gemv_sm90(M, N, K, dt, wdt, epi, cfg)
        out[case] = (func, cfg, cuda_source(build_gemv_sm90(func)))
    return out


@pytest.mark.parametrize("case", _CODEGEN_CASES, ids=_case_id)
def test_codegen(built, case):
    M, N, K, dt, wdt, epi, _ = case
    func, cfg, src = built[case]
    ab = {"float16": "f16", "bfloat16": "bf16"}[dt]
    assert f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32" in src
    assert f"__launch_bounds__({cfg.threads}, 1)" in src
    split8 = wdt == FP8 and K % 16
    hint = f".L2::{cfg.l2_prefetch}B" if cfg.l2_prefetch else ""
    if cfg.stages:                                                          # cp.async ring, read back per lane
        assert "cp.async.ca.shared.global [%0], [%1], 16, %2;" in src              # X pieces (L1-cached)
        assert f"cp.async.wait_group {cfg.stages - 1};" in src and "cp.async.commit_group;" in src
        assert "ld.shared.v4.u32" in src and "ld.global" not in src
        if split8:
            assert "cp.async.ca.shared.global [%0], [%1], 8, %2;" in src
            n_w = len(re.findall(r"\bkiln_cp8x2_w\(\(&", src))
        else:
            assert f"cp.async.cg.shared.global{hint} [%0], [%1], 16, %2;" in src
            n_w = len(re.findall(r"\bkiln_cp16_w_p\d+\(\(&", src))
    else:                                                                   # 16-byte loads into registers
        assert "ld.global.nc.v4.u32" in src and "cp.async" not in src       # X: L1-cached 16-byte loads
        if split8:
            assert "ld.global.nc.L1::no_allocate.v2.u32" in src and "kiln_ldw16" not in src
            n_w = len(re.findall(r"\bkiln_ldw8x2\(wr", src))
        else:
            assert f"ld.global.nc.L1::no_allocate{hint}.v4.u32" in src
            n_w = len(re.findall(r"\bkiln_ldw16_p\d+\(wr", src))
    assert n_w == cfg.rows * cfg.unroll                                     # one trip's weight loads, unrolled
    assert ("cvt.rn.f16x2.e4m3x2" in src) == (wdt == FP8)
    assert ("cvt.rn.bf16x2.f32" in src) == (wdt == FP8 and dt == "bfloat16")
    n_params = 3 + (wdt == FP8) + (epi is not None and epi.has_bias) + (epi is not None and epi.has_residual)
    assert len(func.params) == n_params
    assert str(func.attrs["kiln.rule"]) == "kiln.gemv_sm90" and bool(func.attrs["tirx.is_scheduled"])
    if epi is not None and any(s[0] == "gelu_tanh" for s in epi.stages):
        assert "tanhf" in src


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("case", _CODEGEN_CASES, ids=_case_id)
def test_ptxas_accepts_sm90a_no_spills(built, case, tmp_path):
    ptxas_sm90a(built[case][2], tmp_path)


# --------------------------------------------------------------------------- numerics (GPU)
def _inputs(M, N, K, dtype, wdt, epi, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    tdt = getattr(torch, dtype)
    x = torch.randn(M, K, device="cuda", generator=g).to(tdt)
    wf = torch.randn(N, K, device="cuda", generator=g) / math.sqrt(K)
    if wdt == FP8:
        scale = wf.abs().amax(dim=1).clamp_min(1e-12) / 448.0
        w = (wf / scale[:, None]).to(torch.float8_e4m3fn)
    else:
        scale, w = None, wf.to(tdt)
    bias = torch.randn(N, device="cuda", generator=g).to(tdt) if epi.has_bias else None
    res = torch.randn(M, N, device="cuda", generator=g).to(tdt) if epi.has_residual else None
    return x, w, scale, bias, res


def _check(M, N, K, dtype, wdt, epi=None, config=None):
    epi = Epilogue(()) if epi is None else epi
    g = GemvSM90(M, N, K, dtype, wdt, epi, config)
    for rep in range(2):                                # two fresh input sets, output poisoned each time
        x, w, scale, bias, res = _inputs(M, N, K, dtype, wdt, epi, seed=1000 * rep + M + 7 * N + 13 * K)
        out = torch.full((M, N), float("nan"), dtype=getattr(torch, dtype), device="cuda")
        g(x, w, scale=scale, bias=bias, residual=res, out=out)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} elements not written / non-finite"
        ref = gemv_reference(x, w, scale, epi, bias, res).double()
        err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
        assert err <= TOLERANCES[dtype], (f"max err {err:.3e} (M={M} N={N} K={K} {dtype}/{wdt} {epi.name()} "
                                          f"{g.config.name()})")
    return g


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(1, 8, 1000), (3, 1000, 4104), (16, 6144, 4096), (16, 8, 4104), (1, 1000, 1000)])
@pytest.mark.parametrize("wdt", ["float16", FP8])
def test_gemv_fp16_act(M, N, K, wdt):
    _check(M, N, K, "float16", wdt)


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(1, 1000, 1000), (3, 6144, 4104), (16, 1000, 4096)])
@pytest.mark.parametrize("wdt", ["bfloat16", FP8])
def test_gemv_bf16_act(M, N, K, wdt):
    _check(M, N, K, "bfloat16", wdt)


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K,dtype,wdt,stages", [
    (1, 6144, 4096, "float16", "float16", ("bias", "silu")),
    (3, 1000, 4104, "float16", FP8, ("bias", "gelu_tanh")),
    (16, 1000, 1000, "bfloat16", FP8, ("residual", "relu", ("scale", 0.5))),
    (5, 4096, 4096, "bfloat16", "bfloat16", ("bias", "residual")),
    (9, 8, 1000, "float16", "float16", ("bias", "relu", "residual", ("scale", 0.5), "silu", "gelu_tanh")),
])
def test_gemv_epilogues(M, N, K, dtype, wdt, stages):
    _check(M, N, K, dtype, wdt, Epilogue(stages))


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [GemvConfig(8, 1, 16), GemvConfig(16, 2, 4, 0), GemvConfig(4, 8, 2, 128),
                                 GemvConfig(8, 3, 5, 64), CP4, GemvConfig(8, 2, 2, 256, 3),
                                 GemvConfig(16, 3, 1, 0, 4)], ids=lambda c: c.name())
def test_gemv_other_configs(cfg):
    _check(7, 1000, 4104, "float16", "float16", config=cfg)       # batches with idle group slots, K tail
    _check(2, 6144, 4104, "float16", FP8, config=cfg)             # fp8 rows 8-byte aligned: split loads


@pytest.mark.gpu
def test_gemv_cp_async_m16_bf16():
    _check(16, 1000, 4104, "bfloat16", FP8, Epilogue(("bias",)), GemvConfig(8, 2, 2, 256, 3))


PER_BATCH = GemvConfig(8, 7, 1, 256, 3)          # 28 groups per CTA in 4 batches of 7


def test_per_batch_reduction_is_chosen_when_smem_is_short():
    from kiln.schedules.gemv_sm90_kernel import gemv_smem_bytes
    rg = PER_BATCH.groups_per_cta(16, 28672)
    assert rg == 28
    assert gemv_smem_bytes(16, FP8, PER_BATCH, rg)[2] == 2               # two alternating slots, not 4
    assert gemv_smem_bytes(16, "float16", PER_BATCH, rg)[2] == 2
    assert gemv_smem_bytes(1, FP8, PER_BATCH, rg)[2] == 4                 # M = 1: every batch keeps its slot


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,wdt", [("bfloat16", FP8), ("float16", "float16")])
def test_gemv_cp_async_per_batch_reduction(dtype, wdt):
    _check(16, 28672, 1000, dtype, wdt, Epilogue(("bias",)), PER_BATCH)
