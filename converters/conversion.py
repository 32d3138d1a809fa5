"""One call from a model (module or file) to a verified ONNX or TFLite file.

`convert` exports, quantizes if asked, verifies the result against the source model and, for
int8, times the fp32 and int8 files on the runtime that will run them, warning when int8 is not
faster.
"""

from __future__ import annotations

import shutil
import statistics
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from edgeopt._logging import get_logger
from edgeopt.converters._fp16 import onnx_weights_to_fp16, warn_clamped
from edgeopt.converters.onnx_export import OnnxExport, export_onnx
from edgeopt.converters.quantize import OnnxQuantization, quantize_onnx
from edgeopt.converters.runtime import ModelRuntime, load_torch_file, open_runtime
from edgeopt.converters.tflite_export import PRECISIONS, TfliteExport, export_tflite
from edgeopt.converters.verify import VerificationReport, verify
from edgeopt.errors import ConversionError, EdgeoptInputError, ModelLoadError, QuantizationWarning

logger = get_logger(__name__)

FORMATS = ("onnx", "tflite")
ONNX_PRECISIONS = ("fp32", "fp16", "int8")
# Samples used for verification when no verification data is passed.
_DEFAULT_VERIFY_SAMPLES = 256


@dataclass(frozen=True)
class ConversionResult:
    """Result of `convert`: the written file, its verification report, latencies and sizes."""

    path: Path
    format: str
    precision: str
    verification: VerificationReport | None
    latency_ms: dict[str, float] = field(default_factory=dict)
    size_bytes: dict[str, int] = field(default_factory=dict)
    fp32_path: Path | None = None
    details: OnnxExport | TfliteExport | OnnxQuantization | None = None

    @property
    def int8_speedup(self) -> float | None:
        """fp32 latency divided by int8 latency, when both were measured."""
        if "fp32" in self.latency_ms and "int8" in self.latency_ms and self.latency_ms["int8"]:
            return self.latency_ms["fp32"] / self.latency_ms["int8"]
        return None

    def as_dict(self) -> dict[str, Any]:
        """Return the result as plain Python values."""
        return {
            "path": str(self.path),
            "format": self.format,
            "precision": self.precision,
            "fp32_path": None if self.fp32_path is None else str(self.fp32_path),
            "latency_ms": dict(self.latency_ms),
            "int8_speedup": self.int8_speedup,
            "size_bytes": dict(self.size_bytes),
            "verification": None if self.verification is None else self.verification.as_dict(),
        }


def measure_latency(
    runtime: ModelRuntime, sample: np.ndarray, *, warmup: int = 5, runs: int = 30
) -> float:
    """Return the median wall time in ms of one `runtime.run(sample)` after `warmup` runs."""
    for _ in range(warmup):
        runtime.run(sample)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runtime.run(sample)
        times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


def compare_int8_latency(
    fp32_path: Path, int8_path: Path, data: np.ndarray, threads: int = 1
) -> dict[str, float]:
    """Time the fp32 and int8 files on one batch and warn when int8 is not faster.

    The batch is the file's fixed batch size, or one sample for a dynamic batch.
    """
    fp32_runtime = open_runtime(fp32_path, threads=threads)
    int8_runtime = open_runtime(int8_path, threads=threads)
    rows = fp32_runtime.fixed_batch or 1
    sample = np.asarray(data[:rows], dtype=np.float32)
    latency = {
        "fp32": measure_latency(fp32_runtime, sample),
        "int8": measure_latency(int8_runtime, sample),
    }
    if latency["int8"] >= latency["fp32"]:
        message = (
            f"int8 model {int8_path.name} is not faster than fp32 on this runtime "
            f"({latency['int8']:.3f} ms vs {latency['fp32']:.3f} ms median, {threads} thread(s)); "
            "small or memory-bound models often gain only size, so ship fp32 or fp16 if latency "
            "matters more than size"
        )
        warnings.warn(message, QuantizationWarning, stacklevel=3)
        logger.warning("%s", message)
    return latency


def _load_model(model: nn.Module | str | Path) -> tuple[nn.Module | Path, str]:
    """Return a module (or an ONNX path) and a description of the source kind."""
    if isinstance(model, nn.Module):
        return model, "module"
    if not isinstance(model, (str, Path)):
        raise EdgeoptInputError(
            "model must be an nn.Module or a path to .pt, .pt2 or .onnx, got "
            f"{type(model).__name__}"
        )
    path = Path(model)
    if not path.is_file():
        raise ModelLoadError(f"model file {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        try:
            onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf raises DecodeError for truncated or corrupt files
            raise ModelLoadError(
                f"cannot read {path} as an ONNX model: {str(exc).splitlines()[0] or exc!r}; "
                "check that the file is complete"
            ) from exc
        return path, "onnx"
    if suffix in (".pt", ".pth", ".jit"):
        return load_torch_file(path), "torchscript"
    if suffix == ".pt2":
        return load_torch_file(path), "pt2"
    raise ModelLoadError(
        f"unknown model file type {path.suffix!r} for {path}; use .pt, .pt2 or .onnx"
    )


def _example(
    example_input: torch.Tensor | None,
    calibration: np.ndarray | None,
    verify_data: np.ndarray | None,
    batch_size: int,
) -> torch.Tensor:
    if example_input is not None:
        return example_input
    for source in (calibration, verify_data):
        if source is not None and len(source):
            rows = np.asarray(source[:batch_size], dtype=np.float32)
            if len(rows) < batch_size:
                rows = rows[np.arange(batch_size) % len(rows)]
            return torch.from_numpy(rows)
    raise EdgeoptInputError(
        "convert needs example_input, calibration or verify_data to know the input shape"
    )


def convert(
    model: nn.Module | str | Path,
    to: str = "onnx",
    *,
    out: str | Path,
    precision: str = "fp32",
    calibration: np.ndarray | None = None,
    opset: int | None = None,
    example_input: torch.Tensor | None = None,
    verify_data: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    batch_size: int = 1,
    int8_io: bool = False,
    quantization_method: str = "auto",
    metadata: Mapping[str, str] | None = None,
    threads: int = 1,
    measure_int8_latency: bool = True,
) -> ConversionResult:
    """Convert `model` to `to` at `precision`, verify it and return the file and its report.

    Args:
        model: An nn.Module, a TorchScript file (`.pt`), a torch.export file (`.pt2`) or an ONNX
            file. ONNX sources can be re-written at fp16 or quantized to int8, and verified.
        to: `onnx` or `tflite`.
        out: Output file path.
        precision: ONNX: `fp32`, `fp16`, `int8`; TFLite: `fp32`, `fp16`, `int8-dynamic`, `int8`.
        calibration: float32 inputs (N, ...) for int8, normalised as the model expects.
        opset: ONNX opset (default 18).
        example_input: Example tensor for tracing; default: the first `batch_size` rows of
            `calibration` or `verify_data`.
        verify_data: Inputs to verify on (default: up to 256 calibration samples).
        labels: Labels of `verify_data`, to report accuracies.
        batch_size: Batch size of a TFLite file (fixed in the graph) when no example is given.
        int8_io: For TFLite int8, keep int8 inputs and outputs.
        quantization_method: ONNX int8 calibration: `auto`, `minmax`, `percentile`, `entropy`.
        metadata: Extra metadata written into the file.
        threads: Runtime threads for verification and timing.
        measure_int8_latency: Time fp32 against int8 and warn if int8 is not faster.

    Raises:
        EdgeoptInputError: Invalid arguments (for example int8 without calibration).
        ConversionError: The conversion failed or is not available for this source.
    """
    if to not in FORMATS:
        raise EdgeoptInputError(f"to must be one of {FORMATS}, got {to!r}")
    allowed = ONNX_PRECISIONS if to == "onnx" else PRECISIONS
    if precision not in allowed:
        raise EdgeoptInputError(f"precision for {to} must be one of {allowed}, got {precision!r}")
    if precision == "int8" and calibration is None:
        raise EdgeoptInputError(
            "int8 needs calibration data: pass calibration= a float32 array of a few hundred "
            "representative inputs"
        )
    out = Path(out)
    source, kind = _load_model(model)
    if verify_data is None and calibration is not None:
        verify_data = np.asarray(calibration[:_DEFAULT_VERIFY_SAMPLES], dtype=np.float32)
        labels = None

    if kind == "onnx":
        return _convert_onnx_file(
            source,
            to,
            out,
            precision,
            calibration,
            verify_data,
            labels,
            quantization_method,
            threads,
            measure_int8_latency,
        )
    if kind == "pt2" and example_input is None:
        # A torch.export program may be specialised to its example's batch size.
        batch_size = _pt2_batch_size(Path(model)) or batch_size
    example = _example(example_input, calibration, verify_data, batch_size)
    if verify_data is None:
        verify_data = example.numpy()
    if kind == "torchscript" and to == "tflite":
        raise ConversionError(
            f"{model} is a TorchScript file, which litert-torch cannot trace (it needs "
            "torch.export); save the model with torch.export.save (.pt2) or pass the nn.Module"
        )
    if to == "onnx":
        return _module_to_onnx(
            source,
            example,
            out,
            precision,
            calibration,
            opset,
            verify_data,
            labels,
            quantization_method,
            metadata,
            threads,
            measure_int8_latency,
            dynamic_batch=kind != "pt2",
        )
    return _module_to_tflite(
        source,
        example,
        out,
        precision,
        calibration,
        int8_io,
        verify_data,
        labels,
        metadata,
        threads,
        measure_int8_latency,
    )


def _pt2_batch_size(path: Path) -> int | None:
    """Return the batch size of the example stored in a `.pt2` file, if it has one."""
    program = torch.export.load(str(path))
    args = (getattr(program, "example_inputs", None) or ((), {}))[0]
    if args and isinstance(args[0], torch.Tensor) and args[0].dim():
        return int(args[0].shape[0])
    return None


def _fp32_sibling(out: Path) -> Path:
    return out.with_name(f"{out.stem}.fp32{out.suffix}")


def _module_to_onnx(
    model: nn.Module,
    example: torch.Tensor,
    out: Path,
    precision: str,
    calibration: np.ndarray | None,
    opset: int | None,
    verify_data: np.ndarray,
    labels: np.ndarray | None,
    method: str,
    metadata: Mapping[str, str] | None,
    threads: int,
    measure: bool,
    dynamic_batch: bool,
) -> ConversionResult:
    fp32_path = _fp32_sibling(out) if precision == "int8" else out
    export = export_onnx(
        model,
        example,
        fp32_path,
        opset=opset,
        metadata=metadata,
        dynamic_batch=dynamic_batch,
        precision="fp16" if precision == "fp16" else "fp32",
    )
    if precision != "int8":
        report = verify(model, out, verify_data, labels=labels, threads=threads)
        return ConversionResult(
            out, "onnx", precision, report, {}, _sizes(out=out), details=export
        )
    return _quantize_onnx_and_verify(
        model, fp32_path, out, calibration, verify_data, labels, method, threads, measure
    )


def _quantize_onnx_and_verify(
    reference: nn.Module | Path,
    fp32_path: Path,
    out: Path,
    calibration: np.ndarray | None,
    verify_data: np.ndarray,
    labels: np.ndarray | None,
    method: str,
    threads: int,
    measure: bool,
) -> ConversionResult:
    """Quantize `fp32_path` to int8 ONNX at `out`, verify it against `reference` and time both."""
    quantization = quantize_onnx(fp32_path, out, calibration, method=method)
    report = verify(reference, out, verify_data, labels=labels, threads=threads)
    latency = compare_int8_latency(fp32_path, out, verify_data, threads) if measure else {}
    return ConversionResult(
        out,
        "onnx",
        "int8",
        report,
        latency,
        _sizes(fp32=fp32_path, int8=out),
        fp32_path,
        quantization,
    )


def _module_to_tflite(
    model: nn.Module,
    example: torch.Tensor,
    out: Path,
    precision: str,
    calibration: np.ndarray | None,
    int8_io: bool,
    verify_data: np.ndarray,
    labels: np.ndarray | None,
    metadata: Mapping[str, str] | None,
    threads: int,
    measure: bool,
) -> ConversionResult:
    export = export_tflite(
        model,
        example,
        out,
        precision=precision,
        calibration=calibration,
        int8_io=int8_io,
        metadata=metadata,
    )
    report = verify(model, out, verify_data, labels=labels, threads=threads)
    latency: dict[str, float] = {}
    sizes = _sizes(**{precision.replace("-", "_"): out})
    fp32_path = None
    if precision.startswith("int8") and measure:
        fp32_path = _fp32_sibling(out)
        export_tflite(model, example, fp32_path, precision="fp32", metadata=metadata)
        latency = compare_int8_latency(fp32_path, out, verify_data, threads)
        sizes = _sizes(fp32=fp32_path, int8=out)
    return ConversionResult(out, "tflite", precision, report, latency, sizes, fp32_path, export)


def _convert_onnx_file(
    source: Path,
    to: str,
    out: Path,
    precision: str,
    calibration: np.ndarray | None,
    verify_data: np.ndarray | None,
    labels: np.ndarray | None,
    method: str,
    threads: int,
    measure: bool,
) -> ConversionResult:
    if to == "tflite":
        _raise_onnx_to_tflite(source)
    if verify_data is None:
        raise EdgeoptInputError(
            f"verifying {source} needs verify_data or calibration (float32 inputs shaped like "
            "the model input)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    if precision == "int8":
        return _quantize_onnx_and_verify(
            source, source, out, calibration, verify_data, labels, method, threads, measure
        )
    import onnx

    proto = onnx.load(str(source))
    if precision == "fp16":
        proto, clamped = onnx_weights_to_fp16(proto)
        warn_clamped(clamped, f"fp16 conversion of {source.name}")
        onnx.save(proto, out)
    elif source.resolve() != out.resolve():
        shutil.copy(source, out)
    report = verify(source, out, verify_data, labels=labels, threads=threads)
    return ConversionResult(out, "onnx", precision, report, {}, _sizes(out=out))


def _raise_onnx_to_tflite(source: Path) -> None:
    """Raise the error for ONNX to TFLite, which needs onnx2tf in edgeopt's environment."""
    try:
        import onnx2tf  # noqa: F401
    except ImportError as exc:
        raise ConversionError(
            f"cannot convert {source} to TFLite: ONNX to TFLite needs onnx2tf, which is not "
            "installed here (its TensorFlow, onnx and numpy pins conflict with edgeopt's); run "
            "onnx2tf in a separate virtual environment, or convert the PyTorch model with "
            "convert(module_or_pt2, to='tflite')"
        ) from exc
    # NOTE: an installed onnx2tf is detected but not driven yet, because no environment that
    # edgeopt supports can import it next to edgeopt's dependencies.
    raise ConversionError(
        f"cannot convert {source} to TFLite: edgeopt does not drive onnx2tf; run "
        f"`onnx2tf -i {source}` yourself, or convert the PyTorch model with to='tflite'"
    )


def _sizes(**paths: Path) -> dict[str, int]:
    return {name: Path(path).stat().st_size for name, path in paths.items()}
