"""The built-in space of mobile-friendly students.

Image students are stacks of inverted-residual blocks (MobileNetV2, Sandler et al. 2018,
arXiv:1801.04381) or depthwise-separable blocks (MobileNetV1, Howard et al. 2017,
arXiv:1704.04861); vector students are MLPs. Every student is described by a `StudentConfig`,
which round-trips through JSON so that a saved student can be rebuilt from its description.
The same declarations (`SEARCH_SPACE`) are read by the architecture search and by the latency
predictor, so there is one list of knobs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeopt.errors import EdgeoptInputError

IMAGE_FAMILIES = ("inverted_residual", "depthwise_separable")
VECTOR_FAMILIES = ("mlp",)
FAMILIES = IMAGE_FAMILIES + VECTOR_FAMILIES

# Choices of each knob. The search samples from these lists; a user may pass other values.
SEARCH_SPACE: dict[str, tuple[Any, ...]] = {
    "family": IMAGE_FAMILIES,
    "width": (4, 8, 12, 16, 24, 32, 48),
    "stages": (1, 2, 3, 4),
    "depth": (1, 2, 3),
    "expand_ratio": (2, 3, 4, 6),
    "kernel_size": (3, 5),
    "head_width": (0, 32, 64, 128),
}
MLP_SEARCH_SPACE: dict[str, tuple[Any, ...]] = {
    "hidden": (16, 32, 64, 128, 256),
    "layers": (1, 2, 3),
}


@dataclass(frozen=True)
class StudentConfig:
    """Architecture description of one student.

    Attributes:
        family: "inverted_residual", "depthwise_separable" or "mlp".
        width: channels after the stem; each later stage doubles them (capped at 8 × width).
        stages: resolution stages; each starts with a stride-2 block.
        depth: blocks per stage.
        expand_ratio: hidden-channel multiplier of inverted-residual blocks.
        kernel_size: depthwise kernel size (3 or 5).
        head_width: channels of a 1×1 conv before pooling (0 for none).
        stem_stride: stride of the stem conv; 2 halves the resolution before the first stage,
            as MobileNets do, which cuts the cost of every later layer by about 4×.
        hidden: MLP hidden width.
        layers: MLP hidden layers.
    """

    family: str = "inverted_residual"
    width: int = 16
    stages: int = 2
    depth: int = 1
    expand_ratio: int = 4
    kernel_size: int = 3
    head_width: int = 0
    stem_stride: int = 1
    hidden: int = 64
    layers: int = 2

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise EdgeoptInputError(
                f"invalid student family {self.family!r}: choose one of {', '.join(FAMILIES)}"
            )
        for name in ("width", "stages", "depth", "expand_ratio", "hidden", "layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise EdgeoptInputError(
                    f"invalid student {name}={value!r}: expected a positive integer"
                )
        if self.kernel_size not in (1, 3, 5, 7):
            raise EdgeoptInputError(
                f"invalid student kernel_size={self.kernel_size!r}: choose 1, 3, 5 or 7"
            )
        if self.stem_stride not in (1, 2):
            raise EdgeoptInputError(
                f"invalid student stem_stride={self.stem_stride!r}: use 1 or 2"
            )
        if self.head_width < 0:
            raise EdgeoptInputError(f"invalid student head_width={self.head_width!r}: use >= 0")

    @property
    def is_image(self) -> bool:
        return self.family in IMAGE_FAMILIES

    def to_dict(self) -> dict[str, Any]:
        """Return the knobs that matter for this family, as plain JSON types."""
        if self.family == "mlp":
            return {"family": self.family, "hidden": self.hidden, "layers": self.layers}
        data = {
            "family": self.family,
            "width": self.width,
            "stages": self.stages,
            "depth": self.depth,
            "kernel_size": self.kernel_size,
            "head_width": self.head_width,
        }
        if self.family == "inverted_residual":
            data["expand_ratio"] = self.expand_ratio
        if self.stem_stride != 1:
            data["stem_stride"] = self.stem_stride
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudentConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EdgeoptInputError(
                f"unknown student setting(s) {', '.join(unknown)}: "
                f"valid settings are {', '.join(sorted(known))}"
            )
        return cls(**data)


# --- blocks -------------------------------------------------------------------------------


def conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    activation: bool = True,
) -> nn.Sequential:
    """Conv2d → BatchNorm2d → ReLU6, the unit that mobile runtimes fuse into one kernel."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
    ]
    if activation:
        layers.append(nn.ReLU6(inplace=False))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1×1 expansion → depthwise k×k → linear 1×1 projection, with a skip when shapes allow."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, expand_ratio: int, kernel_size: int
    ) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_act(in_channels, hidden, 1))
        layers.append(conv_bn_act(hidden, hidden, kernel_size, stride=stride, groups=hidden))
        layers.append(conv_bn_act(hidden, out_channels, 1, activation=False))
        self.body = nn.Sequential(*layers)
        self.use_skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.use_skip else out


class DepthwiseSeparable(nn.Module):
    """Depthwise k×k → pointwise 1×1, each followed by BatchNorm and ReLU6."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, kernel_size: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_act(in_channels, in_channels, kernel_size, stride=stride, groups=in_channels),
            conv_bn_act(in_channels, out_channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ImageStudent(nn.Module):
    """A stem, `stages` resolution stages of blocks, global average pooling and a classifier.

    Input: float32 N×C×H×W. Output: N×num_classes logits.
    """

    def __init__(self, config: StudentConfig, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.stem = conv_bn_act(in_channels, width, 3, stride=config.stem_stride)
        blocks: list[nn.Module] = []
        channels = width
        for stage in range(config.stages):
            out_channels = width * min(2 ** (stage + 1), 8)
            for index in range(config.depth):
                stride = 2 if index == 0 else 1
                if config.family == "inverted_residual":
                    block: nn.Module = InvertedResidual(
                        channels, out_channels, stride, config.expand_ratio, config.kernel_size
                    )
                else:
                    block = DepthwiseSeparable(channels, out_channels, stride, config.kernel_size)
                blocks.append(block)
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        if config.head_width:
            self.head = conv_bn_act(channels, config.head_width, 1)
            channels = config.head_width
        else:
            self.head = nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


class MLPStudent(nn.Module):
    """`layers` hidden Linear → ReLU layers of width `hidden`, then a classifier."""

    def __init__(self, config: StudentConfig, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        features = in_features
        for _ in range(config.layers):
            layers += [nn.Linear(features, config.hidden), nn.ReLU()]
            features = config.hidden
        layers.append(nn.Linear(features, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.flatten(x, 1))


def max_stages(input_shape: Sequence[int], stem_stride: int = 1) -> int:
    """Return how many stride-2 stages an image of `input_shape` (C, H, W) can take."""
    smallest = min(input_shape[1], input_shape[2]) // stem_stride
    return max(1, math.floor(math.log2(max(smallest, 2))) - 1)


def build_student(
    config: StudentConfig, input_shape: Sequence[int], num_classes: int
) -> nn.Module:
    """Build the student described by `config` for one sample of `input_shape` (without batch)."""
    if config.is_image:
        if len(input_shape) != 3:
            raise EdgeoptInputError(
                f"student family {config.family!r} needs image input (C, H, W), but the data has "
                f"samples of shape {tuple(input_shape)}: use --student mlp for vector data"
            )
        limit = max_stages(input_shape, config.stem_stride)
        if config.stages > limit:
            raise EdgeoptInputError(
                f"student stages={config.stages} is too many for {input_shape[1]}×"
                f"{input_shape[2]} images with stem_stride={config.stem_stride}: use at most "
                f"{limit}"
            )
        return ImageStudent(config, input_shape[0], num_classes)
    return MLPStudent(config, int(np.prod(input_shape)), num_classes)


def sample_config(
    rng: np.random.Generator, input_shape: Sequence[int], family: str | None = None
) -> StudentConfig:
    """Draw a random student of the space that fits `input_shape`."""
    if len(input_shape) != 3:
        return StudentConfig(
            family="mlp",
            hidden=int(rng.choice(MLP_SEARCH_SPACE["hidden"])),
            layers=int(rng.choice(MLP_SEARCH_SPACE["layers"])),
        )
    stage_choices = [s for s in SEARCH_SPACE["stages"] if s <= max_stages(input_shape)]
    return StudentConfig(
        family=family or str(rng.choice(SEARCH_SPACE["family"])),
        width=int(rng.choice(SEARCH_SPACE["width"])),
        stages=int(rng.choice(stage_choices)),
        depth=int(rng.choice(SEARCH_SPACE["depth"])),
        expand_ratio=int(rng.choice(SEARCH_SPACE["expand_ratio"])),
        kernel_size=int(rng.choice(SEARCH_SPACE["kernel_size"])),
        head_width=int(rng.choice(SEARCH_SPACE["head_width"])),
    )


def size_student(
    family: str,
    input_shape: Sequence[int],
    num_classes: int,
    max_macs: float,
) -> StudentConfig:
    """Return the student of `family` with the most parameters within `max_macs` MACs.

    The candidates are a grid of widths and depths, with a stride-1 and a stride-2 stem for
    larger images. The cheapest candidate is returned when none fits the budget.
    """
    from edgeopt.metrics import count_macs, count_params

    candidates: list[StudentConfig] = []
    if family == "mlp":
        for hidden in MLP_SEARCH_SPACE["hidden"]:
            for layers in (1, 2):
                candidates.append(StudentConfig(family="mlp", hidden=hidden, layers=layers))
    else:
        # Images of 16 pixels or more also try a stride-2 stem, which leaves more of the
        # budget for width.
        strides = (1, 2) if min(input_shape[1], input_shape[2]) >= 16 else (1,)
        for stem_stride in strides:
            stages = min(2, max_stages(input_shape, stem_stride))
            for width in SEARCH_SPACE["width"]:
                for depth in (1, 2):
                    candidates.append(
                        StudentConfig(
                            family=family,
                            width=width,
                            stages=stages,
                            depth=depth,
                            expand_ratio=4,
                            stem_stride=stem_stride,
                        )
                    )
    scored = []
    for config in candidates:
        model = build_student(config, input_shape, num_classes)
        scored.append((count_macs(model, input_shape), count_params(model), config))
    fitting = [item for item in scored if item[0] <= max_macs]
    if not fitting:
        return min(scored, key=lambda item: item[0])[2]
    # Within the MAC budget, the most parameters is the most capacity.
    return max(fitting, key=lambda item: (item[1], item[0]))[2]


def load_student(run_dir: str | Path) -> nn.Module:
    """Rebuild the student saved in a run directory (`student.json` and `student.pt`).

    The weights are loaded with ``weights_only=True``, so a tampered file cannot run code.
    """
    folder = Path(run_dir)
    description_path = folder / "student.json"
    weights_path = folder / "student.pt"
    for path in (description_path, weights_path):
        if not path.is_file():
            raise EdgeoptInputError(f"{path} not found: is {folder} an edgeopt run directory?")
    description = json.loads(description_path.read_text())
    model = build_student(
        StudentConfig.from_dict(description["architecture"]),
        description["input_shape"],
        description["num_classes"],
    )
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return model.eval()
