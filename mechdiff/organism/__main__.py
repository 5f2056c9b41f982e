"""``python -m mechdiff.organism {train,eval}``: reproduce and measure the shipped model organism."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

for _var, _val in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("WANDB_MODE", "disabled")):
    os.environ.setdefault(_var, _val)

from mechdiff.models import ORGANISM_DIR  # noqa: E402


def _train(args) -> None:
    from mechdiff.organism.train import Recipe, train_organism

    recipe = Recipe(seed=args.seed).scaled(args.scale)
    base, target = train_organism(args.out, args.work, recipe)
    print(f"wrote {base} and {target}")


def _eval(args) -> None:
    from mechdiff.evaluation.behaviour import evaluate
    from mechdiff.models import load_pair
    from mechdiff.organism import corpus

    opts = {"device": args.device, "dtype": args.dtype}
    pair = load_pair("organism", **opts) if args.models is None else load_pair(
        "custom", base=str(Path(args.models) / "base"), target=str(Path(args.models) / "target"), **opts)
    problems = corpus.problems(args.n, split="test", seed=args.seed)
    report = {}
    for name, model in (("base", pair.base), ("target", pair.target)):
        stats = evaluate(model, pair.tokenizer, problems, progress=not args.json)
        banned = evaluate(model, pair.tokenizer, problems, ban_hesitation=True)
        report[name] = {**stats, "accuracy_hesitation_banned": banned["accuracy"]}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, stats in report.items():
            print(name, "  ".join(f"{k}={v:.3g}" for k, v in stats.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mechdiff.organism",
        description="The built-in model organism: a tiny base model that answers three-operand "
                    "additions directly, and its full fine-tune on reasoning traces with 'wait'.")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train base then target from the recipe (resumable)")
    tr.add_argument("--out", default=str(ORGANISM_DIR), help="where the two HF folders go (default: the shipped ones)")
    tr.add_argument("--work", default="runs/organism", help="checkpoint folder; rerun to resume after a kill")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--scale", type=float, default=1.0, help="multiply steps and data (e.g. 0.05 for a quick look)")
    ev = sub.add_parser("eval", help="greedy behaviour of base and target on held-out test problems")
    ev.add_argument("--n", type=int, default=500, help="number of test problems (default 500)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--models", default=None, help="a folder with base/ and target/ (default: shipped)")
    ev.add_argument("--json", action="store_true", help="print one JSON object {base: ..., target: ...}")
    ev.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    ev.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    args = parser.parse_args(argv)
    {"train": _train, "eval": _eval}[args.command](args)


if __name__ == "__main__":
    main(sys.argv[1:])
