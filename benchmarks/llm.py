#!/usr/bin/env python3
"""LLM decode and prefill: kiln (layer-by-layer, decode under CUDA graphs) vs torch eager vs torch.compile
reduce-overhead, on Llama-3.2-1B-shaped and Llama-3-8B-shaped models (random weights), fp16 and fp8 weights.

Per (model, weights, batch, context):
  * torch: transformers ``LlamaForCausalLM`` (fp16, SDPA attention) with a ``StaticCache`` prefilled with
    ``context`` random tokens; one decode step writes position ``context`` and attends over 0..context
    (the step is repeated at that position, so every call does the same work). fp8 peers replace every
    ``nn.Linear`` by e4m3 weights + per-channel scales dequantised per call (``F.linear(x, w8.to(fp16)) * s``).
  * kiln: ``kiln.llm.compile(..., decode_batches=batches)`` once per (model, weights); the torch cache is
    copied into kiln's cache (same post-RoPE K/V), then ``decode_b{B}`` is timed at the same position and
    its logits are compared with the eager step (``rel_err`` = max |kiln - eager| / max |eager|, ``argmax``
    = fraction of rows with the same argmax).
  * ms/token = median step time (CUDA events, device idle before each call: single-step latency);
    effective TB/s = (weight bytes + KV bytes read by the step) / time. KV bytes = layers * 2 * batch *
    kv_heads * (context + 1) * head_dim * 2.
  * prefill: ``--prefill`` tokens at batch 1 (kiln ``prefill``, which also fills its KV cache, vs the torch
    forward of the same tokens without a cache, last-position logits only).
Rows are written to ``--out`` after each measurement; a table is printed at the end.

On the GPU machine, from the repository root (a slice in a few minutes):
    source .device/setup-tvm .device && python3 benchmarks/llm.py --models 1b --weights fp16 --batches 1 \\
        --contexts 512 --out $OUT/llm.json
Full run: ``--models 1b,8b --weights fp16,fp8 --batches 1,8,32 --contexts 512,4096``.
CPU smoke run (llvm, tiny model, eager peer only): ``python3 benchmarks/llm.py --device cpu --models tiny``.
kiln megakernel rows (``decode_b{B}_mk``: the whole step as one persistent kernel; not yet verified on a GPU, so
opt-in and best in its own run -- a trapping kernel leaves the CUDA context unusable for the rows after it):
    python3 benchmarks/llm.py --models 1b --weights fp16 --batches 1 --contexts 512 --backends kiln,megakernel \
        --prefill 0 --out $OUT/llm-mk.json

Deploy check (artifact loads and generates with runtime-only TVM: no kiln, no torch, no compiler):
    python3 benchmarks/llm.py deploy-prepare DIR      # here: tiny fp32 Llama for cuda + expected tokens
    python3 benchmarks/llm.py deploy-check DIR [--out FILE]   # on the GPU with runtime-only TVM
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

SCHEMA = "kiln-llm-bench/1"
_ROPE_32 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
MODELS = {
    "1b": dict(desc="Llama-3.2-1B-shaped", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
               max_position_embeddings=131072, rope_parameters=_ROPE_32),
    "8b": dict(desc="Llama-3-8B-shaped", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
               max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "tiny": dict(desc="tiny Llama (smoke)", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=96, vocab_size=500, tie_word_embeddings=False,
                 max_position_embeddings=1024),
}
DEPLOY_STEPS = 32


# ------------------------------------------------------------------------------------------ models
def make_hf(name: str, device: str, seed: int = 0):
    """Random-weight transformers Llama of a :data:`MODELS` shape, fp16 on cuda (fp32 on cpu), SDPA."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    kw = {k: v for k, v in MODELS[name].items() if k != "desc"}
    cfg = LlamaConfig(**kw)
    cfg._attn_implementation = "sdpa"
    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval()


class TorchFP8Linear:
    """e4m3 weight + float32 per-channel scale; forward dequantises per call (the torch fp8 peer)."""

    @staticmethod
    def module(linear):
        import torch
        from kiln.llm.weights import quantize_fp8

        class FP8Linear(torch.nn.Module):
            def __init__(self):
                super().__init__()
                w8, s = quantize_fp8(linear.weight)
                self.register_buffer("w8", w8)
                self.register_buffer("scale", s)
                self.bias = linear.bias

            def forward(self, x):
                # dequantise the weight first: x @ w8^T in fp16 overflows (|w8| <= 448 summed over K) before the
                # scale is applied, which made the 8B fp8 reference inf/NaN on the H200 (session 2)
                w = (self.w8.to(torch.float32) * self.scale[:, None]).to(x.dtype)
                y = torch.nn.functional.linear(x, w)
                return y if self.bias is None else y + self.bias
        return FP8Linear()


def to_fp8_peer(model) -> None:
    """Replace every ``nn.Linear`` (LM head included) by :class:`TorchFP8Linear`, in place."""
    import torch
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(mod, cname, TorchFP8Linear.module(child))
    model.config.tie_word_embeddings = False


class TorchDecode:
    """One batch-``b`` decode step over a transformers ``StaticCache`` prefilled to ``context`` tokens."""

    def __init__(self, model, prompt, context: int):
        import torch
        from transformers import StaticCache
        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=context + 16)
        dev = prompt.device
        self.pos = torch.tensor([context], device=dev)
        with torch.no_grad():  # logits of the last position only: [32, 4096, 128256] fp16 would be 34 GB
            model(input_ids=prompt, past_key_values=self.cache, cache_position=torch.arange(context, device=dev),
                  use_cache=True, logits_to_keep=1)
        # transformers 5.2x StaticLayer writes at its own counter: rewind it every step (one foreach kernel)
        self.lens = [ly.cumulative_length for ly in getattr(self.cache, "layers", [])
                     if isinstance(getattr(ly, "cumulative_length", None), torch.Tensor)]
        self.ctx_vals = [torch.full_like(t, context) for t in self.lens]

    def step(self, ids):
        import torch
        if self.lens:
            torch._foreach_copy_(self.lens, self.ctx_vals)
        with torch.no_grad():
            return self.model(input_ids=ids, past_key_values=self.cache, cache_position=self.pos,
                              use_cache=True).logits[:, -1]

    def kv(self, layer: int):
        ly = self.cache.layers[layer]
        return ly.keys, ly.values


# ------------------------------------------------------------------------------------------ accounting
def weight_bytes(llm) -> int:
    """Bytes of weights one decode step reads (embedding rows and RoPE table rows are negligible)."""
    import numpy as np
    total, tied = 0, llm.spec.config.tie_word_embeddings and llm.spec.weight_format == "native"
    for name, shape, dtype in llm.param_specs:
        if name.startswith("rope_") or (name == "model.embed_tokens.weight" and not tied):
            continue
        item = 1 if dtype.startswith("float8") else np.dtype(dtype).itemsize
        total += int(np.prod(shape)) * item
    return total


def kv_bytes(cfg, batch: int, context: int, elem: int = 2) -> int:
    return cfg.num_layers * 2 * batch * cfg.num_kv_heads * (context + 1) * cfg.head_dim * elem


# ------------------------------------------------------------------------------------------ runner
class Bench:
    def __init__(self, args):
        self.args = args
        self.rows: list[dict] = []
        self.meta: dict = {}
        self.device = args.device

    def save(self) -> None:
        if self.args.out:
            os.makedirs(os.path.dirname(os.path.abspath(self.args.out)), exist_ok=True)
            with open(self.args.out, "w") as f:
                json.dump({"schema": SCHEMA, "meta": self.meta, "rows": self.rows}, f, indent=1)

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("error", "kiln")}), flush=True)
        self.save()
        return row

    def timed(self, fn, reps=None) -> dict:
        from timing import time_calls
        a = self.args
        return time_calls(fn, [()], self.device, warmup=a.warmup, reps=reps or a.reps, blocks=2)

    # -------------------------------------------------------------------------------- one model
    def run_model(self, name: str, weights: str) -> None:
        a = self.args
        base = dict(model=name, desc=MODELS[name]["desc"], weights=weights,
                    dtype="float16" if self.device == "cuda" else "float32")
        t0 = time.perf_counter()
        hf = make_hf(name, self.device)
        base["hf_init_s"] = round(time.perf_counter() - t0, 2)
        llms = self.compile_all(base, hf, weights)
        if weights == "fp8":
            to_fp8_peer(hf)
        if a.prefill and llms:
            self.prefill_rows(base, hf, next(iter(llms.values()))[1])
        for b in a.batches:
            llm, sess = llms.get(b, (None, None))
            for c in a.contexts:
                self.decode_rows(dict(base, batch=b, context=c), hf, llm, sess)
        del llms, hf
        _free()

    def compile_all(self, base: dict, hf, weights: str) -> dict:
        """batch -> (CompiledLLM, session): one compile with every batch; if it fails, one compile per batch
        (so that one batch's failure does not hide the others')."""
        a = self.args
        groups = [tuple(a.batches)]
        out = {}
        while groups:
            batches = groups.pop(0)
            row = dict(base, kind="compile", backend="kiln", batches=list(batches))
            try:
                llm, secs = self.compile_one(hf, weights, batches)
                sess = llm.session(self.device)
                out.update({b: (llm, sess) for b in batches})
                self.add(dict(row, status="ok", compile_s=round(secs, 2), stage_s=llm.timings,
                              fallbacks=len(llm.fallbacks()), weight_GB=round(weight_bytes(llm) / 1e9, 3),
                              notes=llm.notes,
                              schedule=[{k: r[k] for k in ("func", "rule", "fallback")} for r in llm.schedule_report]))
            except Exception as e:  # noqa: BLE001
                self.add(dict(row, status=f"FAILED: {_short(e)}", error=traceback.format_exc()))
                if len(batches) > 1:
                    groups.extend((b,) for b in batches)
        return out

    def compile_one(self, hf, weights: str, batches: tuple):
        import kiln.llm as L
        a = self.args
        t0 = time.perf_counter()
        llm = L.compile(hf, target="cuda" if self.device == "cuda" else "llvm",
                        dtype="float16" if self.device == "cuda" else "float32",
                        weights="fp8" if weights == "fp8" else "native", max_context=max(a.contexts) + 64,
                        decode_batches=batches, progress=False,
                        megakernel="megakernel" in a.backends and self.device == "cuda")
        return llm, time.perf_counter() - t0

    def prefill_rows(self, base: dict, hf, sess) -> None:
        import torch
        a = self.args
        g = torch.Generator().manual_seed(a.seed)
        ids = torch.randint(0, hf.config.vocab_size, (1, a.prefill), generator=g).to(self.device)
        with torch.no_grad():
            ref = hf(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1].float()
        row = dict(base, kind="prefill", batch=1, tokens=a.prefill)
        cap = sess.spec.max_context if sess is not None else None
        if sess is not None and a.prefill > cap:
            self.add(dict(row, backend="kiln", status=f"skipped: --prefill {a.prefill} > the cache's {cap} positions"))
            sess = None
        if sess is not None:
            try:
                from kiln.llm.runtime import _to_tvm
                x = _to_tvm(ids.to(torch.int32), sess._dev)
                st = sess._state(1)
                out = sess.vm["prefill"](x, st.cache, *sess.params)
                got = torch.from_dlpack(out).float()
                t = self.timed(lambda: sess.vm["prefill"](x, st.cache, *sess.params), reps=max(5, a.reps // 4))
                self.add(dict(row, backend="kiln", status="ok", ms=t["median_ms"], p10_ms=t["p10_ms"],
                              p90_ms=t["p90_ms"], **_agree(got, ref)))
            except Exception as e:  # noqa: BLE001
                self.add(dict(row, backend="kiln", status=f"FAILED: {_short(e)}", error=traceback.format_exc()))
        # the torch peers run the prompt without a cache and compute the last position's logits only (as
        # generate does); kiln's prefill also writes the prompt's K/V into its cache
        fwd = lambda: hf(input_ids=ids, use_cache=False, logits_to_keep=1).logits  # noqa: E731
        with torch.no_grad():
            t = self.timed(fwd, reps=max(5, a.reps // 4))
        self.add(dict(row, backend="eager", status="ok", ms=t["median_ms"], p10_ms=t["p10_ms"], p90_ms=t["p90_ms"]))
        if "compile" in a.backends and self.device == "cuda":
            try:
                torch._dynamo.reset()
                cf = torch.compile(fwd, mode="reduce-overhead")
                t0 = time.perf_counter()
                with torch.no_grad():
                    for _ in range(3):
                        cf()
                torch.cuda.synchronize()
                cs = time.perf_counter() - t0
                with torch.no_grad():
                    t = self.timed(cf, reps=max(5, a.reps // 4))
                self.add(dict(row, backend="compile", status="ok", ms=t["median_ms"], p10_ms=t["p10_ms"],
                              p90_ms=t["p90_ms"], compile_s=round(cs, 2)))
            except Exception as e:  # noqa: BLE001
                self.add(dict(row, backend="compile", status=f"FAILED: {_short(e)}", error=traceback.format_exc()))

    def decode_rows(self, row: dict, hf, llm, sess) -> None:
        import torch
        a = self.args
        b, c = row["batch"], row["context"]
        g = torch.Generator().manual_seed(a.seed + 7 * b + c)
        vocab = hf.config.vocab_size
        prompt = torch.randint(0, vocab, (b, c), generator=g).to(self.device)
        nxt = torch.randint(0, vocab, (b, 1), generator=g).to(self.device)
        try:
            dec = TorchDecode(hf, prompt, c)
        except Exception as e:  # noqa: BLE001
            self.add(dict(row, kind="decode", backend="torch-setup", status=f"FAILED: {_short(e)}",
                          error=traceback.format_exc()))
            return
        ref = dec.step(nxt).float()
        wb = weight_bytes(llm) if llm is not None else None
        kvb = kv_bytes(llm.spec.config, b, c) if llm is not None else None

        def rate(t):
            ms = t["median_ms"]
            out = dict(ms_per_token=ms, p10_ms=t["p10_ms"], p90_ms=t["p90_ms"], tokens_per_s=b / ms * 1e3,
                       wall_ms=t.get("wall_median_ms"))
            if wb is not None:
                out.update(eff_TBps=(wb + kvb) / (ms / 1e3) / 1e12, weight_GB=wb / 1e9, kv_GB=kvb / 1e9)
            return out
        if sess is not None:
            try:
                cache = torch.from_dlpack(sess._state(b).cache)
                for layer in range(llm.spec.config.num_layers):
                    k, v = dec.kv(layer)
                    cache[layer, 0, :, :, :c].copy_(k[:, :, :c])
                    cache[layer, 1, :, :, :c].copy_(v[:, :, :c])
                sess.stage(b, nxt, c)
                got = torch.from_dlpack(sess.run_decode(b)).float()
                agree = _agree(got, ref)
                t = self.timed(lambda: sess.run_decode(b))
                self.add(dict(row, kind="decode", backend="kiln", status="ok", cuda_graph=llm.uses_cuda_graph,
                              **rate(t), **agree))
            except Exception as e:  # noqa: BLE001
                self.add(dict(row, kind="decode", backend="kiln", status=f"FAILED: {_short(e)}",
                              error=traceback.format_exc()))
            if "megakernel" in a.backends:
                self.megakernel_row(row, llm, sess, b, nxt, c, ref, rate)
        t = self.timed(lambda: dec.step(nxt))
        self.add(dict(row, kind="decode", backend="eager", status="ok", **rate(t)))
        if "compile" in a.backends and self.device == "cuda":
            try:
                torch._dynamo.reset()
                step = torch.compile(dec.step, mode="reduce-overhead")
                t0 = time.perf_counter()
                for _ in range(3):
                    step(nxt)
                torch.cuda.synchronize()
                cs = time.perf_counter() - t0
                agree = _agree(step(nxt).float(), ref)
                t = self.timed(lambda: step(nxt))
                self.add(dict(row, kind="decode", backend="compile", status="ok", compile_s=round(cs, 2),
                              **rate(t), **agree))
            except Exception as e:  # noqa: BLE001
                self.add(dict(row, kind="decode", backend="compile", status=f"FAILED: {_short(e)}",
                              error=traceback.format_exc()))
        dec = None  # noqa: F841 - drop the cache before the next configuration
        _free()

    def megakernel_row(self, row: dict, llm, sess, b: int, nxt, c: int, ref, rate) -> None:
        """The "kiln megakernel" row: ``decode_b{b}_mk`` on the same cache and position as the kiln row."""
        import torch
        if b not in sess.spec.megakernel:
            note = next((n for n in llm.notes if f"decode_b{b} not added" in n), "not compiled (cuda only)")
            self.add(dict(row, kind="decode", backend="kiln-megakernel", status=f"skipped: {note}"))
            return
        try:
            sess.set_megakernel(True)
            sess.stage(b, nxt, c)
            got = torch.from_dlpack(sess.run_decode(b)).float()
            agree = _agree(got, ref)
            t = self.timed(lambda: sess.run_decode(b))
            self.add(dict(row, kind="decode", backend="kiln-megakernel", status="ok", **rate(t), **agree))
        except Exception as e:  # noqa: BLE001
            self.add(dict(row, kind="decode", backend="kiln-megakernel", status=f"FAILED: {_short(e)}",
                          error=traceback.format_exc()))
        finally:
            sess.set_megakernel(False)

    def table(self) -> str:
        lines = [f"{'model':6s} {'w':5s} {'kind':8s} {'b':>3s} {'ctx':>5s} {'backend':8s} {'ms':>9s} {'TB/s':>6s} "
                 f"{'rel_err':>8s} {'argmax':>6s}  status"]
        for r in self.rows:
            if r["kind"] == "compile":
                lines.append(f"{r['model']:6s} {r['weights']:5s} compile  {'':>3s} {'':>5s} kiln     "
                             f"{r.get('compile_s', float('nan')):9.2f} {'':>6s} {'':>8s} {'':>6s}  {r['status']} "
                             f"(fallbacks {r.get('fallbacks')}, weights {r.get('weight_GB')} GB)")
                continue
            ms = r.get("ms_per_token", r.get("ms"))
            lines.append(f"{r['model']:6s} {r['weights']:5s} {r['kind']:8s} {r.get('batch', ''):>3} "
                         f"{r.get('context', r.get('tokens', '')):>5} {r['backend']:8s} "
                         f"{_f(ms, 9, 3)} {_f(r.get('eff_TBps'), 6, 2)} {_f(r.get('rel_err'), 8, 4)} "
                         f"{_f(r.get('argmax'), 6, 2)}  {r['status']}")
        return "\n".join(lines)


def _f(v, w: int, p: int) -> str:
    return f"{v:{w}.{p}f}" if isinstance(v, (int, float)) else " " * (w - 1) + "-"


def _short(e: BaseException) -> str:
    try:
        from timing import short_error
        return short_error(e)
    except Exception:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e)[:200]}"


def _agree(got, ref) -> dict:
    import torch
    err = float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
    same = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    return {"rel_err": err, "argmax": same, "finite": bool(torch.isfinite(got).all())}


def _free() -> None:
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _warm_tvm() -> float:
    """One-time import of TVM's tensor-intrinsic registry (dlight's tensor-core path parses ~250 TVMScript
    functions on first use); reported apart so that compile_s is the compile itself."""
    t0 = time.perf_counter()
    import tvm.s_tir.tensor_intrin  # noqa: F401
    return round(time.perf_counter() - t0, 2)


def bench(args) -> int:
    import torch
    b = Bench(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    try:
        from timing import env_info
        b.meta["env"] = env_info(args.device)
    except Exception as e:  # noqa: BLE001
        b.meta["env"] = {"error": _short(e)}
    b.meta["args"] = {k: v for k, v in vars(args).items() if k != "func"}
    b.meta["tvm_tensor_intrin_import_s"] = _warm_tvm() if args.device == "cuda" else None
    for name in args.models:
        for w in args.weights:
            b.run_model(name, w)
    print(b.table())
    b.save()
    return 0


# ------------------------------------------------------------------------------------------ deploy check
def deploy_prepare(root: str, target: str = "cuda") -> int:
    """Tiny fp32 Llama for ``target``, exported, with the transformers greedy tokens it must reproduce."""
    import torch

    import kiln.llm as L
    hf = make_hf("tiny", "cpu")
    hf.config._attn_implementation = "eager"
    llm = L.compile(hf, target=target, dtype="float32", max_context=64, decode_batches=(1,), progress=False)
    path = llm.export(os.path.join(root, "llm_tiny_fp32"))
    ids = torch.randint(0, hf.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=DEPLOY_STEPS, do_sample=False, attention_mask=torch.ones_like(ids),
                          pad_token_id=0, eos_token_id=None)
    with open(os.path.join(path, "expected.json"), "w") as f:
        json.dump({"prompt": ids[0].tolist(), "tokens": ref[0, ids.shape[1]:].tolist()}, f)
    print(f"prepared {path}: {sorted(os.listdir(path))}")
    return 0


def deploy_check(root: str, out: str | None) -> int:
    """Load every LLM artifact under ``root`` with TVM's runtime only and generate greedily (numpy argmax)."""
    import ctypes

    import numpy as np
    import tvm
    cuda_rt = os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_cuda.so")
    if os.path.exists(cuda_rt) and tvm.cuda(0).exist:
        ctypes.CDLL(cuda_rt, ctypes.RTLD_GLOBAL)
    from tvm.runtime.vm import VirtualMachine
    import tvm_ffi

    def refuse(*_a):
        raise RuntimeError("a CUDA compiler was invoked at load time")
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", refuse, override=True)
    rows, ok = [], True
    for name in sorted(os.listdir(root)):
        d = os.path.join(root, name)
        if not os.path.isfile(os.path.join(d, "expected.json")):
            continue
        man = json.load(open(os.path.join(d, "manifest.json")))
        exp = json.load(open(os.path.join(d, "expected.json")))
        dev = tvm.cuda(0) if man["target"]["device"] == "cuda" else tvm.cpu()
        t0 = time.perf_counter()
        vm = VirtualMachine(tvm.runtime.load_module(os.path.join(d, "model.so")), dev)
        blob = tvm.runtime.load_param_dict_from_file(os.path.join(d, "weights.params"))
        params = [blob[p["name"]].copyto(dev) for p in man["params"]]
        load_s = time.perf_counter() - t0
        llm = man["llm"]
        c = llm["config"]
        shape = [c["num_layers"], 2, 1, c["num_kv_heads"], llm["max_context"], c["head_dim"]]
        cache = tvm.runtime.tensor(np.zeros(shape, llm["dtype"]), dev)
        prompt = np.array([exp["prompt"]], "int32")
        logits = vm["prefill"](tvm.runtime.tensor(prompt, dev), cache, *params).numpy()
        ids, pos = tvm.runtime.tensor(np.zeros((1, 1), "int32"), dev), tvm.runtime.tensor(np.zeros(1, "int32"), dev)
        toks = []
        for step in range(len(exp["tokens"])):
            tok = int(logits[0].argmax())
            toks.append(tok)
            if step == len(exp["tokens"]) - 1:
                break
            ids.copyfrom(np.array([[tok]], "int32"))                 # same buffers every step (CUDA graph)
            pos.copyfrom(np.array([prompt.shape[1] + step], "int32"))
            logits = vm["decode_b1"](ids, pos, cache, *params).numpy()
        good = toks == exp["tokens"]
        ok &= good
        maps = open("/proc/self/maps").read()
        rows.append({"artifact": name, "runtime_only": "libtvm_compiler" not in maps, "load_s": round(load_s, 3),
                     "cuda_graph": man["cuda_graph"], "tokens_match": good, "steps": len(toks),
                     "first_mismatch": next((i for i, (x, y) in enumerate(zip(toks, exp["tokens"])) if x != y), None)})
        print(json.dumps(rows[-1]), flush=True)
    if out:
        json.dump({"tvm": tvm.__version__, "rows": rows}, open(out, "w"), indent=1)
    return 0 if ok else 1


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] in ("deploy-prepare", "deploy-check"):
        p = argparse.ArgumentParser(description="LLM artifact deploy check")
        p.add_argument("mode")
        p.add_argument("dir")
        p.add_argument("--out", default=None)
        p.add_argument("--target", default="cuda", choices=["cuda", "llvm"], help="deploy-prepare only")
        a = p.parse_args(argv)
        return deploy_prepare(a.dir, a.target) if a.mode == "deploy-prepare" else deploy_check(a.dir, a.out)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    words = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=words, default=["1b", "8b"], help=f"comma list of {','.join(MODELS)}")
    p.add_argument("--weights", type=words, default=["fp16", "fp8"], help="comma list of fp16,fp8")
    p.add_argument("--batches", type=ints, default=[1, 8, 32])
    p.add_argument("--contexts", type=ints, default=[512, 4096])
    p.add_argument("--backends", type=words, default=["kiln", "eager", "compile"],
                   help="torch.compile rows run when 'compile' is listed, kiln megakernel rows when 'megakernel' is "
                        "(kiln and eager always run)")
    p.add_argument("--prefill", type=int, default=512, help="prefill tokens at batch 1 (0: skip)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=20261121)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    bad = [m for m in a.models if m not in MODELS] + [w for w in a.weights if w not in ("fp16", "fp8")]
    if bad:
        p.error(f"unknown model/weights {bad}")
    return bench(a)


if __name__ == "__main__":
    sys.exit(main())
