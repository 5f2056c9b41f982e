"""The JavaScript that HTML figures load (plotly.js, the circuitsvis bundle): one copy per tree.

Every page under a ``figures/`` folder loads ``figures/assets/<name>`` through a relative
``src``; a page elsewhere loads ``<root>/assets/<name>`` (``root``: the page's folder unless
given). Pages stay offline (no CDN) without repeating megabytes of JavaScript per study folder.

``python -m mechdiff.visualization.assets figures`` moves an existing tree to that layout: it
points every page's ``<script src>`` for a known asset at ``figures/assets/`` and deletes the
other copies.

Example:
    >>> import tempfile, pathlib
    >>> page = pathlib.Path(tempfile.mkdtemp()) / "figures" / "study" / "a.html"
    >>> shared_asset(page, "lib.js", lambda: "var x = 1;")
    '../assets/lib.js'
    >>> sorted(p.name for p in (page.parents[1] / "assets").iterdir())
    ['lib.js']
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from pathlib import Path

from mechdiff.atomic import write_text

ASSETS = "assets"
KNOWN = ("plotly.min.js", "circuitsvis.js")


def assets_folder(page: str | Path, root: str | Path | None = None) -> Path:
    """``<the nearest figures/ above page>/assets``, else ``<root or the page's folder>/assets``."""
    folder = Path(page).resolve().parent
    for parent in (folder, *folder.parents):
        if parent.name == "figures":
            return parent / ASSETS
    return Path(root).resolve() / ASSETS if root is not None else folder / ASSETS


def shared_asset(page: str | Path, name: str, text: Callable[[], str], root: str | Path | None = None) -> str:
    """Write the asset ``name`` (contents ``text()``) once into :func:`assets_folder` (rewritten
    when its contents changed, e.g. after a library upgrade); returns its ``src`` relative to
    the page ``page``."""
    path = assets_folder(page, root) / name
    content = text()
    if not path.is_file() or path.stat().st_size != len(content.encode()) or path.read_text() != content:
        write_text(path, content)
    return Path(os.path.relpath(path, Path(page).resolve().parent)).as_posix()


def circuitsvis_bundle() -> str:
    """The circuitsvis bundle as its views inline it in ``local_src``."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    return path.read_text(encoding="utf-8").replace("</script>", "")


def circuitsvis_src(page: str | Path, root: str | Path | None = None) -> str:
    """The ``src`` of the tree's one shared ``circuitsvis.js`` for ``page`` (written if missing)."""
    return shared_asset(
        page, "circuitsvis.js", lambda: re.sub(r"//# sourceMappingURL=\S+\s*$", "", circuitsvis_bundle()), root
    )


def without_bundle(view_html: str, bundle: str) -> str:
    """A circuitsvis view's ``local_src`` with its inlined ``bundle`` cut out (the page loads the
    shared copy, :func:`circuitsvis_src`) and its self-closed divs opened, as browsers need."""
    at = view_html.find(bundle[:256])
    if at >= 0 and view_html.startswith(bundle, at):
        view_html = view_html[:at] + view_html[at + len(bundle) :]
    return re.sub(r'<div id="(circuits-vis-[^"]+)"([^>]*)/>', r'<div id="\1"\2></div>', view_html)


def consolidate(tree: str | Path) -> dict[str, int]:
    """Point every HTML page under ``tree`` (a ``figures`` folder) at ``tree/assets`` and delete
    the other copies of the known assets; returns counts of pages rewritten and files removed."""
    tree = Path(tree).resolve()
    copies = {name: sorted(tree.rglob(name)) for name in KNOWN}
    for name, paths in copies.items():
        shared = tree / ASSETS / name
        if paths and not shared.is_file():
            write_text(shared, paths[0].read_text(encoding="utf-8"))
    names = "|".join(map(re.escape, KNOWN))
    pattern = re.compile(r"""(<script\b[^>]*\bsrc=)(["'])([^"']*?)(""" + names + r")\2")
    pages = 0
    for page in tree.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        rel = Path(os.path.relpath(tree / ASSETS, page.parent)).as_posix()
        new = pattern.sub(lambda m: f"{m[1]}{m[2]}{rel}/{m[4]}{m[2]}", text)
        if new != text:
            write_text(page, new)
            pages += 1
    removed = 0
    for paths in copies.values():
        for path in paths:
            if path.parent != tree / ASSETS:
                path.unlink()
                removed += 1
    for folder in sorted(tree.rglob(ASSETS), reverse=True):
        if folder.is_dir() and folder != tree / ASSETS and not any(folder.iterdir()):
            folder.rmdir()
    return {"pages_rewritten": pages, "copies_removed": removed}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m mechdiff.visualization.assets",
        description="Share one copy of each JavaScript asset across a figures tree.",
    )
    p.add_argument("tree", nargs="?", default="figures", help="the figures folder (default: figures)")
    print(consolidate(p.parse_args(argv).tree))


if __name__ == "__main__":
    main()
