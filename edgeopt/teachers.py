"""Teachers: the trained models that students learn from.

A teacher spec is one of

- a built-in name (``cnn`` for images, ``mlp`` for vectors, ``auto`` to pick by data kind),
  trained on the training split on first use and cached in the user cache directory;
- a TorchScript file (``.pt``, ``.pth``, ``.ts``, ``.torchscript``);
- a ``torch.export`` program (``.pt2``);
- an ONNX file (``.onnx``), run through ONNX Runtime;
- ``package.module:callable`` returning an ``nn.Module``, with optional weights loaded from a
  state dict (``weights_only=True``).

Every teacher exposes `Teacher.logits`, which takes inputs preprocessed the student's way. It
first applies the teacher's own input convention (`TeacherInput`): a scale, for teachers trained
on raw 0–255 pixels, and a fixed batch size, for ONNX files exported with batch 1.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from edgeopt._logging import get_logger
from edgeopt.errors import DataError, EdgeoptInputError, ModelLoadError

if TYPE_CHECKING:
    from edgeopt.data import Dataset
    from edgeopt.distill import TrainConfig

logger = get_logger(__name__)

BUILTIN_TEACHERS = ("auto", "cnn", "mlp")
# Part of the cache key of trained built-in teachers: bump it when their architecture changes.
BUILTIN_TEACHER_VERSION = 2
# Accuracy gap (as a fraction) above which input-scale detection trusts accuracy alone.
SCALE_ACCURACY_MARGIN = 0.02
TORCHSCRIPT_SUFFIXES = {".pt", ".pth", ".ts", ".torchscript", ".jit"}


@dataclass
class TeacherInput:
    """The teacher's input convention, relative to the student's preprocessed input.

    Attributes:
        scale: factor applied to student inputs before they reach the teacher (255 for a
            teacher trained on raw 8-bit pixels when the student takes [0, 1]).
        fixed_batch: batch size baked into the teacher, or None for any batch.
        notes: how each value was chosen ("stated", "detected: …", "default").
    """

    scale: float = 1.0
    fixed_batch: int | None = None
    notes: dict[str, str] = field(default_factory=dict)


class Teacher(ABC):
    """A trained classifier that produces logits for distillation."""

    kind: str = "teacher"

    def __init__(self, name: str, teacher_input: TeacherInput | None = None) -> None:
        self.name = name
        self.input = teacher_input or TeacherInput()

    @property
    def module(self) -> nn.Module | None:
        """The PyTorch module behind the teacher, when there is one (for hints and export)."""
        return None

    @property
    def expected_input_shape(self) -> tuple[int | None, ...] | None:
        """Shape of one input sample as declared by the model file, or None if unknown."""
        return None

    @abstractmethod
    def _run(self, x: np.ndarray) -> np.ndarray:
        """Return logits for `x`, already in the teacher's own input convention."""

    def logits(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Return N × classes float32 logits for student-preprocessed inputs `x`."""
        x = np.asarray(x, dtype=np.float32)
        if self.input.scale != 1.0:
            x = x * np.float32(self.input.scale)
        step = self.input.fixed_batch or batch_size
        outputs = []
        for start in range(0, len(x), step):
            chunk = x[start : start + step]
            real = len(chunk)
            if self.input.fixed_batch and real < self.input.fixed_batch:
                pad = np.zeros((self.input.fixed_batch - real, *chunk.shape[1:]), np.float32)
                chunk = np.concatenate([chunk, pad])
            outputs.append(np.asarray(self._run(chunk), dtype=np.float32)[:real])
        if not outputs:
            return np.zeros((0, 0), np.float32)
        result = np.concatenate(outputs)
        if result.ndim != 2:
            result = result.reshape(len(x), -1)
        return result

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "input": asdict(self.input)}


def _first_tensor(output: Any) -> torch.Tensor:
    """Return the logits from a module output: a tensor, the first of a tuple, or a dict value."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, dict):
        for key in ("logits", "output", "out"):
            if isinstance(output.get(key), torch.Tensor):
                return output[key]
        tensors = [value for value in output.values() if isinstance(value, torch.Tensor)]
        if tensors:
            return tensors[0]
    raise ModelLoadError(
        f"teacher returned {type(output).__name__}; expected a logits tensor, a tuple whose "
        "first item is one, or a dict with a 'logits' tensor"
    )


class TorchTeacher(Teacher):
    """A teacher backed by a PyTorch module (built-in, TorchScript, .pt2 or a callable)."""

    def __init__(
        self, name: str, module: nn.Module, kind: str, teacher_input: TeacherInput | None = None
    ) -> None:
        super().__init__(name, teacher_input)
        try:
            module.eval()
        except NotImplementedError:
            # A torch.export program (.pt2) refuses mode switches: its train or eval
            # behaviour was fixed when it was exported.
            logger.debug("teacher %s keeps the mode it was exported in", name)
        self._module = module
        self.kind = kind

    @property
    def module(self) -> nn.Module:
        return self._module

    def _run(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return _first_tensor(self._module(torch.from_numpy(x))).float().numpy()


class OnnxTeacher(Teacher):
    """A teacher stored as an ONNX file and run through ONNX Runtime on the CPU."""

    kind = "onnx"

    def __init__(self, path: Path, teacher_input: TeacherInput | None = None) -> None:
        super().__init__(str(path), teacher_input)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf/InvalidGraph types
            raise ModelLoadError(
                f"cannot load ONNX teacher {path}: {str(exc).splitlines()[0]}; check that the "
                "file is a complete ONNX model"
            ) from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(f"{i.name}{i.shape}" for i in inputs)
            raise ModelLoadError(
                f"ONNX teacher {path} has {len(inputs)} inputs ({names}); edgeopt needs a "
                "classifier with one input"
            )
        self.input_name = inputs[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.declared_shape = list(inputs[0].shape)
        if isinstance(self.declared_shape[0], int) and self.input.fixed_batch is None:
            self.input.fixed_batch = self.declared_shape[0]
            self.input.notes["fixed_batch"] = (
                f"detected: input {self.input_name!r} declares batch size {self.declared_shape[0]}"
            )

    @property
    def expected_input_shape(self) -> tuple[int | None, ...]:
        return tuple(d if isinstance(d, int) else None for d in self.declared_shape[1:])

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]


# --- built-in teachers --------------------------------------------------------------------


class CNNTeacher(nn.Module):
    """Three 3×3 conv blocks (32, 64, 128 channels), two max pools and a linear classifier.

    The classifier takes the whole final feature map (flattened, not globally pooled). The
    position of strokes therefore still counts, which matters for digits and centred images.
    """

    def __init__(self, in_channels: int, num_classes: int, height: int, width: int) -> None:
        super().__init__()
        smallest = min(height, width)
        if smallest >= 8:
            pools = 2
        elif smallest >= 4:
            pools = 1
        else:
            pools = 0
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2) if pools >= 1 else nn.Identity(),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2) if pools >= 2 else nn.Identity(),
            nn.Conv2d(64, 128, 3, padding=1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(),
        )
        features = 128 * (height // 2**pools) * (width // 2**pools)
        self.dropout = nn.Dropout(0.3)
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)
        return self.classifier(self.dropout(x))


class MLPTeacher(nn.Module):
    """Two hidden layers of 256 units with ReLU and dropout."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, 256),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.flatten(x, 1))


def build_builtin_teacher(name: str, data: Dataset) -> nn.Module:
    if name == "auto":
        name = "cnn" if data.kind == "image" else "mlp"
    if name == "cnn":
        if len(data.input_shape) != 3:
            raise EdgeoptInputError(
                f"built-in teacher 'cnn' needs image data, but samples have shape "
                f"{data.input_shape}: use --teacher mlp"
            )
        channels, height, width = data.input_shape
        return CNNTeacher(channels, data.num_classes, height, width)
    return MLPTeacher(int(np.prod(data.input_shape)), data.num_classes)


def cache_dir() -> Path:
    """Return edgeopt's cache folder: $EDGEOPT_CACHE_DIR, else $XDG_CACHE_HOME/edgeopt."""
    if os.environ.get("EDGEOPT_CACHE_DIR"):
        return Path(os.environ["EDGEOPT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeopt"


def load_builtin_teacher(
    name: str, data: Dataset, *, seed: int, train_config: TrainConfig | None = None
) -> tuple[TorchTeacher, dict[str, Any]]:
    """Return the built-in teacher for `data`, training it on the training split on first use.

    The trained weights are cached under `cache_dir()` keyed by teacher name, data fingerprint,
    seed and training settings, and reloaded with ``weights_only=True``.
    """
    from edgeopt.distill import TrainConfig, train

    config = train_config or TrainConfig(epochs=15, patience=4, learning_rate=2e-3)
    resolved = "cnn" if name == "auto" and data.kind == "image" else name
    resolved = "mlp" if resolved == "auto" else resolved
    key = f"{resolved}-v{BUILTIN_TEACHER_VERSION}-{data.fingerprint()}-s{seed}-e{config.epochs}"
    folder = cache_dir() / "teachers"
    weights_path = folder / f"{key}.pt"
    info_path = folder / f"{key}.json"
    torch.manual_seed(seed)  # the initial weights are part of a seeded run
    module = build_builtin_teacher(resolved, data)
    if weights_path.is_file() and info_path.is_file():
        try:
            module.load_state_dict(torch.load(weights_path, weights_only=True))
            info = json.loads(info_path.read_text())
            logger.info(
                "built-in teacher %r loaded from cache %s (validation accuracy %.2f%%)",
                resolved,
                weights_path,
                100 * info["val_accuracy"],
            )
            return TorchTeacher(resolved, module.eval(), "builtin"), info
        except (RuntimeError, KeyError, ValueError, OSError) as exc:
            logger.warning("ignoring unreadable cached teacher %s: %s", weights_path, exc)
    logger.info("training built-in teacher %r on %d samples", resolved, len(data.train))
    result = train(module, data, teacher=None, config=config, seed=seed, label="teacher")
    info = {
        "name": resolved,
        "val_accuracy": result.best_val_accuracy,
        "epochs": result.epochs_run,
        "history": result.history,
        "seconds": result.seconds,
    }
    folder.mkdir(parents=True, exist_ok=True)
    tmp = weights_path.with_suffix(".pt.tmp")
    torch.save(module.state_dict(), tmp)
    os.replace(tmp, weights_path)
    info_path.write_text(json.dumps(info))
    return TorchTeacher(resolved, module.eval(), "builtin"), info


# --- loading from files and callables -----------------------------------------------------


def _load_callable(spec: str, weights: Path | None) -> nn.Module:
    module_name, _, attribute = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        python_module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"cannot import {module_name!r} for teacher {spec!r}: {exc}; run from the folder "
            "that contains it or install its package"
        ) from exc
    factory = python_module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise ModelLoadError(
                f"{module_name!r} has no attribute {attribute!r} (teacher {spec})"
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise ModelLoadError(f"teacher {spec!r} is not callable")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"teacher {spec!r} returned {type(model).__name__}, not an nn.Module")
    if weights is not None:
        state = _load_state_dict(weights)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise ModelLoadError(
                f"weights {weights} do not fit teacher {spec!r}: {first}; check that the state "
                "dict was saved from this architecture"
            ) from exc
    return model


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelLoadError(f"teacher weights not found: {path}")
    try:
        # weights_only=True: a weights file is untrusted input and must not run pickled code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or zipfile errors
        raise ModelLoadError(
            f"cannot load teacher weights {path} with weights_only=True: "
            f"{str(exc).splitlines()[0]}; save them with torch.save(model.state_dict(), PATH)"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} contains a {type(state).__name__}, not a state dict")
    return state


def _exported_batch_size(program: torch.export.ExportedProgram) -> int | None:
    """Return the batch size a torch.export program was specialised to, or None if dynamic."""
    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            value = node.meta.get("val")
            shape = getattr(value, "shape", None)
            if shape is not None and len(shape) > 0 and isinstance(shape[0], int):
                return int(shape[0])
            return None
    return None


def _load_file(path: Path) -> TorchTeacher | OnnxTeacher:
    if not path.exists():
        raise ModelLoadError(f"teacher file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return OnnxTeacher(path)
    if suffix == ".pt2":
        try:
            program = torch.export.load(str(path))
        except Exception as exc:  # torch.export raises a range of errors for broken archives
            raise ModelLoadError(
                f"cannot load torch.export program {path}: {str(exc).splitlines()[0]}"
            ) from exc
        teacher = TorchTeacher(str(path), program.module(), "pt2")
        batch = _exported_batch_size(program)
        if batch is not None:
            teacher.input.fixed_batch = batch
            teacher.input.notes["fixed_batch"] = (
                f"detected: the exported program was specialised to batch size {batch}"
            )
        return teacher
    if suffix in TORCHSCRIPT_SUFFIXES:
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # TorchScript raises RuntimeError or its own error types
            hint = (
                "if it is a state dict, give the architecture as --teacher package.module:"
                "callable and the file as --teacher-weights"
            )
            raise ModelLoadError(
                f"cannot load {path} as TorchScript: {str(exc).splitlines()[0]}; {hint}"
            ) from exc
        return TorchTeacher(str(path), module, "torchscript")
    raise ModelLoadError(
        f"unknown teacher file type {suffix!r} for {path}: use .onnx, .pt2 or a TorchScript "
        "file (.pt, .pth, .ts)"
    )


def load_teacher(
    spec: str,
    data: Dataset,
    *,
    weights: str | Path | None = None,
    input_scale: float | None = None,
    fixed_batch: int | None = None,
    seed: int = 0,
    train_config: TrainConfig | None = None,
) -> tuple[Teacher, dict[str, Any]]:
    """Load the teacher named by `spec` and check it against `data`.

    Args:
        spec: a built-in name, a model file, or ``package.module:callable``.
        data: the data the teacher will label; used to train built-in teachers and to check
            input shape, classes and input scale.
        weights: state dict for a ``package.module:callable`` teacher.
        input_scale: factor from the student's [0, 1] inputs to the teacher's. When None, it is
            detected for image data by trying 1 and the data's raw scale on validation samples.
        fixed_batch: the batch size the teacher needs; detected from ONNX input shapes.

    Returns:
        The teacher and a dict of facts for the report (training history for built-ins, what
        was assumed about its input).

    Raises:
        ModelLoadError: the teacher cannot be loaded.
        DataError: the teacher does not fit the data (shape, classes).
    """
    info: dict[str, Any] = {}
    if spec in BUILTIN_TEACHERS:
        if weights is not None:
            raise EdgeoptInputError(
                f"--teacher-weights is for package.module:callable teachers, not built-in {spec!r}"
            )
        teacher, info = load_builtin_teacher(spec, data, seed=seed, train_config=train_config)
    elif (
        ":" in spec
        and not Path(spec).exists()
        and not spec.lower().endswith((".onnx", ".pt2", *TORCHSCRIPT_SUFFIXES))
    ):
        module = _load_callable(spec, Path(weights) if weights else None)
        teacher = TorchTeacher(spec, module, "callable")
    else:
        if weights is not None:
            raise EdgeoptInputError(
                f"--teacher-weights applies to package.module:callable teachers; {spec} is a "
                "model file that carries its own weights"
            )
        teacher = _load_file(Path(spec).expanduser())
    if fixed_batch is not None:
        teacher.input.fixed_batch = fixed_batch
        teacher.input.notes["fixed_batch"] = "stated"
    _check_shape(teacher, data)
    _choose_input_scale(teacher, data, input_scale)
    _check_classes(teacher, data)
    for key, note in teacher.input.notes.items():
        logger.info("teacher input %s: %s", key, note)
    info["input"] = asdict(teacher.input)
    return teacher, info


def _check_shape(teacher: Teacher, data: Dataset) -> None:
    expected = teacher.expected_input_shape
    if expected is not None:
        fits = len(expected) == len(data.input_shape) and all(
            e is None or e == d for e, d in zip(expected, data.input_shape, strict=False)
        )
        if not fits:
            expected_text = "×".join("?" if e is None else str(e) for e in expected)
            raise DataError(
                f"teacher {teacher.name} expects samples of shape {expected_text} but the data "
                f"{data.name} has {'×'.join(map(str, data.input_shape))}: use data that matches "
                "the teacher"
            )
    probe = data.val.x[:2]
    try:
        out = teacher.logits(probe)
    except (RuntimeError, ValueError) as exc:
        raise DataError(
            f"teacher {teacher.name} cannot run on samples of shape "
            f"{'×'.join(map(str, data.input_shape))} from {data.name}: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    except Exception as exc:  # ONNX Runtime raises its own error types on bad input shapes
        raise DataError(
            f"teacher {teacher.name} cannot run on samples of shape "
            f"{'×'.join(map(str, data.input_shape))} from {data.name}: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    if out.ndim != 2 or out.shape[0] != len(probe):
        raise DataError(
            f"teacher {teacher.name} returned shape {out.shape} for {len(probe)} samples; "
            "expected one row of class logits a sample"
        )


def _choose_input_scale(teacher: Teacher, data: Dataset, stated: float | None) -> None:
    if stated is not None:
        if not np.isfinite(stated) or stated <= 0:
            raise EdgeoptInputError(f"invalid --teacher-input-scale {stated}: use a number > 0")
        teacher.input.scale = float(stated)
        teacher.input.notes["scale"] = "stated"
        return
    if teacher.kind == "builtin" or data.raw_scale == 1.0:
        teacher.input.notes["scale"] = "default: the teacher takes the student's inputs as is"
        return
    sample = data.val.x[:512]
    labels = data.val.y[:512]
    accuracies, likelihoods = {}, {}
    for scale in (1.0, data.raw_scale):
        teacher.input.scale = scale
        logits = teacher.logits(sample).astype(np.float64)
        if logits.shape[1] <= int(labels.max()):
            teacher.input.scale = 1.0
            return  # _check_classes reports the class mismatch
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        accuracies[scale] = float(np.mean(logits.argmax(axis=1) == labels))
        likelihoods[scale] = float(log_probs[np.arange(len(labels)), labels].mean())
    raw = data.raw_scale
    if abs(accuracies[raw] - accuracies[1.0]) > SCALE_ACCURACY_MARGIN:
        best = max(accuracies, key=accuracies.__getitem__)
        reason = "clearly more accurate"
    else:
        # A ReLU network without normalisation often classifies equally well at both scales.
        # At one of them its logits are hundreds of times larger and its soft targets one-hot,
        # so the better log-likelihood marks the calibrated scale, the useful one for distilling.
        best = max(likelihoods, key=lambda s: (likelihoods[s], s == 1.0))
        reason = "equally accurate at both scales, better calibrated"
    teacher.input.scale = best
    teacher.input.notes["scale"] = (
        f"detected: {best:g} ({reason}; validation accuracy "
        + ", ".join(f"{100 * accuracies[k]:.1f}% at scale {k:g}" for k in accuracies)
        + "; mean true-class log-likelihood "
        + ", ".join(f"{likelihoods[k]:.2f} at scale {k:g}" for k in likelihoods)
        + "); state it with --teacher-input-scale"
    )


def _check_classes(teacher: Teacher, data: Dataset) -> None:
    outputs = teacher.logits(data.val.x[:1]).shape[1]
    largest = int(max(data.train.y.max(), data.val.y.max(), data.test.y.max()))
    if largest >= outputs:
        raise DataError(
            f"labels go up to {largest} but teacher {teacher.name} has {outputs} outputs: "
            "the data has classes the teacher does not know; use data whose labels are "
            f"0..{outputs - 1}"
        )
    if outputs > data.num_classes:
        data.class_names += [str(i) for i in range(data.num_classes, outputs)]
        logger.info("teacher has %d classes; the data uses %d of them", outputs, largest + 1)
