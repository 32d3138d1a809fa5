"""The `Target` interface: a named place where a model's latency is measured or predicted."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.errors import TargetError
from edgeopt.targets._runners import RUNTIME_SUFFIX, check_model_file
from edgeopt.targets._stats import LatencyStats

LATENCY_SOURCES = ("measured-local", "measured-device", "predicted")
PRECISIONS = ("fp32", "int8", "any")


class Target(ABC):
    """A hardware target: a runtime on a device, with a thread count and a latency source.

    Attributes:
        name: registry name, e.g. "litert-xnnpack".
        runtime: "onnxruntime" or "litert"; the format of the files the target runs.
        threads: threads the runtime may use.
        precision: "fp32" or "int8" when the target only runs that precision, "any" when the
            precision of the file measured decides.
        latency_source: "measured-local", "measured-device" or "predicted".
        description: one line for `edgeopt targets list`.
    """

    name: str
    runtime: str
    threads: int
    precision: str
    latency_source: str
    description: str

    @property
    def file_suffix(self) -> str:
        """Suffix of the model files this target runs: ".onnx" or ".tflite"."""
        return RUNTIME_SUFFIX[self.runtime]

    @abstractmethod
    def measure(
        self,
        model_path: str | Path,
        example: np.ndarray | None = None,
        *,
        budget_s: float = 5.0,
    ) -> LatencyStats:
        """Return the latency of one inference of `model_path` on this target."""

    @abstractmethod
    def available(self) -> tuple[bool, str]:
        """Return whether the target can be used now, and why not if it cannot."""

    def to_dict(self) -> dict[str, Any]:
        """Return the description of the target as plain JSON types."""
        usable, reason = self.available()
        return {
            "name": self.name,
            "runtime": self.runtime,
            "threads": self.threads,
            "precision": self.precision,
            "latency_source": self.latency_source,
            "file_suffix": self.file_suffix,
            "description": self.description,
            "available": usable,
            "reason": reason,
        }

    def check_model(self, model_path: str | Path) -> Path:
        """Return `model_path` as a Path after checking it exists and has this target's suffix."""
        path = check_model_file(model_path)
        if path.suffix.lower() != self.file_suffix:
            raise TargetError(
                f"target {self.name!r} runs {self.file_suffix} files, not {path.name!r}: "
                f"export the model to {self.file_suffix} or choose a target for {path.suffix} "
                "(edgeopt targets list)"
            )
        return path

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
