"""Adapter training cost: one training step beside its floor, and the plain full-logits path.

    python -m benchmarks.adapters [--pair organism|smollm2] [--batch 4] [--d-sae 512] [--threads 1]
                                  [--repeats 3] [--checkpoint] [--autocast bfloat16]
                                  [--generation] [--json] [--device cuda --dtype bfloat16]

On one right-padded batch of the pair's training traces, with TopK-8 adapters of ``--d-sae``
features per layer (fresh ones: cost does not depend on training), three things are timed:

* ``step_s``: a full training step of :class:`~mechdiff.training.adapter_objective.AdapterObjective`
  (target forward once, adapted forward, two bridging half forwards, KL/NMSE/bridging losses
  chunked over positions, backward, AdamW step);
* ``floor_s``: one forward and backward of the adapted model alone on that batch (its
  unembedding and next-token CE included, chunked; no target, no bridging), timed in the same
  process, interleaved with the steps;
* ``step_without_bridging_s``: the same step with the bridging weight at 0 (interleaved too): the
  two bridges run about one more forward and backward of the model by construction (each half
  model is ``n_layers - k`` blocks, ``k`` uniform), so this is what the rest of the step costs;
* ``baseline_step_s``: the same step on the plain path (``fast=False``: full ``[batch, pos,
  vocab]`` logits through ``masked_kl``), which is what training ran before.

Training draws the bridging cutoff ``k`` uniformly from ``1 .. n_layers - 1`` each step, and a
step's cost is affine in ``k`` (the two half models run ``n_layers - k`` blocks), so the timed
steps run at ``k = n_layers // 2``: the mean step, without the spread of a few random draws (on
SmolLM2 a step ranges from about 1.5 to 4 floors). The warm-up step runs at ``k = 1``, the deepest
bridges, so the peak memory covers every cutoff.

``--checkpoint`` has the new path recompute each block in backward (the same loss and gradients,
less memory, about one more forward); ``--autocast bfloat16`` runs its forwards in bf16, an
approximation whose price on the batch is reported as ``autocast_error`` (relative error of the
loss and its parts, gradients' cosine and relative norm difference against the float32 step);
the floor is then also timed in that precision (``floor_autocast_s``, ``step_over_floor_autocast``).

Each path runs in a fresh subprocess, so ``peak_gib`` and ``baseline_peak_gib`` (peak resident
memory of that process, models included) are its own. ``--pair smollm2`` needs the ``[real]`` extra;
without a cached fine-tune it loads the base model on both sides (three copies, as with one) and
says so. ``--generation`` also times greedy generation with and without the adapters (organism).
"""

from __future__ import annotations

import argparse

from benchmarks import peak_rss_gib
from benchmarks.bench_pair import load_bench_pair
from benchmarks.isolated import add_path_options, fast_and_plain
from benchmarks.step_report import compare, emit, print_table, time_after_warm_up
from mechdiff.cli import add_pair_options, check_pair_options, offline_environment, run


def measure(args, path: str) -> dict:
    """In this process: the step of ``path`` ("fast" or "plain"); with "fast" also the floor."""
    import torch

    from mechdiff.adapters.transcoder import AdaptedModel
    from mechdiff.capture import final_hidden
    from mechdiff.padding import pad
    from mechdiff.training.adapter_objective import AdapterObjective, LossWeights
    from mechdiff.training.losses import Head, head_losses, next_token_keep
    from mechdiff.workloads import for_pair

    torch.manual_seed(0)
    pair, note = load_bench_pair(args)
    traces = for_pair(pair).traces(args.batch, "test")
    pad_id = pair.tokenizer.pad_token_id or 0
    device = pair.target.cfg.device
    tokens, mask = (t.to(device) for t in pad(traces["input_ids"], pad_id, side="right"))
    adapted = AdaptedModel.from_pair(pair, args.d_sae, "topk", 8)
    loaded_gib = peak_rss_gib()
    fast = path == "fast"
    objective = AdapterObjective(
        adapted,
        pair.target,
        LossWeights(),
        fast=fast,
        autocast=args.autocast if fast else None,
        checkpoint=fast and args.checkpoint,
    )
    unbridged = AdapterObjective(
        adapted,
        pair.target,
        LossWeights(bridge=0.0),
        fast=fast,
        autocast=objective.autocast,
        checkpoint=objective.checkpoint,
    )
    opt = torch.optim.AdamW(adapted.adapters.parameters(), lr=1e-6)
    keep = next_token_keep(mask)

    mean_cutoff = adapted.config.n_layers // 2  # see the module docstring

    def step(objective=objective, cutoff=mean_cutoff):
        loss, _, _ = objective(tokens, mask, cutoff=cutoff)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def step_without_bridging():
        step(unbridged)

    def floor():
        model = adapted.model
        hidden = final_hidden(model, tokens, attention_mask=mask.long())[:, :-1][keep]
        loss = head_losses([Head(hidden, model.W_U, model.b_U)], labels=tokens[:, 1:][keep]).ce[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()

    def floor_in_precision():  # the floor in the step's mixed precision
        with objective.precision():
            floor()

    out = {
        "path": path,
        "loaded_gib": loaded_gib,
        "note": note,
        "tokens": int(mask.sum()),
        "positions": tokens.shape[1],
        "threads": torch.get_num_threads(),
    }
    timed = {"step": step}
    if path == "fast":  # the floor and the step without bridging, interleaved with the steps
        timed = {"floor": floor, **timed, "step_without_bridging": step_without_bridging}
        if args.autocast:
            timed["floor_autocast"] = floor_in_precision
    # warm-up at the deepest bridges: the peak memory covers every cutoff
    out.update(time_after_warm_up(lambda: step(cutoff=1), timed, args.repeats))
    if fast and args.autocast:  # the price of the approximation, on this batch
        out["autocast_error"] = autocast_error(adapted, pair.target, objective, tokens, mask, mean_cutoff)
    return out


def autocast_error(adapted, target, objective, tokens, mask, cutoff: int) -> dict:
    """The mixed-precision step against full precision on the same batch and bridge ``cutoff``:
    relative error of the loss and of each part, and the gradients' cosine and relative norm
    difference."""
    import torch

    from mechdiff.training.adapter_objective import AdapterObjective

    exact = AdapterObjective(adapted, target, objective.weights, fast=True)
    params = list(adapted.adapters.parameters())
    got = {}
    for name, obj in (("exact", exact), ("autocast", objective)):
        loss, parts, _ = obj(tokens, mask, cutoff=cutoff)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
        got[name] = (float(loss), parts, flat.float())
    (loss, parts, g), (loss_ac, parts_ac, g_ac) = got["exact"], got["autocast"]
    return {
        "loss": loss,
        "loss_rel_error": abs(loss_ac - loss) / abs(loss),
        "parts_rel_error": {k: abs(parts_ac[k] - v) / max(abs(v), 1e-12) for k, v in parts.items()},
        "grad_cosine": float(torch.nn.functional.cosine_similarity(g, g_ac, dim=0)),
        "grad_rel_norm_error": float((g_ac - g).norm() / g.norm()),
    }


def generation(args) -> dict:
    """Greedy generation with the adapters attached beside the target without them."""
    from benchmarks import mean_seconds
    from mechdiff.adapters.transcoder import AdaptedModel
    from mechdiff.generation import generate
    from mechdiff.workloads import for_pair

    pair, _ = load_bench_pair(args)
    adapted = AdaptedModel.from_pair(pair, args.d_sae, "topk", 8)
    prompts = for_pair(pair).problems(args.n, "test")["input_ids"]

    def go(model):
        return lambda: generate(model, prompts, args.new, eos_token_id=-1, batch_size=args.n)

    t_with, t_without = mean_seconds(go(adapted.model), args.repeats), mean_seconds(go(pair.target), args.repeats)
    return {
        "prompts": args.n,
        "new_tokens": args.new,
        "with_adapters_s": t_with,
        "without_s": t_without,
        "ratio_with_over_without": t_with / t_without,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.adapters", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_pair_options(parser)
    parser.set_defaults(threads=1)
    parser.add_argument("--batch", type=int, default=4, help="traces per training step (default 4)")
    parser.add_argument("--d-sae", type=int, default=512, help="adapter features per layer (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per path (default 3)")
    parser.add_argument(
        "--autocast",
        default=None,
        choices=["bfloat16", "float16"],
        help="mixed precision for the new path's forwards (default: none)",
    )
    parser.add_argument(
        "--checkpoint",
        action="store_true",
        help="the new path also recomputes each block in backward (less memory, more time)",
    )
    parser.add_argument("--generation", action="store_true", help="also time generation with adapters")
    parser.add_argument("--n", type=int, default=64, help="prompts generated at once (--generation)")
    parser.add_argument("--new", type=int, default=64, help="new tokens per prompt (--generation)")
    add_path_options(parser)
    args = parser.parse_args(argv)
    check_pair_options(args)
    paths = fast_and_plain("benchmarks.adapters", args, argv, measure)
    if paths is None:  # a child: it printed its path's JSON
        return
    fast, plain = paths
    result = {
        "pair": args.pair,
        "note": fast["note"],
        "batch": args.batch,
        "positions": fast["positions"],
        "tokens": fast["tokens"],
        "d_sae": args.d_sae,
        "threads": fast["threads"],
        "autocast": args.autocast,
        "checkpoint": args.checkpoint,
        **compare(fast, plain),
        "step_without_bridging_s": fast["step_without_bridging_s"],
        "step_without_bridging_over_floor": fast["step_without_bridging_s"] / fast["floor_s"],
    }
    if "autocast_error" in fast:
        result["autocast_error"] = fast["autocast_error"]
        result["floor_autocast_s"] = fast["floor_autocast_s"]
        result["step_over_floor_autocast"] = fast["step_s"] / fast["floor_autocast_s"]
    if args.generation:
        result["generation"] = generation(args)
    if emit(result, args.out, args.json):
        return
    title = (
        f"{args.pair}: {result['note']}; batch {args.batch} x {result['positions']} positions, "
        f"{result['threads']} thread(s)"
    )
    rows = [
        ("adapter step (chunked losses)", result["step_s"], result["peak_gib"]),
        ("the step without bridging", result["step_without_bridging_s"], None),
        ("floor: adapted fwd+bwd", result["floor_s"], None),
        ("baseline step (full logits)", result["baseline_step_s"], result["baseline_peak_gib"]),
    ]
    print_table(title, rows, result)


if __name__ == "__main__":
    offline_environment()
    run(main)
