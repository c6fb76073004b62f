"""``kiln::fused_moe``: not implemented (see :func:`fused_moe`)."""
import torch

from .checks import OpUnsupportedError

__all__ = ["fused_moe", "MOE_MISSING"]

#: Why kiln has no fused MoE yet (the message of the error it raises).
MOE_MISSING = (
    "kiln.ops.fused_moe is not implemented: kiln has no grouped GEMM. Its sm_90a GEMM is built for one static "
    "(M, N, K); a MoE layer needs one GEMM per expert whose M (tokens routed to it) is known only on the device "
    "at run time, i.e. a grouped/persistent TIRx GEMM with a device-side tile scheduler over per-expert offsets. "
    "The alternatives that are correct today -- a host sync to read the counts then one GEMM build per count, or "
    "a per-token gathered GEMV -- would be slower than torch and are not shipped.")


def fused_moe(hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, gating_output: torch.Tensor,
              topk: int, renormalize: bool = True) -> torch.Tensor:
    """Top-k routed mixture of experts (vLLM's ``fused_moe`` interface) -- not implemented.

    Parameters
    ----------
    hidden_states : torch.Tensor
        ``[T, H]``.
    w1 : torch.Tensor
        ``[E, 2 * I, H]`` (gate and up projections).
    w2 : torch.Tensor
        ``[E, H, I]``.
    gating_output : torch.Tensor
        ``[T, E]`` router logits.
    topk : int
    renormalize : bool

    Raises
    ------
    OpUnsupportedError
        Always; the message says what is missing (:data:`MOE_MISSING`).
    """
    raise OpUnsupportedError(MOE_MISSING)
