"""circuit-tracer's side of ``benchmarks.peer_circuit_tracer``; runs in circuit-tracer's own venv.

Imports circuit-tracer, TransformerLens and torch only (never mechdiff: its venv has neither
mechdiff nor transformers 5). Reads what ``benchmarks.peer_circuit_tracer`` wrote to ``DATA``:

* ``model_cfg.json`` + ``model.safetensors``: the HookedTransformer's config and parameters;
* ``adapters.safetensors``: the per-layer transcoders (``{L}.W_enc`` as ``[d_model, d_sae]``,
  ``{L}.b_enc``, ``{L}.W_dec``, ``{L}.b_dec``) and their TopK ``k``;
* ``prompt.safetensors``: the prompt, the target token and mechdiff's logits;
* ``tokenizer/``.

It builds a ``TransformerLensReplacementModel`` whose MLP outputs are the base MLP's plus the
transcoder's (the adapted model mechdiff attributes), checks that its logits equal mechdiff's,
then times ``circuit_tracer.attribute`` once (after a short warm-up) and prints one JSON line.

    circuit-tracer-venv/bin/python benchmarks/peer_circuit_tracer_worker.py DATA \\
        --max-feature-nodes 256 --batch-size 64 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn


class TopKReLU(nn.Module):
    """mechdiff's TopK activation: the k largest pre-activations, negative ones set to zero."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = x.topk(min(self.k, x.shape[-1]), dim=-1)
        return torch.zeros_like(x).scatter(-1, top.indices, top.values.relu())


def rss_gib() -> float:
    """This process' resident memory now, GiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def build(data: Path):
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from circuit_tracer.transcoder.single_layer_transcoder import (
        SingleLayerTranscoder,
        TranscoderSet,
    )
    from transformer_lens import HookedTransformerConfig
    from transformers import PreTrainedTokenizerFast

    raw = json.loads((data / "model_cfg.json").read_text())
    known = {f.name for f in dataclasses.fields(HookedTransformerConfig) if f.init}
    dropped = sorted(k for k in raw if k not in known)
    kwargs = {k: v for k, v in raw.items() if k in known}
    kwargs["dtype"] = getattr(torch, kwargs.get("dtype", "float32").replace("torch.", ""))
    kwargs["device"] = "cpu"
    cfg = HookedTransformerConfig(**kwargs)

    adapters = load_file(str(data / "adapters.safetensors"))
    meta = json.loads((data / "adapters.json").read_text())
    transcoders = {}
    for layer in range(cfg.n_layers):
        tc = SingleLayerTranscoder(
            cfg.d_model, meta["d_sae"], TopKReLU(meta["k"]), layer, device=torch.device("cpu"), dtype=cfg.dtype
        )
        with torch.no_grad():
            tc.W_enc.copy_(adapters[f"{layer}.W_enc"].T)
            tc.b_enc.copy_(adapters[f"{layer}.b_enc"])
            tc.W_dec.copy_(adapters[f"{layer}.W_dec"])
            tc.b_dec.copy_(adapters[f"{layer}.b_dec"])
        transcoders[layer] = tc
    tset = TranscoderSet(
        transcoders,
        feature_input_hook="ln2.hook_normalized",
        feature_output_hook="hook_mlp_out",
        scan="mechdiff-peer-benchmark",
    )
    # transformers 5 writes tokenizer_class "TokenizersBackend", unknown to 4.57: the fast
    # tokenizer from tokenizer.json, with the special tokens of the saved config
    saved = json.loads((data / "tokenizer" / "tokenizer_config.json").read_text())
    specials = {k: saved[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if saved.get(k)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(data / "tokenizer" / "tokenizer.json"), **specials)
    # token ids are passed in, never text: no BOS handling needed (TransformerLens asks for these)
    tokenizer.init_kwargs.update(name_or_path=str(data / "tokenizer"), add_bos_token=True)
    model = TransformerLensReplacementModel.from_config(cfg, tset, tokenizer=tokenizer)

    state = load_file(str(data / "model.safetensors"))
    own = model.state_dict()
    renamed = {}
    for key, value in state.items():  # circuit-tracer wraps each MLP and the unembedding
        for old, new in ((".mlp.", ".mlp.old_mlp."), ("unembed.", "unembed.old_unembed.")):
            if key not in own and key.replace(old, new) in own:
                key = key.replace(old, new)
        renamed[key] = value
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    missing = [
        k
        for k in missing
        if not k.startswith("transcoders.") and not k.endswith(("mask", "IGNORE", "rotary_sin", "rotary_cos"))
    ]
    if missing or unexpected:
        raise SystemExit(
            f"state dict does not fit circuit-tracer's model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    adapted = {"on": True}  # the adapted model: base MLP + transcoder (off: the base model)
    for layer, block in enumerate(model.blocks):
        block.mlp.old_mlp.register_forward_hook(
            lambda module, inputs, output, tc=tset[layer]: output + tc(inputs[0]) if adapted["on"] else output
        )
    return model, dropped, adapted


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--max-feature-nodes", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from circuit_tracer import attribute

    model, dropped, adapted = build(args.data)
    prompt = load_file(str(args.data / "prompt.safetensors"))
    tokens, target = prompt["tokens"].long(), prompt["target"].long()
    if not torch.equal(model.ensure_tokenized(tokens).cpu(), tokens):
        raise SystemExit("circuit-tracer would prepend a token to this prompt: the prompts would differ")
    with torch.no_grad():
        logits = model(tokens[None])[0]
        adapted["on"] = False  # how much the transcoders move the logits: the check is not vacuous
        effect = float((model(tokens[None])[0] - logits).abs().max())
        adapted["on"] = True
    diff = float((logits - prompt["logits"].to(logits.dtype)).abs().max())
    scale = float(prompt["logits"].abs().max())
    kw = dict(attribution_targets=target, batch_size=args.batch_size, max_feature_nodes=args.max_feature_nodes)
    attribute(tokens[: args.warmup_tokens], model, **{**kw, "max_feature_nodes": 16})
    before = rss_gib()
    c0, w0 = time.process_time(), time.perf_counter()
    graph = attribute(tokens, model, **kw)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    n_targets = len(graph.logit_targets)
    n_features = int(graph.selected_features.shape[0])
    print(
        json.dumps(
            {
                "side": "circuit_tracer",
                "cpu_s": cpu,
                "wall_s": wall,
                "threads": torch.get_num_threads(),
                "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                "rss_before_gib": before,
                "logits_max_abs_diff": diff,
                "logits_max_abs": scale,
                "transcoder_logit_effect": effect,
                "n_pos": int(tokens.shape[0]),
                "n_active": int(graph.active_features.shape[0]),
                "n_features": n_features,
                "n_targets": n_targets,
                "n_backward": math.ceil(n_targets / args.batch_size) + math.ceil(n_features / args.batch_size),
                "cfg_fields_dropped": dropped,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
