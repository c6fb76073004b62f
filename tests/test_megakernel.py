"""The decode-step megakernel: task graph + CPU executor (step 1), the region pass (step 2), the persistent
kernel's codegen (step 3, CPU: sm_90a source + ptxas) and its GPU checks (marker gpu).

The executor runs the task graph with simulated workers in random interleavings that respect only the declared
counters; its logits and KV-cache update must equal kiln.llm's layer-by-layer decode (llvm build) -- that is what
proves the dependencies are complete. A graph with one wait removed must fail the same check.
"""
import numpy as np
import pytest
import torch

import kiln.llm as L
from kiln.schedules.megakernel import (SM90_MEGAKERNEL, DecodeShape, MegakernelConfig, attention_splits,
                                       build_task_graph, check_graph)
from kiln.schedules.megakernel_schedule import render, step_bytes, summary
from kiln.schedules.megakernel_cpu import Deadlock, execute_step
from kiln.verify import TOLERANCES

from _llm_models import llama_config, random_biases

MAXCTX = 40


class _Ref:
    """A kiln.llm CPU build, a prefilled cache snapshot and the layer-by-layer decode of the next tokens."""

    def __init__(self, model, batch, prompt_len, steps, dtype="float32", weights="native", seed=1):
        self.llm = L.compile(model, target="llvm", dtype=dtype, weights=weights, max_context=MAXCTX,
                             decode_batches=(batch,), progress=False)
        g = torch.Generator().manual_seed(seed)
        vocab = model.config.vocab_size
        sess = self.llm.session()
        sess.prefill(torch.randint(0, vocab, (batch, prompt_len), generator=g))
        self.cache0 = torch.from_dlpack(sess._state(batch).cache).float().clone().numpy()
        self.tokens = torch.randint(0, vocab, (steps, batch), generator=g)
        self.logits = [sess.decode(t).float().numpy() for t in self.tokens]
        self.cache = torch.from_dlpack(sess._state(batch).cache).float().numpy()
        self.prompt_len, self.batch, self.dtype = prompt_len, batch, dtype
        self.weights = {n: p for (n, _, _), p in zip(self.llm.param_specs, self.llm.params)}

    def graph(self, workers):
        return build_task_graph(self.llm.spec.config, self.batch, MAXCTX, self.llm.spec.dtype,
                                self.llm.spec.weight_format, config=MegakernelConfig(workers=workers, tile_groups=2))

    def run(self, graph, policy="random", seed=0, steps=None, drop_wait=None):
        cache = self.cache0.copy()
        counters = np.zeros(len(graph.counters), np.int64)
        outs = []
        for i, tok in enumerate(self.tokens[:steps]):
            pos = [self.prompt_len + i] * self.batch
            outs.append(execute_step(graph, self.weights, cache, tok.numpy(), pos, policy, seed + 1000 * i,
                                     counters, drop_wait))
        return outs, cache


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def llama_ref():
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    return _Ref(LlamaForCausalLM(llama_config()).eval(), batch=2, prompt_len=9, steps=3)


# ------------------------------------------------------------------------------------------ step 1: the graph
def test_graph_is_sound_and_covers_every_output(llama_ref):
    g = llama_ref.graph(workers=7)
    assert check_graph(g) == []
    info = summary(g)
    assert set(info["by_kind"]) == {"embed", "qkv", "attn", "merge", "o_proj", "gate_up", "down", "lm_head"}
    assert sum(len(w) for w in g.workers) == len(g.tasks) and len(g.workers) == 7
    # every GEMV tile streams its rows once: the graph's weight bytes are the model's linear weights
    linear = sum(int(np.prod(s)) * 4 for n, s, _ in llama_ref.llm.param_specs
                 if n.endswith("_proj.weight") or n == "lm_head.weight")
    assert sum(t.weight_bytes for t in g.tasks) == linear


def test_executor_matches_layer_by_layer_decode_in_random_interleavings(llama_ref):
    """3 consecutive steps (counters carried and reset by the executor); 7 and 132 workers, 15 random seeds and
    two deterministic policies each."""
    for workers in (7, 132):
        g = llama_ref.graph(workers)
        runs = [("ahead", 0), ("in_order", 0)] + [("random", s) for s in range(15)]
        for policy, seed in runs:
            outs, cache = llama_ref.run(g, policy, seed)
            for got, want in zip(outs, llama_ref.logits):
                assert _rel(got, want) <= TOLERANCES["float32"], (workers, policy, seed)
            np.testing.assert_allclose(cache, llama_ref.cache, rtol=0, atol=1e-5)


def test_a_missing_wait_is_caught(llama_ref):
    """Dropping one o_proj tile's wait on the attention merges: some interleavings run it on NaN data."""
    g = llama_ref.graph(7)
    victim = [t.id for t in g.tasks if t.kind == "o_proj" and t.layer == 1][1]
    caught = 0
    for seed in range(10):
        outs, _ = llama_ref.run(g, "random", seed, steps=1, drop_wait=victim)
        caught += not (np.isfinite(outs[0]).all() and _rel(outs[0], llama_ref.logits[0]) <= 1e-4)
    assert caught >= 1
    clean, _ = llama_ref.run(g, "random", 0, steps=1)
    assert _rel(clean[0], llama_ref.logits[0]) <= TOLERANCES["float32"]


def test_unsatisfiable_wait_is_a_deadlock(llama_ref):
    import dataclasses
    g = llama_ref.graph(3)
    t0 = next(t for t in g.tasks if t.kind == "down")
    broken = dataclasses.replace(t0, waits=((t0.waits[0][0], 10 ** 6),))
    g2 = dataclasses.replace(g, tasks=tuple(broken if t.id == t0.id else t for t in g.tasks))
    assert any("waits for" in p for p in check_graph(g2))
    with pytest.raises(Deadlock, match="no runnable worker"):
        execute_step(g2, llama_ref.weights, llama_ref.cache0.copy(), [1, 2], [9, 9], "in_order")


@pytest.mark.parametrize("arch", ["qwen2", "mistral_fp16", "llama_fp8"])
def test_executor_other_architectures(arch):
    """Qwen2 (q/k/v bias, tied head, one KV head), Mistral in fp16 (group 1), Llama with biases and fp8 weights."""
    from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(3)
    dtype, weights = "float32", "native"
    if arch == "qwen2":
        cfg = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                          intermediate_size=80, vocab_size=300, tie_word_embeddings=True)
        model = Qwen2ForCausalLM
    elif arch == "mistral_fp16":
        cfg = MistralConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                            intermediate_size=72, vocab_size=200, sliding_window=None)
        model, dtype = MistralForCausalLM, "float16"
    else:
        cfg = llama_config(attention_bias=True, mlp_bias=True)
        model, weights = LlamaForCausalLM, "fp8"
    cfg._attn_implementation = "eager"
    ref = _Ref(random_biases(model(cfg).eval()), batch=1, prompt_len=5, steps=2, dtype=dtype, weights=weights)
    g = ref.graph(5)
    assert check_graph(g) == []
    for policy, seed in (("ahead", 0), ("random", 1), ("random", 2)):
        outs, _ = ref.run(g, policy, seed)
        for got, want in zip(outs, ref.logits):
            assert _rel(got, want) <= TOLERANCES[dtype], (arch, policy, seed, _rel(got, want))


# ------------------------------------------------------------------------------------------ step 1: shapes, text
def _shape(name):
    if name == "1b":
        return DecodeShape(16, 2048, 8192, 32, 8, 64, 128256, 1e-5, "float16", tied=True)
    return DecodeShape(32, 4096, 14336, 32, 8, 128, 128256, 1e-5, "float16")


def test_llama_shaped_floors_and_schedule():
    """Bytes per step at bs1/ctx512 (the NOTES floors) and the 1B schedule at the H200's 132 workers."""
    b1 = step_bytes(_shape("1b"), 1, 512)
    b8 = step_bytes(_shape("8b"), 1, 512)
    assert b1["weights"] == 2 * (16 * (2048 * 3072 + 2048 * 2048 + 2 * 2048 * 8192 + 8192 * 2048 + 2 * 2048)
                                 + 2048 + 128256 * 2048)
    assert 0.58 < b1["total"] / 4.26e12 * 1e3 < 0.59 and 3.53 < b8["total"] / 4.26e12 * 1e3 < 3.55
    g = build_task_graph(_shape("1b"), 1, 576, context=512)
    assert check_graph(g) == [] and g.splits == attention_splits(SM90_MEGAKERNEL, 1, 8, 576) == 5
    info = summary(g)
    assert info["workers"] == 132 and info["by_kind"]["qkv"] == 16 * 132
    assert info["floor85_ms"] < info["predicted_ms"] < 1.2 * info["floor85_ms"]
    text = render(g, workers=[0], max_tasks=5)
    assert "worker 0:" in text and "wait L0.merge>=8" not in text.split("worker 0:")[0]
    assert "... " in text and "KB" in text and "floor 0.584 ms" in text


def test_config_and_shape_checks():
    assert SM90_MEGAKERNEL.check() is None
    assert "ring" in MegakernelConfig(prefetch_chunks=16, chunk_bytes=65536).check()
    assert "threads" in MegakernelConfig(threads=96).check()
    with pytest.raises(ValueError, match="whole groups"):
        build_task_graph(DecodeShape(1, 64, 96, 3, 2, 16, 100, 1e-5, "float16"), 1, 32)
    with pytest.raises(ValueError, match="batch"):
        build_task_graph(_shape("1b"), 0, 32)


# ------------------------------------------------------------------------------------------ step 2: the region pass
def _export(hf_cfg, dtype="float16", weights="native", batches=(1, 2), max_context=32):
    from kiln.llm.model import ModelSpec, export
    cfg = L.LLMConfig.from_hf(hf_cfg, max_context)
    spec = ModelSpec(cfg, dtype, weights, max_context, batches, False, {b: 3 for b in batches})
    mod, named = export(spec)
    return cfg, mod, named


def _arch_config(arch):
    from transformers import MistralConfig, Qwen2Config
    if arch == "llama":
        return llama_config(attention_bias=True, mlp_bias=True)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                           intermediate_size=80, vocab_size=300, tie_word_embeddings=True)
    return MistralConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=72, vocab_size=200, sliding_window=None)


@pytest.mark.parametrize("arch,dtype", [("llama", "float16"), ("qwen2", "float32"), ("mistral", "bfloat16")])
def test_region_pass_fires_on_decode_functions(arch, dtype):
    from kiln.relax_passes.megakernel import FormMegakernelRegion, region_report
    cfg, mod, named = _export(_arch_config(arch), dtype)
    p = FormMegakernelRegion()
    out = p(mod)
    rep = {r["function"]: r for r in region_report(out)}
    assert rep["decode_b1"]["matched"] and rep["decode_b2"]["matched"], rep
    assert not rep["prefill"]["matched"] and "static [batch, 1]" in rep["prefill"]["reason"]
    region, graph = p.regions["decode_b2"]
    assert region.shape == DecodeShape.from_llm_config(cfg, dtype)
    assert region.batch == 2 and region.max_context == 32 and region.attn_splits == 3
    names = [n for n, _, _ in named]                       # every weight found, at its parameter index
    assert {k: names[i - 3] for k, i in region.params.items()} == {k: k for k in region.params}
    assert set(region.params) == set(names)
    want = build_task_graph(cfg, 2, 32, dtype)
    assert [t.label() for t in graph.tasks] == [t.label() for t in want.tasks] and check_graph(graph) == []


def _mutate(func, fn):
    """Apply ``fn(call) -> new expr or None`` to every call of ``func``."""
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class _M(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            new = fn(call)
            return call if new is None else new
    return _M().visit_expr(func)


def _refusal(mod, name="decode_b1"):
    from kiln.relax_passes.megakernel import FormMegakernelRegion, region_report
    rep = {r["function"]: r for r in region_report(FormMegakernelRegion([name])(mod))}
    assert not rep[name]["matched"]
    return rep[name]["reason"]


def _swap_op(old, new):
    from tvm import relax

    def fn(call):
        if isinstance(call.op, __import__("tvm").ir.Op) and call.op.name == old:
            return relax.Call(relax.op.nn.gelu(call.args[0]).op if new == "gelu" else new, call.args, call.attrs,
                              call.ty_args)
        return None
    return fn


def test_region_pass_refuses_near_misses():
    import tvm
    from tvm import relax
    _, mod, _ = _export(llama_config(), "float16", batches=(1,))
    f = mod["decode_b1"]
    # silu -> gelu in the MLP
    m1 = mod.with_attr("x", 1)
    m1["decode_b1"] = _mutate(f, _swap_op("relax.nn.silu", "gelu"))
    assert "expected relax.nn.silu, found relax.nn.gelu" in _refusal(m1)

    # layer 1's KV append writes cache layer 0
    def relayer(call):
        if call.op.name == "relax.call_tir_inplace" and int(call.args[1].fields[-1].value) == 1:
            fields = list(call.args[1].fields[:-1]) + [tvm.tirx.IntImm("int64", 0)]
            return relax.Call(call.op, [call.args[0], relax.Tuple(fields)], call.attrs, call.ty_args)
        return None
    m2 = mod.with_attr("x", 2)
    m2["decode_b1"] = _mutate(f, relayer)
    assert "writes cache layer 0, expected 1" in _refusal(m2)

    # an intermediate (the first rms_norm) is also returned
    flat = relax.transform.ToNonDataflow()(tvm.IRModule({"decode_b1": f}))["decode_b1"]
    norm = next(b.var for b in flat.body.blocks[0].bindings if b.value.op.name == "relax.nn.rms_norm")
    body = relax.BlockBuilder().normalize(relax.SeqExpr(flat.body.blocks, relax.Tuple([flat.body.body, norm])))
    tup = relax.Function(flat.params, body, attrs=flat.attrs)
    m3 = mod.with_attr("x", 3)
    m3["decode_b1"] = tup
    assert "expected float32 logits" in _refusal(m3)

    # a weight that is computed (qkv weight scaled by 1) instead of a parameter
    def scaled(call):
        if call.op.name == "relax.permute_dims" and _shape_of(call.args[0]) == (128, 64):
            return relax.op.permute_dims(relax.op.multiply(call.args[0], relax.const(1.0, "float16")))
        return None
    m4 = mod.with_attr("x", 4)
    m4["decode_b1"] = _mutate(f, scaled)
    assert "must be a function parameter" in _refusal(m4)

    # fp8 weights
    _, mod8, _ = _export(llama_config(), "float16", weights="fp8", batches=(1,))
    assert "fp8 weights" in _refusal(mod8)


def _shape_of(e):
    return tuple(int(v) for v in e.ty.shape.values) if hasattr(e.ty, "shape") and e.ty.shape is not None else None


# ------------------------------------------------------------------------------------------ step 3: the kernel (CPU)
def test_program_encodes_the_schedule():
    from kiln.schedules.megakernel_kernel import decode_program, encode_program
    g = build_task_graph(DecodeShape(2, 64, 96, 4, 2, 16, 500, 1e-5, "float16", qkv_bias=True), 2, 40,
                         config=MegakernelConfig(workers=9, tile_groups=2))
    back = decode_program(encode_program(g))
    assert len(back) == 9
    for w, ids in enumerate(g.workers):
        want = [(g.tasks[t].kind, g.tasks[t].layer, tuple(g.tasks[t].index) + (0,) * (3 - len(g.tasks[t].index)),
                 g.tasks[t].waits[0] if g.tasks[t].waits else None, g.tasks[t].signals) for t in ids]
        assert back[w] == want


def test_kernel_check_reasons():
    from kiln.schedules.megakernel_kernel import kernel_check
    ok = build_task_graph(_shape("1b"), 1, 576)
    assert kernel_check(ok) is None
    f32 = build_task_graph(DecodeShape(2, 64, 96, 4, 2, 16, 500, 1e-5, "float32"), 1, 32)
    assert "float16 or bfloat16" in kernel_check(f32)
    assert "batch 17 > 16" in kernel_check(build_task_graph(_shape("1b"), 17, 64))
    big = build_task_graph(DecodeShape(1, 2048, 4096, 16, 2, 256, 1000, 1e-5, "float16"), 1, 64,
                           config=MegakernelConfig(prefetch_chunks=12))
    assert "shared memory" in kernel_check(big)            # group 8 x head_dim 256 attention scratch + a 12-slot ring
    assert kernel_check(build_task_graph(big.shape, 1, 64)) is None     # fits with the default 8-slot ring
    assert "head_dim 24" in kernel_check(build_task_graph(DecodeShape(1, 96, 64, 4, 2, 24, 100, 1e-5, "float16"), 1, 8))


@pytest.fixture(scope="module")
def built_kernels():
    """sm_90a builds: the 1B shape in fp16 (tied head, 16 layers) and the 8B shape in bf16 (2 layers, batch 4)."""
    from kiln.schedules.gemm_sm90 import cuda_source
    from kiln.schedules.megakernel_kernel import build_megakernel, build_megakernel_module
    out = {}
    for key, shape, batch in (("1b", _shape("1b"), 1),
                              ("8b_bf16", DecodeShape(2, 4096, 14336, 32, 8, 128, 128256, 1e-5, "bfloat16"), 4)):
        g = build_task_graph(shape, batch, 576)
        func = build_megakernel(g, f"mk_{key}")
        out[key] = (g, func, cuda_source(build_megakernel_module(g, f"mk_{key}")))
    return out


@pytest.mark.parametrize("key", ["1b", "8b_bf16"])
def test_kernel_codegen(built_kernels, key):
    g, func, src = built_kernels[key]
    assert func.attrs["kiln.rule"] == "kiln.megakernel_sm90" and func.attrs["tirx.is_scheduled"]
    assert list(func.attrs["tirx.kernel_launch_params"]) == ["tirx.use_cooperative_launch"]
    assert f"__launch_bounds__({g.config.threads + 32}, 1)" in src
    for needle in ("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes", "mbarrier.try_wait.parity",
                   "mma.sync.aligned.m16n8k16.row.col.f32." + ("f16" if key == "1b" else "bf16"),
                   "ld.acquire.gpu.global.u32", "red.release.gpu.global.add.u32", "ld.global.cg", "__trap()",
                   "createpolicy.fractional.L2::evict_first"):
        assert needle in src, needle
    assert f"constexpr int NTASKS = {len(g.tasks)};" in src and f"constexpr int W = {len(g.workers)};" in src


@pytest.mark.parametrize("key", ["1b", "8b_bf16"])
def test_kernel_ptxas_sm90a_no_spills(built_kernels, key, tmp_path):
    import shutil
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    from _ptxas import ptxas_sm90a
    report = ptxas_sm90a(built_kernels[key][2], tmp_path)
    assert "used 2 barriers" in report


# ------------------------------------------------------------------------------------------ step 3: the kernel (GPU)
_GPU_TIMEOUT_S = 900


def _gpu_model(arch):
    from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    if arch == "qwen2":
        cfg = Qwen2Config(hidden_size=512, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=1,
                          intermediate_size=1024, vocab_size=1500, tie_word_embeddings=True)
        cfg._attn_implementation = "eager"
        return random_biases(Qwen2ForCausalLM(cfg).eval(), std=0.05)
    return LlamaForCausalLM(llama_config(hidden_size=512, num_hidden_layers=3, num_attention_heads=8,
                                          num_key_value_heads=2, intermediate_size=1376, vocab_size=2000)).eval()


def _gpu_check(arch: str, dtype: str, batch: int, steps: int = 4) -> dict:
    """(Runs in a child process.) The megakernel alone vs kiln.llm's layer-by-layer decode on the same cache:
    logits of ``steps`` consecutive steps and the cache rows they append. Prints one ``RESULT`` JSON line."""
    import json

    import tvm
    from kiln.schedules.megakernel_kernel import build_megakernel_module, encode_program, scratch_layout, weight_order
    model = _gpu_model(arch)
    C, prompt = 256, 37
    llm = L.compile(model, target="cuda", dtype=dtype, max_context=C, decode_batches=(batch,), progress=False)
    sess = llm.session()
    g = torch.Generator().manual_seed(5)
    vocab = model.config.vocab_size
    sess.prefill(torch.randint(0, vocab, (batch, prompt), generator=g))
    cache = torch.from_dlpack(sess._state(batch).cache).clone()
    graph = build_task_graph(llm.spec.config, batch, C, dtype)
    f = build_megakernel_module(graph, "mk_gpu_test")["mk_gpu_test"]
    dev = tvm.cuda(0)
    params = {n: p for (n, _, _), p in zip(llm.param_specs, sess.params)}
    weights = [params[n] for n in weight_order(graph)]
    prog = tvm.runtime.tensor(encode_program(graph), dev)
    errs = []
    for step in range(steps):
        tok = torch.randint(0, vocab, (batch,), generator=g)
        want = sess.decode(tok.cuda()).float()
        ids = tok.to(device="cuda", dtype=torch.int32).reshape(batch, 1)
        pos = torch.full((batch,), prompt + step, dtype=torch.int32, device="cuda")
        sync = torch.zeros(len(graph.counters), dtype=torch.int32, device="cuda")
        logits = torch.full((batch, vocab), float("nan"), device="cuda")
        scratch = torch.full((scratch_layout(graph).total,), 0xFF, dtype=torch.uint8, device="cuda")   # NaN fp16
        f(*[tvm.runtime.from_dlpack(t) for t in (ids, pos, cache)], prog, tvm.runtime.from_dlpack(sync), *weights,
          tvm.runtime.from_dlpack(logits), tvm.runtime.from_dlpack(scratch))
        torch.cuda.synchronize()
        errs.append(float(((logits - want).abs().max() / want.abs().max()).item()))
        totals = sync.cpu().tolist() == list(graph.counter_totals)
    ref_cache = torch.from_dlpack(sess._state(batch).cache)
    used = slice(0, prompt + steps)
    cache_err = float((cache[..., used, :].float() - ref_cache[..., used, :].float()).abs().max())
    out = {"errs": errs, "cache_err": cache_err, "counters_at_totals": totals}
    print("RESULT " + json.dumps(out), flush=True)
    return out


def _run_child(call: str) -> dict:
    """Run ``call`` (a Python expression over this module, ``t``) in a child process with a timeout: a kernel
    that hangs (or traps) fails the test instead of hanging the run."""
    import json
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import test_megakernel as t; {call}"
    env = dict(os.environ, KILN_PROGRESS="0")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=_GPU_TIMEOUT_S,
                           env=env, cwd=os.path.dirname(here))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{call} did not finish in {_GPU_TIMEOUT_S} s (a hang in the megakernel?)")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.gpu
@pytest.mark.parametrize("arch,dtype,batch", [("llama", "float16", 1), ("llama", "float16", 4),
                                              ("qwen2", "bfloat16", 2)])
def test_gpu_megakernel_matches_layer_by_layer(arch, dtype, batch):
    res = _run_child(f"t._gpu_check({arch!r}, {dtype!r}, {batch})")
    assert res["counters_at_totals"], res
    assert max(res["errs"]) <= TOLERANCES[dtype], res
    assert res["cache_err"] <= {"float16": 1e-2, "bfloat16": 6e-2}[dtype], res


# ------------------------------------------------------------------------------------------ step 4: wiring
def test_llm_compile_adds_megakernel_decode(tmp_path, capsys):
    """cuda build (no GPU needed): decode_b1_mk next to decode_b1, captured as one CUDA graph; batch 20 refused
    with the kernel's reason; the artifact records it and ``kiln inspect`` prints the task schedule."""
    import json

    from kiln.cli import main as cli
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config()).eval()
    llm = L.compile(model, target="cuda", dtype="float16", max_context=64, decode_batches=(1, 20), progress=False,
                    megakernel=True, dump_ir=str(tmp_path / "ir"))
    assert llm.spec.megakernel == (1,)
    assert any("decode_b20 not added: kernel: batch 20 > 16" in n for n in llm.notes)
    rules = {r["func"]: r["rule"] for r in llm.schedule_report}
    assert rules["kiln_megakernel_decode_b1"] == "kiln.megakernel_sm90"
    lowered = (tmp_path / "ir" / "05_lower.py").read_text()
    mk = lowered[lowered.index("def decode_b1_mk("):]
    mk = mk[:mk.index("\n    @")]
    assert mk.count("vm.builtin.cuda_graph.run_or_capture") == 1
    assert "decode_b1_mk" in llm.signatures() and "decode_b20_mk" not in llm.signatures()
    path = llm.export(str(tmp_path / "art"))
    man = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert man["llm"]["megakernel"] == [1] and "decode_b1_mk" in man["entries"]
    assert man["llm"]["megakernel_config"] == SM90_MEGAKERNEL.to_json()
    capsys.readouterr()
    assert cli(["inspect", path]) == 0
    text = capsys.readouterr().out
    assert "megakernel task schedule" in text and "decode_b1_mk:" in text and "worker 1:" in text
    assert "worker 2:" not in text


def test_megakernel_option_needs_cuda(llama_ref):
    from kiln.errors import KilnError
    with pytest.raises(KilnError, match="needs target cuda"):
        L.compile(_tiny_llama(), target="llvm", max_context=16, megakernel=True, progress=False)
    with pytest.raises(L.BatchSizeError, match="no megakernel decode function"):
        llama_ref.llm.session().set_megakernel(True)


def _tiny_llama():
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(num_hidden_layers=1)).eval()


def _gpu_session_check(dtype: str, batch: int, steps: int = 6) -> dict:
    """(Child process.) kiln.llm with megakernel=True: decode_b{B}_mk through the session (CUDA graph) vs
    decode_b{B}, logits of ``steps`` steps from the same prefill."""
    import json
    model = _gpu_model("llama")
    llm = L.compile(model, target="cuda", dtype=dtype, max_context=256, decode_batches=(batch,), progress=False,
                    megakernel=True)
    assert llm.spec.megakernel == (batch,), llm.notes
    g = torch.Generator().manual_seed(9)
    prompt = torch.randint(0, model.config.vocab_size, (batch, 21), generator=g)
    toks = torch.randint(0, model.config.vocab_size, (steps, batch), generator=g)
    runs = {}
    for mk in (False, True):
        sess = llm.session()
        sess.set_megakernel(mk)
        sess.prefill(prompt)
        runs[mk] = [sess.decode(t.cuda()).float() for t in toks]
    errs = [float(((a - b).abs().max() / b.abs().max()).item()) for a, b in zip(runs[True], runs[False])]
    print("RESULT " + json.dumps({"errs": errs}), flush=True)
    return {"errs": errs}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,batch", [("float16", 1), ("bfloat16", 8)])
def test_gpu_session_megakernel_decode(dtype, batch):
    res = _run_child(f"t._gpu_session_check({dtype!r}, {batch})")
    assert max(res["errs"]) <= TOLERANCES[dtype], res
