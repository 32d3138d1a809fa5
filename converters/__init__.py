"""Export backends: ONNX and TFLite writers, quantization, runtimes and verification."""

from __future__ import annotations

from edgeopt.converters.conversion import ConversionResult, convert
from edgeopt.converters.onnx_export import OnnxExport, export_onnx
from edgeopt.converters.quantize import OnnxQuantization, quantize_onnx
from edgeopt.converters.runtime import ModelRuntime, open_runtime
from edgeopt.converters.tflite_export import TfliteExport, export_tflite
from edgeopt.converters.verify import (
    OutputComparison,
    VerificationReport,
    compare_outputs,
    verify,
)

__all__ = [
    "ConversionResult",
    "ModelRuntime",
    "OnnxExport",
    "OnnxQuantization",
    "OutputComparison",
    "TfliteExport",
    "VerificationReport",
    "compare_outputs",
    "convert",
    "export_onnx",
    "export_tflite",
    "open_runtime",
    "quantize_onnx",
    "verify",
]
