"""kiln's sm_90a fp8 (e4m3) GEMM: configs and their reasons, the dequantised reference, generated CUDA, ptxas, numerics.

CPU: config validity reasons, the heuristic's picks, the fp32 reference against a brute-force sum, the CUDA source
(e4m3 wgmma, TMA, promotion), ptxas sm_90a with no spills for every scale mode, the wrapper's input checks, the
benchmark's ``--fp8 --dry-run``, and that the CUDA source of the verified fp16/bf16 kernels is byte-identical to
what it was before the fp8 kernel was added (sha256 prefixes stored below). GPU (``-m gpu``): results vs the fp32
reference of the dequantised product on fresh random inputs with a NaN-poisoned output, odd M, N and K tails,
every scale mode, both output dtypes, several epilogues and every config.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import shutil

import pytest
import torch

from _ptxas import ptxas_sm90a
from kiln.schedules.configs import (FP8_SCALE_MODES_A, FP8_SCALE_MODES_B, SM90_FP8_CONFIGS,
                                    SM90_FP8_PERSISTENT_CONFIGS, Fp8GemmConfig, GemmConfig, fp8_candidates,
                                    select_fp8_config)
from kiln.schedules.gemm_fp8_sm90 import (GemmFp8SM90, dequantize_fp8, fp8_reference, fp8_scale_shape,
                                          make_gemm_fp8_sm90)
from kiln.schedules.gemm_sm90 import Epilogue, build_gemm_sm90, cuda_source, make_gemm_sm90_kernels
from kiln.verify import TOLERANCES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E4M3 = "wgmma.mma_async.sync.aligned.m64n{}k32.f32.e4m3.e4m3"
MODES = [(a, b) for a in FP8_SCALE_MODES_A for b in FP8_SCALE_MODES_B]
MAIN_MODES = [("tensor", "tensor"), ("row", "row"), ("group", "block")]
CHAIN = Epilogue(("bias", "relu", "residual", ("scale", 0.5), "silu"))
BIAS_GELU = Epilogue(("bias", "gelu_tanh"))


# --------------------------------------------------------------------------- the fp16/bf16 kernels are unchanged
# sha256[:16] of the CUDA source of the fp16/bf16 sm_90a GEMM (verified on an H200), recorded before the fp8 kernel
# was written: config / dtype / epilogue / MxNxK / out_splits / num_sms. A change here means the GPU-verified
# kernels changed: re-verify them on a GPU before updating a hash (a TVM upgrade also changes them).
_EPIS = {"none": Epilogue(()), "bias_gelu_tanh": BIAS_GELU, "chain": CHAIN, "gelu": Epilogue(("gelu",))}
_SM90_GOLDEN = {
    "128x256x64_s4_c2_g8/float16/none/4096x4096x1024/-/132": "26749e88203bf444",
    "128x256x64_s4_c2_g8/float16/chain/129x200x1000/-/132": "b8b5010c9c771b67",
    "128x256x64_s4_c2_g8/float16/bias_gelu_tanh/1000x3072x1024/-/132": "11dcf51a433854d5",
    "128x256x64_s4_c2_g8/float16/gelu/2000x4096x264/-/132": "d0d56e54320570a8",
    "128x256x64_s4_c2_g8/bfloat16/none/4096x4096x1024/-/132": "4bf8ffc23c10d6c6",
    "128x256x64_s4_c2_g8/bfloat16/chain/129x200x1000/-/132": "1b90455ab6bfecd2",
    "128x256x64_s4_c2_g8/bfloat16/bias_gelu_tanh/1000x3072x1024/-/132": "dd6b20b8f699b22d",
    "128x256x64_s4_c2_g8/bfloat16/gelu/2000x4096x264/-/132": "18d35458f5a2e7e0",
    "128x128x64_s6_c2_g8/float16/none/4096x4096x1024/-/132": "c22f886667350dd2",
    "128x128x64_s6_c2_g8/float16/chain/129x200x1000/-/132": "8e38c10393f55d61",
    "128x128x64_s6_c2_g8/float16/bias_gelu_tanh/1000x3072x1024/-/132": "17255e62c1ccb0d5",
    "128x128x64_s6_c2_g8/float16/gelu/2000x4096x264/-/132": "2d03a19a6e4e2f2b",
    "128x128x64_s6_c2_g8/bfloat16/none/4096x4096x1024/-/132": "01387c2c232442ea",
    "128x128x64_s6_c2_g8/bfloat16/chain/129x200x1000/-/132": "01784712c1c81368",
    "128x128x64_s6_c2_g8/bfloat16/bias_gelu_tanh/1000x3072x1024/-/132": "68313ae83025153b",
    "128x128x64_s6_c2_g8/bfloat16/gelu/2000x4096x264/-/132": "92ecb0f04c12986d",
    "64x128x64_s4_c1_g8/float16/none/4096x4096x1024/-/132": "9ee44263e26ef2a4",
    "64x128x64_s4_c1_g8/float16/chain/129x200x1000/-/132": "822af89342cf2d79",
    "64x128x64_s4_c1_g8/float16/bias_gelu_tanh/1000x3072x1024/-/132": "bd7473bf484dd648",
    "64x128x64_s4_c1_g8/float16/gelu/2000x4096x264/-/132": "fef69a06b10846c6",
    "64x128x64_s4_c1_g8/bfloat16/none/4096x4096x1024/-/132": "2c4ef41fcbe33cc5",
    "64x128x64_s4_c1_g8/bfloat16/chain/129x200x1000/-/132": "001e2a1ce1cd10b8",
    "64x128x64_s4_c1_g8/bfloat16/bias_gelu_tanh/1000x3072x1024/-/132": "e3b12f31fcb011e9",
    "64x128x64_s4_c1_g8/bfloat16/gelu/2000x4096x264/-/132": "eb01ff04ad0ec248",
    "64x64x64_s6_c1_g8/float16/none/4096x4096x1024/-/132": "7d9a808603226759",
    "64x64x64_s6_c1_g8/float16/chain/129x200x1000/-/132": "de7e66a23d3005c7",
    "64x64x64_s6_c1_g8/float16/bias_gelu_tanh/1000x3072x1024/-/132": "efa9d414ab816e25",
    "64x64x64_s6_c1_g8/float16/gelu/2000x4096x264/-/132": "5c89870c6e598d63",
    "64x64x64_s6_c1_g8/bfloat16/none/4096x4096x1024/-/132": "71cb5483af900d38",
    "64x64x64_s6_c1_g8/bfloat16/chain/129x200x1000/-/132": "4634ba875d496594",
    "64x64x64_s6_c1_g8/bfloat16/bias_gelu_tanh/1000x3072x1024/-/132": "70a352ef473867c4",
    "64x64x64_s6_c1_g8/bfloat16/gelu/2000x4096x264/-/132": "126339793dcc844a",
    "128x256x64_s4_c2_g8_p/float16/none/4096x4096x1024/-/132": "339f676b0ea7998e",
    "128x256x64_s4_c2_g8_p/float16/chain/129x200x1000/-/132": "b8b5010c9c771b67",
    "128x256x64_s4_c2_g8_p/float16/bias_gelu_tanh/1000x3072x1024/-/132": "11dcf51a433854d5",
    "128x256x64_s4_c2_g8_p/float16/gelu/2000x4096x264/-/132": "42edbb38b6dc1487",
    "128x256x64_s4_c2_g8_p/bfloat16/none/4096x4096x1024/-/132": "fd576cc5e7cc6cf7",
    "128x256x64_s4_c2_g8_p/bfloat16/chain/129x200x1000/-/132": "1b90455ab6bfecd2",
    "128x256x64_s4_c2_g8_p/bfloat16/bias_gelu_tanh/1000x3072x1024/-/132": "dd6b20b8f699b22d",
    "128x256x64_s4_c2_g8_p/bfloat16/gelu/2000x4096x264/-/132": "a527ba93f9246e00",
    "128x128x64_s6_c2_g8_p/float16/none/4096x4096x1024/-/132": "3136433fdcf4973c",
    "128x128x64_s6_c2_g8_p/float16/chain/129x200x1000/-/132": "8e38c10393f55d61",
    "128x128x64_s6_c2_g8_p/float16/bias_gelu_tanh/1000x3072x1024/-/132": "abe47f057ac9737f",
    "128x128x64_s6_c2_g8_p/float16/gelu/2000x4096x264/-/132": "8138d34b17b196bc",
    "128x128x64_s6_c2_g8_p/bfloat16/none/4096x4096x1024/-/132": "f8e65650aeb52ac5",
    "128x128x64_s6_c2_g8_p/bfloat16/chain/129x200x1000/-/132": "01784712c1c81368",
    "128x128x64_s6_c2_g8_p/bfloat16/bias_gelu_tanh/1000x3072x1024/-/132": "c4165d7b2db30ba1",
    "128x128x64_s6_c2_g8_p/bfloat16/gelu/2000x4096x264/-/132": "787c6a90735255d2",
    "64x256x64_s5_c2_g8_p_pp/float16/none/4096x3072x1024/-/132": "894caedfee7e124f",
    "64x256x64_s5_c2_g8_p_pp/float16/none/300x1024x512/-/132": "1a0b259edbc6a290",
    "64x256x64_s5_c2_g8_p_pp/float16/chain/4096x3072x1024/-/132": "e75d837e75f4481b",
    "64x256x64_s5_c2_g8_p_pp/float16/chain/300x1024x512/-/132": "849e2b8009b6b317",
    "64x256x64_s5_c2_g8_p_pp/bfloat16/none/4096x3072x1024/-/132": "2110ebcfe3b087bd",
    "64x256x64_s5_c2_g8_p_pp/bfloat16/none/300x1024x512/-/132": "2664181f505ae26d",
    "64x256x64_s5_c2_g8_p_pp/bfloat16/chain/4096x3072x1024/-/132": "7487e2efef31c51d",
    "64x256x64_s5_c2_g8_p_pp/bfloat16/chain/300x1024x512/-/132": "905777342875bc59",
    "64x128x64_s8_c2_g8_p_pp/float16/none/4096x3072x1024/-/132": "910ce178c002f7e7",
    "64x128x64_s8_c2_g8_p_pp/float16/none/300x1024x512/-/132": "29690d749d3b2c6f",
    "64x128x64_s8_c2_g8_p_pp/float16/chain/4096x3072x1024/-/132": "2fb68a8b05b8b3cb",
    "64x128x64_s8_c2_g8_p_pp/float16/chain/300x1024x512/-/132": "7aa5feaf0cc175ad",
    "64x128x64_s8_c2_g8_p_pp/bfloat16/none/4096x3072x1024/-/132": "6138b0b2b7a2fd85",
    "64x128x64_s8_c2_g8_p_pp/bfloat16/none/300x1024x512/-/132": "c9d47b67d9826b16",
    "64x128x64_s8_c2_g8_p_pp/bfloat16/chain/4096x3072x1024/-/132": "81e6bfac54f152af",
    "64x128x64_s8_c2_g8_p_pp/bfloat16/chain/300x1024x512/-/132": "3ce8f58f02e565da",
    "64x64x64_s6_c1_g8_k2/float16/chain/129x1000x2048/-/132": "ffbf51841b493d4f",
    "64x64x64_s6_c1_g8_k2/bfloat16/chain/129x1000x2048/-/132": "c3c70ffc6fbc73c3",
    "64x64x64_s6_c1_g8_k4/float16/chain/129x1000x2048/-/132": "4dff99e45052464c",
    "64x64x64_s6_c1_g8_k4/bfloat16/chain/129x1000x2048/-/132": "0a983f45571c0a19",
    "64x64x64_s6_c1_g8_k8/float16/chain/129x1000x2048/-/132": "961722c7c8fae41f",
    "64x64x64_s6_c1_g8_k8/bfloat16/chain/129x1000x2048/-/132": "4792d97cc68018b1",
    "64x64x64_s6_c1_g8/float16/bias_gelu_tanh/128x3072x1024/1024+1024+1024/132": "a5b2ee98be003513",
    "64x64x64_s6_c1_g8_k4/bfloat16/bias_gelu_tanh/130x1024x4096/512+512/132": "bc0b6fd361e082ae",
    "128x256x64_s4_c2_g8/bfloat16/none/4096x2048x1024/1024+1024/132": "cba73f1d68c2f65f",
    "128x256x64_s4_c2_g8_p/float16/chain/4096x4096x1024/-/114": "2a706643502e13e7",
    "64x256x64_s5_c2_g8_p_pp/float16/bias_gelu_tanh/4096x3072x1024/1024+2048/132": "09e38660d0966bde",
}


def _sm90_digest(key: str) -> str:
    name, dt, epi, shape, splits, sms = key.split("/")
    M, N, K = (int(x) for x in shape.split("x"))
    outs = None if splits == "-" else tuple(int(x) for x in splits.split("+"))
    funcs = make_gemm_sm90_kernels(M, N, K, dt, _EPIS[epi], GemmConfig.from_name(name), int(sms), out_splits=outs)
    return hashlib.sha256(cuda_source(build_gemm_sm90(*funcs)).encode()).hexdigest()[:16]


def test_sm90_fp16_bf16_sources_byte_identical():
    changed = [k for k, h in _SM90_GOLDEN.items() if _sm90_digest(k) != h]
    assert not changed, f"{len(changed)} of {len(_SM90_GOLDEN)} verified fp16/bf16 kernels changed: {changed[:8]}"


# --------------------------------------------------------------------------- configs
def test_configs_valid_and_named():
    for cfg in SM90_FP8_CONFIGS + SM90_FP8_PERSISTENT_CONFIGS:
        assert cfg.check_tile() is None, cfg
        assert cfg.smem_bytes() <= 227 * 1024 and Fp8GemmConfig.from_name(cfg.name()) == cfg
    assert Fp8GemmConfig().smem_bytes() == 4 * (128 + 256) * 128 + 64      # the fp16 workhorse's 192 KB ring
    with pytest.raises(ValueError, match="not an Fp8GemmConfig name"):
        Fp8GemmConfig.from_name("128x256x64_s4_c2_g8")


@pytest.mark.parametrize("cfg,problem,needle", [
    (Fp8GemmConfig(128, 256, 128, 5, 2, 8), (256, 256, 256), "shared memory"),
    (Fp8GemmConfig(128, 256, 128, 4, 1, 8), (256, 256, 256), "block_m=128 must be 64 * consumers"),
    (Fp8GemmConfig(192, 128, 128, 4, 3, 8), (256, 256, 256), "consumers=3"),
    (Fp8GemmConfig(128, 48, 128, 4, 2, 8), (256, 256, 256), "block_n=48"),
    (Fp8GemmConfig(128, 128, 64, 4, 2, 8), (256, 256, 256), "block_k=64"),
    (Fp8GemmConfig(128, 128, 128, 1, 2, 8), (256, 256, 256), "stages=1"),
    (Fp8GemmConfig(128, 256, 128, 4, 2, 8, promote=True), (256, 256, 256), "256 registers"),
    (Fp8GemmConfig(128, 224, 128, 4, 2, 8, promote=True), (256, 256, 256), "224 registers"),
    (Fp8GemmConfig(), (256, 256, 1000), "K=1000 is not a multiple of 16"),
    (Fp8GemmConfig(), (0, 256, 256), "M=0"),
    (Fp8GemmConfig(), (256, 256, 256, "float32"), "out_dtype 'float32'"),
    (Fp8GemmConfig(), (256, 256, 256, "bfloat16", "block", "tensor"), "scale mode of A 'block'"),
    (Fp8GemmConfig(), (256, 256, 256, "bfloat16", "tensor", "group"), "scale mode of B 'group'"),
    (Fp8GemmConfig(), (256, 256, 256, "bfloat16", "group", "tensor"), "need promote=True"),
    (Fp8GemmConfig(128, 128, 128, 6, 2, 8), (256, 256, 256, "float16", "tensor", "block"), "need promote=True"),
    (Fp8GemmConfig(), (2**16, 2**15, 256), "32-bit indexing"),
])
def test_config_check_reasons(cfg, problem, needle):
    reason = cfg.check(*problem)
    assert reason is not None and needle in reason, reason


def test_fp16_config_block_n_must_fill_the_32_column_store_groups():
    # the fp16/bf16 epilogue stores block_n // 32 groups of 32 columns: block_n = 48 would leave 16 unwritten
    assert "multiple of 32" in GemmConfig(64, 48, 64, 6, 1, 8).check(256, 256, 256, "float16")
    assert GemmConfig(64, 96, 64, 6, 1, 8).check(256, 256, 256, "float16") is None


def test_block_scales_span_at_most_two_b_blocks():
    # n0 is a multiple of block_n: 160 can start at column 32 of a block and end in the next; every shipped tile fits
    wide = Fp8GemmConfig(128, 160, 128, 4, 2, 8, promote=True)
    assert wide.check(256, 512, 256, "bfloat16", "group", "block") is None
    assert Fp8GemmConfig(128, 192, 128, 5, 2, 8, promote=True).b_blocks_per_tile() == 2
    assert Fp8GemmConfig(64, 64, 128, 6, 1, 8, promote=True).b_blocks_per_tile() == 1


def test_heuristic_and_candidates():
    for M, N, K in [(8192, 8192, 8192), (1024, 1024, 1024), (4096, 28672, 4096), (1, 4096, 4096), (129, 203, 272)]:
        for ma, mb in MODES:
            cfg = select_fp8_config(M, N, K, "bfloat16", ma, mb)
            assert cfg.check(M, N, K, "bfloat16", ma, mb) is None
            assert cfg.promote == (ma == "group" or mb == "block")
            cands = fp8_candidates(M, N, K, "bfloat16", ma, mb)
            assert cfg in cands or cfg.persistent
    assert select_fp8_config(8192, 8192, 8192).name() == "fp8_128x256x128_s4_c2_g8"
    assert select_fp8_config(8192, 8192, 8192, mode_a="group", mode_b="block").name() == "fp8_128x192x128_s5_c2_g8_pr"
    assert select_fp8_config(4096, 4096, 1024).persistent                   # 512 tiles: 3.9 waves
    assert select_fp8_config(8192, 8192, 8192, promote=True).promote
    with pytest.raises(NotImplementedError, match="K=100 is not a multiple of 16"):
        select_fp8_config(64, 64, 100)


def test_unsupported_problem_raises():
    with pytest.raises(NotImplementedError, match="K=1000"):
        make_gemm_fp8_sm90(64, 64, 1000)
    with pytest.raises(NotImplementedError, match="float32"):
        make_gemm_fp8_sm90(64, 64, 64, "float32")
    with pytest.raises(ValueError, match="scale modes"):
        make_gemm_fp8_sm90(64, 64, 64, "bfloat16", "block", "tensor")
    with pytest.raises(NotImplementedError, match="need promote=True"):
        make_gemm_fp8_sm90(256, 256, 256, "bfloat16", "group", "block", config=Fp8GemmConfig())
    with pytest.raises(ValueError, match="shared memory"):
        make_gemm_fp8_sm90(256, 256, 256, config=Fp8GemmConfig(128, 256, 128, 5, 2, 8))


# --------------------------------------------------------------------------- the reference (CPU)
def _e4m3(*shape, scale=2.0, gen=None):
    return (torch.randn(*shape, generator=gen) * scale).to(torch.float8_e4m3fn)


def _scales(mode, rows, K, block_rows, gen=None):
    return torch.rand(fp8_scale_shape(mode, rows, K, block_rows), generator=gen) + 0.25


@pytest.mark.parametrize("ma,mb", MODES)
def test_reference_is_the_dequantised_product(ma, mb):
    g = torch.Generator().manual_seed(7)
    M, N, K = 5, 260, 272                              # N and K cross the 128 boundaries with tails
    a, b = _e4m3(M, K, gen=g), _e4m3(N, K, gen=g)
    sa, sb = _scales(ma, M, K, False, g), _scales(mb, N, K, True, g)
    got = fp8_reference(a, b, sa, sb, ma, mb).double()
    want = torch.zeros(M, N, dtype=torch.float64)
    for k in range(K):                                 # sum_k a[m,k] sa(m,k) b[n,k] sb(n,k), scales looked up by hand
        fa = {"tensor": lambda: sa.reshape(()).expand(M), "row": lambda: sa,
              "group": lambda: sa[:, k // 128]}[ma]().double()
        fb = {"tensor": lambda: sb.reshape(()).expand(N), "row": lambda: sb,
              "block": lambda: sb[torch.arange(N) // 128, k // 128]}[mb]().double()
        want += (a[:, k].double() * fa)[:, None] * (b[:, k].double() * fb)[None, :]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="scale mode 'block'"):
        dequantize_fp8(a, sa, "block", False)


# --------------------------------------------------------------------------- codegen (CPU)
_CODEGEN_CASES = [       # M, N, K, out dtype, (mode_a, mode_b), epilogue, config
    (4096, 4096, 1024, "bfloat16", ("tensor", "tensor"), None, Fp8GemmConfig()),
    (1000, 4096, 1008, "float16", ("row", "row"), CHAIN, Fp8GemmConfig()),
    (4096, 4096, 1024, "bfloat16", ("group", "block"), BIAS_GELU, SM90_FP8_CONFIGS[4]),          # 128x192 promote
    (129, 1000, 272, "bfloat16", ("group", "block"), CHAIN, SM90_FP8_CONFIGS[5]),                # 128x128 promote
    (7, 203, 1024, "float16", ("tensor", "block"), Epilogue(("bias", "residual")), SM90_FP8_CONFIGS[7]),  # N % 8
    (2000, 4096, 1024, "bfloat16", ("group", "row"), None, SM90_FP8_PERSISTENT_CONFIGS[2]),      # persistent promote
    (300, 1024, 512, "bfloat16", ("row", "tensor"), BIAS_GELU, SM90_FP8_CONFIGS[2]),             # 1 consumer
    (4096, 4096, 1024, "float16", ("tensor", "tensor"), None, SM90_FP8_PERSISTENT_CONFIGS[0]),   # persistent
    (1000, 1024, 1024, "bfloat16", ("tensor", "row"), None, SM90_FP8_CONFIGS[6]),                # promote, no k-scales
    (1000, 1024, 1024, "bfloat16", ("row", "block"), CHAIN, SM90_FP8_CONFIGS[5]),
    (1000, 1024, 1024, "float16", ("group", "tensor"), BIAS_GELU, SM90_FP8_CONFIGS[4]),
]


def test_codegen_cases_cover_every_scale_mode():
    assert {c[4] for c in _CODEGEN_CASES} == set(MODES)


def _case_id(c):
    return f"{c[0]}x{c[1]}x{c[2]}-{c[3]}-{c[4][0]}x{c[4][1]}-{c[6].name()}"


@pytest.fixture(scope="module")
def built():
    out = {}
    for case in _CODEGEN_CASES:
        M, N, K, dt, (ma, mb), epi, cfg = case
        func = make_gemm_fp8_sm90(M, N, K, dt, ma, mb, epi, cfg)
        out[case] = (func, cuda_source(build_gemm_sm90(func)))
    return out


@pytest.mark.parametrize("case", _CODEGEN_CASES, ids=_case_id)
def test_codegen_e4m3_wgmma(built, case):
    M, N, K, dt, (ma, mb), epi, cfg = case
    func, src = built[case]
    assert E4M3.format(cfg.block_n) in src
    assert "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes" in src
    assert "const __grid_constant__ CUtensorMap" in src and f"__launch_bounds__({cfg.threads})" in src
    assert ("setmaxnreg.inc.sync.aligned.u32" in src) == (cfg.consumers == 2)
    epi = epi or Epilogue(())
    names = ["A", "B", "SA", "SB"] + ["Bias"] * epi.has_bias + ["Res"] * epi.has_residual + ["C"]
    assert [p.name for p in func.params] == names
    assert [tuple(int(v) for v in p.shape) for p in func.params[2:4]] == [fp8_scale_shape(ma, M, K, False),
                                                                          fp8_scale_shape(mb, N, K, True)]
    assert str(func.params[0].dtype) == "uint8" and str(func.params[-1].dtype) == dt
    assert func.attrs["kiln.fp8_scales"] == f"{ma}x{mb}" and func.attrs["kiln.gemm_config"] == cfg.name()
    # promotion: the fresh accumulator of every k-tile is waited for (wait_group 0 inside the K loop) and added
    assert (f"float tot_ptr[{cfg.block_n // 2}]" in src) == cfg.promote
    assert ("wgmma_wait_group_wait_group_sync_aligned_1" in src) != cfg.promote
    assert "kiln_fp8_wait_flag" in src and "kiln_fp8_trap_if" in src        # consumers: no trap in the wgmma loop
    store = "kiln_store_quad_" + {"float16": "f16", "bfloat16": "bf16"}[dt]
    assert (store in src) == (N % 8 == 0)
    tiles = -(-M // cfg.block_m) * -(-N // cfg.block_n)
    assert ("for (int lt" in src) == (cfg.persistent and tiles > 132)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("case", _CODEGEN_CASES, ids=_case_id)
def test_ptxas_accepts_sm90a_no_spills(built, case, tmp_path):
    report = ptxas_sm90a(built[case][1], tmp_path, suppress="177,550,1046")
    assert "C7508" not in report, "ptxas ignored setmaxnreg"
    assert "C7512" not in report and "serialized" not in report, report[-2000:]   # wgmma kept asynchronous


# --------------------------------------------------------------------------- wrapper and benchmark (CPU)
def test_wrapper_builds_and_checks_inputs():
    g = GemmFp8SM90(129, 256, 272, "bfloat16", "group", "block", Epilogue(("bias",)))
    assert g.config.promote and E4M3.format(g.config.block_n) in g.source
    a, b = _e4m3(129, 272), _e4m3(256, 272)
    sa, sb = _scales("group", 129, 272, False), _scales("block", 256, 272, True)
    bias = torch.zeros(256, dtype=torch.bfloat16)
    out = torch.empty(129, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"scale_b: expected .* shape \(2, 3\), got \(\(2, 2\)"):
        g.tvm_args(a, b, sa, sb[:, :2].contiguous(), bias, out=out)      # shapes and dtypes are checked first
    with pytest.raises(ValueError, match=r"bias: expected .*torch.bfloat16"):
        g.tvm_args(a, b, sa, sb, bias.half(), out=out)
    with pytest.raises(ValueError, match=r"a: expected a CUDA tensor, 16-byte aligned"):
        g.tvm_args(a, b, sa, sb, bias, out=out)                          # then the device


def test_benchmark_fp8_dry_run(capsys):
    spec = importlib.util.spec_from_file_location("kiln_bench_gemm", os.path.join(ROOT, "benchmarks", "gemm.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--fp8", "--dry-run", "--shapes", "8192x8192x8192,1024x3072x1024"]) == 0
    out = capsys.readouterr().out
    assert "8192x8192x8192: built fp8 kernels" in out and "group x block" in out
    fl = mod.fp8_floors(8192, 8192, 8192)
    assert fl["bound"] == "compute" and math.isclose(fl["t_compute_us"], 2 * 8192**3 / mod.FP8_PEAK_TFLOPS / 1e6)


# --------------------------------------------------------------------------- numerics (GPU)
def _check(M, N, K, out_dtype, ma, mb, epi=None, cfg=None, promote=False, seed=0):
    torch.manual_seed(1000 * seed + M + 7 * N + 13 * K)
    dev = "cuda"
    odt = getattr(torch, out_dtype)
    epi = Epilogue(()) if epi is None else epi
    g = GemmFp8SM90(M, N, K, out_dtype, ma, mb, epi, cfg, promote)
    for rep in range(2):                       # two fresh input sets, output poisoned each time
        a = (torch.randn(M, K, device=dev) * 2).to(torch.float8_e4m3fn)
        b = (torch.randn(N, K, device=dev) * 2).to(torch.float8_e4m3fn)
        sa = torch.rand(fp8_scale_shape(ma, M, K, False), device=dev) + 0.25
        sb = (torch.rand(fp8_scale_shape(mb, N, K, True), device=dev) + 0.25) / math.sqrt(K)
        bias = torch.randn(N, device=dev).to(odt) if epi.has_bias else None
        res = torch.randn(M, N, device=dev).to(odt) if epi.has_residual else None
        out = torch.full((M, N), float("nan"), dtype=odt, device=dev)
        g(a, b, sa, sb, bias=bias, residual=res, out=out)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} elements not written / non-finite"
        ref = fp8_reference(a, b, sa, sb, ma, mb, epi, bias, res).double()
        rel = ((out.double() - ref).norm() / ref.norm()).item()
        assert rel <= TOLERANCES[out_dtype], (f"rel err {rel:.3e} (M={M} N={N} K={K} {out_dtype} ({ma}, {mb}) "
                                              f"{epi.name()} {g.config.name()})")
    return g


@pytest.mark.gpu
@pytest.mark.parametrize("ma,mb", MODES)
def test_fp8_every_scale_mode(ma, mb):
    _check(129, 1024, 1008, "bfloat16", ma, mb)                        # K tail inside the last 128-block
    _check(1, 3072, 1024, "float16", ma, mb, BIAS_GELU)


@pytest.mark.gpu
@pytest.mark.parametrize("ma,mb", MAIN_MODES)
@pytest.mark.parametrize("M", [1, 7, 129, 1000])
def test_fp8_odd_m(ma, mb, M):
    _check(M, 1024, 1008, "bfloat16", ma, mb)
    _check(M, 3072, 1024, "float16", ma, mb, BIAS_GELU)


@pytest.mark.gpu
@pytest.mark.parametrize("ma,mb", MAIN_MODES)
@pytest.mark.parametrize("M,N,K", [(129, 200, 272), (1000, 203, 1024), (7, 4100, 4096), (4096, 4096, 1024)])
def test_fp8_tails_and_chain(ma, mb, M, N, K):
    _check(M, N, K, "bfloat16", ma, mb, CHAIN)                          # N % 8 != 0 (203): element stores
    _check(M, N, K, "float16", ma, mb, None, promote=True)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", SM90_FP8_CONFIGS + SM90_FP8_PERSISTENT_CONFIGS, ids=lambda c: c.name())
def test_fp8_every_config(cfg):
    for ma, mb in (MAIN_MODES[1:] if cfg.promote else MAIN_MODES[:2]):
        _check(1000, 1024, 1024, "bfloat16", ma, mb, BIAS_GELU, cfg)
        _check(2048, 4096, 1024, "float16", ma, mb, None, cfg)        # > 132 tiles (persistent loops), no row guard
