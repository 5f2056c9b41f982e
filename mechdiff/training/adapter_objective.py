"""The transcoder-adapter objective and the recipe that trains adapters with it.

Per teacher-forced batch (target activations computed online, one target forward reused for all
parts), with ``mask`` the non-pad tokens::

    loss = kl     * KL(p_target || p_adapted)                       (all non-pad tokens)
         + nmse   * mean_layers |h_adapted - h_target|^2 / |h_target|^2   (residual after each layer)
         + bridge * (KL(target || adapted[<k] -> target[>=k]) + KL(target || target[<k] -> adapted[>=k]))
         + l1     * sum_layers mean_tokens sum_i f_i |W_dec[i]|

with a random cutoff ``0 < k < n_layers`` per step. The first bridge reuses the adapted model's
residual at layer ``k`` from the main forward (``stop_at_layer``) and finishes it with the target
(``start_at_layer``); the second starts the adapted model from the target's cached residual. So a
step costs one target forward, one adapted forward and two half forwards, plus the backward.

Two ways to pay less per step:

* the target's side of a batch (:class:`TargetPass`) can come from a cache on disk
  (:mod:`mechdiff.training.target_cache`): the same loss (float error), with the target's forward
  paid once per trace set rather than once per run, which pays off across a sweep of recipes;
* ``bridge_rows < 1`` runs the bridges on a random share of the batch's rows, weighted so that the
  bridging term is an unbiased estimate of the whole batch's (like the random cutoff, it trades
  variance for time; its spread is what ``benchmarks.adapters --bridge-rows`` reports).

:func:`train_adapters` runs the recipe (:class:`AdapterRecipe`) through the project's one loop
(:func:`mechdiff.training.loop.train`), with the sparsity levers measured for the organism:
an L1 warm-up, a negative encoder-bias start, resampling of dead and always-on features, and the
TopK activation.

Example:
    >>> from mechdiff.models import load_pair
    >>> pair = load_pair("organism")
    >>> recipe = AdapterRecipe(d_sae=64, steps=4, batch_size=8, n_traces=64, n_val=16, progress=False)
    >>> adapted, history = train_adapters(pair, recipe)
    >>> sorted(k for k in history[-1] if k.startswith("bridge"))
    ['bridge_a2t', 'bridge_t2a']
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from datasets import Dataset
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mechdiff import distributed
from mechdiff.adapters.transcoder import AdaptedModel
from mechdiff.capture import final_hidden, run_capture
from mechdiff.config_checks import check
from mechdiff.models import ModelPair
from mechdiff.padding import pad
from mechdiff.training.batches import step_indices
from mechdiff.training.block_recompute import checkpointed_blocks
from mechdiff.training.lean_blocks import lean_blocks
from mechdiff.training.loop import LoopConfig, train
from mechdiff.training.losses import head_losses, hooked_head, masked_kl
from mechdiff.training.recipe_loop import nests_loop
from mechdiff.training.resampling import Resampler
from mechdiff.training.target_cache import TargetPass

__all__ = [
    "AdapterObjective",
    "AdapterRecipe",
    "LossWeights",
    "TargetPass",
    "masked_kl",
    "run_capture",
    "train_adapters",
]

Mask = Bool[Tensor, "batch pos"]


# ----------------------------------------------------------------------------- loss parts


def nmse_per_layer(resid: list[Tensor], target_resid: list[Tensor], mask: Mask) -> Float[Tensor, " layer"]:
    """|h - h_target|^2 / |h_target|^2 summed over ``mask`` tokens, for the residual after each layer."""
    num, den = nmse_sums(resid, target_resid, mask)
    return num / den.clamp(min=1e-12)


def nmse_sums(
    resid: list[Tensor],
    target_resid: list[Tensor],
    mask: Mask,
    errors: list[Tensor] | None = None,
) -> tuple[Float[Tensor, " layer"], Float[Tensor, " layer"]]:
    """Numerator and denominator of :func:`nmse_per_layer` (sums over ``mask`` tokens).

    ``errors``: :func:`layer_errors` of the same residuals, when the caller has them already.
    Layer by layer, never stacking ``[layer, batch, pos, d_model]``: on SmolLM2 the stacked
    copies and their backward cost a tenth of a training step.
    """
    errors = layer_errors(resid, target_resid) if errors is None else errors
    weight = mask.to(errors[0].dtype)
    num = torch.stack([(err * weight).sum() for err in errors])
    den = torch.stack([((ht * ht).sum(-1) * weight).sum() for ht in target_resid[1:]])
    return num, den


def layer_errors(resid: list[Tensor], target_resid: list[Tensor]) -> list[Float[Tensor, "batch pos"]]:
    """|h - h_target|^2 per token for the residual after each layer (differentiable in ``resid``)."""
    errors = []
    for h, ht in zip(resid[1:], target_resid[1:], strict=True):
        diff = h - ht
        errors.append((diff * diff).sum(-1))
    return errors


def l1_penalty(acts: list[Tensor], adapted: AdaptedModel, mask: Mask) -> Tensor:
    """sum_layers mean_tokens sum_i f_i |W_dec[i]| (decoder-norm weighted L1)."""
    total = acts[0].new_zeros(())
    for a, adapter in zip(acts, adapted.adapters, strict=True):
        per_token = a @ adapter.W_dec.norm(dim=-1)
        total = total + (per_token * mask).sum() / mask.sum().clamp(min=1)
    return total


def aux_dead_loss(
    pre: list[Tensor],
    adapted: AdaptedModel,
    dead: Bool[Tensor, "layer d_sae"],
    resid: list[Tensor],
    target_resid: list[Tensor],
    mask: Mask,
    k_aux: int,
) -> Tensor:
    """AuxK (Gao et al. 2024) for adapters: at each layer the ``k_aux`` largest (ReLU'd)
    pre-activations among *dead* features, decoded, fit the residual error left after that layer
    (``h_target - h_adapted``, detached). Mean over layers of that NMSE; not added to the model."""
    num, den = aux_dead_sums(pre, adapted, dead, resid, target_resid, mask, k_aux)
    return (num / den.clamp(min=1e-12)).sum() / len(pre)


def aux_dead_sums(
    pre: list[Tensor],
    adapted: AdaptedModel,
    dead: Bool[Tensor, "layer d_sae"],
    resid: list[Tensor],
    target_resid: list[Tensor],
    mask: Mask,
    k_aux: int,
) -> tuple[Float[Tensor, " layer"], Float[Tensor, " layer"]]:
    """Per layer, numerator and denominator of :func:`aux_dead_loss`'s NMSE (zeros where no
    feature is dead)."""
    num, den = pre[0].new_zeros(len(pre)), pre[0].new_zeros(len(pre))
    for layer, adapter in enumerate(adapted.adapters):
        n_dead = int(dead[layer].sum())
        if n_dead == 0:
            continue
        p = pre[layer].masked_fill(~dead[layer].to(pre[layer].device), float("-inf"))
        top = p.topk(min(k_aux, n_dead), dim=-1)
        acts = torch.zeros_like(pre[layer]).scatter(-1, top.indices, top.values.relu())
        err = (target_resid[layer + 1] - resid[layer + 1]).detach()
        num[layer] = (((acts @ adapter.W_dec - err) ** 2).sum(-1) * mask).sum()
        den[layer] = ((err**2).sum(-1) * mask).sum()
    return num, den


def rank_shares(counts: Float[Tensor, "*n"]) -> Float[Tensor, "*n"]:
    """``world_size * count / (count summed over ranks)``, per entry (ones in a single process).

    A rank's mean over ``count`` items (tokens, or a ratio's denominator) times its share averages
    over ranks to the mean over every rank's items: :func:`~mechdiff.distributed.as_global_mean`
    for several counts at once, so sharded training takes exactly the whole-batch step.
    """
    counts = counts.detach().float()
    if distributed.world_size() == 1:
        return torch.ones_like(counts)
    total = distributed.global_sum(counts).to(counts.device)
    return (counts.double() * distributed.world_size() / total.clamp(min=1e-30)).float()


def _global_counts(counts: Tensor) -> Tensor:
    """Summed over ranks (unchanged in one process): every rank then sees the same dead features."""
    if distributed.world_size() == 1:
        return counts
    return distributed.global_sum(counts).to(counts.device, counts.dtype)


@dataclass
class LossWeights:
    """Weights of the parts: published 1, 1, 2 and a swept L1 (for ReLU adapters; the shipped TopK
    ones use none); ``aux`` is AuxK for dead features (Gao et al. use 1/32)."""

    kl: float = 1.0
    nmse: float = 1.0
    bridge: float = 2.0
    l1: float = 0.0
    aux: float = 1 / 32

    def __post_init__(self):
        check(self, non_negative=("kl", "nmse", "bridge", "l1", "aux"))


class AdapterObjective:
    """``objective(tokens, mask) -> (loss, parts, stats)``; ``parts`` are floats for logging,
    ``stats`` holds per-feature firing counts ``[layer, d_sae]``, token count and MLP inputs.

    The target runs once per batch (no_grad); its residuals serve the NMSE and both bridges and
    its final hidden rows are the KL teacher. ``fast`` (default) never forms ``[batch, pos, vocab]``
    logits: the three KLs (adapted, and both bridges) are scored in one chunked pass over the
    mask rows by :func:`~mechdiff.training.losses.head_losses`; ``fast=False`` is the plain path
    (full logits through :func:`~mechdiff.training.losses.masked_kl`), equal to it to float error.
    ``autocast`` (e.g. ``"bfloat16"``) runs the forwards in that dtype (mixed precision).
    ``checkpoint`` recomputes each block's internals in the backward pass instead of keeping them
    (:func:`torch.utils.checkpoint.checkpoint`): the same loss and gradients for less memory and
    about one more forward of time. ``bridge_rows`` (a share in ``(0, 1]``) runs the bridges on
    that share of the rows, drawn at random each step, with the bridging KLs reweighted so their
    expectation is the whole batch's (1: all rows, exact). A call may pass ``target``, the batch's
    :class:`TargetPass` (from :meth:`target_pass`, or a :mod:`~mechdiff.training.target_cache`),
    instead of running the target. ``lean`` (default) runs both models' blocks the way
    :mod:`~mechdiff.training.lean_blocks` does (fused attention, no weight copies kept for
    backward: half the memory of TransformerLens' blocks, equal to float error); ``lean=False``
    runs TransformerLens' own.

    Under a process group each rank passes its shard of the global batch (and every rank must
    call it): token means and ratios of sums are weighted by :func:`rank_shares`, so the loss
    and parts averaged over ranks are those of the whole batch, and the firing counts are global.
    """

    def __init__(
        self,
        adapted: AdaptedModel,
        target: HookedTransformer,
        weights: LossWeights,
        fast: bool = True,
        autocast: str | None = None,
        checkpoint: bool = False,
        bridge_rows: float = 1.0,
        lean: bool = True,
    ):
        if not 0 < bridge_rows <= 1:
            raise ValueError(
                f"bridge_rows is the share of a batch's rows that run the bridges: in (0, 1], not {bridge_rows}"
            )
        self.adapted, self.target, self.weights = adapted, target, weights
        self.fast, self.autocast, self.checkpoint = fast, autocast, checkpoint
        self.bridge_rows, self.lean = bridge_rows, lean
        for p in target.parameters():  # the target is a frozen teacher (bridging runs through it)
            p.requires_grad_(False)
        self.n_layers = adapted.config.n_layers
        self.acts_names = tuple(adapted.acts_name(i) for i in range(self.n_layers))
        self.in_names = tuple(f"blocks.{i}.adapter.hook_in" for i in range(self.n_layers))
        self.pre_names = tuple(f"blocks.{i}.adapter.hook_pre" for i in range(self.n_layers))

    def precision(self):
        """The context the forwards run in: ``autocast`` mixed precision, or nothing."""
        if self.autocast is None:
            return nullcontext()
        device = torch.device(self.adapted.model.cfg.device).type
        return torch.autocast(device, dtype=getattr(torch, self.autocast))

    def __call__(
        self,
        tokens: Int[Tensor, "batch pos"],
        mask: Mask,
        cutoff: int | None = None,
        l1_scale: float = 1.0,
        dead: Bool[Tensor, "layer d_sae"] | None = None,
        k_aux: int = 64,
        target: TargetPass | None = None,
        bridge_subset: Int[Tensor, " rows"] | None = None,
    ) -> tuple[Tensor, dict[str, float], dict[str, Tensor]]:
        """``dead`` (features that have not fired lately) enables the AuxK part when ``weights.aux``;
        ``target``: the batch's target pass, if already computed; ``bridge_subset``: the rows that
        run the bridges (default: all, or a random ``bridge_rows`` share of them)."""
        models = (self.adapted.model, self.target)
        with (
            self.precision(),
            lean_blocks(models if self.lean else ()),
            checkpointed_blocks(models if self.checkpoint else ()),
        ):
            return self._loss(tokens, mask, cutoff, l1_scale, dead, k_aux, target, bridge_subset)

    @torch.no_grad()
    def target_pass(self, tokens: Int[Tensor, "batch pos"], mask: Mask) -> TargetPass:
        """The target's forward on a batch: what :meth:`__call__` runs when given no ``target``."""
        with self.precision(), lean_blocks((self.target,) if self.lean else ()):
            out, resid, _ = run_capture(self.target, tokens, mask, logits=not self.fast)
        return TargetPass(out, resid)

    def _loss(self, tokens, mask, cutoff, l1_scale, dead, k_aux, target, bridge_subset):
        w, model = self.weights, self.adapted.model
        use_aux = bool(w.aux) and dead is not None and bool(dead.any())
        bridging = bool(w.bridge) and self.n_layers > 1
        target = self.target_pass(tokens, mask) if target is None else target
        t_out, t_resid = target.out, target.resid
        names = self.acts_names + self.in_names + (self.pre_names if use_aux else ())
        out, resid, extra = run_capture(model, tokens, mask, names, logits=not self.fast)
        acts = [extra[name] for name in self.acts_names]
        share = rank_shares(mask.sum())  # of the global batch's tokens
        k = (int(torch.randint(1, self.n_layers, ())) if cutoff is None else cutoff) if bridging else 0
        rows = self._bridge_subset(mask, bridge_subset) if k else None
        empty = rows is not None and not mask[rows].any()  # no tokens in the subset: the estimate is 0
        kls = (self._fast_kls if self.fast else self._plain_kls)(
            t_out, out, t_resid, resid, mask, 0 if empty else k, rows
        )
        if empty:
            kls.update(bridge_a2t=kls["kl"].new_zeros(()), bridge_t2a=kls["kl"].new_zeros(()))
        kl = kls["kl"] * share
        errors = layer_errors(resid, t_resid)  # shared by the NMSE and the resampler's statistics
        nmse = _shared_ratio(*nmse_sums(resid, t_resid, mask, errors))
        l1 = l1_penalty(acts, self.adapted, mask) * share
        loss = w.kl * kl + w.nmse * nmse.mean() + w.l1 * l1_scale * l1
        parts = {"kl": kl.item(), "nmse": nmse.mean().item(), "l1": l1.item()}
        if use_aux:
            pre = [extra[n] for n in self.pre_names]
            aux = _shared_ratio(*aux_dead_sums(pre, self.adapted, dead, resid, t_resid, mask, k_aux))
            loss = loss + w.aux * aux.sum() / self.n_layers
            parts["aux"] = aux.sum().item() / self.n_layers
        if bridging:
            loss = loss + w.bridge * share * (kls["bridge_a2t"] + kls["bridge_t2a"])
            parts.update({name: (kls[name] * share).item() for name in ("bridge_a2t", "bridge_t2a")})
        stats = {**self._stats(acts, errors, mask, extra), "nmse": nmse.detach()}
        parts["l0"] = (stats["counts"].sum(-1).float().mean() / stats["n_tokens"]).item()
        return loss, parts, stats

    def _bridge_subset(self, mask: Mask, subset: Tensor | None) -> Tensor | None:
        """The rows that run the bridges this step (None: every row)."""
        if subset is None and self.bridge_rows < 1:
            n = max(1, round(self.bridge_rows * mask.shape[0]))
            subset = torch.randperm(mask.shape[0])[:n].sort().values
        if subset is None or len(subset) == mask.shape[0]:
            return None
        return subset.to(mask.device)

    def _bridge_weight(self, mask: Mask, rows: Tensor | None) -> Tensor | float:
        """What turns the bridges' mean KL over the subset's tokens into an unbiased estimate of
        the mean over the batch's: ``(tokens in subset / tokens) * (rows / rows in subset)``."""
        if rows is None:
            return 1.0
        return mask[rows].sum() / mask.sum().clamp(min=1) * (mask.shape[0] / len(rows))

    def _bridge_runs(self, t_resid: list[Tensor], resid: list[Tensor], mask: Mask, k: int, logits: bool, rows=None):
        """adapted[<k] -> target[>=k] and target[<k] -> adapted[>=k] on ``rows`` (None: all)."""
        start, t_start = (resid[k], t_resid[k]) if rows is None else (resid[k][rows], t_resid[k][rows])
        attn = (mask if rows is None else mask[rows]).long()
        if logits:
            return (
                self.target(start, start_at_layer=k, attention_mask=attn),
                self.adapted.model(t_start, start_at_layer=k, attention_mask=attn),
            )
        return (
            final_hidden(self.target, start, start_at_layer=k, attention_mask=attn),
            final_hidden(self.adapted.model, t_start, start_at_layer=k, attention_mask=attn),
        )

    def _plain_kls(self, t_logits, logits, t_resid, resid, mask, k, rows) -> dict[str, Tensor]:
        out = {"kl": masked_kl(t_logits, logits, mask)}
        if not k:
            return out
        b_mask, b_teacher = (mask, t_logits) if rows is None else (mask[rows], t_logits[rows])
        weight = self._bridge_weight(mask, rows)
        a2t, t2a = self._bridge_runs(t_resid, resid, mask, k, True, rows)
        out.update(
            bridge_a2t=masked_kl(b_teacher, a2t, b_mask) * weight,
            bridge_t2a=masked_kl(b_teacher, t2a, b_mask) * weight,
        )
        return out

    def _fast_kls(self, t_hidden, hidden, t_resid, resid, mask, k, rows) -> dict[str, Tensor]:
        """One chunked pass scores the main head and both bridges against the teacher's logits.
        With bridges on a subset of the rows, the subset's tokens come first in every head, so
        the bridges' students cover a prefix of the teacher's rows and share its logits."""
        model = self.adapted.model
        if not k:
            kl = head_losses([hooked_head(model, hidden[mask])], teacher=hooked_head(self.target, t_hidden[mask])).kl
            return {"kl": kl[0]}
        a2t, t2a = self._bridge_runs(t_resid, resid, mask, k, False, rows)
        in_subset = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
        in_subset[slice(None) if rows is None else rows] = True
        first, rest = mask & in_subset[:, None], mask & ~in_subset[:, None]
        bridged = mask if rows is None else mask[rows]  # the bridges ran on these rows

        def ordered(x: Tensor) -> Tensor:  # the bridged rows' tokens, then the others'
            return torch.cat([x[first], x[rest]])

        students = [hooked_head(model, ordered(hidden)), hooked_head(self.target, a2t[bridged])]
        students.append(hooked_head(model, t2a[bridged]))
        kl = head_losses(students, teacher=hooked_head(self.target, ordered(t_hidden))).kl
        weight = self._bridge_weight(mask, rows)
        return {"kl": kl[0], "bridge_a2t": kl[1] * weight, "bridge_t2a": kl[2] * weight}

    @torch.no_grad()
    def _stats(
        self, acts: list[Tensor], errors: list[Tensor], mask: Mask, extra: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        fired = torch.stack([(a > 0) & mask[..., None] for a in acts])  # layer batch pos d_sae
        err = torch.stack(errors)  # layer batch pos (no gradient: the method runs under no_grad)
        return {
            "counts": _global_counts(fired.sum((1, 2))),
            "n_tokens": _global_counts(mask.sum()),
            "err": err * mask,
            "mask": mask,
            "mlp_in": [extra[n].detach() for n in self.in_names],
        }


def _shared_ratio(num: Float[Tensor, " n"], den: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """``num / den`` (ratios of sums over a batch) weighted by :func:`rank_shares` of ``den``."""
    return num / den.clamp(min=1e-12) * rank_shares(den)


# ----------------------------------------------------------------------------- the recipe


_ADAPTER_LOOP = (
    "steps",
    "lr",
    "warmup_frac",
    "grad_clip",
    "validate_every",
    "log_every",
    "checkpoint_every",
    "seed",
    "progress",
)  # the loop settings saved flat before they were nested


@nests_loop(*_ADAPTER_LOOP)
@dataclass
class AdapterRecipe:
    """Everything that determines a set of trained adapters (saved beside them).

    The defaults are the shipped organism recipe (see ``mechdiff/adapters/shipped/organism``).
    The optimiser's schedule is ``loop`` (:class:`~mechdiff.training.loop.LoopConfig`: 300 steps,
    lr 1e-3); its settings are keywords too (``AdapterRecipe(steps=3)``,
    :mod:`mechdiff.training.recipe_loop`).
    """

    d_sae: int = 1024
    activation: str = "topk"  # measured on the organism: TopK + AuxK beat ReLU + L1 (see report)
    k: int = 8
    backbone: str = "target"
    enc_bias_init: float = 0.0
    weights: LossWeights = field(default_factory=LossWeights)
    l1_warmup_frac: float = 0.0  # L1 weight ramps linearly from 0 over this share of the steps
    resample_every: int = 0  # 0: never; else re-initialise dead / always-on features this often
    resample_until: float = 0.6  # ... during this share of the steps
    dense_threshold: float = 1.1  # firing frequency above which a feature is reset (>1: never)
    dead_window: int = 50  # steps without firing after which a feature counts as dead (AuxK)
    k_aux: int = 64  # dead features used by the AuxK part (weights.aux)
    batch_size: int = 64
    n_traces: int = 50_000
    # "corpus": the pair's workload's own traces (the organism's distillation data; SmolLM2's chat
    # traces with "Wait"); "target": traces sampled from the target (the organism only)
    data: str = "corpus"
    n_val: int = 256
    checkpoint: bool = False  # recompute blocks in backward: less memory, ~one more forward
    autocast: str | None = None  # e.g. "bfloat16": mixed-precision forwards
    bridge_rows: float = 1.0  # share of each batch's rows that run the bridges (1: all, exact)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=300, lr=1e-3))

    def __post_init__(self):  # refused here, before any model loads (CLI and Python alike)
        check(
            self,
            at_least_1=("d_sae", "k", "batch_size", "n_traces", "n_val", "dead_window"),
            non_negative=("resample_every", "k_aux", "dense_threshold"),
            positive=("bridge_rows",),
            fraction=("l1_warmup_frac", "resample_until", "bridge_rows"),
            choices={"activation": ("relu", "topk"), "backbone": ("target", "base"), "data": ("corpus", "target")},
        )

    @classmethod
    def from_dict(cls, d: dict) -> AdapterRecipe:
        """A saved recipe: the nested form of :meth:`to_dict`, or the flat one saved before."""
        d = dict(d)
        d["weights"] = LossWeights(**d.get("weights", {}))
        return cls(**d)


def organism_traces(n: int, split: str = "train", seed: int = 0, spec=None) -> Dataset:
    """The organism's reasoning traces (what its target was distilled on), for its task ``spec``
    (:class:`~mechdiff.organism.task.TaskSpec`; default: the shipped organism's)."""
    from mechdiff.organism import corpus
    from mechdiff.organism.task import DEFAULT

    return corpus.reasoning_traces(n, split=split, seed=seed, spec=spec or DEFAULT)


def target_traces(
    target: HookedTransformer,
    n: int,
    split: str = "train",
    seed: int = 0,
    temperature: float = 1.0,
    max_new_tokens: int = 96,
    progress: bool = False,
    spec=None,
) -> Dataset:
    """Traces the target writes itself: organism prompts of ``split`` continued by sampling.

    Example:
        >>> ds = target_traces(pair.target, 8)  # doctest: +SKIP
        >>> ds[0]["input_ids"][:1] == [pair.tokenizer.bos_token_id]  # doctest: +SKIP
        True
    """
    from mechdiff.generation import generate
    from mechdiff.organism import corpus
    from mechdiff.organism.task import DEFAULT

    prompts = corpus.problems(n, split=split, seed=seed, spec=spec or DEFAULT)["input_ids"]
    outs = generate(
        target, prompts, max_new_tokens, temperature=temperature, seed=seed, batch_size=256, progress=progress
    )
    pad_id = target.tokenizer.pad_token_id
    rows = [p + [t for t in o if t != pad_id] for p, o in zip(prompts, outs, strict=True)]
    return Dataset.from_dict({"input_ids": rows, "prompt_len": [len(p) for p in prompts]})


def train_adapters(
    pair: ModelPair,
    recipe: AdapterRecipe,
    out_dir: str | Path | None = None,
    traces: Dataset | None = None,
    val_traces: Dataset | None = None,
    pad_id: int | None = None,
    target_cache: str | Path | None = None,
) -> tuple[AdaptedModel, list[dict]]:
    """Train adapters for ``pair``; returns the adapted model and the logged history.

    ``traces`` / ``val_traces`` are datasets with ``input_ids`` (default: the organism's reasoning
    traces). ``out_dir`` holds checkpoints: a killed run resumes where it stopped. The adapters
    take the pair's device and dtype. ``target_cache``: a folder for the target's pass over
    ``traces`` (:class:`~mechdiff.training.target_cache.TargetCache`), made on first use and read
    by every later run over the same traces instead of running the target each step. Under torchrun (see :mod:`mechdiff.distributed`) each rank
    trains on its shard of every ``batch_size`` batch and the steps equal a single process's.
    """
    torch.manual_seed(recipe.loop.seed)
    adapted = AdaptedModel.from_pair(
        pair, recipe.d_sae, recipe.activation, recipe.k, recipe.backbone, recipe.enc_bias_init
    )
    from mechdiff.organism.task import TaskSpec

    spec = TaskSpec.of_pair(pair)  # an organism of the family: its own words and operand shape
    if traces is None and recipe.data == "target":
        traces = target_traces(pair.target, recipe.n_traces, "train", recipe.seed, progress=recipe.progress, spec=spec)
    traces = traces if traces is not None else organism_traces(recipe.n_traces, "train", recipe.seed, spec)
    val_traces = val_traces if val_traces is not None else organism_traces(recipe.n_val, "validation", spec=spec)
    pad_id = pad_id if pad_id is not None else (pair.tokenizer.pad_token_id or 0)
    objective = AdapterObjective(
        adapted,
        pair.target,
        recipe.weights,
        checkpoint=recipe.checkpoint,
        autocast=recipe.autocast,
        bridge_rows=recipe.bridge_rows,
    )
    cached = None
    if target_cache is not None:
        from mechdiff.training.target_cache import TargetCache

        cached = TargetCache.build(
            pair.target, traces["input_ids"], target_cache, progress=recipe.progress, lean=objective.lean
        )
    resampler = Resampler(adapted, recipe)
    warm = max(1, int(recipe.l1_warmup_frac * recipe.steps))
    device = adapted.model.cfg.device

    def loss_fn(step: int):
        # This rank's slice of the step's global batch (all of it in one process); the objective
        # weights its means so that the ranks' averaged gradient is the whole batch's.
        indices = distributed.shard(step_indices(len(traces), recipe.batch_size, step, recipe.seed))
        tokens, mask = (t.to(device) for t in pad(traces[indices]["input_ids"], pad_id, side="right"))
        target = cached.batch(indices, tokens.shape[1]) if cached is not None else None
        l1_scale = min(1.0, (step + 1) / warm) if recipe.l1_warmup_frac else 1.0
        dead = (step - resampler.last_fired >= recipe.dead_window) if recipe.weights.aux else None
        loss, parts, stats = objective(tokens, mask, l1_scale=l1_scale, dead=dead, k_aux=recipe.k_aux, target=target)
        parts["dead"] = resampler.observe(step, stats)
        return loss, parts

    val_tokens, val_mask = (t.to(device) for t in pad(val_traces["input_ids"], pad_id, side="right"))

    @torch.no_grad()
    def validate() -> dict[str, float]:
        _, parts, stats = objective(val_tokens, val_mask, cutoff=1)
        parts.update({f"fve_{i}": 1 - v for i, v in enumerate(stats["nmse"].tolist())})
        return parts

    cfg = replace(recipe.loop, out_dir=out_dir, desc="adapters")
    trained = torch.nn.ModuleDict({"adapters": adapted.adapters, "resampler": resampler})
    history = train(trained, loss_fn, cfg, validate=validate, on_step=resampler)
    return adapted, history
