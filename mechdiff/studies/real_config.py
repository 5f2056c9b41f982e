"""The settings of the study on SmolLM2 (:class:`RealConfig`) and the folders they name.

The study runs in stages (:data:`STAGES`), each leaving ``STAGE.json`` in the output folder, so a
rerun skips what is done. Trained adapters and LoRA go to the SmolLM2 cache, in folders named by
their recipe (:func:`adapter_folder`), so a new recipe never reuses (or overwrites) another's; a
stage whose JSON was made with other adapters than the config's is stale and reruns (:func:`stale`).

Example:
    >>> cfg = RealConfig(stages=["behaviour"], n_problems=20)
    >>> cfg.stages, cfg.sweep[0], cfg.hesitation.ranking
    (('behaviour',), (512, 8), 'gradient')
    >>> RealConfig(d_sae=0)
    Traceback (most recent call last):
    ...
    mechdiff.config_checks.ConfigError: RealConfig.d_sae = 0: must be >= 1
    >>> RealConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from mechdiff.config_checks import ConfigError, check
from mechdiff.studies.hesitation import HesitationConfig

STAGES = ("behaviour", "sweep", "adapters", "hesitation", "features", "lora", "cost")
DTYPES = ("float32", "bfloat16", "float16")
AUTOCASTS = (None, "bfloat16", "float16")


def _hesitation_defaults() -> HesitationConfig:
    """The hesitation stage's small settings: one graph per prompt costs about 3 min on SmolLM2,
    so features are ranked by activation x gradient."""
    return HesitationConfig(
        ranking="gradient",
        n_prompts=24,
        n_problems=32,
        n_traces=8,
        n_dose_problems=12,
        random_draws=2,
        max_feature_nodes=256,
    )


@dataclass(frozen=True)
class RealConfig:
    """What the study on SmolLM2 runs, and at which sizes (defaults: ``python -m analyses.real``'s)."""

    pair: str = "smollm2"  # smollm2 or smollm2:RUN (the fine-tune run of ``python -m mechdiff.real train``)
    device: str | None = None  # None: cuda when a GPU is visible, else cpu
    dtype: str = "float32"
    threads: int = 0  # torch CPU threads in each stage (0: torch's default)
    stages: tuple[str, ...] = STAGES  # the stages to run, in this order
    redo: tuple[str, ...] = ()  # stages rerun even when their JSON is there
    n_problems: int = 48  # held-out problems for behaviour, adapters and LoRA
    n_eval_traces: int = 32  # held-out traces for faithfulness
    d_sae: int | None = None  # adapter features per layer (None: the sweep's pick, else 512)
    k: int | None = None  # TopK active features per token (None: the sweep's pick, else 8)
    adapter_steps: int = 60
    adapter_lr: float = 1e-3
    adapter_resample: int = 0  # re-initialise features dead this many steps (0: never)
    autocast: str | None = None  # mixed-precision forwards for adapter training
    recompute: bool = False  # adapter and LoRA training recompute each block in backward: same gradients, < 4 GB
    bridging: bool = True  # the bridging splices in the adapters' faithfulness report (about 1 h on a CPU)
    sweep: tuple[tuple[int, int], ...] = ((512, 8), (1024, 8), (512, 16))  # (width, k) candidates
    sweep_steps: int = 30  # training steps per sweep candidate
    # the candidates read the target's pass over their shared traces from one cache on disk instead of
    # each running the target every step: the same loss, ~14% less time per step, 2 GB for 120 traces
    sweep_target_cache: bool = False
    lora_steps: int = 200
    lora_lr: float = 1e-3
    batch_size: int = (
        4  # traces per training step (4: ~10 GB for an adapter step on SmolLM2 in float32, ~4 with recompute)
    )
    n_census_traces: int = 300  # held-out chat traces for the feature census
    n_monosemanticity_traces: int = 64  # ... for LoRA vs MLP-neuron monosemanticity, 0: not measured
    # (every neuron's activation on every token is held: 64 traces of ~250 tokens x 46k neurons is 3 GB)
    hesitation: HesitationConfig = field(default_factory=_hesitation_defaults)

    def __post_init__(self):
        # lists (as a notebook writes them) become tuples, so the config stays hashable and comparable
        for name in ("stages", "redo"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "sweep", tuple(tuple(c) if isinstance(c, (list, tuple)) else c for c in self.sweep))
        if not (self.pair == "smollm2" or (self.pair.startswith("smollm2:") and self.pair != "smollm2:")):
            raise ConfigError("pair", self.pair, "this study is SmolLM2's (smollm2 or smollm2:RUN)", "RealConfig")
        check(
            self,
            at_least_1=(
                "n_problems",
                "n_eval_traces",
                "adapter_steps",
                "lora_steps",
                "batch_size",
                "sweep_steps",
                "n_census_traces",
            ),
            non_negative=("threads", "n_monosemanticity_traces"),
            positive=("adapter_lr", "lora_lr"),
            choices={"dtype": DTYPES, "autocast": AUTOCASTS},
        )
        for name in ("d_sae", "k"):  # None: chosen by the sweep
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(name, value, "must be >= 1", "RealConfig")
        if isinstance(self.adapter_resample, bool) or not isinstance(self.adapter_resample, int):
            raise ConfigError("adapter_resample", self.adapter_resample, "must be a whole number", "RealConfig")
        if self.adapter_resample < 0:
            raise ConfigError("adapter_resample", self.adapter_resample, "must be >= 0 (0: never)", "RealConfig")
        for name in ("stages", "redo"):
            unknown = [s for s in getattr(self, name) if s not in STAGES]
            if unknown:
                raise ConfigError(name, unknown[0], f"not a stage (one of {', '.join(STAGES)})", "RealConfig")
        if not self.sweep:
            raise ConfigError("sweep", self.sweep, "give at least one (width, k) candidate", "RealConfig")
        for c in self.sweep:
            ok = isinstance(c, tuple) and len(c) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in c)
            if not (ok and c[0] >= 1 and 1 <= c[1] <= c[0]):
                raise ConfigError("sweep", c, "each candidate is (width, k) with 1 <= k <= width", "RealConfig")
        if not isinstance(self.hesitation, HesitationConfig):
            raise ConfigError("hesitation", self.hesitation, "must be a HesitationConfig", "RealConfig")

    def to_dict(self) -> dict:
        """Plain JSON values (tuples as lists): how a stage process receives the config."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> RealConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"RealConfig has no field {unknown[0]!r}")
        d = dict(d)
        if isinstance(d.get("hesitation"), dict):
            d["hesitation"] = HesitationConfig(**d["hesitation"])
        if "sweep" in d:
            d["sweep"] = tuple(tuple(c) for c in d["sweep"])
        return cls(**d)

    def stage_args(self, out: Path) -> dict:
        """What each stage JSON records as ``stage_args``: the settings under the command line's names."""
        d = asdict(self)
        flags = {"pair": self.pair, "base": None, "target": None, "device": self.device, "dtype": self.dtype}
        flags.update(threads=self.threads, out=str(out))
        flags.update({k: v for k, v in d.items() if k not in (*flags, "stages", "redo", "sweep", "hesitation")})
        flags["sweep"] = ",".join(f"{w}:{k}" for w, k in self.sweep)
        flags["hesitation"] = d["hesitation"]
        flags["sweep_candidates"] = [list(c) for c in self.sweep]
        return flags


def read_json(path: Path) -> dict:
    """The JSON in ``path``, or ``{}`` when there is none."""
    return json.loads(path.read_text()) if path.is_file() else {}


def cache_folder(cfg: RealConfig) -> Path:
    """The study's folder in the SmolLM2 cache, one per fine-tune run: ``CACHE/study/RUN``."""
    from mechdiff.real import smollm2

    run = cfg.pair.partition(":")[2] or "default"
    return smollm2.cache_dir() / "study" / run


def adapter_shape(cfg: RealConfig, out: Path) -> tuple[int, int, str]:
    """(width, k, where they came from): the config's if given, else the sweep's pick in ``out``, else 512:8."""
    picked = read_json(Path(out) / "sweep.json").get("picked") or {}
    d_sae = cfg.d_sae or picked.get("d_sae") or 512
    k = cfg.k or picked.get("k") or 8
    given = "flags" if cfg.d_sae and cfg.k else ("sweep" if picked else "default")
    return d_sae, k, given


def adapter_folder(cfg: RealConfig, out: Path) -> Path:
    """The cache folder of the adapters this config trains: named by width, k, steps, lr, resampling and
    autocast, so a new recipe never reuses (or overwrites) another recipe's adapters."""
    d_sae, k, _ = adapter_shape(cfg, out)
    mixed = f"-{cfg.autocast}" if cfg.autocast else ""
    resample = f"-r{cfg.adapter_resample}" if cfg.adapter_resample else ""
    return cache_folder(cfg) / f"adapters-{d_sae}-k{k}-s{cfg.adapter_steps}-lr{cfg.adapter_lr:g}{resample}{mixed}"


def stale(cfg: RealConfig, out: Path, stage: str) -> bool:
    """A stage whose JSON was made with other adapters than the ones ``cfg`` trains is rerun."""
    if stage in ("adapters", "hesitation", "features"):
        done = read_json(Path(out) / f"{stage}.json")
        return done.get("adapters_folder", done.get("folder")) != str(adapter_folder(cfg, out))
    return False


def done(cfg: RealConfig, out: Path, stage: str) -> bool:
    """``stage``'s JSON is in ``out``, made with this config's adapters, and ``cfg.redo`` does not name it."""
    return (Path(out) / f"{stage}.json").is_file() and stage not in cfg.redo and not stale(cfg, out, stage)
