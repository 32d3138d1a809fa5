"""Compare edgeopt's ONNX int8 quantization with ONNX Runtime's defaults and olive-ai's.

Each method quantizes the same fp32 ONNX model with the same calibration images. Every result
is measured on the same held-out MNIST test images: accuracy, top-1 agreement with fp32, file
size and median batch-1 latency in ONNX Runtime (one thread). Two models are used: the
pretrained ONNX Model Zoo MNIST CNN (`../shared/models/mnist_cnn_onnx/mnist.onnx`, raw 0-255
input, opset 7) and a small student-like CNN trained here on MNIST test images 0-4999.

olive-ai is optional. Pass `--olive-python` pointing to the Python of a separate virtual
environment, and its static quantization pass runs in a subprocess. Such an environment was made
with `python3 -m venv /tmp/olive && /tmp/olive/bin/pip install torch==2.13.0 olive-ai
onnxruntime requests`, because olive-ai 0.13.0 imports `requests` without depending on it.

Results go into the `## int8 quantization vs peers` section of docs/benchmarks.md (only that
section is replaced).

Usage:
    .venv/bin/python benchmarks/int8_vs_peers.py [--olive-python /tmp/olive/bin/python]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from _doc import replace_section
from torch import nn

from edgeopt.converters import export_onnx, open_runtime, quantize_onnx
from edgeopt.converters.conversion import measure_latency
from edgeopt.data import read_idx

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SECTION = "## int8 quantization vs peers"
TRAIN = slice(0, 5000)
CALIBRATION = slice(5000, 5300)
EVALUATION = slice(6000, 10000)


def normalise(images: np.ndarray) -> np.ndarray:
    return ((images / 255.0 - 0.1307) / 0.3081).astype(np.float32)


def student_cnn() -> nn.Module:
    """Conv/BN/ReLU6/depthwise CNN with a linear head, 111k parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU6(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU6(),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU6(), nn.Linear(64, 10),
    )  # fmt: skip


def train_student(images: np.ndarray, labels: np.ndarray) -> nn.Module:
    torch.manual_seed(0)
    x, y = torch.from_numpy(normalise(images[TRAIN])), torch.from_numpy(labels[TRAIN])
    model = student_cnn()
    epochs, batch = 2, 128
    optimiser = torch.optim.Adam(model.parameters(), lr=4e-3)
    steps = epochs * -(-len(x) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=4e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), batch):
            index = order[start : start + batch]
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            optimiser.step()
            schedule.step()
    return model.eval()


class _Reader:
    """CalibrationDataReader feeding `batch` samples at a time."""

    def __init__(self, name: str, data: np.ndarray, batch: int) -> None:
        self._batches = iter([{name: data[i : i + batch]} for i in range(0, len(data), batch)])

    def get_next(self):
        return next(self._batches, None)


def quantize_ort_defaults(src: Path, dst: Path, calibration: np.ndarray) -> None:
    """ONNX Runtime's quantize_static with every option left at its default."""
    from onnxruntime.quantization import quantize_static

    runtime = open_runtime(src)
    reader = _Reader(runtime.input_names[0], calibration, runtime.fixed_batch or 32)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(str(src), str(dst), reader)


def quantize_olive(python: Path, src: Path, dst: Path, calibration: np.ndarray, work: Path) -> str:
    """Run olive-ai's OnnxStaticQuantization pass (its defaults) in another environment."""
    runtime = open_runtime(src)
    name = runtime.input_names[0]
    batch = runtime.fixed_batch or 1
    data_dir = work / "olive_data"
    (data_dir / name).mkdir(parents=True, exist_ok=True)
    for index in range(0, len(calibration), batch):
        calibration[index : index + batch].astype(np.float32).tofile(
            data_dir / name / f"{index:05d}.bin"
        )
    shape = [batch, *calibration.shape[1:]]

    config = {
        "input_model": {"type": "ONNXModel", "model_path": str(src)},
        "systems": {
            "local": {
                "type": "LocalSystem",
                "accelerators": [
                    {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}
                ],
            }
        },
        "data_configs": [
            {
                "name": "calibration",
                "type": "DataContainer",
                "load_dataset_config": {
                    "type": "raw_dataset",
                    "data_dir": str(data_dir),
                    "input_names": [name],
                    "input_shapes": [shape],
                },
                "dataloader_config": {"batch_size": None},
            }
        ],
        "passes": {
            "quantization": {"type": "OnnxStaticQuantization", "data_config": "calibration"}
        },
        "host": "local",
        "target": "local",
        "output_dir": str(work / "olive_out"),
        "log_severity_level": 3,
    }

    config_path = work / "olive.json"
    config_path.write_text(json.dumps(config, indent=2))
    process = subprocess.run(
        [str(python), "-m", "olive", "run", "--config", str(config_path)],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip

    outputs = sorted((work / "olive_out").rglob("*.onnx"))
    if process.returncode != 0 or not outputs:
        tail = (process.stderr or process.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(
            f"olive run wrote no model (exit code {process.returncode}); its last log line: "
            f"{tail[0][:200]}"
        )
    dst.write_bytes(outputs[-1].read_bytes())

    version = subprocess.run(
        [str(python), "-c", "import olive; print(olive.__version__)"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return version.stdout.strip()


def evaluate(path: Path, data: np.ndarray, labels: np.ndarray, fp32_top1: np.ndarray) -> dict:
    runtime = open_runtime(path)
    logits = runtime.run(data)[runtime.output_names[0]]
    top1 = logits.argmax(axis=1)
    return {
        "accuracy": float(np.mean(top1 == labels)),
        "agreement": float(np.mean(top1 == fp32_top1)),
        "size": path.stat().st_size,
    }


def interleaved_latency(paths: list[Path], sample: np.ndarray, rounds: int = 7) -> list[float]:
    """Median batch-1 latency (ms) of each file, timed in alternating rounds.

    Other load on the machine then affects every file alike instead of whichever ran last.
    """
    runtimes = [open_runtime(path) for path in paths]
    per_round: list[list[float]] = [[] for _ in paths]
    for _ in range(rounds):
        for index, runtime in enumerate(runtimes):
            per_round[index].append(measure_latency(runtime, sample, warmup=10, runs=50))
    return [float(np.median(values)) for values in per_round]


def benchmark_model(
    name: str, fp32: Path, calibration: np.ndarray, data: np.ndarray, labels: np.ndarray,
    olive_python: Path | None, work: Path,
) -> tuple[list[dict], list[str]]:  # fmt: skip
    reference = open_runtime(fp32)
    fp32_top1 = reference.run(data)[reference.output_names[0]].argmax(axis=1)
    rows = [{"method": "fp32 (reference)", **evaluate(fp32, data, labels, fp32_top1)}]
    paths = [fp32]
    notes = []
    methods = {
        "edgeopt `quantize_onnx` (auto)": lambda dst: quantize_onnx(fp32, dst, calibration),
        "ONNX Runtime `quantize_static` defaults": lambda dst: quantize_ort_defaults(
            fp32, dst, calibration
        ),
    }
    if olive_python is not None:
        methods["olive-ai `OnnxStaticQuantization` defaults"] = lambda dst: quantize_olive(
            olive_python, fp32, dst, calibration, work / f"olive_{name}"
        )
    for label, run in methods.items():
        dst = work / f"{name}_{len(rows)}.onnx"
        try:
            result = run(dst)
        except Exception as exc:
            notes.append(f"{label} on {name}: failed: {str(exc).splitlines()[0][:200]}")
            continue
        row = {"method": label, **evaluate(dst, data, labels, fp32_top1)}
        paths.append(dst)
        if hasattr(result, "method"):
            row["method"] += f", chose {result.method}"
        if isinstance(result, str) and result:
            row["method"] += f" ({result})"
        rows.append(row)
    for row, latency in zip(rows, interleaved_latency(paths, data[:1]), strict=True):
        row["latency_ms"] = latency
    return rows, notes


def to_markdown(results: dict, notes: list[str], command: str) -> str:
    lines = [
        SECTION,
        "",
        f"Reproduce with `{command}` (run from the repository root).",
        "",
        f"Measured on {platform.machine()} with {torch.get_num_threads()} CPU threads available, "
        f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}. Latency: batch 1, "
        "one intra-op thread, the median over 7 rounds of each file's median of 50 runs, the "
        "files of a model timed in alternation within each round. Calibration: MNIST test "
        "images 5000-5299; evaluation: images 6000-9999 (4,000). The student CNN was trained on "
        "images 0-4999. Other processes shared the two cores during the runs; before the "
        "timing was interleaved, two runs of this script gave latencies up to 2× apart, so read "
        "latency ratios as rough.",
        "",
    ]
    for model, rows in results.items():
        fp32 = rows[0]
        lines += [
            f"### {model}",
            "",
            "| method | accuracy | top-1 agreement | size (bytes) | fp32/int8 size | latency (ms) "
            "| fp32/int8 latency |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            lines.append(
                f"| {row['method']} | {100 * row['accuracy']:.2f}% | "
                f"{100 * row['agreement']:.2f}% | {row['size']:,} | "
                f"{fp32['size'] / row['size']:.2f}× | {row['latency_ms']:.4f} | "
                f"{fp32['latency_ms'] / row['latency_ms']:.2f}× |"
            )
        lines.append("")
    if notes:
        lines += ["Notes:", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--olive-python", type=Path, help="Python of a venv with olive-ai.")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    mnist_dir = SHARED / "datasets" / "mnist"
    mnist_onnx = SHARED / "models" / "mnist_cnn_onnx" / "mnist.onnx"
    if not mnist_dir.is_dir() or not mnist_onnx.is_file():
        print(f"{SHARED} not found: the shared MNIST data and model are needed", file=sys.stderr)
        return 2
    images = read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz").astype(np.float32)[:, None]
    labels = read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    olive_python = args.olive_python if args.olive_python and args.olive_python.exists() else None
    notes = []
    if olive_python is None:
        notes.append("olive-ai: skipped (no --olive-python given or the path does not exist)")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows, model_notes = benchmark_model(
            "mnist.onnx", mnist_onnx, images[CALIBRATION], images[EVALUATION],
            labels[EVALUATION], olive_python, work,
        )  # fmt: skip
        results["ONNX Model Zoo mnist.onnx (5,998 parameters, opset 7, batch 1)"] = rows
        notes += model_notes
        student = train_student(images, labels)
        student_path = export_onnx(
            student, torch.from_numpy(normalise(images[:1])), work / "student.onnx"
        ).path
        rows, model_notes = benchmark_model(
            "student", student_path, normalise(images[CALIBRATION]),
            normalise(images[EVALUATION]), labels[EVALUATION], olive_python, work,
        )  # fmt: skip
        params = sum(p.numel() for p in student.parameters())
        results[f"student CNN ({params:,} parameters, opset 18, dynamic batch)"] = rows
        notes += model_notes

    command = "python benchmarks/int8_vs_peers.py"
    if olive_python is not None:
        command += f" --olive-python {olive_python}"
    section = to_markdown(results, notes, command)
    replace_section(SECTION, section.rstrip("\n") + "\n", args.docs)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
