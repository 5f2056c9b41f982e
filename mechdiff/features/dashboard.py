"""Static HTML dashboards of the features in an activation store, viewable offline.

:func:`write_dashboards` writes::

    folder/index.html             every page, grouped by category (then by density)
    folder/features/<n>.html      one page per feature: statistics, where it fires, logit lens,
                                  activation and thinking-position histograms (plotly), top and
                                  random examples with highlighted activations (circuitsvis)
    folder/assets/plotly.min.js   the two JavaScript bundles, written once and shared by every
    folder/assets/circuitsvis.js  page (local files: nothing is loaded from a network); inside a
                                  figures/ tree they are figures/assets/, shared by every study

Examples use circuitsvis' ``colored_tokens(...).local_src`` with its inlined bundle moved to the
shared ``assets/circuitsvis.js`` (the per-example HTML keeps only the render call).

Example:
    >>> import tempfile
    >>> from attribution.synthetic import tiny_adapted
    >>> from mechdiff.features.store import build_store, StoreConfig
    >>> adapted = tiny_adapted(seed=0)
    >>> store = build_store(adapted.model, [[2, 5, 9, 11, 7, 20]], [adapted.acts_name(0)],
    ...                     config=StoreConfig(top_k=2))
    >>> index = write_dashboards(store, tempfile.mkdtemp(), adapted.model.tokenizer, features=[0, 1])
    >>> index.name
    'index.html'
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go
import plotly.offline
import torch
from circuitsvis.tokens import colored_tokens

from mechdiff.features.store import REGIONS, ActivationStore
from mechdiff.visualization.assets import (
    circuitsvis_bundle,
    circuitsvis_src,
    shared_asset,
    without_bundle,
)

STYLE = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1150px;color:#222}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f3f3f3}.cat{background:#eef;border-radius:4px;padding:2px 8px;font-size:14px}
.ex{border-top:1px solid #eee;padding:2px 0}.meta{color:#666;font-size:12px}
.row{display:flex;gap:16px;flex-wrap:wrap}h2{margin-top:28px}"""


def write_assets(folder: str | Path) -> str:
    """Write ``plotly.min.js`` and ``circuitsvis.js`` once (into ``figures/assets`` when
    ``folder`` is inside a figures tree, else ``folder/assets``); returns the folder's ``src``
    prefix as seen from a feature page (e.g. ``../assets``)."""
    page = Path(folder) / "features" / "page.html"
    circuitsvis_src(page, root=folder)
    return shared_asset(page, "plotly.min.js", plotly.offline.get_plotlyjs, root=folder).rsplit("/", 1)[0]


def token_view(words: Sequence[str], acts: Sequence[float], max_value: float, bundle: str) -> str:
    """The circuitsvis ``colored_tokens`` HTML of one example, without its inlined bundle."""
    view = colored_tokens(
        list(words), [float(f"{a:.4g}") for a in acts], min_value=0.0, max_value=max(float(max_value), 1e-6)
    )
    return without_bundle(view.local_src, bundle)  # the page loads the bundle once, from assets/


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token as text; word-level vocabularies (no token carries a space) get one appended."""
    words = [tokenizer.decode([int(i)]) for i in ids]
    return words if any(w[:1].isspace() for w in words) else [w + " " for w in words]


def _esc(x) -> str:
    return html.escape(str(x))


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _hist_html(store: ActivationStore, i: int) -> str:
    cfg = store.config
    lo, hi = cfg.act_log10_range
    edges = torch.linspace(lo, hi, cfg.act_bins + 1)
    centres = ((edges[1:] + edges[:-1]) / 2).tolist()
    ticks = list(range(int(lo), int(hi) + 1))
    act = go.Figure(go.Bar(x=centres, y=store.act_hist[i].tolist(), marker_color="#4C72B0"))
    act.update_layout(
        template="none",
        title="activation (firing tokens)",
        bargap=0.05,
        xaxis={
            "title": "activation (log scale; end bins include the tails)",
            "tickvals": ticks,
            "ticktext": [f"{10.0**t:g}" for t in ticks],
        },
        yaxis_title="tokens",
        width=540,
        height=300,
        margin={"l": 50, "r": 10, "t": 40, "b": 40},
    )
    pos_x = [(j + 0.5) / cfg.pos_bins for j in range(cfg.pos_bins)]
    pos = go.Figure(go.Bar(x=pos_x, y=store.pos_hist[i].tolist(), marker_color="#DD8452"))
    pos.update_layout(
        template="none",
        title="relative position in the thinking span"
        + ("" if cfg.think_ids is not None else " (none: the corpus has no thinking delimiters)"),
        xaxis={"title": "0 = <think>, 1 = </think>", "range": [0, 1]},
        yaxis_title="firing tokens",
        width=540,
        height=300,
        margin={"l": 50, "r": 10, "t": 40, "b": 40},
    )
    opts = {"full_html": False, "include_plotlyjs": False, "config": {"displayModeBar": False}}
    return (
        f'<div class="row"><div>{act.to_html(div_id=f"act-hist-{i}", **opts)}</div>'
        f"<div>{pos.to_html(div_id=f'pos-hist-{i}', **opts)}</div></div>"
    )


def _examples_html(store, i, tokenizer, kind, n, bundle, label_names) -> str:
    exs = store.examples(i, kind)[:n]
    if not exs:
        return "<p class=meta>none</p>"
    peak = max(float(store.act_max[i]), 1e-6)
    parts = []
    for e in exs:
        words = token_strings(tokenizer, e["tokens"])
        label = label_names[e["label"]] if 0 <= e["label"] < len(label_names) else ""
        parts.append(
            f"<div class=ex><span class=meta>activation {e['value']:.3g} &middot; row {e['row']}"
            f" pos {e['pos']} &middot; token {_esc(words[e['centre']].strip())}"
            f"{' &middot; label ' + _esc(label) if label else ''}</span>"
            f"{token_view(words, e['acts'], peak, bundle)}</div>"
        )
    return "\n".join(parts)


def feature_page(
    store: ActivationStore,
    i: int,
    tokenizer,
    *,
    category: str = "",
    role: str = "",
    n_top: int = 12,
    n_random: int = 6,
    bundle: str | None = None,
    assets: str = "../assets",
) -> str:
    """The HTML of feature ``i``'s page (the JavaScript loaded from ``assets``)."""
    bundle = circuitsvis_bundle() if bundle is None else bundle
    names = store.config.label_names
    n_fire = int(store.n_fire[i])
    mean = float(store.act_sum[i]) / max(1, n_fire)
    stats = _table(
        ["density", "firing tokens", "max activation", "mean when firing", "role"],
        [[f"{float(store.density[i]):.4%}", n_fire, f"{float(store.act_max[i]):.3g}", f"{mean:.3g}", role or "-"]],
    )
    base = store.tokens_by_region / store.tokens_by_region.sum().clamp(min=1)
    reg = store.region_count[i] / max(1, n_fire)
    where = _table(
        ["region", "share of firings", "share of tokens", "activation mass"],
        [
            [r, f"{float(reg[j]):.1%}", f"{float(base[j]):.1%}", f"{float(store.region_mass[i, j]):.3g}"]
            for j, r in enumerate(REGIONS)
        ],
    )
    labels = ""
    if names:
        order = store.label_count[i].argsort(descending=True)[:6].tolist()
        labels = "<h3>Ground-truth labels of the top examples (what the category rule reads)</h3>" + _table(
            ["label", "top examples"], [[names[j], n] for j, n in _top_example_labels(store, i)]
        )
        labels += "<h3>Ground-truth labels of all firing tokens</h3>" + _table(
            ["label", "share of firings", "activation mass"],
            [
                [
                    names[j],
                    f"{float(store.label_count[i, j]) / max(1, n_fire):.1%}",
                    f"{float(store.label_mass[i, j]):.3g}",
                ]
                for j in order
                if store.label_count[i, j] > 0
            ],
        )
    lens = "<p class=meta>no decoder directions given</p>"
    if store.meta.get("has_lens") and int(store.lens_top_ids[i, 0]) >= 0:
        top = tokenizer.convert_ids_to_tokens(store.lens_top_ids[i].tolist())
        bot = tokenizer.convert_ids_to_tokens(store.lens_bottom_ids[i].tolist())
        lens = _table(
            ["promoted", "logit", "suppressed", "logit"],
            [
                [t, f"{float(v):+.3g}", b, f"{float(w):+.3g}"]
                for t, v, b, w in zip(top, store.lens_top_values[i], bot, store.lens_bottom_values[i])
            ],
        )
    name = store.name(i)
    cat = f" <span class=cat>{_esc(category)}</span>" if category else ""
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{_esc(name)}</title><style>{STYLE}</style>
<script src="{assets}/plotly.min.js"></script><script src="{assets}/circuitsvis.js"></script>
</head><body>
<p><a href="../index.html">&larr; all features</a></p>
<h1>Feature {_esc(name)}{cat}</h1>
<p class=meta>store index {i} &middot; hook {_esc(store.locate(i)[0])} unit {store.locate(i)[1]}</p>
{stats}
<h2>Where it fires</h2>{where}{labels}
<h2>Logit lens</h2><p class=meta>W_U<sup>T</sup> (ln_final.w &odot; decoder direction), unembedding demeaned</p>{lens}
<h2>Histograms</h2>{_hist_html(store, i)}
<h2>Top activating examples</h2>{_examples_html(store, i, tokenizer, "top", n_top, bundle, names)}
<h2>Random activating examples</h2>{_examples_html(store, i, tokenizer, "rand", n_random, bundle, names)}
</body></html>
"""


def _top_example_labels(store, i: int) -> list[tuple[int, int]]:
    """``(label, count)`` over feature ``i``'s top examples, most common first."""
    labels = store.top_label[i][store.top_label[i] >= 0]
    counts = torch.bincount(labels, minlength=max(1, len(store.config.label_names)))
    return [(j, int(counts[j])) for j in counts.argsort(descending=True).tolist() if counts[j] > 0]


def page_name(i: int) -> str:
    return f"features/{i}.html"


def write_dashboards(
    store: ActivationStore,
    folder: str | Path,
    tokenizer,
    *,
    categories: Sequence[str] | None = None,
    roles: dict[int, str] | None = None,
    features: Sequence[int] | None = None,
    title: str = "Feature dashboards",
    summary_html: str = "",
    n_top: int = 12,
    n_random: int = 6,
) -> Path:
    """Write a page per feature (``features``, default: every alive one), the shared assets and
    the index; returns the index path."""
    folder = Path(folder)
    (folder / "features").mkdir(parents=True, exist_ok=True)
    assets = write_assets(folder)
    features = [int(i) for i in (store.alive.nonzero()[:, 0].tolist() if features is None else features)]
    roles, bundle = roles or {}, circuitsvis_bundle()
    cat_of = (lambda i: categories[i]) if categories is not None else (lambda i: "")
    for i in features:
        text = feature_page(
            store,
            i,
            tokenizer,
            category=cat_of(i),
            role=roles.get(i, ""),
            n_top=n_top,
            n_random=n_random,
            bundle=bundle,
            assets=assets,
        )
        (folder / page_name(i)).write_text(text, encoding="utf-8")
    (folder / "index.html").write_text(
        index_page(store, features, tokenizer, cat_of, roles, title, summary_html), encoding="utf-8"
    )
    return folder / "index.html"


def index_page(store, features, tokenizer, cat_of, roles, title, summary_html="") -> str:
    """The index: a section per category (reasoning categories first), densest features first."""
    from mechdiff.features.classify import CATEGORIES, REASONING

    groups: dict[str, list[int]] = {}
    for i in features:
        groups.setdefault(cat_of(i) or "unclassified", []).append(i)
    rank = {c: j for j, c in enumerate(dict.fromkeys((*REASONING, *CATEGORIES)))}
    names = store.config.label_names
    sections = []
    for cat in sorted(groups, key=lambda c: (rank.get(c, len(rank)), c)):
        rows = []
        for i in sorted(groups[cat], key=lambda i: -float(store.density[i])):
            lens = " ".join(tokenizer.convert_ids_to_tokens([t for t in store.lens_top_ids[i, :3].tolist() if t >= 0]))
            labs = ", ".join(f"{names[j]} {n}" for j, n in _top_example_labels(store, i)[:2])
            rows.append(
                f'<tr><td><a href="{page_name(i)}">{_esc(store.name(i))}</a></td>'
                f"<td>{_esc(roles.get(i, ''))}</td><td>{float(store.density[i]):.3%}</td>"
                f"<td>{float(store.act_max[i]):.3g}</td><td>{_esc(labs)}</td><td>{_esc(lens)}</td></tr>"
            )
        sections.append(
            f'<h2 id="{_esc(cat)}">{_esc(cat)} ({len(groups[cat])})</h2><table><tr><th>feature</th>'
            f"<th>role</th><th>density</th><th>max</th><th>labels of top examples</th><th>logit lens</th>"
            f"</tr>{''.join(rows)}</table>"
        )
    toc = " &middot; ".join(
        f'<a href="#{_esc(c)}">{_esc(c)}</a>' for c in sorted(groups, key=lambda c: (rank.get(c, len(rank)), c))
    )
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{_esc(title)}</title><style>{STYLE}</style></head><body>
<h1>{_esc(title)}</h1>{summary_html}
<p class=meta>{len(features)} feature pages of {store.n_features} features; {store.n_tokens} tokens
from {store.rows_done} rows.</p><p>{toc}</p>
{"".join(sections)}
</body></html>
"""
