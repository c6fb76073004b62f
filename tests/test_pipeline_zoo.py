"""The whole kiln pipeline (kiln.compile, every stage) on every tiny zoo model, per dtype, against torch fp32."""
import pytest
import torch

import kiln
from kiln import zoo
from kiln.verify import TOLERANCES, cast_inputs, compare, torch_reference


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", zoo.names())
def test_kiln_compile_zoo_llvm(name, dtype):
    zm = zoo.get(name, size="tiny", batch=2, seed=3)
    art = kiln.compile(zm.model, zm.example_inputs, target="llvm", dtype=dtype)
    assert list(art.timings) == ["import", "cleanup", "fusion", "schedule", "lower", "codegen"]
    out = art(*cast_inputs(zm.example_inputs, getattr(torch, dtype)))
    outs = out if isinstance(out, tuple) else (out,)
    assert [str(o.dtype) for o in outs] == [f"torch.{s.dtype}" for s in art.signature.outputs]
    c = compare(outs, torch_reference(zm.model, zm.example_inputs, dtype=torch.float32))
    assert c["rel_err"] <= TOLERANCES[dtype], c


def test_cuda_build_of_zoo_model_schedules_every_kernel():
    """Codegen for sm_90a on the CPU: every kernel scheduled, GEMMs by the matmul rule, cubin in the artifact."""
    zm = zoo.get("gpt2", size="tiny", batch=2)
    art = kiln.compile(zm.model, zm.example_inputs, target="cuda", dtype="float16")
    rep = art.schedule_report
    assert rep and all(r["rule"] for r in rep)
    # MIN_MACS = 0: the tiny GEMMs are kiln's (sm_90a GEMM, GEMV for M <= 16) where they fit, dlight's otherwise
    hot_rules = ("dlight.Matmul", "dlight.GEMV", "kiln.gemm_sm90", "kiln.gemv_sm90")
    assert all(r["rule"] in hot_rules and not r["fallback"] for r in rep if r["hot"]), rep
    assert art.uses_cuda_graph


def test_bounded_dynamic_build_captures_cuda_graphs_by_shape(tmp_path):
    """Dynamic batch and sequence with maxima: memory planned at the bounds and the layers captured as a CUDA graph
    keyed by (batch, seq) (RewriteCUDAGraph's capture_symbolic_vars); an unbounded dim keeps launches one by one."""
    zm = zoo.get("bert", size="tiny", batch=2)
    art = kiln.compile(zm.model, zm.example_inputs, target="cuda", dtype="float16", dynamic_shapes=zm.dynamic_shapes,
                       dump_ir=str(tmp_path / "ir"))
    assert art.uses_cuda_graph
    lowered = (tmp_path / "ir" / "05_lower.py").read_text()
    assert lowered.count("vm.builtin.cuda_graph.run_or_capture") >= 1
    assert "relax.rewrite_cuda_graph.capture_symbolic_vars" in lowered
    # the batch without a maximum (the sequence keeps its own: the position table bounds it)
    unbounded = {name: {k: (torch.export.Dim("batch", min=1) if d.__name__ == "batch" else d) for k, d in spec.items()}
                 for name, spec in zm.dynamic_shapes.items()}
    art2 = kiln.compile(zm.model, zm.example_inputs, target="cuda", dtype="float16", dynamic_shapes=unbounded,
                        dump_ir=str(tmp_path / "ir2"))
    assert not art2.uses_cuda_graph
    assert "run_or_capture" not in (tmp_path / "ir2" / "05_lower.py").read_text()
