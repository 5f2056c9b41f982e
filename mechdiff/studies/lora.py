"""The LoRA-lens study as a library call: what a rank-1 LoRA distilled from the target encodes.

Given a pair and LoRAs of several ranks (the shipped organism's, ones the caller trained, or
trained here), :func:`run` measures:

 1. behaviour of base, target and each LoRA on held-out test problems, and the gain each LoRA
    recovers; the first rank's LoRA with only its MLP or only its attention adapters;
 2. ablation KL of the first rank's LoRA on held-out traces: per layer, per (module, layer)
    adapter, per group (MLP / attention), and the MLP-over-attention ratio per adapter;
 3. label-based monosemanticity of the LoRA adapters and of the MLP neurons (top activations);
 4. a BatchTopK SAE on the ``n_layers x 7`` LoRA state (SAELens format): FVU, L0, dead latents,
    each latent's label distribution, categories, and the latents' monosemanticity;
 5. top contexts of every adapter, the best MLP neurons and the heaviest SAE latents.

The result's :meth:`~LoraStudyResult.summary` is what ``python -m analyses.lora`` writes to
``summary.json``; :meth:`~LoraStudyResult.write` writes everything that CLI writes.

Example:
    >>> cfg = LoraStudyConfig(ranks=[1, 2], n_problems=8, n_holdout=12, n_sae_traces=40, sae_samples=4096)
    >>> cfg.ranks
    (1, 2)
    >>> LoraStudyConfig(ranks=[1, 0])
    Traceback (most recent call last):
    ...
    mechdiff.config_checks.ConfigError: LoraStudyConfig.ranks = (1, 0): every rank must be >= 1

    The study itself is not run as a doctest: it generates and trains a SAE for minutes.
    >>> from mechdiff.models import load_pair
    >>> result = run(load_pair("organism"), cfg, progress=False)  # doctest: +SKIP
    >>> sorted(result.figures())[:2]  # doctest: +SKIP
    ['ablation_heatmap', 'ablation_layer']
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from mechdiff.config_checks import ConfigError, check
from mechdiff.studies import lora_report

PUBLISHED = {"gain_recovered": "0.73-0.90", "monosemantic_lora": 0.16, "monosemantic_mlp": 0.13,
             "ablation_kl_mlp_over_attention": 2.4}  # fmt: skip


@dataclass(frozen=True)
class LoraStudyConfig:
    """Ranks, sample sizes and (when LoRAs are trained here) the training budget.

    The defaults are ``python -m analyses.lora``'s, except ``runs``: the CLI saves LoRAs it trains
    under ``runs/lora_rR`` (and resumes from there); the library keeps them in memory unless given
    a folder.
    """

    ranks: tuple[int, ...] = (1, 2, 4, 8)  # LoRA ranks; the first is the one analysed
    n_problems: int = 500  # held-out test problems for behaviour
    n_holdout: int = 300  # validation traces for ablations, monosemanticity and contexts
    n_sae_traces: int = 2000  # train traces whose LoRA states train the SAE
    sae_samples: int = 1_500_000  # SAE training samples
    sae_k: float = 16  # BatchTopK k
    sae_expansion: int = 8  # SAE width / LoRA state width
    top_k: int = 100  # top activations per unit for monosemanticity
    retrain: bool = False  # train every rank instead of loading the shipped LoRAs (other pairs always train)
    steps: int = 1000  # training steps (with retrain, for another pair, or for a rank not shipped)
    n_traces: int = 20_000  # training traces
    kl_weight: float = 0.0  # distillation KL weight in training
    runs: str | None = None  # folder for trained LoRAs (``runs/lora_rR``); None: not saved

    def __post_init__(self):
        object.__setattr__(self, "ranks", tuple(self.ranks))
        check(
            self,
            at_least_1=(
                "n_problems",
                "n_holdout",
                "n_sae_traces",
                "sae_samples",
                "sae_expansion",
                "top_k",
                "steps",
                "n_traces",
            ),
            positive=("sae_k",),
            non_negative=("kl_weight",),
        )
        if not self.ranks:
            raise ConfigError("ranks", self.ranks, "name at least one rank", type(self).__name__)
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in self.ranks):
            raise ConfigError("ranks", self.ranks, "every rank must be >= 1", type(self).__name__)
        if not isinstance(self.retrain, bool):
            raise ConfigError("retrain", self.retrain, "must be True or False", type(self).__name__)

    def settings(self) -> dict:
        """The fields as ``summary.json`` records them (JSON types: ranks as a list)."""
        return {f.name: list(v) if f.name == "ranks" else v for f in fields(self) for v in [getattr(self, f.name)]}


@dataclass
class LoraStudyResult:
    """What :func:`run` measured: :meth:`summary` (the ``summary.json`` content), :meth:`figures`
    (plotly figures that display inline), :meth:`report` (``report.md``), :meth:`write` (all of
    it, the contexts and the SAE, to a folder)."""

    data: dict
    contexts: dict = field(repr=False)  # contexts.json: top contexts of adapters, MLP neurons, SAE latents
    plots: dict = field(repr=False)  # the figures' arrays beyond the summary (see lora_report.figures)
    sae_files: dict[str, bytes] = field(repr=False)  # the SAE's SAELens folder (cfg.json, weights)
    sae: object = field(repr=False)  # the SAE (sae_lens.SAE), loaded from those files
    loras: dict = field(repr=False)  # rank -> LoRAModel studied

    def summary(self) -> dict:
        return self.data

    def figures(self) -> dict:
        """``{file name: plotly figure}``; each displays inline in a notebook."""
        return lora_report.figures(self.data, self.plots)

    def headline(self) -> str:
        return lora_report.headline(self.data, PUBLISHED)

    def report(self) -> str:
        return lora_report.report_markdown(self.data, self.contexts, PUBLISHED)

    def write(self, out: str | Path) -> Path:
        """Into ``out``: every figure (HTML + PNG) and ``index.html``, ``summary.json``,
        ``contexts.json``, ``report.md`` and the SAE in SAELens format under ``sae/``."""
        out = Path(out)
        (out / "sae").mkdir(parents=True, exist_ok=True)
        for name, blob in self.sae_files.items():
            (out / "sae" / name).write_bytes(blob)
        lora_report.write_figures(out, self.data, self.plots, PUBLISHED)
        (out / "contexts.json").write_text(json.dumps(self.contexts, indent=1))
        (out / "summary.json").write_text(json.dumps(self.data, indent=1))
        (out / "report.md").write_text(self.report())
        return out


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(msg, flush=True)


def get_loras(pair, cfg: LoraStudyConfig, progress: bool = True) -> tuple[dict, dict[int, str]]:
    """``({rank: LoRAModel}, {rank: where it came from})``: the shipped LoRA of each rank (the
    shipped organism's pair only), or one trained with ``cfg``'s budget (every rank with
    ``cfg.retrain``, and any rank not shipped; saved under ``cfg.runs``)."""
    from mechdiff.lora import TrainConfig, shipped_lora, train_lora

    shipped = not cfg.retrain and pair.meta.get("source") == "organism"  # the shipped LoRAs are its
    loras, sources = {}, {}
    for r in cfg.ranks:
        lora = shipped_lora(pair, r) if shipped else None
        sources[r] = "shipped"
        if lora is None:
            train = TrainConfig(rank=r, steps=cfg.steps, n_traces=cfg.n_traces, kl_weight=cfg.kl_weight)
            out_dir = Path(cfg.runs) / f"lora_r{r}" if cfg.runs is not None else None
            lora, _ = train_lora(pair, train, out_dir, progress=progress)
            sources[r] = f"trained ({cfg.steps} steps)"
        loras[r] = lora
    return loras, sources


def run(
    pair,
    cfg: LoraStudyConfig | None = None,
    *,
    loras: Mapping[int, object] | None = None,
    progress: bool = True,
    settings: Mapping | None = None,
) -> LoraStudyResult:
    """The LoRA-lens study on ``pair`` (see the module doc).

    ``loras``: ``{rank: LoRAModel}`` to study instead of the shipped / trained ones (then
    ``cfg.ranks`` must name the same ranks; sources are recorded as ``"given"``).
    ``settings``: what the caller records beside the config under ``summary["settings"]`` (the CLI
    records its flags); the config's own fields always win.
    """
    from mechdiff.features import lora_lens as lens
    from mechdiff.features import lora_sae
    from mechdiff.lora import evaluate_lora
    from mechdiff.organism.task import LABELS
    from mechdiff.training.lora_objective import TraceBatches
    from mechdiff.workloads import for_pair

    cfg = cfg or LoraStudyConfig()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    if loras is None:
        loras, sources = get_loras(pair, cfg, progress)
    else:
        if list(loras) != list(cfg.ranks):
            raise ValueError(f"loras has ranks {list(loras)}, the config names {list(cfg.ranks)}")
        loras, sources = dict(loras), {r: "given" for r in loras}
    rank = cfg.ranks[0]
    r1 = loras[rank]
    work = for_pair(pair)  # the pair's own task (an organism of the family: its words and widths)
    problems = work.problems(cfg.n_problems, "test")

    _log("behaviour ...", progress)
    behaviour = evaluate_lora(pair, {f"lora_r{r}": m for r, m in loras.items()}, cfg.n_problems, progress=progress)
    sets = lens.adapter_sets(r1)
    for name, ablate in (("mlp_only", "attention"), ("attention_only", "mlp")):
        behaviour[name] = work.evaluate(r1.model, problems, fwd_hooks=r1.ablation_hooks(sets["group"][ablate]))

    _log("ablations ...", progress)
    holdout = work.traces(cfg.n_holdout, "validation", seed=1)
    tokens, keep = TraceBatches(holdout, len(holdout)).rows(range(len(holdout)))
    kl = {kind: lens.ablation_kl(r1, tokens, keep, s) for kind, s in sets.items()}
    ratio = lens.mlp_over_attention(kl["adapter"], r1)

    _log("monosemanticity ...", progress)
    acts = lens.collect(r1, holdout)
    mono, mono_frac, label_freq = lens.lora_against_neurons(acts, k=cfg.top_k, n_labels=len(LABELS))

    _log("SAE ...", progress)
    sae_acts = lens.collect(r1, work.traces(cfg.n_sae_traces, "train", seed=2), with_mlp=False)
    with tempfile.TemporaryDirectory() as tmp:
        sae = lora_sae.train_sae(
            sae_acts.lora.flatten(1),
            lora_sae.SAEConfig(expansion=cfg.sae_expansion, k=cfg.sae_k, n_samples=cfg.sae_samples),
            out_dir=tmp,
        )
        sae_files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    held_states = acts.lora.flatten(1)
    sae_m = lora_sae.sae_metrics(sae, held_states)
    latents = lora_sae.encode(sae, held_states)
    dist = lora_sae.label_distribution(latents, acts.labels)
    cat, cat_mass = lora_sae.categories(dist)
    alive = latents.gt(0).sum(0) > 0
    mono["sae"] = lens.monosemanticity(latents[:, alive], acts.labels, k=cfg.top_k, polarities="+")
    mono_frac["sae"] = lens.class_fractions(mono["sae"])

    data = {
        "gain_recovered": behaviour[f"lora_r{rank}"]["gain_recovered"],
        "gain_recovered_by_rank": {str(r): behaviour[f"lora_r{r}"]["gain_recovered"] for r in cfg.ranks},
        "behaviour": behaviour,
        "lora_sources": {str(r): s for r, s in sources.items()},
        "sae": {
            **sae_m,
            "d_sae": sae.cfg.d_sae,
            "k": cfg.sae_k,
            "category_mass": dict(zip(lora_sae.CATEGORIES, (cat_mass / cat_mass.sum()).tolist(), strict=True)),
        },
        "monosemanticity": {k: v["mean_precision"] for k, v in mono_frac.items() if k != "sae"},
        "monosemanticity_classes": mono_frac,
        "chance_precision": float(label_freq.max()),
        "ablation_kl_mlp_over_attention": ratio,
        "ablation_kl": kl,
        "published": PUBLISHED,
        "settings": {**(settings or {}), **cfg.settings(), "n_holdout_tokens": int(len(acts.labels))},
    }
    plots = _plots(r1, kl, cat, cat_mass, dist, label_freq)
    contexts = _contexts(r1, acts, mono, pair.tokenizer, latents, dist, cat)
    data["seconds"] = time.perf_counter() - t0
    data = json.loads(json.dumps(data, default=float))  # exactly what summary.json holds
    return LoraStudyResult(data, contexts, plots, sae_files, sae, loras)


def _plots(r1, kl, cat, cat_mass, dist, label_freq) -> dict:
    """The figures' arrays that the summary does not hold (plain lists)."""
    from mechdiff.features import lora_lens as lens
    from mechdiff.features import lora_sae
    from mechdiff.organism.task import LABELS

    shown = [i for i in range(len(cat_mass)) if cat_mass[i] > 0]
    order = torch.argsort(cat * 1000 - dist.sum(1) / (dist.sum() + 1e-9))
    order = order[cat[order] >= 0]  # live latents only, grouped by category
    used = [i for i, name in enumerate(LABELS) if label_freq[i] > 0]
    norm = (dist / dist.sum(1, keepdim=True).clamp(min=1e-9))[order][:, used]
    return {
        "ablation_heatmap": {
            "z": lens.kl_matrix(kl["adapter"], r1).tolist(),
            "x": [f"L{i}" for i in range(r1.n_layers)],
            "y": list(r1.config.modules),
        },
        "sae_categories": {
            "labels": [list(lora_sae.CATEGORIES)[i] for i in shown],
            "values": cat_mass[shown].tolist(),
        },
        "sae_label_distribution": {
            "z": norm.T.tolist(),
            "x": [str(int(i)) for i in order],
            "y": [LABELS[i] for i in used],
        },
    }


def _contexts(r1, acts, mono, tokenizer, latents, dist, cat) -> dict:
    """Top contexts (``contexts.json``): every LoRA adapter unit, the 10 most precise MLP neurons,
    the 16 SAE latents with the most activation mass."""
    from mechdiff.features import lora_lens as lens
    from mechdiff.features import lora_sae
    from mechdiff.organism.task import LABELS

    names = lens.unit_names(r1)
    cols = acts.lora.flatten(1)
    lora_units = {}
    for u, name in enumerate(names):
        col = u % cols.shape[1]
        lora_units[name] = {
            "best_label": LABELS[int(mono["lora"]["best_label"][u])],
            "precision": float(mono["lora"]["precision"][u]),
            "recall": float(mono["lora"]["recall"][u]),
            "class": lens.CLASSES[int(mono["lora"]["klass"][u])],
            "top": lens.top_contexts(cols[:, col], acts, tokenizer, k=5, polarity=name[-1]),
        }
    mlp_cols = acts.mlp.flatten(1)
    best = mono["mlp"]["precision"].argsort(descending=True)[:10].tolist()
    mlp_units = {}
    for u in best:
        col, sign = u % mlp_cols.shape[1], "+" if u < mlp_cols.shape[1] else "-"
        L, n = divmod(col, acts.mlp.shape[2])
        mlp_units[f"L{L}.n{n}{sign}"] = {
            "best_label": LABELS[int(mono["mlp"]["best_label"][u])],
            "precision": float(mono["mlp"]["precision"][u]),
            "top": lens.top_contexts(mlp_cols[:, col], acts, tokenizer, k=5, polarity=sign),
        }
    sae_latents = {}
    cats = list(lora_sae.CATEGORIES)
    for i in dist.sum(1).argsort(descending=True)[:16].tolist():
        share = dist[i] / dist[i].sum().clamp(min=1e-9)
        top_labels = {LABELS[j]: round(float(share[j]), 3) for j in share.argsort(descending=True)[:3].tolist()}
        sae_latents[f"latent {i}"] = {
            "category": cats[int(cat[i])] if cat[i] >= 0 else "dead",
            "labels": top_labels,
            "top": lens.top_contexts(latents[:, i], acts, tokenizer, k=4),
        }
    return {"lora": lora_units, "mlp_top10": mlp_units, "sae_top16": sae_latents}
