"""Every tiny zoo model, imported with import_torch and built for llvm, matches torch eager on CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from kiln import zoo
from kiln.frontend import import_torch
from kiln.frontend.torch_export import tensor_to_numpy
from kiln.verify import flatten_outputs

LLVM = tvm.target.Target({"kind": "llvm"})

# Max abs error relative to max |ref|. Measured on these models: fp32 <1e-6, fp16 ~1e-3, bf16 ~4e-3;
# the bounds leave room for different-but-legal rounding orders (fp32 accumulation on both sides).
TOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def fresh_inputs(z: zoo.ZooModel, seed: int, batch: int | None = None, seq: int | None = None) -> tuple:
    """New random inputs shaped like ``z.example_inputs`` (optionally another batch/seq)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for x in z.example_inputs:
        shape = list(x.shape)
        if batch is not None:
            shape[0] = batch
        if seq is not None and x.dim() == 2:
            shape[1] = seq
        if x.is_floating_point():
            out.append(torch.randn(shape, generator=g).to(x.dtype))
        else:
            out.append(torch.randint(0, z.model.config.vocab_size, shape, generator=g, dtype=x.dtype))
    return tuple(out)


def run_tvm(res, inputs) -> list[np.ndarray]:
    vm = relax.VirtualMachine(tvm.compile(res.mod, LLVM), tvm.cpu())
    return _call(vm, res, inputs)


def _call(vm, res, inputs):
    args = [tvm.runtime.tensor(tensor_to_numpy(x)) for x in inputs] + [tvm.runtime.tensor(p) for p in res.params]
    out = vm["main"](*args)
    return [o.numpy() for o in out]


def rel_err(got: np.ndarray, ref: torch.Tensor) -> float:
    ref = ref.float().numpy()
    return float(np.abs(got.astype(np.float32) - ref).max() / max(np.abs(ref).max(), 1e-6))


def torch_reference(name: str, dtype: str, inputs: tuple) -> tuple[list[torch.Tensor], float]:
    """Torch eager in ``dtype``; where CPU torch lacks a low-precision kernel, fp32 with a looser bound."""
    z = zoo.get(name, dtype=dtype, seed=0)
    try:
        with torch.no_grad():
            return flatten_outputs(z.model(*inputs)), TOL[dtype]
    except (RuntimeError, NotImplementedError) as e:  # e.g. "... not implemented for 'Half'"
        if "not implemented" not in str(e):
            raise
    z32 = zoo.get(name, seed=0)
    inputs32 = tuple(x.float() if x.is_floating_point() else x for x in inputs)
    with torch.no_grad():
        return flatten_outputs(z32.model(*inputs32)), 2 * TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", zoo.names())
def test_zoo_model_matches_torch(name, dtype):
    z = zoo.get(name, seed=0)  # fp32 model: import_torch does the cast, on a copy
    res = import_torch(z.model, z.example_inputs, dtype=dtype)
    assert all(p.dtype == torch.float32 for p in z.model.parameters()), "caller's model was mutated"

    inputs = tuple(x.to(TORCH_DTYPE[dtype]) if x.is_floating_point() else x
                   for x in fresh_inputs(z, seed=100 + zoo.names().index(name)))
    got = run_tvm(res, inputs)
    ref, tol = torch_reference(name, dtype, inputs)

    assert len(got) == len(ref) == len(res.signature.outputs)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.shape == tuple(r.shape), f"output{i} shape"
        assert res.signature.outputs[i].dtype == str(r.dtype).replace("torch.", "")
        assert rel_err(g, r) <= tol, f"output{i}: rel err {rel_err(g, r):.2e} > {tol:.0e} ({res.notes})"


def test_dynamic_bert_runs_two_shapes():
    z = zoo.get("bert", seed=1)  # batch 1 example: import_torch must widen it for torch.export
    res = import_torch(z.model, z.example_inputs, dynamic_shapes=z.dynamic_shapes)
    sig = res.signature
    assert sig.inputs[0].name == "input_ids" and sig.inputs[0].shape == ("batch", "seq")
    assert sig.outputs[0].shape == ("batch", "seq", 64) and sig.outputs[1].shape == ("batch", 64)
    assert sig.dims == {"batch": (1, 64), "seq": (1, 256)}
    assert dict(res.mod["main"].attrs["tir_var_upper_bound"]) == {"batch": 64, "seq": 256}

    vm = relax.VirtualMachine(tvm.compile(res.mod, LLVM), tvm.cpu())  # compiled once
    for i, (batch, seq) in enumerate([(1, 7), (3, 20)]):
        inputs = fresh_inputs(z, seed=200 + i, batch=batch, seq=seq)
        got = _call(vm, res, inputs)
        with torch.no_grad():
            ref = flatten_outputs(z.model(*inputs))
        assert got[0].shape == (batch, seq, 64)
        for g, r in zip(got, ref):
            assert rel_err(g, r) <= TOL["float32"]
