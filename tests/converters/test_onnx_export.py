"""ONNX export: dynamic batch, opsets, output names, eval mode, shared weights and metadata."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from converter_helpers import max_abs_diff, torch_run
from torch import nn

from edgeopt.converters import export_onnx, open_runtime
from edgeopt.errors import (
    ConversionError,
    EdgeoptInputError,
    ExportWarning,
    UnsupportedOperatorError,
)


def _run(path, x):
    runtime = open_runtime(path)
    return runtime.run(np.asarray(x, dtype=np.float32))


# --- BatchNorm without running statistics ---------------------------------------------


@pytest.mark.parametrize(
    ("norm", "shape"),
    [
        (lambda: nn.BatchNorm2d(8, track_running_stats=False), (4, 3, 10, 14)),
        (lambda: nn.BatchNorm2d(8, affine=False, track_running_stats=False), (4, 3, 10, 14)),
    ],
)
def test_batchnorm_batch_statistics_onnx(norm, shape, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), norm(), nn.ReLU()).eval()
    export = export_onnx(model, torch.randn(*shape), tmp_path / "c01.onnx")
    proto = onnx.load(str(export.path))
    training_bn = [
        n.name
        for n in proto.graph.node
        if n.op_type == "BatchNormalization"
        and any(a.name == "training_mode" and a.i == 1 for a in n.attribute)
    ]
    assert training_bn == []
    for batch in (4, 1):
        x = torch.randn(batch, *shape[1:])
        diff = max_abs_diff(_run(export.path, x)["output"], torch_run(model, x))
        assert diff <= 1e-4, f"batch {batch}"


def test_batchnorm1d_batch_statistics_onnx(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, track_running_stats=False)).eval()
    export = export_onnx(model, torch.randn(4, 5), tmp_path / "c01_1d.onnx")
    for batch in (4, 2):
        x = torch.randn(batch, 5)
        assert max_abs_diff(_run(export.path, x)["output"], torch_run(model, x)) <= 1e-4


# --- model handed over in train() mode ------------------------------------------------


def test_train_mode_model_exported_in_eval(tmp_path):
    torch.manual_seed(0)
    model = nn.BatchNorm1d(3)
    with torch.no_grad():
        model.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        model.running_var.copy_(torch.tensor([2.0, 0.5, 3.0]))
    model.train()
    mean_before = model.running_mean.clone()
    var_before = model.running_var.clone()
    x = torch.randn(3, 3)
    with pytest.warns(ExportWarning, match="train"):
        export = export_onnx(model, x, tmp_path / "c02.onnx")
    assert model.training is True
    assert torch.equal(model.running_mean, mean_before)
    assert torch.equal(model.running_var, var_before)
    model.eval()
    expected = torch_run(model, x)
    model.train()
    assert max_abs_diff(_run(export.path, x)["output"], expected) <= 1e-5


def test_train_mode_restores_submodule_modes(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    model.train()
    model[2].eval()
    with pytest.warns(ExportWarning):
        export_onnx(model, torch.randn(2, 4), tmp_path / "modes.onnx")
    assert [m.training for m in model] == [True, True, False]


# --- dynamic batch --------------------------------------------------------------------


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        x = x.view(x.shape[0], self.groups, channels // self.groups, height, width)
        return x.transpose(1, 2).reshape(batch, channels, height, width)


def dynamic_batch_net(shuffle: bool) -> nn.Module:
    layers = [nn.Conv2d(3, 8, 3), nn.ReLU()]
    if shuffle:
        layers += [ChannelShuffle(2), nn.Conv2d(8, 8, 1)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)]
    return nn.Sequential(*layers).eval()


@pytest.mark.parametrize("shuffle", [False, True], ids=["plain", "channel_shuffle"])
def test_dynamic_batch_from_batch1_example(shuffle, tmp_path):
    torch.manual_seed(0)
    model = dynamic_batch_net(shuffle)
    export = export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / f"c03_{shuffle}.onnx")
    proto = onnx.load(str(export.path))
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param != ""
    assert not batch_dim.HasField("dim_value")
    for batch in (1, 2, 7):
        x = torch.randn(batch, 3, 32, 32)
        diff = max_abs_diff(_run(export.path, x)["output"], torch_run(model, x))
        assert diff <= 1e-4, f"batch {batch}"


class PythonIntBatch(nn.Module):
    """Reads the batch size as a Python int, which a tracer may turn into a constant."""

    def __init__(self, batch_source: str) -> None:
        super().__init__()
        self.batch_source = batch_source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = int(x.shape[0]) if self.batch_source == "int" else len(x)
        return x.reshape(batch, -1).cumsum(dim=1)


@pytest.mark.parametrize("batch_source", ["int", "len"])
@pytest.mark.parametrize("opset", [18, 13])
def test_python_int_batch_runs_or_fails_loudly(batch_source, opset, tmp_path):
    model = PythonIntBatch(batch_source)
    try:
        export = export_onnx(model, torch.randn(1, 3, 4), tmp_path / "int.onnx", opset=opset)
    except ConversionError as exc:
        assert "batch" in str(exc)
        return
    for batch in (1, 2, 7):
        x = torch.randn(batch, 3, 4)
        assert max_abs_diff(_run(export.path, x)["output"], torch_run(model, x)) <= 1e-4


def test_fixed_batch_export_runs_other_sizes(tmp_path):
    torch.manual_seed(0)
    model = dynamic_batch_net(False)
    export = export_onnx(
        model, torch.randn(2, 3, 32, 32), tmp_path / "fixed.onnx", dynamic_batch=False
    )
    runtime = open_runtime(export.path)
    assert runtime.fixed_batch == 2
    x = torch.randn(7, 3, 32, 32)
    assert max_abs_diff(runtime.run(x.numpy())["output"], torch_run(model, x)) <= 1e-4


# --- grouped convolution --------------------------------------------------------------


@pytest.mark.parametrize(
    ("in_channels", "out_channels", "groups"), [(8, 4, 2), (8, 8, 4)], ids=["8to4_g2", "8to8_g4"]
)
def test_grouped_conv_onnx(in_channels, out_channels, groups, tmp_path):
    torch.manual_seed(0)
    model = nn.Conv2d(in_channels, out_channels, 3, padding=1, groups=groups).eval()
    export = export_onnx(
        model, torch.randn(1, in_channels, 12, 10), tmp_path / f"c12_{groups}.onnx"
    )
    conv = next(n for n in onnx.load(str(export.path)).graph.node if n.op_type == "Conv")
    group = next(a.i for a in conv.attribute if a.name == "group")
    assert group == groups
    x = torch.randn(3, in_channels, 12, 10)
    assert max_abs_diff(_run(export.path, x)["output"], torch_run(model, x)) <= 1e-4


# --- Softmax-family axis semantics across opsets --------------------------------------


class Normalise(nn.Module):
    def __init__(self, op: str, dim: int) -> None:
        super().__init__()
        self.op = op
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "softmax":
            return torch.softmax(x, dim=self.dim)
        return torch.log_softmax(x, dim=self.dim)


@pytest.mark.parametrize("opset", [11, 12, 13, 17])
@pytest.mark.parametrize("shape", [(2, 3, 4), (1, 5, 6, 7)], ids=["2x3x4", "1x5x6x7"])
def test_softmax_dim1_every_opset(opset, shape, tmp_path):
    torch.manual_seed(opset)
    x = torch.randn(*shape)
    model = Normalise("softmax", 1)
    export = export_onnx(model, x, tmp_path / f"c14_{opset}_{len(shape)}.onnx", opset=opset)
    assert export.opset == opset
    assert onnx.load(str(export.path)).opset_import[0].version == opset
    actual = _run(export.path, x)["output"]
    assert max_abs_diff(actual, torch.softmax(x, 1).numpy()) <= 1e-6
    assert np.all(np.abs(actual.sum(axis=1) - 1.0) <= 1e-5)


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_log_softmax_axes_every_opset(opset, dim, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5)
    model = Normalise("log_softmax", dim)
    export = export_onnx(model, x, tmp_path / f"c14_log_{opset}_{dim}.onnx", opset=opset)
    expected = torch.log_softmax(x, dim).numpy()
    assert max_abs_diff(_run(export.path, x)["output"], expected) <= 1e-5


# --- dict outputs bound by name -------------------------------------------------------


class DictOutput(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        anchor = x.sum() * 0.0
        return {"zeros": torch.zeros(1) + anchor, "ones": torch.ones(1) + anchor}


def test_dict_outputs_bound_by_key(tmp_path):
    export = export_onnx(
        DictOutput(), torch.randn(2, 3), tmp_path / "c15.onnx", output_names=["ones", "zeros"]
    )
    outputs = _run(export.path, np.random.randn(2, 3))
    assert sorted(export.output_names) == ["ones", "zeros"]
    assert np.array_equal(outputs["ones"], np.ones(1, np.float32))
    assert np.array_equal(outputs["zeros"], np.zeros(1, np.float32))


def test_dict_output_names_mismatch_rejected(tmp_path):
    with pytest.raises(EdgeoptInputError, match="keys"):
        export_onnx(
            DictOutput(), torch.randn(2, 3), tmp_path / "c15b.onnx", output_names=["a", "b"]
        )


def test_tuple_outputs_take_names_in_order(tmp_path):
    class TwoHeads(nn.Module):
        def forward(self, x):
            return x * 2, x + 1

    export = export_onnx(
        TwoHeads(), torch.randn(2, 3), tmp_path / "tuple.onnx", output_names=["d", "p"]
    )
    x = np.random.randn(4, 3).astype(np.float32)
    outputs = _run(export.path, x)
    assert max_abs_diff(outputs["d"], x * 2) <= 1e-6
    assert max_abs_diff(outputs["p"], x + 1) <= 1e-6


# --- tied weights stored once ---------------------------------------------------------


class TiedLm(nn.Module):
    def __init__(self, transposed_copy: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, 64)
        self.out = nn.Linear(64, 1000, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(ids))


def _initializer_bytes(path) -> int:
    proto = onnx.load(str(path))
    return sum(onnx.numpy_helper.to_array(init).nbytes for init in proto.graph.initializer)


@pytest.mark.parametrize("opset", [18, 13])
def test_tied_weights_stored_once(opset, tmp_path):
    torch.manual_seed(0)
    model = TiedLm().eval()
    ids = torch.randint(0, 1000, (2, 7))
    export = export_onnx(model, ids, tmp_path / f"c17_{opset}.onnx", opset=opset)
    unique_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert _initializer_bytes(export.path) <= 1.1 * unique_bytes
    runtime = open_runtime(export.path)
    other = torch.randint(0, 1000, (3, 7))
    diff = max_abs_diff(runtime.run(other.numpy())["output"], torch_run(model, other))
    assert diff <= 1e-5


def test_conv_shared_by_two_paths_stored_once(tmp_path):
    torch.manual_seed(0)

    class Siamese(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 32, 3)
            self.twin = nn.Conv2d(8, 32, 3)
            self.twin.weight = self.conv.weight
            self.twin.bias = self.conv.bias

        def forward(self, a):
            return self.conv(a) - self.twin(a.flip(-1))

    model = Siamese().eval()
    export = export_onnx(model, torch.randn(2, 8, 9, 11), tmp_path / "siamese.onnx")
    unique_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert _initializer_bytes(export.path) <= 1.1 * unique_bytes


# --- metadata, opset range and unsupported operators ---------------------------------------


def test_metadata_props_written(tmp_path):
    model = nn.Linear(4, 3).eval()
    export = export_onnx(
        model,
        torch.randn(2, 4),
        tmp_path / "meta.onnx",
        metadata={"normalization": "mean=0.5,std=0.25", "class_labels": "a,b,c"},
    )
    props = {p.key: p.value for p in onnx.load(str(export.path)).metadata_props}
    assert props["edgeopt.input_layout"] == "NC"
    assert props["normalization"] == "mean=0.5,std=0.25"
    assert props["class_labels"] == "a,b,c"


def test_image_input_layout_is_nchw(tmp_path):
    export = export_onnx(nn.Conv2d(1, 2, 3), torch.randn(2, 1, 8, 6), tmp_path / "layout.onnx")
    props = {p.key: p.value for p in onnx.load(str(export.path)).metadata_props}
    assert props["edgeopt.input_layout"] == "NCHW"


def test_opset_out_of_range_rejected(tmp_path):
    with pytest.raises(EdgeoptInputError, match="opset 5"):
        export_onnx(nn.Linear(2, 2), torch.randn(1, 2), tmp_path / "bad.onnx", opset=5)


class EigenBlock(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvalsh(x @ x.transpose(-1, -2))


class WithEigen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.block = nn.Sequential(nn.ReLU(), EigenBlock())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.proj(x).reshape(-1, 2, 2))


def test_unsupported_operator_names_op_and_module(caplog, tmp_path):
    with pytest.raises(UnsupportedOperatorError) as info:
        export_onnx(WithEigen(), torch.randn(2, 4), tmp_path / "eig.onnx")
    message = str(info.value)
    assert "eigh" in message
    assert "'block.1'" in message
    assert "replace" in message
    assert "\n" not in message
    assert "Traceback" not in message


def test_onnx_export_does_not_warn_for_eval_model(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportWarning)
        export_onnx(nn.Linear(3, 2).eval(), torch.randn(2, 3), tmp_path / "quiet.onnx")


def test_output_names_swapped_by_position(tmp_path):
    class TwoHeads(nn.Module):
        def forward(self, x):
            return {"a": x * 2, "b": x + 1}

    export = export_onnx(TwoHeads(), torch.randn(2, 3), tmp_path / "swap.onnx")
    x = np.random.randn(2, 3).astype(np.float32)
    outputs = _run(export.path, x)
    assert max_abs_diff(outputs["a"], x * 2) <= 1e-6
    assert max_abs_diff(outputs["b"], x + 1) <= 1e-6


class ConvThenPythonIntReshape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).reshape(int(x.shape[0]), -1)


def test_baked_batch_after_conv_is_never_silent(tmp_path):
    import onnxruntime as ort

    model = ConvThenPythonIntReshape().eval()
    try:
        export = export_onnx(model, torch.randn(1, 3, 4, 5), tmp_path / "baked.onnx")
    except ConversionError as exc:
        assert "fixed batch size" in str(exc)
        assert "int(x.shape[0])" in str(exc)
        return
    # If the export succeeds, the file itself (not a runtime that splits batches) must run at
    # other batch sizes.
    session = ort.InferenceSession(str(export.path), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        x = torch.randn(batch, 3, 4, 5)
        output = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert max_abs_diff(output, torch_run(model, x)) <= 1e-4
