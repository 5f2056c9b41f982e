"""The hesitation stage of the study on SmolLM2 (:func:`mechdiff.studies.real.run`) on the tiny chat
pair of :mod:`test_hesitation_chat`: it is the hesitation study of ``--hesitation-args`` on the
stage's adapters, the same as ``python -m analyses.hesitation`` with those flags (what the stage
ran before it was a library call), and it fills the summary's hesitation section."""

import json
import shutil

import pytest
from test_hesitation_chat import adapters, pair, tokenizer, writes_traces  # noqa: F401  (fixtures)

from analyses import hesitation as hesitation_cli
from analyses import real as real_cli
from mechdiff.studies import real as study
from mechdiff.studies import real_config

FLAGS = (
    "--ranking gradient --n-prompts 3 --n-problems 3 --n-traces 2 --n-dose-problems 2 "
    "--max-new-tokens 8 --random-draws 1 --max-feature-nodes 8"
)


@pytest.mark.parametrize("tokenizer", ["tiny"], indirect=True)  # SmolLM2's own: test_hesitation_chat
def test_the_hesitation_stage_is_the_hesitation_study_on_the_stages_adapters(
    pair,  # noqa: F811
    adapters,  # noqa: F811
    writes_traces,  # noqa: F811
    tmp_path,
):
    out = tmp_path / "real"
    argv = ["--out", str(out), "--stages", "hesitation", "--d-sae", "16", "--k", "8", "--threads", "1"]
    cfg = real_cli.config_from_args(real_cli.parse_args([*argv, f"--hesitation-args={FLAGS}"]))
    assert cfg.hesitation.max_new_tokens == 8 and cfg.hesitation.ranking == "gradient"
    folder = real_config.adapter_folder(cfg, out)
    with pytest.raises(FileNotFoundError, match="run the adapters stage first"):
        study.run(cfg, out, progress=False, isolate=False)
    assert not (out / "hesitation.json").exists()
    shutil.copytree(adapters, folder)  # as the adapters stage leaves them

    result = study.run(cfg, out, progress=False, isolate=False)  # in this process: the stand-in target applies
    stage = json.loads((out / "hesitation.json").read_text())
    assert stage["adapters_folder"] == str(folder) and stage["summary"] == str(out / "hesitation" / "summary.json")
    assert stage["stage_args"]["hesitation"]["n_prompts"] == 3 and real_config.done(cfg, out, "hesitation")
    written = json.loads((out / "hesitation" / "summary.json").read_text())
    assert (out / "hesitation" / "report.md").is_file()

    old = hesitation_cli.main(
        ["--pair", "smollm2", "--adapters", str(folder), "--out", str(tmp_path / "cli"), *FLAGS.split()]
    )
    drop = lambda s: {k: v for k, v in s.items() if k != "seconds"}  # noqa: E731
    assert drop(written) == drop(json.loads(json.dumps(old)))
    assert stage["n_hesitation_features"] == old["n_hesitation_features"] > 0

    section = result.summary()["hesitation"]
    assert section["ranking"] == "gradient" and section["n_hesitation_features"] == old["n_hesitation_features"]
    assert section["ablation_cut"] == old["necessity"]["cut"] and section["n_problems"] == 3
    report = result.report()
    assert "| hesitation: n hesitation features |" in report
    # the real-size numbers: intervals, the two rankings' agreement, the sufficiency variants
    from mechdiff.studies.real_report import HESITATION_ROWS

    cis = json.loads(json.dumps(old["confidence_intervals"]))
    assert section["confidence_intervals"] == cis
    shown = [(k, c) for k, c in HESITATION_ROWS if c and cis.get(c) and section[k] is not None]
    assert shown  # on this tiny pair at least the accuracies have intervals
    for key, c in shown:
        assert f"{section[key]:.3f} [{cis[c][0]:.3f}, {cis[c][1]:.3f}]" in report
    agree = old["set_rule"]["ranking_agreement"]
    assert section["ranking_agreement"] == agree and f"Spearman {agree['spearman']:.2f}" in report
    variants = old["sufficiency"]["variants"]["variants"]
    assert set(section["sufficiency_variants"]) >= {"zero", "mean", "patch"}
    for name, v in variants.items():
        got = section["sufficiency_variants"][name]
        assert (
            got["set_retained"] == v["set"]["retained"] and got["smallest_sufficient_k"] == v["smallest_sufficient_k"]
        )
        assert got["random_sets_retained_mean"] == pytest.approx(
            sum(x for x in v["random_sets"] if x is not None) / max(1, sum(x is not None for x in v["random_sets"]))
        ) or all(x is None for x in v["random_sets"])
    assert "## Sufficiency, teacher-forced" in report and "| mean |" in report and "| patch |" in report


@pytest.mark.parametrize("tokenizer", ["tiny"], indirect=True)
def test_the_features_stage_is_the_census_on_the_stages_adapters(pair, adapters, tmp_path):  # noqa: F811
    """The ``features`` stage runs the feature census (:func:`mechdiff.studies.features.run`) on the
    stage's adapters over ``n_census_traces`` held-out chat traces; its summary section is the census'."""
    import torch

    from mechdiff.adapters.formats import load_adapted
    from mechdiff.studies import features

    out = tmp_path / "real"
    argv = ["--out", str(out), "--stages", "features", "--d-sae", "16", "--k", "8", "--threads", "1"]
    cfg = real_cli.config_from_args(real_cli.parse_args([*argv, "--n-census-traces", "12"]))
    folder = real_config.adapter_folder(cfg, out)
    with pytest.raises(FileNotFoundError, match="run the adapters stage first"):
        study.run(cfg, out, progress=False, isolate=False)
    shutil.copytree(adapters, folder)
    result = study.run(cfg, out, progress=False, isolate=False)
    stage = json.loads((out / "features.json").read_text())
    assert stage["adapters_folder"] == str(folder) and real_config.done(cfg, out, "features")
    written = json.loads((out / "features" / "summary.json").read_text())

    torch.manual_seed(0)
    direct = features.run(
        pair, load_adapted(pair, folder), features.FeaturesConfig(n_traces=12, batch_size=16), progress=False
    ).summary()
    same = lambda s: {k: v for k, v in s.items() if k not in ("seconds", "figures", "store", "pair", "adapters")}  # noqa: E731
    assert same(written) == same(json.loads(json.dumps(direct)))
    assert written["store"]["n_traces"] == 12

    section = result.summary()["features"]
    assert section["reasoning_fraction"] == direct["reasoning_fraction"] == stage["reasoning_fraction"]
    assert section["baselines"] == {k: b["reasoning_fraction"] for k, b in direct["baselines"].items()}
    assert "| feature census: reasoning fraction |" in result.report()


@pytest.mark.parametrize("tokenizer", ["tiny"], indirect=True)
def test_lora_monosemanticity_labels_every_chat_token_and_scores_every_unit(pair):  # noqa: F811
    """LoRA vs MLP-neuron monosemanticity on chat: every token of the held-out traces carries a
    chat label, every unit of both kinds (both signs) is scored, and the classes partition them."""
    import torch

    from mechdiff.adapters.lora import LoRAConfig, LoRAModel
    from mechdiff.studies import real_stages
    from mechdiff.studies.features_labels import census_traces
    from mechdiff.workloads import for_pair

    torch.manual_seed(0)
    lora = LoRAModel(pair.base, LoRAConfig(rank=1))
    for p in lora.parameters():  # a trained LoRA's B is not zero: give every adapter an output
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    m = real_stages.lora_monosemanticity(pair, lora, n_traces=6, top_k=5)
    corpus = census_traces(for_pair(pair), 6, "validation", seed=1)
    assert m["n_tokens"] == sum(len(r) for r in corpus.rows["input_ids"])
    assert set(m["label_share"]) == set(corpus.label_names) and "hesitation" in m["label_share"]
    assert m["chance_precision"] == pytest.approx(max(m["label_share"].values()))
    n_layers, d_mlp = pair.n_layers, pair.base.cfg.d_mlp
    assert m["classes"]["lora"]["n_units"] == 2 * n_layers * 7
    assert m["classes"]["mlp"]["n_units"] == 2 * n_layers * d_mlp
    for who in ("lora", "mlp"):
        c = m["classes"][who]
        assert c["monosemantic"] + c["broad"] + c["polysemantic"] == pytest.approx(1.0)
        assert 0 <= c["mean_precision"] <= 1
