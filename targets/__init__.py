"""Hardware targets: latency measurement, device profiles and latency prediction.

`get_target(name).measure(path)` returns the latency of a model file on a named target:
measured on this machine, measured on an Android phone over adb, or predicted from a device
profile. `list_targets()` shows them all.
"""

from __future__ import annotations

from edgeopt.targets._base import Target
from edgeopt.targets._local import LocalTarget
from edgeopt.targets._measure import measure_latency
from edgeopt.targets._registry import get_target, list_targets
from edgeopt.targets._stats import LatencyStats

__all__ = [
    "LatencyStats",
    "LocalTarget",
    "Target",
    "get_target",
    "list_targets",
    "measure_latency",
]
