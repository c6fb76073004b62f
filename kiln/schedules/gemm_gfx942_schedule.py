"""The gfx942 MFMA GEMM schedule: match a matmul PrimFunc, tile it for LDS, tensorize it with MFMA.

One function, :func:`schedule_gemm`, does it in two modes that apply the *same* schedule:

* ``"rocm"``: threads bound, MFMA intrinsics (the kernel kiln ships for gfx942);
* ``"reference"``: no thread binding, every intrinsic replaced by a twin whose implementation is its
  own description (:func:`..gemm_gfx942_intrin.reference_intrin`). The result builds for ``llvm``
  and runs on the CPU, so the tiling, padding, lane index maps and epilogue fusion can be checked
  against torch on a machine without an AMD GPU.

Steps: (1) normalise the matmul block to ``C[S, I, J] += A[S, I, K] * B[S, J, K]`` (dlight's
reindex analysis, so a Linear ``[M,K] x [K,N]``, a ``[N,K]`` weight and a batched matmul all reach
the same form); bf16/fp8 operands are first copied as raw bits (below); (2) pad every axis to the
tile (``pad_einsum``: odd M, N, K and dynamic M need no other case); (3) block tile -> waves ->
16x16 MFMA tiles, A/B through LDS, operands and accumulators in wave registers laid out with the
MFMA lane maps; (4) accumulators -> an fp32 LDS tile, from which one pass applies the function's
elementwise consumers (bias, activations, the final cast: the epilogue) and stores to global memory.

Why bf16/fp8 go through bit copies: TVM's ``BF16/FP8ComputeLegalize`` (on for every non-CUDA
target) re-types every internal bf16/fp8 buffer to fp32, so LDS and registers would hold fp32 and
the MFMA operand would be ``<4 x float>``. Copying A and B as ``uint16``/``uint8`` first (values
reinterpreted, not converted) keeps the kernel's buffers out of that pass's reach while the rest of
the function (e.g. a bf16 epilogue cast) is legalized as usual.
"""
from __future__ import annotations

from typing import Callable

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.gpu.matmul import (
    auto_inline_consumer_chain, auto_inline_producers, get_index_map, get_reduction_blocks,
)

from . import gemm_gfx942_intrin as gi

__all__ = ["GemmDecline", "GemmProblem", "analyze", "schedule_gemm", "MODES"]

MODES = ("rocm", "reference")


class GemmDecline(Exception):
    """The PrimFunc is not something this schedule handles; the message says why."""


class GemmProblem:
    """What :func:`analyze` learned about a matmul PrimFunc."""

    def __init__(self, block: str, dtype: str, batch, M, N, K):
        self.block, self.dtype = block, dtype
        self.batch, self.M, self.N, self.K = batch, M, N, K

    def __repr__(self):
        return (f"GemmProblem(block={self.block!r}, dtype={self.dtype!r}, batch={self.batch}, "
                f"M={self.M}, N={self.N}, K={self.K})")


def _dt(e) -> str:
    """dtype of a TIR expression (TVM 0.27 exposes it as ``.ty``)."""
    return str(e.ty)


def _static(e):
    """An int for a constant extent, the expression itself for a symbolic one."""
    return int(e.value) if isinstance(e, tirx.IntImm) else e


def _operand_dtype(value) -> "tuple[str, str] | None":
    """(input dtype, accumulator dtype) of ``acc + f(a) * f(b)`` when both products are casts of
    loads of one dtype to the accumulator's dtype, else None."""
    if not isinstance(value, tirx.Add):
        return None
    for term in (value.a, value.b):
        if isinstance(term, tirx.Mul):
            ins = []
            for f in (term.a, term.b):
                if isinstance(f, tirx.Cast) and isinstance(f.value, tvm.ir.TensorLoad):
                    ins.append(_dt(f.value))
                elif isinstance(f, tvm.ir.TensorLoad):
                    ins.append(_dt(f))
                else:
                    return None
            if ins[0] == ins[1]:
                return ins[0], _dt(value)
            return f"{ins[0]} x {ins[1]}", _dt(value)
    return None


def analyze(func: tirx.PrimFunc) -> GemmProblem:
    """Check that ``func`` is one matmul (plus elementwise producers/consumers) this schedule can
    tensorize, and return its problem. Raises :class:`GemmDecline` with the reason otherwise."""
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(get_root_block(sch))
    red = get_reduction_blocks(sch, blocks)
    if red is None:
        kinds = [{iv.iter_type for iv in sch.get(b).iter_vars} for b in blocks]
        n_red = sum(tirx.IterVar.CommReduce in k for k in kinds)
        if n_red == 0:
            raise GemmDecline("no reduction block: not a matmul")
        if n_red > 1:
            raise GemmDecline(f"{n_red} reduction blocks: only one matmul per function is scheduled")
        raise GemmDecline("a block is neither spatial nor a plain reduction (e.g. an opaque or scan block)")
    block = sch.get(red[0])
    if get_index_map(block) is None:
        if any(iv.iter_type == tirx.IterVar.DataPar and isinstance(iv.dom.extent, tirx.IntImm)
               and int(iv.dom.extent.value) == 1 for iv in block.iter_vars):
            raise GemmDecline(f"matmul block {block.name_hint!r} has an M or N extent of 1: a "
                              "matrix-vector product, left to dlight's GEMV rules")
        raise GemmDecline(f"reduction block {block.name_hint!r} is not a matmul "
                          "(C[S,I,J] += A[S,I,K] * B[S,J,K] with distinct A and B)")
    if not isinstance(block.body, tirx.BufferStore):
        raise GemmDecline(f"matmul block {block.name_hint!r} body is not a single store")
    kinds = _operand_dtype(block.body.value)
    if kinds is None:
        raise GemmDecline(f"matmul block {block.name_hint!r} is not acc + cast(a) * cast(b)")
    dtype, acc = kinds
    if dtype not in gi.MFMA_SHAPES:
        raise GemmDecline(f"input dtype {dtype}: no gfx942 MFMA schedule "
                          f"(supported: {', '.join(gi.MFMA_SHAPES)})")
    if acc != "float32":
        raise GemmDecline(f"accumulator dtype {acc}: the MFMA schedule accumulates in float32 "
                          "(legalize matmul with out_dtype='float32')")
    # extents in the canonical S, I, J, K order (the trivial loops dropped)
    sch2 = s_tir.Schedule(func)
    main = sch2.get_sblock(block.name_hint)
    for i, kind in ((0, "read"), (1, "read"), (0, "write")):
        sch2.reindex(main, (kind, i))
    mim = get_index_map(sch2.get(main))[0]
    dom = [iv.dom.extent for iv in sch2.get(main).iter_vars]
    ext = mim.map_shape(dom)
    batch, M, N, K = (_static(e) for e in ext)
    return GemmProblem(block.name_hint, dtype, batch, M, N, K)


# --------------------------------------------------------------------------------------------
# bf16 / fp8: read A and B as raw bits
# --------------------------------------------------------------------------------------------

def _swap_casts(expr, pair: "frozenset[str]"):
    """``expr`` with every scalar cast between the two dtypes of ``pair`` made a reinterpret."""
    if isinstance(expr, tirx.Cast):
        inner = _swap_casts(expr.value, pair)
        if frozenset((_dt(expr), _dt(inner))) == pair:
            return tirx.reinterpret(_dt(expr), inner)
        return tirx.Cast(_dt(expr), inner)
    if isinstance(expr, (tirx.Add, tirx.Sub, tirx.Mul)):
        return type(expr)(_swap_casts(expr.a, pair), _swap_casts(expr.b, pair))
    return expr


def _code(value: float, dtype: str) -> int:
    """The storage bits of a float constant in ``dtype`` (e.g. a padding 0)."""
    import ml_dtypes
    import numpy as np
    np_dtype = {"bfloat16": ml_dtypes.bfloat16, gi.FP8_DTYPE: ml_dtypes.float8_e4m3fnuz}[dtype]
    arr = np.array([value], dtype=np.float32).astype(np_dtype)
    return int(arr.view(np.uint16 if arr.itemsize == 2 else np.uint8)[0])


def _to_bits(expr, dtype: str, bits: str):
    """A ``dtype``-valued producer expression rewritten to yield its ``bits``: loads are
    reinterpreted, constants encoded, and padding selects pushed inside. Anything that computes
    (adds, multiplies, ...) in ``dtype`` has no bit-level form: decline."""
    if isinstance(expr, tvm.ir.TensorLoad):
        return tirx.reinterpret(bits, expr)
    if isinstance(expr, tirx.Cast) and _dt(expr) == dtype and _dt(expr.value) == bits:
        return expr.value                  # a producer already retyped to bits, read back
    if isinstance(expr, tirx.FloatImm):
        return tirx.IntImm(bits, _code(float(expr.value), dtype))
    if isinstance(expr, tvm.ir.Call) and getattr(expr.op, "name", "") in ("tirx.if_then_else", "prim.if_then_else"):
        cond, a, b = expr.args
        return tirx.if_then_else(cond, _to_bits(a, dtype, bits), _to_bits(b, dtype, bits))
    if isinstance(expr, tirx.Select):
        return tirx.Select(expr.condition, _to_bits(expr.true_value, dtype, bits),
                           _to_bits(expr.false_value, dtype, bits))
    raise GemmDecline(f"a {dtype} operand is computed ({type(expr).__name__}) before the matmul: "
                      "only loads, constants and padding selects can be kept as raw bits")


def _replace_store(sch: s_tir.Schedule, block_rv, rewrite) -> None:
    old = sch.get(block_rv)
    body = old.body
    new_body = tirx.BufferStore(body.buffer, rewrite(body.value), list(body.indices))
    new = s_tir.SBlock(old.iter_vars, old.reads, old.writes, old.name_hint, new_body, old.init,
                       old.alloc_buffers, old.match_buffers, old.annotations)
    sch.state.replace(sch.get_sref(block_rv), new, {old: new})


def _retype(sch: s_tir.Schedule, block_rv, dtype: str, bits: str, reader: str) -> None:
    """Store the buffer ``block_rv`` writes as ``bits`` (after its own in-function producers);
    ``reader`` is the one block allowed to read it."""
    name = sch.get(block_rv).name_hint
    for cons in sch.get_consumers(block_rv):
        if sch.get(cons).name_hint != reader:
            # a reader outside the operand chain would convert the bits as numbers
            raise GemmDecline(f"{dtype} operand {name!r} is also read by {sch.get(cons).name_hint!r}, "
                              "outside the matmul")
    for prod in sch.get_producers(block_rv):
        if _dt_buf(sch.get(prod).writes[0]) == dtype:
            _retype(sch, prod, dtype, bits, name)
    sch.unsafe_set_dtype(block_rv, 0, bits)    # store: Cast(bits, v); readers: Cast(dtype, load)
    _replace_store(sch, block_rv, lambda v: _to_bits(v.value, dtype, bits))


def _dt_buf(region) -> str:
    return str(region.source.dtype)     # TVM 0.27: a region's buffer is its ``source``


def _read_as_bits(sch: s_tir.Schedule, main, dtype: str) -> None:
    """Make the matmul read its bf16/fp8 operands from buffers stored as unsigned integers of the
    same width: operands read from parameters get an integer copy; in-function producers (e.g. a
    conv's padding) are retyped. ``unsafe_set_dtype`` gives a buffer its integer type but inserts
    value *conversions*; they become reinterprets, so the bits travel unchanged and only the
    matmul decodes them."""
    bits = gi.STORAGE[dtype]
    main_name = sch.get(main).name_hint
    for idx in (0, 1):
        buf = sch.get(main).reads[idx]
        producers = [p for p in sch.get_producers(main)
                     if any(_same_buffer(w, buf) for w in sch.get(p).writes)]
        head = producers[0] if producers else sch.cache_read(main, idx, "global")
        _retype(sch, head, dtype, bits, main_name)
    _replace_store(sch, main, lambda v: _swap_casts(v, frozenset((dtype, bits))))


def _same_buffer(a, b) -> bool:
    return a.source.same_as(b.source)


# --------------------------------------------------------------------------------------------
# the schedule
# --------------------------------------------------------------------------------------------

def _tile(mk: int):
    """Index map of a wave register buffer ``[S, rows, k]`` -> ``[S, row tile, k tile, lane, slot]``."""
    lay = gi.operand_layout(mk)
    return lambda s, r, c: (s, r // 16, c // mk, *lay(r % 16, c % mk))


def _acc_tile(s, r, c):
    return (s, r // 16, c // 16, *gi.result_layout(r % 16, c % 16))


def schedule_gemm(func: tirx.PrimFunc, cfg, mode: str = "rocm") -> s_tir.Schedule:
    """Schedule ``func`` (checked by :func:`analyze`) with tile config ``cfg``.

    Parameters
    ----------
    func : PrimFunc
        A matmul with elementwise producers/consumers, as Relax legalization and fusion produce it.
    cfg : GemmConfigGfx942
        Tile configuration; must be valid for the problem (its ``check`` returns None).
    mode : str
        ``"rocm"`` (bound threads, MFMA) or ``"reference"`` (unbound, described intrinsics; builds
        for llvm).

    Raises
    ------
    GemmDecline
        When a step fails on this function (the message names the step).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, given {mode!r}")
    prob = analyze(func)
    names = gi.intrin_names(prob.dtype)
    if mode == "reference":
        names = {k: gi.reference_intrin(v) for k, v in names.items()}
    bind = mode == "rocm"
    mm, mn, mk = gi.MFMA_SHAPES[prob.dtype]
    elem = tvm.DataType(prob.dtype).bits // 8
    vec = cfg.vector_bytes // elem
    waves = cfg.warps_m * cfg.warps_n

    sch = s_tir.Schedule(func)
    main = sch.get_sblock(prob.block)
    if gi.STORAGE[prob.dtype] != prob.dtype:
        _read_as_bits(sch, main, prob.dtype)

    # (1) canonical C[S, I, J] += A[S, I, K] * B[S, J, K]
    reindexed = [sch.reindex(main, (kind, i)) for i, kind in ((0, "read"), (1, "read"), (0, "write"))]
    mim, aim, bim, cim = get_index_map(sch.get(main))
    sch.transform_layout(reindexed[0], ("write", 0), aim)
    sch.transform_layout(reindexed[1], ("write", 0), bim)
    sch.transform_layout(reindexed[2], ("read", 0), cim)
    sch.transform_block_layout(main, mim)

    # (2) pad to whole tiles
    sch.pad_einsum(main, [1, cfg.block_m, cfg.block_n, cfg.block_k])

    # (3) tiles: grid x waves x MFMA tiles; the MFMA tile becomes an inner block
    b, i, j, k = sch.get_loops(main)
    i, ii = sch.split(i, [None, mm])
    j, ji = sch.split(j, [None, mn])
    k, ki = sch.split(k, [None, mk])
    sch.reorder(i, j, k, ii, ji, ki)
    outer = sch.blockize(ii)
    i0, i1, i2 = sch.split(i, [None, cfg.warps_m, cfg.block_m // cfg.warps_m // mm])
    j0, j1, j2 = sch.split(j, [None, cfg.warps_n, cfg.block_n // cfg.warps_n // mn])
    k0, k1 = sch.split(k, [None, cfg.block_k // mk])
    sch.reorder(i0, j0, i1, j1, k0, k1, i2, j2)
    grid = sch.fuse(i0, j0)
    wave = sch.fuse(i1, j1)
    if bind:
        sch.bind(b, "blockIdx.y")
        sch.bind(grid, "blockIdx.x")
        sch.bind(wave, "threadIdx.y")

    def to_lds(idx):
        blk = sch.cache_read(outer, idx, "shared")
        # fails when the analyzer cannot prove the padded tile covers a symbolic extent (seen for
        # convs with a dynamic batch: M = batch * H * W), the root then being no "stage pipeline"
        _step("stage the operand tiles in LDS (compute_at)", sch.compute_at, blk, k0)
        fused = sch.fuse(*sch.get_loops(blk)[-2:])
        _, f_wave, f_lane, f_vec = sch.split(fused, [None, waves, gi.WARP, vec])
        if bind:
            sch.bind(f_wave, "threadIdx.y")
            sch.bind(f_lane, "threadIdx.x")
        sch.vectorize(f_vec)
        # pad each LDS row by one vector: consecutive rows start in different banks
        sch.storage_align(blk, 0, axis=-2, factor=cfg.block_k, offset=vec)
        return blk

    for blk in (to_lds(0), to_lds(1)):
        auto_inline_producers(sch, blk)   # reindex / padding / bit-copy blocks read straight from global

    a_reg = sch.cache_read(outer, 0, "warp")
    b_reg = sch.cache_read(outer, 1, "warp")
    sch.compute_at(a_reg, k1)
    sch.compute_at(b_reg, k1)
    c_lds = sch.cache_write(outer, 0, "shared")
    c_reg = sch.cache_write(outer, 0, "warp")
    sch.reverse_compute_at(c_reg, wave)
    sch.reverse_compute_at(c_lds, wave)
    ci, cj = sch.get_loops(c_reg)[-2:]
    cio, cii = sch.split(ci, [None, 16])
    cjo, cji = sch.split(cj, [None, 16])
    sch.reorder(cio, cjo, cii, cji)
    init = sch.get_child_blocks(sch.decompose_reduction(outer, k0))[0]

    def fragment(blk, rows, cols):
        r, c = sch.get_loops(blk)[-2:]
        r0, r1 = sch.split(r, [None, rows])
        c0, c1 = sch.split(c, [None, cols])
        sch.reorder(r0, c0, r1, c1)
        return r1

    la, lb = fragment(a_reg, mm, mk), fragment(b_reg, mn, mk)
    sch.transform_layout(a_reg, ("write", 0), _tile(mk))
    sch.transform_layout(b_reg, ("write", 0), _tile(mk))
    sch.transform_layout(c_reg, ("read", 0), _acc_tile)
    _step("tensorize the A load", sch.tensorize, la, names["load_a"])
    _step("tensorize the B load", sch.tensorize, lb, names["load_b"])
    _step("tensorize the MFMA", sch.tensorize, sch.get_loops(main)[-3], names["mfma"])
    _step("tensorize the accumulator fill", sch.tensorize, sch.get_loops(init)[-2], names["fill"])
    _step("tensorize the accumulator store", sch.tensorize, sch.get_loops(c_reg)[-2], names["store"])

    # (4) epilogue: the function's elementwise consumers, applied on the way from LDS to global
    _step("fuse the epilogue", auto_inline_consumer_chain, sch, c_lds)
    fused = sch.fuse(*sch.get_loops(c_lds)[-2:])
    _, f_lane, f_vec = sch.split(fused, [None, gi.WARP, 4])
    if bind:
        sch.bind(f_lane, "threadIdx.x")
    # unrolled, not vectorized: an epilogue holding a Let (e.g. Epilogue's gelu) that the bf16 cast
    # legalization duplicates makes VectorizeLoop fail ("Let cannot bind the same var to two
    # different values"); LLVM's load/store vectorizer still merges the 4 adjacent stores
    sch.unroll(f_vec)
    left = [sch.get(blk).name_hint for blk in sch.get_child_blocks(get_root_block(sch))
            if not _under_grid(sch, blk)]
    if bind and left:
        raise GemmDecline(f"blocks left outside the kernel after fusion: {', '.join(left)}")
    return sch


def _under_grid(sch: s_tir.Schedule, blk) -> bool:
    loops = sch.get_loops(blk)
    return bool(loops) and any(sch.get(lp).thread_binding is not None for lp in loops)


def _step(what: str, fn: Callable, *args) -> None:
    try:
        fn(*args)
    except Exception as e:  # a primitive refusing this function is a decline, with its first line
        raise GemmDecline(f"{what} failed: {type(e).__name__}: {_first_line(e)}") from e


def _first_line(e: Exception) -> str:
    """The informative line of a TVM error: its "Error message:" line when it has one."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = [ln for ln in lines if ln.startswith("Error message:")]
    if msg:
        return msg[0][len("Error message:"):].strip()[:300]
    lines = [ln for ln in lines if not ln.startswith(("File ", "Traceback"))]
    return (lines[-1] if lines else repr(e))[:300]
