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
* ``convolution`` (and ``conv1d/2d/3d``): same hard-coded ``out_dtype="float32"`` as addmm; with a bias
  it fails type inference, without one (ResNet) the fp32 output then clashes with fp16 BatchNorm params.
* ``pow`` on bf16: ``topi.power`` accepts only ``kFloat`` types, and bf16 is not one (GPT-2's gelu_new).
* ``slice`` with a symbolic end (``position_ids[:, :seq]`` in BERT/GPT-2 embeddings): Relax infers
  ``min(seq, 256)`` because the importer's analyzer does not know ``seq <= 256``; every shape downstream
  then degrades to "unknown" (``R.Tensor(ndim=3)``) and the VM cannot even lower the result. torch
  already proved the slice is in bounds, so kiln re-emits it with ``assume_inbound=True``. Negative
  slice axes are normalised too: topi's dynamic strided_slice rejects them.
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
OVERRIDDEN_OPS = ("addmm.default", "mm.default", "bmm.default", "matmul.default", "convolution.default",
                  "conv1d.default", "conv2d.default", "conv3d.default", "layer_norm.default",
                  "native_layer_norm.default", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "slice.Tensor",
                  "narrow.default", "cumsum.default", "cumprod.default")


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


def _conv(stats: Counter, node, imp) -> relax.Var:
    args = imp.retrieve_args(node)
    x, w = args[0], args[1]
    dt = _dtype(x)
    name = node.target.__name__.split(".")[0]
    if dt not in LOW_PRECISION or _dtype(w) != dt:
        return getattr(imp, "_" + name)(node)
    bias = args[2] if len(args) > 2 else None

    def arg(i, default):
        return args[i] if len(args) > i and args[i] is not None else default

    # convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups);
    # convNd(x, w, b, stride, padding, dilation, groups).
    transposed = bool(arg(6, False)) if name == "convolution" else False
    groups = arg(8, 1) if name == "convolution" else arg(6, 1)
    kw = dict(bias=None, strides=arg(3, 1), padding=arg(4, 0), dilation=arg(5, 1), groups=groups)
    ndim = len(x.ty.shape.values) - 2
    if transposed:
        if ndim not in (1, 2):
            return imp._convolution(node)
        impl = getattr(imp, f"_conv_transpose{ndim}d_impl")
        kw["output_padding"] = arg(7, 0)
    else:
        impl = getattr(imp, f"_conv{ndim}d_impl")
    bb = imp.block_builder
    # The stock impls compute the conv with out_dtype=float32 (fp32 accumulation, good) and then add
    # the bias in the *input* dtype (type error). Get the bias-free fp32 conv from them, add the bias
    # in fp32 and round once, as for addmm.
    res = impl(x, w, **kw)
    if bias is not None and not imp._is_no_bias(bias):
        b = bb.emit(relax.op.astype(bias, "float32"))
        res = bb.emit(relax.op.add(res, relax.op.reshape(b, (1, -1) + (1,) * ndim)))
    stats[f"conv {dt} override"] += 1
    return bb.emit(relax.op.astype(res, dt))


def _pow(stats: Counter, node, imp) -> relax.Var:
    base, exp = imp.retrieve_args(node)[:2]
    if _dtype(base) != "bfloat16":
        return imp._pow(node)
    bb = imp.block_builder
    # topi.power is float-only by type code and rejects bf16; torch evaluates bf16 pow in fp32 too.
    exp32 = bb.emit(relax.op.astype(exp, "float32")) if isinstance(exp, relax.Expr) else relax.const(exp, "float32")
    res = bb.emit(relax.op.power(bb.emit(relax.op.astype(base, "float32")), exp32))
    stats["pow bfloat16 computed in float32"] += 1
    return bb.emit(relax.op.astype(res, "bfloat16"))


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


def _symbolic_vars(imp) -> dict:
    # The importer names a shape var after torch's symbol ("s70"); collect them from the already
    # created input vars (cached on the importer, which lives for one import only).
    cache = getattr(imp, "_kiln_symvars", None)
    if cache is None:
        import tvm

        cache = {}
        for value in list(imp.env.values()):
            ty = getattr(value, "ty", None)
            if isinstance(ty, relax.TensorType) and ty.shape is not None:
                for d in ty.shape.values:
                    if isinstance(d, tvm.tirx.Var):
                        cache.setdefault(d.name, d)
        imp._kiln_symvars = cache
    return cache


def _torch_shape(node, imp):
    """torch's (proven) output shape of ``node`` as tir exprs, or None if not expressible."""
    val = node.meta.get("val")
    if val is None or not hasattr(val, "shape"):
        return None
    syms, out = _symbolic_vars(imp), []
    for size in val.shape:
        if isinstance(size, int):
            out.append(size)
            continue
        expr = getattr(getattr(size, "node", None), "expr", None)
        if getattr(expr, "is_Integer", False):
            out.append(int(expr))
            continue
        if expr is None or not getattr(expr, "is_Symbol", False) or str(expr) not in syms:
            return None
        out.append(syms[str(expr)])
    return out


def _same_shape(have, want) -> bool:
    import tvm
    import tvm.sym  # the arith analyzer (tvm.arith in older TVM)

    ana = tvm.sym.Analyzer()
    return have is not None and len(have) == len(want) and all(
        ana.can_prove_equal(h, tvm.tirx.IntImm("int64", w) if isinstance(w, int) else w) for h, w in zip(have, want))


def _refine_slice(stats: Counter, stock: Callable, node, imp) -> relax.Var:
    res = stock(imp, node)
    if res.same_as(imp.env[node.args[0]]):  # identity slice: the stock converter returned its input
        return res
    bb = imp.block_builder
    call = bb.lookup_binding(res) if isinstance(res, relax.Var) else None
    if not (isinstance(call, relax.Call) and getattr(call.op, "name", "") == "relax.strided_slice"):
        return res
    x, axes, begin, end = call.args[:4]
    strides = call.args[4] if len(call.args) > 4 else None
    ndim = x.ty.ndim
    # topi's dynamic strided_slice (symbolic begin/end) rejects negative axes ("axis < src_tensor_dim
    # (-1 vs. 2)"); torch.diff(dim=-1) in transformers-5 masks produces exactly that.
    ax = [int(a.value) for a in axes.fields]
    fixed = [a + ndim if a < 0 else a for a in ax]
    # torch proved the slice is in bounds (its output shape is exactly end - begin), so the clipping
    # that produces min(seq, 256) is dead: use assume_inbound=True. (A match_cast would assert the same
    # shape, but TVM 0.27's KillAfterLastUse segfaults on a match_cast of a strided_slice result.)
    want = _torch_shape(node, imp)
    have = None if x.ty.shape is None or res.ty.shape is None else list(res.ty.shape.values)
    inbound = False
    if want is not None and not _same_shape(have, want):
        trial = relax.op.strided_slice(x, fixed, begin, end, strides, assume_inbound=True)
        inbound = _same_shape(list(bb.normalize(trial).ty.shape.values), want)
    if fixed == ax and not inbound:
        return res
    name = node.target.__name__.split(".")[0]
    if fixed != ax:
        stats[f"{name} negative axis normalised"] += 1
    if inbound:
        stats[f"{name} with symbolic end marked in-bounds (shape from torch)"] += 1
    return bb.emit(relax.op.strided_slice(x, fixed, begin, end, strides, assume_inbound=inbound))


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
        **{k: partial(_conv, stats) for k in ("convolution.default", "conv1d.default", "conv2d.default",
                                               "conv3d.default")},
        "pow.Tensor_Scalar": partial(_pow, stats),
        "pow.Tensor_Tensor": partial(_pow, stats),
        "layer_norm.default": partial(_layer_norm, stats, False),
        "native_layer_norm.default": partial(_layer_norm, stats, True),
        "slice.Tensor": partial(_refine_slice, stats, lambda imp, n: _Imp._slice(imp, n)),
        "narrow.default": partial(_refine_slice, stats, lambda imp, n: _Imp._narrow(imp, n)),
        "cumsum.default": partial(_scan, stats, lambda imp, n: _Imp._cumsum(imp, n)),
        "cumprod.default": partial(_scan, stats, lambda imp, n: _Imp._cumprod(imp, n)),
    }
    assert set(cmap) == set(OVERRIDDEN_OPS)
    return cmap
