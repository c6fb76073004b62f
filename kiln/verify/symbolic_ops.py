"""The Relax ops :mod:`kiln.verify.symbolic` evaluates, over numpy object arrays of z3 terms.

Each op takes the evaluator (for its uninterpreted functions and side conditions), the Relax call (for attrs
and argument types) and the evaluated arguments, and returns the result the Relax op's definition gives.
Elements may be ``-inf`` (:mod:`.xreal`), booleans are z3 booleans. Layout ops (reshape, permute, concat,
split, slices, take, pad, broadcast, repeat, tile...) move elements; arithmetic builds terms.
"""
from __future__ import annotations

import math

import numpy as np
import tvm
import z3

from . import xreal as xr

__all__ = ["OPS", "softmax", "vectorize"]

Unsupported = xr.SymbolicUnsupported


def vectorize(fn, *arrays):
    """``fn`` applied elementwise (numpy broadcasting) to object arrays; an object array back."""
    arrays = np.broadcast_arrays(*[np.asarray(a, dtype=object) for a in arrays])
    out = np.empty(arrays[0].shape, dtype=object)
    for idx in np.ndindex(out.shape):
        out[idx] = fn(*(a[idx] for a in arrays))
    return out


def _ints(v) -> list[int]:
    return [int(x) for x in v]


def _dtype(expr) -> str:
    return str(getattr(getattr(expr, "ty", None), "dtype", ""))


def _axes(attr, ndim: int) -> list[int]:
    """Normalised reduction axes (``None``: all)."""
    if attr is None:
        return list(range(ndim))
    return sorted(int(a) % ndim for a in attr)


# ------------------------------------------------------------------------------------------ arithmetic
_BIN = {"relax.add": xr.add, "relax.subtract": xr.sub, "relax.multiply": xr.mul, "relax.divide": xr.div,
        "relax.maximum": xr.maximum, "relax.minimum": xr.minimum}
_CMP = {"relax.equal": "==", "relax.not_equal": "!=", "relax.less": "<", "relax.less_equal": "<=",
        "relax.greater": ">", "relax.greater_equal": ">="}


def _binary(ev, call, args):
    return vectorize(_BIN[call.op.name], args[0], args[1])


def _compare(ev, call, args):
    op = _CMP[call.op.name]
    if _dtype(call.args[0]) == "bool":
        if op not in ("==", "!="):
            raise Unsupported(f"{call.op.name} on booleans")
        return vectorize(lambda a, b: (a == b) if op == "==" else z3.Xor(a, b), args[0], args[1])
    return vectorize(lambda a, b: xr.compare(op, a, b), args[0], args[1])


def _logical(ev, call, args):
    op = call.op.name.split(".")[-1]
    if op.startswith("bitwise") and not all(_dtype(a) == "bool" for a in call.args):
        raise Unsupported(f"{call.op.name} on {_dtype(call.args[0])} (integer bit operations)")
    if op.endswith("not"):
        return vectorize(z3.Not, args[0])
    f = z3.And if op.endswith("and") else z3.Or
    return vectorize(lambda a, b: f(a, b), args[0], args[1])


def _relu(ev, call, args):
    return vectorize(lambda a: xr.maximum(a, z3.RealVal(0)), args[0])


def _negative(ev, call, args):
    def neg(a):
        if not xr.is_finite(a):
            raise Unsupported("-(-inf) is +inf")
        return -a
    return vectorize(neg, args[0])


def _exp(ev, call, args):
    f = ev.fn("exp")
    return vectorize(lambda a: xr.exp(f, a), args[0])


def _uninterpreted(name):
    def op(ev, call, args):
        f = ev.fn(name)

        def apply(a):
            if not xr.is_finite(a):
                raise Unsupported(f"{name}(-inf) is not modelled")
            return f(a)
        return vectorize(apply, args[0])
    return op


def _astype(ev, call, args):
    """Casts are exact (the identity on reals); bool <-> number converts (``b ? 1 : 0``, ``x != 0``)."""
    src, dst = _dtype(call.args[0]), str(call.attrs.dtype)
    if (src == "bool") == (dst == "bool"):
        return args[0]
    if src == "bool":
        return vectorize(lambda c: z3.If(c, z3.RealVal(1), z3.RealVal(0)), args[0])
    return vectorize(lambda a: xr.compare("!=", a, z3.RealVal(0)), args[0])


def _where(ev, call, args):
    return vectorize(xr.where, args[0], args[1], args[2])


def _matmul(ev, call, args):
    for a in args:
        if any(not isinstance(x, z3.ExprRef) or z3.is_bool(x) for x in np.asarray(a).reshape(-1)):
            raise Unsupported("matmul of a tensor holding -inf or booleans")
    return np.matmul(args[0], args[1])


# ------------------------------------------------------------------------------------------ reductions
def _reduce(ev, call, args):
    x = np.asarray(args[0], dtype=object)
    op = call.op.name.split(".")[-1]
    axes = _axes(call.attrs.axis, x.ndim)
    fold = {"max": xr.maximum, "min": xr.minimum, "sum": xr.add, "mean": xr.add}[op]
    keep = [a for a in range(x.ndim) if a not in axes]
    moved = np.transpose(x, keep + axes).reshape([x.shape[a] for a in keep] + [-1])
    out = np.empty(moved.shape[:-1], dtype=object)
    n = moved.shape[-1]
    for idx in np.ndindex(out.shape):
        acc = moved[idx][0]
        for e in moved[idx][1:]:
            acc = fold(acc, e)
        out[idx] = xr.div(acc, z3.RealVal(n)) if op == "mean" else acc
    if call.attrs.keepdims:
        out = out.reshape([1 if a in axes else s for a, s in enumerate(x.shape)])
    return out


def softmax(ev, x, axis: int):
    """Relax's softmax, ``exp(x - max) / sum(exp(x - max))`` along ``axis``; ``-inf`` entries get 0.

    A row that may be all ``-inf`` (NaN in IEEE) is excluded: its "some entry is finite" condition is added
    to ``ev.assumptions`` (a row that is all ``-inf`` for every input is refused)."""
    x = np.moveaxis(np.asarray(x, dtype=object), axis, -1)
    f = ev.fn("exp")
    out = np.empty(x.shape, dtype=object)
    for idx in np.ndindex(x.shape[:-1]):
        row = list(x[idx])
        m = row[0]
        for e in row[1:]:
            m = xr.maximum(m, e)
        fin = xr.fin_of(m)
        if fin is False:
            raise Unsupported("softmax over a row whose every entry is -inf")
        if fin is not True:
            ev.assumptions.append(fin)
        mv = xr.val_of(m)
        es = [xr.exp(f, xr.sub(e, mv)) for e in row]
        total = es[0]
        for e in es[1:]:
            total = total + e
        out[idx] = np.array([e / total for e in es], dtype=object)
    return np.moveaxis(out, -1, axis)


def _softmax(ev, call, args):
    return softmax(ev, args[0], int(call.attrs.axis))


# ------------------------------------------------------------------------------------------ layout
def _permute(ev, call, args):
    axes = None if call.attrs.axes is None else _ints(call.attrs.axes)
    return np.transpose(args[0], axes)


def _concat(ev, call, args):
    return np.concatenate(args[0], axis=int(call.attrs.axis))


def _split(ev, call, args):
    ind = call.attrs.indices_or_sections
    ind = int(ind) if isinstance(ind, (int, tvm.tirx.IntImm)) else _ints(ind)
    return tuple(np.split(args[0], ind, axis=int(call.attrs.axis)))


def _expand_dims(ev, call, args):
    return np.expand_dims(args[0], tuple(_ints(call.attrs.axis)))


def _squeeze(ev, call, args):
    x = np.asarray(args[0], dtype=object)
    if call.attrs.axis is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(_ints(call.attrs.axis)))


def _broadcast_to(ev, call, args):
    return np.broadcast_to(np.asarray(args[0], dtype=object), tuple(args[1])).copy()


def _repeat(ev, call, args):
    axis = call.attrs.axis
    return np.repeat(args[0], int(call.attrs.repeats), axis=None if axis is None else int(axis))


def _tile(ev, call, args):
    return np.tile(args[0], _ints(call.attrs.repeats))


def _strided_slice(ev, call, args):
    x = np.asarray(args[0], dtype=object)
    axes, begin, end = args[1], args[2], args[3]
    strides = args[4] if len(args) > 4 else (1,) * len(axes)
    sl = [slice(None)] * x.ndim
    for a, b, e, s in zip(axes, begin, end, strides):
        if s == 0:
            raise Unsupported("strided_slice with stride 0")
        sl[int(a) % x.ndim] = slice(b, e, s)
    return x[tuple(sl)]


def _take(ev, call, args):
    if not isinstance(call.args[1], tvm.ir.expr.Constant):
        raise Unsupported("take with runtime indices (only constant indices are modelled)")
    idx = call.args[1].value.numpy().astype(np.int64)
    mode = str(call.attrs.mode)
    axis = call.attrs.axis
    x = np.asarray(args[0], dtype=object)
    return np.take(x, idx, axis=None if axis is None else int(axis),
                   mode={"fast": "raise", "clip": "clip", "wrap": "wrap"}[mode])


def _zeros(ev, call, args):
    shape, dtype = tuple(args[0]), str(call.attrs.dtype)
    out = np.empty(shape, dtype=object)
    zero = z3.BoolVal(False) if dtype == "bool" else z3.RealVal(0)
    for idx in np.ndindex(shape):
        out[idx] = zero
    return out


def _pad(ev, call, args):
    if str(call.attrs.pad_mode) != "constant":
        raise Unsupported(f"nn.pad mode {call.attrs.pad_mode!r} (only constant padding is modelled)")
    x = np.asarray(args[0], dtype=object)
    w = _ints(call.attrs.pad_width)
    if len(w) != 2 * x.ndim or min(w) < 0:
        raise Unsupported(f"nn.pad widths {w} for rank {x.ndim}")
    value = float(call.attrs.pad_value)
    fill = z3.RealVal(str(value)) if math.isfinite(value) else None
    if fill is None:
        raise Unsupported(f"nn.pad value {value}")
    out = np.empty([s + w[2 * i] + w[2 * i + 1] for i, s in enumerate(x.shape)], dtype=object)
    for idx in np.ndindex(out.shape):
        out[idx] = fill
    out[tuple(slice(w[2 * i], w[2 * i] + s) for i, s in enumerate(x.shape))] = x
    return out


def _conv2d(ev, call, args):
    """``nn.conv2d`` (groups 1) by its definition: out[n, o, y, x] = sum over c, ky, kx of
    pad(data)[n, c, y*sh + ky*dh, x*sw + kx*dw] * w[o, c, ky, kx]."""
    a = call.attrs
    dl, kl, ol = str(a.data_layout), str(a.kernel_layout), str(a.out_layout or a.data_layout)
    if dl not in ("NCHW", "NHWC") or kl not in ("OIHW", "OHWI") or ol != dl:
        raise Unsupported(f"conv2d layouts data {dl}, kernel {kl}, out {ol} (modelled: NCHW/NHWC data and out, "
                          "OIHW/OHWI kernel)")
    if int(a.groups) != 1:
        raise Unsupported(f"conv2d groups={int(a.groups)} (only groups=1 is modelled)")
    x = np.asarray(args[0], dtype=object)
    w = np.asarray(args[1], dtype=object)
    x = np.transpose(x, (0, 3, 1, 2)) if dl == "NHWC" else x
    w = np.transpose(w, (0, 3, 1, 2)) if kl == "OHWI" else w
    (sh, sw), (dh, dw) = _ints(a.strides), _ints(a.dilation)
    pt, pl, pb, pr = _ints(a.padding)
    N, C, H, W = x.shape
    O, Cw, KH, KW = w.shape
    if Cw != C:
        raise Unsupported(f"conv2d kernel has {Cw} input channels, data {C}")
    zero = z3.RealVal(0)
    xp = np.empty((N, C, H + pt + pb, W + pl + pr), dtype=object)
    for idx in np.ndindex(xp.shape):
        xp[idx] = zero
    xp[:, :, pt:pt + H, pl:pl + W] = x
    OH = (H + pt + pb - dh * (KH - 1) - 1) // sh + 1
    OW = (W + pl + pr - dw * (KW - 1) - 1) // sw + 1
    out = np.empty((N, O, OH, OW), dtype=object)
    for y in range(OH):
        for xx in range(OW):
            win = xp[:, :, y * sh:y * sh + dh * (KH - 1) + 1:dh, xx * sw:xx * sw + dw * (KW - 1) + 1:dw]
            out[:, :, y, xx] = np.tensordot(win, w, axes=([1, 2, 3], [1, 2, 3]))
    return np.transpose(out, (0, 2, 3, 1)) if ol == "NHWC" else out


def _attention(ev, call, args):
    """``nn.attention(q, k, v)`` in BSHD: ``softmax(q k^T * scale [+ causal -inf]) v`` per head, the scale
    ``1/sqrt(D)`` (its float64 value) when unset; causal ``TopLeft`` masks key ``j > i``, ``BottomRight``
    ``j > i + Skv - Sq``."""
    a = call.attrs
    if a.window_size is not None:
        raise Unsupported("nn.attention with a sliding window")
    q, k, v = (np.asarray(t, dtype=object) for t in args[:3])
    B, Sq, H, D = q.shape
    Skv = k.shape[1]
    if k.shape[2] != H:
        raise Unsupported(f"nn.attention with {H} query heads and {k.shape[2]} key heads")
    scale = z3.RealVal(str(float(a.scale.value) if a.scale is not None else 1.0 / math.sqrt(D)))
    causal = None if a.causal_mask is None else str(a.causal_mask)
    offset = {None: None, "TopLeft": 0, "BottomRight": Skv - Sq}[causal]
    s = np.matmul(np.transpose(q, (0, 2, 1, 3)), np.transpose(k, (0, 2, 3, 1))) * scale
    if offset is not None:
        for i in range(Sq):
            for j in range(Skv):
                if j > i + offset:
                    s[:, :, i, j] = xr.NEG_INF
    p = softmax(ev, s, -1)
    return np.transpose(np.matmul(p, np.transpose(v, (0, 2, 1, 3))), (0, 2, 1, 3))


_ELEM = {"relax.sigmoid": "sigmoid", "relax.tanh": "tanh", "relax.erf": "erf", "relax.nn.gelu": "gelu",
         "relax.nn.gelu_tanh": "gelu_tanh", "relax.nn.silu": "silu"}

#: Relax op name -> implementation ``(evaluator, call, evaluated args) -> array``.
OPS = {**{op: _binary for op in _BIN}, **{op: _compare for op in _CMP},
       **{f"relax.{p}_{o}": _logical for p in ("logical", "bitwise") for o in ("and", "or", "not")},
       **{op: _uninterpreted(name) for op, name in _ELEM.items()},
       "relax.exp": _exp, "relax.nn.relu": _relu, "relax.negative": _negative, "relax.astype": _astype,
       "relax.where": _where, "relax.matmul": _matmul, "relax.max": _reduce, "relax.min": _reduce,
       "relax.sum": _reduce, "relax.mean": _reduce, "relax.nn.softmax": _softmax,
       "relax.permute_dims": _permute, "relax.reshape": lambda ev, c, a: np.reshape(a[0], a[1]),
       "relax.concat": _concat, "relax.split": _split, "relax.expand_dims": _expand_dims, "relax.squeeze": _squeeze,
       "relax.broadcast_to": _broadcast_to, "relax.repeat": _repeat, "relax.tile": _tile,
       "relax.strided_slice": _strided_slice, "relax.take": _take, "relax.zeros": _zeros, "relax.nn.pad": _pad,
       "relax.nn.conv2d": _conv2d, "relax.nn.attention": _attention}
