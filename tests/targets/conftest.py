"""Small student models exported once per test session for the target tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgeopt.students import StudentConfig, build_student

INPUT_SHAPE = (1, 8, 8)
CONFIG = StudentConfig(family="inverted_residual", width=8, stages=2, depth=1, head_width=0)


def _student() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_student(CONFIG, INPUT_SHAPE, 10).eval()


@pytest.fixture(scope="session")
def student() -> torch.nn.Module:
    return _student()


@pytest.fixture(scope="session")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "student.onnx"
    example = torch.zeros(1, *INPUT_SHAPE)
    torch.onnx.export(_student(), (example,), str(path), dynamo=True, verbose=False)
    return path


@pytest.fixture(scope="session")
def tflite_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import litert_torch

    path = tmp_path_factory.mktemp("tflite") / "student.tflite"
    example = torch.zeros(1, *INPUT_SHAPE)
    litert_torch.convert(_student(), (example,)).export(str(path))
    return path
