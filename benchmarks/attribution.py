"""Attribution-graph cost: time, peak memory and backward passes to build a graph for 32-, 64- and
128-token organism prompts, beside one forward + backward of the adapted model on the same prompt.

    python -m benchmarks.attribution [--lengths 32 64 128] [--batch-size 64] [--max-feature-nodes N]
                                     [--adapters auto|random] [--threads 1] [--json out.json]

Prompts are organism reasoning traces (prompt + ``<think>`` steps with slips and "wait")
concatenated after one BOS and cut to the length. The adapters are the shipped ones
(``load_adapted``) when present, else random ones from ``attribution.synthetic`` (``--d-sae``,
``--density``: the fraction of tokens each feature fires on). The baseline is the adapted model's
training step shape: one forward and a backward of the next-token loss to the adapter weights.

Times are CPU seconds of this process (one torch thread by default, so they measure the work
whatever else runs on the machine; wall seconds are reported beside them). Peak memory is the rise of the process' peak resident set (``VmHWM``, reset before each
measurement, after ``malloc_trim``) over its size before the call (Linux only). The floor of backward passes is
``ceil(rows / batch)``, rows = targets + feature nodes visited.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import random
import time

import torch

from attribution.build import attribute
from attribution.synthetic import randomize_adapters, tiny_adapted
from mechdiff.adapters.transcoder import AdaptedModel
from mechdiff.cli import offline_environment
from mechdiff.models import ORGANISM_DIR, load_pair
from mechdiff.organism import task
from mechdiff.organism.tokenizer import encode_words

_LIBC = ctypes.CDLL("libc.so.6")


def _mem() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def measure(fn, repeats: int) -> tuple[float, float, float, object]:
    """(best wall seconds, best CPU seconds, peak resident-memory rise in bytes, last result) of
    ``fn()``. With one torch thread, CPU time is the work done, whatever else loads the machine."""
    walls, cpus, peak, result = [], [], 0, None
    for _ in range(repeats):
        result = None
        gc.collect()
        _LIBC.malloc_trim(0)  # hand freed heap back, so the rise measures this call's peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _mem()["VmRSS"]
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        peak = max(peak, _mem()["VmHWM"] - before)
    return min(walls), min(cpus), peak, result


def organism_prompt(tokenizer, length: int, seed: int = 0) -> torch.Tensor:
    """Reasoning traces after one BOS, cut to ``length`` tokens (random words for a tokenizer that
    is not the organism's)."""
    rng, vocab = random.Random(seed), tokenizer.get_vocab()
    if "wait" not in vocab:
        words = [w for w in vocab if not w.startswith("<")]
        return torch.tensor(tokenizer.convert_tokens_to_ids(["<bos>"] + rng.choices(words, k=length - 1)))
    words = ["<bos>"]
    for problem in task.DEFAULT.sample_problems(64, "test", seed):
        prompt, _ = task.DEFAULT.prompt(problem)
        trace, _ = task.DEFAULT.reasoning_trace(problem, rng)
        words += [w for w in prompt[1:] + trace if w in vocab]  # (a model of an older task version)
        if len(words) >= length:
            return torch.tensor(encode_words(tokenizer, words[:length]))
    raise ValueError(f"could not build a {length}-token prompt from this tokenizer's vocabulary")


def load_adapted_model(args) -> tuple[AdaptedModel, str]:
    if args.random_model:
        adapted = tiny_adapted(
            seed=0,
            dtype=getattr(torch, args.dtype),
            n_layers=3,
            d_model=128,
            d_mlp=512,
            d_sae=args.d_sae,
            vocab=26,
            density=args.density,
            dec_norm=0.5,
            n_ctx=512,
        )
        if args.device:
            # TransformerLens' .to updates cfg.device; the adapters, submodules of the blocks, move along
            adapted.model.to(args.device, print_details=False)
        return adapted, f"random organism-shaped model (n_ctx 512), random adapters (d_sae={args.d_sae})"
    where = dict(device=args.device, dtype=args.dtype)
    if args.base:
        pair = load_pair("custom", base=args.base, target=args.target or args.base, **where)
    else:
        pair = load_pair("organism", **where)
    if args.adapters == "auto":
        try:
            from mechdiff.adapters.formats import load_adapted

            return load_adapted(pair), "shipped"
        except Exception as err:  # noqa: BLE001 - any reason means: fall back, and say why
            print(f"[shipped adapters unavailable: {type(err).__name__}: {str(err)[:120]}]")
    torch.manual_seed(0)  # the encoder's initialisation
    adapted = AdaptedModel.from_pair(pair, d_sae=args.d_sae)
    tokens = torch.stack([organism_prompt(pair.tokenizer, 64, seed) for seed in range(4)])
    randomize_adapters(adapted, seed=0, density=args.density, tokens=tokens)
    return adapted, f"random (d_sae={args.d_sae}, density={args.density})"


def forward_backward(adapted: AdaptedModel, tokens: torch.Tensor):
    def step():
        adapted.zero_grad(set_to_none=True)
        loss = adapted.model(tokens[None], return_type="loss")
        loss.backward()
        return float(loss.detach())

    return step


def main(argv: list[str] | None = None) -> None:
    offline_environment()  # set in main, never at import
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-feature-nodes", type=int, default=None, help="default: every feature")
    parser.add_argument("--prefix-buckets", type=int, default=8)
    parser.add_argument("--expand", action="store_true", help="repeat the prompt along the batch (no vmap)")
    parser.add_argument(
        "--random-model", action="store_true", help="a random organism-shaped model with n_ctx 512, for longer prompts"
    )
    parser.add_argument("--adapters", choices=["auto", "random"], default="auto")
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: shared 2-core box)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--base", default=None, help="custom pair: base HF folder (default: organism)")
    parser.add_argument("--target", default=None)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument(
        "--device",
        default=None,
        help="torch device: cpu, cuda, cuda:1 ... (default: cuda when available, else "
        "cpu). Peak memory is the host's resident set: on a GPU it leaves out "
        "device memory",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the models and adapters (default float32; use bfloat16 on a GPU, as "
        "a real run would: half the memory, tensor-core speed)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    adapted, kind = load_adapted_model(args)
    cfg = adapted.model.cfg
    print(
        f"model: {cfg.model_name} ({cfg.n_layers} layers, d_model {cfg.d_model}, n_ctx {cfg.n_ctx}); "
        f"adapters: {kind}; threads {torch.get_num_threads()}; batch {args.batch_size}; "
        f"max_feature_nodes {args.max_feature_nodes}; prefix buckets {args.prefix_buckets}; "
        f"{'expanded batch' if args.expand else 'vmapped backward'}"
    )
    warm = organism_prompt(adapted.model.tokenizer, 16)
    attribute(adapted, warm, batch_size=8)
    rows = []
    for length in args.lengths:
        if length > cfg.n_ctx:
            raise SystemExit(f"--lengths: {length} exceeds the model's n_ctx {cfg.n_ctx}")
        tokens = organism_prompt(adapted.model.tokenizer, length)
        fb_wall, fb_cpu, fb_mem, _ = measure(forward_backward(adapted, tokens), 5)
        wall, cpu, mem, graph = measure(
            lambda tokens=tokens: attribute(
                adapted,
                tokens,
                batch_size=args.batch_size,
                max_feature_nodes=args.max_feature_nodes,
                prefix_buckets=args.prefix_buckets,
                vmap=not args.expand,
            ),
            args.repeats,
        )
        meta = graph.meta
        rows.append(
            {
                "tokens": length,
                "active_features": graph.info["n_active"],
                "feature_nodes": graph.n_features,
                "targets": graph.n_targets,
                "rows": meta["n_rows"],
                "batch": meta["batch_size"],
                "backward_passes": meta["n_backward"],
                "floor": math.ceil(meta["n_rows"] / meta["batch_size"]),
                "graph_wall_s": round(wall, 3),
                "graph_cpu_s": round(cpu, 3),
                "graph_peak_mb": round(mem / 2**20, 1),
                "fwd_bwd_wall_s": round(fb_wall, 4),
                "fwd_bwd_cpu_s": round(fb_cpu, 4),
                "fwd_bwd_peak_mb": round(fb_mem / 2**20, 1),
                "cpu_ratio": round(cpu / fb_cpu, 1),
                "cpu_ratio_per_backward": round(cpu / fb_cpu / meta["n_backward"], 2),
                "cpu_ms_per_row": round(1e3 * cpu / meta["n_rows"], 2),
                "memory_ratio": round(mem / max(fb_mem, 1), 1),
            }
        )
        r = rows[-1]
        print(
            f"{length:4d} tok: {r['active_features']:6d} active, {r['rows']:6d} rows, "
            f"{r['backward_passes']:4d} backward passes (floor {r['floor']}); graph {r['graph_cpu_s']:.2f} s CPU "
            f"({r['graph_wall_s']:.2f} s wall), {r['graph_peak_mb']:.0f} MB; fwd+bwd {r['fwd_bwd_cpu_s'] * 1e3:.1f} ms "
            f"CPU, {r['fwd_bwd_peak_mb']:.1f} MB; graph / fwd+bwd: {r['cpu_ratio']}x CPU time "
            f"({r['cpu_ratio_per_backward']}x per backward pass), {r['memory_ratio']}x memory",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "adapters": kind,
                    "model": str(cfg.model_name),
                    "organism_dir": str(ORGANISM_DIR),
                    "threads": torch.get_num_threads(),
                    "rows": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
