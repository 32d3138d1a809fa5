"""Android phones over adb: push the model, run LiteRT's `benchmark_model`, parse its output.

Needs a phone with USB debugging enabled and the `benchmark_model` binary for its CPU
(a prebuilt from the LiteRT releases, or built with
`bazel build -c opt --config=android_arm64 //tflite/tools/benchmark:benchmark_model`) pushed to
/data/local/tmp/benchmark_model. The adb executable is `EDGEOPT_ADB` or `adb` on the PATH; the
device is `EDGEOPT_ADB_SERIAL`, or the only one connected.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeopt._logging import get_logger
from edgeopt.errors import EdgeoptInputError, TargetError
from edgeopt.targets._base import Target
from edgeopt.targets._stats import LatencyStats

logger = get_logger(__name__)

REMOTE_DIR = "/data/local/tmp"
DEFAULT_BENCHMARK_BINARY = f"{REMOTE_DIR}/benchmark_model"
ADB_TIMEOUT_S = 60.0
# z-score of the 90th percentile of a normal distribution, for the p90 estimate from avg and std.
P90_Z = 1.2816

_RUN_LINE = re.compile(r"^count=(?P<count>\d+)\b(?P<rest>.*)$", re.MULTILINE)
_FIELD = re.compile(r"(\w+)=([-\d.eE+]+)")
_TIMINGS = re.compile(
    r"Inference timings in us: Init: (?P<init>[\d.]+), First inference: (?P<first>[\d.]+), "
    r"Warmup \(avg\): (?P<warmup>[\d.]+), Inference \(avg\): (?P<inference>[\d.]+)"
)
_FOOTPRINT = re.compile(
    r"Memory footprint delta.*?init=(?P<init>[\d.]+)\s+overall=(?P<overall>[\d.]+)"
)
_PEAK = re.compile(
    r"Overall peak memory footprint \(MB\) via periodic monitoring: (?P<peak>[\d.]+)"
)
_FILE_SIZE = re.compile(r"The input model file size \(MB\): (?P<size>[\d.]+)")
_THREADS = re.compile(r"Num threads: \[(?P<threads>\d+)\]")


@dataclass
class BenchmarkResult:
    """Figures parsed from one `benchmark_model` run; times in microseconds, memory in MB."""

    init_us: float
    first_inference_us: float
    warmup_avg_us: float
    inference_avg_us: float
    runs: int
    warmup_runs: int
    std_us: float | None
    median_us: float | None
    min_us: float | None
    max_us: float | None
    memory_init_mb: float | None
    memory_overall_mb: float | None
    peak_memory_mb: float | None
    file_size_mb: float | None
    threads: int | None


def parse_benchmark_output(text: str) -> BenchmarkResult:
    """Parse the standard output of LiteRT's `benchmark_model`.

    Raises TargetError when the "Inference timings in us" line is missing, which is what the
    tool prints on every successful run.
    """
    timings = _TIMINGS.search(text)
    if timings is None:
        tail = "\n".join(text.strip().splitlines()[-5:])
        raise TargetError(
            "benchmark_model printed no 'Inference timings in us' line, so the run failed: "
            f"its last lines were:\n{tail}"
        )
    runs = [
        (int(match.group("count")), dict(_FIELD.findall(match.group("rest"))))
        for match in _RUN_LINE.finditer(text)
    ]
    warmup_count, _ = runs[0] if len(runs) >= 2 else (0, {})
    count, fields = runs[-1] if runs else (0, {})

    def number(name: str) -> float | None:
        return float(fields[name]) if name in fields else None

    def optional(pattern: re.Pattern[str], group: str) -> float | None:
        match = pattern.search(text)
        return float(match.group(group)) if match else None

    footprint = _FOOTPRINT.search(text)
    threads = _THREADS.search(text)
    return BenchmarkResult(
        init_us=float(timings.group("init")),
        first_inference_us=float(timings.group("first")),
        warmup_avg_us=float(timings.group("warmup")),
        inference_avg_us=float(timings.group("inference")),
        runs=count,
        warmup_runs=warmup_count,
        std_us=number("std"),
        median_us=number("median"),
        min_us=number("min"),
        max_us=number("max"),
        memory_init_mb=float(footprint.group("init")) if footprint else None,
        memory_overall_mb=float(footprint.group("overall")) if footprint else None,
        peak_memory_mb=optional(_PEAK, "peak"),
        file_size_mb=optional(_FILE_SIZE, "size"),
        threads=int(threads.group("threads")) if threads else None,
    )


def to_latency_stats(result: BenchmarkResult, file_size_bytes: int, threads: int) -> LatencyStats:
    """Convert a parsed run to `LatencyStats` (source "measured-device")."""
    mean_ms = result.inference_avg_us / 1e3
    std_ms = (result.std_us or 0.0) / 1e3
    # NOTE: benchmark_model prints the median and percentiles only in some versions. Without
    # them the median is taken as the mean and p90 as mean + 1.28 std, assuming normal times.
    median_ms = result.median_us / 1e3 if result.median_us is not None else mean_ms
    peak_mb = result.peak_memory_mb or result.memory_overall_mb
    return LatencyStats(
        median_ms=median_ms,
        p90_ms=mean_ms + P90_Z * std_ms,
        mean_ms=mean_ms,
        cv=std_ms / mean_ms if mean_ms > 0 else 0.0,
        runs=result.runs,
        warmup_runs=result.warmup_runs,
        threads=result.threads or threads,
        peak_memory_bytes=int(peak_mb * 1024 * 1024) if peak_mb is not None else None,
        file_size_bytes=file_size_bytes,
        source="measured-device",
        estimate=False,
    )


def adb_path() -> str:
    """Return the adb executable: EDGEOPT_ADB, else `adb` on the PATH (may not exist)."""
    return os.environ.get("EDGEOPT_ADB") or shutil.which("adb") or "adb"


class AdbTarget(Target):
    """LiteRT's `benchmark_model` with XNNPACK on an Android device connected over adb."""

    runtime = "litert"
    precision = "any"
    latency_source = "measured-device"

    def __init__(
        self,
        name: str,
        threads: int,
        *,
        adb: str | None = None,
        serial: str | None = None,
        binary: str = DEFAULT_BENCHMARK_BINARY,
    ) -> None:
        self.name = name
        self.threads = threads
        self._adb = adb
        self._serial = serial
        self.binary = binary
        self.description = (
            f"Android device over adb, LiteRT benchmark_model with XNNPACK, {threads} thread(s) "
            "(needs a connected device)"
        )

    @property
    def adb(self) -> str:
        return self._adb or adb_path()

    @property
    def serial(self) -> str | None:
        return self._serial or os.environ.get("EDGEOPT_ADB_SERIAL") or None

    def _command(self, *args: str) -> list[str]:
        command = [self.adb]
        if self.serial:
            command += ["-s", self.serial]
        return command + list(args)

    def _run(self, *args: str, timeout: float = ADB_TIMEOUT_S) -> str:
        command = self._command(*args)
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, check=False
            )
        except FileNotFoundError as error:
            raise TargetError(
                f"adb not found at {self.adb!r}: install the Android platform tools or set "
                "EDGEOPT_ADB to the adb executable"
            ) from error
        except subprocess.TimeoutExpired as error:
            raise TargetError(
                f"{' '.join(command)} timed out after {timeout:.0f} s: check the device "
                "connection (adb devices)"
            ) from error
        if result.returncode != 0:
            raise TargetError(
                f"{' '.join(command)} failed with exit code {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()[-500:]}"
            )
        return result.stdout

    def available(self) -> tuple[bool, str]:
        adb = self.adb
        if shutil.which(adb) is None and not Path(adb).is_file():
            return False, f"adb not found at {adb!r} (set EDGEOPT_ADB)"
        try:
            listing = self._run("devices")
        except TargetError as error:
            return False, str(error)
        devices = [
            line.split()[0] for line in listing.splitlines()[1:] if line.strip().endswith("device")
        ]
        if not devices:
            return False, "no device connected (adb devices lists none in the 'device' state)"
        if self.serial and self.serial not in devices:
            return False, f"device {self.serial!r} not connected; connected: {', '.join(devices)}"
        return True, ""

    def measure(
        self,
        model_path: str | Path,
        example: np.ndarray | None = None,
        *,
        budget_s: float = 5.0,
    ) -> LatencyStats:
        """Push `model_path`, run `benchmark_model` for about `budget_s` seconds, parse it.

        `example` is not supported: benchmark_model feeds random inputs.
        """
        path = self.check_model(model_path)
        if example is not None:
            raise EdgeoptInputError(
                f"target {self.name!r} cannot use an example input: benchmark_model feeds "
                "random inputs; pass example=None"
            )
        remote = f"{REMOTE_DIR}/edgeopt-{uuid.uuid4().hex[:8]}{path.suffix}"
        self._run("push", str(path), remote, timeout=ADB_TIMEOUT_S)
        try:
            output = self._run(
                "shell",
                self.binary,
                f"--graph={remote}",
                f"--num_threads={self.threads}",
                "--use_xnnpack=true",
                f"--min_secs={budget_s:g}",
                "--warmup_min_secs=0.5",
                timeout=ADB_TIMEOUT_S + 3 * budget_s,
            )
        finally:
            try:
                self._run("shell", "rm", "-f", remote)
            except TargetError as error:
                logger.warning("could not remove %s from the device: %s", remote, error)
        stats = to_latency_stats(parse_benchmark_output(output), path.stat().st_size, self.threads)
        logger.debug("measured %s on %s: %s", path.name, self.name, stats.describe())
        return stats


def adb_targets() -> list[AdbTarget]:
    """Return the adb targets: one big-core thread and four threads."""
    return [AdbTarget("android-adb", 1), AdbTarget("android-adb-mt", 4)]
