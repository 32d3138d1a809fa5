"""Static facts about a model file: MACs, parameters, weight and activation bytes, layers.

Read from the file alone (ONNX initializers and inferred shapes, TFLite tensors and buffers), so
an exported model can be profiled without the torch module it came from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.errors import ModelLoadError
from edgeopt.targets._runners import check_model_file, runtime_for_path


@dataclass
class LayerInfo:
    """One operator of a model file."""

    name: str
    op: str
    macs: int
    params: int
    output_shape: list[int]


@dataclass
class ModelInfo:
    """Size and compute of one model file. `precision` is "int8" if any weight is int8."""

    path: str
    runtime: str
    precision: str
    macs: int
    params: int
    weight_bytes: int
    activation_bytes: int
    file_size_bytes: int
    layers: list[LayerInfo] = field(default_factory=list)

    def as_dict(self, layers: bool = True) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not layers:
            data.pop("layers")
        return data


def inspect_model(model_path: str | Path) -> ModelInfo:
    """Return the MACs, parameters, bytes and layers of an .onnx or .tflite file."""
    path = check_model_file(model_path)
    if runtime_for_path(path) == "onnxruntime":
        return _inspect_onnx(path)
    return _inspect_tflite(path)


# --- TFLite -------------------------------------------------------------------------------------

_TFLITE_ITEM_SIZES = {0: 4, 1: 2, 2: 4, 3: 1, 4: 8, 6: 1, 7: 2, 9: 1, 10: 8}  # TensorType codes
_TFLITE_INT8_TYPES = {3, 9}  # UINT8, INT8
_TFLITE_WEIGHT_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV"}


def _inspect_tflite(path: Path) -> ModelInfo:
    from ai_edge_litert import schema_py_generated as schema

    data = path.read_bytes()
    try:
        model = schema.ModelT.InitFromPackedBuf(data, 0)
    except Exception as error:  # flatbuffers raises struct and index errors on bad files
        raise ModelLoadError(f"cannot read TFLite model {str(path)!r}: {error}") from error
    names = {value: key for key, value in vars(schema.BuiltinOperator).items() if key.isupper()}
    subgraph = model.subgraphs[0]

    def is_constant(index: int) -> bool:
        buffer = model.buffers[subgraph.tensors[index].buffer]
        return (buffer.data is not None and len(buffer.data) > 0) or buffer.size > 0

    def shape(index: int) -> list[int]:
        tensor_shape = subgraph.tensors[index].shape
        return [] if tensor_shape is None else [int(dim) for dim in tensor_shape]

    def nbytes(index: int) -> int:
        tensor = subgraph.tensors[index]
        return int(np.prod(shape(index) or [1])) * _TFLITE_ITEM_SIZES.get(tensor.type, 4)

    layers = []
    precision = "fp32"
    for number, operator in enumerate(subgraph.operators or []):
        code = model.operatorCodes[operator.opcodeIndex]
        op = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")
        inputs = [int(index) for index in operator.inputs if index >= 0]
        output = shape(int(operator.outputs[0])) if len(operator.outputs) else []
        weights = [index for index in inputs[1:] if is_constant(index)]
        params = 0
        if op in _TFLITE_WEIGHT_OPS:
            params = sum(int(np.prod(shape(index) or [1])) for index in weights)
            if weights and subgraph.tensors[weights[0]].type in _TFLITE_INT8_TYPES:
                precision = "int8"
        macs = _tflite_macs(op, output, shape(inputs[1]) if len(inputs) > 1 else [])
        layers.append(LayerInfo(f"{number}:{op}", op, macs, params, output))

    constant = [index for index in range(len(subgraph.tensors)) if is_constant(index)]
    variable = [index for index in range(len(subgraph.tensors)) if not is_constant(index)]
    return ModelInfo(
        path=str(path),
        runtime="litert",
        precision=precision,
        macs=sum(layer.macs for layer in layers),
        params=sum(layer.params for layer in layers),
        weight_bytes=sum(nbytes(index) for index in constant),
        activation_bytes=sum(nbytes(index) for index in variable),
        file_size_bytes=path.stat().st_size,
        layers=layers,
    )


def _tflite_macs(op: str, output: list[int], weight: list[int]) -> int:
    if not output or not weight:
        return 0
    outputs = int(np.prod(output))
    if op == "CONV_2D":  # weight [out, kh, kw, in]
        return outputs * int(np.prod(weight[1:]))
    if op == "DEPTHWISE_CONV_2D":  # weight [1, kh, kw, out]
        return outputs * weight[1] * weight[2]
    if op == "FULLY_CONNECTED":  # weight [out, in]
        return outputs * weight[-1]
    return 0


# --- ONNX ---------------------------------------------------------------------------------------

_ONNX_WEIGHT_OPS = {"Conv", "ConvInteger", "QLinearConv", "Gemm", "MatMul", "MatMulInteger"}


def _inspect_onnx(path: Path) -> ModelInfo:
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    except Exception as error:  # onnx raises DecodeError, ValidationError and others
        raise ModelLoadError(f"cannot read ONNX model {str(path)!r}: {error}") from error
    graph = model.graph
    initializers = {item.name: item for item in graph.initializer}
    shapes: dict[str, list[int]] = {}
    item_sizes: dict[str, int] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = value.type.tensor_type
        shapes[value.name] = [dim.dim_value or 1 for dim in tensor_type.shape.dim]
        item_sizes[value.name] = onnx.helper.tensor_dtype_to_np_dtype(
            tensor_type.elem_type
        ).itemsize
    producers = {output: node for node in graph.node for output in node.output}

    def weight_source(name: str) -> onnx.TensorProto | None:
        """Return the initializer behind `name`, looking through DequantizeLinear."""
        if name in initializers:
            return initializers[name]
        node = producers.get(name)
        if node is not None and node.op_type == "DequantizeLinear" and node.input:
            return initializers.get(node.input[0])
        return None

    layers = []
    precision = "fp32"
    for number, node in enumerate(graph.node):
        if (
            node.op_type in ("DequantizeLinear", "QuantizeLinear")
            and node.input[0] in initializers
        ):
            continue  # weight (de)quantization: folded into the consumer by ONNX Runtime
        weight_index = 3 if node.op_type == "QLinearConv" else 1
        sources = [weight_source(name) for name in node.input[weight_index:]]
        sources = [source for source in sources if source is not None]
        params = 0
        macs = 0
        output = shapes.get(node.output[0], []) if node.output else []
        if node.op_type in _ONNX_WEIGHT_OPS and sources:
            params = sum(int(np.prod(source.dims)) for source in sources)
            weight_shape = list(sources[0].dims)
            if sources[0].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
                precision = "int8"
            macs = _onnx_macs(node, output, weight_shape)
        name = node.name or f"{number}:{node.op_type}"
        layers.append(LayerInfo(name, node.op_type, macs, params, output))

    weight_bytes = sum(numpy_helper.to_array(item).nbytes for item in initializers.values())
    activation_bytes = sum(
        int(np.prod(shape or [1])) * item_sizes.get(name, 4)
        for name, shape in shapes.items()
        if name not in initializers
    )
    return ModelInfo(
        path=str(path),
        runtime="onnxruntime",
        precision=precision,
        macs=sum(layer.macs for layer in layers),
        params=sum(layer.params for layer in layers),
        weight_bytes=int(weight_bytes),
        activation_bytes=int(activation_bytes),
        file_size_bytes=path.stat().st_size,
        layers=layers,
    )


def _onnx_macs(node: Any, output: list[int], weight: list[int]) -> int:
    if not output or not weight:
        return 0
    outputs = int(np.prod(output))
    if node.op_type in ("Conv", "ConvInteger", "QLinearConv"):  # weight [out, in/groups, kh, kw]
        return outputs * int(np.prod(weight[1:]))
    if node.op_type == "Gemm":
        trans_b = next((attr.i for attr in node.attribute if attr.name == "transB"), 0)
        return outputs * (weight[1] if trans_b else weight[0])
    return outputs * weight[0]  # MatMul: weight [in, out]
