"""docs/walkthrough.ipynb, the paper's method cell by cell, executed as a reader would run it (nbclient, a fresh
kernel, one CPU thread): a change to the model files that breaks a cell fails here. The notebook records the values
it demonstrates in its `checks` dict and writes them to $SGG_WALKTHROUGH_OUT/checks.json; they are the paper's
semantics, so each is asserted. About 40 s on one core (the session's synthetic data already generated), plus the
20 detector iterations of its short training the first time.
"""
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "docs", "walkthrough.ipynb")


def test_the_committed_notebook_shows_its_outputs():
    """Committed executed, so that its outputs show where the repository is browsed, in order, without errors."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert all(o.output_type != "error" for c in code for o in c.outputs)
    shown = [c for c in code if c.outputs]
    assert len(shown) >= len(code) - 1   # every step shows something (the setup cell needs not)
    assert sum("image/png" in o.get("data", {}) or "image/jpeg" in o.get("data", {})
               for c in code for o in c.outputs) >= 5   # the scene, the masks, the curves, the photo


def test_the_walkthrough_runs_and_shows_the_method(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel inherits this environment: the session's private cache (conftest.py), one thread, and the
    # folder for the notebook's runs and checks.json; IPython's own files go there too
    monkeypatch.setenv("SGG_WALKTHROUGH_OUT", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": os.path.join(ROOT, "docs")}}).execute()
    with open(tmp_path / "checks.json") as f:
        checks = json.load(f)
    p = 0.1   # the quick start's p, which the notebook uses
    # Eq. (1): the share of elements zeroed (Motifs) and of logits set to -inf (SGTR) is p (~20,000 and
    # ~43,000 draws: a standard deviation of 0.002 and 0.0015)
    assert abs(checks["motifs_mask_rate"] - p) < 0.01 and abs(checks["sgtr_mask_rate"] - p) < 0.01, checks
    # the fused attention is softmax with the materialised -inf mask
    assert checks["kernel_vs_mask"] < 1e-5, checks
    # the stop-gradient: L_align sends nothing into the features the mirror reads
    assert checks["feature_grad"] == 0.0, checks
    # Eq. (2) is a KL divergence: >= 0, and 0 when the mirror is the original (p = 0, tied head, no prior)
    assert checks["kl"] > 0 and checks["kl_at_p0"] == 0.0, checks
    # Eq. (3): L = L_original + lambda L_align
    assert abs(checks["total_minus_eq3"]) < 1e-4, checks
