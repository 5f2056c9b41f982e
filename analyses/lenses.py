"""Which lens finds the mechanism? Six model-diffing lenses scored against the organism's ground truth.

    python -m analyses.lenses                                   # the shipped organism
    python -m analyses.lenses organism=mechdiff/organism/shipped other=runs/organism-b \\
        --adapters other=runs/organism-b/adapters

Each ORGANISM is NAME=FOLDER, the folder holding base/ and target/ (HF folders). Its hesitation
word comes from the pair's workload (:func:`mechdiff.workloads.for_pair`).
Lenses (:mod:`mechdiff.lenses`), each with its own ranking of hesitation units:
transcoder_graph / transcoder_gradient (trained adapters: --adapters NAME=DIR), lora_sae (a LoRA and
the SAE on its state: --lora NAME=DIR, --lora-sae NAME=DIR), crosscoder (trained here on the pair's
train traces), activation_difference and kl. For the shipped organism the shipped adapters, LoRA
(rank 1) and figures/lora/sae are the defaults; a lens without its artefacts is reported as skipped.

Scores (mechdiff.lenses.scoring): n_units; precision and recall by one label rule; necessity
(ablate while generating on test problems, against 5 random draws of the same count); steering
(share of the gap in P(hesitation) to the lens's full model closed by adding the units);
train_cpu_s and score_cpu_s (time.process_time) and each phase's memory, train_peak_gib and score_peak_gib
(mechdiff.lenses.cost: the peak RSS rise over what was live at the phase's start). Artefacts reused,
not trained here (adapters, LoRA, the SAE on the LoRA state), are scored as given; their training is
measured only with --retrain adapters,lora,lora-sae (or all): each is trained again here with the
recipe saved beside it, into a temporary folder, measured, compared with the given one (weight cosine,
final metrics: train_parts) and discarded (mechdiff.lenses.retrain). Without it, train_cpu_s is the
wall seconds recorded when they were trained, labelled so by train_cpu_s_source and train_s_kind
("wall"), and the SAE on the LoRA state (no record) leaves it unknown. Agreement (activation
correlation of the lenses' units on the same tokens). Nothing is chosen on the test problems.
Writes --out: summary.json, report.md, lenses x scores and agreement figures (HTML + PNG).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mechdiff.cli import UsageError, offline_environment, run, shown_path
from mechdiff.lenses import scoring

RETRAIN = ("adapters", "lora", "lora-sae")  # reused artefacts --retrain can train again to measure
LENSES = ("transcoder_graph", "transcoder_gradient", "lora_sae", "crosscoder", "activation_difference", "kl")
REPO = Path(__file__).resolve().parents[1]
SCORES = ("n_units", "precision", "recall", "necessity_cut", "random_cut", "steering", "train_cpu_s", "score_cpu_s")
COSTS = (
    "train_cpu_s_source",
    "train_s_kind",
    "train_peak_gib",
    "score_peak_gib",
    "train_rss_peak_gib",
    "score_rss_peak_gib",
)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m analyses.lenses", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "organisms",
        nargs="*",
        metavar="NAME=FOLDER",
        help="organisms to score (default: organism=<the shipped organism>)",
    )
    for flag, what in (
        ("adapters", "transcoder adapters"),
        ("lora", "LoRA (PEFT)"),
        ("lora-sae", "SAE on the LoRA state"),
    ):
        p.add_argument(
            f"--{flag}", action="append", default=[], metavar="NAME=DIR", help=f"an organism's {what} folder"
        )
    p.add_argument("--lenses", nargs="+", default=list(LENSES), choices=LENSES, help="lenses to run (default all)")
    p.add_argument("--out", default="figures/lenses", help="output folder")
    p.add_argument(
        "--n-label-problems", type=int, default=150, help="validation problems whose replies carry the labels"
    )
    p.add_argument("--n-prompts", type=int, default=60, help="hesitation prompts (validation) each lens ranks with")
    p.add_argument("--n-problems", type=int, default=200, help="test problems for necessity")
    p.add_argument("--random-draws", type=int, default=5, help="random unit sets per necessity")
    p.add_argument("--share", type=float, default=0.8, help="share each lens's set must cover")
    p.add_argument("--max-feature-nodes", type=int, default=256, help="features visited per attribution graph")
    p.add_argument("--crosscoder-layer", type=int, default=None, help="residual site (default: the middle layer)")
    p.add_argument("--crosscoder-d-sae", type=int, default=512, help="crosscoder latents")
    p.add_argument("--crosscoder-k", type=int, default=16, help="BatchTopK: mean active latents per token")
    p.add_argument("--crosscoder-steps", type=int, default=4000, help="training steps (batch 256)")
    p.add_argument("--crosscoder-traces", type=int, default=1500, help="train traces the crosscoder reads")
    p.add_argument(
        "--retrain",
        type=_retrain_set,
        default=frozenset(),
        metavar="SET",
        help="measure the training cost of reused artefacts by training them again here with their saved "
        f"recipes (scores use the given ones): a comma-separated subset of {','.join(RETRAIN)}, or all",
    )
    p.add_argument(
        "--retrain-lora-sae", action="store_true", help="the same as --retrain lora-sae (kept for old commands)"
    )
    p.add_argument(
        "--retrain-steps",
        type=int,
        default=None,
        help="smoke tests only: retrain adapters and LoRA with this many steps, not their recipes'",
    )
    p.add_argument(
        "--retrain-traces",
        type=int,
        default=None,
        help="smoke tests only: retrain adapters and LoRA on this many traces, not their recipes'",
    )
    p.add_argument(
        "--lora-sae-traces", type=int, default=2000, help="train traces for that SAE (analyses.lora's default)"
    )
    p.add_argument(
        "--lora-sae-samples", type=int, default=1_500_000, help="its training samples (analyses.lora's default)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = p.parse_args(argv)
    args.retrain = frozenset(args.retrain | ({"lora-sae"} if args.retrain_lora_sae else set()))
    return args


def _retrain_set(text: str) -> frozenset[str]:
    items = {t.strip() for t in text.split(",") if t.strip()}
    if items == {"all"}:
        return frozenset(RETRAIN)
    if not items or items - set(RETRAIN):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated subset of {','.join(RETRAIN)}, or all")
    return frozenset(items)


def _pairs(items: list[str], flag: str) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise UsageError(f"{flag} {item!r}: expected NAME=FOLDER")
        out[name] = Path(folder)
    return out


def organisms(args) -> dict[str, dict]:
    """``{name: {"folder", "adapters", "lora", "lora_sae"}}`` from the arguments, checked."""
    from mechdiff.adapters.formats import SHIPPED_DIR
    from mechdiff.models import ORGANISM_DIR

    folders = _pairs(args.organisms, "organism") or {"organism": ORGANISM_DIR}
    extra = {k: _pairs(getattr(args, k), f"--{k.replace('_', '-')}") for k in ("adapters", "lora", "lora_sae")}
    out = {}
    for name, folder in folders.items():
        for part in ("base", "target"):
            if not (folder / part / "config.json").is_file():
                raise UsageError(f"organism {name}: {folder}/{part} is not an HF model folder")
        shipped = folder.resolve() == ORGANISM_DIR.resolve()
        defaults = (
            {
                "adapters": SHIPPED_DIR,
                "lora": SHIPPED_DIR.parent / "lora_r1",
                "lora_sae": REPO / "figures" / "lora" / "sae",
            }
            if shipped
            else {}
        )
        out[name] = {"folder": folder, **{k: extra[k].get(name, defaults.get(k)) for k in extra}}
    for k, given in extra.items():
        if unknown := set(given) - set(out):
            raise UsageError(f"--{k.replace('_', '-')} names {sorted(unknown)}, not among the organisms {sorted(out)}")
    return out


def score_organism(name: str, where: dict, args) -> tuple[dict, dict]:
    from mechdiff.adapters.formats import load_adapted
    from mechdiff.lenses import activation_difference, crosscoder, kl, lora_sae, transcoder
    from mechdiff.lenses.context import LensSettings, lens_context
    from mechdiff.models import ORGANISM_DIR, load_pair

    folder = where["folder"]
    shipped = folder.resolve() == ORGANISM_DIR.resolve()
    pair = (
        load_pair("organism")
        if shipped
        else load_pair("custom", base=str(folder / "base"), target=str(folder / "target"))
    )
    settings = LensSettings(
        args.n_label_problems, args.n_prompts, args.n_problems, args.random_draws, args.share, args.seed
    )
    print(f"[lenses] {name}: replies, labels and prompts", flush=True)
    ctx = lens_context(pair, settings)
    results, skipped = {}, {}
    adapters = where.get("adapters")
    if {"transcoder_graph", "transcoder_gradient"} & set(args.lenses):
        if adapters is None:
            skipped.update({k: "no --adapters given" for k in ("transcoder_graph", "transcoder_gradient")})
        else:
            adapted = load_adapted(pair, adapters)
            acts = transcoder.flat_acts(adapted, ctx.tokens.sequences)
            before = ctx.spec.evaluate(adapted.model, ctx.problems)["hesitations_per_response"]
            for ranking in transcoder.RANKINGS:
                if f"transcoder_{ranking}" in args.lenses:
                    print(f"[lenses] {name}: transcoder adapters, {ranking} ranking", flush=True)
                    results[f"transcoder_{ranking}"] = transcoder.transcoder_lens(
                        ctx, adapted, ranking, acts=acts, before=before, max_feature_nodes=args.max_feature_nodes
                    )
    if "lora_sae" in args.lenses:
        if where.get("lora") is None or where.get("lora_sae") is None:
            skipped["lora_sae"] = "no --lora and --lora-sae given"
        else:
            print(f"[lenses] {name}: rank-1 LoRA + SAE", flush=True)
            results["lora_sae"] = lora_sae.lora_sae_lens(ctx, where["lora"], where["lora_sae"])
    if "crosscoder" in args.lenses:
        print(f"[lenses] {name}: crosscoder ({args.crosscoder_steps} steps)", flush=True)
        layer = pair.n_layers // 2 if args.crosscoder_layer is None else args.crosscoder_layer
        cfg = crosscoder.CrosscoderConfig(
            d_sae=args.crosscoder_d_sae, k=args.crosscoder_k, steps=args.crosscoder_steps, layer=layer, seed=args.seed
        )
        results["crosscoder"] = crosscoder.crosscoder_lens(
            ctx, cfg, n_traces=args.crosscoder_traces, folder=Path(args.out) / name / "crosscoder"
        )
    if "activation_difference" in args.lenses:
        print(f"[lenses] {name}: activation difference", flush=True)
        results["activation_difference"] = activation_difference.activation_difference_lens(ctx)
    if "kl" in args.lenses:
        print(f"[lenses] {name}: token-level KL", flush=True)
        results["kl"] = kl.kl_lens(ctx)
    training = training_costs(ctx, where, results, args)
    truth = ctx.tokens.truth()
    record = {
        "hesitation_word": ctx.spec.word,
        "folder": shown_path(folder, REPO),
        "artefacts": {k: shown_path(v, REPO) for k, v in where.items() if k != "folder" and v is not None},
        "n_label_tokens": int(len(truth)),
        "n_truth_tokens": int(truth.sum()),
        "n_hesitation_prompts": len(ctx.hes),
        "n_test_problems": len(ctx.problems),
        "lenses": {k: {**_scores(r, truth), **training[k]} for k, r in results.items()},
        "skipped": skipped,
    }
    acts = {k: r.acts for k, r in results.items()}
    names = {k: (r.units or ["KL"]) for k, r in results.items()}
    return record, scoring.agreement(
        acts, names, family={k: "transcoder" for k in results if k.startswith("transcoder")}
    )


def _overrides(args) -> dict:
    """The recipe fields --retrain-steps / --retrain-traces replace (smoke tests), or {} (the recipes)."""
    return {k: v for k, v in (("steps", args.retrain_steps), ("n_traces", args.retrain_traces)) if v is not None}


def _retrained_part(r, shown: str) -> dict:
    """A retrained artefact as a train part: its measured cost, recipe and closeness to the given one."""
    what = f"with the recipe saved in {shown}" + (f", except {r.overrides}" if r.overrides else "")
    return {
        **r.cost.to_dict(),
        "kind": "cpu",
        "closeness": r.closeness,
        "overrides": r.overrides,
        "source": f"measured in this run by training the {r.kind} again {what} (data drawn included; "
        "CPU seconds, memory as peak_gib (process) and rise_gib (its own)); the lens scores "
        f"{shown}'s",
    }


def training_costs(ctx, where: dict, results: dict, args) -> dict[str, dict]:
    """Per lens: ``train_cpu_s`` with ``train_cpu_s_source`` (a sentence), ``train_s_kind``
    (``"cpu"`` measured here, ``"wall"`` recorded when a reused artefact was trained, ``"wall+cpu"``
    a sum of both, None unknown or nothing to train), ``train_peak_gib`` / ``train_rss_peak_gib``
    where measured, and ``train_parts`` for reused artefacts (trained again with ``--retrain``:
    :mod:`mechdiff.lenses.retrain`)."""
    from mechdiff.lenses import cost, lora_sae, retrain

    out = {}
    adapters = where.get("adapters")
    adapters_rec = cost.adapters_record(adapters, shown_path(adapters, REPO)) if adapters is not None else None
    retrained_adapters = None
    if "adapters" in args.retrain and adapters is not None and any(k.startswith("transcoder_") for k in results):
        print("[lenses] training the adapters again with their saved recipe, to measure their cost", flush=True)
        retrained_adapters = retrain.retrain_adapters(ctx.pair, adapters, _overrides(args))
    for name, r in results.items():
        if r.train is not None:
            out[name] = {"train_cpu_s": r.train.cpu_s, "train_cpu_s_source": cost.MEASURED, "train_s_kind": "cpu"}
        elif name == "kl":
            out[name] = {"train_cpu_s": None, "train_cpu_s_source": "nothing to train", "train_s_kind": None}
        elif name.startswith("transcoder_") and retrained_adapters is not None:
            c = retrained_adapters.cost
            part = _retrained_part(retrained_adapters, shown_path(adapters, REPO))
            out[name] = {
                "train_cpu_s": c.cpu_s,
                "train_s_kind": "cpu",
                "train_peak_gib": c.rise_gib,
                "train_rss_peak_gib": c.peak_gib,
                "train_cpu_s_source": part["source"] + " (the adapters both transcoder rankings read)",
                "train_parts": {"adapters": {**part, "recorded": adapters_rec and adapters_rec.to_dict()}},
            }
        elif name.startswith("transcoder_"):
            rec = adapters_rec
            out[name] = {
                "train_cpu_s": rec and rec.seconds,
                "train_s_kind": rec and rec.kind,
                "train_cpu_s_source": (rec.source + " (the adapters both transcoder rankings read)")
                if rec
                else f"unknown: no training record in {shown_path(adapters, REPO)}",
                "train_parts": {"adapters": rec and rec.to_dict()},
            }
        elif name == "lora_sae":
            out[name] = _lora_sae_costs(ctx, where, args, cost, lora_sae, retrain)
        else:
            out[name] = {"train_cpu_s": None, "train_cpu_s_source": "not measured", "train_s_kind": None}
    return out


def _lora_sae_costs(ctx, where: dict, args, cost, lora_sae, retrain) -> dict:
    """The LoRA-SAE lens's training: the LoRA's (measured with --retrain lora, else recorded) plus the
    SAE's on its state (measured with --retrain lora-sae, else unknown)."""
    lora_shown, sae_shown = shown_path(where["lora"], REPO), shown_path(where["lora_sae"], REPO)
    lora_rec = cost.lora_record(where["lora"], lora_shown)
    lora_part = lora_rec and lora_rec.to_dict()
    lora_cost = None
    if "lora" in args.retrain:
        print("[lenses] training the LoRA again with its saved recipe, to measure its cost", flush=True)
        again = retrain.retrain_lora(ctx.pair, where["lora"], _overrides(args))
        lora_cost, lora_part = again.cost, {**_retrained_part(again, lora_shown), "recorded": lora_part}
    sae = None
    if "lora-sae" in args.retrain:
        print("[lenses] training an SAE like the LoRA-state SAE, to measure its cost", flush=True)
        sae = lora_sae.retrain_cost(
            ctx, where["lora"], where["lora_sae"], n_traces=args.lora_sae_traces, n_samples=args.lora_sae_samples
        )
    parts = {
        "lora": lora_part,
        "sae": sae
        and {
            **sae.to_dict(),
            "kind": "cpu",
            "source": (
                f"measured in this run by training an SAE like {sae_shown} again "
                f"({args.lora_sae_traces} train traces, {args.lora_sae_samples} samples); CPU seconds, "
                "memory as peak_gib (process) and rise_gib (its own)"
            ),
        },
    }
    why = [] if lora_cost is not None or lora_rec is not None else [f"no training.json in {lora_shown}"]
    if sae is None:
        why.append("the SAE on the LoRA state has no training record (--retrain lora-sae measures it)")
    if why:
        return {
            "train_cpu_s": None,
            "train_s_kind": None,
            "train_cpu_s_source": "unknown: " + "; ".join(why),
            "train_parts": parts,
        }
    if lora_cost is None:
        return {
            "train_cpu_s": lora_rec.seconds + sae.cpu_s,
            "train_s_kind": "wall+cpu",
            "train_parts": parts,
            "train_cpu_s_source": "sum of train_parts: the LoRA's wall seconds recorded when trained "
            "(not CPU) + the SAE's CPU seconds measured in this run",
        }
    peaks = [c.peak_gib for c in (lora_cost, sae) if c.peak_gib is not None]
    rises = [c.rise_gib for c in (lora_cost, sae) if c.rise_gib is not None]
    return {
        "train_cpu_s": lora_cost.cpu_s + sae.cpu_s,
        "train_s_kind": "cpu",
        "train_parts": parts,
        "train_peak_gib": max(rises) if len(rises) == 2 else None,
        "train_rss_peak_gib": max(peaks) if len(peaks) == 2 else None,
        "train_cpu_s_source": "sum of train_parts, both measured in this run: CPU seconds of training the "
        f"LoRA again with the recipe saved in {lora_shown} and of training an SAE like "
        f"{sae_shown} on its state; memory: the larger of the two phases' own peaks",
    }


def _mem(c, key: str):
    return None if c is None else getattr(c, key)


def _scores(r: scoring.LensResult, truth: torch.Tensor) -> dict:
    units = r.units is not None
    rule = scoring.label_scores(r.acts, truth) if units else {}
    need = r.necessity or {}
    return {
        "n_units": len(r.units) if units else None,
        "precision": rule.get("precision"),
        "recall": rule.get("recall") if units else None,
        "necessity_cut": need.get("cut"),
        "random_cut": need.get("random_cut"),
        "steering": (r.steering or {}).get("gain"),
        "train_cpu_s": r.train_cpu_s,
        "score_cpu_s": r.score_cpu_s,
        "train_peak_gib": _mem(r.train, "rise_gib"),
        "score_peak_gib": _mem(r.score, "rise_gib"),
        "train_rss_peak_gib": _mem(r.train, "peak_gib"),
        "score_rss_peak_gib": _mem(r.score, "peak_gib"),
        "units": r.units,
        "unit_precision": rule.get("unit_precision"),
        "n_truth_units": rule.get("n_truth_units"),
        "necessity": r.necessity,
        "steering_detail": r.steering,
        **r.extra,
    }


def main(argv=None) -> dict:
    offline_environment()
    args = parse_args(argv)
    if not 0 < args.share <= 1 or min(args.n_prompts, args.n_problems, args.n_label_problems) < 1:
        raise UsageError("--share must be in (0, 1] and every count >= 1")
    which = organisms(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out, t0, c0 = Path(args.out), time.perf_counter(), time.process_time()
    out.mkdir(parents=True, exist_ok=True)
    summary = {"organisms": {}, "agreement": {}}
    for name, where in which.items():
        summary["organisms"][name], summary["agreement"][name] = score_organism(name, where, args)
    from mechdiff.lenses import cost

    summary.update(
        {
            "label_rule": scoring.RULE,
            "memory_rule": cost.MEMORY_RULE,
            "settings": {k: sorted(v) if isinstance(v, frozenset) else v for k, v in vars(args).items()},
            "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0,
            "peak_rss_gib": cost.process_peak_gib(),
            "machine_ram_gib": cost.machine_ram_gib(),
        }
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    from mechdiff.lenses.report import report_markdown, write_figures

    write_figures(out, summary)
    (out / "report.md").write_text(report_markdown(summary))
    print(f"[lenses] wrote {out}/ in {summary['wall_s']:.0f} s ({summary['cpu_s']:.0f} CPU s)", flush=True)
    return summary


if __name__ == "__main__":
    run(main)
