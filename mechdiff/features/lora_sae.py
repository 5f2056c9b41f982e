"""A BatchTopK SAE on the whole LoRA state per token, trained with SAELens' ``SAETrainer``.

The input is the flattened ``(n_layers, 7 * rank)`` LoRA state of each token (see
:meth:`~mechdiff.adapters.lora.LoRAModel.state`). Defaults follow the paper: expansion 8, k = 16
(BatchTopK: k active latents per token on average over a batch), AuxK loss for dead latents,
Adam 5e-4. Training reads a seeded stream of shuffled batches from an in-memory tensor; the result
is saved in SAELens' inference format (BatchTopK is stored as JumpReLU: ``cfg.json`` +
``sae_weights.safetensors``) and loads with ``sae_lens.SAE.load_from_disk``.

Each latent's label distribution is its activation mass per ground-truth token label; a latent's
*category* is the category (:data:`CATEGORIES`, the organism's analogue of the paper's seven) of
its dominant label.

Example:
    >>> states = torch.randn(4096, 21)
    >>> sae = train_sae(states, SAEConfig(n_samples=20_000))
    >>> m = sae_metrics(sae, states)
    >>> sorted(m)
    ['dead_fraction', 'fvu', 'l0']
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from sae_lens import SAE, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, SAETrainer
from sae_lens.config import LoggingConfig, SAETrainerConfig
from torch import Tensor

from mechdiff.organism.task import LABELS

# Ground-truth labels grouped like the paper's categories (value tracking, computation, ...).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "value tracking": ("operand_digit", "operand_copy", "carry_copy"),
    "computation": ("equals", "digit", "carry_out"),
    "reasoning flow control": ("slip", "hesitation", "correction", "recheck", "recheck_step", "error"),
    "result formulation": ("think_close", "answer", "eos"),
    "symbolic structure": ("bos", "operand_label", "prompt_format", "think_open", "step_marker", "separator"),
    "base-corpus patterns": ("worked_marker", "fact"),
}
_UNLISTED = tuple(name for name in LABELS if name not in {lab for labs in CATEGORIES.values() for lab in labs})
if _UNLISTED:  # labels the task gained after this table was written
    CATEGORIES["other"] = _UNLISTED
LABEL_CATEGORY = torch.tensor(
    [next(i for i, labs in enumerate(CATEGORIES.values()) if name in labs) for name in LABELS]
)


@dataclass
class SAEConfig:
    """SAE shape and training budget (``n_samples`` tokens drawn with replacement)."""

    expansion: int = 8
    k: float = 16
    lr: float = 5e-4
    batch_size: int = 1024
    n_samples: int = 3_000_000
    aux_loss_coefficient: float = 1.0 / 32
    dead_feature_window: int = 500
    seed: int = 0


def _stream(states: Tensor, batch_size: int, seed: int) -> Iterator[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(states), generator=gen)
        for start in range(0, len(perm) - batch_size + 1, batch_size):
            yield states[perm[start : start + batch_size]]


def train_sae(
    states: Float[Tensor, "n_tokens d_in"],
    cfg: SAEConfig | None = None,
    out_dir: str | Path | None = None,
) -> SAE:
    """Train a BatchTopK SAE on ``states``; save it in SAELens format; return the inference SAE.

    SAELens' ``SAETrainer`` shows its own progress bar (samples seen, loss).

    ``out_dir`` receives ``cfg.json`` and ``sae_weights.safetensors`` (a temporary folder if None).
    """
    cfg = cfg or SAEConfig()
    if states.ndim != 2 or len(states) < cfg.batch_size:
        raise ValueError(f"states must be [n_tokens >= batch_size={cfg.batch_size}, d_in]; got {tuple(states.shape)}")
    states = states.detach().float().cpu()
    torch.manual_seed(cfg.seed)
    d_in = states.shape[1]
    sae_cfg = BatchTopKTrainingSAEConfig(
        d_in=d_in, d_sae=cfg.expansion * d_in, k=cfg.k, aux_loss_coefficient=cfg.aux_loss_coefficient,
        normalize_activations="expected_average_only_in", device="cpu", dtype="float32",
    )  # fmt: skip
    sae_cfg.metadata.hook_name = "lora_state"
    sae = BatchTopKTrainingSAE(sae_cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.n_samples, train_batch_size_samples=cfg.batch_size, lr=cfg.lr,
        lr_end=cfg.lr, lr_scheduler_name="constant", device="cpu", dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=10**9, logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=min(100, len(states) // cfg.batch_size),
    )  # fmt: skip
    trained = SAETrainer(trainer_cfg, sae, _stream(states, cfg.batch_size, cfg.seed)).fit()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir) if out_dir else Path(tmp)
        trained.save_inference_model(folder)
        return SAE.load_from_disk(folder, device="cpu")


@torch.no_grad()
def encode(sae: SAE, states: Float[Tensor, "n_tokens d_in"], batch_size: int = 8192) -> Float[Tensor, "n_tokens d_sae"]:
    """Latent activations of ``states`` (batched)."""
    return torch.cat([sae.encode(states[i : i + batch_size].float()) for i in range(0, len(states), batch_size)])


@torch.no_grad()
def sae_metrics(sae: SAE, states: Float[Tensor, "n_tokens d_in"]) -> dict[str, float]:
    """FVU (unexplained share of the variance), mean L0, and the share of never-active latents."""
    states = states.float()
    acts = encode(sae, states)
    recon = torch.cat([sae.decode(acts[i : i + 8192]) for i in range(0, len(acts), 8192)])
    fvu = ((states - recon) ** 2).sum() / ((states - states.mean(0)) ** 2).sum()
    return {
        "fvu": float(fvu),
        "l0": float((acts > 0).sum(1).float().mean()),
        "dead_fraction": float(((acts > 0).sum(0) == 0).float().mean()),
    }


def label_distribution(
    acts: Float[Tensor, "n_tokens d_sae"],
    labels: Int[Tensor, " n_tokens"],
    n_labels: int = len(LABELS),
) -> Float[Tensor, "d_sae n_labels"]:
    """Each latent's activation mass per label (rows sum to the latent's total mass)."""
    onehot = torch.nn.functional.one_hot(labels, n_labels).float()
    return acts.float().T @ onehot


def categories(dist: Float[Tensor, "d_sae n_labels"]) -> tuple[Int[Tensor, " d_sae"], Float[Tensor, " n_categories"]]:
    """``(category index per latent (-1: dead), activation mass per category)``.

    Example:
        >>> dist = torch.zeros(2, len(LABELS)); dist[0, LABELS.index("hesitation")] = 3.0
        >>> cat, mass = categories(dist)
        >>> list(CATEGORIES)[cat[0]], cat[1].item(), mass.sum().item()
        ('reasoning flow control', -1, 3.0)
    """
    by_cat = torch.zeros(dist.shape[0], len(CATEGORIES)).index_add_(1, LABEL_CATEGORY, dist.float())
    cat = by_cat.argmax(1)
    cat[dist.sum(1) <= 0] = -1
    mass = torch.zeros(len(CATEGORIES)).index_add_(0, cat.clamp(min=0), by_cat.sum(1) * (cat >= 0))
    return cat, mass
