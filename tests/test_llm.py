"""kiln.llm: prefill + decode over the static KV cache, generate, the artifact, errors (CPU), and the GPU checks.

CPU tests compile tiny random-weight models for llvm (fp32) and compare with transformers eager: greedy tokens
must be identical for 64 steps. GPU tests (marker gpu) compare fp16/fp8 logits with torch and the fp32 greedy
tokens under CUDA graphs.
"""
import copy
import json
import os

import pytest
import torch

import kiln.llm as L
from kiln.errors import ArtifactError, ArtifactIntegrityError, InputMismatchError
from kiln.llm.weights import quantize_fp8
from kiln.verify import TOLERANCES

from _llm_models import llama_config, random_biases

MAXCTX = 96


def _hf_greedy(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids),
                              pad_token_id=0, eos_token_id=None)


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config()).eval()


@pytest.fixture(scope="module")
def llama_llm(llama):
    return L.compile(llama, target="llvm", max_context=MAXCTX, decode_batches=(1, 2), progress=False)


# ------------------------------------------------------------------------------------------ correctness
def test_greedy_64_steps_token_exact_vs_transformers(llama, llama_llm):
    ids = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(1))
    out = L.generate(llama_llm, ids, 64)
    assert out.shape == (2, 71)
    assert torch.equal(out, _hf_greedy(llama, ids, 64))


def test_prefill_and_decode_logits_match_transformers(llama, llama_llm):
    ids = torch.randint(0, 500, (1, 11), generator=torch.Generator().manual_seed(2))
    sess = llama_llm.session()
    got = [sess.prefill(ids)]
    nxt = [5, 17, 300]
    for t in nxt:
        got.append(sess.decode(torch.tensor([t])))
    full = torch.cat([ids, torch.tensor([nxt])], dim=1)
    with torch.no_grad():
        ref = llama(full).logits[0, 10:]
    for i, g in enumerate(got):
        err = (g[0] - ref[i]).abs().max() / ref[i].abs().max()
        assert err <= TOLERANCES["float32"], (i, float(err))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_logits_on_cpu(llama, dtype):
    llm = L.compile(llama, target="llvm", dtype=dtype, max_context=32, decode_batches=(1,), progress=False)
    ids = torch.randint(0, 500, (1, 9), generator=torch.Generator().manual_seed(12))
    sess = llm.session()
    got = [sess.prefill(ids), sess.decode(torch.tensor([3]))]
    with torch.no_grad():
        ref = llama(torch.cat([ids, torch.tensor([[3]])], 1)).logits[0, 8:]
    for g, r in zip(got, ref):
        assert float((g[0] - r).abs().max() / r.abs().max()) <= TOLERANCES[dtype]


def test_one_token_prompt_leaves_attention_splits_empty(llama, llama_llm):
    """Prompt of one token: the first decode sees 2 keys over 3 KV splits (one split is empty)."""
    ids = torch.tensor([[42]])
    assert llama_llm.spec.attn_splits[1] == 3
    assert torch.equal(L.generate(llama_llm, ids, 8), _hf_greedy(llama, ids, 8))


def test_qwen2_bias_and_tied_embeddings_token_exact():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(3)
    cfg = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                      intermediate_size=80, vocab_size=300, max_position_embeddings=128, tie_word_embeddings=True)
    cfg._attn_implementation = "eager"
    model = random_biases(Qwen2ForCausalLM(cfg).eval())
    llm = L.compile(model, target="llvm", max_context=64, decode_batches=(1,), progress=False)
    assert llm.spec.config.qkv_bias and llm.spec.config.tie_word_embeddings
    assert "lm_head.weight" not in [n for n, _, _ in llm.param_specs]   # the head reads the embedding
    ids = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(4))
    assert torch.equal(L.generate(llm, ids, 40), _hf_greedy(model, ids, 40))


def test_fp8_weights_match_dequantized_reference():
    """fp8: e4m3 weights with per-channel scales give the logits of the model with dequantised weights."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(5)
    model = random_biases(LlamaForCausalLM(llama_config(attention_bias=True, mlp_bias=True)).eval())
    llm = L.compile(model, target="llvm", weights="fp8", max_context=64, decode_batches=(1,), progress=False)
    dtypes = {n: d for n, _, d in llm.param_specs}
    assert dtypes["model.layers.0.self_attn.qkv_proj.weight"] == "float8_e4m3fn"
    assert dtypes["model.layers.0.self_attn.qkv_proj.weight_scale"] == "float32"
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for mod in ref.modules():
            if isinstance(mod, torch.nn.Linear):
                w8, s = quantize_fp8(mod.weight)
                mod.weight.copy_(w8.float() * s[:, None])
    ids = torch.randint(0, 500, (1, 9), generator=torch.Generator().manual_seed(6))
    got = llm.session().prefill(ids)[0]
    with torch.no_grad():
        want = ref(ids).logits[0, -1]
    assert (got - want).abs().max() / want.abs().max() <= TOLERANCES["float32"]
    assert torch.equal(L.generate(llm, ids, 16), _hf_greedy(ref, ids, 16))


def test_quantize_fp8_is_per_channel_and_bounded():
    w = torch.randn(6, 40) * torch.arange(1, 7)[:, None]
    w8, s = quantize_fp8(w)
    assert w8.dtype == torch.float8_e4m3fn and s.shape == (6,)
    assert torch.allclose(w8.float().abs().amax(dim=1), torch.full((6,), 448.0))
    assert ((w8.float() * s[:, None] - w).abs() <= w.abs().amax(dim=1, keepdim=True) / 16).all()


# ------------------------------------------------------------------------------------------ sampling
def test_sampling_reproducible_under_seed(llama_llm):
    ids = torch.randint(0, 500, (2, 4), generator=torch.Generator().manual_seed(7))
    kw = dict(do_sample=True, temperature=1.5, top_k=50, top_p=0.95)
    a = L.generate(llama_llm, ids, 12, seed=11, **kw)
    b = L.generate(llama_llm, ids, 12, seed=11, **kw)
    c = L.generate(llama_llm, ids, 12, seed=12, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sampling_with_top_k_1_is_greedy(llama_llm):
    ids = torch.randint(0, 500, (1, 6), generator=torch.Generator().manual_seed(8))
    greedy = L.generate(llama_llm, ids, 10)
    assert torch.equal(L.generate(llama_llm, ids, 10, do_sample=True, top_k=1, seed=0), greedy)
    assert torch.equal(L.generate(llama_llm, ids, 10, do_sample=True, top_p=1e-6, seed=0), greedy)


def test_generate_stops_at_eos(llama_llm):
    ids = torch.randint(0, 500, (1, 5), generator=torch.Generator().manual_seed(9))
    free = L.generate(llama_llm, ids, 10)
    eos = int(free[0, 5 + 3])                         # the 4th generated token
    out = L.generate(llama_llm, ids, 10, eos_token_id=eos)
    first = (free[0, 5:] == eos).nonzero()[0, 0].item()
    assert out.shape[1] == 5 + first + 1 and int(out[0, -1]) == eos


# ------------------------------------------------------------------------------------------ artifact
def test_export_load_round_trip_generates_the_same_tokens(llama_llm, tmp_path):
    path = llama_llm.export(str(tmp_path / "llm"))
    assert sorted(os.listdir(path)) == ["manifest.json", "model.so", "weights.params"]
    man = json.loads((tmp_path / "llm" / "manifest.json").read_text())
    assert man["kind"] == "llm" and set(man["entries"]) == {"prefill", "decode_b1", "decode_b2"}
    assert man["params"][0]["weight"] == "model.embed_tokens.weight"
    ids = torch.randint(0, 500, (2, 6), generator=torch.Generator().manual_seed(10))
    loaded = L.load(path)
    assert torch.equal(L.generate(path, ids, 20), L.generate(llama_llm, ids, 20))
    assert torch.equal(L.generate(loaded, ids, 20), L.generate(llama_llm, ids, 20))
    with open(os.path.join(path, "weights.params"), "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00" * 8)
    with pytest.raises(ArtifactIntegrityError):
        L.load(path)


def test_load_refuses_a_plain_kiln_artifact(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(
        {"format": "kiln-artifact", "format_version": 1, "versions": {}, "target": {}, "signature": {},
         "params": [], "files": {}}))
    with pytest.raises(ArtifactError, match="not an LLM artifact"):
        L.load(str(tmp_path / "a"))


# ------------------------------------------------------------------------------------------ errors
def test_prompt_longer_than_cache(llama_llm):
    with pytest.raises(L.ContextLengthError, match="longer than the KV cache"):
        L.generate(llama_llm, torch.zeros(1, MAXCTX + 1, dtype=torch.long), 1)
    with pytest.raises(L.ContextLengthError, match="cache positions"):
        L.generate(llama_llm, torch.zeros(1, MAXCTX - 4, dtype=torch.long), 10)


def test_batch_without_decode_function(llama_llm):
    with pytest.raises(L.BatchSizeError, match=r"compiled decode batches: \[1, 2\]"):
        L.generate(llama_llm, torch.zeros(3, 4, dtype=torch.long), 5)


def test_bad_token_ids_and_arguments(llama_llm):
    with pytest.raises(InputMismatchError, match=r"\[0, 500\)"):
        L.generate(llama_llm, torch.tensor([[1, 500]]), 2)
    with pytest.raises(TypeError, match="integer token ids"):
        L.generate(llama_llm, torch.zeros(1, 3), 2)
    with pytest.raises(ValueError, match="temperature"):
        L.generate(llama_llm, torch.zeros(1, 3, dtype=torch.long), 2, do_sample=True, temperature=0)


@pytest.mark.parametrize("kw,field", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}), "rope_type"),
])
def test_unsupported_llama_config_fields(kw, field):
    with pytest.raises(L.UnsupportedConfigError, match=field):
        L.LLMConfig.from_hf(llama_config(**kw), 64)


def test_mistral_sliding_window():
    from transformers import MistralConfig
    cfg = MistralConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=96, vocab_size=100, sliding_window=32)
    with pytest.raises(L.UnsupportedConfigError, match="sliding_window=32"):
        L.LLMConfig.from_hf(cfg, 64)
    assert L.LLMConfig.from_hf(cfg, 32).arch == "mistral"   # a window covering the cache is full attention


def test_other_architectures_refused():
    from transformers import GPT2Config
    with pytest.raises(L.UnsupportedConfigError, match="model_type"):
        L.LLMConfig.from_hf(GPT2Config(), 64)


# ------------------------------------------------------------------------------------------ graph and codegen
def test_decode_graph_is_the_megakernel_sequence(llama):
    """Per layer: rms_norm, qkv GEMM, RoPE + in-place KV append, split-KV attention, o_proj + residual, ..."""
    from kiln.llm.model import ModelSpec, export
    spec = ModelSpec(L.LLMConfig.from_hf(llama.config, 32), "float32", "native", 32, (1,), False, {1: 3})
    mod, _ = export(spec)
    text = mod["decode_b1"].script()
    layer = ["R.nn.rms_norm", "R.matmul", "R.call_tir_inplace(kiln_rope_kv_append",
             "kiln_decode_attn_partial_s3", "kiln_decode_attn_merge_s3", "R.matmul", "R.add", "R.nn.rms_norm",
             "R.matmul", "R.split", "R.nn.silu", "R.multiply", "R.matmul", "R.add"]
    pos = 0
    for _ in range(2):
        for op in layer:
            nxt = text.find(op, pos)
            assert nxt >= 0, f"{op} not found after offset {pos}"
            pos = nxt + 1


def test_cuda_build_captures_decode_in_one_graph(tmp_path):
    """cuda (fp32, no GPU needed): the decode step is one CUDA-graph capture; prefill is not captured."""
    from transformers import LlamaForCausalLM
    from kiln.target import device_code
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config()).eval()
    llm = L.compile(model, target="cuda", max_context=64, decode_batches=(1,), progress=False, dump_ir=str(tmp_path))
    assert llm.uses_cuda_graph
    rules = {r["func"].rsplit("_s", 1)[0]: r["rule"] for r in llm.schedule_report}
    for k in ("kiln_rope_kv_append", "kiln_kv_read", "kiln_decode_attn_partial", "kiln_decode_attn_merge"):
        assert rules[k] == "kiln.llm", (k, rules.get(k))
    src = "\n".join(t for fmt, t in device_code(llm.executable) if fmt == "cuda")
    assert "kiln_decode_attn_partial" in src and "__shfl_down_sync" in src
    lowered = (tmp_path / "05_lower.py").read_text()
    decode = lowered[lowered.index("def decode_b1("):]
    decode = decode[:decode.index("\n    @")]
    prefill = lowered[lowered.index("def prefill("):]
    prefill = prefill[:prefill.index("\n    @")] if "\n    @" in prefill else prefill
    assert decode.count("vm.builtin.cuda_graph.run_or_capture") == 1    # the whole step, one region
    assert "run_or_capture" not in prefill


# ------------------------------------------------------------------------------------------ GPU
def _hf_on_cuda(model, dtype):
    return copy.deepcopy(model).to(device="cuda", dtype=dtype).eval()


@pytest.mark.gpu
def test_gpu_fp32_greedy_token_exact_under_cuda_graphs(llama):
    """max_context 1024: 16 KV splits per sequence, most of them empty or short at these positions."""
    torch.backends.cuda.matmul.allow_tf32 = False
    llm = L.compile(llama, target="cuda", max_context=1024, decode_batches=(1, 2), progress=False)
    assert llm.uses_cuda_graph and llm.spec.attn_splits == {1: 16, 2: 16}
    ids = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(1))
    out = L.generate(llm, ids, 64)
    ref = _hf_greedy(_hf_on_cuda(llama, torch.float32), ids.cuda(), 64).cpu()
    assert torch.equal(out, ref)
    again = L.generate(llm, ids, 64)                   # graph replays on the same buffers
    assert torch.equal(again, out)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["llama3-1b", "llama3-8b"])
@pytest.mark.parametrize("weights", ["native", "fp8"])
def test_gpu_fp16_logits_vs_torch(shape, weights):
    """Real head/group/hidden shapes (2 layers): fp16 prefill and 8 decode steps vs torch fp32 eager."""
    from transformers import LlamaForCausalLM
    dims = {"llama3-1b": dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192),
            "llama3-8b": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336)}
    torch.manual_seed(0)
    cfg = llama_config(num_hidden_layers=2, vocab_size=32000, max_position_embeddings=4096, **dims[shape])
    model = LlamaForCausalLM(cfg).eval()
    llm = L.compile(model, target="cuda", dtype="float16", weights=weights, max_context=1024, decode_batches=(1, 4),
                    progress=False)
    ref = _hf_on_cuda(model, torch.float32)
    if weights == "fp8":
        with torch.no_grad():
            for mod in ref.modules():
                if isinstance(mod, torch.nn.Linear):
                    w8, s = quantize_fp8(mod.weight)
                    mod.weight.copy_(w8.float() * s[:, None])
    torch.backends.cuda.matmul.allow_tf32 = False
    sess = llm.session()
    for batch, length in ((4, 300), (1, 77)):
        ids = torch.randint(0, 32000, (batch, length), generator=torch.Generator().manual_seed(3))
        nxt = torch.randint(0, 32000, (batch, 8), generator=torch.Generator().manual_seed(4))
        got = [sess.prefill(ids)]
        for j in range(nxt.shape[1]):
            got.append(sess.decode(nxt[:, j].cuda()))
        with torch.no_grad():
            want = ref(torch.cat([ids, nxt], 1).cuda()).logits[:, length - 1:].float()
        for j, g in enumerate(got):
            w = want[:, j]
            assert ((g - w).abs().max() / w.abs().max()).item() <= TOLERANCES["float16"], (j, batch, shape, weights)


# ------------------------------------------------------------------------------------------ benchmark script
def _bench_module():
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "llm.py")
    spec = importlib.util.spec_from_file_location("bench_llm", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_script_cpu_smoke(tmp_path):
    bench = _bench_module()
    out = tmp_path / "llm.json"
    assert bench.main(["--device", "cpu", "--models", "tiny", "--weights", "fp16,fp8", "--batches", "1",
                       "--contexts", "24", "--prefill", "8", "--reps", "2", "--warmup", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    kiln = [r for r in rows if r["backend"] == "kiln" and r["kind"] == "decode"]
    assert len(kiln) == 2 and all(r["status"] == "ok" and r["rel_err"] < 1e-4 for r in kiln), kiln
    assert {r["kind"] for r in rows} == {"compile", "prefill", "decode"}


def test_plain_vm_runs_the_artifact(tmp_path):
    """The deploy check (TVM runtime API only: load_module + VirtualMachine + weights) on a CPU artifact."""
    bench = _bench_module()
    assert bench.deploy_prepare(str(tmp_path), target="llvm") == 0
    assert bench.deploy_check(str(tmp_path), str(tmp_path / "check.json")) == 0
    row = json.loads((tmp_path / "check.json").read_text())["rows"][0]
    assert row["tokens_match"] and row["steps"] == bench.DEPLOY_STEPS
