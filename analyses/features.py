"""Feature interpretation of the transcoder adapters: ``python -m analyses.features``.

One pass over held-out organism traces fills an activation store (:mod:`mechdiff.features.store`)
for every adapter feature and, as a baseline from the same forward, every base-MLP neuron of the
adapted model. Features are classified by the ground-truth label rule
(:data:`mechdiff.features.classify.RULE`); optionally an LM judge behind an OpenAI-compatible
endpoint (``--judge-url``, ``--judge-model``) labels some of them too. Writes ``--out``
(default ``figures/features/``):

* ``index.html`` and ``features/<i>.html``: dashboards (all reasoning features, and the densest
  ``--pages-per-category`` of every other category), ``assets/`` (shared JavaScript);
* ``category_counts.{html,png}``, ``regions.{html,png}``: figures;
* ``summary.json``: n_features, n_alive, category_counts, reasoning_fraction (adapters), the
  neuron baseline, role counts, store throughput; ``report.md``.

The store is cached in ``--store`` (resumable: an interrupted run continues; a store made for
other adapters, corpus or settings is rebuilt). About two minutes on 2 CPU cores with 300 traces.
``--adapters random:1024`` uses random sparse adapters (for tests and dry runs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import plotly.graph_objects as go
import torch

from mechdiff import cli
from mechdiff.adapters.formats import SHIPPED_DIR, load_adapted
from mechdiff.adapters.transcoder import AdaptedModel
from mechdiff.features import classify as C
from mechdiff.features.dashboard import write_dashboards
from mechdiff.features.store import REGIONS, StoreConfig, StoreMismatch, build_store
from mechdiff.visualization import figures
from mechdiff.workloads import for_pair

PUBLISHED = {"reasoning_fraction": 0.08}


def _log(msg: str) -> None:
    print(f"[features] {msg}", flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m analyses.features", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_pair_options(p)
    p.add_argument(
        "--adapters",
        default=str(SHIPPED_DIR),
        help="trained adapters folder, or random:D_SAE for random sparse adapters",
    )
    p.add_argument("--out", default="figures/features", help="output folder")
    p.add_argument("--store", default="runs/features/store", help="activation store folder (cache)")
    p.add_argument("--fresh", action="store_true", help="rebuild the store even if one is cached")
    p.add_argument("--n-traces", type=int, default=300, help="held-out traces in the store")
    p.add_argument("--split", default="validation", help="organism split of the traces")
    p.add_argument("--top-k", type=int, default=16, help="top activating sequences kept per feature")
    p.add_argument("--n-random", type=int, default=8, help="random activating examples per feature")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--min-examples", type=int, default=3, help="fewer top examples: 'rare'")
    p.add_argument(
        "--pages-per-category",
        type=int,
        default=25,
        help="dashboards per non-reasoning category (reasoning: up to --max-reasoning-pages)",
    )
    p.add_argument("--max-reasoning-pages", type=int, default=200)
    p.add_argument("--no-neurons", action="store_true", help="skip the MLP-neuron baseline")
    p.add_argument(
        "--no-control", action="store_true", help="skip the control: random adapters of the same size and density"
    )
    p.add_argument("--judge-url", help="OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1)")
    p.add_argument("--judge-model", help="model name for the judge")
    p.add_argument("--judge-n", type=int, default=20, help="features to send to the judge")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cli.check_pair_options(args)
    for flag in ("n_traces", "top_k", "batch_size"):
        if getattr(args, flag) < 1:
            raise cli.UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    spec = args.adapters
    if spec.startswith("random:"):
        if not spec.split(":", 1)[1].isdigit() or int(spec.split(":", 1)[1]) < 1:
            raise cli.UsageError(f"--adapters {spec}: random:D_SAE needs a whole number D_SAE >= 1")
    elif not Path(spec).is_dir():
        raise cli.UsageError(
            f"--adapters {spec}: no such folder; train adapters (python -m mechdiff.adapters) "
            "or pass --adapters random:1024 for a dry run"
        )
    return args


def load_adapters(pair, spec: str, seed: int) -> AdaptedModel:
    if spec.startswith("random:"):
        from attribution.synthetic import randomize_adapters

        adapted = AdaptedModel.from_pair(pair, d_sae=int(spec.split(":", 1)[1]))
        adapted.to(pair.target.cfg.device)
        return randomize_adapters(adapted, seed=seed, density=0.03)
    return load_adapted(pair, spec)


def make_store(adapted: AdaptedModel, work, args, with_neurons: bool, folder: str):
    """The feature store of ``adapted`` on the workload's traces (an organism's own task)."""
    tok = work.tokenizer
    model, n_layers = adapted.model, adapted.config.n_layers
    hooks = [adapted.acts_name(layer) for layer in range(n_layers)]
    decoder = C.decoder_directions(adapted)
    if with_neurons:
        hooks += [f"blocks.{layer}.mlp.hook_post" for layer in range(n_layers)]
        decoder = torch.cat([decoder, *[b.mlp.W_out.detach().float() for b in model.blocks]])
    config = StoreConfig(
        top_k=args.top_k,
        n_random=args.n_random,
        batch_size=args.batch_size,
        seed=args.seed,
        label_names=C.FINE_LABELS,
        think_ids=tuple(tok.convert_tokens_to_ids(["<think>", "</think>"])),
    )
    traces = C.with_fine_labels(work.traces(args.n_traces, args.split, seed=args.seed), work.spec)
    folder = Path(folder)
    if args.fresh:
        shutil.rmtree(folder, ignore_errors=True)
    kw = dict(config=config, decoder=decoder, pad_id=tok.pad_token_id, progress=True)
    try:
        return build_store(model, traces, hooks, folder, **kw)
    except StoreMismatch:
        _log(f"    the store in {folder} was made for other adapters or settings: rebuilding")
        shutil.rmtree(folder)
        return build_store(model, traces, hooks, folder, **kw)


def random_control(pair, adapted, store, tok, args) -> dict:
    """The label rule on random sparse adapters (same size, the trained ones' median density)
    reading the hybrid's MLP inputs (decoders ~0): the rule's chance level on this model."""
    from attribution.synthetic import randomize_adapters

    cfg = adapted.config
    n_ad = adapted.n_features
    density = float(store.density[:n_ad][store.alive[:n_ad]].median())
    rows = for_pair(pair).traces(16, "train", seed=args.seed)["input_ids"]
    width = min(map(len, rows))
    control = AdaptedModel.from_pair(pair, d_sae=cfg.d_sae, backbone=cfg.backbone)
    control.to(pair.target.cfg.device)
    randomize_adapters(
        control,
        seed=args.seed + 1,
        density=density,
        dec_norm=1e-6,
        tokens=torch.tensor([r[:width] for r in rows], device=pair.target.cfg.device),
    )
    ctl_store = make_store(control, for_pair(pair), args, with_neurons=False, folder=args.store + "-control")
    res = C.classify_store(
        ctl_store, min_examples=args.min_examples, hesitation_ids=[tok.convert_tokens_to_ids("wait")]
    )
    return {**res["summary"], "matched_density": density}


def part_summary(cats, roles, idx):
    part = [cats[i] for i in idx]
    return C.summarize(part, {i: r for i, r in roles.items() if i in set(idx)})


def pick_pages(cats, store, idx, args) -> list[int]:
    by_cat: dict[str, list[int]] = {}
    for i in idx:
        by_cat.setdefault(cats[i], []).append(i)
    pages = []
    for cat, members in by_cat.items():
        if cat == "dead":
            continue
        members.sort(key=lambda i: -float(store.density[i]))
        pages += members[: args.max_reasoning_pages if cat in C.REASONING else args.pages_per_category]
    return sorted(pages)


def write_figures(out: Path, summaries: dict, store, cats, groups: dict) -> list[str]:
    shown = [c for c in C.CATEGORIES if any(s["category_counts"].get(c) for s in summaries.values())]
    fig = go.Figure(
        [
            go.Bar(name=name, x=shown, y=[s["category_counts"].get(c, 0) / max(1, s["n_alive"]) for c in shown])
            for name, s in summaries.items()
        ]
    )
    fig.update_layout(
        title="feature categories (ground-truth label rule), share of alive features",
        yaxis_title="share of alive features (log scale)",
        barmode="group",
        yaxis_type="log",
    )  # shares span orders of magnitude (rare categories ~1e-3)
    paths = figures.save(fig, out / "category_counts")
    adapter = groups["adapters"]
    cat_share = {}
    for c in shown:
        members = [i for i in adapter if cats[i] == c]
        if members:
            counts = store.region_count[members].sum(0)
            cat_share[c] = (counts / counts.sum().clamp(min=1)).tolist()
    fig = go.Figure(
        [go.Bar(name=r, x=list(cat_share), y=[v[j] for v in cat_share.values()]) for j, r in enumerate(REGIONS)]
    )
    fig.update_layout(
        title="where adapter features fire, by category", barmode="group", yaxis_title="share of firing tokens"
    )
    paths += figures.save(fig, out / "regions")
    return [str(p) for p in paths]


def run_judge(store, tok, cats, idx, args) -> dict:
    client = C.JudgeClient(args.judge_url, args.judge_model)
    alive = [i for i in idx if cats[i] not in ("dead", "rare")][: args.judge_n]
    judged = C.judge_store(store, tok, client, alive)
    agree = sum((j.category == "reasoning") == (cats[i] in C.REASONING) for i, j in judged.items())
    return {
        "model": args.judge_model,
        "n": len(judged),
        "category_counts": {c: sum(j.category == c for j in judged.values()) for c in C.JUDGE_CATEGORIES},
        "agreement_with_label_rule_on_reasoning": agree / max(1, len(judged)),
        "unparsed": sum(not j.ok for j in judged.values()),
        "features": {
            store.name(i): {"category": j.category, "role": j.role, "explanation": j.explanation}
            for i, j in judged.items()
        },
    }


def main(argv=None) -> dict:
    cli.offline_environment()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.manual_seed(args.seed)
    out, t0 = Path(args.out), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    _log("1/4 load the pair and the adapters")
    pair = cli.load_pair_from_args(args)
    adapted = load_adapters(pair, args.adapters, args.seed)
    tok = pair.tokenizer
    _log(f"2/4 activation store over {args.n_traces} {args.split} traces -> {args.store}")
    store = make_store(adapted, for_pair(pair), args, with_neurons=not args.no_neurons, folder=args.store)
    n_ad = adapted.n_features
    groups = {"adapters": list(range(n_ad)), "mlp_neurons": list(range(n_ad, store.n_features))}
    groups = {k: v for k, v in groups.items() if v}
    tps = store.n_tokens / max(store.meta["seconds"], 1e-9)
    _log(f"    {store.n_tokens} tokens, {store.n_features} units, {tps:.0f} tokens/s")
    _log("3/4 classify by the ground-truth label rule")
    wait = [tok.convert_tokens_to_ids("wait")]
    res = C.classify_store(store, min_examples=args.min_examples, hesitation_ids=wait)
    cats, roles = res["categories"], res["roles"]
    summaries = {k: part_summary(cats, roles, idx) for k, idx in groups.items()}
    main_sum = summaries["adapters"]
    _log(
        f"    adapters: {main_sum['n_alive']}/{main_sum['n_features']} alive, reasoning fraction "
        f"{main_sum['reasoning_fraction']:.1%} (published ~{PUBLISHED['reasoning_fraction']:.0%})"
    )
    if "mlp_neurons" in summaries:
        _log(f"    MLP neurons (baseline): reasoning fraction {summaries['mlp_neurons']['reasoning_fraction']:.1%}")
    if not args.no_control:
        summaries["random_adapters"] = random_control(pair, adapted, store, tok, args)
        _log(
            f"    random adapters (control): reasoning fraction "
            f"{summaries['random_adapters']['reasoning_fraction']:.1%}"
        )
    judge = run_judge(store, tok, cats, groups["adapters"], args) if args.judge_url else None
    _log("4/4 dashboards and figures")
    pages = pick_pages(cats, store, groups["adapters"], args)
    sums_html = "".join(
        f"<p><b>{k}</b>: {s['n_alive']} of {s['n_features']} alive; reasoning "
        f"fraction {s['reasoning_fraction']:.1%}; {s['category_counts']}</p>"
        for k, s in summaries.items()
    )
    write_dashboards(
        store,
        out,
        tok,
        categories=cats,
        roles=roles,
        features=pages,
        title="Adapter features of the organism",
        summary_html=sums_html,
    )
    fig_paths = write_figures(out, summaries, store, cats, groups)
    summary = {
        **main_sum,
        "published": PUBLISHED,
        "rule": C.RULE,
        "pair": args.pair,
        "adapters": cli.shown_path(args.adapters),
        "adapter_config": adapted.config.to_dict(),
        "baselines": {k: v for k, v in summaries.items() if k != "adapters"},
        "reasoning_features": [
            {
                "feature": store.name(i),
                "category": cats[i],
                "role": roles.get(i),
                "density": float(store.density[i]),
                "scores": res["scores"][i].tolist(),
            }
            for i in groups["adapters"]
            if cats[i] in C.REASONING
        ],
        "store": {
            "folder": args.store,
            "n_traces": store.rows_done,
            "n_tokens": store.n_tokens,
            "n_units": store.n_features,
            "seconds": store.meta["seconds"],
            "tokens_per_second": tps,
            "top_k": args.top_k,
            "n_random": args.n_random,
        },
        "n_dashboards": len(pages),
        "figures": fig_paths,
        "judge": judge,
        "seconds": time.perf_counter() - t0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "report.md").write_text(report(summary))
    _log(f"wrote {out}/ in {summary['seconds']:.0f} s")
    return summary


def report(s: dict) -> str:
    lines = [
        "# Feature interpretation (organism)",
        "",
        f"Adapters `{s['adapters']}`: {s['n_alive']} of {s['n_features']} features alive on "
        f"{s['store']['n_tokens']} tokens of {s['store']['n_traces']} held-out traces.",
        "",
        f"**Reasoning fraction: {s['reasoning_fraction']:.1%}** of alive features "
        f"(published, real pair: ~{s['published']['reasoning_fraction']:.0%}).",
        "",
        "| category | adapters | " + " | ".join(s["baselines"]) + " |",
        "|---|---|" + "---|" * len(s["baselines"]),
    ]
    for c in (*C.CATEGORIES, "dead"):
        lines.append(
            f"| {c} | {s['category_counts'][c]} | "
            + " | ".join(str(b["category_counts"][c]) for b in s["baselines"].values())
            + " |"
        )
    lines += [
        "",
        f"Reasoning roles: {s['role_counts']}.",
        "",
        f"Rule: {s['rule']}",
        "",
        f"Store: {s['store']['tokens_per_second']:.0f} tokens/s; {s['n_dashboards']} dashboards in `index.html`.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    cli.run(main)
