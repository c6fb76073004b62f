"""kiln's sm_90a flash attention (TMA + wgmma, warp-specialised TIRx): configs, support reasons, codegen, numerics.

CPU: config validity reasons, problem support reasons, PrimFunc signature and attributes, the fp32
reference against torch's SDPA, generated CUDA (wgmma ss + rs, 4-D TMA load/store, setmaxnreg with
``__launch_bounds__(threads, 1)``) and, where nvcc exists, that ptxas accepts it for sm_90a with no
spills and no serialised wgmma. GPU (``-m gpu``): results vs an fp32 torch reference on fresh random
inputs with a NaN-poisoned output: odd Sq/Skv (1, 7, 129, 1000), causal and not, kpad with fully
masked keys and rows, GQA, D 64/128, fp16/bf16, every shipped config and the plain variants.
"""
from __future__ import annotations

import math
import re
import shutil

import pytest
import torch

from _ptxas import ptxas_sm90a
from kiln.schedules.attention_sm90 import (SM90_ATTENTION_CONFIGS, AttentionConfig, FlashAttentionSM90,
                                           attention_reference, build_flash_attention_sm90,
                                           check_flash_attention_sm90, cuda_source, make_flash_attention_sm90,
                                           select_attention_config)
from kiln.verify import TOLERANCES

C2 = AttentionConfig(128, 128, 2, 2)                                   # 2 consumers, overlap + pingpong
C2_PLAIN = AttentionConfig(128, 128, 2, 2, overlap=False, pingpong=False, tma_store=False)
C1 = AttentionConfig(64, 128, 2, 1, pingpong=False)
C3 = AttentionConfig(192, 128, 2, 3, pingpong=False)


# --------------------------------------------------------------------------- configs and support
@pytest.mark.parametrize("cfg,head_dim,dtype,needle", [
    (AttentionConfig(128, 128, 2, 1), 64, "float16", "block_m=128 must be 64 * consumers"),
    (AttentionConfig(256, 128, 2, 4), 64, "float16", "consumers=4"),
    (AttentionConfig(128, 120, 2, 2), 64, "float16", "block_n=120"),
    (AttentionConfig(128, 272, 2, 2), 64, "float16", "block_n=272"),
    (AttentionConfig(128, 128, 1, 2), 64, "float16", "stages=1"),
    (AttentionConfig(64, 128, 2, 1, pingpong=True), 64, "float16", "pingpong needs consumers >= 2"),
    (AttentionConfig(128, 128, 2, 2, overlap=False, pingpong=True), 64, "float16", "pingpong needs"),
    (AttentionConfig(128, 128, 4, 2), 128, "float16", "shared memory"),
    (AttentionConfig(128, 176, 2, 2, persistent=True), 128, "float16", "(2 x block_m 128"),
    (AttentionConfig(128, 256, 2, 2), 64, "float16", "registers"),
    (AttentionConfig(192, 176, 2, 3, pingpong=False), 128, "float16", "registers"),
    (C2, 96, "float16", "head_dim=96"),
    (C2, 64, "float32", "dtype 'float32'"),
])
def test_config_check_reasons(cfg, head_dim, dtype, needle):
    reason = cfg.check(head_dim, dtype)
    assert reason is not None and needle in reason, reason


def test_shipped_configs_valid():
    for d, cfgs in SM90_ATTENTION_CONFIGS.items():
        for cfg in cfgs:
            for dt in ("float16", "bfloat16"):
                assert cfg.check(d, dt) is None, (d, cfg)
    assert AttentionConfig(128, 128, 3, 2).smem_bytes(128) == (128 + 2 * 3 * 128) * 128 * 2 + 8 * 14
    assert AttentionConfig(128, 128, 2, 2, persistent=True).smem_bytes(64) == (2 * 128 + 4 * 128) * 64 * 2 + 8 * 10


@pytest.mark.parametrize("problem,needle", [
    ((1, 128, 128, 16, 16, 96, "float16", False, False), "head_dim=96"),
    ((1, 128, 128, 16, 16, 64, "float32", False, False), "dtype 'float32'"),
    ((1, 128, 128, 12, 8, 64, "float16", False, False), "not a multiple of heads_kv=8"),
    ((1, 0, 128, 16, 16, 64, "float16", False, False), "seq_q=0"),
    ((1, 128, 128, 16, 16, 64, "float16", 1, False), "causal=1 must be a bool"),
    ((64, 65536, 65536, 64, 64, 128, "float16", False, False), "32-bit indexing"),
])
def test_problem_reasons(problem, needle):
    reason = check_flash_attention_sm90(*problem)
    assert reason is not None and needle in reason, reason
    with pytest.raises(NotImplementedError, match=needle.split("=")[0]):
        make_flash_attention_sm90(*problem)


def test_supported_problems():
    for problem in [(32, 128, 128, 16, 16, 64, "float16", False, True), (1, 1, 1, 8, 2, 128, "bfloat16", True, True),
                    (1, 8192, 8192, 16, 16, 128, "float16", True, False),
                    (3, 1000, 7, 4, 1, 64, "float16", False, False)]:
        assert check_flash_attention_sm90(*problem) is None, problem
        assert select_attention_config(*problem).check(problem[5], problem[6]) is None


def test_make_errors_and_signature():
    with pytest.raises(ValueError, match="invalid sm_90a attention config"):
        make_flash_attention_sm90(1, 128, 128, 4, 4, 128, config=AttentionConfig(128, 128, 4, 2))
    with pytest.raises(ValueError, match="scale must be a finite"):
        make_flash_attention_sm90(1, 128, 128, 4, 4, 64, scale=float("inf"))
    f = make_flash_attention_sm90(2, 100, 70, 8, 2, 64, "bfloat16", causal=True, has_kpad=True, config=C2)
    assert [p.name for p in f.params] == ["Q", "K", "V", "Kpad", "O"]
    assert [tuple(int(x) for x in p.ty.shape) for p in f.params] == [
        (2, 100, 8, 64), (2, 70, 2, 64), (2, 70, 2, 64), (2, 70), (2, 100, 8, 64)]
    assert [str(p.ty.dtype) for p in f.params] == ["bfloat16"] * 3 + ["float32", "bfloat16"]
    assert str(f.attrs["kiln.rule"]) == "kiln.attention_sm90" and bool(f.attrs["tirx.is_scheduled"])
    assert str(f.attrs["kiln.attention_config"]) == C2.name()
    g = make_flash_attention_sm90(2, 100, 70, 8, 2, 64)
    assert [p.name for p in g.params] == ["Q", "K", "V", "O"]
    assert str(g.attrs["global_symbol"]) != str(f.attrs["global_symbol"])


def test_reference_matches_torch_sdpa():
    g = torch.Generator().manual_seed(0)
    B, Sq, Skv, Hq, Hkv, D = 2, 9, 13, 4, 2, 16
    q = torch.randn(B, Sq, Hq, D, generator=g)
    k = torch.randn(B, Skv, Hkv, D, generator=g)
    v = torch.randn(B, Skv, Hkv, D, generator=g)
    kpad = torch.zeros(B, Skv)
    kpad[1, 5:] = float("-inf")
    F = torch.nn.functional
    t = lambda x: x.permute(0, 2, 1, 3).repeat_interleave(Hq // x.shape[2], dim=1)  # noqa: E731
    for causal in (False, True):
        mask = kpad[:, None, None, :].expand(B, Hq, Sq, Skv).clone()
        if causal:
            mask = mask.masked_fill(torch.ones(Sq, Skv, dtype=torch.bool).triu(1), float("-inf"))
        want = F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=mask, scale=0.3).permute(0, 2, 1, 3)
        got = attention_reference(q, k, v, causal=causal, kpad=kpad, scale=0.3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    full = torch.full((B, Skv), float("-inf"))
    assert attention_reference(q, k, v, kpad=full).abs().max() == 0       # all keys masked: 0, not NaN


# --------------------------------------------------------------------------- codegen (CPU)
_CODEGEN_CASES = [
    ((4, 2048, 2048, 16, 16, 128, "float16", False, False), C2),
    ((4, 2048, 2048, 16, 16, 64, "float16", True, False), AttentionConfig(128, 128, 3, 2)),
    ((2, 1000, 129, 8, 2, 128, "bfloat16", True, True), C2),
    ((2, 1000, 1000, 16, 16, 64, "float16", False, True), C3),
    ((1, 8192, 8192, 16, 16, 64, "float16", True, False), AttentionConfig(192, 128, 2, 3)),
    ((4, 2048, 2048, 16, 16, 64, "bfloat16", False, False), AttentionConfig(128, 192, 2, 2)),
    ((4, 1000, 1000, 8, 2, 128, "float16", True, True), AttentionConfig(128, 128, 2, 2, persistent=True)),
    ((8, 128, 128, 16, 16, 64, "float16", False, True), C1),
    ((4, 2048, 2048, 16, 16, 128, "float16", False, False), AttentionConfig(128, 176, 2, 2)),
    ((1, 7, 1000, 4, 4, 128, "bfloat16", False, False), C2_PLAIN),
]


def _case_id(case):
    (B, Sq, Skv, Hq, Hkv, D, dt, causal, kpad), cfg = case
    return f"b{B}q{Sq}k{Skv}h{Hq}x{Hkv}d{D}-{dt}{'-causal' if causal else ''}{'-kpad' if kpad else ''}-{cfg.name()}"


@pytest.fixture(scope="module")
def built():
    out = {}
    for case in _CODEGEN_CASES:
        problem, cfg = case
        func = make_flash_attention_sm90(*problem, config=cfg)
        out[_case_id(case)] = (func, cuda_source(build_flash_attention_sm90(func)))
    return out


@pytest.mark.parametrize("case", _CODEGEN_CASES, ids=_case_id)
def test_codegen_hopper_instructions(built, case):
    (B, Sq, Skv, Hq, Hkv, D, dt, causal, kpad), cfg = case
    func, src = built[_case_id(case)]
    ab = {"float16": "f16", "bfloat16": "bf16"}[dt]
    assert f"wgmma.mma_async.sync.aligned.m64n{cfg.block_n}k16.f32.{ab}.{ab}" in src      # S = Q K^T (ss)
    assert f"wgmma.mma_async.sync.aligned.m64n{D}k16.f32.{ab}.{ab}" in src                 # O += P V
    assert "\"r\"(__a0), \"r\"(__a1), \"r\"(__a2), \"r\"(__a3)" in src                      # ... A from registers
    assert "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes" in src
    assert ("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group" in src) == cfg.tma_store
    assert "const __grid_constant__ CUtensorMap" in src and "ex2.approx.ftz.f32" in src
    assert f"__launch_bounds__({cfg.threads}, 1)" in src
    assert "mbarrier.try_wait.parity" in src and "wgmma.wait_group.sync.aligned" in src
    if cfg.consumers > 1:
        assert "setmaxnreg.inc.sync.aligned.u32" in src and "setmaxnreg.dec.sync.aligned.u32" in src
    assert ("bar.sync" in src) == (cfg.pingpong or cfg.tma_store) and cfg.pingpong == ("bar.arrive" in src)
    assert len(func.params) == 4 + kpad
    tiles = -(-Sq // cfg.block_m) * B * Hq
    assert ("for (int lt = 0; lt < 1;" in src or "for (int lt" not in src) == (not (cfg.persistent and tiles > 132))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("case", _CODEGEN_CASES[:9], ids=_case_id)
def test_ptxas_accepts_sm90a_no_spills(built, case, tmp_path):
    report = ptxas_sm90a(built[_case_id(case)][1], tmp_path, suppress="177,1046,550")
    assert "C7508" not in report, "ptxas ignored setmaxnreg"
    assert "C7512" not in report and "serialized" not in report, report[-2000:]


# --------------------------------------------------------------------------- numerics (GPU)
def _inputs(B, Sq, Skv, Hq, Hkv, D, dtype, kpad_kind, gen):
    tdt = getattr(torch, dtype)
    q = torch.randn(B, Sq, Hq, D, device="cuda", generator=gen).to(tdt)
    k = torch.randn(B, Skv, Hkv, D, device="cuda", generator=gen).to(tdt)
    v = torch.randn(B, Skv, Hkv, D, device="cuda", generator=gen).to(tdt)
    kpad = None
    if kpad_kind is not None:
        kpad = 0.5 * torch.randn(B, Skv, device="cuda", generator=gen)
        masked = torch.rand(B, Skv, device="cuda", generator=gen) < 0.3
        fill = float("-inf") if kpad_kind == "inf" else torch.finfo(torch.float32).min
        kpad = kpad.masked_fill(masked, fill)
        kpad[0, 0] = fill                                   # at least one masked key
        if B > 1:
            kpad[-1, :] = fill                              # a batch whose every key is masked
    return q, k, v, kpad


def _check(B, Sq, Skv, Hq, Hkv, D, dtype="float16", causal=False, kpad_kind=None, cfg=None, scale=None, seed=0,
           fa=None):
    gen = torch.Generator(device="cuda").manual_seed(seed * 7919 + Sq * 31 + Skv)
    if fa is None:
        fa = FlashAttentionSM90(B, Sq, Skv, Hq, Hkv, D, dtype, causal, kpad_kind is not None, scale, cfg)
    tol = TOLERANCES[dtype]
    for rep in range(2):                                     # two fresh input sets, output poisoned each time
        q, k, v, kpad = _inputs(B, Sq, Skv, Hq, Hkv, D, dtype, kpad_kind, gen)
        out = torch.full((B, Sq, Hq, D), float("nan"), dtype=q.dtype, device="cuda")
        fa(q, k, v, kpad=kpad, out=out)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} elements not written / not finite"
        ref = attention_reference(q, k, v, causal=causal, kpad=kpad, scale=scale)
        err = ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
        assert err <= tol, (f"max err / max ref {err:.3e} > {tol} (B={B} Sq={Sq} Skv={Skv} H={Hq}/{Hkv} D={D} "
                            f"{dtype} causal={causal} kpad={kpad_kind} {fa.config_name})")
        if kpad_kind == "inf" and B > 1:
            assert out[-1].abs().max().item() == 0.0, "rows with every key masked must be 0"
    return fa


@pytest.mark.gpu
@pytest.mark.parametrize("Sq,Skv", [(1, 1), (7, 129), (129, 7), (1000, 1000), (129, 1000), (1000, 1)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 128])
def test_attention_odd_shapes_fp16(Sq, Skv, causal, D):
    _check(2, Sq, Skv, 4, 4, D, "float16", causal)


@pytest.mark.gpu
@pytest.mark.parametrize("Sq,Skv,causal", [(7, 7, False), (129, 1000, True), (1000, 129, False)])
@pytest.mark.parametrize("D", [64, 128])
def test_attention_kpad_gqa_bf16(Sq, Skv, causal, D):
    _check(3, Sq, Skv, 8, 2, D, "bfloat16", causal, kpad_kind="inf")


def test_dynamic_batch_codegen():
    """batch=None: one kernel for every batch (B a kernel argument, the persistent grid, a 32-bit assert on the
    host); the name says bdyn."""
    f = make_flash_attention_sm90(None, 196, 196, 8, 8, 64, "float16")
    assert str(f.attrs["global_symbol"]) == "kiln_flash_attn_sm90_bdyn_q196_k196_h8x8_d64_f16"
    assert str(f.attrs["kiln.attention_config"]).endswith("_pers")
    ex = build_flash_attention_sm90(f)
    src = cuda_source(ex)
    assert re.search(r"kiln_flash_attn_sm90_bdyn_\w+_kernel\([^)]*int(64_t)? b\)", src), "B must be a kernel argument"
    assert "32-bit indexing" in ex.mod.inspect_source("ll")
    assert check_flash_attention_sm90(None, 7, 7, 4, 4, 64, "float16", True, True) is None


@pytest.mark.gpu
@pytest.mark.parametrize("Sq,Skv,causal,kpad_kind,D,dtype", [(129, 1000, True, None, 64, "float16"),
                                                           (196, 196, False, None, 64, "float16"),
                                                           (7, 129, False, "inf", 128, "bfloat16")])
def test_attention_dynamic_batch(Sq, Skv, causal, kpad_kind, D, dtype):
    """One dynamic-batch build, run at batch 1, 3 and 40 (past one tile per SM), fresh inputs each time."""
    fa = FlashAttentionSM90(None, Sq, Skv, 8, 4, D, dtype, causal, kpad_kind is not None)
    for B in (1, 3, 40):
        _check(B, Sq, Skv, 8, 4, D, dtype, causal, kpad_kind, fa=fa)


@pytest.mark.gpu
@pytest.mark.parametrize("kpad_kind", ["inf", "finfo_min"])
@pytest.mark.parametrize("B", [1, 8])
def test_attention_bert_kpad(B, kpad_kind):
    _check(B, 128, 128, 16, 16, 64, "float16", False, kpad_kind=kpad_kind)


_EVERY_CONFIG = [(d, c) for d in (64, 128) for c in SM90_ATTENTION_CONFIGS[d]] + [
    (128, C2_PLAIN), (128, AttentionConfig(128, 128, 2, 2, pingpong=False)), (64, AttentionConfig(128, 192, 2, 2))]


@pytest.mark.gpu
@pytest.mark.parametrize("D,cfg", _EVERY_CONFIG, ids=[f"d{d}-{c.name()}" for d, c in _EVERY_CONFIG])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_every_config(D, cfg, causal):
    _check(2, 1000, 1000, 4, 2, D, "float16", causal, kpad_kind="inf" if causal else None, cfg=cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("D,cfg", [(64, AttentionConfig(128, 128, 2, 2, persistent=True)),
                                   (64, AttentionConfig(192, 128, 2, 3, persistent=True)),
                                   (128, AttentionConfig(128, 128, 2, 2, persistent=True)),
                                   (128, AttentionConfig(128, 128, 2, 2, overlap=False, pingpong=False,
                                                         tma_store=False, persistent=True))],
                         ids=lambda x: x.name() if isinstance(x, AttentionConfig) else f"d{x}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_persistent(D, cfg, causal):
    """More tiles than SMs (so the grid is 132 CTAs walking several tiles each), odd Sq/Skv, GQA, kpad."""
    _check(4, 1000, 129 if causal else 1000, 8, 2, D, "float16", causal, kpad_kind="inf" if causal else None,
           cfg=cfg)
    if D == 64 and not causal:
        _check(32, 128, 128, 16, 16, 64, "float16", False, kpad_kind="finfo_min", cfg=cfg)


@pytest.mark.gpu
def test_attention_scale_and_long():
    _check(1, 2048, 2048, 2, 2, 128, "float16", True, scale=0.05)
    _check(1, 300, 300, 2, 1, 64, "bfloat16", False, scale=-0.2)          # scale <= 0: the prescale path


@pytest.mark.gpu
def test_wrapper_rejects_bad_inputs():
    fa = FlashAttentionSM90(1, 64, 64, 2, 2, 64)
    q = torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="q: expected a contiguous CUDA torch.float16 tensor"):
        fa(q.float(), q, q)
    with pytest.raises(ValueError, match="kpad given"):
        fa(q, q, q, kpad=torch.zeros(1, 64, device="cuda"))
    with pytest.raises(ValueError, match="k: expected"):
        fa(q, q[:, :32], q)
    assert math.isclose(fa.scale, 1 / 8)
