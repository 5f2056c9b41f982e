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
 4. ``hesitation`` ``python -m analyses.hesitation --pair smollm2 --ranking gradient`` on
                   small settings into ``OUT/hesitation/`` (a graph per prompt costs about 3 min
                   here, so features are ranked by activation x gradient; one graph is built);
 5. ``lora``       a rank-1 LoRA trained on the same traces, and its gain recovered;
 6. ``cost``       one adapter training step, one LoRA step, one attribution graph and the
                   activation x gradient ranking (per prompt, batches of 8), timed and measured
                   (peak memory) on SmolLM2 and on the organism in the same way.

Then ``OUT/summary.json``, ``OUT/report.md`` (the organism's numbers beside the real model's) and
figures (HTML + PNG). Example (shell)::

    python -m analyses.real --help
    python -m analyses.real --stages behaviour --n-problems 20     # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from mechdiff import cli
from mechdiff.measure import peak_rss_gib

STAGES = ("behaviour", "sweep", "adapters", "hesitation", "lora", "cost")
ROOT = Path(__file__).resolve().parents[1]
ORGANISM = {
    "behaviour": ROOT / "mechdiff/adapters/shipped/organism/adapters.json",  # its study's outputs
    "hesitation": ROOT / "figures/hesitation/summary.json",
    "lora": ROOT / "figures/lora/summary.json",
}


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m analyses.real", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_pair_options(p, default_pair="smollm2")
    p.add_argument("--out", default="figures/real", help="output folder (default figures/real)")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="stages to run")
    p.add_argument("--redo", nargs="*", default=[], choices=STAGES, help="rerun these even if done")
    p.add_argument(
        "--n-problems", type=int, default=48, help="held-out problems for behaviour, adapters and LoRA (default 48)"
    )
    p.add_argument("--n-eval-traces", type=int, default=32, help="held-out traces for faithfulness")
    p.add_argument("--d-sae", type=int, help="adapter features per layer (default: the sweep's pick, else 512)")
    p.add_argument("--k", type=int, help="TopK active features per token (default: the sweep's pick, else 8)")
    p.add_argument("--adapter-steps", type=int, default=60, help="adapter training steps (default 60)")
    p.add_argument("--adapter-lr", type=float, default=1e-3, help="adapter peak learning rate (default 1e-3)")
    p.add_argument(
        "--adapter-resample",
        type=int,
        default=0,
        metavar="N",
        help="re-initialise adapter features dead for N steps, every N steps, over the first 60%% of "
        "training (default 0: never; 250 steps at 512:16 without it left 33%% dead)",
    )
    p.add_argument(
        "--autocast",
        choices=("bfloat16", "float16"),
        help="mixed-precision forwards for adapter training (bfloat16: ~1.6x faster on AVX512-bf16 CPUs)",
    )
    p.add_argument(
        "--sweep",
        default="512:8,1024:8,512:16",
        help="width:k candidates for the sweep stage, comma-separated (default 512:8,1024:8,512:16)",
    )
    p.add_argument("--sweep-steps", type=int, default=30, help="training steps per sweep candidate (default 30)")
    p.add_argument("--lora-steps", type=int, default=200, help="LoRA training steps (default 200)")
    p.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA peak learning rate (default 1e-3)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="traces per training step (default 4: 11 GB for an adapter step; 8 takes 17.5 GB)",
    )
    p.add_argument(
        "--hesitation-args",
        default="--ranking gradient --n-prompts 24 --n-problems 32 "
        "--n-traces 8 --n-dose-problems 12 --random-draws 2 --max-feature-nodes 256",
        help="extra flags for analyses.hesitation (quoted)",
    )
    p.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    args = p.parse_args(argv)
    cli.check_pair_options(args)
    if not (args.pair == "smollm2" or args.pair.startswith("smollm2:")):
        raise cli.UsageError(f"--pair {args.pair}: this study is SmolLM2's (smollm2 or smollm2:RUN)")
    for flag in (
        "n_problems",
        "n_eval_traces",
        "d_sae",
        "k",
        "adapter_steps",
        "lora_steps",
        "batch_size",
        "sweep_steps",
    ):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise cli.UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if args.adapter_resample < 0:
        raise cli.UsageError(f"--adapter-resample {args.adapter_resample}: must be >= 0 (0: never)")
    if not args.adapter_lr > 0:
        raise cli.UsageError(f"--adapter-lr {args.adapter_lr}: must be > 0")
    args.sweep_candidates = _sweep_candidates(args.sweep)
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


def main(argv=None) -> dict:
    cli.offline_environment()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage:
        return _run_stage(args, out)
    for stage in args.stages:
        if (out / f"{stage}.json").is_file() and stage not in args.redo and not _stale(args, out, stage):
            print(f"[real] {stage}: done ({out / f'{stage}.json'})", flush=True)
            continue
        print(f"[real] {stage} ...", flush=True)
        subprocess.run(
            [sys.executable, "-m", "analyses.real", *(argv if argv is not None else sys.argv[1:]), "--stage", stage],
            check=True,
        )
    summary = write_summary(out)
    print(json.dumps(summary, indent=1))
    return summary


def _run_stage(args, out: Path) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = {
        "behaviour": stage_behaviour,
        "sweep": stage_sweep,
        "adapters": stage_adapters,
        "hesitation": stage_hesitation,
        "lora": stage_lora,
        "cost": stage_cost,
    }[args.stage](args, out)
    result["stage_seconds"] = round(time.perf_counter() - start, 1)
    result["stage_args"] = {k: v for k, v in vars(args).items() if k not in ("stage", "redo", "stages")}
    result["stage_peak_rss_gib"] = round(peak_rss_gib(), 2)
    (out / f"{args.stage}.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def _pair(args):
    return cli.load_pair_from_args(args)


def _cache(args) -> Path:
    from mechdiff.real import smollm2

    run = args.pair.partition(":")[2] or "default"
    return smollm2.cache_dir() / "study" / run


def stage_behaviour(args, out: Path) -> dict:
    from mechdiff.workloads import for_pair

    pair = _pair(args)
    work = for_pair(pair)
    problems = work.problems(args.n_problems, "test")
    report = {}
    for name, model in (("base", pair.base), ("target", pair.target)):
        report[name] = work.evaluate(model, problems, progress=True)
        report[name]["accuracy_hesitation_banned"] = work.evaluate(model, problems, ban_hesitation=True)["accuracy"]
    return report


def adapter_shape(args, out: Path) -> tuple[int, int, str]:
    """(width, k, where they came from): the flags if given, else the sweep's pick, else 512:8."""
    picked = _read_json(out / "sweep.json").get("picked") or {}
    d_sae = args.d_sae or picked.get("d_sae") or 512
    k = args.k or picked.get("k") or 8
    given = "flags" if args.d_sae and args.k else ("sweep" if picked else "default")
    return d_sae, k, given


def _adapter_recipe(args, d_sae: int, k: int, steps: int):
    from mechdiff.training.adapter_objective import AdapterRecipe

    return AdapterRecipe(
        d_sae=d_sae,
        k=k,
        steps=steps,
        batch_size=args.batch_size,
        lr=args.adapter_lr,
        n_traces=steps * args.batch_size,
        n_val=16,
        checkpoint_every=25,
        validate_every=0,
        autocast=args.autocast,
        resample_every=args.adapter_resample,
    )


def adapter_folder(args, out: Path) -> Path:
    """The cache folder of the adapters this recipe trains: named by width, k, steps, lr, resampling and autocast, so a
    new recipe never reuses (or overwrites) another recipe's adapters."""
    d_sae, k, _ = adapter_shape(args, out)
    mixed = f"-{args.autocast}" if args.autocast else ""
    resample = f"-r{args.adapter_resample}" if args.adapter_resample else ""
    return _cache(args) / f"adapters-{d_sae}-k{k}-s{args.adapter_steps}-lr{args.adapter_lr:g}{resample}{mixed}"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _stale(args, out: Path, stage: str) -> bool:
    """A stage whose JSON was made with other adapters than the ones these flags train is rerun."""
    if stage in ("adapters", "hesitation"):
        done = _read_json(out / f"{stage}.json")
        return done.get("adapters_folder", done.get("folder")) != str(adapter_folder(args, out))
    return False


def stage_sweep(args, out: Path) -> dict:
    """Each ``--sweep`` candidate trained ``--sweep-steps`` steps on the same traces (same seed),
    then scored on 16 held-out traces: per-layer FVE, KL to the fine-tune, dead fraction (no firing
    over the last ``dead_window`` steps) and seconds per step. The pick: the lowest held-out KL among
    candidates whose worst layer's FVE and dead fraction are within 0.02 and 0.1 of the best
    candidate's (a short run's ranking, so near-ties go to the cheaper, narrower candidate)."""
    from mechdiff.training.adapter_objective import train_adapters
    from mechdiff.workloads import for_pair

    pair = _pair(args)
    work = for_pair(pair)
    rows = []
    for d_sae, k in args.sweep_candidates:
        recipe = _adapter_recipe(args, d_sae, k, args.sweep_steps)
        traces, val = work.traces(recipe.n_traces, "train"), work.traces(recipe.n_val, "validation")
        start = time.process_time()
        _, history = train_adapters(
            pair,
            recipe,
            out_dir=_cache(args) / f"sweep-{d_sae}-k{k}-s{args.sweep_steps}",
            traces=traces,
            val_traces=val,
        )
        last = history[-1]
        fve = [last[f"val_fve_{i}"] for i in range(pair.base.cfg.n_layers)]
        rows.append(
            {
                "d_sae": d_sae,
                "k": k,
                "steps": args.sweep_steps,
                "val_kl": last["val_kl"],
                "fve_min": min(fve),
                "fve_mean": sum(fve) / len(fve),
                "fve_per_layer": fve,
                "dead_fraction": last["dead"],
                "l0": last["l0"],
                "seconds_per_step": last["seconds"] / max(1, last["step"]),
                "cpu_seconds": time.process_time() - start,
            }
        )
    return {"candidates": rows, "picked": _pick(rows), "rule": stage_sweep.__doc__.split("The pick: ")[1].strip()}


def _pick(rows: list[dict]) -> dict:
    best_fve = max(r["fve_min"] for r in rows)
    best_dead = min(r["dead_fraction"] for r in rows)
    near = [r for r in rows if r["fve_min"] >= best_fve - 0.02 and r["dead_fraction"] <= best_dead + 0.1]
    pick = min(near, key=lambda r: (r["val_kl"], r["d_sae"]))
    return {"d_sae": pick["d_sae"], "k": pick["k"]}


def stage_adapters(args, out: Path) -> dict:
    from mechdiff.adapters.formats import load_adapted, save_adapters
    from mechdiff.evaluation.faithfulness import adapter_report
    from mechdiff.training.adapter_objective import train_adapters
    from mechdiff.workloads import for_pair

    pair = _pair(args)
    work = for_pair(pair)
    d_sae, k, shape_from = adapter_shape(args, out)
    recipe = _adapter_recipe(args, d_sae, k, args.adapter_steps)
    folder = adapter_folder(args, out)
    history_file = folder.parent / f"{folder.name}-history.json"
    if not (folder / "adapters.json").is_file():
        traces, val = work.traces(recipe.n_traces, "train"), work.traces(recipe.n_val, "validation")
        adapted, history = train_adapters(
            pair, recipe, out_dir=folder.parent / f"{folder.name}-ckpt", traces=traces, val_traces=val
        )
        history_file.write_text(json.dumps(history))
        save_adapters(adapted, folder, recipe=recipe.to_dict())
    adapted = load_adapted(pair, folder)
    report = adapter_report(
        pair, adapted, work.traces(args.n_eval_traces, "test"), work.problems(args.n_problems, "test"), progress=True
    )
    history = json.loads(history_file.read_text())
    return {
        "folder": str(folder),
        "recipe": recipe.flat_dict(),
        "shape_from": shape_from,
        "report": report,
        "train_last": history[-1],
        "train_seconds": history[-1]["seconds"],
    }


def stage_hesitation(args, out: Path) -> dict:
    from analyses import hesitation

    extra = args.hesitation_args.split()
    summary = hesitation.main(
        ["--pair", args.pair, "--adapters", str(adapter_folder(args, out)), "--out", str(out / "hesitation"), *extra]
    )
    return {
        "summary": str(out / "hesitation" / "summary.json"),
        "adapters_folder": str(adapter_folder(args, out)),
        "n_hesitation_features": summary["n_hesitation_features"],
        "hesitation_fraction": summary["hesitation_fraction"],
    }


def stage_lora(args, out: Path) -> dict:
    from mechdiff.lora import TrainConfig, evaluate_lora, load_lora, train_lora

    pair = _pair(args)
    behaviour = json.loads((out / "behaviour.json").read_text()) if (out / "behaviour.json").is_file() else {}
    reference = {k: behaviour[k] for k in ("base", "target") if k in behaviour}
    folder = _cache(args) / "lora_r1"
    cfg = TrainConfig(
        rank=1,
        steps=args.lora_steps,
        batch_size=args.batch_size,
        lr=args.lora_lr,
        n_traces=args.lora_steps * args.batch_size,
        checkpoint_every=25,
        log_every=1,
    )
    if (folder / "adapter_model.safetensors").is_file():
        lora = load_lora(folder, pair)
    else:
        lora, _ = train_lora(pair, cfg, folder)
    training = json.loads((folder / "training.json").read_text())
    config = TrainConfig.from_dict(training["config"]).flat_dict()  # saved flat or nested: the flat form
    stats = evaluate_lora(
        pair,
        {"lora_r1": lora},
        args.n_problems,
        progress=True,
        reference=reference if args.n_problems == behaviour.get("base", {}).get("n_problems") else None,
    )
    return {
        "folder": str(folder),
        "config": config,
        "train_seconds": training["seconds"],
        "train_seconds_per_step": training["seconds"] / config["steps"],
        "eval": stats,
    }


def stage_cost(args, out: Path) -> dict:
    """Each measurement in a fresh process, so peak memory belongs to it alone."""
    result, d_sae = {}, adapter_shape(args, out)[0]
    for pair in ("organism", args.pair):
        for what in ("adapter_step", "lora_step", "attribution_graph", "gradient_ranking"):
            code = (
                f"import json; from analyses.real_cost import measure; "
                f"print(json.dumps(measure({pair!r}, {what!r}, {d_sae}, {args.batch_size}, {args.threads})))"
            )
            done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
            result.setdefault("smollm2" if pair != "organism" else "organism", {})[what] = json.loads(
                done.stdout.strip().splitlines()[-1]
            )
    return result


def write_summary(out: Path) -> dict:
    """``summary.json`` (the issue's keys), ``report.md`` and the figures from the stages' JSON."""
    from analyses import real_report

    return real_report.write(out, ORGANISM)


if __name__ == "__main__":
    cli.run(main)
