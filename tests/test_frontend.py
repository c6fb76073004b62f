"""Frontends: unsupported-op reports, ONNX import, output flattening, signatures, importer-bug fixes."""
from __future__ import annotations

import io

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
import tvm
from onnx import TensorProto, helper
from torch.export import Dim
from transformers.modeling_outputs import BaseModelOutputWithPooling
from tvm import relax

from kiln import zoo
from kiln.errors import KilnError, UnsupportedOpsError
from kiln.frontend import ImportResult, import_onnx, import_torch
from kiln.frontend.torch_export import tensor_to_numpy

LLVM = tvm.target.Target({"kind": "llvm"})


def _vm(res: ImportResult):
    return relax.VirtualMachine(tvm.compile(res.mod, LLVM), tvm.cpu())


def _call(vm, res: ImportResult, *inputs):
    args = [tvm.runtime.tensor(tensor_to_numpy(x)) for x in inputs] + [tvm.runtime.tensor(p) for p in res.params]
    return [o.numpy() for o in vm["main"](*args)]


def _rel(got, ref) -> float:
    ref = ref.float().numpy() if isinstance(ref, torch.Tensor) else ref
    return float(np.abs(got.astype(np.float32) - ref).max() / max(np.abs(ref).max(), 1e-6))


# ---------------------------------------------------------------------------------------------
# Unsupported operators: one error, all ops, with counts.
# ---------------------------------------------------------------------------------------------
class TwoUnsupported(torch.nn.Module):
    """erfinv (x2) and cummax (x1): real aten ops TVM 0.27's importer has no converter for."""

    def forward(self, x):
        a = torch.erfinv(x * 0.5)
        b = torch.cummax(x, dim=-1).values
        return torch.erfinv(a * 0.1) + b


def test_torch_unsupported_ops_listed_together():
    with pytest.raises(UnsupportedOpsError) as info:
        import_torch(TwoUnsupported(), (torch.rand(4, 8),))
    err = info.value
    assert err.frontend == "torch"
    assert err.ops == {"aten.cummax.default": 1, "aten.erfinv.default": 2}
    assert "aten.erfinv.default (x2)" in str(err) and "aten.cummax.default (x1)" in str(err)


def _onnx_with_unsupported() -> onnx.ModelProto:
    # Celu (x2) and Det (x1) have no converter in the Relax ONNX frontend; Relu has one.
    nodes = [helper.make_node("Celu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Celu", ["b"], ["c"]), helper.make_node("Det", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_onnx_unsupported_ops_listed_together():
    with pytest.raises(UnsupportedOpsError) as info:
        import_onnx(_onnx_with_unsupported())
    assert info.value.frontend == "onnx"
    assert info.value.ops == {"Celu": 2, "Det": 1}


# ---------------------------------------------------------------------------------------------
# ONNX import
# ---------------------------------------------------------------------------------------------
class ConvLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def conv_linear_onnx():
    torch.manual_seed(0)
    model = ConvLinear().eval()
    buf = io.BytesIO()
    torch.onnx.export(model, (torch.randn(2, 3, 8, 8),), buf, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return model, onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("dtype,tol", [(None, 1e-5), ("float16", 2e-2), ("bfloat16", 5e-2)])
def test_onnx_conv_linear_matches_torch(conv_linear_onnx, dtype, tol):
    model, proto = conv_linear_onnx
    res = import_onnx(proto, dtype=dtype)
    want = dtype or "float32"
    assert res.signature.inputs[0].shape == ("batch", 3, 8, 8) and res.signature.inputs[0].dtype == want
    assert res.signature.outputs[0].shape == ("batch", 10)
    assert "batch" in res.signature.dims
    assert len(res.params) == 4 and all(str(p.dtype) == want for p in res.params)
    vm = _vm(res)
    np_dt = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[want]
    for i, batch in enumerate((1, 5)):  # one compile, two batch sizes (symbolic ONNX dim)
        x = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(i))
        (got,) = _call(vm, res, x.numpy().astype(np_dt))
        with torch.no_grad():
            ref = model(x)
        assert got.shape == (batch, 10)
        assert _rel(got, ref) <= tol


def test_onnx_static_shapes_override(conv_linear_onnx):
    _, proto = conv_linear_onnx
    res = import_onnx(proto, shapes={"x": (4, 3, 8, 8)})
    assert res.signature.inputs[0].shape == (4, 3, 8, 8) and res.signature.dims == {}


# ---------------------------------------------------------------------------------------------
# torch: outputs, signature, params
# ---------------------------------------------------------------------------------------------
class Outputs(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.lin = torch.nn.Linear(6, 6)

    def forward(self, x):
        a, b, c = self.lin(x), x * 2, x.sum(-1)
        if self.kind == "tensor":
            return a
        if self.kind == "tuple":
            return a, None, (b, c)
        if self.kind == "dict":
            return {"a": a, "none": None, "b": b}
        return BaseModelOutputWithPooling(last_hidden_state=a, pooler_output=c)


@pytest.mark.parametrize("kind,expected", [("tensor", ["a"]), ("tuple", ["a", "b", "c"]), ("dict", ["a", "b"]),
                                           ("model_output", ["a", "c"])])
def test_outputs_are_flattened_in_order(kind, expected):
    torch.manual_seed(1)
    model = Outputs(kind).eval()
    x = torch.randn(3, 6)
    res = import_torch(model, (x,))
    assert [o.name for o in res.signature.outputs] == [f"output{i}" for i in range(len(expected))]
    with torch.no_grad():
        a, b, c = model.lin(x), x * 2, x.sum(-1)
    ref = {"a": a, "b": b, "c": c}
    got = _call(_vm(res), res, x)
    assert len(got) == len(expected)
    for g, name in zip(got, expected):
        assert _rel(g, ref[name]) <= 1e-5


def test_signature_params_and_module_layout():
    z = zoo.get("bert", seed=2)
    res = import_torch(z.model, z.example_inputs, dtype="float16")
    main = res.mod["main"]
    assert int(main.attrs["num_input"]) == 1
    assert "params" not in main.attrs  # weights live in res.params only
    assert len(main.params) == 1 + len(res.params)
    for var, arr in zip(list(main.params)[1:], res.params):
        assert tuple(int(d) for d in var.ty.shape.values) == arr.shape and str(var.ty.dtype) == str(arr.dtype)
    assert res.signature.inputs[0].name == "input_ids" and res.signature.inputs[0].dtype == "int64"
    assert [o.dtype for o in res.signature.outputs] == ["float16", "float16"]
    assert res.signature.is_static
    assert {p.dtype for p in res.params} == {np.dtype("float16")}


def test_bf16_params_are_ml_dtypes_arrays():
    z = zoo.get("llama", seed=0)
    res = import_torch(z.model, z.example_inputs, dtype=torch.bfloat16)
    assert {p.dtype for p in res.params} == {np.dtype(ml_dtypes.bfloat16)}
    emb = dict(z.model.named_parameters())["model.embed_tokens.weight"]
    np.testing.assert_array_equal(res.params[0].astype(np.float32), emb.detach().to(torch.bfloat16).float().numpy())


def test_dynamic_shapes_tuple_form_and_unit_example():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 2)).eval()
    rows = Dim("rows", min=1, max=32)
    res = import_torch(model, (torch.randn(1, 5),), dynamic_shapes=({0: rows},))
    assert res.signature.inputs[0].shape == ("rows", 5) and res.signature.outputs[0].shape == ("rows", 2)
    assert res.signature.dims == {"rows": (1, 32)}
    assert any("widened 1->2" in n for n in res.notes)
    vm = _vm(res)
    for n in (1, 17):
        x = torch.randn(n, 5, generator=torch.Generator().manual_seed(n))
        (got,) = _call(vm, res, x)
        with torch.no_grad():
            assert _rel(got, model(x)) <= 1e-5


def test_training_model_is_not_mutated():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).train()
    res = import_torch(model, (torch.randn(2, 4),), dtype="float16")
    assert model.training and model[0].weight.dtype == torch.float32
    assert any("eval mode" in n for n in res.notes)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    (got,) = _call(_vm(res), res, x.half())
    with torch.no_grad():
        ref = model.eval()[0](x)  # dropout is the identity in eval mode
    assert _rel(got, ref) <= 2e-2


def test_bad_dtype_is_a_kiln_error():
    with pytest.raises(KilnError, match="dtype"):
        import_torch(torch.nn.Linear(2, 2), (torch.randn(1, 2),), dtype="float8")


# ---------------------------------------------------------------------------------------------
# Stock-importer bugs kiln fixes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_addmm_low_precision_fixed(dtype):
    from tvm.relax.frontend.torch import from_exported_program

    torch.manual_seed(4)
    model = torch.nn.Linear(16, 8).eval().to(dtype)
    x = torch.randn(3, 16).to(dtype)
    # Stock: matmul(out_dtype=float32) + low-precision bias -> type error.
    with pytest.raises(Exception, match="same datatype"):
        from_exported_program(torch.export.export(model, (x,)), keep_params_as_input=True)
    res = import_torch(model, (x,))
    name = str(dtype).replace("torch.", "")
    assert f"addmm {name} override used 1x" in res.notes
    assert res.signature.outputs[0].dtype == name
    (got,) = _call(_vm(res), res, x)
    with torch.no_grad():
        assert _rel(got, model(x)) <= (2e-2 if dtype == torch.float16 else 5e-2)


class PackedCount(torch.nn.Module):
    """transformers-5's packed-sequence id: (diff != 1).cumsum() is an int64 count in torch."""

    def forward(self, position_ids):
        first = position_ids[:, :1] - 1
        diff = torch.diff(position_ids, prepend=first, dim=-1)
        return (diff != 1).cumsum(-1)


def test_bool_cumsum_promotes_like_torch():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])  # three packed sequences
    res = import_torch(PackedCount(), (pos,))
    assert res.signature.outputs[0].dtype == "int64"
    (got,) = _call(_vm(res), res, pos)
    np.testing.assert_array_equal(got, PackedCount()(pos).numpy())  # [[0 0 0 1 1 2 2 2]]
