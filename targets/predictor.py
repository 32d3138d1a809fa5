"""Look-up-table latency predictor: a model's latency is the sum of its kernels' latencies.

`calibrate(target)` takes every kernel that the student search space produces (for the default
input shapes: the digits 1×8×8 and MNIST 1×28×28) and times two models of it on a local target:
one copy and `KERNEL_COPIES` copies side by side. The difference divided by `KERNEL_COPIES - 1`
is the kernel's cost inside a model, free of the invoke overhead that a one-kernel model pays.
The per-model overhead is then fitted by least squares on a few whole students exported with
the real converter. All these models are timed interleaved (`time_interleaved`), so a change of
the shared machine's speed during calibration hits kernels and students alike.
`LatencyPredictor.predict(model, input_shape)` walks a torch model, looks up each kernel and
returns the estimate with a per-kernel breakdown. Kernels missing from the table are
interpolated from kernels of the same op and flagged.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeopt._logging import get_logger
from edgeopt.errors import EdgeoptInputError, TargetError
from edgeopt.students import (
    IMAGE_FAMILIES,
    SEARCH_SPACE,
    StudentConfig,
    build_student,
    max_stages,
    sample_config,
)
from edgeopt.targets._interleaved import fast_latency_ms, time_interleaved
from edgeopt.targets._kernel_models import build_onnx_kernel, build_tflite_kernel
from edgeopt.targets._kernels import Kernel, extract_kernels
from edgeopt.targets._runners import RUNTIME_SUFFIX, runtime_version

logger = get_logger(__name__)

# Version 2: kernel latencies are in-model costs from one-copy and many-copy models.
SCHEMA_VERSION = 2
DEFAULT_INPUT_SHAPES: tuple[tuple[int, ...], ...] = ((1, 8, 8), (1, 28, 28))
NUM_CLASSES = 10
# Seed of the whole students the overhead is fitted on; benchmarks draw with other seeds.
CALIBRATION_SEED = 7
CALIBRATION_MODELS_PER_SHAPE = 8
QUICK_CALIBRATION_MODELS_PER_SHAPE = 2
# Copies of a kernel in the many-copy model: more copies average more runs of the kernel
# against one invoke overhead, at the cost of a longer model.
KERNEL_COPIES = 4
CALIBRATION_ROUNDS = 12
QUICK_CALIBRATION_ROUNDS = 3
# Widths of the `--quick` space: enough kernels to exercise every op type, a tenth of the time.
QUICK_WIDTHS = (8, 16)
PACKAGED_TABLE_DIR = Path(__file__).parent / "tables"


def cache_dir() -> Path:
    """Directory of calibrated tables and cached kernel models: EDGEOPT_CACHE_DIR or ~/.cache."""
    configured = os.environ.get("EDGEOPT_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgeopt"


def machine_info() -> dict[str, Any]:
    """Return the CPU model, core count and Python version a table was calibrated on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "system": platform.system(),
        "python": platform.python_version(),
    }


# --- the kernels of the search space -----------------------------------------------------------


def space_configs(input_shape: Sequence[int], quick: bool = False) -> list[StudentConfig]:
    """Return students that together contain every kernel of the image search space.

    Only the largest depth is built: the blocks of a stage after its first are identical, so a
    shallower student's kernels are a subset of the deepest one's.
    """
    widths = QUICK_WIDTHS if quick else SEARCH_SPACE["width"]
    stages = [value for value in SEARCH_SPACE["stages"] if value <= max_stages(input_shape)]
    depth = max(SEARCH_SPACE["depth"])
    configs = []
    for family in IMAGE_FAMILIES:
        ratios = SEARCH_SPACE["expand_ratio"] if family == "inverted_residual" else (1,)
        for width in widths:
            for stage_count in stages:
                for ratio in ratios:
                    for kernel_size in SEARCH_SPACE["kernel_size"]:
                        for head_width in SEARCH_SPACE["head_width"]:
                            configs.append(
                                StudentConfig(
                                    family=family,
                                    width=width,
                                    stages=stage_count,
                                    depth=depth,
                                    expand_ratio=ratio,
                                    kernel_size=kernel_size,
                                    head_width=head_width,
                                )
                            )
    return configs


def student_kernels(
    config: StudentConfig, input_shape: Sequence[int], num_classes: int = NUM_CLASSES
) -> list[Kernel]:
    """Return the kernels of the student `config`, built on the meta device (no weights)."""
    with torch.device("meta"):
        model = build_student(config, input_shape, num_classes)
    return extract_kernels(model, input_shape)


def _kernels_of_shape(job: tuple[tuple[int, ...], bool, int]) -> list[Kernel]:
    input_shape, quick, num_classes = job
    found: dict[str, Kernel] = {}
    for config in space_configs(input_shape, quick):
        for kernel in student_kernels(config, input_shape, num_classes):
            found.setdefault(kernel.key, kernel)
    return list(found.values())


def space_kernels(
    input_shapes: Sequence[Sequence[int]] = DEFAULT_INPUT_SHAPES,
    *,
    quick: bool = False,
    num_classes: int = NUM_CLASSES,
) -> list[Kernel]:
    """Return the distinct kernels of the search space for `input_shapes`, sorted by key."""
    found: dict[str, Kernel] = {}
    for shape in input_shapes:
        for kernel in _kernels_of_shape((tuple(shape), quick, num_classes)):
            found.setdefault(kernel.key, kernel)
    return [found[key] for key in sorted(found)]


# --- the table ---------------------------------------------------------------------------------


@dataclass
class OverheadFit:
    """Per-model terms fitted by least squares.

    latency = intercept + scale · (sum of kernel latencies) + per_kernel · (kernel count).

    The intercept is the invoke overhead of a whole model (about 0.6 µs for LiteRT from Python
    on the machine of docs/benchmarks.md). With in-model kernel costs `scale` comes out near 1
    and `per_kernel_ms` near 0.
    """

    intercept_ms: float = 0.0
    scale: float = 1.0
    per_kernel_ms: float = 0.0
    models: list[dict[str, Any]] = field(default_factory=list)

    def apply(self, kernel_sum_ms: float, kernel_count: int) -> float:
        return self.intercept_ms + self.scale * kernel_sum_ms + self.per_kernel_ms * kernel_count


@dataclass
class LatencyTable:
    """Measured kernel latencies of one target, with the fitted per-model overhead.

    Each entry of `kernels` has the kernel's shapes (`kernel`), its cost inside a model
    (`latency_ms`), and the times of its one-copy and `KERNEL_COPIES`-copy models it was
    derived from (`single_ms`, `copies_ms`).
    """

    target: str
    runtime: str
    threads: int
    runtime_version: str
    machine: dict[str, Any]
    created: str
    input_shapes: list[list[int]]
    kernels: dict[str, dict[str, Any]]
    overhead: OverheadFit
    calibration_seconds: float = 0.0
    quick: bool = False
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyTable:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise TargetError(
                f"latency table of target {data.get('target')!r} has schema version {version!r}, "
                f"this edgeopt reads version {SCHEMA_VERSION}: run edgeopt targets calibrate "
                f"{data.get('target')} again"
            )
        fields = dict(data)
        fields["overhead"] = OverheadFit(**data["overhead"])
        return cls(**fields)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise TargetError(f"cannot read latency table {str(path)!r}: {error}") from error
        return cls.from_dict(data)


def table_path(target_name: str, directory: Path | None = None) -> Path:
    """Return where the calibrated table of `target_name` is written (the user cache)."""
    return (directory or cache_dir() / "tables") / f"{target_name}.json"


def find_table(target_name: str) -> Path | None:
    """Return the table of `target_name`: the user's calibration first, then the packaged one."""
    for path in (table_path(target_name), PACKAGED_TABLE_DIR / f"{target_name}.json"):
        if path.is_file():
            return path
    return None


# --- interpolation of kernels missing from the table --------------------------------------------


def _features(kernel: Kernel) -> list[float]:
    return [1.0, kernel.macs * 1e-6, kernel.activation_count * 1e-6, kernel.weight_count * 1e-6]


class _Interpolator:
    """Non-negative least-squares fit of latency on MACs, activations and weights per op."""

    def __init__(self, kernels: dict[str, dict[str, Any]]) -> None:
        from scipy.optimize import nnls

        groups: dict[tuple[Any, ...], list[tuple[Kernel, float]]] = {}
        for entry in kernels.values():
            kernel = Kernel.from_dict(entry["kernel"])
            for group in self._groups(kernel):
                groups.setdefault(group, []).append((kernel, entry["latency_ms"]))
        self._coefficients: dict[tuple[Any, ...], np.ndarray] = {}
        for group, samples in groups.items():
            if len(samples) < 3:
                continue
            design = np.asarray([_features(kernel) for kernel, _ in samples])
            target = np.asarray([latency for _, latency in samples])
            self._coefficients[group] = nnls(design, target)[0]

    @staticmethod
    def _groups(kernel: Kernel) -> list[tuple[Any, ...]]:
        return [(kernel.op, kernel.kernel_size, kernel.stride), (kernel.op,)]

    def predict(self, kernel: Kernel) -> float | None:
        for group in self._groups(kernel):
            coefficients = self._coefficients.get(group)
            if coefficients is not None:
                return float(np.dot(coefficients, _features(kernel)))
        return None


# --- prediction ---------------------------------------------------------------------------------


@dataclass
class KernelEstimate:
    """One kernel's share of a prediction; `interpolated` when it was not in the table."""

    key: str
    op: str
    macs: int
    latency_ms: float
    interpolated: bool


@dataclass
class Prediction:
    """Predicted latency of one model on one target; always an estimate."""

    target: str
    latency_ms: float
    kernel_sum_ms: float
    overhead_ms: float
    kernels: list[KernelEstimate]
    interpolated: int
    estimate: bool = True

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class LatencyPredictor:
    """Predict latencies on a target from its calibrated `LatencyTable`."""

    def __init__(self, table: LatencyTable) -> None:
        self.table = table
        self._interpolator = _Interpolator(table.kernels)

    @classmethod
    def for_target(cls, target_name: str) -> LatencyPredictor:
        """Load the table of `target_name`, or raise TargetError saying how to calibrate it."""
        path = find_table(target_name)
        if path is None:
            raise TargetError(
                f"no latency table for target {target_name!r}: run "
                f"edgeopt targets calibrate {target_name}"
            )
        table = LatencyTable.load(path)
        current = machine_info()["cpu"]
        if table.machine.get("cpu") != current:
            logger.warning(
                "latency table %s was calibrated on %r, this machine is %r: predictions for "
                "%s may be off until it is calibrated here",
                path,
                table.machine.get("cpu"),
                current,
                target_name,
            )
        return cls(table)

    def kernel_latency(self, kernel: Kernel) -> tuple[float, bool]:
        """Return the latency of `kernel` in ms and whether it was interpolated."""
        entry = self.table.kernels.get(kernel.key)
        if entry is not None:
            return float(entry["latency_ms"]), False
        estimate = self._interpolator.predict(kernel)
        if estimate is None:
            raise TargetError(
                f"latency table of {self.table.target!r} has no {kernel.op!r} kernels to "
                f"interpolate {kernel.key!r} from: calibrate with input shapes that use it"
            )
        return estimate, True

    def predict_kernels(self, kernels: Sequence[Kernel]) -> Prediction:
        """Predict the latency of a model made of `kernels`."""
        estimates = []
        for kernel in kernels:
            latency, interpolated = self.kernel_latency(kernel)
            estimates.append(
                KernelEstimate(kernel.key, kernel.op, kernel.macs, latency, interpolated)
            )
        kernel_sum = sum(item.latency_ms for item in estimates)
        total = self.table.overhead.apply(kernel_sum, len(estimates))
        return Prediction(
            target=self.table.target,
            latency_ms=max(total, 0.0),
            kernel_sum_ms=kernel_sum,
            overhead_ms=total - kernel_sum,
            kernels=estimates,
            interpolated=sum(item.interpolated for item in estimates),
        )

    def predict(self, model: nn.Module, input_shape: Sequence[int]) -> Prediction:
        """Predict the latency of one inference of `model` on a sample of `input_shape`."""
        return self.predict_kernels(extract_kernels(model, input_shape))

    def predict_config(
        self, config: StudentConfig, input_shape: Sequence[int], num_classes: int = NUM_CLASSES
    ) -> Prediction:
        """Predict the latency of the student `config` without building its weights."""
        return self.predict_kernels(student_kernels(config, input_shape, num_classes))


# --- calibration --------------------------------------------------------------------------------


def _write_kernel_model(kernel: Kernel, runtime: str, directory: Path, copies: int) -> Path:
    suffix = RUNTIME_SUFFIX[runtime]
    digest = hashlib.sha1(f"{kernel.key}x{copies}".encode()).hexdigest()[:16]
    path = directory / f"{digest}{suffix}"
    if not path.is_file():
        if runtime == "litert":
            data = build_tflite_kernel(kernel, copies)
        else:
            data = build_onnx_kernel(kernel, copies)
        partial = path.with_suffix(".partial")
        partial.write_bytes(data)
        partial.replace(path)
    return path


def _calibration_configs(
    input_shapes: Sequence[Sequence[int]], per_shape: int
) -> list[tuple[StudentConfig, tuple[int, ...]]]:
    rng = np.random.default_rng(CALIBRATION_SEED)
    return [
        (sample_config(rng, shape), tuple(shape))
        for shape in input_shapes
        for _ in range(per_shape)
    ]


def _model_file(config: StudentConfig, shape: tuple[int, ...], runtime: str, directory: Path):
    from edgeopt.targets._export import export_model

    key = json.dumps({"config": config.to_dict(), "shape": shape}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    path = directory / f"{digest}{RUNTIME_SUFFIX[runtime]}"
    if not path.is_file():
        torch.manual_seed(0)
        export_model(build_student(config, shape, NUM_CLASSES), shape, path)
    return path


def fit_overhead(samples: Sequence[tuple[float, int, float]]) -> OverheadFit:
    """Fit measured = intercept + scale·kernel_sum + per_kernel·count over (sum, count, measured).

    With fewer than four samples only the intercept is fitted (scale 1, per_kernel 0).
    """
    sums = np.asarray([item[0] for item in samples])
    counts = np.asarray([item[1] for item in samples], dtype=np.float64)
    measured = np.asarray([item[2] for item in samples])
    if len(samples) < 4:
        return OverheadFit(intercept_ms=float(np.mean(measured - sums)))
    design = np.column_stack([np.ones_like(sums), sums, counts])
    # Relative errors matter, so weight each model by 1 / measured latency.
    weights = 1.0 / np.maximum(measured, 1e-6)
    coefficients = np.linalg.lstsq(design * weights[:, None], measured * weights, rcond=None)[0]
    return OverheadFit(
        intercept_ms=float(coefficients[0]),
        scale=float(coefficients[1]),
        per_kernel_ms=float(coefficients[2]),
    )


def calibrate(
    target_name: str,
    *,
    input_shapes: Sequence[Sequence[int]] = DEFAULT_INPUT_SHAPES,
    quick: bool = False,
    output: str | Path | None = None,
) -> LatencyTable:
    """Time the search space's kernels on a local target and save its latency table.

    Returns the table, written to `output` or to the user cache (see `find_table`).
    """
    from edgeopt.targets._registry import get_target

    target = get_target(target_name)
    if target.latency_source != "measured-local":
        raise TargetError(
            f"cannot calibrate target {target_name!r}: its latency is {target.latency_source}, "
            "only targets measured on this machine can be calibrated (edgeopt targets list)"
        )
    for shape in input_shapes:
        if len(shape) != 3:
            raise EdgeoptInputError(
                f"invalid calibration input shape {tuple(shape)}: use (C, H, W) image shapes"
            )
    started = time.perf_counter()
    cache = cache_dir()
    kernel_dir = cache / "kernels" / target.runtime
    kernel_dir.mkdir(parents=True, exist_ok=True)

    kernels = space_kernels(input_shapes, quick=quick)
    per_shape = QUICK_CALIBRATION_MODELS_PER_SHAPE if quick else CALIBRATION_MODELS_PER_SHAPE
    students = _calibration_configs(input_shapes, per_shape)
    paths = []
    for kernel in kernels:
        paths.append(_write_kernel_model(kernel, target.runtime, kernel_dir, 1))
        paths.append(_write_kernel_model(kernel, target.runtime, kernel_dir, KERNEL_COPIES))
    for config, shape in students:
        paths.append(_model_file(config, shape, target.runtime, cache / "models"))
    rounds = QUICK_CALIBRATION_ROUNDS if quick else CALIBRATION_ROUNDS
    logger.info(
        "timing %s kernels and %s students on %s in %s rounds",
        len(kernels),
        len(students),
        target_name,
        rounds,
    )
    latencies = fast_latency_ms(
        time_interleaved(paths, runtime=target.runtime, threads=target.threads, rounds=rounds)
    )

    entries: dict[str, dict[str, Any]] = {}
    for index, kernel in enumerate(kernels):
        single, copies = (float(value) for value in latencies[2 * index : 2 * index + 2])
        entries[kernel.key] = {
            "kernel": kernel.to_dict(),
            # Clipped at 0 because timer noise can make the copies of a tiny kernel look free.
            "latency_ms": max((copies - single) / (KERNEL_COPIES - 1), 0.0),
            "single_ms": single,
            "copies_ms": copies,
            "macs": kernel.macs,
        }
    table = LatencyTable(
        target=target_name,
        runtime=target.runtime,
        threads=target.threads,
        runtime_version=runtime_version(target.runtime),
        machine=machine_info(),
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        input_shapes=[list(shape) for shape in input_shapes],
        kernels=entries,
        overhead=OverheadFit(),
        quick=quick,
    )
    measured = [float(value) for value in latencies[2 * len(kernels) :]]
    table.overhead = _fit_on_students(table, students, measured)
    table.calibration_seconds = time.perf_counter() - started
    path = table.save(output or table_path(target_name))
    logger.info(
        "calibrated %s in %.0f s: %s kernels, table %s",
        target_name,
        table.calibration_seconds,
        len(entries),
        path,
    )
    return table


def _fit_on_students(
    table: LatencyTable,
    students: Sequence[tuple[StudentConfig, tuple[int, ...]]],
    measured: Sequence[float],
) -> OverheadFit:
    predictor = LatencyPredictor(table)
    samples = []
    records = []
    for (config, shape), latency in zip(students, measured, strict=True):
        raw = predictor.predict_config(config, shape)
        samples.append((raw.kernel_sum_ms, len(raw.kernels), latency))
        records.append(
            {"config": config.to_dict(), "input_shape": list(shape), "measured_ms": latency}
        )
    fit = fit_overhead(samples)
    for record, (kernel_sum, count, _) in zip(records, samples, strict=True):
        record["predicted_ms"] = fit.apply(kernel_sum, count)
    fit.models = records
    return fit
