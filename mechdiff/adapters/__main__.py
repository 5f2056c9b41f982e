"""``python -m mechdiff.adapters {train,eval,sweep}``: train, measure and sweep transcoder adapters.

Examples (the organism pair, shipped with the package)::

    python -m mechdiff.adapters train --out runs/adapters --threads 1   # the shipped recipe (~5-10 min)
    python -m mechdiff.adapters eval --json                         # the shipped adapters
    python -m mechdiff.adapters eval --adapters runs/adapters --json
    python -m mechdiff.adapters sweep --l1 1e-3 3e-3 1e-2 --steps 400 --out runs/adapters-sweep

SmolLM2 and its fine-tune (``python -m mechdiff.real train`` first; ``--pair smollm2:RUN`` for
another run): the same commands on its chat traces, test problems and chat grader::

    python -m mechdiff.adapters train --pair smollm2 --out runs/adapters-smollm2 --n-traces 4096
    python -m mechdiff.adapters eval --pair smollm2 --adapters runs/adapters-smollm2 --n-problems 100
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

from mechdiff import cli
from mechdiff.adapters.transcoder import SHIPPED_DIR
from mechdiff.config_checks import ConfigError
from mechdiff.training.adapter_objective import AdapterRecipe, LossWeights
from mechdiff.training.loop import TrainingInterrupted

_RECIPE_FLAGS = {  # flag -> (recipe field, type, help)
    "steps": (int, "optimiser steps"), "d_sae": (int, "features per layer"),
    "activation": (str, "relu (default) or topk"), "k": (int, "active features per token for topk"),
    "backbone": (str, "hybrid backbone: target (default) or base"),
    "enc_bias_init": (float, "initial encoder bias (negative: features start rarely active)"),
    "l1_warmup_frac": (float, "share of the steps over which the L1 weight ramps up from 0"),
    "resample_every": (int, "re-initialise dead/always-on features every N steps (0: never)"),
    "resample_until": (float, "share of the steps during which resampling happens"),
    "dense_threshold": (float, "firing frequency above which a feature counts as always-on"),
    "dead_window": (int, "steps without firing after which a feature counts as dead"),
    "k_aux": (int, "dead features that the AuxK part (--aux) trains per token"),
    "batch_size": (int, "traces per step"), "lr": (float, "peak learning rate (AdamW)"),
    "warmup_frac": (float, "share of the steps of linear LR warmup"),
    "grad_clip": (float, "gradient-norm clip"), "n_traces": (int, "training traces"),
    "data": (str, "organism training data: corpus (its traces) or target (sampled from the target)"),
    "n_val": (int, "validation traces"), "validate_every": (int, "validate every N steps (0: at the end)"),
    "checkpoint_every": (int, "write a resumable checkpoint every N steps (default 200; Ctrl-C "
                              "writes one too)"),
    "seed": (int, "seed"),
    "bridge_rows": (float, "share of each batch's rows that run the bridges (default 1: all, exact; "
                           "less: an unbiased, noisier estimate for less time)"),
}  # fmt: skip
_WEIGHT_FLAGS = {
    "kl": "weight of KL(target || adapted)",
    "nmse": "weight of the residual NMSE",
    "bridge": "weight of the bridging KL",
    "l1": "weight of the decoder-norm L1",
    "aux": "weight of the AuxK part: dead features fit the residual error (0: off)",
}


def _add_pair_args(p: argparse.ArgumentParser) -> None:
    cli.add_pair_options(p)
    p.add_argument("--dataset", help="datasets.load_from_disk folder with input_ids (non-organism pairs)")


def _add_recipe_args(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    g = p.add_argument_group("recipe (defaults: the shipped organism recipe)")
    g.add_argument("--recipe", help="JSON file with an AdapterRecipe (flags below override it)")
    for name, (typ, text) in _RECIPE_FLAGS.items():
        g.add_argument(f"--{name.replace('_', '-')}", type=typ, help=text)
    for name, text in _WEIGHT_FLAGS.items():
        if name not in skip:
            g.add_argument(f"--{name}", type=float, help=text)
    g.add_argument(
        "--recompute",
        dest="checkpoint",
        action="store_const",
        const=True,
        default=None,
        help="recompute each block in backward: the same gradients in much less memory, about one more forward",
    )


def _recipe(args) -> AdapterRecipe:
    """The recipe the flags describe, checked: a bad value is a :class:`cli.UsageError` naming its flag."""
    try:
        base = AdapterRecipe.from_dict(json.loads(Path(args.recipe).read_text())) if args.recipe else AdapterRecipe()
    except (OSError, ValueError, TypeError) as err:
        raise cli.UsageError(f"--recipe {args.recipe}: {err}") from None
    d = base.to_dict()
    for name in _RECIPE_FLAGS:
        if getattr(args, name, None) is not None:
            d[name] = getattr(args, name)
    if getattr(args, "checkpoint", None):
        d["checkpoint"] = True
    for name in _WEIGHT_FLAGS:
        if isinstance(getattr(args, name, None), (int, float)):
            d["weights"][name] = getattr(args, name)
    d["progress"] = not getattr(args, "quiet", False)
    try:
        return AdapterRecipe(**{**d, "weights": LossWeights(**d["weights"])})
    except ConfigError as err:
        raise cli.UsageError(err.as_flag()) from None


def _pair(args):
    return cli.load_pair_from_args(args)


def _traces(args, n: int, split: str, pair):
    """``--dataset`` rows, else the pair's workload traces (the organism's, or SmolLM2's chat)."""
    if args.dataset:
        from datasets import load_from_disk

        ds = load_from_disk(args.dataset)
        return ds.select(range(min(n, len(ds))))
    from mechdiff.workloads import for_pair

    return for_pair(pair).traces(n, split, seed=args.seed or 0)


def _problems(args, pair):
    if args.dataset or args.n_problems <= 0:
        return None
    from mechdiff.workloads import for_pair

    return for_pair(pair).problems(args.n_problems, "test", seed=args.seed or 0)


def _training_traces(args, recipe: AdapterRecipe, pair):
    """``(traces, val_traces)`` for train_adapters; ``None`` leaves its default (organism data)."""
    from mechdiff.workloads import for_pair

    traces = _traces(args, recipe.n_traces, "train", pair) if args.dataset else None
    work = for_pair(pair)
    if args.dataset or work.name == "organism":
        return traces, None
    if recipe.data != "corpus":
        raise cli.UsageError(
            f"--data {recipe.data} samples organism prompts; with --pair "
            f"{args.pair} use --data corpus (the {work.name} workload's traces)"
        )
    return work.traces(recipe.n_traces, "train", recipe.seed), work.traces(recipe.n_val, "validation")


def _work_dir(args, recipe: AdapterRecipe, out: Path, pair) -> Path:
    """Checkpoints: ``--work``, or a folder keyed by the recipe and pair (no stale resumes)."""
    if getattr(args, "work", None):
        return Path(args.work)
    # How often to checkpoint, whether a bar shows and whether blocks are recomputed change nothing
    # trained: keyed at their defaults (the flat form the recipe had before its loop settings were
    # nested: old runs' folders resume)
    keyed = {**recipe.flat_dict(), "checkpoint_every": 200, "progress": True, "checkpoint": False}
    if keyed.get("bridge_rows") == 1.0:  # the exact default keys as before the option: runs resume
        del keyed["bridge_rows"]
    parts = [keyed, pair.meta.get("base_name"), pair.meta.get("target_name"), args.dataset]
    if pair.meta.get("dtype", "float32") != "float32":  # float32 keys stay as before: runs resume
        parts.append(pair.meta["dtype"])  # a bf16 run must not resume float32 checkpoints
    key = json.dumps(parts, sort_keys=True, default=str)
    return Path("runs") / "adapters-ckpt" / f"{out.name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def train_and_save(args, recipe: AdapterRecipe, out: Path, pair=None):
    """Train with ``recipe``, save to ``out``; returns (adapted, history, pair)."""
    from mechdiff import distributed
    from mechdiff.adapters.formats import save_adapters
    from mechdiff.training.adapter_objective import train_adapters

    pair = pair or _pair(args)
    traces, val_traces = _training_traces(args, recipe, pair)
    work = _work_dir(args, recipe, out, pair)
    adapted, history = train_adapters(
        pair,
        recipe,
        out_dir=work,
        traces=traces,
        val_traces=val_traces,
        target_cache=getattr(args, "target_cache", None),
    )
    last = {k: v for k, v in history[-1].items() if isinstance(v, (int, float))} if history else {}
    if distributed.rank() == 0:  # under torchrun every rank holds the same adapters; one writes them
        save_adapters(adapted, out, recipe=recipe.to_dict(), metrics={"train_last": last})
    return adapted, history, pair


def _train(args) -> None:
    recipe = args.checked_recipe
    out = Path(args.out)
    adapted, history, pair = train_and_save(args, recipe, out)
    (out / "history.json").write_text(json.dumps(history))
    print(f"wrote {out} ({history[-1]['seconds']:.0f} s of training)" if history else f"wrote {out}")
    if args.eval:
        args.adapters = str(out)
        _eval(args, pair=pair, adapted=adapted)


def _eval(args, pair=None, adapted=None) -> dict:
    from mechdiff.adapters.formats import load_adapted, read_config, save_adapters
    from mechdiff.evaluation.faithfulness import adapter_report, check_targets

    pair = pair or _pair(args)
    adapted = adapted or load_adapted(pair, args.adapters)
    traces = _traces(args, args.n_eval_traces, "test", pair)
    report = adapter_report(pair, adapted, traces, _problems(args, pair), progress=not args.json)
    if "gain_recovered" in report:
        report["targets"] = check_targets(report)
    report["adapters"] = str(args.adapters)
    if args.write_metrics:
        meta = read_config(args.adapters)
        save_adapters(
            adapted, args.adapters, recipe=meta.get("recipe"), metrics={**meta.get("metrics", {}), "eval": report}
        )
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_report(report)
    return report


def _print_report(report: dict) -> None:
    for name in ("base", "hybrid", "adapted", "target"):
        r = report[name]
        fve = " ".join(f"{v:.3f}" for v in r["fve_per_layer"])
        line = f"{name:8s} fve [{fve}]  kl {r['kl_to_target']:.4f}  top1 {r['top1_agreement']:.3f}  ce {r['ce']:.3f}"
        if "accuracy" in r:
            line += f"  acc {r['accuracy']:.3f}  len {r['mean_response_tokens']:.1f}  wait {r['hesitations_per_response']:.2f}"
        if "l0_per_layer" in r:
            line += f"  L0 {[round(v, 1) for v in r['l0_per_layer']]}  dead {r['dead_fraction']:.3f}"
        print(line)
    for key, t in report.get("targets", {}).items():
        print(f"  {key:20s} {t['value']:.4g} (target {t['target']}) {'ok' if t['met'] else 'MISSED'}")


def _sweep(args) -> None:
    from mechdiff.evaluation.faithfulness import adapter_report

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pair = _pair(args)
    traces, problems = _traces(args, args.n_eval_traces, "test", pair), _problems(args, pair)
    rows, work_root = [], args.work
    for l1 in args.l1:
        recipe = _recipe(args)
        recipe.weights.l1 = l1
        run = Path(args.runs) / f"l1_{l1:g}"
        args.work = None if work_root is None else str(Path(work_root) / run.name)
        adapted, history, pair = train_and_save(args, recipe, run, pair)
        rep = adapter_report(pair, adapted, traces, problems)
        a = rep["adapted"]
        row = {
            "l1": l1,
            "mean_l0": a["mean_l0"],
            "l0_per_layer": a["l0_per_layer"],
            "dead_fraction": a["dead_fraction"],
            "mean_fve": a["mean_fve"],
            "fve_per_layer": a["fve_per_layer"],
            "kl_to_target": a["kl_to_target"],
            "kl_hybrid": rep["hybrid"]["kl_to_target"],
            "top1_agreement": a["top1_agreement"],
            "accuracy": a.get("accuracy"),
            "gain_recovered": rep.get("gain_recovered"),
            "length_ratio": rep.get("length_ratio"),
            "train_seconds": history[-1]["seconds"],
        }
        rows.append(row)
        print(json.dumps(row))
        result = {
            "recipe": recipe.to_dict(),
            "reference": {k: rep[k] for k in ("base", "hybrid", "target")},
            "rows": rows,
        }
        (out / "sweep.json").write_text(json.dumps(result, indent=1))
    plot_sweep(rows, out)
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.html'}, {out / 'sweep.png'}")


def plot_sweep(rows: list[dict], out: Path) -> None:
    """L0 against faithfulness (FVE, KL) and accuracy: plotly HTML and a PNG."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from mechdiff.visualization.figures import new_figure, write_html

    rows = sorted(rows, key=lambda r: r["mean_l0"])
    x = [r["mean_l0"] for r in rows]
    panels = [
        ("mean_fve", "mean residual FVE"),
        ("kl_to_target", "KL(target || adapted)"),
        ("accuracy", "accuracy (greedy, test)"),
    ]
    labels = [f"L1 {r['l1']:g}" for r in rows]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[t for _, t in panels])
    for col, (key, title) in enumerate(panels, 1):
        y = [r[key] if r[key] is not None else math.nan for r in rows]
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", text=labels, name=title), 1, col)
        fig.update_xaxes(title_text="mean L0 per layer", type="log", row=1, col=col)
    fig.update_layout(
        title="Transcoder adapters on the organism: the L1 sweep", showlegend=False, width=1200, height=420
    )
    write_html(fig, out / "sweep.html")
    f = new_figure(figsize=(13, 3.8))
    axes = f.subplots(1, 3)
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.plot(x, [r[key] if r[key] is not None else math.nan for r in rows], "o-")
        for xi, r in zip(x, rows, strict=True):
            ax.annotate(f"{r['l1']:g}", (xi, r[key] or 0), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xscale("log")
        ax.set_xlabel("mean L0 per layer")
        ax.set_title(title)
    f.suptitle("Transcoder adapters on the organism: the L1 sweep (labels: L1 weight)")
    f.tight_layout()
    f.savefig(out / "sweep.png", dpi=130)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mechdiff.adapters",
        description="Transcoder adapters: a sparse ReLU (or TopK) MLP beside each base MLP of the "
        "hybrid (target attention/embeddings/norms + base MLPs), trained so the adapted "
        "model matches the target: KL + residual NMSE + bridging KL + decoder-norm L1. "
        f"Shipped organism adapters: {SHIPPED_DIR}.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "train",
        help="train adapters and save them (SAELens-compatible folder)",
        description="Train adapters with the recipe (defaults: the shipped one); "
        "checkpoints go to --work, so a killed run resumes.",
    )
    _add_pair_args(p)
    _add_recipe_args(p)
    p.add_argument(
        "--target-cache",
        metavar="DIR",
        help="store the target's pass over the training traces here once and read it each step "
        "instead of running the target (the same loss; reused by every run over the same traces)",
    )
    p.add_argument("--out", required=True, help="folder to write the adapters to")
    p.add_argument("--work", help="checkpoint folder (default: runs/adapters-ckpt/<OUT name>-<recipe hash>)")
    p.add_argument("--eval", action="store_true", help="evaluate after training (as `eval`)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    e = sub.add_parser(
        "eval",
        help="faithfulness, sparsity and behaviour vs base/hybrid/target",
        description="Teacher-forced faithfulness on held-out traces and greedy "
        "generation on test problems, for base, hybrid, adapted and target.",
    )
    e.add_argument("--n-eval-traces", type=int, default=512, help="held-out traces (default 512)")
    e.add_argument("--n-problems", type=int, default=500, help="test problems (0: no generation)")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.add_argument("--write-metrics", action="store_true", help="store the report in adapters.json")
    _add_pair_args(e)
    e.add_argument("--adapters", default=str(SHIPPED_DIR), help="adapters folder (default: shipped)")
    e.add_argument("--seed", type=int, default=0, help="seed of the held-out traces and problems")
    s = sub.add_parser(
        "sweep",
        help="train one run per L1 weight; write L0 vs faithfulness/accuracy",
        description="Writes OUT/sweep.json, OUT/sweep.html (plotly) and OUT/sweep.png.",
    )
    _add_pair_args(s)
    _add_recipe_args(s, skip=("l1",))
    s.add_argument("--l1", type=float, nargs="+", required=True, help="L1 weights to train")
    s.add_argument(
        "--out",
        default="runs/adapters-sweep",
        help="output folder for sweep.json/html/png (default runs/adapters-sweep)",
    )
    s.add_argument("--runs", default="runs/adapters-sweep", help="where each run's adapters go")
    s.add_argument("--work", help="checkpoint folder per run (default: keyed by recipe under runs/)")
    s.add_argument("--n-eval-traces", type=int, default=256, help="held-out traces per evaluation")
    s.add_argument("--n-problems", type=int, default=500, help="test problems per evaluation")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    cli.offline_environment()
    _check(args)
    if args.command == "train":
        args.adapters, args.n_eval_traces, args.n_problems = args.out, 512, 500
        args.json, args.write_metrics = False, args.eval
    try:
        {"train": _train, "eval": _eval, "sweep": _sweep}[args.command](args)
    except TrainingInterrupted as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        raise SystemExit(130) from None


def _check(args) -> None:
    """Every flag checked before any model loads or anything is written."""
    cli.check_pair_options(args)
    if args.command in ("train", "sweep"):
        args.checked_recipe = _recipe(args)
        for l1 in args.l1 if args.command == "sweep" else []:  # train: checked with the recipe
            if not l1 >= 0:
                raise cli.UsageError(f"--l1 {l1}: must be a number >= 0")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise cli.UsageError(f"--out {args.out}: exists and is not a folder")
    if args.command in ("eval", "sweep"):
        if args.n_eval_traces < 1:
            raise cli.UsageError(f"--n-eval-traces {args.n_eval_traces}: must be >= 1")
        if args.n_problems < 0:
            raise cli.UsageError(f"--n-problems {args.n_problems}: must be >= 0")
    if args.command == "eval" and not Path(args.adapters).is_dir():
        raise cli.UsageError(f"--adapters {args.adapters}: no such folder")
    if args.dataset and not Path(args.dataset).is_dir():
        raise cli.UsageError(f"--dataset {args.dataset}: no such folder")


if __name__ == "__main__":
    cli.run(main)
