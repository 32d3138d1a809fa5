"""The local latency harness: warm up, repeat until the median is stable, record memory."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeopt._logging import get_logger
from edgeopt.errors import EdgeoptInputError
from edgeopt.targets._runners import check_model_file, open_session, runtime_for_path
from edgeopt.targets._stats import LatencyStats, median_relative_error, summarize

logger = get_logger(__name__)

DEFAULT_WARMUP = 10
DEFAULT_MIN_RUNS = 50
# Share of the budget that is always spent timing, so a fast model gets thousands of runs.
MIN_BUDGET_SHARE = 0.1
DEFAULT_MAX_RUNS = 20_000
DEFAULT_BUDGET_S = 5.0
DEFAULT_CV_TARGET = 0.005
# Seconds the memory probe may take (interpreter start, runtime import, load and a few runs).
MEMORY_PROBE_TIMEOUT_S = 120.0


def measure_latency(
    model_path: str | Path,
    *,
    runtime: str | None = None,
    threads: int = 1,
    example: np.ndarray | None = None,
    warmup: int = DEFAULT_WARMUP,
    min_runs: int = DEFAULT_MIN_RUNS,
    max_runs: int = DEFAULT_MAX_RUNS,
    budget_s: float = DEFAULT_BUDGET_S,
    cv_target: float = DEFAULT_CV_TARGET,
    memory: bool = True,
) -> LatencyStats:
    """Measure the latency of one inference of `model_path` on this machine.

    The model runs `warmup` times untimed, then in rounds. Timing stops once at least
    `min_runs` runs and a tenth of `budget_s` are spent and the relative standard error of the
    median is at most `cv_target`. It also stops after `max_runs` runs or `budget_s` seconds.
    Only the runtime's run call is timed (ONNX Runtime `session.run`, LiteRT `invoke`), so
    input copies are not counted.

    `runtime` defaults to the one of the file's suffix (.onnx: "onnxruntime", .tflite: "litert").
    `example` is one input of the model's input shape; without it a random tensor of the model's
    first input shape and dtype is used (int8 inputs get random int8 values).

    With `memory`, `peak_memory_bytes` is the peak resident-set growth of a fresh Python process
    that loads the model and runs it a few times, over the same process just before loading.
    The runtime library itself is excluded, the weights, arena and runtime state of this model
    are included. This costs about a second for the extra process.
    """
    path = check_model_file(model_path)
    runtime = runtime_for_path(path, runtime)
    if min_runs < 1 or max_runs < min_runs:
        raise EdgeoptInputError(
            f"invalid min_runs={min_runs}, max_runs={max_runs}: need 1 <= min_runs <= max_runs"
        )
    if budget_s <= 0:
        raise EdgeoptInputError(f"invalid budget_s={budget_s}: use a positive number of seconds")

    session = open_session(path, runtime, threads)
    session.prepare_inputs(example)
    for _ in range(max(warmup, 0)):
        session.run()

    times = _time_until_stable(session.run, min_runs, max_runs, budget_s, cv_target)
    peak = measure_peak_memory(path, runtime, threads) if memory else None
    stats = summarize(
        times,
        warmup_runs=max(warmup, 0),
        threads=threads,
        peak_memory_bytes=peak,
        file_size_bytes=path.stat().st_size,
        source="measured-local",
    )
    logger.debug("measured %s on %s: %s", path.name, runtime, stats.describe())
    return stats


def _time_until_stable(
    run: Callable[[], None], min_runs: int, max_runs: int, budget_s: float, cv_target: float
) -> np.ndarray:
    """Return the times in seconds of calls of `run`, timed in rounds of doubling size."""
    clock = time.perf_counter_ns
    times: list[int] = []
    spent_ns = 0
    budget_ns = int(budget_s * 1e9)
    round_size = min_runs
    while True:
        for _ in range(min(round_size, max_runs - len(times))):
            start = clock()
            run()
            elapsed = clock() - start
            times.append(elapsed)
            spent_ns += elapsed
            if spent_ns >= budget_ns:
                break
        array = np.asarray(times, dtype=np.float64) * 1e-9
        if len(times) >= max_runs or spent_ns >= budget_ns:
            return array
        if (
            len(times) >= min_runs
            and spent_ns >= MIN_BUDGET_SHARE * budget_ns
            and median_relative_error(array) <= cv_target
        ):
            return array
        round_size = len(times)  # double the sample each round


def measure_peak_memory(model_path: Path, runtime: str, threads: int) -> int | None:
    """Return the peak RSS growth of a fresh process that loads and runs `model_path`.

    Returns None when the probe cannot run (no /proc on this system, or the probe failed).
    """
    command = [
        sys.executable,
        "-m",
        "edgeopt.targets._memory_probe",
        str(model_path),
        runtime,
        str(threads),
    ]
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=MEMORY_PROBE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        logger.warning(
            "memory probe of %s timed out after %s s", model_path, MEMORY_PROBE_TIMEOUT_S
        )
        return None
    if result.returncode != 0:
        logger.warning(
            "memory probe of %s failed (exit %s): %s",
            model_path,
            result.returncode,
            result.stderr.strip()[-500:],
        )
        return None
    try:
        value = json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_growth_bytes"]
    except (IndexError, KeyError, json.JSONDecodeError):
        logger.warning("memory probe of %s returned no result: %r", model_path, result.stdout)
        return None
    return None if value is None else int(value)
