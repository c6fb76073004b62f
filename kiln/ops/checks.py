"""Typed errors of :mod:`kiln.ops` and the input checks every op shares (expected vs given, by name).

The checks run in the real implementations *and* in the fake (meta) ones, so a bad call fails the same
way eagerly and while ``torch.compile`` traces.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ..errors import InputMismatchError, KilnError

__all__ = ["OpInputError", "OpUnsupportedError", "check_tensor", "check_same_device", "DTYPE_NAMES",
           "dtype_name", "FLOAT_DTYPES"]

#: torch dtype -> TVM dtype string.
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.int32: "int32", torch.int64: "int64", torch.float8_e4m3fn: "float8_e4m3fn"}
#: The activation dtypes every op takes.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class OpInputError(InputMismatchError):
    """An op was given a tensor or argument it cannot take; the message names the op, the argument, what
    was expected and what was given.

    Attributes
    ----------
    op, arg : str
    expected, given : str
    """

    def __init__(self, op: str, arg: str, expected: str, given: str):
        self.op, self.arg, self.expected, self.given = op, arg, expected, given
        super().__init__(f"kiln.ops.{op}: {arg}: expected {expected}, given {given}")


class OpUnsupportedError(KilnError, NotImplementedError):
    """A well-formed call that no kernel of kiln implements (yet); the message says why."""


def dtype_name(dt: torch.dtype) -> str:
    """TVM's name of a torch dtype (``torch.float16`` -> ``"float16"``)."""
    return DTYPE_NAMES[dt]


def _fmt_dtypes(dtypes: Iterable[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(op: str, arg: str, t, *, dtypes: Sequence[torch.dtype] | None = None, ndim=None,
                 shape: Sequence | None = None, min_ndim: int | None = None) -> torch.Tensor:
    """Check one tensor argument; return it.

    Parameters
    ----------
    op, arg : str
        For the message.
    t : torch.Tensor
    dtypes : sequence of torch.dtype, optional
        Allowed dtypes.
    ndim : int or tuple of int, optional
        Allowed ranks.
    shape : sequence, optional
        Expected shape; ``None`` entries match any size.
    min_ndim : int, optional

    Raises
    ------
    OpInputError
    """
    if not isinstance(t, torch.Tensor):
        raise OpInputError(op, arg, "a torch.Tensor", type(t).__name__)
    if dtypes is not None and t.dtype not in dtypes:
        raise OpInputError(op, arg, f"dtype {_fmt_dtypes(dtypes)}", f"{str(t.dtype).replace('torch.', '')}")
    if ndim is not None:
        ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in ranks:
            raise OpInputError(op, arg, f"{' or '.join(map(str, ranks))} dims", f"shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise OpInputError(op, arg, f"at least {min_ndim} dims", f"shape {tuple(t.shape)}")
    if shape is not None:
        want = tuple(shape)
        ok = len(want) == t.dim() and all(w is None or int(g) == int(w) for w, g in zip(want, t.shape))
        if not ok:
            shown = "(" + ", ".join("*" if w is None else str(int(w)) for w in want) + ("," if len(want) == 1 else "") + ")"
            raise OpInputError(op, arg, f"shape {shown}", f"shape {tuple(t.shape)}")
    return t


def check_same_device(op: str, named: dict) -> torch.device:
    """All given tensors on one device of a kind kiln builds for (cpu or cuda); return it."""
    named = {k: v for k, v in named.items() if v is not None}
    first_name, first = next(iter(named.items()))
    dev = first.device
    if dev.type not in ("cpu", "cuda", "meta"):
        raise OpInputError(op, first_name, "a cpu or cuda tensor", f"a {dev.type} tensor")
    for k, v in named.items():
        if v.device != dev:
            raise OpInputError(op, k, f"a tensor on {dev} (the device of {first_name})", f"one on {v.device}")
    return dev
