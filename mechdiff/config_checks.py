"""Checks of configuration fields, shared by every recipe and config dataclass.

A recipe calls :func:`check` from its ``__post_init__``, so a bad value is refused when the recipe
is made (in a notebook as on the command line), before any model is loaded or file written.
The error, :class:`ConfigError`, names the field; the CLIs print it with the field's flag
(:meth:`ConfigError.as_flag`), e.g. ``--steps 0: must be >= 1``.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Run:
    ...     steps: int = 10
    ...     lr: float = 1e-3
    ...     def __post_init__(self):
    ...         check(self, at_least_1=("steps",), positive=("lr",))
    >>> Run(steps=0)
    Traceback (most recent call last):
    ...
    mechdiff.config_checks.ConfigError: Run.steps = 0: must be >= 1
    >>> try:
    ...     Run(steps=0)
    ... except ConfigError as err:
    ...     print(err.as_flag())
    --steps 0: must be >= 1
"""

from __future__ import annotations

import math
from collections.abc import Iterable


class ConfigError(ValueError):
    """A configuration field holds a value the run cannot use."""

    def __init__(self, field: str, value, reason: str, owner: str = ""):
        self.field, self.value, self.reason = field, value, reason
        where = f"{owner}.{field}" if owner else field
        super().__init__(f"{where} = {value!r}: {reason}")

    def as_flag(self) -> str:
        """The message as a command line spells it: ``--field-name VALUE: reason``."""
        return f"--{self.field.replace('_', '-')} {self.value}: {self.reason}"


def check(
    obj,
    *,
    at_least_1: Iterable[str] = (),
    non_negative: Iterable[str] = (),
    positive: Iterable[str] = (),
    fraction: Iterable[str] = (),
    choices: dict[str, Iterable] | None = None,
) -> None:
    """Raise :class:`ConfigError` for the first field of ``obj`` that breaks its rule.

    ``at_least_1``: integers >= 1 (steps, batch sizes, widths); ``non_negative``: numbers >= 0
    (weights, intervals where 0 means off); ``positive``: finite numbers > 0 (learning rates);
    ``fraction``: numbers in [0, 1]; ``choices``: ``{field: allowed values}``.
    """
    owner = type(obj).__name__

    def fail(name, value, reason):
        raise ConfigError(name, value, reason, owner)

    for name in at_least_1:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int):
            fail(name, value, "must be a whole number >= 1")
        if value < 1:
            fail(name, value, "must be >= 1")
    for name in non_negative:
        value = getattr(obj, name)
        if not _number(value) or value < 0:
            fail(name, value, "must be a number >= 0")
    for name in positive:
        value = getattr(obj, name)
        if not _number(value) or value <= 0:
            fail(name, value, "must be a number > 0")
    for name in fraction:
        value = getattr(obj, name)
        if not _number(value) or not 0 <= value <= 1:
            fail(name, value, "must be a share between 0 and 1")
    for name, allowed in (choices or {}).items():
        allowed = tuple(allowed)
        if getattr(obj, name) not in allowed:
            fail(name, getattr(obj, name), f"must be one of {', '.join(map(str, allowed))}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
