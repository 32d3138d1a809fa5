"""Kernels of a torch model: the units a mobile runtime runs as one operator.

A kernel is a convolution with its BatchNorm and activation folded in (as LiteRT and ONNX
Runtime fuse them), a depthwise convolution, an elementwise add, a global mean pool or a fully
connected layer with its activation. `extract_kernels` records them by running the model once
under a `TorchFunctionMode`, so functional ops such as the residual `x + out` are seen as well
as modules, and any student built by `build_student` can be decomposed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from edgeopt._logging import get_logger

logger = get_logger(__name__)

KERNEL_OPS = ("conv", "depthwise", "add", "mean", "linear")
ACTIVATIONS = ("none", "relu", "relu6")


@dataclass(frozen=True)
class Kernel:
    """One fused operator and its shapes.

    Attributes:
        op: "conv", "depthwise", "add", "mean" or "linear".
        in_channels: input channels (input features for "linear").
        height: input height (1 for "linear").
        width: input width (1 for "linear").
        out_channels: output channels (output features for "linear"; in_channels otherwise).
        kernel_size: square kernel side of convolutions (1 otherwise).
        stride: convolution stride (1 otherwise).
        padding: zero padding on each side of convolution inputs (0 otherwise).
        activation: fused activation, "none", "relu" or "relu6".
    """

    op: str
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel_size: int = 1
    stride: int = 1
    padding: int = 0
    activation: str = "none"

    @property
    def key(self) -> str:
        """Stable name of the kernel in a latency table."""
        return (
            f"{self.op}:{self.in_channels}x{self.height}x{self.width}:{self.out_channels}"
            f":k{self.kernel_size}s{self.stride}p{self.padding}:{self.activation}"
        )

    @property
    def out_height(self) -> int:
        return (self.height + 2 * self.padding - self.kernel_size) // self.stride + 1

    @property
    def out_width(self) -> int:
        return (self.width + 2 * self.padding - self.kernel_size) // self.stride + 1

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one run (input elements for "add" and "mean")."""
        if self.op == "conv":
            return (
                self.out_height
                * self.out_width
                * self.out_channels
                * self.kernel_size**2
                * self.in_channels
            )
        if self.op == "depthwise":
            return self.out_height * self.out_width * self.out_channels * self.kernel_size**2
        if self.op == "linear":
            return self.in_channels * self.out_channels
        return self.in_channels * self.height * self.width

    @property
    def weight_count(self) -> int:
        """Weights and biases of the kernel after BatchNorm folding."""
        if self.op == "conv":
            return self.out_channels * (self.kernel_size**2 * self.in_channels + 1)
        if self.op == "depthwise":
            return self.out_channels * (self.kernel_size**2 + 1)
        if self.op == "linear":
            return self.out_channels * (self.in_channels + 1)
        return 0

    @property
    def activation_count(self) -> int:
        """Elements of the input and output activations (both inputs for "add")."""
        inputs = self.in_channels * self.height * self.width
        if self.op == "add":
            return 3 * inputs
        if self.op == "mean":
            return inputs + self.in_channels
        return inputs + self.out_channels * self.out_height * self.out_width

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Kernel:
        return cls(**data)


class _KernelRecorder(TorchFunctionMode):
    """Record fused kernels from the torch functions called during one forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: list[Kernel] = []
        # Output tensor id -> index of the kernel that produced it, for BN and activation fusion.
        self._producer: dict[int, int] = {}
        self._alive: list[torch.Tensor] = []  # keeps ids unique while recording
        self.skipped: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = _output_like(func, args, kwargs)
        if result is None:
            result = func(*args, **kwargs)
        if isinstance(result, torch.Tensor):
            self._record(func, args, kwargs, result)
        return result

    def _emit(self, kernel: Kernel, output: torch.Tensor) -> None:
        self.kernels.append(kernel)
        self._producer[id(output)] = len(self.kernels) - 1
        self._alive.append(output)

    def _fuse(self, source: torch.Tensor, output: torch.Tensor, activation: str | None) -> bool:
        index = self._producer.get(id(source))
        if index is None:
            return False
        kernel = self.kernels[index]
        if activation is not None:
            if kernel.activation != "none" or kernel.op not in ("conv", "depthwise", "linear"):
                return False
            self.kernels[index] = dataclasses.replace(kernel, activation=activation)
        self._producer[id(output)] = index
        self._alive.append(output)
        return True

    def _record(self, func, args, kwargs, result: torch.Tensor) -> None:
        if func in (F.conv2d, torch.conv2d):
            self._record_conv(args, kwargs, result)
        elif func is F.batch_norm:
            self._fuse(args[0], result, None)
        elif func is F.hardtanh and _hardtanh_bounds(args, kwargs) == (0.0, 6.0):
            if not self._fuse(args[0], result, "relu6"):
                self.skipped.add("hardtanh")
        elif func in (F.relu, torch.relu, F.relu6):
            activation = "relu6" if func is F.relu6 else "relu"
            if not self._fuse(args[0], result, activation):
                self.skipped.add(activation)
        elif func is F.linear:
            source = args[0]
            self._emit(
                Kernel("linear", int(source.shape[-1]), 1, 1, int(result.shape[-1])), result
            )
        elif func in (F.adaptive_avg_pool2d, torch.mean, torch.Tensor.mean):
            source = args[0]
            if source.dim() == 4:
                _, channels, height, width = (int(size) for size in source.shape)
                self._emit(Kernel("mean", channels, height, width, channels), result)
        elif func in (torch.Tensor.__add__, torch.Tensor.add, torch.add, torch.Tensor.__radd__):
            source = args[0]
            if isinstance(args[1], torch.Tensor) and source.dim() == 4:
                _, channels, height, width = (int(size) for size in source.shape)
                self._emit(Kernel("add", channels, height, width, channels), result)
        elif func in (torch.flatten, torch.Tensor.flatten, torch.Tensor.view, torch.reshape):
            return  # free in both runtimes: a reshape of a contiguous buffer
        elif getattr(func, "__name__", "") not in _IGNORED:
            self.skipped.add(getattr(func, "__name__", repr(func)))

    def _record_conv(self, args: Sequence[Any], kwargs: dict[str, Any], result: torch.Tensor):
        source, weight = args[0], args[1]
        names = ("stride", "padding", "dilation", "groups")
        options = dict(zip(names, args[3:], strict=False)) | kwargs
        stride = _first(options.get("stride", 1))
        padding = _first(options.get("padding", 0))
        groups = int(options.get("groups", 1))
        _, in_channels, height, width = (int(size) for size in source.shape)
        out_channels = int(weight.shape[0])
        if groups == in_channels and groups > 1:
            op = "depthwise"
        elif groups == 1:
            op = "conv"
        else:
            self.skipped.add(f"grouped conv (groups={groups})")
            return
        kernel = Kernel(
            op,
            in_channels,
            height,
            width,
            out_channels,
            kernel_size=int(weight.shape[-1]),
            stride=stride,
            padding=padding,
        )
        self._emit(kernel, result)


def _output_like(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """Return an uninitialized output of the right shape for the ops a student spends its time in.

    Only shapes matter for kernel extraction, and on the meta device torch runs these ops
    through slow Python decompositions, so they are skipped. Other ops run for real (None).
    """
    if func in (F.batch_norm, F.hardtanh, F.relu, torch.relu, F.relu6):
        return torch.empty_like(args[0])
    if func is F.linear:
        source, weight = args[0], args[1]
        return source.new_empty((*source.shape[:-1], int(weight.shape[0])))
    if func in (F.conv2d, torch.conv2d):
        source, weight = args[0], args[1]
        names = ("stride", "padding", "dilation")
        options = dict(zip(names, args[3:6], strict=False)) | kwargs
        stride, padding = _first(options.get("stride", 1)), options.get("padding", 0)
        dilation = _first(options.get("dilation", 1))
        if isinstance(padding, str) or any(
            not isinstance(options.get(name, 1), int) and len(set(options.get(name, (1,)))) > 1
            for name in names
        ):
            return None  # "same" padding or a non-square setting: let torch work it out
        padding = _first(padding)
        size = int(weight.shape[-1])
        height, width = (
            (int(dim) + 2 * padding - dilation * (size - 1) - 1) // stride + 1
            for dim in source.shape[-2:]
        )
        return source.new_empty((int(source.shape[0]), int(weight.shape[0]), height, width))
    return None


_IGNORED = {"__get__", "dim", "size", "__getitem__", "contiguous", "numel", "__setitem__"}


def _first(value: Any) -> int:
    if isinstance(value, list | tuple):
        return int(value[0])
    return int(value)


def _hardtanh_bounds(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[float, float]:
    low = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
    high = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
    return float(low), float(high)


def extract_kernels(model: nn.Module, input_shape: Sequence[int]) -> list[Kernel]:
    """Return the fused kernels of one forward pass of `model` on a batch of one.

    `input_shape` is one sample's shape without the batch, e.g. (1, 28, 28). The pass runs on
    the meta device when the model's parameters are there, so no arithmetic is done then.
    """
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    example = torch.zeros(1, *input_shape, device=device)
    was_training = model.training
    model.eval()
    recorder = _KernelRecorder()
    try:
        with torch.no_grad(), recorder:
            model(example)
    finally:
        model.train(was_training)
    if recorder.skipped:
        logger.debug("kernel extraction skipped ops: %s", ", ".join(sorted(recorder.skipped)))
    return recorder.kernels
