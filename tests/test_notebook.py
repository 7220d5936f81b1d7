"""inference.ipynb executes top to bottom on a tiny run."""
import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_notebook_executes(tiny_run, monkeypatch):
    monkeypatch.setenv("RUN_DIR", tiny_run)
    nb = nbformat.read(os.path.join(ROOT, "inference.ipynb"), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum(1 for o in outputs if "image/png" in o.get("data", {})) >= 4
    for name in ("prompt.png", "samplers.png", "cfg.png", "trajectory.png"):
        assert os.path.isfile(os.path.join(tiny_run, "notebook", name))
