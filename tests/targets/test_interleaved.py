from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeopt.errors import EdgeoptInputError
from edgeopt.targets._interleaved import fast_latency_ms, time_interleaved
from edgeopt.targets._kernel_models import build_onnx_kernel, build_tflite_kernel
from edgeopt.targets._kernels import Kernel

KERNEL = Kernel("conv", 8, 8, 8, 16, 1, 1, 0, "relu6")


@pytest.fixture
def tflite_kernel(tmp_path: Path) -> Path:
    path = tmp_path / "kernel.tflite"
    path.write_bytes(build_tflite_kernel(KERNEL))
    return path


def test_time_interleaved_shape(tflite_kernel: Path) -> None:
    medians = time_interleaved(
        [tflite_kernel, tflite_kernel], runtime="litert", rounds=3, window_s=0.0, window_runs=5
    )
    assert medians.shape == (2, 3)
    assert np.all(medians > 0.0)
    assert np.all(np.isfinite(medians))


def test_time_interleaved_onnxruntime(tmp_path: Path) -> None:
    path = tmp_path / "kernel.onnx"
    path.write_bytes(build_onnx_kernel(KERNEL))
    medians = time_interleaved([path], runtime="onnxruntime", rounds=2, window_s=0.0)
    assert medians.shape == (1, 2)
    assert np.all(medians > 0.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rounds": 0}, "rounds=0"),
        ({"window_runs": 0}, "window_runs=0"),
        ({"window_s": -1.0}, "window_s=-1.0"),
    ],
)
def test_time_interleaved_rejects_invalid(
    tflite_kernel: Path, options: dict, message: str
) -> None:
    with pytest.raises(EdgeoptInputError, match=message):
        time_interleaved([tflite_kernel], runtime="litert", **options)


def test_fast_latency_keeps_fast_periods() -> None:
    # Two rows: one model slowed by a third in most rounds, one steady model.
    medians = np.asarray(
        [
            [4.5, 6.0, 6.0, 4.5, 6.0, 6.0, 6.0, 4.5, 6.0, 6.0],
            [2.0] * 10,
        ]
    )
    latencies = fast_latency_ms(medians)
    assert latencies.shape == (2,)
    assert latencies[0] == pytest.approx(4.5)
    assert latencies[1] == pytest.approx(2.0)
    assert fast_latency_ms(medians, quantile=0.5)[0] == pytest.approx(6.0)
