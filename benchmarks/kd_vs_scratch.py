"""Distillation against training from scratch: the same student, the same epochs, 3 seeds.

For each seed the student is trained twice from the same initial weights: once on the hard
labels alone, once distilled from the teacher. The report gives both test accuracies and the
share of the teacher-student accuracy gap that distillation closes,
(acc_kd - acc_scratch) / (acc_teacher - acc_scratch).

Writes the section "## Distillation vs training from scratch" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from _doc import replace_section

from edgeopt.data import load_data
from edgeopt.distill import TrainConfig, evaluate, train
from edgeopt.metrics import count_macs
from edgeopt.students import build_student, size_student
from edgeopt.teachers import load_teacher

HEADING = "## Distillation vs training from scratch"
SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"


def run(data_spec: str, seeds: list[int], epochs: int, mac_ratio: float) -> dict:
    data = load_data(data_spec, seed=0)
    teacher, _ = load_teacher(
        "cnn", data, seed=0, train_config=TrainConfig(epochs=15, patience=4, learning_rate=2e-3)
    )
    teacher_accuracy = evaluate(teacher.module, data.test.x, data.test.y)
    teacher_macs = count_macs(teacher.module, data.input_shape)
    config = size_student(
        "inverted_residual", data.input_shape, data.num_classes, mac_ratio * teacher_macs
    )
    rows = []
    for seed in seeds:
        torch.manual_seed(seed)
        initial = build_student(config, data.input_shape, data.num_classes)
        results = {}
        for mode in ("scratch", "kd"):
            student = copy.deepcopy(initial)
            # patience = epochs: both runs see every epoch, so they get equal training.
            settings = TrainConfig(epochs=epochs, patience=epochs)
            started = time.perf_counter()
            train(
                student,
                data,
                teacher=teacher if mode == "kd" else None,
                config=settings,
                seed=seed,
                label=f"{mode} seed {seed}",
            )
            results[mode] = evaluate(student, data.test.x, data.test.y)
            results[f"{mode}_seconds"] = time.perf_counter() - started
        gap = teacher_accuracy - results["scratch"]
        results["gap_closed"] = (results["kd"] - results["scratch"]) / gap if gap > 0 else None
        rows.append({"seed": seed, **results})
        print(json.dumps(rows[-1]), flush=True)
    return {
        "data": data_spec,
        "samples": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "teacher_accuracy": teacher_accuracy,
        "teacher_macs": teacher_macs,
        "student": config.to_dict(),
        "student_macs": count_macs(build_student(config, data.input_shape, 10), data.input_shape),
        "epochs": epochs,
        "rows": rows,
    }


def _relative_spec(spec: str) -> str:
    """Return `spec` with a path under the repository's parent folder written relative to it."""
    parent = str(Path(__file__).resolve().parents[2])
    return spec.replace(parent, "..", 1)


def render(result: dict, command: str) -> str:
    rows = result["rows"]
    mean_scratch = statistics.mean(r["scratch"] for r in rows)
    mean_kd = statistics.mean(r["kd"] for r in rows)
    closed = [r["gap_closed"] for r in rows if r["gap_closed"] is not None]
    lines = [
        HEADING,
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}. Reproduce with:",
        "",
        "```",
        command,
        "```",
        "",
        f"- Data `{_relative_spec(result['data'])}`: {result['samples']['train']} training, "
        f"{result['samples']['val']} validation, {result['samples']['test']} test samples "
        "(the MNIST test set split three ways; the MNIST training images are not available here).",
        f"- Teacher: built-in CNN, {result['teacher_macs']:,} MACs, test accuracy "
        f"{100 * result['teacher_accuracy']:.2f}%.",
        f"- Student: `{json.dumps(result['student'])}`, {result['student_macs']:,} MACs; "
        f"{result['epochs']} epochs each run, the same initial weights with and without the "
        "teacher (T = 4, α = 0.9).",
        "",
        "| seed | from scratch | distilled | share of the gap closed |",
        "|---|---|---|---|",
    ]
    for r in rows:
        share = "–" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.0f}%"
        lines.append(
            f"| {r['seed']} | {100 * r['scratch']:.2f}% | {100 * r['kd']:.2f}% | {share} |"
        )
    mean_share = f"{100 * statistics.mean(closed):.0f}%" if closed else "–"
    lines.append(f"| mean | {100 * mean_scratch:.2f}% | {100 * mean_kd:.2f}% | {mean_share} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = f"mnist:{SHARED_MNIST}" if SHARED_MNIST.is_dir() else "digits"
    parser.add_argument("--data", default=default_data)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--mac-ratio", type=float, default=0.08)
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args()
    result = run(args.data, args.seeds, args.epochs, args.mac_ratio)
    data_arg = "" if args.data == default_data else f" --data {args.data}"
    command = f".venv/bin/python benchmarks/kd_vs_scratch.py{data_arg} --epochs {args.epochs}"
    text = render(result, command)
    print(text)
    if not args.no_doc:
        replace_section(HEADING, text)


if __name__ == "__main__":
    main()
