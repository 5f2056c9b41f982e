"""Hesitation prompts and the measurements the hesitation study makes with them.

*Hesitation prompts* are the target's own greedy responses cut right before each ``wait``. Each
gets a *control* cut from the same response before a ``;`` that closes a step (the slot where a
``wait`` could have come and did not), the one nearest in position, so the two sets match in
length and syntax and differ in whether the model hesitates next.

What "hesitating" is in tokens, and where a reply is cut, the workload says
(:class:`mechdiff.workloads.protocol.Workload`: ``target``, ``variants``, ``go_on``, ``cut``):
the organism's task word(s) and ``;`` (:mod:`mechdiff.workloads.organism`), or the chat's " Wait"
and the newline after a step (:mod:`mechdiff.workloads.chat`).

Example:
    >>> from mechdiff.models import load_pair
    >>> from mechdiff.organism import corpus
    >>> pair = load_pair("organism")
    >>> hes, ctl = hesitation_prompts(pair.target, pair.tokenizer, corpus.problems(20, "validation"))
    >>> pair.tokenizer.convert_ids_to_tokens(hes.tokens[0][-1:]) != ["wait"]
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from mechdiff.padding import pad
from mechdiff.workloads import OrganismWorkload, Workload


@dataclass
class CutPrompts:
    """Prefixes of generated responses; the next token is a hesitation (``wait``) or, for
    controls, the workload's go-on token (``;``)."""

    kind: str
    tokens: list[list[int]] = field(default_factory=list)
    problem_index: list[int] = field(default_factory=list)
    response_position: list[int] = field(default_factory=list)
    after_error: list[bool] = field(default_factory=list)
    labels: list[list[str]] = field(default_factory=list)  # ground truth of each prefix's response part

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, tokens, problem_index, position, after_error, labels) -> None:
        self.tokens.append(tokens)
        self.problem_index.append(problem_index)
        self.response_position.append(position)
        self.after_error.append(after_error)
        self.labels.append(labels)


def hesitation_prompts(
    model: HookedTransformer,
    tokenizer,
    problems: Dataset,
    batch_size: int = 128,
    progress: bool = False,
    *,
    workload: Workload | None = None,
) -> tuple[CutPrompts, CutPrompts]:
    """Generate greedily, then cut before every hesitation and before the nearest go-on token
    (a ``;`` on the organism) as its control. ``workload`` (default: the organism's over
    ``tokenizer``) says which tokens those are and how the response is labelled."""
    work = workload if workload is not None else OrganismWorkload(tokenizer)
    responses = work.responses(model, problems, batch_size=batch_size, progress=progress)
    hes, ctl = CutPrompts("hesitation"), CutPrompts("control")
    for idx, (row, ids) in enumerate(zip(problems, responses)):
        labels, waits, seps = work.cut(work.problem(row["operands"]), ids)
        for j, after_error in waits:
            hes.add(row["input_ids"] + ids[:j], idx, j, after_error, labels[:j])
            if seps:
                k = min(seps, key=lambda s: abs(s - j))
                seps.remove(k)
                ctl.add(row["input_ids"] + ids[:k], idx, k, False, labels[:k])
    return hes, ctl


@torch.no_grad()
def next_token_probability(
    model: HookedTransformer,
    prompts: Sequence[Sequence[int]],
    token_id: int | Sequence[int],
    fwd_hooks: Sequence[tuple] = (),
    batch_size: int = 128,
    pad_id: int = 0,
    greedy: bool = False,
) -> Float[Tensor, " n"]:
    """P(next token = ``token_id``) after each prompt, batched with left padding and a mask; a
    sequence of ids sums their probabilities (every spelling of a hesitation). ``greedy``: instead,
    1.0 where the most likely next token is one of them (what greedy decoding would write), else 0."""
    out = []
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        for start in range(0, len(prompts), batch_size):
            tokens, mask = pad([list(p) for p in prompts[start : start + batch_size]], pad_id, "left")
            logits = model(tokens.to(model.cfg.device), attention_mask=mask.long().to(model.cfg.device))
            probs = logits[:, -1].float().softmax(-1)
            ids = [token_id] if isinstance(token_id, int) else list(token_id)
            if greedy:
                out.append(torch.isin(probs.argmax(-1), torch.tensor(ids, device=probs.device)).float().cpu())
            else:
                out.append(probs[:, ids].sum(-1).cpu())
    return torch.cat(out)
