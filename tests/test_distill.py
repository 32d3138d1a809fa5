"""Distillation loss and training loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgeopt.data import load_data
from edgeopt.distill import TrainConfig, evaluate, kd_loss, train
from edgeopt.errors import EdgeoptInputError
from edgeopt.students import StudentConfig, build_student


def reference_kd_loss(student, teacher, labels, temperature, alpha):
    """KD loss written out in NumPy: α·T²·mean_i KL(p_t,i ‖ p_s,i) + (1 − α)·CE."""
    s = student.astype(np.float64)
    t = teacher.astype(np.float64)

    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    log_ps = log_softmax(s / temperature)
    log_pt = log_softmax(t / temperature)
    kl_per_sample = (np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1)
    soft = temperature**2 * kl_per_sample.mean()
    hard = -log_softmax(s)[np.arange(len(labels)), labels].mean()
    return alpha * soft + (1 - alpha) * hard


@pytest.mark.parametrize("temperature", [2.0, 4.0, 8.0, 16.0])
def test_kd_loss_matches_reference_formula(temperature):
    # Case C18: KD loss scale (T² factor, batchmean reduction).
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(8, 10, generator=generator, dtype=torch.float64)
    teacher = torch.randn(8, 10, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 10, (8,), generator=generator)
    loss = kd_loss(student, teacher, labels, temperature=temperature, alpha=0.5)
    expected = reference_kd_loss(
        student.numpy(), teacher.numpy(), labels.numpy(), temperature, 0.5
    )
    assert abs(float(loss) - expected) <= 1e-6


def test_kd_soft_gradient_norm_stable_across_temperature():
    # Case C18: with the T² factor, soft-term gradients keep their size from T = 2 to 16.
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(8, 10, generator=generator)
    teacher = torch.randn(8, 10, generator=generator)
    norms = []
    for temperature in (2.0, 4.0, 8.0, 16.0):
        logits = student.clone().requires_grad_(True)
        kd_loss(logits, teacher, None, temperature=temperature).backward()
        norms.append(float(logits.grad.norm()))
    spread = (max(norms) - min(norms)) / max(norms)
    assert spread <= 0.15, f"soft-term gradient norms {norms} vary by {spread:.0%}"


def test_kd_loss_is_not_elementwise_mean():
    student = torch.tensor([[2.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.0, 1.0, 0.5]])
    loss = kd_loss(student, teacher, None, temperature=1.0)
    summed = F.kl_div(
        F.log_softmax(student, 1), F.log_softmax(teacher, 1), reduction="sum", log_target=True
    )
    # One sample of three classes: batchmean is the sum, while "mean" would be a third of it.
    assert float(loss) == pytest.approx(float(summed), rel=1e-6)


@pytest.mark.parametrize(("temperature", "alpha"), [(0.0, 0.5), (-1.0, 0.5), (2.0, 1.5)])
def test_kd_loss_rejects_invalid_settings(temperature, alpha):
    with pytest.raises(EdgeoptInputError):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), None, temperature, alpha)


def test_train_config_rejects_zero_epochs():
    with pytest.raises(EdgeoptInputError, match="epochs=0"):
        TrainConfig(epochs=0)


class _LogitTeacher:
    """Teacher stand-in that returns fixed logits for every training sample, by row order."""

    kind = "test"
    name = "fixed"
    module = None

    def __init__(self, logits_by_input):
        self.logits_by_input = logits_by_input
        self.calls = 0

    def logits(self, x):
        self.calls += len(x)
        return self.logits_by_input(x)


def test_training_is_deterministic_for_a_seed():
    data = load_data("digits", limit=400)
    config = TrainConfig(epochs=3, batch_size=64)
    accuracies = []
    weights = []
    for _ in range(2):
        torch.manual_seed(3)
        model = build_student(StudentConfig(width=4, stages=1), data.input_shape, 10)
        result = train(model, data, teacher=None, config=config, seed=3)
        accuracies.append(result.history[-1]["val_accuracy"])
        weights.append(model.classifier.weight.detach().clone())
    assert accuracies[0] == accuracies[1]
    assert torch.equal(weights[0], weights[1])


def test_teacher_outputs_are_computed_once_without_augmentation():
    data = load_data("digits", limit=300)
    teacher = _LogitTeacher(lambda x: np.zeros((len(x), 10), np.float32))
    model = build_student(StudentConfig(width=4, stages=1), data.input_shape, 10)
    result = train(model, data, teacher=teacher, config=TrainConfig(epochs=3), seed=0)
    assert teacher.calls == len(data.train)
    assert result.teacher_calls == len(data.train)


def test_distillation_follows_a_teacher_that_contradicts_labels():
    # With alpha = 1 the student learns only from the teacher, here one that predicts
    # (label + 1) mod 10. The validation labels are shifted the same way so that early stopping
    # keeps the epoch that follows the teacher best.
    data = load_data("digits", limit=600)
    data.val.y = (data.val.y + 1) % 10
    label_of = {x.tobytes(): y for x, y in zip(data.train.x, data.train.y, strict=True)}

    def shifted(x):
        logits = np.full((len(x), 10), -5.0, np.float32)
        for row, sample in enumerate(x):
            logits[row, (label_of[sample.tobytes()] + 1) % 10] = 5.0
        return logits

    torch.manual_seed(0)
    model = build_student(StudentConfig(width=16, stages=2), data.input_shape, 10)
    config = TrainConfig(epochs=20, alpha=1.0, temperature=1.0, patience=20)
    train(model, data, teacher=_LogitTeacher(shifted), config=config, seed=0)
    shifted_labels = (data.train.y + 1) % 10
    assert evaluate(model, data.train.x, shifted_labels) > 0.7
    assert evaluate(model, data.train.x, data.train.y) < 0.2


def test_hint_distillation_changes_training():
    from edgeopt.distill import _setup_hints
    from edgeopt.teachers import CNNTeacher, TorchTeacher

    data = load_data("digits", limit=300)
    torch.manual_seed(0)
    teacher = TorchTeacher("cnn", CNNTeacher(1, 10, 8, 8), "builtin")
    student = build_student(StudentConfig(width=8, stages=1), data.input_shape, 10)
    parts = _setup_hints(student, teacher, data, TrainConfig(hint_weight=1.0))
    try:
        # The student's last feature map is 16×4×4 (ReLU6 after one stride-2 stage) and the
        # teacher's is 128×2×2, so the adapter maps 16 channels to 128.
        assert parts["adapter"].project.in_channels == 16
        assert parts["adapter"].project.out_channels == 128
    finally:
        parts["student_tap"].remove()
        parts["teacher_tap"].remove()

    weights = {}
    for hint_weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = build_student(StudentConfig(width=8, stages=1), data.input_shape, 10)
        train(model, data, teacher=teacher, config=TrainConfig(epochs=2, hint_weight=hint_weight))
        weights[hint_weight] = model.stem[0].weight.detach().clone()
    assert not torch.equal(weights[0.0], weights[1.0])


def test_nan_loss_stops_training_with_advice():
    from edgeopt.errors import TrainingDivergedError

    data = load_data("digits", limit=200)
    model = build_student(StudentConfig(width=4, stages=1), data.input_shape, 10)
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDivergedError, match=r"loss became nan in epoch 1 .* lower --lr"):
        train(model, data, teacher=None, config=TrainConfig(epochs=2), seed=0)
