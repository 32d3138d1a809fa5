"""The command line: bad inputs give one line, exit code 2 and leave nothing behind."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import edgeopt
from edgeopt.cli import cli
from edgeopt.converters import export_onnx


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_clean_failure(result, message, parent):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert errors == [lines[-1]], result.stderr
    assert message in lines[-1]
    assert "Traceback" not in result.stderr
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith((".run", "run"))]
    assert leftovers == []


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"edgeopt, version {edgeopt.__version__}"


def test_missing_teacher_file(tmp_path):
    result = invoke("optimize", "--teacher", tmp_path / "nope.onnx", "--out", tmp_path / "run")
    assert_clean_failure(result, f"teacher file not found: {tmp_path / 'nope.onnx'}", tmp_path)


def test_corrupt_teacher_file(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf at all" * 20)
    result = invoke("optimize", "--teacher", broken, "--out", tmp_path / "run")
    assert_clean_failure(result, f"cannot load ONNX teacher {broken}", tmp_path)


def test_teacher_data_shape_mismatch(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    export_onnx(model, torch.zeros(1, 1, 28, 28), tmp_path / "mnist_like.onnx")
    result = invoke(
        "optimize",
        "--teacher",
        tmp_path / "mnist_like.onnx",
        "--data",
        "digits",
        "--out",
        tmp_path / "run",
    )
    assert_clean_failure(result, "expects samples of shape 1×28×28", tmp_path)


def test_labels_outside_teacher_classes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "three_way.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def build():
                return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
            """
        )
    )
    result = invoke("optimize", "--teacher", "three_way:build", "--out", tmp_path / "run")
    assert_clean_failure(result, "labels go up to 9 but teacher three_way:build has 3", tmp_path)


def test_nan_in_data(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 1, 8, 8)).astype(np.float32)
    x[3, 0, 2, 2] = np.nan
    np.savez(tmp_path / "data.npz", x=x, y=np.arange(50) % 5)
    result = invoke(
        "optimize", "--data", f"npz:{tmp_path / 'data.npz'}", "--out", tmp_path / "run"
    )
    assert_clean_failure(result, "contain NaN or infinite values (first at index 3)", tmp_path)


def test_output_folder_cannot_be_written(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = invoke("optimize", "--limit", "100", "--out", blocker / "run")
    assert_clean_failure(result, f"cannot write the output folder {blocker / 'run'}", tmp_path)


def test_existing_output_folder_needs_overwrite(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("earlier results")
    result = invoke("optimize", "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "already exists: choose another --out or add --overwrite" in result.stderr
    assert (tmp_path / "run" / "keep.txt").read_text() == "earlier results"


def test_unknown_target_fails_before_training(tmp_path):
    result = invoke("optimize", "--target", "pixel-99", "--out", tmp_path / "run")
    assert_clean_failure(result, "unknown target 'pixel-99'", tmp_path)


def test_unknown_data_source(tmp_path):
    result = invoke("optimize", "--data", "cifar", "--out", tmp_path / "run")
    assert_clean_failure(result, "unknown data source 'cifar'", tmp_path)


@pytest.mark.parametrize("where", ["group", "command"])
def test_debug_shows_the_traceback(tmp_path, where):
    args = ["optimize", "--data", "cifar", "--out", tmp_path / "run"]
    args = ["--debug", *args] if where == "group" else [*args[:1], "--debug", *args[1:]]
    result = invoke(*args)
    assert result.exit_code != 0
    assert isinstance(result.exception, edgeopt.DataError)


@pytest.mark.slow
def test_optimize_json_output_is_the_report(tmp_path):
    out = tmp_path / "run"
    result = invoke(
        "optimize", "--limit", "400", "--epochs", "3", "--out", out, "--json", "--seed", "1"
    )
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed == json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_sigterm_removes_the_partial_run(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    env = {**os.environ, "EDGEOPT_CACHE_DIR": str(tmp_path / "cache")}
    process = subprocess.Popen(
        [sys.executable, "-m", "edgeopt.cli", "optimize", "--out", str(out), "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".run.partial-") for p in tmp_path.iterdir()):
        assert time.monotonic() < deadline, "the run never created its temporary folder"
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) != 0
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "cache"]
    assert leftovers == []


@pytest.fixture
def small_onnx(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)
    ).eval()
    path = tmp_path / "small.onnx"
    export_onnx(model, torch.zeros(1, 1, 8, 8), path)
    return path


def test_convert_onnx_to_int8_reports_verification(tmp_path, small_onnx):
    out = tmp_path / "small_int8.onnx"
    result = invoke(
        "convert",
        small_onnx,
        "--to",
        "onnx",
        "--precision",
        "int8",
        "--calibration",
        "digits",
        "--out",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["path"] == str(out)
    assert out.is_file()
    assert payload["verification"]["samples"] == 360
    assert payload["verification"]["top1_agreement"] >= 0.95
    assert payload["size_bytes"]["int8"] < payload["size_bytes"]["fp32"]


def test_convert_without_data_is_an_input_error(tmp_path, small_onnx):
    result = invoke("convert", small_onnx, "--to", "onnx", "--out", tmp_path / "x.onnx")
    assert result.exit_code == 2
    assert "add --data DATA" in result.stderr


def test_verify_identical_models(small_onnx):
    result = invoke("verify", small_onnx, small_onnx, "--data", "digits", "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["max_abs_diff"] == 0.0
    assert payload["top1_agreement"] == 1.0


def test_overwrite_keeps_non_run_folder(tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.txt").write_text("months of work")
    result = invoke("optimize", "--out", folder, "--overwrite")
    assert result.exit_code == 2
    assert "is not an edgeopt run directory" in result.stderr
    assert (folder / "chapter1.txt").read_text() == "months of work"


def test_infinite_learning_rate_is_rejected(tmp_path):
    result = invoke("optimize", "--lr", "inf", "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "learning_rate=inf" in result.stderr
    assert not (tmp_path / "run").exists()


def test_sparse_integer_labels_are_rejected(tmp_path):
    x = np.random.default_rng(0).normal(size=(80, 6)).astype(np.float32)
    y = np.repeat([0, 1000, 2000, 3000], 20)
    np.savez(tmp_path / "sparse.npz", x=x, y=y)
    result = invoke(
        "optimize", "--data", f"npz:{tmp_path / 'sparse.npz'}", "--out", tmp_path / "run"
    )
    assert_clean_failure(result, "labels use only 4 of the class indices 0..3000", tmp_path)


def test_limit_too_small_to_split(tmp_path):
    x = np.random.default_rng(0).normal(size=(400, 6)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(400) % 4)
    result = invoke(
        "optimize",
        "--data",
        f"npz:{tmp_path / 'd.npz'}",
        "--limit",
        "399",
        "--out",
        tmp_path / "run",
    )
    if result.exit_code == 0:
        pytest.skip("this split happened to work")
    assert_clean_failure(result, "cannot split", tmp_path)
