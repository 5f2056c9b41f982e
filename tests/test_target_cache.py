"""The adapter step's two cheaper ways: the target's pass read from a cache (same loss and
gradients as running the target) and bridging on a share of the rows (an unbiased estimate: its
mean over every subset is the whole batch's bridging term, gradients included)."""

import itertools
import os

import pytest
import torch
from datasets import Dataset
from test_fast_objectives import _random_adapters, _tiny_pair

from mechdiff.config_checks import ConfigError
from mechdiff.padding import pad
from mechdiff.training.activation_cache import CacheError
from mechdiff.training.adapter_objective import AdapterObjective, AdapterRecipe, LossWeights, train_adapters
from mechdiff.training.target_cache import TargetCache

LENGTHS = (5, 11, 8, 3, 9, 6, 12)


def _sequences(seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [[2] + torch.randint(4, 64, (m,), generator=gen).tolist() for m in LENGTHS]


def _step(objective, adapted, tokens, mask, **kw):
    adapted.adapters.zero_grad()
    loss, parts, _ = objective(tokens, mask, cutoff=1, **kw)
    loss.backward()
    return loss.detach(), parts, [p.grad.clone() for p in adapted.adapters.parameters()]


@pytest.fixture
def tiny(tiny_model_dir):
    pair = _tiny_pair(tiny_model_dir)
    return pair, _random_adapters(pair)


@pytest.mark.parametrize("fast", [True, False])
def test_cached_target_gives_the_online_step(tiny, tmp_path, fast):
    pair, adapted = tiny
    seqs = _sequences()
    cache = TargetCache.build(pair.target, seqs, tmp_path / "cache", batch_size=3, shard_rows=20)
    assert len(cache.cache.shards) > 1  # batches come from several shards
    objective = AdapterObjective(adapted, pair.target, LossWeights(l1=0.01), fast=fast)
    rows = [6, 1, 3, 4]  # not the cache's batches: other padding, other shards
    tokens, mask = pad([seqs[i] for i in rows], 0, side="right")
    online = _step(objective, adapted, tokens, mask)
    read = _step(objective, adapted, tokens, mask, target=cache.batch(rows, tokens.shape[1], logits=not fast))
    torch.testing.assert_close(read[0], online[0], atol=1e-5, rtol=1e-5)
    assert read[1].keys() == online[1].keys()
    for name in online[1]:
        assert read[1][name] == pytest.approx(online[1][name], rel=1e-5, abs=1e-5), name
    assert min(online[1][k] for k in ("bridge_a2t", "bridge_t2a", "nmse")) > 1e-3  # not trivially 0
    for g_read, g_online in zip(read[2], online[2], strict=True):
        torch.testing.assert_close(g_read, g_online, atol=1e-5, rtol=1e-4)


def test_target_cache_refuses_other_models_traces_and_corrupt_shards(tiny, tmp_path):
    pair, _ = tiny
    seqs = _sequences()
    TargetCache.build(pair.target, seqs, tmp_path / "cache", batch_size=4, shard_rows=16)
    with pytest.raises(CacheError, match="another target"):
        TargetCache(tmp_path / "cache", pair.base, seqs)
    with pytest.raises(CacheError, match="another traces"):
        TargetCache(tmp_path / "cache", pair.target, _sequences(seed=4))
    with pytest.raises(CacheError, match="other settings"):  # building over it is refused too
        TargetCache.build(pair.target, _sequences(seed=4), tmp_path / "cache", batch_size=4, shard_rows=16)
    cache = TargetCache(tmp_path / "cache", pair.target, seqs)  # the right pair still opens it
    shard = cache.cache.shards[0][0]
    os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(CacheError, match="corrupt"):
        cache.batch([0, 1], 12)


def test_training_from_the_cache_repeats_the_run_without_running_the_target(tiny_model_dir, tmp_path):
    pair = _tiny_pair(tiny_model_dir)
    traces = Dataset.from_dict({"input_ids": _sequences()})
    val = Dataset.from_dict({"input_ids": _sequences(seed=5)[:2]})
    recipe = AdapterRecipe(d_sae=16, k=4, steps=3, batch_size=3, n_val=2, progress=False, log_every=1)
    calls = []
    pair.target.blocks[0].register_forward_hook(lambda _m, _i, out: calls.append(out.shape[0]))

    def run(**kw):
        calls.clear()
        _, history = train_adapters(pair, recipe, traces=traces, val_traces=val, pad_id=0, **kw)
        return history, calls.count(recipe.batch_size)  # the training steps' target forwards

    plain, online_calls = run()
    cached, cached_calls = run(target_cache=tmp_path / "target")
    assert online_calls == recipe.steps and cached_calls == 0
    again, _ = run(target_cache=tmp_path / "target")  # reused, not rebuilt
    for a, b, c in zip(plain, cached, again, strict=True):
        for key in ("loss", "kl", "nmse", "bridge_a2t"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5) and c[key] == b[key], key


@pytest.mark.parametrize("fast", [True, False])
def test_bridging_a_share_of_rows_is_unbiased(tiny, fast):
    pair, adapted = tiny
    seqs = _sequences()[:4]
    tokens, mask = pad(seqs, 0, side="right")
    exact = _step(AdapterObjective(adapted, pair.target, LossWeights(), fast=fast), adapted, tokens, mask)
    half = AdapterObjective(adapted, pair.target, LossWeights(), fast=fast, bridge_rows=0.5)
    runs = [
        _step(half, adapted, tokens, mask, bridge_subset=torch.tensor(s)) for s in itertools.combinations(range(4), 2)
    ]
    for name in ("bridge_a2t", "bridge_t2a"):
        estimates = [r[1][name] for r in runs]
        assert sum(estimates) / len(estimates) == pytest.approx(exact[1][name], rel=1e-5), name
        assert max(estimates) - min(estimates) > 1e-3 * exact[1][name]  # each subset is only an estimate
    for name in ("kl", "nmse"):  # the other parts still see every row
        assert runs[0][1][name] == pytest.approx(exact[1][name], rel=1e-6)
    mean_loss = torch.stack([r[0] for r in runs]).mean()
    torch.testing.assert_close(mean_loss, exact[0], atol=1e-5, rtol=1e-5)
    for i, g in enumerate(exact[2]):
        mean = torch.stack([r[2][i] for r in runs]).mean(0)
        torch.testing.assert_close(mean, g, atol=1e-5 * float(g.abs().max()), rtol=1e-4)
    torch.manual_seed(0)  # drawn at random when not given: two rows of four
    drawn = half._bridge_subset(mask, None)
    assert drawn is not None and len(drawn) == 2 and len(set(drawn.tolist())) == 2


def test_bridging_a_subset_fast_equals_plain(tiny):
    """The chunked pass (the subset's tokens first, sharing the teacher's logits) against full
    logits on the same subset: loss, parts and gradients."""
    pair, adapted = tiny
    tokens, mask = pad(_sequences()[:4], 0, side="right")
    subset = torch.tensor([1, 3])
    fast, plain = (
        _step(AdapterObjective(adapted, pair.target, LossWeights(), fast=f, bridge_rows=0.5), adapted, tokens, mask,
              bridge_subset=subset)
        for f in (True, False)
    )  # fmt: skip
    torch.testing.assert_close(fast[0], plain[0], atol=1e-5, rtol=1e-5)
    for name in ("kl", "bridge_a2t", "bridge_t2a"):
        assert fast[1][name] == pytest.approx(plain[1][name], rel=1e-4, abs=1e-7), name
    for g_fast, g_plain in zip(fast[2], plain[2], strict=True):
        torch.testing.assert_close(g_fast, g_plain, atol=1e-5 * float(g_plain.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("fast", [True, False])
def test_a_subset_without_tokens_estimates_zero(tiny, fast):
    pair, adapted = tiny
    tokens, mask = pad(_sequences()[:3], 0, side="right")
    mask[2] = False  # a row of padding only
    half = AdapterObjective(adapted, pair.target, LossWeights(), fast=fast, bridge_rows=0.5)
    loss, parts, _ = half(tokens, mask, cutoff=1, bridge_subset=torch.tensor([2]))
    assert parts["bridge_a2t"] == parts["bridge_t2a"] == 0.0 and torch.isfinite(loss)
    with_tokens = half(tokens, mask, cutoff=1, bridge_subset=torch.tensor([0]))[1]
    assert with_tokens["bridge_a2t"] > 0 and with_tokens["bridge_t2a"] > 0


@pytest.mark.parametrize("share", [0.0, 1.5, float("nan")])
def test_bridge_rows_outside_zero_one_is_refused(share):
    with pytest.raises(ConfigError, match="bridge_rows"):
        AdapterRecipe(bridge_rows=share)


def test_the_train_command_line_passes_both_options(monkeypatch, tmp_path):
    import types

    from mechdiff import cli
    from mechdiff.adapters import __main__ as adapters_cli

    seen = []
    monkeypatch.setattr(adapters_cli, "_train", lambda args: seen.append(args))
    out = str(tmp_path / "out")
    adapters_cli.main(["train", "--out", out, "--bridge-rows", "0.25", "--target-cache", str(tmp_path / "t")])
    args = seen[0]
    assert args.checked_recipe.bridge_rows == 0.25 and args.target_cache == str(tmp_path / "t")
    pair = types.SimpleNamespace(meta={"base_name": "b", "target_name": "t"})
    exact = adapters_cli._recipe(types.SimpleNamespace(**{**vars(args), "bridge_rows": None}))
    assert exact.bridge_rows == 1.0  # another estimator: another checkpoint folder
    assert adapters_cli._work_dir(args, args.checked_recipe, tmp_path / "out", pair) != adapters_cli._work_dir(
        args, exact, tmp_path / "out", pair
    )
    with pytest.raises(cli.UsageError, match="--bridge-rows"):
        adapters_cli._recipe(types.SimpleNamespace(**{**vars(args), "bridge_rows": 0.0}))


def test_cache_runs_the_objectives_blocks(tiny, tmp_path, monkeypatch):
    """``lean`` (default) builds the cache in lean blocks, as the objective's online target pass
    runs: TransformerLens' attention module never runs; ``lean=False`` runs it. Both hold the
    same values to float error."""
    pair, _ = tiny
    seqs = _sequences()
    attention = type(pair.target.blocks[0].attn)
    attention_calls, forward = [], attention.forward

    def counted(self, *args, **kwargs):
        attention_calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(attention, "forward", counted)  # a module hook would itself rule lean out
    assert any(p.requires_grad for p in pair.target.parameters())  # no_grad is enough for lean
    lean = TargetCache.build(pair.target, seqs, tmp_path / "lean", batch_size=3)
    assert not attention_calls
    plain = TargetCache.build(pair.target, seqs, tmp_path / "plain", batch_size=3, lean=False)
    assert attention_calls
    rows = [6, 1, 3]
    got, want = lean.batch(rows, 13), plain.batch(rows, 13)
    torch.testing.assert_close(got.out, want.out, atol=1e-5, rtol=1e-5)
    for a, b in zip(got.resid, want.resid, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
