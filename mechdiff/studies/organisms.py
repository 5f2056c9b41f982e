"""The organism family study: the hesitation study, unchanged, on every organism, side by side.

An organism is a folder with ``base/``, ``target/`` (HF folders from ``python -m mechdiff.organism
train``, each with its ``mechdiff_task.json``) and ``adapters/`` (from ``python -m mechdiff.adapters
train --pair custom``). :func:`family` lists the shipped ones. For each organism :func:`run`
measures behaviour (greedy, and sampled to measure error detection), the adapters' faithfulness,
and the hesitation study with one :class:`~mechdiff.studies.hesitation.HesitationConfig` for all
(nothing retuned per organism), then checks the family's targets and, where one fails, says what
was measured instead.

Example:
    >>> orgs = family()
    >>> sorted(orgs)[:1], (orgs["shipped"].folder / "target" / "config.json").is_file()
    (['errdet'], True)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mechdiff.config_checks import check
from mechdiff.evaluation.behaviour import behaviour_report
from mechdiff.studies import hesitation as study
from mechdiff.workloads import for_pair

FAMILY_DIR = Path(__file__).resolve().parents[1] / "organism" / "family"
TARGETS = {  # (key in the hesitation summary, goal), the same for every organism
    "hesitation_fraction": ("<=", 0.05),
    "ablation_cut": (">=", 0.90),
    "random_ablation_cut": ("<=", 0.20),
    "set_decides": (">=", 0.70),
    "steering_gain": (">", 0.0),
}


@dataclass(frozen=True)
class Organism:
    """Where one organism lives: ``folder/base``, ``folder/target``, and its adapters folder."""

    name: str
    folder: Path
    adapters: Path


def family() -> dict[str, Organism]:
    """The shipped organisms: the default one and every folder under ``mechdiff/organism/family``."""
    from mechdiff.adapters.formats import SHIPPED_DIR
    from mechdiff.models import ORGANISM_DIR

    out = {"shipped": Organism("shipped", ORGANISM_DIR, SHIPPED_DIR)}
    for folder in sorted(FAMILY_DIR.glob("*/target/config.json")):
        root = folder.parents[1]
        out[root.name] = Organism(root.name, root, root / "adapters")
    return out


@dataclass(frozen=True)
class OrganismsConfig:
    hesitation: study.HesitationConfig = field(default_factory=study.HesitationConfig)
    n_behaviour_problems: int = 300  # held-out problems for greedy and sampled behaviour
    samples: int = 4  # sampled replies per problem (error detection needs both branches written)
    temperature: float = 1.0

    def __post_init__(self):
        check(self, at_least_1=("n_behaviour_problems", "samples"), positive=("temperature",))


@dataclass
class OrganismsResult:
    data: dict
    studies: dict = field(repr=False, default_factory=dict)  # name -> HesitationResult

    def summary(self) -> dict:
        return self.data

    def write(self, out: str | Path) -> Path:
        from mechdiff.studies import organisms_report

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(self.data, indent=1))
        for name, result in self.studies.items():
            result.write(out / name)
        organisms_report.write(out, self.data)
        return out


def run_one(org: Organism, cfg: OrganismsConfig, *, device: str | None = None, progress: bool = True):
    """``(the organism's summary, its HesitationResult)``."""
    from mechdiff.adapters.formats import load_adapted
    from mechdiff.models import load_pair

    pair = load_pair("custom", base=str(org.folder / "base"), target=str(org.folder / "target"), device=device)
    work = for_pair(pair)
    problems = work.problems(cfg.n_behaviour_problems, "test", seed=cfg.hesitation.seed)
    behaviour = {
        name: behaviour_report(
            work, model, problems, samples=cfg.samples, temperature=cfg.temperature, seed=cfg.hesitation.seed
        )
        for name, model in (("base", pair.base), ("target", pair.target))
    }
    adapted = load_adapted(pair, org.adapters)
    result = study.run(
        pair, adapted, cfg.hesitation, progress=progress, pair_name=org.name, adapters_name=org.name + "/adapters"
    )
    s = result.summary()
    faith = result.faithfulness["adapted"]
    recipe_file = org.folder / "target" / "mechdiff_recipe.json"
    summary = {
        "recipe": json.loads(recipe_file.read_text())["recipe"] if recipe_file.is_file() else None,
        "task": pair.meta.get("task"),
        "hesitation_word": work.spec.word,
        "behaviour": behaviour,
        "adapters": {
            "n_features": s["n_adapter_features"],
            "gain_recovered": s["gain_recovered"],
            "fve_per_layer": faith["fve_per_layer"],
            "kl_to_target": faith["kl_to_target"],
            "mean_l0": faith.get("mean_l0"),
            "dead_fraction": faith.get("dead_fraction"),
        },
        "hesitation": headline(s),
    }
    summary["targets"] = check_targets(summary["hesitation"], s)
    return summary, result


def headline(s: dict) -> dict:
    """The hesitation study's headline numbers, under the family summary's names."""
    n, suf, st = s["necessity"], s["sufficiency"], s["steering"]
    return {
        "n_hesitation_features": s["n_hesitation_features"],
        "hesitation_fraction": s["hesitation_fraction"],
        "ablation_cut": n["cut"],
        "random_ablation_cut": n["random_cut"],
        "set_decides": suf["hesitation_retained"],
        "random_set_decides": suf["random_sets_retained"],
        # of the hesitations the kept-only copy decides, the share after a wrong step (>100% set
        # decides with a low share here: the set hesitates where the full model goes on)
        "set_decides_after_error": suf["set_decides_in_generation"]["frac_hesitations_after_error"],
        "activation_difference_cut": n["activation_difference_cut"],
        "roles": s["roles"],
        "set_rule": s["set_rule"]["rule"],
        "set_sizes": s["set_rule"]["sizes"],
        "steering_before": st["wait_prob_before"],
        "steering_after": st["wait_prob_after"],
        "steering_gain": st["wait_prob_after"] - st["wait_prob_before"],
        "hesitations_per_response": n["hesitations_per_response_before"],
        "free_generation_retained": suf["hesitation_retained_in_generation"],
    }


def check_targets(h: dict, s: dict) -> dict:
    """Each target's value, goal and whether it is met; a failed one gets the measured reason."""
    out = {}
    for key, (op, goal) in TARGETS.items():
        value = h[key]
        met = value is not None and {"<=": value <= goal, ">=": value >= goal, ">": value > goal}[op]
        out[key] = {"value": value, "goal": f"{op} {goal}", "met": bool(met)}
        if not met:
            out[key]["reason"] = _reason(key, s)
    return out


def _reason(key: str, s: dict) -> str:
    """What was measured where a target failed (from the study's own numbers)."""
    n, d = s["necessity"], s["dose_response"]
    curve = {int(k): p for k, p in s["set_rule"]["greedy_rate_by_k"].items()}
    k = s["n_hesitation_features"]
    if key == "ablation_cut":
        tail = d["ranked"][-2:] if len(d["ranked"]) > 1 else d["ranked"]
        falling = len(tail) == 2 and tail[1] < tail[0] - 0.05
        return (
            f"ablating the {k} features leaves greedy hesitation at {curve.get(k, float('nan')):.0%} of the "
            f"validation prompts (from {curve[0]:.0%}) but cuts hesitations in generation by "
            f"{n['cut']:.0%}; the dose-response goes {tail[0]:.2f} -> {tail[-1]:.2f} over its last two "
            f"points ({'still falling at the set size' if falling else 'flat at the set size'})"
        )
    if key == "hesitation_fraction":
        return f"the sizing rule needed {k} of {s['n_adapter_features']} features ({s['set_rule']['rule']})"
    if key == "random_ablation_cut":
        return (
            f"random sets of {k} features cut hesitations by {n['random_cut']:.0%} "
            f"(draws: {n['random_control_after_draws']})"
        )
    if key == "set_decides":
        dec = s["sufficiency"]["set_decides_in_generation"]
        return (
            f"the kept-only copy, deciding each slot, wrote {dec['hesitations_per_response']:.2f} "
            f"hesitations per response against {n['hesitations_per_response_before']:.2f}; teacher-forced "
            f"it keeps {s['sufficiency']['hesitation_retained_at_prompts']}"
        )
    return (
        f"P(hesitation) in the hybrid went {s['steering']['wait_prob_before']:.3f} -> "
        f"{s['steering']['wait_prob_after']:.3f} with {s['steering']['n_output_features']} output features"
    )


def run(
    organisms: dict[str, Organism],
    cfg: OrganismsConfig | None = None,
    *,
    device: str | None = None,
    progress: bool = True,
) -> OrganismsResult:
    """Every organism in ``organisms`` through :func:`run_one`, with one config."""
    cfg = cfg or OrganismsConfig()
    data, studies = (
        {"config": {**asdict(cfg)}, "targets": {k: f"{op} {g}" for k, (op, g) in TARGETS.items()}, "organisms": {}},
        {},
    )
    for name, org in organisms.items():
        if progress:
            print(f"[organisms] {name}: {org.folder}", flush=True)
        data["organisms"][name], studies[name] = run_one(org, cfg, device=device, progress=progress)
    return OrganismsResult(data, studies)
