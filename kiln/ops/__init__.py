"""``kiln.ops``: kiln's kernels as torch operators (``torch.ops.kiln.*``), built on first use and cached on disk.

Every op is a pure function on torch tensors registered with ``torch.library.custom_op`` under the ``kiln``
namespace, with a fake (meta) implementation, so ``torch.compile`` traces through it (one graph node per op).
The first call with a new problem (shapes, dtypes, flags) on a device builds the kernel for that device's
target -- llvm for CPU tensors, CUDA (sm_90a on Hopper) for CUDA tensors -- and stores the exported module in
the on-disk cache (:mod:`kiln.ops.cache`; knob ``ops_cache_dir`` = ``KILN_OPS_CACHE_DIR``, default
``~/.cache/kiln/ops``): later calls and later processes load it, and processes racing on one problem build it
once. Kernels are picked per shape: kiln's hand-written sm_90a kernels where they take the problem (GEMM with
the tuned table's tile config, flash attention), TE definitions scheduled by kiln or dlight for the rest,
unscheduled TE on CPU (the reference). What served a call is recorded in the cache entry
(:func:`kernel_info`).

Ops
---
``gemm``, ``fp8_gemm``, ``rms_norm``, ``layer_norm``, ``rope``, ``attention``, ``decode_attention``,
``fused_moe``. Inference only (no autograd formulas). Bad input raises :class:`OpInputError` (names the op,
the argument, expected vs given); a well-formed problem no kernel takes raises :class:`OpUnsupportedError`.
"""
from .build import forget, stats
from .cache import BuildCache, default_cache
from .checks import OpInputError, OpUnsupportedError
from .attention import attention, decode_attention
from .fp8 import fp8_gemm
from .gemm import gemm
from .moe import fused_moe
from .norm import layer_norm, rms_norm
from .rope import rope

__all__ = ["gemm", "fp8_gemm", "rms_norm", "layer_norm", "rope", "attention", "decode_attention", "fused_moe",
           "OpInputError", "OpUnsupportedError", "stats", "forget", "kernel_info", "BuildCache", "default_cache"]


def kernel_info(op: str, device: str | None = None) -> list:
    """What the kernels of ``op`` loaded in this process are: one dict per problem (the builder's info:
    which kernel or schedule rule served it, tile config, why a hand-written kernel declined) plus
    ``params``, ``device`` and ``source`` (``"built"`` here or loaded from ``"disk"``). ``device``: keep
    only kernels of devices whose name starts with it (``"cuda"``, ``"cpu"``)."""
    from .build import loaded_kernels
    return [dict(k.info, params=dict(p), device=d, source=k.source) for (o, p, d), k in loaded_kernels()
            if o == op and (device is None or d.startswith(device))]
