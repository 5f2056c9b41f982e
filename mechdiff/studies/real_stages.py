"""The stages of the study on SmolLM2, each writing ``OUT/STAGE.json`` (see :mod:`mechdiff.studies.real`).

 1. ``behaviour``  base and fine-tune on held-out problems (the chat grader);
 2. ``sweep``      short adapter trainings of each ``cfg.sweep`` candidate (width, k) on the same
                   traces, scored on held-out traces; picks the width and k for ``adapters``;
 3. ``adapters``   transcoder adapters trained on the fine-tune's traces with the swept (or
                   given) width and k (written under the cache, resumable), their faithfulness
                   and behaviour (base / hybrid / adapted / target);
 4. ``hesitation`` the hesitation study (:func:`mechdiff.studies.hesitation.run`, ``cfg.hesitation``)
                   on those adapters, written to ``OUT/hesitation/``;
 5. ``features``   the feature census of those adapters (:func:`mechdiff.studies.features.run`) on
                   ``cfg.n_census_traces`` held-out chat traces, with the random-adapter and
                   MLP-neuron baselines, written to ``OUT/features/``;
 6. ``lora``       a rank-1 LoRA trained on the same traces, its gain recovered, and the label
                   monosemanticity of its adapters against the MLP neurons (the organism's rule, on
                   the chat's labels);
 7. ``cost``       one adapter training step, one LoRA step, one attribution graph and the
                   activation x gradient ranking, timed and measured (peak memory) on SmolLM2 and on
                   the organism, each in a fresh process (:func:`mechdiff.studies.real_cost.measure`).

:func:`run_stage` runs one in this process; :func:`run_isolated` in a fresh one (``python -m
mechdiff.studies.real_stages STAGE OUT CONFIG_JSON``), so its peak memory is its own.

Example (the stages load SmolLM2 and train for minutes to hours, so they are not run here):
    >>> from mechdiff.studies.real_config import RealConfig
    >>> adapter_recipe(RealConfig(batch_size=2, adapter_resample=5), 16, 2, 10).n_traces
    20
    >>> train = lora_train_config(RealConfig(lora_steps=10, recompute=True))
    >>> train.n_traces, train.checkpoint
    (40, True)
    >>> pick([{"d_sae": 512, "k": 8, "val_kl": 0.03, "fve_min": 0.95, "dead_fraction": 0.3},
    ...       {"d_sae": 1024, "k": 8, "val_kl": 0.01, "fve_min": 0.90, "dead_fraction": 0.3}])
    {'d_sae': 512, 'k': 8}
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mechdiff.measure import peak_rss_gib
from mechdiff.studies.real_config import (
    RealConfig,
    adapter_folder,
    adapter_shape,
    cache_folder,
    read_json,
)

SOURCE_ROOT = Path(__file__).resolve().parents[2]  # holds mechdiff/ and attribution/: stage processes import these


def run_stage(cfg: RealConfig, out: Path, stage: str, progress: bool = True) -> dict:
    """Run ``stage`` here and write ``out/STAGE.json`` (with its seconds, settings and peak memory)."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = STAGE_FUNCTIONS[stage](cfg, out, progress)
    result["stage_seconds"] = round(time.perf_counter() - start, 1)
    result["stage_args"] = cfg.stage_args(out)
    result["stage_peak_rss_gib"] = round(peak_rss_gib(), 2)
    (out / f"{stage}.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def child_environment() -> dict:
    """This environment, with the source tree this process imports first on ``PYTHONPATH``, so a
    stage process runs the same code as its parent."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(SOURCE_ROOT), env.get("PYTHONPATH"))))
    return env


def run_isolated(cfg: RealConfig, out: Path, stage: str, progress: bool = True) -> dict:
    """:func:`run_stage` in a fresh Python process (its output goes to this one's terminal)."""
    command = [sys.executable, "-m", "mechdiff.studies.real_stages", stage, str(out), json.dumps(cfg.to_dict())]
    if not progress:
        command.append("--quiet")
    subprocess.run(command, check=True, env=child_environment())
    return read_json(Path(out) / f"{stage}.json")


def _pair(cfg: RealConfig):
    from mechdiff.models import load_pair

    return load_pair(cfg.pair, device=cfg.device, dtype=cfg.dtype)


def stage_behaviour(cfg: RealConfig, out: Path, progress: bool = True) -> dict:
    from mechdiff.workloads import for_pair

    pair = _pair(cfg)
    work = for_pair(pair)
    problems = work.problems(cfg.n_problems, "test")
    report = {}
    for name, model in (("base", pair.base), ("target", pair.target)):
        report[name] = work.evaluate(model, problems, progress=progress)
        report[name]["accuracy_hesitation_banned"] = work.evaluate(model, problems, ban_hesitation=True)["accuracy"]
    return report


def adapter_recipe(cfg: RealConfig, d_sae: int, k: int, steps: int):
    """The :class:`~mechdiff.training.adapter_objective.AdapterRecipe` of ``steps`` steps at width ``d_sae``, TopK ``k``."""
    from mechdiff.training.adapter_objective import AdapterRecipe

    return AdapterRecipe(
        d_sae=d_sae,
        k=k,
        steps=steps,
        batch_size=cfg.batch_size,
        lr=cfg.adapter_lr,
        n_traces=steps * cfg.batch_size,
        n_val=16,
        checkpoint_every=25,
        validate_every=0,
        autocast=cfg.autocast,
        checkpoint=cfg.recompute,
        resample_every=cfg.adapter_resample,
    )


def lora_train_config(cfg: RealConfig):
    """The rank-1 LoRA's :class:`~mechdiff.lora.TrainConfig`: ``cfg.lora_steps`` steps of ``cfg.batch_size`` traces."""
    from mechdiff.lora import TrainConfig

    return TrainConfig(
        rank=1,
        steps=cfg.lora_steps,
        batch_size=cfg.batch_size,
        lr=cfg.lora_lr,
        n_traces=cfg.lora_steps * cfg.batch_size,
        checkpoint=cfg.recompute,
        checkpoint_every=25,
        log_every=1,
    )


def stage_sweep(cfg: RealConfig, out: Path, progress: bool = True) -> dict:
    """Each ``cfg.sweep`` candidate trained ``cfg.sweep_steps`` steps on the same traces (same seed),
    then scored on 16 held-out traces: per-layer FVE, KL to the fine-tune, dead fraction (no firing
    over the last ``dead_window`` steps) and seconds per step. The pick: the lowest held-out KL among
    candidates whose worst layer's FVE and dead fraction are within 0.02 and 0.1 of the best
    candidate's (a short run's ranking, so near-ties go to the cheaper, narrower candidate)."""
    from mechdiff.training.adapter_objective import train_adapters
    from mechdiff.workloads import for_pair

    pair = _pair(cfg)
    work = for_pair(pair)
    rows = []
    for d_sae, k in cfg.sweep:
        recipe = adapter_recipe(cfg, d_sae, k, cfg.sweep_steps)
        traces, val = work.traces(recipe.n_traces, "train"), work.traces(recipe.n_val, "validation")
        start = time.process_time()
        _, history = train_adapters(
            pair,
            recipe,
            out_dir=cache_folder(cfg) / f"sweep-{d_sae}-k{k}-s{cfg.sweep_steps}",
            traces=traces,
            val_traces=val,
            target_cache=sweep_target_cache(cfg, recipe.n_traces),
        )
        last = history[-1]
        fve = [last[f"val_fve_{i}"] for i in range(pair.base.cfg.n_layers)]
        rows.append(
            {
                "d_sae": d_sae,
                "k": k,
                "steps": cfg.sweep_steps,
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
    return {"candidates": rows, "picked": pick(rows), "rule": stage_sweep.__doc__.split("The pick: ")[1].strip()}


def sweep_target_cache(cfg: RealConfig, n_traces: int) -> Path | None:
    """Where the sweep's candidates share the target's pass over their ``n_traces`` traces (None:
    each runs the target). The cache names the target and the traces it was made from, so a new
    fine-tune or trace set is refused there rather than read."""
    return cache_folder(cfg) / f"sweep-target-pass-{n_traces}" if cfg.sweep_target_cache else None


def pick(rows: list[dict]) -> dict:
    """The sweep's pick among its candidate rows (the rule in :func:`stage_sweep`)."""
    best_fve = max(r["fve_min"] for r in rows)
    best_dead = min(r["dead_fraction"] for r in rows)
    near = [r for r in rows if r["fve_min"] >= best_fve - 0.02 and r["dead_fraction"] <= best_dead + 0.1]
    chosen = min(near, key=lambda r: (r["val_kl"], r["d_sae"]))
    return {"d_sae": chosen["d_sae"], "k": chosen["k"]}


def stage_adapters(cfg: RealConfig, out: Path, progress: bool = True) -> dict:
    from mechdiff.adapters.formats import load_adapted, save_adapters
    from mechdiff.evaluation.faithfulness import adapter_report
    from mechdiff.training.adapter_objective import train_adapters
    from mechdiff.workloads import for_pair

    pair = _pair(cfg)
    work = for_pair(pair)
    d_sae, k, shape_from = adapter_shape(cfg, out)
    recipe = adapter_recipe(cfg, d_sae, k, cfg.adapter_steps)
    folder = adapter_folder(cfg, out)
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
        pair,
        adapted,
        work.traces(cfg.n_eval_traces, "test"),
        work.problems(cfg.n_problems, "test"),
        # the training batch, not 64: on SmolLM2 one batch of 32 traces with its bridging splices
        # held 24 GB (the 49k-token logits of every splice) and was killed on a 24 GB machine
        batch_size=cfg.batch_size,
        progress=progress,
        bridging=cfg.bridging,
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


def trained_adapters(cfg: RealConfig, out: Path) -> Path:
    """The adapters stage's folder for ``cfg``; a clear error when that stage has not run."""
    folder = adapter_folder(cfg, out)
    if not (folder / "adapters.json").is_file():
        raise FileNotFoundError(f"{folder}: no adapters there; run the adapters stage first")
    return folder


def stage_hesitation(cfg: RealConfig, out: Path, progress: bool = True) -> dict:
    from mechdiff.adapters.formats import load_adapted
    from mechdiff.cli import shown_path
    from mechdiff.studies import hesitation

    folder = trained_adapters(cfg, out)
    pair = _pair(cfg)
    steps = out / "hesitation-steps"
    if "hesitation" in cfg.redo:  # a redo recomputes every step, not only the summary
        shutil.rmtree(steps, ignore_errors=True)
    result = hesitation.run(
        pair,
        load_adapted(pair, folder),
        cfg.hesitation,
        progress=progress,
        pair_name=cfg.pair,
        adapters_name=shown_path(folder),
        steps=steps,  # hours at real size: a killed stage resumes at its last finished step
    )
    result.write(out / "hesitation")
    summary = result.summary()
    return {
        "summary": str(out / "hesitation" / "summary.json"),
        "adapters_folder": str(folder),
        "n_hesitation_features": summary["n_hesitation_features"],
        "hesitation_fraction": summary["hesitation_fraction"],
    }


def stage_features(cfg: RealConfig, out: Path, progress: bool = True) -> dict:
    import torch

    from mechdiff.adapters.formats import load_adapted
    from mechdiff.cli import shown_path
    from mechdiff.studies import features

    folder = trained_adapters(cfg, out)
    fcfg = features.FeaturesConfig(
        n_traces=cfg.n_census_traces,
        batch_size=16,
        store=str(folder.parent / f"{folder.name}-census-store-{cfg.n_census_traces}"),
    )
    torch.manual_seed(fcfg.seed)  # the random-adapter control draws from the global generator
    pair = _pair(cfg)
    result = features.run(pair, load_adapted(pair, folder), fcfg, progress=progress, pair_name=cfg.pair,
                          adapters_name=shown_path(folder))  # fmt: skip
    result.write(out / "features")
    s = result.summary()
    return {
        "summary": str(out / "features" / "summary.json"),
        "adapters_folder": str(folder),
        "reasoning_fraction": s["reasoning_fraction"],
        "baselines": {k: v.get("reasoning_fraction") for k, v in s.get("baselines", {}).items()},
    }


def lora_monosemanticity(pair, lora, n_traces: int, top_k: int = 100) -> dict:
    """Label monosemanticity of ``lora``'s adapters and of the MLP neurons by the LoRA study's rule
    (:func:`mechdiff.features.lora_lens.monosemanticity`, top ``top_k`` tokens per unit), with each
    token's label from the pair's workload (on chat: the reply's cut, see
    :mod:`mechdiff.studies.features_labels`)."""

    from mechdiff.features import lora_lens as lens
    from mechdiff.studies.features_labels import census_traces
    from mechdiff.workloads import for_pair

    corpus = census_traces(for_pair(pair), n_traces, "validation", seed=1)
    acts = lens.collect(lora, corpus.rows, batch_size=8)
    _, classes, freq = lens.lora_against_neurons(acts, k=top_k, n_labels=len(corpus.label_names))
    return {
        "classes": classes,
        "chance_precision": float(freq.max()),
        "label_share": dict(zip(corpus.label_names, freq.tolist(), strict=True)),
        "n_traces": n_traces,
        "n_tokens": int(len(acts.labels)),
        "top_k": top_k,
    }


def stage_lora(cfg: RealConfig, out: Path, progress: bool = True) -> dict:
    from mechdiff.lora import TrainConfig, evaluate_lora, load_lora, train_lora

    pair = _pair(cfg)
    behaviour = read_json(out / "behaviour.json")
    reference = {k: behaviour[k] for k in ("base", "target") if k in behaviour}
    folder = cache_folder(cfg) / "lora_r1"
    train_cfg = lora_train_config(cfg)
    if (folder / "adapter_model.safetensors").is_file():
        lora = load_lora(folder, pair)
    else:
        lora, _ = train_lora(pair, train_cfg, folder)
    training = json.loads((folder / "training.json").read_text())
    config = TrainConfig.from_dict(training["config"]).flat_dict()  # saved flat or nested: the flat form
    stats = evaluate_lora(
        pair,
        {"lora_r1": lora},
        cfg.n_problems,
        progress=progress,
        reference=reference if cfg.n_problems == behaviour.get("base", {}).get("n_problems") else None,
    )
    return {
        "folder": str(folder),
        "config": config,
        "train_seconds": training["seconds"],
        "train_seconds_per_step": training["seconds"] / config["steps"],
        "eval": stats,
        "monosemanticity": lora_monosemanticity(pair, lora, cfg.n_monosemanticity_traces)
        if cfg.n_monosemanticity_traces
        else None,
    }


def stage_cost(cfg: RealConfig, out: Path, progress: bool = True) -> dict:
    """Each measurement in a fresh process, so peak memory belongs to it alone."""
    result, d_sae = {}, adapter_shape(cfg, out)[0]
    for pair in ("organism", cfg.pair):
        for what in ("adapter_step", "lora_step", "attribution_graph", "gradient_ranking"):
            code = (
                f"import json; from mechdiff.studies.real_cost import measure; "
                f"print(json.dumps(measure({pair!r}, {what!r}, {d_sae}, {cfg.batch_size}, {cfg.threads})))"
            )
            done = subprocess.run(
                [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=child_environment()
            )
            result.setdefault("smollm2" if pair != "organism" else "organism", {})[what] = json.loads(
                done.stdout.strip().splitlines()[-1]
            )
    return result


STAGE_FUNCTIONS = {
    "behaviour": stage_behaviour,
    "sweep": stage_sweep,
    "adapters": stage_adapters,
    "hesitation": stage_hesitation,
    "features": stage_features,
    "lora": stage_lora,
    "cost": stage_cost,
}


def main(argv: list[str]) -> dict:
    """``STAGE OUT CONFIG_JSON [--quiet]``: what :func:`run_isolated` starts."""
    stage, out, config = argv[:3]
    return run_stage(RealConfig.from_dict(json.loads(config)), Path(out), stage, progress="--quiet" not in argv[3:])


if __name__ == "__main__":
    main(sys.argv[1:])
