"""Activation caches on disk: rows of named tensors in safetensors shards, with JSON manifests.

A cache is a folder::

    cache.json                      world size, user metadata (e.g. hook names, model, batch size)
    rank-00000/manifest.json        the committed shards of rank 0, its row count and cursor
    rank-00000/shard-000000.safetensors   {name: [rows, ...]} for every name

A *row* is whatever the caller appends (one token's residuals, say); every name holds the same
rows. The caller feeds *items* of its source (e.g. batches of sequences) in a fixed order; a shard
is written (temporary file, fsync, rename) once it holds ``shard_rows`` rows, and only then is the
manifest (atomically replaced) advanced: its ``cursor`` counts the source items whose rows are all
on disk. A killed run therefore resumes at ``cursor``: the rows of later items, buffered or in a
shard file the manifest does not list, are dropped and recomputed - none lost, none twice.

Reading is streamed one shard at a time (:meth:`ActivationCache.iter_shards`), or as random
access batches that are a pure function of the step (:meth:`ActivationCache.batch`), so training
from a cache resumes exactly and holds one shard in memory.

Example:
    >>> import tempfile, torch
    >>> folder = tempfile.mkdtemp()
    >>> with CacheWriter(folder, shard_rows=4) as writer:
    ...     for item in range(writer.cursor, 5):
    ...         writer.append({"x": torch.full((3, 2), float(item))})
    >>> cache = ActivationCache(folder)
    >>> len(cache), cache.names, cache.load_all()["x"][:, 0].tolist()[:4]
    (15, {'x': ('float32', [2])}, [0.0, 0.0, 0.0, 1.0])
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from mechdiff import distributed
from mechdiff.atomic import atomic_file, write_json

FORMAT = "mechdiff-activation-cache"
VERSION = 1
_SHARD = re.compile(r"shard-(\d{6})\.safetensors$")


class CacheError(RuntimeError):
    """A cache that cannot be used as asked: corrupt, incomplete or written with other settings."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CacheError(f"{path} is unreadable or corrupt ({err}); move the cache away to rebuild it") from err


def _rank_dir(directory: Path, rank: int) -> Path:
    return directory / f"rank-{rank:05d}"


class CacheWriter:
    """Append rows (``{name: tensor[rows, ...]}``) to rank ``rank``'s part of a cache; resumable.

    ``cursor`` is the number of source items already committed: skip that many on a rerun.
    ``meta`` (JSON-able) must equal what the cache was started with, so a resumed run cannot mix
    settings (batch size, hooks, model...). ``rank``/``world_size`` default to the process group's.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        shard_rows: int = 65536,
        meta: dict | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, not {shard_rows}")
        self.directory, self.shard_rows = Path(directory), shard_rows
        self.rank = distributed.rank() if rank is None else rank
        self.world_size = distributed.world_size() if world_size is None else world_size
        self.meta = json.loads(json.dumps(meta or {}))
        self.dir = _rank_dir(self.directory, self.rank)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._check_or_create_header()
        manifest = self.dir / "manifest.json"
        self.manifest = (
            _read_json(manifest)
            if manifest.exists()
            else {"rank": self.rank, "rows": 0, "cursor": 0, "complete": False, "names": None, "shards": []}
        )
        self._verify_and_clean()
        self._buffer: list[dict[str, Tensor]] = []
        self._buffered_rows = self._pending_items = 0

    def _check_or_create_header(self) -> None:
        header = self.directory / "cache.json"
        want = {"format": FORMAT, "version": VERSION, "world_size": self.world_size, "meta": self.meta}
        if not header.exists():
            write_json(header, want)  # every rank writes the same bytes: a benign race
            return
        have = _read_json(header)
        if have.get("format") != FORMAT:
            raise CacheError(f"{header} is not a mechdiff activation cache")
        if have["world_size"] != self.world_size:
            raise CacheError(
                f"the cache in {self.directory} was written by {have['world_size']} "
                f"processes, this run has {self.world_size}: resume it with the same "
                f"number, or write a new cache"
            )
        if have["meta"] != self.meta:
            raise CacheError(
                f"the cache in {self.directory} was written with other settings: {have['meta']} (now {self.meta})"
            )

    def _verify_and_clean(self) -> None:
        listed = set()
        for shard in self.manifest["shards"]:
            path = self.dir / shard["file"]
            if not path.exists() or path.stat().st_size != shard["bytes"]:
                raise CacheError(
                    f"{path} is missing or truncated but listed in its manifest: the "
                    f"cache is corrupt; move it away to rebuild it"
                )
            listed.add(shard["file"])
        for path in self.dir.iterdir():  # shards written after the last manifest update
            if path.name.endswith(".tmp") or (_SHARD.match(path.name) and path.name not in listed):
                path.unlink()

    @property
    def cursor(self) -> int:
        """Source items committed to disk (the first item a resumed run must produce)."""
        return self.manifest["cursor"]

    @property
    def complete(self) -> bool:
        return self.manifest["complete"]

    def append(self, rows: dict[str, Tensor], items: int = 1) -> None:
        """Add the rows of ``items`` source items (all names, same number of rows; may be 0)."""
        if self.complete:
            raise CacheError(f"{self.dir} is complete; nothing more can be appended")
        n = {name: t.shape[0] for name, t in rows.items()}
        if not n or len(set(n.values())) != 1:
            raise ValueError(f"append needs tensors with one common number of rows, got {n}")
        spec = {k: [str(t.dtype).removeprefix("torch."), list(t.shape[1:])] for k, t in rows.items()}
        if self.manifest["names"] is None:
            self.manifest["names"] = spec
        elif spec != self.manifest["names"]:
            raise ValueError(f"rows {spec} do not match the cache's {self.manifest['names']}")
        self._buffer.append({k: t.detach().to("cpu").contiguous() for k, t in rows.items()})
        self._buffered_rows += next(iter(n.values()))
        self._pending_items += items
        if self._buffered_rows >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one shard, then commit it in the manifest."""
        if not self._pending_items:
            return
        if self._buffered_rows:
            index = len(self.manifest["shards"])
            name = f"shard-{index:06d}.safetensors"
            tensors = {k: torch.cat([b[k] for b in self._buffer]) for k in self._buffer[0]}
            with atomic_file(self.dir / name) as tmp:
                save_file(tensors, str(tmp))
            self.manifest["shards"].append(
                {
                    "file": name,
                    "rows": self._buffered_rows,
                    "bytes": (self.dir / name).stat().st_size,
                    "cursor": self.cursor + self._pending_items,
                }
            )
            self.manifest["rows"] += self._buffered_rows
        self.manifest["cursor"] += self._pending_items
        self._write_manifest()
        self._buffer, self._buffered_rows, self._pending_items = [], 0, 0

    def _write_manifest(self) -> None:
        write_json(self.dir / "manifest.json", self.manifest)

    def close(self) -> None:
        """Flush and mark this rank's part complete."""
        self.flush()
        if not self.complete:
            self.manifest["complete"] = True
            self._write_manifest()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:  # on an error keep the committed part, to resume from
            self.close()


class ActivationCache:
    """Read a cache written by :class:`CacheWriter`, one shard in memory at a time.

    Raises :class:`CacheError` for an incomplete cache unless ``allow_incomplete``.
    """

    def __init__(self, directory: str | Path, *, allow_incomplete: bool = False):
        self.directory = Path(directory)
        header = self.directory / "cache.json"
        if not header.exists():
            raise CacheError(f"no activation cache in {self.directory} (no cache.json)")
        self.header = _read_json(header)
        self.meta, self.world_size = self.header["meta"], self.header["world_size"]
        self.manifests = []
        for r in range(self.world_size):
            path = _rank_dir(self.directory, r) / "manifest.json"
            m = _read_json(path) if path.exists() else {"complete": False, "shards": [], "names": None}
            if not m["complete"] and not allow_incomplete:
                raise CacheError(
                    f"the cache in {self.directory} is incomplete (rank {r} committed "
                    f"{m.get('cursor', 0)} items): resume the caching run, or pass "
                    f"allow_incomplete=True"
                )
            self.manifests.append(m)
        specs = {json.dumps(m["names"]) for m in self.manifests if m["names"] is not None}
        if len(specs) > 1:
            raise CacheError(f"ranks of {self.directory} hold different tensors: {specs}")
        spec = json.loads(specs.pop()) if specs else {}
        self.names: dict[str, tuple[str, list[int]]] = {k: (d, s) for k, (d, s) in spec.items()}
        self.shards = [
            (_rank_dir(self.directory, r) / s["file"], s["rows"])
            for r, m in enumerate(self.manifests)
            for s in m["shards"]
        ]
        self._cached: tuple[int, dict[str, Tensor]] | None = None
        self.shard_loads = 0  # how many times a shard was read from disk

    def __len__(self) -> int:
        return sum(n for _, n in self.shards)

    def read_shard(self, index: int, names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Shard ``index`` (in rank, then write order) as ``{name: tensor}``."""
        path, rows = self.shards[index]
        self.shard_loads += 1
        try:
            with safe_open(str(path), framework="pt") as f:
                out = {k: f.get_tensor(k) for k in (names or self.names)}
        except Exception as err:
            raise CacheError(f"cannot read {path} ({err}): the cache is corrupt") from err
        if any(t.shape[0] != rows for t in out.values()):
            raise CacheError(f"{path} does not hold the {rows} rows its manifest lists")
        return out

    def iter_shards(self, names: Sequence[str] | None = None) -> Iterator[dict[str, Tensor]]:
        """Every shard in order, one in memory at a time."""
        for i in range(len(self.shards)):
            yield self.read_shard(i, names)

    def load_all(self, names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """The whole cache concatenated in memory (small caches and tests only)."""
        parts = list(self.iter_shards(names))
        return {k: torch.cat([p[k] for p in parts]) for k in (names or self.names)}

    def batches_per_epoch(self, batch_size: int) -> int:
        return sum(n // batch_size for _, n in self.shards)

    def batch(
        self, step: int, batch_size: int, seed: int = 0, names: Sequence[str] | None = None
    ) -> dict[str, Float[Tensor, "batch ..."]]:
        """The batch of ``step``: a pure function of ``(step, batch_size, seed)``.

        Each epoch visits the shards in a seeded random order and each shard's rows in a seeded
        random order, in batches that stay inside one shard (a shard's remainder rows are
        skipped that epoch); consecutive steps read the same shard, kept in memory.

        Example:
            Not run as a doctest: it needs a cache written by :func:`cache_activations`.
            >>> x = cache.batch(step, batch_size=4096)["blocks.3.hook_resid_post"]  # doctest: +SKIP
        """
        per_epoch = self.batches_per_epoch(batch_size)
        if per_epoch == 0:
            raise ValueError(f"no shard holds a batch of {batch_size} rows; lower batch_size")
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        for index in order:
            n = self.shards[index][1] // batch_size
            if k < n:
                break
            k -= n
        if self._cached is None or self._cached[0] != index or set(self._cached[1]) != set(names or self.names):
            self._cached = (index, self.read_shard(index, names))
        data = self._cached[1]
        perm = torch.randperm(
            self.shards[index][1], generator=torch.Generator().manual_seed((seed * 7919 + epoch) * 1_000_003 + index)
        )
        rows = perm[k * batch_size : (k + 1) * batch_size]
        return {name: t[rows] for name, t in data.items()}


def _last_layer(hook_names: Sequence[str], n_layers: int) -> int | None:
    """The layer to stop the forward at (None: run the whole model). Hooks inside blocks only
    stop after the last block, before ``ln_final`` and the unembedding they do not need."""
    layers = [re.match(r"blocks\.(\d+)\.", n) for n in hook_names]
    if not all(layers):
        return None
    return max(int(m.group(1)) for m in layers) + 1


@torch.no_grad()
def cache_activations(
    model,
    sequences: Sequence[Sequence[int]],
    directory: str | Path,
    hook_names: Sequence[str],
    *,
    batch_size: int = 32,
    shard_rows: int = 65536,
    pad_id: int = 0,
    dtype: torch.dtype | None = None,
    meta: dict | None = None,
    progress: bool = False,
) -> ActivationCache:
    """Cache ``model``'s activations at ``hook_names`` for every real token of ``sequences``.

    Rows also hold ``token``, ``sequence`` (index into ``sequences``) and ``position``. Sequences
    run in right-padded batches of ``batch_size``; under a process group batch ``b`` runs on rank
    ``b % world_size``. Rerun the same call after a kill to resume; a finished cache is returned
    as is. ``dtype`` converts the stored activations (e.g. ``torch.bfloat16`` halves the disk).

    Example:
        Not run as a doctest: it writes a cache of activations to disk.
        >>> cache = cache_activations(pair.target, traces["input_ids"], "runs/cache",
        ...                           ["blocks.2.hook_resid_post"])  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from mechdiff.padding import pad

    unknown = [n for n in hook_names if n not in model.hook_dict]
    if unknown:
        raise ValueError(f"unknown hook names {unknown}; e.g. {list(model.hook_dict)[:4]}")
    info = {
        "hook_names": list(hook_names),
        "batch_size": batch_size,
        "pad_id": pad_id,
        "n_sequences": len(sequences),
        "model": str(model.cfg.model_name),
        "dtype": str(dtype),
        **(meta or {}),
    }
    plan = [list(range(i, min(i + batch_size, len(sequences)))) for i in range(0, len(sequences), batch_size)]
    rank, world = distributed.rank(), distributed.world_size()
    mine = plan[rank::world]
    writer = CacheWriter(directory, shard_rows=shard_rows, meta=info)
    stop = _last_layer(hook_names, model.cfg.n_layers)
    device = model.cfg.device
    for rows in tqdm(mine[writer.cursor :], desc="cache", disable=not (progress and rank == 0)):
        tokens, mask = pad([list(sequences[i]) for i in rows], pad_id, side="right")
        store: dict[str, Tensor] = {}

        def save(t, hook):
            store[hook.name] = t[mask.to(t.device)]

        with model.hooks(fwd_hooks=[(n, save) for n in hook_names]):
            model(tokens.to(device), attention_mask=mask.long().to(device), stop_at_layer=stop)
        out = {n: store[n].to(dtype) if dtype else store[n] for n in hook_names}
        out["token"] = tokens[mask]
        out["sequence"] = torch.tensor(rows)[:, None].expand_as(tokens)[mask]
        out["position"] = torch.arange(tokens.shape[1]).expand_as(tokens)[mask]
        writer.append(out)
    writer.close()
    distributed.barrier()
    return ActivationCache(directory)
