"""``python -m mechdiff.organism {train,eval}``: train organisms of the family, and measure them.

Examples::

    # the shipped organism's recipe, into a folder of your own (never over the shipped weights)
    python -m mechdiff.organism train --out runs/organism
    # another member of the family: another hesitation word, 3-digit operands, another seed
    python -m mechdiff.organism train --out runs/organism-hmm --hesitation-word hmm --width 3 --seed 1
    # an organism whose hesitation needs error detection: slips at random, no re-checks
    python -m mechdiff.organism train --out runs/organism-errdet --slip-prob 0.6 --recheck-prob 0 --seed 2
    python -m mechdiff.organism eval --json                                   # the shipped pair
    python -m mechdiff.organism eval --pair custom --base runs/organism-hmm/base \\
        --target runs/organism-hmm/target --samples 4 --temperature 1.0 --json
"""

from __future__ import annotations

import argparse
import json
import sys

from mechdiff import cli


def _train(args) -> None:
    from mechdiff.config_checks import ConfigError
    from mechdiff.organism.task import TaskSpec
    from mechdiff.organism.train import Recipe, train_organism

    try:
        spec = TaskSpec(
            hesitation_words=tuple(args.hesitation_word or ("wait",)),
            n_operands=args.operands,
            width=args.width,
            slip_prob=args.slip_prob,
            slip_columns=tuple(args.slip_columns) if args.slip_columns else None,
            recheck_prob=args.recheck_prob,
        )
        if not 0 < args.scale:
            raise ValueError(f"--scale must be > 0, not {args.scale}")
        recipe = Recipe(seed=args.seed, task=spec).scaled(args.scale)
    except ConfigError as err:  # TaskSpec's fields are the train flags
        raise cli.UsageError(err.as_flag()) from None
    except ValueError as err:
        raise cli.UsageError(str(err)) from None
    cli.apply_threads(args)
    work = args.work or f"{args.out}/checkpoints"
    base, target = train_organism(args.out, work, recipe)
    print(f"wrote {base} and {target}")


def _eval(args) -> None:
    from mechdiff.evaluation.behaviour import behaviour_report
    from mechdiff.workloads import for_pair

    if args.n < 1 or args.samples < 1 or args.temperature < 0:
        raise cli.UsageError("--n and --samples must be >= 1 and --temperature >= 0")
    cli.check_pair_options(args)
    pair = cli.load_pair_from_args(args)
    work = for_pair(pair)
    problems = work.problems(args.n, split="test", seed=args.seed)
    report = {
        name: behaviour_report(
            work,
            model,
            problems,
            samples=args.samples,
            temperature=args.temperature,
            seed=args.seed,
            progress=not args.json,
        )
        for name, model in (("base", pair.base), ("target", pair.target))
    }
    report["task"] = pair.meta.get("task")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name in ("base", "target"):
            print(name, "  ".join(f"{k}={v:.3g}" for k, v in report[name].items() if isinstance(v, float)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mechdiff.organism", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train base then target from the recipe (resumable)")
    tr.add_argument(
        "--out", required=True, help="folder for base/ and target/ (HF folders); rerun with the same --out to resume"
    )
    tr.add_argument("--work", default=None, help="checkpoint folder (default: OUT/checkpoints)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--scale", type=float, default=1.0, help="multiply steps and data (e.g. 0.05 for a quick look)")
    tr.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    g = tr.add_argument_group("task (defaults: the shipped organism's)")
    g.add_argument(
        "--hesitation-word",
        action="append",
        metavar="WORD",
        help="the word written before a correction or re-check (repeat for several; default wait)",
    )
    g.add_argument("--operands", type=int, default=2, help="operands per problem (2..10)")
    g.add_argument("--width", type=int, default=4, help="digits per operand (1..9)")
    g.add_argument(
        "--slip-prob",
        type=float,
        default=0.8,
        help="chance that a hard step (a carry comes in) is first written with the carry forgotten",
    )
    g.add_argument("--slip-columns", type=int, nargs="+", default=None, help="the columns that may slip (default: all)")
    g.add_argument(
        "--recheck-prob",
        type=float,
        default=0.08,
        help="chance that a correct step is re-checked (hesitation word, the same step again)",
    )
    ev = sub.add_parser("eval", help="behaviour of base and target on held-out test problems")
    cli.add_pair_options(ev)
    ev.add_argument("--n", type=int, default=500, help="number of test problems (default 500)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument(
        "--samples",
        type=int,
        default=1,
        help="sampled replies per problem besides the greedy one (with --temperature > 0)",
    )
    ev.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 (default): greedy only; > 0: also sample --samples replies per problem",
    )
    ev.add_argument("--json", action="store_true", help="print one JSON object {base: ..., target: ...}")
    return parser


def main(argv: list[str] | None = None) -> None:
    cli.offline_environment()
    args = build_parser().parse_args(argv)
    {"train": _train, "eval": _eval}[args.command](args)


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
