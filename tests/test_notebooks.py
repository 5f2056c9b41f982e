"""The notebooks in notebooks/ run top to bottom on small settings, and are committed without outputs.

Each notebook has one cell tagged ``parameters``; the test inserts a cell after it with the small
settings below (as papermill does), executes the notebook with nbclient in a fresh kernel and
checks that it ran, within its time budget, and produced the outputs that matter.
"""

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = {
    "quickstart": ("N_PROBLEMS = 1", ["next-token agreement", "circuits-vis"]),
    "hesitation": ("MAX_FEATURE_NODES = 48\nN_ABLATE = 6", ["P(wait) clean", "image/png"]),
    "lora": ("N_TRACES = 16", ["reasoning fraction", "nats per response token", "circuits-vis"]),
}
BUDGET_S = 60


def _params_index(book) -> int:
    tagged = [i for i, c in enumerate(book.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "each notebook needs exactly one cell tagged 'parameters'"
    return tagged[0]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs(name):
    book = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    nbformat.validate(book)
    _params_index(book)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip the outputs"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
    overrides, expected = NOTEBOOKS[name]
    book = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    cell = nbformat.v4.new_code_cell(overrides)
    cell.metadata["tags"] = ["injected-parameters"]
    book.cells.insert(_params_index(book) + 1, cell)
    start = time.perf_counter()
    NotebookClient(book, timeout=BUDGET_S * 2, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    seconds = time.perf_counter() - start
    text = "\n".join(str(out) for c in book.cells if c.cell_type == "code" for out in c.outputs)
    for needle in expected:
        assert needle in text, f"{name}: no {needle!r} in the outputs"
    assert "Traceback" not in text
    assert seconds < BUDGET_S, f"{name} took {seconds:.0f} s (budget {BUDGET_S} s)"
