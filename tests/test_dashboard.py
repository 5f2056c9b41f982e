"""Feature dashboards: built offline, and rendered by headless Chromium without console errors.

Chromium: ``/usr/bin/chromium`` (Debian package ``chromium``), installed by ``.ci/run`` (or
``.ci/install-chromium``), never by a test. When it is missing the tests fail under CI (``CI``
set) and skip locally.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from attribution.synthetic import tiny_adapted
from mechdiff.features.classify import decoder_directions
from mechdiff.features.dashboard import write_dashboards
from mechdiff.features.store import StoreConfig, build_store

CHROMIUM = Path("/usr/bin/chromium")
INSTALLER = Path(__file__).resolve().parents[1] / ".ci" / "install-chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
    "--virtual-time-budget=10000",
    "--window-size=1200,900",
]


@pytest.fixture(scope="module")
def chromium():
    """The browser is installed by ``.ci/run`` (or by hand: ``.ci/install-chromium``), never here."""
    if not CHROMIUM.exists():
        message = f"headless Chromium is needed at {CHROMIUM}; install it with {INSTALLER}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message + " (not CI: skipped)")
    return CHROMIUM


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    adapted = tiny_adapted(seed=1, density=0.2)
    gen = torch.Generator().manual_seed(0)
    rows = [[2, *torch.randint(4, 32, (14,), generator=gen).tolist()] for _ in range(12)]
    names = [adapted.acts_name(layer) for layer in range(2)]
    store = build_store(
        adapted.model,
        rows,
        names,
        config=StoreConfig(top_k=5, n_random=3),
        decoder=decoder_directions(adapted),
        pad_id=1,
    )
    features = store.alive.nonzero()[:4, 0].tolist()
    cats = ["format" if i % 2 else "hesitation" for i in range(store.n_features)]
    folder = tmp_path_factory.mktemp("dash")
    index = write_dashboards(store, folder, adapted.model.tokenizer, categories=cats, features=features)
    return folder, index, features


def test_pages_are_offline_and_share_one_copy_of_each_bundle(site):
    folder, index, features = site
    pages = sorted((folder / "features").glob("*.html"))
    assert len(pages) == len(features)
    bundle_marker = "var CircuitsVis="
    assert bundle_marker in (folder / "assets" / "circuitsvis.js").read_text()
    assert (folder / "assets" / "plotly.min.js").stat().st_size > 1_000_000
    for page in [index, *pages]:
        text = page.read_text()
        assert "unpkg.com" not in text and "cdn." not in text.lower()
        assert not re.search(r"<script[^>]+src=\"https?:", text)
        assert bundle_marker not in text  # the bundle is shared, not inlined per example
        assert page.stat().st_size < 200_000
    text = pages[0].read_text()
    assert text.count('src="../assets/plotly.min.js"') == 1
    assert text.count("CircuitsVis.ColoredTokens") >= 1
    assert text.count("Plotly.newPlot") == 2
    index_text = index.read_text()
    assert index_text.index(">hesitation (") < index_text.index(">format (")  # sorted by category
    assert all(f'href="features/{i}.html"' in index_text for i in features)


def _run(chromium, url, tmp_path, *args):
    cmd = [str(chromium), *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args, url]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return result, console


def test_pages_render_in_headless_chromium(site, chromium, tmp_path):
    from matplotlib.image import imread

    folder, index, features = site
    page = folder / "features" / f"{features[0]}.html"
    shot = tmp_path / "page.png"
    result, console = _run(chromium, page.as_uri(), tmp_path, f"--screenshot={shot}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert console == [], console
    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (900, 1200)
    assert (pixels < 0.9).any(-1).mean() > 0.01 and pixels.std() > 0.05  # not blank
    result, console = _run(chromium, page.as_uri(), tmp_path, "--dump-dom")
    assert console == [], console
    dom = result.stdout
    assert dom.count('class="colored-tokens"') >= 1  # circuitsvis rendered the examples
    assert dom.count("main-svg") >= 2  # plotly drew both histograms
    result, console = _run(chromium, index.as_uri(), tmp_path, f"--screenshot={tmp_path / 'index.png'}")
    assert result.returncode == 0 and console == [], console
    assert imread(tmp_path / "index.png")[..., :3].std() > 0.02


def test_console_errors_are_detected(chromium, tmp_path):
    """The check above would catch a broken page."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><p>x</p><script>notDefined();</script></body></html>")
    _, console = _run(chromium, bad.as_uri(), tmp_path, "--dump-dom")
    assert any("Uncaught" in line for line in console)
