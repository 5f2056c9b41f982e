"""The SmolLM2 reasoning fine-tune as a library call: :class:`Recipe` and :func:`finetune`.

A full fine-tune of SmolLM2-135M-Instruct on natural-language reasoning traces
(:mod:`mechdiff.real.chat`) with the shared loop (:mod:`mechdiff.training.loop`): loss on the
assistant's reply only, AdamW, warmup then cosine, atomic checkpoints and exact resume.
``python -m mechdiff.real train`` is the command line around it.

Example:
    >>> Recipe(steps=0)
    Traceback (most recent call last):
    ...
    mechdiff.config_checks.ConfigError: Recipe.steps = 0: must be >= 1

    Not run by the tests: it needs the optional [real] extra and an hour of CPU.
    >>> model, tokenizer = smollm2.load_hf()  # doctest: +SKIP
    >>> finetune(model, tokenizer, smollm2.cache_dir() / "runs" / "mine", Recipe(steps=3))  # doctest: +SKIP
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from mechdiff.config_checks import check
from mechdiff.padding import pad
from mechdiff.real import chat, smollm2
from mechdiff.training.batches import step_indices
from mechdiff.training.loop import LoopConfig, train
from mechdiff.training.losses import causal_lm_ce
from mechdiff.training.recipe_loop import nests_loop

SECONDS_PER_STEP = 10.0  # batch 8 of ~225-token chats, fp32, 2 idle cores (8x128 measured at 4.7 s)


@nests_loop("steps", "lr", "warmup_frac", "weight_decay", "grad_clip", "checkpoint_every", "seed")
@dataclass
class Recipe:
    """The full fine-tune. ``traces=None``: one fresh trace per row of every step (no repeats).

    The optimiser's schedule is ``loop`` (360 steps, ~1 hour at :data:`SECONDS_PER_STEP`; lr 3e-5;
    a checkpoint every 30, a log line every step); its settings are keywords too
    (``Recipe(steps=3)``, :mod:`mechdiff.training.recipe_loop`).
    """

    batch_size: int = 8
    traces: int | None = None
    slip_prob: float = 0.8
    recheck_prob: float = 0.08
    autocast: str | None = None  # "bfloat16": mixed precision (fp32 weights), ~1.6x faster on AVX512-bf16 CPUs
    checkpoint: bool = False  # recompute each decoder layer in backward: same gradients, less memory
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=360, lr=3e-5, checkpoint_every=30, log_every=1))

    def __post_init__(self):  # refused here, before SmolLM2 loads (CLI and Python alike)
        check(
            self,
            at_least_1=("batch_size",),
            fraction=("slip_prob", "recheck_prob"),
            choices={"autocast": (None, "bfloat16", "float16")},
        )
        if self.traces is not None:
            check(self, at_least_1=("traces",))


class _Checkpointable(torch.nn.Module):
    """The HF model as the loop's module, its state dict without a tied ``lm_head.weight``:
    safetensors refuses two names for one tensor, and the tie survives loading by identity."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight

    def state_dict(self, *args, **kwargs):
        state = self.model.state_dict(*args, **kwargs)
        if self.tied:
            state.pop("lm_head.weight", None)
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in missing if not (self.tied and k == "lm_head.weight")]
        if strict and (missing or unexpected):
            raise RuntimeError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return missing, unexpected


def response_loss(model, rows: dict, pad_id: int, autocast: str | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the reply tokens only, chunked over positions by
    :func:`mechdiff.training.losses.causal_lm_ce` (the unembedding runs on those tokens only).

    ``autocast="bfloat16"`` runs the forward in mixed precision (weights stay as they are).
    """
    device = model.get_input_embeddings().weight.device
    tokens, mask = (t.to(device) for t in pad(rows["input_ids"], pad_id))
    dtype = getattr(torch, autocast) if autocast else None
    with torch.autocast(device.type, dtype=dtype, enabled=autocast is not None):
        return causal_lm_ce(model, tokens, mask, torch.tensor(rows["prompt_len"], device=device))


@contextmanager
def training_mode(model, recipe: Recipe):
    """``model`` in train mode within the context, each decoder layer recomputed in backward when
    ``recipe.checkpoint`` (transformers' gradient checkpointing); in eval mode, without it, after.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                      num_attention_heads=2, num_key_value_heads=1)
        >>> model = LlamaForCausalLM(config).eval()
        >>> with training_mode(model, Recipe(checkpoint=True)):
        ...     model.training, model.is_gradient_checkpointing
        (True, True)
        >>> model.training, model.is_gradient_checkpointing
        (False, False)
    """
    model.train()
    if recipe.checkpoint:
        model.gradient_checkpointing_enable()
    try:
        yield model
    finally:
        model.eval()
        if recipe.checkpoint:
            model.gradient_checkpointing_disable()


def finetune(
    model, tokenizer, run_dir: str | Path, recipe: Recipe | None = None, *, progress: bool = True, on_step=None
) -> list[dict]:
    """Train ``model`` in place on chat traces; checkpoints in ``run_dir/checkpoints`` (resumed when
    present), the result in the HF folder ``run_dir/model``. Returns the loop's history."""
    recipe, run_dir = recipe or Recipe(), Path(run_dir)
    data = chat.traces(
        tokenizer,
        recipe.traces or recipe.steps * recipe.batch_size,
        "train",
        recipe.seed,
        recipe.slip_prob,
        recipe.recheck_prob,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def loss_fn(step):
        rows = data[step_indices(len(data), recipe.batch_size, step, recipe.seed)]
        loss = response_loss(model, rows, pad_id, recipe.autocast)
        return loss, {"ce": loss.item()}

    cfg = replace(recipe.loop, out_dir=run_dir / "checkpoints", progress=progress, desc="smollm2 fine-tune")
    with training_mode(model, recipe):
        history = train(_Checkpointable(model), loss_fn, cfg, on_step=on_step, distributed=False)
    smollm2.write_folder(
        model, tokenizer, run_dir / "model", {"recipe": recipe.to_dict(), "final": history[-1] if history else None}
    )
    return history
