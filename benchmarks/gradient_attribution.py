"""Ranking features for "wait": activation x gradient against attribution graphs, prompts per second.

    python -m benchmarks.gradient_attribution [--pair organism] [--adapters DIR] [--n-prompts 32]
                                              [--batch-size 8] [--graphs 4] [--threads 1]

On the pair's hesitation prompts (the target's replies cut before each "wait"), times
:func:`attribution.gradient.feature_attribution` batched, the same one prompt at a time (the
baseline), and :func:`attribution.build.attribute` (one graph per prompt, ``--max-feature-nodes``)
on the first ``--graphs`` prompts, each after one warm-up call (``benchmarks.mean_seconds``).
Prints prompts per second of each and writes ``--json``.
``--pair smollm2 --adapters DIR`` needs the ``[real]`` extra and a fine-tune.
"""

from __future__ import annotations

import argparse
import json

import torch

from attribution.build import attribute
from attribution.gradient import feature_attribution
from benchmarks import mean_seconds
from mechdiff.adapters.formats import SHIPPED_DIR, load_adapted
from mechdiff.cli import (
    add_pair_options,
    check_pair_options,
    load_pair_from_args,
    offline_environment,
    run,
)
from mechdiff.evaluation import hesitation as H
from mechdiff.workloads import for_pair


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_options(p)
    p.add_argument("--adapters", default=None, help="adapters folder (default: the organism's shipped ones)")
    p.add_argument("--n-prompts", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--graphs", type=int, default=4, help="graphs to time (one per prompt)")
    p.add_argument("--max-feature-nodes", type=int, default=256)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    offline_environment()
    check_pair_options(args)
    pair = load_pair_from_args(args)
    adapted = load_adapted(pair, args.adapters or SHIPPED_DIR)
    spec = for_pair(pair)
    hes, _ = H.hesitation_prompts(
        pair.target, spec.tokenizer, spec.problems(args.n_prompts, "validation", 0), workload=spec
    )
    prompts = hes.tokens[: args.n_prompts]
    if not prompts:
        raise SystemExit("the target wrote no hesitation: nothing to attribute")
    n, mean_len = len(prompts), sum(map(len, prompts)) / len(prompts)
    batched = mean_seconds(lambda: feature_attribution(adapted, prompts, spec.variants, batch_size=args.batch_size))
    single = mean_seconds(lambda: feature_attribution(adapted, prompts, spec.variants, batch_size=1))
    n_graphs = min(args.graphs, n)
    graph = mean_seconds(
        lambda: [
            attribute(adapted, torch.tensor(t), target=spec.target, max_feature_nodes=args.max_feature_nodes)
            for t in prompts[:n_graphs]
        ]
    )
    row = {
        "pair": args.pair,
        "threads": args.threads,
        "n_prompts": n,
        "mean_prompt_tokens": round(mean_len, 1),
        "gradient_batched_prompts_per_s": round(n / batched, 3),
        "batch_size": args.batch_size,
        "gradient_one_at_a_time_prompts_per_s": round(n / single, 3),
        "graph_prompts_per_s": round(n_graphs / graph, 4),
        "graph_max_feature_nodes": args.max_feature_nodes,
        "n_graphs_timed": n_graphs,
    }
    print(
        f"{args.pair}: {n} prompts of {mean_len:.0f} tokens, {args.threads} thread(s)\n"
        f"  activation x gradient, batch {args.batch_size}: {row['gradient_batched_prompts_per_s']:8.3f} prompts/s\n"
        f"  activation x gradient, one at a time (baseline): {row['gradient_one_at_a_time_prompts_per_s']:8.3f} prompts/s\n"
        f"  attribution graph ({args.max_feature_nodes} feature nodes): {row['graph_prompts_per_s']:8.4f} prompts/s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)
    return row


if __name__ == "__main__":
    run(main)
