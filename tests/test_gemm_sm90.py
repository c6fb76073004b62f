"""kiln's sm_90a GEMM (TMA + wgmma, warp-specialised TIRx): configs, epilogue-as-data, codegen, numerics.

CPU: config validity reasons, epilogue validation, the epilogue formulas (built for llvm and compared
with torch), generated CUDA (wgmma / setmaxnreg / TMA present) and, where nvcc exists, that ptxas
accepts it for sm_90a with no spills. GPU (``-m gpu``): results vs an fp32 torch reference on fresh
random inputs with a NaN-poisoned output, odd M, N/K tails, both dtypes, several epilogues and configs.
"""
from __future__ import annotations

import dataclasses
import math
import re
import shutil

import numpy as np
import pytest
import torch

import tvm
from _ptxas import ptxas_sm90a
from kiln import knobs
from kiln.schedules.configs import (SM90_DEFAULT, SM90_GEMM_CONFIGS, SM90_PERSISTENT_CONFIGS, SM90_PINGPONG_CONFIGS,
                                    GemmConfig, select_sm90_config)
from kiln.schedules.gemm_sm90 import (Epilogue, GemmSM90, build_gemm_sm90, cuda_source, make_gemm_sm90,
                                      make_gemm_sm90_kernels, torch_reference)

SMALL = GemmConfig(64, 64, 64, 6, 1, 8)
BIAS_GELU = Epilogue(("bias", "gelu_tanh"))


# --------------------------------------------------------------------------- configs
def test_default_config_valid_for_benchmark_shapes():
    assert SM90_DEFAULT.check(8192, 8192, 8192, "float16") is None
    for M in (1, 7, 128, 129, 1000, 1024, 4096):
        for N, K in ((1024, 1024), (3072, 1024), (4096, 1024), (1024, 4096)):
            for dt in ("float16", "bfloat16"):
                cfg = select_sm90_config(M, N, K, dt)
                base = dataclasses.replace(cfg, split_k=1)
                assert base in SM90_GEMM_CONFIGS + SM90_PERSISTENT_CONFIGS and cfg.check(M, N, K, dt) is None


def test_heuristic_matches_h200_sweep():
    """Picks measured fastest (or within noise) on the H200 sweep of benchmarks/results/2026-11-21-h200."""
    expect = {(8192, 8192, 8192): "128x256x64_s4_c2_g8", (128, 1024, 1024): "64x64x64_s6_c1_g8",
              (128, 1024, 4096): "64x64x64_s6_c1_g8", (1024, 1024, 1024): "64x64x64_s6_c1_g8",
              (1024, 1024, 4096): "64x64x64_s6_c1_g8", (4096, 1024, 4096): "128x256x64_s4_c2_g8",
              (4096, 3072, 1024): "128x256x64_s4_c2_g8_p", (4096, 4096, 1024): "128x256x64_s4_c2_g8_p"}
    for (M, N, K), name in expect.items():     # the tile choice (the sweep had no split-K configs)
        assert dataclasses.replace(select_sm90_config(M, N, K), split_k=1).name() == name, (M, N, K)


def test_heuristic_splits_k_when_tiles_cannot_fill_the_sms():
    # 32 tiles of 64x64 on 264 CTA slots: split a K loop of >= 32 k-tiles while each split keeps >= 8
    assert select_sm90_config(128, 1024, 4096).split_k == 8       # 64 k-tiles, capped at 8 (measured best)
    assert select_sm90_config(128, 1024, 2048).split_k == 4       # 32 k-tiles
    assert select_sm90_config(128, 1024, 1024).split_k == 1       # 16 k-tiles: splits lost at K = 1024
    assert select_sm90_config(128, 4096, 4096).split_k == 2       # 128 tiles: only 2 fit one wave
    assert select_sm90_config(1024, 1024, 4096).split_k == 1      # 256 tiles already fill the slots
    assert select_sm90_config(128, 64, 64).split_k == 1           # one k-tile
    assert select_sm90_config(128, 1024, 1984).split_k == 1       # 31 k-tiles


@pytest.mark.parametrize("cfg,problem,needle", [
    (GemmConfig(128, 256, 64, 5, 2, 8), (256, 256, 256, "float16"), "shared memory"),
    (GemmConfig(128, 256, 64, 4, 1, 8), (256, 256, 256, "float16"), "block_m=128 must be 64 * consumers"),
    (GemmConfig(192, 128, 64, 4, 3, 8), (256, 256, 256, "float16"), "consumers=3"),
    (GemmConfig(128, 264, 64, 2, 2, 8), (256, 256, 256, "float16"), "block_n=264"),
    (GemmConfig(128, 128, 32, 4, 2, 8), (256, 256, 256, "float16"), "block_k=32"),
    (GemmConfig(128, 128, 64, 1, 2, 8), (256, 256, 256, "float16"), "stages=1"),
    (SM90_DEFAULT, (256, 256, 100, "float16"), "K=100 is not a multiple of 8"),
    (SM90_DEFAULT, (256, 250, 256, "float16"), "N=250 is not a multiple of 8"),
    (SM90_DEFAULT, (256, 256, 256, "float32"), "dtype 'float32'"),
    (SM90_DEFAULT, (0, 256, 256, "float16"), "M=0"),
    (GemmConfig(64, 64, 64, 6, 1, 8, split_k=3), (128, 1024, 1024, "float16"), "split_k=3 does not divide the 16"),
    (GemmConfig(128, 128, 64, 6, 2, 8, True, 2), (128, 1024, 1024, "float16"), "split_k > 1 with persistent"),
    (GemmConfig(64, 64, 64, 6, 1, 8, split_k=0), (128, 1024, 1024, "float16"), "split_k=0 must be >= 1"),
    (GemmConfig(128, 128, 64, 4, 2, 8, True, pingpong=True), (256, 256, 256, "float16"), "pingpong needs"),
    (GemmConfig(64, 128, 64, 4, 2, 8, False, pingpong=True), (256, 256, 256, "float16"), "pingpong needs"),
])
def test_config_check_reasons(cfg, problem, needle):
    reason = cfg.check(*problem)
    assert reason is not None and needle in reason, reason


def test_config_smem_budget():
    for cfg in SM90_GEMM_CONFIGS:
        assert cfg.check_tile() is None, cfg
        assert cfg.smem_bytes() <= 227 * 1024
    assert GemmConfig(128, 256, 64, 4, 2, 8).smem_bytes() == 4 * (128 + 256) * 64 * 2 + 64


def test_unsupported_problem_raises():
    with pytest.raises(NotImplementedError, match="K=100"):
        make_gemm_sm90(64, 64, 100, "float16")
    with pytest.raises(NotImplementedError, match="float32"):
        make_gemm_sm90(64, 64, 64, "float32")
    with pytest.raises(ValueError, match="shared memory"):
        make_gemm_sm90(256, 256, 256, "float16", config=GemmConfig(128, 256, 64, 5, 2, 8))


# --------------------------------------------------------------------------- epilogue as data
def test_epilogue_validation():
    assert Epilogue(("bias", "gelu_tanh")).stages == (("bias",), ("gelu_tanh",))
    assert Epilogue((("scale", 2),)).stages == (("scale", 2.0),)
    e = Epilogue(("bias", "relu", ("residual",)))
    assert e.has_bias and e.has_residual and e.name() == "bias+relu+residual"
    with pytest.raises(ValueError, match="unknown epilogue stage"):
        Epilogue(("gelu_exact",))
    with pytest.raises(ValueError, match="takes 1 argument"):
        Epilogue(("scale",))
    with pytest.raises(ValueError, match="only once"):
        Epilogue(("bias", "relu", "bias"))
    with pytest.raises(ValueError, match="finite"):
        Epilogue((("scale", float("nan")),))


def _run_epilogue_llvm(epi: Epilogue, x, b, r):
    """Apply ``epi.apply_tir`` elementwise in a tiny llvm PrimFunc (checks the TIR formulas on CPU)."""
    from tvm.script import tirx as T
    n = x.shape[0]

    @T.prim_func
    def f(X: T.Buffer((n,), "float32"), Bv: T.Buffer((n,), "float32"), R: T.Buffer((n,), "float32"),
          Y: T.Buffer((n,), "float32")):
        for i in range(n):
            Y[i] = epi.apply_tir(X[i], Bv[i], R[i])

    ex = tvm.compile(tvm.IRModule({"main": f}), tvm.target.Target({"kind": "llvm"}))
    out = tvm.runtime.tensor(np.zeros(n, "float32"))
    ex(*[tvm.runtime.tensor(a) for a in (x, b, r)], out)
    return out.numpy()


@pytest.mark.parametrize("stages", [("gelu_tanh",), ("gelu",), ("silu",), ("relu",), ("bias", "gelu_tanh"),
                                    ("bias", "gelu", "residual"),
                                    ("bias", "relu", "residual", ("scale", 0.5), "silu", "gelu_tanh")])
def test_epilogue_tir_matches_torch(stages):
    epi = Epilogue(stages)
    g = np.random.default_rng(len(stages))
    x, b, r = (g.standard_normal(257).astype("float32") * 3 for _ in range(3))
    got = _run_epilogue_llvm(epi, x, b, r)
    want = epi.apply_torch(torch.from_numpy(x).double(), torch.from_numpy(b).double(),
                           torch.from_numpy(r).double()).numpy()
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


# --------------------------------------------------------------------------- codegen (CPU)
_CODEGEN_CASES = [
    (4096, 4096, 1024, "float16", None, SM90_DEFAULT),
    (1000, 3072, 1024, "bfloat16", BIAS_GELU, GemmConfig(128, 128, 64, 6, 2, 8)),
    (7, 1024, 4096, "float16", BIAS_GELU, SMALL),
    (129, 200, 1000, "bfloat16", Epilogue(("bias", "relu", "residual", ("scale", 0.5))),
     GemmConfig(64, 128, 64, 4, 1, 8)),
    (2000, 4096, 264, "float16", BIAS_GELU, SM90_PERSISTENT_CONFIGS[0]),
]
SPLIT4 = GemmConfig(64, 64, 64, 6, 1, 8, split_k=4)


def test_split_k_codegen_two_kernels(tmp_path):
    epi = Epilogue(("bias", "gelu", "residual"))
    part, red = make_gemm_sm90_kernels(129, 1024, 1000, "bfloat16", epi, SPLIT4)
    assert [p.name for p in part.params] == ["A", "B", "C"] and [p.name for p in red.params] == ["P", "Bias", "Res", "C"]
    assert [int(v) for v in part.params[-1].shape] == [4, 129, 1024]
    assert str(part.params[-1].dtype) == "float32"
    src = cuda_source(build_gemm_sm90(part, red))
    assert "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16" in src
    assert "kiln_store2_f32((&(C_ptr[((((((int)blockIdx.x) / 48) * 132096)" in src   # split = bid // 48 tiles
    assert "erff(" in src and "kiln_store2_bf16" in src
    with pytest.raises(ValueError, match="make_gemm_sm90_kernels"):
        make_gemm_sm90(129, 1024, 1024, "float16", None, SPLIT4)
    with knobs.scope(tables_dir=str(tmp_path)):                                 # no table: the heuristic
        assert len(make_gemm_sm90_kernels(129, 1024, 4096, "float16")) == 2    # splits K = 4096 four ways


@pytest.fixture(scope="module")
def built():
    out = {}
    for case in _CODEGEN_CASES:
        M, N, K, dt, epi, cfg = case
        func = make_gemm_sm90(M, N, K, dt, epi, cfg)
        out[case] = (func, cuda_source(build_gemm_sm90(func)))
    return out


@pytest.mark.parametrize("case", _CODEGEN_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[3]}-{c[5].name()}")
def test_codegen_hopper_instructions(built, case):
    M, N, K, dt, epi, cfg = case
    func, src = built[case]
    ab = {"float16": "f16", "bfloat16": "bf16"}[dt]
    assert f"wgmma.mma_async.sync.aligned.m64n{cfg.block_n}k16.f32.{ab}.{ab}" in src
    assert "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes" in src
    assert "const __grid_constant__ CUtensorMap" in src
    assert "wgmma.wait_group.sync.aligned" in src and "mbarrier.try_wait.parity" in src
    assert f"__launch_bounds__({cfg.threads})" in src
    if cfg.consumers == 2:
        assert "setmaxnreg.inc.sync.aligned.u32" in src and "setmaxnreg.dec.sync.aligned.u32" in src
    n_params = 3 + (epi is not None and epi.has_bias) + (epi is not None and epi.has_residual)
    assert len(func.params) == n_params
    if epi is not None and any(s[0] == "gelu_tanh" for s in epi.stages):
        assert "tanhf" in src
    tiles = -(-M // cfg.block_m) * -(-N // cfg.block_n)
    assert ("for (int lt" in src) == (cfg.persistent and tiles > 132)      # the persistent tile loop


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("case", [_CODEGEN_CASES[0], _CODEGEN_CASES[2], _CODEGEN_CASES[4]],
                         ids=["default", "small", "persistent"])
def test_ptxas_accepts_sm90a_no_spills(built, case, tmp_path):
    assert "C7508" not in ptxas_sm90a(built[case][1], tmp_path), "ptxas ignored setmaxnreg"


# --------------------------------------------------------------------------- numerics (GPU)
def _check(M, N, K, dtype, epi, cfg=None, seed=0, g=None):
    torch.manual_seed(1000 * seed + M + 7 * N + 13 * K)
    tdt = getattr(torch, dtype)
    dev = "cuda"
    a = torch.randn(M, K, device=dev).to(tdt)
    b = (torch.randn(N, K, device=dev) / math.sqrt(K)).to(tdt)
    epi = Epilogue(()) if epi is None else epi
    bias = torch.randn(N, device=dev).to(tdt) if epi.has_bias else None
    res = torch.randn(M, N, device=dev).to(tdt) if epi.has_residual else None
    g = GemmSM90(M, N, K, dtype, epi, cfg) if g is None else g
    for rep in range(2):                       # two fresh input sets, output poisoned each time
        if rep:
            a.normal_()
            b.normal_().div_(math.sqrt(K))
        out = torch.full((M, N), float("nan"), dtype=tdt, device=dev)
        g(a, b, bias=bias, residual=res, out=out)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} elements not written / non-finite"
        ref = torch_reference(a, b, epi, bias, res).double()
        rel = ((out.double() - ref).norm() / ref.norm()).item()
        assert rel <= 1e-2, f"rel err {rel:.3e} (M={M} N={N} K={K} {dtype} {epi.name()} {g.config.name()})"
    return g


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 7, 129, 1000])
@pytest.mark.parametrize("N,K", [(1024, 1024), (3072, 1024), (1024, 4096)])
@pytest.mark.parametrize("epi", [None, BIAS_GELU], ids=["plain", "bias_gelu"])
def test_gemm_fp16_numerics(M, N, K, epi):
    _check(M, N, K, "float16", epi)


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(1, 1024, 1024), (129, 3072, 1024), (1000, 4096, 1024)])
@pytest.mark.parametrize("epi", [None, BIAS_GELU], ids=["plain", "bias_gelu"])
def test_gemm_bf16_numerics(M, N, K, epi):
    _check(M, N, K, "bfloat16", epi)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", SM90_GEMM_CONFIGS, ids=lambda c: c.name())
def test_gemm_every_config(cfg):
    _check(1000, 1024, 1024, "float16", BIAS_GELU, cfg)
    _check(256, 512, 512, "float16", None, cfg)         # tile-aligned M (no row guard)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", SM90_PERSISTENT_CONFIGS, ids=lambda c: c.name())
@pytest.mark.parametrize("M,N,K", [(2000, 4096, 264), (4096, 3072, 1024), (300, 1024, 512)])
def test_gemm_persistent(cfg, M, N, K):
    _check(M, N, K, "float16", BIAS_GELU, cfg)             # > 132 tiles: several tiles per CTA (except the last)
    _check(M, N, K, "bfloat16", None, cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K,cfg", [
    (300, 200, 1000, SM90_DEFAULT),                        # N tail (col guard) + K tail (TMA zero fill)
    (65, 136, 72, SMALL),
    (4096, 1024, 1024, SM90_DEFAULT),
])
def test_gemm_tails_and_chain(M, N, K, cfg):
    _check(M, N, K, "float16", Epilogue(("bias", "relu", "residual", ("scale", 0.5), "silu")), cfg)
    _check(M, N, K, "bfloat16", None, cfg)


def test_pingpong_codegen_orders_the_consumers():
    cfg = SM90_PINGPONG_CONFIGS[0]
    src = cuda_source(build_gemm_sm90(make_gemm_sm90(4096, 4096, 1024, "float16", BIAS_GELU, cfg)))
    assert "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16" in src
    assert src.count("bar.sync") == 1 and src.count("bar.arrive") == 1   # one wait + one hand-over per tile


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", SM90_PINGPONG_CONFIGS, ids=lambda c: c.name())
@pytest.mark.parametrize("M,N,K", [(2000, 4096, 264), (4096, 3072, 1024), (1000, 4096, 1000), (300, 1024, 512)])
def test_gemm_pingpong(cfg, M, N, K):
    _check(M, N, K, "float16", Epilogue(("bias", "gelu", "residual")), cfg)   # > 132 tiles: alternate consumers
    _check(M, N, K, "bfloat16", None, cfg)                                   # (300x1024: one tile per CTA)


@pytest.mark.gpu
@pytest.mark.parametrize("split", [2, 4, 8])
@pytest.mark.parametrize("M,N,K", [(1, 1024, 1024), (129, 1000, 2048), (7, 3072, 4096)])
def test_gemm_split_k(split, M, N, K):
    cfg = GemmConfig(64, 64, 64, 6, 1, 8, split_k=split)
    _check(M, N, K, "float16", Epilogue(("bias", "gelu", "residual")), cfg)
    _check(M, N, K, "bfloat16", None, cfg)


def test_multi_output_codegen_and_reasons():
    part = make_gemm_sm90_kernels(128, 3072, 1024, "float16", Epilogue(("bias",)), SMALL, out_splits=(1024,) * 3)[0]
    assert [p.name for p in part.params] == ["A", "B", "Bias", "C", "C1", "C2"]
    assert [tuple(int(v) for v in p.shape) for p in part.params[3:]] == [(128, 1024)] * 3
    src = cuda_source(build_gemm_sm90(part))
    assert "kiln_store_quad_f16(kiln_sel_ptr((n0_ptr[0] < 1024)" in src
    with pytest.raises(NotImplementedError, match="multiple of block_n=256"):
        make_gemm_sm90_kernels(4096, 1152, 1024, "float16", None, SM90_DEFAULT, out_splits=(1024, 128))
    with pytest.raises(NotImplementedError, match="takes no residual"):
        make_gemm_sm90_kernels(128, 2048, 1024, "float16", Epilogue(("residual",)), SMALL, out_splits=(1024, 1024))


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,splits,cfg", [
    (129, 1024, (1024, 1024, 1024), None), (1, 2048, (2048, 512, 512), None), (4096, 1024, (1024, 1024, 1024), None),
    (130, 4096, (512, 512), GemmConfig(64, 64, 64, 6, 1, 8, split_k=4)),
])
def test_gemm_multi_output(M, K, splits, cfg):
    torch.manual_seed(M + K)
    N = sum(splits)
    epi = Epilogue(("bias", "gelu"))
    a = torch.randn(M, K, device="cuda").half()
    b = (torch.randn(N, K, device="cuda") / math.sqrt(K)).half()
    bias = torch.randn(N, device="cuda").half()
    g = GemmSM90(M, N, K, "float16", epi, cfg, out_splits=splits)
    outs = [torch.full((M, n), float("nan"), dtype=torch.float16, device="cuda") for n in splits]
    g(a, b, bias=bias, out=outs)
    ref = torch_reference(a, b, epi, bias).double()
    for piece, want in zip(outs, ref.split(list(splits), dim=1)):
        assert torch.isfinite(piece).all()
        rel = ((piece.double() - want).norm() / want.norm()).item()
        assert rel <= 1e-2, rel


# --------------------------------------------------------------------------- dynamic M
def test_dynamic_m_codegen():
    """One kernel for every M: M is a kernel argument, the grid a constant (every CTA slot of the 132 SMs), the
    host asserts 32-bit indexing; ptxas takes it for sm_90a without spills where nvcc exists."""
    g = GemmSM90(None, 1024, 4096, "float16", BIAS_GELU, m_hint=2048)
    assert g.config.persistent and g.config.split_k == 1
    src = g.source
    assert "wgmma.mma_async.sync.aligned.m64n" in src and "cp.async.bulk.tensor.2d" in src
    assert re.search(r"kiln_gemm_sm90_kernel\([^)]*int(64_t)? m\)", src), "M must be a kernel argument"
    host = g.ex.mod.inspect_source("ll")
    assert "32-bit indexing" in host
    with pytest.raises(TypeError, match="int32/int64 tirx.Var"):
        make_gemm_sm90_kernels(tvm.tirx.Var("m", "float32"), 1024, 1024, "float16")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_dynamic_m_ptxas_no_spills(tmp_path):
    g = GemmSM90(None, 3072, 1024, "bfloat16", Epilogue(("bias", "gelu", "residual")))
    assert "C7508" not in ptxas_sm90a(g.source, tmp_path), "ptxas ignored setmaxnreg"


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", SM90_GEMM_CONFIGS + SM90_PINGPONG_CONFIGS[:1], ids=lambda c: c.name())
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gemm_dynamic_m_numerics(cfg, dtype):
    """One build per config, run at M from 1 to past one tile per CTA slot (4099: several tiles per CTA); fresh
    inputs and a NaN-poisoned output each time."""
    epi = Epilogue(("bias", "gelu", "residual"))
    g = GemmSM90(None, 1000, 264, dtype, epi, cfg)
    for M in (1, 7, 129, 1000, 4099):
        _check(M, 1000, 264, dtype, epi, g=g)
