"""LegalizeBoolArith: compute arithmetic, comparisons, scans and min/max reductions of bool tensors in ints.

Why: transformers-5 builds causal masks (GPT-2, Llama called without an ``attention_mask``) with
``cumsum``/``eq``/``diff`` on **bool** tensors. Relax type-checks these (result dtype = bool), but
TVM 0.27's TIR/LLVM codegen cannot lower them: a bool ``equal`` becomes
``fcmp oeq i1`` ("Invalid operand types for FCmp instruction"), bool ``add``/``cumsum``/``less``
hit ``Check failed: t.MatchesCode(kDLFloat)``, bool ``max``/``argmax`` have no init value.

What: every such call on bool operands is rewritten to the same op on int operands (int8 for
elementwise ops and min/max, int32 - or the requested int dtype - for scans), followed by a cast
back to bool where the original result was bool. Casting int -> bool is ``!= 0``, so the rewritten
program computes exactly what a bool program means (add = or, multiply = and, subtract = xor,
maximum = or, minimum = and, cumsum = "any so far"). Every binding keeps its original type.

Bool ops that already lower fine (``logical_*``, ``bitwise_*``, ``where``, ``sum``, shape ops, ...)
are left alone, as is every call whose operands are not bool.

The file keeps the three concerns apart: ``match`` (is this call a candidate?), ``check`` (are op,
dtypes and attributes what the rewrite assumes?) and ``rewrite`` (build the int-typed replacement).
"""
from __future__ import annotations

from collections import Counter

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

__all__ = ["LegalizeBoolArith", "match", "check", "rewrite"]

# ---------------------------------------------------------------------------------------------
# Pattern: op tables. Kind decides how the call is rewritten.
# ---------------------------------------------------------------------------------------------
_COMPARE = ("relax.equal", "relax.not_equal", "relax.less", "relax.less_equal", "relax.greater",
            "relax.greater_equal")
_ARITH = ("relax.add", "relax.subtract", "relax.multiply", "relax.maximum", "relax.minimum")
_SCAN = ("relax.cumsum", "relax.cumprod")
_REDUCE = ("relax.max", "relax.min")
_ARG_REDUCE = ("relax.argmax", "relax.argmin")

_KINDS = {**{o: "compare" for o in _COMPARE}, **{o: "arith" for o in _ARITH}, **{o: "scan" for o in _SCAN},
          **{o: "reduce" for o in _REDUCE}, **{o: "arg_reduce" for o in _ARG_REDUCE}}

#: int dtype the operands are cast to (scans use their output dtype when it is an int type).
ELEMENT_INT = "int8"
SCAN_INT = "int32"


def _dtype(expr) -> str | None:
    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def _is_int(dtype: str | None) -> bool:
    return dtype is not None and dtype.startswith(("int", "uint"))


def match(call: relax.Call) -> str | None:
    """Pattern: return the rewrite kind when ``call`` is a table op with at least one bool tensor operand.

    Parameters
    ----------
    call : relax.Call

    Returns
    -------
    str or None
        ``"compare"``, ``"arith"``, ``"scan"``, ``"reduce"``, ``"arg_reduce"``, or None.
    """
    if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op):
        return None
    kind = _KINDS.get(call.op.name)
    if kind is None or not any(_dtype(a) == "bool" for a in call.args):
        return None
    return kind


def check(call: relax.Call, kind: str) -> tuple[bool, str]:
    """Validate op, operand dtypes and attributes before rewriting.

    Parameters
    ----------
    call : relax.Call
        A call ``match`` accepted.
    kind : str
        What ``match`` returned.

    Returns
    -------
    (bool, str)
        Whether the rewrite is valid, and why not when it is not.
    """
    if _KINDS.get(getattr(call.op, "name", None)) != kind:
        return False, f"op {call.op} is not a {kind!r} op"
    out = _dtype(call)
    if kind in ("compare", "arith"):
        # Relax binary ops require equal operand dtypes, so both must be bool (no int/bool mixes).
        if len(call.args) != 2 or [_dtype(a) for a in call.args] != ["bool", "bool"]:
            return False, "binary op needs two bool tensor operands"
        if out != "bool":
            return False, f"expected a bool result, got {out}"
        return True, ""
    if len(call.args) != 1 or _dtype(call.args[0]) != "bool":
        return False, f"{kind} needs one bool tensor operand"
    if kind == "scan" and not (out == "bool" or _is_int(out)):
        return False, f"scan of bool into {out} is not an integer scan"
    if kind == "reduce" and out != "bool":
        return False, f"expected a bool result, got {out}"
    if kind == "arg_reduce" and not _is_int(out):
        return False, f"expected an integer index result, got {out}"
    return True, ""


def rewrite(call: relax.Call, kind: str, emit) -> relax.Expr:
    """Build the int-typed replacement of a checked call; its type equals ``call``'s type.

    Parameters
    ----------
    call : relax.Call
        A call that passed ``check``.
    kind : str
        What ``match`` returned.
    emit : callable
        ``expr -> relax.Var``; binds an intermediate expression (the mutator's ``builder_.emit``).

    Returns
    -------
    relax.Expr
        The expression to bind in place of ``call``.
    """
    op = relax.op
    out = _dtype(call)
    attrs = call.attrs
    if kind == "compare":
        a, b = (emit(op.astype(x, ELEMENT_INT)) for x in call.args)
        return relax.Call(call.op, [a, b], attrs)
    if kind == "arith":
        a, b = (emit(op.astype(x, ELEMENT_INT)) for x in call.args)
        return op.astype(emit(relax.Call(call.op, [a, b], attrs)), "bool")
    x = call.args[0]
    if kind == "scan":
        acc = out if _is_int(out) else SCAN_INT  # int32: a bool count cannot overflow it in practice
        fn = op.cumsum if call.op.name == "relax.cumsum" else op.cumprod
        res = fn(emit(op.astype(x, acc)), attrs.axis, acc, bool(attrs.exclusive))
        return op.astype(emit(res), "bool") if out == "bool" else res
    if kind == "reduce":
        fn = op.max if call.op.name == "relax.max" else op.min
        res = emit(fn(emit(op.astype(x, ELEMENT_INT)), attrs.axis, bool(attrs.keepdims)))
        return op.astype(res, "bool")
    # arg_reduce: the index result is already an int; only the operand changes.
    fn = op.argmax if call.op.name == "relax.argmax" else op.argmin
    return fn(emit(op.astype(x, ELEMENT_INT)), attrs.axis, bool(attrs.keepdims))


# ---------------------------------------------------------------------------------------------
# Driver: mutator + module pass.
# ---------------------------------------------------------------------------------------------
@mutator
class _BoolArithMutator(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.stats: Counter = Counter()
        self.refused: Counter = Counter()

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        kind = match(call)
        if kind is None:
            return call
        ok, why = check(call, kind)
        if not ok:
            self.refused[f"{call.op.name}: {why}"] += 1
            return call
        new = rewrite(call, kind, self.builder_.emit)
        self.stats[call.op.name.removeprefix("relax.")] += 1
        return new


@tvm.transform.module_pass(opt_level=0, name="LegalizeBoolArith")
class LegalizeBoolArith:
    """Module pass: compute bool arithmetic/comparisons/scans/min-max in int dtypes (see module docstring).

    After the pass runs, ``stats`` (a Counter: op name -> rewrites) and ``refused`` (reason -> count)
    describe what it did; ``num_rewritten`` is the total.

    Examples
    --------
    >>> p = LegalizeBoolArith()
    >>> mod = p(mod)
    >>> p.num_rewritten
    3
    """

    def __init__(self):
        self.stats: Counter = Counter()
        self.refused: Counter = Counter()

    @property
    def num_rewritten(self) -> int:
        return sum(self.stats.values())

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        mut = _BoolArithMutator(mod)
        for gvar, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            new = mut.visit_expr(func)
            mut.builder_.update_func(gvar, new)
        self.stats.update(mut.stats)
        self.refused.update(mut.refused)
        return mut.builder_.get()
