"""Teacher loading: built-in, ONNX (symbolic or fixed batch), TorchScript, .pt2, callables."""

from __future__ import annotations

import pickle
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from edgeopt.converters import export_onnx
from edgeopt.data import load_data
from edgeopt.distill import TrainConfig, predict
from edgeopt.errors import DataError, EdgeoptInputError, ModelLoadError
from edgeopt.teachers import load_teacher
from tests.conftest import shared_path


class RawPixels(nn.Module):
    """Wraps a model trained on [0, 1] inputs so that it expects raw 0–16 digit pixels."""

    def __init__(self, inner: nn.Module, raw_max: float) -> None:
        super().__init__()
        self.inner = inner
        self.raw_max = raw_max

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x / self.raw_max)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", seed=0)


@pytest.fixture(scope="module")
def trained(digits):
    teacher, info = load_teacher(
        "cnn", digits, train_config=TrainConfig(epochs=6, patience=3, learning_rate=3e-3)
    )
    return teacher.module, info


def test_builtin_teacher_is_trained_then_cached(digits, trained):
    module, info = trained
    assert info["val_accuracy"] > 0.9
    again, again_info = load_teacher(
        "cnn", digits, train_config=TrainConfig(epochs=6, patience=3, learning_rate=3e-3)
    )
    assert "history" in info
    assert again_info["val_accuracy"] == info["val_accuracy"]
    np.testing.assert_array_equal(
        predict(again.module, digits.test.x), predict(module, digits.test.x)
    )


@pytest.mark.parametrize("dynamic_batch", [True, False])
def test_onnx_teacher_symbolic_and_fixed_batch(tmp_path, digits, trained, dynamic_batch):
    module, _ = trained
    path = tmp_path / "teacher.onnx"
    export_onnx(module, torch.from_numpy(digits.train.x[:1]), path, dynamic_batch=dynamic_batch)
    teacher, _ = load_teacher(str(path), digits)
    assert teacher.input.fixed_batch == (None if dynamic_batch else 1)
    assert teacher.input.scale == 1.0
    x = digits.test.x[:37]
    np.testing.assert_allclose(teacher.logits(x), predict(module, x), atol=1e-4)


def test_raw_pixel_teacher_scale_is_detected(tmp_path, digits, trained):
    module, _ = trained
    path = tmp_path / "raw.onnx"
    wrapper = RawPixels(module, 16.0).eval()
    export_onnx(wrapper, torch.from_numpy(digits.train.x[:1] * 16), path)
    teacher, info = load_teacher(str(path), digits)
    assert teacher.input.scale == 16.0
    assert info["input"]["notes"]["scale"].startswith("detected: 16")
    x = digits.test.x[:20]
    np.testing.assert_allclose(teacher.logits(x), predict(module, x), atol=1e-4)


def test_stated_scale_overrides_detection(tmp_path, digits, trained):
    module, _ = trained
    path = tmp_path / "plain.onnx"
    export_onnx(module, torch.from_numpy(digits.train.x[:1]), path)
    teacher, info = load_teacher(str(path), digits, input_scale=2.0)
    assert teacher.input.scale == 2.0
    assert info["input"]["notes"]["scale"] == "stated"


def test_zoo_mnist_onnx_teacher_input():
    model = shared_path("models", "mnist_cnn_onnx", "mnist.onnx")
    data = load_data(f"mnist:{shared_path('datasets', 'mnist')}", seed=0)
    teacher, info = load_teacher(str(model), data)
    assert teacher.input.fixed_batch == 1
    # The model classifies as well on [0, 1] as on 0–255 input (98.90% against 98.91% on all
    # 10,000 images), so either scale may be chosen. The note must show both measurements.
    note = info["input"]["notes"]["scale"]
    assert "at scale 1" in note
    assert "at scale 255" in note
    accuracy = np.mean(np.argmax(teacher.logits(data.test.x), 1) == data.test.y)
    # The provenance file reports 98.91% on all 10,000 images; the test split is 2,000 of them.
    assert accuracy >= 0.98


def test_torchscript_and_pt2_teachers(tmp_path, digits, trained):
    module, _ = trained
    example = torch.from_numpy(digits.train.x[:2])
    torch.jit.trace(module, example).save(str(tmp_path / "t.pt"))
    fixed = torch.export.export(module, (example,))
    batch = torch.export.Dim("batch", min=1, max=1024)
    dynamic = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(fixed, str(tmp_path / "fixed.pt2"))
    torch.export.save(dynamic, str(tmp_path / "dynamic.pt2"))
    x = digits.test.x[:17]
    cases = (("t.pt", "torchscript", None), ("fixed.pt2", "pt2", 2), ("dynamic.pt2", "pt2", None))
    for name, kind, fixed_batch in cases:
        teacher, _ = load_teacher(str(tmp_path / name), digits)
        assert teacher.kind == kind
        assert teacher.input.fixed_batch == fixed_batch
        np.testing.assert_allclose(teacher.logits(x), predict(module, x), atol=1e-5)


def _write_factory(folder, num_classes=10, name="my_teacher"):
    (folder / f"{name}.py").write_text(
        textwrap.dedent(
            f"""
            from torch import nn

            def build():
                return nn.Sequential(nn.Flatten(), nn.Linear(64, {num_classes}))
            """
        )
    )


def test_callable_teacher_with_weights(tmp_path, monkeypatch, digits):
    monkeypatch.chdir(tmp_path)
    _write_factory(tmp_path)
    reference = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    teacher, _ = load_teacher("my_teacher:build", digits, weights=tmp_path / "w.pt")
    x = digits.test.x[:8]
    np.testing.assert_allclose(teacher.logits(x), predict(reference, x), atol=1e-6)


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_weights_with_pickled_code_are_rejected(tmp_path, monkeypatch, digits):
    monkeypatch.chdir(tmp_path)
    _write_factory(tmp_path)
    with (tmp_path / "evil.pt").open("wb") as handle:
        pickle.dump({"weight": _Payload()}, handle)
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        load_teacher("my_teacher:build", digits, weights=tmp_path / "evil.pt")


def test_mismatched_weights_are_named(tmp_path, monkeypatch, digits):
    monkeypatch.chdir(tmp_path)
    _write_factory(tmp_path)
    torch.save(nn.Linear(3, 3).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ModelLoadError, match="do not fit teacher 'my_teacher:build'"):
        load_teacher("my_teacher:build", digits, weights=tmp_path / "other.pt")


@pytest.mark.parametrize("suffix", [".onnx", ".pt", ".pt2"])
def test_corrupt_model_files(tmp_path, digits, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"\x08\x01garbage that is not a model" * 10)
    with pytest.raises(ModelLoadError, match=str(path)):
        load_teacher(str(path), digits)


def test_missing_teacher_file(digits):
    with pytest.raises(ModelLoadError, match=r"teacher file not found: /no/such/model\.onnx"):
        load_teacher("/no/such/model.onnx", digits)


def test_teacher_shape_mismatch(tmp_path, digits):
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval()
    export_onnx(model, torch.zeros(1, 1, 28, 28), tmp_path / "m.onnx")
    with pytest.raises(DataError, match=r"expects samples of shape 1×28×28 .* has 1×8×8"):
        load_teacher(str(tmp_path / "m.onnx"), digits)


def test_labels_outside_teacher_classes(tmp_path, monkeypatch, digits):
    monkeypatch.chdir(tmp_path)
    _write_factory(tmp_path, num_classes=5, name="five_classes")
    with pytest.raises(DataError, match="labels go up to 9 but teacher five_classes:build has 5"):
        load_teacher("five_classes:build", digits)


def test_builtin_cnn_rejects_vector_data(tmp_path):
    np.savez(
        tmp_path / "v.npz", x=np.random.default_rng(0).normal(size=(60, 5)), y=np.arange(60) % 2
    )
    data = load_data(f"npz:{tmp_path / 'v.npz'}")
    with pytest.raises(EdgeoptInputError, match="use --teacher mlp"):
        load_teacher("cnn", data)
