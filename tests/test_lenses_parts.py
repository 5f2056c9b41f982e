"""The lens comparison's parts, each checked against an independent computation."""

import numpy as np
import pytest
import torch

from mechdiff.lenses import crosscoder as C
from mechdiff.lenses import scoring


def test_label_scores_match_a_loop_over_units_and_tokens():
    gen = torch.Generator().manual_seed(0)
    acts = torch.rand(200, 6, generator=gen) * (torch.rand(200, 6, generator=gen) > 0.7)
    acts[:, 5] = 0  # a unit that never fires
    truth = torch.rand(200, generator=gen) > 0.6
    got = scoring.label_scores(acts, truth)
    strong_any = [False] * 200
    precisions = []
    for u in range(6):
        top = max(acts[:, u].tolist())
        strong = [t for t in range(200) if top > 0 and acts[t, u] >= 0.5 * top]
        for t in strong:
            strong_any[t] = True
        precisions.append(sum(bool(truth[t]) for t in strong) / len(strong) if strong else 0.0)
    recall = sum(s and bool(t) for s, t in zip(strong_any, truth)) / int(truth.sum())
    assert got["unit_precision"] == pytest.approx(precisions)
    assert got["precision"] == pytest.approx(sum(precisions) / 6)
    assert got["recall"] == pytest.approx(recall)
    assert got["n_truth_units"] == sum(p >= 0.5 for p in precisions)


def test_correlations_match_numpy_and_agreement_takes_the_best_match():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, 3, generator=gen), torch.randn(300, 4, generator=gen)
    b[:, 2] = -2 * a[:, 0] + 0.01 * b[:, 2]  # the same signal, seen twice
    want = np.corrcoef(a.T.numpy(), b.T.numpy())[:3, 3:]
    assert np.allclose(scoring.correlations(a, b).numpy(), want, atol=1e-5)
    agree = scoring.agreement({"x": a, "y": b}, {"x": ["a0", "a1", "a2"], "y": ["b0", "b1", "b2", "b3"]})
    assert agree["matrix"]["x"]["y"] == pytest.approx(float(np.abs(want).max(1).mean()), abs=1e-5)
    assert agree["same_mechanism"][0]["a"] == "x:a0" and agree["same_mechanism"][0]["b"] == "y:b2"
    assert agree["same_mechanism"][0]["correlation"] < -0.99 and len(agree["same_mechanism"]) == 1
    assert agree["shared_units"] == {}
    twice = scoring.agreement(
        {"x": a, "y": a[:, :2], "z": b},
        {"x": ["a0", "a1", "a2"], "y": ["a0", "a1"], "z": ["b0", "b1", "b2", "b3"]},
        family={"x": "f", "y": "f"},
    )
    assert twice["shared_units"] == {"x~y": 2}  # one dictionary ranked twice: no pairs between them
    assert [(p["a"], p["b"]) for p in twice["same_mechanism"]] == [("x:a0", "z:b2"), ("y:a0", "z:b2")]


def test_necessity_draws_random_sets_of_the_same_size_from_the_pool():
    seen = []

    def rate(units):
        seen.append(list(units))
        return 0.0 if "h" in units else 1.0

    need = scoring.ablation_necessity(rate, ["h"], ["a", "b", "c"], before=1.0, draws=3)
    assert need["cut"] == 1.0 and need["random_cut"] == 0.0
    assert [len(s) for s in seen] == [1, 1, 1, 1] and all(s[0] in "abc" for s in seen[:3])


def _handmade(d=8, base_scale=0.0):
    """A crosscoder with latent 0 reading direction e0 of the target; its base decoder is zero."""
    cc = C.Crosscoder(d, 4, k=1)
    with torch.no_grad():
        cc.W_dec.zero_()
        cc.W_enc.zero_()
        cc.b_enc.zero_()
        cc.b_dec.zero_()
        cc.W_dec[0, 1, 0] = 1.0  # target-only decoder
        cc.W_enc[d + 0, 0] = 1.0  # reads the target's e0
        cc.W_dec[1, :, 1] = 1.0  # a shared latent on e1
        cc.W_enc[1, 1] = 0.5
        cc.W_enc[d + 1, 1] = 0.5
    return cc


@pytest.mark.parametrize("base_scale", [0.0, 1.0, 0.5])
def test_latent_scaling_recovers_how_present_a_target_only_direction_is_in_the_base(base_scale):
    """The base carries e0 at ``base_scale`` times the target's: nu = base_scale, although the
    decoder norms call latent 0 target-only whatever the scale (complete shrinkage)."""
    gen = torch.Generator().manual_seed(2)
    amount = torch.rand(500, generator=gen) * 3
    acts = 0.01 * torch.randn(500, 2, 8, generator=gen)
    acts[:, 1, 0] += amount
    acts[:, 0, 0] += base_scale * amount
    cc = _handmade()
    assert C.latent_kinds(C.relative_norm(cc))[0] == "target-only"
    got = C.latent_scaling(cc, acts)
    assert float(got["nu"][0]) == pytest.approx(base_scale, abs=0.02)
    f = cc.encode(acts)[:, 0]
    for m, key in ((0, "beta_base"), (1, "beta_target")):  # least squares, solved directly
        x = (f[:, None] * cc.W_dec[0, 1][None]).flatten()[:, None].double()
        rest = cc.decode(cc.encode(acts) * torch.tensor([0.0, 1, 1, 1]))[:, m]
        y = (acts[:, m] - rest + cc.b_dec[m] * 0).flatten()[:, None].double()
        beta = torch.linalg.lstsq(x, y).solution.item()
        assert float(got[key][0]) == pytest.approx(beta, rel=1e-3, abs=1e-4)


def test_training_learns_a_sparse_dictionary_and_round_trips_through_safetensors(tmp_path):
    gen = torch.Generator().manual_seed(3)
    atoms = torch.randn(32, 2, 16, generator=gen)
    atoms[:8, 0] = 0  # 8 target-only atoms
    codes = torch.rand(6000, 32, generator=gen) * (torch.rand(6000, 32, generator=gen) < 0.08)
    acts = torch.einsum("na,amd->nmd", codes, atoms)
    cc = C.train_crosscoder(acts, C.CrosscoderConfig(d_sae=64, k=3, steps=1000, batch_size=256, lr=3e-3))
    with torch.no_grad():
        fvu = float((acts - cc.decode(cc.encode(acts))).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum())
        l0 = float((cc.encode(acts) > 0).sum(1).float().mean())
        unit = lambda v: v / v.norm(dim=-1, keepdim=True)  # noqa: E731
        cos = unit(atoms[:, 1]) @ unit(cc.W_dec[:, 1]).T  # each atom against each latent's target decoder
    assert fvu < 0.1 and 1 <= l0 <= 8
    best, match = cos.max(1)
    kinds = C.latent_kinds(C.relative_norm(cc))
    found = [i for i in range(32) if best[i] > 0.95]
    assert sum(i < 8 for i in found) >= 5 and sum(i >= 8 for i in found) >= 16
    assert all(kinds[match[i]] == "target-only" for i in found if i < 8)  # the atoms absent in the base
    assert sum(kinds[match[i]] == "target-only" for i in found if i >= 8) == 0
    C.save_crosscoder(cc, tmp_path / "cc", "blocks.1.hook_resid_post")
    again = C.load_crosscoder(tmp_path / "cc")
    assert torch.equal(again.encode(acts[:50]), cc.encode(acts[:50]))
    (tmp_path / "cc" / "cfg.json").write_text('{"architecture": "jumprelu"}')
    with pytest.raises(ValueError, match="batchtopk_crosscoder"):
        C.load_crosscoder(tmp_path / "cc")


@pytest.mark.parametrize("name", ["context", "crosscoder", "paired", "report", "scoring"])
def test_docstring_examples(name):
    """The runnable examples in the lens modules' docstrings stay true."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"mechdiff.lenses.{name}"), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_retraining_uses_the_saved_recipe_and_leaves_the_random_state():
    """The LoRA trained again takes every field of the shipped training.json but the ones overridden;
    the run's random state is as before; the given LoRA is its own perfect match."""
    import json

    from mechdiff.lenses import retrain
    from mechdiff.lora import SHIPPED_DIR, load_lora
    from mechdiff.models import load_pair

    pair = load_pair("organism")
    folder = SHIPPED_DIR / "lora_r1"
    state = torch.get_rng_state()
    r = retrain.retrain_lora(pair, folder, {"steps": 2, "n_traces": 16, "batch_size": 8})
    assert torch.equal(torch.get_rng_state(), state)
    saved = json.loads((folder / "training.json").read_text())["config"]
    assert r.recipe["loop"]["steps"] == 2 and r.recipe["batch_size"] == 8 and r.recipe["n_traces"] == 16
    for key in ("rank", "alpha", "rslora", "kl_weight"):
        assert r.recipe[key] == saved[key], key
    assert r.recipe["loop"]["lr"] == saved["lr"] and list(r.recipe["modules"]) == saved["modules"]
    assert r.cost.cpu_s > 0 and r.closeness["metrics"]["step"] == {"given": saved["steps"], "retrained": 2}
    given = load_lora(folder, pair).layers.state_dict()
    assert retrain.weight_cosine(given, given) == pytest.approx(1.0)
    assert r.closeness["weight_cosine"] < 0.99  # two steps from B = 0 are far from a thousand
    with pytest.raises(ValueError, match="different tensors"):
        retrain.weight_cosine(given, {})
