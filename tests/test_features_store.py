"""The activation store: exact against brute force, resumable, bounded, generic over hooks."""

import math

import pytest
import torch

from attribution.synthetic import tiny_adapted
from mechdiff.adapters.lora import LoRAConfig, LoRAModel
from mechdiff.features.classify import decoder_directions, logit_lens, lora_directions
from mechdiff.features.store import (
    REGIONS,
    ActivationStore,
    StoreConfig,
    StoreMismatch,
    annotate,
    build_store,
)

OPEN, CLOSE = 20, 21  # token ids that delimit the thinking span in the synthetic corpus
LABELS = ("a", "b", "c")


def make_corpus(n=11, seed=0):
    """Rows of varying length: <bos>, a prompt, then (usually) OPEN ... CLOSE answer."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(n):
        length = int(torch.randint(6, 18, (1,), generator=gen))
        ids = [2] + torch.randint(4, 20, (length - 1,), generator=gen).tolist()
        prompt_len = 3
        if r % 4 != 3:  # some rows have no thinking span
            ids[prompt_len] = OPEN
            ids[min(length - 2, prompt_len + 2 + r % 5)] = CLOSE
        labels = torch.randint(0, len(LABELS), (length,), generator=gen).tolist()
        rows.append({"input_ids": ids, "prompt_len": prompt_len, "label_ids": labels})
    return rows


@pytest.fixture(scope="module")
def adapted():
    return tiny_adapted(seed=3, density=0.2)


def names(adapted):
    return [adapted.acts_name(layer) for layer in range(adapted.config.n_layers)]


def config(**kw):
    base = dict(
        top_k=4,
        n_random=3,
        before=3,
        after=2,
        batch_size=3,
        chunk_batches=2,
        pos_bins=4,
        act_bins=8,
        feature_group=20,
        think_ids=(OPEN, CLOSE),
        label_names=LABELS,
        lens_k=3,
    )
    return StoreConfig(**{**base, **kw})


def brute_force(adapted, rows, cfg):
    """Each row alone (no padding), every statistic by plain loops."""
    per_row = []
    for row in rows:
        _, cache = adapted.model.run_with_cache(torch.tensor([row["input_ids"]]))
        acts = torch.cat([cache[n][0] for n in names(adapted)], -1).float()  # [pos F]
        acts[0] = float("-inf")  # skip_first
        per_row.append(acts)
    n_feat = per_row[0].shape[1]
    seq_max = torch.stack([a.max(0).values for a in per_row])  # [rows F]
    fire = [a > cfg.threshold for a in per_row]
    n_fire = sum(f.sum(0) for f in fire)
    region_count = torch.zeros(n_feat, len(REGIONS))
    pos_hist = torch.zeros(n_feat, cfg.pos_bins)
    label_count = torch.zeros(n_feat, len(LABELS))
    for row, f in zip(rows, fire):
        ids = row["input_ids"]
        open_p = ids.index(OPEN) if OPEN in ids else None
        close_p = None
        if open_p is not None:
            close_p = next((j for j in range(open_p + 1, len(ids)) if ids[j] == CLOSE), len(ids) - 1)
        for p in range(1, len(ids)):
            if p < row["prompt_len"]:
                region = 0
            elif open_p is not None and open_p <= p <= close_p:
                region = 1
                rel = (p - open_p) / max(1, close_p - open_p)
                pos_hist[:, min(cfg.pos_bins - 1, int(math.floor(rel * cfg.pos_bins)))] += f[p].float()
            else:
                region = 2
            region_count[:, region] += f[p].float()
            label_count[:, row["label_ids"][p]] += f[p].float()
    return per_row, seq_max, n_fire, region_count, pos_hist, label_count


def test_store_matches_brute_force(adapted):
    rows, cfg = make_corpus(), config()
    store = build_store(adapted.model, rows, names(adapted), config=cfg, pad_id=1, decoder=decoder_directions(adapted))
    per_row, seq_max, n_fire, region_count, pos_hist, label_count = brute_force(adapted, rows, cfg)
    assert store.n_features == 2 * adapted.config.d_sae
    assert store.n_tokens == sum(len(r["input_ids"]) - 1 for r in rows)
    assert torch.equal(store.n_fire, n_fire)
    assert torch.allclose(store.region_count, region_count)
    assert torch.allclose(store.pos_hist, pos_hist)
    assert torch.allclose(store.label_count, label_count)
    assert torch.equal(store.act_hist.sum(1), n_fire)  # every firing token lands in one bin
    all_acts = torch.cat(per_row)
    assert torch.allclose(store.act_max, all_acts.max(0).values, atol=1e-6)
    firing = all_acts.clamp(min=0)
    assert torch.allclose(store.act_sum.float(), firing.sum(0), atol=1e-4)
    # top-k sequences: values and rows equal the brute force
    fired = seq_max > cfg.threshold
    for f in range(store.n_features):
        want = seq_max[:, f][fired[:, f]].sort(descending=True)
        k = min(cfg.top_k, len(want.values))
        assert torch.allclose(store.top_values[f, :k], want.values[:k], atol=1e-6), f
        want_rows = set(torch.nonzero(fired[:, f])[:, 0][want.indices[:k]].tolist())
        assert set(store.top_row[f, :k].tolist()) == want_rows
        assert (store.top_row[f, k:] == -1).all()
    # one example's window: tokens and the feature's activations around the max token
    f = int(store.n_fire.argmax())
    ex = store.examples(f, "top")[0]
    ids, acts = rows[ex["row"]]["input_ids"], per_row[ex["row"]][:, f]
    lo = max(0, ex["pos"] - cfg.before)
    assert ex["tokens"] == ids[lo : ex["pos"] + cfg.after + 1]
    assert ex["tokens"][ex["centre"]] == ids[ex["pos"]]
    want_acts = acts[lo : ex["pos"] + cfg.after + 1].clamp(min=0).nan_to_num(neginf=0.0)
    assert torch.allclose(torch.tensor(ex["acts"]).float(), want_acts, atol=1e-6)
    assert ex["label"] == rows[ex["row"]]["label_ids"][ex["pos"]]
    # random examples: distinct firing tokens, as many as possible up to n_random
    for f in range(0, store.n_features, 7):
        exs = store.examples(f, "rand")
        assert len(exs) == min(cfg.n_random, int(n_fire[f]))
        assert len({(e["row"], e["pos"]) for e in exs}) == len(exs)
        for e in exs:
            assert e["value"] > 0
            assert math.isclose(e["value"], float(per_row[e["row"]][e["pos"], f]), abs_tol=1e-6)
    # logit lens = the direction through ln_final.w and the demeaned unembedding
    lens = logit_lens(adapted.model, decoder_directions(adapted)[:5], k=3)
    assert torch.equal(store.lens_top_ids[:5], lens["lens_top_ids"])


def test_resume_after_interruption_equals_uninterrupted(adapted, tmp_path):
    rows, cfg = make_corpus(13, seed=1), config()
    full = build_store(adapted.model, rows, names(adapted), config=cfg, pad_id=1)
    calls = []

    def crash(store):
        calls.append(store.rows_done)
        if len(calls) == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_store(adapted.model, rows, names(adapted), tmp_path / "s", config=cfg, pad_id=1, on_chunk=crash)
    assert ActivationStore.load(tmp_path / "s").rows_done == cfg.batch_size * cfg.chunk_batches < len(rows)
    resumed = build_store(adapted.model, rows, names(adapted), tmp_path / "s", config=cfg, pad_id=1, on_chunk=crash)
    assert calls[1:] == [12, 13]  # only the remaining chunks ran
    loaded = ActivationStore.load(tmp_path / "s")
    for name, tensor in full.t.items():
        assert torch.equal(resumed.t[name].nan_to_num(), tensor.nan_to_num()), name  # bitwise
        assert torch.equal(loaded.t[name].nan_to_num(), tensor.nan_to_num()), name
    assert loaded.n_tokens == full.n_tokens and loaded.hook_names == full.hook_names
    with pytest.raises(StoreMismatch):  # another configuration is not silently mixed in
        build_store(adapted.model, rows, names(adapted), tmp_path / "s", config=config(top_k=5), pad_id=1)


def test_memory_is_bounded_by_the_config(adapted):
    small = build_store(adapted.model, make_corpus(4), names(adapted), config=config(), pad_id=1)
    large = build_store(adapted.model, make_corpus(12), names(adapted), config=config(), pad_id=1)
    for name in small.t:
        assert small.t[name].shape == large.t[name].shape, name


def test_reservoir_is_uniform():
    """Bottom-k of seeded random keys across batches: every firing token equally likely."""
    n_tok, picks = 12, torch.zeros(12)
    for seed in range(300):
        cfg = StoreConfig(n_random=3, top_k=1, before=0, after=0, seed=seed, skip_first=False)
        store = ActivationStore(["h"], [1], cfg)
        for b in range(3):  # three batches of one row of four tokens
            tokens = torch.arange(4)[None] + 4 * b
            mask = torch.ones(1, 4, dtype=torch.bool)
            ann = annotate(tokens, mask, torch.tensor([0]), None, None, cfg.pos_bins)
            store.update(tokens, mask, ann, [torch.rand(1, 4, 1) + 0.1], b, b)
        picks[store.rand_tokens[0, :, 0]] += 1
    share = picks / 300
    assert torch.allclose(share, torch.full((n_tok,), 3 / n_tok), atol=0.09), share


def test_annotate_regions_and_positions():
    tokens = torch.tensor([[2, 5, 7, 6, 6, 8, 9, 0], [2, 5, 5, 6, 9, 9, 0, 0]])
    mask = tokens != 0
    ann = annotate(tokens, mask, torch.tensor([2, 2]), None, (7, 8), pos_bins=4)
    assert ann["region"].tolist() == [[0, 0, 1, 1, 1, 1, 2, -1], [0, 0, 2, 2, 2, 2, -1, -1]]
    assert ann["pos_bin"].tolist()[0] == [-1, -1, 0, 1, 2, 3, -1, -1]


def test_lora_state_store_and_names(tiny_model_dir):
    from mechdiff.models import load_hooked

    base = load_hooked(tiny_model_dir("base"), dtype="float32", device="cpu")
    lora = LoRAModel.from_base(base, LoRAConfig(rank=1))
    with torch.no_grad():
        for layer in lora.layers:
            for m in layer.B:
                layer.B[m].normal_(0, 0.5)
    rows = [[2, *torch.randint(4, 60, (9,)).tolist()] for _ in range(5)]
    store = build_store(
        lora.model,
        rows,
        lora.act_names(),
        config=StoreConfig(top_k=2, batch_size=2),
        decoder=lora_directions(lora),
        pad_id=1,
    )
    assert store.n_features == 2 * 7
    assert store.name(0) == "L0.q" and store.name(13) == "L1.down"
    assert store.index("blocks.1.lora.hook_down_act", 0) == 13
    assert (store.lens_top_ids[0] == -1).all() and (store.lens_top_ids[13] >= 0).all()  # down: residual
    state = lora.state(torch.tensor(rows))[:, 1:].reshape(-1, 14)
    assert torch.allclose(store.act_max, state.max(0).values, atol=1e-5)
    with pytest.raises(ValueError, match="no hook points"):
        build_store(lora.model, rows, ["blocks.9.nothing"])


def test_names_moved_to_store_statistics_still_import_from_store():
    from mechdiff.features import store, store_statistics

    for name in ("REGIONS", "StoreConfig", "annotate"):
        assert getattr(store, name) is getattr(store_statistics, name)
    assert sorted(n for n in store.__all__ if not hasattr(store, n)) == []
