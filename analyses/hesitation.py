"""The hesitation study: trace the hesitation token to adapter features, then ablate, keep and steer them.

    python -m analyses.hesitation                                   # the shipped organism (the demo)
    python -m analyses.hesitation --pair custom --base runs/organisms/hmm/base \\
        --target runs/organisms/hmm/target --adapters runs/organisms/hmm/adapters --out figures/hmm
    python -m analyses.hesitation --pair smollm2 --adapters runs/adapters-smollm2 --ranking gradient \\
        --out figures/real/hesitation --n-prompts 40 --n-problems 100

The study is :func:`mechdiff.studies.hesitation.run` (see it for the steps and rules); this script
parses, calls it and writes ``--out``: HTML + PNG figures, ``summary.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mechdiff import cli


def build_parser() -> argparse.ArgumentParser:
    from mechdiff.studies.hesitation import RANKINGS, SIZINGS, HesitationConfig

    d = HesitationConfig()
    p = argparse.ArgumentParser(
        prog="python -m analyses.hesitation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_pair_options(p)
    p.add_argument(
        "--adapters", default=None, help="trained adapters folder (default: the shipped ones, for --pair organism only)"
    )
    p.add_argument("--out", default="figures/hesitation", help="output folder")
    p.add_argument(
        "--steps",
        default=None,
        metavar="DIR",
        help="keep each finished step (graphs, generations) in DIR, so that a killed run rerun with the "
        "same flags resumes where it stopped (default: keep nothing)",
    )
    p.add_argument(
        "--n-prompts",
        type=int,
        default=d.n_prompts,
        help="hesitation prompts (graphs) to use, cut from the target's replies to as many problems",
    )
    p.add_argument("--n-problems", type=int, default=d.n_problems, help="test problems for generation")
    p.add_argument(
        "--n-dose-problems",
        type=int,
        default=d.n_dose_problems,
        help="test problems per dose-response point (at most --n-problems)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens generated per reply (default: the workload's, 96 organism / 256 chat)",
    )
    p.add_argument("--n-traces", type=int, default=d.n_traces, help="held-out traces for faithfulness")
    p.add_argument(
        "--share",
        type=float,
        default=d.share,
        help="influence share the set must cover (influence rule) / share of P(hesitation) "
        "its ablation must remove at the prompts (ablation rule)",
    )
    p.add_argument(
        "--sizing",
        choices=SIZINGS,
        default=d.sizing,
        help="which rule sizes the headline set (both are reported; influence needs --ranking graph)",
    )
    p.add_argument("--max-feature-nodes", type=int, default=d.max_feature_nodes, help="features visited per graph")
    p.add_argument(
        "--ranking",
        choices=RANKINGS,
        default=d.ranking,
        help="how features are ranked: attribution graphs (default) or activation x gradient",
    )
    p.add_argument(
        "--n-graphs",
        type=int,
        default=None,
        help="attribution graphs to build (default: one per prompt with --ranking graph, "
        "1 for the example figure with --ranking gradient)",
    )
    p.add_argument("--random-draws", type=int, default=d.random_draws, help="random same-size control sets")
    p.add_argument("--seed", type=int, default=d.seed)
    return p


def config_from_args(args):
    from mechdiff.config_checks import ConfigError
    from mechdiff.studies.hesitation import HesitationConfig

    try:
        return HesitationConfig(
            n_prompts=args.n_prompts,
            n_problems=args.n_problems,
            n_dose_problems=args.n_dose_problems,
            n_traces=args.n_traces,
            max_new_tokens=args.max_new_tokens,
            share=args.share,
            max_feature_nodes=args.max_feature_nodes,
            ranking=args.ranking,
            sizing=args.sizing,
            n_graphs=args.n_graphs,
            random_draws=args.random_draws,
            seed=args.seed,
        )
    except ConfigError as err:  # the flags carry the config's field names
        raise cli.UsageError(err.as_flag()) from None
    except ValueError as err:
        raise cli.UsageError(str(err)) from None


def main(argv=None) -> dict:
    cli.offline_environment()
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    cfg = config_from_args(args)
    cli.check_pair_options(args)
    if args.adapters is None:
        if args.pair != "organism":
            raise cli.UsageError(
                f"--adapters DIR is required for --pair {args.pair} (the shipped adapters are the organism's)"
            )
        from mechdiff.adapters.formats import SHIPPED_DIR

        args.adapters = str(SHIPPED_DIR)
    if not Path(args.adapters).is_dir():
        raise cli.UsageError(f"--adapters {args.adapters}: no such folder")
    from mechdiff.adapters.formats import load_adapted
    from mechdiff.studies.hesitation import run

    pair = cli.load_pair_from_args(args)
    adapted = load_adapted(pair, args.adapters)
    name = (
        f"custom --base {cli.shown_path(args.base)} --target {cli.shown_path(args.target)}"
        if args.pair == "custom"
        else args.pair
    )
    result = run(pair, adapted, cfg, pair_name=name, adapters_name=cli.shown_path(args.adapters), steps=args.steps)
    result.write(args.out)
    print(f"[hesitation] wrote {args.out}/ in {result.data['seconds']:.0f} s", flush=True)
    return result.summary()


if __name__ == "__main__":
    cli.run(main)
