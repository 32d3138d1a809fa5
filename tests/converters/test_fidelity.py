"""Fidelity on real MNIST digits: a trained student CNN and the pretrained mnist.onnx."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from converter_helpers import max_abs_diff, normalise, shared_file, torch_run

from edgeopt.converters import (
    convert,
    export_onnx,
    export_tflite,
    open_runtime,
    quantize_onnx,
    verify,
)

pytestmark = pytest.mark.shared

# Samples 0-4999 train the CNN (see conftest); fidelity is measured on 5000-9999.
CALIBRATION = slice(5000, 5300)
TEST = slice(6000, 10000)


@pytest.fixture(scope="module")
def cnn_files(trained_cnn, mnist, tmp_path_factory):
    """The trained CNN exported to ONNX fp32/int8 and TFLite fp32/int8."""
    images, _ = mnist
    folder = tmp_path_factory.mktemp("cnn")
    calibration = normalise(images[CALIBRATION])
    example = torch.from_numpy(calibration[:1])
    onnx_fp32 = export_onnx(trained_cnn, example, folder / "cnn.onnx").path
    onnx_int8 = quantize_onnx(onnx_fp32, folder / "cnn_int8.onnx", calibration).path
    tflite_fp32 = export_tflite(trained_cnn, example, folder / "cnn.tflite").path
    tflite_int8 = export_tflite(
        trained_cnn,
        example,
        folder / "cnn_int8.tflite",
        precision="int8",
        calibration=calibration,
    ).path
    return {
        "onnx_fp32": onnx_fp32,
        "onnx_int8": onnx_int8,
        "tflite_fp32": tflite_fp32,
        "tflite_int8": tflite_int8,
    }


@pytest.mark.slow
def test_cnn_accuracy_is_meaningful(trained_cnn, mnist):
    images, labels = mnist
    logits = torch_run(trained_cnn, normalise(images[TEST]))
    assert np.mean(logits.argmax(axis=1) == labels[TEST]) >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize(("key", "tolerance"), [("onnx_fp32", 1e-5), ("tflite_fp32", 1e-4)])
def test_cnn_fp32_matches_pytorch(cnn_files, trained_cnn, mnist, key, tolerance):
    images, _ = mnist
    x = normalise(images[TEST][:1000])
    output = open_runtime(cnn_files[key]).run(x)["output"]
    assert max_abs_diff(output, torch_run(trained_cnn, x)) <= tolerance


@pytest.mark.slow
@pytest.mark.parametrize("key", ["onnx_int8", "tflite_int8"])
def test_cnn_int8_agrees_on_real_digits(cnn_files, trained_cnn, mnist, key):
    images, labels = mnist
    report = verify(trained_cnn, cnn_files[key], normalise(images[TEST]), labels=labels[TEST])
    assert report.top1_agreement >= 0.99
    assert report.candidate_accuracy >= report.reference_accuracy - 0.01


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_cnn_int8_at_least_3_5x_smaller(cnn_files, trained_cnn, fmt):
    params = sum(p.numel() for p in trained_cnn.parameters())
    assert params >= 50_000
    fp32_size = cnn_files[f"{fmt}_fp32"].stat().st_size
    int8_size = cnn_files[f"{fmt}_int8"].stat().st_size
    assert fp32_size / int8_size >= 3.5


# --- the pretrained ONNX Model Zoo MNIST CNN (opset 7, fixed batch 1, raw 0-255 input) -----


@pytest.fixture(scope="module")
def mnist_onnx():
    return shared_file("models", "mnist_cnn_onnx", "mnist.onnx")


def test_mnist_onnx_runtime_reads_fixed_batch(mnist_onnx, mnist):
    images, labels = mnist
    runtime = open_runtime(mnist_onnx)
    assert runtime.fixed_batch == 1
    assert runtime.input_shape == (1, 1, 28, 28)
    logits = runtime.run(images[:500])["Plus214_Output_0"]
    assert logits.shape == (500, 10)
    assert np.mean(logits.argmax(axis=1) == labels[:500]) >= 0.97


@pytest.mark.slow
def test_mnist_onnx_int8_agreement(mnist_onnx, mnist, tmp_path):
    images, labels = mnist
    result = quantize_onnx(mnist_onnx, tmp_path / "mnist_int8.onnx", images[CALIBRATION])
    assert result.source_opset == 7
    assert result.opset == 13
    report = verify(mnist_onnx, result.path, images[TEST], labels=labels[TEST])
    assert report.top1_agreement >= 0.99
    assert report.reference_accuracy >= 0.98
    assert report.candidate_accuracy >= report.reference_accuracy - 0.005
    # NOTE: mnist.onnx has only 5,998 parameters (24 kB), so the graph's fixed overhead keeps the
    # int8 file about 1.8× smaller. The 3.5× size ratio is tested on the CNN above.
    ratio = mnist_onnx.stat().st_size / result.path.stat().st_size
    assert ratio >= 1.5


@pytest.mark.slow
def test_mnist_onnx_per_layer_report(mnist_onnx, mnist, tmp_path):
    images, _ = mnist
    result = quantize_onnx(mnist_onnx, tmp_path / "q.onnx", images[CALIBRATION], method="minmax")
    report = verify(mnist_onnx, result.path, images[TEST][:200], per_layer=True)
    tensors = [layer.tensor for layer in report.per_layer]
    assert "ReLU32_Output_0" in tensors
    assert all(layer.sqnr_db >= 25 for layer in report.per_layer)
    assert report.first_divergence is None


@pytest.mark.slow
def test_convert_onnx_file_to_int8_records_latency(mnist_onnx, mnist, tmp_path):
    images, labels = mnist
    result = convert(
        mnist_onnx,
        "onnx",
        out=tmp_path / "mnist_int8.onnx",
        precision="int8",
        calibration=images[CALIBRATION],
        verify_data=images[TEST][:1000],
        labels=labels[TEST][:1000],
    )
    assert result.verification.top1_agreement >= 0.99
    assert set(result.latency_ms) == {"fp32", "int8"}
    assert all(value > 0 for value in result.latency_ms.values())
    assert result.size_bytes["int8"] < result.size_bytes["fp32"]
    assert result.as_dict()["verification"]["samples"] == 1000
