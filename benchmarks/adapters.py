"""Transcoder-adapter costs: training throughput and generation with adapters attached.

    python -m benchmarks.adapters [--batch 64] [--d-sae 1024] [--threads 1] [--json]
                                  [--device cuda --dtype bfloat16]

* Training: tokens/s of one full adapter training step (target forward with cache, adapted forward,
  two bridging half-forwards, backward, AdamW step) beside its baseline, one plain target forward
  plus one adapted forward and backward (KL only) on the same batch; the ratio is step / baseline.
* Generation: greedy generation of exactly ``--new`` tokens for ``--n`` test prompts with the
  adapters attached beside the target without them (same architecture); the ratio is time with /
  time without.

Uses the shipped organism adapters when present (else fresh ones with ``--d-sae`` features).
Results go to stdout (and ``--out`` JSON, default ``figures/adapters/benchmark.json``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks import mean_seconds  # noqa: E402
from mechdiff.adapters.formats import load_adapted  # noqa: E402
from mechdiff.adapters.transcoder import SHIPPED_DIR, AdaptedModel  # noqa: E402
from mechdiff.generation import generate  # noqa: E402
from mechdiff.models import load_pair  # noqa: E402
from mechdiff.organism import corpus  # noqa: E402
from mechdiff.padding import pad  # noqa: E402
from mechdiff.training.adapter_objective import AdapterObjective, LossWeights, masked_kl  # noqa: E402


def training(pair, adapted: AdaptedModel, batch: int, repeats: int) -> dict:
    tokens, mask = pad(corpus.reasoning_traces(batch, "validation")["input_ids"], 0, side="right")
    tokens, mask = tokens.to(pair.target.cfg.device), mask.to(pair.target.cfg.device)
    n_tok = int(mask.sum())
    objective = AdapterObjective(adapted, pair.target, LossWeights())
    opt = torch.optim.AdamW(adapted.adapters.parameters(), lr=1e-6)

    def step():
        loss, _, _ = objective(tokens, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def baseline():
        with torch.no_grad():
            t_logits = pair.target(tokens, attention_mask=mask.long())
        masked_kl(t_logits, adapted.model(tokens, attention_mask=mask.long()), mask).backward()
        opt.zero_grad(set_to_none=True)

    t_step, t_base = mean_seconds(step, repeats), mean_seconds(baseline, repeats)
    return {"batch": batch, "tokens": n_tok, "step_s": t_step, "baseline_s": t_base,
            "step_tokens_per_s": n_tok / t_step, "baseline_tokens_per_s": n_tok / t_base,
            "ratio_step_over_baseline": t_step / t_base}


def generation(pair, adapted: AdaptedModel, n: int, new: int, repeats: int) -> dict:
    prompts = corpus.problems(n, "test")["input_ids"]

    def run(model):
        return lambda: generate(model, prompts, new, eos_token_id=-1, batch_size=n)

    t_with, t_without = mean_seconds(run(adapted.model), repeats), mean_seconds(run(pair.target), repeats)
    return {"prompts": n, "new_tokens": new, "with_adapters_s": t_with, "without_s": t_without,
            "with_tokens_per_s": n * new / t_with, "without_tokens_per_s": n * new / t_without,
            "ratio_with_over_without": t_with / t_without}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="traces per training step")
    parser.add_argument("--d-sae", type=int, default=1024, help="features per layer if nothing is shipped")
    parser.add_argument("--n", type=int, default=64, help="prompts generated at once")
    parser.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default="figures/adapters/benchmark.json")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--device", default=None,
                        help="torch device: cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the models and adapters (default float32; use bfloat16 on a GPU, as "
                             "a real run would: half the memory, tensor-core speed)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pair = load_pair("organism", device=args.device, dtype=args.dtype)
    shipped = (SHIPPED_DIR / "adapters.json").exists()
    adapted = load_adapted(pair) if shipped else AdaptedModel.from_pair(pair, args.d_sae)
    result = {"adapters": str(SHIPPED_DIR) if shipped else f"fresh, d_sae={args.d_sae}",
              "d_sae": adapted.config.d_sae, "threads": torch.get_num_threads(),
              "device": str(adapted.model.cfg.device), "dtype": args.dtype,
              "training": training(pair, adapted, args.batch, args.repeats),
              "generation": generation(pair, adapted, args.n, args.new, args.repeats)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result, indent=1))
        return
    tr, ge = result["training"], result["generation"]
    print(f"adapters: {result['adapters']}  (threads {result['threads']})")
    print(f"training  step (full objective + AdamW) {tr['step_tokens_per_s']:>8.0f} tokens/s   "
          f"baseline (target fwd + adapted fwd/bwd) {tr['baseline_tokens_per_s']:>8.0f} tokens/s   "
          f"ratio {tr['ratio_step_over_baseline']:.2f}x")
    print(f"generate  with adapters {ge['with_tokens_per_s']:>8.0f} tokens/s   "
          f"without {ge['without_tokens_per_s']:>8.0f} tokens/s   ratio {ge['ratio_with_over_without']:.2f}x")


if __name__ == "__main__":
    main()
