"""The rank-1 LoRA lens on the organism, end to end: ``python -m analyses.lora``.

Loads the shipped LoRAs (ranks 1, 2, 4, 8; ``--retrain`` trains them afresh), then writes into
``figures/lora/``: behaviour and gain recovered by rank; per-layer and module x layer ablation KL;
MLP-only against attention-only adapters; LoRA adapters against MLP neurons on a label-based
monosemanticity score with top contexts; a BatchTopK SAE on the L x 7 state (SAELens folder
``sae/``) with FVU, L0, dead latents, label distributions and a category donut. Outputs: one
interactive HTML (offline: it loads the figures tree's one shared plotly.js) and one PNG per
figure, ``index.html`` showing them all, ``summary.json``, ``contexts.json`` and ``report.md``.
About 3-5 minutes on 2 CPU cores with the shipped LoRAs.

The study is :func:`mechdiff.studies.lora.run` (see it for the steps); this script parses, calls
it and writes ``--out``.
"""

from __future__ import annotations

import argparse
import sys

from mechdiff import cli


def build_parser() -> argparse.ArgumentParser:
    from mechdiff.studies.lora import LoraStudyConfig

    d = LoraStudyConfig()
    p = argparse.ArgumentParser(
        prog="python -m analyses.lora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="figures/lora", help="output folder (default figures/lora)")
    p.add_argument("--ranks", type=int, nargs="+", default=list(d.ranks), help="LoRA ranks (first: analysed)")
    p.add_argument("--n-problems", type=int, default=d.n_problems, help="held-out test problems for behaviour")
    p.add_argument("--n-holdout", type=int, default=d.n_holdout, help="validation traces for ablations/monosemanticity")
    p.add_argument(
        "--n-sae-traces", type=int, default=d.n_sae_traces, help="train traces whose LoRA states train the SAE"
    )
    p.add_argument("--sae-samples", type=int, default=d.sae_samples, help="SAE training samples")
    p.add_argument("--sae-k", type=float, default=d.sae_k, help="BatchTopK k (default 16)")
    p.add_argument("--sae-expansion", type=int, default=d.sae_expansion, help="SAE expansion factor (default 8)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="top activations per unit for monosemanticity")
    p.add_argument(
        "--retrain",
        action="store_true",
        help="train the LoRAs instead of loading the shipped organism's (another pair's are always trained)",
    )
    p.add_argument("--steps", type=int, default=d.steps, help="training steps with --retrain (or if not shipped)")
    p.add_argument("--n-traces", type=int, default=d.n_traces, help="training traces with --retrain")
    p.add_argument("--kl-weight", type=float, default=d.kl_weight, help="distillation KL weight with --retrain")
    p.add_argument("--runs", default="runs", help="where trained LoRAs are written")
    cli.add_pair_options(p)
    p.set_defaults(threads=1)  # tiny models: 2 threads on oversubscribed cores are many times slower
    return p


def config_from_args(args):
    """The :class:`~mechdiff.studies.lora.LoraStudyConfig` the flags name; a bad one is a one-line usage error."""
    from dataclasses import fields

    from mechdiff.config_checks import ConfigError
    from mechdiff.studies.lora import LoraStudyConfig

    try:
        return LoraStudyConfig(**{f.name: getattr(args, f.name) for f in fields(LoraStudyConfig)})
    except ConfigError as err:  # the flags carry the config's field names
        if err.field == "ranks":
            raise cli.UsageError(f"--ranks {' '.join(map(str, args.ranks))}: {err.reason}") from None
        raise cli.UsageError(err.as_flag()) from None


def main(argv=None) -> dict:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    cli.offline_environment()
    if args.base or args.target:  # a base/target pair given without --pair custom
        args.pair = "custom"
    cli.check_pair_options(args)
    cfg = config_from_args(args)
    from mechdiff.studies.lora import run

    pair = cli.load_pair_from_args(args)
    result = run(pair, cfg, settings=vars(args))  # the summary records every flag, as it always has
    result.write(args.out)
    print(result.headline())
    return result.summary()


if __name__ == "__main__":
    cli.run(main)
