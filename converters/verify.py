"""Numerical comparison of a converted model with its reference, per output and per layer."""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper
from torch import nn

from edgeopt._logging import get_logger
from edgeopt.converters import _common
from edgeopt.converters.runtime import ModelRuntime, OnnxRuntime, TorchRuntime, open_runtime
from edgeopt.errors import EdgeoptInputError

logger = get_logger(__name__)

# Layers whose SQNR falls below this are reported as the place where a quantized model diverges.
DIVERGENCE_SQNR_DB = 20.0
# Intermediate tensors are compared on at most this many samples to bound memory.
PER_LAYER_SAMPLES = 256


@dataclass(frozen=True)
class OutputComparison:
    """Agreement between one reference output and one candidate output."""

    name: str
    shape: tuple[int, ...]
    max_abs_diff: float
    mean_abs_diff: float
    cosine: float
    sqnr_db: float
    top1_agreement: float | None = None
    nonfinite: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Return the fields as plain Python values (JSON-serialisable)."""
        return {**dataclasses.asdict(self), "shape": list(self.shape)}


def compare_arrays(name: str, reference: np.ndarray, candidate: np.ndarray) -> OutputComparison:
    """Compare two arrays of the same shape; top-1 agreement is given for 2-D logits."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        raise EdgeoptInputError(
            f"output '{name}' has shape {candidate.shape} in the candidate but "
            f"{reference.shape} in the reference"
        )
    nonfinite = int(np.size(candidate) - np.isfinite(candidate).sum())
    diff = np.abs(reference - candidate)

    if reference.size == 0:
        return OutputComparison(name, reference.shape, 0.0, 0.0, 1.0, math.inf, None, 0)
    signal = float(np.sum(reference**2))
    noise = float(np.sum((reference - candidate) ** 2))
    if noise == 0.0:
        sqnr = math.inf
    elif signal == 0.0 or not math.isfinite(noise):
        sqnr = -math.inf
    else:
        sqnr = 10.0 * math.log10(signal / noise)
    norms = float(np.linalg.norm(reference) * np.linalg.norm(candidate))
    if norms == 0.0:
        cosine = 1.0 if np.array_equal(reference, candidate) else 0.0
    else:
        cosine = float(np.sum(reference * candidate) / norms)

    top1 = None
    if reference.ndim == 2 and reference.shape[1] > 1:
        top1 = float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1)))
    return OutputComparison(
        name=name,
        shape=tuple(reference.shape),
        max_abs_diff=float(np.max(diff)),
        mean_abs_diff=float(np.mean(diff)),
        cosine=cosine,
        sqnr_db=sqnr,
        top1_agreement=top1,
        nonfinite=nonfinite,
    )


def _match_names(
    reference: Mapping[str, Any], candidate: Mapping[str, Any]
) -> list[tuple[str, str]]:
    """Pair outputs by name, or by position when the two sides name them differently."""
    if set(reference) == set(candidate):
        return [(name, name) for name in reference]
    if len(reference) == len(candidate):
        pairs = list(zip(reference, candidate, strict=True))
        logger.info("output names differ, comparing by position: %s", pairs)
        return pairs
    raise EdgeoptInputError(
        f"cannot pair outputs: the reference has {list(reference)} and the candidate "
        f"{list(candidate)}"
    )


def compare_outputs(
    reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]
) -> dict[str, OutputComparison]:
    """Compare outputs by name (by position if the two sides use different names).

    Returns one `OutputComparison` per output, keyed by the reference's output name.
    """
    return {
        ref_name: compare_arrays(ref_name, reference[ref_name], candidate[cand_name])
        for ref_name, cand_name in _match_names(reference, candidate)
    }


@dataclass(frozen=True)
class LayerComparison:
    """Agreement of one intermediate tensor, found by name in both ONNX graphs."""

    tensor: str
    op_type: str
    sqnr_db: float
    cosine: float
    max_abs_diff: float

    def as_dict(self) -> dict[str, Any]:
        """Return the fields as plain Python values."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class VerificationReport:
    """Result of `verify`: per-output agreement, optional accuracies and per-layer agreement."""

    outputs: dict[str, OutputComparison]
    samples: int
    reference_accuracy: float | None = None
    candidate_accuracy: float | None = None
    per_layer: list[LayerComparison] | None = None
    first_divergence: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        """Largest absolute difference over all outputs."""
        return max((c.max_abs_diff for c in self.outputs.values()), default=0.0)

    @property
    def top1_agreement(self) -> float | None:
        """Lowest top-1 agreement over the outputs that are 2-D logits, if any."""
        values = [c.top1_agreement for c in self.outputs.values() if c.top1_agreement is not None]
        return min(values) if values else None

    def as_dict(self) -> dict[str, Any]:
        """Return the report as plain Python values."""
        return {
            "samples": self.samples,
            "outputs": {name: c.as_dict() for name, c in self.outputs.items()},
            "max_abs_diff": self.max_abs_diff,
            "top1_agreement": self.top1_agreement,
            "reference_accuracy": self.reference_accuracy,
            "candidate_accuracy": self.candidate_accuracy,
            "per_layer": None if self.per_layer is None else [c.as_dict() for c in self.per_layer],
            "first_divergence": self.first_divergence,
            "notes": list(self.notes),
        }


ModelLike = nn.Module | str | Path | ModelRuntime


def as_runtime(model: ModelLike, data: np.ndarray, threads: int = 1) -> ModelRuntime:
    """Wrap a module, file path or runtime as a `ModelRuntime`."""
    if isinstance(model, ModelRuntime):
        return model
    if isinstance(model, nn.Module):
        return TorchRuntime(model)
    if isinstance(model, (str, Path)):
        return open_runtime(model, threads=threads)
    raise EdgeoptInputError(
        f"expected an nn.Module, a model path or a ModelRuntime, got {type(model).__name__}"
    )


def _accuracy(outputs: Mapping[str, np.ndarray], labels: np.ndarray) -> float | None:
    for value in outputs.values():
        if value.ndim == 2 and value.shape[0] == len(labels) and value.shape[1] > 1:
            return float(np.mean(value.argmax(axis=1) == labels))
    return None


def _module_modes(models: list[Any]) -> Iterator[nn.Module]:
    for model in models:
        if isinstance(model, nn.Module):
            yield model


def verify(
    reference: ModelLike,
    candidate: ModelLike,
    data: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    per_layer: bool = False,
    batch_size: int | None = None,
    threads: int = 1,
) -> VerificationReport:
    """Run `reference` and `candidate` on `data` and compare their outputs by name.

    Modules run in eval() mode and get their own mode back afterwards, with an `ExportWarning`
    when a module was in train() mode. Verification does not update BatchNorm statistics.

    Args:
        reference: The model to trust: an nn.Module, a `.onnx`/`.tflite`/`.pt`/`.pt2` path or a
            `ModelRuntime`.
        candidate: The converted model, in any of the same forms.
        data: float32 inputs (N, ...), normalised as the models expect.
        labels: Optional class labels (N,) to report each side's top-1 accuracy.
        per_layer: Compare intermediate tensors too (both sides must be ONNX files), to find
            where a quantized model diverges.
        batch_size: Run in chunks of this many samples (default: all at once, or the file's
            fixed batch size).
        threads: Threads for file runtimes.
    """
    data = np.asarray(data)
    if data.ndim == 0 or len(data) == 0:
        raise EdgeoptInputError("verify needs at least one sample in data")
    if labels is not None and len(labels) != len(data):
        raise EdgeoptInputError(f"labels has {len(labels)} entries but data has {len(data)}")
    with ExitStack() as stack:
        for module in _module_modes([reference, candidate]):
            stack.enter_context(_common.eval_mode(module, "verification"))
        reference_runtime = as_runtime(reference, data, threads)
        candidate_runtime = as_runtime(candidate, data, threads)
        reference_outputs = reference_runtime.run(data, batch_size=batch_size)
        candidate_outputs = candidate_runtime.run(data, batch_size=batch_size)
    comparisons = compare_outputs(reference_outputs, candidate_outputs)
    report_args: dict[str, Any] = {"outputs": comparisons, "samples": len(data)}
    if labels is not None:
        labels = np.asarray(labels)
        report_args["reference_accuracy"] = _accuracy(reference_outputs, labels)
        report_args["candidate_accuracy"] = _accuracy(candidate_outputs, labels)
    if per_layer:
        layers = compare_layers(reference_runtime, candidate_runtime, data[:PER_LAYER_SAMPLES])
        report_args["per_layer"] = layers
        report_args["first_divergence"] = next(
            (layer.tensor for layer in layers if layer.sqnr_db < DIVERGENCE_SQNR_DB), None
        )
    return VerificationReport(**report_args)


def _topological_tensors(model: onnx.ModelProto) -> list[tuple[str, str]]:
    produced = []
    for node in model.graph.node:
        for output in node.output:
            if output:
                produced.append((output, node.op_type))
    return produced


def _with_outputs(model: onnx.ModelProto, names: list[str], path: Path) -> Path:
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {o.name for o in augmented.graph.output}
    for name in names:
        if name not in existing:
            augmented.graph.output.append(
                helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    onnx.save(augmented, path)
    return path


def compare_layers(
    reference: ModelRuntime, candidate: ModelRuntime, data: np.ndarray
) -> list[LayerComparison]:
    """Compare every float intermediate tensor that both ONNX graphs name the same way.

    For a QDQ candidate the tensor is read before its own QuantizeLinear. Each entry then shows
    the error accumulated from the inputs and weights of that layer and all earlier ones. Reading
    after the DequantizeLinear would show clipping that a following ReLU removes anyway. Tensors
    are listed in the reference graph's order.
    """
    if not (isinstance(reference, OnnxRuntime) and isinstance(candidate, OnnxRuntime)):
        # NOTE: TFLite files renumber and rename tensors, so per-layer matching covers ONNX only.
        raise EdgeoptInputError(
            "per_layer comparison needs two ONNX files (reference and candidate)"
        )
    reference_model = onnx.load(str(reference.path))
    candidate_model = onnx.load(str(candidate.path))
    reference_tensors = _topological_tensors(reference_model)
    candidate_names = {name for name, _ in _topological_tensors(candidate_model)}
    float_types = _float_tensors(reference_model)
    pairs = [
        (name, op, name)
        for name, op in reference_tensors
        if name in float_types and name in candidate_names
    ]
    with tempfile.TemporaryDirectory() as tmp:
        reference_path = _with_outputs(
            reference_model, [p[0] for p in pairs], Path(tmp) / "r.onnx"
        )
        candidate_path = _with_outputs(
            candidate_model, [p[2] for p in pairs], Path(tmp) / "c.onnx"
        )
        reference_values = OnnxRuntime(reference_path, threads=reference.threads).run(data)
        candidate_values = OnnxRuntime(candidate_path, threads=candidate.threads).run(data)
    layers = []
    for name, op, candidate_name in pairs:
        ref, cand = reference_values[name], candidate_values[candidate_name]
        if ref.shape != cand.shape:
            continue
        comparison = compare_arrays(name, ref, cand)
        layers.append(
            LayerComparison(
                tensor=name,
                op_type=op,
                sqnr_db=comparison.sqnr_db,
                cosine=comparison.cosine,
                max_abs_diff=comparison.max_abs_diff,
            )
        )
    return layers


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    inferred = onnx.shape_inference.infer_shapes(model)
    values = list(inferred.graph.value_info) + list(inferred.graph.output)
    return {v.name for v in values if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
