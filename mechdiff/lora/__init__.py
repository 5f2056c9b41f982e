"""Rank-r LoRA lens: distil the target's reasoning into a LoRA on the base, then evaluate it.

``train_lora`` fine-tunes a :class:`~mechdiff.adapters.lora.LoRAModel` on target-style reasoning
traces (loss on response tokens only; AdamW, warmup + cosine; progress bar, atomic checkpoints,
exact resume, seeds) and writes a PEFT folder. ``evaluate_lora`` measures accuracy, length and
hesitations of base, LoRA(s) and target on held-out problems and the gain each LoRA recovers.
The command line is ``python -m mechdiff.lora train|eval`` (see ``--help``).

Example:
    >>> from mechdiff.models import load_pair
    >>> pair = load_pair("organism")
    >>> lora, history = train_lora(pair, TrainConfig(steps=2, n_traces=64, batch_size=8), progress=False)
    >>> history[-1]["step"]
    2
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from mechdiff import distributed
from mechdiff.adapters.lora import MODULES, LoRAConfig, LoRAModel
from mechdiff.adapters.peft_format import base_reference, export_peft, import_peft
from mechdiff.config_checks import ConfigError, check
from mechdiff.evaluation.behaviour import gain_recovered
from mechdiff.models import ModelPair
from mechdiff.training.loop import LoopConfig, train
from mechdiff.training.lora_objective import TraceBatches, make_loss_fn
from mechdiff.training.recipe_loop import nests_loop
from mechdiff.workloads import Workload, for_pair

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "adapters" / "shipped"


@nests_loop("steps", "lr", "warmup_frac", "weight_decay", "seed", "checkpoint_every", "log_every")
@dataclass
class TrainConfig:
    """Everything that defines a LoRA training run (saved as ``training.json``). The optimiser's
    schedule is ``loop`` (1000 steps, lr 1e-2, a checkpoint every 100); its settings are keywords
    too (``TrainConfig(steps=2)``, :mod:`mechdiff.training.recipe_loop`)."""

    rank: int = 1
    alpha: float = 16.0
    rslora: bool = True
    modules: tuple[str, ...] = MODULES
    batch_size: int = 64
    n_traces: int = 20_000
    kl_weight: float = 0.0  # 0: next-token CE on the traces; 1: KL to the target's logits
    checkpoint: bool = False  # recompute each block in backward: less memory, ~one more forward
    extra: dict = field(default_factory=dict)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=1000, lr=1e-2, checkpoint_every=100))

    def __post_init__(self):  # refused here, before any model loads (CLI and Python alike)
        check(self, at_least_1=("rank", "batch_size", "n_traces"), positive=("alpha",), fraction=("kl_weight",))
        unknown = sorted(set(self.modules) - set(MODULES))
        if not self.modules or unknown:
            raise ConfigError(
                "modules", " ".join(self.modules), f"must be some of {' '.join(MODULES)}", type(self).__name__
            )

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(
            rank=self.rank, alpha=self.alpha, rslora=self.rslora, modules=tuple(self.modules), seed=self.seed
        )


def train_lora(
    pair: ModelPair,
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    *,
    progress: bool = True,
    resume: bool = True,
    workload: Workload | None = None,
) -> tuple[LoRAModel, list[dict]]:
    """Train a LoRA on ``pair.base`` towards the target's traces; returns ``(lora, history)``.

    The traces are ``workload``'s training traces (default: the pair's,
    :func:`mechdiff.workloads.for_pair`: the organism corpus, or SmolLM2's chat traces).
    With ``out_dir`` the run checkpoints to ``out_dir/checkpoint`` (resumed if present and
    ``resume``) and finishes by writing the PEFT folder (``adapter_config.json``,
    ``adapter_model.safetensors``) plus ``training.json`` into ``out_dir``. The LoRA takes the
    base's device and dtype; under torchrun each rank trains on its shard of every batch.
    """
    torch.manual_seed(cfg.seed)
    lora = LoRAModel.from_base(pair.base, cfg.lora_config())
    data = (workload or for_pair(pair)).traces(cfg.n_traces, "train", seed=cfg.seed)
    batches = TraceBatches(data, cfg.batch_size, seed=cfg.seed, pad_id=pair.tokenizer.pad_token_id or 0)
    target = pair.target if cfg.kl_weight > 0 else None
    loss_fn = make_loss_fn(lora, batches, target=target, kl_weight=cfg.kl_weight, checkpoint=cfg.checkpoint)
    loop = replace(cfg.loop, out_dir=out_dir, resume=resume, progress=progress, desc=f"LoRA r{cfg.rank}")
    lora.train()
    start = time.perf_counter()
    history = train(lora.layers, loss_fn, loop)
    lora.eval()
    if out_dir is not None and distributed.is_main():  # under torchrun: one writer
        export_peft(lora, out_dir, base_model_name_or_path=base_reference(pair))
        info = {
            "config": cfg.to_dict(),
            "history": history,
            "seconds": time.perf_counter() - start,
            "tokens_seen": int(cfg.steps * batches.batch_size * batches.lengths.float().mean()),
        }
        Path(out_dir, "training.json").write_text(json.dumps(info, indent=1, default=list))
    return lora, history


def load_lora(folder: str | Path, pair: ModelPair) -> LoRAModel:
    """A saved (PEFT-format) LoRA on a copy of ``pair.base``."""
    return import_peft(folder, pair.base)


def shipped_lora(pair: ModelPair, rank: int = 1) -> LoRAModel | None:
    """The LoRA shipped for the organism at ``rank`` (``None`` if not shipped)."""
    folder = SHIPPED_DIR / f"lora_r{rank}"
    return load_lora(folder, pair) if (folder / "adapter_model.safetensors").is_file() else None


def evaluate_lora(
    pair: ModelPair,
    loras: dict[str, LoRAModel],
    n_problems: int = 500,
    *,
    seed: int = 0,
    progress: bool = False,
    reference: dict[str, dict] | None = None,
    workload: Workload | None = None,
) -> dict[str, dict]:
    """Behaviour of base, target and each LoRA on ``n_problems`` held-out test problems.

    Returns ``{name: stats}`` with ``workload.evaluate``'s numbers (default workload: the pair's;
    for the organism :func:`~mechdiff.evaluation.behaviour.evaluate`) plus ``gain_recovered``
    for each LoRA. ``reference`` reuses already measured base/target stats.

    Example:
        Not run by the tests: it needs a trained LoRA (``train_lora`` above) and minutes of generation.
        >>> stats = evaluate_lora(pair, {"r1": lora}, n_problems=16)  # doctest: +SKIP
        >>> stats["r1"]["gain_recovered"]  # doctest: +SKIP
    """
    workload = workload or for_pair(pair)
    problems = workload.problems(n_problems, "test", seed=seed)
    out = dict(reference or {})
    for name, model in (("base", pair.base), ("target", pair.target)):
        if name not in out:
            out[name] = workload.evaluate(model, problems, progress=progress)
    for name, lora in loras.items():
        stats = workload.evaluate(lora.model, problems, progress=progress)
        stats["gain_recovered"] = gain_recovered(stats["accuracy"], out["base"]["accuracy"], out["target"]["accuracy"])
        out[name] = stats
    return out
