"""Checks of compiled modules and rewrites: numerics against torch (references, errors, per-dtype tolerances)
and symbolic equivalence of Relax rewrites with z3, imported on use: :mod:`kiln.verify.symbolic` (the evaluator,
with :mod:`.symbolic_ops` and the ``-inf`` arithmetic of :mod:`.xreal`; GEMM epilogue and sibling-GEMM rules),
:mod:`kiln.verify.attention_proof` (the attention rule: online softmax, with :mod:`.attention_rule` and the case
split of :mod:`.casesplit`), :mod:`kiln.verify.conv_proof` (conv -> GEMM, batch-norm folding)."""
from .reference import TOLERANCES, cast_inputs, compare, flatten_outputs, torch_reference

__all__ = ["TOLERANCES", "cast_inputs", "compare", "flatten_outputs", "torch_reference"]
