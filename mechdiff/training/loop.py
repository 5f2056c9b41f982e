"""The one training loop: AdamW, linear warmup then cosine decay, gradient clipping, a progress
bar with the loss parts, periodic validation, atomic checkpoints and exact resume.

Objectives plug in as ``loss_fn(step) -> (loss, metrics)``: each draws its own batch from the step
number, so a resumed run sees exactly the batches an uninterrupted one would have seen.

Under ``torchrun`` (a ``torch.distributed`` process group, see :mod:`mechdiff.distributed`) the same
call trains data-parallel: gradients are averaged over ranks, rank 0 alone writes checkpoints and
shows the bar, and the logged loss and metrics are rank averages. A ``loss_fn`` then takes its
part of each global batch with :func:`mechdiff.distributed.shard`.

Ctrl-C (``KeyboardInterrupt``) during a step saves a checkpoint of the steps completed so far and
raises :class:`TrainingInterrupted` (a ``KeyboardInterrupt`` that says where the checkpoint is);
calling :func:`train` again with the same ``out_dir`` resumes exactly there.

Example:
    >>> import torch
    >>> w = torch.nn.Linear(2, 1)
    >>> x = torch.randn(64, 2); y = x @ torch.tensor([[1.0], [-2.0]])
    >>> def loss_fn(step):
    ...     loss = ((w(x) - y) ** 2).mean()
    ...     return loss, {"mse": loss.item()}
    >>> history = train(w, loss_fn, LoopConfig(steps=300, lr=0.05, progress=False))
    >>> history[-1]["mse"] < 1e-2
    True
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mechdiff.config_checks import check
from mechdiff.distributed import LoopSync
from mechdiff.training import checkpoint

LossFn = Callable[[int], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class LoopConfig:
    steps: int
    lr: float
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 200
    validate_every: int = 0  # 0: only at the end (when a validate function is given)
    out_dir: str | Path | None = None  # where checkpoints go; None: no checkpoints
    resume: bool = True
    progress: bool = True
    desc: str = "train"

    def __post_init__(self):
        self.betas = tuple(self.betas)  # read back from JSON as a list
        check(
            self,
            at_least_1=("steps", "log_every", "checkpoint_every"),
            positive=("lr", "grad_clip"),
            non_negative=("weight_decay", "validate_every"),
            fraction=("warmup_frac", "min_lr_frac"),
        )


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training after ``step`` completed steps; ``checkpoint`` holds them (or is
    ``None`` when the run writes no checkpoints)."""

    def __init__(self, step: int, checkpoint: Path | None):
        self.step, self.checkpoint = step, checkpoint
        where = (
            f"checkpoint saved to {checkpoint}; run the same command again to resume"
            if checkpoint
            else "no checkpoint (no out_dir)"
        )
        super().__init__(f"interrupted after step {step}: {where}")


def lr_factor(step: int, cfg: LoopConfig) -> float:
    """Linear warmup over ``warmup_frac`` of the steps, then cosine down to ``min_lr_frac``."""
    warmup = max(1, int(cfg.warmup_frac * cfg.steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw(params: list[torch.nn.Parameter], **kwargs) -> torch.optim.AdamW:
    """The project's AdamW: PyTorch's fused kernel where every parameter is on the CPU or a CUDA
    device (on SmolLM2's adapters a step takes a third of the per-tensor loop's time; the same
    update to float error), its default otherwise.

    >>> w = torch.nn.Parameter(torch.ones(3)); w.grad = torch.ones(3)
    >>> opt = adamw([w], lr=0.1); opt.step(); [round(v, 4) for v in w.tolist()]
    [0.899, 0.899, 0.899]
    """
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def _optimizer(module: torch.nn.Module, cfg: LoopConfig) -> torch.optim.AdamW:
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the module has no trainable parameters")
    return adamw(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def train(
    module: torch.nn.Module,
    loss_fn: LossFn,
    cfg: LoopConfig,
    validate: Callable[[], dict[str, float]] | None = None,
    on_step: Callable[[int], None] | None = None,
    *,
    distributed: bool | None = None,
) -> list[dict]:
    """Optimise the trainable parameters of ``module``; returns the logged history.

    ``on_step(step)`` runs after each optimiser step (e.g. to re-normalise or resample weights).
    ``distributed``: ``None`` (default) trains data-parallel exactly when a process group of more
    than one rank is running; ``False`` never does; ``True`` requires a process group.
    """
    sync = LoopSync.current(distributed)
    optimizer = _optimizer(module, cfg)
    out = Path(cfg.out_dir) if cfg.out_dir else None
    if sync is None:
        saved = checkpoint.load(out, module, optimizer) if (out and cfg.resume) else None
    else:  # rank 0 first: a load may repair a checkpoint killed between its renames
        saved, error = sync.main_first(
            lambda: checkpoint.load(out, module, optimizer) if (out and cfg.resume) else None
        )
        sync.start(module, saved["step"] if saved else 0, error)
    start, history = (saved["step"], saved["history"]) if saved else (0, [])
    bar = tqdm(
        range(start, cfg.steps),
        initial=start,
        total=cfg.steps,
        desc=cfg.desc,
        disable=not cfg.progress or (sync is not None and not sync.is_main),
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()
    done = start
    try:
        for step in bar:
            last = _backward(step, loss_fn, cfg, optimizer, sync)
            with _deferred_ctrl_c():  # a step's update is applied whole, or not at all
                optimizer.step()
                done = step + 1
                if on_step:
                    on_step(step)
                    if sync is not None:
                        sync.resync(module)
            if done % cfg.log_every == 0 or done == cfg.steps:
                history.append(_record(done, last, cfg, optimizer, sync, t0, validate, bar))
            if out and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                _save(out, module, optimizer, done, history, cfg, sync)
    except KeyboardInterrupt as err:
        bar.close()
        if isinstance(err, TrainingInterrupted) or sync is not None:
            raise  # under torchrun every rank is interrupted: rerun resumes from the last checkpoint
        if out is not None:
            # ``done`` counts whole steps: a Ctrl-C in a step's loss or backward leaves the weights
            # of ``done`` steps (that step is redone on resume); one during the update and
            # ``on_step`` waits for them to finish.
            _save(out, module, optimizer, done, history, cfg, sync)
        raise TrainingInterrupted(done, out / checkpoint.CHECKPOINT if out else None) from None
    if validate and history and not any(k.startswith("val_") for k in history[-1]):
        history[-1].update({f"val_{k}": v for k, v in validate().items()})
    return history


@contextlib.contextmanager
def _deferred_ctrl_c():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _backward(step, loss_fn, cfg, optimizer, sync) -> tuple:
    """One step's loss and clipped gradients (the optimiser step is the caller's)."""
    torch.manual_seed(cfg.seed * 1_000_003 + step)  # per-step randomness survives a resume
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * lr_factor(step, cfg)
    loss, metrics = loss_fn(step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if sync is not None:
        sync.grads(iter(params))
    return loss, metrics, torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)


def _record(done, last, cfg, optimizer, sync, t0, validate, bar) -> dict:
    loss, metrics, grad_norm = last
    loss_value, metrics = (loss.item(), metrics) if sync is None else sync.mean(loss, metrics)
    record = {
        "step": done,
        "loss": loss_value,
        "grad_norm": grad_norm.item(),
        "lr": optimizer.param_groups[0]["lr"],
        "seconds": time.perf_counter() - t0,
        **metrics,
    }
    if validate and cfg.validate_every and done % cfg.validate_every == 0:
        record.update({f"val_{k}": v for k, v in validate().items()})
    bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items()}, refresh=False)
    return record


def _save(out, module, optimizer, done, history, cfg, sync) -> None:
    if sync is None or sync.is_main:
        checkpoint.save(out, module, optimizer, {"step": done, "history": history, "config": _jsonable(cfg)})
    if sync is not None:
        sync.barrier()


def _jsonable(cfg: LoopConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg), default=str))
