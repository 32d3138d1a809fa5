"""Device profiles of edge CPUs, roofline lower bounds and calibrated latency estimates.

A profile gives one core's clock, MACs per cycle (fp32 and int8), memory bandwidth and
last-level cache. The profile's JSON file records each number's source or assumption.
The roofline lower bound of a model is max(MACs / peak MAC rate, bytes / bandwidth), where bytes
are the model's weights plus every activation tensor once, and the bandwidth is the cache's
when those bytes fit in the cache (a repeated inference keeps them there) and DRAM's otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt._logging import get_logger
from edgeopt.errors import TargetError
from edgeopt.targets._base import Target
from edgeopt.targets._modelinfo import ModelInfo, inspect_model
from edgeopt.targets._stats import LatencyStats

logger = get_logger(__name__)

PROFILE_DIR = Path(__file__).parent / "profiles"


@dataclass(frozen=True)
class DeviceProfile:
    """Peak compute and memory figures of one CPU core, used for one thread."""

    name: str
    description: str
    cores: int
    clock_ghz: float
    simd_width_bits: int
    fma_pipes: int
    fp32_macs_per_cycle: float
    int8_macs_per_cycle: float
    memory_bandwidth_gbps: float
    cache_bytes: int
    cache_bandwidth_gbps: float
    example_devices: str = ""
    sources: dict[str, str] = field(default_factory=dict)
    assumptions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> DeviceProfile:
        data = json.loads(Path(path).read_text())
        known = {item.name for item in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    def peak_macs_per_s(self, precision: str = "fp32") -> float:
        per_cycle = self.int8_macs_per_cycle if precision == "int8" else self.fp32_macs_per_cycle
        return per_cycle * self.clock_ghz * 1e9

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Roofline:
    """Roofline lower bound of one model on one profile, in milliseconds."""

    profile: str
    compute_ms: float
    memory_ms: float
    bytes: int
    cache_resident: bool

    @property
    def bound_ms(self) -> float:
        return max(self.compute_ms, self.memory_ms)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"bound_ms": self.bound_ms}


def roofline(info: ModelInfo, profile: DeviceProfile) -> Roofline:
    """Return the roofline lower bound of the model described by `info` on `profile`."""
    traffic = info.weight_bytes + info.activation_bytes
    cache_resident = traffic <= profile.cache_bytes
    bandwidth = profile.cache_bandwidth_gbps if cache_resident else profile.memory_bandwidth_gbps
    return Roofline(
        profile=profile.name,
        compute_ms=1e3 * info.macs / profile.peak_macs_per_s(info.precision),
        memory_ms=1e3 * traffic / (bandwidth * 1e9),
        bytes=traffic,
        cache_resident=cache_resident,
    )


def device_profiles() -> list[DeviceProfile]:
    """Return the packaged device profiles, sorted by name."""
    return [DeviceProfile.load(path) for path in sorted(PROFILE_DIR.glob("*.json"))]


# --- this machine -------------------------------------------------------------------------------


def _cpu_flags_and_clock() -> tuple[set[str], float, str]:
    flags: set[str] = set()
    mhz = 0.0
    model = "unknown CPU"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features") and not flags:
            flags = set(value.split())
        elif key == "cpu MHz":
            mhz = max(mhz, float(value))
        elif key == "model name" and model == "unknown CPU":
            model = value.strip()
    try:
        max_khz = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()
        mhz = max(mhz, int(max_khz) / 1e3)
    except (OSError, ValueError):
        pass
    match = re.search(r"@\s*([\d.]+)\s*GHz", model)
    if match:
        mhz = max(mhz, float(match.group(1)) * 1e3)
    return flags, mhz, model


def _copy_bandwidth_gbps(nbytes: int, seconds: float = 0.05) -> float:
    """Return the best bandwidth of numpy copies of `nbytes` (read plus write), in GB/s."""
    source = np.ones(nbytes // 8, dtype=np.float64)
    target = np.zeros_like(source)
    target.fill(1.0)  # fault the pages in before timing
    best = 0.0
    deadline = time.perf_counter() + seconds
    for _ in range(3):
        start = time.perf_counter()
        np.copyto(target, source)
        elapsed = time.perf_counter() - start
        best = max(best, 2 * nbytes / elapsed / 1e9)
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        np.copyto(target, source)
        best = max(best, 2 * nbytes / (time.perf_counter() - start) / 1e9)
    return best


def _last_level_cache_bytes(default: int = 1024 * 1024) -> int:
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        units = {"K": 1024, "M": 1024 * 1024}
        if text[-1:] in units and text[:-1].isdigit():
            sizes.append(int(text[:-1]) * units[text[-1]])
    if not sizes:
        assumption = f"cache size unknown: {default} bytes assumed"
        logger.debug(assumption)
        return default
    return max(sizes)


@functools.cache
def local_profile() -> DeviceProfile:
    """Return the profile of this machine's CPU, one core.

    The peak MAC rate is declared from the CPU flags and the highest clock the system reports.
    It assumes two FMA pipes of the widest SIMD unit, an upper bound for current x86 and Arm
    cores, so the roofline stays a lower bound. Bandwidths are measured with numpy copies: a
    256 KiB buffer for the cache, 64 MiB for DRAM. The cache size is the last-level cache, so
    anything that fits in any cache is charged at the fastest measured cache bandwidth.
    """
    flags, mhz, model = _cpu_flags_and_clock()
    if "avx512f" in flags:
        width = 512
    elif "avx2" in flags or "avx" in flags:
        width = 256
    else:
        width = 128  # SSE or NEON (asimd)
    clock_ghz = mhz / 1e3 if mhz else 3.0
    lanes = width // 32
    cache_bytes = _last_level_cache_bytes()
    assumptions = {
        "fma_pipes": "two FMA pipes of the widest SIMD unit per core (declared, not measured)",
    }
    if not mhz:
        assumptions["clock_ghz"] = "the system reports no clock: 3.0 GHz assumed"
    return DeviceProfile(
        name="this-machine",
        description=f"{model}, 1 thread",
        cores=1,
        clock_ghz=clock_ghz,
        simd_width_bits=width,
        fma_pipes=2,
        fp32_macs_per_cycle=2 * lanes,
        int8_macs_per_cycle=2 * lanes * 4,
        memory_bandwidth_gbps=_copy_bandwidth_gbps(64 * 1024 * 1024, seconds=0.3),
        cache_bytes=cache_bytes,
        cache_bandwidth_gbps=_copy_bandwidth_gbps(256 * 1024),
        sources={
            "clock_ghz": "highest of /proc/cpuinfo 'cpu MHz', cpufreq max and the model name",
            "simd_width_bits": "CPU flags (avx512f, avx2) in /proc/cpuinfo",
            "memory_bandwidth_gbps": "measured: best numpy copy of 64 MiB",
            "cache_bandwidth_gbps": "measured: best numpy copy of 256 KiB",
            "cache_bytes": "largest /sys/devices/system/cpu/cpu0/cache/index*/size",
        },
        assumptions=assumptions,
    )


# --- predicted targets --------------------------------------------------------------------------


class PredictedTarget(Target):
    """A device estimated from its profile and a measurement on this machine.

    The estimate is the device's roofline bound times the ratio of the latency measured here
    (LiteRT, 1 thread) to this machine's roofline bound: the model is assumed to reach the same
    fraction of peak on both CPUs. It is labelled an estimate everywhere it is shown.
    """

    runtime = "litert"
    threads = 1
    precision = "any"
    latency_source = "predicted"

    def __init__(self, profile: DeviceProfile) -> None:
        self.profile = profile
        self.name = profile.name
        self.description = f"{profile.description} (estimate from the device profile)"

    def available(self) -> tuple[bool, str]:
        return True, ""

    def measure(
        self,
        model_path: str | Path,
        example: np.ndarray | None = None,
        *,
        budget_s: float = 5.0,
    ) -> LatencyStats:
        from edgeopt.targets._registry import get_target

        path = self.check_model(model_path)
        info = inspect_model(path)
        local = get_target("litert-xnnpack").measure(path, example, budget_s=budget_s)
        local_bound = roofline(info, local_profile()).bound_ms
        device_bound = roofline(info, self.profile).bound_ms
        if local_bound <= 0:
            raise TargetError(
                f"cannot estimate {path.name!r} on {self.name!r}: the model has no MACs or "
                "bytes to scale by"
            )
        ratio = device_bound / local_bound
        logger.debug(
            "%s: device roofline %.4f ms, local %.4f ms", self.name, device_bound, local_bound
        )
        return dataclasses.replace(
            local,
            median_ms=local.median_ms * ratio,
            p90_ms=local.p90_ms * ratio,
            mean_ms=local.mean_ms * ratio,
            source="predicted",
            estimate=True,
        )

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {"profile": self.profile.to_dict()}
