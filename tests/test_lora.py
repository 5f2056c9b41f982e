"""LoRA through hooks: init, exact equality with merged weights, hook order, PEFT interop."""

import json
import math

import pytest
import torch
from conftest import make_tiny_hf, make_tiny_tokenizer
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from mechdiff.adapters.lora import HF_PROJ, MODULES, LoRAConfig, LoRAModel, merge
from mechdiff.adapters.peft_format import export_peft, import_peft
from mechdiff.generation import generate
from mechdiff.hf_conversion import hooked_to_hf
from mechdiff.models import hooked_from_hf


@pytest.fixture(autouse=True)
def no_grad_one_thread():
    """Tiny models: one thread is as fast, and immune to oversubscribed cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(before)


def _base(arch="qwen2", **kw):
    return hooked_from_hf(make_tiny_hf(arch, **kw), make_tiny_tokenizer(), device="cpu")


def _random_lora(base, rank=1, seed=1, **kw):
    lora = LoRAModel.from_base(base, LoRAConfig(rank=rank, **kw))
    gen = torch.Generator().manual_seed(seed)
    for layer in lora.layers:
        for m in layer.B:
            layer.B[m].copy_(torch.randn(layer.B[m].shape, generator=gen) * 0.05)
    return lora


def _merged_hf(lora, base):
    """HF model with W + scale * B @ A written into the weights by hand (no TL hooks involved)."""
    hf = hooked_to_hf(base)
    for L, layer in enumerate(lora.layers):
        for m in lora.config.modules:
            proj = hf.get_submodule(f"model.layers.{L}.{HF_PROJ[m]}")
            proj.weight += lora.config.scale * layer.B[m] @ layer.A[m]
    return hf


TOKENS = torch.randint(4, 64, (3, 12), generator=torch.Generator().manual_seed(0))


def test_init_like_peft_and_base_untouched():
    base = _base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    lora = LoRAModel.from_base(base, LoRAConfig(rank=4))
    assert lora.config.scale == pytest.approx(16 / 2)  # rsLoRA alpha / sqrt(r)
    assert LoRAConfig(rank=4, rslora=False).scale == pytest.approx(4.0)
    for m in MODULES:
        A, B = lora.layers[0].A[m], lora.layers[0].B[m]
        bound = 1 / math.sqrt(A.shape[1])  # kaiming_uniform(a=sqrt(5)) as nn.Linear / PEFT
        assert A.abs().max() <= bound and A.abs().max() > 0.8 * bound
        assert (B == 0).all()
    assert torch.equal(lora(TOKENS), base(TOKENS))  # B = 0: exactly the base function
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert not any(mod._forward_hooks for mod in base.modules())
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == [
        f"model.blocks.{L}.lora.{ab}.{m}" for L in range(2) for ab in "AB" for m in MODULES
    ]


@pytest.mark.parametrize("arch,rank", [("qwen2", 1), ("llama", 3)])
def test_hooks_equal_merged_weights(arch, rank):
    base = _base(arch)
    lora = _random_lora(base, rank)
    hf = _merged_hf(lora, base)
    got = lora(TOKENS)
    assert (got - base(TOKENS)).abs().max() > 1e-2  # the LoRA does something
    assert torch.allclose(got, hf(TOKENS).logits, atol=1e-5)
    assert torch.allclose(got, merge(lora)(TOKENS), atol=1e-5)


def test_state_is_A_times_projection_input():
    """Each hook point equals A @ (the input of that projection in the merged HF model)."""
    base = _base()
    lora = _random_lora(base, rank=2)
    hf = _merged_hf(lora, base)
    inputs = {}
    for L in range(2):
        for m in MODULES:
            mod = hf.get_submodule(f"model.layers.{L}.{HF_PROJ[m]}")
            mod.register_forward_pre_hook(lambda mod, a, key=(L, m): inputs.__setitem__(key, a[0]))
    hf(TOKENS)
    state = lora.state(TOKENS)
    assert state.shape == (3, 12, 2, 14)
    for (L, m), x in inputs.items():
        i = MODULES.index(m)
        expected = x @ lora.layers[L].A[m].T
        assert torch.allclose(state[:, :, L, 2 * i : 2 * i + 2], expected, atol=1e-5), (L, m)
    assert _random_lora(base).state(TOKENS).shape == (3, 12, 2, 7)  # rank 1: the L x 7 state


def test_user_hooks_compose_like_merged_model():
    """Edits at hook_z / hook_post reach the o / down adapters; hook_q sees the adapted q."""
    base = _base()
    lora = _random_lora(base)
    merged = merge(lora)

    def kill(x, hook):
        x = x.clone()
        x[..., :5] = 0
        return x

    hooks = [("blocks.0.mlp.hook_post", kill), ("blocks.1.attn.hook_z", kill), ("blocks.1.attn.hook_q", kill)]
    got = lora.model.run_with_hooks(TOKENS, fwd_hooks=hooks)
    assert torch.allclose(got, merged.run_with_hooks(TOKENS, fwd_hooks=hooks), atol=1e-5)
    _, c1 = lora.model.run_with_cache(TOKENS, names_filter="blocks.1.attn.hook_q")
    _, c2 = merged.run_with_cache(TOKENS, names_filter="blocks.1.attn.hook_q")
    assert torch.allclose(c1["blocks.1.attn.hook_q"], c2["blocks.1.attn.hook_q"], atol=1e-5)
    assert torch.allclose(lora(TOKENS), merged(TOKENS), atol=1e-5)  # hooks gone afterwards


def test_ablation_hooks_remove_exactly_those_updates():
    base = _base()
    lora = _random_lora(base)
    everything = [(L, m) for L in range(2) for m in MODULES]
    assert torch.allclose(
        lora.model.run_with_hooks(TOKENS, fwd_hooks=lora.ablation_hooks(everything)), base(TOKENS), atol=1e-5
    )
    keep_only = _random_lora(base)
    keep_only.layers[1].B["gate"].zero_()
    got = lora.model.run_with_hooks(TOKENS, fwd_hooks=lora.ablation_hooks([(1, "gate")]))
    assert torch.allclose(got, keep_only(TOKENS), atol=1e-5)
    with pytest.raises(ValueError, match="no adapter"):
        lora.ablation_hooks([(5, "q")])


def test_generation_with_kv_cache_matches_merged():
    base = _base()
    lora = _random_lora(base, seed=3)
    prompts = [[2, 10, 11, 12], [2, 20, 21]]
    assert generate(lora.model, prompts, 10) == generate(merge(lora), prompts, 10)


def test_config_validation():
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="subset"):
        LoRAConfig(modules=("q", "lm_head"))


@pytest.mark.parametrize("rank", [1, 2])
def test_peft_export_loads_in_peft_and_matches(tmp_path, rank):
    base = _base()
    lora = _random_lora(base, rank)
    folder = export_peft(lora, tmp_path / "adapter")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["r"] == rank and cfg["lora_alpha"] == 16
    keys = load_file(str(folder / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    peft_model = PeftModel.from_pretrained(hooked_to_hf(base), str(folder)).eval()
    assert torch.allclose(peft_model(TOKENS).logits, lora(TOKENS), atol=1e-4)
    again = import_peft(folder, base)
    assert torch.equal(again(TOKENS), lora(TOKENS))


def test_import_lora_trained_with_peft(tmp_path):
    """A plain (non-rs) PEFT LoRA on a subset of projections, loaded into mechdiff."""
    base = _base("llama")
    peft_model = get_peft_model(
        hooked_to_hf(base), LoraConfig(r=3, lora_alpha=7, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    gen = torch.Generator().manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(tmp_path / "p")
    lora = import_peft(tmp_path / "p", base)
    assert lora.config.modules == ("q", "v", "down") and not lora.config.rslora
    assert lora.config.scale == pytest.approx(7 / 3)
    assert torch.allclose(lora(TOKENS), peft_model(TOKENS).logits, atol=1e-4)


def test_import_errors(tmp_path):
    base = _base()
    folder = export_peft(_random_lora(base), tmp_path / "ok")
    cfg = json.loads((folder / "adapter_config.json").read_text())

    def variant(name, **changes):
        out = tmp_path / name
        out.mkdir()
        (out / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
        (out / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
        return out

    with pytest.raises(ValueError, match="lm_head.*not supported"):
        import_peft(variant("lm", target_modules=["q_proj", "lm_head"]), base)
    with pytest.raises(ValueError, match="DoRA"):
        import_peft(variant("dora", use_dora=True), base)
    with pytest.raises(ValueError, match="only LORA"):
        import_peft(variant("ia3", peft_type="IA3"), base)
    with pytest.raises(ValueError, match="shape"):  # same layout, wider model
        import_peft(folder, _base(hidden_size=96, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="layers"):  # the adapter has 2 layers, the model 3
        import_peft(folder, _base(num_hidden_layers=3))
    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    (bin_only / "adapter_config.json").write_text(json.dumps(cfg))
    (bin_only / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="pickle"):
        import_peft(bin_only, base)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(1, 64)
    odd = variant("odd")
    save_file(tensors, str(odd / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="unexpected tensor"):
        import_peft(odd, base)
