"""Figures: one copy of each JavaScript library per figures tree, and no global matplotlib backend."""

import os
import re
import subprocess
import sys

import plotly
import plotly.graph_objects as go

from mechdiff.visualization.assets import consolidate
from mechdiff.visualization.figures import save


def _srcs(page):
    return re.findall(r"""<script[^>]*src=["']([^"']+)["']""", page.read_text())


def test_pages_in_a_figures_tree_share_one_plotly(tmp_path):
    fig = go.Figure(go.Bar(x=["a", "b"], y=[1, 2]))
    pages = [save(fig, tmp_path / "figures" / study / "bars")[0] for study in ("one", "two")]
    pages.append(save(fig, tmp_path / "figures" / "one" / "deeper" / "bars")[0])
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.js")) == [
        "figures/assets/plotly.min.js"
    ]
    for page in pages:
        (src,) = _srcs(page)
        assert (page.parent / src).resolve() == (tmp_path / "figures" / "assets" / "plotly.min.js").resolve()
    assert (tmp_path / "figures" / "assets" / "plotly.min.js").read_text() == plotly.offline.get_plotlyjs()
    elsewhere = save(fig, tmp_path / "runs" / "x" / "bars")[0]  # outside figures/: beside the page
    assert _srcs(elsewhere) == ["assets/plotly.min.js"] and (elsewhere.parent / "assets" / "plotly.min.js").is_file()


def test_consolidate_points_old_pages_at_one_copy(tmp_path):
    tree = tmp_path / "figures"
    for folder, src in (("a", "plotly.min.js"), ("b/features", "../assets/plotly.min.js")):
        page = tree / folder / "p.html"
        page.parent.mkdir(parents=True)
        page.write_text(
            f'<html><script charset="utf-8" src="{src}"></script><script src=\'circuitsvis.js\'>'
            f'</script><script src="https://cdn.example/other.js"></script></html>'
        )
        (page.parent / src).parent.mkdir(parents=True, exist_ok=True)
        (page.parent / src).write_text("// plotly")
        (page.parent / "circuitsvis.js").write_text("// cv")
    counts = consolidate(tree)
    assert counts == {"pages_rewritten": 2, "copies_removed": 4}
    assert sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*.js")) == [
        "assets/circuitsvis.js",
        "assets/plotly.min.js",
    ]
    for page in tree.rglob("p.html"):
        srcs = _srcs(page)
        assert srcs[2] == "https://cdn.example/other.js"  # other scripts untouched
        assert all((page.parent / s).resolve().parent == (tree / "assets").resolve() for s in srcs[:2])
    assert consolidate(tree) == {"pages_rewritten": 0, "copies_removed": 0}  # idempotent


def test_writing_a_png_leaves_the_matplotlib_backend_alone(tmp_path):
    code = (
        "import matplotlib, plotly.graph_objects as go\n"
        "from mechdiff.visualization.figures import save\n"
        f"save(go.Figure(go.Scatter(x=[1, 2], y=[3, 4])), {str(tmp_path / 'f')!r})\n"
        "print(matplotlib.get_backend())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MPLBACKEND": "svg"},
    )
    assert out.stdout.strip() == "svg" and (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
