"""Data-parallel training and evaluation over ``torch.distributed`` (one process per device).

Launch any script with ``torchrun --nproc_per_node N script.py``; in it call :func:`init` once.
Then:

* :func:`mechdiff.training.loop.train` notices the process group by itself: gradients are
  all-reduced (averaged) after every backward, every rank starts from rank 0's weights, only rank 0
  writes checkpoints and shows the progress bar, and the logged loss is the global one.
* a ``loss_fn(step)`` takes its rank's part of the step's global batch with :func:`shard` and
  rescales its mean with :func:`as_global_mean`, so that the averaged gradient equals the gradient
  of the single-process loss on the whole batch, even when ranks hold different token counts;
* :func:`mechdiff.evaluation.sharded.generate` splits prompts over ranks.

Everything works unchanged in a plain single process (world size 1): :func:`shard` returns the
rows, :func:`as_global_mean` the loss itself. Per-step randomness (the loop seeds every step) is the
same on every rank: draw global-batch-shaped noise and slice it with :func:`shard_bounds`.

Example (a complete loss_fn; runs as is in one process, and under torchrun)::

    >>> import torch
    >>> from mechdiff.training.batches import step_indices
    >>> x, w = torch.randn(64, 3), torch.nn.Linear(3, 1)
    >>> def loss_fn(step):
    ...     rows = shard(step_indices(len(x), 16, step, seed=0))
    ...     loss = w(x[rows]).pow(2).mean()
    ...     return as_global_mean(loss, len(rows)), {}
    >>> loss_fn(0)[0].shape
    torch.Size([])
"""

from __future__ import annotations

import os
import pickle
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, its ``device`` and the ``backend``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(backend: str | None = None, *, timeout_s: float = 1800) -> DistInfo:
    """Join the process group described by torchrun's environment; a no-op without one.

    ``backend``: ``"nccl"`` (default when CUDA is available; one GPU per process, chosen by
    ``LOCAL_RANK``) or ``"gloo"`` (CPU). Raises a clear error when the backend is not built into
    this torch, when torchrun's variables are half set, or when there are fewer GPUs than processes.

    >>> init().world_size  # not launched by torchrun: a single process
    1
    """
    if dist.is_available() and dist.is_initialized():
        return info()
    env = os.environ
    if "WORLD_SIZE" not in env or int(env["WORLD_SIZE"]) <= 1:
        return info()
    missing = [k for k in _TORCHRUN_ENV if k not in env]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={env['WORLD_SIZE']} but {missing} are not set: launch with "
            f"`torchrun --nproc_per_node N ...` (or mechdiff.distributed.spawn)"
        )
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed support")
    local_rank = int(env.get("LOCAL_RANK", env["RANK"]))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        if not dist.is_nccl_available() or not torch.cuda.is_available():
            raise RuntimeError(
                "backend 'nccl' needs a CUDA build of torch and visible GPUs; this "
                "torch has none (a CPU wheel?): use backend='gloo' on CPU"
            )
        n_gpus, local_world = torch.cuda.device_count(), int(env.get("LOCAL_WORLD_SIZE", 1))
        if local_world > n_gpus:
            raise RuntimeError(
                f"{local_world} processes on this node but only {n_gpus} GPUs: "
                f"use --nproc_per_node {n_gpus} (or set CUDA_VISIBLE_DEVICES)"
            )
        torch.cuda.set_device(local_rank)
    elif backend == "gloo":
        if not dist.is_gloo_available():
            raise RuntimeError("backend 'gloo' is not built into this torch: use 'nccl' on GPUs")
    else:
        raise ValueError(f"backend must be 'nccl' or 'gloo', not {backend!r}")
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return info()


def info() -> DistInfo:
    """This process's :class:`DistInfo` (rank 0 of 1 when no process group is running)."""
    if not is_distributed():
        return DistInfo(device="cuda" if torch.cuda.is_available() else "cpu")
    backend = dist.get_backend()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    device = f"cuda:{local}" if backend == "nccl" else "cpu"
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, backend, device)


def is_distributed() -> bool:
    """True inside an initialised process group (even of size 1)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that writes files and shows progress."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (call at the end of a torchrun script)."""
    if is_distributed():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- sharding


def shard_bounds(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank_``'s contiguous part of ``n`` rows (sizes differ by <= 1).

    >>> [shard_bounds(10, r, 3) for r in range(3)]
    [(0, 3), (3, 6), (6, 10)]
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if n < world:
        raise ValueError(
            f"a global batch of {n} rows cannot be split over {world} processes: use a batch size >= the world size"
        )
    return n * rank_ // world, n * (rank_ + 1) // world


def shard(rows: Sequence[int]) -> list[int]:
    """This rank's part of a step's global batch ``rows`` (all of it in a single process).

    >>> shard([7, 3, 9, 1])
    [7, 3, 9, 1]
    """
    start, stop = shard_bounds(len(rows))
    return list(rows[start:stop])


def _comm_device() -> torch.device:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_sum(x: Float[Tensor, "*shape"] | float) -> Float[Tensor, "*shape"]:
    """The sum of ``x`` over ranks, without gradient (e.g. a global token count or normaliser)."""
    t = torch.as_tensor(x).detach().to(_comm_device(), torch.float64).clone()
    if is_distributed():
        dist.all_reduce(t)
    return t


def as_global_mean(loss: Float[Tensor, ""], count: int | float | Tensor) -> Float[Tensor, ""]:
    """Rescale this rank's mean over ``count`` items so the ranks' *average* is the global mean.

    With gradients averaged over ranks (what :func:`mechdiff.training.loop.train` does), the step
    then equals a single-process step on the whole global batch. Identity in a single process.

    >>> as_global_mean(torch.tensor(2.5), 7)
    tensor(2.5000)
    """
    if world_size() == 1:
        return loss
    total = float(global_sum(float(count)))
    if total <= 0:
        raise ValueError("as_global_mean: no items on any rank")
    return loss * (float(count) * world_size() / total)


# ----------------------------------------------------------------------------- collectives


def all_reduce_grads(params: Iterable[torch.nn.Parameter], bucket_mb: float = 64) -> None:
    """Average ``.grad`` over ranks in place, in flat buckets (what DDP's reducer does).

    A parameter with no gradient on some ranks counts as zero there; one with no gradient on
    every rank keeps ``grad is None`` (so AdamW skips it, as in a single process).
    """
    params = list(params)
    if world_size() == 1 or not params:
        return
    dev = _comm_device()
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=dev)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = [p for p, h in zip(params, has.tolist(), strict=True) if h]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    limit, bucket, size = bucket_mb * 2**20, [], 0
    for p in live:
        bucket.append(p)
        size += p.grad.numel() * 4
        if size >= limit:
            _reduce_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(params: list[torch.nn.Parameter]) -> None:
    flat = torch.cat([p.grad.detach().reshape(-1).float() for p in params]).to(_comm_device())
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def broadcast_module(module: torch.nn.Module, src: int = 0, trainable_only: bool = False) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (as DDP does at construction);
    ``trainable_only``: only the parameters that require gradients."""
    if world_size() == 1:
        return
    tensors = [p for p in module.parameters() if p.requires_grad or not trainable_only]
    with torch.no_grad():
        for t in tensors + ([] if trainable_only else list(module.buffers())):
            buf = t.detach().to(_comm_device()).clone()
            dist.broadcast(buf, src)
            t.copy_(buf.to(t.device))


def gather(obj) -> list:
    """Every rank's ``obj`` (any picklable value), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- the loop's side


class LoopSync:
    """What :func:`mechdiff.training.loop.train` does differently under a process group."""

    def __init__(self):
        self.rank, self.world = rank(), world_size()

    @classmethod
    def current(cls, distributed: bool | None) -> LoopSync | None:
        """``None`` for a single process. ``distributed=None``: auto (a group of size > 1)."""
        if distributed is False or (distributed is None and world_size() == 1):
            return None
        if not is_distributed():
            raise RuntimeError(
                "train(distributed=True) needs a process group: launch with torchrun "
                "and call mechdiff.distributed.init() first"
            )
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def main_first(self, fn: Callable[[], object]) -> tuple[object, str | None]:
        """Run ``fn`` on rank 0, then on the others (e.g. a checkpoint load that may repair files)."""
        result, error = None, None
        for turn in (0, 1):
            if (self.rank == 0) == (turn == 0):
                try:
                    result = fn()
                except Exception as err:  # reported on every rank by start()
                    error = f"rank {self.rank}: {type(err).__name__}: {err}"
            dist.barrier()
        return result, error

    def start(self, module: torch.nn.Module, step: int, error: str | None) -> None:
        """Check every rank resumes at the same step with the same parameters' shapes; then
        give every rank rank 0's trainable weights."""
        shapes = [tuple(p.shape) for p in module.parameters() if p.requires_grad]
        states = gather((step, shapes, error))
        errors = [e for _, _, e in states if e]
        if errors:
            raise RuntimeError("resuming failed: " + "; ".join(errors))
        steps = [s for s, _, _ in states]
        if len(set(steps)) > 1:
            raise RuntimeError(
                f"ranks resumed at different steps {steps}: out_dir must be on a "
                f"filesystem every rank shares (or move it away to start afresh)"
            )
        if any(sh != states[0][1] for _, sh, _ in states):
            raise RuntimeError("ranks train differently shaped parameters: same settings everywhere?")
        broadcast_module(module, trainable_only=True)

    def grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        all_reduce_grads(params)

    def resync(self, module: torch.nn.Module) -> None:
        """After ``on_step`` (which may use rank-local statistics, e.g. resampling dead
        features): if any rank's weights drifted from rank 0's, rank 0's win."""
        with torch.no_grad():
            sums = torch.stack([p.detach().double().sum() for p in module.parameters() if p.requires_grad])
        sums = sums.to(_comm_device())
        ref = sums.clone()
        dist.broadcast(ref, 0)
        differs = torch.tensor(float(not torch.equal(sums, ref)), device=_comm_device())
        dist.all_reduce(differs, op=dist.ReduceOp.MAX)
        if differs.item():
            broadcast_module(module, trainable_only=True)

    def mean(self, loss: Tensor, metrics: dict[str, float]) -> tuple[float, dict[str, float]]:
        """The loss and every metric averaged over ranks (the loss is then the global loss)."""
        keys = gather(sorted(metrics))
        if any(k != keys[0] for k in keys):
            raise RuntimeError(f"loss_fn returned different metric names on different ranks: {keys}")
        vals = torch.tensor(
            [float(loss.detach())] + [float(metrics[k]) for k in keys[0]], dtype=torch.float64, device=_comm_device()
        )
        dist.all_reduce(vals)
        vals = (vals / self.world).tolist()
        return vals[0], dict(zip(keys[0], vals[1:], strict=True))

    def barrier(self) -> None:
        dist.barrier()


# ----------------------------------------------------------------------------- local launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank_: int, fn, world: int, port: int, backend: str, args: tuple, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank_),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank_),
        LOCAL_WORLD_SIZE=str(world),
    )
    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun: don't oversubscribe the cores
        torch.set_num_threads(1)
    init(backend)
    try:
        queue.put((rank_, pickle.dumps(fn(*args))))
    finally:
        cleanup()


def spawn(fn: Callable, world_size_: int, *args, backend: str = "gloo") -> list:
    """Run ``fn(*args)`` in ``world_size_`` fresh processes joined in a process group (as
    torchrun would); returns each rank's return value, in rank order.

    ``fn`` must be importable (defined at module level in an importable module).

    Example:
        Not run as a doctest: it starts two worker processes (seconds of start-up each).
        >>> spawn(_rank_and_world, 2)  # doctest: +SKIP
        [(0, 2), (1, 2)]
    """
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    procs = mp.start_processes(
        _entry,
        args=(fn, world_size_, _free_port(), backend, args, queue),
        nprocs=world_size_,
        start_method="spawn",
        join=False,
    )
    results: dict[int, bytes] = {}
    done = False
    while not done:  # drain while waiting: a large result would block its sender otherwise
        done = procs.join(timeout=0.05)  # raises if a rank failed
        while not queue.empty():
            r, payload = queue.get()
            results[r] = payload
    return [pickle.loads(results[r]) for r in range(world_size_)]


def _rank_and_world() -> tuple[int, int]:
    return rank(), world_size()
