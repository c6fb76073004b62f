"""Checks of compiled modules and rewrites: numerics against torch (references, errors, per-dtype tolerances)
and symbolic equivalence of Relax rewrites with z3 (:mod:`kiln.verify.symbolic`, imported on use)."""
from .reference import TOLERANCES, cast_inputs, compare, flatten_outputs, torch_reference

__all__ = ["TOLERANCES", "cast_inputs", "compare", "flatten_outputs", "torch_reference"]
