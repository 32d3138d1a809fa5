"""Model size and compute counts: parameters, multiply-accumulates (MACs) and accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Return the number of distinct parameter elements (a tied weight counts once)."""
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
    return total


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Return the multiply-accumulates of one forward pass on a single sample of `input_shape`.

    Counted with PyTorch's FlopCounterMode, which reports 2 FLOPs per MAC for convolutions and
    matrix products (grouped and depthwise convolutions included). Elementwise ops, pooling and
    normalisation are not counted, as is usual for MAC figures of CNNs.
    """
    was_training = model.training
    model.eval()
    try:
        example = torch.zeros(1, *input_shape)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example)
        return int(counter.get_total_flops() // 2)
    finally:
        model.train(was_training)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Return top-1 accuracy of `logits` (N × classes) against integer `labels` (N,)."""
    if len(labels) == 0:
        return float("nan")
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Return the share of samples whose arg-max class is the same in both logit arrays."""
    return float(np.mean(np.argmax(reference, axis=1) == np.argmax(candidate, axis=1)))
