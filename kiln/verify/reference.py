"""Reference execution in torch and error measures.

Errors are reported as max |out - ref| and relative to max |ref|, so one number reads the same for a
logit tensor and a normalised hidden state.
"""
from __future__ import annotations

import copy

from ..frontend.torch_export import flatten_outputs

__all__ = ["TOLERANCES", "cast_inputs", "compare", "flatten_outputs", "torch_reference"]

# Max |out - ref| / max |ref| accepted per compute dtype, against a reference run in float32.
TOLERANCES = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 6e-2}


def cast_inputs(inputs, dtype, device=None) -> tuple:
    """Floating inputs to ``dtype`` (integer ids and masks untouched), optionally moved to ``device``."""
    out = []
    for x in inputs:
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        out.append(x.to(device) if device is not None else x)
    return tuple(out)


def torch_reference(model, inputs, dtype=None, device: str = "cpu") -> list:
    """Run ``model`` eagerly (a copy, in ``dtype`` on ``device``) and return its flattened outputs."""
    import torch
    m = copy.deepcopy(model).eval().to(device)
    if dtype is not None:
        m = m.to(dtype)
    with torch.no_grad():
        return flatten_outputs(m(*cast_inputs(inputs, dtype, device)))


def compare(outs, refs) -> dict:
    """Max abs error, max |ref| and their ratio over all outputs (float64 on the CPU)."""
    import torch
    outs = outs if isinstance(outs, (tuple, list)) else [outs]
    if len(outs) != len(refs):
        raise ValueError(f"expected {len(refs)} outputs, got {len(outs)}")
    err, mag = 0.0, 0.0
    for o, r in zip(outs, refs):
        o, r = o.detach().cpu().double(), r.detach().cpu().double()
        if o.shape != r.shape:
            raise ValueError(f"output shape {tuple(o.shape)} differs from the reference's {tuple(r.shape)}")
        if not torch.isfinite(o).all():
            return {"max_abs_err": float("nan"), "max_abs_ref": float(r.abs().max()), "rel_err": float("nan")}
        err = max(err, float((o - r).abs().max()))
        mag = max(mag, float(r.abs().max()))
    return {"max_abs_err": err, "max_abs_ref": mag, "rel_err": err / mag if mag else err}
