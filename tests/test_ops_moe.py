"""kiln.ops.fused_moe vs a torch reference (a loop over experts) at odd shapes on CPU (llvm), the token sort's
invariants, typed input errors, torch.compile through the fake implementation, the sm_90a grouped GEMM's CUDA
codegen (built and assembled on the CPU, not run), and the op on a GPU (``@pytest.mark.gpu``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kiln.ops as ops
from kiln import knobs
from kiln.verify import TOLERANCES

TOL = {torch.float32: TOLERANCES["float32"], torch.float16: TOLERANCES["float16"],
       torch.bfloat16: TOLERANCES["bfloat16"]}


@pytest.fixture(scope="module", autouse=True)
def _cache_dir(tmp_path_factory):
    with knobs.scope(ops_cache_dir=str(tmp_path_factory.mktemp("moe-cache"))):
        yield


def moe_ref(x, w1, w2, gating, topk, renormalize):
    """vLLM's fused_moe semantics in torch, one expert at a time: fp32 softmax + top-k, fp32 GEMMs with the
    intermediates (x W1^T, silu(gate) * up, the expert output) rounded to the activation dtype, fp32 weighted
    sum. Returns fp32 [T, H]."""
    p = torch.softmax(gating.float(), -1)
    w, ids = torch.topk(p, topk, -1)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    I = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w1.shape[0]):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = (x[tok].float() @ w1[e].float().T).to(x.dtype).float()
        a = (F.silu(h[:, :I]) * h[:, I:]).to(x.dtype).float()
        y = (a @ w2[e].float().T).to(x.dtype).float()
        out.index_add_(0, tok, y * w[tok, slot, None])
    return out


def _inputs(T, E, H, I, dtype, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, H, generator=g, device=device).to(dtype)
    w1 = (torch.randn(E, 2 * I, H, generator=g, device=device) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g, device=device) / I ** 0.5).to(dtype)
    gating = torch.randn(T, E, generator=g, device=device)
    return x, w1, w2, gating


def _close(got, ref, dtype, what):
    err = (got.float() - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    assert err <= TOL[dtype] * scale, f"{what}: max err {err:.3g} > {TOL[dtype]} * {scale:.3g}"


# ------------------------------------------------------------------------------------------- CPU numerics
@pytest.mark.parametrize("dtype,T,E,topk,H,I,renormalize", [
    (torch.float32, 1, 8, 2, 40, 24, True),          # one token: most experts get nothing
    (torch.float32, 7, 4, 1, 72, 52, False),
    (torch.float32, 33, 8, 2, 40, 36, False),
    (torch.float16, 7, 4, 2, 40, 24, True),
    (torch.bfloat16, 33, 8, 2, 72, 52, True),
    (torch.float32, 300, 8, 2, 24, 16, True),        # 600 routed pairs: the sort's chunks (256) and prefixes
])
def test_fused_moe_matches_torch(dtype, T, E, topk, H, I, renormalize):
    x, w1, w2, gating = _inputs(T, E, H, I, dtype, seed=T + E)
    got = ops.fused_moe(x, w1, w2, gating, topk, renormalize)
    assert got.shape == (T, H) and got.dtype == dtype
    _close(got, moe_ref(x, w1, w2, gating, topk, renormalize), dtype, f"fused_moe T={T} E={E} topk={topk} {dtype}")


def test_fused_moe_gating_dtype_and_kernel_info():
    x, w1, w2, gating = _inputs(5, 4, 24, 16, torch.bfloat16, seed=3)
    gating += torch.arange(4) * 0.25             # no near-ties, which fp16 rounding would make exact ties
    g16 = gating.to(torch.float16)               # router logits in another float dtype than the activations
    _close(ops.fused_moe(x, w1, w2, g16, 2), moe_ref(x, w1, w2, g16, 2, True), torch.bfloat16, "fp16 gating")
    info = [i for i in ops.kernel_info("fused_moe", "cpu") if i["params"]["gdtype"] == "float16"]
    assert len(info) == 1 and info[0]["kernel"] == "te grouped GEMM"
    assert info[0]["sm90a_declined"] == "not a CUDA device" and info[0]["funcs"][7] == "kiln_moe_gemm1"


def test_token_sort_invariants():
    """Every routed (token, slot) pair gets exactly one sorted row; rows of an expert are contiguous, in
    token order, start at a multiple of BM and fill whole blocks whose expert is recorded; the rest is padding."""
    import tvm

    from kiln.ops import build as B
    from kiln.ops.moe import make_moe_module
    from kiln.target import resolve_target
    T, E, topk, BM = 300, 8, 2, 16
    params = {"T": T, "H": 8, "I": 8, "E": E, "topk": topk, "renormalize": False, "dtype": "float32",
              "gdtype": "float32", "BM": BM, "kernel": "te"}
    mod, info = make_moe_module(params, "llvm", None)
    names = ["kiln_moe_route", "kiln_moe_count", "kiln_moe_offsets", "kiln_moe_pos", "kiln_moe_block_expert",
             "kiln_moe_scatter"]
    ex, _ = B.build_module(tvm.IRModule({n: mod[n] for n in names}), resolve_target("llvm"))
    MP, NA, NC = info["MP"], T * topk, -(-T * topk // 256)
    gating = torch.randn(T, E)
    gating[:, 3] += 4.0                                     # a popular expert: > 1 chunk of its own pairs
    w, ids = torch.empty(T, topk), torch.empty(T, topk, dtype=torch.int32)
    counts, prefix = torch.empty(NC, E, dtype=torch.int32), torch.empty(NC, E, dtype=torch.int32)
    off, pos = torch.empty(E + 1, dtype=torch.int32), torch.empty(NA, dtype=torch.int32)
    be, token = torch.empty(MP // BM, dtype=torch.int32), torch.empty(MP, dtype=torch.int32)
    ex.mod["kiln_moe_route"](gating, w, ids)
    ref_w, ref_ids = torch.topk(torch.softmax(gating, -1), topk, -1)
    assert torch.equal(ids.long(), ref_ids) and torch.allclose(w, ref_w, atol=1e-6)
    flat = ids.reshape(-1)
    ex.mod["kiln_moe_count"](flat, counts)
    ex.mod["kiln_moe_offsets"](counts, prefix, off)
    ex.mod["kiln_moe_pos"](flat, prefix, off, pos)
    ex.mod["kiln_moe_block_expert"](off, be)
    ex.mod["kiln_moe_scatter"](pos, token)
    n_e = torch.bincount(flat.long(), minlength=E)
    padded = (n_e + BM - 1) // BM * BM
    assert torch.equal(off, torch.cat([torch.zeros(1, dtype=torch.long), padded.cumsum(0)]).int())
    assert torch.equal(pos.sort().values.unique(), pos.sort().values), "one row per pair"
    for e in range(E):
        mine = (flat == e).nonzero().reshape(-1)              # pairs of e in token order
        assert torch.equal(pos[mine].long(), off[e] + torch.arange(len(mine))), f"expert {e}: stable, contiguous"
        assert (be[off[e] // BM: off[e + 1] // BM] == e).all()
    assert (be[off[E] // BM:] == -1).all()
    assert torch.equal(token[pos.long()].long(), torch.arange(NA) // topk)
    used = torch.zeros(MP, dtype=torch.bool)
    used[pos.long()] = True
    assert (token[~used] == T).all(), "padding rows name no token"


# ------------------------------------------------------------------------------------------- errors
def test_fused_moe_input_errors():
    x, w1, w2, g = _inputs(4, 4, 16, 8, torch.float32)
    E = ops.OpInputError
    with pytest.raises(E, match=r"fused_moe: w1: expected shape \(\*, \*, 16\), given shape \(4, 16, 15\)"):
        ops.fused_moe(x, w1[:, :, :15], w2, g, 2)
    with pytest.raises(E, match=r"w1: expected an even dim 1 .*given shape \(4, 15, 16\)"):
        ops.fused_moe(x, w1[:, :15], w2, g, 2)
    with pytest.raises(E, match=r"w2: expected shape \(4, 16, 8\), given shape \(4, 16, 7\)"):
        ops.fused_moe(x, w1, w2[:, :, :7], g, 2)
    with pytest.raises(E, match=r"gating_output: expected shape \(4, 4\), given shape \(4, 3\)"):
        ops.fused_moe(x, w1, w2, g[:, :3], 2)
    with pytest.raises(E, match=r"hidden_states: expected 2 dims, given shape \(1, 4, 16\)"):
        ops.fused_moe(x[None], w1, w2, g, 2)
    with pytest.raises(E, match="w2: expected dtype float32, given float16"):
        ops.fused_moe(x, w1, w2.half(), g, 2)
    with pytest.raises(E, match=r"topk: expected an int in \[1, 4\]"):
        ops.fused_moe(x, w1, w2, g, 5)
    with pytest.raises(E, match="topk: expected an int, given 1.5"):
        ops.fused_moe(x, w1, w2, g, 1.5)
    with pytest.raises(E, match="gating_output: expected a tensor on cpu"):
        ops.fused_moe(x, w1, w2, g.to("meta"), 2)


# ------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_fused_moe_torch_compile(backend):
    torch._dynamo.reset()
    x, w1, w2, g = _inputs(6, 4, 24, 16, torch.float32, seed=5)
    wr = torch.randn(4, 24) / 5

    def layer(x):
        return x + ops.fused_moe(x, w1, w2, x @ wr.T, 2, True)
    assert torch.equal(torch.compile(layer, backend=backend, fullgraph=True)(x), layer(x))


def test_opcheck_fused_moe():
    x, w1, w2, g = _inputs(3, 4, 16, 8, torch.float32, seed=6)
    torch.library.opcheck(torch.ops.kiln.fused_moe.default, (x, w1, w2, g, 2, False))


# ------------------------------------------------------------------------------------------- CUDA codegen (no GPU)
def test_moe_sm90_plan_and_declines():
    from kiln.ops.moe_sm90 import MOE_SM90_LARGE, MOE_SM90_SMALL, moe_sm90_configs
    assert moe_sm90_configs(37, 1024, 352, 8, 2, "float16") == ((MOE_SM90_SMALL,) * 2, None)
    assert moe_sm90_configs(4096, 1024, 352, 8, 2, "bfloat16") == ((MOE_SM90_LARGE,) * 2, None)
    cfg, why = moe_sm90_configs(7, 72, 52, 4, 2, "float16")
    assert cfg is None and why.startswith("GEMM 2 (act @ w2^T): K=52 is not a multiple of 8")
    assert moe_sm90_configs(7, 64, 64, 4, 2, "float32") == (None, "dtype float32 (the sm_90a grouped GEMM takes "
                                                                   "float16, bfloat16)")


@pytest.mark.parametrize("T,H,I,dtype", [(37, 1024, 352, "bfloat16"), (700, 200, 136, "float16")])
def test_moe_sm90_codegen(T, H, I, dtype, tmp_path):
    """The sm_90a module (grouped wgmma GEMMs + the small stages) builds for CUDA and assembles with no spills."""
    from kiln.ops import build as B
    from kiln.ops.moe import make_moe_module, moe_plan
    from kiln.ops.moe_sm90 import moe_sm90_configs
    from kiln.target import device_code, resolve_target

    from _ptxas import ptxas_sm90a
    (c1, c2), _ = moe_sm90_configs(T, H, I, 8, 2, dtype)
    params = {"T": T, "H": H, "I": I, "E": 8, "topk": 2, "renormalize": True, "dtype": dtype, "gdtype": dtype,
              "BM": c1.block_m, "kernel": "sm90a", "config1": c1.name(), "config2": c2.name()}
    mod, info = make_moe_module(params, "cuda", None)
    ex, reports = B.build_module(mod, resolve_target("cuda"))
    rules = {r["func"]: r["rule"] for r in reports}
    assert rules.pop("kiln_moe_gemm1") == rules.pop("kiln_moe_gemm2") == "kiln.moe_sm90"
    assert set(rules.values()) == {"kiln.ops.moe_threads"}
    src = "\n".join(t for _, t in device_code(ex))
    assert f"wgmma.mma_async.sync.aligned.m64n128k16.f32.{'bf16' if dtype == 'bfloat16' else 'f16'}" in src
    assert "cp.async.bulk.tensor.2d" in src
    ptxas_sm90a(src, tmp_path)
    assert moe_plan(T, H, I, 8, 2, dtype, "cpu") == ({"BM": 16, "kernel": "te"}, "not a CUDA device")


def test_moe_te_gemm_cuda_schedule():
    """Shapes the sm_90a GEMM declines get the TE grouped GEMM on CUDA: kiln's rule list gives it a SIMT
    schedule (dlight.Matmul does not recognise the gathered-weight contraction) that builds."""
    from kiln.ops import build as B
    from kiln.ops.moe import make_moe_module
    from kiln.target import resolve_target
    params = {"T": 33, "H": 72, "I": 52, "E": 8, "topk": 2, "renormalize": False, "dtype": "float16",
              "gdtype": "float32", "BM": 16, "kernel": "te"}
    mod, info = make_moe_module(params, "cuda", "test")
    _, reports = B.build_module(mod, resolve_target("cuda"))
    rules = {r["func"]: r for r in reports}
    assert info["kernel"] == "te grouped GEMM (SIMT schedule, no tensor cores)"
    assert rules["kiln_moe_gemm1"]["rule"].startswith("dlight.")
    assert any(d["rule"] == "dlight.Matmul" for d in rules["kiln_moe_gemm1"]["declined"])


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_moe_on_cuda(dtype):
    """Mixtral-like (E=8, top-2, SiLU-gated) at small sizes: decode, a small batch, a prefill that takes
    the 128-row config, and a shape the sm_90a GEMM declines (I % 8 != 0: TE GEMM)."""
    dev = "cuda"
    cases = [(1, 1024, 352, True), (37, 1024, 352, False), (1024, 512, 256, True), (19, 72, 52, True)]
    for T, H, I, renorm in cases:
        x, w1, w2, g = _inputs(T, 8, H, I, dtype, device=dev, seed=T)
        got = ops.fused_moe(x, w1, w2, g, 2, renorm)
        _close(got, moe_ref(x, w1, w2, g, 2, renorm), dtype, f"cuda fused_moe T={T} H={H} I={I} {dtype}")
    info = [i for i in ops.kernel_info("fused_moe", "cuda") if i["params"]["dtype"] == str(dtype)[6:]]
    kinds = sorted(i["kernel"] for i in info)
    assert sum(k.startswith("kiln.moe_sm90") for k in kinds) == 3, kinds
    assert sum(k == "te grouped GEMM (SIMT schedule, no tensor cores)" for k in kinds) == 1, kinds
    assert {i["config1"] for i in info if "config1" in i} == {"64x128x64_s4_c1_g1", "128x128x64_s4_c2_g1"}
