"""A LoRA from ``python -m mechdiff.lora train`` loads with ``peft.AutoPeftModelForCausalLM`` alone."""

import json
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM

from mechdiff.adapters.peft_format import base_reference, export_peft
from mechdiff.lora import __main__ as lora_cli
from mechdiff.lora import load_lora
from mechdiff.models import ORGANISM_DIR, load_pair

TOKENS = torch.tensor([[1, 5, 9, 12, 7, 20, 30, 4, 8, 9, 13, 6]])


@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(1)
    return load_pair("organism", device="cpu")


def test_the_trained_folder_loads_in_peft_offline_from_anywhere(pair, tmp_path, monkeypatch):
    out = tmp_path / "lora"
    lora_cli.main(["--device", "cpu", "--threads", "1", "train", "--out", str(out), "--rank", "1",
                   "--steps", "3", "--batch-size", "4", "--n-traces", "16", "--lr", "0.05", "--no-eval"])
    recorded = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(recorded).is_absolute() and Path(recorded) == (ORGANISM_DIR / "base").resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a relative base path would not resolve from here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    lora = load_lora(out, pair)  # mechdiff's hooked LoRA on the TransformerLens base
    tokens = TOKENS.clamp(max=pair.base.cfg.d_vocab - 1)
    with torch.no_grad():
        peft_logits = model(tokens).logits
        hooked = lora(tokens)
        base = pair.base(tokens)
    assert (hooked - base).abs().max() > 1e-3  # the LoRA changes the model
    torch.testing.assert_close(peft_logits, hooked, atol=1e-4, rtol=1e-4)


def test_base_reference_is_an_absolute_folder_or_the_given_name(pair, tmp_path, monkeypatch):
    assert base_reference(pair) == str((ORGANISM_DIR / "base").resolve())
    monkeypatch.chdir(ORGANISM_DIR)
    custom = type(pair)(pair.base, pair.target, pair.tokenizer, {"base_name": "base", "source": "local"})
    assert base_reference(custom) == str((ORGANISM_DIR / "base").resolve())
    hub = type(pair)(pair.base, pair.target, pair.tokenizer, {"base_name": "org/model", "source": "hub"})
    assert base_reference(hub) == "org/model"
    lora = load_lora(ORGANISM_DIR.parent.parent / "adapters" / "shipped" / "lora_r1", pair)
    folder = export_peft(lora, tmp_path / "x", base_model_name_or_path="base")  # relative -> absolute
    recorded = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((ORGANISM_DIR / "base").resolve())
