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

A recipe trained in stages (the organism: pretraining, then fine-tuning) has one loop per stage,
``{stage}_loop``, and :func:`nests_stage_loops`: the same, with keywords ``{stage}_{setting}``
(``base_steps=3``) and settings ``shared`` by every stage (``seed=1``).

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
    defaults = {f.name: f.default for f in fields(LoopConfig) if f.default is not MISSING}
    return lambda cls: _nest(cls, {"loop": ""}, flat, (), lambda loop_field: defaults)


def nests_stage_loops(*stages: str, flat: tuple[str, ...] = (), shared: tuple[str, ...] = ()):
    """Class decorator for a recipe trained in stages, one ``{stage}_loop: LoopConfig`` field each.

    The keyword ``{stage}_{setting}`` (``base_steps=3``) sets that stage's loop and reads back from it
    (``recipe.base_steps``); a ``shared`` setting (``seed=1``) sets every stage's loop, and reads back
    while the stages agree. :meth:`flat_dict` is the flat form: the recipe's own fields, the ``shared``
    settings, each stage's ``flat`` settings and any other setting changed from the recipe's default
    loop of that stage.

    Example:
        >>> from dataclasses import dataclass, field
        >>> @nests_stage_loops("pre", "post", flat=("steps",), shared=("seed",))
        ... @dataclass
        ... class Two:
        ...     width: int = 8
        ...     pre_loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=10, lr=1e-3))
        ...     post_loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=5, lr=1e-4))
        >>> r = Two(pre_steps=3, post_lr=2e-4, seed=7)
        >>> r.pre_loop.steps, r.post_loop.lr, r.post_loop.seed, r.seed
        (3, 0.0002, 7, 7)
        >>> r.flat_dict()
        {'width': 8, 'seed': 7, 'pre_steps': 3, 'post_steps': 5, 'post_lr': 0.0002}
        >>> Two.from_dict(r.flat_dict()) == r == Two.from_dict(r.to_dict())
        True
        >>> Two(post_steps=0)
        Traceback (most recent call last):
        ...
        mechdiff.config_checks.ConfigError: Two.post_steps = 0: must be >= 1
    """

    def wrap(cls):
        factories = {f"{s}_loop": cls.__dataclass_fields__[f"{s}_loop"].default_factory for s in stages}
        return _nest(
            cls,
            {f"{s}_loop": f"{s}_" for s in stages},
            flat,
            shared,
            lambda loop_field: loop_to_dict(factories[loop_field]()),
        )

    return wrap


def _nest(cls, loops: dict[str, str], flat, shared, baseline):
    """Give ``cls`` keyword settings for its loop fields (``loops``: field name -> keyword prefix).

    ``baseline(loop_field)``: the settings :meth:`flat_dict` leaves out when a loop has them.
    """
    own = {f.name for f in fields(cls)} - set(loops)
    settings = [k for k in loop_settings() if k not in own]
    keywords = {f"{prefix}{k}": (name, k) for name, prefix in loops.items() for k in settings}
    keywords = {kw: target for kw, target in keywords.items() if kw not in own}
    shared = tuple(k for k in shared if k in settings and k not in own)
    factories = {name: cls.__dataclass_fields__[name].default_factory for name in loops}
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        common = {k: kwargs.pop(k) for k in shared if k in kwargs}
        chosen = {kw: kwargs.pop(kw) for kw in list(kwargs) if kw in keywords}
        for name, prefix in loops.items():
            mine = {**common, **{keywords[kw][1]: v for kw, v in chosen.items() if keywords[kw][0] == name}}
            loop = kwargs.pop(name, None)
            try:
                loop = LoopConfig(**loop) if isinstance(loop, dict) else loop or factories[name]()
                kwargs[name] = replace(loop, **mine) if mine else loop
            except ConfigError as err:  # named as the recipe's keyword, as the CLIs print it
                field = err.field if err.field in shared and err.field in common else prefix + err.field
                raise ConfigError(field, err.value, err.reason, cls.__name__) from None
        init(self, *args, **kwargs)

    def __getattr__(self, name):  # only for names the instance does not have
        if name in keywords and keywords[name][0] in self.__dict__:
            loop_field, setting = keywords[name]
            return getattr(self.__dict__[loop_field], setting)
        if name in shared and all(n in self.__dict__ for n in loops):
            values = {getattr(self.__dict__[n], name) for n in loops}
            if len(values) == 1:
                return values.pop()
            raise AttributeError(f"{cls.__name__}.{name} differs between {list(loops)}: read it from each")
        raise AttributeError(f"{cls.__name__!r} object has no attribute {name!r}")

    def to_dict(self) -> dict:
        """The recipe, each loop's settings nested under its field."""
        return {**asdict(self), **{name: loop_to_dict(getattr(self, name)) for name in loops}}

    def flat_dict(self) -> dict:
        """The recipe in the flat form saved before the loop was nested (see the module)."""
        out = {k: v for k, v in asdict(self).items() if k not in loops}
        per_loop = {name: loop_to_dict(getattr(self, name)) for name in loops}
        for k in shared:
            values = {repr(d[k]) for d in per_loop.values()}
            if len(values) == 1:
                out[k] = next(iter(per_loop.values()))[k]
        for kw, (name, k) in keywords.items():
            if k in out and k in shared:
                continue
            base, value = baseline(name), per_loop[name][k]
            if k in flat or k not in base or value != base[k]:
                out[kw] = value
        return out

    cls.__init__, cls.__getattr__ = __init__, __getattr__
    cls.to_dict, cls.flat_dict = to_dict, flat_dict
    if "from_dict" not in cls.__dict__:
        cls.from_dict = classmethod(lambda c, d: c(**d))
    cls.loop_keywords = tuple(keywords)
    return cls
