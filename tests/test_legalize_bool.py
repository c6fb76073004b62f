"""LegalizeBoolArith: fires on bool arithmetic, keeps results exact, leaves everything else alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from kiln import zoo
from kiln.relax_passes.legalize_bool import LegalizeBoolArith, check, match

LLVM = tvm.target.Target({"kind": "llvm"})


# ---------------------------------------------------------------------------------------------
# Golden structural tests
# ---------------------------------------------------------------------------------------------
@I.ir_module
class BoolBefore:
    @R.function
    def main(x: R.Tensor((4, 8), "bool"), y: R.Tensor((4, 8), "bool")):
        with R.dataflow():
            z = R.equal(x, y)
            c = R.cumsum(x, axis=1)
            d = R.cumsum(y, axis=1, dtype="int64")
            m = R.maximum(x, y)
            gv = (z, c, d, m)
            R.output(gv)
        return gv


@I.ir_module
class BoolExpected:
    @R.function
    def main(x: R.Tensor((4, 8), "bool"), y: R.Tensor((4, 8), "bool")):
        with R.dataflow():
            x8 = R.astype(x, "int8")
            y8 = R.astype(y, "int8")
            z = R.equal(x8, y8)
            x32 = R.astype(x, "int32")
            c32 = R.cumsum(x32, axis=1, dtype="int32")
            c = R.astype(c32, "bool")
            y64 = R.astype(y, "int64")
            d = R.cumsum(y64, axis=1, dtype="int64")
            xm = R.astype(x, "int8")
            ym = R.astype(y, "int8")
            m8 = R.maximum(xm, ym)
            m = R.astype(m8, "bool")
            gv = (z, c, d, m)
            R.output(gv)
        return gv


@I.ir_module
class NotBool:
    # Same ops on int/float operands, plus bool ops that already lower fine: must stay untouched.
    @R.function
    def main(a: R.Tensor((4, 8), "int32"), f: R.Tensor((4, 8), "float32"), x: R.Tensor((4, 8), "bool")):
        with R.dataflow():
            c = R.cumsum(a, axis=1)
            e = R.equal(f, f)
            n = R.logical_not(x)
            w = R.where(x, f, f)
            gv = (c, e, n, w)
            R.output(gv)
        return gv


def test_rewrites_bool_ops_to_golden():
    p = LegalizeBoolArith()
    after = p(BoolBefore)
    tvm.ir.assert_structural_equal(after, BoolExpected)
    assert dict(p.stats) == {"equal": 1, "cumsum": 2, "maximum": 1}
    assert p.num_rewritten == 4


def test_leaves_non_bool_ops_untouched():
    p = LegalizeBoolArith()
    after = p(NotBool)
    tvm.ir.assert_structural_equal(after, NotBool)
    assert p.num_rewritten == 0


def test_check_refuses_mixed_or_wrong_op():
    x = relax.Var("x", relax.TensorType((4,), "bool"))
    i = relax.Var("i", relax.TensorType((4,), "int8"))
    # Built without normalisation: Relax would reject the mixed dtypes, the check must too.
    mixed = relax.Call(tvm.ir.Op.get("relax.equal"), [x, i])
    assert match(mixed) == "compare"
    ok, why = check(mixed, "compare")
    assert not ok and "two bool" in why
    eq = relax.op.equal(x, x)
    assert check(eq, "arith")[0] is False  # op/kind mismatch is refused
    assert match(relax.op.equal(i, i)) is None  # no bool operand: not even a candidate


# ---------------------------------------------------------------------------------------------
# Numerics: the rewritten program computes what the bool program means.
# ---------------------------------------------------------------------------------------------
_BINARY = {
    "equal": (relax.op.equal, np.equal),
    "not_equal": (relax.op.not_equal, np.not_equal),
    "less": (relax.op.less, np.less),
    "greater_equal": (relax.op.greater_equal, np.greater_equal),
    "add": (relax.op.add, np.logical_or),
    "subtract": (relax.op.subtract, np.logical_xor),
    "multiply": (relax.op.multiply, np.logical_and),
    "maximum": (relax.op.maximum, np.logical_or),
    "minimum": (relax.op.minimum, np.logical_and),
}
_UNARY = {
    "cumsum": (lambda x: relax.op.cumsum(x, axis=1), lambda a: np.cumsum(a, axis=1) > 0),
    "cumsum_int64": (lambda x: relax.op.cumsum(x, axis=1, dtype="int64"), lambda a: np.cumsum(a, axis=1)),
    "cumprod": (lambda x: relax.op.cumprod(x, axis=1), lambda a: np.cumprod(a, axis=1) > 0),
    "max": (lambda x: relax.op.max(x, axis=1), lambda a: a.max(axis=1)),
    "min": (lambda x: relax.op.min(x, axis=1, keepdims=True), lambda a: a.min(axis=1, keepdims=True)),
    "argmax": (lambda x: relax.op.argmax(x, axis=1), lambda a: a.argmax(axis=1)),
}


def _build(fn, nargs):
    bb = relax.BlockBuilder()
    xs = [relax.Var(f"x{i}", relax.TensorType((6, 10), "bool")) for i in range(nargs)]
    with bb.function("main", xs):
        with bb.dataflow():
            out = bb.emit_output(fn(*xs))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, arrays):
    vm = relax.VirtualMachine(tvm.compile(mod, LLVM), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


@pytest.mark.parametrize("name", sorted(_BINARY) + sorted(_UNARY))
def test_rewritten_bool_op_is_exact(name):
    fn, ref = _BINARY[name] if name in _BINARY else _UNARY[name]
    nargs = 2 if name in _BINARY else 1
    mod = _build(fn, nargs)
    p = LegalizeBoolArith()
    new = p(mod)
    assert p.num_rewritten == 1
    assert new["main"].ret_ty.dtype == mod["main"].ret_ty.dtype  # every binding keeps its type
    rng = np.random.default_rng(7)
    arrays = [rng.random((6, 10)) > 0.5 for _ in range(nargs)]
    np.testing.assert_array_equal(_run(new, arrays), ref(*arrays))


def test_stock_bool_equal_crashes_llvm_codegen():
    # The reason the pass exists; if TVM ever lowers bool compares itself, this test tells us.
    with pytest.raises(Exception, match="FCmp|kDLFloat"):
        tvm.compile(_build(relax.op.equal, 2), LLVM)


# ---------------------------------------------------------------------------------------------
# On real transformers-5 causal-mask graphs (no attention_mask given).
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_fixes_stock_import_of_causal_lm(name):
    from tvm.relax.frontend.torch import from_exported_program

    z = zoo.get(name, seed=3)
    ep = torch.export.export(z.model, z.example_inputs)
    mod = from_exported_program(ep, keep_params_as_input=True)  # stock importer, no kiln overrides
    p = LegalizeBoolArith()
    fixed = p(mod)
    # transformers-5's packed-sequence detection: (diff != 1).cumsum() and an eq on its gathers.
    assert p.stats["cumsum"] >= 1 and p.stats["equal"] >= 1
    vm = relax.VirtualMachine(tvm.compile(fixed, LLVM), tvm.cpu())
    ids = torch.randint(0, z.model.config.vocab_size, tuple(z.example_inputs[0].shape),
                        generator=torch.Generator().manual_seed(11))
    params = list(mod["main"].attrs["params"])
    out = vm["main"](tvm.runtime.tensor(ids.numpy()), *params)[0].numpy()
    with torch.no_grad():
        ref = z.model(ids).logits.numpy()
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_fires_inside_import_torch(name):
    from kiln.frontend import import_torch

    z = zoo.get(name)
    res = import_torch(z.model, z.example_inputs)
    assert any(n.startswith("LegalizeBoolArith rewrote") for n in res.notes), res.notes
    left = []

    def visit(e):
        if match(e) is not None:
            left.append(e.op.name)

    relax.analysis.post_order_visit(res.mod["main"], visit)
    assert left == []  # no arithmetic call on a bool operand survives
