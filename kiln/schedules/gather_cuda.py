"""``kiln.gather``: a CUDA schedule for the im2col gathers of :mod:`kiln.relax_passes.conv_to_gemm`.

dlight's ``Fallback`` gives every output element of ``[M, K]`` its own thread: the select chain over the
concatenated taps and the padding tests are evaluated per fp16 element (the tap index is ``k // C``, which varies
inside any vector), with 2-byte loads and stores. The H200 profile of ResNet-50 bs32 (``benchmarks/NOTES.md``,
session 4) put 2.8 of 4.2 ms in those kernels (92-600 GB/s). This rule schedules the gather on the iteration space
of its transpose block ``[N, OH, OW, KH, KW, C]`` (the producers inlined into it, the reshape to ``[M, K]``
reverse-inlined into its store), so the taps are loop variables and only the channel axis is split by 8 and
vectorised: one 16-byte load and store per thread, the selects evaluated once per vector.

It declines, with the reason, what is not such a gather, channel counts that are not a multiple of 8 (the 7x7 stem,
C = 3), a K-padding block that cannot be reverse-inlined, and any schedule whose lowered body still has per-lane
16-bit loads (so a decline is never a slower kernel than ``Fallback``).
"""
from __future__ import annotations

import re

import tvm
from tvm import s_tir, tirx

from .rule import Declined, RuleResult, ScheduleRule

__all__ = ["GatherRule", "VEC", "THREADS"]

#: Elements per thread (16 bytes of fp16/bf16).
VEC = 8
#: Threads per CTA.
THREADS = 256


def _spatial(sch: s_tir.Schedule, block) -> bool:
    return all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


class GatherRule(ScheduleRule):
    """The im2col gather of ``conv_to_gemm`` (pad, per-tap strided slices, concats, a transpose to
    ``[N, OH, OW, KH, KW, C]``, the reshape to ``[M, K]``): scheduled on the transpose's iteration space, 8
    channels per thread."""

    name = "kiln.gather"

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target) -> RuleResult:
        if target.kind.name != "cuda":
            return Declined(self.name, f"target {target.kind.name!r} is not cuda")
        sch = s_tir.Schedule(func)
        if not _has_root(sch):
            return Declined(self.name, "no root block")
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        names = [sch.get(b).name_hint for b in blocks]
        anchors = [i for i, n in enumerate(names) if n.startswith("T_transpose")]
        if not anchors or not any(n.startswith("T_concat") for n in names):
            return Declined(self.name, "not an im2col gather (no concat feeding a transpose)")
        if not all(_spatial(sch, b) for b in blocks):
            return Declined(self.name, "has a reduction (not injective)")
        ti = anchors[-1]
        # the tap axes stay loop variables (the transpose's space), so the tap/padding selects do not depend on
        # the vector lane; the trailing reshape (and K padding) are inlined into its store
        try:
            for b in reversed(blocks[:ti]):
                sch.compute_inline(b)
            for b in blocks[ti + 1:]:
                sch.reverse_compute_inline(b)
        except Exception as e:  # noqa: BLE001 - e.g. a K-padding block cannot be reverse-inlined
            return Declined(self.name, f"cannot inline around the transpose: {type(e).__name__}")
        tb = blocks[ti]
        ty = sch.get(tb).writes[0].source.ty if sch.get(tb).writes else None
        if ty is None or str(ty.dtype) not in ("float16", "bfloat16"):
            return Declined(self.name, f"dtype {getattr(ty, 'dtype', None)} is not 16-bit")
        loops = sch.get_loops(tb)
        ext = sch.get(loops[-1]).extent
        if not isinstance(ext, tirx.IntImm) or int(ext) % VEC:
            return Declined(self.name, f"channels {ext} not a multiple of {VEC}")
        inner_o, inner_i = sch.split(loops[-1], [None, VEC])
        bx, tx = sch.split(sch.fuse(*loops[:-1], inner_o), [None, THREADS])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(inner_i)
        bad = _scalarised(sch.mod, target, {str(p) for p in func.params[:-1]})
        if bad:
            return Declined(self.name, bad)
        return sch


def _has_root(sch: s_tir.Schedule) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001 - funcs without an explicit root block
        return False


def _scalarised(mod: tvm.IRModule, target: tvm.target.Target, inputs: set) -> str | None:
    """Why the vectorised loop did not become vector loads (``None`` when every global load in the lowered body is
    8-wide or a broadcast of one element): a select the simplifier could not hoist out of the vector leaves
    per-lane loads, no better than ``Fallback``."""
    try:
        with target:
            low = tvm.tirx.transform.VectorizeLoop()(tvm.s_tir.transform.StmtSimplify()(
                tvm.s_tir.transform.LowerOpaqueBlock()(tvm.s_tir.transform.ConvertBlocksToOpaque()(mod))))
    except RuntimeError as e:   # (tvm.error.InternalError) e.g. a vector index on a non-last buffer axis (seen on tiny Llama's gathers)
        return f"vectorising it fails in TVM: {type(e).__name__}: {str(e).strip().splitlines()[-1][:160]}"
    text = low.script()
    # after VectorizeLoop a vector load indexes with T.Ramp; a 16-bit load of an input without one is per lane
    scalar = [m for m in re.findall(r"(\w+)\[([^\[\]]*)\]", text)
              if m[0] in inputs and "T.Ramp" not in m[1]]
    if scalar:
        return f"{len(scalar)} per-lane loads remain after vectorising (e.g. {scalar[0][0]}): lanes disagree"
    return None
