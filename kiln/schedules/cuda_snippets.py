"""Inline CUDA shared by kiln's hand-written TIRx kernels (called through ``T.cuda.func_call``)."""
from __future__ import annotations

__all__ = ["mbar_wait_src", "mbar_wait_flag_src", "trap_if_src"]

_MBAR_WAIT = """
__forceinline__ __device__ void NAME(void* bar, int parity) {
  unsigned int addr = static_cast<unsigned int>(__cvta_generic_to_shared(bar));
  unsigned int ok;
  asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
               : "=r"(ok) : "r"(addr), "r"(parity) : "memory");
  if (ok) return;
  long long t0 = clock64();
  while (true) {
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(ok) : "r"(addr), "r"(parity) : "memory");
    if (ok) return;
    if (clock64() - t0 > 4000000000LL) __trap();
  }
}
"""


def mbar_wait_src(name: str) -> str:
    """An mbarrier phase wait named ``name`` with a watchdog: it spins on ``try_wait.parity`` (acquire, CTA
    scope) and traps after ~2 s (4e9 SM cycles at 1.98 GHz), so a pipeline bug fails the launch instead of
    hanging the GPU. (A trap reachable inside a wgmma region lowers ptxas' register budget: consumers of
    register-hungry kernels use a flag-then-trap-later wait instead, see ``attention_sm90_kernel.py``.)"""
    return _MBAR_WAIT.replace("NAME", name)


_MBAR_WAIT_FLAG = """
__forceinline__ __device__ void NAME(void* bar, int parity, int& timed_out) {
  unsigned int addr = static_cast<unsigned int>(__cvta_generic_to_shared(bar));
  unsigned int ok;
  asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
               : "=r"(ok) : "r"(addr), "r"(parity) : "memory");
  if (ok || timed_out) return;
  long long t0 = clock64();
  while (true) {
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(ok) : "r"(addr), "r"(parity) : "memory");
    if (ok) return;
    if (clock64() - t0 > 4000000000LL) { timed_out = 1; return; }
  }
}
"""
_TRAP_IF = """
__forceinline__ __device__ void NAME(int timed_out) {
  if (timed_out) __trap();
}
"""


def mbar_wait_flag_src(name: str) -> str:
    """The consumers' form of :func:`mbar_wait_src` for wgmma kernels: a ``trap`` reachable in the wgmma code
    makes ptxas ignore the ``setmaxnreg.inc`` budget there (spills, serialised wgmma), so on timeout this wait
    sets the sticky flag ``timed_out`` and returns (later waits return at once); the consumer calls
    :func:`trap_if_src`'s function after its last wgmma."""
    return _MBAR_WAIT_FLAG.replace("NAME", name)


def trap_if_src(name: str) -> str:
    """``NAME(timed_out)``: trap when a flag wait timed out (see :func:`mbar_wait_flag_src`)."""
    return _TRAP_IF.replace("NAME", name)
