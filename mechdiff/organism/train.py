"""The organism recipe: pretrain a tiny Qwen2-style base, then fully fine-tune it on reasoning traces.

Both models are ordinary ``transformers`` ``Qwen2ForCausalLM`` checkpoints (RMSNorm, rotary, gated
SiLU MLP, untied embeddings) written as Hugging Face folders, so the organism loads through the
same local-folder path as any real pair. ``python -m mechdiff.organism train --out DIR`` reproduces
the shipped weights (about 12 minutes on 2 CPU cores); a killed run resumes from its last checkpoint.
The recipe's :class:`~mechdiff.organism.task.TaskSpec` (hesitation words, operand shape, slip
policy, re-check rate) makes organisms a family; it is written beside both models
(``mechdiff_task.json``), where :func:`mechdiff.models.load_pair` finds it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from mechdiff.atomic import atomic_folder
from mechdiff.config_checks import ConfigError, check
from mechdiff.organism import corpus
from mechdiff.organism.task import TaskSpec
from mechdiff.organism.tokenizer import build_tokenizer
from mechdiff.padding import pad
from mechdiff.training.batches import step_indices
from mechdiff.training.loop import LoopConfig, train
from mechdiff.training.losses import causal_lm_ce
from mechdiff.training.recipe_loop import nests_stage_loops


def _stage_loop(steps: int) -> LoopConfig:
    return LoopConfig(steps=steps, lr=1e-3, weight_decay=0.01, checkpoint_every=100)


@nests_stage_loops("base", "ft", flat=("steps", "lr"), shared=("weight_decay", "seed"))
@dataclass
class Recipe:
    """The organism: its shape, its two corpora, and one optimiser loop per stage.

    ``base_loop`` pretrains the base (1100 steps, lr 1e-3: 3e-3 never learned the column-sum table,
    units digit at chance); ``ft_loop`` fine-tunes it on reasoning traces (700 steps). Their settings
    are keywords too (``Recipe(base_steps=3, ft_lr=1e-4)``); ``seed`` and ``weight_decay`` set both
    loops (see :func:`mechdiff.training.recipe_loop.nests_stage_loops`); ``seed`` also seeds the
    initial weights and both corpora. :meth:`from_dict` reads the flat files shipped before the
    nesting and the nested :meth:`to_dict`.

    Example:
        >>> r = Recipe(base_steps=3, seed=2)
        >>> r.base_loop.steps, r.base_steps, r.ft_loop.seed, r.seed, r.ft_loop.checkpoint_every
        (3, 3, 2, 2, 100)
        >>> Recipe.from_dict(r.flat_dict()) == r == Recipe.from_dict(r.to_dict())
        True
    """

    d_model: int = 128
    n_layers: int = 3
    n_heads: int = 4
    d_mlp: int = 512
    n_ctx: int = 128
    base_docs: int = 120_000
    ft_traces: int = 40_000
    batch_size: int = 128
    task: TaskSpec = field(default_factory=TaskSpec)
    base_loop: LoopConfig = field(default_factory=lambda: _stage_loop(1100))
    ft_loop: LoopConfig = field(default_factory=lambda: _stage_loop(700))

    def __post_init__(self):
        if isinstance(self.task, dict):
            self.task = TaskSpec.from_dict(self.task)
        check(
            self,
            at_least_1=("d_model", "n_layers", "n_heads", "d_mlp", "n_ctx", "base_docs", "ft_traces", "batch_size"),
        )
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        if self.base_loop.seed != self.ft_loop.seed:
            raise ConfigError(
                "seed",
                (self.base_loop.seed, self.ft_loop.seed),
                "the stages share one seed (it also seeds the weights and corpora)",
                "Recipe",
            )

    def scaled(self, factor: float) -> Recipe:
        """A shorter (or longer) run with the same shape: for tests and quick looks."""
        return replace(
            self,
            base_steps=max(2, int(self.base_loop.steps * factor)),
            ft_steps=max(2, int(self.ft_loop.steps * factor)),
            base_docs=max(256, int(self.base_docs * factor)),
            ft_traces=max(256, int(self.ft_traces * factor)),
        )


def model_config(recipe: Recipe, vocab_size: int) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=recipe.d_model,
        intermediate_size=recipe.d_mlp,
        num_hidden_layers=recipe.n_layers,
        num_attention_heads=recipe.n_heads,
        num_key_value_heads=recipe.n_heads,
        max_position_embeddings=recipe.n_ctx,
        rms_norm_eps=1e-6,
        rope_theta=10_000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def lm_loss(model, rows, pad_id: int, response_only: bool):
    """Mean next-token cross-entropy over real tokens (or only response tokens), through the
    project's one chunked loss (:func:`mechdiff.training.losses.causal_lm_ce`)."""
    tokens, mask = pad(rows["input_ids"], pad_id)
    prompt_len = torch.tensor(rows["prompt_len"]) if response_only else None
    return causal_lm_ce(model, tokens, mask, prompt_len)


def _stage(model, data, loop: LoopConfig, recipe, out_dir, desc, response_only, progress, on_step) -> list[dict]:
    pad_id = 0

    def loss_fn(step):
        rows = data[step_indices(len(data), recipe.batch_size, step, recipe.seed)]
        loss = lm_loss(model, rows, pad_id, response_only)
        return loss, {"ce": loss.item()}

    return train(model, loss_fn, replace(loop, out_dir=out_dir, desc=desc, progress=progress), on_step=on_step)


def _save_hf(model, tokenizer, directory: Path, recipe: Recipe, history) -> None:
    with atomic_folder(directory) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        recipe.task.save(tmp)
        (tmp / "mechdiff_recipe.json").write_text(
            json.dumps({"recipe": recipe.to_dict(), "final": history[-1] if history else None}, indent=1)
        )


def train_organism(
    out: str | Path,
    work: str | Path,
    recipe: Recipe | None = None,
    progress: bool = True,
    on_step: Callable[[str, int], None] | None = None,
) -> tuple[Path, Path]:
    """Train base then target into ``out/base`` and ``out/target`` (HF folders).

    ``work`` holds the resumable checkpoints (``work/base``, ``work/target``; every
    ``recipe.base_loop.checkpoint_every`` / ``ft_loop`` steps). A finished stage is not redone.
    ``on_step(stage, step)`` runs after each optimiser step, ``stage`` "base" or "target".
    """
    out, work, recipe = Path(out), Path(work), recipe or Recipe()
    spec = recipe.task
    tokenizer = build_tokenizer(spec)
    torch.manual_seed(recipe.seed)
    base_dir, target_dir = out / "base", out / "target"
    for folder in (base_dir, target_dir):  # a finished stage of another task must not be reused
        if (folder / "config.json").exists() and TaskSpec.load(folder) != spec:
            raise ValueError(
                f"{folder} holds an organism of another task ({TaskSpec.load(folder)}); choose another --out for {spec}"
            )
    if not (base_dir / "config.json").exists():
        model = Qwen2ForCausalLM(model_config(recipe, len(tokenizer)))
        data = corpus.base_corpus(recipe.base_docs, seed=recipe.seed, spec=spec)
        hist = _stage(
            model,
            data,
            recipe.base_loop,
            recipe,
            work / "base",
            "organism base",
            response_only=False,
            progress=progress,
            on_step=_for_stage(on_step, "base"),
        )
        _save_hf(model, tokenizer, base_dir, recipe, hist)
    model = Qwen2ForCausalLM.from_pretrained(str(base_dir))
    data = corpus.reasoning_traces(recipe.ft_traces, "train", seed=recipe.seed + 1, spec=spec)
    hist = _stage(
        model,
        data,
        recipe.ft_loop,
        recipe,
        work / "target",
        "organism fine-tune",
        response_only=True,
        progress=progress,
        on_step=_for_stage(on_step, "target"),
    )
    _save_hf(model, tokenizer, target_dir, recipe, hist)
    return base_dir, target_dir


def _for_stage(on_step, stage: str):
    return None if on_step is None else (lambda step: on_step(stage, step))
