"""Distill a pretrained ONNX model (fixed batch of 1, raw 0–255 pixels) into a student.

The teacher is the ONNX Model Zoo MNIST CNN kept in ../shared/models, and the data is the real
MNIST test set in ../shared/datasets, split into training, validation and test parts. edgeopt
reads the teacher's batch size from the file and detects that it expects raw pixels.

Run from the repository root:

    .venv/bin/python examples/pretrained_onnx_teacher.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import edgeopt

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    teacher = SHARED / "models" / "mnist_cnn_onnx" / "mnist.onnx"
    data = SHARED / "datasets" / "mnist"
    if not teacher.is_file() or not data.is_dir():
        sys.exit(f"{SHARED} with the MNIST model and data was not found beside the repository")
    result = edgeopt.optimize(
        teacher=str(teacher),
        data=f"mnist:{data}",
        out="runs/mnist_onnx_teacher",
        overwrite=True,
        # The zoo model is already small (786,560 MACs), so the student gets half of that.
        mac_ratio=0.5,
    )
    report = result.report
    print(f"teacher input: {report['teacher']['input']['notes']}")
    for side in ("teacher", "student"):
        entry = report[side]
        print(f"{side}: test accuracy {100 * entry['accuracy']:.2f}%, {entry['macs']:,} MACs")
    print(f"report: {result.run_dir / 'report.html'}")


if __name__ == "__main__":
    main()
