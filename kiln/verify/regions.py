"""``kiln verify``: every fused region of a compile, proved where a proof exists, tested where it does not.

For a model and a target, the import and cleanup stages run, then kiln's pattern passes one by one; each pass's
report lists the regions it fused. Per region:

* **sibling GEMM fusion** (``kiln.sibling_gemm_fusion``): the rule instance (same number of parts, same bias and
  cast form) is rebuilt at tiny widths and proved with :func:`kiln.verify.symbolic.prove_equivalent`;
* **GEMM epilogue fusion** (``kiln.gemm_sm90_fusion``): its stage list is proved against the Relax ops it
  replaces with :func:`kiln.verify.symbolic.prove_epilogue_rule`;
* **attention** (``kiln.attention_fusion``): the rule instance the pass recorded (``proof_rule``: pattern,
  kernel, mask form, GQA, layouts, scale factors) is rebuilt at tiny shapes and proved against a model of the
  kernel (the flash kernel's online softmax, or the generic kernel's) with
  :func:`kiln.verify.attention_proof.prove_attention_rule`, under the exp and masking axioms its docstring
  states; one more row, ``attention numerics``, *tests* the model: it is compiled for llvm, run on random
  inputs and compared with torch at the dtype's tolerance (it bounds the rounding the proofs ignore).
* **CNNs** (``kiln.conv_bn_fold``, ``kiln.conv_to_gemm``): each batch-norm fold and each conv -> GEMM rewrite
  (1x1 reshape, strided slice or im2col gather, K padding) is rebuilt at tiny shapes and proved with
  :mod:`kiln.verify.conv_proof`.

Proofs are exact over the reals with the transcendental functions uninterpreted (see :mod:`.symbolic`), so a
"proved" row says the rewrite computes the same function, and the numerics test bounds the rounding.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

__all__ = ["RegionResult", "verify_model", "format_table"]


@dataclass
class RegionResult:
    """One row of ``kiln verify``."""

    region: str
    rule: str
    status: str          # proved / tested / failed / unknown
    seconds: float
    detail: str = ""


def verify_model(model, example_inputs, target: str = "cuda", dtype=None) -> list[RegionResult]:
    """Verify every region kiln's pattern passes fuse in ``model`` for ``target`` (see the module docstring)."""
    import tvm

    from ..frontend.torch_export import import_torch
    from ..relax_passes import cleanup_passes, pattern_passes
    from ..relax_passes import fuse_attention, fuse_gemm_epilogue, fuse_sibling_gemms
    from ..target.targets import resolve_target
    from .attention_proof import prove_attention_rule
    from .attention_rule import AttentionRule
    from .symbolic import prove_epilogue_rule, prove_sibling_rule
    rows: list[RegionResult] = []
    t = resolve_target(target)
    mod = import_torch(model, tuple(example_inputs), dtype=dtype).mod
    with tvm.target.Target(t.schedule_target):
        mod = tvm.transform.Sequential(cleanup_passes(t.name))(mod)
        mod = tvm.transform.Sequential(pattern_passes(t.name))(mod)
    proved_rules: dict = {}
    for rec in fuse_sibling_gemms.fusion_report(mod):
        if not rec.get("fused"):
            continue
        n, bias = len(rec["matmuls"]), bool(rec.get("bias", True))
        key = ("sibling", n, bias)
        if key not in proved_rules:
            proved_rules[key] = prove_sibling_rule(n, bias)
        p = proved_rules[key]
        rows.append(RegionResult(f"{rec['function']}:{'+'.join(rec['matmuls'])}", "sibling GEMMs", p.status,
                                 p.seconds, f"{n} parts, N={rec['N']}, K={rec['K']}"))
    for rec in fuse_gemm_epilogue.fusion_report(mod):
        if not rec.get("fused"):
            continue
        stages = tuple(tuple(s) for s in rec["epilogue"])
        key = ("epilogue", stages)
        if key not in proved_rules:
            proved_rules[key] = prove_epilogue_rule(stages)
        p = proved_rules[key]
        name = "+".join(s[0] for s in stages) or "none"
        rows.append(RegionResult(f"{rec['function']}:{rec['matmul']}", f"GEMM epilogue [{name}]", p.status,
                                 p.seconds, f"{rec['M']}x{rec['N']}x{rec['K']} {rec['dtype']}"))
    rows += _conv_rows(mod, proved_rules)
    attention = [r for r in fuse_attention.fusion_report(mod) if r.get("fused")]
    for rec in attention:
        rule = AttentionRule.from_dict(rec["proof_rule"])
        key = ("attention", rule)
        if key not in proved_rules:
            proved_rules[key] = prove_attention_rule(rule)
        p = proved_rules[key]
        rows.append(RegionResult(f"{rec['function']}:{rec.get('anchor', '?')}", f"attention [{rec.get('mask')}]",
                                 p.status, p.seconds, f"{rec['kernel']}; {p.detail}"))
    if attention:
        status, secs, detail = _numerics(model, example_inputs, dtype)
        rows.append(RegionResult("model", "attention numerics", status, secs,
                                 detail + f" (covers the {len(attention)} attention regions' rounding)"))
    return rows


def _conv_rows(mod, proved_rules: dict) -> list[RegionResult]:
    """CNN regions: each batch-norm fold and each conv -> GEMM rewrite, proved once per rule instance."""
    from ..relax_passes import conv_to_gemm, fold_conv_bn
    from .conv_proof import prove_conv_record, prove_fold_record
    rows = []
    for rec in fold_conv_bn.fusion_report(mod):
        if rec.get("fused"):
            key = ("conv_bn_fold", tuple(rec["ops"]), rec["cast"], rec["layout"])
            if key not in proved_rules:
                proved_rules[key] = prove_fold_record(rec)
            p = proved_rules[key]
            rows.append(RegionResult(f"{rec['function']}:{rec['conv']}", f"conv BN fold [{'+'.join(rec['ops'])}]",
                                     p.status, p.seconds, rec["layout"]))
    for rec in conv_to_gemm.fusion_report(mod):
        if rec.get("fused"):
            key = ("conv_to_gemm", tuple(rec["kernel"]), tuple(rec["stride"]), tuple(rec["padding"]),
                   rec["K_pad"] != rec["K"])
            if key not in proved_rules:
                proved_rules[key] = prove_conv_record(rec)
            p = proved_rules[key]
            kh, kw = rec["kernel"]
            rows.append(RegionResult(f"{rec['function']}:{rec['conv']}", f"conv->GEMM [{kh}x{kw} s{rec['stride'][0]}]",
                                     p.status, p.seconds,
                                     f"{rec['M']}x{rec['O']}x{rec['K_pad']} {rec['dtype']} {rec['gather']}"))
    return rows


def _numerics(model, example_inputs, dtype):
    """Whole-model differential test on the CPU (llvm build, where attention takes the generic kernel)."""
    import kiln
    import torch

    from .reference import TOLERANCES, cast_inputs, compare, torch_reference
    t0 = time.perf_counter()
    art = kiln.compile(model, example_inputs, target="llvm", dtype=dtype)
    m = kiln.load(art.export(_tmpdir()), device="cpu")
    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    out = m(*cast_inputs(example_inputs, dt, "cpu"))
    c = compare(out if isinstance(out, tuple) else (out,), torch_reference(model, example_inputs,
                                                                           dtype=torch.float32))
    tol = TOLERANCES[str(dt).replace("torch.", "") if dt is not None else "float32"]
    ok = c["rel_err"] <= tol
    return ("tested" if ok else "failed"), time.perf_counter() - t0, f"llvm vs torch rel err {c['rel_err']:.2e} <= {tol}"


def _tmpdir() -> str:
    import tempfile
    return tempfile.mkdtemp(prefix="kiln-verify-") + "/artifact"


def format_table(rows: list[RegionResult]) -> str:
    """The per-region table ``kiln verify`` prints."""
    if not rows:
        return "no fused regions"
    w = max(len(r.region) for r in rows)
    lines = [f"{'region':{w}s}  {'rule':30s} {'status':8s} {'ms':>8s}  detail"]
    lines += [f"{r.region:{w}s}  {r.rule:30s} {r.status:8s} {r.seconds * 1e3:8.1f}  {r.detail}" for r in rows]
    counts = {s: sum(r.status == s for r in rows) for s in ("proved", "tested", "failed", "unknown")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return "\n".join(lines)


def to_json(rows: list[RegionResult]) -> str:
    return json.dumps([r.__dict__ for r in rows], indent=1)
