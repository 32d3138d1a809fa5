"""Helpers for the converter tests: shared-folder lookup, MNIST reading, models, diffs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgeopt.data import read_idx  # noqa: F401  (re-exported for the fixtures)

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"


def shared_file(*parts: str) -> Path:
    """Return a file under the shared folder beside the repository, or skip the test."""
    path = SHARED.joinpath(*parts).resolve()
    if not path.exists():
        pytest.skip(
            f"../shared/{'/'.join(parts)} not found: the shared data beside the repo is absent"
        )
    return path


def normalise(images: np.ndarray) -> np.ndarray:
    """Scale raw 0-255 MNIST pixels to the mean/std normalisation the CNN is trained with."""
    return ((images / 255.0 - 0.1307) / 0.3081).astype(np.float32)


class SmallCnn(nn.Module):
    """A student-like CNN (conv, BN, ReLU6, depthwise conv, linear head) with 111k parameters."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU6(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16),
            nn.BatchNorm2d(16),
            nn.ReLU6(),
            nn.Conv2d(16, 32, 1),
            nn.BatchNorm2d(32),
            nn.ReLU6(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU6(),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU6(), nn.Linear(64, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference between two arrays, as a Python float."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def torch_run(model: nn.Module, x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Run `model` in its current mode without gradients and return a float32 array."""
    tensor = torch.as_tensor(x)
    with torch.no_grad():
        return model(tensor).numpy()
