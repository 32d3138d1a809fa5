"""The run report: `report.json` for programs and `report.html` with plots for people."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import edgeopt

if TYPE_CHECKING:
    from edgeopt.pipeline import RunState

REPORT_SCHEMA_VERSION = 1
PACKAGES = (
    "torch",
    "numpy",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "litert-torch",
    "ai-edge-litert",
    "scikit-learn",
    "optuna",
    "botorch",
    "flwr",
    "tensorflow-cpu",
)


def environment() -> dict[str, Any]:
    """Return the Python, platform and package versions of this process."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "edgeopt": edgeopt.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "packages": versions,
    }


def build_report(state: RunState, seconds: float) -> dict[str, Any]:
    """Return the report of a finished run as plain JSON types."""
    measured = state.results["measure"]
    distill = state.results["distill"]
    teacher_info = state.results["teacher"]
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": state.config.to_dict(),
        "data": state.results["data"],
        "teacher": {
            **measured["teacher"],
            "input": teacher_info.get("input"),
            "training": {
                "history": teacher_info.get("history"),
                "val_accuracy": teacher_info.get("val_accuracy"),
            }
            if teacher_info.get("history")
            else None,
        },
        "student": {
            **measured["student"],
            "training": {
                "history": distill.history,
                "best_epoch": distill.best_epoch,
                "epochs_run": distill.epochs_run,
                "val_accuracy": distill.best_val_accuracy,
                "teacher_calls": distill.teacher_calls,
                "settings": distill.config,
            },
        },
        "exports": state.results["verify"],
        "targets": measured["targets"],
        "primary_target": state.config.target,
        "stages": state.timings,
        "seconds": round(seconds, 3),
        "environment": environment(),
    }


def write_report(report: dict[str, Any], state: RunState, folder: Path) -> None:
    """Write `report.json` and `report.html` into `folder`."""
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=_json_default))
    (folder / "report.html").write_text(render_html(report), encoding="utf-8")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# --- HTML ---------------------------------------------------------------------------------


def _figure_to_base64(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _latency(entry: dict[str, Any], target: str) -> float | None:
    value = (entry.get("latency_ms") or {}).get(target)
    if isinstance(value, dict) and "median" in value:
        return float(value["median"])
    return None


def _tradeoff_plot(report: dict[str, Any], target: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for label, entry in (("teacher", report["teacher"]), ("student (PyTorch)", report["student"])):
        latency = _latency(entry, target)
        if latency is not None and entry.get("accuracy") is not None:
            points.append((label, latency, entry["accuracy"]))
    for entry in report["exports"]:
        latency = _latency(entry, target)
        if latency is not None and entry.get("accuracy") is not None:
            points.append((entry["path"], latency, entry["accuracy"]))
    if not points:
        return None
    # Exports that match the PyTorch student land on one spot: label them together.
    grouped: dict[tuple[float, float], list[str]] = {}
    for label, latency, accuracy in points:
        grouped.setdefault((round(latency, 6), round(accuracy, 6)), []).append(label)
    figure, axes = plt.subplots(figsize=(6.5, 4))
    for (latency, accuracy), labels in grouped.items():
        axes.scatter(latency, 100 * accuracy, s=50)
        axes.annotate(
            "\n".join(labels),
            (latency, 100 * accuracy),
            textcoords="offset points",
            xytext=(6, -4),
            fontsize=8,
        )
    axes.set_xscale("log")
    axes.set_xlabel(f"median latency on {target} (ms, log scale)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("Accuracy vs latency")
    axes.grid(True, alpha=0.3)
    encoded = _figure_to_base64(figure)
    plt.close(figure)
    return encoded


def _training_plot(report: dict[str, Any]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = []
    teacher_training = report["teacher"].get("training") or {}
    if teacher_training.get("history"):
        curves.append(("teacher (cross-entropy)", teacher_training["history"]))
    if report["student"]["training"]["history"]:
        curves.append(("student (distillation loss)", report["student"]["training"]["history"]))
    if not curves:
        return None
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 3.5))
    for label, history in curves:
        epochs = [row["epoch"] for row in history]
        loss_axes.plot(epochs, [row["train_loss"] for row in history], marker=".", label=label)
        accuracy_axes.plot(
            epochs, [100 * row["val_accuracy"] for row in history], marker=".", label=label
        )
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("training loss")
    accuracy_axes.set_xlabel("epoch")
    accuracy_axes.set_ylabel("validation accuracy (%)")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(True, alpha=0.3)
        axes.legend()
    encoded = _figure_to_base64(figure)
    plt.close(figure)
    return encoded


def _format(value: Any, kind: str = "") -> str:
    if value is None:
        return "–"
    if kind == "pct":
        return f"{100 * value:.2f}%"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "ms":
        return f"{value:.3f}"
    if kind == "diff":
        return f"{value:.2e}"
    return html.escape(str(value))


def render_html(report: dict[str, Any]) -> str:
    """Return a self-contained HTML page (plots inlined as PNG) describing the run."""
    targets = [t["name"] for t in report["targets"]]
    primary = report["primary_target"]
    head_cells = "".join(f"<th>{html.escape(t)} median / p90 (ms)</th>" for t in targets)

    def latency_cells(entry: dict[str, Any]) -> str:
        cells = []
        for target in targets:
            value = (entry.get("latency_ms") or {}).get(target)
            if isinstance(value, dict) and "median" in value:
                mark = " (estimate)" if value.get("estimate") else ""
                cells.append(f"<td>{value['median']:.3f} / {value['p90']:.3f}{mark}</td>")
            elif isinstance(value, dict) and "error" in value:
                cells.append(f"<td title='{html.escape(value['error'])}'>failed</td>")
            else:
                cells.append("<td>–</td>")
        return "".join(cells)

    model_rows = []
    for label, entry in (("teacher", report["teacher"]), ("student", report["student"])):
        model_rows.append(
            f"<tr><td>{label}</td><td>{_format(entry.get('accuracy'), 'pct')}</td>"
            f"<td>{_format(entry.get('params'), 'int')}</td>"
            f"<td>{_format(entry.get('macs'), 'int')}</td>"
            f"<td>{_format(entry.get('size_bytes'), 'int')}</td>{latency_cells(entry)}</tr>"
        )
    export_rows = []
    for entry in report["exports"]:
        if "error" in entry:
            export_rows.append(
                f"<tr><td>{html.escape(entry['path'])}</td><td colspan='6'>export failed: "
                f"{html.escape(entry['error'])}</td></tr>"
            )
            continue
        export_rows.append(
            f"<tr><td>{html.escape(entry['path'])}</td><td>{entry['precision']}</td>"
            f"<td>{_format(entry.get('size_bytes'), 'int')}</td>"
            f"<td>{_format(entry.get('max_abs_diff'), 'diff')}</td>"
            f"<td>{_format(entry.get('top1_agreement'), 'pct')}</td>"
            f"<td>{_format(entry.get('accuracy'), 'pct')}</td>{latency_cells(entry)}</tr>"
        )
    stage_rows = "".join(
        f"<tr><td>{html.escape(s['name'])}</td><td>{s['seconds']:.1f}</td></tr>"
        for s in report["stages"]
    )
    plots = []
    tradeoff = _tradeoff_plot(report, primary)
    if tradeoff:
        plots.append(f"<img alt='accuracy vs latency' src='data:image/png;base64,{tradeoff}'>")
    training = _training_plot(report)
    if training:
        plots.append(f"<img alt='training curves' src='data:image/png;base64,{training}'>")
    teacher_input = report["teacher"].get("input") or {}
    notes = "".join(
        f"<li>teacher input {html.escape(k)}: {html.escape(v)}</li>"
        for k, v in (teacher_input.get("notes") or {}).items()
    )
    data = report["data"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgeopt run report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
img {{ max-width: 100%; display: block; margin: 1em 0; }}
</style></head><body>
<h1>edgeopt run report</h1>
<p>Data <code>{html.escape(data["name"])}</code>: {data["samples"]["train"]} training,
{data["samples"]["val"]} validation and {data["samples"]["test"]} test samples of shape
{html.escape(str(tuple(data["input_shape"])))}, {data["num_classes"]} classes. Teacher
<code>{html.escape(str(report["teacher"].get("name")))}</code>; student
<code>{html.escape(json.dumps(report["student"]["architecture"]))}</code>.
Primary target <code>{html.escape(primary)}</code>. Accuracies are on the test split.</p>
<ul>{notes}</ul>
<h2>Teacher and student</h2>
<table><tr><th>model</th><th>accuracy</th><th>parameters</th><th>MACs</th><th>size (bytes)</th>
{head_cells}</tr>{"".join(model_rows)}</table>
<h2>Exports (verified against the PyTorch student)</h2>
<table><tr><th>file</th><th>precision</th><th>size (bytes)</th><th>max abs diff</th>
<th>top-1 agreement</th><th>accuracy</th>{head_cells}</tr>{"".join(export_rows)}</table>
<h2>Plots</h2>{"".join(plots) or "<p>No plot: nothing was measured.</p>"}
<h2>Stages</h2><table><tr><th>stage</th><th>seconds</th></tr>{stage_rows}</table>
<p>edgeopt {html.escape(report["environment"]["edgeopt"])}, Python
{html.escape(report["environment"]["python"])}, {html.escape(report["environment"]["platform"])}.
Latencies are medians of repeated single-sample runs after warm-up.</p>
</body></html>
"""
