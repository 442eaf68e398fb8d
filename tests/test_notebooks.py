"""Every notebook in notebooks/ runs end to end on CPU (nbclient, a fresh kernel of this interpreter)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need nbformat, nbclient and ipykernel")
nbclient = pytest.importorskip("nbclient", reason="the notebook tests need nbformat, nbclient and ipykernel")
pytest.importorskip("ipykernel", reason="the notebook tests need nbformat, nbclient and ipykernel")


def test_the_notebooks_are_found():
    names = {p.name for p in NOTEBOOKS}
    assert "chat_streaming.ipynb" in names, names


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    """A kernelspec that runs *this* interpreter (a stale global "python3" spec could point elsewhere)."""
    from jupyter_client.kernelspec import KernelSpecManager

    root = tmp_path_factory.mktemp("kernels")
    spec_dir = root / "kernels" / "rwkv-hf-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(
        '{"argv": [%s, "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": "rwkv_hf tests", '
        '"language": "python"}' % repr(sys.executable).replace("'", '"')
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(root) + os.pathsep + os.environ.get("JUPYTER_PATH", ""))
        assert "rwkv-hf-test" in KernelSpecManager().find_kernel_specs()
        yield "rwkv-hf-test"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_name, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("RWKV_HF_CACHE", str(tmp_path / "cache"))  # the demo model is converted into tmp, not ~/.cache
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name=kernel_name,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors
