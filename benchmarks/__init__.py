"""One script per measured figure, each printing its throughput beside a baseline from the same run."""

from mechdiff.measure import mean_seconds, peak_rss_gib

__all__ = ["mean_seconds", "peak_rss_gib"]
