"""The rank-1 LoRA + SAE lens: latents of a SAE on the whole LoRA state, named for hesitation.

Uses a trained LoRA (PEFT folder; the shipped organism's ``lora_r1``) and the BatchTopK SAE on its
``n_layers x 7`` state (SAELens folder; ``figures/lora/sae`` from ``python -m analyses.lora``);
nothing is retrained for the scores. Hesitation latents: those firing more at the validation hesitation prompts'
last token than at the controls' (times the decoder norm), the fewest covering ``share`` of that
excess.

Ablating latents needs the whole state before the first layer can be edited, so necessity runs
:func:`~mechdiff.lenses.paired.paired_generate` with the unedited LoRA model as reader: at each
token each adapter's activation loses the named latents' share ``f_S W_dec[S]`` (``f`` from the
reader's state). Steering: the base (every LoRA activation zero) with only the named latents' mean
state at the last position.

The SAE's training cost has no record beside it: :func:`retrain_cost` trains one of the same shape
again, on the LoRA study's data (``python -m analyses.lora``: 2000 train traces drawn with seed 2,
1.5M samples), and measures that; the trained copy is discarded.

Example:
    >>> result = lora_sae_lens(ctx, "mechdiff/adapters/shipped/lora_r1", "figures/lora/sae")  # doctest: +SKIP
    >>> result.units[:2]  # doctest: +SKIP
    ['S12', 'S40']
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from sae_lens import SAE

from mechdiff.evaluation import feature_sets
from mechdiff.evaluation import hesitation as H
from mechdiff.features.lora_lens import collect
from mechdiff.features.lora_sae import SAEConfig, encode, train_sae
from mechdiff.lenses import scoring
from mechdiff.lenses.context import LensContext, cached, last_position
from mechdiff.lenses.cost import Cost, measure
from mechdiff.lenses.paired import paired_generate
from mechdiff.lora import load_lora
from mechdiff.organism import task


def states(lora, sequences, last: bool = False) -> torch.Tensor:
    """The flattened LoRA state ``[n, n_layers * len(modules) * rank]`` (layer-major), every token but
    each sequence's first, or the last token of each (``last``)."""
    names = lora.act_names()
    acts = (last_position if last else cached)(lora.model, sequences, names)
    return torch.cat([acts[n] for n in names], -1)


def _edit_hooks(lora, sae, mask: torch.Tensor, fixed: torch.Tensor | None = None):
    """Hooks subtracting the masked latents' share of the state read by the reader, or (``fixed``)
    replacing every activation by ``fixed`` at the last position and zero elsewhere."""
    names, r = lora.act_names(), lora.config.rank

    def make(reader):
        if fixed is None:
            state = torch.cat([reader[n] for n in names], -1)
            delta = (encode(sae, state.flatten(0, -2)) * mask) @ sae.W_dec.detach()
            delta = delta.view(*state.shape)
        hooks = []
        for i, name in enumerate(names):

            def edit(act, hook, i=i):
                if fixed is not None:
                    out = torch.zeros_like(act)
                    out[:, -1] = fixed[i * r : (i + 1) * r].to(act.dtype)
                    return out
                return act - delta[..., i * r : (i + 1) * r].to(act.dtype)

            hooks.append((name, edit))
        return hooks

    return make


def lora_sae_lens(ctx: LensContext, lora_folder: str | Path, sae_folder: str | Path) -> scoring.LensResult:
    pair, spec, s = ctx.pair, ctx.spec, ctx.settings
    lora = load_lora(lora_folder, pair)
    sae = SAE.load_from_disk(str(sae_folder), device="cpu")
    with measure() as score:
        with torch.no_grad():
            norms = sae.W_dec.detach().norm(dim=-1)
            excess = (
                encode(sae, states(lora, ctx.hes.tokens, last=True)).mean(0)
                - encode(sae, states(lora, ctx.ctl.tokens, last=True)).mean(0)
            ) * norms
        scores = {j: float(excess[j]) for j in range(len(excess)) if excess[j] > 0}
        named = feature_sets.covering_set(scores, s.share) if scores else []
    latents = encode(sae, states(lora, ctx.tokens.sequences))
    alive = (latents > 0).any(0).nonzero().flatten().tolist()
    tok = spec.tokenizer

    def rate(units):
        mask = torch.zeros(sae.cfg.d_sae)
        mask[list(units)] = 1.0
        rows = paired_generate(
            lora.model,
            lora.model,
            ctx.problems["input_ids"],
            spec.max_new_tokens,
            _edit_hooks(lora, sae, mask),
            reader_names=lora.act_names(),
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id or 0,
        )
        return spec.summarize(
            [spec.grade(task.Problem(tuple(r["operands"])), ids) for r, ids in zip(ctx.problems, rows)]
        )["hesitations_per_response"]

    before = spec.evaluate(lora.model, ctx.problems)["hesitations_per_response"]
    need = scoring.ablation_necessity(rate, named, alive, before, s.random_draws, s.seed)
    f = torch.zeros(sae.cfg.d_sae)
    if named:
        f[named] = encode(sae, states(lora, ctx.hes.tokens, last=True)).mean(0)[named]
    with torch.no_grad():
        fixed = f @ sae.W_dec.detach()
    zero = _edit_hooks(lora, sae, None, torch.zeros_like(fixed))({})
    p = {
        k: float(H.next_token_probability(lora.model, ctx.hes_test.tokens, spec.variants, fwd_hooks=h).mean())
        for k, h in (("before", zero), ("after", _edit_hooks(lora, sae, None, fixed)({})), ("reference", []))
    }
    steering = {
        **p,
        "gain": scoring.steering_gain(p["before"], p["after"], p["reference"]),
        "how": "base (every LoRA activation 0) with the named latents' mean state at the last "
        "position; reference: the LoRA model",
    }
    return scoring.LensResult(
        "lora_sae",
        [f"S{j}" for j in named],
        latents[:, named],
        necessity=need,
        steering=steering,
        score=score,
        extra={"d_sae": sae.cfg.d_sae, "n_alive": len(alive), "excess": [scores[j] for j in named]},
    )


def retrain_cost(
    ctx: LensContext,
    lora_folder: str | Path,
    sae_folder: str | Path,
    *,
    n_traces: int = 2000,
    n_samples: int = 1_500_000,
    trace_seed: int = 2,
) -> Cost:
    """Train an SAE shaped like ``sae_folder``'s (width, k) on the LoRA's state over ``n_traces``
    train traces, as ``python -m analyses.lora`` does, and return what collecting the states and
    training cost (CPU seconds, memory); the SAE is discarded (the lens scores ``sae_folder``'s).

    Example:
        >>> retrain_cost(ctx, "mechdiff/adapters/shipped/lora_r1", "figures/lora/sae").cpu_s  # doctest: +SKIP
        21.3
    """
    shipped = SAE.load_from_disk(str(sae_folder), device="cpu")
    d_in, d_sae = shipped.cfg.d_in, shipped.cfg.d_sae
    k = float((shipped.cfg.metadata.training_architecture_details or {}).get("k", SAEConfig.k))
    if d_sae % d_in:
        raise ValueError(f"{sae_folder}: d_sae {d_sae} is not a multiple of d_in {d_in}")
    lora = load_lora(lora_folder, ctx.pair)
    with measure() as cost:
        acts = collect(lora, ctx.spec.traces(n_traces, "train", trace_seed), with_mlp=False)
        with tempfile.TemporaryDirectory() as tmp:
            train_sae(acts.lora.flatten(1), SAEConfig(expansion=d_sae // d_in, k=k, n_samples=n_samples), out_dir=tmp)
    return cost
