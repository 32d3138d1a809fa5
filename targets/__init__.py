"""Hardware targets: latency measurement, device profiles and latency prediction.

`get_target(name).measure(path)` returns the latency of a model file on a named target:
measured on this machine, measured on an Android phone over adb, or predicted from a device
profile. `list_targets()` shows them all. `LatencyPredictor.for_target(name)` predicts a torch
student's latency from a table written by `calibrate(name)`.
"""

from __future__ import annotations

from edgeopt.targets._adb import AdbTarget, parse_benchmark_output
from edgeopt.targets._base import Target
from edgeopt.targets._local import LocalTarget
from edgeopt.targets._measure import measure_latency
from edgeopt.targets._modelinfo import ModelInfo, inspect_model
from edgeopt.targets._profiles import (
    DeviceProfile,
    PredictedTarget,
    Roofline,
    device_profiles,
    local_profile,
    roofline,
)
from edgeopt.targets._registry import get_target, list_targets
from edgeopt.targets._stats import LatencyStats
from edgeopt.targets.predictor import LatencyPredictor, LatencyTable, Prediction, calibrate

__all__ = [
    "AdbTarget",
    "DeviceProfile",
    "LatencyPredictor",
    "LatencyStats",
    "LatencyTable",
    "LocalTarget",
    "ModelInfo",
    "PredictedTarget",
    "Prediction",
    "Roofline",
    "Target",
    "calibrate",
    "device_profiles",
    "get_target",
    "inspect_model",
    "list_targets",
    "local_profile",
    "measure_latency",
    "parse_benchmark_output",
    "roofline",
]
