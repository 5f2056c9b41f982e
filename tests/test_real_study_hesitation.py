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
    assert "| hesitation: n hesitation features |" in result.report()
