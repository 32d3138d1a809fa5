"""The optimize pipeline end to end, and the run directory it writes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import edgeopt
from edgeopt.converters import open_runtime
from edgeopt.data import load_data
from edgeopt.distill import TrainConfig, predict
from edgeopt.pipeline import LoadDataStage, OptimizeConfig, Stage, run_optimize
from edgeopt.students import load_student
from edgeopt.teachers import load_teacher

SETTINGS = {"limit": 500, "epochs": 4, "seed": 2}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    return edgeopt.optimize(data="digits", out=out, **SETTINGS)


@pytest.mark.slow
def test_report_has_the_documented_fields(run):
    report = json.loads((run.run_dir / "report.json").read_text())
    assert report == json.loads(json.dumps(run.report, default=str))
    for side in ("teacher", "student"):
        entry = report[side]
        for key in ("accuracy", "params", "macs", "size_bytes", "latency_ms"):
            assert entry[key] is not None, (side, key)
        for target in ("litert-xnnpack", "onnxruntime-cpu"):
            latency = entry["latency_ms"][target]
            assert 0 < latency["median"] <= latency["p90"]
    assert [(e["format"], e["precision"]) for e in report["exports"]] == [
        ("onnx", "fp32"),
        ("tflite", "fp32"),
        ("tflite", "int8"),
    ]
    for entry in report["exports"]:
        for key in ("path", "size_bytes", "max_abs_diff", "top1_agreement", "accuracy"):
            assert key in entry, (entry["path"], key)
        assert (run.run_dir / entry["path"]).stat().st_size == entry["size_bytes"]
    assert [s["name"] for s in report["stages"]] == [
        "data",
        "teacher",
        "student",
        "distill",
        "save",
        "export",
        "verify",
        "measure",
    ]
    assert report["environment"]["packages"]["torch"].startswith("2.")
    assert report["student"]["macs"] < report["teacher"]["macs"] / 10


@pytest.mark.slow
def test_exports_match_the_saved_student(run):
    data = load_data("digits", seed=SETTINGS["seed"], limit=SETTINGS["limit"])
    student = load_student(run.run_dir)
    reference = predict(student, data.test.x)
    exports = {e["path"]: e for e in run.report["exports"]}
    for name, tolerance in (("student.onnx", 1e-5), ("student_fp32.tflite", 1e-4)):
        logits = open_runtime(run.run_dir / name).run(data.test.x)["logits"]
        assert np.abs(logits - reference).max() <= tolerance
        assert exports[name]["max_abs_diff"] <= tolerance
        accuracy = float(np.mean(logits.argmax(1) == data.test.y))
        assert exports[name]["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert run.report["student"]["accuracy"] == pytest.approx(
        float(np.mean(reference.argmax(1) == data.test.y))
    )
    assert exports["student_int8.tflite"]["top1_agreement"] >= 0.95


@pytest.mark.slow
def test_teacher_accuracy_matches_a_reload(run):
    data = load_data("digits", seed=SETTINGS["seed"], limit=SETTINGS["limit"])
    teacher_epochs = max(SETTINGS["epochs"] // 2, 5)
    teacher, _ = load_teacher(
        "auto",
        data,
        seed=SETTINGS["seed"],
        train_config=TrainConfig(epochs=teacher_epochs, patience=4, learning_rate=2e-3),
    )
    accuracy = float(np.mean(teacher.logits(data.test.x).argmax(1) == data.test.y))
    assert run.report["teacher"]["accuracy"] == pytest.approx(accuracy)


@pytest.mark.slow
def test_html_report_and_log(run):
    page = (run.run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert "student_int8.tflite" in page
    log = (run.run_dir / "run.log").read_text()
    assert "stage distill: finished" in log
    assert "stage measure: finished" in log


class ExplodingStage(Stage):
    name = "explode"

    def run(self, state):
        (state.workdir / "half-written.bin").write_bytes(b"0" * 10)
        raise KeyboardInterrupt


def test_interrupted_run_leaves_nothing(tmp_path):
    config = OptimizeConfig(out=tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        run_optimize(config, stages=[LoadDataStage(), ExplodingStage()])
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text("{}")
    config = OptimizeConfig(out=out, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        run_optimize(config, stages=[LoadDataStage(), ExplodingStage()])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert (out / "report.json").read_text() == "{}"


def test_unknown_setting_is_named():
    with pytest.raises(edgeopt.EdgeoptInputError, match="unknown optimize setting"):
        edgeopt.optimize(epocs=3)


def test_dead_run_partial_removed(tmp_path):
    import subprocess
    import sys

    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(finished.stdout)
    stale = tmp_path / f".run.partial-{dead_pid}-abc123"
    stale.mkdir()
    (stale / "student.onnx").write_bytes(b"half")
    alive = tmp_path / f".run.partial-{os.getpid()}-def456"
    alive.mkdir()
    config = OptimizeConfig(out=tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        run_optimize(config, stages=[LoadDataStage(), ExplodingStage()])
    assert not stale.exists()
    assert alive.exists()
