"""The shared training loop: schedule, exact resume after an interruption, atomic checkpoints."""

import pytest
import torch

from mechdiff.atomic import is_temporary
from mechdiff.config_checks import ConfigError
from mechdiff.padding import pad
from mechdiff.training import checkpoint
from mechdiff.training.batches import step_indices
from mechdiff.training.loop import LoopConfig, TrainingInterrupted, lr_factor, train


class _Stop(Exception):
    pass


def _problem(seed=0):
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    x = torch.randn(256, 4)
    y = (x[:, :1] * x[:, 1:2]).sin()
    return module, x, y


def _loss_fn(module, x, y, stop_at=None, stop=_Stop):
    def loss_fn(step):
        if stop_at is not None and step == stop_at:
            raise stop  # a kill between two steps
        idx = step_indices(len(x), 32, step, seed=0)
        noise = 0.01 * torch.randn(len(idx), 1)  # uses the loop's per-step seed
        loss = ((module(x[idx]) - y[idx] - noise) ** 2).mean()
        return loss, {"mse": loss.item()}

    return loss_fn


def test_schedule_warms_up_then_decays():
    cfg = LoopConfig(steps=100, lr=1.0, warmup_frac=0.1)
    factors = [lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert factors[-1] < 0.01


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    full, x, y = _problem()
    cfg = LoopConfig(steps=60, lr=1e-2, checkpoint_every=10, progress=False, seed=3)
    hist_full = train(full, _loss_fn(full, x, y), LoopConfig(**{**cfg.__dict__, "out_dir": tmp_path / "a"}))

    killed, _, _ = _problem()
    run_cfg = LoopConfig(**{**cfg.__dict__, "out_dir": tmp_path / "b"})
    with pytest.raises(_Stop):
        train(killed, _loss_fn(killed, x, y, stop_at=35), run_cfg)
    resumed, _, _ = _problem(seed=99)  # fresh weights: everything must come from the checkpoint
    hist = train(resumed, _loss_fn(resumed, x, y), run_cfg)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert [h["step"] for h in hist] == [h["step"] for h in hist_full]
    assert hist[-1]["loss"] == pytest.approx(hist_full[-1]["loss"], rel=1e-5)
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["checkpoint"]  # no temporaries left


def test_ctrl_c_saves_a_checkpoint_and_resumes_exactly(tmp_path):
    full, x, y = _problem()
    cfg = LoopConfig(steps=30, lr=1e-2, checkpoint_every=100, progress=False, seed=1)
    hist_full = train(full, _loss_fn(full, x, y), LoopConfig(**{**cfg.__dict__, "out_dir": tmp_path / "a"}))

    stopped, _, _ = _problem()
    run_cfg = LoopConfig(**{**cfg.__dict__, "out_dir": tmp_path / "b"})
    with pytest.raises(TrainingInterrupted, match="after step 17: checkpoint saved to") as err:
        train(stopped, _loss_fn(stopped, x, y, stop_at=17, stop=KeyboardInterrupt), run_cfg)
    assert err.value.step == 17 and err.value.checkpoint == tmp_path / "b" / "checkpoint"
    # with checkpoint_every=100 the only checkpoint before step 30 is the one Ctrl-C wrote
    assert checkpoint.load(tmp_path / "b", _problem()[0], torch.optim.AdamW(_problem()[0].parameters()))["step"] == 17
    resumed, _, _ = _problem(seed=7)
    hist = train(resumed, _loss_fn(resumed, x, y), run_cfg)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # bit for bit
    assert [h["loss"] for h in hist] == [h["loss"] for h in hist_full]


def test_a_real_sigint_during_the_update_waits_for_the_step(tmp_path):
    """SIGINT inside ``on_step`` (after the optimiser step) is held until the step is whole: the
    checkpoint then has step 9 done, and the resumed run matches an uninterrupted one exactly."""
    import os
    import signal

    full, x, y = _problem()
    cfg = LoopConfig(steps=20, lr=1e-2, checkpoint_every=100, progress=False)
    train(full, _loss_fn(full, x, y), cfg)
    stopped, _, _ = _problem()
    run_cfg = LoopConfig(**{**cfg.__dict__, "out_dir": tmp_path})

    finished = []

    def on_step(step):  # e.g. resampling features: half of it would corrupt the checkpoint
        if step == 8:
            os.kill(os.getpid(), signal.SIGINT)
        finished.append(step)

    with pytest.raises(TrainingInterrupted, match="after step 9"):
        train(stopped, _loss_fn(stopped, x, y), run_cfg, on_step=on_step)
    assert finished[-1] == 8  # on_step ran to its end before the interrupt took effect
    resumed, _, _ = _problem(seed=3)
    train(resumed, _loss_fn(resumed, x, y), run_cfg)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ctrl_c_without_out_dir_says_nothing_was_saved():
    module, x, y = _problem()
    with pytest.raises(TrainingInterrupted, match="after step 3: no checkpoint"):
        train(
            module,
            _loss_fn(module, x, y, stop_at=3, stop=KeyboardInterrupt),
            LoopConfig(steps=10, lr=1e-2, progress=False),
        )


@pytest.mark.parametrize(
    "field,value",
    [
        ("steps", 0),
        ("steps", -5),
        ("lr", 0.0),
        ("warmup_frac", 1.5),
        ("checkpoint_every", 0),
        ("grad_clip", float("nan")),
    ],
)
def test_loop_config_refuses_values_it_cannot_run(field, value):
    with pytest.raises(ConfigError, match=f"LoopConfig.{field} = "):
        LoopConfig(**{"steps": 10, "lr": 1e-3, field: value})


def test_half_written_checkpoint_leaves_previous_one(tmp_path):
    module, x, y = _problem()
    train(
        module,
        _loss_fn(module, x, y),
        LoopConfig(steps=10, lr=1e-2, checkpoint_every=5, out_dir=tmp_path, progress=False),
    )
    half = tmp_path / "checkpoint.123-abcd.tmp"  # a crash while writing the next one
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    fresh, _, _ = _problem(seed=5)
    opt = torch.optim.AdamW(fresh.parameters())
    state = checkpoint.load(tmp_path, fresh, opt)
    assert state["step"] == 10
    assert not half.exists() and not any(is_temporary(p) for p in tmp_path.iterdir())
    for a, b in zip(module.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    module, x, y = _problem()
    train(
        module,
        _loss_fn(module, x, y),
        LoopConfig(steps=5, lr=1e-2, checkpoint_every=5, out_dir=tmp_path, progress=False),
    )
    (tmp_path / "checkpoint" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RuntimeError, match="could not resume from .*checkpoint"):
        train(module, _loss_fn(module, x, y), LoopConfig(steps=10, lr=1e-2, out_dir=tmp_path, progress=False))


def test_pad_and_step_indices():
    tokens, mask = pad([[1, 2, 3], [4]], pad_id=0, side="right")
    assert tokens.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist()[1] == [True, False, False]
    with pytest.raises(ValueError, match="side"):
        pad([[1]], 0, side="middle")
    epoch = [i for s in range(8) for i in step_indices(256, 32, s, seed=1)]
    assert sorted(epoch) == list(range(256))  # one epoch visits every row once
    assert step_indices(256, 32, 3, seed=1) == step_indices(256, 32, 3, seed=1)
    assert step_indices(256, 32, 8, seed=1) != step_indices(256, 32, 0, seed=1)


def test_checkpoint_moved_aside_by_a_kill_is_restored(tmp_path):
    module, x, y = _problem()
    train(
        module,
        _loss_fn(module, x, y),
        LoopConfig(steps=5, lr=1e-2, checkpoint_every=5, out_dir=tmp_path, progress=False),
    )
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.99-beef.old")  # killed mid-swap
    fresh, _, _ = _problem(seed=5)
    assert checkpoint.load(tmp_path, fresh, torch.optim.AdamW(fresh.parameters()))["step"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
