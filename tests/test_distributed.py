"""Data-parallel training and sharded generation with real gloo process groups (2 CPU ranks).

One spawn (two fresh processes) runs every distributed check and returns its results; the
single-process references are computed here, in the test process.
"""

import os

import pytest
import torch
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM

from mechdiff import distributed
from mechdiff.evaluation import sharded
from mechdiff.generation import generate
from mechdiff.models import ModelPair, hooked_from_hf
from mechdiff.training.batches import step_indices
from mechdiff.training.loop import LoopConfig, train

GLOBAL_BATCH = 8


class _Stop(Exception):
    pass


# ----------------------------------------------------------------------------- problems


def _generic(init_seed=0, out_dir=None, stop_at=None, steps=12, on_step=None):
    """A token-masked regression shaped like the real objectives (variable tokens per row)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 10, 4, generator=gen)
    y = (x[..., :1] * x[..., 1:2]).sin()
    mask = torch.arange(10) < torch.randint(2, 11, (64, 1), generator=gen)
    torch.manual_seed(init_seed)  # ranks start differently: the loop must broadcast rank 0's
    module = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def loss_fn(step):
        if step == stop_at:
            raise _Stop
        rows = step_indices(len(x), GLOBAL_BATCH, step, seed=1)
        lo, hi = distributed.shard_bounds(len(rows))
        noise = 0.01 * torch.randn(len(rows), 10, 1)[lo:hi]  # global-shaped draw, then sliced
        r, m = rows[lo:hi], mask[rows[lo:hi]]
        err = ((module(x[r]) - y[r] - noise) ** 2).squeeze(-1)
        loss = (err * m).sum() / m.sum()
        return distributed.as_global_mean(loss, m.sum()), {"mse": loss.item()}

    cfg = LoopConfig(steps=steps, lr=1e-2, log_every=4, checkpoint_every=4, out_dir=out_dir, progress=False)
    hook = (lambda step: on_step(module, step)) if on_step else None
    history = train(module, loss_fn, cfg, on_step=hook)
    return {k: v.clone() for k, v in module.state_dict().items()}, history


def _rank_local_edit(module, step):
    """An on_step hook that (like resampling from rank-local statistics) differs between ranks."""
    if step == 5:
        with torch.no_grad():
            module[0].bias += 0.1 * (1 + distributed.rank())


def _tiny_hooked(seed):
    torch.manual_seed(seed)
    hf = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=32,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    return hooked_from_hf(hf.eval(), device="cpu")


def _traces(n=32, seed=3):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(6, 16, (n,), generator=gen).tolist()
    ids = [torch.randint(4, 32, (k,), generator=gen).tolist() for k in lengths]
    prompt_len = torch.randint(2, 5, (n,), generator=gen).tolist()
    return Dataset.from_dict({"input_ids": ids, "prompt_len": prompt_len})


class _Recorded:
    """A dataset / batches wrapper that records the rows each step asks for (which shows that a
    rank takes only its shard: repeating the whole batch on every rank would match too)."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __len__(self):
        return len(self.inner)

    def __getattr__(self, name):  # batch_size, seed, ... of TraceBatches
        return getattr(self.inner, name)

    def __getitem__(self, rows):  # a Dataset, as train_adapters indexes it
        self.seen.append(list(rows))
        return self.inner[rows]

    def rows(self, rows):  # TraceBatches, as make_loss_fn reads it
        self.seen.append(list(rows))
        return self.inner.rows(rows)


def _lora(steps=6):
    from mechdiff.adapters.lora import LoRAConfig, LoRAModel
    from mechdiff.training.lora_objective import TraceBatches, make_loss_fn

    base, target = _tiny_hooked(0), _tiny_hooked(1)
    lora = LoRAModel.from_base(base, LoRAConfig(rank=1))
    batches = _Recorded(TraceBatches(_traces(), batch_size=GLOBAL_BATCH, seed=0))
    loss_fn = make_loss_fn(lora, batches, target=target, kl_weight=0.5)  # the library's sharding
    history = train(lora.layers, loss_fn, LoopConfig(steps=steps, lr=1e-2, log_every=3, progress=False))
    return {k: v.clone() for k, v in lora.layers.state_dict().items()}, history, batches.seen


def _adapters(steps=6):
    from mechdiff.training.adapter_objective import AdapterRecipe, LossWeights, train_adapters

    pair = ModelPair(_tiny_hooked(0), _tiny_hooked(1), None)
    # Every part weighted: KL, bridges and L1 are token means, NMSE and AuxK ratios of sums; all
    # are exact under sharding. dead_window=2 gives AuxK dead features within the few steps.
    recipe = AdapterRecipe(
        d_sae=64,
        k=4,
        steps=steps,
        batch_size=GLOBAL_BATCH,
        lr=1e-2,
        dead_window=2,
        weights=LossWeights(l1=1e-2),
        log_every=3,
        progress=False,
    )
    traces = _Recorded(_traces())
    adapted, history = train_adapters(pair, recipe, traces=traces, val_traces=_traces(8, seed=4), pad_id=0)
    return {k: v.clone() for k, v in adapted.adapters.state_dict().items()}, history, traces.seen


def _prompts():
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(4, 32, (int(k),), generator=gen).tolist() for k in torch.randint(1, 9, (13,), generator=gen)]


def _generations(model, temperature=0.0):
    kw = dict(eos_token_id=3, pad_token_id=1, batch_size=3)
    return sharded.generate(model, _prompts(), 7, temperature=temperature, seed=4, **kw)


# ----------------------------------------------------------------------------- the ranks


def _worker(tmp):
    rank = distributed.rank()
    out = {"info": distributed.info(), "shard": distributed.shard(list(range(7)))}
    out["generic"] = _generic(init_seed=rank)
    with pytest.raises(_Stop):
        _generic(init_seed=rank, out_dir=os.path.join(tmp, "ckpt"), stop_at=6)
    out["resumed"] = _generic(init_seed=100 + rank, out_dir=os.path.join(tmp, "ckpt"))
    out["resynced"] = _generic(on_step=_rank_local_edit)[0]
    out["lora"] = _lora()
    out["adapters"] = _adapters()
    model = _tiny_hooked(0)
    out["greedy"], out["sampled"] = _generations(model), _generations(model, temperature=1.0)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    return distributed.spawn(_worker, 2, str(tmp)), tmp


# ----------------------------------------------------------------------------- tests


def _close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def test_group_and_sharding(ranks):
    results, _ = ranks
    assert [r["info"].rank for r in results] == [0, 1]
    assert {r["info"].backend for r in results} == {"gloo"}
    assert results[0]["shard"] + results[1]["shard"] == list(range(7))
    assert distributed.shard([1, 2]) == [1, 2] and distributed.world_size() == 1


def test_ddp_matches_single_process(ranks):
    results, _ = ranks
    params, history = _generic()
    for r in results:  # both ranks end with the single-process weights
        _close(r["generic"][0], params)
    assert [h["step"] for h in results[0]["generic"][1]] == [h["step"] for h in history]
    assert results[0]["generic"][1][-1]["loss"] == pytest.approx(history[-1]["loss"], rel=1e-5)


def test_ddp_resume_and_rank0_checkpoints(ranks):
    results, tmp = ranks
    _close(results[0]["resumed"][0], results[0]["generic"][0])
    _close(results[1]["resumed"][0], results[0]["generic"][0])
    assert sorted(p.name for p in (tmp / "ckpt").iterdir()) == ["checkpoint"]


def test_rank_local_on_step_edits_are_resynced(ranks):
    results, _ = ranks
    _close(results[0]["resynced"], results[1]["resynced"], atol=0)
    assert not torch.equal(results[0]["resynced"]["0.bias"], results[0]["generic"][0]["0.bias"])


def _check_sharded_run(results, single, loss_keys):
    """Both ranks end with the single-process weights and log its loss and parts; each step, the
    ranks read disjoint halves of the single process's global batch."""
    params, history, seen = single
    assert set(loss_keys) <= history[-1].keys()
    for r in results:
        _close(r[0], params)
    for got, want in zip(results[0][1], history, strict=True):
        assert got.keys() == want.keys()
        for key in set(loss_keys) & want.keys():  # val_* only in the last record
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    seen0, seen1 = (r[2] for r in results)
    assert len(seen0) == len(seen1) == len(seen) == history[-1]["step"]  # one read per step
    for rows0, rows1, rows in zip(seen0, seen1, seen, strict=True):
        assert rows0 + rows1 == rows and len(rows0) == len(rows) // 2


def test_ddp_lora_objective(ranks):
    _check_sharded_run([r["lora"] for r in ranks[0]], _lora(), ("loss", "grad_norm"))


def test_ddp_adapter_objective(ranks):
    single = _adapters()
    assert all("aux" in record for record in single[1])  # AuxK was on (dead features existed)
    keys = (
        "loss",
        "grad_norm",
        "kl",
        "nmse",
        "l1",
        "aux",
        "bridge_a2t",
        "bridge_t2a",
        "l0",
        "dead",
        "val_kl",
        "val_nmse",
    )
    _check_sharded_run([r["adapters"] for r in ranks[0]], single, keys)


def test_sharded_generation_matches_generate(ranks):
    results, _ = ranks
    model = _tiny_hooked(0)
    reference = generate(model, _prompts(), 7, eos_token_id=3, pad_token_id=1, batch_size=3)
    assert results[0]["greedy"] == results[1]["greedy"] == reference
    assert _generations(model) == reference  # one process: the plain path
    # sampling: the same samples whatever the number of ranks
    assert results[0]["sampled"] == results[1]["sampled"] == _generations(model, temperature=1.0)


def test_clear_errors(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="are not set: launch with `torchrun"):
        distributed.init()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'nccl' needs a CUDA build"):
            distributed.init("nccl")
    with pytest.raises(ValueError, match="backend must be"):
        distributed.init("mpi")
    with pytest.raises(ValueError, match="cannot be split over 2"):
        distributed.shard_bounds(1, 0, 2)
    with pytest.raises(RuntimeError, match="needs a process group"):
        train(torch.nn.Linear(1, 1), lambda s: (torch.zeros(()), {}), LoopConfig(steps=1, lr=1.0), distributed=True)
