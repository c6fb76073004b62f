"""Stock TVM, the peer kiln is measured against: ``torch.export`` -> ``from_exported_program`` ->
``tvm.compile`` (TVM's default pipeline: dlight with WMMA tensor cores on sm_90, LegalizeOps only on
the CPU) -> Relax VM. Weights are bound as constants, as the stock importer does.

The targets are the ones the benchmark harness uses (``benchmarks/peers.py`` imports them from here).
"""
from __future__ import annotations

import copy
import inspect
import os
from typing import Sequence

import torch

__all__ = ["CUDA_TARGET", "LLVM_TARGET", "stock_target", "compile_stock", "StockRunner", "export_stock",
           "load_stock"]

# CUDA target for stock TVM: sm_90 (NOT the nvidia/nvidia-h100 tag: its "sm_90a" makes dlight skip
# tensor cores), with the H100 tag's limits and the H200's 60 MiB L2.
CUDA_TARGET = {"kind": "cuda", "arch": "sm_90", "max_num_threads": 1024, "max_threads_per_block": 1024,
               "thread_warp_size": 32, "registers_per_block": 65536, "max_shared_memory_per_block": 49152,
               "l2_cache_size_bytes": 62914560}
LLVM_TARGET = {"kind": "llvm", "num-cores": os.cpu_count() or 1}


def stock_target(device: str):
    """The ``tvm.target.Target`` stock TVM builds for on ``device`` (``"cuda[:N]"`` or ``"cpu"``)."""
    import tvm
    return tvm.target.Target(CUDA_TARGET if str(device).startswith("cuda") else LLVM_TARGET)


def _flat_view(module: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of ``module`` whose forward returns a flat tuple of tensors (torch.export and
    the importer take nothing else); parameters are shared, ``module`` is untouched."""
    from ..verify import flatten_outputs
    view = copy.copy(module)
    forward = type(module).forward

    def flat_forward(*args, **kwargs):
        return tuple(flatten_outputs(forward(view, *args, **kwargs)))

    flat_forward.__signature__ = inspect.signature(module.forward)
    view.forward = flat_forward
    return view


def compile_stock(module: torch.nn.Module, example_args: Sequence[torch.Tensor], dynamic_shapes=None,
                  device: str = "cpu"):
    """Build ``module`` with stock TVM; returns the ``tvm.runtime.Executable``."""
    import tvm
    from tvm.relax.frontend.torch import from_exported_program
    with torch.no_grad():
        ep = torch.export.export(_flat_view(module), tuple(example_args), dynamic_shapes=dynamic_shapes)
    mod = from_exported_program(ep)
    return tvm.compile(mod, target=stock_target(device))


def _tvm_device(device: str):
    import tvm
    kind, _, idx = str(device).partition(":")
    return tvm.cuda(int(idx or 0)) if kind == "cuda" else tvm.cpu(0)


class StockRunner:
    """Call a stock-TVM executable (or a loaded library) with torch tensors; returns a list of tensors.

    Inputs go in zero-copy through DLPack (detached and made contiguous first); outputs come back
    the same way.
    """

    def __init__(self, executable, device: str):
        from tvm import relax
        self.device = str(device)
        self._main = relax.VirtualMachine(executable, _tvm_device(device))["main"]

    def __call__(self, *args) -> list:
        import tvm
        res = self._main(*[tvm.runtime.from_dlpack(a.detach().contiguous()) for a in args])
        outs = [res] if hasattr(res, "shape") else list(res)
        return [torch.from_dlpack(o) for o in outs]


def _kiln_target(device: str):
    from ..target import resolve_target
    return resolve_target({"kind": "cuda", "arch": CUDA_TARGET["arch"]} if str(device).startswith("cuda") else "llvm")


def export_stock(executable, path: str, device: str) -> dict:
    """Write the executable as one shared library (CUDA kernels compiled to cubin by nvcc)."""
    from ..target import export_library
    return export_library(executable, path, _kiln_target(device))


def load_stock(path: str, device: str) -> StockRunner:
    """Load a library written by :func:`export_stock`."""
    import tvm
    return StockRunner(tvm.runtime.load_module(path), device)
