"""Convert a CNN to NHWC once, so that the convs :mod:`.conv_to_gemm` accepts need no transpose each.

A GEMM-lowered conv reads and writes NHWC (``[N*H*W, C]`` rows are pixels). Transposing around every conv would
cost two copies per conv; instead the whole chain of convs, batch-norm arithmetic, ReLUs, pools and residual adds
is moved to NHWC, and only the model's inputs and outputs (and ops without a layout rule) are transposed.

* **pattern**: every ``nn.conv2d`` binding of a Relax function.
* **check**: :func:`kiln.relax_passes.conv_to_gemm.check_conv`, the same decision the GEMM rewrite makes. An
  accepted conv gets data layout NHWC and kernel layout OHWI; a refused one keeps its layouts (its input is
  transposed back if it arrives in NHWC). Without any accepted conv the module is left untouched.
* **rewrite**: TVM's ``ConvertLayout`` with a per-call layout callback. It propagates the layout through the
  ops that have a layout rule (elementwise, broadcasting binary ops with their per-channel operands, pools,
  reductions, ...) and inserts ``permute_dims`` where a value must return to its original layout. Weight
  permutations (``OIHW -> OHWI``) depend on weights only and are folded into the weights by the fusion stage;
  permutations of constants (the ``[1, C, 1, 1]`` batch-norm statistics) are folded here with numpy. If
  ``ConvertLayout`` raises, the module is left as it was and the reason recorded (the convs then stay convs).

The JSON module attr ``kiln.nhwc_layout`` (:func:`fusion_report`, :func:`report_note`) lists the convs moved to
NHWC, the ones kept with the reason, and how many activation transposes the conversion added.
"""
from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from . import read_report, rewrite_functions, target_kind
from .conv_to_gemm import _min_macs, check_conv
from .fold_conv_bn import weight_only_analysis
from .fuse_gemm_epilogue import _graph, _name, _op

__all__ = ["ToNHWC", "fusion_report", "report_note", "REPORT_ATTR"]

#: Module attr holding the JSON report.
REPORT_ATTR = "kiln.nhwc_layout"
_NHWC = ["NHWC", "OHWI"]


def _activation_transposes(mod: tvm.IRModule) -> int:
    """``permute_dims`` bindings whose input depends on a model input (not on weights/constants only)."""
    count = 0
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            g = _graph(func)
            weight_only = weight_only_analysis(func, g)
            count += sum(1 for v in g.value.values()
                         if _op(v) == "relax.permute_dims" and not weight_only(v.args[0]))
    return count


@mutator
class _ConstTransposes(PyExprMutator):
    """``permute_dims(constant)`` -> the transposed constant (numpy; exact)."""

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if _op(call) == "relax.permute_dims" and isinstance(call.args[0], tvm.ir.expr.Constant):
            arr = call.args[0].value.numpy()
            axes = None if call.attrs.axes is None else [int(a) for a in call.attrs.axes]
            return relax.const(np.ascontiguousarray(np.transpose(arr, axes)), str(call.args[0].ty.dtype))
        return call


def _fold_constant_transposes(mod: tvm.IRModule) -> tvm.IRModule:
    """ConvertLayout transposes constants too (batch-norm statistics); fold them here with numpy, so they reach
    neither ``FoldConstant`` (which compiles one kernel per op: ~0.15 s each) nor the model."""
    rw = _ConstTransposes(mod)
    return rewrite_functions(rw, mod)


@tvm.transform.module_pass(opt_level=0, name="kiln.ToNHWC")
class ToNHWC:
    """Move the convs :mod:`.conv_to_gemm` accepts, and what their values flow through, to NHWC.

    Parameters
    ----------
    target_kind : str, optional
        As for :class:`~kiln.relax_passes.conv_to_gemm.ConvToGemm` (default: the current target).
    min_macs : int, optional
        As for :class:`~kiln.relax_passes.conv_to_gemm.ConvToGemm`; pass the same value to both.
    """

    def __init__(self, target_kind: str | None = None, min_macs: int | None = None):
        self.target_kind = target_kind
        self.min_macs = min_macs
        self.report: dict = {}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        kind, min_macs = target_kind(self.target_kind), _min_macs(self.min_macs)
        nhwc, kept = [], []
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            for var, value in _graph(func).value.items():
                if _op(value) == "relax.nn.conv2d":
                    _, reason = check_conv(value, kind, min_macs)
                    if reason is None:
                        nhwc.append(f"{gv.name_hint}:{_name(var)}")
                    else:
                        kept.append({"conv": f"{gv.name_hint}:{_name(var)}", "reason": reason})
        rep = {"nhwc": nhwc, "kept": kept, "activation_transposes": 0}
        if nhwc:
            before = _activation_transposes(mod)

            def layouts(call: relax.Call):
                if getattr(call.op, "name", None) != "relax.nn.conv2d":
                    return {}
                if check_conv(call, kind, min_macs)[1] is None:
                    return {"relax.nn.conv2d": _NHWC}
                return {"relax.nn.conv2d": [str(call.attrs.data_layout), str(call.attrs.kernel_layout)]}

            try:
                converted = relax.transform.ConvertLayout({}, layouts)(mod)
            except (RuntimeError, ValueError, TypeError) as e:   # declined with the reason (ConvToGemm refuses NCHW)
                rep["failed"] = f"ConvertLayout raised {type(e).__name__}: {str(e).splitlines()[-1][:200]}"
                rep["kept"] += [{"conv": c, "reason": rep["failed"]} for c in nhwc]
                rep["nhwc"] = []
            else:
                mod = _fold_constant_transposes(converted)
                rep["activation_transposes"] = _activation_transposes(mod) - before
        self.report = rep
        return mod.with_attr(REPORT_ATTR, json.dumps(rep))


def fusion_report(mod: tvm.IRModule) -> dict:
    """The report :class:`ToNHWC` left on ``mod`` (``{}`` if it did not run)."""
    return read_report(mod, REPORT_ATTR, dict)


def report_note(mod: tvm.IRModule) -> str | None:
    """One line for the compile notes, or ``None`` when the pass did not run or found no conv."""
    rep = fusion_report(mod)
    if not rep or not (rep["nhwc"] or rep["kept"]):
        return None
    line = f"NHWC layout: {len(rep['nhwc'])}/{len(rep['nhwc']) + len(rep['kept'])} convs"
    if rep["nhwc"]:
        line += f"; activation transposes added: {rep['activation_transposes']}"
    if rep.get("failed"):
        line += f"; {rep['failed']}"
    return line
