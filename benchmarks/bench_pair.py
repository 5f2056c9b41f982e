"""The model pair a benchmark loads: the pair named by ``--pair``, except that SmolLM2 without a
cached fine-tune falls back to its base model on both sides (cost does not depend on training).

Not run as a doctest: it loads a model pair.
    >>> pair, note = load_bench_pair(args)  # doctest: +SKIP
"""

from __future__ import annotations


def load_bench_pair(args) -> tuple[object, str]:
    """``(pair, note)``; the note says which models were loaded."""
    from mechdiff.cli import load_pair_from_args

    if args.pair.startswith("smollm2"):
        from mechdiff.models import ModelPair
        from mechdiff.real import smollm2

        try:
            return load_pair_from_args(args), "fine-tune cached: the real pair"
        except FileNotFoundError:
            load = dict(dtype=args.dtype, device=args.device)
            base = smollm2.load_smollm2(**load)
            pair = ModelPair(
                base,
                smollm2.load_smollm2(**load),
                base.tokenizer,
                {"workload": "chat", "base_name": "smollm2-base", "target_name": "smollm2-base"},
            )
            return pair, "no fine-tune cached: the base model on both sides (cost does not depend on training)"
    return load_pair_from_args(args), "the pair as loaded"
