"""Sessions that run one model file repeatedly: ONNX Runtime and LiteRT (XNNPACK)."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.errors import EdgeoptInputError, ModelLoadError, TargetError

RUNTIMES = ("onnxruntime", "litert")
SUFFIX_RUNTIME = {".onnx": "onnxruntime", ".tflite": "litert"}
RUNTIME_SUFFIX = {runtime: suffix for suffix, runtime in SUFFIX_RUNTIME.items()}

_ONNX_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


def runtime_for_path(model_path: Path, runtime: str | None = None) -> str:
    """Return `runtime` if given, else the runtime that the suffix of `model_path` implies."""
    if runtime is not None:
        if runtime not in RUNTIMES:
            raise TargetError(f"unknown runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
        return runtime
    suffix = model_path.suffix.lower()
    if suffix not in SUFFIX_RUNTIME:
        raise ModelLoadError(
            f"cannot tell the runtime of {str(model_path)!r} from its suffix: "
            "use an .onnx or .tflite file, or pass runtime='onnxruntime' or 'litert'"
        )
    return SUFFIX_RUNTIME[suffix]


def check_model_file(model_path: str | Path) -> Path:
    """Return `model_path` as a Path, or raise ModelLoadError if it is not a readable file."""
    path = Path(model_path)
    if not path.is_file():
        raise ModelLoadError(f"model file {str(path)!r} not found: check the path")
    return path


def default_threads() -> int:
    """Return the number of cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS
        return os.cpu_count() or 1


class InputSpec:
    """Name, shape, dtype and int8 quantization (scale, zero point) of one model input."""

    def __init__(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: np.dtype,
        quantization: tuple[float, int] = (0.0, 0),
    ) -> None:
        self.name = name
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.quantization = quantization

    def example(self, rng: np.random.Generator) -> np.ndarray:
        """Return a random tensor that fits this input (standard normal before quantization)."""
        if np.issubdtype(self.dtype, np.floating):
            return rng.standard_normal(self.shape).astype(self.dtype)
        if np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            low, high = max(int(info.min), -128), min(int(info.max), 127)
            return rng.integers(low, high + 1, size=self.shape).astype(self.dtype)
        return np.zeros(self.shape, dtype=self.dtype)

    def adapt(self, example: np.ndarray) -> np.ndarray:
        """Return `example` in this input's shape and dtype (floats quantized for int8 inputs)."""
        array = np.asarray(example)
        if array.shape != self.shape:
            if array.size == int(np.prod(self.shape)):
                array = array.reshape(self.shape)
            elif array.shape == self.shape[1:]:
                array = array[np.newaxis]
            else:
                raise EdgeoptInputError(
                    f"example of shape {array.shape} does not fit input {self.name!r} of shape "
                    f"{self.shape}: pass one sample with the model's input shape"
                )
        scale, zero_point = self.quantization
        if np.issubdtype(self.dtype, np.integer) and np.issubdtype(array.dtype, np.floating):
            if scale > 0:
                array = np.round(array / scale) + zero_point
            info = np.iinfo(self.dtype)
            array = np.clip(array, info.min, info.max)
        return array.astype(self.dtype)


class Session(ABC):
    """A loaded model with its inputs set, ready to run once per `run()` call."""

    runtime: str
    inputs: list[InputSpec]

    @abstractmethod
    def set_inputs(self, arrays: list[np.ndarray]) -> None:
        """Set the input tensors used by every later `run()`."""

    @abstractmethod
    def run(self) -> None:
        """Run one inference on the inputs set last."""

    def prepare_inputs(self, example: np.ndarray | None, seed: int = 0) -> None:
        """Set `example` as the first input (random data for the others, or for all if None)."""
        rng = np.random.default_rng(seed)
        arrays = [spec.example(rng) for spec in self.inputs]
        if example is not None:
            arrays[0] = self.inputs[0].adapt(example)
        self.set_inputs(arrays)


class OnnxRuntimeSession(Session):
    """ONNX Runtime CPU session pinned to `threads` intra-op threads and sequential execution."""

    runtime = "onnxruntime"

    def __init__(self, model_path: Path, threads: int, profile_path: Path | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if profile_path is not None:
            options.enable_profiling = True
            options.profile_file_prefix = str(profile_path)
        try:
            self.session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # ORT raises its own untyped exceptions on bad files
            raise ModelLoadError(
                f"ONNX Runtime cannot load {str(model_path)!r}: {error}"
            ) from error
        self.inputs = [
            InputSpec(
                item.name,
                tuple(dim if isinstance(dim, int) and dim > 0 else 1 for dim in item.shape),
                _ONNX_DTYPES.get(item.type, np.float32),
            )
            for item in self.session.get_inputs()
        ]
        self._feed: dict[str, np.ndarray] = {}

    def set_inputs(self, arrays: list[np.ndarray]) -> None:
        self._feed = {spec.name: array for spec, array in zip(self.inputs, arrays, strict=True)}

    def run(self) -> None:
        self.session.run(None, self._feed)

    def end_profiling(self) -> str:
        """Stop ORT's profiler and return the path of its JSON trace."""
        return self.session.end_profiling()


class LiteRTSession(Session):
    """LiteRT interpreter with `threads` threads and the default XNNPACK delegate."""

    runtime = "litert"

    def __init__(self, model_path: Path, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        try:
            self.interpreter = Interpreter(model_path=str(model_path), num_threads=threads)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as error:
            raise ModelLoadError(f"LiteRT cannot load {str(model_path)!r}: {error}") from error
        details: list[dict[str, Any]] = self.interpreter.get_input_details()
        self._indices = [item["index"] for item in details]
        self.inputs = [
            InputSpec(
                item["name"],
                tuple(int(dim) if dim > 0 else 1 for dim in item["shape"]),
                item["dtype"],
                (float(item["quantization"][0]), int(item["quantization"][1])),
            )
            for item in details
        ]

    def set_inputs(self, arrays: list[np.ndarray]) -> None:
        for index, array in zip(self._indices, arrays, strict=True):
            self.interpreter.set_tensor(index, array)

    def run(self) -> None:
        self.interpreter.invoke()


def open_session(model_path: Path, runtime: str, threads: int) -> Session:
    """Load `model_path` into a session of `runtime` that runs on `threads` threads."""
    if threads < 1:
        raise EdgeoptInputError(f"invalid threads={threads}: use 1 or more")
    if runtime == "onnxruntime":
        return OnnxRuntimeSession(model_path, threads)
    return LiteRTSession(model_path, threads)


def runtime_version(runtime: str) -> str:
    """Return the installed version of `runtime`'s Python package."""
    from importlib import metadata

    package = "onnxruntime" if runtime == "onnxruntime" else "ai-edge-litert"
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"
