"""Faithfulness metrics, the adapters CLI (train / eval / sweep) and the shipped organism adapters."""

import json

import pytest
import torch
from datasets import Dataset
from test_adapters import randomize

from mechdiff.adapters.__main__ import main
from mechdiff.adapters.formats import load_adapted
from mechdiff.adapters.transcoder import SHIPPED_DIR, AdaptedModel
from mechdiff.evaluation.faithfulness import adapter_report, check_targets, faithfulness
from mechdiff.models import ORGANISM_DIR, hybrid, load_pair
from mechdiff.organism import corpus
from mechdiff.organism.tokenizer import build_tokenizer

ORGANISM_CFG = dict(vocab_size=26, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=128)


@pytest.fixture
def organism_like(tiny_model_dir):
    """Folders of a tiny random pair with the organism's tokenizer (so traces and grading work)."""
    tok = build_tokenizer()
    base = tiny_model_dir("base", seed=0, tokenizer=tok, **ORGANISM_CFG)
    target = tiny_model_dir("target", seed=1, tokenizer=tok, **ORGANISM_CFG)
    return str(base), str(target)


def test_faithfulness_metrics_match_independent_computations(organism_like):
    pair = load_pair("custom", base=organism_like[0], target=organism_like[1])
    adapted = randomize(AdaptedModel.from_pair(pair, d_sae=16), scale=0.3)
    with torch.no_grad():
        adapted.adapters[1].b_enc[:4] = -1e4  # four features of layer 1 can never fire
    traces = corpus.reasoning_traces(6, split="validation")
    out = faithfulness(
        {
            "target": pair.target,
            "adapted": adapted.model,
            "hybrid": (adapted.model, adapted.bypass_hooks()),
            "plain_hybrid": hybrid(pair),
        },
        pair.target,
        traces,
        batch_size=4,
    )
    t = out["target"]
    assert t["fve_per_layer"] == pytest.approx([1.0] * pair.n_layers)
    assert t["kl_to_target"] == pytest.approx(0.0, abs=1e-6) and t["top1_agreement"] == 1.0
    assert all(v == pytest.approx(0.0, abs=1e-6) for b in t["bridging_kl"].values() for v in b.values())
    assert "l0_per_layer" not in t and "l0_per_layer" not in out["hybrid"]
    for key in ("fve_per_layer", "kl_to_target", "ce"):  # bypassing the adapters = the hybrid
        assert out["hybrid"][key] == pytest.approx(out["plain_hybrid"][key], rel=1e-5)
    assert out["hybrid"]["bridging_kl"]["1"] == pytest.approx(out["plain_hybrid"]["bridging_kl"]["1"], rel=1e-5)
    # independent: one unpadded sequence at a time, through TransformerLens' own loss and caches
    ce, kl, n_next, n_tok, err, ref = 0.0, 0.0, 0, 0, torch.zeros(2), torch.zeros(2)
    active, fired = torch.zeros(2), torch.zeros(2, 16, dtype=torch.bool)
    for row in traces["input_ids"]:
        tokens = torch.tensor([row])
        with torch.no_grad():
            ce += adapted.model(tokens, return_type="loss").item() * (len(row) - 1)
            logits, cache = adapted.model.run_with_cache(tokens)
            t_logits, t_cache = pair.target.run_with_cache(tokens)
        kl += torch.nn.functional.kl_div(
            logits[0].log_softmax(-1), t_logits[0].log_softmax(-1), log_target=True, reduction="sum"
        ).item()
        for i in range(2):
            h, ht = cache[f"blocks.{i}.hook_resid_post"], t_cache[f"blocks.{i}.hook_resid_post"]
            err[i] += ((h - ht) ** 2).sum()
            ref[i] += (ht**2).sum()
            acts = cache[adapted.acts_name(i)][0]
            active[i] += (acts > 0).sum()
            fired[i] |= (acts > 0).any(0)
        n_next, n_tok = n_next + len(row) - 1, n_tok + len(row)
    a = out["adapted"]
    assert a["ce"] == pytest.approx(ce / n_next, rel=1e-4)
    assert a["kl_to_target"] == pytest.approx(kl / n_tok, rel=1e-4)
    assert a["fve_per_layer"] == pytest.approx((1 - err / ref).tolist(), rel=1e-4)
    assert a["l0_per_layer"] == pytest.approx((active / n_tok).tolist(), rel=1e-6)
    assert a["dead_fraction"] == pytest.approx((~fired).float().mean().item())
    assert a["dead_per_layer"][1] >= 4 / 16


def test_cli_train_eval_sweep(organism_like, tmp_path, capsys):
    pair_args = ["--pair", "custom", "--base", organism_like[0], "--target", organism_like[1]]
    small = ["--steps", "3", "--d-sae", "16", "--batch-size", "4", "--n-traces", "16", "--n-val", "8", "--quiet"]
    out = tmp_path / "adapters"
    main(["train", *pair_args, *small, "--l1", "0.01", "--out", str(out), "--work", str(tmp_path / "ck")])
    meta = json.loads((out / "adapters.json").read_text())
    assert meta["recipe"]["loop"]["steps"] == 3 and meta["recipe"]["weights"]["l1"] == 0.01
    assert (out / "layer_1" / "sae_weights.safetensors").exists() and (tmp_path / "ck" / "checkpoint").exists()
    capsys.readouterr()
    main(["eval", *pair_args, "--adapters", str(out), "--n-eval-traces", "8", "--n-problems", "6", "--json"])
    report = json.loads(capsys.readouterr().out)
    for name in ("base", "hybrid", "adapted", "target"):
        assert {
            "fve_per_layer",
            "kl_to_target",
            "top1_agreement",
            "ce",
            "bridging_kl",
            "accuracy",
            "mean_response_tokens",
            "hesitations_per_response",
        } <= set(report[name])
    assert {"l0_per_layer", "dead_fraction"} <= set(report["adapted"])
    assert report["length_ratio"] == pytest.approx(
        report["adapted"]["mean_response_tokens"] / report["target"]["mean_response_tokens"]
    )
    assert set(report["targets"]) >= {"mean_l0", "gain_recovered", "kl_ratio_vs_hybrid"}
    fig = tmp_path / "fig"
    main(
        [
            "sweep",
            *pair_args,
            *small,
            "--l1",
            "0",
            "0.5",
            "--n-eval-traces",
            "8",
            "--n-problems",
            "2",
            "--out",
            str(fig),
            "--runs",
            str(tmp_path / "runs"),
            "--work",
            str(tmp_path / "sweep-ck"),
        ]
    )
    sweep = json.loads((fig / "sweep.json").read_text())
    assert [r["l1"] for r in sweep["rows"]] == [0.0, 0.5]
    assert {"mean_l0", "mean_fve", "kl_to_target", "accuracy"} <= set(sweep["rows"][0])
    assert (fig / "sweep.png").stat().st_size > 10_000
    html = (fig / "sweep.html").read_text()
    import re

    import plotly

    src = re.search(r'<script [^>]*src="([^"]+)"', html).group(1)  # offline: the shared local copy
    assert not src.startswith("http") and plotly.offline.get_plotlyjs() == (fig / src).read_text()
    assert '"L1 0.5"' in html and '"L1 0"' in html  # the sweep's runs are the plotted points


def test_report_at_init_is_the_hybrid(organism_like):
    pair = load_pair("custom", base=organism_like[0], target=organism_like[1])
    adapted = AdaptedModel.from_pair(pair, d_sae=8)
    report = adapter_report(pair, adapted, corpus.reasoning_traces(4, "test"), corpus.problems(4))
    # at init the adapted model is the hybrid: same behaviour
    assert report["adapted"]["mean_response_tokens"] == report["hybrid"]["mean_response_tokens"]
    assert report["adapted"]["accuracy"] == report["hybrid"]["accuracy"]


shipped = pytest.mark.skipif(
    not (SHIPPED_DIR / "adapters.json").exists() or not (ORGANISM_DIR / "target").exists(),
    reason="no shipped organism / adapters",
)


@shipped
def test_shipped_adapters_load_and_are_sparse_and_faithful():
    pair = load_pair("organism")
    adapted = load_adapted(pair)
    traces = Dataset.from_dict({"input_ids": corpus.reasoning_traces(48, split="test", seed=1)["input_ids"]})
    out = faithfulness(
        {"adapted": adapted.model, "hybrid": (adapted.model, adapted.bypass_hooks())},
        pair.target,
        traces,
        bridging=False,
    )
    assert out["adapted"]["kl_to_target"] < 0.2 * out["hybrid"]["kl_to_target"]
    assert out["adapted"]["mean_l0"] <= 12 and min(out["adapted"]["fve_per_layer"]) > 0.8
    # measured afresh (not the flags stored at shipping): 256 held-out traces, 32 test problems
    report = adapter_report(
        pair, adapted, corpus.reasoning_traces(256, "test", seed=2), corpus.problems(32, "test"), bridging=False
    )
    acc = {k: report[k]["accuracy"] for k in ("base", "adapted", "target")}
    assert acc["target"] - acc["base"] > 0.5  # a real gap, so the gain is a ratio, not NaN
    assert report["gain_recovered"] == pytest.approx((acc["adapted"] - acc["base"]) / (acc["target"] - acc["base"]))
    targets = check_targets(report)
    assert all(t["met"] for t in targets.values()), targets


def test_faithfulness_does_not_depend_on_the_batch(organism_like):
    """The SmolLM2 study evaluates in small batches (a 49k-token vocabulary, 32 traces at once and
    the bridging splices took 24 GB): every metric must be the same as in one batch."""
    pair = load_pair("custom", base=organism_like[0], target=organism_like[1])
    adapted = randomize(AdaptedModel.from_pair(pair, d_sae=16), scale=0.3)
    traces = corpus.reasoning_traces(7, split="validation")  # 7: the last batch of 3 is short
    models = {"hybrid": (adapted.model, adapted.bypass_hooks()), "adapted": adapted.model, "base": pair.base}
    whole = faithfulness(models, pair.target, traces, batch_size=7)
    split = faithfulness(models, pair.target, traces, batch_size=3)
    for name in models:
        for key, value in whole[name].items():
            if isinstance(value, float):
                assert split[name][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, key)
            elif isinstance(value, list) and value and isinstance(value[0], float):
                assert split[name][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, key)
        for layer, kls in whole[name]["bridging_kl"].items():  # the splices, layer by layer
            assert split[name]["bridging_kl"][layer] == pytest.approx(kls, rel=1e-4, abs=1e-6), (name, layer)


def test_without_bridging_every_other_metric_is_the_same_and_no_splice_is_reported(organism_like):
    """``bridging=False`` (the SmolLM2 study's ``--no-bridging``) skips the splices: they are absent,
    not zeros that would read as perfect, and every other metric is what the full report gives."""
    pair = load_pair("custom", base=organism_like[0], target=organism_like[1])
    adapted = randomize(AdaptedModel.from_pair(pair, d_sae=16), scale=0.3)
    traces = corpus.reasoning_traces(5, split="validation")
    models = {"hybrid": (adapted.model, adapted.bypass_hooks()), "adapted": adapted.model}
    full = faithfulness(models, pair.target, traces, batch_size=5)
    lean = faithfulness(models, pair.target, traces, batch_size=5, bridging=False)
    for name in models:
        assert "bridging_kl" in full[name] and "bridging_kl" not in lean[name]
        assert lean[name] == {k: v for k, v in full[name].items() if k != "bridging_kl"}
    assert any(v > 0 for b in full["hybrid"]["bridging_kl"].values() for v in b.values())
