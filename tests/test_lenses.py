"""``python -m analyses.lenses`` end to end on small settings, on the shipped organism."""

import json

import pytest
import torch

from analyses import lenses
from mechdiff.adapters.formats import SHIPPED_DIR
from mechdiff.cli import UsageError
from mechdiff.generation import generate
from mechdiff.lenses.paired import paired_generate

SMALL = [
    "--n-label-problems",
    "24",
    "--n-prompts",
    "4",
    "--n-problems",
    "24",
    "--random-draws",
    "2",
    "--crosscoder-steps",
    "60",
    "--crosscoder-d-sae",
    "128",
    "--crosscoder-traces",
    "48",
    "--max-feature-nodes",
    "32",
    "--retrain-lora-sae",
    "--lora-sae-traces",
    "48",
    "--lora-sae-samples",
    "20000",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    if not (SHIPPED_DIR / "adapters.json").exists():
        pytest.skip("no shipped adapters")
    out = tmp_path_factory.mktemp("lenses")
    threads = torch.get_num_threads()
    try:
        summary = lenses.main(["--out", str(out), *SMALL])
    finally:
        torch.set_num_threads(threads)
    return out, summary


def test_summary_has_the_issue_shape_for_every_lens(run):
    out, s = run
    assert json.loads((out / "summary.json").read_text())["organisms"].keys() == s["organisms"].keys()
    org = s["organisms"]["organism"]
    assert org["hesitation_word"] == "wait" and org["skipped"] == {}
    assert set(org["lenses"]) == set(lenses.LENSES)
    for name, rec in org["lenses"].items():
        assert set(lenses.SCORES) <= set(rec), name
    kl = org["lenses"]["kl"]
    assert all(kl[k] is None for k in ("n_units", "precision", "recall", "necessity_cut", "random_cut", "steering"))
    assert kl["score_cpu_s"] > 0 and org["lenses"]["crosscoder"]["train_cpu_s"] > 0
    assert org["lenses"]["activation_difference"]["n_units"] == 1


def test_every_lens_reports_its_cost_and_says_where_training_seconds_come_from(run):
    """Memory per phase is measured in the run (> 0, below the machine's RAM); train seconds are
    CPU seconds measured here for lenses trained here, and the recorded wall seconds, so labelled,
    for the reused adapters and LoRA (the SAE on the LoRA state is trained again to measure it)."""
    from mechdiff.lenses import cost

    _, s = run
    ram = cost.machine_ram_gib()
    assert 0 < s["peak_rss_gib"] < ram
    lens = s["organisms"]["organism"]["lenses"]
    for name, rec in lens.items():
        assert set(lenses.COSTS) <= set(rec), name
        assert 0 <= rec["score_peak_gib"] <= rec["score_rss_peak_gib"] <= s["peak_rss_gib"], name
        assert rec["score_cpu_s"] > 0, name
    for name in ("crosscoder", "activation_difference"):
        rec = lens[name]
        assert rec["train_cpu_s"] > 0 and rec["train_s_kind"] == "cpu" and rec["train_cpu_s_source"] == cost.MEASURED
        assert 0 <= rec["train_peak_gib"] <= rec["train_rss_peak_gib"] < ram
    # the crosscoder holds base and target activations of its traces while it trains
    assert lens["crosscoder"]["train_peak_gib"] > lens["activation_difference"]["train_peak_gib"]
    recorded = json.loads((SHIPPED_DIR / "adapters.json").read_text())["metrics"]["train_last"]["seconds"]
    for name in ("transcoder_graph", "transcoder_gradient"):
        rec = lens[name]
        assert rec["train_cpu_s"] == recorded and rec["train_s_kind"] == "wall"
        assert "wall seconds" in rec["train_cpu_s_source"] and "not CPU" in rec["train_cpu_s_source"]
        assert rec["train_peak_gib"] is None  # no memory was recorded when they were trained
    sae = lens["lora_sae"]
    parts = sae["train_parts"]
    assert parts["lora"]["kind"] == "wall" and parts["sae"]["kind"] == "cpu" and parts["sae"]["cpu_s"] > 0
    assert sae["train_s_kind"] == "wall+cpu"
    assert sae["train_cpu_s"] == pytest.approx(parts["lora"]["seconds"] + parts["sae"]["cpu_s"])
    assert lens["kl"]["train_cpu_s"] is None and lens["kl"]["train_cpu_s_source"] == "nothing to train"


def test_scores_say_what_the_organism_is_known_to_do(run):
    """The graph-ranked adapter set cuts hesitations far more than random sets (the hesitation
    study's finding); the mean difference at the hesitation slot, subtracted, cuts them too; the
    target's next-token distribution departs from the base's most at the hesitation token."""
    _, s = run
    lens = s["organisms"]["organism"]["lenses"]
    graph = lens["transcoder_graph"]
    assert graph["necessity_cut"] > 0.5 and graph["random_cut"] < 0.2
    assert lens["activation_difference"]["necessity_cut"] > lens["activation_difference"]["random_cut"] + 0.3
    by_label = lens["kl"]["by_label"]
    assert max(by_label, key=lambda lab: by_label[lab]["mean_kl"]) == "hesitation"
    assert by_label["hesitation"]["mean_kl"] > 2 * lens["kl"]["mean_kl"]
    for rec in lens.values():
        for key in ("precision", "recall"):
            assert rec[key] is None or 0 <= rec[key] <= 1


def test_agreement_and_figures_are_written(run):
    out, s = run
    matrix = s["agreement"]["organism"]["matrix"]
    assert set(matrix) == set(lenses.LENSES)
    assert all(0 <= v <= 1 for row in matrix.values() for v in row.values())
    for name in ("lenses_x_scores", "cost", "agreement_organism"):
        assert (out / f"{name}.html").stat().st_size > 1000 and (out / f"{name}.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "| organism | wait | crosscoder |" in report and "(wall, recorded)" in report
    assert "train_peak_gib | score_peak_gib |" in report
    assert (out / "organism" / "crosscoder" / "cfg.json").is_file()


def test_paired_generation_without_edits_is_the_models_own(run):
    from mechdiff.models import load_pair
    from mechdiff.organism import corpus

    pair = load_pair("organism")
    prompts = corpus.problems(6, "test")["input_ids"]
    rows = paired_generate(
        pair.target,
        pair.base,
        prompts,
        40,
        lambda acts: [],
        reader_names=["blocks.0.hook_resid_post"],
        eos_token_id=pair.tokenizer.eos_token_id,
    )
    assert rows == generate(pair.target, prompts, 40, eos_token_id=pair.tokenizer.eos_token_id)


def test_bad_organism_arguments_fail_before_any_work(tmp_path):
    with pytest.raises(UsageError, match="NAME=FOLDER"):
        lenses.main(["justafolder", "--out", str(tmp_path)])
    with pytest.raises(UsageError, match="not an HF model folder"):
        lenses.main([f"x={tmp_path}", "--out", str(tmp_path)])
    with pytest.raises(UsageError, match="not among the organisms"):
        lenses.main(["--adapters", "other=somewhere", "--out", str(tmp_path)])


def test_retrain_measures_the_reused_adapters_and_lora_in_the_run(run, tmp_path):
    """--retrain trains the adapters and the LoRA again (here with a 2-step recipe) and the lenses
    reading them then report CPU seconds and memory measured in the run, with the retrained copy's
    closeness to the given one; the scores still read the given artefacts."""
    from mechdiff.lenses import cost

    small = [a for a in SMALL if a != "--retrain-lora-sae"]
    args = [
        "--out",
        str(tmp_path),
        *small,
        "--lenses",
        "transcoder_gradient",
        "lora_sae",
        "--retrain",
        "adapters,lora",
        "--retrain-lora-sae",
        "--retrain-steps",
        "2",
        "--retrain-traces",
        "64",
    ]
    threads = torch.get_num_threads()
    try:
        s = lenses.main(args)
    finally:
        torch.set_num_threads(threads)
    assert s["settings"]["retrain"] == ["adapters", "lora", "lora-sae"]
    lens = s["organisms"]["organism"]["lenses"]
    ram = cost.machine_ram_gib()
    recorded = json.loads((SHIPPED_DIR / "adapters.json").read_text())["metrics"]["train_last"]["seconds"]
    for name in ("transcoder_gradient", "lora_sae"):
        rec = lens[name]
        assert rec["train_s_kind"] == "cpu" and "measured in this run" in rec["train_cpu_s_source"], name
        assert rec["train_cpu_s"] > 0 and 0 < rec["train_peak_gib"] <= rec["train_rss_peak_gib"] < ram, name
    grad = lens["transcoder_gradient"]
    part = grad["train_parts"]["adapters"]
    assert grad["train_cpu_s"] == part["cpu_s"] != recorded and part["recorded"]["seconds"] == recorded
    assert part["overrides"] == {"steps": 2, "n_traces": 64} and part["closeness"]["metrics"]["step"]["retrained"] == 2
    assert part["closeness"]["metrics"]["val_fve_0"]["given"] > 0.9 and -1 <= part["closeness"]["weight_cosine"] < 1
    sae = lens["lora_sae"]
    lora, sae_part = sae["train_parts"]["lora"], sae["train_parts"]["sae"]
    assert (
        lora["kind"] == "cpu"
        and lora["recorded"]["kind"] == "wall"
        and lora["closeness"]["metrics"]["step"] == {"given": 1000, "retrained": 2}
    )
    assert sae["train_cpu_s"] == pytest.approx(lora["cpu_s"] + sae_part["cpu_s"])
    assert sae["train_peak_gib"] == pytest.approx(max(lora["rise_gib"], sae_part["rise_gib"]))
    report = (tmp_path / "report.md").read_text()
    assert "**adapters trained again**" in report and "**lora trained again**" in report and "weight cosine" in report
    # the scores read the given (shipped) artefacts: the same as the run without --retrain adapters,lora
    before = run[1]["organisms"]["organism"]["lenses"]
    for name in ("transcoder_gradient", "lora_sae"):
        for key in ("units", "precision", "recall", "necessity", "steering"):
            assert lens[name][key] == before[name][key], (name, key)


def test_retrain_takes_a_set_and_keeps_the_old_flag():
    assert lenses.parse_args(["--retrain-lora-sae"]).retrain == {"lora-sae"}
    assert lenses.parse_args(["--retrain", "all"]).retrain == set(lenses.RETRAIN)
    assert lenses.parse_args([]).retrain == set()
    with pytest.raises(SystemExit):
        lenses.parse_args(["--retrain", "adapters,sae"])
