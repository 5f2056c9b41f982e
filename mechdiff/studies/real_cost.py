"""The cost stage of the study on SmolLM2 (:mod:`mechdiff.studies.real_stages`): seconds and peak memory of one training step, one
attribution graph and the gradient ranking, each measured in a fresh process on a pair
(``measure``), with random adapters of the study's width (cost does not depend on training).

Example (shell; one measurement, printed as JSON)::

    python -c "from mechdiff.studies.real_cost import measure; print(measure('organism', 'lora_step', 16, 2))"
"""

from __future__ import annotations

import time

from mechdiff.measure import peak_rss_gib


def measure(pair_name: str, what: str, d_sae: int, batch_size: int, threads: int = 0) -> dict:
    """Seconds and peak resident memory of ``what`` on ``pair_name``: a training step (the mean of
    steps 2 and 3 of a real run of the shared loop) or one attribution graph (after a warm-up).
    ``threads``: torch CPU threads (0: torch's default), as ``--threads`` gives every stage."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    from mechdiff.models import load_pair
    from mechdiff.workloads import for_pair

    pair = load_pair(pair_name)
    traces = for_pair(pair).traces(max(batch_size * 3, 8), "test")
    before = peak_rss_gib()
    if what in ("attribution_graph", "gradient_ranking"):
        run = (_attribution_graph if what == "attribution_graph" else _gradient_ranking)(pair, traces, d_sae)
        run()  # warm-up
        start = time.perf_counter()
        info = run()
        seconds = (time.perf_counter() - start) / info.get("n_prompts", 1)  # per prompt
    else:
        history = (_adapter_steps if what == "adapter_step" else _lora_steps)(pair, traces, d_sae, batch_size)
        seconds = (history[-1]["seconds"] - history[0]["seconds"]) / (len(history) - 1)
        info = {}
    peak = peak_rss_gib()
    return {
        "seconds": round(seconds, 3),
        "peak_rss_gib": round(peak, 2),
        "rss_after_loading_gib": round(before, 2),
        "batch_size": batch_size,
        "d_sae": d_sae,
        "threads": torch.get_num_threads(),
        **info,
    }


def _adapter_steps(pair, traces, d_sae, batch_size) -> list[dict]:
    from mechdiff.training.adapter_objective import AdapterRecipe, train_adapters

    recipe = AdapterRecipe(d_sae=d_sae, steps=3, batch_size=batch_size, n_val=4, log_every=1, progress=False)
    return train_adapters(pair, recipe, traces=traces, val_traces=traces.select(range(4)))[1]


def _lora_steps(pair, traces, d_sae, batch_size) -> list[dict]:
    from mechdiff.lora import TrainConfig, train_lora

    cfg = TrainConfig(steps=3, batch_size=batch_size, log_every=1, n_traces=len(traces))
    return train_lora(pair, cfg, progress=False)[1]


def _random_adapters(pair, d_sae):
    """TopK adapters of the study's width with random weights: cost does not depend on training."""
    from attribution.synthetic import randomize_adapters
    from mechdiff.adapters.transcoder import AdaptedModel

    return randomize_adapters(AdaptedModel.from_pair(pair, d_sae, "topk", 8), seed=0)


def _hesitation_cuts(pair, traces, n: int) -> list[tuple[list[int], int]]:
    """Up to ``n`` traces cut right before their first hesitation token, with that token."""
    ids = _hesitation_ids(pair.tokenizer)
    out = []
    for row in traces["input_ids"]:
        cut = next((i for i, t in enumerate(row) if i > 0 and t in ids), None)
        if cut is not None:
            out.append((list(row[:cut]), int(row[cut])))
        if len(out) == n:
            break
    return out


def _attribution_graph(pair, traces, d_sae):
    import torch

    from attribution.build import attribute

    adapted = _random_adapters(pair, d_sae)
    ((prefix, target),) = _hesitation_cuts(pair, traces, 1)
    tokens = torch.tensor(prefix)

    def graph():
        g = attribute(adapted, tokens, target=target, max_feature_nodes=256)
        return {
            "prompt_tokens": int(tokens.shape[0]),
            "graph_info": {k: v for k, v in g.info.items() if isinstance(v, (int, float))},
        }

    return graph


def _gradient_ranking(pair, traces, d_sae, batch: int = 8):
    """Activation x gradient for "Wait" on a batch of hesitation prefixes (the SmolLM2 study's
    ranking), with random adapters of the same width; seconds are per prompt."""
    from attribution.gradient import feature_attribution

    adapted = _random_adapters(pair, d_sae)
    prompts = [prefix for prefix, _ in _hesitation_cuts(pair, traces, batch)]
    ids = sorted(_hesitation_ids(pair.tokenizer))

    def rank():
        feature_attribution(adapted, prompts, ids, batch_size=batch)
        return {
            "n_prompts": len(prompts),
            "batch": batch,
            "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
        }

    return rank


def _hesitation_ids(tokenizer) -> set[int]:
    from mechdiff.real.chat import hesitation_token_ids

    return set(hesitation_token_ids(tokenizer))
