"""The study on a real pretrained model (SmolLM2-135M-Instruct and its fine-tune) as a library call.

Needs the ``[real]`` extra (``make real``) and the fine-tune ``python -m mechdiff.real train``
(about an hour on 2 cores; cached outside the repository). :func:`run` runs the stages of
``cfg.stages`` (behaviour, sweep, adapters, hesitation, lora, cost: see
:mod:`mechdiff.studies.real_stages`), each by default in its own process so its peak memory is its
own, each leaving ``STAGE.json`` in ``out`` and skipped when that is already there (unless
``cfg.redo`` names it, or it was made with other adapters than ``cfg`` trains). The result holds
the summary of whatever stages are done in ``out``, with the organism's numbers beside them.

Example:
    >>> import tempfile
    >>> cfg = RealConfig(stages=["behaviour"], n_problems=20)
    >>> out = tempfile.mkdtemp()

    Not run as a doctest: the stages load SmolLM2 and train for minutes to hours.
    >>> result = run(cfg, out, progress=False)  # doctest: +SKIP
    >>> result.summary()["target"]["accuracy"]  # doctest: +SKIP
    0.25
    >>> sorted(result.figures())  # doctest: +SKIP
    ['accuracy', 'hesitations_per_response']
    >>> (result.write(out) / "report.md").is_file()  # doctest: +SKIP
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mechdiff.studies import real_report
from mechdiff.studies.real_config import STAGES, RealConfig, adapter_folder, done, stale
from mechdiff.studies.real_stages import run_isolated, run_stage

ROOT = Path(__file__).resolve().parents[2]
ORGANISM = {  # the organism's committed study outputs, shown beside SmolLM2's
    "behaviour": ROOT / "mechdiff/adapters/shipped/organism/adapters.json",
    "hesitation": ROOT / "figures/hesitation/summary.json",
    "lora": ROOT / "figures/lora/summary.json",
    "features": ROOT / "figures/features/summary.json",
}

__all__ = ["ORGANISM", "STAGES", "RealConfig", "RealResult", "adapter_folder", "run", "stale"]


@dataclass
class RealResult:
    """What :func:`run` found in its folder: :meth:`summary` (the ``summary.json`` content),
    :meth:`figures` (plotly figures that display inline), :meth:`report` (markdown) and
    :meth:`write` (all of them into a folder)."""

    data: dict
    out: Path  # the folder holding the stages' JSON

    def summary(self) -> dict:
        return self.data

    def figures(self) -> dict:
        return real_report.figures(self.data)

    def report(self) -> str:
        return real_report.report_markdown(self.data)

    def write(self, out: str | Path | None = None) -> Path:
        """``summary.json``, the figures (HTML + PNG) and ``report.md``, into ``out`` (default: the stages' folder)."""
        return real_report.write_summary(Path(out) if out is not None else self.out, self.data)


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[real] {msg}", flush=True)


def run(
    cfg: RealConfig | None = None,
    out: str | Path = "figures/real",
    *,
    progress: bool = True,
    isolate: bool = True,
    organism: dict | None = None,
) -> RealResult:
    """Run the stages of ``cfg`` that are not done in ``out``, then summarize ``out``.

    ``isolate``: each stage in a fresh Python process (default; its peak memory is its own and the
    caller's torch settings stay untouched), else in this one. ``organism``: where the organism's
    numbers are read from (default :data:`ORGANISM`, the committed study outputs).
    """
    cfg = cfg or RealConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stage in cfg.stages:
        if done(cfg, out, stage):
            _log(f"{stage}: done ({out / f'{stage}.json'})", progress)
            continue
        _log(f"{stage} ...", progress)
        (run_isolated if isolate else run_stage)(cfg, out, stage, progress)
    return RealResult(real_report.summarize(out, ORGANISM if organism is None else organism), out)
