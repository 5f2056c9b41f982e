"""Moved to :mod:`mechdiff.studies.real_cost` (the cost stage of the study on SmolLM2); kept here so
``from analyses.real_cost import measure`` still works.

Example:
    >>> from mechdiff.studies import real_cost
    >>> measure is real_cost.measure
    True
"""

from mechdiff.studies.real_cost import measure

__all__ = ["measure"]
