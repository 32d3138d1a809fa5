"""Export a PyTorch module to ONNX with a working dynamic batch, a chosen opset and checks.

The model is traced by the torch.export-based exporter (`torch.onnx.export(dynamo=True)`) at
opset 18 or later. Lower opsets are reached with ONNX's version converter after Softmax-family
nodes are rewritten to normalise over the last axis, whose meaning is the same before and after
opset 13. When the version converter cannot lower an operator (LayerNormalization has no
version before 17), the TorchScript exporter writes the requested opset directly. Every export
is then run in ONNX Runtime and compared with PyTorch on the example input, at the example's
batch size and, for a dynamic batch, at another one.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import helper, shape_inference, version_converter
from torch import nn

from edgeopt._logging import get_logger
from edgeopt.converters import _common, _onnx_graph
from edgeopt.converters._fp16 import onnx_weights_to_fp16, warn_clamped
from edgeopt.errors import ConversionError, EdgeoptInputError, UnsupportedOperatorError

logger = get_logger(__name__)

DEFAULT_OPSET = 18
MIN_OPSET = 7
# NOTE: 23 is the highest opset this module was run with (onnxruntime 1.32); raise it once a
# newer opset is tested end to end.
MAX_OPSET = 23
# Opset from which the torch.export-based exporter writes the graph without version conversion.
_DYNAMO_OPSET = 18
# Tolerance of the check against PyTorch, absolute and relative to the output's max magnitude.
_CHECK_TOLERANCE = 1e-4
# fp16 weights change outputs by about 1e-3 relative; beyond 1e-2 the export is treated as broken.
_FP16_TOLERANCE = 1e-2


@dataclass(frozen=True)
class OnnxExport:
    """An ONNX file written by `export_onnx`."""

    path: Path
    opset: int
    input_names: list[str]
    output_names: list[str]
    dynamic_batch: bool = True
    exporter: str = "dynamo"
    precision: str = "fp32"
    simplified: bool = False
    max_abs_diff: float = 0.0
    removed_duplicate_weights: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's progress prints and deprecation chatter; errors still propagate."""
    sink = io.StringIO()
    with (
        contextlib.redirect_stdout(sink),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*(TracerWarning|torch.jit|legacy).*")
        yield
    if sink.getvalue():
        logger.debug("exporter output:\n%s", sink.getvalue())


_OP_PATTERN = re.compile(r"aten[.:]{1,2}([A-Za-z0-9_]+)")


def unsupported_operator_error(
    exc: Exception, model: nn.Module, example: tuple[torch.Tensor, ...], converter: str
) -> ConversionError:
    """Turn a converter exception into a typed error naming the operator and its module path."""
    text = str(exc)
    logger.debug("%s failed", converter, exc_info=exc)
    match = _OP_PATTERN.search(text)
    if match is None:
        first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return ConversionError(
            f"{converter} failed: {first_line[:300]} (run with EDGEOPT_LOG_LEVEL=DEBUG for the "
            "converter's traceback)"
        )
    op = match.group(1)
    path = _common.module_path_for_op(model, example, op)
    where = f" in module '{path}'" if path else ""
    return UnsupportedOperatorError(
        f"{converter} cannot convert operator aten::{op}{where}; replace that layer with "
        "supported operators (or implement it with basic tensor ops), or try the other export "
        "format"
    )


def _dynamo_export(
    model: nn.Module,
    example: tuple[torch.Tensor, ...],
    input_names: list[str],
    dynamic_batch: bool,
    opset: int,
) -> onnx.ModelProto:
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} for _ in example)
    with _quiet_exporter():
        program = torch.onnx.export(
            model,
            example,
            None,
            dynamo=True,
            opset_version=opset,
            input_names=input_names,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
            optimize=True,
        )
    return program.model_proto


def _torchscript_export(
    model: nn.Module,
    example: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_batch: bool,
    opset: int,
) -> onnx.ModelProto:
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {name: {0: "batch"} for name in [*input_names, *output_names]}
    buffer = io.BytesIO()
    with _quiet_exporter():
        torch.onnx.export(
            model,
            example,
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buffer.getvalue())


def _lower_opset(model_proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Lower an opset-18 model to `opset`, keeping Softmax-family semantics."""
    inferred = shape_inference.infer_shapes(model_proto)
    if opset < 13:
        count = _onnx_graph.make_softmax_axis_last(inferred)
        if count:
            logger.info(
                "moved the axis of %d Softmax-family nodes last for opset %d", count, opset
            )
    lowered = version_converter.convert_version(inferred, opset)
    _drop_attributes_unknown_at_opset(lowered, opset)
    onnx.checker.check_model(lowered, full_check=True)
    return lowered


def _drop_attributes_unknown_at_opset(model_proto: onnx.ModelProto, opset: int) -> None:
    """Remove attributes that the version converter carried over from a later opset.

    The converter keeps, for example, ReduceMean's `noop_with_empty_axes` (added in opset 18)
    when lowering. Such an attribute is dropped only when it has its default value, because the
    older operator then behaves the same. Any other value raises RuntimeError.
    """
    for node in model_proto.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
        unknown = [a for a in node.attribute if a.name not in schema.attributes]
        for attribute in unknown:
            value = helper.get_attribute_value(attribute)
            if attribute.name == "noop_with_empty_axes" and value == 0:
                node.attribute.remove(attribute)
                continue
            raise RuntimeError(
                f"{node.op_type} attribute {attribute.name}={value} has no equivalent at opset "
                f"{opset}"
            )


def _is_dynamic_batch_error(exc: Exception) -> bool:
    text = str(exc)
    return any(word in text for word in ("Constraints violated", "specialized", "batch"))


def _trace(
    model: nn.Module,
    example: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_batch: bool,
    opset: int,
) -> tuple[onnx.ModelProto, str]:
    """Return the exported model and the name of the exporter that wrote it."""
    if isinstance(model, torch.jit.ScriptModule):
        # torch.export cannot trace TorchScript, so only the TorchScript exporter applies.
        try:
            proto = _torchscript_export(
                model, example, input_names, output_names, dynamic_batch, opset
            )
        except (torch.onnx.errors.OnnxExporterError, RuntimeError) as exc:
            raise unsupported_operator_error(
                exc, model, example, "the TorchScript exporter"
            ) from exc
        return proto, "torchscript"
    try:
        proto = _dynamo_export(
            model, example, input_names, dynamic_batch, max(opset, _DYNAMO_OPSET)
        )
    except torch.onnx.errors.OnnxExporterError as exc:
        if dynamic_batch and _is_dynamic_batch_error(exc.__cause__ or exc):
            raise ConversionError(
                "the batch dimension cannot stay dynamic: the model fixes it during tracing "
                f"({str(exc.__cause__ or exc).strip().splitlines()[0][:200]}); use x.shape[0] "
                "without int(), or export with dynamic_batch=False"
            ) from exc
        raise unsupported_operator_error(exc, model, example, "the ONNX exporter") from exc
    if opset >= _DYNAMO_OPSET:
        return proto, "dynamo"
    try:
        return _lower_opset(proto, opset), "dynamo"
    except (
        RuntimeError,
        version_converter.ConvertError,
        onnx.checker.ValidationError,
        onnx.shape_inference.InferenceError,
    ) as exc:
        logger.info(
            "the ONNX version converter cannot lower the model to opset %d (%s); exporting with "
            "the TorchScript exporter instead",
            opset,
            str(exc).strip().splitlines()[-1][:200],
        )
    try:
        proto = _torchscript_export(
            model, example, input_names, output_names, dynamic_batch, opset
        )
    except (torch.onnx.errors.OnnxExporterError, RuntimeError) as exc:
        raise unsupported_operator_error(
            exc, model, example, f"the TorchScript ONNX exporter at opset {opset}"
        ) from exc
    return proto, "torchscript"


def _simplify(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    import onnxslim

    try:
        with _quiet_exporter():
            slim = onnxslim.slim(proto)
    # onnxslim raises many exception types from its passes; a failed simplification only costs
    # file size, so the unsimplified model is kept.
    except Exception as exc:
        logger.warning("onnxslim could not simplify the model, keeping it as exported: %s", exc)
        return proto, False
    if slim is None:
        return proto, False
    return slim, True


def check_against_torch(
    path: Path,
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    output_names: Sequence[str],
    tolerance: float = _CHECK_TOLERANCE,
) -> float:
    """Run the ONNX file in ONNX Runtime on `inputs` and compare each output with PyTorch.

    Returns the largest absolute difference, and raises `ConversionError` beyond tolerance.
    """
    from edgeopt.converters.runtime import open_runtime

    runtime = open_runtime(path)
    worst, failing = _common.diff_against_torch(runtime, model, inputs, output_names, tolerance)
    if failing is not None:
        raise ConversionError(
            f"{path} differs from PyTorch by up to {worst:.3g} (max abs; first output beyond "
            f"tolerance: '{failing}') at batch {inputs[0].shape[0]}; try another opset (18 is "
            "the exporter's native one) or dynamic_batch=False"
        )
    return worst


def _require_symbolic_batch(proto: onnx.ModelProto) -> None:
    """Raise unless dim 0 of every graph input is symbolic.

    A model that reads its batch size as a Python int (``int(x.shape[0])``, ``len(x)``) is
    traced with that number baked in, and the file then runs only at the traced batch size.
    Outputs are not checked: one may legitimately not depend on the batch (a constant tensor).
    """
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            raise ConversionError(
                f"dynamic batch was requested, but {value.name!r} has a fixed batch size of "
                f"{dims[0].dim_value} in the exported graph: the model reads the batch size as "
                "a Python int (for example int(x.shape[0]) or len(x)); use x.shape[0] without "
                "int(), or export with dynamic_batch=False"
            )


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | Path,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    metadata: Mapping[str, str] | None = None,
    simplify: bool = True,
    precision: str = "fp32",
    check: bool = True,
) -> OnnxExport:
    """Export `model` to an ONNX file and check it against PyTorch.

    Args:
        model: The module to export. It is exported and checked in eval() mode; the caller's
            mode is restored afterwards, with an `ExportWarning` if it was train().
        example_input: One tensor or a tuple of tensors whose dim 0 is the batch.
        path: Destination `.onnx` file; parent directories are created.
        opset: ONNX opset between 7 and 23 (default 18).
        dynamic_batch: Make dim 0 of every input and output symbolic (`batch`).
        input_names: Graph input names (default `input`, or `input_0`, `input_1`, ...).
        output_names: Graph output names. A dict output is named after its keys; names given
            for it must be those keys, in any order.
        metadata: Extra `metadata_props`, e.g. normalization and class labels. The input layout
            is always written under `edgeopt.input_layout`.
        simplify: Run onnxslim on the exported graph.
        precision: `fp32`, or `fp16` to store large weights as float16 (computed in float32).
        check: Run the file in ONNX Runtime and compare with PyTorch on the example input.

    Returns:
        The written file's path, opset and input and output names.

    Raises:
        EdgeoptInputError: An argument is invalid.
        UnsupportedOperatorError: The exporter has no translation for an operator.
        ConversionError: Export failed, or the file disagrees with PyTorch.
    """
    if not isinstance(model, nn.Module):
        raise EdgeoptInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise EdgeoptInputError(f"opset {opset} is not supported; use {MIN_OPSET} to {MAX_OPSET}")
    if precision not in ("fp32", "fp16"):
        raise EdgeoptInputError(f"ONNX precision must be 'fp32' or 'fp16', got {precision!r}")
    inputs = _common.as_input_tuple(example_input)
    path = Path(path)
    input_names = list(input_names) if input_names else _common.default_input_names(len(inputs))
    if len(input_names) != len(inputs):
        raise EdgeoptInputError(
            f"input_names has {len(input_names)} names but example_input has {len(inputs)} tensors"
        )

    with _common.eval_mode(model, "ONNX export"):
        raw_output, pairs = _common.torch_outputs(model, inputs)
        names = _common.resolve_output_names([n for n, _ in pairs], output_names, raw_output)
        # torch.export specialises a dimension of size 1, so a batch-1 example would fix the batch.
        trace_inputs = inputs
        if dynamic_batch and inputs[0].shape[0] == 1:
            trace_inputs = _common.repeat_to_batch(inputs, 2)
        proto, exporter = _trace(model, trace_inputs, input_names, names, dynamic_batch, opset)

        _onnx_graph.set_input_names(proto, input_names)
        _onnx_graph.set_output_names(proto, names)
        simplified = False
        if simplify:
            proto, simplified = _simplify(proto)
        removed = _onnx_graph.deduplicate_initializers(proto)
        if removed:
            logger.info("stored shared weights once, removed copies: %s", ", ".join(removed))
        if precision == "fp16":
            proto, clamped = onnx_weights_to_fp16(proto)
            warn_clamped(clamped, f"fp16 export of {path.name}")
        training_bn = _onnx_graph.training_mode_batch_norms(proto)
        if training_bn:
            raise ConversionError(
                f"BatchNormalization nodes {training_bn} were exported in training mode; layers "
                f"{_common.batch_statistics_layers(model)} normalise with batch statistics"
            )
        meta = {_common.INPUT_LAYOUT_KEY: _common.input_layout(inputs), **(metadata or {})}
        _onnx_graph.set_metadata(proto, meta)
        proto.producer_name = "edgeopt"
        try:
            onnx.checker.check_model(proto, full_check=True)
            proto = shape_inference.infer_shapes(proto, check_type=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise ConversionError(f"the exported ONNX model is invalid: {exc}") from exc
        if dynamic_batch:
            _require_symbolic_batch(proto)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(proto, path)
        logger.info("wrote %s (opset %d, %s exporter)", path, opset, exporter)

        max_diff = 0.0
        if check:
            batches = [inputs]
            if dynamic_batch:
                batches.append(_common.repeat_to_batch(inputs, inputs[0].shape[0] + 2))
            tolerance = _FP16_TOLERANCE if precision == "fp16" else _CHECK_TOLERANCE
            for batch_inputs in batches:
                diff = check_against_torch(path, model, batch_inputs, names, tolerance)
                max_diff = max(max_diff, diff)
            if precision == "fp32":
                logger.info("%s matches PyTorch, max abs diff %.3g", path.name, max_diff)
    return OnnxExport(
        path=path,
        opset=opset,
        input_names=input_names,
        output_names=names,
        dynamic_batch=dynamic_batch,
        exporter=exporter,
        precision=precision,
        simplified=simplified,
        max_abs_diff=max_diff,
        removed_duplicate_weights=removed,
    )


def onnx_model_info(path: str | Path) -> dict[str, Any]:
    """Return the opset, input and output names and metadata of an ONNX file."""
    proto = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    initializers = {init.name for init in proto.graph.initializer}
    return {
        "opset": opset,
        "input_names": [v.name for v in proto.graph.input if v.name not in initializers],
        "output_names": [v.name for v in proto.graph.output],
        "metadata": {prop.key: prop.value for prop in proto.metadata_props},
    }
