"""LoRA training cost: one training step beside its floor, and the plain full-logits path.

    python -m benchmarks.lora [--pair organism|smollm2] [--batch 4] [--rank 1] [--kl-weight 0]
                              [--checkpoint] [--repeats 3] [--threads 1] [--json] [--out FILE]
                              [--device cuda --dtype bfloat16]

On one right-padded batch of the pair's training traces, with fresh rank-``--rank`` LoRA adapters
on every block of the base model (cost does not depend on training), as
:func:`mechdiff.lora.train_lora` trains them:

* ``step_s``: a full training step of :func:`~mechdiff.training.lora_objective.make_loss_fn`'s
  objective (the LoRA model's forward, with the target's forward too when ``--kl-weight`` > 0;
  next-token CE / KL on the response tokens chunked over positions; backward into the adapters;
  gradient clipping; AdamW step);
* ``floor_s``: one forward and backward of the LoRA model alone on that batch (its unembedding and
  next-token CE on the same tokens, chunked; no target, no optimiser, no recomputation),
  interleaved with the steps;
* ``baseline_step_s``: the same step on the plain path (``fast=False``: full ``[batch, pos, vocab]``
  logits), which is what training ran before the chunked losses.

``loss_abs_diff`` is the two paths' loss on the same batch before any update (the same loss, to
1e-4). ``--checkpoint`` has both paths' steps recompute each block in backward (the same loss and
gradients in less memory, about one more forward). Each path runs in a fresh subprocess, so
``peak_gib`` and ``baseline_peak_gib`` are its own: the peak resident memory of that process
through its first step (models included: base, target and the LoRA's copy), read before the floor
first runs.
``--pair smollm2`` needs the ``[real]`` extra; without a cached fine-tune it loads the base model on
both sides and says so. The SmolLM2 study trains its LoRA at batch 4 with ``--kl-weight 0``.
"""

from __future__ import annotations

import argparse

from benchmarks import peak_rss_gib
from benchmarks.bench_pair import load_bench_pair
from benchmarks.isolated import add_path_options, fast_and_plain
from benchmarks.step_report import compare, emit, pair_header, pair_title, print_table, time_after_warm_up
from mechdiff.cli import add_pair_options, check_pair_options, offline_environment, run


def measure(args, path: str) -> dict:
    """In this process: the step of ``path`` ("fast" or "plain"); with "fast" also the floor."""
    import torch

    from mechdiff.adapters.lora import LoRAConfig, LoRAModel
    from mechdiff.capture import final_hidden
    from mechdiff.training.loop import adamw
    from mechdiff.training.lora_objective import TraceBatches, make_loss_fn
    from mechdiff.training.losses import head_losses, hooked_head
    from mechdiff.workloads import for_pair

    torch.manual_seed(0)
    pair, note = load_bench_pair(args)
    batches = TraceBatches(
        for_pair(pair).traces(args.batch, "test"), args.batch, pad_id=pair.tokenizer.pad_token_id or 0
    )
    device = pair.base.cfg.device
    tokens, keep = (t.to(device) for t in batches.batch(0))
    lora = LoRAModel.from_base(pair.base, LoRAConfig(rank=args.rank))
    loaded_gib = peak_rss_gib()
    target = pair.target if args.kl_weight > 0 else None
    loss_fn = make_loss_fn(
        lora, batches, target=target, kl_weight=args.kl_weight, fast=path == "fast", checkpoint=args.checkpoint
    )
    params = list(lora.layers.parameters())
    opt = adamw(list(params), lr=1e-6)  # as training builds it

    def step():
        loss, _ = loss_fn(0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def floor():
        model = lora.model
        hidden = final_hidden(model, tokens)[:, :-1][keep]
        loss = head_losses([hooked_head(model, hidden)], labels=tokens[:, 1:][keep]).ce[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()

    with torch.no_grad():
        loss_before_update = float(loss_fn(0)[0])
    out = {
        "path": path,
        "loss": loss_before_update,
        "note": note,
        "tokens": int(keep.sum()),
        "positions": tokens.shape[1],
        "threads": torch.get_num_threads(),
        "loaded_gib": loaded_gib,
    }
    timed = {"step": step, "floor": floor} if path == "fast" else {"step": step}
    out.update(time_after_warm_up(step, timed, args.repeats))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_pair_options(parser)
    parser.set_defaults(threads=1)
    parser.add_argument("--batch", type=int, default=4, help="traces per training step (default 4)")
    parser.add_argument("--rank", type=int, default=1, help="LoRA rank (default 1)")
    parser.add_argument(
        "--kl-weight", type=float, default=0.0, help="0: next-token CE on the traces (default); 1: KL to the target"
    )
    parser.add_argument(
        "--checkpoint",
        action="store_true",
        help="both paths' steps recompute each block in backward (TrainConfig(checkpoint=True): less memory)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per path (default 3)")
    add_path_options(parser)
    args = parser.parse_args(argv)
    check_pair_options(args)
    if not 0.0 <= args.kl_weight <= 1.0:
        parser.error(f"--kl-weight must be in [0, 1], not {args.kl_weight}")
    paths = fast_and_plain("benchmarks.lora", args, argv, measure)
    if paths is None:  # a child: it printed its path's JSON
        return
    fast, plain = paths
    result = {
        **pair_header(args, fast),
        "rank": args.rank,
        "kl_weight": args.kl_weight,
        "checkpoint": args.checkpoint,
        **compare(fast, plain),
    }
    if emit(result, args.out, args.json):
        return
    title = pair_title(result, f"rank {args.rank}, kl_weight {args.kl_weight}, ")
    rows = [
        ("LoRA step (chunked losses)", result["step_s"], result["peak_gib"]),
        ("floor: LoRA model fwd+bwd", result["floor_s"], None),
        ("baseline step (full logits)", result["baseline_step_s"], result["baseline_peak_gib"]),
    ]
    print_table(title, rows, result)


if __name__ == "__main__":
    offline_environment()
    run(main)
