"""``python -m benchmarks.estimate``: the estimator's predicted step time against a measured one.

On the organism's shape (3 layers, d_model 128, d_mlp 512; random weights) it times one adapter
training step and one batched generation, after calibrating this CPU (:meth:`Device.cpu`), and
prints measured seconds, predicted seconds and their ratio. On a shared 2-core CPU the roofline is
2-5x optimistic; the stated bound is 10x either way. (A wall-clock bound belongs here, not in a
test: a loaded machine would fail it.)

    python -m benchmarks.estimate --threads 1
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from mechdiff.estimate import Device, ModelShape, Workload, estimate
from mechdiff.estimate_check import measure_time
from mechdiff.models import ModelPair, hooked_from_hf

ORGANISM = dict(
    vocab_size=26,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
)
BOUND = 10.0


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.estimate", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timings per workload; the fastest counts")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(hooked_from_hf(Qwen2ForCausalLM(Qwen2Config(**ORGANISM)).eval(), device="cpu"))
    pair, shape, device = ModelPair(*models, None), ModelShape.from_config(Qwen2Config(**ORGANISM)), Device.cpu()
    rows = []
    for w in (
        Workload("adapters", batch_size=16, seq_len=76, dtype="float32", d_sae=1024),
        Workload("generation", batch_size=64, seq_len=76, dtype="float32", new_tokens=24),
    ):
        measured = min(measure_time(pair, w, units=1) for _ in range(args.repeats))
        predicted = estimate(shape, w).seconds(device)
        rows.append(
            {
                "task": w.task,
                "measured_s": measured,
                "predicted_s": predicted,
                "ratio": measured / predicted,
                "within_bound": 1 / BOUND < measured / predicted < BOUND,
            }
        )
        print(json.dumps(rows[-1]))
    return rows


if __name__ == "__main__":
    main()
