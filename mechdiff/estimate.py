"""Memory and FLOPs estimates for a pair and settings: adapter or LoRA training, attribution
graphs, generation. ``python -m mechdiff.estimate --help``; ``--measure`` runs the workload on a
local pair and prints predicted next to measured.

Memory is counted per rank (a data-parallel rank holds a full replica; ``n_devices`` splits the
layers of one replica, so each of its devices holds ~1/n of it). Activation memory uses the
per-token counts of tensors autograd saves in TransformerLens 3.9 with frozen weights, measured
with ``torch.autograd.graph.saved_tensors_hooks`` on models of several shapes (within ~25%):

* a layer whose output needs gradients: ``4.5 d + 3 h d_head + kv d_head + 3.7 d_mlp + 2.6 h S``
  values (TL materialises the full ``S x S`` attention pattern: the ``h S`` term dominates long
  contexts, and TL has no fused attention); with ``recompute`` (the training objectives'
  ``checkpoint=True``) a block keeps only its input, ``d`` values, and one block's worth is
  rebuilt at a time in backward, for one more forward of every block that had gradients;
* the same layer in the adapter objective's lean blocks (:mod:`mechdiff.training.lean_blocks`:
  fused attention, no weight copies): ``2 d + 2 (h + kv) d_head + h + 2 d_mlp + 4 d_head + S / 4``
  (the last term: the boolean padding mask, ``S`` bytes per token);
* an adapter: ``1.5 d + d_sae``; a LoRA layer adds ``3 d + d_mlp``;
* the logits of a KL/CE loss: ``2.5 V`` fp32 values, plus ~3 V fp32 of transients.

Time adds a roofline for the matmuls, ``max(flops / (peak * mfu), weight and cache bytes /
bandwidth)``, the elementwise traffic (~4x the saved activations in training) over the bandwidth,
and a per-layer-call overhead (Python and launches: it dominates tiny models and decoding).

Example:
    >>> est = estimate(PRESET_SHAPES["qwen2.5-7b"], Workload("generation", batch_size=8))
    >>> round(est.memory["weights"] / 2**30, 1)  # load_pair holds base and target in bf16
    28.4
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

GiB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TASKS = ("adapters", "lora", "attribution", "generation")
RESIDENT = ("weights", "trained + adam", "adapters")


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need to know about one model of a pair (Qwen2/Llama layout)."""

    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    d_vocab: int
    d_head: int = 0  # 0: d_model // n_heads
    tied: bool = False
    qkv_bias: bool = True  # Qwen2 yes, Llama no

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_heads

    def layer_matmul_params(self) -> int:
        d, hd = self.d_model, self.head_dim
        return 2 * d * self.n_heads * hd + 2 * d * self.n_kv_heads * hd + 3 * d * self.d_mlp

    def params(self, hooked: bool = False) -> int:
        """Parameter count as ``transformers`` has it; ``hooked``: as a TL HookedTransformer holds
        it (zero ``b_O``, ``b_in``, ``b_out``, ``b_U`` and an untied ``W_U`` always)."""
        d, hd, v = self.d_model, self.head_dim, self.d_vocab
        bias = (self.n_heads + 2 * self.n_kv_heads) * hd if self.qkv_bias or hooked else 0
        layer = self.layer_matmul_params() + bias + 2 * d
        if hooked:
            layer += 2 * d + self.d_mlp
        unembed = v * d + (v if hooked else 0) if (hooked or not self.tied) else 0
        return v * d + unembed + self.n_layers * layer + d

    @classmethod
    def from_config(cls, cfg) -> ModelShape:
        """From a ``transformers`` config (or its ``config.json`` as a dict)."""
        get = cfg.get if isinstance(cfg, dict) else lambda k, default=None: getattr(cfg, k, default)
        qwen = "qwen2" in str(get("model_type") or (get("architectures") or [""])[0]).lower()
        n_heads = get("num_attention_heads")
        return cls(
            n_layers=get("num_hidden_layers"),
            d_model=get("hidden_size"),
            d_mlp=get("intermediate_size"),
            n_heads=n_heads,
            n_kv_heads=get("num_key_value_heads") or n_heads,
            d_vocab=get("vocab_size"),
            d_head=get("head_dim") or 0,
            tied=bool(get("tie_word_embeddings", False)),
            qkv_bias=qwen,
        )


# Public configs (config.json of the hub repositories); the pair presets of mechdiff.models.
_QWEN_7B = ModelShape(n_layers=28, d_model=3584, d_mlp=18944, n_heads=28, n_kv_heads=4, d_vocab=152064)
_QWEN_32B = ModelShape(n_layers=64, d_model=5120, d_mlp=27648, n_heads=40, n_kv_heads=8, d_vocab=152064)
PRESET_SHAPES = {
    "qwen2.5-7b": _QWEN_7B,
    "qwen2.5-32b": _QWEN_32B,
    "r1-distill-qwen-7b": _QWEN_7B,
    "s1.1-32b": _QWEN_32B,
}


@dataclass(frozen=True)
class Device:
    name: str
    flops: float  # peak dense FLOP/s at the workload's dtype
    bandwidth: float  # memory bytes/s (elementwise ops, decoding)
    memory: float  # bytes
    mfu: float = 0.4  # share of peak large matmuls reach
    layer_overhead_s: float = 3e-4  # per layer call (launches, Python); GPU value assumed

    @classmethod
    def cpu(cls) -> Device:
        """This machine, measured: fp32 matmul FLOP/s and the overhead of a TL layer call (a
        1-token forward of a 4-layer width-8 model, ~6 layer calls with embed and unembed)."""
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM

        from mechdiff.measure import mean_seconds as timed
        from mechdiff.models import hooked_from_hf

        a, big = torch.randn(1024, 1024), torch.zeros(2**23)
        tiny = hooked_from_hf(
            Qwen2ForCausalLM(
                Qwen2Config(
                    vocab_size=8,
                    hidden_size=8,
                    intermediate_size=8,
                    num_hidden_layers=4,
                    num_attention_heads=2,
                    num_key_value_heads=2,
                )
            ).eval(),
            device="cpu",
        )
        with torch.no_grad():
            overhead = timed(lambda: tiny(torch.zeros(1, 1, dtype=torch.long)), 20) / 6
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return cls(
            "this CPU (measured)",
            2 * 1024**3 / timed(lambda: a @ a, 5),
            3 * big.nbytes / timed(lambda: big.add_(big), 5),
            memory,
            mfu=1.0,
            layer_overhead_s=overhead,
        )


DEVICES = {
    "h100": Device("H100 80GB (bf16 dense)", 989e12, 3.35e12, 80e9),
    "h200": Device("H200 141GB (bf16 dense)", 989e12, 4.8e12, 141e9),
    "a100": Device("A100 80GB (bf16 dense)", 312e12, 2.0e12, 80e9),
}


@dataclass
class Workload:
    """What to run. ``batch_size`` is per rank: sequences per step (training), prompts per batch
    (generation), rows per backward pass (attribution)."""

    task: str
    batch_size: int = 8
    seq_len: int = 2048  # training: tokens per sequence; generation/attribution: prompt tokens
    dtype: str = "bfloat16"
    d_sae: int = 8192
    bridge: bool = True
    lora_rank: int = 1
    kl_weight: float = 0.0
    new_tokens: int = 1024
    feature_nodes: int = 8192
    n_targets: int = 10
    n_devices: int = 1
    recompute: bool = False  # training: blocks recomputed in backward (checkpoint=True)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {self.task!r}")
        if self.dtype not in BYTES:
            raise ValueError(f"dtype must be one of {list(BYTES)}, not {self.dtype!r}")


@dataclass
class Estimate:
    """Per-rank memory by part (bytes), FLOPs and layer calls of one unit of work (a training
    step, one attribution graph, one generation batch)."""

    task: str
    memory: dict[str, float]
    flops: float
    layer_calls: int
    bytes_moved: float = 0.0  # weight and cache reads that bound decoding (overlap the matmuls)
    traffic: float = 0.0  # elementwise memory traffic (activations and their gradients)
    notes: list[str] = field(default_factory=list)
    n_devices: int = 1

    @property
    def peak_bytes(self) -> float:
        return sum(self.memory.values())

    @property
    def working_bytes(self) -> float:
        """What one unit allocates on top of the resident weights and trained parameters."""
        return sum(v for k, v in self.memory.items() if k not in RESIDENT)

    def seconds(self, device: Device) -> float:
        compute = max(self.flops / (device.flops * device.mfu), self.bytes_moved / device.bandwidth)
        return compute + self.traffic / device.bandwidth + self.layer_calls * device.layer_overhead_s

    def report(self, device: Device | None = None) -> str:
        lines = [
            f"{self.task}: peak memory per rank {self.peak_bytes / GiB:.2f} GiB"
            + (
                f" (~{self.peak_bytes / self.n_devices / GiB:.2f} GiB on each of {self.n_devices} devices)"
                if self.n_devices > 1
                else ""
            )
        ]
        lines += [f"  {k:<22} {v / GiB:10.3f} GiB" for k, v in self.memory.items()]
        lines.append(f"  FLOPs per unit {self.flops:.3e}; layer calls {self.layer_calls}")
        if device is not None:
            fits = self.peak_bytes / self.n_devices <= device.memory
            lines.append(
                f"  on {device.name}: ~{self.seconds(device):.3g} s per unit; "
                f"{'fits' if fits else 'DOES NOT FIT'} in {device.memory / GiB:.0f} GiB"
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _full_layer(m: ModelShape, seq: int) -> float:
    hd = m.head_dim
    return 4.5 * m.d_model + (3 * m.n_heads + m.n_kv_heads) * hd + 3.7 * m.d_mlp + 2.6 * m.n_heads * seq


def _lean_layer(m: ModelShape, seq: int) -> float:
    hd = m.head_dim
    return 2 * m.d_model + (2 * (m.n_heads + m.n_kv_heads) + 4) * hd + m.n_heads + 2 * m.d_mlp + seq / 4


def _forward_flops(m: ModelShape, tokens: float, seq: float, layers: float, unembed: bool = True) -> float:
    attn = 4 * seq * m.n_heads * m.head_dim  # QK^T and PV over the full (unmasked) S x S
    return tokens * (layers * (2 * m.layer_matmul_params() + attn) + (2 * m.d_model * m.d_vocab if unembed else 0))


def estimate(m: ModelShape, w: Workload) -> Estimate:
    """Predict per-rank memory and work for ``w`` on a pair of two ``m``-shaped models."""
    b, n, d, hd = BYTES[w.dtype], m.n_layers, m.d_model, m.head_dim
    weights, tok = m.params(hooked=True) * b, w.batch_size * w.seq_len
    full, logits = _full_layer(m, w.seq_len) * b, 4 * m.d_vocab  # per token; logits in fp32
    fwd = _forward_flops(m, tok, w.seq_len, n)
    kw = {"n_devices": w.n_devices}
    if w.task in ("adapters", "attribution"):
        n_trained = n * (2 * d * w.d_sae + w.d_sae + d)
        adapter = (1.5 * d + w.d_sae) * b
        # a layer's saved values: the adapter objective runs lean blocks, attribution TL's own
        layer = _lean_layer(m, w.seq_len) * b if w.task == "adapters" else full
        main = (n - 1) * layer + n * adapter + 2.5 * logits
        ad_flops = tok * n * 4 * d * w.d_sae
        note = "2 model copies (base and target; the hybrid shares their tensors)"
    if w.task == "adapters":
        # blocks with gradients: the adapted model's n, and at the worst cutoff k = 1 the two half
        # passes' n - 1 each (the first is the target's blocks, the second the adapted model's)
        bridged = 2 * (n - 1) if w.bridge else 0
        if w.recompute:  # each block keeps its input; one block's internals at a time in backward
            # outside the blocks: each layer's NMSE error (d) and feature activations (d_sae)
            outside = n * (d + w.d_sae) * b
            saved = tok * ((n + bridged) * d * b + outside + (3 if w.bridge else 1) * 2.5 * logits)
            rebuilt = tok * (layer + adapter)
        else:
            saved = tok * main
            if w.bridge:
                saved += tok * ((2 * n - 3) * layer + (n - 1) * adapter + 2 * 2.5 * logits)
            rebuilt = 0
        memory = {
            "weights": 2 * weights,
            "trained + adam": 12 * n_trained,
            "grads": 4 * n_trained,
            "saved activations": saved,
            "target cache": tok * ((n + 1) * d + m.d_vocab) * b,
            # a block's backward allocates about a TransformerLens layer's intermediates, lean or not
            "transients": tok * (3 * logits + full) + rebuilt,
        }
        half = _forward_flops(m, tok, w.seq_len, n / 2) if w.bridge else 0
        flops = fwd + 2 * (fwd + 2 * half) + 3 * ad_flops * (1.5 if w.bridge else 1)
        calls = 4 * n if w.bridge else 2 * n + n // 2  # forwards, plus cheaper backwards
        if w.recompute:  # the forwards of every block with gradients, again
            flops += (
                _forward_flops(m, tok, w.seq_len, n, unembed=False) + 2 * half + ad_flops * (1.5 if w.bridge else 1)
            )
            calls += n + (n if w.bridge else 0)
        return Estimate(w.task, memory, flops, calls, traffic=4 * saved, notes=[note], **kw)
    if w.task == "lora":
        # r x (in + out) for q, k, v, o, gate, up, down
        n_trained = n * w.lora_rank * (7 * d + 2 * (m.n_heads + m.n_kv_heads) * hd + 3 * m.d_mlp)
        block = full + (3 * d + m.d_mlp) * b  # a block's saved values with its LoRA layer
        saved = tok * ((n * d * b if w.recompute else n * block) + 2.5 * logits)
        memory = {
            "weights": 3 * weights,
            "trained + adam": 12 * n_trained,
            "grads": 4 * n_trained,
            "saved activations": saved,
            "transients": tok * (3 * logits + (m.d_vocab * b if w.kl_weight else 0) + (block if w.recompute else 0)),
        }
        note = "3 model copies (base, target, the LoRA's copy of base); kl_weight 0 needs no target"
        again = _forward_flops(m, tok, w.seq_len, n, unembed=False) if w.recompute else 0
        return Estimate(
            w.task,
            memory,
            2 * fwd + (fwd if w.kl_weight else 0) + again,
            3 * n + (n if w.kl_weight else 0) + (n if w.recompute else 0),
            traffic=4 * saved,
            notes=[note],
            **kw,
        )
    if w.task == "attribution":
        nodes = w.feature_nodes + w.seq_len + w.n_targets
        passes = math.ceil((w.n_targets + w.feature_nodes) / w.batch_size)
        memory = {
            "weights": 2 * weights,
            "adapters": 4 * n_trained,
            "saved activations": tok * main,
            "transients": tok * 2 * full,
            "graph (adjacency)": 4 * nodes * nodes,
        }
        return Estimate(
            w.task,
            memory,
            (fwd + ad_flops) * (1 + passes),
            n * (1 + passes),
            traffic=2 * (1 + passes) * tok * main,
            notes=[note],
            **kw,
        )
    # generation: KV-cached decoding of batch_size prompts of seq_len tokens
    kv = 2 * n * w.batch_size * (w.seq_len + w.new_tokens) * m.n_kv_heads * hd * b
    memory = {
        "weights": 2 * weights,
        "kv cache": kv * (1 + 1 / n),  # + one layer's torch.cat copy
        "prefill logits": tok * m.d_vocab * b,
        "transients": tok * (2 * m.n_heads * w.seq_len + 3 * m.d_mlp) * b,
    }
    flops = fwd + _forward_flops(m, w.batch_size * w.new_tokens, w.seq_len + w.new_tokens / 2, n)
    note = (
        "load_pair holds base and target; TL returns prefill logits at every prompt position "
        "(B x P x V): only the last is used"
    )
    return Estimate(
        w.task,
        memory,
        flops,
        (n + 3) * (1 + w.new_tokens),
        bytes_moved=w.new_tokens * (weights + kv / 2),
        notes=[note],
        **kw,
    )


def shape_of(pair: str = "organism", base: str | None = None) -> ModelShape:
    """The shape of a pair: a preset (known configs, no download), the organism or a folder."""
    if pair in PRESET_SHAPES:
        return PRESET_SHAPES[pair]
    from mechdiff.models import ORGANISM_DIR

    folder = Path(base) if pair == "custom" and base else ORGANISM_DIR / "target"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    return ModelShape.from_config(json.loads((folder / "config.json").read_text()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mechdiff.estimate", description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", default="organism", help=f"organism, custom, or a preset: {list(PRESET_SHAPES)}")
    p.add_argument("--base", help="with --pair custom: a model folder (its config.json is read)")
    p.add_argument("--task", choices=TASKS, nargs="+", default=list(TASKS))
    p.add_argument("--device", default="cpu", help="cpu (times: this machine, measured) or cuda")
    p.add_argument("--gpu", choices=sorted(DEVICES), default="h100", help="GPU profile on cuda")
    p.add_argument("--dtype", choices=sorted(BYTES), help="default: bfloat16 on cuda, else float32")
    p.add_argument("--n-devices", type=int, default=1, help="devices one replica's layers are split over")
    for name, default in (
        ("batch-size", 8),
        ("seq-len", 2048),
        ("d-sae", 8192),
        ("lora-rank", 1),
        ("new-tokens", 1024),
        ("feature-nodes", 8192),
        ("n-targets", 10),
    ):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--kl-weight", type=float, default=0.0)
    p.add_argument("--no-bridge", action="store_true", help="adapter loss without bridging")
    p.add_argument(
        "--recompute", action="store_true", help="training recomputes each block in backward (checkpoint=True)"
    )
    p.add_argument("--measure", action="store_true", help="also run it on the pair and compare")
    p.add_argument("--units", type=int, default=2, help="timed units with --measure")
    args = p.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    shape = shape_of(args.pair, args.base)
    device = DEVICES[args.gpu] if args.device.startswith("cuda") else Device.cpu()
    pair = None
    if args.measure:
        from mechdiff.models import load_pair

        kw = {"base": args.base, "target": args.base} if args.pair == "custom" else {}
        pair = load_pair(args.pair, dtype=dtype, device=args.device, n_devices=args.n_devices, **kw)
    keys = (
        "batch_size",
        "seq_len",
        "d_sae",
        "lora_rank",
        "kl_weight",
        "new_tokens",
        "feature_nodes",
        "n_targets",
        "n_devices",
    )
    loads = [
        Workload(
            t, dtype=dtype, bridge=not args.no_bridge, recompute=args.recompute, **{k: getattr(args, k) for k in keys}
        )
        for t in args.task
    ]
    from mechdiff.estimate_check import measure_memory, measure_time

    got = [measure_memory(pair, w) for w in loads] if pair else []  # memory first: see its doc
    got = [{**g, "seconds": measure_time(pair, w, args.units)} for g, w in zip(got, loads)]
    for i, w in enumerate(loads):
        est = estimate(shape, w)
        print(est.report(device))
        if got:
            m = got[i]
            print(
                f"  measured: {m['seconds']:.3g} s per unit (predicted {est.seconds(device):.3g}"
                f"); memory above resident {m['memory_growth'] / GiB:.3f} GiB (predicted "
                f"{est.working_bytes / GiB:.3f}); autograd saved {m['saved_bytes'] / GiB:.3f} "
                f"GiB (predicted {est.memory.get('saved activations', 0) / GiB:.3f})"
            )


if __name__ == "__main__":
    main()
