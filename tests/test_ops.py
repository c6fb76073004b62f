"""kiln.ops: each op vs torch at odd shapes (CPU llvm builds; CUDA under ``@pytest.mark.gpu``), torch.compile
tracing through the fake implementations, CUDA codegen of every op (built on the CPU, not run), and the on-disk
build cache (memo, disk load by a second process, one build for two racing processes, corrupted and failed
entries)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn.functional as F

import kiln.ops as ops
from kiln import knobs
from kiln.ops import build as B
from kiln.ops.cache import LIBRARY, META, BuildCache, cache_key
from kiln.verify import TOLERANCES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: TOLERANCES["float32"], torch.float16: TOLERANCES["float16"],
       torch.bfloat16: TOLERANCES["bfloat16"]}


@pytest.fixture(scope="module", autouse=True)
def _cache_dir(tmp_path_factory):
    """One fresh cache for the module (tests that count builds make their own)."""
    with knobs.scope(ops_cache_dir=str(tmp_path_factory.mktemp("ops-cache"))):
        yield


def _close(got, ref, dtype, what=""):
    """max |got - ref| <= tol * max(1, max |ref|) with the dtype's tolerance."""
    tol = TOL[dtype] if isinstance(dtype, torch.dtype) else dtype
    err = (got.float() - ref.float()).abs().max().item() if ref.numel() else 0.0
    scale = max(1.0, ref.float().abs().max().item() if ref.numel() else 0.0)
    assert err <= tol * scale, f"{what}: max err {err:.3g} > {tol} * {scale:.3g}"


# ------------------------------------------------------------------------------------------- references
def _rope_ref(x, cos, sin, pos):
    R = 2 * cos.shape[-1]
    half = R // 2
    c, s = cos[pos].float().unsqueeze(-2), sin[pos].float().unsqueeze(-2)
    xf = x.float()
    x1, x2, rest = xf[..., :half], xf[..., half:R], xf[..., R:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], -1)


def _attn_ref(q, k, v, causal, scale, kpad):
    B_, Sq, _, _ = q.shape
    Skv = k.shape[1]
    mask = torch.zeros(B_, 1, Sq, Skv, device=q.device)
    if kpad is not None:
        mask = mask + kpad[:, None, None, :]
    if causal:
        mask = mask.masked_fill(torch.ones(Sq, Skv, device=q.device).triu(1).bool(), float("-inf"))
    o = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2),
                                       attn_mask=mask, scale=scale, enable_gqa=True).transpose(1, 2)
    return torch.nan_to_num(o, nan=0.0)   # kiln: a row with every key masked gives 0


def _decode_ref(q, kc, vc, lens, scale=None):
    C = kc.shape[2]
    mask = (torch.arange(C, device=q.device)[None, :] < lens[:, None].long())[:, None, None, :]
    o = F.scaled_dot_product_attention(q.float()[:, :, None], kc.float(), vc.float(), attn_mask=mask, scale=scale,
                                       enable_gqa=True)[:, :, 0]
    return torch.nan_to_num(o, nan=0.0)


def _fp8_ref(a, b, sa, sb, bias, K):
    M, N = a.reshape(-1, K).shape[0], b.shape[0]

    def expand(s, rows, block):
        if s.numel() == 1:
            return s.reshape(1, 1).expand(rows, K)
        if s.numel() == rows and (s.dim() == 1 or s.shape[1] == 1):
            return s.reshape(rows, 1).expand(rows, K)
        s = s.repeat_interleave(128, 1)[:, :K]
        return s.repeat_interleave(128, 0)[:rows] if block else s

    out = (a.reshape(M, K).float() * expand(sa, M, False)) @ (b.float() * expand(sb, N, True)).T
    return out + bias.float() if bias is not None else out


# ------------------------------------------------------------------------------------------- ops on CPU
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype):
    torch.manual_seed(0)
    x, w, r = torch.randn(3, 5, 77, dtype=dtype), torch.randn(77, dtype=dtype), torch.randn(3, 5, 77, dtype=dtype)
    _close(ops.rms_norm(x, w, 1e-6), F.rms_norm(x.float(), (77,), w.float(), 1e-6), dtype, "rms_norm")
    y, h = ops.rms_norm(x, w, 1e-5, residual=r)
    h_ref = (x.float() + r.float()).to(dtype)
    assert torch.equal(h, h_ref), "new residual = x + residual rounded to the dtype"
    _close(y, F.rms_norm(h_ref.float(), (77,), w.float(), 1e-5), dtype, "fused_add_rms_norm")


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm(dtype):
    torch.manual_seed(1)
    x, r = torch.randn(2, 9, 100, dtype=dtype) * 3 + 1, torch.randn(2, 9, 100, dtype=dtype)
    w, b = torch.randn(100, dtype=dtype), torch.randn(100, dtype=dtype)
    _close(ops.layer_norm(x, w, b, 1e-5), F.layer_norm(x.float(), (100,), w.float(), b.float(), 1e-5), dtype, "ln")
    _close(ops.layer_norm(x, None, None), F.layer_norm(x.float(), (100,)), dtype, "ln no affine")
    y, h = ops.layer_norm(x, w, None, 1e-5, residual=r)
    h_ref = (x.float() + r.float()).to(dtype)
    assert torch.equal(h, h_ref)
    _close(y, F.layer_norm(h_ref.float(), (100,), w.float(), None, 1e-5), dtype, "fused_add_layer_norm")


def test_f32_to_e4m3_matches_torch():
    import tvm
    from tvm import te

    from kiln.ops.fp8 import e4m3_to_f32, f32_to_e4m3
    codes = torch.arange(256, dtype=torch.uint8)
    fin = codes.view(torch.float8_e4m3fn).float()
    fin = fin[torch.isfinite(fin)].unique()
    mids = (fin[1:] + fin[:-1]) / 2                                   # ties: round half to even
    g = torch.Generator().manual_seed(0)
    rnd = torch.randn(60000, generator=g) * torch.exp(torch.randn(60000, generator=g) * 4)
    special = torch.tensor([0.0, -0.0, 448.0, 449.0, 464.0, 1e30, -1e30, float("inf"), float("-inf"), 2 ** -10,
                            3 * 2 ** -11, 1e-30])
    vals = torch.cat([fin, mids, torch.nextafter(mids, torch.full_like(mids, 1e9)), special, rnd]).contiguous()
    n = vals.numel()
    x = te.placeholder((n,), "float32", name="x")
    enc = te.compute((n,), lambda i: f32_to_e4m3(x[i]), name="enc")
    b = te.placeholder((256,), "uint8", name="b")
    dec = te.compute((256,), lambda i: e4m3_to_f32(b[i]), name="dec")
    mod = tvm.IRModule({"enc": te.create_prim_func([x, enc]).with_attr("global_symbol", "enc"),
                        "dec": te.create_prim_func([b, dec]).with_attr("global_symbol", "dec")})
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    got = torch.empty(n, dtype=torch.uint8)
    ex.mod["enc"](vals, got)
    assert torch.equal(got, vals.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8))
    back = torch.empty(256)
    ex.mod["dec"](codes, back)
    ref = codes.view(torch.float8_e4m3fn).float()
    assert torch.equal(back.isnan(), ref.isnan()) and torch.equal(back[~ref.isnan()], ref[~ref.isnan()])


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_norm_fp8_quant(kind):
    torch.manual_seed(9)
    x, r, w = torch.randn(6, 70, dtype=torch.bfloat16), torch.randn(6, 70, dtype=torch.bfloat16), torch.randn(70)
    scale = torch.tensor([0.005])
    h = (x.float() + r.float()).to(torch.bfloat16)
    if kind == "rms":
        q, h_out = ops.rms_norm(x, w, 1e-6, residual=r, quant_scale=scale)
        normed = F.rms_norm(h.float(), (70,), w, 1e-6)
    else:
        q, h_out = ops.layer_norm(x, w, None, 1e-5, residual=r, quant_scale=scale)
        normed = F.layer_norm(h.float(), (70,), w, None, 1e-5)
    ref = (normed / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert q.dtype == torch.float8_e4m3fn and torch.equal(h_out, h)
    qf, rf = q.float(), ref.float()
    assert ((qf - rf).abs() <= rf.abs() / 8 + 2 ** -9).all(), "at most one e4m3 step from torch"
    assert (q.view(torch.uint8) == ref.view(torch.uint8)).float().mean() > 0.95
    assert qf.abs().max() == 448.0, "saturates"
    # the quantised activations feed fp8_gemm with scale_a = the quant scale
    wq = (torch.randn(24, 70) * 8).to(torch.float8_e4m3fn)
    y = ops.fp8_gemm(q, wq, scale, torch.tensor(0.5), out_dtype=torch.float32)
    _close(y, _fp8_ref(q, wq, scale, torch.tensor(0.5), None, 70), 1e-5, "norm -> fp8_gemm")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm(dtype):
    torch.manual_seed(2)
    a, b = torch.randn(2, 7, 45, dtype=dtype), torch.randn(33, 45, dtype=dtype) / 6
    bias, res = torch.randn(33, dtype=dtype), torch.randn(2, 7, 33, dtype=dtype)
    lin = F.linear(a.float(), b.float())
    _close(ops.gemm(a, b), lin, dtype, "plain")
    _close(ops.gemm(a, b, bias, epilogue=("bias", "gelu")), F.gelu(lin + bias.float()), dtype, "bias+gelu")
    _close(ops.gemm(a, b, None, res, epilogue=[("scale", 0.5), "silu", "residual"]),
           F.silu(lin * 0.5) + res.float(), dtype, "scale+silu+residual")
    _close(ops.gemm(a, b, bias, epilogue="bias+gelu_tanh+relu"),
           F.relu(F.gelu(lin + bias.float(), approximate="tanh")), dtype, "string epilogue")


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm_scale_modes(out_dtype):
    torch.manual_seed(3)
    M, N, K = 37, 150, 200
    a = (torch.randn(M, K) * 4).to(torch.float8_e4m3fn)
    b = (torch.randn(N, K) * 4).to(torch.float8_e4m3fn)
    a.view(torch.uint8)[0, :8] = torch.arange(8, dtype=torch.uint8)      # zero and subnormals
    scales_a = {"tensor": torch.tensor(0.7), "token": torch.rand(M, 1) + 0.5, "group": torch.rand(M, 2) + 0.5}
    scales_b = {"tensor": torch.tensor([1.3]), "channel": torch.rand(N) + 0.5, "block": torch.rand(2, 2) + 0.5}
    bias = torch.randn(N, dtype=out_dtype)
    tol = 1e-5 if out_dtype == torch.float32 else TOLERANCES["bfloat16"]
    for na, sa in scales_a.items():
        for nb, sb in scales_b.items():
            got = ops.fp8_gemm(a, b, sa, sb, bias if na == "token" else None, out_dtype=out_dtype)
            ref = _fp8_ref(a, b, sa, sb, bias if na == "token" else None, K)
            _close(got, ref, tol, f"fp8 {na} x {nb}")


def test_fp8_gemm_rejects_bad_scales():
    a = torch.zeros(4, 64, dtype=torch.float8_e4m3fn)
    b = torch.zeros(8, 64, dtype=torch.float8_e4m3fn)
    with pytest.raises(ops.OpInputError, match=r"scale_b: expected shape .*given shape \(3,\)"):
        ops.fp8_gemm(a, b, torch.ones(1), torch.ones(3))
    with pytest.raises(ops.OpInputError, match="scale_a: expected dtype float32"):
        ops.fp8_gemm(a, b, torch.ones(1, dtype=torch.float16), torch.ones(1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rot", [40, 24])
def test_rope(dtype, rot):
    torch.manual_seed(4)
    D = 40
    q, k = torch.randn(3, 5, 6, D, dtype=dtype), torch.randn(3, 5, 2, D, dtype=dtype)
    ang = torch.randn(50, rot // 2)
    cos, sin = ang.cos(), ang.sin()
    pos = torch.randint(0, 50, (3, 5), dtype=torch.int32 if rot == 24 else torch.int64)
    qo, ko = ops.rope(q, k, cos, sin, pos)
    _close(qo, _rope_ref(q, cos, sin, pos.long()), dtype, "rope q")
    _close(ko, _rope_ref(k, cos, sin, pos.long()), dtype, "rope k")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_attention(dtype, causal):
    torch.manual_seed(5)
    Bsz, Sq, Skv, Hq, Hkv, D = 2, 7, 11, 6, 2, 24
    q = torch.randn(Bsz, Sq, Hq, D, dtype=dtype)
    k, v = torch.randn(Bsz, Skv, Hkv, D, dtype=dtype), torch.randn(Bsz, Skv, Hkv, D, dtype=dtype)
    kpad = torch.zeros(Bsz, Skv)
    kpad[1, 5:] = float("-inf")
    if not causal:
        kpad[1, :] = float("-inf")        # a fully masked batch: rows are 0, not NaN
    got = ops.attention(q, k, v, causal=causal, scale=0.3, kpad=kpad)
    _close(got, _attn_ref(q, k, v, causal, 0.3, kpad), dtype, "attention")
    assert not got.isnan().any()
    _close(ops.attention(q, k, v), _attn_ref(q, k, v, False, None, None), dtype, "attention default scale")


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention(dtype):
    torch.manual_seed(6)
    Bsz, Hq, Hkv, C, D = 3, 6, 2, 19, 24
    q = torch.randn(Bsz, Hq, D, dtype=dtype)
    kc, vc = torch.randn(Bsz, Hkv, C, D, dtype=dtype), torch.randn(Bsz, Hkv, C, D, dtype=dtype)
    lens = torch.tensor([13, 19, 0], dtype=torch.int32)
    got = ops.decode_attention(q, kc, vc, lens)
    _close(got, _decode_ref(q, kc, vc, lens), dtype, "decode")
    assert torch.equal(got[2], torch.zeros_like(got[2])), "no keys -> 0"


def test_decode_attention_split_kv_codegen(tmp_path):
    """The sm_90a decode path (kiln.llm's split-KV partial over separate K/V caches + the merge that maps
    "no key" to 0) builds for CUDA and assembles with no spills; the CPU plan says why it is not used here."""
    import tvm

    from kiln.llm.decode_attention import decode_attention_kv_gpu, merge_attention_gpu
    from kiln.ops.attention import decode_attention_plan

    from _ptxas import ptxas_sm90a
    assert decode_attention_plan(2, 8, 2, 100, 64, "float16", "cpu") == ("te", "not a CUDA device", 0)
    funcs = {"kiln_decode_partial": decode_attention_kv_gpu(32, 8, 128, 1000, "float16", 16, 0.3),
             "kiln_decode_merge": merge_attention_gpu(32, 128, "float16", 16, empty_is_zero=True)}
    src, rules = _cuda_build(tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()}))
    assert set(rules) == set(funcs) and "__shfl" in src
    ptxas_sm90a(src, tmp_path)
    with pytest.raises(NotImplementedError, match="head_dim 24"):
        decode_attention_kv_gpu(6, 2, 24, 19, "float32", 1, 0.2)


def test_input_errors():
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ops.OpInputError, match=r"kiln.ops.rms_norm: weight: expected shape \(8,\), given shape \(7,\)"):
        ops.rms_norm(x, torch.randn(7))
    with pytest.raises(ops.OpInputError, match="x: expected dtype float32 or float16 or bfloat16, given int64"):
        ops.rms_norm(torch.ones(4, 8, dtype=torch.int64), w)
    with pytest.raises(ops.OpInputError, match="residual: expected dtype float16, given float32"):
        ops.rms_norm(x.half(), w.half(), residual=x)
    with pytest.raises(ops.OpInputError, match=r"gemm: b: expected shape \(\*, 8\), given shape \(3, 9\)"):
        ops.gemm(x, torch.randn(3, 9))
    with pytest.raises(ops.OpInputError, match="bias: expected None"):
        ops.gemm(x, torch.randn(3, 8), torch.randn(3), epilogue=("gelu",))
    with pytest.raises(ops.OpInputError, match="expected a tensor on cpu"):
        ops.layer_norm(x, torch.randn(8, device="meta"))
    with pytest.raises(ops.OpInputError, match="k: expected a head count dividing Hq=6"):
        ops.attention(torch.randn(1, 2, 6, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    with pytest.raises(ops.OpInputError, match="seq_lens: expected dtype int32, given int64"):
        ops.decode_attention(torch.randn(1, 2, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8),
                             torch.tensor([3]))


# ------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_traces_through(backend):
    torch._dynamo.reset()
    torch.manual_seed(7)
    x, w, r = torch.randn(5, 32), torch.randn(32), torch.randn(5, 32)
    wl = torch.randn(24, 32) / 6
    q, k = torch.randn(5, 4, 16), torch.randn(5, 2, 16)
    ang = torch.randn(9, 8)
    pos = torch.arange(5)

    def block(x, r, q, k):
        y, h = ops.rms_norm(x, w, 1e-6, residual=r)
        z = ops.gemm(y, wl, epilogue=("gelu",))
        qo, ko = ops.rope(q, k, ang.cos(), ang.sin(), pos)
        return z, h, qo, ko

    eager = block(x, r, q, k)
    compiled = torch.compile(block, backend=backend, fullgraph=True)(x, r, q, k)
    for e, c in zip(eager, compiled):
        assert torch.equal(e, c)


def test_opcheck_rms_norm():
    torch.library.opcheck(torch.ops.kiln.fused_add_rms_norm.default,
                          (torch.randn(3, 16), torch.randn(3, 16), torch.randn(16), 1e-6, None))


# ------------------------------------------------------------------------------------------- CUDA codegen (no GPU)
def _cuda_build(mod):
    from kiln.target import device_code, resolve_target
    ex, reports = B.build_module(mod, resolve_target("cuda"))
    return "\n".join(t for _, t in device_code(ex)), {r["func"]: r["rule"] for r in reports}


def test_cuda_codegen_of_every_op():
    import tvm

    from kiln.ops.attention import make_decode_attention_te
    from kiln.ops.fp8 import _make as fp8_make
    from kiln.ops.gemm import _make as gemm_make
    from kiln.ops.norm import make_norm_te, schedule_norm_cuda
    from kiln.ops.rope import make_rope_te
    from kiln.target import resolve_target
    t = resolve_target("cuda")
    src, rules = _cuda_build(tvm.IRModule({"kiln_norm": schedule_norm_cuda(
        make_norm_te("rms", 37, 4096, "bfloat16", "bfloat16", None, 1e-6, True), 4096, "bfloat16")}))
    assert rules == {"kiln_norm": "kiln.ops.norm_rows"} and "__shfl_down_sync" in src
    src, rules = _cuda_build(tvm.IRModule({"kiln_norm": schedule_norm_cuda(
        make_norm_te("layer", 5, 1000, "float16", "float16", None, 1e-5, False, quant=True), 1000, "float16")}))
    assert rules == {"kiln_norm": "kiln.ops.norm_rows"}
    src, rules = _cuda_build(tvm.IRModule({"kiln_rope": make_rope_te(7, 8, 2, 64, 64, 100, "float16", "float32",
                                                                     "int64")}))
    assert rules["kiln_rope"].startswith("dlight.")
    funcs = make_decode_attention_te(2, 8, 2, 100, 64, "float16", 0.125)
    src, rules = _cuda_build(tvm.IRModule({str(f.attrs["global_symbol"]): f for f in funcs}))
    assert set(rules) == {"kiln_decode_scores", "kiln_decode_softmax", "kiln_decode_pv"}
    gparams = {"M": 77, "N": 200, "K": 136, "dtype": "float16", "epilogue": "bias+gelu", "kernel": "sm90a",
               "config": "64x64x64_s4_c1_g8", "config_source": "test", "split_k": 1, "num_sms": 132}
    mod, info = gemm_make(gparams, None)(t)
    src, rules = _cuda_build(mod)
    assert "wgmma.mma_async" in src and set(rules.values()) == {"kiln.gemm_sm90"}
    fparams = dict(gparams, mode_a="group", mode_b="block", out_dtype="bfloat16", bias=True, kernel="sm90a_dequant",
                   declined="")
    mod, info = fp8_make(fparams)(t)
    src, rules = _cuda_build(mod)
    assert "wgmma.mma_async" in src and rules["kiln_fp8_dequant_a"].startswith("dlight.")


# ------------------------------------------------------------------------------------------- the cache
def test_cache_memo_and_info(tmp_path):
    with knobs.scope(ops_cache_dir=str(tmp_path)):
        x, w = torch.randn(6, 40), torch.randn(40)
        ops.rms_norm(x, w)
        s1 = ops.stats()
        assert s1["builds"] == 1 and s1["cache_dir"] == str(tmp_path)
        ops.rms_norm(x, w)
        s2 = ops.stats()
        assert s2["builds"] == 1 and s2["memo_hits"] == s1["memo_hits"] + 1
        info = ops.kernel_info("rms_norm")
        assert len(info) == 1 and info[0]["kernel"] == "te" and info[0]["params"]["N"] == 40
        ops.rms_norm(torch.randn(7, 40), w)          # another shape: another build
        assert ops.stats()["builds"] == 2
        assert len(BuildCache(str(tmp_path)).build_log()) == 2


def test_cache_key_covers_what_changes_code():
    from kiln.target import resolve_target
    t = resolve_target("llvm")
    base = B.cache_document("rms_norm", {"M": 4, "N": 8}, t, ["kiln.ops.norm"])
    assert cache_key(base) == cache_key(B.cache_document("rms_norm", {"N": 8, "M": 4}, t, ["kiln.ops.norm"]))
    for other in (B.cache_document("rms_norm", {"M": 5, "N": 8}, t, ["kiln.ops.norm"]),
                  B.cache_document("layer_norm", {"M": 4, "N": 8}, t, ["kiln.ops.norm"]),
                  B.cache_document("rms_norm", {"M": 4, "N": 8}, t, ["kiln.ops.norm", "kiln.ops.gemm"]),
                  B.cache_document("rms_norm", {"M": 4, "N": 8}, resolve_target("cuda"), ["kiln.ops.norm"]),
                  dict(base, versions=dict(base["versions"], tvm="0.0"))):
        assert cache_key(other) != cache_key(base)
    assert set(base) == {"op", "params", "sources", "versions", "target", "options"}


_CHILD = textwrap.dedent("""
    import json, os, sys, time
    import torch
    import kiln.ops as ops
    from kiln.ops import build as B
    slow = float(sys.argv[3])
    if slow:
        real = B.build_module
        def build_module(mod, t):       # widen the race window: both processes are inside get() together
            time.sleep(slow)
            return real(mod, t)
        B.build_module = build_module
    open(sys.argv[2], "w").write("ready")
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.005)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 130, generator=g), torch.randn(130, generator=g)
    y = ops.rms_norm(x, w, 1e-6)
    err = (y - torch.nn.functional.rms_norm(x, (130,), w, 1e-6)).abs().max().item()
    print(json.dumps({"stats": ops.stats(), "err": err, "source": ops.kernel_info("rms_norm")[0]["source"]}))
""")


def _run_children(tmp_path, n: int, slow: float) -> list:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    go = tmp_path / "go"
    env = dict(os.environ, KILN_OPS_CACHE_DIR=str(tmp_path / "cache"), KILN_PROGRESS="0")
    procs, ready = [], []
    for i in range(n):
        ready.append(tmp_path / f"ready{i}")
        procs.append(subprocess.Popen([sys.executable, str(script), str(go), str(ready[-1]), str(slow)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 240
    while not all(r.exists() for r in ready):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "children did not start"
        time.sleep(0.05)
    go.write_text("go")
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def test_cache_two_processes_at_once_build_once(tmp_path):
    results = _run_children(tmp_path, 2, slow=1.5)
    assert all(r["err"] < 1e-4 for r in results)
    assert sorted(r["stats"]["builds"] for r in results) == [0, 1], results
    assert sorted(r["source"] for r in results) == ["built", "disk"]
    assert len(BuildCache(str(tmp_path / "cache")).build_log()) == 1
    # a later process loads it from disk without building
    (tmp_path / "go").unlink()
    (later,) = _run_children(tmp_path, 1, slow=0.0)
    assert later["stats"]["builds"] == 0 and later["stats"]["disk_loads"] == 1 and later["source"] == "disk"
    assert len(BuildCache(str(tmp_path / "cache")).build_log()) == 1
    leftovers = os.listdir(tmp_path / "cache" / "tmp") if (tmp_path / "cache" / "tmp").exists() else []
    assert leftovers == []


def test_cache_rebuilds_corrupted_or_half_written_entry(tmp_path):
    with knobs.scope(ops_cache_dir=str(tmp_path)):
        x, w = torch.randn(5, 24), torch.randn(24)
        ref = F.rms_norm(x, (24,), w, 1e-6)
        ops.rms_norm(x, w)
        (entry,) = (tmp_path / "entries").iterdir()
        lib = entry / LIBRARY
        # a torn library on disk: written as a new file, as a crashed writer would leave it. Truncating the
        # loaded file in place would instead corrupt this process's own mapping (SIGBUS at exit).
        torn = entry / "torn.tmp"
        torn.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])
        os.replace(torn, lib)
        ops.forget()
        builds = ops.stats()["builds"]
        _close(ops.rms_norm(x, w), ref, torch.float32, "after corruption")
        assert ops.stats()["builds"] == builds + 1 and ops.stats()["discarded"] >= 1
        (entry / META).unlink()                                             # interrupted before meta
        ops.forget()
        _close(ops.rms_norm(x, w), ref, torch.float32, "after half-written entry")
        assert ops.stats()["builds"] == builds + 2
        assert json.loads((entry / META).read_text())["key"] == entry.name


def test_cache_failed_build_leaves_no_entry(tmp_path):
    cache = BuildCache(str(tmp_path))
    doc = {"op": "boom", "params": {"n": 1}}

    def failing(lib_path):
        open(lib_path, "wb").write(b"partial")
        raise RuntimeError("compiler exploded")

    with pytest.raises(RuntimeError, match="compiler exploded"):
        cache.get(doc, failing)
    assert not os.path.exists(cache.entry_dir(cache_key(doc)))
    assert os.listdir(tmp_path / "tmp") == [] and cache.build_log() == []

    def no_library(lib_path):
        return {}

    with pytest.raises(RuntimeError, match="wrote no lib.so"):
        cache.get(doc, no_library)
    assert not os.path.exists(cache.entry_dir(cache_key(doc))) and cache.stats.builds == 0


# ------------------------------------------------------------------------------------------- GPU
def _cuda_ops_cases():
    return ["gemm", "fp8", "norm", "rope", "attention", "decode", "compile"]


@pytest.mark.gpu
@pytest.mark.parametrize("case", _cuda_ops_cases())
def test_ops_on_cuda(case):
    dev = "cuda"
    torch.manual_seed(8)
    if case == "gemm":
        for dtype, (M, N, K), epi in [
                (torch.float16, (77, 200, 136), ("bias", "gelu")),      # sm_90a, tails in M and N
                (torch.bfloat16, (64, 1024, 4096), ("bias",)),          # sm_90a, split-K (heuristic / table)
                (torch.float16, (33, 45, 61), ("bias", "gelu")),        # te + dlight: N, K not multiples of 8
                (torch.float32, (19, 40, 24), ("residual",))]:          # te + dlight: fp32
            a = torch.randn(M, K, dtype=dtype, device=dev)
            b = torch.randn(N, K, dtype=dtype, device=dev) / K ** 0.5
            bias, res = torch.randn(N, dtype=dtype, device=dev), torch.randn(M, N, dtype=dtype, device=dev)
            got = ops.gemm(a, b, bias if "bias" in epi else None, res if "residual" in epi else None, epilogue=epi)
            ref = F.linear(a.float(), b.float()) + (bias.float() if "bias" in epi else 0)
            ref = F.gelu(ref) if "gelu" in epi else ref + (res.float() if "residual" in epi else 0)
            _close(got, ref, dtype, f"gemm {M}x{N}x{K} {dtype}")
        kinds = [i["kernel"] for i in ops.kernel_info("gemm", "cuda")]
        assert sum("gemm_sm90" in k for k in kinds) == 2 and sum(k == "te" for k in kinds) == 2, kinds
    elif case == "fp8":
        M, N, K = 200, 384, 640
        a = (torch.randn(M, K, device=dev) * 4).to(torch.float8_e4m3fn)
        b = (torch.randn(N, K, device=dev) * 4).to(torch.float8_e4m3fn)
        for sa, sb, od in [(torch.rand(M, 1, device=dev), torch.rand(N, device=dev), torch.bfloat16),
                           (torch.rand(M, 5, device=dev), torch.rand(3, 5, device=dev), torch.bfloat16),
                           (torch.tensor(0.5, device=dev), torch.tensor([2.0], device=dev), torch.float32)]:
            bias = torch.randn(N, dtype=od, device=dev)
            _close(ops.fp8_gemm(a, b, sa, sb, bias, out_dtype=od), _fp8_ref(a, b, sa, sb, bias, K),
                   TOLERANCES["bfloat16"] if od == torch.bfloat16 else 1e-4, f"fp8 {tuple(sa.shape)}x{tuple(sb.shape)}")
        kinds = [i["kernel"] for i in ops.kernel_info("fp8_gemm", "cuda")]
        assert sum(k.startswith("kiln.gemm_fp8_sm90") for k in kinds) == 2, kinds
    elif case == "norm":
        for dtype, N in [(torch.float16, 4096), (torch.bfloat16, 1000), (torch.float32, 77)]:
            x, r = torch.randn(3, 37, N, dtype=dtype, device=dev), torch.randn(3, 37, N, dtype=dtype, device=dev)
            w, b = torch.randn(N, dtype=dtype, device=dev), torch.randn(N, dtype=dtype, device=dev)
            _close(ops.rms_norm(x, w), F.rms_norm(x.float(), (N,), w.float(), 1e-6), dtype, f"rms {N}")
            y, h = ops.rms_norm(x, w, residual=r)
            h_ref = (x.float() + r.float()).to(dtype)
            assert torch.equal(h, h_ref)
            _close(y, F.rms_norm(h_ref.float(), (N,), w.float(), 1e-6), dtype, f"fused rms {N}")
            _close(ops.layer_norm(x, w, b), F.layer_norm(x.float(), (N,), w.float(), b.float()), dtype, f"ln {N}")
            y, h = ops.layer_norm(x, w, b, residual=r)
            _close(y, F.layer_norm(h_ref.float(), (N,), w.float(), b.float()), dtype, f"fused ln {N}")
            s = torch.tensor([0.05], device=dev)
            q, _ = ops.rms_norm(x, w, residual=r, quant_scale=s)
            ref_q = (F.rms_norm(h_ref.float(), (N,), w.float(), 1e-6) / s).clamp(-448, 448).to(torch.float8_e4m3fn)
            assert ((q.float() - ref_q.float()).abs() <= ref_q.float().abs() / 8 + 2 ** -9).all(), f"fp8 rms {N}"
    elif case == "rope":
        for dtype in (torch.float16, torch.bfloat16):
            q, k = torch.randn(2, 37, 32, 128, dtype=dtype, device=dev), torch.randn(2, 37, 8, 128, dtype=dtype, device=dev)
            ang = torch.randn(4096, 64, device=dev)
            pos = torch.randint(0, 4096, (2, 37), device=dev)
            qo, ko = ops.rope(q, k, ang.cos(), ang.sin(), pos)
            _close(qo, _rope_ref(q, ang.cos(), ang.sin(), pos), dtype, "rope q")
            _close(ko, _rope_ref(k, ang.cos(), ang.sin(), pos), dtype, "rope k")
    elif case == "attention":
        for dtype, (Bsz, Sq, Skv, Hq, Hkv, D), causal, kp in [
                (torch.float16, (2, 333, 333, 16, 4, 128), True, False),    # flash, GQA, causal, tails
                (torch.bfloat16, (3, 77, 77, 12, 12, 64), False, True),     # flash, kpad with masked keys
                (torch.float16, (2, 37, 50, 4, 2, 80), True, True)]:        # te + dlight: D = 80
            q = torch.randn(Bsz, Sq, Hq, D, dtype=dtype, device=dev)
            k = torch.randn(Bsz, Skv, Hkv, D, dtype=dtype, device=dev)
            v = torch.randn(Bsz, Skv, Hkv, D, dtype=dtype, device=dev)
            kpad = torch.zeros(Bsz, Skv, device=dev)
            kpad[-1, Skv // 2:] = float("-inf")
            got = ops.attention(q, k, v, causal=causal, kpad=kpad if kp else None)
            _close(got, _attn_ref(q, k, v, causal, None, kpad if kp else None), dtype, f"attention {D} {dtype}")
        kinds = [i["kernel"] for i in ops.kernel_info("attention", "cuda")]
        assert sum("attention_sm90" in k for k in kinds) == 2, kinds
    elif case == "decode":
        for dtype, (Bsz, Hq, Hkv, C, D) in [(torch.float16, (5, 32, 8, 1000, 128)), (torch.bfloat16, (3, 12, 12, 77, 64))]:
            q = torch.randn(Bsz, Hq, D, dtype=dtype, device=dev)
            kc = torch.randn(Bsz, Hkv, C, D, dtype=dtype, device=dev)
            vc = torch.randn(Bsz, Hkv, C, D, dtype=dtype, device=dev)
            lens = torch.randint(0, C + 1, (Bsz,), dtype=torch.int32, device=dev)
            lens[0], lens[-1] = C, 0                  # full cache; no key at all -> 0
            _close(ops.decode_attention(q, kc, vc, lens), _decode_ref(q, kc, vc, lens), dtype, f"decode {dtype}")
            lens[1] = C + 7                           # clamped to C
            got = ops.decode_attention(q, kc, vc, lens, scale=0.3)
            _close(got, _decode_ref(q, kc, vc, lens.clamp(max=C), 0.3), dtype, f"decode {dtype} scale")
            assert torch.equal(got[-1], torch.zeros_like(got[-1]))
        # GQA 4 x D 128 fp16 and 1 x 64 bf16 take kiln.llm's split-KV kernels; D = 24 fp32 has no thread layout
        q, kc = torch.randn(2, 6, 24, device=dev), torch.randn(2, 2, 19, 24, device=dev)
        lens = torch.tensor([13, 0], dtype=torch.int32, device=dev)
        _close(ops.decode_attention(q, kc, kc, lens), _decode_ref(q, kc, kc, lens), torch.float32, "decode te")
        kinds = [i["kernel"] for i in ops.kernel_info("decode_attention", "cuda")]
        # one build per (dtype, scale): 2 dtypes x {default, 0.3}
        assert sum(k.startswith("kiln.llm split-KV") for k in kinds) == 4 and kinds.count("te (3 functions)") == 1, kinds
    elif case == "compile":
        torch._dynamo.reset()
        x, w = torch.randn(8, 256, dtype=torch.float16, device=dev), torch.randn(256, dtype=torch.float16, device=dev)
        wl = torch.randn(512, 256, dtype=torch.float16, device=dev) / 16

        def f(x):
            return ops.gemm(ops.rms_norm(x, w), wl, epilogue=("gelu",))
        assert torch.equal(torch.compile(f, backend="aot_eager", fullgraph=True)(x), f(x))
