"""The target registry: every named target, built on first use."""

from __future__ import annotations

from edgeopt.errors import TargetError
from edgeopt.targets._adb import adb_targets
from edgeopt.targets._base import Target
from edgeopt.targets._local import local_targets
from edgeopt.targets._profiles import PredictedTarget, device_profiles


def list_targets() -> list[Target]:
    """Return every registered target: local ones, then adb devices, then predicted profiles."""
    predicted = [PredictedTarget(profile) for profile in device_profiles()]
    return [*local_targets(), *adb_targets(), *predicted]


def get_target(name: str) -> Target:
    """Return the target called `name`, or raise TargetError listing the valid names."""
    targets = list_targets()
    for target in targets:
        if target.name == name:
            return target
    names = ", ".join(target.name for target in targets)
    raise TargetError(f"unknown target {name!r}: choose one of {names} (edgeopt targets list)")
