"""fp16 weight storage for ONNX models, with constants kept inside the fp16 range.

edgeopt's fp16 stores large weight tensors as float16 and computes in float32: each converted
initializer is followed by a Cast to float. Small constants (scalars such as a LayerNorm epsilon
of 1e-8, short masks) stay float32, because storing them in fp16 saves nothing and can underflow
them to 0 or overflow them to Inf. Values beyond the fp16 range in a converted tensor are clamped
to ±65504 and reported with an `ExportWarning`.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeopt._logging import get_logger
from edgeopt.errors import ExportWarning

logger = get_logger(__name__)

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
# Initializers with fewer elements than this stay float32.
MIN_FP16_ELEMENTS = 64


def clamp_to_fp16_range(array: np.ndarray) -> tuple[np.ndarray, int]:
    """Clamp finite values beyond ±65504 to ±65504; return the array and how many were clamped."""
    finite = np.isfinite(array)
    outside = finite & (np.abs(array) > FP16_MAX)
    count = int(outside.sum())
    if count:
        array = np.where(outside, np.sign(array) * FP16_MAX, array).astype(array.dtype)
    return array, count


def warn_clamped(clamped: dict[str, int], where: str) -> None:
    """Emit one `ExportWarning` listing the constants clamped to the fp16 range."""
    if not clamped:
        return
    listing = ", ".join(f"{name} ({count} values)" for name, count in sorted(clamped.items()))
    message = f"{where}: clamped constants beyond the fp16 range to ±65504: {listing}"
    warnings.warn(message, ExportWarning, stacklevel=3)
    logger.warning("%s", message)


def onnx_weights_to_fp16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Store the float32 initializers of `model` with at least 64 elements as float16.

    Returns the converted model and, per initializer, the number of values clamped to ±65504.
    """
    graph = model.graph
    cast_nodes = []
    new_initializers = []
    clamped: dict[str, int] = {}
    for init in graph.initializer:
        is_float32 = init.data_type == onnx.TensorProto.FLOAT
        array = numpy_helper.to_array(init) if is_float32 else None
        if array is None or array.size < MIN_FP16_ELEMENTS:
            new_initializers.append(init)
            continue
        array, count = clamp_to_fp16_range(array)
        if count:
            clamped[init.name] = count
        half_name = f"{init.name}__fp16"
        new_initializers.append(numpy_helper.from_array(array.astype(np.float16), half_name))
        cast_nodes.append(
            helper.make_node(
                "Cast",
                [half_name],
                [init.name],
                to=onnx.TensorProto.FLOAT,
                name=f"{init.name}__to_fp32",
            )
        )
    del graph.initializer[:]
    graph.initializer.extend(new_initializers)
    converted = {node.output[0] for node in cast_nodes}
    graph_inputs = [value for value in graph.input if value.name not in converted]
    del graph.input[:]
    graph.input.extend(graph_inputs)
    for node in reversed(cast_nodes):
        graph.node.insert(0, node)
    return model, clamped
