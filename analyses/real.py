"""The study on a real pretrained model: ``python -m analyses.real`` (SmolLM2-135M-Instruct).

Needs the ``[real]`` extra (``make real``) and the fine-tune ``python -m mechdiff.real train``
(about an hour on 2 cores; cached outside the repository). Stages, each in its own process so its
peak memory is its own, each skipped when its JSON is already in ``--out`` (``--redo STAGE`` to
rerun one):

 1. ``behaviour``  base and fine-tune on held-out problems (the chat grader);
 2. ``sweep``      short adapter trainings of each ``--sweep`` candidate (width:k) on the same
                   traces, scored on held-out traces; picks the width and k for ``adapters``;
 3. ``adapters``   transcoder adapters trained on the fine-tune's traces with the swept (or
                   given) width and k (written under the cache, resumable), their faithfulness
                   and behaviour (base / hybrid / adapted / target);
 4. ``hesitation`` the hesitation study (``python -m analyses.hesitation`` with
                   ``--hesitation-args``, by default ``--ranking gradient`` on small settings) into
                   ``OUT/hesitation/`` (a graph per prompt costs about 3 min here, so features are
                   ranked by activation x gradient; one graph is built); each finished step is
                   kept in ``OUT/hesitation-steps/``, so a killed stage resumes where it stopped;
 5. ``features``   the feature census of those adapters on ``--n-census-traces`` held-out chat
                   traces (``python -m analyses.features``), with the random-adapter and MLP-neuron
                   baselines, into ``OUT/features/``;
 6. ``lora``       a rank-1 LoRA trained on the same traces, its gain recovered, and LoRA vs
                   MLP-neuron monosemanticity on ``--n-monosemanticity-traces`` held-out traces;
 7. ``cost``       one adapter training step, one LoRA step, one attribution graph and the
                   activation x gradient ranking (per prompt, batches of 8), timed and measured
                   (peak memory) on SmolLM2 and on the organism in the same way.

Then ``OUT/summary.json``, ``OUT/report.md`` (the organism's numbers beside the real model's) and
figures (HTML + PNG). The study is :func:`mechdiff.studies.real.run` (a notebook calls it with a
:class:`~mechdiff.studies.real.RealConfig`); this script parses the flags into that config, calls
it and writes the files. Example (shell)::

    python -m analyses.real --help
    python -m analyses.real --stages behaviour --n-problems 20     # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mechdiff import cli
from mechdiff.studies.real_config import STAGES

# The hesitation stage's flags: the same settings as RealConfig().hesitation (a test checks it).
HESITATION_ARGS = (
    "--ranking gradient --n-prompts 24 --n-problems 32 "
    "--n-traces 8 --n-dose-problems 12 --random-draws 2 --max-feature-nodes 256"
)


def build_parser() -> argparse.ArgumentParser:
    from mechdiff.studies.real_config import RealConfig

    d = RealConfig()
    p = argparse.ArgumentParser(
        prog="python -m analyses.real", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_pair_options(p, default_pair=d.pair)
    p.add_argument("--out", default="figures/real", help="output folder (default figures/real)")
    p.add_argument("--stages", nargs="+", default=list(d.stages), choices=STAGES, help="stages to run")
    p.add_argument("--redo", nargs="*", default=list(d.redo), choices=STAGES, help="rerun these even if done")
    p.add_argument(
        "--n-problems",
        type=int,
        default=d.n_problems,
        help=f"held-out problems for behaviour, adapters and LoRA (default {d.n_problems})",
    )
    p.add_argument("--n-eval-traces", type=int, default=d.n_eval_traces, help="held-out traces for faithfulness")
    p.add_argument("--d-sae", type=int, help="adapter features per layer (default: the sweep's pick, else 512)")
    p.add_argument("--k", type=int, help="TopK active features per token (default: the sweep's pick, else 8)")
    p.add_argument(
        "--adapter-steps", type=int, default=d.adapter_steps, help=f"adapter training steps (default {d.adapter_steps})"
    )
    p.add_argument(
        "--adapter-lr", type=float, default=d.adapter_lr, help=f"adapter peak learning rate (default {d.adapter_lr:g})"
    )
    p.add_argument(
        "--adapter-resample",
        type=int,
        default=d.adapter_resample,
        metavar="N",
        help="re-initialise adapter features dead for N steps, every N steps, over the first 60%% of "
        "training (default 0: never; 250 steps at 512:16 without it left 33%% dead)",
    )
    p.add_argument(
        "--no-bridging",
        dest="bridging",
        action="store_false",
        help="skip the adapters' bridging splices in their faithfulness report (every other metric stays; "
        "on SmolLM2 the splices cost about an hour of CPU: 2 x 29 partial forwards per model)",
    )
    p.add_argument(
        "--autocast",
        choices=("bfloat16", "float16"),
        help="mixed-precision forwards for adapter training (bfloat16: ~1.6x faster on AVX512-bf16 CPUs)",
    )
    p.add_argument(
        "--recompute",
        action="store_true",
        help="adapter and LoRA training recompute each block in backward: the same gradients in under 4 GB "
        "at batch 4 on SmolLM2 (about 10 GB without), for about a third more time per step",
    )
    p.add_argument(
        "--sweep-target-cache",
        action="store_true",
        help="the sweep's candidates read the target's pass from one cache on disk (the same loss, about "
        "14%% less time per step; 2 GB for the default 120 traces) instead of each running the target",
    )
    sweep = ",".join(f"{w}:{k}" for w, k in d.sweep)
    p.add_argument(
        "--sweep",
        default=sweep,
        help=f"width:k candidates for the sweep stage, comma-separated (default {sweep})",
    )
    p.add_argument(
        "--sweep-steps",
        type=int,
        default=d.sweep_steps,
        help=f"training steps per sweep candidate (default {d.sweep_steps})",
    )
    p.add_argument("--lora-steps", type=int, default=d.lora_steps, help=f"LoRA training steps (default {d.lora_steps})")
    p.add_argument("--lora-lr", type=float, default=d.lora_lr, help=f"LoRA peak learning rate (default {d.lora_lr:g})")
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help=f"traces per training step (default {d.batch_size}: 11 GB for an adapter step; 8 takes 17.5 GB)",
    )
    p.add_argument(
        "--n-census-traces",
        type=int,
        default=d.n_census_traces,
        help=f"held-out chat traces for the feature census (default {d.n_census_traces})",
    )
    p.add_argument(
        "--n-monosemanticity-traces",
        type=int,
        default=d.n_monosemanticity_traces,
        help="held-out chat traces for LoRA vs MLP-neuron monosemanticity "
        f"(default {d.n_monosemanticity_traces}; 0: not measured)",
    )
    p.add_argument(
        "--hesitation-args",
        default=HESITATION_ARGS,
        help="flags of python -m analyses.hesitation for the hesitation stage (quoted; default: %(default)r)",
    )
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: one stage in this process
    return p


def parse_args(argv) -> argparse.Namespace:
    """The flags, with the pair options checked (``args.device`` resolved)."""
    args = build_parser().parse_args(argv)
    cli.check_pair_options(args)
    return args


def _sweep_candidates(text: str) -> list[tuple[int, int]]:
    """``"512:8,1024:16"`` -> ``[(512, 8), (1024, 16)]``; a clear usage error otherwise."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        width, _, k = item.partition(":")
        if not (width.isdigit() and k.isdigit() and int(width) >= 1 and 1 <= int(k) <= int(width)):
            raise cli.UsageError(f"--sweep {text!r}: each candidate is WIDTH:K with 1 <= K <= WIDTH (got {item!r})")
        out.append((int(width), int(k)))
    if not out:
        raise cli.UsageError("--sweep: give at least one WIDTH:K candidate")
    return out


def _hesitation_config(text: str, pair: str):
    """``--hesitation-args`` as the hesitation study's config (parsed by ``analyses.hesitation``'s own flags)."""
    from analyses import hesitation

    parser = hesitation.build_parser()

    def refuse(message):
        raise cli.UsageError(f"--hesitation-args {text!r}: {message}")

    parser.error = refuse
    extra = parser.parse_args(["--pair", pair, *text.split()])
    try:
        return hesitation.config_from_args(extra)
    except cli.UsageError as err:
        refuse(str(err))


def config_from_args(args: argparse.Namespace):
    """The :class:`~mechdiff.studies.real.RealConfig` the flags name; a usage error for a bad value."""
    from mechdiff.config_checks import ConfigError
    from mechdiff.studies.real_config import RealConfig

    try:
        return RealConfig(
            pair=args.pair,
            device=args.device,
            dtype=args.dtype,
            threads=args.threads,
            stages=args.stages,
            redo=args.redo,
            n_problems=args.n_problems,
            n_eval_traces=args.n_eval_traces,
            d_sae=args.d_sae,
            k=args.k,
            adapter_steps=args.adapter_steps,
            adapter_lr=args.adapter_lr,
            adapter_resample=args.adapter_resample,
            bridging=args.bridging,
            autocast=args.autocast,
            recompute=args.recompute,
            sweep=_sweep_candidates(args.sweep),
            sweep_steps=args.sweep_steps,
            sweep_target_cache=args.sweep_target_cache,
            lora_steps=args.lora_steps,
            lora_lr=args.lora_lr,
            batch_size=args.batch_size,
            n_census_traces=args.n_census_traces,
            n_monosemanticity_traces=args.n_monosemanticity_traces,
            hesitation=_hesitation_config(args.hesitation_args, args.pair),
        )
    except ConfigError as err:  # the flags carry the config's field names
        raise cli.UsageError(err.as_flag()) from None


def main(argv=None) -> dict:
    cli.offline_environment()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = config_from_args(args)
    out = Path(args.out)
    if args.stage:  # one stage in this process (the library starts its stage processes itself)
        from mechdiff.studies.real_stages import run_stage

        return run_stage(cfg, out, args.stage)
    from mechdiff.studies.real import run

    result = run(cfg, out)
    result.write(out)
    summary = result.summary()
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    cli.run(main)
