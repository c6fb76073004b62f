"""TE/TIR definitions of :func:`kiln.ops.fused_moe`'s stages (routing, token sort, gather, grouped GEMM, act,
combine) and kiln's thread schedule of the small ones on CUDA.

The token sort is vLLM's ``moe_align_block_size`` done without atomics, so it is deterministic and runs as
plain TE reductions on any target: the ``NA = T * topk`` routed (token, slot) pairs are cut into chunks of
``CHUNK``; per chunk and expert a count, per expert an exclusive prefix over chunks and a padded start
offset, then every pair's sorted row ``pos[i] = off[e] + prefix[chunk, e] + (earlier pairs of e in its chunk)``
(stable: pairs of an expert keep token order). Each expert's rows are padded to a multiple of the GEMM's
``BM``, so every ``BM``-row block of the sorted order belongs to one expert (``block_expert[b]``, ``-1`` for
the unused tail blocks of the static ``MP``-row buffers). Work: ``NA * (E + CHUNK)``, no ``NA^2`` term.
"""
from __future__ import annotations

from tvm import te, tirx
from tvm.script import tirx as T

__all__ = ["CHUNK", "moe_rows", "make_route_te", "make_count_te", "make_offsets_te", "make_pos_te",
           "make_block_expert_te", "make_scatter_tir", "make_gather_te", "make_grouped_gemm_te", "make_act_te",
           "make_combine_te", "schedule_threads_cuda"]

#: Pairs per chunk of the token sort (the in-chunk rank scans at most this many earlier pairs).
CHUNK = 256
_F32, _I32 = "float32", "int32"


def moe_rows(T_: int, E: int, topk: int, BM: int) -> int:
    """Rows ``MP`` of the sorted, per-expert padded buffers: an upper bound of ``sum_e ceil(n_e / BM) * BM``
    (at most ``min(E, NA)`` experts get a pair, each wastes at most ``BM - 1`` rows), a multiple of ``BM``."""
    NA = T_ * topk
    bound = NA + min(E, NA) * (BM - 1)
    return bound // BM * BM


def _i32(v):
    return tirx.const(v, _I32)


def _sym(name, dtype=_I32):
    return tirx.Var(name, dtype)


def _func(args, name):
    return te.create_prim_func(args).with_attr("global_symbol", name)


def make_route_te(T_: int, E: int, topk: int, gdtype: str, renormalize: bool) -> tirx.PrimFunc:
    """``(gating[T, E], topk_w[T, topk] f32, topk_ids[T, topk] i32)``: softmax over experts (fp32), the
    ``topk`` largest (descending; ties to the lower expert id), optionally renormalised to sum to 1.
    Selection by rank: ``rank[t, e]`` = experts that beat ``e``; ``e`` is slot ``rank`` when ``rank < topk``."""
    g = te.placeholder((T_, E), gdtype, name="gating")
    e1 = te.reduce_axis((0, E), name="e1")
    mx = te.compute((T_,), lambda t: te.max(g[t, e1].astype(_F32), axis=e1), name="gmax")
    e2 = te.reduce_axis((0, E), name="e2")
    den = te.compute((T_,), lambda t: te.sum(te.exp(g[t, e2].astype(_F32) - mx[t]), axis=e2), name="gden")
    e3 = te.reduce_axis((0, E), name="e3")

    def beats(t, a, b):     # expert a ranks ahead of expert b
        ga, gb = g[t, a].astype(_F32), g[t, b].astype(_F32)
        return tirx.any(ga > gb, tirx.all(ga == gb, a < b))

    rank = te.compute((T_, E), lambda t, e: te.sum(tirx.if_then_else(beats(t, e3, e), _i32(1), _i32(0)), axis=e3),
                      name="rank")
    e4 = te.reduce_axis((0, E), name="e4")
    ids = te.compute((T_, topk), lambda t, j: te.sum(tirx.if_then_else(rank[t, e4] == j, e4, _i32(0)), axis=e4),
                     name="topk_ids")
    e5 = te.reduce_axis((0, E), name="e5")
    prob = te.compute((T_, topk), lambda t, j: te.sum(tirx.if_then_else(
        rank[t, e5] == j, te.exp(g[t, e5].astype(_F32) - mx[t]) / den[t], tirx.const(0.0, _F32)), axis=e5), name="prob")
    if renormalize:
        def w(t, j):
            total = prob[t, 0]
            for jj in range(1, topk):
                total = total + prob[t, jj]
            return prob[t, j] / total
        out = te.compute((T_, topk), w, name="topk_w")
    else:
        out = te.compute((T_, topk), lambda t, j: prob[t, j], name="topk_w")
    return _func([g, out, ids], "kiln_moe_route")


def make_count_te(NA: int, E: int) -> tirx.PrimFunc:
    """``(ids[NA] i32, counts[NC, E] i32)``: pairs routed to each expert, per chunk of :data:`CHUNK` pairs."""
    NC = -(-NA // CHUNK)
    ids = te.placeholder((NA,), _I32, name="ids")
    k = te.reduce_axis((0, CHUNK), name="k")

    def count(c, e):
        i = c * CHUNK + k
        hit = tirx.all(i < NA, ids[tirx.min(i, NA - 1)] == e)
        return te.sum(tirx.if_then_else(hit, _i32(1), _i32(0)), axis=k)
    out = te.compute((NC, E), count, name="counts")
    return _func([ids, out], "kiln_moe_count")


def make_offsets_te(NA: int, E: int, BM: int) -> tirx.PrimFunc:
    """``(counts[NC, E], prefix[NC, E], off[E + 1])``: ``prefix[c, e]`` = pairs of expert ``e`` in chunks
    before ``c``; ``off[e]`` = first sorted row of expert ``e`` (each expert padded to a multiple of ``BM``;
    ``off[E]`` = rows in use)."""
    NC = -(-NA // CHUNK)
    counts = te.placeholder((NC, E), _I32, name="counts")
    c1 = te.reduce_axis((0, NC), name="c1")
    prefix = te.compute((NC, E), lambda c, e: te.sum(tirx.if_then_else(c1 < c, counts[c1, e], _i32(0)), axis=c1),
                        name="prefix")
    c2 = te.reduce_axis((0, NC), name="c2")
    total = te.compute((E,), lambda e: te.sum(counts[c2, e], axis=c2), name="total")
    e1 = te.reduce_axis((0, E), name="e1")
    off = te.compute((E + 1,), lambda e: te.sum(tirx.if_then_else(
        e1 < e, (total[e1] + (BM - 1)) // BM * BM, _i32(0)), axis=e1), name="off")
    return _func([counts, prefix, off], "kiln_moe_offsets")


def make_pos_te(NA: int, E: int) -> tirx.PrimFunc:
    """``(ids[NA], prefix[NC, E], off[E + 1], pos[NA])``: the sorted row of each (token, slot) pair."""
    NC = -(-NA // CHUNK)
    ids = te.placeholder((NA,), _I32, name="ids")
    prefix = te.placeholder((NC, E), _I32, name="prefix")
    off = te.placeholder((E + 1,), _I32, name="off")
    k = te.reduce_axis((0, CHUNK), name="k")
    before = te.compute((NA,), lambda i: te.sum(tirx.if_then_else(
        tirx.all(k < i % CHUNK, ids[tirx.min(i - i % CHUNK + k, NA - 1)] == ids[i]), _i32(1), _i32(0)), axis=k),
        name="before")
    pos = te.compute((NA,), lambda i: off[ids[i]] + prefix[i // CHUNK, ids[i]] + before[i], name="pos")
    return _func([ids, prefix, off, pos], "kiln_moe_pos")


def make_block_expert_te(E: int, NB: int, BM: int) -> tirx.PrimFunc:
    """``(off[E + 1], block_expert[NB])``: the expert of each ``BM``-row block, ``-1`` past ``off[E]``."""
    off = te.placeholder((E + 1,), _I32, name="off")
    e = te.reduce_axis((0, E), name="e")
    found = te.compute((NB,), lambda b: te.sum(tirx.if_then_else(
        tirx.all(off[e] <= b * BM, b * BM < off[e + 1]), e + 1, _i32(0)), axis=e), name="found")
    be = te.compute((NB,), lambda b: found[b] - 1, name="block_expert")
    return _func([off, be], "kiln_moe_block_expert")


def make_scatter_tir(NA: int, MP: int, T_: int, topk: int) -> tirx.PrimFunc:
    """``(pos[NA], token[MP])``: ``token[r]`` = the token of sorted row ``r``, ``T`` for a padding row.
    (A scatter: TE cannot write through an index, hence TIR; the fill and the scatter are two loop nests,
    two launches on CUDA, in order.)"""

    @T.prim_func(s_tir=True)
    def scatter(pos: T.Buffer((NA,), "int32"), token: T.Buffer((MP,), "int32")):
        T.func_attr({"global_symbol": "kiln_moe_scatter", "tirx.noalias": True})
        for r in range(MP):
            with T.sblock("fill"):
                vr = T.axis.spatial(MP, r)
                token[vr] = T_
        for i in range(NA):
            with T.sblock("scatter"):
                vi = T.axis.spatial(NA, i)
                T.reads(pos[vi])
                T.writes(token[0:MP])
                token[pos[vi]] = vi // topk
    return scatter


def make_gather_te(T_: int, MP: int, H: int, dtype: str) -> tirx.PrimFunc:
    """``(x[T, H], token[MP], xs[MP, H])``: the hidden states in sorted order, zeros in padding rows."""
    x = te.placeholder((T_, H), dtype, name="x")
    tok = te.placeholder((MP,), _I32, name="token")
    xs = te.compute((MP, H), lambda r, k: tirx.if_then_else(
        tok[r] < T_, x[tirx.min(tok[r], T_ - 1), k], tirx.const(0, dtype)), name="xs")
    return _func([x, tok, xs], "kiln_moe_gather")


def make_grouped_gemm_te(MP: int, N: int, K: int, E: int, BM: int, dtype: str, name: str) -> tirx.PrimFunc:
    """``(xs[MP, K], w[E, N, K], block_expert[MP / BM], y[MP, N])``: ``y[r] = xs[r] @ w[expert of r's
    block]^T``, fp32 accumulation, stored in ``dtype``. Unused blocks (``-1``) read expert 0; their rows
    are never read back."""
    xs = te.placeholder((MP, K), dtype, name="xs")
    w = te.placeholder((E, N, K), dtype, name="w")
    be = te.placeholder((MP // BM,), _I32, name="block_expert")
    k = te.reduce_axis((0, K), name="k")
    acc = te.compute((MP, N), lambda r, n: te.sum(
        xs[r, k].astype(_F32) * w[tirx.max(be[r // BM], 0), n, k].astype(_F32), axis=k), name="acc")
    y = te.compute((MP, N), lambda r, n: acc[r, n].astype(dtype), name="y")
    return _func([xs, w, be, y], name)


def make_act_te(MP: int, I: int, dtype: str) -> tirx.PrimFunc:
    """``(y1[MP, 2I], a[MP, I])``: ``a = silu(gate) * up`` in fp32 (gate = first ``I`` columns)."""
    y1 = te.placeholder((MP, 2 * I), dtype, name="y1")

    def act(r, j):
        g, u = y1[r, j].astype(_F32), y1[r, I + j].astype(_F32)
        return (g / (tirx.const(1.0, _F32) + te.exp(tirx.const(0.0, _F32) - g)) * u).astype(dtype)
    a = te.compute((MP, I), act, name="act")
    return _func([y1, a], "kiln_moe_act")


def make_combine_te(T_: int, H: int, topk: int, MP: int, dtype: str) -> tirx.PrimFunc:
    """``(y2[MP, H], pos[T * topk], topk_w[T, topk] f32, out[T, H])``: ``out[t] = sum_j w[t, j] *
    y2[pos[t * topk + j]]`` in fp32 (the slots unrolled), one cast."""
    y2 = te.placeholder((MP, H), dtype, name="y2")
    pos = te.placeholder((T_ * topk,), _I32, name="pos")
    w = te.placeholder((T_, topk), _F32, name="topk_w")

    def comb(t, h):
        total = None
        for j in range(topk):
            term = w[t, j] * y2[pos[t * topk + j], h].astype(_F32)
            total = term if total is None else total + term
        return total.astype(dtype)
    out = te.compute((T_, H), comb, name="out")
    return _func([y2, pos, w, out], "kiln_moe_combine")


#: Threads per CTA of :func:`schedule_threads_cuda`.
_THREADS = 128


def schedule_threads_cuda(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """kiln's CUDA schedule of the small MoE stages: one thread per output element of every block (its
    spatial loops fused, split over ``128``-thread CTAs; reductions stay serial in the thread). Each root
    block is its own launch, in order, so a stage may read what an earlier block of the function wrote.
    The stages are O(T * E) or elementwise, far from the GEMMs' cost. Why not kiln's rule list: every dlight
    rule but ``Fallback`` declines these functions (``Fallback`` is the same one-thread-per-output schedule,
    reported as a fallback), and ``Fallback`` raises on ``kiln_moe_pos`` (IndexError in this wheel)."""
    from tvm import s_tir
    sch = s_tir.Schedule(func)
    for rv in sch.get_child_blocks(sch.get_sblock("root")):
        block = sch.get(rv)
        n_spatial = sum(1 for iv in block.iter_vars if iv.iter_type == tirx.IterVar.DataPar)
        loops = sch.get_loops(rv)[:n_spatial]
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        bx, tx = sch.split(fused, [None, _THREADS])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    name = str(func.attrs["global_symbol"])
    return sch.mod["main"].with_attrs({"tirx.is_scheduled": True, "kiln.rule": "kiln.ops.moe_threads",
                                       "global_symbol": name})
