"""TFLite export through litert-torch: precisions, batch handling, names and refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ai_edge_litert.interpreter import Interpreter
from converter_helpers import max_abs_diff, torch_run
from torch import nn

from edgeopt.converters import export_tflite, open_runtime
from edgeopt.converters._tflite_graph import read_metadata
from edgeopt.errors import ConversionError, EdgeoptInputError, UnsupportedOperatorError


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()


# --- batch-specialised TFLite run at other batch sizes --------------------------------


@pytest.mark.parametrize("shuffle", [False, True], ids=["plain", "channel_shuffle"])
def test_tflite_runs_at_batch_1_2_7(shuffle, tmp_path):
    from test_onnx_export import dynamic_batch_net

    torch.manual_seed(0)
    model = dynamic_batch_net(shuffle)
    export = export_tflite(model, torch.randn(1, 3, 32, 32), tmp_path / "c03.tflite")
    runtime = open_runtime(export.path)
    assert runtime.fixed_batch == 1
    for batch in (1, 2, 7):
        x = torch.randn(batch, 3, 32, 32)
        diff = max_abs_diff(runtime.run(x.numpy())["output"], torch_run(model, x))
        assert diff <= 1e-4, f"batch {batch}"


def test_tflite_batch4_file_pads_last_chunk(tmp_path):
    model = small_cnn()
    export = export_tflite(model, torch.randn(4, 3, 12, 10), tmp_path / "b4.tflite")
    assert export.batch_size == 4
    x = torch.randn(7, 3, 12, 10)
    outputs = open_runtime(export.path).run(x.numpy())
    assert outputs["output"].shape == (7, 5)
    assert max_abs_diff(outputs["output"], torch_run(model, x)) <= 1e-4


# --- batch statistics cannot be reproduced chunk by chunk ------------------


def test_tflite_rejects_batch_statistics_layer(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False))
    with pytest.raises(ConversionError, match=r"'1'.*track_running_stats"):
        export_tflite(model.eval(), torch.randn(4, 3, 10, 14), tmp_path / "bn.tflite")


# --- full int8 needs calibration data -------------------------------------------------


def test_int8_without_calibration_raises(tmp_path):
    with pytest.raises(EdgeoptInputError, match="calibration"):
        export_tflite(
            small_cnn(), torch.randn(2, 3, 12, 10), tmp_path / "q.tflite", precision="int8"
        )
    assert not (tmp_path / "q.tflite").exists()


def _op_io_types(path) -> list[tuple[str, list[str], list[str]]]:
    interpreter = Interpreter(model_path=str(path))
    rows = []
    for op in interpreter._get_ops_details():
        inputs = [interpreter._get_tensor_details(i, 0)["dtype"].__name__ for i in op["inputs"]]
        outputs = [interpreter._get_tensor_details(i, 0)["dtype"].__name__ for i in op["outputs"]]
        rows.append((op["op_name"], inputs, outputs))
    return rows


def test_int8_with_calibration_is_integer_only(tmp_path):
    model = small_cnn()
    calibration = np.random.default_rng(0).normal(size=(64, 3, 12, 10)).astype(np.float32)
    export = export_tflite(
        model,
        torch.randn(2, 3, 12, 10),
        tmp_path / "q.tflite",
        precision="int8",
        calibration=calibration,
        int8_io=True,
    )
    assert export.input_dtypes == {"input": "int8"}
    assert export.output_dtypes == {"output": "int8"}
    compute = [row for row in _op_io_types(export.path) if row[0] in _INT_OPS]
    assert len(compute) >= 3
    for name, inputs, outputs in compute:
        assert inputs[0] == "int8", name
        assert inputs[1] == "int8", name
        assert outputs == ["int8"], name
    runtime = open_runtime(export.path)
    x = calibration[:8]
    comparison = np.corrcoef(runtime.run(x)["output"].ravel(), torch_run(model, x).ravel())[0, 1]
    assert comparison >= 0.98


_INT_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}


def test_int8_float_interface_by_default(tmp_path):
    model = small_cnn()
    calibration = np.random.default_rng(1).normal(size=(32, 3, 12, 10)).astype(np.float32)
    export = export_tflite(
        model,
        torch.randn(2, 3, 12, 10),
        tmp_path / "q.tflite",
        precision="int8",
        calibration=calibration,
    )
    assert export.input_dtypes == {"input": "float32"}
    assert export.output_dtypes == {"output": "float32"}
    compute = [row for row in _op_io_types(export.path) if row[0] in _INT_OPS]
    assert all(outputs == ["int8"] for _, _, outputs in compute)


def test_int8_dynamic_needs_no_calibration(tmp_path):
    model = small_cnn()
    export = export_tflite(
        model, torch.randn(2, 3, 12, 10), tmp_path / "d.tflite", precision="int8-dynamic"
    )
    x = np.random.default_rng(2).normal(size=(4, 3, 12, 10)).astype(np.float32)
    diff = max_abs_diff(open_runtime(export.path).run(x)["output"], torch_run(model, x))
    assert diff <= 0.05


def test_unknown_precision_rejected(tmp_path):
    with pytest.raises(EdgeoptInputError, match="int4"):
        export_tflite(
            small_cnn(), torch.randn(1, 3, 12, 10), tmp_path / "x.tflite", precision="int4"
        )


# --- grouped convolution --------------------------------------------------------------


@pytest.mark.parametrize(
    ("in_channels", "out_channels", "groups"), [(8, 4, 2), (8, 8, 4)], ids=["8to4_g2", "8to8_g4"]
)
def test_grouped_conv_tflite(in_channels, out_channels, groups, tmp_path):
    torch.manual_seed(0)
    model = nn.Conv2d(in_channels, out_channels, 3, padding=1, groups=groups).eval()
    x = torch.randn(1, in_channels, 12, 10)
    export = export_tflite(model, x, tmp_path / "g.tflite")
    assert (
        max_abs_diff(open_runtime(export.path).run(x.numpy())["output"], torch_run(model, x))
        <= 1e-4
    )


# --- signature outputs named by dict key ----------------------------------------------


def test_tflite_dict_outputs_by_name(tmp_path):
    from test_onnx_export import DictOutput

    export = export_tflite(
        DictOutput(), torch.randn(2, 3), tmp_path / "d.tflite", output_names=["ones", "zeros"]
    )
    outputs = open_runtime(export.path).run(np.random.randn(2, 3).astype(np.float32))
    assert sorted(export.output_names) == ["ones", "zeros"]
    assert np.array_equal(outputs["ones"], np.ones(1, np.float32))
    assert np.array_equal(outputs["zeros"], np.zeros(1, np.float32))


def test_signature_uses_given_names_and_metadata(tmp_path):
    export = export_tflite(
        small_cnn(),
        torch.randn(1, 3, 12, 10),
        tmp_path / "n.tflite",
        input_names=["image"],
        output_names=["logits"],
        metadata={"class_labels": "a,b,c,d,e"},
    )
    interpreter = Interpreter(model_path=str(export.path))
    signature = interpreter.get_signature_list()["serving_default"]
    assert signature == {"inputs": ["image"], "outputs": ["logits"]}
    metadata = read_metadata(export.path.read_bytes())
    assert metadata["edgeopt.input_layout"] == "NCHW"
    assert metadata["class_labels"] == "a,b,c,d,e"


# --- errors ----------------------------------------------------------------------------------


def test_tflite_unsupported_operator_names_module(tmp_path):
    from test_onnx_export import WithEigen

    with pytest.raises(UnsupportedOperatorError) as info:
        export_tflite(WithEigen(), torch.randn(2, 4), tmp_path / "eig.tflite")
    assert "eigh" in str(info.value)
    assert "'block.1'" in str(info.value)
    assert "\n" not in str(info.value)


def test_nearest_resize_mismatch_detected(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Upsample(size=(7, 9))).eval()
    with pytest.raises(ConversionError, match=r"module '1'.*nearest") as info:
        export_tflite(model, torch.randn(2, 3, 5, 6), tmp_path / "up.tflite")
    assert "differs from PyTorch" in str(info.value)


def test_integer_nearest_resize_matches(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Upsample(scale_factor=2)).eval()
    x = torch.randn(2, 3, 5, 6)
    export = export_tflite(model, x, tmp_path / "up.tflite")
    assert (
        max_abs_diff(open_runtime(export.path).run(x.numpy())["output"], torch_run(model, x))
        <= 1e-4
    )
