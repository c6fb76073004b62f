"""Input/output signature of a compiled model: names, shapes with symbolic dims, dtypes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

from .errors import InputMismatchError

__all__ = ["TensorSpec", "Signature"]

Dim = Union[int, str]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor: ``shape`` holds ints for static dims and names (``"batch"``) for symbolic ones."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_json(d: dict) -> "TensorSpec":
        return TensorSpec(d["name"], tuple(d["shape"]), d["dtype"])


@dataclass(frozen=True)
class Signature:
    """Inputs, outputs and the ``[min, max]`` range of every symbolic dim."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict = field(default_factory=dict)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for t in self.inputs + self.outputs for d in t.shape)

    @property
    def is_bounded(self) -> bool:
        """Static, or every symbolic dim has a maximum (memory can then be planned at the bounds, so CUDA graphs
        can be captured: one per distinct value of the dims)."""
        return self.is_static or all(len(v) > 1 and v[1] is not None for v in self.dims.values())

    def to_json(self) -> dict:
        return {"inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs],
                "dims": {k: list(v) for k, v in self.dims.items()}}

    @staticmethod
    def from_json(d: dict) -> "Signature":
        return Signature(tuple(map(TensorSpec.from_json, d["inputs"])), tuple(map(TensorSpec.from_json, d["outputs"])),
                         {k: tuple(v) for k, v in d.get("dims", {}).items()})

    def bind(self, shapes: Sequence[Sequence[int]], dtypes: Sequence[str]) -> dict[str, int]:
        """Check given input shapes/dtypes against the signature; return the symbolic dim values.

        Raises
        ------
        InputMismatchError
            Naming the input and the expected vs given count, dtype, rank, dim or range.
        """
        if len(shapes) != len(self.inputs):
            names = [t.name for t in self.inputs]
            raise InputMismatchError(f"expected {len(self.inputs)} input(s) {names}, given {len(shapes)}")
        env: dict[str, int] = {}
        for spec, shape, dtype in zip(self.inputs, shapes, dtypes):
            shape = tuple(int(s) for s in shape)
            if dtype != spec.dtype:
                raise InputMismatchError(f"input {spec.name!r}: expected dtype {spec.dtype}, given {dtype}")
            if len(shape) != len(spec.shape):
                raise InputMismatchError(f"input {spec.name!r}: expected shape {_fmt(spec.shape)}, given {shape}")
            for i, (want, got) in enumerate(zip(spec.shape, shape)):
                if isinstance(want, int):
                    if want != got:
                        raise InputMismatchError(
                            f"input {spec.name!r}: expected shape {_fmt(spec.shape)}, given {shape} (dim {i})")
                    continue
                if env.setdefault(want, got) != got:
                    raise InputMismatchError(
                        f"input {spec.name!r}: dim {i} is {want!r}={env[want]} elsewhere, given {got}")
                lo, hi = self.dims.get(want, (0, None))
                if got < lo or (hi is not None and got > hi):
                    raise InputMismatchError(
                        f"input {spec.name!r}: dim {i} ({want!r}) must be in [{lo}, {hi}], given {got}")
        return env

    def output_shape(self, i: int, env: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else env[d] for d in self.outputs[i].shape)


def _fmt(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
