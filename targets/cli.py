"""Click commands of the targets: `edgeopt targets list|calibrate` and `edgeopt profile`.

The main `edgeopt` CLI attaches `targets_group` and `profile_command`. Library errors
(EdgeoptInputError and subclasses) propagate for the main CLI to print on one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from edgeopt.errors import ModelLoadError
from edgeopt.targets._modelinfo import inspect_model
from edgeopt.targets._registry import get_target, list_targets

_JSON_HELP = "Print the result as JSON on stdout."
_QUIET_HELP = "Print only the essential result (and warnings)."


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise click.BadParameter(
            f"{text!r} is not a C×H×W shape: write it as 1x28x28", param_hint="--input-shape"
        )
    return shape


@click.group(name="targets")
def targets_group() -> None:
    """List, inspect and calibrate hardware targets."""


@targets_group.command(name="list")
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@click.option("--quiet", is_flag=True, help="Print only the target names, one per line.")
def list_command(as_json: bool, quiet: bool) -> None:
    """List the hardware targets and how each one obtains latencies."""
    targets = list_targets()
    if as_json:
        _echo_json([target.to_dict() for target in targets])
        return
    if quiet:
        for target in targets:
            click.echo(target.name)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "runtime", "threads", "precision", "latency", "available")
    for target in targets:
        usable, reason = target.available()
        table.add_row(
            target.name,
            target.runtime,
            str(target.threads),
            target.precision,
            target.latency_source,
            "yes" if usable else f"no: {reason}",
        )
    Console().print(table)


@targets_group.command(name="calibrate")
@click.argument("target")
@click.option("--quick", is_flag=True, help="Time a reduced space (widths 8 and 16), for tests.")
@click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    help="Sample shape C×H×W of the students to cover, e.g. 1x28x28; repeatable "
    "(default: 1x8x8 and 1x28x28).",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the table JSON (default: the user cache, where predictions look).",
)
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@click.option("--quiet", is_flag=True, help=_QUIET_HELP)
def calibrate_command(
    target: str,
    quick: bool,
    input_shapes: tuple[str, ...],
    output: Path | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Time the student search space's kernels on TARGET into a latency table."""
    from edgeopt.targets.predictor import DEFAULT_INPUT_SHAPES, calibrate, table_path

    shapes = tuple(_parse_shape(text) for text in input_shapes) or DEFAULT_INPUT_SHAPES
    table = calibrate(target, input_shapes=shapes, quick=quick, output=output)
    path = output or table_path(target)
    fit = table.overhead
    errors = [
        abs(model["predicted_ms"] - model["measured_ms"]) / model["measured_ms"]
        for model in fit.models
    ]
    summary = {
        "target": target,
        "table": str(path),
        "kernels": len(table.kernels),
        "calibration_seconds": round(table.calibration_seconds, 1),
        "overhead": {
            "intercept_ms": fit.intercept_ms,
            "scale": fit.scale,
            "per_kernel_ms": fit.per_kernel_ms,
        },
        "fit_models": len(fit.models),
        "fit_max_relative_error": max(errors) if errors else None,
    }
    if as_json:
        _echo_json(summary)
    elif quiet:
        click.echo(str(path))
    else:
        click.echo(
            f"calibrated {target}: {summary['kernels']} kernels in "
            f"{summary['calibration_seconds']} s, table {path}"
        )
        if errors:
            click.echo(
                f"overhead fitted on {len(errors)} students, largest error "
                f"{max(errors):.1%} (in-sample)"
            )


@click.command(name="profile")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--target", "target_name", required=True, help="Target name (edgeopt targets list).")
@click.option("--budget", default=5.0, show_default=True, help="Seconds of timed runs.")
@click.option("--layers/--no-layers", default=True, help="Include the per-layer breakdown.")
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@click.option("--quiet", is_flag=True, help="Print only the median latency in ms.")
def profile_command(
    model: Path, target_name: str, budget: float, layers: bool, as_json: bool, quiet: bool
) -> None:
    """Measure or predict the latency of MODEL (.onnx or .tflite) on a target."""
    if model.suffix.lower() not in (".onnx", ".tflite"):
        raise ModelLoadError(
            f"cannot profile {model.name!r}: export it to .onnx or .tflite first "
            "(edgeopt profile reads exported files only)"
        )
    target = get_target(target_name)
    report = build_profile(model, target_name, budget=budget, layers=layers)
    if as_json:
        _echo_json(report)
    elif quiet:
        click.echo(f"{report['latency']['median_ms']:.4f}")
    else:
        _print_profile(report, target.latency_source == "predicted")


def build_profile(
    model: Path, target_name: str, *, budget: float = 5.0, layers: bool = True
) -> dict[str, Any]:
    """Return latency, size, compute, roofline and per-layer figures of `model` on a target."""
    from edgeopt.targets._profiles import PredictedTarget, local_profile, roofline

    target = get_target(target_name)
    info = inspect_model(model)
    stats = target.measure(model, budget_s=budget)
    report: dict[str, Any] = {
        "target": target.to_dict(),
        "model": info.as_dict(layers=False),
        "latency": stats.as_dict(),
        "roofline_this_machine": roofline(info, local_profile()).as_dict(),
    }
    if isinstance(target, PredictedTarget):
        report["roofline_target"] = roofline(info, target.profile).as_dict()
    if not layers:
        return report
    layer_rows = [layer.__dict__ for layer in info.layers]
    if target.runtime == "onnxruntime" and target.latency_source == "measured-local":
        from edgeopt.targets._layer_times import onnxruntime_layer_times

        report["layer_times"] = onnxruntime_layer_times(model, target.threads)
        report["layer_times_source"] = "ONNX Runtime profiler, mean of 50 runs"
    else:
        report["layer_times_source"] = (
            "none: LiteRT's Python interpreter has no per-op profiler; use the adb target's "
            "benchmark_model --enable_op_profiling on a device for per-op times"
        )
    report["layers"] = layer_rows
    return report


def _print_profile(report: dict[str, Any], predicted: bool) -> None:
    latency = report["latency"]
    model = report["model"]
    label = " (estimate)" if predicted or latency["estimate"] else ""
    click.echo(f"model      {model['path']} ({model['precision']})")
    click.echo(f"target     {report['target']['name']} [{report['target']['latency_source']}]")
    click.echo(
        f"latency    median {latency['median_ms']:.4f} ms{label}, p90 {latency['p90_ms']:.4f} ms, "
        f"robust cv {latency.get('robust_cv') or 0.0:.1%} (cv {latency['cv']:.1%}), "
        f"{latency['runs']} runs"
    )
    click.echo(f"MACs       {model['macs']:,}")
    click.echo(f"params     {model['params']:,}")
    click.echo(f"file size  {model['file_size_bytes']:,} bytes")
    memory = latency["peak_memory_bytes"]
    click.echo(f"memory     {'n/a' if memory is None else f'{memory:,} bytes peak RSS growth'}")
    bound = report["roofline_this_machine"]
    click.echo(f"roofline   {bound['bound_ms']:.4f} ms lower bound on this machine")
    if "roofline_target" in report:
        click.echo(f"           {report['roofline_target']['bound_ms']:.4f} ms on the target")
    if "layer_times" in report:
        click.echo(f"layers     {report['layer_times_source']}:")
        for layer in report["layer_times"][:15]:
            click.echo(f"  {layer['time_ms']:9.4f} ms  {layer['op']:<16} {layer['name']}")
    elif "layers" in report:
        click.echo(f"layers     times: {report['layer_times_source']}")
        for layer in report["layers"]:
            if layer["macs"]:
                click.echo(f"  {layer['macs']:>12,} MACs  {layer['op']:<18} {layer['name']}")
