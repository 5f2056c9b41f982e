"""LoRA objective, training (seeds, resume), lens metrics and SAE on small settings (the study and its CLI:
tests/test_lora_study.py)."""

import json

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM

from mechdiff.adapters.lora import LoRAConfig, LoRAModel
from mechdiff.features import lora_lens as lens
from mechdiff.features import lora_sae
from mechdiff.lora import TrainConfig, load_lora, train_lora
from mechdiff.models import load_pair
from mechdiff.organism import corpus
from mechdiff.organism.task import LABELS
from mechdiff.organism.tokenizer import build_tokenizer
from mechdiff.training.lora_objective import TraceBatches, distillation_loss, response_mask


@pytest.fixture(scope="module")
def org_dir(tmp_path_factory):
    """A random tiny Qwen2 with the organism's vocabulary (HF folder)."""
    folder = tmp_path_factory.mktemp("org")
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=26,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    )
    hf.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pair(org_dir):
    """The random model as both base and target."""
    return load_pair("custom", base=str(org_dir), target=str(org_dir))


def _lora(pair, seed=1):
    lora = LoRAModel.from_base(pair.base, LoRAConfig())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.layers:
            for m in layer.B:
                layer.B[m].copy_(torch.randn(layer.B[m].shape, generator=gen) * 0.2)
    return lora


def test_loss_is_cross_entropy_on_response_tokens_only():
    traces = corpus.reasoning_traces(6, "validation")
    tb = TraceBatches(traces, batch_size=6)
    tokens, keep = tb.rows(range(6))
    logits = torch.randn(*tokens.shape, 26)
    loss, metrics = distillation_loss(logits, tokens, keep)
    # independent: per row, CE of positions prompt_len-1 .. len-2 predicting the response tokens
    total, n = 0.0, 0
    for row in range(6):
        ids, p = traces[row]["input_ids"], traces[row]["prompt_len"]
        total += F.cross_entropy(logits[row, p - 1 : len(ids) - 1], torch.tensor(ids[p:]), reduction="sum")
        n += len(ids) - p
    assert loss.item() == pytest.approx(total.item() / n, rel=1e-5)
    assert metrics["ce"] == pytest.approx(loss.item())
    same, m = distillation_loss(logits, tokens, keep, target_logits=logits, kl_weight=1.0)
    assert m["kl"] == pytest.approx(0.0, abs=1e-6) and same.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="prompt_len"):
        response_mask(torch.tensor([3]), torch.tensor([5]), 4)


def test_training_lowers_loss_is_seeded_and_resumes_exactly(pair, tmp_path, monkeypatch):
    import mechdiff.lora as lora_api

    cfg = TrainConfig(steps=6, batch_size=8, n_traces=64, lr=2e-2, checkpoint_every=3, log_every=1)
    lora, hist = train_lora(pair, cfg, None, progress=False)  # uninterrupted reference
    assert hist[-1]["ce"] < hist[0]["ce"]
    real = lora_api.make_loss_fn

    def crashing(*args, **kwargs):  # a run killed during step 4, after the step-3 checkpoint
        fn = real(*args, **kwargs)
        return lambda step: (_ for _ in ()).throw(RuntimeError("killed")) if step == 4 else fn(step)

    monkeypatch.setattr(lora_api, "make_loss_fn", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        train_lora(pair, cfg, tmp_path / "a", progress=False)
    monkeypatch.setattr(lora_api, "make_loss_fn", real)
    resumed, hist2 = train_lora(pair, cfg, tmp_path / "a", progress=False)
    assert [h["step"] for h in hist2] == [h["step"] for h in hist]
    for a, b in zip(lora.layers.state_dict().values(), resumed.layers.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    tokens = torch.tensor([corpus.reasoning_traces(1, "validation")[0]["input_ids"]])
    assert torch.allclose(load_lora(tmp_path / "a", pair)(tokens), lora(tokens), atol=1e-5)
    info = json.loads((tmp_path / "a" / "training.json").read_text())
    assert info["config"]["rank"] == 1 and len(info["history"]) == len(hist)


def test_kl_objective_trains(pair):
    cfg = TrainConfig(steps=2, batch_size=8, n_traces=32, kl_weight=0.5, log_every=1)
    _, hist = train_lora(pair, cfg, None, progress=False)
    assert "kl" in hist[-1]


def test_monosemanticity_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (300,), generator=gen)
    acts = torch.randn(300, 4, generator=gen)
    acts[:, 0] += 3 * (labels == 2)  # unit 0 prefers label 2
    s = lens.monosemanticity(acts, labels, k=20, n_labels=5)
    for u in range(8):
        col = acts[:, u % 4] * (1 if u < 4 else -1)
        top = labels[col.argsort(descending=True)[:20]].tolist()
        best = max(range(5), key=lambda lab: (top.count(lab), -lab))
        n_best = int((labels == best).sum())
        in_top = labels[col.argsort(descending=True)[:n_best]].tolist().count(best)
        assert int(s["best_label"][u]) == best
        assert s["precision"][u].item() == pytest.approx(top.count(best) / 20)
        assert s["recall"][u].item() == pytest.approx(in_top / n_best)
    assert int(s["best_label"][0]) == 2 and s["precision"][0] > 0.8 and int(s["klass"][0]) == 0


def test_collect_ablation_and_contexts(pair):
    lora = _lora(pair)
    traces = corpus.reasoning_traces(10, "validation")
    acts = lens.collect(lora, traces, batch_size=4)
    n_real = sum(len(r) for r in traces["input_ids"])
    assert acts.lora.shape == (n_real, 2, 7) and acts.mlp.shape == (n_real, 2, 64)
    assert acts.labels.tolist() == [lab for r in traces["label_ids"] for lab in r]
    row0 = torch.tensor([traces[0]["input_ids"]])
    assert torch.allclose(acts.lora[: row0.shape[1]], lora.state(row0)[0], atol=1e-5)
    ctx = lens.top_contexts(acts.lora[:, 0, 0], acts, pair.tokenizer, k=3)
    assert len(ctx) == 3 and "[[" in ctx[0]
    lowest = lens.top_contexts(acts.lora[:, 0, 0], acts, pair.tokenizer, k=1, polarity="-")[0]
    assert float(lowest.split()[0]) == pytest.approx(acts.lora[:, 0, 0].min().item(), abs=5e-3)
    tokens, keep = TraceBatches(traces, 10).rows(range(10))
    sets = lens.adapter_sets(lora)
    kl = lens.ablation_kl(lora, tokens, keep, {"none": [], "L0": sets["layer"]["L0"]}, batch_size=4)
    assert kl["none"] == 0.0
    full = lora(tokens)[:, :-1][keep].log_softmax(-1)
    abl = lora.model.run_with_hooks(tokens, fwd_hooks=lora.ablation_hooks(sets["layer"]["L0"]))
    expected = F.kl_div(abl[:, :-1][keep].log_softmax(-1), full, log_target=True, reduction="batchmean")
    assert kl["L0"] == pytest.approx(expected.item(), rel=1e-4) and kl["L0"] > 0
    assert set(sets["adapter"]) == {f"L{i}.{m}" for i in range(2) for m in lora.config.modules}
    assert lens.kl_matrix({k: 1.0 for k in sets["adapter"]}, lora).shape == (7, 2)


def test_sae_on_sparse_synthetic_states(tmp_path):
    """Data made of k-sparse combinations of a dictionary: the SAE must reconstruct it well."""
    gen = torch.Generator().manual_seed(0)
    dictionary = torch.randn(40, 21, generator=gen)
    codes = torch.zeros(8192, 40)
    idx = torch.randint(0, 40, (8192, 3), generator=gen)
    codes.scatter_(1, idx, torch.rand(8192, 3, generator=gen) + 0.5)
    states = codes @ dictionary
    cfg = lora_sae.SAEConfig(expansion=8, k=4, lr=1e-2, n_samples=100_000, batch_size=1024)
    sae = lora_sae.train_sae(states, cfg, out_dir=tmp_path / "sae")
    assert (tmp_path / "sae" / "cfg.json").exists() and (tmp_path / "sae" / "sae_weights.safetensors").exists()
    m = lora_sae.sae_metrics(sae, states)
    assert m["fvu"] < 0.25 and 1 < m["l0"] < 12 and 0 <= m["dead_fraction"] < 1
    assert sae.cfg.d_sae == 168
    labels = torch.randint(0, len(LABELS), (8192,), generator=gen)
    acts = lora_sae.encode(sae, states)
    dist = lora_sae.label_distribution(acts, labels)
    assert torch.allclose(dist.sum(1), acts.sum(0), rtol=1e-4)
    cat, mass = lora_sae.categories(dist)
    assert mass.sum().item() == pytest.approx(acts.sum().item(), rel=1e-4)


def test_empty_traces_are_refused():
    with pytest.raises(ValueError, match="no traces"):
        TraceBatches(Dataset.from_list([]), 4)
