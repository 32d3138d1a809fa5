"""Helpers shared by the ONNX and TFLite exporters: inputs, output names, eval mode, layers."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeopt._logging import get_logger
from edgeopt.errors import ConversionError, EdgeoptInputError, ExportWarning

logger = get_logger(__name__)

# Metadata key for the input layout (e.g. NCHW), written into every exported file.
INPUT_LAYOUT_KEY = "edgeopt.input_layout"


def as_input_tuple(
    example_input: torch.Tensor | Sequence[torch.Tensor],
) -> tuple[torch.Tensor, ...]:
    """Return the example input as a tuple of float tensors, checking its type."""
    if isinstance(example_input, torch.Tensor):
        inputs: tuple[Any, ...] = (example_input,)
    elif isinstance(example_input, (tuple, list)) and example_input:
        inputs = tuple(example_input)
    else:
        raise EdgeoptInputError(
            f"example_input must be a torch.Tensor or a non-empty tuple of tensors, got "
            f"{type(example_input).__name__}"
        )
    for index, tensor in enumerate(inputs):
        if not isinstance(tensor, torch.Tensor):
            raise EdgeoptInputError(
                f"example_input[{index}] must be a torch.Tensor, got {type(tensor).__name__}"
            )
        if tensor.dim() == 0:
            raise EdgeoptInputError(
                f"example_input[{index}] is a scalar; the first dimension must be the batch"
            )
    return inputs


def default_input_names(count: int) -> list[str]:
    """Return `input` for one input and `input_0`, `input_1`, ... for several."""
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]


def input_layout(inputs: Sequence[torch.Tensor]) -> str:
    """Describe the input layout for the file metadata, e.g. `NCHW` for a 4-D image batch."""
    layouts = {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}
    return ",".join(layouts.get(t.dim(), f"rank{t.dim()}") for t in inputs)


def flatten_outputs(output: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Flatten a model output into (name, tensor) pairs in torch.export's pytree order.

    A tensor is named `output`. A dict uses its keys, a named tuple its fields, and a tuple or
    list `output_0`, `output_1`, and so on. Nested containers join the names with dots.
    """
    if isinstance(output, torch.Tensor):
        return [(prefix or "output", output)]
    if isinstance(output, Mapping):
        items = [(str(key), value) for key, value in output.items()]
    elif isinstance(output, tuple) and hasattr(output, "_fields"):
        items = [(field, getattr(output, field)) for field in output._fields]
    elif isinstance(output, (tuple, list)):
        stem = prefix or "output"
        items = [(f"{stem}_{i}", value) for i, value in enumerate(output)]
        prefix = ""
    else:
        raise ConversionError(
            f"the model returned a {type(output).__name__}; export needs a tensor, or a "
            "tuple, list or dict of tensors"
        )
    pairs: list[tuple[str, torch.Tensor]] = []
    for name, value in items:
        full_name = f"{prefix}.{name}" if prefix else name
        pairs.extend(flatten_outputs(value, full_name))
    return pairs


def resolve_output_names(
    default_names: Sequence[str], requested: Sequence[str] | None, output: Any
) -> list[str]:
    """Return the output names to write, binding dict outputs by key instead of by position.

    For a dict output the requested names must be exactly its keys, in any order, because
    renaming by position would mislabel outputs. Other outputs take the requested names in order.
    """
    if requested is None:
        return list(default_names)
    requested = [str(name) for name in requested]
    if len(set(requested)) != len(requested):
        raise EdgeoptInputError(f"output_names contains duplicates: {requested}")
    if isinstance(output, Mapping):
        if sorted(requested) != sorted(default_names):
            raise EdgeoptInputError(
                f"output_names {requested} do not match the keys {list(default_names)} of the "
                "dict the model returns; pass the keys (in any order) or omit output_names"
            )
        return list(default_names)
    if len(requested) != len(default_names):
        raise EdgeoptInputError(
            f"output_names has {len(requested)} names but the model returns "
            f"{len(default_names)} outputs ({list(default_names)})"
        )
    return requested


@contextlib.contextmanager
def eval_mode(model: nn.Module, purpose: str, warn: bool = True) -> Iterator[nn.Module]:
    """Put every submodule of `model` in eval mode, then restore each one's own mode.

    Warns with `ExportWarning` when the caller handed over a model in train mode, because its
    outputs then differ from the exported model's (dropout, batch statistics).
    """
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        switched = any(modes.values())
    except NotImplementedError:
        # Graph modules loaded from torch.export files reject eval(); they keep the mode they
        # were exported in.
        switched = False
    if warn and switched:
        message = (
            f"the model was in train() mode; {purpose} uses eval() mode (running statistics, "
            "no dropout) and the model's mode is restored afterwards"
        )
        warnings.warn(message, ExportWarning, stacklevel=3)
        logger.warning("%s", message)
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


def batch_statistics_layers(model: nn.Module) -> list[str]:
    """List the module paths of normalisation layers that use batch statistics in eval mode.

    A BatchNorm without running statistics (`track_running_stats=False`) normalises each batch
    by its own mean and variance even in eval(), so its outputs depend on the other samples.
    """
    paths = []
    for path, module in model.named_modules():
        is_batch_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
        if is_batch_norm and (not module.track_running_stats or module.running_mean is None):
            paths.append(path or type(module).__name__)
    return paths


def module_path_for_op(model: nn.Module, example: tuple[torch.Tensor, ...], op: str) -> str | None:
    """Return the path of the module whose forward calls ATen operator `op`, if one is found."""
    op = op.split("::")[-1].split(".")[0]
    try:
        program = torch.export.export(model, example, strict=False)
    except Exception as exc:
        logger.debug("could not trace the model to locate operator %s: %s", op, exc)
        return None
    path = _find_op(program, op)
    if path is None:
        try:
            path = _find_op(program.run_decompositions(), op)
        except Exception as exc:
            logger.debug("could not decompose the model to locate operator %s: %s", op, exc)
    return path


def _find_op(program: torch.export.ExportedProgram, op: str) -> str | None:
    for node in program.graph.nodes:
        target = str(node.target)
        if node.op != "call_function" or f".{op}." not in f".{target}.":
            continue
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            path, _ = list(stack.values())[-1]
            return path or "<root>"
        return "<root>"
    return None


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Return a detached float32 (or integer) numpy copy of `tensor`."""
    array = tensor.detach().cpu().numpy()
    return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array


def repeat_to_batch(inputs: tuple[torch.Tensor, ...], batch: int) -> tuple[torch.Tensor, ...]:
    """Repeat the samples of each input cyclically until dim 0 has `batch` rows."""
    result = []
    for tensor in inputs:
        index = torch.arange(batch) % tensor.shape[0]
        result.append(tensor[index])
    return tuple(result)


def torch_outputs(
    model: nn.Module, inputs: tuple[torch.Tensor, ...]
) -> tuple[Any, list[tuple[str, torch.Tensor]]]:
    """Run `model` without gradients and return its raw output and the flattened pairs."""
    with torch.no_grad():
        output = model(*inputs)
    return output, flatten_outputs(output)


def diff_against_torch(
    runtime: Any,
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    output_names: Sequence[str],
    tolerance: float,
) -> tuple[float, str | None]:
    """Run `runtime` and `model` on `inputs` and compare each output.

    Returns the largest absolute difference and the first output whose difference exceeds
    `tolerance * (1 + max |expected|)` or is not finite (None when all are within it). Raises
    `ConversionError` when an output's shape differs from PyTorch's.
    """
    _, pairs = torch_outputs(model, inputs)
    feed = dict(zip(runtime.input_names, (to_numpy(t) for t in inputs), strict=True))
    outputs = runtime.run(feed)
    worst, failing = 0.0, None
    for name, (_, tensor) in zip(output_names, pairs, strict=True):
        expected = to_numpy(tensor)
        actual = outputs[name]
        if actual.shape != expected.shape:
            raise ConversionError(
                f"output '{name}' of {runtime.path} has shape {actual.shape} at batch "
                f"{inputs[0].shape[0]} but PyTorch gives {expected.shape}; the export fixed a "
                "shape, so export with dynamic_batch=False or at the batch size you will run"
            )
        if not expected.size:
            continue
        diff = float(np.max(np.abs(actual.astype(np.float64) - expected)))
        scale = float(np.max(np.abs(expected)))
        if failing is None and not (np.isfinite(diff) and diff <= tolerance * (1.0 + scale)):
            failing = name
        worst = max(worst, diff) if np.isfinite(diff) else float("inf")
    return worst, failing
