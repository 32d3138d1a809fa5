"""Fixtures for the converter tests: real MNIST images and a CNN trained on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from converter_helpers import SmallCnn, normalise, read_idx, shared_file
from torch import nn


@pytest.fixture(scope="session")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 MNIST test images as raw 0-255 float32 (N, 1, 28, 28) and their labels."""
    images = read_idx(shared_file("datasets", "mnist", "t10k-images-idx3-ubyte.gz"))
    labels = read_idx(shared_file("datasets", "mnist", "t10k-labels-idx1-ubyte.gz"))
    return images.astype(np.float32)[:, None], labels.astype(np.int64)


@pytest.fixture(scope="session")
def trained_cnn(mnist: tuple[np.ndarray, np.ndarray]) -> SmallCnn:
    """SmallCnn trained for two epochs on the first 5,000 MNIST test images (~97% accurate)."""
    torch.manual_seed(0)
    images, labels = mnist
    x = torch.from_numpy(normalise(images[:5000]))
    y = torch.from_numpy(labels[:5000])
    model = SmallCnn()
    epochs, batch = 2, 128
    steps = epochs * -(-len(x) // batch)
    optimiser = torch.optim.Adam(model.parameters(), lr=4e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=4e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), batch):
            index = order[start : start + batch]
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            optimiser.step()
            schedule.step()
    return model.eval()
