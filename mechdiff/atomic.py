"""Atomic writes of files and folders: readers see the old version or the new one, never half of one.

Every temporary name is unique (process id plus a random token), so two processes writing the same
file or folder at once both succeed (the last rename wins) instead of tripping over one shared
``<name>.tmp``. A write that raises leaves the previous version in place and removes its temporary.

* :func:`atomic_file` - a context manager that yields a temporary path to write; on success it
  replaces ``path`` with it (``os.replace``, atomic on POSIX and Windows).
* :func:`atomic_folder` - the same for a folder: write into the yielded temporary folder; on
  success it takes the place of ``folder`` (an old version is moved aside, then deleted).
* :func:`write_text` / :func:`write_json` - one-call forms for small files.

Example:
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_folder(root / "run") as tmp:
    ...     _ = (tmp / "a.txt").write_text("first")
    >>> with atomic_folder(root / "run") as tmp:
    ...     _ = (tmp / "b.txt").write_text("second")
    >>> sorted(p.name for p in (root / "run").iterdir())  # the second version, whole
    ['b.txt']
    >>> _ = write_json(root / "meta.json", {"step": 3}); (root / "meta.json").read_text()
    '{\\n "step": 3\\n}'
    >>> sorted(p.name for p in root.iterdir())  # no temporaries left behind
    ['meta.json', 'run']
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

TMP_SUFFIX, OLD_SUFFIX = ".tmp", ".old"


def unique_sibling(path: str | Path, suffix: str = TMP_SUFFIX) -> Path:
    """A fresh name beside ``path``: ``<name>.<pid>-<random>.tmp`` (no other writer picks it)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def is_temporary(path: str | Path, name: str | None = None) -> bool:
    """Whether ``path`` is a temporary or moved-aside version (of ``name``, if given) left by a kill."""
    base = Path(path).name
    if not base.endswith((TMP_SUFFIX, OLD_SUFFIX)):
        return False
    return name is None or base.startswith(f"{name}.")


@contextlib.contextmanager
def atomic_file(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_sibling(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, obj, *, indent: int | None = 1, **kwargs) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically; returns the path."""
    return write_text(path, json.dumps(obj, indent=indent, **kwargs))


@contextlib.contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``folder``; on success it becomes ``folder``.

    An existing ``folder`` is replaced as a whole (moved aside under a unique ``.old`` name, then
    deleted). Concurrent writers of the same folder all succeed; the last one to finish wins.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_sibling(folder)
    tmp.mkdir()
    try:
        yield tmp
        replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(new: Path, folder: Path) -> None:
    """Rename the finished folder ``new`` to ``folder``, moving any existing one aside first."""
    moved: list[Path] = []
    try:
        while True:
            try:
                os.rename(new, folder)  # succeeds when ``folder`` is absent (or an empty folder)
                return
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            old = unique_sibling(folder, OLD_SUFFIX)
            try:
                os.rename(folder, old)
                moved.append(old)
            except FileNotFoundError:  # another writer moved it first: try again
                pass
    finally:
        for old in moved:
            shutil.rmtree(old, ignore_errors=True)
