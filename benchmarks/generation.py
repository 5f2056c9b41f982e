"""Generation throughput: mechdiff's batched KV-cached generate beside TransformerLens' and
``transformers``' own ``generate`` on the same weights (the organism target, exported with save_hf).

    python -m benchmarks.generation [--n 64] [--new 64] [--device cpu] [--dtype float32]

Every engine decodes greedily for exactly ``--new`` tokens (no early stop) so the token counts
match; the table prints tokens/s and the ratio to mechdiff at batch 1 and batch 64.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from benchmarks import mean_seconds  # noqa: E402
from mechdiff.generation import generate  # noqa: E402
from mechdiff.models import load_pair  # noqa: E402
from mechdiff.organism import corpus  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="prompts in the batched run")
    parser.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the weights, for all three engines (default float32; use "
                             "bfloat16 on a GPU, as a real run would: half the memory, tensor-core speed)")
    args = parser.parse_args(argv)
    pair = load_pair("organism", device=args.device, dtype=args.dtype)
    model = pair.target
    prompts = corpus.problems(args.n, "test")["input_ids"]
    with tempfile.TemporaryDirectory() as tmp:
        _, target_dir = pair.save_hf(tmp)
        hf = AutoModelForCausalLM.from_pretrained(target_dir, dtype=pair.target.cfg.dtype)
        hf = hf.to(args.device).eval()
    rows = []
    for batch in (1, args.n):
        batch_prompts = prompts[:batch]
        tokens = torch.tensor(batch_prompts, device=args.device)  # organism prompts share a length
        n_tok = batch * args.new
        engines = {
            "mechdiff.generate": lambda: generate(model, batch_prompts, args.new, eos_token_id=-1,
                                                  batch_size=batch),
            "TransformerLens generate": lambda: model.generate(
                tokens, max_new_tokens=args.new, do_sample=False, stop_at_eos=False, verbose=False,
                use_past_kv_cache=True),
            "transformers generate": lambda: hf.generate(
                tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=args.new,
                min_new_tokens=args.new, do_sample=False, pad_token_id=0),
        }
        with torch.no_grad():
            times = {name: mean_seconds(fn) for name, fn in engines.items()}
        ours = n_tok / times["mechdiff.generate"]
        for name, seconds in times.items():
            rows.append((batch, name, n_tok / seconds, (n_tok / seconds) / ours))
    print(f"{'batch':>5}  {'engine':<26} {'tokens/s':>10}  {'vs mechdiff':>11}")
    for batch, name, tps, ratio in rows:
        print(f"{batch:>5}  {name:<26} {tps:>10.0f}  {ratio:>10.2f}x")


if __name__ == "__main__":
    main()
