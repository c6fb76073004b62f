"""kiln's gfx942 MFMA GEMM (``kiln.schedules.gemm_gfx942``), on the CPU: there is no AMD GPU here.

* codegen: the gfx942 asm of a standalone GEMM (fp16, bf16, fp8) and of compiled Linear(+bias+gelu)
  and batched-matmul models holds the right ``v_mfma`` variant, and the schedule report names the
  rule (skipped only without an ld.lld >= 17);
* numerics: the *same* schedule with every MFMA intrinsic replaced by its own description
  (``mode="reference"``) runs on llvm and matches torch on odd and dynamic shapes, and matches the
  unscheduled PrimFuncs that kiln's Relax pipeline produces;
* the rule declines what it must, with reasons; the tile configs explain what they refuse.
"""
from __future__ import annotations

import itertools
import math

import ml_dtypes
import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from tvm import te, tirx

from kiln.errors import ToolchainMissingError
from kiln.schedules import default_rules
from kiln.schedules import gemm_gfx942 as g
from kiln.schedules import gemm_gfx942_intrin as gi
from kiln.schedules.rule import Declined
from kiln.target import resolve_target
from kiln.target import rocm as krocm
from kiln.verify import TOLERANCES

FP8 = gi.FP8_DTYPE
DTYPES = ("float16", "bfloat16", FP8)
_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, FP8: torch.float8_e4m3fnuz,
          "float32": torch.float32}
_NUMPY = {"bfloat16": ("int16", ml_dtypes.bfloat16), FP8: ("int8", ml_dtypes.float8_e4m3fnuz)}
# fp8 products are exact in fp32 and the output is fp16: the fp16 tolerance applies
_TOL = {"float16": TOLERANCES["float16"], "bfloat16": TOLERANCES["bfloat16"], FP8: TOLERANCES["float16"]}


def _has_lld() -> bool:
    try:
        krocm.find_lld()
        return True
    except ToolchainMissingError:
        return False


needs_lld = pytest.mark.skipif(not _has_lld(), reason="no ld.lld >= 17 (apt-get install lld-19)")


def to_tvm(t: torch.Tensor):
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fnuz):
        bits, npdt = _NUMPY["bfloat16" if t.dtype == torch.bfloat16 else FP8]
        return tvm.runtime.tensor(t.view(getattr(torch, bits)).numpy().view(npdt))
    return tvm.runtime.tensor(t.numpy())


def to_torch(a) -> torch.Tensor:
    return torch.from_numpy(a.numpy().astype(np.float32))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))


def run_gemm(ex, M, N, K, dtype, epilogue=(), b_layout="nk", seed=0):
    """Run a built ``make_gemm_gfx942`` kernel on random inputs; returns (out, torch reference)."""
    gen = torch.Generator().manual_seed(seed)
    epi = g.Epilogue(tuple(epilogue))
    odt = "float16" if dtype == FP8 else dtype
    a = torch.randn(M, K, generator=gen).to(_TORCH[dtype])
    b = torch.randn(N, K, generator=gen).to(_TORCH[dtype])
    args = [to_tvm(a), to_tvm(b.t().contiguous() if b_layout == "kn" else b)]
    bias = residual = None
    if epi.has_bias:
        bias = torch.randn(N, generator=gen).to(_TORCH[odt])
        args.append(to_tvm(bias))
    if epi.has_residual:
        residual = torch.randn(M, N, generator=gen).to(_TORCH[odt])
        args.append(to_tvm(residual))
    out = tvm.runtime.empty((M, N), odt, tvm.cpu())
    ex["gemm_gfx942"](*args, out)
    ref = epi.apply_torch(a.float() @ b.float().t(), None if bias is None else bias.float(),
                          None if residual is None else residual.float())
    return to_torch(out), ref


# ----------------------------------------------------------------------------- intrinsics

@pytest.mark.parametrize("k", [16, 32])
def test_lane_maps_are_bijections_and_inverse(k):
    per = k // 4
    fwd, inv = gi.operand_layout(k), gi.operand_lane_of(k)
    cells = {fwd(r, c) for r, c in itertools.product(range(16), range(k))}
    assert cells == set(itertools.product(range(gi.WARP), range(per)))
    assert all(inv(*fwd(r, c)) == (r, c) for r, c in itertools.product(range(16), range(k)))
    acc = {gi.result_layout(m, n) for m, n in itertools.product(range(16), range(16))}
    assert acc == set(itertools.product(range(gi.WARP), range(4)))
    assert all(gi.result_lane_of(*gi.result_layout(m, n)) == (m, n)
               for m, n in itertools.product(range(16), range(16)))


def test_fp8_decoder_is_exact_for_all_codes():
    codes = te.placeholder((256,), "uint8", name="codes")
    out = te.compute((256,), lambda i: gi.decode_e4m3fnuz(codes[i]), name="out")
    ex = tvm.compile(te.create_prim_func([codes, out]), target=tvm.target.Target({"kind": "llvm"}))
    res = tvm.runtime.empty((256,), "float32", tvm.cpu())
    ex["main"](tvm.runtime.tensor(np.arange(256, dtype="uint8")), res)
    ref = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fnuz).float().numpy()
    got = res.numpy()
    assert np.array_equal(np.isnan(got), np.isnan(ref)) and np.isnan(ref).sum() == 1
    np.testing.assert_array_equal(got[~np.isnan(ref)], ref[~np.isnan(ref)])


def test_fp16_intrinsics_equal_tvm_registered():
    # kiln generates its fp16 intrinsics rather than importing tvm.s_tir.tensor_intrin (which parses
    # every target's intrinsics); they must be TVM's registered ones exactly.
    from tvm.s_tir import TensorIntrin
    from tvm.s_tir.tensor_intrin import rocm as r

    def registered(name):
        intrin = TensorIntrin.get(name)
        return intrin.desc, intrin.impl

    names = gi.intrin_names("float16")
    theirs = {
        "fill": registered(r.ROCM_MFMA_fill_16x16_f32_INTRIN),
        "load_a": registered(r.ROCM_MFMA_LOAD_16x16_A_SHARED_f16_INTRIN),
        "mfma": registered(r.ROCM_MFMA_f16f16f32_INTRIN),
        # not registered by TVM, but made by its generators: B stored [N, K], accumulator -> LDS
        "load_b": r.get_mfma_load_intrin(16, "float16", "shared", is_b=True, transposed=True),
        "store": r.get_mfma_store_intrin(4, "float32", "shared"),
    }
    for key, pair in theirs.items():
        mine = TensorIntrin.get(names[key])
        for a, b in zip((mine.desc, mine.impl), pair):
            assert tvm_ffi.structural_equal(a.without_attr("global_symbol"), b.without_attr("global_symbol"),
                                            map_free_vars=True), key


# ----------------------------------------------------------------------------- configs

def test_default_configs_valid_and_checks_explain():
    for cfg in g.GFX942_GEMM_CONFIGS:
        dtype = FP8 if cfg.mfma[2] == 32 else "float16"
        assert cfg.check_tile(dtype) is None, cfg
        assert cfg.lds_bytes(dtype) <= g.GFX942_LDS_BYTES
    big = g.GemmConfigGfx942(128, 128, 32, 2, 2)
    assert "LDS" in big.check(256, 256, 256) and "86016" in big.check(256, 256, 256)
    assert "threads > 256" in g.GemmConfigGfx942(128, 128, 32, 4, 4).check(128, 128, 128)
    assert "uses (16, 16, 32)" in g.GFX942_GEMM_CONFIGS[0].check(64, 64, 64, FP8)
    assert "not supported" in g.GFX942_GEMM_CONFIGS[0].check(64, 64, 64, "float32")
    assert "block_k=40" in g.GemmConfigGfx942(128, 64, 40, 2, 2).check(64, 64, 64)
    assert "M=0" in g.GFX942_GEMM_CONFIGS[0].check(0, 64, 64)
    assert g.GFX942_GEMM_CONFIGS[0].check(tirx.Var("m", "int64"), 64, 64) is None
    assert g.select_gfx942_config(1000, 200, 100).check(1000, 200, 100) is None
    assert g.select_gfx942_config(7, 4096, 4096).block_m == 64       # less padding for a short M
    assert g.select_gfx942_config(4096, 4096, 4096, FP8).mfma == (16, 16, 32)
    with pytest.raises(NotImplementedError, match="float32"):
        g.select_gfx942_config(64, 64, 64, "float32")


# ----------------------------------------------------------------------------- codegen

@needs_lld
@pytest.mark.parametrize("dtype", DTYPES)
def test_standalone_gemm_asm_holds_mfma(dtype):
    f = g.make_gemm_gfx942(1000, 200, 100, dtype, ("bias", "gelu_tanh"))
    ex = g.build_gfx942(g.schedule_gfx942(f))
    counts = g.mfma_counts(g.gfx942_asm(ex))
    assert set(counts) == {g.MFMA_INSTRUCTIONS[dtype]}, counts
    # 128x64 tile, 2x2 waves: 4x2 MFMA tiles per wave, K=100 padded to whole block_k steps
    cfg = g.select_gfx942_config(1000, 200, 100, dtype)
    per_k_step = (cfg.block_m // 32) * (cfg.block_n // 32) * (cfg.block_k // cfg.mfma[2])
    assert counts[g.MFMA_INSTRUCTIONS[dtype]] % per_k_step == 0


class _LinearGelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(96, 80)

    def forward(self, x):
        return torch.nn.functional.gelu(self.fc(x), approximate="tanh")


class _BatchedMatmul(torch.nn.Module):
    def forward(self, a, b):
        return torch.matmul(a, b.transpose(-1, -2))


class _ConvRelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(16, 32, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


@needs_lld
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_linear_bias_gelu_uses_mfma(dtype):
    import kiln
    x = torch.randn(50, 96)
    cm = kiln.compile(_LinearGelu(), (x,), target="rocm", dtype=dtype, strict=True, progress=False)
    gemms = [r for r in cm.schedule_report if r["hot"]]
    assert gemms and all(r["rule"] == "kiln.gemm_gfx942" for r in gemms), cm.schedule_report
    assert any("gelu" in r["func"] for r in gemms)           # the epilogue is in the GEMM's PrimFunc
    counts = g.mfma_counts(g.gfx942_asm(cm.executable))
    assert set(counts) == {g.MFMA_INSTRUCTIONS[str(dtype).split(".")[1]]} and sum(counts.values()) > 0


@needs_lld
def test_compiled_batched_matmul_and_dynamic_batch():
    import kiln
    a, b = torch.randn(3, 33, 40), torch.randn(3, 50, 40)
    cm = kiln.compile(_BatchedMatmul(), (a, b), target="rocm", dtype=torch.float16, progress=False)
    assert [r["rule"] for r in cm.schedule_report if r["hot"]] == ["kiln.gemm_gfx942"]
    assert g.mfma_counts(g.gfx942_asm(cm.executable))["v_mfma_f32_16x16x16_f16"] > 0
    dyn = ({0: torch.export.Dim("rows", min=1, max=4096)},)
    cm = kiln.compile(_LinearGelu(), (torch.randn(16, 96),), target="rocm", dtype=torch.float16,
                      dynamic_shapes=dyn, progress=False)
    assert [r["rule"] for r in cm.schedule_report if r["hot"]] == ["kiln.gemm_gfx942"]


def test_rule_registered_first_for_rocm_only():
    assert default_rules("rocm")[0].name == "kiln.gemm_gfx942"
    assert all(r.name != "kiln.gemm_gfx942" for r in default_rules("cuda") + default_rules("llvm"))


# ----------------------------------------------------------------------------- declines

def _matmul(M, N, K, in_dtype, acc_dtype, cast=True):
    A = te.placeholder((M, K), in_dtype, name="A")
    B = te.placeholder((N, K), in_dtype, name="B")
    k = te.reduce_axis((0, K), name="k")
    f = (lambda x: x.astype(acc_dtype)) if cast else (lambda x: x)
    C = te.compute((M, N), lambda i, j: te.sum(f(A[i, k]) * f(B[j, k]), axis=k), name="C")
    return te.create_prim_func([A, B, C])


def test_rule_declines_with_reasons():
    rule = g.GemmGfx942Rule()
    rocm = resolve_target("rocm").tvm_target
    ok = g.make_gemm_gfx942(256, 128, 64, "float16")
    cases = [
        (ok, resolve_target("cuda").tvm_target, "target kind 'cuda'"),
        (ok, resolve_target({"kind": "rocm", "mcpu": "gfx90a"}).tvm_target, "mcpu 'gfx90a'"),
        (_matmul(256, 128, 64, "float32", "float32"), rocm, "input dtype float32"),
        (_matmul(256, 128, 64, "float16", "float16", cast=False), rocm, "accumulator dtype float16"),
        (g.make_gemm_gfx942(1, 4096, 4096, "float16"), rocm, "matrix-vector product"),
        (g.make_gemm_gfx942(4, 4096, 4096, "float16"), rocm, "M=4 < 8"),
    ]
    x = te.placeholder((64, 64), "float16", name="x")
    cases.append((te.create_prim_func([x, te.compute((64, 64), lambda i, j: x[i, j] * 2, name="y")]),
                  rocm, "no reduction block"))
    k = te.reduce_axis((0, 64), name="k")
    sq = te.compute((64,), lambda i: te.sum(x[i, k].astype("float32") * x[i, k].astype("float32"), axis=k))
    cases.append((te.create_prim_func([x, sq]), rocm, "not a matmul"))
    y = te.placeholder((64, 64), "bfloat16", name="y")
    y2 = te.compute((64, 64), lambda i, j: y[i, j] * tirx.const(2.0, "bfloat16"), name="y2")
    k2 = te.reduce_axis((0, 64), name="k2")
    mm = te.compute((64, 64), lambda i, j: te.sum(y2[i, k2].astype("float32") * y[j, k2].astype("float32"), axis=k2))
    cases.append((te.create_prim_func([y, mm]), rocm, "bfloat16 operand is computed (Mul)"))
    for func, target, reason in cases:
        with target:
            res = rule.apply(func, target)
        assert isinstance(res, Declined) and res.rule == "kiln.gemm_gfx942", (reason, res)
        assert reason in res.reason, (reason, res.reason)
    with rocm:
        sch = rule.apply(ok, rocm)
    assert not isinstance(sch, Declined)
    assert str(sch.mod["main"].attrs["kiln.mfma"]) == "v_mfma_f32_16x16x16_f16"


# ----------------------------------------------------------------------------- numerics on the CPU

def _trace(sch):
    """(instruction, constant inputs, attrs) of a schedule trace, twins' names folded to the originals."""
    steps = []
    for inst in sch.trace.insts:
        consts = tuple(str(x) for x in inst.inputs if isinstance(x, (int, tirx.IntImm)))
        attrs = tuple(str(a).replace("__as_described", "") for a in inst.attrs)
        steps.append((inst.kind.name, consts, attrs))
    return steps


@pytest.mark.parametrize("dtype", ["float16", FP8])
def test_reference_is_the_same_schedule(dtype):
    f = g.make_gemm_gfx942(1000, 200, 100, dtype, ("bias",))
    rocm, ref = _trace(g.schedule_gfx942(f, mode="rocm")), _trace(g.schedule_gfx942(f, mode="reference"))
    assert [s for s in rocm if s[0] != "Bind"] == ref
    assert sum(s[0] == "Tensorize" for s in ref) == 5 and sum(s[0] == "Bind" for s in rocm) >= 5


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_numerics_dynamic_m(dtype):
    # one build, M in {1, 7, 129, 1000}; K = 100 is no multiple of block_k (32 or 64), N = 72 of no tile
    f = g.make_gemm_gfx942("m", 72, 100, dtype, ("bias", "gelu_tanh"))
    ex = g.build_reference(g.schedule_gfx942(f, mode="reference"))
    for M in (1, 7, 129, 1000):
        out, ref = run_gemm(ex, M, 72, 100, dtype, ("bias", "gelu_tanh"), seed=M)
        assert rel_err(out, ref) < _TOL[dtype], (dtype, M, rel_err(out, ref))


@pytest.mark.parametrize("M,N,K,epi,layout", [
    (129, 72, 100, ("residual", "relu"), "nk"),
    (7, 200, 40, ("bias", ("scale", 0.5), "silu"), "kn"),
    (1000, 64, 33, (), "kn"),
])
def test_reference_numerics_static(M, N, K, epi, layout):
    f = g.make_gemm_gfx942(M, N, K, "float16", epi, b_layout=layout)
    ex = g.build_reference(g.schedule_gfx942(f, mode="reference"))
    out, ref = run_gemm(ex, M, N, K, "float16", epi, b_layout=layout)
    assert rel_err(out, ref) < TOLERANCES["float16"]


def _compare_with_unscheduled(func, gen, tol):
    """Run ``func`` unscheduled and with ``mode="reference"`` on llvm on the same random inputs."""
    func = func.with_attr("global_symbol", "main")
    plain = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target({"kind": "llvm"}))
    sched = g.build_reference(g.schedule_gfx942(func, mode="reference"))
    args = _random_args(func, gen)
    out_buf = func.params[-1].ty               # TVM 0.27: a parameter's type is its buffer
    outs = []
    for ex in (plain, sched):
        out = tvm.runtime.empty([int(s) for s in out_buf.shape], str(out_buf.dtype), tvm.cpu())
        ex["main"](*args[:-1], out)
        outs.append(to_torch(out))
    assert math.isfinite(float(outs[1].abs().max()))
    assert rel_err(outs[1], outs[0]) < tol


def test_reference_numerics_bf16_producer_chain():
    # bf16 operands reach the matmul through in-function producers (a transpose, then a padding
    # select): they are retyped to raw bits along the whole chain
    M, N, K = 70, 40, 50
    A = te.placeholder((K, M), "bfloat16", name="A")
    B = te.placeholder((N, K), "bfloat16", name="B")
    At = te.compute((M, K), lambda i, k: A[k, i], name="At")
    Ap = te.compute((M, K), lambda i, k: tirx.if_then_else(k < K - 3, At[i, k], tirx.const(0.0, "bfloat16")),
                    name="Ap")
    k = te.reduce_axis((0, K), name="k")
    C = te.compute((M, N), lambda i, j: te.sum(Ap[i, k].astype("float32") * B[j, k].astype("float32"), axis=k))
    D = te.compute((M, N), lambda i, j: C[i, j].astype("bfloat16"))
    _compare_with_unscheduled(te.create_prim_func([A, B, D]), torch.Generator().manual_seed(2),
                              TOLERANCES["bfloat16"])


def _fused_prim_funcs(model, inputs, dtype):
    """The PrimFuncs of a model after kiln's fusion stage for rocm (what the rule sees)."""
    from kiln.frontend.torch_export import import_torch
    from kiln.options import CompileOptions
    from kiln.pipeline import STAGES, CompileState, run_stages
    state = CompileState(target=resolve_target("rocm"), options=CompileOptions(progress=False))
    res = import_torch(model, inputs, dtype=dtype)
    state.mod, state.params, state.signature = res.mod, list(res.params), res.signature
    run_stages(state, stages=[s for s in STAGES if s.name in ("cleanup", "fusion")])
    return {gv.name_hint: f for gv, f in state.mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def _random_args(func, gen):
    args = []
    for param in func.params:
        buf = param.ty                       # TVM 0.27: a parameter's type is its buffer
        shape, dtype = [int(s) for s in buf.shape], str(buf.dtype)
        args.append(to_tvm(torch.randn(shape, generator=gen).to(_TORCH[dtype])))
    return args


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_numerics_of_relax_prim_funcs(dtype):
    # the rule's input as kiln's pipeline makes it: Linear (+bias+gelu, weight [K, N]), a batched
    # matmul and a conv2d (+bias+relu; an implicit GEMM, the im2col done by the LDS fetch);
    # scheduled with mode="reference" vs. the same PrimFunc unscheduled, both on llvm
    funcs = _fused_prim_funcs(_LinearGelu(), (torch.randn(129, 96),), dtype)
    funcs.update(_fused_prim_funcs(_BatchedMatmul(), (torch.randn(3, 33, 40), torch.randn(3, 50, 40)), dtype))
    funcs.update(_fused_prim_funcs(_ConvRelu(), (torch.randn(2, 16, 9, 11),), dtype))
    gemms = {n: f for n, f in funcs.items() if "matmul" in n or "conv2d" in n}
    assert len(gemms) == 3 and any("gelu" in n for n in gemms), list(funcs)
    gen = torch.Generator().manual_seed(1)
    for name, func in gemms.items():
        _compare_with_unscheduled(func, gen, TOLERANCES[str(dtype).split(".")[1]])
