"""The notebooks in notebooks/: each runs top to bottom, and each is committed without outputs.

Every ``notebooks/*.ipynb`` is executed with nbclient (a new notebook is picked up by the
glob), in fast mode: ``VGRAD_NOTEBOOK_FAST=1`` in the kernel's environment makes it run the
same code at a tiny size (a few seconds each). Any cell error fails the test. The kernel is
an IPython kernel of this interpreter (``sys.executable``, i.e. the test's virtual
environment), whatever kernelspecs the machine has registered; it inherits the test
session's environment (e.g. the XLA flags set in conftest.py) plus ``MPLBACKEND=Agg``.
"""

from __future__ import annotations

import os
import pathlib
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {
    "01_vanishing_gradients.ipynb",
    "02_batch_norm.ipynb",
    "03_residual_and_depth.ipynb",
    "04_jacobian_spectra.ipynb",
    "05_your_own_model.ipynb",
}
CELL_TIMEOUT_S = 300  # per cell; fast mode needs a few seconds per notebook


class _ThisInterpreter(KernelSpecManager):
    """Every kernel name resolves to ipykernel running in ``sys.executable``."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f",
                                "{connection_file}"],
                          display_name=f"Python ({sys.executable})", language="python")


def _ids(path: pathlib.Path) -> str:
    return path.name


def test_expected_notebooks_exist():
    missing = EXPECTED - {p.name for p in NOTEBOOKS}
    assert not missing, f"missing notebooks in {NOTEBOOK_DIR}: {sorted(missing)}"
    assert (NOTEBOOK_DIR / "README.md").is_file()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    for i, cell in enumerate(code):
        assert cell.outputs == [], f"{path.name}: code cell {i} has outputs (strip them)"
        assert cell.execution_count is None, f"{path.name}: code cell {i} has an execution count"
        assert "execution" not in cell.metadata, f"{path.name}: code cell {i} has timing metadata"
    # The fast mode is what keeps this file's run time small: every notebook must read it.
    assert any("VGRAD_NOTEBOOK_FAST" in cell.source for cell in code[:2]), (
        f"{path.name} must read VGRAD_NOTEBOOK_FAST near the top and shrink its sizes when set")
    assert nb.metadata.get("kernelspec", {}).get("language") == "python"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    env = {**os.environ, "VGRAD_NOTEBOOK_FAST": "1", "MPLBACKEND": "Agg"}
    km = KernelManager(kernel_name="python3", kernel_spec_manager=_ThisInterpreter())
    assert km.kernel_spec.argv[0] == sys.executable
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute(env=env, cleanup_kc=True)  # raises CellExecutionError on any cell error
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    executed = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in executed)
    errors = [out for cell in executed for out in cell.outputs if out.output_type == "error"]
    assert not errors
