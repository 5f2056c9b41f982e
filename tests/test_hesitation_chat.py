"""The hesitation study on the chat workload (``--pair smollm2``), with tiny random Llama pairs in
a temporary ``$MECHDIFF_CACHE`` (as :mod:`test_real_pair`): what "hesitating" is in chat tokens,
where the prompts are cut, and ``python -m analyses.hesitation`` / ``python -m attribution`` end
to end. Each test runs with a tiny byte-level BPE trained on chat traces and, when the [real]
extra (or the cached base) is there, with SmolLM2's own tokenizer.

A tiny random target never writes "Wait", so where a test needs hesitation prompts it stands in a
target that writes its fine-tuning traces (:func:`writes_traces`): the cutting, labelling and
everything downstream then run on real chat replies.
"""

import json
import random
import re

import pytest
import torch
from test_real import TEMPLATE, _has_real_extra
from test_real_pair import _save
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from analyses import hesitation as study
from attribution import __main__ as attribution_cli
from attribution.synthetic import randomize_adapters
from mechdiff.adapters.formats import save_adapters
from mechdiff.adapters.transcoder import AdaptedModel
from mechdiff.evaluation import hesitation as H
from mechdiff.evaluation import sufficiency
from mechdiff.models import load_pair, load_tokenizer
from mechdiff.organism import task
from mechdiff.real import chat, smollm2
from mechdiff.workloads import ChatWorkload, Workload, for_pair
from mechdiff.workloads.chat import chat_char_labels

STEP_END = re.compile(r"carry \d\.$")  # a step's last words, right before the decision slot


def _tiny_bpe() -> PreTrainedTokenizerFast:
    """A byte-level BPE (as SmolLM2's) learnt from chat traces: " Wait" and the newline are tokens."""
    rng = random.Random(0)
    texts = [chat.SYSTEM] + [
        chat.question(p) + "\n" + chat.reasoning_response(p, rng, recheck_prob=0.3)
        for p in task.DEFAULT.sample_problems(200, "train", 0)
    ]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<pad>", "<bos>", "<eos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module", params=["tiny", pytest.param("smollm2", marks=pytest.mark.real)])
def tokenizer(request):
    if request.param == "tiny":
        return _tiny_bpe()
    cached = smollm2.cache_dir() / "base"  # read only
    if (cached / "tokenizer.json").is_file():
        return load_tokenizer(cached)
    if not _has_real_extra():
        pytest.skip(f"needs the [real] extra: {smollm2.INSTALL}")
    from transformers import AutoTokenizer

    path = smollm2.gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture
def pair(tmp_path, monkeypatch, tokenizer):
    """``load_pair("smollm2")`` over tiny random Llamas in a temporary cache."""
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path / "cache"))
    root = smollm2.cache_dir()
    _save(root / "base", tokenizer, 0)
    _save(root / "runs" / "default" / "model", tokenizer, 1)
    return load_pair("smollm2")


@pytest.fixture
def adapters(pair, tmp_path):
    """Random adapters (d_sae 16) saved like trained ones."""
    torch.manual_seed(0)
    adapted = randomize_adapters(AdaptedModel.from_pair(pair, d_sae=16), seed=0, density=0.2)
    return save_adapters(adapted, tmp_path / "adapters")


def _trace_reply(tokenizer, operands) -> list[int]:
    """The reply a perfect fine-tune writes: a chat trace (slips always, some re-checks), with eos."""
    problem = task.Problem(tuple(operands))
    text = chat.reasoning_response(problem, random.Random(str(operands)), slip_prob=1.0, recheck_prob=0.3)
    row = chat.encode(tokenizer, problem, text)
    return row["input_ids"][row["prompt_len"] :]


@pytest.fixture
def writes_traces(monkeypatch):
    """The target's greedy replies (for the hesitation prompts only) are its fine-tuning traces."""

    def responses(self, model, problems, **kwargs):
        return [_trace_reply(self.tokenizer, ops) for ops in problems["operands"]]

    monkeypatch.setattr(ChatWorkload, "responses", responses)


# --------------------------------------------------------------------------- the tokens


def test_hesitation_tokens_are_read_off_a_chat_trace(tokenizer):
    spec = ChatWorkload(tokenizer)
    assert isinstance(spec, Workload) and spec.max_new_tokens == chat.MAX_NEW_TOKENS
    assert tokenizer.decode([spec.target]) == " Wait" and spec.variants[0] == spec.target
    assert set(spec.variants) == set(chat.hesitation_token_ids(tokenizer))
    assert tokenizer.decode([spec.go_on]) == "\n" and spec.decisions == (*spec.variants, spec.go_on)
    if len(tokenizer) > 1000:  # SmolLM2's: the fine-tune writes "ĠWait" (22297), not "Wait"
        assert tokenizer.convert_ids_to_tokens([spec.target, spec.go_on]) == ["ĠWait", "Ċ"]


def test_chat_labels_follow_the_grader():
    p = task.Problem((1234, 5678))
    slip, fixed, right = (
        "Tens: 3 + 7 = 10, write 0, carry 1.",
        "Tens: 3 + 7 + 1 = 11, write 1, carry 1.",
        "Units: 4 + 8 = 12, write 2, carry 1.",
    )
    text = f"{right} Wait, let me check. {right}\n{slip} Wait, I forgot. {fixed}\nHundreds: 2 + 6 = 8, write 8, carry 0.\nAnswer: 6912"
    labels, words = chat_char_labels(p, text)
    assert [w[2] for w in words] == chat.grade(p, text).hesitation_after_error == [False, True]
    at = lambda s, k=0: labels[[m.start() for m in re.finditer(re.escape(s), text)][k]]  # noqa: E731
    assert [
        at(right),
        at("Wait"),
        at(right, 1),
        at(slip),
        at("Wait", 1),
        at(fixed),
        at("Hundreds"),
        at("Answer"),
        at("let"),
    ] == ["step", "recheck", "recheck_step", "slip", "hesitation", "correction", "error", "answer", "text"]
    slipped_end = text.index(slip) + len(slip)  # its "." and the space before the judging " Wait"
    assert labels[slipped_end - 1 : slipped_end + 1] == ["slip", "slip"] and text[slipped_end + 1] == "W"
    assert labels[text.index(right) + len(right) - 1] == "step" and labels[len(text) - len("6912") - 1] == "answer"


def test_the_token_before_a_judged_wait_is_a_slip_token(pair):
    """The role rule's error-detection mass: on chat text the last token before " Wait" (the step's
    closing ".") belongs to the slipped step, as on the organism."""
    spec = for_pair(pair)
    p = task.Problem((1234, 5678))
    text = "Units: 4 + 8 = 12, write 2, carry 1.\nTens: 3 + 7 = 10, write 0, carry 1. Wait, I forgot."
    ids = pair.tokenizer(text, add_special_tokens=False)["input_ids"]
    labels, hesitations, _ = spec.cut(p, ids)
    ((j, after),) = hesitations
    assert after and labels[j] == "hesitation" and labels[j - 1] == "slip"


# --------------------------------------------------------------------------- the prompts


def test_prompts_end_right_before_wait_and_controls_before_the_newline(pair, writes_traces):
    spec = for_pair(pair)
    tok, problems = pair.tokenizer, spec.problems(6, "validation", seed=0)
    hes, ctl = H.hesitation_prompts(pair.target, tok, problems, workload=spec)
    replies = [_trace_reply(tok, ops) for ops in problems["operands"]]
    graded = [chat.grade(task.Problem(tuple(ops)), spec.text(r)) for ops, r in zip(problems["operands"], replies)]
    assert len(hes) == sum(g.n_hesitations for g in graded) > 0 and 0 < len(ctl) <= len(hes)
    assert any(hes.after_error) and not all(hes.after_error)  # slips and re-checks both cut
    seen = {i: 0 for i in range(len(problems))}
    for kind, prompts, next_token in (("hesitation", hes, spec.target), ("control", ctl, spec.go_on)):
        for tokens, idx, pos, after_error, labels in zip(
            prompts.tokens, prompts.problem_index, prompts.response_position, prompts.after_error, prompts.labels
        ):
            prompt = problems[idx]["input_ids"]
            assert tokens == prompt + replies[idx][:pos] and replies[idx][pos] == next_token, kind
            assert len(labels) == pos and STEP_END.search(spec.text(replies[idx][:pos])), kind
            if kind == "hesitation":  # in order, each judged as the grader judges it
                assert after_error == graded[idx].hesitation_after_error[seen[idx]]
                seen[idx] += 1
                step_label = labels[-2]  # the token before the step's closing "."
                assert step_label == ("slip" if after_error else "step") or step_label.endswith("step")
            else:
                assert not after_error


def test_chat_generation_paths_agree_with_the_workload(pair, adapters):
    """Unpatched replies are chat.respond's; with every feature kept the set-decides copy is the model."""
    from mechdiff.adapters.formats import load_adapted

    spec = for_pair(pair, max_new_tokens=6)
    problems = spec.problems(3, "test", seed=1)
    ops = [task.Problem(tuple(o)) for o in problems["operands"]]
    texts = [t for t, _ in chat.respond(pair.target, ops, max_new_tokens=6, tokenizer=pair.tokenizer)]
    assert [spec.text(r) for r in spec.responses(pair.target, problems)] == texts
    adapted = load_adapted(pair, adapters)
    every = [(layer, f) for layer in range(pair.n_layers) for f in range(16)]
    kept = sufficiency.set_decides_ids(adapted, pair.tokenizer, problems, every, spec.decisions, 6)
    assert kept == spec.responses(adapted.model, problems)


# --------------------------------------------------------------------------- the commands


def test_study_runs_end_to_end_on_the_chat_pair(pair, adapters, writes_traces, tmp_path):
    out = tmp_path / "hesitation"
    summary = study.main(
        [
            "--pair",
            "smollm2",
            "--adapters",
            str(adapters),
            "--out",
            str(out),
            "--n-prompts",
            "3",
            "--n-problems",
            "3",
            "--n-traces",
            "2",
            "--n-dose-problems",
            "2",
            "--max-new-tokens",
            "8",
            "--random-draws",
            "1",
            "--max-feature-nodes",
            "8",
        ]
    )
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    tokens = summary["hesitation_tokens"]
    assert tokens["workload"] == "chat" and tokens["word"] == "Wait" and tokens["max_new_tokens"] == 8
    assert pair.tokenizer.convert_tokens_to_ids(tokens["target"]) == for_pair(pair).target
    assert summary["n_hesitation_prompts"] == 3 and summary["n_control_prompts"] > 0
    for key in ("n_adapter_features", "n_hesitation_features", "hesitation_fraction", "roles"):
        assert key in summary
    for key in (
        "hesitations_per_response_before",
        "hesitations_per_response_after",
        "random_control_after",
        "length_before",
        "length_after",
        "accuracy_before",
        "accuracy_after",
    ):
        assert isinstance(summary["necessity"][key], float)
    assert {"hesitation_retained", "set_decides_in_generation", "at_hesitation_prompts"} <= set(summary["sufficiency"])
    assert {"wait_prob_before", "wait_prob_after"} <= set(summary["steering"])
    assert sum(summary["roles"].values()) == summary["n_hesitation_features"] > 0
    assert 0 < summary["models"]["target"]["mean_response_tokens"] <= 8  # the cap reached the workload
    report = (out / "report.md").read_text()
    assert '"Wait"' in report and "--pair smollm2" in report and '"wait"' not in report


def test_study_needs_adapters_for_a_real_pair(tmp_path):
    from mechdiff.cli import UsageError

    with pytest.raises(UsageError, match="--adapters DIR is required"):
        study.main(["--pair", "smollm2", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_attribution_cli_defaults_to_the_workload_hesitation(pair, adapters, tmp_path):
    out = tmp_path / "graph"
    attribution_cli.main(
        [
            "--pair",
            "smollm2",
            "--adapters",
            str(adapters),
            "--max-feature-nodes",
            "4",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    spec = for_pair(pair)
    assert [t["token_id"] for t in summary["targets"]] == [spec.target]
    prompt_ids = pair.tokenizer.convert_tokens_to_ids(summary["prompt"])
    assert STEP_END.search(pair.tokenizer.decode(prompt_ids))  # a trace cut right before its "Wait"
