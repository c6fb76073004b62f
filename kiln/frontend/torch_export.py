"""torch.export -> Relax import, with kiln's fixes for TVM 0.27's importer.

Flow of :func:`import_torch`:

1. copy/cast the model (``dtype``), widen size-1 example dims that are marked dynamic;
2. ``torch.export.export`` + ``run_decompositions()`` (the decomposition the importer would run);
3. pre-scan every ``call_function`` node and raise ONE :class:`UnsupportedOpsError` listing all gaps;
4. ``from_exported_program(keep_params_as_input=True, custom_convert_map=kiln overrides)``;
5. rename TVM's shape vars (``s72``...) to the user's ``Dim`` names, build the :class:`Signature`;
6. run :class:`LegalizeBoolArith` and collect every fix into ``ImportResult.notes``.
"""
from __future__ import annotations

import copy
import inspect
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from ..errors import KilnError
from ..relax_passes.legalize_bool import LegalizeBoolArith
from ..signature import Signature, TensorSpec
from .converters import OVERRIDDEN_OPS, make_convert_map
from .scan import check_torch

__all__ = ["ImportResult", "import_torch"]


@dataclass
class ImportResult:
    """What a frontend hands to the rest of kiln.

    Attributes
    ----------
    mod : tvm.IRModule
        ``main(inputs..., params...)`` with attr ``num_input`` = number of real inputs; weights are
        function parameters, not embedded constants. ``main`` always returns a tuple of tensors.
    params : list of numpy.ndarray
        Weights in the order of main's trailing params (bf16 as ``ml_dtypes.bfloat16`` arrays).
    signature : Signature
        Inputs named like the model's inputs, outputs ``output0``...; symbolic dims by user name.
    notes : list of str
        Human-readable list of the fixes applied during import.
    """

    mod: tvm.IRModule
    params: list
    signature: Signature
    notes: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Shared helpers (also used by the ONNX frontend).
# ---------------------------------------------------------------------------------------------
def tensor_to_numpy(value) -> np.ndarray:
    """torch tensor / tvm tensor / array -> numpy, bf16 as ``ml_dtypes.bfloat16`` (numpy has no bf16)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            import ml_dtypes
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    if hasattr(value, "numpy"):
        return value.numpy()
    return np.asarray(value)


def _dim_repr(d, names: dict[str, str]):
    if isinstance(d, tvm.tirx.IntImm):
        return int(d.value)
    if isinstance(d, int):
        return d
    if isinstance(d, tvm.tirx.Var):
        return names.get(d.name, d.name)
    return str(d)  # derived dims (e.g. "seq * 2"): kept readable


def _tensor_specs(types, names, dim_names) -> tuple[TensorSpec, ...]:
    specs = []
    for name, ty in zip(names, types):
        if not isinstance(ty, relax.TensorType) or ty.shape is None:
            raise KilnError(f"{name}: only tensors with a known rank are supported, got {ty}")
        specs.append(TensorSpec(name, tuple(_dim_repr(d, dim_names) for d in ty.shape.values), str(ty.dtype)))
    return tuple(specs)


def build_signature(func: relax.Function, num_input: int, default_range=(1, None)) -> Signature:
    """Signature of ``func``: its first ``num_input`` params and its (tuple) return value.

    Parameters
    ----------
    func : relax.Function
        An imported ``main``.
    num_input : int
        How many leading params are real inputs.
    default_range : tuple
        ``(min, max)`` for symbolic dims without ``tir_var_lower/upper_bound`` attributes.

    Returns
    -------
    Signature
    """
    inputs = list(func.params)[:num_input]
    in_specs = _tensor_specs([v.ty for v in inputs], [v.name for v in inputs], {})
    ret = func.ret_ty
    outs = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    out_specs = _tensor_specs(outs, [f"output{i}" for i in range(len(outs))], {})
    attrs = func.attrs or {}
    lower = dict(attrs["tir_var_lower_bound"]) if "tir_var_lower_bound" in attrs else {}
    upper = dict(attrs["tir_var_upper_bound"]) if "tir_var_upper_bound" in attrs else {}
    dims = {}
    for spec in in_specs + out_specs:
        for d in spec.shape:
            if isinstance(d, str) and d.isidentifier():
                lo = int(lower[d]) if d in lower else default_range[0]
                hi = int(upper[d]) if d in upper else default_range[1]
                dims[d] = (lo, hi)
    return Signature(in_specs, out_specs, dims)


def detach_params_attr(func: relax.Function) -> relax.Function:
    """Drop the importer's ``params`` attr: kiln keeps weights in ``ImportResult.params`` only."""
    return func.without_attr("params") if func.attrs is not None and "params" in func.attrs else func


def rename_symbolic_vars(func: relax.Function, rename: dict[str, str]) -> relax.Function:
    """Rename shape vars (``s72`` -> ``batch``), including the ``tir_var_*_bound`` attr keys.

    Parameters
    ----------
    func : relax.Function
    rename : dict[str, str]
        Old var name -> new var name.

    Returns
    -------
    relax.Function
    """
    old_vars = {v.name: v for v in relax.analysis.defined_symbolic_vars(func)}
    binding = {old_vars[o]: tvm.tirx.Var(n, "int64") for o, n in rename.items() if o in old_vars}
    if not binding:
        return func
    func = func.bind_symbolic_vars(binding)
    for key in ("tir_var_lower_bound", "tir_var_upper_bound"):
        if func.attrs is not None and key in func.attrs:
            func = func.with_attr(key, {rename.get(k, k): v for k, v in dict(func.attrs[key]).items()})
    return func


def run_legalize_bool(mod: tvm.IRModule, notes: list) -> tvm.IRModule:
    """Run :class:`LegalizeBoolArith` and record what it rewrote in ``notes``."""
    p = LegalizeBoolArith()
    mod = p(mod)
    if p.num_rewritten:
        detail = ", ".join(f"{k} x{v}" for k, v in sorted(p.stats.items()))
        notes.append(f"LegalizeBoolArith rewrote {p.num_rewritten} ops on bool tensors ({detail})")
    return mod


# ---------------------------------------------------------------------------------------------
# torch-specific preparation
# ---------------------------------------------------------------------------------------------
def _torch_dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if str(dtype) not in table:
        raise KilnError(f"dtype must be one of {sorted(table)} or a torch dtype, given {dtype!r}")
    return table[str(dtype)]


def _prepare_model(model, example_inputs, dtype, notes):
    """Copy the model when it must change (cast / eval) so the caller's model is never mutated."""
    import torch

    tdt = _torch_dtype(dtype)
    tensors = list(model.parameters()) + list(model.buffers())
    needs_cast = tdt is not None and any(t.is_floating_point() and t.dtype != tdt for t in tensors)
    # export on the CPU: TVM's importer keeps a CUDA-resident constant on the GPU, and the compile-time
    # constant folding (which runs on the host) then fails on it ("Mismatched device_type ... expected cpu")
    on_device = any(t.device.type != "cpu" for t in tensors)
    if needs_cast or model.training or on_device:
        model = copy.deepcopy(model)
    if on_device:
        model = model.cpu()
        notes.append("model weights were on a device: exported a CPU copy (the artifact runs on the target)")
    if model.training:
        model.eval()  # dropout/batch-norm statistics must not be traced into an inference graph
        notes.append("model was in training mode: exported a copy in eval mode")
    if needs_cast:
        model = model.to(tdt)
        notes.append(f"floating weights/buffers cast to {str(tdt).replace('torch.', '')}")
    inputs = []
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise KilnError(f"example input {i} must be a torch.Tensor, given {type(x).__name__}")
        x = x.cpu()
        inputs.append(x.to(tdt) if tdt is not None and x.is_floating_point() else x)
    return model, tuple(inputs)


def _input_names(model, n: int) -> list[str]:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return [f"input{i}" for i in range(n)]
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return (names + [f"input{i}" for i in range(len(names), n)])[:n]


def flatten_outputs(out, path="output") -> list:
    """Tensors of a forward result in order: tensor, tuple/list, dict/ModelOutput (values), None skipped."""
    import torch

    if out is None:
        return []
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):  # transformers ModelOutput is an OrderedDict of its non-None fields
        return [t for k, v in out.items() for t in flatten_outputs(v, f"{path}[{k!r}]")]
    if isinstance(out, (tuple, list)):
        return [t for i, v in enumerate(out) for t in flatten_outputs(v, f"{path}[{i}]")]
    raise KilnError(f"{path} is a {type(out).__name__}; forward may only return tensors, tuples, lists, dicts "
                    "or ModelOutputs of tensors")


def _with_flat_outputs(model):
    """A view of ``model`` whose forward returns a flat tuple of tensors.

    torch.export only understands output types registered as pytrees (transformers registers
    ModelOutput subclasses lazily, and not while a trace is running), and the importer turns ``None``
    leaves into null outputs. Flattening inside forward avoids both. The view is a shallow copy that
    shares parameters with ``model`` (nothing is copied or mutated) and keeps ``forward``'s signature,
    so the exported inputs keep the model's argument names and a dict ``dynamic_shapes`` still applies.
    """
    view = copy.copy(model)  # new __dict__, same parameter/module dicts
    forward = type(model).forward

    def flat_forward(*args, **kwargs):
        return tuple(flatten_outputs(forward(view, *args, **kwargs)))

    flat_forward.__signature__ = inspect.signature(model.forward)
    view.forward = flat_forward
    return view


def _dims_per_input(model, example_inputs, dynamic_shapes) -> list[dict]:
    """Normalise ``dynamic_shapes`` (dict by arg name or positional tuple) to ``[{dim_index: spec}]``."""
    n = len(example_inputs)
    if dynamic_shapes is None:
        return [{} for _ in range(n)]
    if isinstance(dynamic_shapes, dict):
        specs = [dynamic_shapes.get(name) for name in _input_names(model, n)]
    else:
        specs = list(dynamic_shapes) + [None] * (n - len(dynamic_shapes))
    out = []
    for spec in specs[:n]:
        if spec is None:
            out.append({})
        elif isinstance(spec, dict):
            out.append({int(k): v for k, v in spec.items() if v is not None})
        else:
            out.append({i: v for i, v in enumerate(spec) if v is not None})
    return out


def _is_named_dim(d) -> bool:
    from torch.export.dynamic_shapes import Dim, _DerivedDim

    return isinstance(d, Dim) and not isinstance(d, _DerivedDim)


def _widen_unit_dims(inputs, dims_per_input, notes):
    # torch.export specialises any dim whose example size is 0 or 1 and then rejects the Dim marked on
    # it ("your code specialized it to be a constant (1)"). The traced graph does not depend on the
    # example *values*, so repeat the first slice up to a legal size instead of failing.
    import torch

    out = list(inputs)
    for i, dims in enumerate(dims_per_input):
        for d, dim in dims.items():
            if not _is_named_dim(dim) or d >= out[i].dim() or out[i].shape[d] >= 2:
                continue
            lo, hi = max(2, int(dim.min or 0)), dim.max
            if (hi is not None and lo > hi) or out[i].shape[d] == 0:
                continue
            old = out[i].shape[d]
            out[i] = out[i].index_select(d, torch.zeros(lo, dtype=torch.long))
            notes.append(f"example dim {dim.__name__!r} of input {i} widened {old}->{lo} for export "
                         "(torch.export specialises size-1 dims)")
    return tuple(out)


def _user_dim_names(ep, dims_per_input) -> dict[str, str]:
    """Map torch's shape symbols (TVM keeps their names, e.g. ``s72``) to the user's Dim names."""
    rename: dict[str, str] = {}
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    for i, name in enumerate(ep.graph_signature.user_inputs):
        node = placeholders.get(name)
        val = node.meta.get("val") if node is not None else None
        if val is None or i >= len(dims_per_input):
            continue
        for d, size in enumerate(val.shape):
            expr = getattr(getattr(size, "node", None), "expr", None)
            dim = dims_per_input[i].get(d)
            if expr is not None and getattr(expr, "is_Symbol", False) and _is_named_dim(dim):
                rename.setdefault(str(expr), dim.__name__)
    return rename


def _params_in_order(ep, func: relax.Function, num_input: int) -> list:
    by_arg = {s.arg.name: s for s in ep.graph_signature.input_specs if hasattr(s.arg, "name")}
    out = []
    for var in list(func.params)[num_input:]:
        spec = by_arg.get(var.name)
        if spec is None or spec.target not in ep.state_dict:
            raise KilnError(f"cannot find the weight of parameter {var.name!r} in the exported program")
        out.append(tensor_to_numpy(ep.state_dict[spec.target]))
    return out


def import_torch(model, example_inputs: tuple, dynamic_shapes=None, dtype=None) -> ImportResult:
    """Import a ``torch.nn.Module`` through ``torch.export`` into Relax, with kiln's fixes.

    Parameters
    ----------
    model : torch.nn.Module
        Forward may return a tensor, a tuple/list, or a dict / transformers ``ModelOutput``; outputs
        are flattened to tensors in order (None entries dropped). The model is not mutated.
    example_inputs : tuple of torch.Tensor
        Positional example inputs.
    dynamic_shapes : dict or tuple, optional
        As accepted by ``torch.export.export``; ``Dim`` names become the symbolic dim names.
    dtype : str or torch.dtype, optional
        ``"float32"``, ``"float16"``, ``"bfloat16"``: cast floating weights, buffers and example
        inputs before export. None keeps the model's dtypes.

    Returns
    -------
    ImportResult

    Raises
    ------
    UnsupportedOpsError
        Listing every operator (with counts) the importer cannot convert.
    """
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    notes: list[str] = []
    model, inputs = _prepare_model(model, tuple(example_inputs), dtype, notes)
    dims = _dims_per_input(model, inputs, dynamic_shapes)
    inputs = _widen_unit_dims(inputs, dims, notes)

    with torch.no_grad():
        ep = torch.export.export(_with_flat_outputs(model), inputs, dynamic_shapes=dynamic_shapes)
        ep = ep.run_decompositions()  # exactly what from_exported_program would run
    check_torch(ep, OVERRIDDEN_OPS)

    stats: Counter = Counter()
    mod = from_exported_program(ep, keep_params_as_input=True, custom_convert_map=make_convert_map(stats),
                                run_ep_decomposition=False)
    notes.extend(f"{k} used {v}x" for k, v in sorted(stats.items()))
    if stats:
        # Overrides that re-emit a stock result (slices) leave the superseded binding behind; drop it
        # so later passes never legalize the unfixed version.
        mod = relax.transform.DeadCodeElimination(["main"])(mod)

    func = detach_params_attr(mod["main"])
    num_input = int(func.attrs["num_input"])
    params = _params_in_order(ep, func, num_input)
    func = rename_symbolic_vars(func, _user_dim_names(ep, dims))
    mod["main"] = func
    mod = run_legalize_bool(mod, notes)
    return ImportResult(mod, params, build_signature(mod["main"], num_input), notes)
