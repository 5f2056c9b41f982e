"""LoRA training throughput beside a plain base forward + backward on the same batch.

    python -m benchmarks.lora [--rank 1] [--batch 64] [--steps 10] [--threads 0]
                              [--device cuda --dtype bfloat16]

Both sides run the organism on the same right-padded batch of reasoning traces. The LoRA side is
one full training step of :func:`mechdiff.lora.train_lora`'s objective (hooked forward with all
21 adapters, response-token loss chunked over positions as training computes it, backward into the adapters, AdamW step); the baseline is the
base HookedTransformer's forward + backward of the same loss into all its weights. The ratio says
what the hooks cost: the LoRA backward skips weight gradients, its forward adds 21 small hooks.
"""

from __future__ import annotations

import argparse
import copy

import torch

from benchmarks import mean_seconds
from mechdiff.adapters.lora import LoRAConfig, LoRAModel
from mechdiff.cli import offline_environment
from mechdiff.models import load_pair
from mechdiff.organism import corpus
from mechdiff.training.lora_objective import TraceBatches, chunked_distillation_loss


def main(argv: list[str] | None = None) -> None:
    offline_environment()  # set in main, never at import
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64, help="traces per batch")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--device", default=None, help="torch device: cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the models and the LoRA (default float32; use bfloat16 on a GPU, as "
        "a real run would: half the memory, tensor-core speed)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pair = load_pair("organism", device=args.device, dtype=args.dtype)
    tokens, keep = TraceBatches(corpus.reasoning_traces(args.batch, "validation"), args.batch).batch(0)
    tokens, keep = tokens.to(pair.base.cfg.device), keep.to(pair.base.cfg.device)
    n_tok = int(tokens.numel())

    lora = LoRAModel.from_base(pair.base, LoRAConfig(rank=args.rank))
    opt = torch.optim.AdamW(lora.layers.parameters(), lr=1e-3)

    def lora_step():
        loss, _ = chunked_distillation_loss(lora.model, tokens, keep)
        opt.zero_grad()
        loss.backward()
        opt.step()

    base = copy.deepcopy(pair.base)
    for p in base.parameters():
        p.requires_grad_(True)

    def base_step():
        base.zero_grad()
        chunked_distillation_loss(base, tokens, keep)[0].backward()

    t_lora, t_base = mean_seconds(lora_step, args.steps), mean_seconds(base_step, args.steps)
    print(
        f"batch {args.batch} traces x {tokens.shape[1]} positions = {n_tok} tokens, "
        f"{torch.get_num_threads()} threads, rank {args.rank}, {pair.meta['device']} {args.dtype}"
    )
    print(f"{'':<34} {'s/step':>8} {'tokens/s':>10}")
    print(f"{'LoRA train step (fwd+bwd+AdamW)':<34} {t_lora:>8.4f} {n_tok / t_lora:>10.0f}")
    print(f"{'base forward+backward (all W)':<34} {t_base:>8.4f} {n_tok / t_base:>10.0f}")
    print(f"ratio LoRA / base throughput: {t_base / t_lora:.2f}x")


if __name__ == "__main__":
    main()
