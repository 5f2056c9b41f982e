"""``python -m analyses.features`` end to end on small settings (random adapters on the organism)."""

import json

import pytest

from analyses import features as analysis


@pytest.mark.slow
def test_analysis_writes_dashboards_figures_and_summary(tmp_path):
    out, store = tmp_path / "features", tmp_path / "store"
    summary = analysis.main(
        [
            "--adapters",
            "random:64",
            "--n-traces",
            "24",
            "--batch-size",
            "16",
            "--out",
            str(out),
            "--store",
            str(store),
            "--pages-per-category",
            "2",
            "--max-reasoning-pages",
            "3",
            "--top-k",
            "8",
        ]
    )
    written = json.loads((out / "summary.json").read_text())
    for key in ("n_features", "n_alive", "category_counts", "reasoning_fraction"):
        assert written[key] == summary[key]
    assert written["n_features"] == 3 * 64 and 0 < written["n_alive"] <= written["n_features"]
    assert sum(written["category_counts"].values()) == written["n_features"]
    assert 0.0 <= written["reasoning_fraction"] <= 1.0
    assert set(written["baselines"]) == {"mlp_neurons", "random_adapters"}
    assert written["store"]["n_tokens"] > 0 and written["store"]["tokens_per_second"] > 0
    for name in ("category_counts.html", "category_counts.png", "regions.png", "index.html", "report.md"):
        assert (out / name).is_file(), name
    pages = list((out / "features").glob("*.html"))
    assert len(pages) == written["n_dashboards"] > 0
    index = (out / "index.html").read_text()
    assert all(f"features/{p.name}" in index for p in pages)
