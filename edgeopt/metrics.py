"""Model size and compute counts: parameters, multiply-accumulates (MACs) and accuracy."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from edgeopt._logging import get_logger

logger = get_logger(__name__)


def count_params(model: nn.Module) -> int:
    """Return the number of distinct parameter elements (a tied weight counts once)."""
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
    return total


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Return the multiply-accumulates of one forward pass on a single sample of `input_shape`.

    Counted with PyTorch's FlopCounterMode, which reports 2 FLOPs per MAC for convolutions and
    matrix products (grouped and depthwise convolutions included). Elementwise ops, pooling and
    normalisation are not counted, as is usual for MAC figures of CNNs.
    """
    was_training = model.training
    _set_mode(model, training=False)
    try:
        example = torch.zeros(1, *input_shape)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example)
        return int(counter.get_total_flops() // 2)
    finally:
        _set_mode(model, training=was_training)


def _set_mode(model: nn.Module, training: bool) -> None:
    # torch.export modules (.pt2) refuse mode switches and keep the mode they were exported in.
    with contextlib.suppress(NotImplementedError):
        model.train(training)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Return top-1 accuracy of `logits` (N × classes) against integer `labels` (N,)."""
    if len(labels) == 0:
        return float("nan")
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Return the share of samples whose arg-max class is the same in both logit arrays."""
    return float(np.mean(np.argmax(reference, axis=1) == np.argmax(candidate, axis=1)))


def _onnx_model(path: Path):
    import onnx

    from edgeopt.errors import ModelLoadError

    try:
        model = onnx.load(str(path))
        return onnx.shape_inference.infer_shapes(model)
    except (OSError, onnx.onnx_cpp2py_export.shape_inference.InferenceError) as exc:
        raise ModelLoadError(f"cannot read ONNX model {path}: {exc}") from exc
    except Exception as exc:  # protobuf raises DecodeError for corrupt files
        raise ModelLoadError(f"cannot read ONNX model {path}: {exc}") from exc


def onnx_params(path: Path) -> int:
    """Return the number of elements in the initializers of the ONNX model at `path`."""
    model = _onnx_model(path)
    return int(sum(np.prod(tensor.dims, dtype=np.int64) for tensor in model.graph.initializer))


def _onnx_tensor_shapes(path: Path) -> dict[str, list[int]] | None:
    """Return the shape of every tensor of one batch-1 run, read from ONNX Runtime.

    Running the model gives shapes where static shape inference gives up (old opsets, Reshape
    targets stored as initializers). None when an input is not float32.
    """
    import onnx
    import onnxruntime as ort

    model = _onnx_model(path)
    initializers = {tensor.name for tensor in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type != onnx.TensorProto.FLOAT:
            return None
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor_type.shape.dim]
        feeds[value.name] = np.zeros(dims, np.float32)
    existing = {value.name for value in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in existing:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
                existing.add(name)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [output.name for output in session.get_outputs()]
    values = session.run(names, feeds)
    shapes = {name: list(np.shape(value)) for name, value in zip(names, values, strict=True)}
    shapes.update({name: list(array.shape) for name, array in feeds.items()})
    for tensor in model.graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    return shapes


def onnx_macs(path: Path) -> int | None:
    """Return the MACs of Conv, ConvTranspose, Gemm and MatMul nodes for one sample.

    Tensor shapes come from one run at batch 1 (symbolic dimensions set to 1). None when the
    model cannot be run on float32 zeros.
    """
    model = _onnx_model(path)
    try:
        shapes = _onnx_tensor_shapes(path)
    except Exception as exc:  # ONNX Runtime raises its own error types
        logger.warning("MACs of %s not counted: %s", path, str(exc).splitlines()[0])
        return None
    if shapes is None:
        return None
    total = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        out_shape = shapes[node.output[0]]
        weight_shape = shapes[node.input[1]]
        if node.op_type == "Conv":
            # Each output element takes C_in/groups × kernel products: the weight's dims 1…
            total += int(np.prod(out_shape)) * int(np.prod(weight_shape[1:]))
        elif node.op_type == "ConvTranspose":
            total += int(np.prod(shapes[node.input[0]])) * int(np.prod(weight_shape[1:]))
        else:
            a_shape = shapes[node.input[0]]
            transpose_a = any(a.name == "transA" and a.i for a in node.attribute)
            inner = a_shape[-2] if transpose_a else a_shape[-1]
            total += int(np.prod(out_shape)) * int(inner)
    return total
