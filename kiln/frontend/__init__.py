"""Frontends: torch.export and ONNX -> Relax ``IRModule`` + weights + :class:`~kiln.signature.Signature`.

Both importers pre-scan for unsupported operators (one error listing all of them), apply kiln's
fixes for known TVM 0.27 importer bugs, and report those fixes in ``ImportResult.notes``.
"""
from .onnx import import_onnx
from .torch_export import ImportResult, import_torch

__all__ = ["ImportResult", "import_torch", "import_onnx"]
