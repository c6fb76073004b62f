"""Every tutorial notebook runs clean, top to bottom, on the CPU (CI executes them; GPU cells are guarded by
``torch.cuda.is_available()``), and is committed without outputs.

The runner needs no Jupyter: the code cells are joined, in order, into one script (each cell under a
``# --- cell N`` marker, so a traceback names the cell) and run in a fresh interpreter from a temporary
directory.
"""
import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "tutorials", "*.ipynb")))


def _code_cells(path):
    nb = json.load(open(path))
    assert nb.get("nbformat") == 4, f"{path}: not an nbformat 4 notebook"
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_outputs_are_stripped(path):
    for i, cell in enumerate(_code_cells(path)):
        assert cell.get("outputs") == [] and cell.get("execution_count") is None, \
            f"{os.path.basename(path)} cell {i} has outputs: clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path):
    script = "\n".join(f"# --- cell {i}\n" + "".join(c["source"]) for i, c in enumerate(_code_cells(path)))
    (tmp_path / "nb.py").write_text(script)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "nb.py"], cwd=tmp_path, capture_output=True, text=True, timeout=1200,
                         env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_the_four_tutorials_exist():
    names = [os.path.basename(p) for p in NOTEBOOKS]
    assert names == ["01_compile_and_export.ipynb", "02_kiln_ops_in_a_model.ipynb", "03_tune_mixed_pipeline.ipynb",
                     "04_llm_decode.ipynb"], names
