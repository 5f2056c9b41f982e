"""The feature census as a library call: what the adapters' features read, and how many are about
reasoning, against random adapters and the model's own MLP neurons.

One pass over held-out traces of the pair's workload (:func:`mechdiff.workloads.for_pair`,
labelled by :mod:`mechdiff.studies.features_labels`) fills an activation store
(:mod:`mechdiff.features.store`) for every adapter feature and, as a baseline from the same forward,
every base-MLP neuron of the adapted model. Features are classified by the ground-truth label rule
(:func:`mechdiff.features.classify.rule_text`, with the workload's hesitation word); reasoning
features get a role (``output`` when one of the workload's hesitation tokens is among their top-3
logit-lens tokens). Steps:

 1. the store (cached in ``cfg.store`` when given: resumable; a store of other adapters, corpus or
    settings is rebuilt);
 2. the label rule on the adapters and the neurons;
 3. the control: random sparse adapters of the same size at the trained ones' median density,
    reading the hybrid's MLP inputs (the rule's chance level on this model);
 4. optionally an LM judge behind an OpenAI-compatible endpoint (``cfg.judge_url``); it needs no
    label, so it runs on any workload;
 5. the dashboards to write: every reasoning feature (up to ``max_reasoning_pages``) and the densest
    ``pages_per_category`` of every other category.

Example:
    >>> from mechdiff.models import load_pair
    >>> from mechdiff.adapters.formats import SHIPPED_DIR, load_adapted
    >>> pair = load_pair("organism"); adapted = load_adapted(pair, SHIPPED_DIR)
    >>> cfg = FeaturesConfig(n_traces=24, batch_size=16, top_k=8, pages_per_category=2)

    The census itself is not run as a doctest: the store and the control take a minute.
    >>> result = run(pair, adapted, cfg, progress=False)  # doctest: +SKIP
    >>> 0 < result.summary()["reasoning_fraction"] < 1  # doctest: +SKIP
    True
    >>> result.figures()["category_counts"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mechdiff.config_checks import check
from mechdiff.features import classify as C
from mechdiff.features.store import ActivationStore, StoreConfig, StoreMismatch, build_store
from mechdiff.studies import features_report as report_mod
from mechdiff.studies.features_labels import CensusTraces, census_traces
from mechdiff.workloads import for_pair

PUBLISHED = {"reasoning_fraction": 0.08}


@dataclass(frozen=True)
class FeaturesConfig:
    """Corpus, store and classification settings of the census (defaults: the organism's headline run)."""

    n_traces: int = 300  # held-out traces in the store
    split: str = "validation"  # the workload's split of the traces
    top_k: int = 16  # top activating sequences kept per feature
    n_random: int = 8  # random activating examples per feature
    batch_size: int = 64  # traces per forward (fewer when max_batch_gib says so)
    max_batch_gib: float = 2.0  # bound on one batch's cached activations (long chat traces x many units)
    min_examples: int = 3  # fewer top examples: "rare"
    pages_per_category: int = 25  # dashboards per non-reasoning category
    max_reasoning_pages: int = 200  # dashboards of reasoning features
    neurons: bool = True  # the MLP-neuron baseline
    control: bool = True  # random adapters of the same size and density
    judge_url: str | None = None  # OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1)
    judge_model: str | None = None
    judge_n: int = 20  # features sent to the judge
    store: str | None = None  # the store's folder (a cache); None: in memory only
    fresh: bool = False  # rebuild the store even if one is cached
    seed: int = 0

    def __post_init__(self):
        check(self, at_least_1=("n_traces", "top_k", "batch_size", "n_random", "judge_n"))
        check(self, non_negative=("min_examples", "pages_per_category", "max_reasoning_pages"))
        check(self, positive=("max_batch_gib",))
        check(self, choices={"split": ("train", "validation", "test")})
        if bool(self.judge_url) != bool(self.judge_model):
            raise ValueError("the judge needs both judge_url and judge_model")


@dataclass
class FeaturesResult:
    """What :func:`run` measured: :meth:`summary` (the ``summary.json`` content), :meth:`figures`
    (plotly figures that display inline), :meth:`report` (markdown), :meth:`write` (all to a folder,
    with the dashboards)."""

    data: dict
    store: ActivationStore = field(repr=False)
    categories: list = field(repr=False)
    roles: dict = field(repr=False)
    groups: dict = field(repr=False)
    pages: list = field(repr=False)
    tokenizer: object = field(repr=False)
    run_seconds: float = 0.0  # the census; ``seconds`` in the summary adds the last write's

    def summary(self) -> dict:
        """The ``summary.json`` content (``figures``: the files :meth:`write` writes, under its folder once written)."""
        return self.data

    def figures(self) -> dict:
        """``{"category_counts": ..., "regions": ...}``: plotly figures."""
        return report_mod.figures(self.data, self.store, self.categories, self.groups)

    def report(self) -> str:
        return report_mod.report_markdown(self.data)

    def write(self, out: str | Path) -> Path:
        """Dashboards (``index.html``, ``features/``), figures (HTML + PNG), ``summary.json`` and
        ``report.md`` into ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        report_mod.write_dashboards(out, self.data, self.store, self.tokenizer, self.categories, self.roles, self.pages)
        self.data["figures"] = report_mod.write_figures(out, self.figures())
        self.data["seconds"] = self.run_seconds + time.perf_counter() - t0
        (out / "summary.json").write_text(json.dumps(self.data, indent=1))
        (out / "report.md").write_text(self.report())
        return out


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[features] {msg}", flush=True)


def make_store(
    adapted,
    corpus: CensusTraces,
    cfg: FeaturesConfig,
    *,
    with_neurons: bool,
    folder: str | None,
    pad_id: int = 0,
    progress: bool = True,
) -> ActivationStore:
    """The store of ``adapted``'s features (then, ``with_neurons``, its MLP neurons) on ``corpus``."""
    model, n_layers = adapted.model, adapted.config.n_layers
    hooks = [adapted.acts_name(layer) for layer in range(n_layers)]
    decoder = C.decoder_directions(adapted)
    if with_neurons:
        hooks += [f"blocks.{layer}.mlp.hook_post" for layer in range(n_layers)]
        decoder = torch.cat([decoder, *[b.mlp.W_out.detach().float() for b in model.blocks]])
    n_units = adapted.n_features + (n_layers * model.cfg.d_mlp if with_neurons else 0)
    batch_size = batch_that_fits(cfg.batch_size, max(map(len, corpus.rows["input_ids"])), n_units, cfg.max_batch_gib)
    if batch_size < cfg.batch_size:
        _log(f"    batches of {batch_size} traces (not {cfg.batch_size}): max_batch_gib {cfg.max_batch_gib}", progress)
    config = StoreConfig(
        top_k=cfg.top_k,
        n_random=cfg.n_random,
        batch_size=batch_size,
        seed=cfg.seed,
        label_names=corpus.label_names,
        think_ids=corpus.think_ids,
    )
    kw = dict(config=config, decoder=decoder, pad_id=pad_id, progress=progress)
    if folder is None:
        return build_store(model, corpus.rows, hooks, None, **kw)
    if cfg.fresh:
        shutil.rmtree(folder, ignore_errors=True)
    try:
        return build_store(model, corpus.rows, hooks, folder, **kw)
    except StoreMismatch:
        _log(f"    the store in {folder} was made for other adapters or settings: rebuilding", progress)
        shutil.rmtree(folder)
        return build_store(model, corpus.rows, hooks, folder, **kw)


def batch_that_fits(batch_size: int, max_len: int, n_units: int, max_gib: float) -> int:
    """The largest batch, at most ``batch_size``, whose activations (float32, cached once and
    concatenated once: 8 bytes per unit and token) fit in ``max_gib``.

    >>> batch_that_fits(64, 80, 4608, 2.0), batch_that_fits(64, 320, 30 * (512 + 1536), 2.0)
    (64, 13)
    """
    per_row = 8 * max_len * n_units
    return max(1, min(batch_size, int(max_gib * 2**30 // per_row)))


def random_control(pair, adapted, store, corpus: CensusTraces, cfg: FeaturesConfig, progress: bool = True) -> dict:
    """The label rule on random sparse adapters (same size, the trained ones' median density)
    reading the hybrid's MLP inputs (decoders ~0): the rule's chance level on this model."""
    from attribution.synthetic import randomize_adapters
    from mechdiff.adapters.transcoder import AdaptedModel

    acfg = adapted.config
    n_ad = adapted.n_features
    density = float(store.density[:n_ad][store.alive[:n_ad]].median())
    rows = for_pair(pair).traces(16, "train", seed=cfg.seed)["input_ids"]
    width = min(map(len, rows))
    control = AdaptedModel.from_pair(pair, d_sae=acfg.d_sae, backbone=acfg.backbone)
    control.to(pair.target.cfg.device)
    randomize_adapters(
        control,
        seed=cfg.seed + 1,
        density=density,
        dec_norm=1e-6,
        tokens=torch.tensor([r[:width] for r in rows], device=pair.target.cfg.device),
    )
    folder = None if cfg.store is None else cfg.store + "-control"
    pad_id = pair.tokenizer.pad_token_id or 0
    ctl_store = make_store(control, corpus, cfg, with_neurons=False, folder=folder, pad_id=pad_id, progress=progress)
    res = C.classify_store(ctl_store, min_examples=cfg.min_examples, hesitation_ids=corpus.hesitation_ids)
    return {**res["summary"], "matched_density": density}


def part_summary(cats, roles, idx):
    part = [cats[i] for i in idx]
    return C.summarize(part, {i: r for i, r in roles.items() if i in set(idx)})


def pick_pages(cats, store, idx, cfg: FeaturesConfig) -> list[int]:
    """The features to give a dashboard: the densest of each category (reasoning: up to ``max_reasoning_pages``)."""
    by_cat: dict[str, list[int]] = {}
    for i in idx:
        by_cat.setdefault(cats[i], []).append(i)
    pages = []
    for cat, members in by_cat.items():
        if cat == "dead":
            continue
        members.sort(key=lambda i: -float(store.density[i]))
        pages += members[: cfg.max_reasoning_pages if cat in C.REASONING else cfg.pages_per_category]
    return sorted(pages)


def run_judge(store, tok, cats, idx, cfg: FeaturesConfig) -> dict:
    """The LM judge on the first ``judge_n`` adapter features that are neither dead nor rare."""
    client = C.JudgeClient(cfg.judge_url, cfg.judge_model)
    alive = [i for i in idx if cats[i] not in ("dead", "rare")][: cfg.judge_n]
    judged = C.judge_store(store, tok, client, alive)
    agree = sum((j.category == "reasoning") == (cats[i] in C.REASONING) for i, j in judged.items())
    return {
        "model": cfg.judge_model,
        "n": len(judged),
        "category_counts": {c: sum(j.category == c for j in judged.values()) for c in C.JUDGE_CATEGORIES},
        "agreement_with_label_rule_on_reasoning": agree / max(1, len(judged)),
        "unparsed": sum(not j.ok for j in judged.values()),
        "features": {
            store.name(i): {"category": j.category, "role": j.role, "explanation": j.explanation}
            for i, j in judged.items()
        },
    }


def run(
    pair,
    adapted,
    cfg: FeaturesConfig | None = None,
    *,
    progress: bool = True,
    pair_name: str | None = None,
    adapters_name: str = "(given)",
) -> FeaturesResult:
    """The feature census of ``adapted`` (trained adapters on ``pair``) on the pair's workload.

    ``pair_name`` / ``adapters_name`` only label the summary and report (default: the pair's
    workload name, ``organism`` for organisms). The control's random adapters draw their encoders
    from torch's global generator, as ``python -m analyses.features`` always has: seed it
    (``torch.manual_seed(cfg.seed)``) before loading the pair, as the script does, for the same
    control numbers run after run.
    """
    cfg = cfg or FeaturesConfig()
    t0 = time.perf_counter()
    work = for_pair(pair)
    tok = work.tokenizer
    _log(f"1/4 activation store over {cfg.n_traces} {cfg.split} traces ({work.name}) -> {cfg.store}", progress)
    corpus = census_traces(work, cfg.n_traces, cfg.split, seed=cfg.seed)
    store = make_store(
        adapted,
        corpus,
        cfg,
        with_neurons=cfg.neurons,
        folder=cfg.store,
        pad_id=tok.pad_token_id or 0,
        progress=progress,
    )
    n_ad = adapted.n_features
    groups = {"adapters": list(range(n_ad)), "mlp_neurons": list(range(n_ad, store.n_features))}
    groups = {k: v for k, v in groups.items() if v}
    tps = store.n_tokens / max(store.meta["seconds"], 1e-9)
    _log(f"    {store.n_tokens} tokens, {store.n_features} units, {tps:.0f} tokens/s", progress)
    _log(f"2/4 classify by the ground-truth label rule (hesitation: {corpus.word!r})", progress)
    res = C.classify_store(store, min_examples=cfg.min_examples, hesitation_ids=corpus.hesitation_ids)
    cats, roles = res["categories"], res["roles"]
    summaries = {k: part_summary(cats, roles, idx) for k, idx in groups.items()}
    main_sum = summaries["adapters"]
    _log(
        f"    adapters: {main_sum['n_alive']}/{main_sum['n_features']} alive, reasoning fraction "
        f"{main_sum['reasoning_fraction']:.1%} (published ~{PUBLISHED['reasoning_fraction']:.0%})",
        progress,
    )
    if "mlp_neurons" in summaries:
        share = summaries["mlp_neurons"]["reasoning_fraction"]
        _log(f"    MLP neurons (baseline): reasoning fraction {share:.1%}", progress)
    if cfg.control:
        _log("3/4 control: random adapters of the same size and density", progress)
        summaries["random_adapters"] = random_control(pair, adapted, store, corpus, cfg, progress)
        share = summaries["random_adapters"]["reasoning_fraction"]
        _log(f"    random adapters (control): reasoning fraction {share:.1%}", progress)
    judge = run_judge(store, tok, cats, groups["adapters"], cfg) if cfg.judge_url else None
    _log("4/4 dashboards to write", progress)
    pages = pick_pages(cats, store, groups["adapters"], cfg)
    data = {
        **main_sum,
        "published": PUBLISHED,
        "rule": C.rule_text(corpus.word),
        "pair": pair_name or work.name,
        "adapters": adapters_name,
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
            "folder": cfg.store,
            "n_traces": store.rows_done,
            "n_tokens": store.n_tokens,
            "n_units": store.n_features,
            "seconds": store.meta["seconds"],
            "tokens_per_second": tps,
            "top_k": cfg.top_k,
            "n_random": cfg.n_random,
        },
        "n_dashboards": len(pages),
        "figures": report_mod.figure_files(),
        "judge": judge,
        "workload": {
            "name": corpus.workload,
            "word": corpus.word,
            "hesitation_tokens": tok.convert_ids_to_tokens(list(corpus.hesitation_ids)),
            "label_names": list(corpus.label_names),
            "thinking_span": corpus.think_ids is not None,
            "judge": "run" if judge is not None else "not run: no judge_url given",
        },
        "seconds": time.perf_counter() - t0,
    }
    return FeaturesResult(data, store, cats, roles, groups, pages, tok, data["seconds"])
