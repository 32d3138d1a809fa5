from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeopt.errors import ModelLoadError, TargetError
from edgeopt.targets.cli import profile_command, targets_group


def test_list_json() -> None:
    result = CliRunner().invoke(targets_group, ["list", "--json"])
    assert result.exit_code == 0
    names = [target["name"] for target in json.loads(result.output)]
    assert "litert-xnnpack" in names
    assert "cortex-a76" in names


def test_list_quiet_names() -> None:
    result = CliRunner().invoke(targets_group, ["list", "--quiet"])
    assert result.exit_code == 0
    assert "onnxruntime-cpu" in result.output.splitlines()


def test_profile_onnx_json(onnx_model: Path) -> None:
    result = CliRunner().invoke(
        profile_command,
        [str(onnx_model), "--target", "onnxruntime-cpu", "--budget", "0.2", "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["latency"]["median_ms"] > 0
    assert report["model"]["macs"] > 0
    assert report["layer_times"]
    assert report["latency"]["estimate"] is False


def test_profile_predicted_text_says_estimate(tflite_model: Path) -> None:
    result = CliRunner().invoke(
        profile_command, [str(tflite_model), "--target", "cortex-a55", "--budget", "0.2"]
    )
    assert result.exit_code == 0, result.output
    assert "(estimate)" in result.output


def test_profile_rejects_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "model.pt2"
    path.write_bytes(b"\0")
    result = CliRunner().invoke(profile_command, [str(path), "--target", "litert-xnnpack"])
    assert isinstance(result.exception, ModelLoadError)
    assert "export it to .onnx or .tflite" in str(result.exception)


def test_profile_unknown_target(onnx_model: Path) -> None:
    result = CliRunner().invoke(profile_command, [str(onnx_model), "--target", "tpu"])
    assert isinstance(result.exception, TargetError)


def test_calibrate_bad_shape() -> None:
    result = CliRunner().invoke(
        targets_group, ["calibrate", "litert-xnnpack", "--input-shape", "28x28"]
    )
    assert result.exit_code == 2
    assert "1x28x28" in result.output


@pytest.mark.parametrize("command", [["list"], ["calibrate"]])
def test_help_of_each_command(command: list[str]) -> None:
    result = CliRunner().invoke(targets_group, [*command, "--help"])
    assert result.exit_code == 0
    assert "--json" in result.output
    assert "--quiet" in result.output
