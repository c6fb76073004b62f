#!/usr/bin/env python3
"""kiln.ops vs the torch equivalent of each op, one table: device time, speedup, max error, build time.

Cases (realistic shapes; fp16/bf16): ``gemm`` (+bias+gelu vs ``F.gelu(F.linear(..))``, plain vs ``F.linear``),
``fp8_gemm`` (per-token x per-channel vs ``torch._scaled_mm`` rowwise; 1x128 / 128x128 blocks vs
``torch._scaled_mm`` blockwise when this torch takes it, else a torch dequantise + matmul), ``rms_norm`` (vs
``F.rms_norm``, fused residual vs ``x + r`` then ``F.rms_norm``, + fp8 output vs the same then ``/ s`` and
``.to(float8_e4m3fn)``), ``layer_norm`` (vs ``F.layer_norm``),
``rope`` (vs transformers-style rotate-half in torch), ``attention`` (vs SDPA, flash / cuDNN / efficient as
torch picks), ``decode_attention`` (vs SDPA over the masked cache), ``fused_moe`` (Mixtral-shaped, E=8 top-2:
vs torch routing + argsort + ``torch._grouped_mm`` when this torch/GPU takes it, else a loop over experts).

Every kiln call goes through the public API (``torch.ops.kiln.*`` dispatch included). Timing: the
queue-full device timer of ``kiln tune`` (:func:`kiln.tune.device_timing.time_group`: a sleep kernel holds the
GPU while all calls are enqueued, so CUDA events bracket device time, not host dispatch; kiln and torch
interleaved), median of ``--reps``. ``kiln_host_us`` is the host time per kiln call (dispatch + DLPack), which
bounds eager use of tiny ops. Errors: max |out - ref| / max(1, max |ref|) against an fp32 torch reference,
for kiln and for the torch peer. The kernels are built in this run into a fresh cache (``build_s`` = first
call). The JSON is rewritten after each case.

    source .device/setup-tvm .device && python3 benchmarks/ops.py --out $OUT/ops.json
CPU smoke test of the script (tiny shapes, wall-clock timing): ``python3 benchmarks/ops.py --smoke``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SCHEMA = "kiln-ops-bench/1"


# --------------------------------------------------------------------------------------------- torch peers
def torch_rope(q, k, cos, sin, pos):
    """transformers' apply_rotary_pos_emb (rotate-half) with tables of half width, in the input dtype."""
    c = cos[pos].to(q.dtype).unsqueeze(-2)
    s = sin[pos].to(q.dtype).unsqueeze(-2)
    c, s = torch.cat([c, c], -1), torch.cat([s, s], -1)

    def rot(x):
        x1, x2 = x.chunk(2, -1)
        return torch.cat([-x2, x1], -1)
    return q * c + rot(q) * s, k * c + rot(k) * s


def rope_ref(x, cos, sin, pos):
    half = cos.shape[-1]
    c, s = cos[pos].float().unsqueeze(-2), sin[pos].float().unsqueeze(-2)
    x1, x2 = x.float()[..., :half], x.float()[..., half:2 * half]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def sdpa_bshd(q, k, v, causal=False, kpad=None):
    mask = None if kpad is None else kpad[:, None, None, :].to(q.dtype)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                          is_causal=causal, enable_gqa=k.shape[2] != q.shape[2]).transpose(1, 2)


def attn_ref(q, k, v, causal=False, kpad=None):
    Sq, Skv = q.shape[1], k.shape[1]
    mask = torch.zeros(q.shape[0], 1, Sq, Skv, device=q.device)
    if kpad is not None:
        mask = mask + kpad[:, None, None, :]
    if causal:
        mask = mask.masked_fill(torch.ones(Sq, Skv, device=q.device).triu(1).bool(), float("-inf"))
    return F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2),
                                          v.float().transpose(1, 2), attn_mask=mask,
                                          enable_gqa=k.shape[2] != q.shape[2]).transpose(1, 2)


def decode_mask(lens, C):
    return (torch.arange(C, device=lens.device)[None, :] < lens[:, None].long())[:, None, None, :]


def torch_decode(q, kc, vc, mask):
    return F.scaled_dot_product_attention(q[:, :, None], kc, vc, attn_mask=mask,
                                          enable_gqa=kc.shape[1] != q.shape[1])[:, :, 0]


def moe_ref(x, w1, w2, g, topk):
    """fp32 fused_moe (renormalised top-k), one expert at a time, intermediates rounded to x's dtype."""
    w, ids = torch.topk(torch.softmax(g.float(), -1), topk, -1)
    w = w / w.sum(-1, keepdim=True)
    I = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w1.shape[0]):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = (x[tok].float() @ w1[e].float().T).to(x.dtype).float()
        a = (F.silu(h[:, :I]) * h[:, I:]).to(x.dtype).float()
        out.index_add_(0, tok, (a @ w2[e].float().T).to(x.dtype).float() * w[tok, slot, None])
    return out


def torch_moe_grouped(x, w1, w2, g, topk):
    """Routing, a stable sort of the (token, slot) pairs by expert and two ``torch._grouped_mm`` (no host sync)."""
    T, E, I = x.shape[0], w1.shape[0], w2.shape[2]
    w, ids = torch.topk(torch.softmax(g.float(), -1), topk, -1)
    w = w / w.sum(-1, keepdim=True)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.histc(flat.float(), bins=E, min=0, max=E - 1), 0).to(torch.int32)
    h = torch._grouped_mm(x[order // topk], w1.transpose(-2, -1), offs=offs)
    y = torch._grouped_mm(F.silu(h[:, :I]) * h[:, I:], w2.transpose(-2, -1), offs=offs)
    y = y * w.reshape(-1)[order, None].to(y.dtype)
    return torch.zeros_like(y).index_copy_(0, order, y).view(T, topk, -1).sum(1)


def torch_moe_loop(x, w1, w2, g, topk):
    """transformers' eager Mixtral experts: a loop over experts (host syncs on the routing)."""
    w, ids = torch.topk(torch.softmax(g.float(), -1), topk, -1)
    w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
    I = w2.shape[2]
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = x[tok] @ w1[e].T
        out.index_add_(0, tok, ((F.silu(h[:, :I]) * h[:, I:]) @ w2[e].T) * w[tok, slot, None])
    return out


def torch_moe_peer(x, w1, w2, g, topk, ref):
    """``torch_moe_grouped`` when it runs here and agrees with the reference (checked once), else the loop."""
    try:
        got = torch_moe_grouped(x, w1, w2, g, topk)
        if err_of(got, ref) <= 0.06:
            return torch_moe_grouped, "torch routing + argsort + torch._grouped_mm"
        note = "(torch._grouped_mm disagreed with the reference) "
    except Exception as e:  # noqa: BLE001 - this torch/GPU has no grouped mm for the dtype: use the loop peer
        note = f"(torch._grouped_mm: {type(e).__name__}) "
    return torch_moe_loop, note + "loop over experts (transformers eager)"


def fp8_expand(s, rows, K, block):
    if s.numel() == 1:
        return s.reshape(1, 1).expand(rows, K)
    if s.dim() == 1 or s.shape[1] == 1:
        return s.reshape(rows, 1).expand(rows, K)
    s = s.repeat_interleave(128, 1)[:, :K]
    return s.repeat_interleave(128, 0)[:rows] if block else s


def fp8_ref(a, b, sa, sb):
    K = a.shape[1]
    return (a.float() * fp8_expand(sa, a.shape[0], K, False)) @ (b.float() * fp8_expand(sb, b.shape[0], K, True)).T


# --------------------------------------------------------------------------------------------- cases
def cases(smoke: bool):
    """``(op, shape text, make(dev) -> (kiln_fn, torch_fn, args, ref, peer name, dtype))``."""
    f16, bf16 = torch.float16, torch.bfloat16

    def gemm_case(M, N, K, epi, dtype):
        def make(dev):
            import kiln.ops as ops
            a = torch.randn(M, K, device=dev, dtype=dtype)
            w = (torch.randn(N, K, device=dev) / math.sqrt(K)).to(dtype)
            b = torch.randn(N, device=dev, dtype=dtype)
            if epi:
                ref = F.gelu(F.linear(a.float(), w.float(), b.float()))
                return (lambda a, w, b: ops.gemm(a, w, b, epilogue=("bias", "gelu")),
                        lambda a, w, b: F.gelu(F.linear(a, w, b)), (a, w, b), ref, "F.gelu(F.linear(x, w, b))", dtype)
            ref = F.linear(a.float(), w.float())
            return (lambda a, w: ops.gemm(a, w), lambda a, w: F.linear(a, w), (a, w), ref, "F.linear (cuBLAS)", dtype)
        return ("gemm" + ("+bias+gelu" if epi else ""), f"{M}x{N}x{K} {dtype_s(dtype)}", make)

    def fp8_case(M, N, K, mode):
        def make(dev):
            import kiln.ops as ops
            a = (torch.randn(M, K, device=dev) * 2).to(torch.float8_e4m3fn)
            b = (torch.randn(N, K, device=dev) * 2).to(torch.float8_e4m3fn)
            if mode == "rowwise":
                sa, sb = torch.rand(M, 1, device=dev) / 64 + 1e-3, torch.rand(N, device=dev) / 64 + 1e-3
            else:
                sa = torch.rand(M, -(-K // 128), device=dev) / 64 + 1e-3
                sb = torch.rand(-(-N // 128), -(-K // 128), device=dev) / 64 + 1e-3
            ref = fp8_ref(a, b, sa, sb)
            peer, name = torch_fp8_peer(a, b, sa, sb, mode, dev)
            return (lambda a, b, sa, sb: ops.fp8_gemm(a, b, sa, sb, out_dtype=bf16), peer, (a, b, sa, sb), ref, name,
                    bf16)
        return ("fp8_gemm " + mode, f"{M}x{N}x{K} e4m3->bf16", make)

    def norm_case(kind, M, N, dtype, residual, quant=False):
        def make(dev):
            import kiln.ops as ops
            x, r = torch.randn(M, N, device=dev, dtype=dtype), torch.randn(M, N, device=dev, dtype=dtype)
            w, b = torch.randn(N, device=dev, dtype=dtype), torch.randn(N, device=dev, dtype=dtype)
            h = (x.float() + r.float()).to(dtype) if residual else x
            if kind == "rms":
                ref = F.rms_norm(h.float(), (N,), w.float(), 1e-6)
                if quant:   # static per-tensor fp8 quantisation of the normed output
                    s = torch.tensor([0.02], device=dev)
                    ref = (ref / s).clamp(-448, 448)
                    return (lambda x, r, w: ops.rms_norm(x, w, 1e-6, residual=r, quant_scale=s)[0],
                            lambda x, r, w: (F.rms_norm(x + r, (N,), w, 1e-6) / s).clamp(-448, 448).to(
                                torch.float8_e4m3fn), (x, r, w), ref, "x + r; F.rms_norm; / s -> e4m3", dtype)
                if residual:
                    return (lambda x, r, w: ops.rms_norm(x, w, 1e-6, residual=r)[0],
                            lambda x, r, w: F.rms_norm(x + r, (N,), w, 1e-6), (x, r, w), ref,
                            "x + r; F.rms_norm", dtype)
                return (lambda x, w: ops.rms_norm(x, w, 1e-6), lambda x, w: F.rms_norm(x, (N,), w, 1e-6), (x, w), ref,
                        "F.rms_norm", dtype)
            ref = F.layer_norm(h.float(), (N,), w.float(), b.float(), 1e-5)
            if residual:
                return (lambda x, r, w, b: ops.layer_norm(x, w, b, 1e-5, residual=r)[0],
                        lambda x, r, w, b: F.layer_norm(x + r, (N,), w, b, 1e-5), (x, r, w, b), ref,
                        "x + r; F.layer_norm", dtype)
            return (lambda x, w, b: ops.layer_norm(x, w, b, 1e-5), lambda x, w, b: F.layer_norm(x, (N,), w, b, 1e-5),
                    (x, w, b), ref, "F.layer_norm", dtype)
        return (f"{kind}_norm" + ("+residual" if residual else "") + ("+fp8" if quant else ""),
                f"{M}x{N} {dtype_s(dtype)}", make)

    def rope_case(T, Hq, Hkv, D, dtype):
        def make(dev):
            import kiln.ops as ops
            q, k = torch.randn(T, Hq, D, device=dev, dtype=dtype), torch.randn(T, Hkv, D, device=dev, dtype=dtype)
            ang = torch.randn(8192, D // 2, device=dev)
            cos, sin = ang.cos(), ang.sin()
            pos = torch.randint(0, 8192, (T,), device=dev)
            ref = torch.cat([rope_ref(q, cos, sin, pos), rope_ref(k, cos, sin, pos)], 1)
            return (ops.rope, torch_rope, (q, k, cos, sin, pos), ref, "rotate-half in torch (transformers)", dtype)
        return ("rope", f"T{T} h{Hq}/{Hkv} d{D} {dtype_s(dtype)}", make)

    def attn_case(Bsz, S, Hq, Hkv, D, causal, kpad, dtype):
        def make(dev):
            import kiln.ops as ops
            q = torch.randn(Bsz, S, Hq, D, device=dev, dtype=dtype)
            k, v = (torch.randn(Bsz, S, Hkv, D, device=dev, dtype=dtype) for _ in range(2))
            kp = None
            if kpad:
                kp = torch.zeros(Bsz, S, device=dev)
                kp[:, S * 3 // 4:] = float("-inf")
            ref = attn_ref(q, k, v, causal, kp)
            return (lambda q, k, v: ops.attention(q, k, v, causal=causal, kpad=kp),
                    lambda q, k, v: sdpa_bshd(q, k, v, causal, kp), (q, k, v), ref, "SDPA", dtype)
        name = "attention" + ("+causal" if causal else "") + ("+kpad" if kpad else "")
        return (name, f"b{Bsz} s{S} h{Hq}/{Hkv} d{D} {dtype_s(dtype)}", make)

    def decode_case(Bsz, Hq, Hkv, C, D, dtype):
        def make(dev):
            import kiln.ops as ops
            q = torch.randn(Bsz, Hq, D, device=dev, dtype=dtype)
            kc, vc = (torch.randn(Bsz, Hkv, C, D, device=dev, dtype=dtype) for _ in range(2))
            lens = torch.randint(C // 2, C + 1, (Bsz,), dtype=torch.int32, device=dev)
            mask = decode_mask(lens, C)
            ref = F.scaled_dot_product_attention(q.float()[:, :, None], kc.float(), vc.float(), attn_mask=mask,
                                                 enable_gqa=Hkv != Hq)[:, :, 0]
            return (lambda q, kc, vc: ops.decode_attention(q, kc, vc, lens),
                    lambda q, kc, vc: torch_decode(q, kc, vc, mask), (q, kc, vc), ref, "SDPA (masked cache)", dtype)
        return ("decode_attention", f"b{Bsz} h{Hq}/{Hkv} ctx{C} d{D} {dtype_s(dtype)}", make)

    def moe_case(T, H, I, E, topk, dtype):
        def make(dev):
            import kiln.ops as ops
            x = torch.randn(T, H, device=dev, dtype=dtype)
            w1 = (torch.randn(E, 2 * I, H, device=dev) / math.sqrt(H)).to(dtype)
            w2 = (torch.randn(E, H, I, device=dev) / math.sqrt(I)).to(dtype)
            g = torch.randn(T, E, device=dev)
            ref = moe_ref(x, w1, w2, g, topk)
            peer, name = torch_moe_peer(x, w1, w2, g, topk, ref)
            return (lambda x, w1, w2, g: ops.fused_moe(x, w1, w2, g, topk, True),
                    lambda x, w1, w2, g: peer(x, w1, w2, g, topk), (x, w1, w2, g), ref, name, dtype)
        return ("fused_moe", f"T{T} H{H} I{I} E{E} top{topk} {dtype_s(dtype)}", make)

    if smoke:   # tiny CPU shapes: checks the script, not speed
        return [gemm_case(16, 64, 32, True, torch.float32), fp8_case(16, 64, 256, "rowwise"),
                fp8_case(16, 128, 256, "block"), norm_case("rms", 8, 64, bf16, True),
                norm_case("rms", 8, 64, bf16, True, quant=True),
                norm_case("layer", 8, 64, torch.float32, False), rope_case(8, 4, 2, 32, f16),
                attn_case(2, 16, 4, 2, 32, True, False, torch.float32), decode_case(2, 4, 2, 40, 32, bf16),
                moe_case(9, 64, 48, 4, 2, torch.float32)]
    return [
        gemm_case(128, 4096, 1024, True, f16), gemm_case(4096, 4096, 4096, False, bf16),
        gemm_case(16, 11008, 4096, False, f16),
        fp8_case(2048, 4096, 4096, "rowwise"), fp8_case(2048, 4096, 4096, "block"),
        norm_case("rms", 4096, 4096, f16, False), norm_case("rms", 4096, 4096, bf16, True),
        norm_case("rms", 8, 4096, f16, True), norm_case("rms", 4096, 4096, bf16, True, quant=True),
        norm_case("layer", 4096, 1024, f16, False), norm_case("layer", 4096, 1024, f16, True),
        rope_case(4096, 32, 8, 128, bf16),
        attn_case(4, 2048, 32, 8, 128, True, False, bf16), attn_case(16, 512, 16, 16, 64, False, False, f16),
        attn_case(8, 128, 16, 16, 64, False, True, f16),
        decode_case(8, 32, 8, 4096, 128, f16), decode_case(32, 32, 8, 1024, 128, bf16),
        moe_case(16, 4096, 14336, 8, 2, bf16), moe_case(2048, 4096, 14336, 8, 2, bf16),
    ]


def dtype_s(dt) -> str:
    return str(dt).replace("torch.", "").replace("float", "f").replace("bf16", "bf16")


def torch_fp8_peer(a, b, sa, sb, mode, dev):
    """``torch._scaled_mm`` for the mode when this torch/GPU takes it (checked once), else dequant + matmul."""
    bf16 = torch.bfloat16
    if dev == "cuda" and mode == "rowwise":
        fn = lambda a, b, sa, sb: torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb.reshape(1, -1),  # noqa: E731
                                                   out_dtype=bf16)
        name = "torch._scaled_mm rowwise"
    elif dev == "cuda":
        fn = lambda a, b, sa, sb: torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb.t(), out_dtype=bf16)  # noqa: E731
        name = "torch._scaled_mm blockwise"
    else:
        fn, name = None, ""
    if fn is not None:
        try:
            got = fn(a, b, sa, sb)
            ref = fp8_ref(a, b, sa, sb)
            if (got.float() - ref).abs().max().item() <= 0.06 * max(1.0, ref.abs().max().item()):
                return fn, name
            name = f"({name} disagreed with the reference) "
        except Exception as e:  # noqa: BLE001 - this torch/GPU does not take the mode: use the fallback peer
            name = f"({name}: {type(e).__name__}) "
    K = a.shape[1]

    def dequant_mm(a, b, sa, sb):
        return ((a.to(bf16) * fp8_expand(sa, a.shape[0], K, False).to(bf16))
                @ (b.to(bf16) * fp8_expand(sb, b.shape[0], K, True).to(bf16)).T)
    return dequant_mm, name + "torch dequantise + matmul (bf16)"


# --------------------------------------------------------------------------------------------- running
def err_of(out, ref) -> float:
    out = out if isinstance(out, torch.Tensor) else torch.cat([o.reshape(o.shape[0], -1) for o in out], 1)
    ref = ref.reshape(out.shape) if ref.numel() == out.numel() else ref
    if not torch.isfinite(out.float()).all():
        return float("nan")
    return (out.float() - ref.float()).abs().max().item() / max(1.0, ref.float().abs().max().item())


def time_wall(fn, args, reps):
    for _ in range(3):
        fn(*args)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    return (time.perf_counter() - t0) / reps * 1e6


def run_case(op, shape, make, dev, args) -> dict:
    import kiln.ops as ops
    row = {"op": op, "shape": shape}
    kfn, tfn, inputs, ref, peer, dtype = make(dev)
    row["peer"] = peer
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = kfn(*inputs)
    if dev == "cuda":
        torch.cuda.synchronize()
    row["build_s"] = round(time.perf_counter() - t0, 2)
    opname = op.split("+")[0].split(" ")[0]
    info = ops.kernel_info(opname, dev)
    if info:
        last = info[-1]
        row["kernel"] = last.get("kernel")
        for k in ("config", "config_source", "sm90a_declined", "flash_declined", "fp8_declined", "promote"):
            if k in last:
                row[k] = last[k]
        row["schedules"] = sorted({s["rule"] for s in last.get("schedules", [])})
    row["kiln_err"] = err_of(out, ref)
    row["torch_err"] = err_of(tfn(*inputs), ref)
    if dev == "cuda":
        from kiln.tune.device_timing import time_group
        t = time_group([("kiln", kfn, [inputs]), ("torch", tfn, [inputs])], warmup=args.warmup, reps=args.reps)
        row["kiln_us"], row["torch_us"] = t["kiln"]["median_us"], t["torch"]["median_us"]
        row["kiln_host_us"], row["torch_host_us"] = t["kiln"]["host_us_per_call"], t["torch"]["host_us_per_call"]
        row["max_gap_us"] = t["kiln"]["max_gap_us"]
    else:
        row["kiln_us"], row["torch_us"] = time_wall(kfn, inputs, args.reps), time_wall(tfn, inputs, args.reps)
    row["speedup"] = row["torch_us"] / row["kiln_us"] if row["kiln_us"] > 0 else float("nan")
    return row


def table(rows) -> str:
    head = ("op", "shape", "peer", "kiln us", "torch us", "speedup", "kiln err", "torch err", "kiln host us",
            "build s", "kernel")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['shape']} | {r.get('peer', '')} | FAILED: {r['error'][:140]} |")
            continue
        kern = r.get("kernel", "")
        if r.get("config"):
            kern += f" [{r['config']}, {r.get('config_source', '')}]"
        if r.get("schedules"):
            kern += " " + "/".join(r["schedules"])
        lines.append("| " + " | ".join([
            r["op"], r["shape"], r["peer"], f"{r['kiln_us']:.1f}", f"{r['torch_us']:.1f}", f"{r['speedup']:.2f}x",
            f"{r['kiln_err']:.2e}", f"{r['torch_err']:.2e}", f"{r.get('kiln_host_us', float('nan')):.1f}",
            f"{r['build_s']:.1f}", kern]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the JSON results here")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, wall-clock timing (checks the script)")
    ap.add_argument("--only", default="", help="comma-separated op-name prefixes to run")
    ap.add_argument("--budget-s", type=float, default=225.0, help="skip the remaining cases after this long")
    ap.add_argument("--cache-dir", default="", help="kiln.ops cache (default: a fresh temporary directory)")
    args = ap.parse_args(argv)
    dev = "cpu" if args.smoke else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --smoke for the CPU check", file=sys.stderr)
        return 2
    os.environ["KILN_OPS_CACHE_DIR"] = args.cache_dir or tempfile.mkdtemp(prefix="kiln-ops-bench-")
    os.environ.setdefault("KILN_PROGRESS", "0")
    from timing import env_info
    doc = {"schema": SCHEMA, "env": env_info(dev), "cache_dir": os.environ["KILN_OPS_CACHE_DIR"],
           "timer": "queue-full device time (kiln.tune.device_timing)" if dev == "cuda" else "wall clock",
           "reps": args.reps, "rows": []}
    torch.manual_seed(20261121)
    t_start = time.perf_counter()
    only = [p for p in args.only.split(",") if p]
    for op, shape, make in cases(args.smoke):
        if only and not any(op.startswith(p) for p in only):
            continue
        if time.perf_counter() - t_start > args.budget_s:
            doc["rows"].append({"op": op, "shape": shape, "error": f"skipped: over the {args.budget_s:.0f} s budget"})
            continue
        try:
            row = run_case(op, shape, make, dev, args)
        except Exception as e:  # noqa: BLE001 - one failing case must not lose the others
            row = {"op": op, "shape": shape, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}",
                   "traceback": traceback.format_exc()[-3000:]}
        row["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        doc["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(doc, f, indent=1, default=str)
    from kiln.ops import stats
    doc["stats"] = stats()
    doc["total_s"] = round(time.perf_counter() - t_start, 1)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1, default=str)
    print()
    print(table(doc["rows"]))
    print(f"\ntotal {doc['total_s']} s; kiln.ops cache {doc['cache_dir']}: {doc['stats']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
