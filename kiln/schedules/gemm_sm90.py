"""kiln's Hopper GEMM: ``C = epilogue(A @ B^T)`` as a warp-specialised TIRx kernel (TMA + wgmma).

* A: ``[M, K]`` row-major, B: ``[N, K]`` row-major (the ``torch.nn.Linear`` weight layout),
  fp16 or bf16 in, fp32 accumulate, output in the input dtype.
* The epilogue is data: an ordered tuple of elementwise stages applied to the fp32 accumulators in
  registers before the cast and store (see :class:`Epilogue`).
* Supported: any M >= 1 (tails predicated), N a multiple of 8 (N tails predicated), K a multiple of
  8 (K tails zero-filled by TMA); static N and K, and M static or a run-time variable (a dynamic batch
  or sequence: one kernel for every M). Anything else raises ``NotImplementedError`` naming the case
  (``GemmConfig.check`` gives the reason).

Kernel structure: ``gemm_sm90_kernel.py``; tile configs and the default heuristic: ``configs.py``.
Measured on an H200 (``benchmarks/gemm.py``, results in ``benchmarks/results/2026-11-21-h200/gemm.json``):
0.96x cuBLAS at 8192^3, 0.62-0.91x at BERT-Large linear shapes for the plain GEMM, 0.88-1.26x
against ``linear(+bias) + gelu`` when the bias+gelu epilogue is fused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import tvm

from .configs import GEMM_DTYPES, SM90_NUM_SMS, GemmConfig, lookup_sm90_config, select_sm90_config
from .gemm_sm90_kernel import build_gemm_kernel, build_splitk_reduce_kernel

__all__ = ["Epilogue", "EPILOGUE_STAGES", "make_gemm_sm90", "make_gemm_sm90_kernels", "build_gemm_sm90", "cuda_source", "GemmSM90",
           "SM90A_TARGET", "torch_reference"]

#: The target the kernel is built for (wgmma and setmaxnreg need the arch-specific sm_90a).
SM90A_TARGET = {"kind": "cuda", "arch": "sm_90a"}
#: stage name -> number of arguments after the name
EPILOGUE_STAGES = {"bias": 0, "gelu": 0, "gelu_tanh": 0, "relu": 0, "silu": 0, "residual": 0, "scale": 1}
_GELU_C = math.sqrt(2.0 / math.pi)
_SQRT1_2 = math.sqrt(0.5)


@dataclass(frozen=True)
class Epilogue:
    """An ordered tuple of elementwise stages applied to the fp32 accumulator, then a cast.

    Stages: ``("bias",)`` adds a per-column vector ``bias[N]`` (input dtype); ``("residual",)`` adds
    an ``[M, N]`` tensor (output dtype); ``("gelu",)`` (exact, erf), ``("gelu_tanh",)``, ``("relu",)``,
    ``("silu",)`` are activations; ``("scale", s)`` multiplies by the float ``s``. ``bias`` and ``residual`` may each
    appear once; the kernel then takes that extra input (order: A, B, bias, residual, C).
    A bare string is accepted for argument-less stages: ``Epilogue(("bias", "gelu_tanh"))``.
    """

    stages: tuple = ()

    def __post_init__(self):
        norm = []
        for st in self.stages:
            st = (st,) if isinstance(st, str) else tuple(st)
            if not st or st[0] not in EPILOGUE_STAGES:
                raise ValueError(f"unknown epilogue stage {st!r}; known: {', '.join(EPILOGUE_STAGES)}")
            nargs = EPILOGUE_STAGES[st[0]]
            if len(st) != 1 + nargs:
                raise ValueError(f"epilogue stage {st[0]!r} takes {nargs} argument(s), given {st[1:]!r}")
            if st[0] == "scale":
                if isinstance(st[1], bool) or not isinstance(st[1], (int, float)) or not math.isfinite(st[1]):
                    raise ValueError(f"scale factor must be a finite number, given {st[1]!r}")
                st = ("scale", float(st[1]))
            norm.append(st)
        for once in ("bias", "residual"):
            if sum(s[0] == once for s in norm) > 1:
                raise ValueError(f"epilogue stage {once!r} may appear only once (it has one input tensor)")
        object.__setattr__(self, "stages", tuple(norm))

    @property
    def has_bias(self) -> bool:
        return any(s[0] == "bias" for s in self.stages)

    @property
    def has_residual(self) -> bool:
        return any(s[0] == "residual" for s in self.stages)

    def name(self) -> str:
        return "+".join(s[0] if len(s) == 1 else f"{s[0]}{s[1]:g}" for s in self.stages) or "none"

    def apply_tir(self, x, bias=None, residual=None):
        """The stages as a TIR expression of the fp32 value ``x`` (``bias``/``residual``: fp32 exprs)."""
        from tvm import tirx
        f32 = lambda v: tirx.const(v, "float32")  # noqa: E731
        for st in self.stages:
            op = st[0]
            if op == "bias":
                x = x + bias
            elif op == "residual":
                x = x + residual
            elif op == "scale":
                x = x * f32(st[1])
            elif op == "relu":
                x = tirx.max(x, f32(0.0))
            elif op == "silu":
                x = _let(x, lambda v: v / (f32(1.0) + tirx.exp(f32(0.0) - v)))
            elif op == "gelu_tanh":
                x = _let(x, lambda v: f32(0.5) * v * (f32(1.0) + tirx.tanh(
                    f32(_GELU_C) * (v + f32(0.044715) * v * v * v))))
            elif op == "gelu":
                x = _let(x, lambda v: f32(0.5) * v * (f32(1.0) + tirx.erf(v * f32(_SQRT1_2))))
        return x

    def apply_torch(self, x, bias=None, residual=None):
        """Reference: the same stages on a float tensor (``bias``/``residual`` upcast to ``x.dtype``)."""
        import torch
        for st in self.stages:
            op = st[0]
            if op == "bias":
                x = x + bias.to(x.dtype)
            elif op == "residual":
                x = x + residual.to(x.dtype)
            elif op == "scale":
                x = x * st[1]
            elif op == "relu":
                x = torch.relu(x)
            elif op == "silu":
                x = torch.nn.functional.silu(x)
            elif op == "gelu_tanh":
                x = torch.nn.functional.gelu(x, approximate="tanh")
            elif op == "gelu":
                x = torch.nn.functional.gelu(x)
        return x


def _let(x, body):
    """``body(v)`` with ``v`` bound to ``x`` once (a TIR Let), so stacked stages do not duplicate ``x``."""
    from tvm import tirx
    if isinstance(x, (tirx.Var, tirx.FloatImm)):
        return body(x)
    v = tirx.Var("e", "float32")
    return tirx.Let(v, x, body(v))


def _as_epilogue(epilogue) -> Epilogue:
    if epilogue is None:
        return Epilogue()
    return epilogue if isinstance(epilogue, Epilogue) else Epilogue(tuple(epilogue))


def _valid_config(M, N, K, dtype, config, epi_name="none", num_sms=SM90_NUM_SMS) -> GemmConfig:
    if dtype not in GEMM_DTYPES:
        raise NotImplementedError(f"sm_90a GEMM: dtype {dtype!r} unsupported (supported: {', '.join(GEMM_DTYPES)})")
    cfg = config if config is not None else lookup_sm90_config(M, N, K, dtype, epi_name, num_sms)[0]
    bad_tile = cfg.check_tile()
    if bad_tile:
        raise ValueError(f"invalid sm_90a GEMM config {cfg}: {bad_tile}")
    reason = cfg.check(M, N, K, dtype)
    if reason:
        raise NotImplementedError(f"sm_90a GEMM M={M} N={N} K={K} {dtype} with {cfg.name()}: {reason}")
    return cfg


def _dynamic_config(M, N, K, dtype, config, m_hint, num_sms) -> GemmConfig:
    """The tile of a dynamic-M kernel: ``config`` (checked at ``m_hint``; made persistent) or the heuristic's."""
    from .configs import select_sm90_dynamic_config
    if dtype not in GEMM_DTYPES:
        raise NotImplementedError(f"sm_90a GEMM: dtype {dtype!r} unsupported (supported: {', '.join(GEMM_DTYPES)})")
    if not isinstance(M, tvm.tirx.Var) or str(M.ty) not in ("int32", "int64"):
        raise TypeError(f"M must be an int or an int32/int64 tirx.Var (a dynamic M), given {M!r}")
    if config is None:
        return select_sm90_dynamic_config(m_hint, N, K, dtype, num_sms)
    if config.split_k > 1:
        raise NotImplementedError(f"{config.name()}: a dynamic-M GEMM does not split K")
    reason = config.check_tile() or config.check(max(1, int(m_hint or 1)), N, K, dtype)
    if reason:
        raise NotImplementedError(f"sm_90a GEMM M=<dynamic> N={N} K={K} {dtype} with {config.name()}: {reason}")
    return replace(config, persistent=True)


def make_gemm_sm90_kernels(M, N: int, K: int, dtype: str = "float16", epilogue: Any = None,
                           config: GemmConfig | None = None, num_sms: int = SM90_NUM_SMS,
                           out_splits: tuple | None = None, m_hint: int | None = None) -> tuple[tvm.tirx.PrimFunc, ...]:
    """The TIRx PrimFuncs of ``C = epilogue(A @ B^T)`` for sm_90a, in launch order.

    One kernel ``(A[M,K], B[N,K], [bias[N]], [residual[M,N]], C[M,N])`` (all in ``dtype``), or, when
    the config splits K (``split_k > 1``), two: ``(A, B, P[split_k, M, N] fp32)`` then
    ``(P, [bias], [residual], C)`` (sum of the partials + epilogue). ``config`` defaults to the tuned
    table's entry for the problem, else :func:`select_sm90_config` (:func:`lookup_sm90_config`).
    Raises ``ValueError`` for an invalid tile config and
    ``NotImplementedError`` (with the reason) for a problem the kernel does not handle. ``num_sms``
    sizes the grid of persistent configs (132 on H100 SXM / H200). ``out_splits`` (1-3 column counts
    summing to N, each a multiple of ``block_n``) replaces ``C`` by that many outputs ``[M, N_i]``
    (horizontally fused sibling GEMMs); a residual is then not supported.

    ``M`` may be a ``tirx.Var`` (int32 or int64): one kernel then serves every M >= 1 at run time (the
    buffers' first dimension is that variable). It runs a fixed persistent grid (every CTA slot walks the
    tiles, so the launch does not depend on M) and never splits K; the tile is chosen for ``m_hint`` (an
    upper bound or typical M; default :data:`~kiln.schedules.configs.DYNAMIC_M_HINT`). An M whose
    ``M * max(N, K)`` reaches 2^31 fails the call with a TVM assertion naming the limit.
    """
    epi = _as_epilogue(epilogue)
    if not isinstance(M, int):
        cfg = _dynamic_config(M, N, K, dtype, config, m_hint, num_sms)
    else:
        cfg = _valid_config(M, N, K, dtype, config, epi.name(), num_sms)
    if out_splits and epi.has_residual:
        raise NotImplementedError("a multi-output (out_splits) GEMM takes no residual: it would be split too")
    if out_splits and cfg.split_k == 1 and any(n % cfg.block_n for n in out_splits):
        raise NotImplementedError(f"out_splits {tuple(out_splits)}: each must be a multiple of block_n="
                                  f"{cfg.block_n} of {cfg.name()} (a tile may not straddle two outputs)")
    attrs = {"kiln.gemm_config": cfg.name(), "kiln.epilogue": epi.name(), "tirx.is_scheduled": True}
    if cfg.split_k == 1:
        func = build_gemm_kernel(M, N, K, dtype, cfg, epi.apply_tir, epi.has_bias, epi.has_residual,
                                 num_sms=num_sms, out_splits=out_splits)
        return (func.with_attrs(attrs),)
    part = build_gemm_kernel(M, N, K, dtype, cfg, Epilogue().apply_tir, False, False, num_sms=num_sms,
                             name="kiln_gemm_sm90_splitk")
    red = build_splitk_reduce_kernel(M, N, cfg.split_k, dtype, epi.apply_tir, epi.has_bias, epi.has_residual,
                                     out_splits=out_splits)
    return part.with_attrs(attrs), red.with_attrs(attrs)


def make_gemm_sm90(M: int, N: int, K: int, dtype: str = "float16", epilogue: Any = None,
                   config: GemmConfig | None = None, num_sms: int = SM90_NUM_SMS) -> tvm.tirx.PrimFunc:
    """The single TIRx PrimFunc of ``C = epilogue(A @ B^T)`` (a config without split-K; see
    :func:`make_gemm_sm90_kernels` for the general case). Parameters: ``(A[M,K], B[N,K], [bias[N]],
    [residual[M,N]], C[M,N])``, all in ``dtype``. ``config`` defaults to :func:`select_sm90_config`
    with split-K turned off."""
    if config is None:
        config = select_sm90_config(M, N, K, dtype, num_sms)
        if config.split_k > 1:
            config = replace(config, split_k=1)
    if config.split_k > 1:
        raise ValueError(f"config {config.name()} splits K into two kernels: use make_gemm_sm90_kernels")
    return make_gemm_sm90_kernels(M, N, K, dtype, epilogue, config, num_sms)[0]


def build_gemm_sm90(*funcs: tvm.tirx.PrimFunc):
    """``tvm.compile`` the PrimFunc(s) for sm_90a with the TIRx pipeline (CUDA source only; it is JIT
    compiled when the module is loaded on a GPU)."""
    mod = tvm.IRModule({str(f.attrs["global_symbol"]): f for f in funcs})
    return tvm.compile(mod, tvm.target.Target(SM90A_TARGET), tir_pipeline="tirx")


def cuda_source(ex) -> str:
    """The generated CUDA C of a built module (all CUDA sub-modules concatenated)."""
    out, todo = [], [ex.mod if hasattr(ex, "mod") else ex]
    while todo:
        m = todo.pop()
        todo.extend(getattr(m, "imports", []))
        if getattr(m, "kind", "") == "cuda":
            out.append(m.inspect_source())
    return "\n".join(out)


def torch_reference(a, b, epilogue: Any = None, bias=None, residual=None):
    """fp32 reference of ``epilogue(a @ b^T)`` (inputs upcast; the result stays fp32)."""
    epi = _as_epilogue(epilogue)
    acc = a.float() @ b.float().t()
    return epi.apply_torch(acc, None if bias is None else bias.float(),
                           None if residual is None else residual.float())


class GemmSM90:
    """A built kernel callable on CUDA torch tensors: ``g(a, b, bias=None, residual=None, out=None)``.

    ``M=None`` builds the dynamic-M kernel (one build for every M; see :func:`make_gemm_sm90_kernels`).

    Tensors are passed zero-copy through DLPack; the launch goes to TVM's current stream of the
    device (the default stream, which is torch's default stream too). With ``out_splits`` the result
    is a list of ``[M, N_i]`` tensors (``out`` is then a list too).
    """

    def __init__(self, M: int | None, N: int, K: int, dtype: str = "float16", epilogue: Any = None,
                 config: GemmConfig | None = None, out_splits: tuple | None = None, m_hint: int | None = None):
        self.M, self.N, self.K, self.dtype = M, N, K, dtype
        self.epilogue = _as_epilogue(epilogue)
        self.out_splits = tuple(out_splits) if out_splits else None
        if M is None:        # dynamic M: one kernel, M read from the tensors at each call
            m = tvm.tirx.Var("m", "int64")
            self.config = _dynamic_config(m, N, K, dtype, config, m_hint, SM90_NUM_SMS)
        else:
            m = M
            self.config = config if config is not None else \
                lookup_sm90_config(M, N, K, dtype, self.epilogue.name())[0]
        self.funcs = make_gemm_sm90_kernels(m, N, K, dtype, self.epilogue, self.config, out_splits=self.out_splits)
        self.func = self.funcs[0]
        self.ex = build_gemm_sm90(*self.funcs)
        self._f = None
        self._ws = None

    @property
    def source(self) -> str:
        return cuda_source(self.ex)

    def _args(self, a, b, bias, residual, out):
        """TVM argument lists of the one or two launches (validated; split-K workspace allocated)."""
        import torch
        if self._f is None:
            self._f = [self.ex[str(f.attrs["global_symbol"])] for f in self.funcs]
        tdt = getattr(torch, self.dtype)
        M = self._m(a)
        want = {"a": (a, (M, self.K)), "b": (b, (self.N, self.K))}
        if self.epilogue.has_bias:
            want["bias"] = (bias, (self.N,))
        if self.epilogue.has_residual:
            want["residual"] = (residual, (M, self.N))
        outs = out if self.out_splits else [out]
        for i, n in enumerate(self.out_splits or (self.N,)):
            want[f"out{i}"] = (outs[i], (M, n))
        for nm, (t, shape) in want.items():
            if t is None or tuple(t.shape) != shape or t.dtype != tdt or not t.is_cuda or not t.is_contiguous():
                got = None if t is None else (tuple(t.shape), t.dtype, t.device, t.is_contiguous())
                raise ValueError(f"{nm}: expected a contiguous CUDA {self.dtype} tensor of shape {shape}, got {got}")
        dl = tvm.runtime.from_dlpack
        ts = [dl(want[k][0]) for k in want]
        if len(self._f) == 1:
            return [ts]
        if self._ws is None or self._ws.device != a.device:   # fp32 partials of the split-K kernel
            self._ws = torch.empty((self.config.split_k, self.M, self.N), dtype=torch.float32, device=a.device)
        ws = dl(self._ws)
        return [ts[:2] + [ws], [ws] + ts[2:]]

    def _m(self, a) -> int:
        """The call's M: fixed, or (dynamic M) the rows of ``a`` (at least 1)."""
        if self.M is not None:
            return self.M
        if a is None or a.dim() != 2 or a.shape[0] < 1:
            raise ValueError(f"a: expected a 2-D [M >= 1, {self.K}] tensor for the dynamic-M kernel, got "
                             f"{None if a is None else tuple(a.shape)}")
        return int(a.shape[0])

    def bind(self, a, b, bias=None, residual=None, out=None):
        """A zero-argument launcher of the kernel(s) on these tensors, converted and checked once (for
        timing loops: no per-call DLPack conversion). ``out`` is required."""
        arg_lists = self._args(a, b, bias, residual, out)
        calls = list(zip(self._f, arg_lists))
        return lambda: [f(*args) for f, args in calls]

    def __call__(self, a, b, bias=None, residual=None, out=None):
        import torch
        if out is None:
            dev, tdt, M = a.device, getattr(torch, self.dtype), self._m(a)
            out = ([torch.empty((M, n), dtype=tdt, device=dev) for n in self.out_splits] if self.out_splits
                   else torch.empty((M, self.N), dtype=tdt, device=dev))
        arg_lists = self._args(a, b, bias, residual, out)
        for f, args in zip(self._f, arg_lists):
            f(*args)
        return out
