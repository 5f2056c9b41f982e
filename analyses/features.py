"""Feature interpretation of the transcoder adapters: ``python -m analyses.features``.

    python -m analyses.features                                            # the shipped organism
    F=mechdiff/organism/family/hmm                                         # an organism that says "hmm"
    python -m analyses.features --pair custom --base $F/base --target $F/target --adapters $F/adapters \\
        --out runs/hmm/features --store runs/hmm/features-store
    python -m analyses.features --pair smollm2 --adapters runs/adapters-smollm2 --out figures/real/features \\
        --store runs/features/store-smollm2

The census is :func:`mechdiff.studies.features.run`: one pass over held-out traces of the pair's
workload (the organism's corpus, or SmolLM2's chat) fills an activation store
(:mod:`mechdiff.features.store`) for every adapter feature and, as a baseline from the same forward,
every base-MLP neuron of the adapted model. Features are classified by the ground-truth label rule
(:func:`mechdiff.features.classify.rule_text`, with the workload's hesitation word; the tokens are
labelled by :mod:`mechdiff.studies.features_labels`); optionally an LM judge behind an
OpenAI-compatible endpoint (``--judge-url``, ``--judge-model``) labels some of them too. This script
parses, calls it and writes ``--out`` (default ``figures/features/``):

* ``index.html`` and ``features/<i>.html``: dashboards (all reasoning features, and the densest
  ``--pages-per-category`` of every other category), ``assets/`` (shared JavaScript);
* ``category_counts.{html,png}``, ``regions.{html,png}``: figures;
* ``summary.json``: n_features, n_alive, category_counts, reasoning_fraction (adapters), the
  neuron baseline and the random-adapter control, role counts, store throughput, the workload's
  hesitation tokens and labels; ``report.md``.

The store is cached in ``--store`` (resumable: an interrupted run continues; a store made for
other adapters, corpus or settings is rebuilt). About two minutes on 2 CPU cores with 300 traces.
``--adapters random:1024`` uses random sparse adapters (for tests and dry runs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mechdiff import cli


def build_parser() -> argparse.ArgumentParser:
    from mechdiff.studies.features import FeaturesConfig

    d = FeaturesConfig()
    p = argparse.ArgumentParser(
        prog="python -m analyses.features", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_pair_options(p)
    p.add_argument(
        "--adapters",
        default=None,
        help="trained adapters folder, or random:D_SAE for random sparse adapters "
        "(default: the shipped ones, for --pair organism only)",
    )
    p.add_argument("--out", default="figures/features", help="output folder")
    p.add_argument("--store", default="runs/features/store", help="activation store folder (cache)")
    p.add_argument("--fresh", action="store_true", help="rebuild the store even if one is cached")
    p.add_argument("--n-traces", type=int, default=d.n_traces, help="held-out traces in the store")
    p.add_argument("--split", default=d.split, help="the workload's split of the traces")
    p.add_argument("--top-k", type=int, default=d.top_k, help="top activating sequences kept per feature")
    p.add_argument("--n-random", type=int, default=d.n_random, help="random activating examples per feature")
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="traces per forward (fewer when a batch's activations would pass --max-batch-gib)",
    )
    p.add_argument(
        "--max-batch-gib",
        type=float,
        default=d.max_batch_gib,
        help="bound on one batch's cached activations in GiB (SmolLM2's long chat traces x ~60k units)",
    )
    p.add_argument("--min-examples", type=int, default=d.min_examples, help="fewer top examples: 'rare'")
    p.add_argument(
        "--pages-per-category",
        type=int,
        default=d.pages_per_category,
        help="dashboards per non-reasoning category (reasoning: up to --max-reasoning-pages)",
    )
    p.add_argument("--max-reasoning-pages", type=int, default=d.max_reasoning_pages)
    p.add_argument("--no-neurons", action="store_true", help="skip the MLP-neuron baseline")
    p.add_argument(
        "--no-control", action="store_true", help="skip the control: random adapters of the same size and density"
    )
    p.add_argument("--judge-url", help="OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1)")
    p.add_argument("--judge-model", help="model name for the judge")
    p.add_argument("--judge-n", type=int, default=d.judge_n, help="features to send to the judge")
    p.add_argument("--seed", type=int, default=d.seed)
    return p


def config_from_args(args):
    from mechdiff.config_checks import ConfigError
    from mechdiff.studies.features import FeaturesConfig

    try:
        return FeaturesConfig(
            n_traces=args.n_traces,
            split=args.split,
            top_k=args.top_k,
            n_random=args.n_random,
            batch_size=args.batch_size,
            max_batch_gib=args.max_batch_gib,
            min_examples=args.min_examples,
            pages_per_category=args.pages_per_category,
            max_reasoning_pages=args.max_reasoning_pages,
            neurons=not args.no_neurons,
            control=not args.no_control,
            judge_url=args.judge_url,
            judge_model=args.judge_model,
            judge_n=args.judge_n,
            store=args.store,
            fresh=args.fresh,
            seed=args.seed,
        )
    except ConfigError as err:  # the flags carry the config's field names
        raise cli.UsageError(err.as_flag()) from None
    except ValueError as err:
        raise cli.UsageError(str(err)) from None


def parse_args(argv):
    """The checked flags (a :class:`~mechdiff.cli.UsageError` before any model is loaded)."""
    args = build_parser().parse_args(argv)
    cli.check_pair_options(args)
    args.config = config_from_args(args)
    if args.adapters is None:
        if args.pair != "organism":
            raise cli.UsageError(
                f"--adapters DIR is required for --pair {args.pair} (the shipped adapters are the "
                "organism's); or --adapters random:1024 for a dry run"
            )
        from mechdiff.adapters.formats import SHIPPED_DIR

        args.adapters = str(SHIPPED_DIR)
    spec = args.adapters
    if spec.startswith("random:"):
        if not spec.split(":", 1)[1].isdigit() or int(spec.split(":", 1)[1]) < 1:
            raise cli.UsageError(f"--adapters {spec}: random:D_SAE needs a whole number D_SAE >= 1")
    elif not Path(spec).is_dir():
        raise cli.UsageError(
            f"--adapters {spec}: no such folder; train adapters (python -m mechdiff.adapters) "
            "or pass --adapters random:1024 for a dry run"
        )
    return args


def load_adapters(pair, spec: str, seed: int):
    """Adapters from a folder, or ``random:D_SAE``: random sparse ones (for dry runs)."""
    from mechdiff.adapters.formats import load_adapted
    from mechdiff.adapters.transcoder import AdaptedModel

    if spec.startswith("random:"):
        from attribution.synthetic import randomize_adapters

        adapted = AdaptedModel.from_pair(pair, d_sae=int(spec.split(":", 1)[1]))
        adapted.to(pair.target.cfg.device)
        return randomize_adapters(adapted, seed=seed, density=0.03)
    return load_adapted(pair, spec)


def main(argv=None) -> dict:
    cli.offline_environment()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    from mechdiff.studies.features import run

    torch.manual_seed(args.seed)
    print("[features] load the pair and the adapters", flush=True)
    pair = cli.load_pair_from_args(args)
    adapted = load_adapters(pair, args.adapters, args.seed)
    result = run(pair, adapted, args.config, pair_name=args.pair, adapters_name=cli.shown_path(args.adapters))
    result.write(args.out)
    print(f"[features] wrote {args.out}/ in {result.data['seconds']:.0f} s", flush=True)
    return result.summary()


if __name__ == "__main__":
    cli.run(main)
