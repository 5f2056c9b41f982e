"""mechdiff's attribution graph beside circuit-tracer 0.5.0's on the same model, transcoders, prompt.

    python -m benchmarks.peer_circuit_tracer [--pair smollm2|organism] [--repeats 3] [--json]

circuit-tracer needs transformers <= 4.57.3, mechdiff transformers 5, so circuit-tracer lives in a
venv of its own under the user's cache (``$MECHDIFF_CACHE/circuit-tracer-venv``, default
``~/.cache/mechdiff/circuit-tracer-venv``), built on first use: the torch of this venv (from the
local wheel cache), then ``circuit-tracer==0.5.0``. Nothing of it enters the repository.

What is compared:

* model: SmolLM2-135M-Instruct from the ``[real]`` GGUF (``--pair smollm2``; the base model, as
  speed does not depend on fine-tuning and no fine-tune needs to be cached), or the organism's
  hybrid (``--pair organism``, a quick check);
* transcoders: one per layer, ``--d-sae`` (512) TopK-``--k`` (8) features reading the MLP input
  and adding to the MLP output, random weights (:func:`attribution.synthetic.randomize_adapters`,
  seed 0): cost does not depend on training. circuit-tracer gets the same weights, and a model
  whose MLP output is the base MLP's plus the transcoder's: the adapted model mechdiff explains.
  The run checks both compute the same logits;
* prompt: the first chat trace with a "Wait" cut right before it; target: that token
  (demeaned unembedding on both sides); node cap ``--max-feature-nodes`` (256), ``--batch-size``
  (64), ``--threads`` (1); both rank features once after the target rows.

Each measurement is a fresh process (mechdiff's and circuit-tracer's interleaved, ``--repeats``
times each, the order alternating), timed around the graph alone after a short warm-up: CPU
seconds (``time.process_time``; with one thread the work done, whatever else loads the machine)
and peak resident memory of the process (``ru_maxrss``, model included). Printed: the median of
each side and their ratio; ``--json``: one JSON object (``mechdiff_cpu_s``,
``circuit_tracer_cpu_s``, ``ratio``, ``mechdiff_peak_gib``, ``circuit_tracer_peak_gib``, runs).

The graphs answer the same question at different cost: mechdiff keeps the base MLPs, linearized,
in the backward pass (edges go through them; no error nodes), circuit-tracer detaches each MLP
output into an error node (backward passes cross attention and residual only).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VERSION = "0.5.0"
WORKER = Path(__file__).with_name("peer_circuit_tracer_worker.py")


def venv_dir() -> Path:
    """``$MECHDIFF_CACHE/circuit-tracer-venv`` (default ``~/.cache/mechdiff/circuit-tracer-venv``)."""
    root = os.environ.get("MECHDIFF_CACHE") or Path.home() / ".cache" / "mechdiff"
    return Path(root).expanduser() / "circuit-tracer-venv"


def ensure_venv(folder: Path, rebuild: bool = False) -> Path:
    """The python of a venv holding circuit-tracer ``VERSION``, built when missing (minutes)."""
    python = folder / "bin" / "python"
    check = [str(python), "-c", "import importlib.metadata as m, circuit_tracer; print(m.version('circuit-tracer'))"]
    if python.exists() and not rebuild:
        done = subprocess.run(check, capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip() == VERSION:
            return python
    import torch

    torch_version = torch.__version__.split("+")[0]
    print(
        f"[building circuit-tracer {VERSION} in {folder}: torch {torch_version}, then circuit-tracer]",
        file=sys.stderr,
        flush=True,
    )
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, f"torch=={torch_version}"], check=True)
    subprocess.run([*pip, f"circuit-tracer=={VERSION}"], check=True)
    done = subprocess.run(check, capture_output=True, text=True)
    if done.returncode != 0 or done.stdout.strip() != VERSION:
        raise SystemExit(f"circuit-tracer {VERSION} did not install in {folder}: {done.stderr[-400:]}")
    return python


# --------------------------------------------------------------------------- mechdiff side


def adapted_model(pair: str, d_sae: int, k: int):
    """The model both sides explain, with random TopK adapters (seed 0), and what it is."""
    import torch

    from attribution.synthetic import randomize_adapters
    from mechdiff.adapters.transcoder import AdaptedModel, AdapterConfig

    torch.manual_seed(0)
    if pair == "smollm2":
        from mechdiff.real.smollm2 import MODEL_NAME, load_smollm2

        model = load_smollm2()
        cfg = AdapterConfig(
            d_model=model.cfg.d_model,
            d_sae=d_sae,
            n_layers=model.cfg.n_layers,
            activation="topk",
            k=k,
            base_name=MODEL_NAME,
            target_name=MODEL_NAME,
        )
        adapted, what = AdaptedModel(model, cfg), f"{MODEL_NAME} base (GGUF, dequantized)"
    else:
        from mechdiff.models import load_pair

        adapted = AdaptedModel.from_pair(load_pair("organism"), d_sae, "topk", k)
        what = "organism hybrid"
    return randomize_adapters(adapted, seed=0), what


def hesitation_prompt(adapted, pair: str):
    """The first trace with a "wait" token, cut right before it, and that token's id."""
    import torch

    from mechdiff.real.chat import hesitation_token_ids
    from mechdiff.workloads import get

    tokenizer = adapted.model.tokenizer
    ids = set(hesitation_token_ids(tokenizer))
    traces = get("chat" if pair == "smollm2" else "organism", tokenizer).traces(16, "test")
    for row in traces["input_ids"]:
        cut = next((i for i, t in enumerate(row) if i > 0 and t in ids), None)
        if cut is not None:
            return torch.tensor(row[:cut]), int(row[cut])
    raise SystemExit("no test trace holds a hesitation token")


def export(args, data: Path) -> dict:
    """Write the model, adapters, prompt and mechdiff's logits for both workers."""
    import torch
    from safetensors.torch import save_file

    adapted, what = adapted_model(args.pair, args.d_sae, args.k)
    tokens, target = hesitation_prompt(adapted, args.pair)
    model = adapted.model
    cfg = {k: (str(v).replace("torch.", "") if k == "dtype" else v) for k, v in model.cfg.to_dict().items()}
    (data / "model_cfg.json").write_text(json.dumps(cfg, default=str))
    state = {k: v.detach().clone().contiguous() for k, v in model.named_parameters() if ".adapter." not in k}
    save_file(state, str(data / "model.safetensors"))
    weights = {
        f"{la}.{name}": getattr(a, name).detach().clone().contiguous()
        for la, a in enumerate(adapted.adapters)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec")
    }
    save_file(weights, str(data / "adapters.safetensors"))
    (data / "adapters.json").write_text(json.dumps({"d_sae": args.d_sae, "k": args.k}))
    model.tokenizer.save_pretrained(str(data / "tokenizer"))
    with torch.no_grad():
        logits = model(tokens[None])[0]
    save_file(
        {"tokens": tokens, "target": torch.tensor([target]), "logits": logits.contiguous()},
        str(data / "prompt.safetensors"),
    )
    return {"model": what, "n_pos": int(tokens.shape[0]), "target": model.tokenizer.decode([target])}


def mechdiff_run(args, data: Path) -> dict:
    """One timed mechdiff graph on the exported prompt (fresh process; adapters from ``data``)."""
    import torch
    from safetensors.torch import load_file

    from attribution.build import attribute
    from benchmarks.peer_circuit_tracer_worker import rss_gib

    adapted, _ = adapted_model(args.pair, args.d_sae, args.k)
    weights = load_file(str(data / "adapters.safetensors"))
    with torch.no_grad():
        for la, a in enumerate(adapted.adapters):
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(a, name).copy_(weights[f"{la}.{name}"])
    prompt = load_file(str(data / "prompt.safetensors"))
    tokens, target = prompt["tokens"].long(), int(prompt["target"])
    kw = dict(target=target, batch_size=args.batch_size, max_feature_nodes=args.max_feature_nodes)
    attribute(adapted, tokens[:16], **{**kw, "max_feature_nodes": 16})  # warm-up
    before = rss_gib()
    c0, w0 = time.process_time(), time.perf_counter()
    graph = attribute(adapted, tokens, **kw)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return {
        "side": "mechdiff",
        "cpu_s": cpu,
        "wall_s": wall,
        "threads": torch.get_num_threads(),
        "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_before_gib": before,
        "n_pos": graph.n_pos,
        "n_active": graph.info["n_active"],
        "n_features": graph.n_features,
        "n_targets": graph.n_targets,
        "n_backward": graph.meta["n_backward"],
    }


# --------------------------------------------------------------------------- orchestration


def _worker(cmd: list[str], threads: int) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"worker failed ({' '.join(cmd[:3])} ...):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _common(args) -> list[str]:
    return [
        "--max-feature-nodes",
        str(args.max_feature_nodes),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
    ]


def compare(args) -> dict:
    python = ensure_venv(venv_dir(), args.rebuild_venv)
    with tempfile.TemporaryDirectory(prefix="mechdiff-peer-") as tmp:
        data = Path(tmp)
        me = [
            sys.executable,
            "-m",
            "benchmarks.peer_circuit_tracer",
            "--pair",
            args.pair,
            "--d-sae",
            str(args.d_sae),
            "--k",
            str(args.k),
            "--data",
            str(data),
            *_common(args),
        ]
        info = _worker([*me, "--worker", "export"], args.threads)
        peer = [str(python), str(WORKER), str(data), *_common(args)]
        runs = []
        for r in range(args.repeats):
            for side in ("mechdiff", "peer") if r % 2 == 0 else ("peer", "mechdiff"):
                run = _worker([*me, "--worker", "mechdiff"] if side == "mechdiff" else peer, args.threads)
                runs.append(run)
                if not args.json:
                    print(
                        f"  {run['side']:>14}: {run['cpu_s']:7.1f} s CPU ({run['wall_s']:.1f} s wall), "
                        f"peak {run['peak_gib']:.2f} GiB, {run['n_backward']} backward passes",
                        flush=True,
                    )
    mine = [r for r in runs if r["side"] == "mechdiff"]
    theirs = [r for r in runs if r["side"] == "circuit_tracer"]
    diff = max(r["logits_max_abs_diff"] for r in theirs)
    effect = min(r["transcoder_logit_effect"] for r in theirs)
    if not diff <= 1e-3 * max(1.0, theirs[0]["logits_max_abs"]) or not effect > 100 * diff:
        raise SystemExit(
            f"the two models disagree: logits differ by up to {diff:.3g} (the transcoders move them by {effect:.3g})"
        )
    m_cpu, c_cpu = statistics.median(r["cpu_s"] for r in mine), statistics.median(r["cpu_s"] for r in theirs)
    return {
        "pair": args.pair,
        **info,
        "d_sae": args.d_sae,
        "k": args.k,
        "adapters": "random (seed 0)",
        "max_feature_nodes": args.max_feature_nodes,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "circuit_tracer_version": VERSION,
        "logits_max_abs_diff": diff,
        "transcoder_logit_effect": effect,
        "mechdiff_cpu_s": round(m_cpu, 2),
        "circuit_tracer_cpu_s": round(c_cpu, 2),
        "ratio": round(m_cpu / c_cpu, 3),
        "mechdiff_peak_gib": round(max(r["peak_gib"] for r in mine), 2),
        "circuit_tracer_peak_gib": round(max(r["peak_gib"] for r in theirs), 2),
        "mechdiff_backward_passes": mine[0]["n_backward"],
        "circuit_tracer_backward_passes": theirs[0]["n_backward"],
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pair",
        choices=["smollm2", "organism"],
        default="smollm2",
        help="smollm2 (needs the [real] extra: `make real`) or organism (quick)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="graphs per side, interleaved (default 3)")
    parser.add_argument("--max-feature-nodes", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64, help="rows per backward pass, both sides")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides (default 1)")
    parser.add_argument("--d-sae", type=int, default=512, help="features per layer")
    parser.add_argument("--k", type=int, default=8, help="TopK k")
    parser.add_argument("--rebuild-venv", action="store_true", help="rebuild circuit-tracer's venv")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    parser.add_argument("--worker", choices=["export", "mechdiff"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batch_size < 1 or args.max_feature_nodes < 1 or args.threads < 1:
        parser.error("--repeats, --batch-size, --max-feature-nodes and --threads must be >= 1")
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        result = export(args, args.data) if args.worker == "export" else mechdiff_run(args, args.data)
        print(json.dumps(result), flush=True)
        return
    if not args.json:
        print(
            f"attribution graph, {args.pair}: mechdiff vs circuit-tracer {VERSION}, {args.threads} thread(s), "
            f"batch {args.batch_size}, {args.max_feature_nodes} feature nodes, {args.d_sae} TopK-{args.k} "
            f"features per layer (random, same on both sides)",
            flush=True,
        )
    result = compare(args)
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{result['model']}, {result['n_pos']}-token prompt cut before {result['target']!r}; logits agree to "
        f"{result['logits_max_abs_diff']:.1e} (the transcoders move them by {result['transcoder_logit_effect']:.2g})\n"
        f"mechdiff:       {result['mechdiff_cpu_s']:7.1f} s CPU (median), peak {result['mechdiff_peak_gib']:.2f} GiB, "
        f"{result['mechdiff_backward_passes']} backward passes\n"
        f"circuit-tracer: {result['circuit_tracer_cpu_s']:7.1f} s CPU (median), peak "
        f"{result['circuit_tracer_peak_gib']:.2f} GiB, {result['circuit_tracer_backward_passes']} backward passes\n"
        f"ratio (mechdiff / circuit-tracer CPU time): {result['ratio']:.2f}x"
    )


if __name__ == "__main__":
    main()
