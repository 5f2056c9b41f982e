"""The notebooks in notebooks/ run top to bottom on small settings, and are committed without outputs.

Each notebook has one cell tagged ``parameters``; the test inserts a cell after it with the small
settings below (as papermill does), executes the notebook with nbclient in a fresh kernel and
checks that it ran and produced the outputs that matter. Every cell that
shows a figure is tagged ``figure:MIME`` (``image/png``, ``text/html``,
``application/vnd.plotly.v1+json``); the run checks each one displayed data of that type.
"""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = {
    "quickstart": ("N_PROBLEMS = 1", ["next-token agreement", "circuits-vis"]),
    "hesitation": (
        "MAX_FEATURE_NODES = 48\nN_ABLATE = 6\nN_EXAMPLE_TRACES = 16",
        ["P(wait) clean", "python -m attribution serve"],
    ),
    "lora": ("N_TRACES = 16", ["reasoning fraction", "nats per response token", "circuits-vis"]),
}
# No per-cell wall-clock limit: the hesitation notebook's study cell ran past 300 s on a 2-core machine
# loaded by another job, and failed CI. Speed is measured by benchmarks; CI's own limit catches a hang.
CELL_TIMEOUT_S = None


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


SHOWS = ("display(", "plt.show()", "fig.show()", "graph_figure(")


def _figure_mimes(cell) -> list[str]:
    return [t.split(":", 1)[1] for t in cell.metadata.get("tags", []) if t.startswith("figure:")]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_figure_cell_is_tagged(name):
    book = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    for i, cell in enumerate(book.cells):
        if cell.cell_type == "code" and any(s in cell.source for s in SHOWS):
            assert _figure_mimes(cell), f"{name} cell {i} shows a figure: tag it figure:MIME"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
    overrides, expected = NOTEBOOKS[name]
    book = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    cell = nbformat.v4.new_code_cell(overrides)
    cell.metadata["tags"] = ["injected-parameters"]
    book.cells.insert(_params_index(book) + 1, cell)
    NotebookClient(
        book, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    text = "\n".join(str(out) for c in book.cells if c.cell_type == "code" for out in c.outputs)
    for needle in expected:
        assert needle in text, f"{name}: no {needle!r} in the outputs"
    figures = [c for c in book.cells if c.cell_type == "code" and _figure_mimes(c)]
    assert figures, f"{name} shows no figure"
    for cell in figures:  # each figure cell rendered data of its type (not only text, not blank)
        shown = {
            mime
            for out in cell.outputs
            if out.output_type in ("display_data", "execute_result")
            for mime in out.get("data", {})
        }
        missing = set(_figure_mimes(cell)) - shown
        assert not missing, f"{name}: cell {cell.source[:60]!r} displayed {sorted(shown)}, not {sorted(missing)}"
    assert "Traceback" not in text
