"""``python -m analyses.real`` on tiny random Llama stand-ins for SmolLM2 and its fine-tune (the same
code path as the real pair): its stages run, are skipped once done, and fill the issue's keys."""

import json

import pytest
from test_real_pair import cache, tokenizer  # noqa: F401  (fixtures: a tiny pair in $MECHDIFF_CACHE)

from analyses import real

TINY = ["--n-problems", "2", "--n-eval-traces", "2", "--d-sae", "16", "--adapter-steps", "2",
        "--lora-steps", "2", "--batch-size", "2", "--threads", "1"]


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
    step = real.measure("organism", "lora_step", 16, 2)
    graph = real.measure("organism", "attribution_graph", 16, 2)
    assert step["seconds"] > 0 and step["peak_rss_gib"] >= step["rss_after_loading_gib"] > 0
    assert graph["prompt_tokens"] > 10 and graph["graph_info"]["d_sae"] == 16
