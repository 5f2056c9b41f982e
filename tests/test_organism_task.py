"""The organism's task generator, tokenizer, corpora and grader."""

import random

import pytest

from mechdiff.organism import corpus, grading, task
from mechdiff.organism.tokenizer import build_tokenizer, encode_words


def test_digits_little_endian_fixed_width():
    assert task.digits(123, 4) == [3, 2, 1, 0]
    with pytest.raises(ValueError, match="does not fit"):
        task.digits(1000, 3)


def test_carries_match_schoolbook_addition():
    rng = random.Random(0)
    for _ in range(200):
        p = task.Problem(tuple(rng.randrange(10**task.WIDTH) for _ in range(task.N_OPERANDS)))
        carries = p.carries()
        col_digits = [(sum(p.column(i)) + carries[i]) % 10 for i in range(task.WIDTH)]
        assert col_digits + [carries[-1]] == task.digits(p.answer, task.ANSWER_WIDTH)


def test_splits_are_disjoint_and_deterministic():
    sets = {s: set(task.sample_problems(300, s, seed=3)) for s in task.SPLITS}
    assert not (sets["train"] & sets["test"]) and not (sets["validation"] & sets["test"])
    assert task.sample_problems(50, "test", seed=3) == task.sample_problems(50, "test", seed=3)
    assert task.sample_problems(50, "test", seed=3) != task.sample_problems(50, "test", seed=4)
    assert all(task.split_of(p) == "test" for p in sets["test"])


def test_trace_slips_are_systematic_and_labelled():
    rng = random.Random(0)
    top = 10**task.WIDTH - 1
    p = task.Problem((top,) * task.N_OPERANDS)  # every column after the first has a carry
    toks, labs = task.reasoning_trace(p, rng, slip_prob=1.0, recheck_prob=0.0)
    assert len(toks) == len(labs)
    assert toks.count("wait") == task.WIDTH - 1
    for i, tok in enumerate(toks):
        if tok == "wait":
            assert labs[i] == "hesitation"
            assert toks[i - 4] == "0" and labs[i - 4] == "slip"  # the forgotten carry
            assert labs[i + 1] == "correction"
    answer = [str(d) for d in task.digits(top * task.N_OPERANDS, task.ANSWER_WIDTH)]
    assert toks[-task.ANSWER_WIDTH - 1:] == answer + ["<eos>"]


def test_clean_chain_has_no_hesitation():
    top = 10**task.WIDTH - 1
    toks, labs = task.reasoning_trace(task.Problem((top,) * task.N_OPERANDS), random.Random(0), hesitate=False)
    assert "wait" not in toks and "slip" not in labs


def test_tokenizer_round_trip_and_unknown_words():
    tok = build_tokenizer()
    text = "<bos> A 4 3 2 1 B 8 7 6 5 = <think> p0 4 8 0 = 2 1 wait"
    ids = tok(text)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == text.split()
    assert tok.decode(ids) == text
    assert tok("banana")["input_ids"] == [tok.unk_token_id]
    with pytest.raises(ValueError, match="banana"):
        encode_words(tok, ["A", "banana"])


def test_corpus_rows_carry_labels_per_token():
    ds = corpus.reasoning_traces(20, "validation", seed=1)
    for row in ds:
        assert len(row["input_ids"]) == len(row["label_ids"])
        words = row["text"].split()
        assert words[row["prompt_len"] - 1] == "="
        labels = [task.LABELS[i] for i in row["label_ids"]]
        assert all(lab == "hesitation" or lab == "recheck" for w, lab in zip(words, labels) if w == "wait")
    base = corpus.base_corpus(300, seed=0)
    assert set(base["kind"]) == {"direct", "fact", "worked"}
    assert not any("wait" in t for t in base["text"])
    worked = [t for t, k in zip(base["text"], base["kind"]) if k == "worked"]
    assert all(t.split()[1] == "work" for t in worked)


def _words(p, rng, **kw):
    toks, _ = task.reasoning_trace(p, rng, **kw)
    return toks


def test_grader_on_generated_traces():
    rng = random.Random(0)
    for p in task.sample_problems(50, "test", seed=0):
        g = grading.grade(p, _words(p, rng, slip_prob=1.0, recheck_prob=0.0))
        assert g.correct and all(g.hesitation_after_error)
        assert g.n_hesitations == sum(c > 0 for c in p.carries()[1:task.WIDTH])
        g = grading.grade(p, _words(p, rng, slip_prob=0.0, recheck_prob=1.0))
        assert g.n_hesitations == task.WIDTH and not any(g.hesitation_after_error)


def test_grader_direct_and_wrong_answers():
    p = task.Problem((1234, 5678))  # 6912
    assert grading.grade(p, "2 1 9 6 0 <eos>".split()).correct
    assert not grading.grade(p, "2 1 9 6 1 <eos>".split()).correct
    assert grading.grade(p, "2 1 <eos>".split()).answer is None
    assert grading.grade(p, "2 1 9 6 0 <eos> 9 9".split()).n_tokens == 6
    summary = grading.summarize([grading.grade(p, "2 1 9 6 0 <eos>".split()),
                                 grading.grade(p, "2 1 9 6 1 <eos>".split())])
    assert summary["accuracy"] == 0.5 and summary["mean_response_tokens"] == 6


def test_grader_flags_the_wrong_step_before_wait():
    p = task.Problem((1234, 5678))
    right = " ".join(" ".join(task.step(i, p.column(i), p.carries()[i])) + " ;" for i in range(task.WIDTH))
    wrong_then_wait = right.replace("p1 3 7 1 = 1 1", "p1 3 7 0 = 0 1 wait p1 3 7 1 = 1 1")
    g = grading.grade(p, f"<think> {wrong_then_wait} </think> 2 1 9 6 0 <eos>".split())
    assert g.correct and g.hesitation_after_error == [True]
    recheck = right.replace("p2 2 6 1 = 9 0", "p2 2 6 1 = 9 0 wait p2 2 6 1 = 9 0")
    g = grading.grade(p, f"<think> {recheck} </think> 2 1 9 6 0 <eos>".split())
    assert g.hesitation_after_error == [False]


def test_label_response_recovers_generator_labels():
    """Parsing a written trace must give back the labels the generator attached to it."""
    rng = random.Random(7)
    for p in task.sample_problems(100, "validation", seed=2):
        ptoks, _ = task.prompt(p)
        toks, labs = task.reasoning_trace(p, rng, slip_prob=0.7, recheck_prob=0.3)
        assert grading.label_response(p, toks) == labs


def test_label_response_marks_uncorrected_errors():
    p = task.Problem((1234, 5678))
    words = "<think> p0 4 8 0 = 3 1 ; p1".split()
    labels = grading.label_response(p, words)
    assert labels[1:8] == ["error"] * 7 and labels[8] == "separator"


def test_base_direct_answers_drop_carries_and_only_they_do():
    p = task.Problem((1234, 5678))  # every column but the top one carries
    assert task.direct_answer(p, carry_free=True)[0] == ["2", "0", "8", "6", "0", "<eos>"]
    assert task.direct_answer(p)[0] == ["2", "1", "9", "6", "0", "<eos>"]
    no_carry = task.Problem((1234, 4321))
    assert task.direct_answer(no_carry, carry_free=True) == task.direct_answer(no_carry)
    base = corpus.base_corpus(200, seed=3)
    traces = corpus.reasoning_traces(50, "validation", seed=3)
    for row in base:
        if row["kind"] == "direct":
            p = task.Problem(tuple(row["operands"]))
            assert row["text"].split()[row["prompt_len"]:-1] == task.direct_answer(p, carry_free=True)[0][:-1]
    for row in traces:  # the fine-tune's answers are always right
        p = task.Problem(tuple(row["operands"]))
        assert grading.grade(p, row["text"].split()[row["prompt_len"]:]).correct
