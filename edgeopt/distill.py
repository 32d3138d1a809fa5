"""Knowledge distillation and the training loop shared by students and built-in teachers.

The loss follows Hinton et al., "Distilling the Knowledge in a Neural Network" (2015,
arXiv:1503.02531): the KL divergence between temperature-softened teacher and student
distributions, multiplied by T² so that the soft term's gradients keep their size as T changes,
mixed with the cross-entropy on hard labels. Optional hint (feature) distillation follows
FitNets (Romero et al. 2015, arXiv:1412.6550): a learned 1×1 adapter maps a student feature map
to the teacher's channel count and an MSE term pulls them together.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeopt._logging import get_logger
from edgeopt._progress import progress_task
from edgeopt.errors import EdgeoptInputError, TrainingDivergedError

if TYPE_CHECKING:
    from edgeopt.data import Dataset
    from edgeopt.teachers import Teacher

logger = get_logger(__name__)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> torch.Tensor:
    """Return α·T²·KL(p_teacher ‖ p_student) + (1 − α)·CE(student, labels), averaged per sample.

    Args:
        student_logits: N × classes.
        teacher_logits: N × classes, treated as constants.
        labels: N class indices; None leaves only the soft term (α is then taken as 1).
        temperature: softmax temperature T > 0.
        alpha: weight of the soft term, in [0, 1].

    The KL term uses ``reduction="batchmean"`` (sum over classes, mean over samples), which is
    the mathematical KL divergence. ``"mean"`` would also divide by the number of classes.
    """
    if not 0 < temperature < float("inf"):
        raise EdgeoptInputError(f"invalid temperature {temperature}: use a finite value > 0")
    if not 0.0 <= alpha <= 1.0:
        raise EdgeoptInputError(f"invalid alpha {alpha}: use a value in [0, 1]")
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    soft = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    soft = soft * temperature**2
    if labels is None:
        return soft
    hard = F.cross_entropy(student_logits, labels)
    return alpha * soft + (1.0 - alpha) * hard


@dataclass
class TrainConfig:
    """Settings of one training run (distillation, or plain training without a teacher).

    Attributes:
        epochs: maximum passes over the training split.
        batch_size: samples a step.
        learning_rate: peak AdamW learning rate; a cosine schedule decays it to 0.
        weight_decay: AdamW weight decay.
        temperature: KD temperature T.
        alpha: weight of the soft (teacher) term; 1 − alpha weights the hard labels.
        hint_weight: weight of the FitNets hint term; 0 turns hints off.
        patience: epochs without a better validation accuracy before stopping early. Stopping
            is considered only in the second half of the epochs, once the one-cycle schedule
            has begun to lower the learning rate, because the last low-rate epochs are where
            validation accuracy usually still rises.
        augment: random ±1 pixel shifts of image inputs. Teacher outputs are then computed for
            every batch instead of once.
    """

    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    temperature: float = 4.0
    alpha: float = 0.9
    hint_weight: float = 0.0
    patience: int = 6
    augment: bool = False

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "learning_rate": 0 < self.learning_rate < float("inf"),
            "weight_decay": self.weight_decay >= 0,
            "temperature": 0 < self.temperature < float("inf"),
            "alpha": 0.0 <= self.alpha <= 1.0,
            "hint_weight": self.hint_weight >= 0,
            "patience": self.patience >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise EdgeoptInputError(
                    f"invalid training setting {name}={getattr(self, name)!r}: see "
                    "`edgeopt optimize --help` for the allowed range"
                )


@dataclass
class TrainResult:
    """Record of a training run: history and best epoch (the weights stay in the model)."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    epochs_run: int = 0
    seconds: float = 0.0
    teacher_calls: int = 0
    config: dict[str, Any] = field(default_factory=dict)


class _FeatureTap:
    """Forward hook that keeps the output of the last 4-D (N×C×H×W) module to run."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.output: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            self.output = output

    def remove(self) -> None:
        self.handle.remove()


def last_feature_module(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module | None:
    """Return the last leaf module whose output is a 4-D feature map, or None."""
    found: list[nn.Module] = []
    handles = []
    for module in model.modules():
        if len(list(module.children())) == 0:

            def hook(mod: nn.Module, _inputs: object, out: object) -> None:
                if isinstance(out, torch.Tensor) and out.dim() == 4:
                    found.append(mod)

            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return found[-1] if found else None


class HintAdapter(nn.Module):
    """A 1×1 conv from student channels to teacher channels, then pooling to the teacher size."""

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        self.project = nn.Conv2d(student_channels, teacher_channels, 1)

    def forward(self, feature: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        projected = self.project(feature)
        if projected.shape[-2:] != size:
            projected = F.adaptive_avg_pool2d(projected, size)
        return projected


def _shift_images(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift every image by a random −1..1 pixels in each direction, filling with zeros."""
    shifts = torch.randint(-1, 2, (2,), generator=generator).tolist()
    shifted = torch.roll(x, shifts=shifts, dims=(2, 3))
    if shifts[0] > 0:
        shifted[:, :, : shifts[0]] = 0
    elif shifts[0] < 0:
        shifted[:, :, shifts[0] :] = 0
    if shifts[1] > 0:
        shifted[:, :, :, : shifts[1]] = 0
    elif shifts[1] < 0:
        shifted[:, :, :, shifts[1] :] = 0
    return shifted


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> float:
    """Return the top-1 accuracy of `model` in eval mode; the caller's mode is restored."""
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                logits = model(torch.from_numpy(x[start : start + batch_size]))
                correct += int((logits.argmax(1).numpy() == y[start : start + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / max(len(y), 1)


def predict(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Return the logits of `model` in eval mode for `x`; the caller's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            parts = [
                model(torch.from_numpy(x[s : s + batch_size])).numpy()
                for s in range(0, len(x), batch_size)
            ]
    finally:
        model.train(was_training)
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def train(
    model: nn.Module,
    data: Dataset,
    *,
    teacher: Teacher | None,
    config: TrainConfig,
    seed: int = 0,
    label: str = "student",
) -> TrainResult:
    """Train `model` on `data`, distilling from `teacher` when one is given.

    Without a teacher the loss is plain cross-entropy. With one, it is `kd_loss`, plus the hint
    term when ``config.hint_weight > 0`` and the teacher is a PyTorch module with a feature map.
    The weights with the best validation accuracy are kept (early stopping). The run is
    deterministic for a seed on the same machine and library versions.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    x_train = torch.from_numpy(data.train.x)
    y_train = torch.from_numpy(data.train.y)
    is_image = data.kind == "image"
    augment = config.augment and is_image

    teacher_train: torch.Tensor | None = None
    teacher_calls = 0
    if teacher is not None and not augment:
        # Inputs never change between epochs, so every training sample is sent to the teacher once.
        teacher_train = torch.from_numpy(teacher.logits(data.train.x))
        teacher_calls += len(data.train)

    hint_parts = _setup_hints(model, teacher, data, config)
    parameters = list(model.parameters())
    if hint_parts is not None:
        parameters += list(hint_parts["adapter"].parameters())
    optimizer = torch.optim.AdamW(
        parameters, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    steps_per_epoch = int(np.ceil(len(data.train) / config.batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.learning_rate,
        total_steps=config.epochs * steps_per_epoch,
        pct_start=0.15,
    )
    result = TrainResult(config=asdict(config))
    best_state = copy.deepcopy(model.state_dict())
    stale = 0
    started = time.perf_counter()
    try:
        with progress_task(f"training {label}", config.epochs) as task:
            for epoch in range(1, config.epochs + 1):
                model.train()
                order = torch.from_numpy(rng.permutation(len(data.train)))
                total_loss = 0.0
                for start in range(0, len(order), config.batch_size):
                    index = order[start : start + config.batch_size]
                    xb, yb = x_train[index], y_train[index]
                    if augment:
                        xb = _shift_images(xb, generator)
                    student_logits = model(xb)
                    if teacher is None:
                        loss = F.cross_entropy(student_logits, yb)
                    else:
                        if teacher_train is not None:
                            tb = teacher_train[index]
                        else:
                            tb = torch.from_numpy(teacher.logits(xb.numpy()))
                            teacher_calls += len(index)
                        loss = kd_loss(student_logits, tb, yb, config.temperature, config.alpha)
                        if hint_parts is not None:
                            loss = loss + config.hint_weight * _hint_loss(hint_parts, teacher, xb)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    total_loss += float(loss.detach()) * len(index)
                train_loss = total_loss / len(data.train)
                if not np.isfinite(train_loss):
                    raise TrainingDivergedError(
                        f"{label} training diverged: the loss became {train_loss} in epoch "
                        f"{epoch} (learning rate {config.learning_rate}); lower --lr"
                    )
                val_accuracy = evaluate(model, data.val.x, data.val.y)
                result.history.append(
                    {"epoch": epoch, "train_loss": train_loss, "val_accuracy": val_accuracy}
                )
                logger.debug(
                    "%s epoch %d: loss %.4f, val accuracy %.4f",
                    label,
                    epoch,
                    train_loss,
                    val_accuracy,
                )
                task.advance(1, status=f"loss {train_loss:.3f} val {100 * val_accuracy:.1f}%")
                result.epochs_run = epoch
                if val_accuracy > result.best_val_accuracy or epoch == 1:
                    result.best_val_accuracy = val_accuracy
                    result.best_epoch = epoch
                    best_state = copy.deepcopy(model.state_dict())
                    stale = 0
                else:
                    stale += 1
                    if stale >= config.patience and epoch >= config.epochs // 2:
                        logger.info(
                            "%s: stopping early after epoch %d (best validation accuracy "
                            "%.2f%% at epoch %d)",
                            label,
                            epoch,
                            100 * result.best_val_accuracy,
                            result.best_epoch,
                        )
                        break
    finally:
        if hint_parts is not None:
            hint_parts["student_tap"].remove()
            hint_parts["teacher_tap"].remove()
    model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.perf_counter() - started
    result.teacher_calls = teacher_calls
    logger.info(
        "%s trained: validation accuracy %.2f%% (epoch %d of %d, %.1f s)",
        label,
        100 * result.best_val_accuracy,
        result.best_epoch,
        result.epochs_run,
        result.seconds,
    )
    return result


def _setup_hints(
    model: nn.Module, teacher: Teacher | None, data: Dataset, config: TrainConfig
) -> dict[str, Any] | None:
    if config.hint_weight <= 0 or teacher is None:
        return None
    teacher_module = teacher.module
    if teacher_module is None or data.kind != "image":
        logger.warning(
            "hint distillation needs a PyTorch teacher on image data; teacher %s is %s, so "
            "hints are off",
            teacher.name,
            teacher.kind,
        )
        return None
    student_layer = last_feature_module(model, data.input_shape)
    teacher_layer = last_feature_module(teacher_module, data.input_shape)
    if student_layer is None or teacher_layer is None:
        logger.warning("no 4-D feature map found in the student or teacher; hints are off")
        return None
    student_tap = _FeatureTap(student_layer)
    teacher_tap = _FeatureTap(teacher_layer)
    probe = torch.from_numpy(data.train.x[:1])
    with torch.no_grad():
        was_training = model.training
        model.eval()
        model(probe)
        model.train(was_training)
        teacher_module(probe * teacher.input.scale)
    assert student_tap.output is not None and teacher_tap.output is not None
    adapter = HintAdapter(student_tap.output.shape[1], teacher_tap.output.shape[1])
    logger.info(
        "hint distillation: student feature %s → teacher feature %s",
        tuple(student_tap.output.shape[1:]),
        tuple(teacher_tap.output.shape[1:]),
    )
    return {"adapter": adapter, "student_tap": student_tap, "teacher_tap": teacher_tap}


def _hint_loss(parts: dict[str, Any], teacher: Teacher, xb: torch.Tensor) -> torch.Tensor:
    teacher_module = teacher.module
    assert teacher_module is not None
    with torch.no_grad():
        teacher_module(xb * teacher.input.scale)
    target = parts["teacher_tap"].output
    feature = parts["student_tap"].output
    projected = parts["adapter"](feature, tuple(target.shape[-2:]))
    return F.mse_loss(projected, target)
