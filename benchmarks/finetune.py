"""SmolLM2 fine-tune cost: one training step beside its floor, and the plain full-logits path.

    python -m benchmarks.finetune [--batch 8] [--repeats 3] [--threads 1] [--autocast bfloat16]
                                  [--checkpoint] [--json] [--out FILE]

On one batch of the fine-tune's chat traces (:func:`mechdiff.real.chat.traces`, as
:func:`mechdiff.real.finetune.finetune` draws them), starting from SmolLM2-135M-Instruct (what the
fine-tune starts from; cost does not depend on training):

* ``step_s``: a full training step of the fine-tune (:func:`mechdiff.real.finetune.response_loss`:
  the reply tokens' next-token CE chunked over positions; backward into all weights; gradient
  clipping; AdamW step over all 135M weights);
* ``floor_s``: one forward and backward of the model on that batch (the same loss, no clipping,
  no optimiser, no recomputation), interleaved with the steps;
* ``baseline_step_s``: the same step with the loss from full ``[batch, pos, vocab]`` logits (the
  model's own forward and ``next_token_ce``), the plain path.

``loss_abs_diff`` is the two paths' loss on the same batch before any update (the same loss, to
1e-4). ``--checkpoint`` has both paths' steps recompute each decoder layer in backward
(``Recipe(checkpoint=True)``, transformers' gradient checkpointing: the same loss and gradients,
less memory); ``--autocast bfloat16`` runs both paths' forwards in mixed precision, as
``Recipe(autocast="bfloat16")`` does. Each path runs in a fresh subprocess, so ``peak_gib`` and
``baseline_peak_gib`` are its own: the peak resident memory of that process through its first step
(model, gradients and AdamW's two moments included), read before the floor first runs. Needs the
``[real]`` extra.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from benchmarks import peak_rss_gib
from benchmarks.isolated import add_path_options, fast_and_plain
from benchmarks.step_report import compare, emit, print_table, time_after_warm_up
from mechdiff.cli import offline_environment, run


def measure(args, path: str) -> dict:
    """In this process: the step of ``path`` ("fast" or "plain"); with "fast" also the floor."""
    import torch

    from mechdiff.padding import pad
    from mechdiff.real import chat, smollm2
    from mechdiff.real.finetune import Recipe, response_loss, training_mode
    from mechdiff.training.loop import adamw
    from mechdiff.training.losses import next_token_ce, next_token_keep

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = smollm2.load_hf()
    recipe = Recipe(batch_size=args.batch, autocast=args.autocast, checkpoint=args.checkpoint)
    rows = chat.traces(tokenizer, args.batch, "train", recipe.seed, recipe.slip_prob, recipe.recheck_prob)[:]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loaded_gib = peak_rss_gib()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(list(params), lr=1e-9)  # as training builds it; tiny: the timed steps barely move the weights

    def plain_loss():
        tokens, mask = pad(rows["input_ids"], pad_id)
        keep = next_token_keep(mask, torch.tensor(rows["prompt_len"]))
        with torch.autocast("cpu", dtype=getattr(torch, args.autocast or "float32"), enabled=args.autocast is not None):
            logits = model(input_ids=tokens, attention_mask=mask.long()).logits
        return next_token_ce(logits.float(), tokens, keep)

    def loss():
        return response_loss(model, rows, pad_id, args.autocast) if path == "fast" else plain_loss()

    def step():
        with training_mode(model, recipe):
            opt.zero_grad(set_to_none=True)
            loss().backward()
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            opt.step()

    def floor():  # never recomputed: the floor is the plain forward and backward
        with training_mode(model, replace(recipe, checkpoint=False)):
            opt.zero_grad(set_to_none=True)
            response_loss(model, rows, pad_id, args.autocast).backward()

    with torch.no_grad():
        loss_before_update = float(loss())
    out = {
        "path": path,
        "loss": loss_before_update,
        "tokens": int(sum(len(r) - p for r, p in zip(rows["input_ids"], rows["prompt_len"], strict=True))),
        "positions": max(len(r) for r in rows["input_ids"]),
        "threads": torch.get_num_threads(),
        "loaded_gib": loaded_gib,
    }
    timed = {"step": step, "floor": floor} if path == "fast" else {"step": step}
    out.update(time_after_warm_up(step, timed, args.repeats))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.finetune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8, help="chats per training step (default 8, the recipe's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per path (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--autocast", default=None, choices=["bfloat16", "float16"], help="mixed precision for the forwards"
    )
    parser.add_argument("--checkpoint", action="store_true", help="recompute each layer in backward (less memory)")
    add_path_options(parser)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--batch, --repeats and --threads must be >= 1")
    paths = fast_and_plain("benchmarks.finetune", args, argv, measure)
    if paths is None:  # a child: it printed its path's JSON
        return
    fast, plain = paths
    result = {
        "model": "SmolLM2-135M-Instruct (the fine-tune's start)",
        "batch": args.batch,
        "positions": fast["positions"],
        "reply_tokens": fast["tokens"],
        "threads": fast["threads"],
        "autocast": args.autocast,
        "checkpoint": args.checkpoint,
        **compare(fast, plain),
    }
    if emit(result, args.out, args.json):
        return
    title = (
        f"SmolLM2 fine-tune: batch {args.batch} x {result['positions']} positions, {result['threads']} thread(s), "
        f"autocast {args.autocast}, checkpoint {args.checkpoint}"
    )
    rows = [
        ("fine-tune step (chunked CE)", result["step_s"], result["peak_gib"]),
        ("floor: model fwd+bwd", result["floor_s"], None),
        ("baseline step (full logits)", result["baseline_step_s"], result["baseline_peak_gib"]),
    ]
    print_table(title, rows, result)


if __name__ == "__main__":
    offline_environment()
    run(main)
