"""notebooks/quickstart.ipynb runs top to bottom (so it can never rot)."""
import os

import nbformat
from nbclient import NotebookClient

from repo_paths import REPO

NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    # The kernel inherits this environment: one torch thread (a tiny model gains nothing from a second one, and
    # two OpenMP threads on a busy 2-core machine cost several times the CPU).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "KV heads: 8 → 2" in outputs
    assert "uptraining lowered held-out perplexity" in outputs
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, "the plot is shown inline"
