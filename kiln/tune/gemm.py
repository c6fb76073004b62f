"""``kiln tune gemm``: fill the tuned sm_90a GEMM table on the GPU.

For each problem (M, N, K, dtype, epilogue): enumerate the valid configs of the tuning space
(:func:`kiln.schedules.configs.sm90_candidates`: tiles, stages, persistent, split-K), build each one,
check it against an fp32 torch reference on fresh random inputs with a NaN-poisoned output (a config
that fails the check is never timed, let alone chosen), time the survivors with CUDA events over
rotated input sets (enough sets to exceed the 60 MB L2), keep the fastest, and merge the row into the
table (:mod:`kiln.schedules.tables`: atomic, locked). cuBLAS (``torch.nn.functional.linear``) is timed
on the same inputs for scale. Times are device times with the launch queue kept full
(:func:`kiln.tune.device_timing.time_group`): host dispatch through Python (~10 us a call) would
otherwise hide every difference between small-problem configs.

No cost model: the space is 6-20 configs per problem and building + timing one takes ~1-2 s on the
H200 machine, so exhaustive search is cheaper than fitting (and validating) an xgboost model.
"""
from __future__ import annotations

import datetime
import math
import sys
import time
from dataclasses import dataclass

__all__ = ["GemmProblem", "tune_gemm", "PRESETS", "parse_problems"]

_L2_BYTES = 60 * 2**20
_TOL = {"float16": 1e-2, "bfloat16": 2e-2}   # relative Frobenius error vs fp32 (K up to 4096: fp16 ~1e-3)


@dataclass(frozen=True)
class GemmProblem:
    """One GEMM ``C[M,N] = epilogue(A[M,K] @ B[N,K]^T)`` to tune."""

    M: int
    N: int
    K: int
    dtype: str = "float16"
    epilogue: tuple = ()

    def label(self) -> str:
        from ..schedules.gemm_sm90 import Epilogue
        return f"{self.M}x{self.N}x{self.K} {self.dtype} {Epilogue(self.epilogue).name()}"


def _bert_large(m_values=(128, 1024, 4096)):
    # per layer: Q/K/V fused (bias; three outputs), attention out (bias + residual), FFN in (bias + erf-GELU),
    # FFN out (bias + residual); Q/K/V apart as well (models whose siblings do not fuse)
    return [(M, N, K, epi) for M in m_values for (N, K, epi) in (
        (3072, 1024, ("bias",)), (1024, 1024, ("bias",)), (1024, 1024, ("bias", "residual")),
        (4096, 1024, ("bias", "gelu")), (1024, 4096, ("bias", "residual")))]


def _vit_b16(m_values=(197, 6304)):
    return [(M, N, K, epi) for M in m_values for (N, K, epi) in (
        (2304, 768, ("bias",)), (768, 768, ("bias",)), (768, 768, ("bias", "residual")),
        (3072, 768, ("bias", "gelu")), (768, 3072, ("bias", "residual")))]


#: Named problem sets for ``kiln tune gemm --preset``: the benchmark models' Linear layers.
PRESETS = {
    "bert-large": _bert_large(),
    "vit-b16": _vit_b16(),
    "square": [(8192, 8192, 8192, ())],
}


def parse_problems(spec: str, dtype: str) -> list[GemmProblem]:
    """``"128x1024x1024:bias+gelu,4096x4096x4096"`` or a preset name (comma-joined) -> problems."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if item in PRESETS:
            out += [GemmProblem(M, N, K, dtype, epi) for M, N, K, epi in PRESETS[item]]
            continue
        shape, _, epi = item.partition(":")
        try:
            M, N, K = (int(v) for v in shape.split("x"))
        except ValueError:
            raise ValueError(f"bad problem {item!r}: expected MxNxK[:stage+stage] or one of "
                             f"{', '.join(PRESETS)}") from None
        out.append(GemmProblem(M, N, K, dtype, tuple(s for s in epi.split("+") if s)))
    return out


def _time_us(fn, sets, reps=30) -> float:
    from .device_timing import time_group
    return time_group([("f", fn, sets)], warmup=5, reps=reps)["f"]["median_us"]


def _inputs(p: GemmProblem, seed: int):
    import torch
    from ..schedules.gemm_sm90 import Epilogue
    epi = Epilogue(p.epilogue)
    tdt = getattr(torch, p.dtype)
    per_set = 2 * (p.M * p.K + p.N * p.K + 2 * p.M * p.N)
    n_sets = max(2, min(32, math.ceil(2 * _L2_BYTES / per_set)))
    g = torch.Generator(device="cuda").manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        a = torch.randn(p.M, p.K, device="cuda", generator=g).to(tdt)
        b = (torch.randn(p.N, p.K, device="cuda", generator=g) / math.sqrt(p.K)).to(tdt)
        bias = torch.randn(p.N, device="cuda", generator=g).to(tdt) if epi.has_bias else None
        res = torch.randn(p.M, p.N, device="cuda", generator=g).to(tdt) if epi.has_residual else None
        sets.append((a, b, bias, res))
    return epi, sets


def _rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def tune_problem(p: GemmProblem, seed: int = 0, log=print) -> dict:
    """Check and time every candidate of ``p``; the result dict holds the best row and all attempts."""
    import torch
    from ..schedules.configs import sm90_candidates
    from ..schedules.gemm_sm90 import GemmSM90, torch_reference
    epi, sets = _inputs(p, seed)
    refs = [torch_reference(a, b, epi, bias, res) for a, b, bias, res in sets[:2]]
    attempts, best = [], None
    for cfg in sm90_candidates(p.M, p.N, p.K, p.dtype):
        rec = {"config": cfg.name()}
        try:
            t0 = time.perf_counter()
            g = GemmSM90(p.M, p.N, p.K, p.dtype, epi, cfg)
            errs = []
            for (a, b, bias, res), ref in zip(sets[:2], refs):
                out = torch.full((p.M, p.N), float("nan"), dtype=a.dtype, device="cuda")
                g(a, b, bias=bias, residual=res, out=out)
                torch.cuda.synchronize()
                errs.append(_rel_err(out, ref) if torch.isfinite(out).all() else float("inf"))
            rec["rel_err"] = max(errs)
            rec["build_s"] = time.perf_counter() - t0
            if not rec["rel_err"] <= _TOL[p.dtype]:
                rec["status"] = f"wrong: rel err {rec['rel_err']:.3e} > {_TOL[p.dtype]}"
            else:
                outs = [torch.empty((p.M, p.N), dtype=s[0].dtype, device="cuda") for s in sets]
                bound = [(g.bind(a, b, bias, res, o),) for (a, b, bias, res), o in zip(sets, outs)]
                rec["time_us"] = _time_us(lambda launch: launch(), bound)
                rec["status"] = "ok"
                if best is None or rec["time_us"] < best["time_us"]:
                    best = rec
        except Exception as e:  # noqa: BLE001 - a config that fails to build is recorded, never chosen
            rec["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        attempts.append(rec)
    F = torch.nn.functional
    cublas_us = _time_us(lambda a, b, bias, res: F.linear(a, b), sets)
    return {"problem": p, "best": best, "attempts": attempts, "cublas_us": cublas_us}


def tune_gemm(problems: list[GemmProblem], table_path: str | None = None, seed: int = 0,
              progress: bool = True) -> list[dict]:
    """Tune ``problems`` on the current CUDA GPU and merge the winners into the sm90a table.

    Parameters
    ----------
    problems : list of GemmProblem
    table_path : str, optional
        CSV to merge into; default: the shipped ``kiln/schedules/tables/sm90a_gemm.csv``.
    seed : int
        Seed of the random inputs.
    progress : bool
        Print one line per candidate and per problem.

    Returns
    -------
    list of dict
        Per problem: ``best`` (the chosen attempt or ``None`` when every candidate failed),
        ``attempts`` and ``cublas_us``.
    """
    import torch
    import tvm
    from ..schedules.configs import SM90_NUM_SMS
    from ..schedules.tables import GemmTable, TableRow, table_path as default_path
    if not torch.cuda.is_available():
        raise RuntimeError("kiln tune gemm needs a CUDA GPU (none visible to torch)")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if torch.cuda.get_device_capability(0) != (9, 0) or sms != SM90_NUM_SMS:
        raise RuntimeError(f"the sm90a table is for 132-SM sm_90 GPUs (H100 SXM / H200); this GPU is "
                           f"sm_{''.join(map(str, torch.cuda.get_device_capability(0)))} with {sms} SMs")
    torch.backends.cuda.matmul.allow_tf32 = False
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if progress else (lambda s: None)
    table = GemmTable(table_path or default_path("sm90a"))
    results, rows = [], []
    for i, p in enumerate(problems):
        t0 = time.perf_counter()
        r = tune_problem(p, seed + i)
        results.append(r)
        b = r["best"]
        n_ok = sum(a["status"] == "ok" for a in r["attempts"])
        if b is None:
            say(f"[{i + 1}/{len(problems)}] {p.label()}: every candidate failed "
                f"({'; '.join(a['status'] for a in r['attempts'][:3])})")
            continue
        flops = 2 * p.M * p.N * p.K
        say(f"[{i + 1}/{len(problems)}] {p.label()}: {b['config']} {b['time_us']:.2f} us "
            f"({flops / b['time_us'] / 1e6:.0f} TF/s, cuBLAS {r['cublas_us']:.2f} us) "
            f"{n_ok}/{len(r['attempts'])} ok, {time.perf_counter() - t0:.0f} s")
        from ..schedules.gemm_sm90 import Epilogue
        rows.append(TableRow("sm90a", p.M, p.N, p.K, p.dtype, "TN", Epilogue(p.epilogue).name(), b["config"],
                             round(b["time_us"], 3), round(flops / b["time_us"] / 1e6, 1),
                             float(f"{b['rel_err']:.3e}"), round(r["cublas_us"], 3), len(r["attempts"]),
                             tvm.__version__, datetime.date.today().isoformat()))
        table.merge(rows[-1:])     # after each problem: an interrupted run keeps what it measured
    return results
