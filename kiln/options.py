"""Compile options: one frozen record of everything that changes what a compile produces."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from . import knobs as _knobs

__all__ = ["CompileOptions"]


@dataclass(frozen=True)
class CompileOptions:
    """Options of :func:`kiln.compile`.

    Attributes
    ----------
    strict : bool
        A hot op (GEMM/conv) scheduled by a generic fallback rule is an error instead of a report line.
    cuda_graph : bool
        Capture static-shape cuda builds into CUDA graphs (ignored for dynamic shapes and other targets).
    dump_ir : str or None
        Directory that receives each stage's IR.
    progress : bool
        Show a progress display for compiles longer than a second.
    """

    strict: bool = False
    cuda_graph: bool = True
    dump_ir: str | None = None
    progress: bool = True

    @staticmethod
    def from_knobs(**overrides) -> "CompileOptions":
        base = dict(strict=_knobs.get("strict"), cuda_graph=_knobs.get("cuda_graph"), progress=_knobs.get("progress"))
        base.update({k: v for k, v in overrides.items() if v is not None})
        return CompileOptions(**base)

    def to_json(self) -> dict:
        return asdict(self)
