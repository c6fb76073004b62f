"""Run a compiled decoder: weights resident on the device, one KV cache per batch size, in-place step buffers.

The decode functions are compiled with every argument treated as static (CUDA-graph capture bakes their
addresses into the graph), so :class:`LLMSession` owns, per batch size ``B``, the cache and two small device
buffers -- the token ids ``[B, 1]`` and positions ``[B]`` of the next step -- and passes the very same
tensors to every ``decode_b{B}`` call (bound once with ``set_input``, run with ``invoke_stateful``). A step
writes the new ids into the id buffer, runs the function, and advances the positions in place.

Only TVM's runtime (``tvm.runtime.load_module``, ``tvm.runtime.vm.VirtualMachine``) and torch (DLPack views
of the buffers) are used here.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputMismatchError
from ..target.runtime import tvm_device
from .errors import BatchSizeError, ContextLengthError

__all__ = ["LLMSession"]


def _to_tvm(t, dev):
    """A torch tensor or numpy array -> a TVM tensor on ``dev`` (zero-copy when already there)."""
    import tvm
    if isinstance(t, tvm.runtime.Tensor):
        return t if t.device == dev else t.copyto(dev)
    if hasattr(t, "__dlpack__") and hasattr(t, "device") and hasattr(t, "is_cuda"):
        want_cuda = dev.dlpack_device_type() == 2  # kDLCUDA
        if t.is_cuda != want_cuda:
            t = t.to("cuda" if want_cuda else "cpu")
        return tvm.runtime.from_dlpack(t.contiguous())
    import numpy as np
    return tvm.runtime.tensor(np.ascontiguousarray(t), dev)


@dataclass
class _BatchState:
    """The tensors one batch size's decode function is bound to."""

    cache: object      # tvm Tensor [L, 2, B, KVH, C, D]
    ids: object        # tvm Tensor [B, 1] int32
    pos: object        # tvm Tensor [B] int32
    ids_t: object      # torch views of the three
    pos_t: object
    bound: bool = False
    length: int = 0    # tokens currently in the cache (per sequence)
    bound_mk: bool = False   # decode_b{B}_mk bound too


class LLMSession:
    """A loaded decoder: ``prefill`` a batch of prompts, then ``decode`` one token per sequence per step.

    Parameters
    ----------
    vm_module : tvm.runtime.Executable or tvm.runtime.Module
        What ``VirtualMachine`` takes (a compiled executable, or ``load_module`` of an exported artifact).
    params : list
        Weights in parameter order (torch tensors, numpy arrays or TVM tensors); copied to the device once.
    spec : ModelSpec
        The compiled model's description (batches, cache length, dtype).
    device : str
        ``"cuda"`` (``"cuda:N"``) or ``"cpu"``.
    """

    def __init__(self, vm_module, params, spec, device: str):
        from tvm.runtime.vm import VirtualMachine
        self.spec, self.device = spec, str(device)
        self._dev = tvm_device(self.device)
        self.vm = VirtualMachine(vm_module, self._dev)
        self.params = [_to_tvm(p, self._dev) for p in params]
        self._states: dict[int, _BatchState] = {}
        self.use_megakernel = False   # decode with decode_b{B}_mk where compiled (see set_megakernel)

    def set_megakernel(self, on: bool = True) -> None:
        """Run decode steps as the one persistent megakernel (``decode_b{B}_mk``) instead of layer by layer.

        Raises
        ------
        BatchSizeError
            ``on`` and the model was compiled without megakernel decode functions.
        """
        if on and not getattr(self.spec, "megakernel", ()):
            raise BatchSizeError("no megakernel decode function was compiled (kiln.llm.compile(..., megakernel=True) "
                                 "on cuda)")
        self.use_megakernel = bool(on)

    # ------------------------------------------------------------------------------------- state
    @property
    def torch_device(self) -> str:
        return "cpu" if self.device.startswith("cpu") else self.device

    def _state(self, batch: int) -> _BatchState:
        st = self._states.get(batch)
        if st is None:
            import torch
            import tvm
            from .model import cache_shape
            cache = tvm.runtime.empty(cache_shape(self.spec, batch), self.spec.dtype, self._dev)
            ids = tvm.runtime.empty((batch, 1), "int32", self._dev)
            pos = tvm.runtime.empty((batch,), "int32", self._dev)
            views = [torch.from_dlpack(x) for x in (cache, ids, pos)]
            for v in views:
                v.zero_()
            st = self._states[batch] = _BatchState(cache, ids, pos, views[1], views[2])
        return st

    def check(self, batch: int, prompt_len: int, new_tokens: int) -> None:
        """Refuse, before any kernel runs, a request the compiled model cannot serve.

        Raises
        ------
        BatchSizeError
            ``new_tokens > 1`` and no ``decode_b{batch}`` was compiled.
        ContextLengthError
            ``prompt_len + new_tokens`` exceeds ``max_context`` (the last generated token needs no slot, so
            the bound is ``prompt_len + new_tokens - 1 <= max_context``), or the prompt is empty.
        """
        C = self.spec.max_context
        if prompt_len < 1:
            raise ContextLengthError("the prompt is empty: at least one token is needed")
        if prompt_len > C:
            raise ContextLengthError(f"prompt of {prompt_len} tokens is longer than the KV cache ({C} positions, "
                                     "compile with a larger max_context)")
        if prompt_len + max(new_tokens, 1) - 1 > C:
            raise ContextLengthError(f"prompt of {prompt_len} tokens + {new_tokens} new tokens needs "
                                     f"{prompt_len + new_tokens - 1} cache positions; the cache has {C}")
        if new_tokens > 1 and batch not in self.spec.decode_batches:
            raise BatchSizeError(f"batch {batch} has no decode function; compiled decode batches: "
                                 f"{list(self.spec.decode_batches)}")

    # ------------------------------------------------------------------------------------- steps
    def prefill(self, ids):
        """Run the prompts ``ids [B, n]`` (any int dtype, torch or numpy) from position 0.

        Returns
        -------
        torch.Tensor
            Logits of the last prompt position, ``[B, vocab] float32``, on the session's device.
        """
        import torch
        ids = torch.as_tensor(ids)
        if ids.dim() != 2:
            raise ContextLengthError(f"prompt ids must be [batch, length], given shape {tuple(ids.shape)}")
        b, n = ids.shape
        self.check(b, n, 1)
        self._check_ids(ids)
        st = self._state(b)
        x = ids.to(device=self.torch_device, dtype=torch.int32).contiguous()
        import tvm
        out = self.vm["prefill"](tvm.runtime.from_dlpack(x), st.cache, *self.params)
        st.pos_t.fill_(n)
        st.length = n
        return torch.from_dlpack(out)

    def _check_ids(self, ids) -> None:
        vocab = self.spec.config.vocab_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise InputMismatchError(f"token ids must be in [0, {vocab}), given ids in "
                                     f"[{int(ids.min())}, {int(ids.max())}]")

    def decode(self, next_ids, check: bool = True):
        """One token per sequence: ``next_ids [B]`` at the current positions; advances them by one.

        ``check=False`` skips the id range check (a device sync); :func:`generate` passes ids it selected.

        Returns
        -------
        torch.Tensor
            ``[B, vocab] float32`` logits of the following position.
        """
        import torch
        next_ids = torch.as_tensor(next_ids)
        b = int(next_ids.shape[0])
        st = self._states.get(b)
        if st is None or st.length == 0:
            raise ContextLengthError(f"decode for batch {b} before prefill: run prefill first")
        if b not in self.spec.decode_batches:
            raise BatchSizeError(f"batch {b} has no decode function; compiled: {list(self.spec.decode_batches)}")
        if st.length >= self.spec.max_context:
            raise ContextLengthError(f"the KV cache is full ({self.spec.max_context} positions)")
        if check:
            self._check_ids(next_ids)
        st.ids_t.copy_(next_ids.reshape(b, 1))
        out = self.run_decode(b)
        st.pos_t.add_(1)
        st.length += 1
        return torch.from_dlpack(out)

    def run_decode(self, batch: int):
        """Run ``decode_b{batch}`` on the bound buffers as they are (no id/position update): a timing hook."""
        st = self._states[batch]
        name = f"decode_b{batch}"
        if self.use_megakernel and batch in getattr(self.spec, "megakernel", ()):
            name += "_mk"
            if not st.bound_mk:
                self.vm.set_input(name, st.ids, st.pos, st.cache, *self.params)
                st.bound_mk = True
        elif not st.bound:
            self.vm.set_input(name, st.ids, st.pos, st.cache, *self.params)
            st.bound = True
        self.vm.invoke_stateful(name)
        return self.vm.get_outputs(name)

    def stage(self, batch: int, next_ids, position: int) -> None:
        """Set the ids and the position of the next decode of ``batch`` without running it (benchmarks: a
        cache filled by an earlier prefill, then :meth:`run_decode` repeated at one position)."""
        import torch
        st = self._state(batch)
        if not 0 < position < self.spec.max_context:
            raise ContextLengthError(f"position {position} is outside 1..{self.spec.max_context - 1}")
        st.ids_t.copy_(torch.as_tensor(next_ids).reshape(batch, 1))
        st.pos_t.fill_(position)
        st.length = position
