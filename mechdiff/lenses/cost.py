"""What a lens costs: CPU seconds and memory of a phase measured in this run, or seconds recorded
when a reused artefact was trained.

**Measured** (:func:`measure`): a ``with`` block's CPU seconds (``time.process_time``) and memory.
Memory is the process's resident set (RSS, Linux): before the block Python's garbage is collected
and glibc hands freed heap pages back (``malloc_trim``), so the RSS at the start is what is live;
then the kernel's peak-RSS counter (``VmHWM``) is reset (``/proc/self/clear_refs``), so the peak it
reads after the block is the block's own, not the run's. ``rise_gib`` is that peak minus the RSS at
the start: the memory the phase itself needed on top of what was already loaded (the pair, the
labelled tokens). ``peak_gib`` is the process's peak during the phase, all included. Where the
counter cannot be reset (not Linux), both are None.

**Recorded** (:func:`adapters_record`, :func:`lora_record`): reused artefacts (the shipped transcoder
adapters, the rank-1 LoRA) are not trained in the run. Their training loop saved the *wall* seconds
it ran (``time.perf_counter``) beside them; those are returned as such (``kind="wall"``), never as
CPU seconds.

Example:
    >>> with measure() as cost:
    ...     x = bytearray(64 * 2**20)  # 64 MiB, touched
    >>> cost.cpu_s >= 0 and (cost.rise_gib is None or cost.rise_gib > 0.05)
    True
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 2**30
MEASURED = "measured in this run: CPU seconds (time.process_time)"
MEMORY_RULE = (
    "memory of a phase measured in this run, Linux RSS: gc + malloc_trim before it, the kernel's peak "
    "counter (VmHWM) reset by /proc/self/clear_refs, then read after it; *_peak_gib = the phase's "
    "increment over the RSS live at its start (the lens's own memory), *_rss_peak_gib = the process's "
    "peak RSS during the phase (everything loaded included)"
)


@dataclass
class Cost:
    """One phase's cost: CPU seconds; peak RSS during it and its rise over the start (GiB)."""

    cpu_s: float = 0.0
    peak_gib: float | None = None
    rise_gib: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


_BEFORE_RESETS = [0]  # the highest peak (KiB) the counter showed before any reset


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS (Linux >= 4.0); False where it cannot.
    The peak it held is kept for :func:`process_peak_gib` (``getrusage``'s ``ru_maxrss`` is reset too)."""
    _BEFORE_RESETS[0] = max(_BEFORE_RESETS[0], _status_kib("VmHWM") or 0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def measure() -> Iterator[Cost]:
    """Measure the block: the yielded :class:`Cost` is filled when the block ends."""
    cost = Cost()
    _trim()
    start = _status_kib("VmRSS")
    resettable = start is not None and _reset_peak()
    t0 = time.process_time()
    try:
        yield cost
    finally:
        cost.cpu_s = time.process_time() - t0
        peak = _status_kib("VmHWM") if resettable else None
        if peak is not None:
            cost.peak_gib = peak * 1024 / GIB
            cost.rise_gib = max(0, peak - start) * 1024 / GIB


def process_peak_gib() -> float | None:
    """The process's peak RSS since it started (GiB), across the resets :func:`measure` makes."""
    now = _status_kib("VmHWM")
    return None if now is None else max(now, _BEFORE_RESETS[0]) * 1024 / GIB


def machine_ram_gib() -> float | None:
    """Physical memory of this machine (GiB), or None where unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class Recorded:
    """Seconds a training run recorded: ``kind`` says which clock (``"wall"`` or ``"cpu"``)."""

    seconds: float
    kind: str
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


def adapters_record(folder: str | Path, shown: str | None = None) -> Recorded | None:
    """Training seconds saved with transcoder adapters (``adapters.json``: the training loop's last
    history entry), or None when the folder has no record.

    Example:
        >>> adapters_record("mechdiff/adapters/shipped/organism").kind
        'wall'
    """
    path = Path(folder) / "adapters.json"
    meta = json.loads(path.read_text()) if path.is_file() else {}
    last = (meta.get("metrics") or {}).get("train_last") or {}
    key = "metrics.train_last.seconds"
    if "seconds" not in last:
        history = Path(folder) / "history.json"
        rows = json.loads(history.read_text()) if history.is_file() else []
        last, path, key = (rows[-1] if rows else {}), history, "[-1].seconds"
    if "seconds" not in last:
        return None
    steps = f", {last['step']} steps" if "step" in last else ""
    return Recorded(
        float(last["seconds"]),
        "wall",
        f"recorded when trained: wall seconds (time.perf_counter) in {shown or folder}/{path.name} "
        f"{key}{steps}; not CPU seconds",
    )


def lora_record(folder: str | Path, shown: str | None = None) -> Recorded | None:
    """Training seconds saved with a LoRA by ``python -m mechdiff.lora train`` (``training.json``),
    or None when the folder has no record.

    Example:
        >>> lora_record("mechdiff/adapters/shipped/lora_r1").seconds > 0
        True
    """
    path = Path(folder) / "training.json"
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    if "seconds" not in info:
        return None
    steps = (info.get("config") or {}).get("steps")
    return Recorded(
        float(info["seconds"]),
        "wall",
        f"recorded when trained: wall seconds (time.perf_counter) in {shown or folder}/training.json "
        f"seconds{f', {steps} steps' if steps else ''}; not CPU seconds",
    )
