"""Latency statistics of repeated runs of one model."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# Factor that turns the median absolute deviation into a standard deviation for normal data.
MAD_TO_SIGMA = 1.4826
# Asymptotic standard error of the median over that of the mean for normal data (sqrt(pi / 2)).
MEDIAN_SE_FACTOR = 1.2533


@dataclass
class LatencyStats:
    """Latency of one model on one target.

    Times are milliseconds per inference of one example. `cv` is the coefficient of variation
    (standard deviation / mean) of the timed runs, which a few stalled runs can inflate far past
    100% on a busy machine. `robust_cv` is 1.4826 × median absolute deviation / median, the
    same ratio for normal data but unmoved by such outliers. `estimate` is true when the figures
    are predicted rather than measured.
    """

    median_ms: float
    p90_ms: float
    mean_ms: float
    cv: float
    runs: int
    warmup_runs: int
    threads: int
    peak_memory_bytes: int | None
    file_size_bytes: int
    source: str
    estimate: bool = False
    robust_cv: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return the fields as plain JSON types."""
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """Return a one-line summary, with "(estimate)" when the figures are predicted."""
        label = " (estimate)" if self.estimate else ""
        return (
            f"median {self.median_ms:.4f} ms{label}, p90 {self.p90_ms:.4f} ms, "
            f"robust cv {self.robust_cv or 0.0:.1%} (cv {self.cv:.1%}), {self.runs} runs, "
            f"{self.threads} thread(s)"
        )


def median_relative_error(times: np.ndarray) -> float:
    """Return the relative standard error of the median of `times`.

    The spread comes from the median absolute deviation, so a few slow outliers (a context
    switch, a page fault) do not stop a measurement from converging.
    """
    count = len(times)
    median = float(np.median(times))
    if count < 2 or median <= 0.0:
        return math.inf
    sigma = MAD_TO_SIGMA * float(np.median(np.abs(times - median)))
    return MEDIAN_SE_FACTOR * sigma / (math.sqrt(count) * median)


def summarize(
    times_s: np.ndarray,
    *,
    warmup_runs: int,
    threads: int,
    peak_memory_bytes: int | None,
    file_size_bytes: int,
    source: str,
) -> LatencyStats:
    """Build `LatencyStats` from per-run times in seconds."""
    times_ms = np.asarray(times_s, dtype=np.float64) * 1e3
    mean = float(np.mean(times_ms))
    median = float(np.median(times_ms))
    mad = float(np.median(np.abs(times_ms - median)))
    return LatencyStats(
        median_ms=float(np.median(times_ms)),
        p90_ms=float(np.percentile(times_ms, 90)),
        mean_ms=mean,
        cv=float(np.std(times_ms) / mean) if mean > 0 else 0.0,
        runs=len(times_ms),
        warmup_runs=warmup_runs,
        threads=threads,
        peak_memory_bytes=peak_memory_bytes,
        file_size_bytes=file_size_bytes,
        source=source,
        estimate=False,
        robust_cv=MAD_TO_SIGMA * mad / median if median > 0 else 0.0,
    )
