"""Fold weight-only computation (transposes, casts, reshapes of weights) into the weights at compile time.

The importer lowers ``torch.nn.Linear`` to ``matmul(x, permute_dims(W))``. With weights kept as run-time
parameters (they live in ``weights.params``, not in the library), nothing folds that transpose, so every call
re-lays-out all weights: on BERT-Large that is ~1.2 GB of traffic and ~150 extra launches per forward. This step
lifts every binding of ``main`` that depends on weights alone into a transform function (TVM's
``LiftTransformParams``), runs that function once on the CPU, and hands ``main`` the transformed weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

__all__ = ["FoldResult", "fold_weight_transforms"]

_TRANSFORM = "main_transform_params"


@dataclass
class FoldResult:
    mod: tvm.IRModule
    params: list
    note: str


def _has_weight_only_work(lifted: tvm.IRModule) -> bool:
    """The lifted transform computes something (a call), rather than passing weights through."""
    calls = []
    relax.analysis.post_order_visit(lifted[_TRANSFORM], lambda e: calls.append(1) if isinstance(e, relax.Call) else None)
    return bool(calls)


def fold_weight_transforms(mod: tvm.IRModule, params: list) -> FoldResult:
    """Return ``mod`` whose ``main`` takes pre-transformed weights, and those weights.

    Parameters
    ----------
    mod : IRModule
        High-level Relax (before legalization); ``main`` has attr ``num_input``.
    params : list of numpy.ndarray
        Weights in ``main``'s trailing-parameter order.

    Returns
    -------
    FoldResult
        ``note`` says how many weights went in and came out.
    """
    if not params:
        return FoldResult(mod, params, "no weights to fold")
    lifted = relax.transform.LiftTransformParams()(mod)
    if _TRANSFORM not in [gv.name_hint for gv in lifted.get_global_vars()]:
        return FoldResult(mod, params, "no weight-only computation")
    if not _has_weight_only_work(lifted):
        return FoldResult(mod, params, "no weight-only computation")
    tmod = tvm.IRModule({"main": lifted[_TRANSFORM].with_attr("global_symbol", "main")})
    ex = tvm.compile(tmod, tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"]([tvm.runtime.tensor(np.ascontiguousarray(p)) for p in params])
    new_params = [o.numpy() for o in out]
    keep = tvm.IRModule({gv: f for gv, f in lifted.functions_items() if gv.name_hint != _TRANSFORM},
                        attrs=lifted.attrs)
    return FoldResult(keep, new_params, f"weight transforms folded at compile time: {len(params)} weights in, "
                                        f"{len(new_params)} out")
