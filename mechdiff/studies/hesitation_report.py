"""Figures and the prose report of the hesitation study (:mod:`mechdiff.studies.hesitation`).

Every sentence that interprets a number is built from the measurement it interprets.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import plotly.graph_objects as go

from mechdiff.visualization.figures import save

MODELS = ("base", "hybrid", "adapted", "target")


def _word(summary: dict) -> str:
    """How the study's hesitation is written: the organism's ``wait``, the chat's ``Wait``."""
    return summary.get("hesitation_tokens", {}).get("word", "wait")


def _is_organism(summary: dict) -> bool:
    return summary.get("hesitation_tokens", {}).get("workload", "organism") == "organism"


def _bars(title: str, ytitle: str, names, values, error=None) -> go.Figure:
    fig = go.Figure(go.Bar(x=list(names), y=list(values), error_y={"type": "data", "array": error} if error else None))
    fig.update_layout(title_text=title, yaxis_title_text=ytitle, template="simple_white")
    return fig


def faithfulness_figure(summary: dict) -> go.Figure:
    fig = go.Figure()
    for name in ("base", "hybrid", "adapted"):
        fve = summary["models"][name]["fve_per_layer"]
        fig.add_trace(go.Scatter(x=list(range(len(fve))), y=fve, mode="lines+markers", name=name))
    fig.update_layout(
        title_text="Residual-stream FVE to the target, per layer",
        xaxis_title_text="layer",
        yaxis_title_text="FVE (1 - NMSE)",
        template="simple_white",
    )
    return fig


def behaviour_figures(summary: dict) -> dict[str, go.Figure]:
    m = summary["models"]
    return {
        "accuracy": _bars(
            "Accuracy on held-out problems (greedy)", "accuracy", MODELS, [m[k]["accuracy"] for k in MODELS]
        ),
        "length": _bars("Mean response length", "tokens", MODELS, [m[k]["mean_response_tokens"] for k in MODELS]),
    }


def roles_figure(summary: dict) -> go.Figure:
    roles = summary["roles"]
    title = (
        f"Hesitation set: {summary['n_hesitation_features']} features "
        f"({summary['hesitation_fraction']:.2%} of {summary['n_adapter_features']})"
    )
    return _bars(title, "features", roles.keys(), roles.values())


def dose_response_figure(summary: dict) -> go.Figure:
    d = summary["dose_response"]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=d["k"], y=d["ranked"], mode="lines+markers", name="ranked by influence"))
    fig.add_trace(go.Scatter(x=d["k"], y=d["random"], mode="lines+markers", name="random order", line={"dash": "dash"}))
    fig.update_layout(
        title_text="Dose-response: features ablated during generation",
        xaxis_title_text="features ablated",
        yaxis_title_text="hesitations per response",
        template="simple_white",
    )
    return fig


def necessity_figure(summary: dict) -> go.Figure:
    n, s = summary["necessity"], summary["sufficiency"]
    draws = n["random_control_after_draws"]
    decides = s["set_decides_in_generation"]
    names = [
        "adapted (full)",
        "hesitation set ablated",
        "random sets ablated",
        "activation-diff set ablated",
        "set decides",
        "random set decides",
        "only the set kept",
    ]
    values = [
        n["hesitations_per_response_before"],
        n["hesitations_per_response_after"],
        n["random_control_after"],
        n["activation_difference_control_after"],
        decides["hesitations_per_response"],
        statistics.fmean(decides["random_sets"]),
        s["hesitations_per_response_kept_only"],
    ]
    spread = lambda xs: statistics.pstdev(xs) if len(xs) > 1 else 0  # noqa: E731
    error = [0, 0, spread(draws), 0, 0, spread(decides["random_sets"]), 0]
    return _bars("Necessity and sufficiency of the hesitation set", "hesitations per response", names, values, error)


def example_graph(graphs, out: Path, word: str = "wait") -> list[Path]:
    """The pruned attribution graph of the first prompt, via :mod:`attribution.plot`."""
    from attribution import plot

    graph = graphs[0]  # pruned harder than the 0.8/0.98 defaults so that a figure stays legible
    fig = plot.graph_figure(
        graph,
        node_threshold=0.6,
        edge_threshold=0.85,
        title=f'"{word}" attribution graph (nodes 60%, edges 85% of influence)',
    )
    return save(fig, out / "example_graph")


def role_examples(out: Path, hes, acts, role_of: dict, tokenizer, per_role: int = 3, decode: bool = False) -> Path:
    """circuitsvis views of each role's top features on their most activating prompt.

    The circuitsvis bundle is the figures tree's one shared copy (:func:`mechdiff.visualization.assets.circuitsvis_src`), not
    inlined in every view. ``decode``: show each token as text (byte-level tokens such as
    ``ĠWait`` read as `` Wait``) instead of the vocabulary entry.
    """
    from mechdiff.features import dashboard
    from mechdiff.visualization.assets import circuitsvis_bundle, circuitsvis_src

    bundle = circuitsvis_bundle()
    path = out / "role_examples.html"
    src = circuitsvis_src(path)
    parts = [
        "<html><head><meta charset='utf-8'><title>Hesitation features</title>",
        f"<script src='{src}'></script></head><body>",
        "<h1>Hesitation features: top activating prompts by role</h1>",
    ]
    for role in ("output", "error_detection", "context/format"):
        feats = [f for f, r in role_of.items() if r == role][:per_role]
        parts.append(f"<h2>{role} ({sum(r == role for r in role_of.values())} features)</h2>")
        for layer, feat in feats:
            best = max(range(len(acts)), key=lambda i: float(acts[i][:, layer, feat].max()))
            words = (
                [tokenizer.decode([t]) for t in hes.tokens[best]]
                if decode
                else tokenizer.convert_ids_to_tokens(hes.tokens[best])
            )
            values = acts[best][:, layer, feat].tolist()
            view = dashboard.token_view(words, values, max(values), bundle)
            parts.append(f"<h3>layer {layer} feature {feat} (max {max(values):.2f})</h3>{view}")
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
    return path


def figures(summary: dict) -> dict[str, go.Figure]:
    """Every summary figure by name, as plotly figures (they display inline in a notebook)."""
    return {
        "faithfulness": faithfulness_figure(summary),
        **behaviour_figures(summary),
        "hesitation_set": roles_figure(summary),
        "dose_response": dose_response_figure(summary),
        "necessity_sufficiency": necessity_figure(summary),
    }


def write_all(out: Path, summary: dict, graphs, hes, acts, role_of, tokenizer) -> None:
    for name, fig in figures(summary).items():
        save(fig, out / name)
    if graphs:
        example_graph(graphs, out, _word(summary))
    role_examples(out, hes, acts, role_of, tokenizer, decode=not _is_organism(summary))


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _command(s: dict) -> str:
    """The command that regenerates the report (the shipped organism's needs no flag)."""
    if _is_organism(s) and s["pair"] == "organism" and s.get("ranking", "graph") == "graph":
        return "python -m analyses.hesitation"
    pair = s["pair"]
    ranking = f" --ranking {s['ranking']}" if s.get("ranking", "graph") != "graph" else ""
    return f"python -m analyses.hesitation --pair {pair} --adapters {s['adapters']}{ranking}"


def _tokens_note(s: dict) -> str:
    """Which tokens a non-organism study counted (the organism's ``wait`` needs no note)."""
    if _is_organism(s):
        return ""
    t = s["hesitation_tokens"]
    others = ", ".join(f"`{v}`" for v in t["variants"][1:])
    return (
        f"Hesitation = the token `{t['target']}` (the attribution target; counted "
        f"{f'with {others}' if others else 'alone'}); go-on token (controls) `{t['go_on']}`; "
        f"replies of at most {t['max_new_tokens']} tokens.\n"
    )


def _free_generation_note(s: dict) -> str:
    """What the kept-only model does instead of hesitating, from its measured wrong steps and
    P(hesitation | a wrong step) against the full model's (nothing where the grader has no steps)."""
    suf = s["sufficiency"]
    kept, full = suf.get("wrong_steps_per_response_kept_only"), suf.get("wrong_steps_per_response_full")
    if kept is None or full is None:
        return ""
    p_kept, p_full = suf.get("p_hesitation_given_wrong_step_kept_only"), suf.get("p_hesitation_given_wrong_step_full")
    detect = (
        f"; after a wrong step it hesitates with probability {_pct(p_kept)} (full model {_pct(p_full)})"
        if p_kept is not None and p_full is not None
        else ""
    )
    if full > 0 and kept < 0.5 * full:
        reading = (
            "it writes fewer wrong steps, so fewer hesitations are called for: the set answers "
            "slips more than it makes them"
        )
    elif p_kept is not None and p_full is not None and p_kept < 0.5 * p_full:
        reading = "it still writes wrong steps but rarely hesitates after them"
    else:
        reading = "neither its wrong steps nor its hesitation after them fall by half"
    return (
        f". With only the set kept it writes {kept:.2f} wrong steps per response against the full model's "
        f"{full:.2f}{detect}: {reading}"
    )


def report_markdown(s: dict, published: dict) -> str:
    n, suf, st, m = s["necessity"], s["sufficiency"], s["steering"], s["models"]
    lo, hi = published["gain_recovered"]
    gain = s.get("gain_recovered")
    gain_txt = f"{gain:.2f}" if isinstance(gain, float) else "n/a"
    w = _word(s)
    return (
        f"""# Hesitation study ({s["pair"]})

Adapters: `{s["adapters"]}`. Regenerate with `{_command(s)}`.
{_tokens_note(s)}
## Faithfulness and behaviour
| model | accuracy | mean length | hesitations / response | KL to target |
|---|---|---|---|---|
"""
        + "".join(
            f"| {k} | {m[k]['accuracy']:.3f} | {m[k]['mean_response_tokens']:.1f} | "
            f"{m[k]['hesitations_per_response']:.2f} | {m[k]['kl_to_target']:.4f} |\n"
            for k in MODELS
        )
        + f"""
The adapters recover **{gain_txt}** of the base -> target accuracy gain (published: {lo:.0%}-{hi:.0%}).
Per-layer FVE of the adapted model: {", ".join(f"{v:.3f}" for v in m["adapted"]["fve_per_layer"])}.

## The hesitation set
{s["n_hesitation_prompts"]} prompts cut right before a "{w}" ({s["frac_prompts_after_error"]:.0%} of
them right after a wrong step), {s["n_control_prompts"]} matched controls. {_set_rule_text(s)}:
**{s["n_hesitation_features"]} features**, **{s["hesitation_fraction"]:.2%}** of the {s["n_adapter_features"]}
adapter features (published on R1-Distill-7B: {published["hesitation_fraction"]:.1%}).

Roles ({s["role_rule"]}): {", ".join(f"{k}: {v}" for k, v in s["roles"].items())}.

## Necessity
Zeroing the set during generation takes hesitations per response from
{n["hesitations_per_response_before"]:.2f} to **{n["hesitations_per_response_after"]:.2f}**
(a {_pct(n["cut"])} cut); random sets of the same size leave {n["random_control_after"]:.2f}
(a {_pct(n["random_cut"])} cut, mean of {len(n["random_control_after_draws"])} draws); the same number
of features chosen by activation difference between hesitation and control prompts leave
{n["activation_difference_control_after"]:.2f}. Response length goes from {n["length_before"]:.1f} to
{n["length_after"]:.1f} tokens and accuracy from {n["accuracy_before"]:.3f} to {n["accuracy_after"]:.3f}.
{_intervals_text(s)}
## Sufficiency and steering
In generation, when a copy of the adapted model keeping only the set (every other adapter feature
zeroed at every position) makes each decision whether to hesitate, while the full model writes the
steps, the responses hold {suf["set_decides_in_generation"]["hesitations_per_response"]:.2f} hesitations
each: **{_pct(suf["hesitation_retained"])}** of the full model's
{n["hesitations_per_response_before"]:.2f} ({suf["set_decides_in_generation"]["frac_hesitations_after_error"]:.0%}
after a wrong step; accuracy {suf["set_decides_in_generation"]["accuracy"]:.3f}). Random sets of the same
size deciding give {_pct(suf["random_sets_retained"])}; no feature at all gives
{suf["set_decides_in_generation"]["no_features"]:.2f} per response.
At the target's own hesitation prefixes (teacher-forced), the kept set says "{w}" on
{_pct(suf["hesitation_retained_at_prompts"])} of the prompts where the full model does (P("{w}")
{suf["at_hesitation_prompts"]["kept_only"]["wait_prob"]:.3f} against
{suf["at_hesitation_prompts"]["full"]["wait_prob"]:.3f}; on control prompts
{suf["at_hesitation_prompts"]["kept_only"]["control_wait_rate"]:.0%}). Generating freely with only the set
everywhere retains {_pct(suf["hesitation_retained_in_generation"])} of the hesitations per response
(accuracy {suf["accuracy_kept_only"]:.3f}){_free_generation_note(s)}.
Adding the
{st["n_output_features"]} output features' decoder vectors to the hybrid at the last position
moves P("{w}") from {st["wait_prob_before"]:.3f} to **{st["wait_prob_after"]:.3f}**
(the adapted model: {st.get("wait_prob_adapted", float("nan")):.3f}).

{_variants_text(s)}
Figures: `faithfulness`, `accuracy`, `length`, `hesitation_set`, `dose_response`,
`necessity_sufficiency`, `example_graph` (HTML + PNG), `role_examples.html`; numbers in `summary.json`.
"""
    )


def _intervals_text(s: dict) -> str:
    ci = s.get("confidence_intervals") or {}
    names = {
        "necessity_cut": "the cut",
        "random_cut": "the random sets' cut",
        "set_decides_retained": "the share the set decides",
        "accuracy_before": "accuracy before",
        "accuracy_after": "accuracy after",
    }
    parts = [f"{label} [{ci[k][0]:.2f}, {ci[k][1]:.2f}]" for k, label in names.items() if ci.get(k)]
    return "" if not parts else f"95% intervals over the {s['n_problems']} problems: " + "; ".join(parts) + ".\n"


VARIANT_NAMES = {"zero": "others zeroed", "mean": "others at their mean", "patch": "set patched from the full model"}


def _ci(ci) -> str:
    return "" if not ci else f" [{ci[0]:.2f}, {ci[1]:.2f}]"


def _variants_text(s: dict) -> str:
    """The three ways of keeping only the set, teacher-forced at the hesitation prompts, as a table."""
    v = s["sufficiency"].get("variants")
    if not v:
        return ""
    w, full = _word(s), v["full"]

    def mean(xs):  # retention is None where the full model never hesitates: nothing to retain
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    rows = "".join(
        f"| {VARIANT_NAMES[name]} | {r['set']['greedy_rate']:.2f}{_ci(r['set']['greedy_rate_ci'])} | "
        f"{_pct(r['set']['retained'])} | {_pct(mean(r['random_sets']))} | {_pct(r['set_plus_feeders']['retained'])} | "
        f"{_pct(mean(r['random_sets_plus_feeders_size']))} | {r['smallest_sufficient_k'] or 'none'} | "
        f"{', '.join(f'{t!r} x{c}' for t, c in r['instead'].items()) or '-'} |\n"
        for name, r in v["variants"].items()
    )
    return f"""
### Keeping only the set, three ways (teacher-forced at the {v["n_prompts"]} hesitation prompts)
The full adapted model writes "{w}" greedily at {full["greedy_rate"]:.2f}{_ci(full["greedy_rate_ci"])} of
them (95% Wilson intervals in brackets). Each row keeps only the {v["n_set"]}-feature set; random sets
of the same size, and the set plus its {v["n_set_plus_feeders"] - v["n_set"]} strongest feeders from the
graphs (and random sets of that size), are the controls. "Smallest sufficient" is the fewest top-ranked
features that keep {v["threshold"]:.0%} of the full model's greedy "{w}".

| others | greedy "{w}" rate | retained | random sets | set + feeders | random (that size) | smallest sufficient | says instead |
|---|---|---|---|---|---|---|---|
{rows}"""


def _set_rule_text(s: dict) -> str:
    """How the hesitation set was ranked and sized, in a sentence (older summaries: graphs)."""
    w = _word(s)
    rule = s.get("set_rule", {})
    if "sizes" in rule:
        sizes = rule["sizes"]
        curve = ", ".join(f"{k}: {float(p):.2f}" for k, p in rule["greedy_rate_by_k"].items())
        by = (
            "aggregated attribution-graph influence"
            if s["ranking"] == "graph"
            else f'activation x gradient of the log-odds of "{w}"'
        )
        each = "; ".join(f"the {name} rule alone takes {k}" for name, k in sizes.items())
        agree = rule.get("ranking_agreement")
        agreement = (
            ""
            if not agree
            else (
                f". Graph influence ({agree['n_graphs']} graphs) and activation x gradient agree on "
                + ", ".join(f"{x:.0%} of the top {k}" for k, x in agree["top_k_overlap"].items())
                + (
                    f" (Spearman {agree['spearman']:.2f} over the {agree['n_compared']} features in either top 100)"
                    if agree.get("spearman") is not None
                    else ""
                )
            )
        )
        return (
            f"Ranking features by {by}, the set is {rule['rule']} ({each}; share of the prompts "
            f'where greedy decoding still writes "{w}", by number ablated: {curve}){agreement}'
        )
    if s.get("ranking", "graph") == "graph":
        return (
            f'Aggregating "{w}" attribution graphs over the prompts, the set is the fewest features '
            f"covering {s['influence_share']:.0%} of the influence"
        )
    curve = s["set_rule"]["p_wait_by_k"]
    steps = ", ".join(f"{k}: {float(p):.3f}" for k, p in curve.items())
    return (
        f'Ranking features by activation x gradient of the log-odds of "{w}" (summed over positions, '
        f"each prompt normalised to 1), the set is the fewest top features whose ablation removes "
        f'{s["influence_share"]:.0%} of P("{w}") at these prompts (P by number ablated: {steps}; '
        f"{s['n_graphs']} attribution graph(s) built for the example figure; of each graph's top "
        f"{s['n_hesitation_features']} features by influence, the set holds "
        f"{', '.join(f'{x:.0%}' for x in s['set_rule'].get('graph_top_k_in_set', [])) or 'n/a'})"
    )
