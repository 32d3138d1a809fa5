"""Run exported files (and PyTorch references) behind one interface with named outputs.

A `ModelRuntime` takes float32 arrays and returns float32 arrays by output name, whatever the
file stores: inputs of int8 TFLite models are quantized with the tensor's scale and zero point
and int8 outputs are dequantized. Files with a fixed batch size (batch-1 ONNX files,
batch-specialised TFLite files) are run chunk by chunk, padding the last chunk by repeating
its rows, so any number of samples can be passed.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeopt._logging import get_logger
from edgeopt.converters import _common
from edgeopt.errors import EdgeoptInputError, ModelLoadError

logger = get_logger(__name__)

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


class ModelRuntime(abc.ABC):
    """A loaded model that maps named numpy inputs to named numpy outputs."""

    path: Path | None
    input_names: list[str]
    output_names: list[str]
    input_shapes: dict[str, tuple[int | None, ...]]
    input_dtypes: dict[str, np.dtype]
    fixed_batch: int | None
    kind: str

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        """Shape of the first input; the batch entry is None when the batch is dynamic."""
        return self.input_shapes[self.input_names[0]]

    @abc.abstractmethod
    def _run_chunk(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch that fits the model's batch size."""

    def run(
        self,
        x: np.ndarray | Mapping[str, np.ndarray] | Sequence[np.ndarray],
        batch_size: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Run the model on `x` (one array, or arrays by input name) and return outputs by name.

        `batch_size` splits the samples into chunks of that size (default: all at once, or the
        file's fixed batch size). Float outputs are returned as float32.
        """
        feed = self._as_feed(x)
        count = next(iter(feed.values())).shape[0]
        chunk = self.fixed_batch or batch_size or count
        if self.fixed_batch and batch_size and batch_size != self.fixed_batch:
            logger.debug(
                "%s has a fixed batch size of %d; ignoring batch_size=%d",
                self.path,
                self.fixed_batch,
                batch_size,
            )
        results: dict[str, list[np.ndarray]] = {}
        for start in range(0, max(count, 1), chunk):
            part = {name: array[start : start + chunk] for name, array in feed.items()}
            rows = next(iter(part.values())).shape[0]
            if self.fixed_batch and rows < self.fixed_batch:
                index = np.arange(self.fixed_batch) % rows
                part = {name: array[index] for name, array in part.items()}
            outputs = self._run_chunk(part)
            for name in self.output_names:
                value = outputs[name]
                results.setdefault(name, [])
                if self.fixed_batch and value.ndim and value.shape[0] == self.fixed_batch:
                    value = value[:rows]
                results[name].append(value)
        merged = {}
        for name, parts in results.items():
            if len(parts) == 1:
                value = parts[0]
            elif all(p.ndim and p.shape[1:] == parts[0].shape[1:] for p in parts):
                value = np.concatenate(parts, axis=0)
            else:  # an output without a batch dimension: every chunk gives the same value
                value = parts[-1]
            if np.issubdtype(value.dtype, np.floating):
                value = value.astype(np.float32, copy=False)
            merged[name] = value
        return merged

    def run_many(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on arrays given by input name."""
        return self.run(feed)

    def _as_feed(
        self, x: np.ndarray | Mapping[str, np.ndarray] | Sequence[np.ndarray]
    ) -> dict[str, np.ndarray]:
        if isinstance(x, Mapping):
            missing = [name for name in self.input_names if name not in x]
            if missing:
                raise EdgeoptInputError(
                    f"inputs {missing} are missing; the model takes {self.input_names}"
                )
            arrays = [np.asarray(x[name]) for name in self.input_names]
        elif isinstance(x, (list, tuple)):
            arrays = [np.asarray(a) for a in x]
        else:
            arrays = [np.asarray(x)]
        if len(arrays) != len(self.input_names):
            raise EdgeoptInputError(
                f"got {len(arrays)} input arrays but the model takes {len(self.input_names)} "
                f"({self.input_names})"
            )
        feed = {}
        for name, array in zip(self.input_names, arrays, strict=True):
            expected = self.input_shapes.get(name)
            if expected is not None and len(expected) != array.ndim:
                raise EdgeoptInputError(
                    f"input '{name}' has shape {array.shape} but the model expects rank "
                    f"{len(expected)} ({expected})"
                )
            if expected is not None:
                for axis, (want, got) in enumerate(
                    zip(expected[1:], array.shape[1:], strict=True)
                ):
                    if want is not None and want != got:
                        raise EdgeoptInputError(
                            f"input '{name}' has size {got} on axis {axis + 1} but the model "
                            f"expects {want} (shape {expected})"
                        )
            feed[name] = array
        return feed


class OnnxRuntime(ModelRuntime):
    """An ONNX file run by ONNX Runtime on the CPU."""

    kind = "onnx"

    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except (RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"ONNX Runtime cannot load {path}: {exc}") from exc
        self.path = path
        self.threads = threads
        inputs = self.session.get_inputs()
        self.input_names = [i.name for i in inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_shapes = {
            i.name: tuple(d if isinstance(d, int) else None for d in i.shape) for i in inputs
        }
        self.input_dtypes = {i.name: np.dtype(_ORT_TYPES.get(i.type, np.float32)) for i in inputs}
        batch = self.input_shapes[self.input_names[0]][0] if inputs else None
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None

    def _run_chunk(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cast = {
            name: np.ascontiguousarray(array, dtype=self.input_dtypes[name])
            for name, array in feed.items()
        }
        values = self.session.run(self.output_names, cast)
        return dict(zip(self.output_names, values, strict=True))


class TfliteRuntime(ModelRuntime):
    """A TFLite file run by the LiteRT interpreter, through its first signature if it has one."""

    kind = "tflite"

    def __init__(self, path: Path, threads: int = 1) -> None:
        from ai_edge_litert.interpreter import Interpreter

        try:
            self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        except (RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"the LiteRT interpreter cannot load {path}: {exc}") from exc
        self.path = path
        self.threads = threads
        signatures = self.interpreter.get_signature_list()
        self.runner = None
        if signatures:
            key = "serving_default" if "serving_default" in signatures else next(iter(signatures))
            self.runner = self.interpreter.get_signature_runner(key)
            input_details = self.runner.get_input_details()
            output_details = self.runner.get_output_details()
            self.input_names = list(signatures[key]["inputs"])
            self.output_names = list(signatures[key]["outputs"])
        else:
            self.interpreter.allocate_tensors()
            input_details = {d["name"]: d for d in self.interpreter.get_input_details()}
            output_details = {d["name"]: d for d in self.interpreter.get_output_details()}
            self.input_names = list(input_details)
            self.output_names = list(output_details)
        self.input_details = input_details
        self.output_details = output_details
        self.input_shapes = {
            name: tuple(int(d) for d in input_details[name]["shape"]) for name in self.input_names
        }
        self.input_dtypes = {
            name: np.dtype(input_details[name]["dtype"]) for name in self.input_names
        }
        first = self.input_shapes[self.input_names[0]]
        self.fixed_batch = first[0] if first else None

    def _run_chunk(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prepared = {
            name: _quantize(array, self.input_details[name]) for name, array in feed.items()
        }
        if self.runner is not None:
            raw = self.runner(**prepared)
        else:
            for name, array in prepared.items():
                self.interpreter.set_tensor(self.input_details[name]["index"], array)
            self.interpreter.invoke()
            raw = {
                name: self.interpreter.get_tensor(self.output_details[name]["index"])
                for name in self.output_names
            }
        return {name: _dequantize(raw[name], self.output_details[name]) for name in raw}


def _quantize(array: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if dtype in (np.int8, np.uint8, np.int16) and scale:
        info = np.iinfo(dtype)
        quantized = np.round(np.asarray(array, np.float32) / scale) + zero_point
        return np.clip(quantized, info.min, info.max).astype(dtype)
    return np.ascontiguousarray(array, dtype=dtype)


def _dequantize(array: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if np.dtype(detail["dtype"]) in (np.int8, np.uint8, np.int16) and scale:
        return ((array.astype(np.float32) - zero_point) * scale).astype(np.float32)
    return array


class TorchRuntime(ModelRuntime):
    """A PyTorch module, TorchScript file or torch.export `.pt2` file run in eval mode.

    A module's train/eval mode is switched to eval only while it runs and restored after.
    """

    kind = "torch"

    def __init__(
        self,
        model: nn.Module,
        input_names: Sequence[str] | None = None,
        path: Path | None = None,
    ) -> None:
        self.model = model
        self.path = path
        self.fixed_batch = None
        self.input_names = list(input_names or ["input"])
        self.input_shapes = {}
        self.input_dtypes = {name: np.dtype(np.float32) for name in self.input_names}
        # Filled from the first run, because the output structure is known only then.
        self.output_names = []

    def _run_chunk(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in feed.values())
        with _common.eval_mode(self.model, "verification", warn=False), torch.no_grad():
            output = self.model(*tensors)
        pairs = _common.flatten_outputs(output)
        if not self.output_names:
            self.output_names = [name for name, _ in pairs]
        return {name: _common.to_numpy(t) for name, t in pairs}


def load_torch_file(path: Path) -> nn.Module:
    """Load a TorchScript (`.pt`, `.pth`, `.jit`) or torch.export (`.pt2`) file as a module."""
    try:
        if path.suffix == ".pt2":
            return torch.export.load(str(path)).module()
        return torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, OSError, KeyError) as exc:
        raise ModelLoadError(
            f"cannot load {path} as a {'torch.export' if path.suffix == '.pt2' else 'TorchScript'}"
            f" file: {exc}"
        ) from exc


def open_runtime(path: str | Path, *, threads: int = 1) -> ModelRuntime:
    """Open an `.onnx` or `.tflite` file (or a `.pt`/`.pt2` PyTorch file) for inference.

    Args:
        path: The model file; the suffix selects the runtime.
        threads: Intra-op threads for ONNX Runtime, interpreter threads for LiteRT.

    Raises:
        ModelLoadError: The file is missing or the runtime rejects it.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file {path} not found")
    if threads < 1:
        raise EdgeoptInputError(f"threads must be at least 1, got {threads}")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return OnnxRuntime(path, threads=threads)
    if suffix == ".tflite":
        return TfliteRuntime(path, threads=threads)
    if suffix in (".pt", ".pth", ".jit", ".pt2"):
        torch.set_num_threads(threads)
        return TorchRuntime(load_torch_file(path), path=path)
    raise ModelLoadError(
        f"unknown model file type {path.suffix!r} for {path}; use .onnx, .tflite, .pt or .pt2"
    )
