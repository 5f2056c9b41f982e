"""``python -m mechdiff.lora train|eval``: train a rank-r LoRA lens and measure what it recovers.

Examples:
    python -m mechdiff.lora train --rank 1 --out runs/lora_r1
    python -m mechdiff.lora train --rank 4 --steps 600 --kl-weight 0.5 --out runs/lora_r4
    python -m mechdiff.lora eval runs/lora_r1 runs/lora_r4 --n-problems 500
    python -m mechdiff.lora eval --shipped 1 2 4 8
    python -m mechdiff.lora --pair smollm2 train --rank 1 --batch-size 8 --out runs/lora_smollm2_r1
    python -m mechdiff.lora --pair smollm2 eval runs/lora_smollm2_r1 --n-problems 100

``--pair smollm2`` (or ``smollm2:RUN``) is SmolLM2 and its fine-tune from ``python -m mechdiff.real
train``: traces, test problems and grader are then its chat ones (:mod:`mechdiff.workloads`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mechdiff import cli

DESCRIPTION = """\
Rank-r LoRA lens (Ward, Riechers & Shai 2025) on a base/target pair (default: the organism).

train: fit a LoRA on q, k, v, o, gate, up, down of every base layer to the target's reasoning
       traces (loss on response tokens only; AdamW, warmup + cosine). Checkpoints go to
       OUT/checkpoint every 100 steps and a rerun with the same --out resumes exactly; the result
       is a PEFT folder (adapter_config.json + adapter_model.safetensors) plus training.json.
eval:  greedy-generate on held-out test problems with base, target and each LoRA and print
       accuracy, response length, hesitations and gain recovered (acc-base)/(target-base) as JSON.
"""


def _train_config(args):
    """The run's :class:`~mechdiff.lora.TrainConfig`, checked before any model loads."""
    from mechdiff.config_checks import ConfigError
    from mechdiff.lora import TrainConfig

    try:
        cfg = TrainConfig(
            rank=args.rank,
            alpha=args.alpha,
            rslora=not args.no_rslora,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            n_traces=args.n_traces,
            kl_weight=args.kl_weight,
            checkpoint=args.recompute,
            seed=args.seed,
            checkpoint_every=args.checkpoint_every,
            **({"modules": tuple(args.modules)} if args.modules else {}),
        )
    except ConfigError as err:
        raise cli.UsageError(err.as_flag()) from None
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise cli.UsageError(f"--out {args.out}: exists and is not a folder")
    if args.n_problems < 0:
        raise cli.UsageError(f"--n-problems {args.n_problems}: must be >= 0")
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mechdiff.lora", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_pair_options(parser)
    parser.set_defaults(threads=1)  # as before: fastest for tiny models on a shared CPU
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser(
        "train",
        help="train a LoRA and write a PEFT folder",
        description="Train a LoRA lens; rerunning with the same --out resumes.",
    )
    tr.add_argument("--out", required=True, help="output folder (checkpoints + PEFT adapter)")
    tr.add_argument("--rank", type=int, default=1, help="LoRA rank r (default 1)")
    tr.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    tr.add_argument("--no-rslora", action="store_true", help="scale alpha/r instead of alpha/sqrt(r)")
    tr.add_argument("--modules", nargs="+", default=None, help="adapted projections (default: q k v o gate up down)")
    tr.add_argument("--steps", type=int, default=1000, help="optimiser steps (default 1000)")
    tr.add_argument("--batch-size", type=int, default=64, help="traces per step (default 64)")
    tr.add_argument(
        "--lr", type=float, default=1e-2, help="peak learning rate (default 1e-2; 3e-2 diverges on the organism)"
    )
    tr.add_argument("--n-traces", type=int, default=20_000, help="training traces (default 20000)")
    tr.add_argument(
        "--kl-weight",
        type=float,
        default=0.0,
        help="0: CE on the trace tokens; 1: KL to the target's logits; between: a mix",
    )
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument(
        "--checkpoint-every",
        type=int,
        default=100,
        help="write a resumable checkpoint every N steps (default 100; Ctrl-C writes one)",
    )
    tr.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    tr.add_argument(
        "--recompute",
        action="store_true",
        help="recompute each block in backward: the same gradients in much less memory, ~1/3 more time",
    )
    tr.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    tr.add_argument("--n-problems", type=int, default=500, help="test problems for the evaluation")

    ev = sub.add_parser(
        "eval",
        help="evaluate base, target and LoRA folders",
        description="Accuracy / length / hesitations / gain recovered as JSON.",
    )
    ev.add_argument("folders", nargs="*", help="PEFT LoRA folders to evaluate")
    ev.add_argument(
        "--shipped",
        type=int,
        nargs="*",
        default=None,
        metavar="RANK",
        help="also evaluate the shipped organism LoRAs of these ranks",
    )
    ev.add_argument("--n-problems", type=int, default=500, help="test problems (default 500)")
    ev.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    cli.offline_environment()
    cli.check_pair_options(args)
    if args.command == "train":
        cfg = _train_config(args)
    else:
        for folder in args.folders:
            if not Path(folder).is_dir():
                raise cli.UsageError(f"{folder}: no such LoRA folder")
        if not args.folders and not args.shipped:
            raise cli.UsageError("give LoRA folders and/or --shipped RANK ...")
        if args.n_problems < 1:
            raise cli.UsageError(f"--n-problems {args.n_problems}: must be >= 1")

    from mechdiff.lora import evaluate_lora, load_lora, shipped_lora, train_lora
    from mechdiff.training.loop import TrainingInterrupted

    pair = cli.load_pair_from_args(args)
    if args.command == "train":
        try:
            lora, history = train_lora(pair, cfg, args.out, resume=not args.no_resume)
        except TrainingInterrupted as stop:
            print(f"stopped: {stop}", file=sys.stderr)
            raise SystemExit(130) from None
        print(json.dumps({"final": history[-1] if history else {}, "out": args.out}, indent=1))
        if not args.no_eval:
            stats = evaluate_lora(pair, {f"lora_r{args.rank}": lora}, args.n_problems, progress=True)
            print(json.dumps(stats, indent=1))
        return 0
    loras = {folder: load_lora(folder, pair) for folder in args.folders}
    if args.shipped and pair.meta.get("workload", "organism") != "organism":
        raise cli.UsageError(f"--shipped LoRAs are the organism's; --pair {args.pair} has none")
    for rank in args.shipped or []:
        lora = shipped_lora(pair, rank)
        if lora is None:
            raise cli.UsageError(f"--shipped {rank}: no shipped LoRA of rank {rank}")
        loras[f"shipped_r{rank}"] = lora
    stats = evaluate_lora(pair, loras, args.n_problems, progress=True)
    text = json.dumps(stats, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    cli.run(main)
