"""Adapters and LoRAs follow their model's dtype and device: a bfloat16 organism pair on the CPU,
and a model on the 'meta' device (no GPU here: 'meta' shows where parameters are created)."""

import importlib
import json

import pytest
import torch
from conftest import make_tiny_hf

from mechdiff.adapters.formats import AdapterFormatError, load_adapted
from mechdiff.adapters.lora import LoRAConfig, LoRAModel
from mechdiff.adapters.peft_format import export_peft, import_peft
from mechdiff.adapters.transcoder import AdaptedModel, AdapterConfig
from mechdiff.models import hooked_from_hf, load_pair
from mechdiff.organism import corpus
from mechdiff.padding import pad
from mechdiff.training.adapter_objective import AdapterObjective, LossWeights
from mechdiff.training.lora_objective import TraceBatches, make_loss_fn

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def pairs():
    """The organism pair in float32 and in bfloat16 (the same weights, rounded)."""
    return load_pair("organism", device="cpu"), load_pair("organism", dtype="bfloat16", device="cpu")


@pytest.fixture(scope="module")
def batch():
    return pad(corpus.reasoning_traces(8, "validation")["input_ids"], 0, side="right")


def assert_bf16_close(model32, model16, tokens, mask):
    """The bfloat16 model's next-token distributions are the float32 ones to bfloat16 precision.

    Calibrated on the plain organism base, bf16 against fp32 on this batch: mean KL 4e-4, max KL
    0.04, largest probability change 0.13 (near-ties between digits); the bounds leave ~2x room.
    """
    with torch.no_grad():
        logits = model16(tokens, attention_mask=mask.long())
        assert logits.dtype == BF16
        lp32 = model32(tokens, attention_mask=mask.long()).log_softmax(-1)[mask]
        lp16 = logits.float().log_softmax(-1)[mask]
    kl = (lp32.exp() * (lp32 - lp16)).sum(-1)
    assert kl.mean() < 1e-3 and kl.max() < 0.1, (kl.mean(), kl.max())
    torch.testing.assert_close(lp16.exp(), lp32.exp(), rtol=0, atol=0.2)


def dtypes_and_devices(module):
    return {(p.dtype, p.device.type) for p in module.parameters()}


def test_shipped_adapters_load_in_bf16_and_match_fp32(pairs, batch):
    pair32, pair16 = pairs
    adapted32, adapted16 = load_adapted(pair32), load_adapted(pair16)  # fingerprint passes in bf16
    assert dtypes_and_devices(adapted16.adapters) == {(BF16, "cpu")}
    assert dtypes_and_devices(adapted16.model) == {(BF16, "cpu")}
    for a32, a16 in zip(adapted32.adapters, adapted16.adapters, strict=True):
        # the stored (float32) weights, rounded to bf16
        torch.testing.assert_close(a16.W_dec, a32.W_dec.to(BF16), rtol=0, atol=0)
    assert_bf16_close(adapted32.model, adapted16.model, *batch)


def test_bf16_fingerprint_still_refuses_other_weights():
    other = load_pair("organism", dtype="bfloat16", device="cpu")
    with torch.no_grad():
        other.target.blocks[0].ln1.w.mul_(1.05)  # far beyond bf16 rounding
    with pytest.raises(AdapterFormatError, match="trained for other weights"):
        load_adapted(other)


def test_fresh_adapters_take_the_pair_dtype_and_train(pairs, batch):
    pair32, pair16 = pairs
    # ReLU: TopK's selection is discontinuous, so bf16 rounding may swap features (not compared)
    torch.manual_seed(0)
    adapted32 = AdaptedModel.from_pair(pair32, d_sae=32)
    torch.manual_seed(0)
    adapted16 = AdaptedModel.from_pair(pair16, d_sae=32)
    assert dtypes_and_devices(adapted16.adapters) == {(BF16, "cpu")}
    with torch.no_grad():  # the same non-zero decoders in both (fresh ones add nothing)
        for a32, a16 in zip(adapted32.adapters, adapted16.adapters, strict=True):
            torch.testing.assert_close(a16.W_enc, a32.W_enc.to(BF16), rtol=0, atol=0)  # same seeded init
            a32.W_dec.copy_(0.02 * torch.randn(a32.W_dec.shape).to(BF16))
            a16.W_dec.copy_(a32.W_dec)
    assert_bf16_close(adapted32.model, adapted16.model, *batch)
    loss, parts, _ = AdapterObjective(adapted16, pair16.target, LossWeights(l1=1e-3))(*batch)
    loss.backward()
    assert torch.isfinite(loss) and parts["kl"] > 0
    assert {p.grad.dtype for p in adapted16.adapters.parameters()} == {BF16}


def test_float32_adapters_on_a_bf16_model(pairs, batch):
    """``dtype=float32``: full-precision adapter weights (e.g. for training) on a bf16 model."""
    _, pair16 = pairs
    adapted = AdaptedModel.from_pair(pair16, d_sae=16, dtype=torch.float32)
    assert dtypes_and_devices(adapted.adapters) == {(torch.float32, "cpu")}
    with torch.no_grad():
        assert adapted.model(batch[0]).dtype == BF16


def _lora_pair(pair32, pair16):
    lora32 = LoRAModel.from_base(pair32.base, LoRAConfig(rank=2))
    lora16 = LoRAModel.from_base(pair16.base, LoRAConfig(rank=2))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 at init: give both the same non-zero update
        for l32, l16 in zip(lora32.layers, lora16.layers, strict=True):
            for m in l32.modules_:
                l32.B[m].copy_((0.02 * torch.randn(l32.B[m].shape, generator=gen)).to(BF16))
                l16.B[m].copy_(l32.B[m])
                torch.testing.assert_close(l16.A[m], l32.A[m].to(BF16), rtol=0, atol=0)  # same seeded init
    return lora32, lora16


def test_lora_takes_the_base_dtype_matches_fp32_and_trains(pairs, batch):
    pair32, pair16 = pairs
    lora32, lora16 = _lora_pair(pair32, pair16)
    assert dtypes_and_devices(lora16.layers) == {(BF16, "cpu")}
    assert_bf16_close(lora32.model, lora16.model, *batch)
    batches = TraceBatches(corpus.reasoning_traces(8, "validation"), batch_size=4)
    loss, metrics = make_loss_fn(lora16, batches)(0)
    loss.backward()
    assert torch.isfinite(loss) and metrics["ce"] > 0
    assert {p.grad.dtype for p in lora16.layers.parameters()} == {BF16}


def test_peft_lora_loads_onto_a_bf16_base(pairs, batch, tmp_path):
    pair32, pair16 = pairs
    lora32, lora16 = _lora_pair(pair32, pair16)
    export_peft(lora32, tmp_path / "lora")
    loaded = import_peft(tmp_path / "lora", pair16.base)
    assert dtypes_and_devices(loaded.layers) == {(BF16, "cpu")}
    assert_bf16_close(lora32.model, loaded.model, *batch)


def test_parameters_are_created_on_the_model_device():
    """A model on the 'meta' device stands in for a GPU: every adapter parameter follows it."""
    model = hooked_from_hf(make_tiny_hf(), device="meta", dtype="bfloat16")
    adapted = AdaptedModel(model, AdapterConfig(d_model=64, d_sae=16, n_layers=2))
    assert dtypes_and_devices(adapted.adapters) == {(BF16, "meta")}
    lora = LoRAModel.from_base(model, LoRAConfig(rank=1))
    assert dtypes_and_devices(lora.layers) == {(BF16, "meta")}


# ----------------------------------------------------------------------------- command lines

CLIS = [  # (module, arguments that are valid but for --dtype)
    ("mechdiff.lora.__main__", []),
    ("mechdiff.adapters.__main__", ["train", "--out", "OUT"]),
    ("mechdiff.adapters.__main__", ["eval"]),
    ("mechdiff.adapters.__main__", ["sweep", "--l1", "0.1"]),
    ("attribution.__main__", []),
    ("benchmarks.attribution", []),
    ("benchmarks.adapters", []),
    ("benchmarks.lora", []),
    ("benchmarks.generation", []),
]  # fmt: skip  (mechdiff.organism eval still takes --dtype as free text: the lead's file)


@pytest.mark.parametrize("module,args", CLIS, ids=[" ".join([m, *a]) for m, a in CLIS])
def test_every_cli_refuses_an_unknown_dtype_before_any_work(module, args, capsys, tmp_path):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main([*args, "--dtype", "float8"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--dtype: invalid choice: 'float8'" in err and "bfloat16" in err
    assert list(tmp_path.iterdir()) == []


def test_adapters_cli_evaluates_in_bf16(monkeypatch, capsys):
    """``python -m mechdiff.adapters eval --dtype bfloat16``: the shipped adapters on a bf16 pair."""
    from mechdiff import models
    from mechdiff.adapters.__main__ import main

    loaded, load_pair_ = [], models.load_pair

    def recording_load_pair(*args, **kwargs):
        loaded.append(load_pair_(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(models, "load_pair", recording_load_pair)
    main(["eval", "--device", "cpu", "--dtype", "bfloat16", "--n-eval-traces", "8", "--n-problems", "0", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert [p.meta["dtype"] for p in loaded] == ["bfloat16"]
    assert report["adapted"]["kl_to_target"] < 0.05 and report["adapted"]["mean_fve"] > 0.9
