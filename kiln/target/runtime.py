"""Run a compiled module on torch tensors: signature checks, zero-copy DLPack in and out."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import InputMismatchError
from ..signature import Signature

__all__ = ["KilnModule", "tvm_device"]

_DEVICE_KINDS = {"cuda": "cuda", "rocm": "rocm", "cpu": "cpu", "llvm": "cpu"}


def tvm_device(device: str):
    """``"cuda"``, ``"cuda:1"``, ``"rocm"``, ``"cpu"`` -> a TVM device."""
    import tvm
    kind, _, idx = str(device).partition(":")
    if kind not in _DEVICE_KINDS:
        raise ValueError(f"unknown device {device!r}; expected one of cuda[:N], rocm[:N], cpu")
    return tvm.device(_DEVICE_KINDS[kind], int(idx or 0))


def _dtype_name(t) -> str:
    return str(t.dtype).replace("torch.", "")


class KilnModule:
    """A loaded kiln module: ``m(*inputs)`` with torch tensors (or numpy arrays) in, torch tensors out.

    Parameters
    ----------
    vm_module : tvm.runtime.Module or Executable
        What ``relax.VirtualMachine`` takes.
    params : list
        Weights (TVM tensors or numpy arrays) passed after the inputs, in order.
    signature : Signature
        The compiled input/output signature; inputs are checked against it before every call.
    device : str
        ``"cuda"``, ``"rocm"`` or ``"cpu"`` (optionally ``:index``).
    """

    def __init__(self, vm_module, params: Sequence[Any], signature: Signature, device: str):
        import tvm
        from tvm import relax
        self.signature = signature
        self.device = str(device)
        self.kind = self.device.partition(":")[0]
        self._dev = tvm_device(device)
        self._vm = relax.VirtualMachine(vm_module, self._dev)
        self._main = self._vm["main"]
        # Weights stay resident and are passed as the same tensors every call, which also keeps the
        # pointers that a captured CUDA graph baked in valid.
        self._params = [p.copyto(self._dev) if isinstance(p, tvm.runtime.Tensor) else tvm.runtime.tensor(np.asarray(p), self._dev)
                        for p in params]

    def _check_device(self, i: int, t) -> None:
        kind = t.device.type if hasattr(t, "device") and hasattr(t.device, "type") else "cpu"
        want = "cuda" if self.kind in ("cuda", "rocm") else "cpu"  # torch names ROCm devices "cuda"
        if kind != want:
            raise InputMismatchError(
                f"input {self.signature.inputs[i].name!r}: expected a tensor on {self.device}, given one on {t.device}")

    def _to_tvm(self, inputs) -> list:
        import tvm
        import torch
        if len(inputs) != len(self.signature.inputs):
            names = [s.name for s in self.signature.inputs]
            raise InputMismatchError(f"expected {len(names)} input(s) {names}, given {len(inputs)}")
        out, shapes, dtypes = [], [], []
        for i, x in enumerate(inputs):
            if isinstance(x, np.ndarray):
                x = torch.from_numpy(x)
            if not isinstance(x, torch.Tensor):
                raise InputMismatchError(f"input {i}: expected a torch.Tensor or numpy array, given {type(x).__name__}")
            self._check_device(i, x)
            shapes.append(tuple(x.shape))
            dtypes.append(_dtype_name(x))
            out.append(x.contiguous())
        self.signature.bind(shapes, dtypes)
        return [tvm.runtime.from_dlpack(x) for x in out]

    def __call__(self, *inputs):
        import torch
        args = self._to_tvm(inputs)
        res = self._main(*args, *self._params)
        outs = list(res) if not hasattr(res, "shape") else [res]
        tensors = tuple(torch.from_dlpack(o) for o in outs)
        return tensors[0] if len(tensors) == 1 else tensors

    def run_tvm(self, *args):
        """Call the VM directly with TVM tensors (no checks): for timing loops and plain-runtime parity."""
        return self._main(*args, *self._params)
