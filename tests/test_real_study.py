"""``python -m analyses.real`` on tiny random Llama stand-ins for SmolLM2 and its fine-tune (the same
code path as the real pair): its stages run, are skipped once done, and fill the issue's keys."""

import json

import pytest
from test_real_pair import cache, tokenizer  # noqa: F401  (fixtures: a tiny pair in $MECHDIFF_CACHE)

from analyses import real, real_cost

TINY = [
    "--n-problems",
    "2",
    "--n-eval-traces",
    "2",
    "--d-sae",
    "16",
    "--adapter-steps",
    "2",
    "--lora-steps",
    "2",
    "--batch-size",
    "2",
    "--threads",
    "1",
]


@pytest.mark.parametrize("tokenizer", ["tiny"], indirect=True)  # SmolLM2's own: covered by test_real_pair
def test_stages_write_the_summary_and_rerun_skips_them(cache, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "real"
    argv = ["--out", str(out), "--stages", "behaviour", "adapters", "lora", *TINY]
    summary = real.main(argv)
    saved = json.loads((out / "summary.json").read_text())
    for who in ("base", "target"):
        assert set(saved[who]) >= {"accuracy", "mean_response_tokens", "hesitations_per_response"}
        assert 0 <= saved[who]["accuracy"] <= 1 and saved[who]["mean_response_tokens"] > 0
    adapters = saved["adapters"]
    assert set(adapters) >= {"fve_mean", "kl_to_target", "l0_mean", "gain_recovered"}
    assert adapters["l0_mean"] <= 8 + 1e-6 and adapters["recipe"]["d_sae"] == 16 and adapters["kl_to_target"] >= 0
    assert "gain_recovered" in saved["lora"] and saved["lora"]["config"]["steps"] == 2
    assert saved["organism"]["hesitation"]["n_hesitation_features"] > 0  # the committed organism study
    report = (out / "report.md").read_text()
    assert "| target: accuracy |" in report and "rank-1 LoRA: gain recovered" in report
    capsys.readouterr()
    assert real.main(argv) == summary  # every stage is done: nothing reruns
    assert capsys.readouterr().out.count(": done (") == 3


def test_cost_measures_a_training_step_and_a_graph_on_the_organism():
    step = real_cost.measure("organism", "lora_step", 16, 2)
    graph = real_cost.measure("organism", "attribution_graph", 16, 2)
    assert step["seconds"] > 0 and step["peak_rss_gib"] >= step["rss_after_loading_gib"] > 0
    assert graph["prompt_tokens"] > 10 and graph["graph_info"]["d_sae"] == 16


@pytest.mark.parametrize("tokenizer", ["tiny"], indirect=True)
def test_the_sweep_scores_each_candidate_and_the_adapters_take_its_pick(cache, tmp_path):  # noqa: F811
    out = tmp_path / "real"
    argv = [
        "--out",
        str(out),
        "--stages",
        "sweep",
        "adapters",
        "--sweep",
        "16:2,32:4",
        "--sweep-steps",
        "2",
        *[a for a in TINY if a != "16" and a != "--d-sae"],
    ]
    saved = real.main(argv)
    sweep = json.loads((out / "sweep.json").read_text())
    assert [(r["d_sae"], r["k"]) for r in sweep["candidates"]] == [(16, 2), (32, 4)]
    for r in sweep["candidates"]:
        assert len(r["fve_per_layer"]) == 2 and r["val_kl"] >= 0 and 0 <= r["dead_fraction"] <= 1
        assert r["fve_min"] <= r["fve_mean"] + 1e-9
    picked = sweep["picked"]
    assert picked in ({"d_sae": 16, "k": 2}, {"d_sae": 32, "k": 4})
    assert saved["adapters"]["recipe"]["d_sae"] == picked["d_sae"] and saved["adapters"]["recipe"]["k"] == picked["k"]
    assert set(saved["adapter_targets"]) == {
        "gain_recovered",
        "dead_fraction",
        "fve_min_layer",
        "kl_to_target",
        "l0_mean",
    }
    assert saved["adapter_targets"]["l0_mean"]["met"] is (saved["adapters"]["l0_mean"] <= 16)
    # Other flags, other adapters: a stage made with different adapters is rerun, not reused.
    assert real._stale(real.parse_args([*argv, "--adapter-lr", "0.002"]), out, "adapters")
    assert not real._stale(real.parse_args(argv), out, "adapters")
    resampled = real.parse_args([*argv, "--adapter-resample", "5"])
    assert real._stale(resampled, out, "adapters") and "-r5" in real.adapter_folder(resampled, out).name
    assert real._adapter_recipe(resampled, 16, 2, 10).resample_every == 5


def test_the_pick_prefers_faithful_candidates_and_breaks_near_ties_by_kl():
    rows = [
        {"d_sae": 512, "k": 8, "val_kl": 0.03, "fve_min": 0.95, "dead_fraction": 0.3},
        {"d_sae": 1024, "k": 8, "val_kl": 0.01, "fve_min": 0.90, "dead_fraction": 0.3},  # worst layer too poor
        {"d_sae": 512, "k": 16, "val_kl": 0.02, "fve_min": 0.96, "dead_fraction": 0.35},
    ]
    assert real._pick(rows) == {"d_sae": 512, "k": 16}
    rows[2]["dead_fraction"] = 0.9  # many more dead features: out
    assert real._pick(rows) == {"d_sae": 512, "k": 8}
