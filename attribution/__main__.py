"""Build one attribution graph and write every view of it; or serve exported graphs.

    python -m attribution [--prompt "A 3 2 1 ..."] [--target-token wait] [--max-feature-nodes 500]
                          [--adapters auto|random|DIR] [--pair organism|smollm2[:RUN]|custom]
                          [--base DIR --target DIR] [--examples 64] [--out DIR]
    python -m attribution serve [DIR] [--port 8032]

Writes to ``--out`` (default ``figures/attribution``): ``graph.safetensors`` + ``graph.json``
(:meth:`Graph.save`), ``graph.html`` + ``graph.png`` (the pruned graph), ``features.html``
(circuitsvis token views of the most influential features) and ``circuit-tracer/``: the graph in
circuit-tracer's JSON, named by prompt and target and added to the folder's index (earlier graphs
stay), and the feature examples of every feature node (``features/{scan}/{index}.json``: top
activating contexts over ``--examples`` workload traces, logit-lens tokens, the organism's labels).

The default prompt is a reasoning trace of the pair's workload cut just before its first
hesitation, and the default target that hesitation: on the organism a trace cut before "wait"; on
SmolLM2 (``--pair smollm2``) a chat trace cut before the " Wait" the fine-tune writes (``ĠWait``).
Adapters are ``DIR``, ``random`` (``attribution.synthetic``, for dry runs) or ``auto``: the shipped
organism adapters, on the organism only (any other pair needs ``DIR`` or ``random``).

``serve`` shows a folder of exported graphs (default ``figures/attribution/circuit-tracer``) in
circuit-tracer's frontend on http://127.0.0.1:PORT, offline (:mod:`attribution.serve`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

from mechdiff.cli import UsageError, add_pair_options, check_pair_options, offline_environment, run

DEFAULT_OUT = "figures/attribution"


def _adapted(args, pair):
    from mechdiff.adapters.formats import AdapterFormatError, load_adapted

    if args.adapters == "random":
        import torch

        from attribution.synthetic import randomize_adapters
        from mechdiff.adapters.transcoder import AdaptedModel

        torch.manual_seed(0)
        adapted = AdaptedModel.from_pair(pair, d_sae=args.d_sae)
        return randomize_adapters(adapted, seed=0, density=args.density, dec_norm=args.dec_norm), "random adapters"
    try:
        if args.adapters == "auto":
            return load_adapted(pair), "shipped adapters"
        return load_adapted(pair, args.adapters), f"adapters {args.adapters}"
    except AdapterFormatError as err:
        raise UsageError(f"--adapters {args.adapters}: {err}") from None


def _default_prompt(tokenizer, nth: int = 0):
    """The ``nth`` organism trace (prompt + response) with a "wait", cut just before its first one."""
    import torch

    from mechdiff.organism import task

    rng, vocab, found = random.Random(0), tokenizer.get_vocab(), 0
    for problem in task.DEFAULT.sample_problems(50 + 4 * nth, "test", 0):
        words = [
            w for w in task.DEFAULT.prompt(problem)[0] + task.DEFAULT.reasoning_trace(problem, rng)[0] if w in vocab
        ]
        if "wait" in words and found == nth:
            return torch.tensor(tokenizer.convert_tokens_to_ids(words[: words.index("wait")]))
        found += "wait" in words
    raise UsageError(f"only {found} organism test traces have a 'wait', no --trace {nth}; pass --prompt")


def _workload_prompt(pair, nth: int = 0):
    """The ``nth`` test trace of the pair's workload (prompt + response) that hesitates, cut just
    before its first hesitation, and that hesitation's token id (the workload's ``target``)."""
    import torch

    from mechdiff.workloads import for_pair

    spec = for_pair(pair)
    found = 0
    for row in spec.traces(50 + 4 * nth, "test", seed=0):
        ids = row["input_ids"]
        cut = next((k for k in range(row["prompt_len"], len(ids)) if ids[k] == spec.target), None)
        if cut is not None and found == nth:
            return torch.tensor(ids[:cut]), spec.target
        found += cut is not None
    raise UsageError(
        f"only {found} of the {spec.name} test traces have a {spec.word!r}, no --trace {nth}; pass --prompt"
    )


def unknown_words(tokenizer, text: str) -> list[str]:
    """The words of ``text`` the tokenizer can only read as its unknown token (none for byte-level
    tokenizers, which have no unknown token)."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return []
    return [
        w
        for w in text.split()
        if w != tokenizer.unk_token and unk in tokenizer(w, add_special_tokens=False)["input_ids"]
    ]


def _check_prompt(tokenizer, prompt: str | None) -> None:
    if prompt is not None and (bad := unknown_words(tokenizer, prompt)):
        shown = ", ".join(repr(w) for w in bad[:8]) + (" ..." if len(bad) > 8 else "")
        raise UsageError(
            f"--prompt: {len(bad)} word(s) not in the tokenizer's vocabulary ({shown}); "
            "they would all read as the same unknown token"
        )


def _prompt_and_target(args, pair, tok):
    """``--prompt`` / ``--target-token`` when given; else the organism's trace and "wait", or the
    workload's trace and hesitation token for any other pair."""
    import torch

    if pair.meta.get("workload", "organism") == "organism":
        tokens, target = (None if args.prompt else _default_prompt(tok, args.trace)), "wait"
    else:
        tokens, target = _workload_prompt(pair, args.trace)
    if args.prompt:
        tokens = torch.tensor([tok.bos_token_id] + tok(args.prompt)["input_ids"])
    target = args.target_token or target
    if isinstance(target, str):
        target = None if target == "top" else tuple(target.split(",")) if "," in target else target
    return tokens, target


def check_out(out: str, flag: str = "--out") -> Path:
    """``out`` as a folder that can be written: an existing folder, or one that can be made."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {out}: exists and is not a folder")
    parent = next(p for p in [path, *path.parents] if p.exists())  # "." or "/" at the latest
    if not parent.is_dir():
        raise UsageError(f"{flag} {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {out}: {parent} is not writable")
    return path


def check_args(args) -> argparse.Namespace:
    """Every flag checked before a model is loaded or a file written (:class:`UsageError`)."""
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError(
            "--prompt is empty; give the prompt's tokens, or leave --prompt out for the workload's default trace"
        )
    for flag in ("max_feature_nodes", "batch_size", "top", "d_sae"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if args.examples < 0:
        raise UsageError(f"--examples {args.examples}: must be >= 0 (0: no feature examples)")
    for flag in ("node_threshold", "edge_threshold"):
        if not 0 < getattr(args, flag) <= 1:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be in (0, 1]")
    if args.target_token is not None and not args.target_token.strip():
        raise UsageError("--target-token is empty")
    if args.adapters == "auto" and args.pair != "organism":
        raise UsageError(
            f"--adapters auto: mechdiff ships adapters for the organism only, not --pair "
            f"{args.pair}; pass --adapters DIR (python -m mechdiff.adapters train) or "
            "--adapters random for a dry run"
        )
    if args.adapters not in ("auto", "random") and not Path(args.adapters).is_dir():
        raise UsageError(f"--adapters {args.adapters}: no such folder")
    check_out(args.out)
    if args.graphs is not None:
        check_out(args.graphs, "--graphs")
    if args.trace < 0:
        raise UsageError(f"--trace {args.trace}: must be >= 0")
    if args.trace and args.prompt is not None:
        raise UsageError("--trace picks a workload trace; it cannot go with --prompt")
    check_pair_options(args)
    if args.prompt is not None and args.pair in ("organism", "custom"):  # a tokenizer folder at hand
        from mechdiff.models import ORGANISM_DIR, load_tokenizer

        folder = args.base if args.pair == "custom" else ORGANISM_DIR / "base"
        if Path(folder).is_dir():
            _check_prompt(load_tokenizer(folder), args.prompt)
    return args


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m attribution", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--prompt", default=None, help="space-separated tokens after <bos>")
    p.add_argument(
        "--target-token",
        default=None,
        help='a token, "a,b" for a logit difference, or "top" (default: the hesitation, '
        '"wait" on the organism, "ĠWait" on SmolLM2)',
    )
    p.add_argument("--max-feature-nodes", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--adapters",
        default="auto",
        help="auto (the shipped adapters; organism only), random (a dry run), or an adapters folder",
    )
    p.add_argument("--d-sae", type=int, default=1024, help="random adapters: features per layer")
    p.add_argument("--density", type=float, default=0.01, help="random adapters: firing rate")
    p.add_argument("--dec-norm", type=float, default=2.0, help="random adapters: decoder row norm")
    p.add_argument("--top", type=int, default=8, help="features shown in the token views")
    p.add_argument(
        "--examples", type=int, default=64, help="workload traces the feature examples come from (0: write none)"
    )
    p.add_argument("--node-threshold", type=float, default=0.8)
    p.add_argument("--edge-threshold", type=float, default=0.98)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument(
        "--graphs",
        default=None,
        help="circuit-tracer folder the graph is added to (default OUT/circuit-tracer); one folder "
        "can hold the graphs of several pairs and prompts",
    )
    p.add_argument(
        "--trace",
        type=int,
        default=0,
        help="without --prompt: the Nth held-out trace that hesitates, cut before it (default 0)",
    )
    add_pair_options(p)
    return p


def serve_main(argv: list[str]) -> None:
    from attribution.serve import FrontendMissing, serve

    p = argparse.ArgumentParser(
        prog="python -m attribution serve",
        description="Serve exported graphs in circuit-tracer's frontend on "
        "127.0.0.1 (downloaded once into ~/.cache/mechdiff).",
    )
    p.add_argument(
        "dir",
        nargs="?",
        default=f"{DEFAULT_OUT}/circuit-tracer",
        help="a folder with graph-metadata.json (default: %(default)s)",
    )
    p.add_argument("--port", type=int, default=8032, help="0 picks a free port (default %(default)s)")
    p.add_argument("--log", action="store_true", help="print every request")
    p.add_argument(
        "--fetch-only",
        action="store_true",
        help="download the frontend and its scripts into the cache, say what is missing, exit",
    )
    args = p.parse_args(argv)
    if args.fetch_only:
        from attribution.serve import Frontend

        frontend = Frontend()
        missing = frontend.fetch()
        for line in missing:
            print(f"missing: {line}")
        print(f"frontend in {frontend.root}: {'complete' if not missing else f'{len(missing)} script(s) missing'}")
        raise SystemExit(1 if missing else 0)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: not a port number")
    try:
        serve(args.dir, args.port, quiet=not args.log)
    except (ValueError, FrontendMissing) as err:
        raise UsageError(str(err)) from None
    except OSError as err:
        raise UsageError(f"--port {args.port}: {err.strerror}") from None


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    offline_environment()
    if argv[:1] == ["serve"]:
        return serve_main(argv[1:])
    args = check_args(parser().parse_args(argv))

    import torch

    from attribution.build import attribute
    from attribution.examples import (
        adapters_scan,
        clerps,
        feature_examples,
        feature_store,
        write_feature_examples,
    )
    from attribution.export import graph_slug, write_circuit_tracer_files
    from attribution.plot import feature_token_views, feature_top_tokens, save_graph_figure
    from mechdiff.cli import load_pair_from_args
    from mechdiff.workloads import for_pair

    torch.set_num_threads(args.threads or 1)
    pair = load_pair_from_args(args)
    if args.prompt is not None:
        _check_prompt(pair.tokenizer, args.prompt)
    adapted, kind = _adapted(args, pair)
    tokens, target = _prompt_and_target(args, pair, adapted.model.tokenizer)
    graph = attribute(adapted, tokens, target, max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    graph.save(out / "graph")
    title = f"{' '.join(graph.token_strs[-12:])} -> {graph.targets[0]['label']} ({kind})"
    thresholds = (args.node_threshold, args.edge_threshold)
    save_graph_figure(graph, out / "graph", *thresholds, title=title, top_tokens=feature_top_tokens(adapted, graph))
    top = graph.feature_ranking(0, aggregate=True)[: args.top]
    if top:
        feature_token_views(adapted, [tokens], [(g["layer"], g["feature"]) for g in top], out / "features.html")
    scan, ct, examples = adapters_scan(adapted), Path(args.graphs) if args.graphs else out / "circuit-tracer", {}
    if args.examples:
        store = feature_store(adapted, for_pair(pair), args.examples, progress=True)
        examples = feature_examples(graph, store, adapted, scan, *thresholds)
        write_feature_examples(graph, store, adapted, ct, scan, examples=examples)
    path = write_circuit_tracer_files(
        graph,
        ct,
        graph_slug(graph, args.pair),
        *thresholds,
        scan=scan,
        title=f"{args.pair}, {kind}, → {graph.targets[0]['label']}:",
        clerps=clerps(examples),
    )
    n_examples = len(examples)
    scores = graph.scores()
    pruned = graph.prune(*thresholds)
    kept, feature_share = int(pruned.node_mask[: graph.n_features].sum()), _feature_share(pruned, graph.n_features)
    summary = {
        "prompt": graph.token_strs,
        "adapters": kind,
        "targets": graph.targets,
        "n_features": graph.n_features,
        "n_active": graph.info["n_active"],
        "meta": graph.meta,
        "scores": scores.__dict__,
        "top_features": top,
        "thresholds": thresholds,
        "kept_features": kept,
        "feature_influence_share": feature_share,
        "circuit_tracer": {"graph": path.name, "scan": scan, "feature_examples": n_examples},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("adapters", "n_features", "n_active", "scores")}, indent=1))
    print(
        f"wrote {out}/graph.{{safetensors,json,html,png}}, features.html, {ct}/{path.name} and "
        f"{n_examples} feature example files; browse: python -m attribution serve {ct}"
    )
    if graph.n_features and not kept:
        print(no_feature_kept(graph, *thresholds))


def _feature_share(pruned, n_features: int) -> float:
    """The share of the target's influence that the feature nodes carry (embeddings hold the rest)."""
    return float(pruned.node_influence[:n_features].sum() / pruned.node_influence.sum().clamp(min=1e-30))


def no_feature_kept(graph, node_threshold: float, edge_threshold: float) -> str:
    """Why the pruned graph shows no feature, and the smallest node threshold (in steps of 0.01) that
    shows one under the same edge threshold.

    Adapters model only what fine-tuning changed; the base model's own computation reaches the
    target from the embeddings through the linearized base MLPs. On a real model that path can hold
    more than ``node_threshold`` of the influence, and circuit-tracer's rule then keeps no feature.
    """
    n_f = graph.n_features
    share = _feature_share(graph.prune(node_threshold, edge_threshold), n_f)
    steps = range(int(node_threshold * 100) + 1, 101)
    shows = next((t / 100 for t in steps if graph.prune(t / 100, edge_threshold).node_mask[:n_f].any()), None)
    fix = (
        f"--node-threshold {shows:.2f} keeps some"
        if shows is not None
        else "no node threshold keeps one under this --edge-threshold"
    )
    return (
        f"warning: the pruned graph keeps no feature node: features carry {share:.0%} of the influence and "
        f"the embeddings the rest; {fix} (the graph files hold every feature either way)"
    )


if __name__ == "__main__":
    run(main)
