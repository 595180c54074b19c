"""Every notebook runs top to bottom on CPU, on the demo checkpoint (GLM4_JAX_NOTEBOOK_DEMO=1) and fake devices.

A cell that raises fails the test. Notebooks are committed without outputs.
"""

import os

import pytest
from conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"glm4_quickstart.ipynb", "long_context.ipynb", "tpu_vm_pod.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    # The kernel inherits this environment: the demo switch, and 8 fake CPU devices (tests/conftest.py).
    monkeypatch.setenv("GLM4_JAX_NOTEBOOK_DEMO", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert "--xla_force_host_platform_device_count=8" in os.environ["XLA_FLAGS"]
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
    client.execute()  # raises CellExecutionError, naming the cell, when a cell fails
