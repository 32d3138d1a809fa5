"""Export of torch modules to the files the local targets run, for calibration and tests.

These are thin calls of torch.onnx (dynamo exporter) and litert-torch with their progress
output silenced; the full exporters with verification live in `edgeopt.converters`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

import torch
from torch import nn

from edgeopt.errors import ConversionError


@contextlib.contextmanager
def _quiet():
    """Silence the converters' progress prints and warnings, which go to stdout and stderr."""
    loggers = [logging.getLogger(name) for name in ("torch", "torch.onnx", "litert_torch")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with (
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_model(module: nn.Module, input_shape: tuple[int, ...], path: str | Path) -> Path:
    """Export `module` for a batch of one `input_shape` sample to `path` (.onnx or .tflite)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, *input_shape)
    module = module.eval()
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with _quiet(), torch.no_grad():
            if path.suffix == ".onnx":
                torch.onnx.export(module, (example,), str(partial), dynamo=True, verbose=False)
            elif path.suffix == ".tflite":
                import litert_torch

                litert_torch.convert(module, (example,)).export(str(partial))
            else:
                raise ConversionError(f"cannot export to {path.name!r}: use .onnx or .tflite")
    except ConversionError:
        raise
    except Exception as error:  # the exporters raise many unrelated exception types
        partial.unlink(missing_ok=True)
        raise ConversionError(
            f"export of {type(module).__name__} to {path} failed: {error}"
        ) from error
    partial.replace(path)
    return path
