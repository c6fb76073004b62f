"""kiln's converter overrides for TVM 0.27's torch.export importer (passed as ``custom_convert_map``).

Each override fixes one stock-converter bug and otherwise defers to the stock converter, so fp32
models import exactly as before. A converter in ``custom_convert_map`` is called as
``fn(node, importer)``; ``importer.env`` maps fx nodes to Relax expressions.

Bugs fixed here (all in ``tvm/relax/frontend/torch/base_fx_graph_translator.py``):

* ``addmm``: the stock ``_addmm`` always emits ``matmul(..., out_dtype="float32")`` and then adds the
  *input-dtype* bias, so any fp16/bf16 ``nn.Linear`` (BERT, GPT-2 Conv1D, ViT) fails type inference
  with "Binary operators must have the same datatype" (fp16 bias + fp32 product).
* ``mm`` / ``bmm`` / ``matmul``: same hard-coded ``out_dtype="float32"``; it type-checks, but silently
  promotes every fp16/bf16 activation downstream to fp32 (torch keeps the input dtype).
* ``layer_norm`` / ``native_layer_norm`` on bf16: ``topi.nn.layer_norm`` only accepts fp32/fp16.
* ``cumsum`` / ``cumprod``: the stock converter keeps the input dtype, but torch promotes bool and
  integer inputs to int64 (``(mask != 1).cumsum(-1)`` in transformers-5 masks is an int64 count, not a
  bool), which changes results for packed sequences.
"""
from __future__ import annotations

import operator
from collections import Counter
from functools import partial
from typing import Callable

from tvm import relax

__all__ = ["LOW_PRECISION", "OVERRIDDEN_OPS", "make_convert_map"]

#: Float dtypes whose matmuls must accumulate in fp32 and be cast back, as torch does.
LOW_PRECISION = ("float16", "bfloat16")

#: Importer convert-map keys that kiln overrides (the pre-scan treats these as supported).
OVERRIDDEN_OPS = ("addmm.default", "mm.default", "bmm.default", "matmul.default", "layer_norm.default",
                  "native_layer_norm.default", "cumsum.default", "cumprod.default")


def _dtype(expr) -> str | None:
    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def _torch_out_dtype(node) -> str | None:
    # torch.export records the exact output tensor of every node in meta["val"]; it is the ground truth
    # for result dtypes (type promotion rules included).
    val = node.meta.get("val")
    dt = getattr(val, "dtype", None)
    return None if dt is None else str(dt).replace("torch.", "")


def _addmm(stats: Counter, node, imp) -> relax.Var:
    bias, x, w = (imp.env[a] for a in node.args[:3])
    dt = _dtype(x)
    if dt not in LOW_PRECISION or _dtype(w) != dt:
        return imp._addmm(node)
    alpha, beta = node.kwargs.get("alpha", 1), node.kwargs.get("beta", 1)
    bb = imp.block_builder
    # Accumulate in fp32 (torch's CPU/GPU GEMMs do too) and add the bias in fp32, then round once to
    # the input dtype: one cast that fuses into the GEMM epilogue, no fp32 tensor escapes.
    res = bb.emit(relax.op.matmul(x, w, out_dtype="float32"))
    if alpha != 1:
        res = bb.emit(relax.op.multiply(res, relax.const(alpha, "float32")))
    if beta != 0:
        b = bb.emit(relax.op.astype(bias, "float32"))
        if beta != 1:
            b = bb.emit(relax.op.multiply(b, relax.const(beta, "float32")))
        res = bb.emit(relax.op.add(res, b))
    stats[f"addmm {dt} override"] += 1
    return bb.emit(relax.op.astype(res, dt))


def _matmul(stats: Counter, node, imp) -> relax.Var:
    a, b = imp.retrieve_args(node)[:2]
    dt = _dtype(a)
    if dt not in LOW_PRECISION or _dtype(b) != dt:
        # Stock behaviour (fp32 output, mixed-dtype promotion) for everything we do not fix.
        return imp._binary_op(partial(relax.op.linear_algebra.matmul, out_dtype="float32"), operator.matmul)(node)
    bb = imp.block_builder
    res = bb.emit(relax.op.matmul(a, b, out_dtype="float32"))
    stats[f"{node.target.__name__.split('.')[0]} {dt} override"] += 1
    return bb.emit(relax.op.astype(res, dt))


def _layer_norm(stats: Counter, native: bool, node, imp) -> relax.Var:
    x = imp.env[node.args[0]]
    dt = _dtype(x)
    if dt != "bfloat16":
        return imp._native_layer_norm(node) if native else imp._layer_norm(node)
    bb = imp.block_builder

    def up(arg_index):
        # Missing/None affine params stay None: _layer_norm_impl then creates fp32 ones/zeros itself.
        if len(node.args) <= arg_index or node.args[arg_index] is None:
            return None
        return bb.emit(relax.op.astype(imp.env[node.args[arg_index]], "float32"))

    eps = node.args[4] if len(node.args) > 4 else 1e-05
    # topi.nn.layer_norm rejects bf16; torch computes bf16 layer_norm in fp32 internally as well.
    out = imp._layer_norm_impl(bb.emit(relax.op.astype(x, "float32")), up(2), up(3), eps, node.args[1])
    stats["layer_norm bfloat16 computed in float32"] += 1
    return bb.emit(relax.op.astype(out, dt))


def _scan(stats: Counter, op: Callable, node, imp) -> relax.Var:
    x = imp.env[node.args[0]]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    out_dt = _torch_out_dtype(node)
    in_dt = _dtype(x)
    if out_dt is None or out_dt == in_dt:
        return op(imp, node)
    if out_dt == "bool":  # cannot happen in torch, but never turn a scan into a bool scan
        out_dt = "int64"
    stats[f"{node.target.__name__.split('.')[0]} {in_dt}->{out_dt} (torch promotion)"] += 1
    fn = relax.op.cumsum if node.target.__name__.startswith("cumsum") else relax.op.cumprod
    return imp.block_builder.emit(fn(x, dim, out_dt))


def make_convert_map(stats: Counter) -> dict[str, Callable]:
    """Build kiln's ``custom_convert_map`` for ``from_exported_program``.

    Parameters
    ----------
    stats : collections.Counter
        Incremented with a human-readable key each time an override changes what the stock
        converter would have emitted (becomes ``ImportResult.notes``).

    Returns
    -------
    dict[str, Callable]
        Importer op name (e.g. ``"addmm.default"``) -> ``fn(node, importer)``.
    """
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter as _Imp

    cmap = {
        "addmm.default": partial(_addmm, stats),
        "mm.default": partial(_matmul, stats),
        "bmm.default": partial(_matmul, stats),
        "matmul.default": partial(_matmul, stats),
        "layer_norm.default": partial(_layer_norm, stats, False),
        "native_layer_norm.default": partial(_layer_norm, stats, True),
        "cumsum.default": partial(_scan, stats, lambda imp, n: _Imp._cumsum(imp, n)),
        "cumprod.default": partial(_scan, stats, lambda imp, n: _Imp._cumprod(imp, n)),
    }
    assert set(cmap) == set(OVERRIDDEN_OPS)
    return cmap
