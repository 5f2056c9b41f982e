"""Generation throughput: mechdiff's generate (hooks live) beside transformers' and TransformerLens'.

    python -m benchmarks.generation [--models organism,smollm2] [--batches 1,64] [--new 64]
                                    [--repeats 3] [--threads 1] [--json] [--device cpu] [--dtype float32]

For each model (the organism's target; SmolLM2-135M-Instruct, which needs the ``[real]`` extra)
and batch size, on the same weights and the same left-padded prompts, three engines decode
greedily for exactly ``--new`` tokens (no early stop):

* ``mechdiff``: :func:`mechdiff.generation.generate` (static KV cache) with an identity hook on
  every layer's ``hook_mlp_out`` and ``hook_resid_post`` (hooks live: each one runs every step);
* ``transformers``: ``model.generate`` of the same weights as a ``transformers`` model (KV cache);
* ``transformer_lens``: TransformerLens' own KV-cached forward (``generate(..., fast=False)``,
  mechdiff's previous path: TransformerLens' ``HookedTransformer.generate`` takes no padding
  mask), with the same hooks.

Runs are interleaved (engine after engine, ``--repeats`` rounds after a warm-up) and each
engine's best round counts, so a shared machine's load hits all of them alike. ``--json`` prints
one object: per model and batch ``ratio_vs_hf`` (mechdiff tokens/s over transformers') and
``ratio_vs_tl``, the tokens/s, and whether the greedy outputs are equal.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from mechdiff.cli import UsageError, offline_environment, run


def _models(name: str, device: str, dtype: str):
    """``(hooked, hf_model, prompts)`` with the same weights."""
    from transformers import AutoModelForCausalLM

    if name == "organism":
        from mechdiff.models import load_pair
        from mechdiff.organism import corpus

        pair = load_pair("organism", device=device, dtype=dtype)
        with tempfile.TemporaryDirectory() as tmp:
            _, target_dir = pair.save_hf(tmp)
            hf = AutoModelForCausalLM.from_pretrained(target_dir, dtype=pair.target.cfg.dtype)
        return pair.target, hf.to(device).eval(), corpus.problems(512, "test")["input_ids"]
    if name == "smollm2":
        from mechdiff.real import smollm2
        from mechdiff.workloads import get

        hf, tok = smollm2.load_hf(dtype=dtype, device=device)
        hooked = smollm2.load_smollm2(dtype=dtype, device=device)
        return hooked, hf, get("chat", tok).problems(512, "test")["input_ids"]
    raise UsageError(f"unknown model {name!r}: choose organism or smollm2")


def _hf_generate(hf, prompts, new: int, pad_id: int):
    import torch

    from mechdiff.padding import pad

    tokens, mask = pad(prompts, pad_id, side="left")
    device = next(hf.parameters()).device
    out = hf.generate(
        tokens.to(device),
        attention_mask=mask.long().to(device),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=None,
    )
    with torch.no_grad():
        return out[:, tokens.shape[1] :].tolist()


def measure(name: str, batches: list[int], new: int, repeats: int, device: str, dtype: str) -> dict:
    from mechdiff.generation import generate

    hooked, hf, prompts = _models(name, device, dtype)
    pad_id = hooked.tokenizer.pad_token_id or 0
    n = hooked.cfg.n_layers
    hooks = [(f"blocks.{i}.{p}", lambda x, hook: x) for i in range(n) for p in ("hook_mlp_out", "hook_resid_post")]
    result = {}
    for batch in batches:
        rows = [list(p) for p in prompts[:batch]]
        engines = {
            "mechdiff": lambda: generate(
                hooked, rows, new, eos_token_id=-1, pad_token_id=pad_id, batch_size=batch, fwd_hooks=hooks
            ),
            "transformers": lambda: _hf_generate(hf, rows, new, pad_id),
            "transformer_lens": lambda: generate(
                hooked, rows, new, eos_token_id=-1, pad_token_id=pad_id, batch_size=batch, fwd_hooks=hooks, fast=False
            ),
        }
        outputs = {engine: fn() for engine, fn in engines.items()}  # warm-up, and the tokens compared
        best = dict.fromkeys(engines, float("inf"))
        for _ in range(repeats):
            for engine, fn in engines.items():
                t0 = time.perf_counter()
                fn()
                best[engine] = min(best[engine], time.perf_counter() - t0)
        tps = {engine: batch * new / seconds for engine, seconds in best.items()}
        result[str(batch)] = {
            "tokens_per_s": tps,
            "seconds": best,
            "ratio_vs_hf": tps["mechdiff"] / tps["transformers"],
            "ratio_vs_tl": tps["mechdiff"] / tps["transformer_lens"],
            "equal_to_hf": outputs["mechdiff"] == outputs["transformers"],
            "equal_to_tl": outputs["mechdiff"] == outputs["transformer_lens"],
            "prompt_lengths": sorted({len(r) for r in rows}),
        }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.generation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", default="organism,smollm2", help="comma-separated: organism, smollm2")
    parser.add_argument("--batches", default="1,64", help="comma-separated batch sizes (default 1,64)")
    parser.add_argument("--new", type=int, default=64, help="new tokens per prompt (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per engine (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1 ...")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the weights, for all engines (default float32; bfloat16 on a GPU)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    args = parser.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise UsageError(f"--batches takes comma-separated integers, not {args.batches!r}") from None
    import torch

    torch.set_num_threads(args.threads)
    report = {
        "threads": torch.get_num_threads(),
        "new_tokens": args.new,
        "device": args.device,
        "dtype": args.dtype,
        "models": {},
    }
    for name in args.models.split(","):
        report["models"][name] = measure(name, batches, args.new, args.repeats, args.device, args.dtype)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"greedy, {args.new} new tokens, {report['threads']} thread(s), {args.device} {args.dtype}")
    print(
        f"{'model':<9} {'batch':>5} {'mechdiff':>10} {'transformers':>13} {'TL cached':>10} "
        f"{'vs HF':>6} {'vs TL':>6}  equal to HF / TL"
    )
    for name, rows in report["models"].items():
        for batch, r in rows.items():
            t = r["tokens_per_s"]
            print(
                f"{name:<9} {batch:>5} {t['mechdiff']:>10.0f} {t['transformers']:>13.0f} "
                f"{t['transformer_lens']:>10.0f} {r['ratio_vs_hf']:>5.2f}x {r['ratio_vs_tl']:>5.2f}x  "
                f"{r['equal_to_hf']} / {r['equal_to_tl']}"
            )


if __name__ == "__main__":
    offline_environment()
    run(main)
