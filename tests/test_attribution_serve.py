"""``python -m attribution serve``: circuit-tracer's frontend on exported graphs, offline, and in a
real browser (headless Chromium driven by playwright, the system's /usr/bin/chromium).

Needs the frontend in the user cache (``.ci/install-frontend``) and Chromium (``.ci/install-chromium``);
``.ci/run`` installs both before ``make test``. Without them the tests skip locally and fail under CI.
"""

import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from attribution.build import attribute
from attribution.examples import (
    adapters_scan,
    clerps,
    feature_examples,
    feature_store,
    write_feature_examples,
)
from attribution.export import graph_slug, write_circuit_tracer_files
from attribution.serve import PAGE_SCRIPTS, Frontend, check_graph_dir, make_server, serve

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ROOT / "figures" / "attribution" / "browser.png"


def _missing(message: str):
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message + " (not CI: skipped)")


@pytest.fixture(scope="module")
def frontend():
    frontend = Frontend()
    if not frontend.ready or frontend.missing_scripts():
        _missing(
            f"circuit-tracer's frontend or its scripts are not in {frontend.root}; "
            "run .ci/install-frontend (python -m attribution serve --fetch-only)"
        )
    return frontend


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Two "wait" graphs of the organism (shipped adapters, two held-out traces cut before their
    "wait") exported into one folder, with the feature examples of 16 training traces."""
    from mechdiff.adapters.formats import load_adapted
    from mechdiff.models import load_pair
    from mechdiff.organism import corpus
    from mechdiff.organism.task import LABEL_ID
    from mechdiff.workloads import for_pair

    torch.set_num_threads(1)
    pair = load_pair("organism", device="cpu")
    adapted = load_adapted(pair)
    store = feature_store(adapted, for_pair(pair), n_traces=16)
    folder, scan = tmp_path_factory.mktemp("site"), adapters_scan(adapted)
    wait = LABEL_ID["hesitation"]
    rows = [r for r in corpus.reasoning_traces(40, "validation", seed=0) if wait in r["label_ids"]][:2]
    for row in rows:
        tokens = torch.tensor(row["input_ids"][: row["label_ids"].index(wait)])
        graph = attribute(adapted, tokens, "wait", max_feature_nodes=40, batch_size=16)
        examples = feature_examples(graph, store, adapted, scan)
        write_feature_examples(graph, store, adapted, folder, scan, examples=examples)
        write_circuit_tracer_files(
            graph,
            folder,
            graph_slug(graph, "organism"),
            scan=scan,
            title="organism, shipped adapters, → wait:",
            clerps=clerps(examples),
        )
    return folder


@pytest.fixture(scope="module")
def server(site, frontend):
    server = make_server(site, frontend, port=0).start()
    yield server
    server.shutdown()
    server.server_close()


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, b""


def test_the_page_loads_nothing_from_the_network(server, site, frontend):
    base = server.url.rsplit("/", 1)[0]
    assert server.server_address[0] == "127.0.0.1"
    status, html = _get(server.url)
    assert status == 200
    text = html.decode()
    assert not [url for url in PAGE_SCRIPTS if url in text] and "transformer-circuits.pub" not in text
    for src in [s.split("'")[0] for s in text.split("src='")[1:]] + ["vendor/npyjs.mjs"]:
        assert _get(f"{base}/{src.removeprefix('./')}")[0] == 200, src
    util = _get(f"{base}/util.js")[1].decode()
    assert "cloudfront" not in util.split("async function getFile")[1].split("if (!window.isLocalServing)")[0]
    index = json.loads(_get(f"{base}/data/graph-metadata.json")[1])
    assert index == json.loads((site / "graph-metadata.json").read_text())
    feature = next((site / "features").rglob("*.json"))
    assert json.loads(_get(f"{base}/{feature.relative_to(site).as_posix()}")[1]) == json.loads(feature.read_text())
    assert _get(f"{base}/data/..%2F..%2F..%2Fetc/passwd")[0] == 404
    assert _get(f"{base}/features/../../../../etc/passwd")[0] == 404
    assert (frontend.assets / "util.js").read_text().count("cloudfront.net/features/") == 1  # cache as published


def _post(url: str, body: bytes) -> int:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def test_save_stores_the_view_in_the_graph_file(server, site):
    base = server.url.rsplit("/", 1)[0]
    slug = json.loads((site / "graph-metadata.json").read_text())["graphs"][0]["slug"]
    before = json.loads((site / f"{slug}.json").read_text())
    view = {"pinnedIds": "0_1_2,1_3_4", "clickedId": "0_1_2"}
    assert _post(f"{base}/save_graph/{slug}", json.dumps({"qParams": view}).encode()) == 200
    after = json.loads((site / f"{slug}.json").read_text())
    assert after["qParams"] == view and after["nodes"] == before["nodes"]
    assert _post(f"{base}/save_graph/graph-metadata", b'{"qParams": {}}') == 404  # only listed graphs
    assert _post(f"{base}/save_graph/..%2Fescape", b'{"qParams": {}}') == 404
    assert _post(f"{base}/save_graph/{slug}", b"not json") == 400
    assert json.loads((site / f"{slug}.json").read_text()) == after
    assert _post(f"{base}/save_graph/{slug}", json.dumps({"qParams": before["qParams"]}).encode()) == 200


def test_serve_refuses_a_folder_without_graphs(tmp_path):
    with pytest.raises(ValueError, match="no graph-metadata.json"):
        check_graph_dir(tmp_path)
    (tmp_path / "graph-metadata.json").write_text('{"graphs": []}')
    with pytest.raises(ValueError, match="lists no graphs"):
        check_graph_dir(tmp_path)


def test_serve_prints_its_url_and_stops_on_ctrl_c(site, frontend, capsys):
    """A real SIGINT to this process while ``serve`` runs in the main thread, as in a terminal."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    answered = []

    def press_ctrl_c():
        for _ in range(600):
            try:
                answered.append(_get(f"http://127.0.0.1:{port}/index.html")[0])
                break
            except OSError:
                time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    serve(site, port, frontend)  # returns on Ctrl-C, no KeyboardInterrupt escapes
    out, err = capsys.readouterr()
    assert f"http://127.0.0.1:{port}/index.html" in out and answered == [200]
    assert "stopped" in err and "warning" not in err
    with socket.socket() as s:  # nothing listens on the port any more (TIME_WAIT aside)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


# ----------------------------------------------------------------------------- a real browser


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        _missing(f"headless Chromium is needed at {CHROMIUM}; run .ci/install-chromium")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


def _features(page) -> list[list[float]]:
    """Centres of the drawn feature nodes, read from the page's own data."""
    return page.evaluate("""() => d3.selectAll('.link-graph .node')
        .filter(d => d.feature_type == 'cross layer transcoder').nodes()
        .map(n => { const r = n.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2] })""")


def test_graphs_render_and_a_feature_shows_its_examples(server, site, browser):
    index = json.loads((site / "graph-metadata.json").read_text())["graphs"]
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems, outside = [], []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(server.url[:22]) else None)
    page.goto(server.url)
    # the page fills the list after it fetches graph-metadata.json: wait for it (a loaded CI machine
    # read it empty once), with no wall-clock bound of our own
    page.wait_for_function(
        f"document.querySelectorAll('select.graph-prompt-select option').length >= {len(index)}", timeout=0
    )
    options = page.eval_on_selector_all("select.graph-prompt-select option", "os => os.map(o => o.value)")
    assert options == [g["slug"] for g in index]  # the list shows every exported graph
    graph = json.loads((site / f"{index[1]['slug']}.json").read_text())
    page.select_option("select.graph-prompt-select", index[1]["slug"])
    page.wait_for_function(
        "slug => document.title.includes(slug) || new URL(location).searchParams.get('slug') == slug",
        arg=index[1]["slug"],
    )
    page.wait_for_function("n => d3.selectAll('.link-graph .node').size() > 0", arg=0)
    drawn = page.evaluate("() => d3.selectAll('.link-graph .node').data().map(d => [d.nodeId, d.feature_type])")
    exported = {n["node_id"] for n in graph["nodes"]}
    kinds = [kind for node, kind in drawn if node in exported]
    assert len(kinds) == len(drawn), "every drawn node is one of the selected graph's"
    assert kinds.count("cross layer transcoder") > 0 and "logit" in kinds and "embedding" in kinds
    x, y = _features(page)[0]
    page.mouse.move(x, y)
    page.mouse.click(x, y)
    page.wait_for_selector(".feature-example-list .ctx-container")
    links = page.evaluate("() => document.querySelectorAll('.link-graph path').length")
    contexts = page.locator(".feature-example-list .ctx-container")
    clicked = page.evaluate("() => new URL(location).searchParams.get('clickedId')")
    layer, feat, _ = map(int, clicked.split("_"))
    examples = json.loads(
        next((site / "features").glob(f"*/{(layer + feat) * (layer + feat + 1) // 2 + feat}.json")).read_text()
    )
    n_examples = sum(len(q["examples"]) for q in examples["examples_quantiles"])
    assert contexts.count() == n_examples > 0 and links > 0
    shown = page.locator(".feature-example-logits .ctx-container").first.locator(".token").all_inner_texts()
    assert shown == examples["top_logits"]
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))
    page.close()
    assert not problems and not outside, (problems, outside)


COMMITTED = ROOT / "figures" / "attribution" / "circuit-tracer"


def _committed_slugs() -> list[str]:
    index = COMMITTED / "graph-metadata.json"
    return [g["slug"] for g in json.loads(index.read_text())["graphs"]] if index.is_file() else []


@pytest.fixture(scope="module")
def committed_server(frontend):
    server = make_server(COMMITTED, frontend, port=0).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("slug", _committed_slugs())
def test_each_committed_graph_renders_with_its_feature_examples(slug, committed_server, browser):
    """The graphs shipped in figures/attribution/circuit-tracer (the organism's and SmolLM2's, made
    by ``python -m attribution ... --graphs``) open in the frontend, and a clicked feature node
    lists as many contexts as its example file holds."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(f"{committed_server.url}?slug={slug}")
    page.wait_for_function("n => d3.selectAll('.link-graph .node').size() > 0", arg=0)
    graph = json.loads((COMMITTED / f"{slug}.json").read_text())
    scan = graph["metadata"]["scan"]
    drawn = page.evaluate("() => d3.selectAll('.link-graph .node').data().map(d => d.nodeId)")
    assert set(drawn) <= {n["node_id"] for n in graph["nodes"]}  # this graph's nodes, not another's
    x, y = _features(page)[0]
    page.mouse.click(x, y)
    page.wait_for_selector(".feature-example-list .ctx-container")
    clicked = page.evaluate("() => new URL(location).searchParams.get('clickedId')")
    layer, feat, _ = map(int, clicked.split("_"))
    index = (layer + feat) * (layer + feat + 1) // 2 + feat  # the frontend's feature file name
    examples = json.loads((COMMITTED / "features" / scan / f"{index}.json").read_text())
    n_examples = sum(len(q["examples"]) for q in examples["examples_quantiles"])
    assert page.locator(".feature-example-list .ctx-container").count() == n_examples > 0
    page.close()
    assert not problems, problems
