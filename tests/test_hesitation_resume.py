"""The hesitation study resumes a killed run from its kept steps (``run(..., steps=DIR)``).

At real size (SmolLM2: two dozen graphs, thousands of generations) the study runs for hours; these
checks run it on the shipped organism at small settings, kill it part-way, and resume it.
"""

import json

import pytest
import torch

from mechdiff.adapters.formats import SHIPPED_DIR, load_adapted
from mechdiff.models import load_pair
from mechdiff.studies import hesitation
from mechdiff.studies import hesitation_measures as M

CFG = hesitation.HesitationConfig(
    n_prompts=6,
    n_problems=12,
    n_dose_problems=6,
    n_traces=8,
    random_draws=1,
    ranking="graph",
    n_graphs=2,
    max_feature_nodes=32,
)
STEPS = ["faithfulness", "prompts", "graph_000", "graph_001", "ablation_sizing", "necessity", "dose_response"]
LATER = ["kept_only", "set_decides", "sufficiency_variants", "steering"]


class Killed(Exception):
    """Stands for the kill: raised by the step after the ones kept."""


@pytest.fixture(scope="module")
def study():
    if not (SHIPPED_DIR / "adapters.json").exists():
        pytest.skip("no shipped adapters")
    pair = load_pair("organism")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield pair, load_adapted(pair, SHIPPED_DIR)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(study):
    pair, adapted = study
    return hesitation.run(pair, adapted, CFG, progress=False).summary()


def _same(a: dict, b: dict) -> None:
    drop = ("seconds", "resumed_steps")
    a, b = ({k: v for k, v in json.loads(json.dumps(s)).items() if k not in drop} for s in (a, b))
    assert a == b


def test_a_killed_run_resumes_at_its_next_step_and_ends_as_an_unbroken_run(study, uninterrupted, tmp_path, monkeypatch):
    pair, adapted = study
    steps = tmp_path / "steps"

    def killed(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(M, "set_decides", killed)
        with pytest.raises(Killed):
            hesitation.run(pair, adapted, CFG, progress=False, steps=steps)
    kept = sorted(p.stem for p in steps.glob("*.json") if p.stem != "fingerprint")
    assert kept == sorted(STEPS + ["kept_only"])

    resumed = hesitation.run(pair, adapted, CFG, progress=False, steps=steps).summary()
    assert resumed["resumed_steps"] == STEPS + ["kept_only"]  # loaded, in the order the study needs them
    _same(resumed, uninterrupted)


def test_a_finished_run_reruns_from_its_steps_without_recomputing_them(study, uninterrupted, tmp_path, monkeypatch):
    """Rerun with every expensive computation broken: it must load them all, and say so."""
    pair, adapted = study
    steps = tmp_path / "steps"
    first = hesitation.run(pair, adapted, CFG, progress=False, steps=steps).summary()
    assert first["resumed_steps"] == []
    _same(first, uninterrupted)  # keeping steps changes no number

    def recomputed(*args, **kwargs):
        raise AssertionError("a kept step was computed again")

    import attribution.build

    for module, name in (
        (attribution.build, "attribute"),
        (hesitation, "adapter_report"),
        (M, "necessity"),
        (M, "dose_response"),
        (M, "set_decides"),
        (M, "sufficiency_variants"),
        (M, "steering"),
        (hesitation.feature_sets, "smallest_ablating_prefix"),
        (hesitation.H, "hesitation_prompts"),
    ):
        monkeypatch.setattr(module, name, recomputed)
    again = hesitation.run(pair, adapted, CFG, progress=False, steps=steps).summary()
    assert again["resumed_steps"] == STEPS + LATER
    _same(again, uninterrupted)


def test_steps_kept_with_other_settings_are_refused_not_mixed(study, tmp_path, monkeypatch):
    pair, adapted = study
    steps = tmp_path / "steps"

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(hesitation, "adapter_report", killed)
    with pytest.raises(Killed):
        hesitation.run(pair, adapted, CFG, progress=False, steps=steps)
    other = hesitation.HesitationConfig(**{**CFG.__dict__, "n_problems": 13})
    with pytest.raises(ValueError, match=r"other settings \(config.n_problems: 12 there, 13 now\)"):
        hesitation.run(pair, adapted, other, progress=False, steps=steps)
