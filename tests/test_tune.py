"""kiln.tune on the CPU: validation gates every choice, strategies on synthetic timings, dynamic axes,
save / load with integrity checks, the JIT cache, the report, and the callable package."""
import inspect
import json
import math
import os
import sys

import pytest
import torch
from torch import nn

import kiln
import kiln.tune.backends as tb
from kiln.errors import ArtifactIntegrityError, TuneError, TunedModelMismatchError
from kiln.tune import (FirstWins, HighestThroughput, LatencyBudget, Measurement, MinLatency, OneBackend, Plan, Strategy,
                       Table, TimingConfig)

FAST = TimingConfig(warmup=1, reps=3, min_reps=1, budget_s=0.05)


class Net(nn.Module):
    """A conv backbone and an MLP head: two candidate children under the root."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.head = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 5))

    def forward(self, x):
        return self.head(self.backbone(x))


def _net(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def _samples():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, 9, 7, generator=g), torch.randn(5, 3, 9, 7, generator=g)]


def _eager(req):
    return tb.original_forward(req.module)


def _fast_and_wrong(req):
    """Answers from a per-shape cache (faster than any real backend) with results 1% off."""
    fwd, cache = _eager(req), {}

    def run(*a):
        key = tuple(tuple(x.shape) for x in a)
        if key not in cache:
            cache[key] = fwd(*a) * 1.01
        return cache[key]
    return run


@pytest.fixture(scope="module")
def wrong_backend():
    """Fastest and wrong: validation must keep it out of every plan."""
    tb.register_backend("wrong", _fast_and_wrong, replace=True)
    yield "wrong"
    tb.unregister_backend("wrong")


@pytest.fixture(scope="module")
def tuned(wrong_backend):
    model, xs = _net(), _samples()
    refs = [model(x).detach() for x in xs]
    res = kiln.tune(model, xs, backends=("kiln", "torch", "tvm", wrong_backend), strategy=MinLatency(), timing=FAST)
    return res, model, xs, refs


# --------------------------------------------------------------------------- the package
def test_package_is_callable_and_keeps_its_submodules():
    import importlib
    assert callable(kiln.tune) and kiln.tune is sys.modules["kiln.tune"]
    assert "samples" in inspect.signature(kiln.tune).parameters
    importlib.import_module("kiln.tune.strategy")
    importlib.import_module("kiln.tune.jit_cache")
    assert kiln.tune is sys.modules["kiln.tune"] and callable(kiln.tune)
    assert kiln.tune.tune is kiln.tune.core.tune and kiln.jit is kiln.tune.jit_cache.jit
    # kiln.tune.<name> stays free for submodules (e.g. the GEMM-table tuner kiln.tune.gemm)
    assert getattr(kiln.tune, "gemm", None) in (None, sys.modules.get("kiln.tune.gemm"))
    assert {"tune", "save", "load_tuned", "jit"} <= set(kiln.__all__)


# --------------------------------------------------------------------------- validation gates the choice
def test_wrong_backend_fails_validation_and_is_never_chosen(tuned):
    res, model, xs, refs = tuned
    for m in ("", "backbone", "head"):
        row = res.table.get(m, "wrong")
        assert not row.ok and "tolerance" in row.reason and row.latency_ms is None
        assert res.table.get(m, "kiln").ok and res.table.get(m, "tvm").ok, res.report()
    assert "wrong" not in res.plan.assign.values()
    for x, ref in zip(xs, refs):
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    assert res.end_to_end["rel_err"] <= 1e-4 and not res.end_to_end["problems"]
    if res.plan.replaced:
        with pytest.raises(TuneError, match="already tuned"):
            kiln.tune(model, xs, backends=("torch",))


def test_a_strategy_cannot_smuggle_in_an_invalid_choice(wrong_backend):
    with pytest.raises(TuneError, match="did not pass validation"):
        kiln.tune(_net(), _samples(), backends=(wrong_backend,), strategy=_Pinned({"head": wrong_backend}))
    with pytest.raises(TuneError, match="also its descendants"):
        kiln.tune(_net(), _samples(), backends=("torch",), strategy=_Pinned({"": "torch", "head": "torch"}))


def test_first_wins_skips_invalid_backends(wrong_backend):
    """FirstWins takes the first *valid* backend in order; a wrong one listed first is passed over."""
    def boom(req):
        raise RuntimeError("no such compiler")
    tb.register_backend("boom", boom, replace=True)
    try:
        model, xs = _net(), _samples()
        res = kiln.tune(model, xs, backends=(wrong_backend, "boom", "torch"), strategy=FirstWins())
    finally:
        tb.unregister_backend("boom")
    assert res.plan.assign == {"backbone": "torch", "head": "torch"}  # root split, children eager
    assert res.table.get("", "boom").reason.startswith("build failed: RuntimeError: no such compiler")
    assert res.table.get("head", "torch").latency_ms is None  # FirstWins times nothing


def test_reused_output_buffers_fail_validation():
    """A backend whose next call overwrites the previous result (e.g. a static output buffer) is refused."""
    def build(req):
        fwd, box = _eager(req), {}

        def run(*a):
            out = fwd(*a)
            if "buf" not in box or box["buf"].shape != out.shape:
                box["buf"] = torch.empty_like(out)
            return box["buf"].copy_(out)
        return run
    tb.register_backend("static-out", build, replace=True)
    try:
        xs = [torch.randn(2, 3, 9, 7), torch.randn(2, 3, 9, 7)]  # same shape: the buffer is reused
        res = kiln.tune(_net(), xs, backends=("static-out",), strategy=FirstWins())
    finally:
        tb.unregister_backend("static-out")
    assert "change after later calls" in res.table.get("", "static-out").reason
    assert "static-out" not in res.plan.assign.values()


# --------------------------------------------------------------------------- strategies on synthetic timings
def _table(rows, children=None, backends=("kiln", "torch", "inductor")):
    t = Table(children or {"": ["a", "b"], "a": [], "b": []}, backends)
    for (mod, b), v in rows.items():
        t.add(Measurement(mod, b, v is not None, "" if v is not None else "wrong", None,
                          *(v if v is not None else (0.001, 0.001))))  # failed rows carry tempting times
    return t


SYNTH = _table({
    ("", "torch"): (10, 100), ("", "kiln"): (8, 90), ("", "inductor"): (9, 70),
    ("a", "torch"): (4, 40), ("a", "kiln"): (1, 30), ("a", "inductor"): (3, 10),
    ("b", "torch"): (5, 50), ("b", "kiln"): (2, 45), ("b", "inductor"): None,
})
# glue of the root: (10 - 4 - 5, 100 - 40 - 50) = (1, 10)


def test_min_latency_picks_per_module():
    p = MinLatency().choose(SYNTH)
    assert p.assign == {"a": "kiln", "b": "kiln"} and (p.latency_ms, p.throughput_ms) == (4, 85)


def test_highest_throughput_mixes_backends():
    p = HighestThroughput().choose(SYNTH)
    assert p.assign == {"a": "inductor", "b": "kiln"} and (p.latency_ms, p.throughput_ms) == (6, 65)


def test_latency_budget():
    assert LatencyBudget(5).choose(SYNTH).assign == {"a": "kiln", "b": "kiln"}
    assert LatencyBudget(6).choose(SYNTH).assign == {"a": "inductor", "b": "kiln"}
    assert LatencyBudget(100).choose(SYNTH).assign == {"a": "inductor", "b": "kiln"}
    missed = LatencyBudget(0.5).choose(SYNTH)
    assert missed.assign == {"a": "kiln", "b": "kiln"} and "not met" in missed.notes[0]


def test_one_backend():
    assert OneBackend().choose(SYNTH).assign == {"a": "kiln", "b": "kiln"}
    p = OneBackend("inductor").choose(SYNTH)
    assert p.assign == {"": "inductor"} and set(p.replaced.values()) == {"inductor"}
    assert OneBackend("inductor", metric="throughput").choose(SYNTH).assign == {"": "inductor"}
    assert OneBackend(metric="throughput").choose(SYNTH).assign == {"": "inductor"}
    with pytest.raises(TuneError, match="not among the tuned backends"):
        OneBackend("tvm").choose(SYNTH)


def test_first_wins_follows_the_order():
    assert FirstWins().choose(SYNTH).assign == {"": "kiln"}
    t = _table({("", "torch"): (10, 100), ("", "kiln"): None, ("", "inductor"): None,
                ("a", "torch"): (4, 40), ("a", "kiln"): (1, 30), ("a", "inductor"): (3, 10),
                ("b", "torch"): (5, 50), ("b", "kiln"): None, ("b", "inductor"): None},
               backends=("inductor", "torch", "kiln"))
    p = FirstWins().choose(t)
    assert p.assign == {"a": "inductor", "b": "torch"} and p.latency_ms == 1 + 3 + 5


def test_failed_candidates_never_chosen_even_when_fastest():
    # every failed row above carries 0.001 ms; no strategy may pick one
    for s in (MinLatency(), HighestThroughput(), LatencyBudget(3), OneBackend(), FirstWins()):
        p = s.choose(SYNTH)
        assert all(SYNTH.get(m, b).ok for m, b in p.assign.items()), (s, p)


def test_deeper_trees_keep_the_plan_consistent():
    t = _table({("", "torch"): (10, 10), ("a", "torch"): (8, 8), ("a.x", "torch"): (3, 3), ("a.y", "torch"): (4, 4),
                ("a", "kiln"): (7, 7), ("a.x", "kiln"): (1, 1), ("a.y", "kiln"): (1, 1), ("", "kiln"): (9, 9)},
               children={"": ["a"], "a": ["a.x", "a.y"], "a.x": [], "a.y": []}, backends=("kiln", "torch"))
    p = MinLatency().choose(t)
    assert p.assign == {"a.x": "kiln", "a.y": "kiln"} and p.latency_ms == 2 + 1 + 2  # glues: root 2, a 1
    for m in p.assign:  # no chosen module is an ancestor of another
        assert not any(o != m and o.startswith(m + ".") for o in p.assign)


def test_measured_glue_replaces_the_estimate():
    t = Table.from_json(SYNTH.to_json())
    t.glue_ms[""] = (6.0, 10.0)  # the root's own work measured at 6 ms: splitting no longer pays for latency
    p = MinLatency().choose(t)
    assert p.assign == {"": "kiln"} and p.latency_ms == 8
    assert Table.from_json(json.loads(json.dumps(t.to_json()))).glue_ms == {"": (6.0, 10.0)}


def test_table_round_trip_and_missing_eager():
    assert Table.from_json(json.loads(json.dumps(SYNTH.to_json()))).to_json() == SYNTH.to_json()
    t = _table({("", "kiln"): (1, 1)}, children={"": []}, backends=("kiln", "torch"))
    with pytest.raises(TuneError, match="no eager timing"):
        MinLatency().choose(t)


def test_output_structure_is_rebuilt():
    from collections import OrderedDict

    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from kiln.tune import OutSpec
    a, b, c = torch.randn(2), torch.randn(3), torch.randn(1)
    out = (BaseModelOutputWithPooling(last_hidden_state=a, pooler_output=b), [c, None], OrderedDict(k=a), 3)
    spec = OutSpec.from_json(json.loads(json.dumps(OutSpec.of(out).to_json())))
    flat = kiln.verify.flatten_outputs(out[:3])
    assert spec.num_tensors == 4 == len(flat)
    back = spec.rebuild(flat)
    assert type(back[0]) is BaseModelOutputWithPooling and back[0].pooler_output is b and back[0].hidden_states is None
    assert back[1] == [c, None] and type(back[2]) is OrderedDict and back[3] == 3
    with pytest.raises(TuneError, match="expected 4 output tensor"):
        spec.rebuild(flat[:3])


# --------------------------------------------------------------------------- dynamic axes
def test_dynamic_axes_on_a_real_model():
    from kiln import zoo
    bert = zoo.get("bert", size="tiny").model
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 1000, (2, 16), generator=g), torch.randint(0, 1000, (3, 24), generator=g)]
    res = kiln.tune(bert, ids, backends=("torch",), strategy=FirstWins(), modules=["embeddings.word_embeddings"],
                    check_end_to_end=False)
    assert [(a.name, a.members, a.lo, a.hi) for a in res.axes] == [("batch", ((0, 0),), 2, 3),
                                                                  ("dyn1", ((0, 1),), 16, 24)]
    assert res.inputs == [("torch.int64", ("batch", "dyn1"))]
    emb = res.sites["embeddings.word_embeddings"]["axes"]  # (batch, seq) ids -> the embedding
    assert [(a["name"], a["members"]) for a in emb] == [("batch", [[0, 0]]), ("dyn1", [[0, 1]])]

    resnet = zoo.get("resnet50", size="tiny").model
    px = [torch.randn(1, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    res = kiln.tune(resnet, px, backends=("torch",), strategy=FirstWins(), modules=["layer2", "fc"],
                    dynamic_bounds={"batch": (1, 8)}, check_end_to_end=False)
    assert [(a.name, a.lo, a.hi) for a in res.axes] == [("batch", 1, 8)]
    for m in ("layer2", "fc"):  # only the batch dim of each module's input is dynamic, over the root's range
        axes = res.sites[m]["axes"]
        assert [(a["name"], a["members"], a["lo"], a["hi"]) for a in axes] == [("batch", [[0, 0]], 1, 8)]


def test_candidates_are_validated_at_the_bounds():
    specs, seen = [], []

    def spy(req):
        specs.append(req.dynamic_shapes)
        fwd = _eager(req)
        return lambda *a: (seen.append(tuple(a[0].shape)), fwd(*a))[1]
    tb.register_backend("spy", spy, replace=True)
    try:
        mlp = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 3)).eval()
        res = kiln.tune(mlp, [torch.randn(2, 6), torch.randn(3, 6)], backends=("spy", "kiln"), strategy=FirstWins(),
                        modules=[], dynamic_bounds={"batch": (1, 16)})
    finally:
        tb.unregister_backend("spy")
    dim = specs[0][0][0]
    assert len(specs) == 1 and (dim.min, dim.max) == (1, 16)
    assert {s[0] for s in seen} == {1, 2, 3, 16}
    assert res.table.get("", "kiln").ok, res.table.get("", "kiln").reason  # kiln's dynamic build holds at 1 and 16
    assert res.plan.assign == {"": "spy"}


# --------------------------------------------------------------------------- save / load
class _Pinned(Strategy):
    needs_timing = False

    def __init__(self, assign):
        self.assign = assign

    def choose(self, table):
        return Plan(dict(self.assign))

    def __repr__(self):
        return f"_Pinned({self.assign})"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, xs = _net(), _samples()
    res = kiln.tune(model, xs, backends=("kiln", "tvm"), strategy=_Pinned({"backbone": "kiln", "head": "tvm"}),
                    modules=["backbone", "head"])
    path = str(tmp_path_factory.mktemp("tuned") / "net")
    kiln.save(res, path)
    return path, res, [model(x).detach() for x in xs]


def test_save_load_round_trip_without_compiling(saved, monkeypatch):
    path, res, tuned_outs = saved
    man = json.load(open(os.path.join(path, "manifest.json")))
    assert man["format"] == "kiln-tuned" and man["plan"]["assign"] == {"backbone": "kiln", "head": "tvm"}
    assert all(len(h) == 64 for h in man["files"].values())
    assert any(f.endswith("artifact/model.so") for f in man["files"])  # kiln: a kiln artifact
    assert any(f.endswith("stock.so") for f in man["files"])           # stock TVM: one library

    def refuse(*a, **k):
        raise AssertionError("load_tuned must not compile")
    monkeypatch.setattr(kiln, "compile", refuse)
    monkeypatch.setattr("kiln.tune.stock_tvm.compile_stock", refuse)
    fresh = _net()
    loaded = kiln.load_tuned(fresh, path)
    assert loaded.source == "loaded" and loaded.plan.replaced == {"backbone": "kiln", "head": "tvm"}
    assert type(fresh.backbone.forward).__name__ == "Replacement"
    for x, out in zip(_samples(), tuned_outs):
        torch.testing.assert_close(fresh(x), out)
    x4 = torch.randn(4, 3, 9, 7)  # inside the tuned batch range [2, 5]
    torch.testing.assert_close(fresh(x4), _net()(x4), rtol=1e-4, atol=1e-5)
    loaded.restore()
    assert "forward" not in fresh.backbone.__dict__
    # a loaded result saves again (its payloads are copied)
    again = kiln.load_tuned(fresh, kiln.save(loaded, path + "-copy"))
    assert again.plan.assign == loaded.plan.assign


def test_tampered_file_is_rejected(saved, tmp_path):
    import shutil
    path, _, _ = saved
    copy = str(tmp_path / "t")
    shutil.copytree(path, copy)
    lib = next(os.path.join(r, f) for r, _, fs in os.walk(copy) for f in fs if f == "stock.so")
    with open(lib, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ArtifactIntegrityError, match="stock.so"):
        kiln.load_tuned(_net(), copy)


def test_load_refuses_other_models(saved):
    path, _, _ = saved
    with pytest.raises(TunedModelMismatchError, match="weights differ"):
        kiln.load_tuned(_net(seed=1), path)

    class Other(Net):
        pass
    other = Other().eval()
    with pytest.raises(TunedModelMismatchError, match="differs from the tuned one"):
        kiln.load_tuned(other, path)
    with pytest.raises(kiln.ArtifactError, match="kiln-tuned"):
        kiln.load(path)


# --------------------------------------------------------------------------- JIT
def test_jit_tunes_once_and_later_processes_reuse_it(tmp_path, monkeypatch):
    x = torch.randn(3, 3, 9, 7)
    model = _net()
    ref = model(x).detach()
    jm = kiln.jit(model, cache_dir=str(tmp_path), backends=("kiln", "torch"), strategy=FirstWins())
    torch.testing.assert_close(jm(x), ref, rtol=1e-4, atol=1e-5)
    assert jm.source == "tuned" and jm.result.plan.assign == {"": "kiln"}
    assert os.path.isfile(os.path.join(jm.cache_path, "manifest.json"))
    jm(x)
    assert jm.source == "tuned"  # same inputs: nothing re-prepared

    monkeypatch.setattr(kiln, "compile", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-tuned")))
    later = kiln.jit(_net(), cache_dir=str(tmp_path), backends=("kiln", "torch"), strategy=FirstWins())
    torch.testing.assert_close(later(x), ref, rtol=1e-4, atol=1e-5)
    assert later.source == "cache" and later.cache_path == jm.cache_path

    key = kiln.tune.cache_key(_net(), [x], ("kiln", "torch"), FirstWins())
    assert key != kiln.tune.cache_key(_net(seed=3), [x], ("kiln", "torch"), FirstWins())   # weights
    assert key != kiln.tune.cache_key(_net(), [x[:2]], ("kiln", "torch"), FirstWins())     # shapes
    assert key != kiln.tune.cache_key(_net(), [x], ("torch", "kiln"), FirstWins())         # backends
    assert key != kiln.tune.cache_key(_net(), [x], ("kiln", "torch"), MinLatency())        # strategy


def test_jit_prepares_again_for_new_shapes(tmp_path):
    model = _net()
    jm = kiln.jit(model, cache_dir=str(tmp_path), backends=("torch",), strategy=FirstWins())
    jm(torch.randn(2, 3, 9, 7))
    first = jm.cache_path
    y = jm(torch.randn(6, 3, 9, 7))
    assert y.shape == (6, 5) and jm.cache_path != first and jm.result.accepts((torch.randn(6, 3, 9, 7),))


# --------------------------------------------------------------------------- report, inductor, errors
def test_report_and_chart(tuned, tmp_path):
    res = tuned[0]
    text = res.report()
    for word in ("<root>", "backbone", "head", "kiln", "tvm", "wrong", "chosen", "tolerance", "end to end"):
        assert word in text
    png = res.plot(str(tmp_path / "chart.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 5000


def test_inductor_backend_and_lazy_reload(tmp_path):
    mlp = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 3)).eval()
    x = torch.randn(4, 6)
    ref = mlp(x).detach()
    res = kiln.tune(mlp, x, backends=("inductor",), strategy=FirstWins())
    assert res.plan.assign == {"": "inductor"}, res.table.get("", "inductor").reason
    torch.testing.assert_close(mlp(x), ref, rtol=1e-4, atol=1e-5)
    kiln.save(res, str(tmp_path / "ind"))
    res.restore()
    kiln.load_tuned(mlp, str(tmp_path / "ind"))
    torch.testing.assert_close(mlp(x), ref, rtol=1e-4, atol=1e-5)


def test_bad_input_is_refused():
    model, xs = _net(), _samples()
    with pytest.raises(TuneError, match="training mode"):
        kiln.tune(_net().train(), xs)
    with pytest.raises(TuneError, match="unknown backend 'nope'"):
        kiln.tune(model, xs, backends=("nope",))
    with pytest.raises(TuneError, match="not in the model"):
        kiln.tune(model, xs, modules=["trunk"])
    with pytest.raises(TuneError, match="sample 1, input 0"):
        kiln.tune(model, [xs[0], xs[1].double()])
    with pytest.raises(TuneError, match="must be >= 1 and contain"):
        kiln.tune(model, xs, dynamic_bounds={"batch": (3, 4)})
    with pytest.raises(TuneError, match="detected axes: none"):
        kiln.tune(model, xs[0], dynamic_bounds={"batch": (1, 4)})
    with pytest.raises(TuneError, match="Strategy"):
        kiln.tune(model, xs, strategy="fast")
    res = kiln.tune(model, xs, backends=("torch",), strategy=_Pinned({"head": "torch", "backbone": "torch"}))
    assert not res.plan.replaced and math.isfinite(res.end_to_end["rel_err"])


# --------------------------------------------------------------------------- the end-to-end guard
def test_root_instead_redecides_with_the_measured_plan():
    """A split plan's measured end-to-end time against the whole-model rows, decided by the strategy itself."""
    from kiln.tune.core import root_instead
    slow = {"tuned_latency_ms": 9.5, "tuned_throughput_ms": 80.0, "rel_err": 0.0}
    assert root_instead(MinLatency(), SYNTH, slow) == "kiln"                 # kiln's whole model: 8 < 9.5
    assert root_instead(HighestThroughput(), SYNTH, slow) == "inductor"      # 70 < 80
    fast = {"tuned_latency_ms": 4.0, "tuned_throughput_ms": 65.0, "rel_err": 0.0}
    assert root_instead(MinLatency(), SYNTH, fast) is None
    assert root_instead(HighestThroughput(), SYNTH, fast) is None
    assert root_instead(OneBackend("kiln"), SYNTH, slow) is None             # one backend by construction
    assert root_instead(MinLatency(), SYNTH, {"tuned_latency_ms": None}) is None


class _SplitFirst(MinLatency):
    """Splits the model (backbone and head on "fast") whenever the table has children, as an estimate might."""

    def choose(self, table):
        if table.children.get(""):
            return Plan({"backbone": "fast", "head": "fast"}, 1.0, 1.0)
        return super().choose(table)


def test_a_split_plan_that_measures_slower_is_replaced_by_the_best_whole_model_backend(monkeypatch):
    import kiln.tune.core as core
    tb.register_backend("fast", _eager, replace=True)
    real, calls = core._Tuner.end_to_end, []

    def end_to_end(self, result, eager_root, refs):
        out = real(self, result, eager_root, refs)
        calls.append(dict(result.plan.assign))
        if len(calls) == 1:               # the split plan "measures" slower than anything on the whole model
            out["tuned_latency_ms"] = out["tuned_throughput_ms"] = 1e6
        return out
    monkeypatch.setattr(core._Tuner, "end_to_end", end_to_end)
    try:
        model, xs = _net(), _samples()
        refs = [model(x).detach() for x in xs]
        res = kiln.tune(model, xs, backends=("fast", "torch"), strategy=_SplitFirst(), timing=FAST)
    finally:
        tb.unregister_backend("fast")
    rows = {b: res.table.get("", b).latency_ms for b in ("fast", "torch")}
    assert calls[0] == {"backbone": "fast", "head": "fast"} and len(calls) == 2
    assert res.plan.assign == {"": min(rows, key=rows.get)}, (res.plan, rows)
    assert "end to end, worse for" in res.plan.notes[-1]
    assert res.end_to_end["tuned_latency_ms"] < 1e6            # the replacement was measured again
    for x, ref in zip(xs, refs):
        torch.testing.assert_close(res(x), ref)
