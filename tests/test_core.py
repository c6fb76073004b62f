"""Knobs, signatures, schedule dispatch and stage invariants: the pieces under kiln.compile."""
import pytest
import tvm
from tvm import relax

from kiln import knobs
from kiln.errors import InputMismatchError, ScheduleFallbackError, StageInvariantError
from kiln.pipeline import CompileState, check_legalized, check_scheduled
from kiln.schedules import DlightRule, apply_rules, default_rules, is_hot
from kiln.schedules.rule import Declined, ScheduleRule
from kiln.signature import Signature, TensorSpec
from kiln.options import CompileOptions
from kiln.target import resolve_target


def test_knob_env_parse_and_scope(monkeypatch):
    monkeypatch.setenv("KILN_STRICT", "yes")
    assert knobs.get("strict") is True
    with knobs.scope(strict=False):
        assert knobs.knobs.strict is False
    assert knobs.get("strict") is True
    monkeypatch.setenv("KILN_STRICT", "maybe")
    with pytest.raises(ValueError, match="KILN_STRICT='maybe'"):
        knobs.get("strict")
    with pytest.raises(KeyError, match="unknown knob"):
        with knobs.scope(nope=1):
            pass


SIG = Signature((TensorSpec("ids", ("batch", "seq"), "int64"), TensorSpec("mask", ("batch", "seq"), "int64")),
                (TensorSpec("output0", ("batch", "seq", 8), "float32"),), {"batch": (1, 4), "seq": (2, 64)})


def test_signature_binds_symbolic_dims():
    env = SIG.bind([(2, 10), (2, 10)], ["int64", "int64"])
    assert env == {"batch": 2, "seq": 10}
    assert SIG.output_shape(0, env) == (2, 10, 8)
    assert Signature.from_json(SIG.to_json()) == SIG


@pytest.mark.parametrize("shapes,dtypes,msg", [
    ([(2, 10)], ["int64"], "expected 2 input"),
    ([(2, 10), (2, 11)], ["int64", "int64"], "'seq'=10 elsewhere, given 11"),
    ([(5, 10), (5, 10)], ["int64", "int64"], r"must be in \[1, 4\], given 5"),
    ([(2, 10), (2, 10)], ["int64", "int32"], "expected dtype int64, given int32"),
    ([(2, 10, 1), (2, 10)], ["int64", "int64"], "expected shape"),
])
def test_signature_rejects_with_expected_vs_given(shapes, dtypes, msg):
    with pytest.raises(InputMismatchError, match=msg):
        SIG.bind(shapes, dtypes)


def _fused(dtype="float16", m=256, n=256, k=256):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, k), dtype))
    w = relax.Var("w", relax.TensorType((k, n), dtype))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, w))
            z = bb.emit(relax.op.nn.relu(y))
            o = bb.emit_output(relax.op.sum(z, axis=[1]))
        bb.emit_func_output(o)
    seq = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                    relax.transform.FuseOps(), relax.transform.FuseTIR()])
    return seq(bb.get())


def test_is_hot_finds_gemm_not_reduction():
    mod = _fused()
    hot = {gv.name_hint: is_hot(f) for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert hot == {"fused_matmul_relu": True, "sum": False}


def test_schedule_report_names_rule_and_declines():
    kt = resolve_target("cuda")
    mod, rep = apply_rules(_fused(), kt.schedule_target, default_rules("cuda"))
    by = {r.func: r for r in rep}
    assert by["fused_matmul_relu"].rule == "dlight.Matmul"
    assert by["sum"].rule == "dlight.Reduction"
    assert [d.rule for d in by["sum"].declined] == ["kiln.gather", "dlight.Matmul", "dlight.Matmul[sm_60]", "dlight.GEMV"]
    assert "not an im2col gather" in by["sum"].declined[0].reason
    assert all(d.reason for d in by["sum"].declined)
    # sm_90 scheduling target: dlight's tensor-core path must be taken (it is skipped for "sm_90a").
    assert "wmma" in mod["fused_matmul_relu"].script() or "mma" in mod["fused_matmul_relu"].script()


class _Never(ScheduleRule):
    name = "never"

    def apply(self, func, target):
        return Declined(self.name, "test rule declines everything")


def test_strict_refuses_fallback_on_hot_op():
    kt = resolve_target("cuda")
    rules = [_Never(), DlightRule(tvm.s_tir.dlight.gpu.Fallback(), fallback=True)]
    with pytest.raises(ScheduleFallbackError, match="fused_matmul_relu"):
        apply_rules(_fused(), kt.schedule_target, rules, strict=True)
    _, rep = apply_rules(_fused(), kt.schedule_target, rules, strict=False)
    assert {r.func: r.fallback for r in rep} == {"fused_matmul_relu": True, "sum": True}


def test_invariant_unscheduled_gpu_func_is_refused():
    state = CompileState(target=resolve_target("cuda"), options=CompileOptions(), mod=_fused())
    with pytest.raises(StageInvariantError, match="without a schedule: .*fused_matmul_relu"):
        check_scheduled(state)
    state.target = resolve_target("llvm")
    check_scheduled(state)  # CPU code needs no thread bindings


def test_invariant_unlegalized_op_is_refused():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            o = bb.emit_output(relax.op.nn.relu(x))
        bb.emit_func_output(o)
    state = CompileState(target=resolve_target("llvm"), options=CompileOptions(), mod=bb.get())
    with pytest.raises(StageInvariantError, match=r"relax.nn.relu \(x1\)"):
        check_legalized(state)
