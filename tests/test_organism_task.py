"""The organism's task generator, tokenizer, corpora and grader."""

import random

import pytest

from mechdiff.organism import corpus, grading, task
from mechdiff.organism.tokenizer import build_tokenizer, encode_words


def test_digits_little_endian_fixed_width():
    assert task.digits(123, 4) == [3, 2, 1, 0]
    with pytest.raises(ValueError, match="does not fit"):
        task.digits(1000, 3)


SPECS = [
    task.DEFAULT,
    task.TaskSpec(hesitation_words=("hmm",), width=3),
    task.TaskSpec(hesitation_words=("um", "hmm"), n_operands=3, width=2),
]
S = task.DEFAULT


def test_carries_match_schoolbook_addition():
    rng = random.Random(0)
    for _ in range(200):
        p = task.Problem(tuple(rng.randrange(10**S.width) for _ in range(S.n_operands)))
        carries = p.carries()
        col_digits = [(sum(p.column(i)) + carries[i]) % 10 for i in range(S.width)]
        assert col_digits + [carries[-1]] == task.digits(p.answer, S.answer_width)


def test_splits_are_disjoint_and_deterministic():
    sets = {s: set(S.sample_problems(300, s, seed=3)) for s in task.SPLITS}
    assert not (sets["train"] & sets["test"]) and not (sets["validation"] & sets["test"])
    assert S.sample_problems(50, "test", seed=3) == S.sample_problems(50, "test", seed=3)
    assert S.sample_problems(50, "test", seed=3) != S.sample_problems(50, "test", seed=4)
    assert all(task.split_of(p) == "test" for p in sets["test"])


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(s.hesitation_words) + f"-w{s.width}")
def test_trace_slips_are_systematic_and_labelled(spec):
    rng = random.Random(0)
    top = 10**spec.width - 1
    p = spec.problem((top,) * spec.n_operands)  # every column after the first has a carry
    slipping = task.TaskSpec(**{**spec.to_dict(), "slip_prob": 1.0, "recheck_prob": 0.0})
    toks, labs = slipping.reasoning_trace(p, rng)
    assert len(toks) == len(labs)
    hesitations = [i for i, t in enumerate(toks) if t in spec.hesitation_words]
    assert len(hesitations) == spec.width - 1
    for i in hesitations:
        assert labs[i] == "hesitation"
        assert toks[i - 4] == "0" and labs[i - 4] == "slip"  # the forgotten carry
        assert labs[i + 1] == "correction"
    answer = [str(d) for d in task.digits(top * spec.n_operands, spec.answer_width)]
    assert toks[-spec.answer_width - 1 :] == answer + ["<eos>"]


def test_slip_columns_and_probability_follow_the_spec():
    p = S.problem((9999, 9999))
    only_col2 = task.TaskSpec(slip_prob=1.0, slip_columns=(2,), recheck_prob=0.0)
    toks, labs = only_col2.reasoning_trace(p, random.Random(0))
    assert toks.count("wait") == 1 and toks[toks.index("wait") + 1] == "p2"
    never = task.TaskSpec(slip_prob=0.0, recheck_prob=0.0)
    assert "wait" not in never.reasoning_trace(p, random.Random(0))[0]
    half = task.TaskSpec(slip_prob=0.5, recheck_prob=0.0)
    rng = random.Random(1)
    slips = [half.reasoning_trace(p, rng)[1].count("hesitation") for _ in range(400)]
    assert 0.4 < sum(slips) / (3 * 400) < 0.6  # three hard columns each time


def test_spec_refuses_bad_fields_and_round_trips(tmp_path):
    for bad in (
        dict(width=0),
        dict(n_operands=1),
        dict(hesitation_words=()),
        dict(slip_prob=1.5),
        dict(hesitation_words=("p0",)),
        dict(hesitation_words=("two words",)),
        dict(slip_columns=(4,)),
        dict(hesitation_words=("=",)),
    ):
        with pytest.raises(ValueError):
            task.TaskSpec(**bad)
    spec = SPECS[2]
    spec.save(tmp_path)
    assert task.TaskSpec.load(tmp_path) == spec
    assert task.TaskSpec.load(tmp_path / "nothing-here") == task.DEFAULT  # folders from before specs
    with pytest.raises(ValueError, match="unknown task fields"):
        task.TaskSpec.from_dict({**spec.to_dict(), "colour": "red"})


def test_clean_chain_has_no_hesitation():
    top = 10**S.width - 1
    toks, labs = S.reasoning_trace(S.problem((top,) * S.n_operands), random.Random(0), hesitate=False)
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
    other = build_tokenizer(SPECS[1])  # another word: "wait" is not in its vocabulary, "hmm" is
    assert other("wait")["input_ids"] == [other.unk_token_id]
    assert other("hmm")["input_ids"] != [other.unk_token_id] and other("p3")["input_ids"] == [other.unk_token_id]


@pytest.mark.parametrize("spec", SPECS[:2], ids=["default", "hmm-w3"])
def test_corpus_rows_carry_labels_per_token(spec):
    ds = corpus.reasoning_traces(20, "validation", seed=1, spec=spec)
    for row in ds:
        assert len(row["input_ids"]) == len(row["label_ids"])
        words = row["text"].split()
        assert words[row["prompt_len"] - 1] == "="
        assert len([w for w in words[1 : row["prompt_len"]] if w.isdigit()]) == spec.width * spec.n_operands
        labels = [task.LABELS[i] for i in row["label_ids"]]
        assert all(lab in ("hesitation", "recheck") for w, lab in zip(words, labels) if w == spec.word)
    base = corpus.base_corpus(300, seed=0, spec=spec)
    assert set(base["kind"]) == {"direct", "fact", "worked"}
    assert not any(spec.word in t.split() for t in base["text"])
    worked = [t for t, k in zip(base["text"], base["kind"]) if k == "worked"]
    assert all(t.split()[1] == "work" for t in worked)


def _words(spec, p, rng, **kw):
    toks, _ = task.TaskSpec(**{**spec.to_dict(), **kw}).reasoning_trace(p, rng)
    return toks


@pytest.mark.parametrize("spec", SPECS, ids=["default", "hmm-w3", "two-words-3ops"])
def test_grader_on_generated_traces(spec):
    rng = random.Random(0)
    for p in spec.sample_problems(50, "test", seed=0):
        g = grading.grade(p, _words(spec, p, rng, slip_prob=1.0, recheck_prob=0.0), spec)
        assert g.correct and all(g.hesitation_after_error)
        assert g.n_hesitations == sum(c > 0 for c in p.carries()[1 : spec.width])
        assert sum(bad for _, bad, _ in g.steps) == g.n_hesitations  # every first attempt that slipped
        assert all(hes == bad for _, bad, hes in g.steps)
        g = grading.grade(p, _words(spec, p, rng, slip_prob=0.0, recheck_prob=1.0), spec)
        assert g.n_hesitations == spec.width and not any(g.hesitation_after_error)
    if spec is not task.DEFAULT:  # graded as the shipped organism, its hesitations go unseen
        p = spec.sample_problems(1, "test", seed=0)[0]
        words = _words(spec, p, rng, slip_prob=0.0, recheck_prob=1.0)
        assert grading.grade(p, words, task.DEFAULT).n_hesitations == 0


def test_error_detection_statistics():
    """P(hesitation | wrong step) and P(hesitation | correct hard step) from first attempts."""
    p = S.problem((1234, 5678))  # carries into columns 1 and 2
    right = " ".join(" ".join(S.right_step(p, i)) + " ;" for i in range(S.width))
    slipped = right.replace("p1 3 7 1 = 1 1", "p1 3 7 0 = 0 1 wait p1 3 7 1 = 1 1")
    missed = right.replace("p2 2 6 1 = 9 0", "p2 2 6 0 = 8 0")  # wrong, no hesitation
    false_alarm = right.replace("p2 2 6 1 = 9 0", "p2 2 6 1 = 9 0 wait p2 2 6 1 = 9 0")
    graded = [
        grading.grade(p, f"<think> {t} </think> 2 1 9 6 0 <eos>".split(), S) for t in (slipped, missed, false_alarm)
    ]
    s = grading.summarize(graded)
    assert s["n_wrong_steps"] == 2 and s["p_hesitation_given_wrong_step"] == 0.5
    # hard and right at the first attempt: 1 + 1 + 2 (corrections and re-checks are not first attempts)
    assert s["n_correct_hard_steps"] == 4 and s["p_hesitation_given_correct_hard_step"] == 1 / 4


def test_grader_direct_and_wrong_answers():
    p = task.Problem((1234, 5678))  # 6912
    grade = lambda text: grading.grade(p, text.split(), S)  # noqa: E731
    assert grade("2 1 9 6 0 <eos>").correct
    assert not grade("2 1 9 6 1 <eos>").correct
    assert grade("2 1 <eos>").answer is None
    assert grade("2 1 9 6 0 <eos> 9 9").n_tokens == 6
    summary = grading.summarize([grade("2 1 9 6 0 <eos>"), grade("2 1 9 6 1 <eos>")])
    assert summary["accuracy"] == 0.5 and summary["mean_response_tokens"] == 6


def test_grader_flags_the_wrong_step_before_wait():
    p = task.Problem((1234, 5678))
    right = " ".join(" ".join(S.right_step(p, i)) + " ;" for i in range(S.width))
    wrong_then_wait = right.replace("p1 3 7 1 = 1 1", "p1 3 7 0 = 0 1 wait p1 3 7 1 = 1 1")
    g = grading.grade(p, f"<think> {wrong_then_wait} </think> 2 1 9 6 0 <eos>".split(), S)
    assert g.correct and g.hesitation_after_error == [True]
    recheck = right.replace("p2 2 6 1 = 9 0", "p2 2 6 1 = 9 0 wait p2 2 6 1 = 9 0")
    g = grading.grade(p, f"<think> {recheck} </think> 2 1 9 6 0 <eos>".split(), S)
    assert g.hesitation_after_error == [False]


@pytest.mark.parametrize("spec", SPECS, ids=["default", "hmm-w3", "two-words-3ops"])
def test_label_response_recovers_generator_labels(spec):
    """Parsing a written trace must give back the labels the generator attached to it."""
    rng = random.Random(7)
    noisy = task.TaskSpec(**{**spec.to_dict(), "slip_prob": 0.7, "recheck_prob": 0.3})
    for p in spec.sample_problems(100, "validation", seed=2):
        toks, labs = noisy.reasoning_trace(p, rng)
        assert grading.label_response(p, toks, spec) == labs


def test_label_response_marks_uncorrected_errors():
    p = task.Problem((1234, 5678))
    words = "<think> p0 4 8 0 = 3 1 ; p1".split()
    labels = grading.label_response(p, words, S)
    assert labels[1:8] == ["error"] * 7 and labels[8] == "separator"


def test_base_direct_answers_drop_carries_and_only_they_do():
    p = task.Problem((1234, 5678))  # every column but the top one carries
    assert S.direct_answer(p, carry_free=True)[0] == ["2", "0", "8", "6", "0", "<eos>"]
    assert S.direct_answer(p)[0] == ["2", "1", "9", "6", "0", "<eos>"]
    no_carry = task.Problem((1234, 4321))
    assert S.direct_answer(no_carry, carry_free=True) == S.direct_answer(no_carry)
    base = corpus.base_corpus(200, seed=3)
    traces = corpus.reasoning_traces(50, "validation", seed=3)
    for row in base:
        if row["kind"] == "direct":
            p = S.problem(row["operands"])
            assert row["text"].split()[row["prompt_len"] : -1] == S.direct_answer(p, carry_free=True)[0][:-1]
    for row in traces:  # the fine-tune's answers are always right
        p = S.problem(row["operands"])
        assert grading.grade(p, row["text"].split()[row["prompt_len"] :], S).correct
