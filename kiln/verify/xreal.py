"""Extended reals for the symbolic evaluator: z3 reals plus ``-inf``, the value attention masks write.

An element of a symbolic tensor is one of

* a z3 arithmetic term (a finite real);
* :data:`NEG_INF`, the constant ``-inf``;
* :class:`XReal` ``(fin, val)``: ``val`` when the z3 boolean ``fin`` holds, ``-inf`` otherwise (a masked
  score whose mask is a runtime input, a running max that may still be ``-inf``);

booleans are z3 ``BoolRef``. The operations follow IEEE-754 on ``-inf``: ``-inf + x = -inf``,
``max(-inf, x) = x``, ``exp(-inf) = 0``, ``-inf * c = -inf`` for ``c > 0``, ``-inf < x`` for every finite ``x``,
``-inf == -inf``. What IEEE makes ``+inf`` or NaN (``x - (-inf)``, ``-inf * 0``, ``-inf * x`` with ``x`` not a
positive constant) raises :class:`SymbolicUnsupported`: the evaluator never models ``+inf`` or NaN, so a
proof never rests on them.
"""
from __future__ import annotations

from dataclasses import dataclass

import z3

__all__ = ["NEG_INF", "XReal", "SymbolicUnsupported", "is_finite", "fin_of", "val_of", "make", "add", "sub", "mul",
           "div", "maximum", "minimum", "exp", "where", "compare", "positive_constant"]


class SymbolicUnsupported(NotImplementedError):
    """What the symbolic evaluator does not model: an op, an attribute, a dynamic shape, or an operation whose
    IEEE result would be ``+inf`` or NaN (the message says which)."""


class _NegInf:
    """The constant ``-inf`` (a singleton)."""

    def __repr__(self) -> str:
        return "-inf"


#: The constant ``-inf``.
NEG_INF = _NegInf()


@dataclass(frozen=True, eq=False)
class XReal:
    """``val`` where ``fin`` holds, else ``-inf``."""

    fin: z3.BoolRef
    val: z3.ArithRef

    def __repr__(self) -> str:
        return f"If({self.fin}, {self.val}, -inf)"


_ZERO = None


def _zero():
    global _ZERO
    if _ZERO is None:
        _ZERO = z3.RealVal(0)
    return _ZERO


def is_finite(a) -> bool:
    """``a`` is a plain (always finite) real term."""
    return a is not NEG_INF and not isinstance(a, XReal)


def fin_of(a):
    """The condition under which ``a`` is finite: a Python bool when static, else a z3 boolean."""
    if a is NEG_INF:
        return False
    return a.fin if isinstance(a, XReal) else True


def val_of(a):
    """The finite value of ``a`` (``0`` where it is ``-inf``: callers only read it under ``fin_of(a)``)."""
    if a is NEG_INF:
        return _zero()
    return a.val if isinstance(a, XReal) else a


def _static(c):
    """``True``/``False`` for a Python bool or a z3 literal true/false, else ``None``."""
    if isinstance(c, bool):
        return c
    if z3.is_true(c):
        return True
    if z3.is_false(c):
        return False
    return None


def make(fin, val):
    """The element that is ``val`` where ``fin`` holds and ``-inf`` elsewhere, folded when ``fin`` is static."""
    s = _static(fin)
    if s is True:
        return val
    if s is False:
        return NEG_INF
    return XReal(fin, val)


def _and(a, b):
    sa, sb = _static(a), _static(b)
    if sa is False or sb is False:
        return False
    if sa is True:
        return b
    return a if sb is True else z3.And(a, b)


def _or(a, b):
    sa, sb = _static(a), _static(b)
    if sa is True or sb is True:
        return True
    if sa is False:
        return b
    return a if sb is False else z3.Or(a, b)


def _not(a):
    s = _static(a)
    return (not s) if s is not None else z3.Not(a)


def _if(c, a, b):
    s = _static(c)
    if s is not None:
        return a if s else b
    return z3.If(c, a, b)


def _ifb(c, a, b):
    """``c ? a : b`` for booleans, folded where ``a`` or ``b`` is static."""
    s, sa, sb = _static(c), _static(a), _static(b)
    if s is not None:
        return a if s else b
    if sa is not None and sb is not None:
        return (c if sa else z3.Not(c)) if sa != sb else sa
    if sa is not None:
        return _or(c, b) if sa else _and(z3.Not(c), b)
    if sb is not None:
        return _or(z3.Not(c), a) if sb else _and(c, a)
    return z3.If(c, a, b)


def positive_constant(a) -> bool:
    """``a`` is a z3 rational literal > 0."""
    return z3.is_rational_value(a) and a.as_fraction() > 0


def add(a, b):
    if is_finite(a) and is_finite(b):
        return a + b
    return make(_and(fin_of(a), fin_of(b)), val_of(a) + val_of(b))


def sub(a, b):
    if is_finite(b):
        return a - b if is_finite(a) else make(fin_of(a), val_of(a) - b)
    raise SymbolicUnsupported("x - (-inf) is +inf or NaN")


def mul(a, b):
    if is_finite(a) and is_finite(b):
        return a * b
    x, c = (a, b) if is_finite(b) else (b, a)
    if not is_finite(c) or not positive_constant(c):
        raise SymbolicUnsupported("-inf times something other than a positive constant (+inf or NaN)")
    return make(fin_of(x), val_of(x) * c)


def div(a, b):
    if is_finite(a) and is_finite(b):
        return a / b
    if not is_finite(b) or not positive_constant(b):
        raise SymbolicUnsupported("-inf divided by something other than a positive constant, or x / -inf")
    return make(fin_of(a), val_of(a) / b)


def maximum(a, b):
    if is_finite(a) and is_finite(b):
        return z3.If(a >= b, a, b)
    if a is NEG_INF:
        return b
    if b is NEG_INF:
        return a
    fa, fb, va, vb = fin_of(a), fin_of(b), val_of(a), val_of(b)
    both = z3.If(va >= vb, va, vb)
    return make(_or(fa, fb), _if(_not(fa), vb, _if(_not(fb), va, both)))


def minimum(a, b):
    if is_finite(a) and is_finite(b):
        return z3.If(a <= b, a, b)
    if a is NEG_INF or b is NEG_INF:
        return NEG_INF
    va, vb = val_of(a), val_of(b)
    return make(_and(fin_of(a), fin_of(b)), z3.If(va <= vb, va, vb))


def exp(f, a):
    """``f(a)`` for an uninterpreted ``f`` standing for exp, with ``exp(-inf) = 0``."""
    if is_finite(a):
        return f(a)
    if a is NEG_INF:
        return _zero()
    return z3.If(a.fin, f(a.val), _zero())


def where(c, a, b):
    """``a`` where the boolean ``c`` holds, else ``b`` (elements of any kind; booleans too)."""
    s = _static(c)
    if s is not None:
        return a if s else b
    if isinstance(a, (bool, z3.BoolRef)) or isinstance(b, (bool, z3.BoolRef)):
        return z3.If(c, a, b)
    if is_finite(a) and is_finite(b):
        return z3.If(c, a, b)
    return make(_ifb(c, fin_of(a), fin_of(b)), _if(c, val_of(a), val_of(b)))


def compare(op: str, a, b):
    """``a op b`` (``op`` one of ``== != < <= > >=``) on the extended reals, as a z3 boolean."""
    if op in (">", ">="):
        return compare("<" if op == ">" else "<=", b, a)
    if op == "!=":
        return _bool(_not(compare("==", a, b)))
    if is_finite(a) and is_finite(b):
        return {"==": lambda: a == b, "<": lambda: a < b, "<=": lambda: a <= b}[op]()
    fa, fb, va, vb = fin_of(a), fin_of(b), val_of(a), val_of(b)
    if op == "==":     # both -inf, or both finite and equal
        out = _or(_and(_not(fa), _not(fb)), _and(_and(fa, fb), va == vb))
    elif op == "<":    # b finite and (a is -inf or a < b)
        out = _and(fb, _or(_not(fa), va < vb))
    else:              # a is -inf, or both finite and a <= b
        out = _or(_not(fa), _and(fb, va <= vb))
    return _bool(out)


def _bool(c):
    return z3.BoolVal(c) if isinstance(c, bool) else c
