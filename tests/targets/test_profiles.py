from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from edgeopt.metrics import count_macs
from edgeopt.targets import (
    device_profiles,
    get_target,
    inspect_model,
    local_profile,
    measure_latency,
    roofline,
)
from edgeopt.targets._profiles import PROFILE_DIR

from .conftest import INPUT_SHAPE

NUMBERS = (
    "clock_ghz",
    "simd_width_bits",
    "fma_pipes",
    "fp32_macs_per_cycle",
    "int8_macs_per_cycle",
    "memory_bandwidth_gbps",
    "cache_bytes",
    "cache_bandwidth_gbps",
)


def test_three_device_profiles() -> None:
    names = {profile.name for profile in device_profiles()}
    assert names == {"cortex-a76", "cortex-a72-rpi4", "cortex-a55"}


@pytest.mark.parametrize("path", sorted(PROFILE_DIR.glob("*.json")), ids=lambda path: path.stem)
def test_every_number_has_source_or_assumption(path: Path) -> None:
    data = json.loads(path.read_text())
    for name in NUMBERS:
        assert name in data["sources"] or name in data["assumptions"], name


@pytest.mark.parametrize("path", sorted(PROFILE_DIR.glob("*.json")), ids=lambda path: path.stem)
def test_macs_per_cycle_consistent(path: Path) -> None:
    data = json.loads(path.read_text())
    lanes = data["simd_width_bits"] // 32
    assert data["fp32_macs_per_cycle"] == data["fma_pipes"] * lanes


@pytest.mark.parametrize("fixture", ["onnx_model", "tflite_model"])
def test_inspect_macs_match_torch(fixture: str, request: pytest.FixtureRequest, student) -> None:
    info = inspect_model(request.getfixturevalue(fixture))
    assert info.macs == count_macs(student, INPUT_SHAPE)
    assert info.precision == "fp32"
    assert info.params > 0
    assert info.weight_bytes >= 4 * info.params * 0.9


def test_roofline_compute_term(tflite_model: Path) -> None:
    info = inspect_model(tflite_model)
    profile = next(p for p in device_profiles() if p.name == "cortex-a76")
    bound = roofline(info, profile)
    assert bound.compute_ms == pytest.approx(1e3 * info.macs / (8 * 2.84e9))
    assert bound.bound_ms == max(bound.compute_ms, bound.memory_ms)


def test_roofline_uses_dram_beyond_cache(tflite_model: Path) -> None:
    info = inspect_model(tflite_model)
    profile = next(p for p in device_profiles() if p.name == "cortex-a76")
    small_cache = dataclasses.replace(profile, cache_bytes=1)
    assert roofline(info, profile).cache_resident is True
    assert roofline(info, small_cache).cache_resident is False
    assert roofline(info, small_cache).memory_ms > roofline(info, profile).memory_ms


def test_roofline_below_measured_here(tflite_model: Path) -> None:
    bound = roofline(inspect_model(tflite_model), local_profile())
    measured = measure_latency(tflite_model, budget_s=0.3, memory=False)
    assert bound.bound_ms <= measured.median_ms


def test_slower_device_predicts_slower(tflite_model: Path) -> None:
    a76 = get_target("cortex-a76").measure(tflite_model, budget_s=0.3)
    a55 = get_target("cortex-a55").measure(tflite_model, budget_s=0.3)
    assert a76.estimate is True
    assert a76.source == "predicted"
    # Same local measurement scaled by each roofline; the A55 has half the A76's peak or less.
    assert a55.median_ms > a76.median_ms
