"""Checking :mod:`mechdiff.estimate` against a run: the peak resident memory and the seconds of one
unit of a workload on a loaded pair (``python -m mechdiff.estimate --measure`` prints them beside
the prediction; ``tests/test_estimate.py`` holds the estimate to them).

Example:
    >>> from mechdiff.models import load_pair
    >>> got = measure_memory(load_pair("organism"), Workload("lora", batch_size=2, seq_len=16))
    >>> got["memory_growth"] > 0
    True
"""

from __future__ import annotations

import ctypes
import os
import threading

from mechdiff.estimate import Workload


class _PeakRSS:
    """Highest resident memory (Linux) seen by a 1 ms sampling thread, above what was live at the
    start. glibc keeps freed heap pages: measure() has large blocks mmapped, the heap is trimmed."""

    @staticmethod
    def rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @staticmethod
    def libc(call: str, *args) -> None:
        try:
            getattr(ctypes.CDLL("libc.so.6"), call)(*args)
        except (OSError, AttributeError):
            pass

    def __enter__(self):
        self.libc("malloc_trim", 0)
        self.start = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.growth = max(self.peak, self.rss()) - self.start


def _unit(pair, w: Workload):
    """A closure running one unit of ``w`` on ``pair`` (random tokens), and the modules it uses."""
    import torch

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, pair.target.cfg.d_vocab, (w.batch_size, w.seq_len), generator=gen)
    tokens = tokens.to(pair.target.cfg.device)

    if w.task in ("adapters", "attribution"):
        from mechdiff.adapters.transcoder import AdaptedModel
        from mechdiff.training.adapter_objective import AdapterObjective, LossWeights
        from mechdiff.training.loop import adamw

        adapted = AdaptedModel.from_pair(pair, w.d_sae)  # adapters follow the pair's device and dtype
        for p in pair.target.parameters():
            p.requires_grad_(False)
        if w.task == "attribution":
            from attribution.build import attribute

            return lambda: attribute(adapted, tokens[0], max_feature_nodes=w.feature_nodes, batch_size=w.batch_size), [
                adapted,
                adapted.model,
            ]
        weights = LossWeights(bridge=2.0 if w.bridge else 0.0)
        objective = AdapterObjective(adapted, pair.target, weights, checkpoint=w.recompute)
        opt = adamw(list(adapted.adapters.parameters()))
        mask = torch.ones_like(tokens, dtype=torch.bool)
        loss = lambda: objective(tokens, mask, cutoff=1)[0]  # noqa: E731 (the worst cutoff)
        modules = [adapted, adapted.model]
    elif w.task == "lora":
        from mechdiff.adapters.lora import LoRAConfig, LoRAModel
        from mechdiff.training.block_recompute import checkpointed_blocks
        from mechdiff.training.loop import adamw
        from mechdiff.training.lora_objective import distillation_loss

        lora = LoRAModel.from_base(pair.base, LoRAConfig(rank=w.lora_rank))
        opt = adamw(list(lora.layers.parameters()))
        keep = torch.ones((w.batch_size, w.seq_len - 1), dtype=torch.bool, device=tokens.device)

        def loss():
            target_logits = None
            if w.kl_weight:
                with torch.no_grad():
                    target_logits = pair.target(tokens)
            with checkpointed_blocks((lora.model,) if w.recompute else ()):
                return distillation_loss(lora(tokens), tokens, keep, target_logits, w.kl_weight)[0]

        modules = [lora]
    else:
        from mechdiff.generation import generate

        return lambda: generate(
            pair.target, tokens.tolist(), w.new_tokens, eos_token_id=-1, batch_size=w.batch_size
        ), []

    def step():
        value = loss()
        opt.zero_grad()
        value.backward()
        opt.step()

    return step, modules


def measure_memory(pair, w: Workload) -> dict[str, float]:
    """Peak memory of one unit of ``w`` (after a warm-up unit) above what was live before it
    (``max_memory_allocated`` on CUDA, sampled resident memory on CPU), and the bytes autograd
    saved (a unit under ``saved_tensors_hooks``). On CPU it has glibc mmap every block >= 64 KiB,
    so resident memory follows live memory: call it before any timing (:func:`measure_time`)."""
    import torch

    cuda = str(pair.target.cfg.device).startswith("cuda")
    run, modules = _unit(pair, w)
    saved: dict[int, int] = {}

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    if not cuda:
        _PeakRSS.libc("mallopt", -3, 65536)  # M_MMAP_THRESHOLD
    try:
        run()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            run()
            growth = torch.cuda.max_memory_allocated() - before
        else:
            with _PeakRSS() as rss:
                run()
            growth = rss.growth
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        if not cuda:
            _PeakRSS.libc("mallopt", -3, 32 * 2**20)  # glibc's usual ceiling (fast allocation)
    params = {p.untyped_storage().data_ptr() for m in [pair.base, pair.target, *modules] for p in m.parameters()}
    return {"memory_growth": growth, "saved_bytes": sum(v for k, v in saved.items() if k not in params)}


def measure_time(pair, w: Workload, units: int = 2) -> float:
    """Seconds per unit of ``w``, after one untimed unit."""
    import torch

    cuda = str(pair.target.cfg.device).startswith("cuda")
    from mechdiff.measure import mean_seconds

    run, _ = _unit(pair, w)
    return mean_seconds(run, units, sync=torch.cuda.synchronize if cuda else None)
