"""torch.compile(model, backend="kiln"): graphs compiled with kiln, per-graph fallback with a logged reason."""
import importlib.metadata
import logging
import os

import pytest
import torch
from torch import nn

import kiln
import kiln.dynamo as kd


@pytest.fixture(autouse=True)
def fresh():
    torch._dynamo.reset()
    kd.reset()
    yield
    torch._dynamo.reset()


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 24), nn.Linear(24, 5)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class Broken(MLP):
    """A graph break (print) between two halves: dynamo hands over two graphs."""

    def forward(self, x):
        h = torch.nn.functional.gelu(self.fc1(x))
        print("graph break")
        return self.fc2(h), h.sum(dim=-1)


class Refused(MLP):
    """erfinv: a real aten op TVM 0.27's importer cannot convert."""

    def forward(self, x):
        return torch.erfinv(torch.tanh(self.fc1(x)) * 0.5)


def test_registered_with_dynamo_and_as_entry_point():
    assert "kiln" in torch._dynamo.list_backends()
    ep = importlib.metadata.EntryPoint(name="kiln", value="kiln.dynamo:kiln_backend", group="torch_dynamo_backends")
    assert ep.load() is kd.kiln_backend
    pyproject = os.path.join(os.path.dirname(os.path.dirname(kiln.__file__)), "pyproject.toml")
    with open(pyproject) as f:
        text = f.read()
    assert '[project.entry-points.torch_dynamo_backends]\nkiln = "kiln.dynamo:kiln_backend"' in text


def test_small_model_compiles_and_matches_eager():
    torch.manual_seed(0)
    m = MLP().eval()
    f = torch.compile(m, backend="kiln")
    x = torch.randn(7, 12)
    with torch.no_grad():
        torch.testing.assert_close(f(x), m(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(f(x * 2), m(x * 2), rtol=1e-4, atol=1e-5)
    recs = kd.graphs()
    assert [r.status for r in recs] == ["kiln"] and not kd.fallbacks()


def test_refused_op_falls_back_with_logged_reason(caplog):
    torch.manual_seed(0)
    m = Refused().eval()
    x = torch.randn(4, 12)
    with caplog.at_level(logging.WARNING, logger="kiln.dynamo"), torch.no_grad():
        y = torch.compile(m, backend="kiln")(x)
    torch.testing.assert_close(y, m(x))
    (gid, reason), = kd.fallbacks()
    assert "UnsupportedOpsError" in reason and "aten.erfinv.default" in reason
    assert any(r.name == "kiln.dynamo" and f"graph {gid} falls back to eager" in r.getMessage() and "erfinv" in
               r.getMessage() for r in caplog.records)


def test_graph_breaks_give_several_graphs_each_compiled():
    torch.manual_seed(0)
    m = Broken().eval()
    x = torch.randn(3, 12)
    with torch.no_grad():
        out = torch.compile(m, backend="kiln")(x)
    for a, b in zip(out, m(x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    recs = kd.graphs()
    assert len(recs) == 2 and all(r.status == "kiln" for r in recs), recs


def test_dynamic_shapes_become_kiln_dims():
    """dynamo recompiles with a symbolic batch on the second size; kiln serves every later size."""
    torch.manual_seed(0)
    m = MLP().eval()
    f = torch.compile(m, backend="kiln")
    with torch.no_grad():
        for n in (3, 5, 9):
            x = torch.randn(n, 12)
            torch.testing.assert_close(f(x), m(x), rtol=1e-4, atol=1e-5)
    recs = kd.graphs()
    assert [r.status for r in recs] == ["kiln", "kiln"], recs
    assert list(recs[1].dynamic_dims.values()) == [[2, None]]


def test_in_place_graphs_fall_back():
    class InPlace(nn.Module):
        def forward(self, x):
            x.mul_(2)
            return x + 1
    x = torch.randn(4, 4)
    with torch.no_grad():
        y = torch.compile(InPlace(), backend="kiln")(x.clone())
    torch.testing.assert_close(y, x * 2 + 1)
    (_, reason), = kd.fallbacks()
    assert "writes into its inputs" in reason and "mul_" in reason


def test_writes_through_a_view_of_an_input_fall_back():
    class ViewWrite(nn.Module):
        def forward(self, x):
            x[0].add_(1)
            return x * 2
    x = torch.randn(3, 4)
    with torch.no_grad():
        y = torch.compile(ViewWrite(), backend="kiln")(x.clone())
    x[0] += 1
    torch.testing.assert_close(y, x * 2)
    (_, reason), = kd.fallbacks()
    assert "writes into its input" in reason


def test_in_place_on_intermediates_is_compiled():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).eval()
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m, backend="kiln")(x), m(x), rtol=1e-4, atol=1e-5)
    assert [r.status for r in kd.graphs()] == ["kiln"], kd.fallbacks()


def test_freeze_binds_parameters_as_weights():
    torch.manual_seed(0)
    m = MLP().eval()
    x = torch.randn(6, 12)
    with torch.no_grad():
        y = torch.compile(m, backend="kiln", options={"freeze": True, "check": True})(x)
    torch.testing.assert_close(y, m(x), rtol=1e-4, atol=1e-5)
    assert [(r.status, r.frozen) for r in kd.graphs()] == [("kiln", 4)]  # 2 weights + 2 biases bound


def test_unknown_option_is_an_error():
    gm = torch.fx.symbolic_trace(MLP())
    with pytest.raises(kiln.KilnError, match="unknown kiln backend option"):
        kd.kiln_backend(gm, [torch.randn(2, 12)], options={"bogus": 1})
