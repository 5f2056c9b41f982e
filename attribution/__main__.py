"""Build one attribution graph and write every view of it.

    python -m attribution [--prompt "A 3 2 1 ..."] [--target wait] [--max-feature-nodes 500]
                          [--adapters auto|random|DIR] [--pair organism|smollm2[:RUN]]
                          [--base DIR --target-model DIR] [--out DIR]

Writes to ``--out`` (default ``figures/attribution``): ``graph.safetensors`` + ``graph.json``
(:meth:`Graph.save`), ``graph.html`` + ``graph.png`` (the pruned graph), ``features.html``
(circuitsvis token views of the most influential features) and ``circuit-tracer/`` (the graph
JSON and index circuit-tracer's frontend serves). The default prompt is a reasoning trace of the
pair's workload cut just before its first hesitation, and the default target that hesitation:
on the organism a trace cut before "wait"; on SmolLM2 (``--pair smollm2``) a chat trace cut
before the " Wait" the fine-tune writes (``ĠWait``). Adapters are ``DIR``, or (``auto``) the
shipped organism ones when they fit the pair, else random (``attribution.synthetic``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from attribution.build import attribute  # noqa: E402
from attribution.export import write_circuit_tracer_files  # noqa: E402
from attribution.plot import feature_token_views, save_graph_figure  # noqa: E402
from attribution.synthetic import randomize_adapters  # noqa: E402


def _adapted(args):
    from mechdiff.adapters.transcoder import AdaptedModel
    from mechdiff.models import load_pair

    where = dict(device=args.device, dtype=args.dtype)
    pair = (load_pair("custom", base=args.base, target=args.target_model or args.base, **where)
            if args.base else load_pair(args.pair, **where))
    if args.adapters not in ("auto", "random"):  # a folder: its errors are the user's to see
        from mechdiff.adapters.formats import load_adapted
        return pair, load_adapted(pair, args.adapters), f"adapters {args.adapters}"
    if args.adapters == "auto":
        try:
            from mechdiff.adapters.formats import load_adapted
            return pair, load_adapted(pair), "shipped adapters"
        except Exception as err:  # noqa: BLE001 - fall back to random adapters, and say why
            print(f"shipped adapters unavailable ({type(err).__name__}); using random ones")
    torch.manual_seed(0)
    adapted = AdaptedModel.from_pair(pair, d_sae=args.d_sae)
    return pair, randomize_adapters(adapted, seed=0, density=args.density, dec_norm=args.dec_norm), "random adapters"


def _default_prompt(tokenizer) -> torch.Tensor:
    """An organism trace (prompt + response) cut just before its first "wait"."""
    from mechdiff.organism import task

    rng, vocab = random.Random(0), tokenizer.get_vocab()
    for problem in task.DEFAULT.sample_problems(50, "test", 0):
        words = [w for w in task.DEFAULT.prompt(problem)[0] + task.DEFAULT.reasoning_trace(problem, rng)[0] if w in vocab]
        if "wait" in words:
            return torch.tensor(tokenizer.convert_tokens_to_ids(words[: words.index("wait")]))
    raise SystemExit("no organism trace with a 'wait'; pass --prompt")


def _workload_prompt(pair) -> tuple[torch.Tensor, int]:
    """A trace of the pair's workload (prompt + response) cut just before its first hesitation,
    and that hesitation's token id (:func:`mechdiff.evaluation.hesitation.hesitation_for`)."""
    from mechdiff.evaluation.hesitation import hesitation_for
    from mechdiff.workloads import for_pair

    spec = hesitation_for(for_pair(pair))
    for row in spec.traces(50, "test", seed=0):
        ids = row["input_ids"]
        cut = next((k for k in range(row["prompt_len"], len(ids)) if ids[k] == spec.target), None)
        if cut is not None:
            return torch.tensor(ids[:cut]), spec.target
    raise SystemExit(f"no {spec.name} trace with a {spec.word!r}; pass --prompt")


def _prompt_and_target(args, pair, tok):
    """``--prompt`` / ``--target`` when given; else the organism's trace and "wait", or the
    workload's trace and hesitation token for any other pair."""
    if pair.meta.get("workload", "organism") == "organism":
        tokens, target = (None if args.prompt else _default_prompt(tok)), "wait"
    else:
        tokens, target = _workload_prompt(pair)
    if args.prompt:
        tokens = torch.tensor([tok.bos_token_id] + tok(args.prompt)["input_ids"])
    target = args.target or target
    if isinstance(target, str):
        target = None if target == "top" else tuple(target.split(",")) if "," in target else target
    return tokens, target


def _slug(args, pair, graph) -> str:
    """The graph's name in circuit-tracer's index: ``organism-wait`` as before, else pair and target."""
    if pair.meta.get("workload", "organism") == "organism":
        return "organism-wait"
    return re.sub(r"[^a-z0-9]+", "-", f"{args.pair}-{graph.targets[0]['label']}".lower()).strip("-")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default=None, help="space-separated tokens after <bos>")
    parser.add_argument("--target", default=None,
                        help='a token, "a,b" for a logit difference, or "top" (default: the hesitation, '
                             '"wait" on the organism, "ĠWait" on SmolLM2)')
    parser.add_argument("--max-feature-nodes", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--adapters", default="auto",
                        help="auto (shipped when they fit, else random), random, or an adapters folder")
    parser.add_argument("--pair", default="organism",
                        help="model pair when --base is not given: organism (default) or smollm2[:RUN]")
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument("--density", type=float, default=0.01, help="random adapters: firing rate")
    parser.add_argument("--dec-norm", type=float, default=2.0, help="random adapters: decoder row norm")
    parser.add_argument("--base", default=None, help="custom pair: base HF folder (default: organism)")
    parser.add_argument("--target-model", default=None, help="custom pair: target HF folder")
    parser.add_argument("--top", type=int, default=8, help="features shown in the token views")
    parser.add_argument("--node-threshold", type=float, default=0.8)
    parser.add_argument("--edge-threshold", type=float, default=0.98)
    parser.add_argument("--out", default="figures/attribution")
    parser.add_argument("--device", default=None,
                        help="torch device: cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the models and adapters (default float32; bfloat16 on a GPU halves "
                             "the memory; edges are then accurate to bf16 rounding)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pair, adapted, kind = _adapted(args)
    tokens, target = _prompt_and_target(args, pair, adapted.model.tokenizer)
    graph = attribute(adapted, tokens, target, max_feature_nodes=args.max_feature_nodes,
                      batch_size=args.batch_size)
    out = Path(args.out)
    graph.save(out / "graph")
    title = f"{' '.join(graph.token_strs[-12:])} -> {graph.targets[0]['label']} ({kind})"
    thresholds = (args.node_threshold, args.edge_threshold)
    save_graph_figure(graph, out / "graph", *thresholds, title=title)
    top = graph.feature_ranking(0, aggregate=True)[: args.top]
    feature_token_views(adapted, [tokens], [(g["layer"], g["feature"]) for g in top], out / "features.html")
    write_circuit_tracer_files(graph, out / "circuit-tracer", _slug(args, pair, graph), *thresholds)
    scores = graph.scores()
    summary = {"prompt": graph.token_strs, "adapters": kind, "targets": graph.targets,
               "n_features": graph.n_features, "n_active": graph.info["n_active"], "meta": graph.meta,
               "scores": scores.__dict__, "top_features": top, "thresholds": thresholds,
               "kept_features": int(graph.prune(*thresholds).node_mask[: graph.n_features].sum())}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("adapters", "n_features", "n_active", "scores")}, indent=1))
    print(f"wrote {out}/graph.{{safetensors,json,html,png}}, features.html, circuit-tracer/")


if __name__ == "__main__":
    main()
