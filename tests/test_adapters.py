"""Transcoder adapters: the module, the objective and the folder format, on tiny random pairs."""

import json

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from sae_lens import SAE

from mechdiff.adapters.formats import (
    AdapterFormatError,
    TopKTranscoder,
    load_adapted,
    save_adapters,
)
from mechdiff.adapters.transcoder import AdaptedModel
from mechdiff.models import hybrid, load_pair
from mechdiff.padding import pad
from mechdiff.training.adapter_objective import (
    AdapterObjective,
    AdapterRecipe,
    LossWeights,
    aux_dead_loss,
    train_adapters,
)
from mechdiff.training.loop import TrainingInterrupted
from mechdiff.training.resampling import reinit as _reinit

PAD = 1  # conftest's tiny tokenizer: <unk>=0 <pad>=1 <bos>=2 <eos>=3


@pytest.fixture
def pair(tiny_model_dir):
    pair = load_pair(
        "custom", base=str(tiny_model_dir("base", seed=0)), target=str(tiny_model_dir("target", seed=1)), device="cpu"
    )
    with torch.no_grad():  # random tiny models are near uniform: make the MLPs and outputs matter
        pair.target.unembed.W_U.mul_(8)
        for block in pair.base.blocks:
            block.mlp.W_out.mul_(4)
    return pair


def random_traces(n=24, seed=0, lo=6, hi=14):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=gen).tolist()
    rows = [[2] + torch.randint(4, 64, (m - 1,), generator=gen).tolist() for m in lengths]
    return Dataset.from_dict({"input_ids": rows})


def randomize(adapted, scale=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapted.adapters:
            for p in (a.W_dec, a.b_dec, a.b_enc):
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return adapted


def test_adapter_reads_true_mlp_input_and_adds_to_base_mlp(pair):
    adapted = randomize(AdaptedModel.from_pair(pair, d_sae=32))
    tokens = torch.randint(4, 64, (2, 9))
    _, cache = adapted.model.run_with_cache(tokens)
    for layer in range(pair.n_layers):
        block = adapted.model.blocks[layer]
        resid_mid = cache[f"blocks.{layer}.hook_resid_mid"]
        rms = (resid_mid.pow(2).mean(-1, keepdim=True) + adapted.model.cfg.eps).sqrt()
        x = resid_mid / rms * block.ln2.w  # the norm weight is part of the MLP's input
        assert block.ln2.w.std() > 0.05  # conftest gives non-trivial norm gains
        torch.testing.assert_close(cache[f"blocks.{layer}.adapter.hook_in"], x, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache[f"blocks.{layer}.ln2.hook_normalized"] * block.ln2.w, x, atol=1e-5, rtol=1e-5)
        a = adapted.adapters[layer]
        acts = torch.relu(x @ a.W_enc + a.b_enc)
        torch.testing.assert_close(cache[adapted.acts_name(layer)], acts, atol=1e-5, rtol=1e-5)
        base_mlp = pair.base.blocks[layer].mlp(x)  # the base model's MLP on the same input
        torch.testing.assert_close(
            cache[f"blocks.{layer}.hook_mlp_out"], base_mlp + acts @ a.W_dec + a.b_dec, atol=1e-4, rtol=1e-4
        )


def test_starts_as_hybrid_and_bypass_hooks_give_hybrid(pair):
    adapted = AdaptedModel.from_pair(pair, d_sae=16)
    tokens = torch.randint(4, 64, (2, 7))
    want = hybrid(pair)(tokens)
    torch.testing.assert_close(adapted.model(tokens), want)
    randomize(adapted)
    assert not torch.allclose(adapted.model(tokens), want, atol=1e-3)
    torch.testing.assert_close(adapted.model.run_with_hooks(tokens, fwd_hooks=adapted.bypass_hooks()), want)


def test_objective_parts_match_independent_computations(pair):
    adapted = randomize(AdaptedModel.from_pair(pair, d_sae=16), scale=0.2)
    tokens, mask = pad(random_traces(4)["input_ids"], PAD, side="right")
    w = LossWeights(kl=1.0, nmse=1.0, bridge=2.0, l1=0.01)
    loss, parts, stats = AdapterObjective(adapted, pair.target, w)(tokens, mask, cutoff=1)
    keep = mask.flatten()
    with torch.no_grad():
        t_logits, t_cache = pair.target.run_with_cache(tokens, attention_mask=mask.long())
        a_logits, a_cache = adapted.model.run_with_cache(tokens, attention_mask=mask.long())

        def kl(logits):
            return F.kl_div(
                logits.flatten(0, 1)[keep].log_softmax(-1),
                t_logits.flatten(0, 1)[keep].log_softmax(-1),
                log_target=True,
                reduction="batchmean",
            )

        assert parts["kl"] == pytest.approx(kl(a_logits).item(), rel=1e-4)
        nmse = []
        for layer in range(pair.n_layers):
            h = a_cache[f"blocks.{layer}.hook_resid_post"].flatten(0, 1)[keep]
            ht = t_cache[f"blocks.{layer}.hook_resid_post"].flatten(0, 1)[keep]
            nmse.append(((h - ht) ** 2).sum() / (ht**2).sum())
        assert parts["nmse"] == pytest.approx(torch.stack(nmse).mean().item(), rel=1e-4)
        # bridging via patching: replace the target's residual at layer 1 by the adapted one
        a_resid = a_cache["blocks.1.hook_resid_pre"]
        t_resid = t_cache["blocks.1.hook_resid_pre"]
        a2t = pair.target.run_with_hooks(
            tokens, attention_mask=mask.long(), fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: a_resid)]
        )
        t2a = adapted.model.run_with_hooks(
            tokens, attention_mask=mask.long(), fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: t_resid)]
        )
        assert parts["bridge_a2t"] == pytest.approx(kl(a2t).item(), rel=1e-4)
        assert parts["bridge_t2a"] == pytest.approx(kl(t2a).item(), rel=1e-4)
        l1 = sum(
            (a_cache[adapted.acts_name(i)].flatten(0, 1)[keep] * adapted.adapters[i].W_dec.norm(dim=1)).sum(-1).mean()
            for i in range(pair.n_layers)
        )
        assert parts["l1"] == pytest.approx(float(l1), rel=1e-4)
        l0 = torch.stack(
            [
                (a_cache[adapted.acts_name(i)].flatten(0, 1)[keep] > 0).sum(-1).float().mean()
                for i in range(pair.n_layers)
            ]
        ).mean()
        assert parts["l0"] == pytest.approx(l0.item(), rel=1e-5)
    total = parts["kl"] + parts["nmse"] + 2 * (parts["bridge_a2t"] + parts["bridge_t2a"]) + 0.01 * parts["l1"]
    assert loss.item() == pytest.approx(total, rel=1e-4)
    loss.backward()  # only adapters train
    assert all(p.grad is None for p in pair.target.parameters())
    assert adapted.adapters[0].W_dec.grad.abs().sum() > 0


def test_padding_does_not_change_the_loss(pair):
    adapted = randomize(AdaptedModel.from_pair(pair, d_sae=16), scale=0.2)
    rows = random_traces(3)["input_ids"]
    obj = AdapterObjective(adapted, pair.target, LossWeights(bridge=0.0))
    short = obj(*pad(rows[:1], PAD, side="right"))[1]
    padded_tokens, padded_mask = pad([rows[0], [2] + [5] * 20], PAD, side="right")
    both = obj(padded_tokens[:1], padded_mask[:1])[1]  # row 0, padded to 21 tokens
    assert both["kl"] == pytest.approx(short["kl"], rel=1e-4)
    assert both["nmse"] == pytest.approx(short["nmse"], rel=1e-4)


def test_training_lowers_loss_and_repeats_by_seed(pair):
    traces, val = random_traces(64), random_traces(8, seed=1)
    recipe = AdapterRecipe(
        d_sae=32,
        steps=30,
        batch_size=8,
        lr=3e-3,
        progress=False,
        log_every=1,
        resample_every=10,
        dense_threshold=0.9,
        weights=LossWeights(l1=1e-3),
    )
    tokens, mask = pad(val["input_ids"], PAD, side="right")
    with torch.no_grad():
        before = AdapterObjective(AdaptedModel.from_pair(pair, 32), pair.target, LossWeights())(tokens, mask, cutoff=1)[
            1
        ]
    a1, h1 = train_adapters(pair, recipe, traces=traces, val_traces=val)

    def total(parts, prefix=""):
        return sum(w * parts[prefix + k] for k, w in (("kl", 1), ("nmse", 1), ("bridge_a2t", 2), ("bridge_t2a", 2)))

    assert total(h1[-1], "val_") < 0.8 * total(before)
    assert {"kl", "nmse", "bridge_a2t", "bridge_t2a", "l1", "l0", "dead", "val_fve_0"} <= set(h1[-1])
    a2, _ = train_adapters(pair, recipe, traces=traces, val_traces=val)
    torch.testing.assert_close(a1.adapters.state_dict(), a2.adapters.state_dict())


class KilledAfter:
    """A traces dataset whose ``n``-th batch raises: a run killed midway."""

    def __init__(self, ds, n):
        self.ds, self.n, self.calls = ds, n, 0

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, idx):
        self.calls += 1
        if self.calls > self.n:
            raise KeyboardInterrupt("killed")
        return self.ds[idx]


@pytest.mark.parametrize(
    "levers",
    [
        dict(
            activation="relu",
            resample_every=2,
            resample_until=1.0,
            dense_threshold=0.5,
            weights=LossWeights(l1=1e-3, aux=0.0),
        ),  # ReLU + L1 + resampling dead / dense
        dict(activation="topk", k=2, dead_window=1, weights=LossWeights(aux=0.5)),  # TopK + AuxK
    ],
)
def test_resume_after_a_kill_matches_an_uninterrupted_run(pair, tmp_path, levers):
    traces, val = random_traces(64), random_traces(8, seed=1)
    recipe = AdapterRecipe(
        d_sae=16, steps=6, batch_size=8, lr=3e-3, progress=False, log_every=1, checkpoint_every=3, **levers
    )
    full, full_hist = train_adapters(pair, recipe, traces=traces, val_traces=val)
    with pytest.raises(TrainingInterrupted, match="after step 4: checkpoint saved"):  # Ctrl-C at step 5
        train_adapters(pair, recipe, out_dir=tmp_path, traces=KilledAfter(traces, 4), val_traces=val)
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 4  # not 3
    resumed, hist = train_adapters(pair, recipe, out_dir=tmp_path, traces=traces, val_traces=val)
    assert [h["step"] for h in hist] == [1, 2, 3, 4, 5, 6]
    assert ("aux" in hist[-1]) == (levers["weights"].aux > 0)  # the AuxK part is logged iff it is on
    assert hist[-1]["loss"] == pytest.approx(full_hist[-1]["loss"], rel=1e-5)
    torch.testing.assert_close(resumed.adapters.state_dict(), full.adapters.state_dict())


def test_reinit_keeps_the_function_of_dead_features_and_the_mean_of_dense_ones(pair):
    adapted = randomize(AdaptedModel.from_pair(pair, d_sae=8), scale=0.5)
    a = adapted.adapters[0]
    x_all = torch.randn(50, pair.d_model)
    with torch.no_grad():
        a.b_enc[1], a.b_enc[3] = -1e4, 1e4  # feature 1 never fires (dead), feature 3 always (dense)
        out = a(x_all)
        _reinit(a, torch.tensor([1]), torch.tensor([False]), x_all, x_all[:1])
        torch.testing.assert_close(a(x_all), out)  # a dead feature carried nothing
        assert a.W_dec[1].abs().sum() == 0
        torch.testing.assert_close(a.W_enc[:, 1] / a.W_enc[:, 1].norm(), x_all[0] / x_all[0].norm())
        # float32 rounding of a sum whose largest term is the dense feature's (bias 1e4) output
        tol = 8 * torch.finfo(torch.float32).eps * (a.encode(x_all).abs().max() * a.W_dec.abs().max()).item()
        assert a(x_all[:1])[0].sub(out[0]).abs().max() < tol and (x_all[:1] @ a.W_enc[:, 1] + a.b_enc[1]) > 0
        _reinit(a, torch.tensor([3]), torch.tensor([True]), x_all, x_all[5:6])
        torch.testing.assert_close(a(x_all).mean(0), out.mean(0), atol=1e-3, rtol=1e-4)
        assert not torch.allclose(a(x_all), out, atol=1e-3)


def save_load(pair, tmp_path, activation="relu"):
    adapted = randomize(AdaptedModel.from_pair(pair, d_sae=24, activation=activation, k=3))
    folder = save_adapters(adapted, tmp_path / "ad", recipe={"note": "test"})
    return adapted, folder


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_save_load_round_trip_and_sae_lens(pair, tmp_path, activation):
    adapted, folder = save_load(pair, tmp_path, activation)
    loaded = load_adapted(pair, folder)
    tokens = torch.randint(4, 64, (2, 8))
    torch.testing.assert_close(loaded.model(tokens), adapted.model(tokens))
    x = torch.randn(5, 7, pair.d_model)
    for layer, ours in enumerate(adapted.adapters):
        sae = SAE.load_from_disk(folder / f"layer_{layer}")
        assert type(sae).__name__ == ("Transcoder" if activation == "relu" else "TopKTranscoder")
        assert sae.cfg.metadata.hook_name == f"blocks.{layer}.adapter.hook_in"
        assert sae.cfg.metadata.hook_name_out == f"blocks.{layer}.hook_mlp_out"
        assert "added to the base MLP" in sae.cfg.metadata.output_mode
        with torch.no_grad():
            torch.testing.assert_close(sae.encode(x), ours.encode(x))
            torch.testing.assert_close(sae.decode(ours.encode(x)), ours.decode(ours.encode(x)))
            torch.testing.assert_close(sae(x), ours(x))
        assert sae.cfg.metadata.hook_name in loaded.model.hook_dict
    if activation == "topk":
        assert isinstance(sae, TopKTranscoder) and sae.cfg.k == 3


def test_loading_against_the_wrong_pair_is_a_clear_error(pair, tiny_model_dir, tmp_path):
    _, folder = save_load(pair, tmp_path)
    wide = load_pair(
        "custom",
        base=str(tiny_model_dir("b2", hidden_size=32, num_attention_heads=2, num_key_value_heads=1)),
        target=str(tiny_model_dir("t2", seed=1, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)),
    )
    with pytest.raises(AdapterFormatError, match="d_model=64"):
        load_adapted(wide, folder)
    deep = load_pair(
        "custom",
        base=str(tiny_model_dir("b3", num_hidden_layers=3)),
        target=str(tiny_model_dir("t3", seed=1, num_hidden_layers=3)),
    )
    with pytest.raises(AdapterFormatError, match="n_layers=2"):
        load_adapted(deep, folder)
    other = load_pair("custom", base=str(tiny_model_dir("b4", seed=5)), target=str(tiny_model_dir("t4", seed=6)))
    with pytest.raises(AdapterFormatError, match="trained for other weights"):
        load_adapted(other, folder)
    assert load_adapted(other, folder, check_weights=False).config.d_sae == 24


def test_missing_and_corrupt_files_are_clear_errors(pair, tmp_path):
    _, folder = save_load(pair, tmp_path)
    with pytest.raises(AdapterFormatError, match="does not exist"):
        load_adapted(pair, tmp_path / "nowhere")
    (folder / "layer_1" / "sae_weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterFormatError, match="could not read"):
        load_adapted(pair, folder)
    (folder / "layer_1" / "sae_weights.safetensors").unlink()
    with pytest.raises(AdapterFormatError, match="missing adapter weights"):
        load_adapted(pair, folder)
    (folder / "adapters.json").write_text("{ truncated")
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        load_adapted(pair, folder)
    (folder / "adapters.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(AdapterFormatError, match="is not a"):
        load_adapted(pair, folder)
    (folder / "adapters.json").unlink()
    with pytest.raises(AdapterFormatError, match="no adapters.json"):
        load_adapted(pair, folder)


def test_ablation_and_steering_hooks(pair):
    adapted = randomize(AdaptedModel.from_pair(pair, d_sae=16))
    tokens = torch.randint(4, 64, (1, 6))
    name = adapted.acts_name(0)
    _, clean = adapted.model.run_with_cache(tokens, names_filter=name)
    with adapted.model.hooks(fwd_hooks=adapted.ablation_hooks([(0, 2), (0, 5)])):
        _, cache = adapted.model.run_with_cache(tokens, names_filter=name)
    assert cache[name][..., [2, 5]].abs().sum() == 0
    torch.testing.assert_close(cache[name][..., 7], clean[name][..., 7])
    with adapted.model.hooks(fwd_hooks=adapted.steering_hooks([(0, 7)], value=2.0)):
        _, cache = adapted.model.run_with_cache(tokens, names_filter=name)
    torch.testing.assert_close(cache[name][..., 7], clean[name][..., 7] + 2.0)


def test_aux_loss_trains_only_dead_features_to_fit_the_residual_error(pair):
    adapted = randomize(AdaptedModel.from_pair(pair, d_sae=16, activation="topk", k=4))
    gen = torch.Generator().manual_seed(0)
    pre = [torch.randn(2, 5, 16, generator=gen) for _ in range(2)]
    resid = [torch.randn(2, 5, pair.d_model, generator=gen) for _ in range(3)]
    t_resid = [torch.randn(2, 5, pair.d_model, generator=gen) for _ in range(3)]
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, -2:] = False
    dead = torch.zeros(2, 16, dtype=torch.bool)
    dead[0, [1, 4, 7]] = True  # no dead feature in layer 1: it adds nothing
    got = aux_dead_loss(pre, adapted, dead, resid, t_resid, mask, k_aux=2)
    # independently: per token, the two largest of features 1, 4, 7 (sorted), ReLU'd, decoded
    idx = torch.tensor([1, 4, 7])
    vals, order = pre[0][..., idx].sort(-1, descending=True)
    chosen = idx[order[..., :2]]
    out = (vals[..., :2, None].relu() * adapted.adapters[0].W_dec[chosen]).sum(-2)
    err = t_resid[1] - resid[1]
    want = (((out - err) ** 2).sum(-1) * mask).sum() / ((err**2).sum(-1) * mask).sum() / 2
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    got.backward()
    grad = adapted.adapters[0].W_dec.grad
    assert grad[idx].abs().sum() > 0 and grad[[i for i in range(16) if i not in (1, 4, 7)]].abs().sum() == 0
    assert adapted.adapters[1].W_dec.grad is None


@pytest.mark.parametrize("entry", ["../elsewhere", "/etc", "layer_0/../../x", "..", "", 3])
def test_layer_entries_pointing_outside_the_folder_are_refused(pair, tmp_path, entry):
    _, folder = save_load(pair, tmp_path)
    meta = json.loads((folder / "adapters.json").read_text())
    meta["layers"][1] = entry
    (folder / "adapters.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterFormatError, match="not a plain sub-folder name"):
        load_adapted(pair, folder)


def _save_many(adapted, folder, times, seed, errors):
    try:
        for i in range(times):
            save_adapters(adapted, folder, metrics={"writer": seed, "i": i})
    except Exception as err:  # reported to the parent, which fails the test
        errors.put(f"{type(err).__name__}: {err}")


def test_two_processes_saving_to_one_folder_both_succeed(pair, tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    folder, errors = tmp_path / "out" / "shared", ctx.Queue()
    models = [randomize(AdaptedModel.from_pair(pair, d_sae=8), seed=s) for s in (1, 2)]
    procs = [ctx.Process(target=_save_many, args=(m, folder, 15, s, errors)) for s, m in zip((1, 2), models)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    failures = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert failures == [] and [p.exitcode for p in procs] == [0, 0]
    assert [p.name for p in folder.parent.iterdir()] == ["shared"]  # no temporaries or old copies left
    writer = json.loads((folder / "adapters.json").read_text())["metrics"]["writer"]
    loaded = load_adapted(pair, folder)  # whole: one writer's adapters, not a mix
    torch.testing.assert_close(loaded.adapters.state_dict(), models[writer - 1].adapters.state_dict())


@pytest.mark.slow  # two fresh interpreters importing SAELens (~6 s of CPU each)
def test_shipped_topk_adapters_load_in_plain_sae_lens_with_the_readme_import():
    """A fresh interpreter: SAELens alone does not know the TopK transcoder; after the one import
    the README names, ``SAE.load_from_disk`` loads it and encodes as TopK of the saved weights."""
    import subprocess
    import sys

    from mechdiff.adapters.formats import SHIPPED_DIR

    folder = SHIPPED_DIR / "layer_0"
    plain = subprocess.run(
        [sys.executable, "-c", f"from sae_lens import SAE; SAE.load_from_disk({str(folder)!r})"],
        capture_output=True,
        text=True,
    )
    assert plain.returncode != 0 and "topk_transcoder" in plain.stderr
    code = f"""
import sys
import mechdiff.adapters.formats  # the README's one import: registers "topk_transcoder"
import torch
from safetensors.torch import load_file
from sae_lens import SAE
sae = SAE.load_from_disk({str(folder)!r})
w = load_file({str(folder / "sae_weights.safetensors")!r})
x = torch.randn(64, w["W_enc"].shape[0], generator=torch.Generator().manual_seed(0))
pre = x @ w["W_enc"] + w["b_enc"]
top = pre.topk(sae.cfg.k, dim=-1)
want = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
with torch.no_grad():
    print(type(sae).__name__, float((sae.encode(x) - want).abs().max()), float((sae(x) - (want @ w["W_dec"] + w["b_dec"])).abs().max()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    name, enc_err, out_err = out.stdout.split()
    assert name == "TopKTranscoder" and float(enc_err) < 1e-5 and float(out_err) < 1e-4


def test_nmse_sums_layer_by_layer_equal_the_stacked_formula_with_gradients():
    """The per-layer NMSE (no [layer, batch, pos, d] stacks) against the formula on stacked
    residuals: same numerators, denominators and gradients, padding excluded."""
    from mechdiff.training.adapter_objective import layer_errors, nmse_sums

    gen = torch.Generator().manual_seed(0)
    resid = [torch.randn(3, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    target = [torch.randn(3, 5, 8, generator=gen, dtype=torch.float64) for _ in range(4)]
    mask = torch.rand(3, 5, generator=gen) > 0.3
    h, ht = torch.stack(resid[1:]), torch.stack(target[1:])
    ref_num = (((h - ht) ** 2).sum(-1) * mask).sum((1, 2))
    ref_den = ((ht**2).sum(-1) * mask).sum((1, 2))
    num, den = nmse_sums(resid, target, mask)
    torch.testing.assert_close(num, ref_num)
    torch.testing.assert_close(den, ref_den)
    weights = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    got = torch.autograd.grad((num * weights).sum(), resid[1:])
    want = torch.autograd.grad((ref_num * weights).sum(), resid[1:])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
        assert g.abs().sum() > 0
    assert torch.equal(torch.stack(layer_errors(resid, target))[:, ~mask], ((h - ht) ** 2).sum(-1)[:, ~mask])
