from __future__ import annotations

import pytest

import edgeopt.targets as targets
from edgeopt.errors import EdgeoptInputError, TargetError
from edgeopt.targets import get_target, list_targets

LOCAL_NAMES = ["onnxruntime-cpu", "onnxruntime-cpu-mt", "litert-xnnpack", "litert-xnnpack-mt"]


def test_all_is_sorted() -> None:
    assert targets.__all__ == sorted(targets.__all__)


def test_local_targets_registered() -> None:
    names = [target.name for target in list_targets()]
    for name in LOCAL_NAMES:
        assert name in names


def test_target_names_unique() -> None:
    names = [target.name for target in list_targets()]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    ("name", "runtime", "suffix", "single_thread"),
    [
        ("onnxruntime-cpu", "onnxruntime", ".onnx", True),
        ("onnxruntime-cpu-mt", "onnxruntime", ".onnx", False),
        ("litert-xnnpack", "litert", ".tflite", True),
        ("litert-xnnpack-mt", "litert", ".tflite", False),
    ],
)
def test_local_target_fields(name: str, runtime: str, suffix: str, single_thread: bool) -> None:
    target = get_target(name)
    assert target.runtime == runtime
    assert target.file_suffix == suffix
    assert target.latency_source == "measured-local"
    assert (target.threads == 1) == single_thread
    assert target.threads >= 1


def test_to_dict_fields() -> None:
    for target in list_targets():
        data = target.to_dict()
        assert data["name"] == target.name
        assert data["runtime"] in ("onnxruntime", "litert")
        assert data["precision"] in ("fp32", "int8", "any")
        assert data["latency_source"] in ("measured-local", "measured-device", "predicted")
        assert isinstance(data["available"], bool)
        assert data["description"]


def test_unknown_target_lists_names() -> None:
    with pytest.raises(TargetError) as raised:
        get_target("foo")
    message = str(raised.value)
    assert "'foo'" in message
    for name in LOCAL_NAMES:
        assert name in message


def test_target_error_is_input_error() -> None:
    assert issubclass(TargetError, EdgeoptInputError)
