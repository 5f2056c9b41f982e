"""How faithful an adapted model is to the target, and how sparse its adapters are.

On held-out traces (teacher forcing), for any set of models compared with the target:

* ``fve_per_layer``: 1 - |h - h_target|^2 / |h_target|^2 of the residual after each layer;
* ``kl_to_target``: mean KL(p_target || p_model) over non-pad tokens; ``top1_agreement``;
* ``ce``: next-token cross-entropy on the traces;
* ``bridging_kl``: per cutoff k, KL to the target of model[<k] -> target[>=k] (``model_then_target``)
  and target[<k] -> model[>=k] (``target_then_model``);
* for adapted models: ``l0_per_layer`` (active features per token) and ``dead_fraction`` (features
  that never fire on the traces).

:func:`adapter_report` adds generation on test problems (accuracy, length, hesitation) for base,
hybrid, adapted and target, and the top-level ``gain_recovered``, ``gain_recovered_vs_hybrid`` and
``length_ratio``: the JSON of ``python -m mechdiff.adapters eval --json``.

Example:
    >>> from mechdiff.models import load_pair
    >>> from mechdiff.adapters.formats import load_adapted
    >>> from mechdiff.organism import corpus
    >>> pair = load_pair("organism")
    >>> adapted = load_adapted(pair)
    >>> traces = corpus.reasoning_traces(32, split="validation")
    >>> out = faithfulness({"adapted": adapted.model, "hybrid": (adapted.model, adapted.bypass_hooks())},
    ...                    pair.target, traces)
    >>> out["adapted"]["kl_to_target"] < out["hybrid"]["kl_to_target"]
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from datasets import Dataset
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechdiff.adapters.transcoder import AdaptedModel
from mechdiff.capture import run_capture
from mechdiff.evaluation.behaviour import gain_recovered
from mechdiff.padding import pad
from mechdiff.workloads import Workload, for_pair

ModelSpec = HookedTransformer | tuple[HookedTransformer, Sequence[tuple]]

# What the shipped organism adapters must reach (issue 4); see :func:`check_targets`.
TARGETS = {
    "gain_recovered": (">=", 0.9), "length_ratio_low": (">=", 0.9), "length_ratio_high": ("<=", 1.1),
    "mean_fve": (">=", 0.9), "kl_ratio_vs_hybrid": ("<=", 0.1), "mean_l0": ("<=", 10.0),
    "dead_fraction": ("<=", 0.25),
}  # fmt: skip


def _kl_tokens(t_logp: Float[Tensor, "b p v"], logits: Float[Tensor, "b p v"]) -> Float[Tensor, "b p"]:
    return (t_logp.exp() * (t_logp - logits.float().log_softmax(-1))).sum(-1)


class _Sums:
    """Running sums of one model's metrics over batches."""

    def __init__(self, n_layers: int, bridging: bool = True):
        self.bridging = bridging
        self.err = torch.zeros(n_layers, dtype=torch.float64)
        self.ref = torch.zeros(n_layers, dtype=torch.float64)
        self.kl = self.agree = self.ce = self.n_tok = self.n_next = 0.0
        self.bridge = torch.zeros(max(n_layers - 1, 0), 2, dtype=torch.float64)
        self.l0 = None
        self.fired = None

    def result(self) -> dict:
        out = {
            "fve_per_layer": (1 - self.err / self.ref.clamp(min=1e-12)).tolist(),
            "kl_to_target": self.kl / self.n_tok,
            "top1_agreement": self.agree / self.n_tok,
            "ce": self.ce / self.n_next,
        }
        if self.bridging:  # not measured: absent, not zeros that read as perfect splices
            out["bridging_kl"] = {str(k + 1): {"model_then_target": b[0], "target_then_model": b[1]}
                                  for k, b in enumerate((self.bridge / self.n_tok).tolist())}  # fmt: skip
        out["mean_fve"] = sum(out["fve_per_layer"]) / len(out["fve_per_layer"])
        if self.l0 is not None:
            out["l0_per_layer"] = (self.l0 / self.n_tok).tolist()
            out["mean_l0"] = float(self.l0.mean() / self.n_tok)
            out["dead_per_layer"] = (~self.fired).float().mean(-1).tolist()
            out["dead_fraction"] = float((~self.fired).float().mean())
        return out


@torch.no_grad()
def faithfulness(
    models: dict[str, ModelSpec],
    target: HookedTransformer,
    traces: Dataset,
    *,
    pad_id: int | None = None,
    batch_size: int = 64,
    bridging: bool = True,
    progress: bool = False,
) -> dict[str, dict]:
    """Teacher-forced faithfulness of each model (or ``(model, fwd_hooks)``) to ``target``.

    Models with adapter hook points (``blocks.L.adapter.hook_acts``) also get L0 and dead
    features, unless their hooks bypass the adapters. One target forward per batch is shared.
    """
    n = target.cfg.n_layers
    pad_id = pad_id if pad_id is not None else (target.tokenizer.pad_token_id or 0)
    specs = {k: (v, ()) if isinstance(v, HookedTransformer) else (v[0], list(v[1])) for k, v in models.items()}
    sums = {name: _Sums(n, bridging) for name in specs}
    rows = traces["input_ids"]
    for start in tqdm(range(0, len(rows), batch_size), desc="faithfulness", disable=not progress):
        tokens, mask = pad(rows[start : start + batch_size], pad_id, side="right")
        tokens, mask = tokens.to(target.cfg.device), mask.to(target.cfg.device)
        t_logits, t_resid, _ = run_capture(target, tokens, mask)
        t_logp = t_logits.float().log_softmax(-1)
        nxt, nxt_mask = tokens[:, 1:], mask[:, 1:] & mask[:, :-1]
        for name, (model, hooks) in specs.items():
            s = sums[name]
            acts_names = _acts_names(model) if not hooks else ()
            with model.hooks(fwd_hooks=hooks):
                logits, resid, extra = run_capture(model, tokens, mask, acts_names)
                if bridging:
                    for k in range(1, n):
                        a2t = target(resid[k], start_at_layer=k, attention_mask=mask.long())
                        t2a = model(t_resid[k], start_at_layer=k, attention_mask=mask.long())
                        s.bridge[k - 1, 0] += float((_kl_tokens(t_logp, a2t) * mask).sum())
                        s.bridge[k - 1, 1] += float((_kl_tokens(t_logp, t2a) * mask).sum())
            m = mask.float()
            for i in range(n):
                s.err[i] += float((((resid[i + 1] - t_resid[i + 1]) ** 2).sum(-1) * m).sum())
                s.ref[i] += float(((t_resid[i + 1] ** 2).sum(-1) * m).sum())
            s.kl += float((_kl_tokens(t_logp, logits) * m).sum())
            s.agree += float(((logits.argmax(-1) == t_logits.argmax(-1)) & mask).sum())
            logp = logits[:, :-1].float().log_softmax(-1).gather(-1, nxt[..., None])[..., 0]
            s.ce -= float((logp * nxt_mask).sum())
            s.n_tok += float(mask.sum())
            s.n_next += float(nxt_mask.sum())
            if acts_names:
                active = torch.stack([extra[a] > 0 for a in acts_names]) & mask[None, ..., None]
                s.l0 = active.sum((1, 2, 3)).double() + (0 if s.l0 is None else s.l0)
                fired = active.any(1).any(1).cpu()
                s.fired = fired if s.fired is None else s.fired | fired
    return {name: s.result() for name, s in sums.items()}


def _acts_names(model: HookedTransformer) -> tuple[str, ...]:
    names = tuple(AdaptedModel.acts_name(i) for i in range(model.cfg.n_layers))
    return names if all(a in model.hook_dict for a in names) else ()


def adapter_report(
    pair,
    adapted: AdaptedModel,
    traces: Dataset,
    problems: Dataset | None = None,
    *,
    batch_size: int = 64,
    progress: bool = False,
    workload: Workload | None = None,
    bridging: bool = True,
) -> dict:
    """Faithfulness, sparsity and behaviour of base, hybrid, adapted and target (a JSON-able dict).

    ``problems`` (test prompts, from ``workload.problems``) are answered greedily by each model
    and graded by ``workload`` (default: the pair's, :func:`mechdiff.workloads.for_pair`);
    without them only the teacher-forced metrics are reported.
    """
    models = {
        "base": pair.base,
        "hybrid": (adapted.model, adapted.bypass_hooks()),
        "adapted": adapted.model,
        "target": pair.target,
    }
    report = faithfulness(
        models, pair.target, traces, batch_size=batch_size, progress=progress, bridging=bridging
    )  # bridging: 2 (n_layers - 1) partial forwards per model
    if problems is not None:
        workload = workload if workload is not None else for_pair(pair)
        for name, spec in models.items():
            model, hooks = (spec, ()) if isinstance(spec, HookedTransformer) else spec
            stats = workload.evaluate(model, problems, fwd_hooks=hooks, progress=progress)
            report[name].update(
                {
                    k: stats[k]
                    for k in (
                        "accuracy",
                        "mean_response_tokens",
                        "hesitations_per_response",
                        "n_problems",
                        "n_wrong_steps",
                        "p_hesitation_given_wrong_step",
                        "hesitations_by_response",
                        "correct_by_response",
                    )
                    if k in stats
                }
            )
        acc = {name: report[name]["accuracy"] for name in models}
        report["gain_recovered"] = gain_recovered(acc["adapted"], acc["base"], acc["target"])
        report["gain_recovered_vs_hybrid"] = gain_recovered(acc["adapted"], acc["hybrid"], acc["target"])
        target_len = report["target"]["mean_response_tokens"]
        report["length_ratio"] = report["adapted"]["mean_response_tokens"] / target_len if target_len else math.nan
        report["n_problems"] = len(problems)
    report["n_traces"] = len(traces)
    report["n_trace_tokens"] = int(sum(len(r) for r in traces["input_ids"]))
    return report


def check_targets(report: dict) -> dict[str, dict]:
    """Each issue-4 target beside its measured value and whether it is met."""
    hybrid_kl = report["hybrid"]["kl_to_target"]
    values = {
        "gain_recovered": report.get("gain_recovered", math.nan),
        "length_ratio_low": report.get("length_ratio", math.nan),
        "length_ratio_high": report.get("length_ratio", math.nan),
        "mean_fve": report["adapted"]["mean_fve"],
        "kl_ratio_vs_hybrid": report["adapted"]["kl_to_target"] / hybrid_kl if hybrid_kl else math.nan,
        "mean_l0": report["adapted"]["mean_l0"],
        "dead_fraction": report["adapted"]["dead_fraction"],
    }
    out = {}
    for key, (op, bound) in TARGETS.items():
        v = values[key]
        out[key] = {"value": v, "target": f"{op} {bound}", "met": bool(v >= bound if op == ">=" else v <= bound)}
    return out
