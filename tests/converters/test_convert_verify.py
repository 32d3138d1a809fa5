"""convert(), compare_outputs(), verify() and the runtimes, on small synthetic models."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from converter_helpers import max_abs_diff, torch_run
from torch import nn

from edgeopt.converters import (
    compare_outputs,
    convert,
    export_onnx,
    open_runtime,
    verify,
)
from edgeopt.converters import conversion as convert_module
from edgeopt.errors import (
    ConversionError,
    EdgeoptInputError,
    ExportWarning,
    ModelLoadError,
    QuantizationWarning,
)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 5)).eval()


# --- compare_outputs ---------------------------------------------------------------------------


def test_compare_outputs_values():
    reference = {"logits": np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]], np.float32)}
    candidate = {"logits": np.array([[1.0, 2.5, 0.0], [0.0, 3.0, 1.0]], np.float32)}
    result = compare_outputs(reference, candidate)["logits"]
    diff = reference["logits"] - candidate["logits"]
    signal = float(np.sum(reference["logits"] ** 2))
    assert result.max_abs_diff == pytest.approx(3.0)
    assert result.mean_abs_diff == pytest.approx(np.abs(diff).mean())
    assert result.sqnr_db == pytest.approx(10 * math.log10(signal / float(np.sum(diff**2))))
    assert result.top1_agreement == pytest.approx(0.5)
    flat_r, flat_c = reference["logits"].ravel(), candidate["logits"].ravel()
    cosine = flat_r @ flat_c / (np.linalg.norm(flat_r) * np.linalg.norm(flat_c))
    assert result.cosine == pytest.approx(cosine)
    assert result.as_dict()["shape"] == [2, 3]


def test_compare_outputs_identical_is_infinite_sqnr():
    values = {"y": np.ones((3, 1), np.float32)}
    result = compare_outputs(values, values)["y"]
    assert result.sqnr_db == math.inf
    assert result.max_abs_diff == 0.0
    assert result.top1_agreement is None


def test_compare_outputs_counts_nonfinite():
    result = compare_outputs(
        {"y": np.ones(4, np.float32)}, {"y": np.array([1, np.nan, np.inf, 1], np.float32)}
    )["y"]
    assert result.nonfinite == 2


def test_compare_outputs_shape_mismatch_rejected():
    with pytest.raises(EdgeoptInputError, match="shape"):
        compare_outputs({"y": np.ones((2, 3))}, {"y": np.ones((3, 2))})


# --- verify ------------------------------------------------------------------------------------


def test_verify_restores_train_mode_and_statistics(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 3))
    model.eval()
    export = export_onnx(model, torch.randn(2, 4), tmp_path / "m.onnx")
    model.train()
    stats = model[1].running_mean.clone(), model[1].running_var.clone()
    data = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    with pytest.warns(ExportWarning, match="train"):
        report = verify(model, export.path, data)
    assert model.training is True
    assert torch.equal(model[1].running_mean, stats[0])
    assert torch.equal(model[1].running_var, stats[1])
    assert report.max_abs_diff <= 1e-5


def test_verify_reports_accuracy_for_each_side(tmp_path):
    model = mlp()
    data = np.random.default_rng(1).normal(size=(50, 12)).astype(np.float32)
    labels = torch_run(model, data).argmax(axis=1)
    labels[:5] = (labels[:5] + 1) % 5
    export = export_onnx(model, torch.from_numpy(data[:2]), tmp_path / "m.onnx")
    report = verify(model, export.path, data, labels=labels)
    assert report.reference_accuracy == pytest.approx(0.9)
    assert report.candidate_accuracy == pytest.approx(0.9)
    assert report.as_dict()["samples"] == 50


def test_verify_accepts_torchscript_and_pt2_files(tmp_path):
    model = mlp()
    example = torch.randn(3, 12)
    scripted = tmp_path / "m.pt"
    torch.jit.trace(model, example).save(str(scripted))
    program = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (example,)), str(program))
    data = np.random.default_rng(2).normal(size=(3, 12)).astype(np.float32)
    assert verify(model, scripted, data).max_abs_diff <= 1e-6
    assert verify(model, program, data).max_abs_diff <= 1e-6


def test_verify_missing_file_raises():
    with pytest.raises(ModelLoadError, match="not found"):
        verify(mlp(), "missing.onnx", np.zeros((1, 12), np.float32))


def test_runtime_rejects_wrong_feature_size(tmp_path):
    export = export_onnx(mlp(), torch.randn(2, 12), tmp_path / "m.onnx")
    with pytest.raises(EdgeoptInputError, match="axis 1"):
        open_runtime(export.path).run(np.zeros((2, 13), np.float32))


# --- convert -----------------------------------------------------------------------------------


def test_convert_module_to_onnx_verifies(tmp_path):
    model = mlp()
    data = np.random.default_rng(3).normal(size=(20, 12)).astype(np.float32)
    result = convert(model, "onnx", out=tmp_path / "m.onnx", verify_data=data)
    assert result.path.is_file()
    assert result.verification.max_abs_diff <= 1e-5
    assert result.verification.samples == 20


def test_convert_pt2_and_torchscript_files(tmp_path):
    model = mlp()
    example = torch.randn(2, 12)
    program = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (example,)), str(program))
    scripted = tmp_path / "m.pt"
    torch.jit.trace(model, example).save(str(scripted))
    data = np.random.default_rng(4).normal(size=(2, 12)).astype(np.float32)
    for source in (program, scripted):
        result = convert(
            source, "onnx", out=tmp_path / f"{source.suffix[1:]}.onnx", verify_data=data
        )
        assert result.verification.max_abs_diff <= 1e-5
    with pytest.raises(ConversionError, match=r"torch\.export"):
        convert(scripted, "tflite", out=tmp_path / "m.tflite", verify_data=data)


def test_convert_onnx_to_tflite_explains(tmp_path):
    source = export_onnx(mlp(), torch.randn(2, 12), tmp_path / "m.onnx").path
    with pytest.raises(ConversionError, match="onnx2tf") as info:
        convert(source, "tflite", out=tmp_path / "m.tflite", verify_data=np.zeros((1, 12)))
    assert "to='tflite'" in str(info.value)


def test_convert_int8_without_calibration_raises(tmp_path):
    with pytest.raises(EdgeoptInputError, match="calibration"):
        convert(
            mlp(),
            "onnx",
            out=tmp_path / "q.onnx",
            precision="int8",
            example_input=torch.randn(1, 12),
        )


def test_convert_rejects_unknown_format(tmp_path):
    with pytest.raises(EdgeoptInputError, match="coreml"):
        convert(mlp(), "coreml", out=tmp_path / "m.mlmodel")


@pytest.mark.slow
def test_int8_not_faster_warns_and_records(tmp_path, monkeypatch):
    timings = iter([1.0, 1.5])  # fp32 then int8, in ms
    monkeypatch.setattr(convert_module, "measure_latency", lambda *a, **k: next(timings))
    data = np.random.default_rng(5).normal(size=(64, 12)).astype(np.float32)
    with pytest.warns(QuantizationWarning, match="not faster"):
        result = convert(
            mlp(), "onnx", out=tmp_path / "q.onnx", precision="int8", calibration=data
        )
    assert result.latency_ms == {"fp32": 1.0, "int8": 1.5}
    assert result.int8_speedup == pytest.approx(1.0 / 1.5)
    assert result.fp32_path.is_file()


@pytest.mark.slow
def test_int8_faster_does_not_warn(tmp_path, monkeypatch):
    timings = iter([2.0, 1.0])
    monkeypatch.setattr(convert_module, "measure_latency", lambda *a, **k: next(timings))
    data = np.random.default_rng(6).normal(size=(64, 12)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantizationWarning)
        result = convert(
            mlp(),
            "tflite",
            out=tmp_path / "q.tflite",
            precision="int8",
            calibration=data,
            batch_size=4,
        )
    assert result.latency_ms == {"fp32": 2.0, "int8": 1.0}
    assert result.verification.top1_agreement >= 0.9


def test_measure_latency_is_positive_median(tmp_path):
    export = export_onnx(mlp(), torch.randn(2, 12), tmp_path / "m.onnx")
    runtime = open_runtime(export.path)
    latency = convert_module.measure_latency(runtime, np.zeros((1, 12), np.float32), runs=5)
    assert 0 < latency < 1000


def test_runtime_loops_fixed_batch_for_many_rows(tmp_path):
    model = mlp()
    export = export_onnx(model, torch.randn(3, 12), tmp_path / "m.onnx", dynamic_batch=False)
    data = np.random.default_rng(7).normal(size=(10, 12)).astype(np.float32)
    output = open_runtime(export.path).run(data)["output"]
    assert output.shape == (10, 5)
    assert max_abs_diff(output, torch_run(model, data)) <= 1e-5
