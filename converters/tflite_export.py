"""Export a PyTorch module to TFLite through litert-torch: fp32, fp16, int8-dynamic and int8.

litert-torch specialises the graph to the example's batch size (open_runtime loops or pads
to run other batch sizes), keeps PyTorch's NCHW input layout and names the signature's inputs
and outputs after the model's. Precisions:

- `fp32`: float32 throughout.
- `fp16`: weights of fully connected, convolution and embedding ops stored as float16 and
  dequantized to float32 at load (ai-edge-quantizer's float casting). Other constants stay fp32.
- `int8-dynamic`: int8 weights, activations quantized at run time (PT2E dynamic quantization).
- `int8`: int8 weights and activations calibrated on `calibration` (PT2E static quantization,
  per-channel weights); float32 inputs and outputs unless `int8_io=True`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeopt._logging import get_logger
from edgeopt.converters import _common, _tflite_graph
from edgeopt.converters._fp16 import clamp_to_fp16_range, warn_clamped
from edgeopt.converters.onnx_export import unsupported_operator_error
from edgeopt.errors import ConversionError, EdgeoptInputError

logger = get_logger(__name__)

PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8")
# Absolute and relative tolerance of the check against PyTorch on the example input.
_CHECK_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


@dataclass(frozen=True)
class TfliteExport:
    """A TFLite file written by `export_tflite`."""

    path: Path
    precision: str
    batch_size: int
    input_names: list[str]
    output_names: list[str]
    input_dtypes: dict[str, str]
    output_dtypes: dict[str, str]


class _NamedIO(nn.Module):
    """Wrap a model so that the TFLite signature uses the model's input and output names."""

    def __init__(self, model: nn.Module, input_names: Sequence[str], output_names: Sequence[str]):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.output_names = list(output_names)

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        output = self.model(*(inputs[name] for name in self.input_names))
        tensors = [tensor for _, tensor in _common.flatten_outputs(output)]
        return dict(zip(self.output_names, tensors, strict=True))


@contextlib.contextmanager
def _quiet_litert() -> Iterator[None]:
    """Hide litert-torch's progress display and absl chatter; errors still propagate."""
    import litert_torch

    previous = litert_torch.config.show_progress
    litert_torch.config.show_progress = False
    sink = io.StringIO()
    root_level = logging.getLogger().level
    try:
        with contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger().setLevel(logging.ERROR)
            yield
    finally:
        logging.getLogger().setLevel(root_level)
        litert_torch.config.show_progress = previous
        if sink.getvalue():
            logger.debug("litert-torch output:\n%s", sink.getvalue())


def _clamp_weights_for_fp16(model: nn.Module) -> tuple[nn.Module, dict[str, int]]:
    """Return a copy whose Linear, Conv and Embedding weights lie inside the fp16 range."""
    weighted = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)
    clamped: dict[str, int] = {}
    copy_model = copy.deepcopy(model)
    for path, module in copy_model.named_modules():
        if not isinstance(module, weighted):
            continue
        weight = module.weight.detach().numpy()
        fixed, count = clamp_to_fp16_range(weight)
        if count:
            clamped[f"{path}.weight"] = count
            with torch.no_grad():
                module.weight.copy_(torch.from_numpy(fixed))
    return copy_model, clamped


def _calibration_batches(
    calibration: np.ndarray, batch: int, input_names: Sequence[str]
) -> Iterator[dict[str, torch.Tensor]]:
    data = np.asarray(calibration, dtype=np.float32)
    for start in range(0, len(data), batch):
        chunk = data[start : start + batch]
        if len(chunk) < batch:
            chunk = chunk[np.arange(batch) % len(chunk)]
        yield {input_names[0]: torch.from_numpy(chunk)}


def _pt2e_quantize(
    wrapper: nn.Module,
    sample: dict[str, torch.Tensor],
    calibration: np.ndarray | None,
    dynamic: bool,
):
    from litert_torch.quantize import pt2e_quantizer
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import quantize_pt2e

    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
    )
    graph_module = torch.export.export(wrapper, (), sample, strict=False).module()
    prepared = quantize_pt2e.prepare_pt2e(graph_module, quantizer)
    batch = next(iter(sample.values())).shape[0]
    with torch.no_grad():
        if calibration is None:
            prepared(**sample)
        else:
            for feed in _calibration_batches(calibration, batch, list(sample)):
                prepared(**feed)
    converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
    return converted, QuantConfig(pt2e_quantizer=quantizer)


def _fp16_weights(content: bytes) -> bytes:
    from ai_edge_quantizer import algorithm_manager, qtyping, quantizer

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "fp32.tflite"
        source.write_bytes(content)
        fp16 = quantizer.Quantizer(str(source))
        for op in (
            qtyping.TFLOperationName.FULLY_CONNECTED,
            qtyping.TFLOperationName.CONV_2D,
            qtyping.TFLOperationName.DEPTHWISE_CONV_2D,
            qtyping.TFLOperationName.CONV_2D_TRANSPOSE,
            qtyping.TFLOperationName.EMBEDDING_LOOKUP,
        ):
            fp16.add_weight_only_config(
                regex=".*",
                operation_name=op,
                num_bits=16,
                algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING,
            )
        result = fp16.quantize(enable_progress_report=False)
        return bytes(result.quantized_model)


def export_tflite(
    model: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | Path,
    *,
    precision: str = "fp32",
    calibration: np.ndarray | None = None,
    int8_io: bool = False,
    output_names: Sequence[str] | None = None,
    input_names: Sequence[str] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> TfliteExport:
    """Export `model` to a TFLite file with litert-torch.

    Args:
        model: The module, exported in eval() mode (the caller's mode is restored).
        example_input: Example tensor(s); the file is specialised to their shapes, batch included.
        path: Destination `.tflite` file.
        precision: `fp32`, `fp16`, `int8-dynamic` or `int8` (see the module docstring).
        calibration: float32 samples shaped like one input (N, ...), already normalised as the
            model expects. Required for `int8`; a few hundred samples are enough.
        int8_io: For `int8`, keep int8 inputs and outputs instead of float32 ones.
        output_names: Signature output names (a dict output uses its keys).
        input_names: Signature input names (default `input`, or `input_0`, ...).
        metadata: Extra metadata stored as JSON in the file's `edgeopt` metadata entry.

    Raises:
        EdgeoptInputError: An argument is invalid, or `int8` was requested without calibration.
        UnsupportedOperatorError: litert-torch has no lowering for an operator.
        ConversionError: Conversion failed, or the model cannot be represented faithfully.
    """
    if not isinstance(model, nn.Module):
        raise EdgeoptInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if precision not in PRECISIONS:
        raise EdgeoptInputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "int8" and (calibration is None or len(calibration) == 0):
        raise EdgeoptInputError(
            "full-integer int8 needs calibration data: pass calibration= a float32 array of a "
            "few hundred representative inputs, or use precision='int8-dynamic'"
        )
    inputs = _common.as_input_tuple(example_input)
    if calibration is not None and precision == "int8":
        calibration = np.asarray(calibration, dtype=np.float32)
        if len(inputs) != 1 or calibration.shape[1:] != tuple(inputs[0].shape[1:]):
            raise EdgeoptInputError(
                f"calibration has shape {calibration.shape} but the model input is "
                f"{tuple(inputs[0].shape)}; pass samples shaped (N, "
                f"{', '.join(map(str, inputs[0].shape[1:]))})"
            )
    path = Path(path)
    input_names = list(input_names) if input_names else _common.default_input_names(len(inputs))
    batch_norms = _common.batch_statistics_layers(model)
    if batch_norms:
        raise ConversionError(
            f"layers {batch_norms} normalise with batch statistics in eval() "
            "(track_running_stats=False), which a batch-specialised TFLite file cannot reproduce "
            "when run in chunks; set track_running_stats=True and retrain, or export to ONNX"
        )

    with _common.eval_mode(model, "TFLite export"):
        raw_output, pairs = _common.torch_outputs(model, inputs)
        names = _common.resolve_output_names([n for n, _ in pairs], output_names, raw_output)
        source = model
        if precision == "fp16":
            source, clamped = _clamp_weights_for_fp16(model)
            warn_clamped(clamped, f"fp16 export of {path.name}")
        wrapper = _NamedIO(source, input_names, names).eval()
        sample = dict(zip(input_names, inputs, strict=True))
        content = _convert(wrapper, sample, precision, calibration, model, inputs)

    if precision == "fp16":
        content = _fp16_weights(content)
    if precision == "int8" and not int8_io:
        content = _tflite_graph.add_float_interface(content)
    meta = {
        _common.INPUT_LAYOUT_KEY: _common.input_layout(inputs),
        "edgeopt.precision": precision,
        "edgeopt.batch_size": str(int(inputs[0].shape[0])),
        **(metadata or {}),
    }
    content = _tflite_graph.add_metadata(content, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)

    from edgeopt.converters.runtime import TfliteRuntime

    runtime = TfliteRuntime(path)
    logger.info("wrote %s (%s, batch %d)", path, precision, runtime.fixed_batch or 0)
    # NOTE: int8 files are not checked here because their error depends on the data; convert()
    # and verify() measure them on real inputs.
    # For fp16 the reference is the converted copy, whose weights were clamped to the fp16 range.
    if precision in _CHECK_TOLERANCE:
        with _common.eval_mode(source, "TFLite check", warn=False):
            _check_against_torch(runtime, source, inputs, names, _CHECK_TOLERANCE[precision])
    return TfliteExport(
        path=path,
        precision=precision,
        batch_size=int(inputs[0].shape[0]),
        input_names=runtime.input_names,
        output_names=runtime.output_names,
        input_dtypes={n: str(np.dtype(d["dtype"])) for n, d in runtime.input_details.items()},
        output_dtypes={n: str(np.dtype(d["dtype"])) for n, d in runtime.output_details.items()},
    )


def _check_against_torch(
    runtime,
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    names: Sequence[str],
    tolerance: float,
) -> None:
    """Compare the file with PyTorch on the example input; raise `ConversionError` on mismatch.

    litert-torch 0.10, for one, resizes nearest-neighbour to a non-integer scale differently
    from PyTorch, so no conversion is trusted without this check.
    """
    diff, failing = _common.diff_against_torch(runtime, model, inputs, names, tolerance)
    if failing is None:
        return
    resize = _common.module_path_for_op(model, inputs, "upsample_nearest2d")
    hint = (
        f"; module '{resize}' resizes nearest-neighbour, which litert-torch computes "
        "differently for non-integer scales: use an integer scale factor or mode='bilinear'"
        if resize
        else "; export to ONNX instead, or report the layer pattern"
    )
    raise ConversionError(
        f"{runtime.path} differs from PyTorch by up to {diff:.3g} (max abs; first output beyond "
        f"tolerance: '{failing}') on the example input{hint}"
    )


def _convert(
    wrapper: nn.Module,
    sample: dict[str, torch.Tensor],
    precision: str,
    calibration: np.ndarray | None,
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
) -> bytes:
    """Run litert-torch and return the flatbuffer, translating its errors."""
    import litert_torch

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        with _quiet_litert():
            if precision in ("int8", "int8-dynamic"):
                quantized, config = _pt2e_quantize(
                    wrapper, sample, calibration, dynamic=precision == "int8-dynamic"
                )
                edge_model = litert_torch.convert(
                    quantized, sample_kwargs=sample, quant_config=config
                )
            else:
                edge_model = litert_torch.convert(wrapper, sample_kwargs=sample)
            with tempfile.TemporaryDirectory() as tmp:
                target = Path(tmp) / "model.tflite"
                edge_model.export(str(target))
                return target.read_bytes()
    # litert-torch surfaces lowering failures as several exception types (RuntimeError from
    # torch.export, jax TypeError, KeyError for a missing lowering).
    except (RuntimeError, TypeError, KeyError, ValueError, NotImplementedError) as exc:
        raise unsupported_operator_error(exc, model, inputs, "litert-torch") from exc
