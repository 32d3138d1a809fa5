"""The `optimize` pipeline: data and teacher in, a verified and measured student out.

Each stage is a `Stage` with a name and a `run(state)` method that returns its own result,
which the pipeline stores in `RunState.results` under the stage's name. `run_stages` is the
template that times and logs every stage. Later stages (architecture search, tuning,
federated fine-tuning) plug in as further stages that read the same state.

Everything is written to a temporary folder beside `--out` and moved into place only when the
run is complete, so an interrupted or failed run leaves no partial run directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from edgeopt._logging import RunLogFile, get_logger
from edgeopt.data import Dataset, load_data
from edgeopt.distill import TrainConfig, TrainResult, predict, train
from edgeopt.errors import ConversionError, EdgeoptInputError, TargetError
from edgeopt.metrics import accuracy, count_macs, count_params
from edgeopt.students import FAMILIES, StudentConfig, build_student, size_student
from edgeopt.teachers import Teacher, load_teacher

logger = get_logger(__name__)

LOCAL_TARGETS = ("litert-xnnpack", "onnxruntime-cpu")


@dataclass
class OptimizeConfig:
    """Every setting of an `optimize` run; the CLI options map one to one onto these fields.

    Attributes:
        teacher: built-in name, model file or ``package.module:callable``.
        data: data spec (see `edgeopt.data`).
        out: run directory to create.
        student: a family name, a JSON file with a `StudentConfig`, or None to size one from
            the teacher within `mac_ratio` of its MACs.
        target: the hardware target the run optimizes for; the local runtimes are measured too.
        mac_ratio: student MAC budget as a fraction of the teacher's, when sizing the student.
        calibration_samples: training samples used to calibrate int8 export.
        limit: keep only this many samples (stratified) before splitting, for quick runs.
    """

    teacher: str = "auto"
    data: str = "digits"
    out: Path = Path("runs/latest")
    student: str | None = None
    target: str = "litert-xnnpack"
    overwrite: bool = False
    seed: int = 0
    label: str | None = None
    teacher_weights: str | None = None
    teacher_input_scale: float | None = None
    teacher_batch: int | None = None
    mac_ratio: float = 0.08
    calibration_samples: int = 256
    limit: int | None = None
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        return data


@dataclass
class RunState:
    """State shared by the stages: the settings, the working folder and each stage's result."""

    config: OptimizeConfig
    workdir: Path
    results: dict[str, Any] = field(default_factory=dict)
    timings: list[dict[str, Any]] = field(default_factory=list)
    data: Dataset | None = None
    teacher: Teacher | None = None
    student: nn.Module | None = None


class Stage(ABC):
    """One step of the pipeline. Subclasses set `name` and implement `run`."""

    name: ClassVar[str]

    @abstractmethod
    def run(self, state: RunState) -> Any:
        """Do the stage's work on `state` and return its result."""


def run_stages(stages: list[Stage], state: RunState) -> RunState:
    """Run `stages` in order, recording each result and its wall time in `state`."""
    for stage in stages:
        logger.info("stage %s: started", stage.name)
        started = time.perf_counter()
        state.results[stage.name] = stage.run(state)
        seconds = time.perf_counter() - started
        state.timings.append({"name": stage.name, "seconds": round(seconds, 3)})
        logger.info("stage %s: finished in %.1f s", stage.name, seconds)
    return state


# --- stages -------------------------------------------------------------------------------


class LoadDataStage(Stage):
    name = "data"

    def run(self, state: RunState) -> dict[str, Any]:
        config = state.config
        state.data = load_data(
            config.data, seed=config.seed, label=config.label, limit=config.limit
        )
        return state.data.summary()


class TeacherStage(Stage):
    name = "teacher"

    def run(self, state: RunState) -> dict[str, Any]:
        config, data = state.config, _require(state.data, "data")
        teacher_train = TrainConfig(
            epochs=max(config.train.epochs // 2, 5), patience=4, learning_rate=2e-3
        )
        teacher, info = load_teacher(
            config.teacher,
            data,
            weights=config.teacher_weights,
            input_scale=config.teacher_input_scale,
            fixed_batch=config.teacher_batch,
            seed=config.seed,
            train_config=teacher_train,
        )
        state.teacher = teacher
        logits = teacher.logits(data.test.x)
        info["test_accuracy"] = accuracy(logits, data.test.y)
        info["macs"] = _teacher_macs(teacher, data)
        info["describe"] = teacher.describe()
        logger.info("teacher %s: test accuracy %.2f%%", teacher.name, 100 * info["test_accuracy"])
        return info


class StudentStage(Stage):
    name = "student"

    def run(self, state: RunState) -> dict[str, Any]:
        config, data = state.config, _require(state.data, "data")
        _require(state.teacher, "teacher")
        teacher_macs = state.results["teacher"]["macs"]
        student_config = self._choose(config, data, teacher_macs)
        torch.manual_seed(config.seed)  # the initial weights are part of a seeded run
        state.student = build_student(student_config, data.input_shape, data.num_classes)
        macs = count_macs(state.student, data.input_shape)
        logger.info(
            "student %s: %d parameters, %d MACs",
            student_config.to_dict(),
            count_params(state.student),
            macs,
        )
        return {"architecture": student_config.to_dict(), "macs": macs}

    @staticmethod
    def _choose(config: OptimizeConfig, data: Dataset, teacher_macs: int | None) -> StudentConfig:
        spec = config.student
        if spec and spec.endswith(".json"):
            path = Path(spec).expanduser()
            if not path.is_file():
                raise EdgeoptInputError(f"student description not found: {path}")
            try:
                return StudentConfig.from_dict(json.loads(path.read_text()))
            except json.JSONDecodeError as exc:
                raise EdgeoptInputError(f"student description {path} is not JSON: {exc}") from exc
        if spec and spec not in FAMILIES:
            raise EdgeoptInputError(
                f"unknown student {spec!r}: use one of {', '.join(FAMILIES)} or a JSON file "
                "with a student architecture"
            )
        family = spec or ("inverted_residual" if data.kind == "image" else "mlp")
        if family != "mlp" and data.kind != "image":
            raise EdgeoptInputError(
                f"student {family!r} needs image data, but {data.name} contains vectors: use "
                "--student mlp"
            )
        budget = config.mac_ratio * teacher_macs if teacher_macs else 2e6
        return size_student(family, data.input_shape, data.num_classes, budget)


class DistillStage(Stage):
    name = "distill"

    def run(self, state: RunState) -> TrainResult:
        student = _require(state.student, "student")
        return train(
            student,
            _require(state.data, "data"),
            teacher=state.teacher,
            config=state.config.train,
            seed=state.config.seed,
            label="student",
        )


class SaveStudentStage(Stage):
    name = "save"

    def run(self, state: RunState) -> dict[str, str]:
        data, student = _require(state.data, "data"), _require(state.student, "student")
        weights = state.workdir / "student.pt"
        description = state.workdir / "student.json"
        torch.save(student.state_dict(), weights)
        description.write_text(
            json.dumps(
                {
                    "architecture": student.config.to_dict(),
                    "input_shape": list(data.input_shape),
                    "num_classes": data.num_classes,
                    "class_names": data.class_names,
                    "preprocessing": data.preprocessing,
                },
                indent=2,
            )
        )
        return {"weights": weights.name, "description": description.name}


class ExportStage(Stage):
    """Export the student to ONNX (dynamic batch), TFLite fp32 and TFLite full int8."""

    name = "export"

    def run(self, state: RunState) -> list[dict[str, Any]]:
        from edgeopt import converters

        data, student = _require(state.data, "data"), _require(state.student, "student")
        example = torch.from_numpy(data.train.x[:1])
        metadata = _metadata(data)
        rng = np.random.default_rng(state.config.seed)
        count = min(state.config.calibration_samples, len(data.train))
        calibration = data.train.x[np.sort(rng.choice(len(data.train), count, replace=False))]
        plans = [
            ("onnx", "fp32", "student.onnx"),
            ("tflite", "fp32", "student_fp32.tflite"),
            ("tflite", "int8", "student_int8.tflite"),
        ]
        exports = []
        for fmt, precision, filename in plans:
            path = state.workdir / filename
            entry: dict[str, Any] = {"format": fmt, "precision": precision, "path": filename}
            try:
                if fmt == "onnx":
                    converters.export_onnx(
                        student, example, path, output_names=["logits"], metadata=metadata
                    )
                else:
                    converters.export_tflite(
                        student,
                        example,
                        path,
                        precision=precision,
                        calibration=calibration if precision == "int8" else None,
                        output_names=["logits"],
                    )
                entry["size_bytes"] = path.stat().st_size
                logger.info("exported %s (%d bytes)", filename, entry["size_bytes"])
            except ConversionError as exc:
                logger.error("export of %s failed: %s", filename, exc)
                entry["error"] = str(exc)
            exports.append(entry)
        return exports


class VerifyStage(Stage):
    """Compare every export with the PyTorch student on the test split."""

    name = "verify"

    def run(self, state: RunState) -> list[dict[str, Any]]:
        from edgeopt import converters

        data, student = _require(state.data, "data"), _require(state.student, "student")
        reference = predict(student, data.test.x)
        state.results["student_test_accuracy"] = accuracy(reference, data.test.y)
        exports = state.results["export"]
        for entry in exports:
            if "error" in entry:
                continue
            runtime = converters.open_runtime(state.workdir / entry["path"])
            outputs = runtime.run(data.test.x)
            name = "logits" if "logits" in outputs else runtime.output_names[0]
            candidate = outputs[name]
            comparison = converters.compare_outputs({name: reference}, {name: candidate})[name]
            entry["output_name"] = name
            entry["max_abs_diff"] = float(comparison.max_abs_diff)
            entry["top1_agreement"] = float(comparison.top1_agreement)
            entry["sqnr_db"] = float(comparison.sqnr_db)
            entry["accuracy"] = accuracy(candidate, data.test.y)
            logger.info(
                "verified %s: max abs diff %.3g, top-1 agreement %.2f%%, accuracy %.2f%%",
                entry["path"],
                entry["max_abs_diff"],
                100 * entry["top1_agreement"],
                100 * entry["accuracy"],
            )
        return exports


class MeasureStage(Stage):
    """Measure teacher, student and exports: size, compute and latency on the local targets."""

    name = "measure"

    def run(self, state: RunState) -> dict[str, Any]:
        data = _require(state.data, "data")
        teacher, student = _require(state.teacher, "teacher"), _require(state.student, "student")
        targets = _resolve_targets(state.config.target)
        example = data.test.x[:1]
        scratch = Path(tempfile.mkdtemp(prefix="teacher-", dir=state.workdir))
        try:
            teacher_files = _teacher_files(teacher, example, scratch)
            teacher_entry = {
                "name": teacher.name,
                "kind": teacher.kind,
                "accuracy": state.results["teacher"]["test_accuracy"],
                "params": _teacher_params(teacher),
                "macs": state.results["teacher"]["macs"],
                "size_bytes": _teacher_size(teacher, teacher_files),
                "latency_ms": {},
            }
            for target in targets:
                path = teacher_files.get(target.file_suffix)
                if path is None:
                    logger.info(
                        "teacher not timed on %s: no %s file of it could be made (an ONNX "
                        "teacher cannot be converted to TFLite here)",
                        target.name,
                        target.file_suffix,
                    )
                teacher_entry["latency_ms"][target.name] = _measure(target, path, example)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

        exports = state.results["verify"]
        onnx_export = next((e for e in exports if e["format"] == "onnx"), None)
        fp32_tflite = next(
            (e for e in exports if e["format"] == "tflite" and e["precision"] == "fp32"), None
        )
        student_entry = {
            "architecture": student.config.to_dict(),
            "accuracy": state.results["student_test_accuracy"],
            "params": count_params(student),
            "macs": state.results["student"]["macs"],
            "size_bytes": (onnx_export or {}).get("size_bytes"),
            "latency_ms": {},
        }
        for entry in exports:
            entry["latency_ms"] = {}
        for target in targets:
            for entry in exports:
                if "error" in entry or Path(entry["path"]).suffix != target.file_suffix:
                    continue
                entry["latency_ms"][target.name] = _measure(
                    target, state.workdir / entry["path"], example
                )
            source = onnx_export if target.file_suffix == ".onnx" else fp32_tflite
            student_entry["latency_ms"][target.name] = (
                source["latency_ms"].get(target.name) if source and "error" not in source else None
            )
        return {
            "teacher": teacher_entry,
            "student": student_entry,
            "targets": [t.to_dict() for t in targets],
        }


def default_stages() -> list[Stage]:
    return [
        LoadDataStage(),
        TeacherStage(),
        StudentStage(),
        DistillStage(),
        SaveStudentStage(),
        ExportStage(),
        VerifyStage(),
        MeasureStage(),
    ]


# --- helpers ------------------------------------------------------------------------------


def _require(value: Any, stage: str) -> Any:
    if value is None:
        raise RuntimeError(f"stage {stage!r} must run before this one")
    return value


def _metadata(data: Dataset) -> dict[str, str]:
    return {
        "edgeopt.input_shape": json.dumps([None, *data.input_shape]),
        "edgeopt.preprocessing": json.dumps(data.preprocessing),
        "edgeopt.class_names": json.dumps(data.class_names),
    }


def _resolve_targets(primary: str) -> list[Any]:
    from edgeopt.targets import get_target

    names = [primary] + [name for name in LOCAL_TARGETS if name != primary]
    return [get_target(name) for name in names]


def _measure(target: Any, path: Path | None, example: np.ndarray) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        stats = target.measure(path, example)
    except TargetError as exc:
        logger.warning("latency of %s on %s not measured: %s", path.name, target.name, exc)
        return {"error": str(exc)}
    result = stats.as_dict()
    logger.info(
        "latency of %s on %s: median %.3f ms, p90 %.3f ms%s",
        path.name,
        target.name,
        result["median_ms"],
        result["p90_ms"],
        " (estimate)" if result.get("estimate") else "",
    )
    return {"median": result["median_ms"], "p90": result["p90_ms"], **result}


def _teacher_files(teacher: Teacher, example: np.ndarray, folder: Path) -> dict[str, Path]:
    """Return the teacher as .onnx and .tflite files where it can be converted."""
    from edgeopt import converters

    if teacher.kind == "onnx":
        # No maintained ONNX→TFLite converter runs here, so an ONNX teacher is timed on ONNX
        # Runtime only.
        return {".onnx": Path(teacher.name)}
    module = teacher.module
    files: dict[str, Path] = {}
    batch = teacher.input.fixed_batch or 1
    torch_example = torch.from_numpy(np.repeat(example * teacher.input.scale, batch, axis=0))
    try:
        converters.export_onnx(module, torch_example, folder / "teacher.onnx")
        files[".onnx"] = folder / "teacher.onnx"
    except ConversionError as exc:
        logger.warning("teacher not exported to ONNX, so not timed on ONNX Runtime: %s", exc)
    try:
        converters.export_tflite(module, torch_example, folder / "teacher.tflite")
        files[".tflite"] = folder / "teacher.tflite"
    except ConversionError as exc:
        logger.warning("teacher not exported to TFLite, so not timed on LiteRT: %s", exc)
    return files


def _teacher_params(teacher: Teacher) -> int | None:
    if teacher.module is not None:
        return count_params(teacher.module)
    from edgeopt.metrics import onnx_params

    return onnx_params(Path(teacher.name))


def _teacher_macs(teacher: Teacher, data: Dataset) -> int | None:
    if teacher.module is not None:
        try:
            return count_macs(teacher.module, data.input_shape)
        except (RuntimeError, TypeError) as exc:
            logger.warning("MACs of teacher %s not counted: %s", teacher.name, exc)
            return None
    from edgeopt.metrics import onnx_macs

    return onnx_macs(Path(teacher.name))


def _teacher_size(teacher: Teacher, files: dict[str, Path]) -> int | None:
    if teacher.kind == "onnx":
        return Path(teacher.name).stat().st_size
    path = files.get(".onnx")
    return path.stat().st_size if path else None


# --- entry point --------------------------------------------------------------------------


@dataclass
class OptimizeResult:
    """The outcome of `optimize`: where the run directory is and what report.json contains."""

    run_dir: Path
    report: dict[str, Any]

    @property
    def student_path(self) -> Path:
        return self.run_dir / "student.onnx"


def _prepare_output(out: Path, overwrite: bool) -> Path:
    """Check `out` can be created and return a fresh temporary folder beside it.

    `--overwrite` replaces only an earlier run directory (one with a report.json) or an empty
    folder, so a mistyped --out cannot delete unrelated files.
    """
    if out.exists() and not out.is_dir():
        raise EdgeoptInputError(f"output path {out} is a file, not a folder: choose another --out")
    if out.exists() and not overwrite:
        raise EdgeoptInputError(
            f"output folder {out} already exists: choose another --out or add --overwrite"
        )
    if out.exists() and not (out / "report.json").is_file() and any(out.iterdir()):
        raise EdgeoptInputError(
            f"output folder {out} is not an edgeopt run directory (no report.json) and is not "
            "empty, so --overwrite will not replace it: choose another --out"
        )
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(out)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=parent))
    except OSError as exc:
        raise EdgeoptInputError(
            f"cannot write the output folder {out}: {exc.strerror or exc}; choose a writable --out"
        ) from exc


def _remove_stale_partials(out: Path) -> None:
    """Remove temporary folders of earlier runs of `out` whose process no longer exists.

    A run removes its own temporary folder on errors, Ctrl-C and SIGTERM. When the process is
    killed outright or aborts in native code, the next run of the same --out removes it.
    """
    for folder in out.parent.glob(f".{out.name}.partial-*"):
        pid_text = folder.name.rsplit(".partial-", 1)[1].split("-", 1)[0]
        if not pid_text.isdigit() or _process_exists(int(pid_text)):
            continue
        logger.warning("removing %s, left by an interrupted run (process %s)", folder, pid_text)
        shutil.rmtree(folder, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # the process exists but belongs to another user
    return True


def _move_into_place(workdir: Path, out: Path) -> None:
    backup = None
    if out.exists():
        backup = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, backup)
    os.replace(workdir, out)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def run_optimize(config: OptimizeConfig, stages: list[Stage] | None = None) -> OptimizeResult:
    """Run the pipeline for `config` and return the finished run directory and its report."""
    from edgeopt.report import build_report, write_report

    out = Path(config.out).expanduser().resolve()
    _resolve_targets(config.target)  # an unknown target fails now, not after training
    workdir = _prepare_output(out, config.overwrite)
    state = RunState(config=config, workdir=workdir)
    started = time.perf_counter()
    try:
        with RunLogFile(workdir / "run.log"):
            logger.info("optimize: %s", json.dumps(config.to_dict(), default=str))
            run_stages(stages or default_stages(), state)
            report = build_report(state, seconds=time.perf_counter() - started)
            write_report(report, state, workdir)
        _move_into_place(workdir, out)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    logger.info("run directory ready: %s", out)
    return OptimizeResult(run_dir=out, report=report)


def optimize(
    teacher: str = "auto",
    data: str = "digits",
    out: str | Path = "runs/latest",
    **settings: Any,
) -> OptimizeResult:
    """Distill `teacher` into a small student for `data`, export, verify and measure it.

    Keyword settings are the fields of `OptimizeConfig` (student, target, seed, overwrite, …)
    and of `TrainConfig` (epochs, temperature, alpha, hint_weight, …).

    Example:
        >>> result = edgeopt.optimize(data="digits", out="runs/digits", overwrite=True)
        >>> result.report["student"]["accuracy"]

    Raises:
        EdgeoptInputError: an input (file, data, option) is invalid; nothing is written.
    """
    train_fields = set(TrainConfig.__dataclass_fields__)
    config_fields = set(OptimizeConfig.__dataclass_fields__) - {"train"}
    unknown = sorted(set(settings) - train_fields - config_fields)
    if unknown:
        raise EdgeoptInputError(
            f"unknown optimize setting(s) {', '.join(unknown)}: valid ones are "
            f"{', '.join(sorted(train_fields | config_fields))}"
        )
    train_config = TrainConfig(**{k: v for k, v in settings.items() if k in train_fields})
    config = OptimizeConfig(
        teacher=teacher,
        data=data,
        out=Path(out),
        train=train_config,
        **{k: v for k, v in settings.items() if k in config_fields},
    )
    return run_optimize(config)
