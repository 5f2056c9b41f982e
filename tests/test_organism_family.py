"""Organisms as a family: the task travels with the weights and every reader takes it from the pair."""

import json
import random

import pytest

from mechdiff.models import ModelPairMismatch, load_pair
from mechdiff.organism import grading
from mechdiff.organism.__main__ import main as organism_cli
from mechdiff.organism.task import SPEC_FILE, TaskSpec
from mechdiff.organism.train import Recipe, train_organism
from mechdiff.workloads import for_pair

TINY = dict(
    d_model=32, n_layers=1, n_heads=2, d_mlp=64, base_docs=256, base_steps=2, ft_traces=256, ft_steps=2, batch_size=8
)
HMM = TaskSpec(hesitation_words=("hmm",), width=3, recheck_prob=0.5)
UM = TaskSpec(hesitation_words=("um", "er"), n_operands=3, width=2, slip_prob=1.0)


@pytest.fixture(scope="module")
def two_organisms(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    out = {}
    for name, spec in (("hmm", HMM), ("um", UM)):
        train_organism(root / name, root / f"{name}-work", Recipe(**TINY, task=spec, seed=3), progress=False)
        out[name] = (root / name, spec)
    return out


def _reference(spec: TaskSpec, n: int = 30):
    """Traces the task itself writes (so their grades are known), as (problem, response words)."""
    rng = random.Random(0)
    return [(p, spec.reasoning_trace(p, rng)[0]) for p in spec.sample_problems(n, "test", 0)]


@pytest.mark.parametrize("name", ["hmm", "um"])
def test_a_reloaded_organism_is_prompted_and_graded_by_its_own_task(two_organisms, name):
    folder, spec = two_organisms[name]
    assert TaskSpec.load(folder / "target") == spec == TaskSpec.load(folder / "base")
    recipe = json.loads((folder / "target" / "mechdiff_recipe.json").read_text())["recipe"]
    assert TaskSpec.from_dict(recipe["task"]) == spec
    pair = load_pair("custom", base=str(folder / "base"), target=str(folder / "target"))
    work = for_pair(pair)
    assert work.spec == spec
    prompt = work.problems(1, "test")[0]
    words = pair.tokenizer.convert_ids_to_tokens(prompt["input_ids"])
    assert sum(w.isdigit() for w in words) == spec.n_operands * spec.width  # its operand shape
    for word in spec.hesitation_words:  # its words are real tokens, not <unk>
        assert pair.tokenizer.convert_tokens_to_ids(word) != pair.tokenizer.unk_token_id
    reference = _reference(spec)
    graded = [grading.grade(p, w, work.spec) for p, w in reference]
    expected = sum(w in spec.hesitation_words for _, ws in reference for w in ws)
    assert all(g.correct for g in graded) and sum(g.n_hesitations for g in graded) == expected > 0
    # the same words graded as the shipped organism would be: hesitations unseen or answers misread
    wrong = [grading.grade(p, w, TaskSpec()) for p, w in reference]
    assert sum(g.n_hesitations for g in wrong) == 0 or not all(g.correct for g in wrong)


def test_the_evaluation_path_grades_with_the_pairs_task(two_organisms):
    """Greedy generation, graded by the workload: the step statistics parse the organism's own steps
    (a 3-digit organism must never be graded with 4 columns)."""
    folder, spec = two_organisms["hmm"]
    pair = load_pair("custom", base=str(folder / "base"), target=str(folder / "target"))
    work = for_pair(pair)
    stats = work.evaluate(pair.target, work.problems(6, "test"), max_new_tokens=24)
    assert stats["n_problems"] == 6 and 0 <= stats["accuracy"] <= 1


def test_a_pair_of_two_tasks_is_refused(two_organisms):
    hmm, _ = two_organisms["hmm"]
    um, _ = two_organisms["um"]
    with pytest.raises((ModelPairMismatch, ValueError)):
        load_pair("custom", base=str(hmm / "base"), target=str(um / "target"))


def test_a_task_file_from_another_organism_is_caught(two_organisms, tmp_path):
    import shutil

    folder, _ = two_organisms["hmm"]
    for side in ("base", "target"):
        shutil.copytree(folder / side, tmp_path / side)
        TaskSpec().save(tmp_path / side)  # says "wait", 4 digits: the tokenizer knows neither
    pair = load_pair("custom", base=str(tmp_path / "base"), target=str(tmp_path / "target"))
    with pytest.raises(ValueError, match="does not know"):
        for_pair(pair)


def test_training_into_a_folder_of_another_task_is_refused(two_organisms):
    folder, _ = two_organisms["hmm"]
    with pytest.raises(ValueError, match="another task"):
        train_organism(folder, folder.parent / "w", Recipe(**TINY, task=UM), progress=False)


def test_train_cli_needs_out_and_checks_the_task(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        organism_cli(["train"])
    assert exit_.value.code == 2 and "--out" in capsys.readouterr().err
    from mechdiff.cli import UsageError

    for bad in (["--width", "0"], ["--hesitation-word", "p1"], ["--slip-prob", "2"], ["--scale", "0"]):
        with pytest.raises(UsageError):
            organism_cli(["train", "--out", str(tmp_path / "x"), *bad])
    assert not (tmp_path / "x").exists()  # refused before anything was written
    assert not list(tmp_path.glob("**/" + SPEC_FILE))


def test_the_hesitation_study_assumes_no_word(tmp_path):
    """The study end to end, as a library call, on the shipped organism that hesitates with "hmm"
    (3-digit operands): the token it traces, counts and reports is the organism's own."""
    import plotly.graph_objects as go

    from mechdiff.adapters.formats import load_adapted
    from mechdiff.studies.hesitation import HesitationConfig, run
    from mechdiff.studies.organisms import family

    org = family()["hmm"]
    pair = load_pair("custom", base=str(org.folder / "base"), target=str(org.folder / "target"))
    adapted = load_adapted(pair, org.adapters)
    cfg = HesitationConfig(
        n_prompts=10,
        n_problems=24,
        n_dose_problems=8,
        n_traces=8,
        random_draws=2,
        ranking="gradient",
        n_graphs=1,
        max_feature_nodes=32,
    )
    result = run(pair, adapted, cfg, progress=False, pair_name="hmm")
    s = result.summary()
    tokens = s["hesitation_tokens"]
    assert tokens["word"] == tokens["target"] == "hmm" and tokens["variants"] == ["hmm"]
    assert s["n_hesitation_prompts"] > 0 and s["models"]["target"]["hesitations_per_response"] > 0.3
    n = s["necessity"]
    assert n["hesitations_per_response_after"] < 0.5 * n["hesitations_per_response_before"]
    assert n["random_control_after"] > 0.7 * n["hesitations_per_response_before"]
    figures = result.figures()
    assert figures and all(isinstance(f, go.Figure) for f in figures.values())
    report = result.report()
    assert 'P("hmm")' in report and '"wait"' not in report and "wait" not in s["role_rule"]
    result.write(tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["hesitation_tokens"]["word"] == "hmm"


def test_analyses_organisms_writes_the_family_table(tmp_path):
    """``python -m analyses.organisms`` end to end on small settings: the summary has the issue's
    keys for each organism, targets carry a measured reason when missed, and figures are written."""
    from analyses import organisms as cli_organisms
    from mechdiff.cli import UsageError

    with pytest.raises(UsageError, match="NAME=FOLDER"):
        cli_organisms.main(["--organism", "nofolder", "--out", str(tmp_path / "x")])
    with pytest.raises(UsageError, match="has no"):
        cli_organisms.main(["--organism", f"mine={tmp_path}", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    out = tmp_path / "organisms"
    s = cli_organisms.main(
        [
            "--only",
            "hmm",
            "--out",
            str(out),
            "--n-prompts",
            "8",
            "--n-problems",
            "16",
            "--n-dose-problems",
            "8",
            "--n-traces",
            "8",
            "--random-draws",
            "1",
            "--ranking",
            "gradient",
            "--samples",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(s))
    org = s["organisms"]["hmm"]
    assert org["hesitation_word"] == "hmm" and org["task"]["width"] == 3
    assert set(org) >= {"recipe", "behaviour", "adapters", "hesitation", "targets"}
    assert set(org["hesitation"]) >= {
        "hesitation_fraction",
        "ablation_cut",
        "random_ablation_cut",
        "set_decides",
        "activation_difference_cut",
        "roles",
    }
    sampled = org["behaviour"]["target"]["sampled"]
    assert sampled["samples_per_problem"] == 2 and sampled["n_problems"] == 32
    for t in org["targets"].values():
        assert t["met"] or t["reason"]
    assert (out / "headline.png").is_file() and (out / "hmm" / "report.md").is_file()
    assert "| word | hmm |" in (out / "report.md").read_text()
