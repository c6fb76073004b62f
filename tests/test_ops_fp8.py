"""``kiln.ops.fp8_gemm`` dispatch: kiln's sm_90a fp8 wgmma GEMM where it takes the problem, the dequantise + bf16
GEMM or the TE definition (with the reason) where it does not.

CPU: the plan (:func:`kiln.ops.fp8.fp8_gemm_plan`, a pure function of the problem, arch and SM count) for every
scale-mode pair, odd M, K a multiple of 16 but not of 128, and the declined cases; the reasons in the builder's
info; the CUDA source of the op-built fp8 kernel (e4m3 wgmma); the op on CPU reports the TE kernel and why.
GPU (``-m gpu``): every scale-mode pair at odd shapes against the fp32 reference of the dequantised product, and
``kernel_info`` says the fp8 kernel ran; misaligned / batched inputs; the fallbacks and their reasons.
"""
from __future__ import annotations

import pytest
import torch

import kiln.ops as ops
from kiln import knobs
from kiln.ops import build as B
from kiln.ops.fp8 import _make, _plan_cached, _tma_aligned, fp8_gemm_plan
from kiln.schedules.configs import FP8_SCALE_MODES_A, FP8_SCALE_MODES_B, fp8_needs_promotion
from kiln.verify import TOLERANCES

MODES = [(a, b) for a in FP8_SCALE_MODES_A for b in FP8_SCALE_MODES_B]
#: (M, N, K): odd M (decode row, tails), N with a tile tail / not a multiple of 8, K = 4096 and K % 128 = 16.
SHAPES = [(1, 4096, 4096), (7, 200, 4112), (129, 1000, 4096), (1000, 100, 4112)]


@pytest.fixture(scope="module", autouse=True)
def _cache_dir(tmp_path_factory):
    with knobs.scope(ops_cache_dir=str(tmp_path_factory.mktemp("ops-fp8-cache"))):
        yield


# ------------------------------------------------------------------------------------------- the plan (CPU)
@pytest.mark.parametrize("mode_a,mode_b", MODES)
def test_plan_takes_fp8_kernel(mode_a, mode_b):
    for i, (M, N, K) in enumerate(SHAPES):
        out = ("bfloat16", "float16")[i % 2]
        p = fp8_gemm_plan(M, N, K, mode_a, mode_b, out, i % 2 == 1, "cuda", "sm_90a", 132)
        assert p["kernel"] == "sm90a_fp8" and p["declined"] == "" and "fp8_declined" not in p, p
        # fast accumulation for the k-independent scales, promotion where a scale varies along K
        assert p["promote"] is fp8_needs_promotion(mode_a, mode_b), p
        assert p["config"].endswith("_pr") is p["promote"] and p["num_sms"] == 132
        assert {"M": M, "N": N, "K": K, "mode_a": mode_a, "mode_b": mode_b, "out_dtype": out}.items() <= p.items()


@pytest.mark.parametrize("problem,kernel,fp8_reason,other_reason", [
    ((64, 256, 4104, "row", "row", "bfloat16"), "sm90a_dequant", "K=4104 is not a multiple of 16", None),
    ((64, 256, 4104, "group", "block", "float16"), "sm90a_dequant", "K=4104 is not a multiple of 16", None),
    ((64, 256, 4096, "row", "row", "float32"), "te", "out_dtype 'float32'", "out_dtype float32"),
    ((64, 256, 4100, "tensor", "tensor", "bfloat16"), "te", "K=4100 is not a multiple of 16",
     "K=4100 is not a multiple of 8"),
])
def test_plan_falls_back_with_reason(problem, kernel, fp8_reason, other_reason):
    p = fp8_gemm_plan(*problem, False, "cuda", "sm_90a", 132)
    assert p["kernel"] == kernel and fp8_reason in p["fp8_declined"], p
    if kernel == "sm90a_dequant":
        assert p["declined"] == p["fp8_declined"] and p["config"] and "promote" not in p
    else:
        assert other_reason in p["declined"], p


def test_plan_off_sm90a():
    for dev, arch, reason in (("cpu", "", "not a CUDA device"), ("cuda", "sm_89", "arch sm_89 is not sm_90a")):
        p = fp8_gemm_plan(128, 256, 4096, "row", "row", "bfloat16", True, dev, arch, 0)
        assert p["kernel"] == "te" and p["declined"] == reason and "fp8_declined" not in p, p
    assert dict(_plan_cached(128, 256, 4096, "row", "row", "bfloat16", True, "cpu"))["kernel"] == "te"


def test_builder_info_records_reasons():
    from kiln.target import resolve_target
    t = resolve_target("cuda")
    p = fp8_gemm_plan(64, 256, 4096, "row", "row", "float32", True, "cuda", "sm_90a", 132)
    mod, info = _make(p)(t)
    assert info["kernel"] == "te" and "out_dtype 'float32'" in info["fp8_declined"]
    assert "out_dtype float32" in info["sm90a_declined"] and list(mod.functions.keys())[0].name_hint == "kiln_fp8_gemm"
    p = fp8_gemm_plan(64, 256, 4104, "group", "block", "bfloat16", False, "cuda", "sm_90a", 132)
    mod, info = _make(p)(t)
    assert info["kernel"].startswith("dequantise to bfloat16") and "multiple of 16" in info["fp8_declined"]
    assert info["funcs"][:2] == ["kiln_fp8_dequant_a", "kiln_fp8_dequant_b"]


# ------------------------------------------------------------------------------------------- CUDA source (CPU)
@pytest.mark.parametrize("problem", [(129, 200, 4112, "group", "block", "bfloat16", True),
                                     (7, 100, 4096, "row", "tensor", "float16", False)])
def test_op_built_fp8_kernel_source(problem):
    from kiln.target import device_code, resolve_target
    t = resolve_target("cuda")
    p = fp8_gemm_plan(*problem, "cuda", t.arch, 132)
    assert p["kernel"] == "sm90a_fp8", p
    mod, info = _make(p)(t)
    assert info["kernel"].startswith("kiln.gemm_fp8_sm90") and info["promote"] is p["promote"]
    assert info["scales"] == f"{problem[3]}x{problem[4]}"
    ex, reports = B.build_module(mod, t)                     # the op's build path (schedule check + mixed pipeline)
    assert [(r["func"], r["rule"]) for r in reports] == [("kiln_gemm_fp8_sm90", "kiln.gemm_fp8_sm90")]
    src = "\n".join(text for fmt, text in device_code(ex) if fmt == "cuda")
    bn = int(p["config"].split("x")[1])
    assert f"wgmma.mma_async.sync.aligned.m64n{bn}k32.f32.e4m3.e4m3" in src
    assert "cp.async.bulk.tensor.2d" in src
    # the params passed to the host function: A, B, scales, (bias), C
    func = mod["kiln_gemm_fp8_sm90"]
    assert [str(prm.name) for prm in func.params] == ["A", "B", "SA", "SB"] + (["Bias"] if problem[6] else []) + ["C"]


def test_cache_key_separates_kernels():
    from kiln.ops.cache import cache_key
    from kiln.target import resolve_target
    t = resolve_target("cuda")
    keys = {cache_key(B.cache_document("fp8_gemm", fp8_gemm_plan(129, 256, 4096, ma, mb, "bfloat16", bias, "cuda",
                                                                     "sm_90a", 132), t, ("kiln.ops.fp8",)))
            for ma, mb in (("row", "row"), ("group", "block"), ("tensor", "row")) for bias in (False, True)}
    assert len(keys) == 6
    from kiln.ops.fp8 import _SOURCES             # the fp8 kernel's own modules version the key
    doc = B.cache_document("fp8_gemm", {}, t, _SOURCES)
    assert {"kiln.schedules.gemm_fp8_sm90", "kiln.schedules.gemm_fp8_sm90_kernel"} <= set(doc["sources"])


def test_tma_aligned():
    buf = torch.arange(64 * 32 + 8, dtype=torch.uint8)
    x = buf[8:].view(64, 32)                              # contiguous, address 8 bytes past an aligned one
    assert x.data_ptr() % 16 == 8
    y = _tma_aligned(x)
    assert y.data_ptr() % 16 == 0 and y.is_contiguous() and torch.equal(x, y)
    z = buf[:64 * 32].view(64, 32)
    assert _tma_aligned(z) is z


def test_cpu_op_reports_te():
    torch.manual_seed(0)
    a = (torch.randn(3, 48) * 4).to(torch.float8_e4m3fn)
    b = (torch.randn(20, 48) * 4).to(torch.float8_e4m3fn)
    sa, sb = torch.rand(3, 1) + 0.5, torch.rand(20) + 0.5
    got = ops.fp8_gemm(a, b, sa, sb, out_dtype=torch.float32)
    ref = (a.float() * sa) @ (b.float() * sb[:, None]).T
    assert (got - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    info = [i for i in ops.kernel_info("fp8_gemm", "cpu") if i["params"]["M"] == 3 and i["params"]["K"] == 48]
    assert info and info[-1]["kernel"] == "te" and info[-1]["sm90a_declined"] == "not a CUDA device"


# ------------------------------------------------------------------------------------------- GPU
def _scales(mode, rows, K, dev):
    kb = -(-K // 128)
    return {"tensor": lambda: torch.rand((), device=dev) + 0.25,
            "row": lambda: torch.rand(rows, 1, device=dev) + 0.25,
            "group": lambda: torch.rand(rows, kb, device=dev) + 0.25,
            "block": lambda: torch.rand(-(-rows // 128), kb, device=dev) + 0.25}[mode]()


def _expand(s, mode, rows, K):
    if mode == "tensor":
        return s.reshape(1, 1).expand(rows, K)
    if mode == "row":
        return s.reshape(rows, 1).expand(rows, K)
    s = s.repeat_interleave(128, 1)[:, :K]
    return s.repeat_interleave(128, 0)[:rows] if mode == "block" else s


def _ref(a, b, sa, sb, ma, mb, bias):
    M, K = a.reshape(-1, a.shape[-1]).shape
    N = b.shape[0]
    out = (a.reshape(M, K).float() * _expand(sa, ma, M, K)) @ (b.float() * _expand(sb, mb, N, K)).T
    return out + bias.float() if bias is not None else out


def _check_close(got, ref, dtype, what):
    """Max error against the dtype's tolerance (``kiln.verify``) and the mean error against 1e-2: fp32 reference,
    one rounding to the output dtype (2^-9 / 2^-12 relative) and the wgmma's fp8 accumulation; a wrong scale of
    one 128-block shows in the mean."""
    err = (got.float() - ref).abs()
    tol = TOLERANCES["bfloat16" if dtype == torch.bfloat16 else "float16"]
    assert torch.isfinite(got.float()).all(), f"{what}: non-finite output"
    assert err.max().item() <= tol * max(1.0, ref.abs().max().item()), f"{what}: max err {err.max().item():.3g}"
    rel = err.mean().item() / max(ref.abs().mean().item(), 1e-30)
    assert rel <= 1e-2, f"{what}: mean rel err {rel:.3g}"


def _info_of(M, N, K, ma, mb):
    hits = [i for i in ops.kernel_info("fp8_gemm", "cuda") if (i["params"]["M"], i["params"]["N"], i["params"]["K"],
                                                                i["params"]["mode_a"], i["params"]["mode_b"]) ==
            (M, N, K, ma, mb)]
    assert hits, (M, N, K, ma, mb)
    return hits[-1]


@pytest.mark.gpu
@pytest.mark.parametrize("mode_a,mode_b", MODES)
def test_fp8_kernel_on_cuda(mode_a, mode_b):
    dev = "cuda"
    torch.manual_seed(MODES.index((mode_a, mode_b)))
    for i, (M, N, K) in enumerate(SHAPES):
        od = (torch.bfloat16, torch.float16)[i % 2]
        a = (torch.randn(M, K, device=dev) * 4).to(torch.float8_e4m3fn)
        b = (torch.randn(N, K, device=dev) * 4).to(torch.float8_e4m3fn)
        sa, sb = _scales(mode_a, M, K, dev), _scales(mode_b, N, K, dev)
        bias = torch.randn(N, device=dev, dtype=od) * 8 if i in (1, 2) else None
        got = ops.fp8_gemm(a, b, sa, sb, bias, out_dtype=od)
        assert got.shape == (M, N) and got.dtype == od
        _check_close(got, _ref(a, b, sa, sb, mode_a, mode_b, bias), od, f"{mode_a}x{mode_b} {M}x{N}x{K} {od}")
        info = _info_of(M, N, K, mode_a, mode_b)
        assert info["kernel"].startswith("kiln.gemm_fp8_sm90"), info
        assert info["promote"] is fp8_needs_promotion(mode_a, mode_b) and "fp8_declined" not in info, info


@pytest.mark.gpu
def test_fp8_kernel_batched_and_misaligned_inputs():
    dev = "cuda"
    torch.manual_seed(5)
    M, N, K = 2 * 65, 384, 1024
    store = (torch.randn(M * K + 8, device=dev) * 4).to(torch.float8_e4m3fn)
    a = store[8:].view(2, 65, K)                          # 8 bytes off a 16-byte boundary: the op copies it for TMA
    assert a.data_ptr() % 16 == 8
    b = (torch.randn(N, K, device=dev) * 4).to(torch.float8_e4m3fn)
    sa, sb = torch.rand(2, 65, 1, device=dev) + 0.25, torch.rand(N, device=dev) + 0.25
    got = ops.fp8_gemm(a, b, sa.reshape(M, 1), sb, out_dtype=torch.bfloat16)
    assert got.shape == (2, 65, N)
    _check_close(got.reshape(M, N), _ref(a, b, sa.reshape(M, 1), sb, "row", "row", None), torch.bfloat16, "batched")
    assert _info_of(M, N, K, "row", "row")["kernel"].startswith("kiln.gemm_fp8_sm90")


@pytest.mark.gpu
def test_fallbacks_on_cuda_record_reason():
    dev = "cuda"
    torch.manual_seed(6)
    for M, N, K, od, kernel in ((33, 256, 4104, torch.bfloat16, "dequantise"), (33, 256, 4096, torch.float32, "te")):
        a = (torch.randn(M, K, device=dev) * 4).to(torch.float8_e4m3fn)
        b = (torch.randn(N, K, device=dev) * 4).to(torch.float8_e4m3fn)
        sa, sb = _scales("group", M, K, dev), _scales("block", N, K, dev)
        bias = torch.randn(N, device=dev, dtype=od)
        got = ops.fp8_gemm(a, b, sa, sb, bias, out_dtype=od)
        ref = _ref(a, b, sa, sb, "group", "block", bias)
        if od == torch.float32:
            err = (got - ref).abs().max().item()
            assert err <= 1e-4 * max(1.0, ref.abs().max().item()), err
        else:
            _check_close(got, ref, od, f"fallback {kernel}")
        info = _info_of(M, N, K, "group", "block")
        assert info["kernel"].startswith(kernel) and info["fp8_declined"], info
