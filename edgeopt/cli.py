"""The `edgeopt` command line, a thin layer over the Python API.

Errors: an `EdgeoptInputError` (bad file, data or option) prints one line and exits with code 2;
any other `EdgeoptError` prints one line and exits with code 1. `--debug` shows the traceback.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

import edgeopt
from edgeopt._logging import configure_cli_logging, get_logger
from edgeopt._progress import set_progress
from edgeopt.errors import EdgeoptError, EdgeoptInputError, EdgeoptWarning

logger = get_logger(__name__)

DEBUG_KEY = "edgeopt.debug"


class CliInputError(click.ClickException):
    """A user error shown as one line, with exit code 2 (the code click uses for usage errors)."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"Error: {self.format_message()}", err=True)


class CliFailure(CliInputError):
    """A failure that is not the user's input (a converter bug, a runtime fault): exit code 1."""

    exit_code = 1


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class EdgeoptGroup(click.Group):
    """Click group that turns edgeopt's exceptions into one-line errors with exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgeoptInputError as exc:
            if ctx.meta.get(DEBUG_KEY):
                raise
            raise CliInputError(_one_line(exc)) from exc
        except EdgeoptError as exc:
            if ctx.meta.get(DEBUG_KEY):
                raise
            raise CliFailure(_one_line(exc)) from exc


def common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add --quiet, --json and --debug to a command and set up logging and progress for them."""

    @click.option(
        "--quiet", "-q", is_flag=True, help="Show warnings and errors only, no progress."
    )
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
    @click.option("--debug", is_flag=True, help="Log at debug level and show full tracebacks.")
    @functools.wraps(func)
    def wrapper(*args: Any, quiet: bool, as_json: bool, debug: bool, **kwargs: Any) -> Any:
        context = click.get_current_context()
        context.meta[DEBUG_KEY] = debug or context.meta.get(DEBUG_KEY, False)
        configure_cli_logging(quiet=quiet, debug=debug)
        set_progress(False if (quiet or as_json) else None)
        return func(*args, quiet=quiet, as_json=as_json, **kwargs)

    return wrapper


def _print_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, default=str))


input_scale_option = click.option(
    "--input-scale",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Factor from the [0, 1] data to the model's input (255 for models fed raw pixels).",
)


@click.group(cls=EdgeoptGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(edgeopt.__version__, prog_name="edgeopt")
@click.option("--debug", is_flag=True, help="Show full tracebacks, for every command.")
@click.pass_context
def cli(context: click.Context, debug: bool) -> None:
    """Shrink trained neural networks for phones and small devices."""
    context.meta[DEBUG_KEY] = debug


# --- optimize -----------------------------------------------------------------------------


@cli.command()
@click.option(
    "--teacher",
    default="auto",
    show_default=True,
    help="Built-in teacher (auto, cnn, mlp), a model file (.onnx, .pt2, TorchScript .pt) or "
    "package.module:callable returning an nn.Module.",
)
@click.option("--teacher-weights", help="State dict for a package.module:callable teacher.")
@click.option(
    "--teacher-input-scale",
    type=float,
    help="Factor from the [0, 1] student input to the teacher's input, e.g. 255 for a teacher "
    "trained on raw pixels. Detected on validation data when not given.",
)
@click.option(
    "--teacher-batch",
    type=click.IntRange(min=1),
    help="Batch size the teacher requires (detected for ONNX).",
)
@click.option(
    "--data",
    default="digits",
    show_default=True,
    help="digits, mnist:DIR, npz:FILE (arrays x, y), folder:DIR (a subfolder per class) or "
    "csv:FILE with --label.",
)
@click.option("--label", help="Label column of csv:FILE data.")
@click.option(
    "--student",
    help="Student family (inverted_residual, depthwise_separable, mlp) or a JSON file with an "
    "architecture. Default: sized from the teacher within --mac-ratio of its MACs.",
)
@click.option(
    "--mac-ratio",
    type=click.FloatRange(min=0, min_open=True, max=1),
    default=0.08,
    show_default=True,
    help="Student MAC budget as a fraction of the teacher's, when sizing the student.",
)
@click.option(
    "--target",
    default="litert-xnnpack",
    show_default=True,
    help="Hardware target to optimize for (see edgeopt targets list). The local runtimes are "
    "measured too.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("runs/latest"),
    show_default=True,
    help="Run directory to create.",
)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed for split and training."
)
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=3e-3,
    show_default=True,
    help="Peak learning rate (AdamW, one-cycle schedule).",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0, min_open=True),
    default=4.0,
    show_default=True,
    help="Distillation temperature T.",
)
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1),
    default=0.9,
    show_default=True,
    help="Weight of the soft (teacher) loss; 1 - alpha weights the hard labels.",
)
@click.option(
    "--hint-weight",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Weight of FitNets feature hints (PyTorch teachers on images); 0 turns them off.",
)
@click.option("--patience", type=click.IntRange(min=1), default=6, show_default=True)
@click.option("--augment", is_flag=True, help="Random ±1 pixel shifts of training images.")
@click.option("--limit", type=click.IntRange(min=10), help="Use only this many samples.")
@common_options
def optimize(quiet: bool, as_json: bool, **options: Any) -> None:
    """Distill a teacher into a small student, export it, verify it and measure it."""
    from edgeopt.distill import TrainConfig
    from edgeopt.pipeline import OptimizeConfig, run_optimize

    train_config = TrainConfig(
        epochs=options.pop("epochs"),
        batch_size=options.pop("batch_size"),
        learning_rate=options.pop("lr"),
        temperature=options.pop("temperature"),
        alpha=options.pop("alpha"),
        hint_weight=options.pop("hint_weight"),
        patience=options.pop("patience"),
        augment=options.pop("augment"),
    )
    config = OptimizeConfig(train=train_config, **options)
    result = run_optimize(config)
    if as_json:
        _print_json(result.report)
    elif not quiet:
        _print_summary(result.report, result.run_dir)


def _print_summary(report: dict[str, Any], run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    target = report["primary_target"]
    table = Table(title=f"edgeopt optimize → {run_dir}")
    for column in ("model", "accuracy", "MACs", "size (bytes)", f"{target} median ms"):
        table.add_column(column, justify="right")

    def latency(entry: dict[str, Any]) -> str:
        value = (entry.get("latency_ms") or {}).get(target)
        if isinstance(value, dict) and "median" in value:
            return f"{value['median']:.3f}" + (" (estimate)" if value.get("estimate") else "")
        return "–"

    for label, entry in (("teacher", report["teacher"]), ("student", report["student"])):
        table.add_row(
            label,
            f"{100 * entry['accuracy']:.2f}%" if entry.get("accuracy") is not None else "–",
            f"{entry['macs']:,}" if entry.get("macs") else "–",
            f"{entry['size_bytes']:,}" if entry.get("size_bytes") else "–",
            latency(entry),
        )
    for entry in report["exports"]:
        if "error" in entry:
            table.add_row(entry["path"], "export failed", "", "", "")
            continue
        table.add_row(
            entry["path"],
            f"{100 * entry['accuracy']:.2f}%",
            "",
            f"{entry['size_bytes']:,}",
            latency(entry),
        )
    Console().print(table)
    click.echo(f"Report: {run_dir / 'report.html'}")


# --- convert and verify -------------------------------------------------------------------


@cli.command()
@click.argument("model")
@click.option("--to", "target_format", type=click.Choice(["onnx", "tflite"]), required=True)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int8-dynamic", "int8"]),
    default="fp32",
    show_default=True,
)
@click.option(
    "--data",
    "data_spec",
    help="Data spec (as --data of optimize) whose test split verifies the file and gives the "
    "input shape. Default: the --calibration data.",
)
@click.option("--label", help="Label column of csv:FILE data.")
@click.option("--calibration", help="Data spec for int8 calibration (its training split).")
@click.option("--calibration-samples", type=click.IntRange(min=1), default=256, show_default=True)
@input_scale_option
@click.option("--opset", type=int, help="ONNX opset (default: the exporter's).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="File to write.")
@click.option("--seed", type=int, default=0, show_default=True)
@common_options
def convert(
    model: str,
    target_format: str,
    precision: str,
    data_spec: str | None,
    label: str | None,
    calibration: str | None,
    calibration_samples: int,
    input_scale: float,
    opset: int | None,
    out: Path,
    seed: int,
    quiet: bool,
    as_json: bool,
) -> None:
    """Convert MODEL (.onnx, .pt2, TorchScript .pt) to ONNX or TFLite and verify the file."""
    from edgeopt import converters
    from edgeopt.data import load_data

    data_spec = data_spec or calibration
    if data_spec is None:
        raise EdgeoptInputError(
            "convert needs data to verify the file and to know the input shape: add --data "
            "DATA (for example --data digits)"
        )
    data = load_data(data_spec, seed=seed, label=label)
    calibration_data = None
    if calibration is not None:
        calibration_set = data if calibration == data_spec else load_data(calibration, seed=seed)
        calibration_data = calibration_set.train.x[:calibration_samples] * input_scale
    result = converters.convert(
        model,
        to=target_format,
        precision=precision,
        calibration=calibration_data,
        verify_data=data.test.x[:512] * input_scale,
        labels=data.test.y[:512],
        opset=opset,
        out=out,
    )
    payload = result.as_dict()
    if as_json:
        _print_json(payload)
    elif not quiet:
        _print_json(payload)
        click.echo(f"Wrote {out}")


@cli.command()
@click.argument("reference")
@click.argument("candidate")
@click.option("--data", "data_spec", default="digits", show_default=True, help="Data spec.")
@click.option("--label", help="Label column of csv:FILE data.")
@click.option("--samples", type=click.IntRange(min=1), default=512, show_default=True)
@input_scale_option
@click.option("--per-layer", is_flag=True, help="Compare intermediate tensors too (ONNX).")
@click.option("--seed", type=int, default=0, show_default=True)
@common_options
def verify(
    reference: str,
    candidate: str,
    data_spec: str,
    label: str | None,
    samples: int,
    input_scale: float,
    per_layer: bool,
    seed: int,
    quiet: bool,
    as_json: bool,
) -> None:
    """Compare CANDIDATE with REFERENCE output by output on the test split of --data."""
    from edgeopt import converters
    from edgeopt.data import load_data

    data = load_data(data_spec, seed=seed, label=label)
    x = data.test.x[:samples] * input_scale
    report = converters.verify(
        reference, candidate, x, labels=data.test.y[:samples], per_layer=per_layer
    )
    payload = report.as_dict()
    if as_json or not quiet:
        _print_json(payload)


def _attach_target_commands() -> None:
    """Attach `edgeopt targets …` and `edgeopt profile` from the targets package."""
    try:
        from edgeopt.targets.cli import profile_command, targets_group
    except ImportError as exc:  # targets CLI not built yet
        logger.debug("targets commands unavailable: %s", exc)
        return
    cli.add_command(targets_group, "targets")
    cli.add_command(profile_command, "profile")


_attach_target_commands()


def main() -> None:
    """Entry point of the `edgeopt` console script."""
    # TensorFlow and the LiteRT converter log from C++ at INFO level by default; keep their
    # warnings and errors only, unless the user set these variables.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GLOG_minloglevel", "1")
    # SIGTERM (from `kill`, a CI timeout or a container stop) becomes SystemExit, so that a
    # run in progress removes its temporary folder as it does on Ctrl-C.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # edgeopt logs every warning it issues, so the `warnings` copy would print it twice.
    warnings.filterwarnings("ignore", category=EdgeoptWarning)
    cli.main(prog_name="edgeopt")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
