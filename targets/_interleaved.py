"""Interleaved timing of many model files, robust to a shared machine's changing speed.

On a machine shared with other jobs the speed of one core changes for seconds at a time. On the
2-core AMD EPYC VM of docs/benchmarks.md, the median of 100 ms of single runs of one model
switched between about 23.7 µs and 29 µs. Four 1 s medians (`measure_latency`) of the same
student spread by 16% (median over 20 students, up to 36%). Timing each model once, one after
the other, gives each model a different share of slow periods. Here every model is timed in
short windows, round after round, so each one samples the whole run's mix of slow and fast
periods. Each window's median drops preempted runs, and a low quantile of the window medians
keeps the fast periods. Models timed in the same call are then comparable.

NOTE: that the fast periods show an idle machine's latency is an assumption, because the
machine was never idle while the figures above were taken.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeopt._logging import get_logger
from edgeopt.errors import EdgeoptInputError
from edgeopt.targets._runners import open_session

logger = get_logger(__name__)

DEFAULT_ROUNDS = 20
DEFAULT_WINDOW_S = 0.001
DEFAULT_WINDOW_RUNS = 10
# Untimed runs before each window, so caches hold this model again after the previous one.
WINDOW_WARMUP_RUNS = 3
# Quantile of the window medians kept as a model's latency: the fast periods, not the minimum,
# so one lucky window does not decide it.
FAST_QUANTILE = 0.1


def time_interleaved(
    model_paths: Sequence[str | Path],
    *,
    runtime: str,
    threads: int = 1,
    rounds: int = DEFAULT_ROUNDS,
    window_s: float = DEFAULT_WINDOW_S,
    window_runs: int = DEFAULT_WINDOW_RUNS,
    warmup: int = 20,
) -> np.ndarray:
    """Time `model_paths` in `rounds` round-robin passes and return the window medians in ms.

    All models are loaded first and run `warmup` times. In each round every model runs a
    window of at least `window_runs` single runs and at least `window_s` seconds, each run
    timed alone (the runtime's run call only, as `measure_latency` does). The result has one
    row per model and one column per round.
    """
    if rounds < 1 or window_runs < 1:
        raise EdgeoptInputError(
            f"invalid rounds={rounds}, window_runs={window_runs}: both must be at least 1"
        )
    if window_s < 0:
        raise EdgeoptInputError(f"invalid window_s={window_s}: use 0 or more seconds")
    sessions = []
    for path in model_paths:
        session = open_session(Path(path), runtime, threads)
        session.prepare_inputs(None)
        for _ in range(warmup):
            session.run()
        sessions.append(session)
    logger.debug("timing %s models in %s interleaved rounds", len(sessions), rounds)

    clock = time.perf_counter_ns
    window_ns = int(window_s * 1e9)
    medians = np.empty((len(sessions), rounds))
    for round_index in range(rounds):
        for model_index, session in enumerate(sessions):
            run = session.run
            for _ in range(WINDOW_WARMUP_RUNS):
                run()
            times: list[int] = []
            spent_ns = 0
            while len(times) < window_runs or spent_ns < window_ns:
                start = clock()
                run()
                elapsed = clock() - start
                times.append(elapsed)
                spent_ns += elapsed
            medians[model_index, round_index] = float(np.median(times)) * 1e-6
    return medians


def fast_latency_ms(window_medians: np.ndarray, quantile: float = FAST_QUANTILE) -> np.ndarray:
    """Return each row's `quantile` of window medians: the latency in the fast periods."""
    return np.quantile(np.asarray(window_medians), quantile, axis=-1)
