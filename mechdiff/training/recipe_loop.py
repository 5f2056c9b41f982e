"""Recipes nest the loop's settings (:class:`~mechdiff.training.loop.LoopConfig`) instead of
copying its fields.

A recipe is a dataclass with a ``loop: LoopConfig`` field, decorated with :func:`nests_loop`:

* keyword arguments named after a loop setting go into ``loop``: ``AdapterRecipe(steps=3,
  batch_size=4)`` sets ``recipe.loop.steps``, so call sites (and ``dataclasses.replace``) read as
  before; reading ``recipe.steps`` reads ``recipe.loop.steps``;
* the loop checks its own fields (``steps >= 1``, ``lr > 0``...) when the recipe is made, and an
  error names the recipe (``AdapterRecipe.steps = 0: must be >= 1``), as the CLIs print it;
* ``to_dict()`` is the nested form (``{"loop": {...}, ...}``, without the run-time fields
  ``out_dir``, ``resume``, ``desc``); ``from_dict()`` reads it and the flat form saved before the
  nesting (``{"steps": 300, "lr": 0.001, ...}``); ``flat_dict()`` is that flat form: the recipe's
  own fields, the loop settings it names (``flat``), and any other loop setting changed from
  :class:`LoopConfig`'s default (what keys a checkpoint folder, so old runs resume).

Example:
    >>> from dataclasses import dataclass, field
    >>> @nests_loop("steps", "lr")
    ... @dataclass
    ... class Mine:
    ...     width: int = 8
    ...     loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=100, lr=1e-3))
    >>> r = Mine(width=4, steps=3)
    >>> r.steps, r.loop.lr, Mine.from_dict({"width": 4, "steps": 3, "lr": 1e-3}) == r
    (3, 0.001, True)
    >>> r.flat_dict()
    {'width': 4, 'steps': 3, 'lr': 0.001}
    >>> Mine(steps=0)
    Traceback (most recent call last):
    ...
    mechdiff.config_checks.ConfigError: Mine.steps = 0: must be >= 1
"""

from __future__ import annotations

import functools
from dataclasses import MISSING, asdict, fields, replace

from mechdiff.config_checks import ConfigError
from mechdiff.training.loop import LoopConfig

RUN_FIELDS = ("out_dir", "resume", "desc")  # how one run goes, not what it trains: never in a recipe


def loop_settings() -> tuple[str, ...]:
    """The :class:`LoopConfig` fields a recipe may hold (all but :data:`RUN_FIELDS`)."""
    return tuple(f.name for f in fields(LoopConfig) if f.name not in RUN_FIELDS)


def loop_to_dict(loop: LoopConfig) -> dict:
    """The loop's settings as a recipe saves them (no run-time fields)."""
    return {k: v for k, v in asdict(loop).items() if k not in RUN_FIELDS}


def nests_loop(*flat: str):
    """Class decorator for a recipe dataclass with a ``loop: LoopConfig`` field (see the module).

    ``flat``: the loop settings the recipe had as its own fields before the nesting; they stay in
    :meth:`flat_dict` always (the others only when changed from :class:`LoopConfig`'s default).
    """

    def wrap(cls):
        own = {f.name for f in fields(cls)}
        keywords = tuple(k for k in loop_settings() if k not in own)
        default_loop = cls.__dataclass_fields__["loop"].default_factory
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            settings = {k: kwargs.pop(k) for k in keywords if k in kwargs}
            loop = kwargs.pop("loop", None)
            try:
                loop = LoopConfig(**loop) if isinstance(loop, dict) else loop or default_loop()
                loop = replace(loop, **settings) if settings else loop
            except ConfigError as err:  # named as the recipe's field, as the CLIs print it
                raise ConfigError(err.field, err.value, err.reason, cls.__name__) from None
            init(self, *args, loop=loop, **kwargs)

        def __getattr__(self, name):  # only for names the instance does not have
            if name in keywords and "loop" in self.__dict__:
                return getattr(self.loop, name)
            raise AttributeError(f"{cls.__name__!r} object has no attribute {name!r}")

        def to_dict(self) -> dict:
            """The recipe, its loop settings nested under ``loop``."""
            return {**asdict(self), "loop": loop_to_dict(self.loop)}

        def flat_dict(self) -> dict:
            """The recipe in the flat form saved before the loop was nested (see the module)."""
            d = {k: v for k, v in asdict(self).items() if k != "loop"}
            defaults = {f.name: f.default for f in fields(LoopConfig) if f.default is not MISSING}
            loop = loop_to_dict(self.loop)
            return {**d, **{k: loop[k] for k in keywords
                            if k in flat or k not in defaults or loop[k] != defaults[k]}}

        cls.__init__, cls.__getattr__ = __init__, __getattr__
        cls.to_dict, cls.flat_dict = to_dict, flat_dict
        if "from_dict" not in cls.__dict__:
            cls.from_dict = classmethod(lambda c, d: c(**d))
        cls.loop_keywords = keywords
        return cls

    return wrap
