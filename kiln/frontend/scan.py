"""Pre-scan a model for operators the importer cannot convert, before importing anything.

The stock importers stop at the first unsupported operator (torch: an ``AssertionError`` listing
names; ONNX: ``OpNotImplemented``), so a user fixes one op, re-runs, and meets the next. Scanning
the whole graph up front lets kiln raise ONE :class:`~kiln.errors.UnsupportedOpsError` with every
unsupported operator and how often it occurs.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

from ..errors import UnsupportedOpsError

__all__ = ["scan_torch", "scan_onnx", "check_torch", "check_onnx"]


def _torch_supported(extra: Iterable[str]) -> set[str]:
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    # The importer looks converters up by ``node.target.__name__`` (e.g. "addmm.default").
    return set(ExportedProgramImporter().convert_map) | set(extra)


def _display_name(target) -> str:
    # OpOverloads print as "aten.erfinv.default", which is what a user can grep for; builtins and
    # higher-order ops only have __name__.
    text = str(target)
    return text if text.startswith(("aten.", "prims.")) or "::" in text else getattr(target, "__name__", text)


def scan_torch(exported_program, extra_supported: Iterable[str] = ()) -> dict[str, int]:
    """Count the ``call_function`` targets of an (already decomposed) ExportedProgram that no converter handles.

    Parameters
    ----------
    exported_program : torch.export.ExportedProgram
        The program exactly as the importer will see it (i.e. after ``run_decompositions()``).
    extra_supported : iterable of str
        Converter keys added through ``custom_convert_map``.

    Returns
    -------
    dict[str, int]
        Display name (``"aten.erfinv.default"``) -> number of nodes; empty when everything converts.
    """
    supported = _torch_supported(extra_supported)
    missing: Counter = Counter()
    # Walk every graph, including cond/map branch subgraphs the importer translates separately.
    for gm in exported_program.graph_module.modules():
        graph = getattr(gm, "graph", None)
        if graph is None:
            continue
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            key = getattr(node.target, "__name__", str(node.target))
            if key not in supported:
                missing[_display_name(node.target)] += 1
    return dict(missing)


def check_torch(exported_program, extra_supported: Iterable[str] = ()) -> None:
    """Raise :class:`UnsupportedOpsError` listing every unconvertible op of ``exported_program``.

    Raises
    ------
    UnsupportedOpsError
        With ``ops`` = name -> count and ``frontend="torch"``.
    """
    missing = scan_torch(exported_program, extra_supported)
    if missing:
        raise UnsupportedOpsError(missing, "torch")


def _onnx_nodes(graph) -> Iterable:
    import onnx

    for node in graph.node:
        yield node
        for attr in node.attribute:  # If/Loop/Scan bodies
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _onnx_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _onnx_nodes(g)


def scan_onnx(model) -> dict[str, int]:
    """Count the ONNX nodes whose ``op_type`` the Relax ONNX importer has no converter for.

    Parameters
    ----------
    model : onnx.ModelProto

    Returns
    -------
    dict[str, int]
        ``op_type`` -> number of nodes (subgraphs included); empty when everything converts.
    """
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    # Same rule as the importer's own _check_for_unsupported_ops: "If" and "Constant" are handled
    # directly by the graph walker, everything else needs a converter class.
    supported = set(_get_convert_map()) | {"If", "Constant"}
    missing = Counter(n.op_type for n in _onnx_nodes(model.graph) if n.op_type not in supported)
    return dict(missing)


def check_onnx(model) -> None:
    """Raise :class:`UnsupportedOpsError` listing every unconvertible op of an ONNX model.

    Raises
    ------
    UnsupportedOpsError
        With ``ops`` = op_type -> count and ``frontend="onnx"``.
    """
    missing = scan_onnx(model)
    if missing:
        raise UnsupportedOpsError(missing, "onnx")
