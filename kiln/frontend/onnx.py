"""ONNX -> Relax import (TVM's ``from_onnx``), with a pre-scan for unsupported ops and kiln's Signature.

Symbolic ONNX dims (``dim_param``) become symbolic signature dims of the same name; ``shapes`` pins
input shapes. ``dtype`` rewrites the model's float32 tensors (initializers, graph inputs/outputs,
``Cast``/``Constant`` nodes) to float16/bfloat16 before import.
"""
from __future__ import annotations

import os

import numpy as np
from tvm import relax

from ..errors import KilnError
from .scan import check_onnx
from .torch_export import ImportResult, build_signature, detach_params_attr, run_legalize_bool, tensor_to_numpy

__all__ = ["import_onnx"]


def _load(model):
    import onnx

    if isinstance(model, (str, os.PathLike)):
        return onnx.load(os.fspath(model))
    if isinstance(model, onnx.ModelProto):
        return model
    raise KilnError(f"model must be a path or an onnx.ModelProto, given {type(model).__name__}")


def _cast_float_model(model, dtype: str, notes: list):
    """Copy of ``model`` with every float32 tensor/type switched to ``dtype`` (fp16 or bf16)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    target = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}[dtype]
    m = onnx.ModelProto()
    m.CopyFrom(model)

    def cast_tensor(t):
        if t.data_type != TensorProto.FLOAT:
            return False
        arr = numpy_helper.to_array(t)
        if dtype == "bfloat16":  # make_tensor rounds float values to bf16 itself
            new = onnx.helper.make_tensor(t.name, target, arr.shape, arr.astype(np.float32).ravel().tolist())
        else:
            new = numpy_helper.from_array(arr.astype(np.float16), t.name)
        t.CopyFrom(new)
        return True

    def walk(graph):
        n = sum(cast_tensor(t) for t in graph.initializer)
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
                vi.type.tensor_type.elem_type = target
        for node in graph.node:
            for a in node.attribute:
                if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = target
                elif a.type == onnx.AttributeProto.TENSOR:
                    n += cast_tensor(a.t)
                elif a.type == onnx.AttributeProto.GRAPH:
                    n += walk(a.g)
        return n

    count = walk(m.graph)
    notes.append(f"ONNX float32 tensors/types rewritten to {dtype} ({count} tensors)")
    return m


def _as_tuple_return(func: relax.Function) -> relax.Function:
    # The ONNX importer returns a bare tensor for single-output graphs; kiln's ``main`` always returns
    # a tuple (as the torch frontend does), so callers index outputs the same way for every model.
    if isinstance(func.ret_ty, relax.TupleType):
        return func
    body = func.body
    new_body = relax.SeqExpr(body.blocks, relax.Tuple([body.body]))
    return relax.Function(func.params, new_body, relax.TupleType([func.ret_ty]), func.is_pure, func.attrs)


def import_onnx(model, shapes: dict | None = None, dtype: str | None = None) -> ImportResult:
    """Import an ONNX model into Relax with weights as parameters.

    Parameters
    ----------
    model : str, os.PathLike or onnx.ModelProto
        The model file or proto.
    shapes : dict[str, tuple], optional
        Input name -> shape, overriding the model's input shapes (ints or dim names).
    dtype : {"float32", "float16", "bfloat16"}, optional
        Convert the model's float32 weights and float inputs/outputs first; None keeps the model's dtypes.

    Returns
    -------
    ImportResult
        ``signature`` uses the ONNX ``dim_param`` names for symbolic dims (range ``[1, None]``).

    Raises
    ------
    UnsupportedOpsError
        Listing every ONNX op type (with counts) the importer cannot convert.
    """
    from tvm.relax.frontend.onnx import from_onnx

    notes: list[str] = []
    proto = _load(model)
    check_onnx(proto)
    if dtype not in (None, "float32"):
        if dtype not in ("float16", "bfloat16"):
            raise KilnError(f"dtype must be float32, float16 or bfloat16, given {dtype!r}")
        proto = _cast_float_model(proto, dtype, notes)

    # dtype_dict=None: take every input dtype from the (possibly converted) model, not "float32".
    mod = from_onnx(proto, shape_dict=dict(shapes) if shapes else None, dtype_dict={}, keep_params_in_input=True)
    func = mod["main"]
    params = [tensor_to_numpy(p) for p in (func.attrs["params"] if "params" in func.attrs else [])]
    mod["main"] = _as_tuple_return(detach_params_attr(func))
    num_input = int(mod["main"].attrs["num_input"])
    if len(mod["main"].params) != num_input + len(params):
        raise KilnError(f"ONNX import: {len(mod['main'].params)} params for {num_input} inputs and "
                        f"{len(params)} weights")
    mod = run_legalize_bool(mod, notes)
    return ImportResult(mod, params, build_signature(mod["main"], num_input), notes)
