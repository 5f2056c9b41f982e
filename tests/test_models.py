import doctest

import huggingface_hub.constants
import pytest
import torch
from conftest import make_tiny_hf, make_tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from mechdiff import hf_conversion, models
from mechdiff.hf_conversion import hooked_to_hf, to_hf_config, to_hooked_config, with_architecture
from mechdiff.models import (
    ModelPair,
    ModelPairMismatch,
    check_pair,
    hooked_from_hf,
    hybrid,
    load_hooked,
    load_pair,
    load_tokenizer,
)

ATOL = 1e-4


def random_tokens(seed=0, batch=2, pos=12):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, 64, (batch, pos), generator=gen)  # no special ids: no masking


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_local_folder_matches_hf(tiny_model_dir, arch):
    folder = tiny_model_dir(f"tiny-{arch}", arch=arch)
    model = load_hooked(folder, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    layer_out = {}
    for i, layer in enumerate(hf.model.layers):
        layer.register_forward_hook(lambda mod, inp, out, i=i: layer_out.__setitem__(i, out))
    tokens = random_tokens()
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        out = hf(tokens, output_hidden_states=True)
    assert model.cfg.original_architecture == type(hf).__name__
    torch.testing.assert_close(logits, out.logits, atol=ATOL, rtol=0)
    # True values, no folding/centring: the residual stream equals HF's hidden states
    # (HF's last hidden state is taken after the final norm).
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], out.hidden_states[1], atol=ATOL, rtol=0)
    last = cache["blocks.1.hook_resid_post"]
    torch.testing.assert_close(model.ln_final(last), out.hidden_states[2], atol=ATOL, rtol=0)
    for i in range(2):
        hf_out = layer_out[i][0] if isinstance(layer_out[i], tuple) else layer_out[i]
        torch.testing.assert_close(cache[f"blocks.{i}.hook_resid_post"], hf_out, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("llama", {"num_key_value_heads": 4}),  # no GQA: TL uses plain W_K/W_V keys
        ("qwen2", {"num_key_value_heads": 4}),  # Qwen2 always uses grouped _W_K keys
        ("qwen2", {"tie_word_embeddings": True}),
        (
            "llama",
            {
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 50000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            },
        ),  # fmt: skip
    ],
)
def test_in_memory_round_trip(arch, overrides):
    hf = make_tiny_hf(arch, **overrides)
    model = hooked_from_hf(hf, device="cpu")
    tokens = random_tokens(1, pos=100)  # beyond 64 positions, so llama3 scaling matters
    with torch.no_grad():
        expected = hf(tokens).logits
        torch.testing.assert_close(model(tokens), expected, atol=ATOL, rtol=0)
        back = hooked_to_hf(model)
        torch.testing.assert_close(back(tokens).logits, expected, atol=ATOL, rtol=0)
    assert back.config.tie_word_embeddings == overrides.get("tie_word_embeddings", False)
    # the exported model owns its weights: changing it leaves the HookedTransformer alone
    with torch.no_grad():
        back.model.embed_tokens.weight.zero_()
    assert model.W_E.abs().sum() > 0


@pytest.mark.parametrize(
    ("bos", "expected"),
    [("no-auto", [2, 5, 6]), ("auto", [2, 5, 6]), ("none", [5, 6])],
)
def test_bos_prepended_exactly_once(tiny_model_dir, bos, expected):
    model = load_hooked(tiny_model_dir("tok", tokenizer=make_tiny_tokenizer(bos=bos)), device="cpu")
    assert model.tokenizer("w1 w2").input_ids == ([2, 5, 6] if bos == "auto" else [5, 6])
    assert model.to_tokens("w1 w2").tolist() == [expected]
    assert model.to_tokens("w1 w2", prepend_bos=False).tolist() == [[5, 6]]
    assert model.to_str_tokens("w1 w2") == ["<bos>", "w1", "w2"][3 - len(expected) :]
    assert model.to_string(torch.tensor([5, 6])) == "w1 w2"
    # batched, left-padded: the pads are masked, so the last logits match the unpadded run
    batch = model.to_tokens(["w1 w2 w3", "w4"])
    assert batch[1, 0].item() == 1 and model.tokenizer.padding_side == "left"
    with torch.no_grad():
        alone = model(model.to_tokens("w4"))[0, -1]
        torch.testing.assert_close(model(batch)[1, -1], alone, atol=ATOL, rtol=0)


def test_save_hf_round_trip(tiny_model_dir, tmp_path):
    base_dir = tiny_model_dir("base", seed=0)
    target_dir = tiny_model_dir("target", seed=1)
    pair = load_pair("custom", base=str(base_dir), target=str(target_dir), device="cpu")
    assert isinstance(pair, ModelPair) and (pair.n_layers, pair.d_model) == (2, 64)
    assert pair.meta["source"] == "local"
    assert pair.meta["architecture"] == "Qwen2ForCausalLM"
    assert pair.meta["dtype"] == "float32" and pair.meta["device"] == "cpu"
    assert pair.meta["base_name"] == str(base_dir)
    paths = pair.save_hf(tmp_path / "saved")
    assert paths == (tmp_path / "saved" / "base", tmp_path / "saved" / "target")
    tokens = random_tokens(2)
    for path, model in zip(paths, (pair.base, pair.target), strict=True):
        assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
        assert (path / "tokenizer.json").is_file()
        hf = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(tokens).logits, model(tokens), atol=ATOL, rtol=0)
        assert AutoTokenizer.from_pretrained(path).get_vocab() == pair.tokenizer.get_vocab()
        tok = load_tokenizer(path)  # AutoTokenizer re-BPEs non-Qwen tokenizers in qwen2 folders
        assert tok("w1 w2").input_ids == [5, 6] and tok.bos_token == "<bos>"
    # and the saved folders load straight back as a pair
    again = load_pair("custom", base=str(paths[0]), target=str(paths[1]), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(again.target(tokens), pair.target(tokens), atol=ATOL, rtol=0)


def test_hooked_to_hf_refuses_nonzero_bias_without_slot():
    model = hooked_from_hf(make_tiny_hf("qwen2"), device="cpu")
    with torch.no_grad():
        model.blocks[0].mlp.b_out.add_(1.0)
    with pytest.raises(ValueError, match="blocks.0.mlp.b_out is non-zero"):
        hooked_to_hf(model)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 32}, "d_model: base=64, target=32"),
        ({"num_hidden_layers": 3}, "n_layers: base=2, target=3"),
        ({"vocab_size": 80}, "d_vocab: base=64, target=80"),
    ],
)
def test_pair_shape_mismatch(tiny_model_dir, overrides, message):
    base_dir = tiny_model_dir("base")
    target_dir = tiny_model_dir("target", **overrides)
    with pytest.raises(ModelPairMismatch, match=message):
        load_pair("custom", base=str(base_dir), target=str(target_dir), device="cpu")


def test_pair_architecture_mismatch():
    qwen = hooked_from_hf(make_tiny_hf("qwen2"), device="cpu")
    llama = hooked_from_hf(make_tiny_hf("llama"), device="cpu")
    with pytest.raises(ModelPairMismatch, match="architecture: base='Qwen2ForCausalLM'"):
        check_pair(qwen, llama, None, None)


def test_pair_tokenizer_vocab_mismatch(tiny_model_dir):
    base_dir = tiny_model_dir("base")
    target_dir = tiny_model_dir("target", tokenizer=make_tiny_tokenizer(prefix="x"))
    with pytest.raises(ModelPairMismatch, match="tokenizer vocab differs.*'w0': base=4, target=None"):
        load_pair("custom", base=str(base_dir), target=str(target_dir), device="cpu")


def test_pair_special_token_mismatch_only_allowed_on_request():
    model = hooked_from_hf(make_tiny_hf("qwen2"), device="cpu")
    tok_a, tok_b = make_tiny_tokenizer(), make_tiny_tokenizer()
    tok_b.add_special_tokens({"additional_special_tokens": ["<think>"]})
    with pytest.raises(ModelPairMismatch, match="special/added tokens differ.*<think>"):
        check_pair(model, model, tok_a, tok_b)
    diffs = check_pair(model, model, tok_a, tok_b, allow_added_token_differences=True)
    assert any("<think>" in d for d in diffs)
    assert check_pair(model, model, tok_a, tok_a) == []


def test_pickle_only_folder_refused(tmp_path):
    folder = tmp_path / "pickled"
    make_tiny_hf("qwen2").save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="only pickle weights"):
        load_hooked(folder, device="cpu")


def test_missing_folder_and_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hooked(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hooked(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pair("custom", base=str(tmp_path / "nope"), target=str(tmp_path / "nope"))


def test_corrupt_safetensors(tiny_model_dir):
    folder = tiny_model_dir("corrupt")
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="Could not read the weights"):
        load_hooked(folder, device="cpu")


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(folder)
    with pytest.raises(ValueError, match="unsupported architecture GPT2LMHeadModel.*Qwen2ForCausalLM"):
        load_hooked(folder)


def test_bad_arguments():
    with pytest.raises(ValueError, match="Unknown pair"):
        load_pair("nonsense")
    with pytest.raises(ValueError, match="needs both base= and target="):
        load_pair("custom", base="a/b")
    with pytest.raises(ValueError, match="Unknown dtype"):
        hooked_from_hf(make_tiny_hf("qwen2"), dtype="float8")


def test_hub_name_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="not a local folder.*HF_HUB_OFFLINE=1.*local HF folder"):
        load_hooked("hf:mechdiff-test/definitely-not-cached")
    # a preset names hub models: it goes to the hub (and fails offline), under its hub names
    with pytest.raises(FileNotFoundError, match="'hf:Qwen/Qwen2.5-Math-7B'.*Hugging Face Hub"):
        load_pair("r1-distill-qwen-7b")


@pytest.mark.parametrize(
    "call",
    [
        lambda: load_pair("custom", base="models/base", target="models/target"),
        lambda: load_hooked("mechdiff-test/definitely-not-cached"),  # hub-shaped, but no "hf:"
        lambda: load_tokenizer("org/name"),
    ],
)
def test_a_missing_relative_path_is_a_clear_error_never_a_hub_lookup(call, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(models.AutoConfig, "from_pretrained", no_hub)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", no_hub)
    with pytest.raises(FileNotFoundError, match="does not exist .*explicit form 'hf:ORG/NAME'"):
        call()


def test_models_does_not_import_the_real_pair_until_asked():
    import subprocess
    import sys

    code = (
        "import sys, mechdiff.models as m; print('mechdiff.real' in sys.modules); "
        "m._registered('smollm2'); print('mechdiff.real.smollm2' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_registered_pair_sources_load(tiny_model_dir, monkeypatch):
    base, target = tiny_model_dir("b", seed=0), tiny_model_dir("t", seed=1)
    monkeypatch.setattr(models, "_PAIR_SOURCES", {})
    models.register_pair_source("mine", lambda pair: ((base, target), ("b", pair)), workload="chat")
    pair = load_pair("mine:run7", device="cpu")
    assert pair.meta["target_name"] == "mine:run7" and pair.meta["workload"] == "chat"
    with pytest.raises(ValueError, match="Unknown pair 'yours'.*'mine:<run>'"):
        load_pair("yours")


def test_organism_paths():
    assert models.ORGANISM_DIR.parts[-3:] == ("mechdiff", "organism", "shipped")


def test_organism_pair(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "ORGANISM_DIR", tmp_path / "shipped")
    with pytest.raises(FileNotFoundError, match="python -m mechdiff.organism train"):
        load_pair("organism")
    tiny_model_dir("shipped/base", seed=0)
    tiny_model_dir("shipped/target", seed=1)
    pair = load_pair("organism", device="cpu")
    assert pair.meta["source"] == "organism"
    assert (pair.meta["base_name"], pair.meta["target_name"]) == ("organism-base", "organism-target")
    assert pair.base.to_tokens("w1").tolist() == pair.target.to_tokens("w1").tolist() == [[2, 5]]


def test_bfloat16_load(tiny_model_dir):
    model = load_hooked(tiny_model_dir("bf16"), dtype="bfloat16", device="cpu")
    assert model.cfg.dtype == torch.bfloat16 and model.W_E.dtype == torch.bfloat16
    assert hooked_to_hf(model).dtype == torch.bfloat16


@pytest.mark.parametrize("module", [models, hf_conversion], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert failures == 0 and tried > 0


def test_names_moved_to_hf_conversion_still_import_from_models():
    assert models.hooked_to_hf is hf_conversion.hooked_to_hf
    assert models.SUPPORTED_ARCHITECTURES == hf_conversion.SUPPORTED_ARCHITECTURES


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("qwen2", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
        (
            "llama",
            {
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 50000.0,
                    "factor": 8.0,
                    "low_freq_factor": 2.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            },
        ),  # fmt: skip
    ],
)
def test_config_conversion_round_trips(arch, overrides):
    """HF config -> TL config -> HF config keeps every field the HF model is built from."""
    src = with_architecture(make_tiny_hf(arch, **overrides))
    back = to_hf_config(to_hooked_config(src, device="cpu"), None, tied=src.tie_word_embeddings)
    assert type(back) is type(src)
    for attr in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                 "tie_word_embeddings", "architectures"):  # fmt: skip
        assert getattr(back, attr) == getattr(src, attr), attr
    assert back.head_dim == (getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads) == 16
    want = {k: v for k, v in src.rope_parameters.items() if k in back.rope_parameters}
    assert back.rope_parameters == pytest.approx(want) and want["rope_type"] == back.rope_parameters["rope_type"]


def test_unsupported_rope_scaling_is_refused():
    src = with_architecture(make_tiny_hf("llama"))
    src.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="Unsupported rope scaling 'yarn'"):
        to_hooked_config(src)


@pytest.mark.parametrize("backbone", ["target", "base"])
def test_hybrid_takes_base_mlps(tiny_model_dir, backbone):
    pair = load_pair(
        "custom", base=str(tiny_model_dir("b", seed=0)), target=str(tiny_model_dir("t", seed=1)),
        device="cpu",
    )  # fmt: skip
    model = hybrid(pair, backbone)
    params = dict(model.named_parameters())
    base, target = dict(pair.base.named_parameters()), dict(pair.target.named_parameters())
    for name, p in params.items():
        from_base = ".mlp." in name or (backbone == "base" and ".attn." in name)
        source = (base if from_base else target)[name]
        assert torch.equal(p, source), name
        # no third copy of the weights: the hybrid views the pair's tensors, frozen, and its flags
        # are its own (the pair's models still train)
        assert p.data_ptr() == source.data_ptr(), name
        assert not p.requires_grad and source.requires_grad, name
    assert model.tokenizer is pair.tokenizer
    with pytest.raises(ValueError, match="backbone must be"):
        hybrid(pair, "neither")
