"""Shared fixtures: tiny random HF model folders (Qwen2/Llama) with a real tokenizer."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TINY_VOCAB = 64
SPECIALS = ["<unk>", "<pad>", "<bos>", "<eos>"]


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One torch thread for every test: tiny matmuls on a shared CPU run ~10x faster than on two
    oversubscribed threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tiny_tokenizer(prefix: str = "w", bos: str = "no-auto"):
    """WordLevel tokenizer: <unk>=0 <pad>=1 <bos>=2 <eos>=3, then words w0..w59.

    bos: "no-auto" (has <bos>, never adds it; like the organism), "auto" (its
    post-processor adds <bos>; like Llama), or "none" (no bos token; like Qwen2).
    """
    words = [f"{prefix}{i}" for i in range(TINY_VOCAB - len(SPECIALS))]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos == "auto":
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None if bos == "none" else "<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def make_tiny_hf(arch: str = "qwen2", seed: int = 0, **overrides):
    """A tiny random Qwen2/Llama causal LM: vocab 64, hidden 64, 2 layers, 4 heads / 2 kv heads."""
    kwargs = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, pad_token_id=1,
    )  # fmt: skip
    kwargs.update(overrides)
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kwargs))
        with torch.no_grad():  # HF inits biases to zero; make them count
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    else:
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    with torch.no_grad():  # non-trivial norm gains, so "no folding" is actually tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def tiny_model_dir(tmp_path):
    """Factory: tiny_model_dir(name, arch="qwen2", seed=0, tokenizer=None, **config) -> folder."""

    def make(name: str, arch: str = "qwen2", seed: int = 0, tokenizer=None, **overrides):
        path = tmp_path / name
        make_tiny_hf(arch, seed, **overrides).save_pretrained(path)
        (tokenizer or make_tiny_tokenizer()).save_pretrained(path)
        return path

    return make
