"""The notebooks: committed without outputs, and they run from top to bottom."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _read(name: str) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    return notebook


def _execute(name: str, directory: Path) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    notebook = _read(name)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(directory)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors
    return notebook


def _outputs(notebook: nbformat.NotebookNode, kind: str) -> list:
    return [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == kind
    ]


def _stdout(notebook: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in _outputs(notebook, "stream") if o.name == "stdout")


def test_every_notebook_is_listed() -> None:
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == ["quickstart.ipynb", "sweep.ipynb"]


@pytest.mark.parametrize("name", ["quickstart.ipynb", "sweep.ipynb"])
def test_committed_notebook_has_no_outputs(name: str) -> None:
    notebook = _read(name)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [], f"cell {index} has outputs: clear them before committing"
        assert cell.execution_count is None, f"cell {index} has an execution count"
        assert "execution" not in cell.metadata, f"cell {index} keeps execution timings"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quickstart_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPLBACKEND", "Agg")  # the kernel inherits the environment
    monkeypatch.chdir(tmp_path)
    notebook = _execute("quickstart.ipynb", tmp_path)
    stdout = _stdout(notebook)
    assert "concepts are the nearest one of some token" in stdout
    assert "test/cluster/flip/mIoU" in stdout
    # Everything went to the notebook's temporary directory, nothing to the working directory.
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sweep_notebook_runs_a_demo_sweep_and_shows_its_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.delenv("CAUSE_SWEEP_DIR", raising=False)  # the notebook runs its demo sweep
    monkeypatch.chdir(tmp_path)
    notebook = _execute("sweep.ipynb", tmp_path)
    stdout = _stdout(notebook)
    assert "best job:" in stdout
    assert "method.head.temperature=0.05" in stdout and "method.head.temperature=0.2" in stdout
    images = [o for o in _outputs(notebook, "display_data") if "image/png" in o.data]
    assert len(images) == 3  # the sweep plot, the confusion matrix, the per-class IoU
    assert list(tmp_path.iterdir()) == []
