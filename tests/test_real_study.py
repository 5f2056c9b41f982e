"""The study on SmolLM2 (:func:`mechdiff.studies.real.run` and ``python -m analyses.real``) on tiny
random Llama stand-ins for SmolLM2 and its fine-tune (the same code path as the real pair): its
stages run, are skipped once done, fill the issue's keys, and the library call summarizes exactly
what the command line writes. Its config refuses bad values in one line, before any work."""

import dataclasses
import json

import plotly.graph_objects as go
import pytest
from test_real_pair import cache, tokenizer  # noqa: F401  (fixtures: a tiny pair in $MECHDIFF_CACHE)

from analyses import real, real_cost, real_report
from mechdiff.cli import UsageError, run
from mechdiff.config_checks import ConfigError
from mechdiff.real import smollm2
from mechdiff.studies import real as study
from mechdiff.studies import real_config, real_stages
from mechdiff.studies import real_cost as lib_cost
from mechdiff.studies import real_report as lib_report
from mechdiff.studies.hesitation import HesitationConfig
from mechdiff.studies.real_config import RealConfig

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
    "--n-monosemanticity-traces",  # this tiny tokenizer writes no " Wait", so chat replies get no labels
    "0",
]
TINY_CONFIG = dict(
    n_problems=2,
    n_eval_traces=2,
    d_sae=16,
    adapter_steps=2,
    lora_steps=2,
    batch_size=2,
    threads=1,
    device="cpu",
    n_monosemanticity_traces=0,
)


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
    stage_files = {p.name: p.read_bytes() for p in out.glob("*.json") if p.name != "summary.json"}
    assert set(stage_files) == {"behaviour.json", "adapters.json", "lora.json"}
    capsys.readouterr()
    assert real.main(argv) == summary  # every stage is done: nothing reruns
    assert capsys.readouterr().out.count(": done (") == 3
    assert {p.name: p.read_bytes() for p in out.glob("*.json") if p.name != "summary.json"} == stage_files

    # The library call with the same settings: on the command line's folder it reruns nothing and
    # summarizes what the command line wrote; on a fresh folder, in this process, it measures the same.
    cfg = RealConfig(stages=("behaviour", "adapters", "lora"), **TINY_CONFIG)
    assert cfg == real.config_from_args(real.parse_args(argv))
    again = study.run(cfg, out, progress=False)
    assert again.summary() == summary and json.loads(json.dumps(again.summary(), default=float)) == saved
    fresh = study.run(cfg, tmp_path / "lib", progress=False, isolate=False)
    assert sorted(p.name for p in (tmp_path / "lib").glob("*.json")) == sorted(stage_files)
    assert json.loads(json.dumps(fresh.summary(), default=float)) == saved
    assert fresh.report() == report
    figures = fresh.figures()
    assert set(figures) == {"accuracy", "hesitations_per_response", "faithfulness"}
    assert all(isinstance(f, go.Figure) for f in figures.values())
    assert list(figures["faithfulness"].data[0].y) == adapters["fve_per_layer"]
    written = fresh.write(tmp_path / "written")
    assert json.loads((written / "summary.json").read_text()) == saved
    assert (written / "report.md").read_text() == report
    files = lambda folder: {p.name for p in folder.iterdir() if p.is_file() and p.name not in stage_files}  # noqa: E731
    assert files(written) == files(out) >= {"summary.json", "report.md", "accuracy.html", "faithfulness.png"}


def test_cost_measures_a_training_step_and_a_graph_on_the_organism():
    assert real_cost.measure is lib_cost.measure  # the old import path still works
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
        "--sweep-target-cache",
        *[a for a in TINY if a != "16" and a != "--d-sae"],
    ]
    saved = real.main(argv)
    sweep = json.loads((out / "sweep.json").read_text())
    shared = list((smollm2.cache_dir() / "study").glob("*/sweep-target-pass-*"))
    assert len(shared) == 1 and (shared[0] / "cache.json").is_file()  # one target pass for both candidates
    assert [(r["d_sae"], r["k"]) for r in sweep["candidates"]] == [(16, 2), (32, 4)]
    for r in sweep["candidates"]:
        assert len(r["fve_per_layer"]) == 2 and r["val_kl"] >= 0 and 0 <= r["dead_fraction"] <= 1
        assert r["fve_min"] <= r["fve_mean"] + 1e-9
    assert sweep["stage_args"]["sweep"] == "16:2,32:4" and sweep["stage_args"]["sweep_candidates"] == [[16, 2], [32, 4]]
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
    config = lambda *extra: real.config_from_args(real.parse_args([*argv, *extra]))  # noqa: E731
    assert real_config.stale(config("--adapter-lr", "0.002"), out, "adapters")
    assert not real_config.stale(config(), out, "adapters")
    resampled = config("--adapter-resample", "5")
    assert real_config.stale(resampled, out, "adapters") and "-r5" in real_config.adapter_folder(resampled, out).name
    assert real_stages.adapter_recipe(resampled, 16, 2, 10).resample_every == 5
    # --recompute: the same adapters (same folder, not stale), trained with blocks recomputed, LoRA too
    recomputed = config("--recompute")
    assert not real_config.stale(recomputed, out, "adapters")
    assert real_config.adapter_folder(recomputed, out) == real_config.adapter_folder(config(), out)
    assert real_stages.adapter_recipe(recomputed, 16, 2, 10).checkpoint is True
    assert real_stages.adapter_recipe(config(), 16, 2, 10).checkpoint is False
    assert real_stages.lora_train_config(recomputed).checkpoint is True
    assert real_stages.lora_train_config(config()).checkpoint is False


def test_the_pick_prefers_faithful_candidates_and_breaks_near_ties_by_kl():
    rows = [
        {"d_sae": 512, "k": 8, "val_kl": 0.03, "fve_min": 0.95, "dead_fraction": 0.3},
        {"d_sae": 1024, "k": 8, "val_kl": 0.01, "fve_min": 0.90, "dead_fraction": 0.3},  # worst layer too poor
        {"d_sae": 512, "k": 16, "val_kl": 0.02, "fve_min": 0.96, "dead_fraction": 0.35},
    ]
    assert real_stages.pick(rows) == {"d_sae": 512, "k": 16}
    rows[2]["dead_fraction"] = 0.9  # many more dead features: out
    assert real_stages.pick(rows) == {"d_sae": 512, "k": 8}


# --------------------------------------------------------------------------- the config, without models

BAD_CONFIGS = [  # (field values, the one-line error)
    (dict(pair="organism"), "RealConfig.pair = 'organism': this study is SmolLM2's (smollm2 or smollm2:RUN)"),
    (dict(pair="smollm2:"), "RealConfig.pair = 'smollm2:': this study is SmolLM2's"),
    (dict(n_problems=0), "RealConfig.n_problems = 0: must be >= 1"),
    (dict(n_eval_traces=-3), "RealConfig.n_eval_traces = -3: must be >= 1"),
    (dict(adapter_steps=2.5), "RealConfig.adapter_steps = 2.5: must be a whole number >= 1"),
    (dict(lora_steps=0), "RealConfig.lora_steps = 0: must be >= 1"),
    (dict(batch_size=True), "RealConfig.batch_size = True: must be a whole number >= 1"),
    (dict(sweep_steps=0), "RealConfig.sweep_steps = 0: must be >= 1"),
    (dict(d_sae=0), "RealConfig.d_sae = 0: must be >= 1"),
    (dict(k=-1), "RealConfig.k = -1: must be >= 1"),
    (dict(adapter_lr=0.0), "RealConfig.adapter_lr = 0.0: must be a number > 0"),
    (dict(lora_lr=float("nan")), "RealConfig.lora_lr = nan: must be a number > 0"),
    (dict(adapter_resample=-1), "RealConfig.adapter_resample = -1: must be >= 0 (0: never)"),
    (dict(threads=-1), "RealConfig.threads = -1: must be a number >= 0"),
    (dict(dtype="float8"), "RealConfig.dtype = 'float8': must be one of float32, bfloat16, float16"),
    (dict(autocast="float64"), "RealConfig.autocast = 'float64': must be one of None, bfloat16, float16"),
    (dict(stages=["adapters", "train"]), "RealConfig.stages = 'train': not a stage (one of behaviour, sweep,"),
    (dict(redo=["nope"]), "RealConfig.redo = 'nope': not a stage"),
    (dict(sweep=()), "RealConfig.sweep = (): give at least one (width, k) candidate"),
    (dict(sweep=[(512, 0)]), "RealConfig.sweep = (512, 0): each candidate is (width, k) with 1 <= k <= width"),
    (dict(sweep=[(8, 16)]), "RealConfig.sweep = (8, 16): each candidate is (width, k) with 1 <= k <= width"),
    (dict(hesitation={"n_prompts": 4}), "RealConfig.hesitation = {'n_prompts': 4}: must be a HesitationConfig"),
]


@pytest.mark.parametrize("fields,message", BAD_CONFIGS, ids=[next(iter(f)) for f, _ in BAD_CONFIGS])
def test_the_config_refuses_a_bad_field_in_one_line(fields, message):
    with pytest.raises(ConfigError) as err:
        RealConfig(**fields)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert err.value.field == next(iter(fields))  # the CLI prints it under the flag's name


def test_the_cli_defaults_are_the_library_defaults_and_stage_processes_get_the_same_config():
    args = real.parse_args([])
    assert real.config_from_args(args) == dataclasses.replace(RealConfig(), device=args.device)
    assert RealConfig().hesitation == HesitationConfig(
        ranking="gradient", n_prompts=24, n_problems=32, n_traces=8, n_dose_problems=12, random_draws=2
    )
    cfg = RealConfig(stages=["sweep", "adapters"], sweep=[[16, 2], [32, 4]], hesitation=HesitationConfig(n_prompts=3))
    assert cfg.stages == ("sweep", "adapters") and cfg.sweep == ((16, 2), (32, 4))
    assert RealConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # what run_isolated passes
    with pytest.raises(ValueError, match="no field 'steps'"):
        RealConfig.from_dict({"steps": 3})
    flags = ["--no-bridging", "--n-census-traces", "40", "--n-monosemanticity-traces", "0"]
    named = real.config_from_args(real.parse_args(flags))
    assert (named.bridging, named.n_census_traces, named.n_monosemanticity_traces) == (False, 40, 0)
    assert RealConfig.from_dict(named.to_dict()) == named


def test_a_stage_is_done_when_its_json_names_the_configs_adapters_and_redo_does_not(tmp_path, monkeypatch):
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path / "cache"))
    cfg = RealConfig(d_sae=16, k=2, adapter_steps=3)
    folder = real_config.adapter_folder(cfg, tmp_path)
    assert folder == tmp_path / "cache" / "smollm2" / "study" / "default" / "adapters-16-k2-s3-lr0.001"
    assert real_config.adapter_folder(RealConfig(pair="smollm2:mine"), tmp_path).parent.name == "mine"
    assert not real_config.done(cfg, tmp_path, "adapters")  # no JSON yet
    (tmp_path / "adapters.json").write_text(json.dumps({"folder": str(folder)}))
    (tmp_path / "hesitation.json").write_text(json.dumps({"adapters_folder": str(folder)}))
    (tmp_path / "behaviour.json").write_text("{}")
    assert all(real_config.done(cfg, tmp_path, s) for s in ("behaviour", "adapters", "hesitation"))
    redo = dataclasses.replace(cfg, redo=("adapters",))
    assert not real_config.done(redo, tmp_path, "adapters") and real_config.done(redo, tmp_path, "hesitation")
    other = dataclasses.replace(cfg, autocast="bfloat16")  # other adapters: both stages that use them rerun
    assert real_config.adapter_folder(other, tmp_path).name.endswith("-bfloat16")
    assert not real_config.done(other, tmp_path, "adapters") and not real_config.done(other, tmp_path, "hesitation")
    assert real_config.done(other, tmp_path, "behaviour")
    # The width and k: the config's, else the sweep's pick in the folder, else 512:8.
    assert real_config.adapter_shape(RealConfig(), tmp_path) == (512, 8, "default")
    (tmp_path / "sweep.json").write_text(json.dumps({"picked": {"d_sae": 1024, "k": 16}}))
    assert real_config.adapter_shape(RealConfig(), tmp_path) == (1024, 16, "sweep")
    assert real_config.adapter_shape(cfg, tmp_path) == (16, 2, "flags")


def test_a_bad_hesitation_flag_is_a_one_line_usage_error_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for flags, message in (
        ("--n-prompts 0", "error: --hesitation-args '--n-prompts 0': --n-prompts 0: must be >= 1"),
        ("--ranking nope", "error: --hesitation-args '--ranking nope': argument --ranking: invalid choice"),
    ):
        with pytest.raises(SystemExit) as exit_:
            run(real.main, ["--out", str(tmp_path / "out"), f"--hesitation-args={flags}"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith(message), lines
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UsageError, match="--sweep '0:0': each candidate is WIDTH:K"):
        real.config_from_args(real.parse_args(["--sweep", "0:0"]))


def test_the_old_report_module_is_the_librarys():
    assert real_report.write is lib_report.write and real_report.report_markdown is lib_report.report_markdown
