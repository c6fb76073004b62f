"""Weight-only computation is folded into the weights at compile time, and nothing else is."""
import numpy as np
import torch
import tvm
from tvm import relax

import kiln
from kiln.frontend import import_torch
from kiln.relax_passes import cleanup_passes
from kiln.relax_passes.fold_weights import fold_weight_transforms


class Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(x).transpose(0, 1)  # an input-dependent transpose that must stay


def _imported():
    torch.manual_seed(0)
    m = Lin().eval()
    res = import_torch(m, (torch.randn(4, 16),))
    return m, tvm.transform.Sequential(cleanup_passes("llvm"))(res.mod), res.params


def test_weight_transpose_folds_and_input_transpose_stays():
    m, mod, params = _imported()
    assert mod["main"].script().count("R.permute_dims") == 2
    r = fold_weight_transforms(mod, params)
    assert r.mod["main"].script().count("R.permute_dims") == 1  # only the one on the activation
    w = next(p for p in r.params if p.ndim == 2)
    np.testing.assert_array_equal(w, m.fc.weight.detach().numpy().T)  # stored pre-transposed, K x N
    assert "main_transform_params" not in [gv.name_hint for gv in r.mod.get_global_vars()]
    assert "folded" in r.note


def test_nothing_to_fold_is_a_no_op():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 4), "float32"))
    w = relax.Var("w", relax.TensorType((4, 4), "float32"))
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            o = bb.emit_output(relax.op.matmul(x, w))
        bb.emit_func_output(o)
    mod = bb.get()
    p = [np.eye(4, dtype="float32")]
    r = fold_weight_transforms(mod, p)
    assert r.mod is mod and r.params is p and r.note == "no weight-only computation"


def test_folded_model_still_matches_torch():
    m, _, _ = _imported()
    art = kiln.compile(m, (torch.randn(4, 16),), target="llvm")
    assert any("folded at compile time" in n for n in art.notes)
    x = torch.randn(4, 16)
    np.testing.assert_allclose(art(x).numpy(), m(x).detach().numpy(), rtol=1e-5, atol=1e-5)
