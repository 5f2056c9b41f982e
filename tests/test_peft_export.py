"""A LoRA from ``python -m mechdiff.lora train`` loads with ``peft.AutoPeftModelForCausalLM`` alone."""

import json
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM

from mechdiff.adapters.peft_format import REPO, base_reference, export_peft, load_peft, resolve_base
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
    lora_cli.main(
        [
            "--device",
            "cpu",
            "--threads",
            "1",
            "train",
            "--out",
            str(out),
            "--rank",
            "1",
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--n-traces",
            "16",
            "--lr",
            "0.05",
            "--no-eval",
        ]
    )
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


SHIPPED_LORAS = sorted(
    p.parent
    for p in [
        *(REPO / "mechdiff" / "adapters" / "shipped").glob("lora_r*/adapter_config.json"),
        *(REPO / "mechdiff" / "organism").glob("**/lora_r*/adapter_config.json"),
    ]
)


def _pair_for(folder: Path, pair):
    """The pair a shipped LoRA adapts: the shipped organism's, or the family organism beside it."""
    base = resolve_base(folder)
    if Path(base) == (ORGANISM_DIR / "base").resolve():
        return pair
    return load_pair("custom", base=base, target=str(Path(base).parent / "target"), device="cpu")


def test_every_shipped_lora_records_a_base_folder_relative_to_the_repository_root():
    assert {p.name for p in SHIPPED_LORAS} >= {"lora_r1", "lora_r2", "lora_r4", "lora_r8"} and len(SHIPPED_LORAS) >= 5
    for folder in SHIPPED_LORAS:
        recorded = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        base = REPO / recorded
        assert not Path(recorded).is_absolute(), folder
        # an HF model folder transformers loads: config, safetensors weights, tokenizer
        assert all((base / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json")), folder
        assert not list(base.glob("*.bin")), folder  # no pickled weights


@pytest.mark.parametrize("folder", SHIPPED_LORAS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_lora_loads_in_peft_offline_and_matches_mechdiffs_lora(folder, pair, tmp_path, monkeypatch):
    """From the repository root (where the README's commands run) with peft's own
    AutoPeftModelForCausalLM, and from anywhere else with load_peft: the logits are mechdiff's."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    own = _pair_for(folder, pair)
    lora = load_lora(folder, own)
    tokens = TOKENS.clamp(max=own.base.cfg.d_vocab - 1)
    monkeypatch.chdir(REPO)
    by_peft = AutoPeftModelForCausalLM.from_pretrained(str(folder.relative_to(REPO))).eval()
    monkeypatch.chdir(tmp_path)  # the relative base path does not resolve from here
    with pytest.raises(Exception):  # noqa: B017 - transformers raises OSError or a hub error offline
        AutoPeftModelForCausalLM.from_pretrained(str(folder))
    by_load_peft = load_peft(folder)
    with torch.no_grad():
        hooked, base = lora(tokens), own.base(tokens)
        logits = [m(tokens).logits for m in (by_peft, by_load_peft)]
    assert (hooked - base).abs().max() > 1e-3, "the LoRA changes the model"
    for got in logits:  # float32 throughout; logits of magnitude ~10
        torch.testing.assert_close(got, hooked, atol=1e-4, rtol=1e-4)


def test_resolve_base_keeps_absolute_paths_and_hub_names(tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    for recorded in (str(ORGANISM_DIR / "base"), "org/model"):
        (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": recorded}))
        assert resolve_base(folder) == recorded
    (folder / "adapter_config.json").write_text(json.dumps({"r": 1}))
    with pytest.raises(ValueError, match="base_model_name_or_path is missing"):
        resolve_base(folder)
