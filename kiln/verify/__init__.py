"""Numerical checks of compiled modules against torch: references, errors, per-dtype tolerances."""
from .reference import TOLERANCES, cast_inputs, compare, flatten_outputs, torch_reference

__all__ = ["TOLERANCES", "cast_inputs", "compare", "flatten_outputs", "torch_reference"]
