"""Resampling of dead and always-on transcoder-adapter features during training.

:class:`Resampler` tracks when each feature last fired (buffers, so checkpoints carry it) and,
on the recipe's schedule, points dead or dense features at high-error inputs with :func:`reinit`.
Used by :func:`mechdiff.training.adapter_objective.train_adapters`.

Example:
    Not run as a doctest: it needs adapters, a recipe and a step's statistics from
    :func:`~mechdiff.training.adapter_objective.train_adapters`.
    >>> resampler = Resampler(adapted, recipe)  # doctest: +SKIP
    >>> dead_share = resampler.observe(step, stats); resampler(step)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from mechdiff.adapters.transcoder import AdaptedModel

if TYPE_CHECKING:  # the recipe's module imports this one
    from mechdiff.training.adapter_objective import AdapterRecipe


class Resampler(torch.nn.Module):
    """Tracks when each feature last fired and re-initialises dead / always-on features.

    Its counters are buffers, so they are checkpointed with the adapters and a resumed run
    resamples exactly as an uninterrupted one.
    """

    def __init__(self, adapted: AdaptedModel, recipe: AdapterRecipe):
        super().__init__()
        self.adapted, self.recipe = [adapted], recipe  # a list: not a submodule
        shape = (adapted.config.n_layers, adapted.config.d_sae)
        self.register_buffer("last_fired", torch.zeros(shape, dtype=torch.long))
        self.register_buffer("window_counts", torch.zeros(shape))
        self.register_buffer("window_tokens", torch.zeros((), dtype=torch.long))
        self.last: dict | None = None

    def observe(self, step: int, stats: dict) -> float:
        """Record a batch; returns the share of features that have not fired for ``dead_window`` steps."""
        counts = stats["counts"].cpu()
        self.last_fired[counts > 0] = step
        self.window_counts += counts
        self.window_tokens += int(stats["n_tokens"])
        self.last = stats
        return (step - self.last_fired >= self.recipe.dead_window).float().mean().item()

    @torch.no_grad()
    def forward(self, step: int) -> None:
        """After optimiser step ``step``: resample if it is time to."""
        r = self.recipe
        done = step + 1
        if not r.resample_every or done % r.resample_every or done > r.resample_until * r.steps:
            return
        freq = self.window_counts / self.window_tokens.clamp(min=1)
        dead = done - self.last_fired >= r.resample_every
        dense = freq > r.dense_threshold
        gen = torch.Generator().manual_seed(r.seed * 31 + done)
        for layer, adapter in enumerate(self.adapted[0].adapters):
            idx = torch.nonzero(dead[layer] | dense[layer]).flatten()
            if len(idx) and self.last is not None:
                keep = self.last["mask"].flatten()
                x = self.last["mlp_in"][layer].flatten(0, 1)[keep]
                err = self.last["err"][layer].flatten()[keep].float().cpu()  # `gen` is a CPU generator
                pick = torch.multinomial(err + 1e-12, len(idx), replacement=True, generator=gen)
                reinit(adapter, idx, dense[layer][idx], x, x[pick])
        self.last_fired[dead | dense] = done
        self.window_counts.zero_()
        self.window_tokens.zero_()


def reinit(
    adapter, idx: Tensor, was_dense: Tensor, x_all: Float[Tensor, "tok d_model"], x: Float[Tensor, "n d_model"]
) -> None:
    """Point features ``idx`` at inputs ``x`` (high-error tokens), with a zero decoder row.

    A dense feature's mean contribution (over the tokens ``x_all``) moves into ``b_dec`` first, so
    its reset changes the model only by that feature's variation around its mean.
    """
    if was_dense.any():
        d_idx = idx[was_dense]
        mean_act = (x_all @ adapter.W_enc[:, d_idx] + adapter.b_enc[d_idx]).relu().mean(0)
        adapter.b_dec += mean_act @ adapter.W_dec[d_idx]
    alive = torch.ones(adapter.d_sae, dtype=torch.bool)
    alive[idx] = False
    norm = adapter.W_enc[:, alive if alive.any() else ~alive].norm(dim=0).mean()
    direction = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    adapter.W_enc[:, idx] = direction.T * norm
    adapter.b_enc[idx] = -0.5 * norm * x.norm(dim=-1)  # fires on inputs within ~60 deg of x
    adapter.W_dec[idx] = 0.0
