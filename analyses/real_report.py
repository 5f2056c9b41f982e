"""Moved to :mod:`mechdiff.studies.real_report` (the summary, figures and report of the study on
SmolLM2); kept here so ``from analyses import real_report`` still works.

Example:
    >>> from mechdiff.studies import real_report
    >>> write is real_report.write
    True
"""

from mechdiff.studies.real_report import (
    ADAPTER_TARGETS,
    adapter_targets,
    figures,
    organism_numbers,
    real_numbers,
    report_markdown,
    summarize,
    write,
)

__all__ = [
    "ADAPTER_TARGETS",
    "adapter_targets",
    "figures",
    "organism_numbers",
    "real_numbers",
    "report_markdown",
    "summarize",
    "write",
]
