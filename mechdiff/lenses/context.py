"""What every lens is scored on: one organism's pair, its hesitation, labelled tokens and prompts.

:func:`lens_context` builds, for a pair, everything the lenses share, so each is scored on the
same tokens and problems:

* ``spec``: the pair's workload (:class:`~mechdiff.workloads.protocol.Workload`: its word,
  hesitation token ids, grader): no lens assumes the word;
* ``tokens``: the target's greedy replies to *validation* problems (prompt + reply), every token
  with its ground-truth label (``spec.cut``; prompt tokens ``"prompt"``): where the label rule and
  the agreement between lenses are measured;
* ``hes`` / ``ctl``: hesitation prompts and controls cut from the same replies
  (:func:`~mechdiff.evaluation.hesitation.hesitation_prompts`): what the lenses rank their units with;
* ``hes_test``: hesitation prompts from the target's replies to the *test* problems, and
  ``problems``: the test problems, for necessity and steering only. Nothing is chosen on them.

Example:
    >>> from mechdiff.models import load_pair
    >>> ctx = lens_context(load_pair("organism"), LensSettings(n_label_problems=8, n_problems=4))
    >>> len(ctx.tokens.sequences), ctx.spec.word
    (8, 'wait')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from datasets import Dataset
from jaxtyping import Bool, Float
from torch import Tensor

from mechdiff.evaluation import hesitation as H
from mechdiff.models import ModelPair
from mechdiff.organism import task
from mechdiff.padding import pad
from mechdiff.workloads import Workload, for_pair

TRUTH = ("hesitation", "slip", "correction")  # the labels a hesitation unit should fire on


@dataclass
class LensSettings:
    """Sizes shared by every lens (validation problems for labels and ranking, test ones for effects)."""

    n_label_problems: int = 150
    n_prompts: int = 60
    n_problems: int = 200
    random_draws: int = 5
    share: float = 0.8
    seed: int = 0


@dataclass
class LabelledTokens:
    """Token sequences and a label per token; flattened views skip each sequence's first token."""

    sequences: list[list[int]]
    labels: list[list[str]]

    def flat_labels(self) -> list[str]:
        return [lab for labs in self.labels for lab in labs[1:]]

    def truth(self, names: Sequence[str] = TRUTH) -> Bool[Tensor, " n_tokens"]:
        return torch.tensor([lab in names for lab in self.flat_labels()])


@dataclass
class LensContext:
    pair: ModelPair
    spec: Workload
    settings: LensSettings
    tokens: LabelledTokens
    hes: H.CutPrompts
    ctl: H.CutPrompts
    hes_test: H.CutPrompts
    problems: Dataset


def lens_context(
    pair: ModelPair, settings: LensSettings | None = None, *, max_new_tokens: int | None = None
) -> LensContext:
    """Generate the target's replies (greedy) and cut everything the lenses need."""
    s = settings or LensSettings()
    spec = for_pair(pair, max_new_tokens)
    val = spec.problems(s.n_label_problems, "validation", s.seed)
    test = spec.problems(s.n_problems, "test", s.seed)
    hes, ctl = H.hesitation_prompts(pair.target, spec.tokenizer, val, workload=spec)
    hes_test, _ = H.hesitation_prompts(pair.target, spec.tokenizer, test, workload=spec)
    if not len(hes):
        raise ValueError(
            f"the target wrote no {spec.word!r} in its replies to {len(val)} validation "
            "problems: nothing to rank hesitation units with (raise n_label_problems)"
        )
    return LensContext(
        pair,
        spec,
        s,
        labelled_replies(pair.target, spec, val),
        _first(hes, s.n_prompts),
        _first(ctl, s.n_prompts),
        _first(hes_test, s.n_prompts),
        test,
    )


def labelled_replies(model, spec: Workload, problems: Dataset) -> LabelledTokens:
    """``model``'s greedy replies after each prompt, labelled by ``spec.cut`` (prompt tokens ``"prompt"``)."""
    seqs, labels = [], []
    for row, ids in zip(problems, spec.responses(model, problems)):
        seqs.append(list(row["input_ids"]) + list(ids))
        labels.append(["prompt"] * len(row["input_ids"]) + spec.cut(task.Problem(tuple(row["operands"])), ids)[0])
    return LabelledTokens(seqs, labels)


def _first(prompts: H.CutPrompts, n: int) -> H.CutPrompts:
    fields = ("tokens", "problem_index", "response_position", "after_error", "labels")
    return H.CutPrompts(prompts.kind, *(getattr(prompts, f)[:n] for f in fields))


@torch.no_grad()
def cached(
    model,
    sequences: Sequence[Sequence[int]],
    names: Sequence[str],
    *,
    batch_size: int = 64,
    fwd_hooks: Sequence[tuple] = (),
    pad_id: int = 0,
) -> dict[str, Float[Tensor, "n_tokens ..."]]:
    """Activations at ``names`` on every token of ``sequences`` but each one's first, flattened in
    order (right padding: causal attention never reads the pads after a real token)."""
    wanted, out = set(names), {n: [] for n in names}
    for start in range(0, len(sequences), batch_size):
        chunk = [list(s) for s in sequences[start : start + batch_size]]
        tokens, mask = pad(chunk, pad_id, "right")
        mask[:, 0] = False
        with model.hooks(fwd_hooks=list(fwd_hooks)):
            _, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=lambda n: n in wanted)
        for n in names:
            out[n].append(cache[n][mask.to(cache[n].device)].float().cpu())
    return {n: torch.cat(v) for n, v in out.items()}


def last_position(
    model,
    prompts: Sequence[Sequence[int]],
    names: Sequence[str],
    **kwargs,
) -> dict[str, Float[Tensor, "n_prompts ..."]]:
    """Activations at ``names`` on the last token of each prompt."""
    lengths = torch.tensor([len(p) for p in prompts]) - 1
    ends = torch.cumsum(lengths, 0) - 1
    return {n: a[ends] for n, a in cached(model, prompts, names, **kwargs).items()}
