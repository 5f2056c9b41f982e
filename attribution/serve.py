"""Serve exported graphs in circuit-tracer's frontend, offline, on 127.0.0.1.

``python -m attribution serve [DIR] [--port N]`` serves ``DIR`` (default
``figures/attribution/circuit-tracer``: ``graph-metadata.json``, one ``{slug}.json`` per graph and
``features/{scan}/{index}.json``, as :mod:`attribution.export` and :mod:`attribution.examples`
write them) in the graph browser of circuit-tracer 0.5.0.

Nothing of circuit-tracer is copied into this repository. The frontend's files come from its
published wheel, downloaded once (``pip download --no-deps circuit-tracer==0.5.0``) into the user
cache, ``~/.cache/mechdiff/circuit-tracer-frontend`` (``$XDG_CACHE_HOME`` respected). The page loads
five scripts from public CDNs; local copies come from npm packages (``npm pack``, into the same
cache, see :data:`SCRIPTS`) and the page's script URLs are rewritten to them when served. A script
that could not be had stays on its CDN URL and is named in the startup message.

The page's Save button stores the current view (pinned nodes, supernodes) in the graph's JSON, as
circuit-tracer's own local server does. Three more rewrites make the page read everything from this server (only in what is served; the
cached files stay as published): feature examples are requested from ``./features/`` instead of the
remote bucket, the frontend's probe for a Hugging Face feature index is skipped when it is served
locally, and the hot-reload client of its authors' dev server is dropped.

Example:
    Not run as a doctest: it starts a local web server.
    >>> frontend = Frontend(cache_dir())                              # doctest: +SKIP
    >>> frontend.fetch()                                              # doctest: +SKIP
    >>> server = make_server("figures/attribution/circuit-tracer", frontend, port=0)  # doctest: +SKIP
    >>> server.url                                                    # doctest: +SKIP
    'http://127.0.0.1:40123/index.html'
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import urllib.parse
import zipfile
from dataclasses import dataclass
from pathlib import Path

from attribution.export import write_text_atomic

CIRCUIT_TRACER = "circuit-tracer==0.5.0"
WHEEL_ASSETS = "circuit_tracer/frontend/assets/"
FEATURE_BUCKET = "https://d1fk9w8oratjix.cloudfront.net/features/"


@dataclass(frozen=True)
class Script:
    """A file of an npm package, saved under the cache's ``vendor/`` folder as ``file``."""

    npm: str  # package@version for ``npm pack``
    member: str  # file inside the package tarball
    file: str
    wrap: str = "{source}"  # how the file is saved: ``{source}`` is the package's text


# d3-jetpack 2.3.0's CommonJS build run as a classic script on top of d3 7: its require() is given
# the page's d3 (with d3-collection's nest added), and the d3-selection it asks for reads `event`
# from the event being dispatched (d3 7 passes events to listeners instead of setting d3.event).
# The frontend was written against a later jetpack whose d3.conventions() result has a
# drawAxis(svg) method (npm's has d3.drawAxis(c)): the loader adds it.
JETPACK_LOADER = """// d3-jetpack (npm, {npm}) on the page's d3 7, as a classic script; written by mechdiff
(function () {{
  var d3 = window.d3;
  var selection = Object.create(d3, {{event: {{get: function () {{ return window.event; }}}}}});
  var module = {{exports: {{}}}}, exports = module.exports;
  var require = function (name) {{ return name === "d3-selection" ? selection : d3; }};
{{source}}
  Object.assign(d3, module.exports);
  var conventions = d3.conventions;
  d3.conventions = function (options) {{
    var c = conventions(options);
    c.drawAxis = function (svg) {{ return d3.drawAxis(Object.assign({{}}, c, {{svg: svg || c.svg}})); }};
    return c;
  }};
}})();
"""
TC = "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/"
SCRIPTS = {
    "d3": Script("d3@7.9.0", "package/dist/d3.min.js", "d3.min.js"),
    "d3-collection": Script("d3-collection@1.0.7", "package/dist/d3-collection.min.js", "d3-collection.min.js"),
    "d3-jetpack": Script(
        "d3-jetpack@2.3.0",
        "package/build/d3-jetpack.cjs",
        "d3-jetpack.js",
        JETPACK_LOADER.format(npm="d3-jetpack@2.3.0"),
    ),
    "npyjs": Script("npyjs@1.2.0", "package/dist/index.js", "npyjs.mjs"),
    "dagre": Script("dagre@0.8.5", "package/dist/dagre.min.js", "dagre.min.js"),
    "pako": Script("pako@2.1.0", "package/dist/pako.min.js", "pako.min.js"),
}
# each CDN script of the page -> the local scripts that replace it (an .mjs is an ES module whose
# exports go on window.npyjs, the name the page's npy_v0.js defines)
PAGE_SCRIPTS = {
    # the frontend uses d3 6+ APIs (d3.pointer, event-first listeners): d3 7
    TC + "d3.js": ("d3",),
    TC + "jetpack_2024-07-20.js": ("d3-collection", "d3-jetpack"),
    TC + "npy_v0.js": ("npyjs",),
    "https://unpkg.com/dagre@0.8.5/dist/dagre.min.js": ("dagre",),
    "https://unpkg.com/pako@2.1.0/dist/pako.min.js": ("pako",),
}
DROPPED = (TC + "hotserver-client-ws.js",)  # the authors' dev-server reload client
# (file, published text, served text): each must be found, or the frontend is not the one we know
PATCHES = (
    ("util.js", f"'{FEATURE_BUCKET}'", "'./features/'"),
    (
        "feature_examples/init-feature-examples.js",
        "} else if (await indexFileExists(scan)){",
        "} else if (!window.isLocalServing && await indexFileExists(scan)){",
    ),
)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mechdiff/circuit-tracer-frontend`` (default ``~/.cache/...``)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mechdiff" / "circuit-tracer-frontend"


class FrontendMissing(RuntimeError):
    """circuit-tracer's frontend is not in the cache and could not be downloaded."""


class Frontend:
    """circuit-tracer's frontend files in ``root/assets`` and local scripts in ``root/vendor``."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else cache_dir()
        self.assets, self.vendor = self.root / "assets", self.root / "vendor"

    @property
    def wheel(self) -> Path | None:
        """The downloaded circuit-tracer wheel (its pydantic models define the JSON we write)."""
        return next(iter(sorted(self.root.glob("circuit_tracer-*.whl"))), None)

    @property
    def ready(self) -> bool:
        return (self.assets / "index.html").is_file()

    def missing_scripts(self) -> list[Script]:
        return [s for s in SCRIPTS.values() if not (self.vendor / s.file).is_file()]

    def fetch(self, log=print) -> list[str]:
        """Download what is not cached yet; returns a line per script still missing (and why)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.ready:
            log(f"downloading {CIRCUIT_TRACER}'s frontend into {self.root} (once)")
            self._fetch_wheel()
        problems = []
        for script in self.missing_scripts():
            try:
                self._fetch_npm(script)
            except (OSError, subprocess.CalledProcessError, KeyError, tarfile.TarError) as err:
                problems.append(f"{script.npm} ({script.file}): {_reason(err)}")
        return problems

    def _fetch_wheel(self) -> None:
        with tempfile.TemporaryDirectory(dir=self.root) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", CIRCUIT_TRACER, "-d", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("circuit_tracer-*.whl"))
            if done.returncode or not wheels:
                raise FrontendMissing(f"`{' '.join(cmd[2:])}` failed: {done.stderr.strip()[-400:]}")
            staged = Path(tmp) / "assets"
            with zipfile.ZipFile(wheels[0]) as wheel:
                for name in wheel.namelist():
                    rel = name[len(WHEEL_ASSETS) :]
                    if not name.startswith(WHEEL_ASSETS) or not rel or name.endswith("/"):
                        continue
                    if ".." in Path(rel).parts:
                        raise FrontendMissing(f"unsafe path {name!r} in {wheels[0].name}")
                    dest = staged / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(wheel.read(name))
            if not (staged / "index.html").is_file():
                raise FrontendMissing(f"{wheels[0].name} has no {WHEEL_ASSETS}index.html")
            shutil.rmtree(self.assets, ignore_errors=True)
            staged.rename(self.assets)
            wheels[0].replace(self.root / wheels[0].name)  # kept: tests read its JSON schemas

    def _fetch_npm(self, script: Script) -> None:
        npm = shutil.which("npm")
        if npm is None:
            raise OSError("npm is not installed")
        self.vendor.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.root) as tmp:
            subprocess.run([npm, "pack", "-q", script.npm], cwd=tmp, check=True, capture_output=True, text=True)
            (tarball,) = Path(tmp).glob("*.tgz")
            with tarfile.open(tarball) as tar:
                data = tar.extractfile(script.member)
                if data is None:
                    raise KeyError(f"{script.member} is not a file in {tarball.name}")
                staged = Path(tmp) / script.file
                staged.write_text(script.wrap.replace("{source}", data.read().decode("utf-8")), encoding="utf-8")
            staged.replace(self.vendor / script.file)

    def page(self, name: str) -> bytes | None:
        """The served text of ``name`` when we rewrite it (index.html and :data:`PATCHES`), else None."""
        if name == "index.html":
            html = (self.assets / name).read_text(encoding="utf-8")
            for url in DROPPED:
                html = html.replace(f"<script src='{url}'></script>", "")
            for url, names in PAGE_SCRIPTS.items():
                files = [SCRIPTS[n].file for n in names]
                if not all((self.vendor / f).is_file() for f in files):
                    continue  # stays on its CDN (serve() says so)
                local = "".join(
                    f"<script type='module'>import * as m from './vendor/{f}'; window.npyjs = m</script>"
                    if f.endswith(".mjs")
                    else f"<script src='./vendor/{f}'></script>"
                    for f in files
                )
                html = html.replace(f"<script src='{url}'></script>", local)
            return html.encode()
        for file, published, served in PATCHES:
            if name == file:
                text = (self.assets / file).read_text(encoding="utf-8")
                if published not in text:
                    raise FrontendMissing(
                        f"{file} of the cached frontend is not circuit-tracer 0.5.0's "
                        f"(no {published!r}); delete {self.root} and run again"
                    )
                return text.replace(published, served).encode()
        return None


def _reason(err: BaseException) -> str:
    lines = (getattr(err, "stderr", None) or "").strip().splitlines()
    return lines[-1] if lines else str(err)


def _handler(data_dir: Path, frontend: Frontend, quiet: bool):
    roots = {
        "/data/": data_dir,
        "/graph_data/": data_dir,
        "/features/": data_dir / "features",
        "/vendor/": frontend.vendor,
    }

    class Handler(http.server.SimpleHTTPRequestHandler):
        extensions_map = {
            **http.server.SimpleHTTPRequestHandler.extensions_map,
            ".js": "text/javascript",
            ".mjs": "text/javascript",
            ".json": "application/json",
        }

        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(frontend.assets), **kwargs)

        def translate_path(self, path: str) -> str:
            clean = path.split("?", 1)[0].split("#", 1)[0]
            for prefix, root in roots.items():
                if clean.startswith(prefix):
                    rel = urllib.parse.unquote(clean[len(prefix) :])
                    parts = [p for p in rel.split("/") if p not in ("", ".", "..")]
                    return str(root.joinpath(*parts))
            return super().translate_path(path)

        def do_GET(self):
            name = self.path.split("?", 1)[0].lstrip("/") or "index.html"
            if name == "favicon.ico":  # none: say so without an error in the page's console
                self.send_response(204)
                self.end_headers()
                return
            body = frontend.page(name)
            if body is None:
                return super().do_GET()
            self.send_response(200)
            self.send_header(
                "Content-Type",
                "text/html; charset=utf-8" if name.endswith(".html") else "text/javascript; charset=utf-8",
            )
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            """The page's Save button: ``/save_graph/{slug}`` stores the view (pinned nodes,
            supernodes, ...) as the graph's ``qParams``, for graphs listed in the index only."""
            slug = urllib.parse.unquote(self.path.split("?", 1)[0]).removeprefix("/save_graph/")
            listed = {g.get("slug") for g in json.loads((data_dir / "graph-metadata.json").read_text())["graphs"]}
            path = data_dir / f"{slug}.json"
            if not self.path.startswith("/save_graph/") or slug not in listed or not path.is_file():
                return self.send_error(404, "no such graph")
            try:
                length = int(self.headers.get("Content-Length", "0"))
                params = json.loads(self.rfile.read(min(length, 1 << 20)))["qParams"]
                if not isinstance(params, dict):
                    raise TypeError("qParams is not an object")
            except (ValueError, KeyError, TypeError) as err:
                return self.send_error(400, f"bad request body: {err}")
            graph = json.loads(path.read_text())
            graph["qParams"] = params
            write_text_atomic(path, json.dumps(graph, indent=1))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, fmt, *args):
            if not quiet:
                super().log_message(fmt, *args)

    return Handler


class GraphServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/index.html"

    def start(self) -> GraphServer:
        """Serve in a background thread (for tests and notebooks); :meth:`shutdown` stops it."""
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self


def check_graph_dir(folder: str | Path) -> Path:
    """``folder`` if it holds a graph index; else a ValueError that says how to make one."""
    folder = Path(folder)
    index = folder / "graph-metadata.json"
    if not index.is_file():
        raise ValueError(
            f"{folder}: no graph-metadata.json (export graphs there with "
            f"python -m attribution --out DIR; they go to DIR/circuit-tracer)"
        )
    try:
        graphs = json.loads(index.read_text())["graphs"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{index} is not a graph index") from None
    if not graphs:
        raise ValueError(f"{index} lists no graphs")
    return folder


def make_server(folder: str | Path, frontend: Frontend, port: int = 0, quiet: bool = True) -> GraphServer:
    """An HTTP server of ``folder``'s graphs on 127.0.0.1 (``port`` 0: a free one). Not started."""
    folder = check_graph_dir(folder).resolve()
    if not frontend.ready:
        raise FrontendMissing(f"circuit-tracer's frontend is not in {frontend.root}; call fetch()")
    return GraphServer(("127.0.0.1", port), _handler(folder, frontend, quiet))


def serve(folder: str | Path, port: int = 8032, frontend: Frontend | None = None, quiet: bool = True) -> None:
    """Fetch the frontend if needed, serve ``folder`` until Ctrl-C, print the URL."""
    check_graph_dir(folder)
    frontend = frontend or Frontend()
    missing = frontend.fetch(log=lambda m: print(m, file=sys.stderr))
    for line in missing:
        print(f"warning: no local copy of {line}; the page loads it from its CDN", file=sys.stderr)
    server = make_server(folder, frontend, port, quiet)
    print(f"serving {Path(folder)} at {server.url}  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
