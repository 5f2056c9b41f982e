"""The hesitation study, unchanged, on every organism of the family.

    python -m analyses.organisms                          # the shipped family -> figures/organisms/
    python -m analyses.organisms --organism mine=runs/organism-mine --n-prompts 24   # add your own

An organism folder holds ``base/`` and ``target/`` (``python -m mechdiff.organism train --out DIR``)
and ``adapters/`` (``python -m mechdiff.adapters train --pair custom --base DIR/base --target
DIR/target --out DIR/adapters``). Writes ``--out``: ``summary.json`` ({"organisms": {NAME: {"recipe",
"behaviour", "adapters", "hesitation", "targets"}}}), ``report.md``, the headline figure (HTML + PNG)
and each organism's full hesitation study in ``--out/NAME/``. The study is
:func:`mechdiff.studies.organisms.run`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mechdiff import cli


def build_parser() -> argparse.ArgumentParser:
    from mechdiff.studies.hesitation import HesitationConfig

    d = HesitationConfig()
    p = argparse.ArgumentParser(
        prog="python -m analyses.organisms", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--organism",
        action="append",
        default=[],
        metavar="NAME=FOLDER",
        help="an organism folder (base/, target/, adapters/) to add to the shipped family",
    )
    p.add_argument("--only", nargs="+", default=None, help="run only these organisms (names)")
    p.add_argument("--out", default="figures/organisms", help="output folder")
    p.add_argument("--n-prompts", type=int, default=d.n_prompts, help="hesitation prompts per organism")
    p.add_argument("--n-problems", type=int, default=d.n_problems, help="test problems for generation")
    p.add_argument("--n-dose-problems", type=int, default=d.n_dose_problems)
    p.add_argument("--n-traces", type=int, default=d.n_traces, help="held-out traces for faithfulness")
    p.add_argument("--ranking", choices=("graph", "gradient"), default=d.ranking)
    p.add_argument("--random-draws", type=int, default=d.random_draws)
    p.add_argument("--samples", type=int, default=4, help="sampled replies per problem (error detection)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for those replies")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if visible)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=d.seed)
    return p


def main(argv=None) -> dict:
    cli.offline_environment()
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from mechdiff.studies.hesitation import HesitationConfig
    from mechdiff.studies.organisms import Organism, OrganismsConfig, family, run

    try:
        cfg = OrganismsConfig(
            hesitation=HesitationConfig(
                n_prompts=args.n_prompts,
                n_problems=args.n_problems,
                n_dose_problems=args.n_dose_problems,
                n_traces=args.n_traces,
                ranking=args.ranking,
                random_draws=args.random_draws,
                seed=args.seed,
            ),
            n_behaviour_problems=args.n_problems,
            samples=args.samples,
            temperature=args.temperature,
        )
    except ValueError as err:
        raise cli.UsageError(str(err)) from None
    organisms = family()
    for item in args.organism:
        name, sep, folder = item.partition("=")
        root = Path(folder)
        if not sep or not name:
            raise cli.UsageError(f"--organism {item}: expected NAME=FOLDER")
        missing = [p for p in ("base/config.json", "target/config.json", "adapters") if not (root / p).exists()]
        if missing:
            raise cli.UsageError(f"--organism {item}: {root} has no {', '.join(missing)}")
        organisms[name] = Organism(name, root, root / "adapters")
    if args.only:
        unknown = sorted(set(args.only) - set(organisms))
        if unknown:
            raise cli.UsageError(f"--only {unknown}: not organisms here ({sorted(organisms)})")
        organisms = {k: v for k, v in organisms.items() if k in args.only}
    args.device = cli.check_device(args.device)
    cli.apply_threads(args)
    result = run(organisms, cfg, device=args.device)
    result.write(args.out)
    print(f"[organisms] wrote {args.out}/", flush=True)
    return result.summary()


if __name__ == "__main__":
    cli.run(main)
