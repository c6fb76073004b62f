"""kiln.tune on a model mixing a CNN backbone and a transformer head: per-module choice vs every single backend.

The model (``MixedNet``): a ResNet-style conv backbone (stem 7x7/2 + max-pool, three stages of basic
blocks, /16 overall) whose feature map becomes tokens for a pre-LN transformer head (explicit
matmul/softmax attention, GELU MLP) and a classifier. Each backend is given the *whole model* as one
candidate (the root) and the two halves as candidates of their own, in ONE ``kiln.tune`` run:

* the root's row of each backend is that backend alone on the whole model (same inputs, same
  timer), i.e. the single-backend peers;
* the plan is what the strategy picks per module; the tuned model is then timed end to end.

Printed: the candidates table (validity, error vs eager, build time, latency at the smallest batch,
time at the largest), the plan, each single backend's whole-model time, the tuned model's time and
its speedup over the best valid single backend. ``--out FILE.json`` keeps everything;
``--png FILE`` draws the bar chart (needs matplotlib).

Timer: CUDA events around each call with the GPU idle before it (host dispatch included: that is
what a caller waits for, and what CUDA graphs save), median of ``--reps`` after ``--warmup``; on the
CPU ``time.perf_counter``. cuDNN autotuning (``cudnn.benchmark``) is on for the torch peers.

    python benchmarks/tune_mixed.py --out results/tune_mixed.json            # H200, fp16
    python benchmarks/tune_mixed.py --device cpu --dtype float32 --small     # smoke run on a CPU
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import kiln  # noqa: E402
from kiln.tune import HighestThroughput, MinLatency, TimingConfig, inductor_backend, register_backend  # noqa: E402


# --------------------------------------------------------------------------- the model
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class Backbone(nn.Module):
    """Stem (7x7/2, max-pool /2) and three stages (/1, /2, /2): a /16 feature map of ``4 * width`` channels."""

    def __init__(self, width: int = 64, blocks=(2, 2, 2)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        stages, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            stages += [BasicBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.out_channels = cin

    def forward(self, x):
        return self.stages(self.stem(x))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int = 4):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln2, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, mlp * dim), nn.GELU(),
                                                               nn.Linear(mlp * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """Feature map -> tokens -> transformer blocks -> mean-pooled logits."""

    def __init__(self, cin: int, tokens: int, dim: int = 512, layers: int = 6, heads: int = 8, classes: int = 1000):
        super().__init__()
        self.embed = nn.Linear(cin, dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, f):
        x = self.embed(f.flatten(2).transpose(1, 2)) + self.pos
        return self.fc(self.norm(self.blocks(x)).mean(dim=1))


class MixedNet(nn.Module):
    def __init__(self, image: int = 224, width: int = 64, dim: int = 512, layers: int = 6, heads: int = 8,
                 classes: int = 1000, blocks=(2, 2, 2)):
        super().__init__()
        self.backbone = Backbone(width, blocks)
        self.head = Head(self.backbone.out_channels, (image // 16) ** 2, dim, layers, heads, classes)

    def forward(self, pixel_values):
        return self.head(self.backbone(pixel_values))


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():  # non-trivial statistics, so a wrong BN fold shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 0.5 + 0.75)


# --------------------------------------------------------------------------- run
def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--batches", default="1,32", help="two batch sizes: latency and throughput samples")
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    p.add_argument("--backends", default="kiln,torch,inductor,tvm")
    p.add_argument("--inductor-modes", default="", help="extra torch.compile modes as backends, e.g. max-autotune")
    p.add_argument("--strategy", default="latency", choices=["latency", "throughput"])
    p.add_argument("--part", default="all", choices=["all", "backbone", "head"],
                   help="tune one half alone (the head's samples are the eager backbone's outputs)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--png", help="write the bar chart here (needs matplotlib)")
    return p.parse_args(argv)


def _env(device: str) -> dict:
    import tvm
    env = {"torch": torch.__version__, "tvm": tvm.__version__, "kiln": kiln.__version__,
           "python": platform.python_version(), "host": platform.node(), "device": device}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def _single_backends(result, backends) -> dict:
    """Each backend alone on the whole model: the root's row (validity, times)."""
    out = {}
    for b in backends:
        r = result.table.get("", b)
        if r is not None:
            out[b] = {"ok": r.ok, "latency_ms": r.latency_ms, "throughput_ms": r.throughput_ms,
                      "reason": r.reason, "build_s": r.build_s}
    return out


def _best(single: dict, key: str):
    valid = {b: v[key] for b, v in single.items() if v["ok"] and v[key] is not None}
    if not valid:
        return None, None
    b = min(valid, key=valid.get)
    return b, valid[b]


def main(argv=None) -> int:
    a = _args(argv)
    # every candidate's outcome as it is measured, so a run cut short still tells what it saw
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    logging.getLogger("kiln.tune").setLevel(logging.INFO)
    if a.small:
        a.image, a.width, a.dim, a.layers, a.heads = 32, 8, 32, 2, 4
    dtype = getattr(torch, a.dtype)
    batches = [int(b) for b in a.batches.split(",")]
    if len(batches) != 2 or batches[0] == batches[1]:
        raise SystemExit("--batches takes two different batch sizes, e.g. 1,32")
    torch.backends.cudnn.benchmark = True
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = MixedNet(a.image, a.width, a.dim, a.layers, a.heads, classes=100 if a.small else 1000).eval()
    _randomize_bn(model, gen)
    model = model.to(device=a.device, dtype=dtype)
    samples = [torch.randn(b, 3, a.image, a.image, generator=gen).to(device=a.device, dtype=dtype) for b in batches]
    if a.part == "head":
        with torch.no_grad():
            samples = [model.backbone(x) for x in samples]
    if a.part != "all":
        model = getattr(model, a.part)
    backends = [b for b in a.backends.split(",") if b]
    for mode in [m for m in a.inductor_modes.split(",") if m]:
        b = register_backend(inductor_backend(mode), replace=True)
        backends.append(b.name)
    strategy = MinLatency() if a.strategy == "latency" else HighestThroughput()
    timing = TimingConfig(warmup=a.warmup, reps=a.reps, min_reps=min(10, a.reps), budget_s=5.0)
    params = sum(p.numel() for p in model.parameters())
    print(f"MixedNet{'' if a.part == 'all' else '.' + a.part}: {params / 1e6:.1f} M params, image {a.image}, width {a.width}, head dim {a.dim} x "
          f"{a.layers} layers; {a.dtype} on {a.device}; batches {batches}; backends {backends}; {strategy!r}",
          flush=True)

    t0 = time.perf_counter()
    result = kiln.tune(model, samples, backends=backends, strategy=strategy, timing=timing)
    tune_s = time.perf_counter() - t0
    print(result.report(), flush=True)

    single = _single_backends(result, result.table.backends)
    e2e = result.end_to_end
    key, tuned_key = ("latency_ms", "tuned_latency_ms") if a.strategy == "latency" else \
        ("throughput_ms", "tuned_throughput_ms")
    summary = {"tune_s": tune_s, "plan": result.plan.assign, "strategy": repr(strategy), "batches": batches,
               "single_backend": single, "tuned": {k: e2e.get(k) for k in ("tuned_latency_ms", "tuned_throughput_ms",
                                                                          "rel_err", "problems")}}
    print(f"\nwhole model on one backend (batch {batches[0]} / batch {batches[1]}, ms):")
    for b, v in single.items():
        state = "" if v["ok"] else f"   REFUSED: {v['reason'][:100]}"
        lat = "-" if v["latency_ms"] is None else f"{v['latency_ms']:.3f}"
        thr = "-" if v["throughput_ms"] is None else f"{v['throughput_ms']:.3f}"
        print(f"  {b:<28} {lat:>10} {thr:>10}{state}")
    label = "tuned (" + ", ".join(f"{m or '<root>'}: {b}" for m, b in result.plan.assign.items()) + ")"
    lat, thr = e2e.get("tuned_latency_ms", math.nan), e2e.get("tuned_throughput_ms", math.nan)
    print(f"  {label:<28} {lat:>10.3f} {thr:>10.3f}")
    for metric, tk in (("latency_ms", "tuned_latency_ms"), ("throughput_ms", "tuned_throughput_ms")):
        b, ms = _best(single, metric)
        if b is not None and e2e.get(tk):
            summary[f"speedup_vs_best_single_{metric[:-3]}"] = {"best_single": b, "best_single_ms": ms,
                                                                "tuned_ms": e2e[tk], "speedup": ms / e2e[tk]}
    b, ms = _best(single, key)
    if b is not None:
        sp = ms / e2e[tuned_key]
        verdict = "MEETS" if sp >= 1.2 else "does NOT meet"
        print(f"\ntuned vs best single backend ({b}) on the strategy's metric ({key}): {ms:.3f} -> "
              f"{e2e[tuned_key]:.3f} ms = {sp:.2f}x ({verdict} the 1.2x goal)")
    print(f"tuned model vs eager: max rel err {e2e.get('rel_err'):.3g}" +
          (f"; PROBLEMS {e2e['problems']}" if e2e.get("problems") else ""))
    if a.out:  # before the chart: a missing matplotlib must not cost the numbers
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({"summary": summary, "result": result.to_json(), "env": _env(a.device), "args": vars(a)}, f,
                      indent=1, default=str)
        print("wrote", a.out)
    if a.png:
        print("chart:", result.plot(a.png))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # noqa: BLE001 - print the whole story for a remote run
        traceback.print_exc()
        sys.exit(1)
