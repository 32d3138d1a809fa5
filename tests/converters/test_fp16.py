"""fp16 exports keep tiny epsilons effective and huge constants finite."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from converter_helpers import max_abs_diff, torch_run
from torch import nn

from edgeopt.converters import convert, export_onnx, export_tflite, open_runtime
from edgeopt.errors import ExportWarning

# --- LayerNorm epsilon below the fp16 range ---------------------------------------------


def layer_norm_input(features: int) -> torch.Tensor:
    x = torch.randn(8, features, generator=torch.Generator().manual_seed(0))
    x[3] = 0.75  # a constant row: its variance is 0, so only eps keeps the division finite
    return x


@pytest.mark.parametrize("features", [4, 96])
@pytest.mark.parametrize("opset", [13, 17])
def test_layernorm_tiny_eps_fp16_onnx(features, opset, tmp_path):
    model = nn.LayerNorm(features, eps=1e-8).eval()
    x = layer_norm_input(features)
    export = export_onnx(model, x, tmp_path / "ln.onnx", opset=opset, precision="fp16")
    output = open_runtime(export.path).run(x.numpy())["output"]
    assert np.isfinite(output).all()
    assert max_abs_diff(output, torch_run(model, x)) <= 1e-2


@pytest.mark.parametrize("features", [4, 96])
def test_layernorm_tiny_eps_fp16_tflite(features, tmp_path):
    model = nn.LayerNorm(features, eps=1e-8).eval()
    x = layer_norm_input(features)
    export = export_tflite(model, x, tmp_path / "ln.tflite", precision="fp16")
    output = open_runtime(export.path).run(x.numpy())["output"]
    assert np.isfinite(output).all()
    assert max_abs_diff(output, torch_run(model, x)) <= 1e-2


# --- large mask constants ----------------------------------------------------------------


class MaskedSoftmax(nn.Module):
    """Adds (mask - 1) * scale to the logits, the usual additive attention mask."""

    def __init__(self, features: int, scale: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(features, features)
        mask = (torch.arange(features) % 3 != 1).float()
        self.register_buffer("mask", mask)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.linear(x) + (self.mask - 1) * self.scale, dim=-1)


class AdditiveMask(nn.Module):
    """Adds a stored mask of 0 and a huge negative value (float32's lowest, say)."""

    def __init__(self, features: int, fill: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(features, features)
        mask = torch.where(torch.arange(features) % 3 == 1, fill, 0.0)
        self.register_buffer("mask", mask.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.linear(x) + self.mask, dim=-1)


CASES = [
    pytest.param(lambda f: MaskedSoftmax(f, 1e30), id="scale_1e30"),
    pytest.param(lambda f: MaskedSoftmax(f, 1e9), id="scale_1e9"),
    pytest.param(lambda f: AdditiveMask(f, -3.4e38), id="mask_-3.4e38"),
    pytest.param(lambda f: AdditiveMask(f, -1e5), id="mask_-1e5"),
]


@pytest.mark.parametrize("build", CASES)
@pytest.mark.parametrize("features", [6, 96])
def test_mask_constants_fp16_onnx(build, features, tmp_path):
    model = build(features).eval()
    x = torch.randn(2, features)
    export = export_onnx(model, x, tmp_path / "mask.onnx", precision="fp16")
    output = open_runtime(export.path).run(x.numpy())["output"]
    assert np.isfinite(output).all()
    assert max_abs_diff(output, torch_run(model, x)) <= 1e-3


@pytest.mark.parametrize("build", CASES[:3])
def test_mask_constants_fp16_tflite(build, tmp_path):
    model = build(6).eval()
    x = torch.randn(2, 6)
    export = export_tflite(model, x, tmp_path / "mask.tflite", precision="fp16")
    output = open_runtime(export.path).run(x.numpy())["output"]
    assert np.isfinite(output).all()
    assert max_abs_diff(output, torch_run(model, x)) <= 1e-3


def test_large_stored_mask_clamped_with_warning(tmp_path):
    model = AdditiveMask(96, -3.4e38).eval()
    x = torch.randn(2, 96)
    with pytest.warns(ExportWarning, match=r"mask.*65504|65504.*mask"):
        export = export_onnx(model, x, tmp_path / "mask.onnx", precision="fp16")
    proto = onnx.load(str(export.path))
    halves = [
        onnx.numpy_helper.to_array(i)
        for i in proto.graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT16
    ]
    assert halves
    assert all(np.isfinite(h).all() for h in halves)


def test_fp16_weights_stored_as_half(tmp_path):
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    x = torch.randn(4, 64)
    fp32 = export_onnx(model, x, tmp_path / "fp32.onnx")
    fp16 = export_onnx(model, x, tmp_path / "fp16.onnx", precision="fp16")
    ratio = fp32.path.stat().st_size / fp16.path.stat().st_size
    assert ratio >= 1.8
    assert (
        max_abs_diff(open_runtime(fp16.path).run(x.numpy())["output"], torch_run(model, x)) <= 1e-2
    )


def test_huge_linear_weight_clamped_in_tflite(tmp_path):
    model = nn.Linear(8, 4).eval()
    with torch.no_grad():
        model.weight[0, 0] = 1e6
    with pytest.warns(ExportWarning, match="weight"):
        export = export_tflite(model, torch.randn(2, 8), tmp_path / "w.tflite", precision="fp16")
    output = open_runtime(export.path).run(np.random.randn(2, 8).astype(np.float32))["output"]
    assert np.isfinite(output).all()
    assert model.weight[0, 0].item() == 1e6


def test_convert_onnx_file_to_fp16(tmp_path):
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh()).eval()
    x = torch.randn(16, 64)
    source = export_onnx(model, x, tmp_path / "src.onnx").path
    result = convert(
        source, "onnx", out=tmp_path / "half.onnx", precision="fp16", verify_data=x.numpy()
    )
    assert result.verification is not None
    assert result.verification.max_abs_diff <= 1e-2
    assert result.verification.outputs["output"].nonfinite == 0
