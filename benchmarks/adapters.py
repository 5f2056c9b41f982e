"""Adapter training cost: one training step beside its floor, and the plain full-logits path.

    python -m benchmarks.adapters [--pair organism|smollm2] [--batch 4] [--d-sae 512] [--threads 1]
                                  [--repeats 3] [--checkpoint] [--autocast bfloat16]
                                  [--generation] [--json] [--device cuda --dtype bfloat16]

On one right-padded batch of the pair's training traces, with TopK-8 adapters of ``--d-sae``
features per layer (fresh ones: cost does not depend on training), three things are timed:

* ``step_s``: a full training step of :class:`~mechdiff.training.adapter_objective.AdapterObjective`
  (target forward once, adapted forward, two bridging half forwards, KL/NMSE/bridging losses
  chunked over positions, backward, AdamW step), its blocks run by
  :mod:`~mechdiff.training.lean_blocks` (fused attention, no weight copies kept for backward);
* ``floor_s``: one forward and backward of the adapted model alone on that batch (its
  unembedding and next-token CE included, chunked; no target, no bridging), in the same lean
  blocks, timed in the same process, interleaved with the steps; ``floor_transformer_lens_s``
  is that floor in TransformerLens' own blocks (what a user of TransformerLens would pay);
* ``step_without_bridging_s``: the same step with the bridging weight at 0 (interleaved too): the
  two bridges run about one more forward and backward of the model by construction (each half
  model is ``n_layers - k`` blocks, ``k`` uniform), so this is what the rest of the step costs;
* ``baseline_step_s``: the same step on the plain path (``fast=False``: full ``[batch, pos,
  vocab]`` logits through ``masked_kl``, TransformerLens' blocks), which is what training ran
  before.

Training draws the bridging cutoff ``k`` uniformly from ``1 .. n_layers - 1`` each step, and a
step's cost is affine in ``k`` (the two half models run ``n_layers - k`` blocks), so the timed
steps run at ``k = n_layers // 2``: the mean step, without the spread of a few random draws (on
SmolLM2 a step ranges from about 1.5 to 4 floors). The warm-up step runs at ``k = 1``, the deepest
bridges, so the peak memory covers every cutoff.

Two cheaper steps can be timed beside them, in the same rounds:

* ``--target-cache``: ``step_target_cache_s``, the step reading the target's pass from a
  :class:`~mechdiff.training.target_cache.TargetCache` on disk (made once for the batch:
  ``target_cache_build_s``; read every step) instead of running the target: the same loss
  (``target_cache_loss_abs_diff``), for runs that share their traces (a sweep, a resumed run);
* ``--bridge-rows R``: ``step_bridge_rows_s``, the step with the bridges on a share ``R`` of the
  rows (with the cached target when ``--target-cache`` is given). Its price is noise, reported as
  ``bridge_rows_error`` over every subset of that size on this batch: the bridging term's relative
  spread, the gradient's cosine to the exact step's, and the mean's distance from the exact term
  (zero up to float error: the estimate is unbiased).

With either, a third process runs only the cheaper step (both, when both are given), warmed up at
the deepest bridges: ``cheaper_peak_gib`` is its own peak memory.

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
import sys

from benchmarks import peak_rss_gib
from benchmarks.bench_pair import load_bench_pair
from benchmarks.isolated import add_path_options, fast_and_plain, measure_in_child
from benchmarks.step_report import compare, emit, pair_header, pair_title, print_table, time_after_warm_up
from mechdiff.cli import add_pair_options, check_pair_options, offline_environment, run


def measure(args, path: str) -> dict:
    """In this process: the step of ``path`` ("fast" or "plain"); with "fast" also the floor; with
    "cheaper" only the peak memory of the cheaper step (``--target-cache``, ``--bridge-rows``)."""
    from contextlib import nullcontext

    import torch

    from mechdiff.adapters.transcoder import AdaptedModel
    from mechdiff.capture import final_hidden
    from mechdiff.padding import pad
    from mechdiff.training.adapter_objective import AdapterObjective, LossWeights
    from mechdiff.training.lean_blocks import lean_blocks
    from mechdiff.training.loop import adamw
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
    fast = path in ("fast", "cheaper")
    objective = AdapterObjective(
        adapted,
        pair.target,
        LossWeights(),
        fast=fast,
        autocast=args.autocast if fast else None,
        checkpoint=fast and args.checkpoint,
        lean=fast,
    )
    unbridged = AdapterObjective(
        adapted,
        pair.target,
        LossWeights(bridge=0.0),
        fast=fast,
        autocast=objective.autocast,
        checkpoint=objective.checkpoint,
        lean=fast,
    )
    opt = adamw(list(adapted.adapters.parameters()), lr=1e-6)  # as training builds it
    cheaper = cheaper_steps(args, adapted, pair.target, objective, traces, tokens, mask) if fast else {}
    keep = next_token_keep(mask)

    mean_cutoff = adapted.config.n_layers // 2  # see the module docstring

    def step(objective=objective, cutoff=mean_cutoff, target=lambda: None):
        loss, _, _ = objective(tokens, mask, cutoff=cutoff, target=target())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def step_without_bridging():
        step(unbridged)

    def floor(lean=fast):
        model = adapted.model
        with lean_blocks((model,)) if lean else nullcontext():
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
    if path == "cheaper":  # its own process: the peak is the cheaper step's, at the deepest bridges
        step(cheaper.get("rows", objective), cutoff=1, target=cheaper.get("target", lambda: None))
        return {"peak_gib": peak_rss_gib()}
    timed = {"step": step}
    if path == "fast":  # the floor and the step without bridging, interleaved with the steps
        timed = {"floor": floor, **timed, "step_without_bridging": step_without_bridging}
        timed["floor_transformer_lens"] = lambda: floor(lean=False)
        if args.autocast:
            timed["floor_autocast"] = floor_in_precision
        if "target" in cheaper:
            timed["step_target_cache"] = lambda: step(target=cheaper["target"])
        if "rows" in cheaper:
            timed["step_bridge_rows"] = lambda: step(cheaper["rows"], target=cheaper.get("target", lambda: None))
    # warm-up at the deepest bridges: the peak memory covers every cutoff
    out.update(time_after_warm_up(lambda: step(cutoff=1), timed, args.repeats))
    if fast and args.autocast:  # the price of the approximation, on this batch
        out["autocast_error"] = autocast_error(adapted, pair.target, objective, tokens, mask, mean_cutoff)
    out.update(cheaper.get("report", {}))
    if "rows" in cheaper:
        out["bridge_rows_error"] = bridge_rows_error(adapted, objective, cheaper["rows"], tokens, mask, mean_cutoff)
    return out


def cheaper_steps(args, adapted, target, objective, traces, tokens, mask) -> dict:
    """What ``--target-cache`` and ``--bridge-rows`` time: ``target`` (a function reading the
    batch's cached target pass from disk), ``rows`` (the objective bridging a share of the rows)
    and ``report`` (the cache's build time and its loss against the online target's)."""
    import tempfile
    import time

    import torch

    from mechdiff.training.adapter_objective import AdapterObjective
    from mechdiff.training.target_cache import TargetCache

    out: dict = {}
    if args.target_cache:
        folder = tempfile.mkdtemp(prefix="target-cache-")
        start = time.perf_counter()
        cache = TargetCache.build(target, traces["input_ids"], folder, batch_size=args.batch, lean=objective.lean)
        build_s = time.perf_counter() - start
        rows = list(range(len(traces)))
        out["target"] = lambda: cache.batch(rows, tokens.shape[1])
        with torch.no_grad():
            online = objective(tokens, mask, cutoff=1)[0]
            read = objective(tokens, mask, cutoff=1, target=out["target"]())[0]
        out["report"] = {"target_cache_build_s": build_s, "target_cache_loss_abs_diff": float(abs(read - online))}
    if args.bridge_rows < 1:
        out["rows"] = AdapterObjective(
            adapted,
            target,
            objective.weights,
            autocast=objective.autocast,
            checkpoint=objective.checkpoint,
            bridge_rows=args.bridge_rows,
        )
    return out


def flat_grad(loss, params):
    """The gradient of ``loss`` in ``params`` as one float32 vector (zeros where a parameter has none)."""
    import torch

    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)]).float()


def bridge_rows_error(adapted, exact, rows_objective, tokens, mask, cutoff: int, most: int = 32) -> dict:
    """The bridges on a share of the rows against all rows, on this batch at ``cutoff``, over
    every subset of that size (``most`` drawn at random when there are more): the bridging term's
    relative spread (std / exact), the gradient's cosine to the exact one (mean and worst), and
    the subsets' mean against the exact term. For scale, ``halves_grad_cosine``: the cosine
    between the exact gradients of the batch's two halves, the noise of sampling half a batch."""
    import itertools
    import random

    import torch

    params = list(adapted.adapters.parameters())

    def run(objective, subset=None, rows=slice(None)):
        loss, parts, _ = objective(tokens[rows], mask[rows], cutoff=cutoff, bridge_subset=subset)
        return parts.get("bridge_a2t", 0.0) + parts.get("bridge_t2a", 0.0), flat_grad(loss, params)

    def cosine(a, b):
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    bridge, grad = run(exact)
    n = max(1, round(rows_objective.bridge_rows * mask.shape[0]))
    if bridge < 1e-6:  # e.g. SmolLM2 without its fine-tune: fresh adapters on base = target
        return {
            "rows_per_step": n,
            "bridge_term": bridge,
            "note": "the adapted model equals the target on this pair, so the bridges are 0: no spread to measure",
        }
    subsets = list(itertools.combinations(range(mask.shape[0]), n))
    every = len(subsets) <= most
    subsets = subsets if every else random.Random(0).sample(subsets, most)
    runs = [run(rows_objective, torch.tensor(s)) for s in subsets]
    terms = torch.tensor([b for b, _ in runs])
    cosines = [cosine(g, grad) for _, g in runs]
    half = mask.shape[0] // 2
    out = {
        "rows_per_step": n,
        "subsets": len(subsets),
        "every_subset": every,
        "bridge_term": bridge,
        "bridge_rel_std": float(terms.std(correction=0) / bridge),
        "bridge_mean_rel_error": float(abs(terms.mean() - bridge) / bridge),
        "grad_cosine_mean": sum(cosines) / len(cosines),
        "grad_cosine_min": min(cosines),
    }
    if half:
        out["halves_grad_cosine"] = cosine(run(exact, rows=slice(0, half))[1], run(exact, rows=slice(half, None))[1])
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
        got[name] = (float(loss), parts, flat_grad(loss, params))
    (loss, parts, g), (loss_ac, parts_ac, g_ac) = got["exact"], got["autocast"]
    return {
        "loss": loss,
        "loss_rel_error": abs(loss_ac - loss) / max(abs(loss), 1e-12),
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


CHEAPER_ROWS = {
    "step_target_cache_s": "the step, target from its cache",
    "step_bridge_rows_s": "the step, bridging a share of rows",
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
    parser.add_argument(
        "--target-cache",
        action="store_true",
        help="also time the step reading the target's pass from a cache on disk (the same loss)",
    )
    parser.add_argument(
        "--bridge-rows",
        type=float,
        default=1.0,
        metavar="R",
        help="also time the step bridging a share R < 1 of the rows (an unbiased estimate; its spread is reported)",
    )
    parser.add_argument("--generation", action="store_true", help="also time generation with adapters")
    parser.add_argument("--n", type=int, default=64, help="prompts generated at once (--generation)")
    parser.add_argument("--new", type=int, default=64, help="new tokens per prompt (--generation)")
    add_path_options(parser, ("fast", "plain", "cheaper"))
    args = parser.parse_args(argv)
    check_pair_options(args)
    if not 0 < args.bridge_rows <= 1:
        parser.error(f"--bridge-rows is a share of the batch's rows: in (0, 1], not {args.bridge_rows}")
    paths = fast_and_plain("benchmarks.adapters", args, argv, measure)
    if paths is None:  # a child: it printed its path's JSON
        return
    fast, plain = paths
    if "step_bridge_rows_s" in fast or "step_target_cache_s" in fast:
        fast["cheaper_peak_gib"] = measure_in_child("benchmarks.adapters", argv or sys.argv[1:], "cheaper")["peak_gib"]
    result = {
        **pair_header(args, fast),
        "d_sae": args.d_sae,
        "autocast": args.autocast,
        "checkpoint": args.checkpoint,
        **compare(fast, plain),
    }
    if "autocast_error" in fast:
        result["autocast_error"] = fast["autocast_error"]
        result["floor_autocast_s"] = fast["floor_autocast_s"]
        result["step_over_floor_autocast"] = fast["step_s"] / fast["floor_autocast_s"]
    for name in ("step_without_bridging", "step_target_cache", "step_bridge_rows"):
        if f"{name}_s" in fast:
            result[f"{name}_s"] = fast[f"{name}_s"]
            result[f"{name}_over_floor"] = fast[f"{name}_s"] / fast["floor_s"]
    result["floor_transformer_lens_s"] = fast["floor_transformer_lens_s"]
    for key in ("target_cache_build_s", "target_cache_loss_abs_diff", "bridge_rows_error", "cheaper_peak_gib"):
        if key in fast:
            result[key] = fast[key]
    if "step_bridge_rows_s" in fast:
        result["bridge_rows"] = args.bridge_rows
    if args.generation:
        result["generation"] = generation(args)
    if emit(result, args.out, args.json):
        return
    title = pair_title(result)
    cheapest = [key for key in CHEAPER_ROWS if key in result][-1:]  # the one whose peak was measured
    rows = [
        ("adapter step (chunked losses)", result["step_s"], result["peak_gib"]),
        ("the step without bridging", result["step_without_bridging_s"], None),
        *[
            (label, result[key], result["cheaper_peak_gib"] if key in cheapest else None)
            for key, label in CHEAPER_ROWS.items()
            if key in result
        ],
        ("floor: adapted fwd+bwd", result["floor_s"], None),
        ("the floor in TransformerLens' blocks", result["floor_transformer_lens_s"], None),
        ("baseline step (full logits)", result["baseline_step_s"], result["baseline_peak_gib"]),
    ]
    print_table(title, rows, result)


if __name__ == "__main__":
    offline_environment()
    run(main)
