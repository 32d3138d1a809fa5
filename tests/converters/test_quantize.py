"""ONNX int8 quantization: per-channel weights, opset handling, calibration choice, per-layer."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgeopt.converters import export_onnx, open_runtime, quantize_onnx, verify
from edgeopt.converters.quantize import activation_ranges
from edgeopt.converters.verify import compare_arrays
from edgeopt.errors import EdgeoptInputError

# --- depthwise conv with channel ranges spread over three decades -------------------


def spread_depthwise() -> nn.Module:
    """Depthwise conv whose channel weight ranges go from 1e-3 to 1, then BN and ReLU."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, groups=16)
    bn = nn.BatchNorm2d(16)
    scales = torch.logspace(-3, 0, 16)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(16, 1, 3, 3) * scales[:, None, None, None])
        conv.bias.copy_(torch.randn(16) * scales * 0.1)
        bn.running_mean.copy_(torch.randn(16) * scales * 0.1)
        bn.running_var.copy_(torch.rand(16) * 0.5 + 0.75)
        bn.weight.copy_(torch.rand(16) + 0.5)
        bn.bias.copy_(torch.rand(16) * scales)
    return nn.Sequential(conv, bn, nn.ReLU()).eval()


def depthwise_data(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, 16, 20, 24)).astype(np.float32)


def _weight_dequantize_nodes(path) -> list[tuple[int | None, int]]:
    """(axis, number of scales) of each DequantizeLinear applied to an initializer."""
    proto = onnx.load(str(path))
    constants = {init.name: init for init in proto.graph.initializer}
    rows = []
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in constants:
            continue
        scale = onnx.numpy_helper.to_array(constants[node.input[1]])
        if scale.dtype == np.int32 or constants[node.input[0]].data_type == onnx.TensorProto.INT32:
            continue  # the int32 bias
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        rows.append((axis, int(np.size(scale))))
    return rows


def _per_channel_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    ref = np.moveaxis(reference, 1, 0).reshape(reference.shape[1], -1).astype(np.float64)
    cand = np.moveaxis(candidate, 1, 0).reshape(candidate.shape[1], -1).astype(np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    # A channel that quantized to all zeros has no direction: count it as cosine 0.
    return np.where(norms > 0, np.sum(ref * cand, axis=1) / np.maximum(norms, 1e-30), 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("opset", [11, 13])
def test_depthwise_per_channel_int8(opset, tmp_path):
    model = spread_depthwise()
    fp32 = export_onnx(model, torch.randn(1, 16, 20, 24), tmp_path / "dw.onnx", opset=opset)
    calibration = depthwise_data(32, seed=1)
    held_out = depthwise_data(16, seed=2)
    result = quantize_onnx(fp32.path, tmp_path / "dw_int8.onnx", calibration, held_out=held_out)

    assert result.opset >= 13
    weights = _weight_dequantize_nodes(result.path)
    assert weights, "no quantized weight found"
    for axis, scales in weights:
        assert axis == 0
        assert scales == 16

    reference = open_runtime(fp32.path).run(held_out)["output"]
    candidate = open_runtime(result.path).run(held_out)["output"]
    assert compare_arrays("output", reference, candidate).sqnr_db >= 30.0
    assert _per_channel_cosines(reference, candidate).min() >= 0.99


@pytest.mark.slow
def test_per_channel_sqnr_equal_across_opsets(tmp_path):
    model = spread_depthwise()
    held_out = depthwise_data(16, seed=2)
    sqnr = {}
    for opset in (11, 13):
        fp32 = export_onnx(
            model, torch.randn(1, 16, 20, 24), tmp_path / f"{opset}.onnx", opset=opset
        )
        result = quantize_onnx(
            fp32.path,
            tmp_path / f"{opset}_q.onnx",
            depthwise_data(32, 1),
            method="minmax",
            held_out=held_out,
        )
        sqnr[opset] = result.candidates["minmax"]["sqnr_db"]
    assert abs(sqnr[11] - sqnr[13]) <= 0.5


@pytest.mark.slow
def test_per_tensor_measured_worse_on_spread_channels(tmp_path):
    model = spread_depthwise()
    fp32 = export_onnx(model, torch.randn(1, 16, 20, 24), tmp_path / "dw.onnx")
    calibration, held_out = depthwise_data(32, 1), depthwise_data(16, seed=2)
    reference = open_runtime(fp32.path).run(held_out)["output"]
    cosines = {}
    for per_channel in (True, False):
        result = quantize_onnx(
            fp32.path,
            tmp_path / f"{per_channel}.onnx",
            calibration,
            method="minmax",
            per_channel=per_channel,
            held_out=held_out,
        )
        candidate = open_runtime(result.path).run(held_out)["output"]
        cosines[per_channel] = _per_channel_cosines(reference, candidate).min()
        if not per_channel:
            assert all(scales == 1 for _, scales in _weight_dequantize_nodes(result.path))
    assert cosines[True] >= 0.99
    assert cosines[False] < 0.9


# --- calibration outliers -------------------------------------------------------------------


def synthetic_task(seed: int) -> tuple[nn.Module, np.ndarray, np.ndarray]:
    """Train Linear(16→32)→ReLU→Linear(32→4) on a 4-class linear task; return model and data."""
    generator = torch.Generator().manual_seed(seed)
    true_weights = torch.randn(16, 4, generator=generator)
    x = torch.randn(1400, 16, generator=generator)
    y = (x @ true_weights).argmax(dim=1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x[:1000]), y[:1000]).backward()
        optimiser.step()
    return model.eval(), x.numpy(), y.numpy()


def _first_activation_range(path) -> float:
    """Width of the range the quantized output of the first Gemm/MatMul can represent."""
    proto = onnx.load(str(path))
    first = next(n for n in proto.graph.node if n.op_type in ("Gemm", "MatMul"))
    ranges = activation_ranges(path)
    consumers = [n for n in proto.graph.node if first.output[0] in n.input]
    names = [first.output[0]] + [n.output[0] for n in consumers if n.op_type == "Relu"]
    low, high = next(ranges[name] for name in names if name in ranges)
    return high - low


@pytest.mark.slow
def test_outliers_do_not_inflate_calibration(tmp_path):
    model, x, y = synthetic_task(0)
    fp32 = export_onnx(model, torch.from_numpy(x[:2]), tmp_path / "mlp.onnx")
    set_a = x[1000:1400]
    outliers = x[:4] * 100.0
    set_b = np.concatenate([set_a, outliers])
    test_x, test_y = x[400:1000], y[400:1000]

    result_a = quantize_onnx(fp32.path, tmp_path / "a.onnx", set_a)
    result_b = quantize_onnx(fp32.path, tmp_path / "b.onnx", set_b)
    report_a = verify(fp32.path, result_a.path, test_x, labels=test_y)
    report_b = verify(fp32.path, result_b.path, test_x, labels=test_y)

    fp32_accuracy = report_b.reference_accuracy
    assert abs(report_b.candidate_accuracy - fp32_accuracy) <= 0.01
    assert abs(report_b.candidate_accuracy - report_a.candidate_accuracy) <= 0.01
    assert _first_activation_range(result_b.path) < 5 * _first_activation_range(result_a.path)
    assert result_b.method in ("percentile", "entropy")
    assert any("outliers" in note for note in result_b.notes)
    assert not any("outliers" in note for note in result_a.notes)


def test_explicit_method_and_bad_method(tmp_path):
    model, x, _ = synthetic_task(1)
    fp32 = export_onnx(model, torch.from_numpy(x[:2]), tmp_path / "mlp.onnx")
    result = quantize_onnx(fp32.path, tmp_path / "q.onnx", x[:200], method="minmax")
    assert result.method == "minmax"
    assert list(result.candidates) == ["minmax"]
    assert result.candidates["minmax"]["top1_agreement"] >= 0.95
    with pytest.raises(EdgeoptInputError, match="kl"):
        quantize_onnx(fp32.path, tmp_path / "q2.onnx", x[:200], method="kl")


# --- per-layer verification ------------------------------------------------------------------


def test_per_layer_finds_broken_layer(tmp_path):
    model, x, _ = synthetic_task(2)
    fp32 = export_onnx(model, torch.from_numpy(x[:2]), tmp_path / "mlp.onnx", simplify=False)
    result = quantize_onnx(fp32.path, tmp_path / "q.onnx", x[:300], method="minmax")
    healthy = verify(fp32.path, result.path, x[300:500], per_layer=True)
    assert healthy.per_layer
    assert healthy.first_divergence is None

    # Negate the int8 weights of the last Gemm/MatMul only: per-layer must point at its output.
    proto = onnx.load(str(result.path))
    constants = {init.name: init for init in proto.graph.initializer}
    weighted = [n for n in proto.graph.node if n.op_type in ("Gemm", "MatMul")]
    last, first = weighted[-1], weighted[0]
    dequantize = next(
        n
        for n in proto.graph.node
        if n.op_type == "DequantizeLinear"
        and n.output[0] in last.input
        and constants.get(n.input[0]) is not None
        and constants[n.input[0]].data_type == onnx.TensorProto.INT8
    )
    weights = constants[dequantize.input[0]]
    negated = -onnx.numpy_helper.to_array(weights).astype(np.int16)
    weights.CopyFrom(
        onnx.numpy_helper.from_array(negated.clip(-127, 127).astype(np.int8), weights.name)
    )
    onnx.save(proto, tmp_path / "broken.onnx")

    report = verify(fp32.path, tmp_path / "broken.onnx", x[300:500], per_layer=True)
    by_tensor = {layer.tensor: layer for layer in report.per_layer}
    assert report.first_divergence == last.output[0]
    assert by_tensor[first.output[0]].sqnr_db >= 20
    assert by_tensor[last.output[0]].sqnr_db < 0
