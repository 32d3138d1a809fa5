from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeopt.errors import TargetError
from edgeopt.metrics import count_macs
from edgeopt.students import StudentConfig, build_student, conv_bn_act
from edgeopt.targets._kernel_models import build_onnx_kernel, build_tflite_kernel
from edgeopt.targets._kernels import Kernel, extract_kernels
from edgeopt.targets._runners import open_session
from edgeopt.targets.predictor import (
    SCHEMA_VERSION,
    LatencyPredictor,
    LatencyTable,
    OverheadFit,
    calibrate,
    fit_overhead,
    student_kernels,
)

IR_CONFIG = StudentConfig(
    family="inverted_residual", width=8, stages=2, depth=2, expand_ratio=4, head_width=32
)
KERNELS = [
    Kernel("conv", 1, 8, 8, 8, 3, 1, 1, "relu6"),
    Kernel("conv", 8, 8, 8, 16, 1, 1, 0, "relu6"),
    Kernel("depthwise", 16, 8, 8, 16, 3, 2, 1, "relu6"),
    Kernel("depthwise", 16, 7, 7, 16, 5, 2, 2, "relu6"),
    Kernel("add", 8, 4, 4, 8),
    Kernel("mean", 16, 4, 4, 16),
    Kernel("linear", 16, 1, 1, 10, activation="relu"),
]


def test_kernel_macs_match_count_macs() -> None:
    model = build_student(IR_CONFIG, (1, 28, 28), 10)
    kernels = extract_kernels(model, (1, 28, 28))
    assert sum(k.macs for k in kernels if k.op in ("conv", "depthwise", "linear")) == count_macs(
        model, (1, 28, 28)
    )


def test_kernels_of_inverted_residual() -> None:
    kernels = extract_kernels(build_student(IR_CONFIG, (1, 8, 8), 10), (1, 8, 8))
    ops = Counter(kernel.op for kernel in kernels)
    # Convs: stem, 4 blocks × (expand, project) and the head. Each block has one depthwise, and
    # the second block of each stage keeps its shape, so it adds its input.
    assert ops == {"conv": 10, "depthwise": 4, "add": 2, "mean": 1, "linear": 1}
    assert kernels[0].key == "conv:1x8x8:8:k3s1p1:relu6"
    projections = [k for k in kernels if k.op == "conv" and k.activation == "none"]
    assert len(projections) == 4


def test_kernels_of_mlp() -> None:
    config = StudentConfig(family="mlp", hidden=32, layers=2)
    kernels = extract_kernels(build_student(config, (64,), 10), (64,))
    assert [k.key for k in kernels] == [
        "linear:64x1x1:32:k1s1p0:relu",
        "linear:32x1x1:32:k1s1p0:relu",
        "linear:32x1x1:10:k1s1p0:none",
    ]


def test_meta_extraction_matches_real_model() -> None:
    real = extract_kernels(build_student(IR_CONFIG, (1, 28, 28), 10), (1, 28, 28))
    assert student_kernels(IR_CONFIG, (1, 28, 28)) == real


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda kernel: kernel.key)
def test_tflite_kernel_runs_with_expected_shape(kernel: Kernel, tmp_path: Path) -> None:
    path = tmp_path / "kernel.tflite"
    path.write_bytes(build_tflite_kernel(kernel))
    session = open_session(path, "litert", 1)
    session.prepare_inputs(None)
    session.run()
    output = session.interpreter.get_output_details()[0]["shape"].tolist()
    expected = (
        [1, kernel.out_channels]
        if kernel.op in ("linear", "mean")
        else [1, kernel.out_height, kernel.out_width, kernel.out_channels]
    )
    if kernel.op == "add":
        expected = [1, kernel.height, kernel.width, kernel.in_channels]
    assert output == expected


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda kernel: kernel.key)
def test_onnx_kernel_runs_with_expected_shape(kernel: Kernel, tmp_path: Path) -> None:
    path = tmp_path / "kernel.onnx"
    path.write_bytes(build_onnx_kernel(kernel))
    session = open_session(path, "onnxruntime", 1)
    session.prepare_inputs(None)
    outputs = session.session.run(None, session._feed)
    if kernel.op in ("linear", "mean"):
        assert list(outputs[0].shape) == [1, kernel.out_channels]
    elif kernel.op == "add":
        assert list(outputs[0].shape) == [1, kernel.in_channels, kernel.height, kernel.width]
    else:
        assert list(outputs[0].shape) == [
            1,
            kernel.out_channels,
            kernel.out_height,
            kernel.out_width,
        ]


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda kernel: kernel.key)
def test_tflite_kernel_copies(kernel: Kernel, tmp_path: Path) -> None:
    single, three = tmp_path / "single.tflite", tmp_path / "three.tflite"
    single.write_bytes(build_tflite_kernel(kernel))
    three.write_bytes(build_tflite_kernel(kernel, copies=3))
    session = open_session(three, "litert", 1)
    session.prepare_inputs(None)
    session.run()
    outputs = session.interpreter.get_output_details()
    assert len(outputs) == 3
    assert len({item["index"] for item in outputs}) == 3
    assert _tflite_ops(three) == 3 * _tflite_ops(single)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda kernel: kernel.key)
def test_onnx_kernel_copies_survive_optimization(kernel: Kernel, tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    counts = []
    for copies in (1, 3):
        path = tmp_path / f"kernel{copies}.onnx"
        path.write_bytes(build_onnx_kernel(kernel, copies=copies))
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"optimized{copies}.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
        counts.append(sum(node.op_type not in ("ReorderInput",) for node in graph.node))
        assert len(graph.output) == copies
    assert counts[1] == 3 * counts[0]


def test_kernel_copies_must_be_positive() -> None:
    with pytest.raises(ValueError, match="copies=0"):
        build_tflite_kernel(KERNELS[0], copies=0)
    with pytest.raises(ValueError, match="copies=0"):
        build_onnx_kernel(KERNELS[0], copies=0)


def _tflite_ops(path: Path) -> list[str]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    ops = [op["op_name"] for op in interpreter._get_ops_details()]
    return [op for op in ops if op not in ("DELEGATE", "TRANSPOSE", "RESHAPE")]


@pytest.mark.slow
def test_kernel_lowering_matches_litert_torch(tmp_path: Path) -> None:
    from edgeopt.targets._export import export_model

    # Stem on one channel, a stride-2 depthwise on an even and on an odd input, a 1×1 conv.
    module = torch.nn.Sequential(
        conv_bn_act(1, 8, 3),
        conv_bn_act(8, 8, 3, stride=2, groups=8),
        conv_bn_act(8, 16, 1),
        conv_bn_act(16, 16, 5, stride=2, groups=16),
    )
    converted = export_model(module, (1, 14, 14), tmp_path / "chain.tflite")
    kernels = extract_kernels(module, (1, 14, 14))
    built = []
    for number, kernel in enumerate(kernels):
        path = tmp_path / f"k{number}.tflite"
        path.write_bytes(build_tflite_kernel(kernel))
        built += _tflite_ops(path)
    assert _tflite_ops(converted) == built


def test_fit_overhead_recovers_coefficients() -> None:
    rng = np.random.default_rng(0)
    sums = rng.uniform(0.01, 1.0, 12)
    counts = rng.integers(5, 40, 12)
    measured = 0.004 + 0.9 * sums - 0.0005 * counts
    fit = fit_overhead(list(zip(sums, counts, measured, strict=True)))
    assert fit.intercept_ms == pytest.approx(0.004, abs=1e-9)
    assert fit.scale == pytest.approx(0.9)
    assert fit.per_kernel_ms == pytest.approx(-0.0005, abs=1e-9)


def test_fit_overhead_with_few_models() -> None:
    fit = fit_overhead([(0.1, 10, 0.12), (0.2, 12, 0.22)])
    assert fit.scale == 1.0
    assert fit.intercept_ms == pytest.approx(0.02)


def _table(kernels: list[Kernel]) -> LatencyTable:
    entries = {
        kernel.key: {"kernel": kernel.to_dict(), "latency_ms": 1e-3 + kernel.macs * 1e-8}
        for kernel in kernels
    }
    return LatencyTable(
        target="litert-xnnpack",
        runtime="litert",
        threads=1,
        runtime_version="test",
        machine={"cpu": "test"},
        created="2026-01-01T00:00:00+00:00",
        input_shapes=[[1, 8, 8]],
        kernels=entries,
        overhead=OverheadFit(intercept_ms=0.002),
    )


def test_table_round_trip(tmp_path: Path) -> None:
    table = _table(KERNELS)
    loaded = LatencyTable.load(table.save(tmp_path / "table.json"))
    assert loaded == table
    assert json.loads((tmp_path / "table.json").read_text())["schema_version"] == SCHEMA_VERSION


def test_table_schema_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "table.json"
    data = _table(KERNELS).to_dict() | {"schema_version": SCHEMA_VERSION + 1}
    path.write_text(json.dumps(data))
    with pytest.raises(TargetError, match="schema version"):
        LatencyTable.load(path)


def test_prediction_sums_kernels() -> None:
    predictor = LatencyPredictor(_table(KERNELS))
    prediction = predictor.predict_kernels(KERNELS)
    expected = sum(1e-3 + kernel.macs * 1e-8 for kernel in KERNELS)
    assert prediction.kernel_sum_ms == pytest.approx(expected)
    assert prediction.latency_ms == pytest.approx(expected + 0.002)
    assert prediction.interpolated == 0
    assert prediction.estimate is True


def test_missing_kernel_interpolated_and_flagged() -> None:
    known = [Kernel("conv", 8, 8, 8, channels, 1, 1, 0, "relu6") for channels in (8, 16, 32, 64)]
    predictor = LatencyPredictor(_table(known))
    missing = Kernel("conv", 8, 8, 8, 24, 1, 1, 0, "relu6")
    latency, interpolated = predictor.kernel_latency(missing)
    assert interpolated is True
    assert latency == pytest.approx(1e-3 + missing.macs * 1e-8, rel=0.05)
    assert predictor.predict_kernels([missing]).interpolated == 1


def test_missing_op_type_raises() -> None:
    predictor = LatencyPredictor(_table(KERNELS[:2]))
    with pytest.raises(TargetError, match="no 'linear' kernels"):
        predictor.kernel_latency(Kernel("linear", 300, 1, 1, 7))


def test_no_table_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGEOPT_CACHE_DIR", str(tmp_path))
    with pytest.raises(TargetError, match="edgeopt targets calibrate onnxruntime-cpu-mt"):
        LatencyPredictor.for_target("onnxruntime-cpu-mt")


@pytest.mark.slow
def test_quick_calibration(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGEOPT_CACHE_DIR", str(tmp_path))
    table = calibrate("litert-xnnpack", input_shapes=[(1, 8, 8)], quick=True)
    assert table.schema_version == SCHEMA_VERSION
    assert table.target == "litert-xnnpack"
    assert table.runtime_version
    assert table.machine["cores"] >= 1
    assert table.created.startswith("20")
    assert len(table.overhead.models) == 2
    for entry in table.kernels.values():
        assert entry["latency_ms"] >= 0.0
        assert entry["copies_ms"] > 0.0
        # One copy pays the invoke overhead that the in-model cost leaves out.
        assert entry["latency_ms"] < entry["single_ms"]
    assert {entry["kernel"]["op"] for entry in table.kernels.values()} == {
        "conv",
        "depthwise",
        "add",
        "mean",
        "linear",
    }
    predictor = LatencyPredictor.for_target("litert-xnnpack")
    narrow = predictor.predict_config(StudentConfig(width=8, stages=2), (1, 8, 8))
    wide = predictor.predict_config(StudentConfig(width=16, stages=2), (1, 8, 8))
    assert narrow.interpolated == 0
    assert wide.kernel_sum_ms > narrow.kernel_sum_ms


def test_calibrate_rejects_predicted_target() -> None:
    with pytest.raises(TargetError, match="cannot calibrate"):
        calibrate("cortex-a76")
