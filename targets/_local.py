"""Targets measured on this machine: ONNX Runtime CPU and LiteRT with XNNPACK."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeopt.targets._base import Target
from edgeopt.targets._measure import measure_latency
from edgeopt.targets._runners import default_threads
from edgeopt.targets._stats import LatencyStats


class LocalTarget(Target):
    """A runtime on this machine's CPU with a fixed number of threads.

    The precision is "any": fp32 and int8 files both run, and the file decides.
    """

    latency_source = "measured-local"
    precision = "any"

    def __init__(self, name: str, runtime: str, threads: int, description: str) -> None:
        self.name = name
        self.runtime = runtime
        self.threads = threads
        self.description = description

    def measure(
        self,
        model_path: str | Path,
        example: np.ndarray | None = None,
        *,
        budget_s: float = 5.0,
    ) -> LatencyStats:
        path = self.check_model(model_path)
        return measure_latency(
            path, runtime=self.runtime, threads=self.threads, example=example, budget_s=budget_s
        )

    def available(self) -> tuple[bool, str]:
        module = "onnxruntime" if self.runtime == "onnxruntime" else "ai_edge_litert.interpreter"
        try:
            __import__(module)
        except ImportError as error:
            return False, f"cannot import {module}: {error}"
        return True, ""


def local_targets() -> list[LocalTarget]:
    """Return the four local targets: each runtime with one thread and with all cores."""
    cores = default_threads()
    return [
        LocalTarget(
            "onnxruntime-cpu",
            "onnxruntime",
            1,
            "ONNX Runtime CPU execution provider on this machine, 1 thread",
        ),
        LocalTarget(
            "onnxruntime-cpu-mt",
            "onnxruntime",
            cores,
            f"ONNX Runtime CPU execution provider on this machine, {cores} threads (all cores)",
        ),
        LocalTarget(
            "litert-xnnpack",
            "litert",
            1,
            "LiteRT interpreter with the XNNPACK delegate on this machine, 1 thread",
        ),
        LocalTarget(
            "litert-xnnpack-mt",
            "litert",
            cores,
            f"LiteRT interpreter with the XNNPACK delegate on this machine, {cores} threads "
            "(all cores)",
        ),
    ]
