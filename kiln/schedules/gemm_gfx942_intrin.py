"""gfx942 MFMA tensor intrinsics for kiln's GEMM schedule (fp16, bf16, fp8), registered as ``kiln_gfx942_*``.

TVM 0.27 registers fp16 MFMA (``rocm_mfma_f16f16f32``, the A load, the f32 fill) but no bf16 or fp8
MFMA, no load of a B tile stored ``[N, K]`` (the Linear layout) and no accumulator store to LDS (its
store writes global memory, which leaves no room for a fused epilogue). kiln generates all of them
from one set of lane maps. The fp16 ones are the same functions as TVM's registered ones
(``tests/test_gemm_gfx942.py`` checks descriptions and implementations structurally equal), but are
not taken from ``tvm.s_tir.tensor_intrin``: importing that package parses every target's intrinsics
(CUDA's alone took 48 s on this 2-core machine) and a rocm compile needs none of them.

Lane layouts (CDNA3 ISA, "Matrix fused multiply-add"; the same maps as ``tvm.s_tir.tensor_intrin.rocm``):
an operand tile of 16 rows x ``k`` (A: rows = M, B: rows = N) sits in 64 lanes x ``k // 4`` values,
lane ``r + 16 * (c // (k // 4))`` holding column ``c`` at slot ``c % (k // 4)``; the 16x16 fp32
result sits in lane ``n + 16 * (m // 4)``, slot ``m % 4``. fp16/bf16 use k = 16 (4 values a lane),
fp8 k = 32 (8 values a lane, one 64-bit register). The fp16 maps are TVM's registered ones; that the
bf16 and fp8 instructions take their operands in the same arrangement is read from the ISA and
cannot be checked here (no MI300): the CPU numerics prove the description, not the hardware.

bf16 and fp8 operands are stored as ``uint16`` / ``uint8`` bits (see
:mod:`.gemm_gfx942_schedule` for why); their MFMA description decodes them with
``reinterpret``, and the implementation hands the bits to the instruction unchanged.

:func:`reference_intrin` registers, for any intrinsic here, a twin whose implementation is its own
description, so that the identical schedule can be tensorized and run on the CPU. The fp8 twin
decodes with :func:`decode_e4m3fnuz`: TVM's LLVM lowering of ``float8_e4m3fnuz`` -> float32 is
wrong for every one of the 256 codes in this wheel (it applies the OCP bias 7 instead of 8 and maps
0x00 to 2^-7; measured), and the check is meant to test the schedule, not that conversion.
"""
from __future__ import annotations

from tvm import tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

__all__ = ["MFMA_SHAPES", "FP8_DTYPE", "STORAGE", "WARP", "intrin_names", "reference_intrin",
           "operand_layout", "operand_lane_of", "result_layout", "result_lane_of", "decode_e4m3fnuz"]

#: gfx942's fp8 is the FNUZ e4m3 (exponent bias 8, no inf, 0x80 = NaN), not OCP e4m3fn.
FP8_DTYPE = "float8_e4m3fnuz"
#: input dtype -> (m, n, k) of the MFMA used for it (fp32 accumulate in every case)
MFMA_SHAPES = {"float16": (16, 16, 16), "bfloat16": (16, 16, 16), FP8_DTYPE: (16, 16, 32)}
#: input dtype -> dtype the kernel's LDS and registers hold it in
STORAGE = {"float16": "float16", "bfloat16": "uint16", FP8_DTYPE: "uint8"}
WARP = 64
_LLVM_MFMA = {
    "float16": "llvm.amdgcn.mfma.f32.16x16x16f16",          # <4 x half> operands
    "bfloat16": "llvm.amdgcn.mfma.f32.16x16x16bf16.1k",     # <4 x i16>
    FP8_DTYPE: "llvm.amdgcn.mfma.f32.16x16x32.fp8.fp8",     # i64
}
_ABBREV = {"float16": "f16", "bfloat16": "bf16", FP8_DTYPE: "fp8"}


def operand_layout(k: int):
    """(row, col) of a 16 x ``k`` operand tile -> (lane, slot)."""
    per = k // 4
    return lambda r, c: (r + 16 * (c // per), c % per)


def operand_lane_of(k: int):
    """Inverse of :func:`operand_layout`: (lane, slot) -> (row, col)."""
    per = k // 4
    return lambda lane, slot: (lane % 16, (lane // 16) * per + slot)


def result_layout(m, n):
    """(m, n) of the 16x16 fp32 result -> (lane, slot)."""
    return n + (m // 4) * 16, m % 4


def result_lane_of(lane, slot):
    """Inverse of :func:`result_layout`."""
    return (lane // 16) * 4 + slot, lane % 16


def _b_operand(k: int):
    # operand_layout for B (row = n, col = k), with the terms in the order TVM's registered fp16
    # description writes them, so that the two compare structurally equal
    per = k // 4
    return lambda n, c: (n + (c // per) * 16, c % per)


def decode_e4m3fnuz(bits):
    """float32 value of a ``uint8`` e4m3fnuz code (TIR expression): 2^(e-8) (1 + m/8) for e > 0,
    m 2^-10 for e = 0, NaN for 0x80."""
    x = tirx.Cast("int32", bits)
    sign, exp, man = (x >> 7) & 1, (x >> 3) & 15, x & 7
    normal = tirx.reinterpret("float32", (sign << 31) | ((exp + 119) << 23) | (man << 20))
    sub = tirx.Cast("float32", man) * tirx.const(2.0 ** -10, "float32")
    sub = tirx.Select(sign == 1, tirx.const(0.0, "float32") - sub, sub)
    nan = tirx.reinterpret("float32", tirx.const(0x7FC00000, "int32"))
    return tirx.Select(x == 128, nan, tirx.Select(exp == 0, sub, normal))


def _decoder(dtype: str, exact_fp8: bool):
    """Storage element (TIR load) -> float32, as the MFMA description states it."""
    if dtype == "float16":
        return lambda v: T.Cast("float32", v)
    if dtype == FP8_DTYPE and exact_fp8:
        return decode_e4m3fnuz
    return lambda v: T.Cast("float32", T.reinterpret(dtype, v))


def _flex(flexible: bool, offset_factor: int):
    """Buffer declaration knobs of a description: as registered (``flexible=False``), or accepting
    any offset and strides, which a description used as its own implementation needs."""
    if not flexible:
        return offset_factor, None
    return 1, [tirx.Var("s0", "int32"), tirx.Var("s1", "int32")]


def _fill_desc(flexible: bool = False):
    off, _ = _flex(flexible, 0)

    @T.prim_func(s_tir=True)
    def desc(a: T.handle) -> None:
        C = T.match_buffer(a, [WARP, 4], dtype="float32", scope="warp", offset_factor=off)
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:WARP, 0:4])
            for i0, i1 in T.grid(16, 16):
                with T.sblock("C_warp"):
                    i, j = T.axis.remap("SS", [i0, i1])
                    lane, slot = T.meta_var(result_layout(i, j))
                    T.reads()
                    T.writes(C[lane, slot])
                    C[lane, slot] = T.float32(0)

    return desc


def _fill_impl():
    @T.prim_func(s_tir=True)
    def impl(a: T.handle) -> None:
        C = T.match_buffer(a, [WARP, 4], dtype="float32", scope="warp", offset_factor=1)
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:WARP, 0:4])
            tx = T.env_thread("threadIdx.x")
            T.launch_thread(tx, WARP)
            for slot in T.serial(0, 4):
                C[tx, slot] = T.float32(0)

    return impl


def _store_desc(flexible: bool = False):
    """One wave's 16x16 fp32 result -> an LDS tile (the epilogue reads it from there)."""
    off, strides = _flex(flexible, 0)

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, c: T.handle) -> None:
        C_warp = T.match_buffer(a, [WARP, 4], dtype="float32", scope="warp", offset_factor=off)
        C = T.match_buffer(c, [16, 16], dtype="float32", scope="shared", offset_factor=off,
                           strides=strides)
        with T.sblock("root"):
            T.reads(C_warp[0:WARP, 0:4])
            T.writes(C[0:16, 0:16])
            for i0, i1 in T.grid(16, 16):
                with T.sblock("C_warp"):
                    v0, v1 = T.axis.remap("SS", [i0, i1])
                    lane, slot = T.meta_var(result_layout(v0, v1))
                    T.reads(C_warp[lane, slot])
                    T.writes(C[v0, v1])
                    C[v0, v1] = C_warp[lane, slot]

    return desc


def _store_impl():
    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        C_warp = T.match_buffer(a, [WARP, 4], dtype="float32", scope="warp", offset_factor=1)
        C = T.match_buffer(c, [16, 16], dtype="float32", scope="shared", offset_factor=1,
                           strides=[s0, s1])
        with T.sblock("root"):
            T.reads(C_warp[0:WARP, 0:4])
            T.writes(C[0:16, 0:16])
            tx = T.env_thread("threadIdx.x")
            T.launch_thread(tx, WARP)
            for i in range(4):
                lane_m, lane_n = T.meta_var(result_lane_of(tx, i))
                C[lane_m, lane_n] = C_warp[tx, i]

    return impl


def _load_desc(storage: str, k: int, flexible: bool = False):
    """LDS tile ``[16, k]`` (A rows = M, or B rows = N) -> one wave's operand registers."""
    per = k // 4
    fwd = operand_layout(k)
    off, strides = _flex(flexible, 1)

    @T.prim_func(s_tir=True)
    def desc(reg_h: T.handle, mem_h: T.handle) -> None:
        mem = T.match_buffer(mem_h, (16, k), storage, offset_factor=off, scope="shared", strides=strides)
        reg = T.match_buffer(reg_h, (WARP, per), storage, offset_factor=off, scope="warp")
        with T.sblock("root"):
            T.reads(mem[0:16, 0:k])
            T.writes(reg[0:WARP, 0:per])
            for a0, a1 in T.grid(16, k):
                with T.sblock("memory_reg"):
                    v0, v1 = T.axis.remap("SS", [a0, a1])
                    lane, slot = T.meta_var(fwd(v0, v1))
                    T.reads(mem[v0, v1])
                    T.writes(reg[lane, slot])
                    reg[lane, slot] = mem[v0, v1]

    return desc


def _load_impl(storage: str, k: int):
    per = k // 4
    inv = operand_lane_of(k)

    @T.prim_func(s_tir=True)
    def impl(reg_h: T.handle, mem_h: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        mem = T.match_buffer(mem_h, (16, k), storage, align=64, offset_factor=1, scope="shared",
                             strides=[s0, s1])
        reg = T.match_buffer(reg_h, (WARP, per), storage, align=64, offset_factor=1, scope="warp")
        with T.sblock("root"):
            T.reads(mem[0:16, 0:k])
            T.writes(reg[0:WARP, 0:per])
            tx = T.env_thread("threadIdx.x")
            for slot in T.serial(0, per):
                row, col = T.meta_var(inv(tx, slot))
                T.launch_thread(tx, WARP)
                reg[tx, slot] = mem[row, col]

    return impl


def _mfma_desc(dtype: str, k: int, flexible: bool = False, exact_fp8: bool = False):
    """C[16,16] (fp32) += A[16,k] . B[16,k]^T on one wave's registers."""
    per = k // 4
    storage = STORAGE[dtype]
    a_map, b_map = operand_layout(k), _b_operand(k)
    dec = _decoder(dtype, exact_fp8)
    off, _ = _flex(flexible, 1)

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WARP, per), storage, offset_factor=off, scope="warp")
        B = T.match_buffer(b, (WARP, per), storage, offset_factor=off, scope="warp")
        C = T.match_buffer(c, (WARP, 4), "float32", offset_factor=off, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:4], A[0:WARP, 0:per], B[0:WARP, 0:per])
            T.writes(C[0:WARP, 0:4])
            for i, j, kk in T.grid(16, 16, k):
                with T.sblock("C"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, kk])
                    lc, sc = T.meta_var(result_layout(vi, vj))
                    la, sa = T.meta_var(a_map(vi, vk))
                    lb, sb = T.meta_var(b_map(vj, vk))
                    T.reads(C[lc, sc], A[la, sa], B[lb, sb])
                    T.writes(C[lc, sc])
                    C[lc, sc] += dec(A[la, sa]) * dec(B[lb, sb])

    return desc


def _mfma_impl(dtype: str, k: int):
    per = k // 4
    storage = STORAGE[dtype]
    llvm_name = _LLVM_MFMA[dtype]

    def operand(buf, tx):
        vec = buf[tx, T.ramp(0, 1, per)]
        # fp16: <4 x half>; bf16: the uint16 bits as <4 x i16>; fp8: the 8 uint8 codes as one i64
        return T.reinterpret(vec, dtype="int64") if per == 8 else vec

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WARP, per), storage, offset_factor=1, scope="warp")
        B = T.match_buffer(b, (WARP, per), storage, offset_factor=1, scope="warp")
        C = T.match_buffer(c, (WARP, 4), "float32", offset_factor=1, scope="warp")
        with T.sblock("root"):
            T.reads(A[0:WARP, 0:per], B[0:WARP, 0:per], C[0:WARP, 0:4])
            T.writes(C[0:WARP, 0:4])
            tx = T.env_thread("threadIdx.x")
            T.launch_thread(tx, WARP)
            C[tx, T.ramp(0, 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_name), operand(A, tx), operand(B, tx),
                C[tx, T.ramp(0, 1, 4)], T.int32(0), T.int32(0), T.int32(0), dtype="float32x4")

    return impl


# registered name -> (description builder(flexible) for the hardware intrinsic, for its CPU twin)
_DESCS: dict = {}


def _register(name: str, desc_fn, impl, twin_fn=None) -> str:
    if name not in _DESCS:
        TensorIntrin.register(name, desc_fn(False), impl, override=True)
        _DESCS[name] = (desc_fn, twin_fn or desc_fn)
    return name


def intrin_names(dtype: str) -> dict:
    """The tensor intrinsics of the gfx942 GEMM for one input dtype, registering them on first use.

    Returns
    -------
    dict
        ``load_a``, ``load_b`` (B stored ``[N, K]`` in LDS), ``mfma``, ``fill`` (zero the fp32
        accumulator) and ``store`` (accumulator -> an fp32 LDS tile), each a registered name.
    """
    if dtype not in MFMA_SHAPES:
        raise NotImplementedError(f"no gfx942 MFMA for {dtype!r} (supported: {', '.join(MFMA_SHAPES)})")
    k = MFMA_SHAPES[dtype][2]
    ab, storage = _ABBREV[dtype], STORAGE[dtype]

    def load(flexible):
        return _load_desc(storage, k, flexible)

    def mfma(flexible):
        return _mfma_desc(dtype, k, flexible)

    def mfma_twin(flexible):
        return _mfma_desc(dtype, k, flexible, exact_fp8=True)

    return {
        "fill": _register("kiln_gfx942_fill_16x16_f32", _fill_desc, _fill_impl()),
        "store": _register("kiln_gfx942_store_16x16_f32_shared", _store_desc, _store_impl()),
        "load_a": _register(f"kiln_gfx942_load_a_{ab}", load, _load_impl(storage, k)),
        "load_b": _register(f"kiln_gfx942_load_b_nk_{ab}", load, _load_impl(storage, k)),
        "mfma": _register(f"kiln_gfx942_mfma_f32_16x16x{k}_{ab}", mfma, _mfma_impl(dtype, k), mfma_twin),
    }


def reference_intrin(name: str) -> str:
    """Register (once) and return the name of a twin of ``name`` that matches the same description
    and whose implementation is that description (buffers accepting any offset and strides; fp8
    decoded exactly): the schedule tensorizes against the same pattern, and the result runs on any
    target, the CPU included."""
    if name not in _DESCS:
        raise KeyError(f"{name!r} is not a kiln gfx942 intrinsic (call intrin_names first)")
    twin = f"{name}__as_described"
    if twin not in _DESCS:
        desc_fn, twin_fn = _DESCS[name]
        TensorIntrin.register(twin, desc_fn(False), twin_fn(True), override=True)
        _DESCS[twin] = (desc_fn, twin_fn)
    return twin
