"""``python -m mechdiff.lora train|eval``: train a rank-r LoRA lens and measure what it recovers.

Examples:
    python -m mechdiff.lora train --rank 1 --out runs/lora_r1
    python -m mechdiff.lora train --rank 4 --steps 600 --kl-weight 0.5 --out runs/lora_r4
    python -m mechdiff.lora eval runs/lora_r1 runs/lora_r4 --n-problems 500
    python -m mechdiff.lora eval --shipped 1 2 4 8
    python -m mechdiff.lora --pair smollm2 train --rank 1 --batch-size 8 --out runs/lora_smollm2_r1
    python -m mechdiff.lora --pair smollm2 eval runs/lora_smollm2_r1 --n-problems 100

``--pair smollm2`` (or ``smollm2:RUN``) is SmolLM2 and its fine-tune from ``python -m mechdiff.real
train``: traces, test problems and grader are then its chat ones (:mod:`mechdiff.workloads`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

DESCRIPTION = """\
Rank-r LoRA lens (Ward, Riechers & Shai 2025) on a base/target pair (default: the organism).

train: fit a LoRA on q, k, v, o, gate, up, down of every base layer to the target's reasoning
       traces (loss on response tokens only; AdamW, warmup + cosine). Checkpoints go to
       OUT/checkpoint every 100 steps and a rerun with the same --out resumes exactly; the result
       is a PEFT folder (adapter_config.json + adapter_model.safetensors) plus training.json.
eval:  greedy-generate on held-out test problems with base, target and each LoRA and print
       accuracy, response length, hesitations and gain recovered (acc-base)/(target-base) as JSON.
"""


def _pair(args):
    from mechdiff.models import load_pair

    where = dict(device=args.device, dtype=args.dtype)
    if args.base or args.target:
        return load_pair("custom", base=args.base, target=args.target, **where)
    return load_pair(args.pair, **where)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mechdiff.lora", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="organism",
                        help="model pair name: organism (default), smollm2 or smollm2:RUN, a preset")
    parser.add_argument("--base", help="base model folder (with --target: a custom pair)")
    parser.add_argument("--target", help="fine-tuned model folder (with --base)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1, fastest for tiny models; 0: torch default)")
    parser.add_argument("--device", default=None,
                        help="torch device: cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the models and the LoRA (default float32; use bfloat16 on a GPU: "
                             "half the memory and tensor-core speed, results within bf16 rounding)")
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train a LoRA and write a PEFT folder",
                        description="Train a LoRA lens; rerunning with the same --out resumes.")
    tr.add_argument("--out", required=True, help="output folder (checkpoints + PEFT adapter)")
    tr.add_argument("--rank", type=int, default=1, help="LoRA rank r (default 1)")
    tr.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    tr.add_argument("--no-rslora", action="store_true", help="scale alpha/r instead of alpha/sqrt(r)")
    tr.add_argument("--modules", nargs="+", default=None,
                    help="adapted projections (default: q k v o gate up down)")
    tr.add_argument("--steps", type=int, default=1000, help="optimiser steps (default 1000)")
    tr.add_argument("--batch-size", type=int, default=64, help="traces per step (default 64)")
    tr.add_argument("--lr", type=float, default=1e-2,
                    help="peak learning rate (default 1e-2; 3e-2 diverges on the organism)")
    tr.add_argument("--n-traces", type=int, default=20_000, help="training traces (default 20000)")
    tr.add_argument("--kl-weight", type=float, default=0.0,
                    help="0: CE on the trace tokens; 1: KL to the target's logits; between: a mix")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    tr.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    tr.add_argument("--n-problems", type=int, default=500, help="test problems for the evaluation")

    ev = sub.add_parser("eval", help="evaluate base, target and LoRA folders",
                        description="Accuracy / length / hesitations / gain recovered as JSON.")
    ev.add_argument("folders", nargs="*", help="PEFT LoRA folders to evaluate")
    ev.add_argument("--shipped", type=int, nargs="*", default=None, metavar="RANK",
                    help="also evaluate the shipped organism LoRAs of these ranks")
    ev.add_argument("--n-problems", type=int, default=500, help="test problems (default 500)")
    ev.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    import torch

    from mechdiff.lora import TrainConfig, evaluate_lora, load_lora, shipped_lora, train_lora

    if args.threads:
        torch.set_num_threads(args.threads)
    pair = _pair(args)
    if args.command == "train":
        cfg = TrainConfig(rank=args.rank, alpha=args.alpha, rslora=not args.no_rslora,
                          steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          n_traces=args.n_traces, kl_weight=args.kl_weight, seed=args.seed)
        if args.modules:
            cfg.modules = tuple(args.modules)
        lora, history = train_lora(pair, cfg, args.out, resume=not args.no_resume)
        print(json.dumps({"final": history[-1] if history else {}, "out": args.out}, indent=1))
        if not args.no_eval:
            stats = evaluate_lora(pair, {f"lora_r{args.rank}": lora}, args.n_problems, progress=True)
            print(json.dumps(stats, indent=1))
        return 0
    loras = {folder: load_lora(folder, pair) for folder in args.folders}
    if args.shipped and pair.meta.get("workload", "organism") != "organism":
        parser.error(f"--shipped LoRAs are the organism's; --pair {args.pair} has none")
    for rank in args.shipped or []:
        lora = shipped_lora(pair, rank)
        if lora is None:
            parser.error(f"no shipped LoRA of rank {rank}")
        loras[f"shipped_r{rank}"] = lora
    if not loras:
        parser.error("give LoRA folders and/or --shipped RANK ...")
    stats = evaluate_lora(pair, loras, args.n_problems, progress=True)
    text = json.dumps(stats, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
