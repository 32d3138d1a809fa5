from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeopt.errors import EdgeoptInputError, ModelLoadError, TargetError
from edgeopt.targets import get_target, measure_latency
from edgeopt.targets._runners import InputSpec
from edgeopt.targets._stats import median_relative_error

from .conftest import INPUT_SHAPE

QUICK = {"warmup": 2, "min_runs": 5, "budget_s": 0.2, "memory": False}


@pytest.mark.parametrize("fixture", ["onnx_model", "tflite_model"])
def test_measure_latency_fields(fixture: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(fixture)
    stats = measure_latency(path, **QUICK)
    assert stats.median_ms > 0
    assert stats.p90_ms >= stats.median_ms
    assert stats.runs >= 5
    assert stats.warmup_runs == 2
    assert stats.threads == 1
    assert stats.file_size_bytes == path.stat().st_size
    assert stats.source == "measured-local"
    assert stats.estimate is False
    assert stats.peak_memory_bytes is None
    assert set(stats.as_dict()) >= {"median_ms", "p90_ms", "cv", "peak_memory_bytes"}


def test_measure_runs_until_max_runs(tflite_model: Path) -> None:
    stats = measure_latency(
        tflite_model, warmup=0, min_runs=3, max_runs=3, budget_s=10, memory=False
    )
    assert stats.runs == 3


def test_peak_memory_is_positive(tflite_model: Path) -> None:
    stats = measure_latency(tflite_model, warmup=1, min_runs=3, budget_s=0.1, memory=True)
    assert stats.peak_memory_bytes is not None
    assert stats.peak_memory_bytes > 0


def test_target_measure_with_example(onnx_model: Path) -> None:
    example = np.ones(INPUT_SHAPE, dtype=np.float32)
    stats = get_target("onnxruntime-cpu-mt").measure(onnx_model, example, budget_s=0.2)
    assert stats.threads == get_target("onnxruntime-cpu-mt").threads
    assert stats.median_ms > 0


def test_example_of_wrong_shape_rejected(tflite_model: Path) -> None:
    with pytest.raises(EdgeoptInputError, match="does not fit input"):
        measure_latency(tflite_model, example=np.zeros((3, 5, 5), np.float32), **QUICK)


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        measure_latency(tmp_path / "absent.tflite", **QUICK)


def test_unknown_suffix_rejected(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="suffix"):
        measure_latency(path, **QUICK)


def test_corrupt_model_rejected(tmp_path: Path) -> None:
    path = tmp_path / "model.tflite"
    path.write_bytes(b"not a flatbuffer")
    with pytest.raises(ModelLoadError, match="cannot load"):
        measure_latency(path, **QUICK)


def test_target_rejects_other_format(onnx_model: Path) -> None:
    with pytest.raises(TargetError, match=r"runs \.tflite files"):
        get_target("litert-xnnpack").measure(onnx_model)


def test_int8_input_quantized() -> None:
    spec = InputSpec("x", (1, 4), np.dtype(np.int8), quantization=(0.5, 3))
    adapted = spec.adapt(np.array([[0.0, 1.0, -1.0, 100.0]], dtype=np.float32))
    assert adapted.dtype == np.int8
    assert adapted.tolist() == [[3, 5, 1, 127]]


def test_int8_random_input_in_range() -> None:
    spec = InputSpec("x", (2, 8), np.dtype(np.int8), quantization=(0.1, 0))
    example = spec.example(np.random.default_rng(0))
    assert example.dtype == np.int8
    assert example.shape == (2, 8)


def test_batchless_example_gets_batch() -> None:
    spec = InputSpec("x", (1, 1, 8, 8), np.dtype(np.float32))
    assert spec.adapt(np.zeros((1, 8, 8))).shape == (1, 1, 8, 8)


def test_median_relative_error_shrinks_with_runs() -> None:
    rng = np.random.default_rng(0)
    few = 1.0 + 0.1 * rng.standard_normal(20)
    many = 1.0 + 0.1 * rng.standard_normal(2000)
    assert median_relative_error(many) < median_relative_error(few)
    assert median_relative_error(many) == pytest.approx(1.2533 * 0.1 / np.sqrt(2000), rel=0.2)


_MEASURE_IN_CHILD = """
import json, sys
from edgeopt.targets import measure_latency
stats = measure_latency(sys.argv[1], budget_s=4.0, memory=False)
print(json.dumps(stats.as_dict()))
"""


@pytest.mark.slow
def test_median_repeatable_across_processes(tflite_model: Path) -> None:
    medians = []
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-c", _MEASURE_IN_CHILD, str(tflite_model)],
            capture_output=True,
            text=True,
            check=True,
        )
        medians.append(json.loads(result.stdout.strip().splitlines()[-1])["median_ms"])
    assert abs(medians[0] - medians[1]) / min(medians) <= 0.05
