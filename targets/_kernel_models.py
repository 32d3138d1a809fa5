"""One-kernel model files for the latency predictor, written directly without a converter.

Converting a torch module with litert-torch takes seconds, too slow for the hundreds of kernels
of the search space, so the TFLite flatbuffer is built with the schema classes of ai-edge-litert.
Each kernel is lowered the way litert-torch 0.10 lowers the same torch layer, which the tests
check against its output. BatchNorm is folded into the bias and ReLU/ReLU6 fused. A convolution
on a one-channel input becomes DEPTHWISE_CONV_2D with a depth multiplier. An explicit PAD comes
before a VALID convolution where TFLite's SAME padding would differ from torch's symmetric one.
Inputs are NHWC, as inside a converted model.

With `copies` > 1 a model runs the kernel that many times side by side, each copy on the same
inputs with its own weights and its own output, so the difference between the times of a
many-copy and a one-copy model is the kernel's cost inside a model, without the invoke overhead.
"""

from __future__ import annotations

import math

import numpy as np

from edgeopt.targets._kernels import Kernel

_ACTIVATION_CODES = {"none": 0, "relu": 1, "relu6": 3}
# Operator versions as litert-torch 0.10 writes them (FULLY_CONNECTED with keep_num_dims is 5).
_OP_VERSIONS = {"FULLY_CONNECTED": 5}
_WEIGHT_SCALE = 0.1  # weights of normal size: tiny values could hit slow denormal arithmetic


def _same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


def needs_explicit_pad(kernel: Kernel) -> bool:
    """Return whether TFLite SAME padding differs from the kernel's symmetric torch padding."""
    if kernel.padding == 0:
        return False
    for size in (kernel.height, kernel.width):
        if _same_padding(size, kernel.kernel_size, kernel.stride) != (
            kernel.padding,
            kernel.padding,
        ):
            return True
    return False


class _FlatbufferModel:
    """A one-subgraph TFLite model under construction."""

    def __init__(self, schema: object) -> None:
        self.schema = schema
        self.buffers = [schema.BufferT()]  # buffer 0 is the empty buffer by convention
        self.tensors: list[object] = []
        self.operators: list[object] = []
        self.opcodes: list[object] = []
        self._opcode_index: dict[int, int] = {}
        self.rng = np.random.default_rng(0)

    def tensor(self, shape: list[int], data: np.ndarray | None = None, dtype: int = 0) -> int:
        """Add a tensor (dtype 0 is FLOAT32, 2 is INT32) with constant `data` if given."""
        schema = self.schema
        tensor = schema.TensorT()
        tensor.shape = np.asarray(shape, dtype=np.int32)
        tensor.type = dtype
        tensor.name = f"t{len(self.tensors)}"
        tensor.buffer = 0
        if data is not None:
            buffer = schema.BufferT()
            buffer.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
            self.buffers.append(buffer)
            tensor.buffer = len(self.buffers) - 1
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    def weights(self, shape: list[int]) -> int:
        values = (_WEIGHT_SCALE * self.rng.standard_normal(shape)).astype(np.float32)
        return self.tensor(shape, values)

    def operator(
        self,
        name: str,
        inputs: list[int],
        outputs: list[int],
        options_type: int = 0,
        options: object = None,
    ) -> None:
        schema = self.schema
        code = getattr(schema.BuiltinOperator, name)
        if code not in self._opcode_index:
            opcode = schema.OperatorCodeT()
            opcode.builtinCode = code
            opcode.deprecatedBuiltinCode = min(code, 127)
            opcode.version = _OP_VERSIONS.get(name, 1)
            self.opcodes.append(opcode)
            self._opcode_index[code] = len(self.opcodes) - 1
        operator = schema.OperatorT()
        operator.opcodeIndex = self._opcode_index[code]
        operator.inputs = np.asarray(inputs, dtype=np.int32)
        operator.outputs = np.asarray(outputs, dtype=np.int32)
        operator.builtinOptionsType = options_type
        operator.builtinOptions = options
        self.operators.append(operator)

    def serialize(self, inputs: list[int], outputs: list[int]) -> bytes:
        import flatbuffers

        schema = self.schema
        subgraph = schema.SubGraphT()
        subgraph.tensors = self.tensors
        subgraph.operators = self.operators
        subgraph.inputs = np.asarray(inputs, dtype=np.int32)
        subgraph.outputs = np.asarray(outputs, dtype=np.int32)
        subgraph.name = "main"
        model = schema.ModelT()
        model.version = 3
        model.operatorCodes = self.opcodes
        model.subgraphs = [subgraph]
        model.buffers = self.buffers
        model.description = "edgeopt latency-predictor kernel"
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def build_tflite_kernel(kernel: Kernel, copies: int = 1) -> bytes:
    """Return a float32 TFLite model of `kernel` × `copies`, lowered as litert-torch lowers it."""
    from ai_edge_litert import schema_py_generated as schema

    if copies < 1:
        raise ValueError(f"invalid copies={copies}: use 1 or more")
    model = _FlatbufferModel(schema)
    if kernel.op == "linear":
        source = model.tensor([1, kernel.in_channels])
        outputs = [_add_linear(model, schema, kernel, source) for _ in range(copies)]
        return model.serialize([source], outputs)

    shape = [1, kernel.height, kernel.width, kernel.in_channels]
    source = model.tensor(shape)
    if kernel.op == "add":
        other = model.tensor(shape)
        outputs = []
        for _ in range(copies):
            output = model.tensor(shape)
            options = schema.AddOptionsT()
            options.potScaleInt16 = True
            model.operator(
                "ADD", [source, other], [output], schema.BuiltinOptions.AddOptions, options
            )
            outputs.append(output)
        return model.serialize([source, other], outputs)
    if kernel.op == "mean":
        outputs = [_add_mean(model, schema, kernel, source) for _ in range(copies)]
        return model.serialize([source], outputs)

    outputs = [_add_convolution(model, schema, kernel, source) for _ in range(copies)]
    return model.serialize([source], outputs)


def _add_linear(model: _FlatbufferModel, schema: object, kernel: Kernel, source: int) -> int:
    weight = model.weights([kernel.out_channels, kernel.in_channels])
    bias = model.tensor([kernel.out_channels], np.zeros(kernel.out_channels, np.float32))
    output = model.tensor([1, kernel.out_channels])
    options = schema.FullyConnectedOptionsT()
    options.fusedActivationFunction = _ACTIVATION_CODES[kernel.activation]
    options.keepNumDims = True
    model.operator(
        "FULLY_CONNECTED",
        [source, weight, bias],
        [output],
        schema.BuiltinOptions.FullyConnectedOptions,
        options,
    )
    return output


def _add_mean(model: _FlatbufferModel, schema: object, kernel: Kernel, source: int) -> int:
    axes = model.tensor([2], np.asarray([1, 2], np.int32), dtype=schema.TensorType.INT32)
    output = model.tensor([1, kernel.in_channels])
    options = schema.ReducerOptionsT()
    options.keepDims = False
    model.operator("MEAN", [source, axes], [output], schema.BuiltinOptions.ReducerOptions, options)
    return output


def _add_convolution(model: _FlatbufferModel, schema: object, kernel: Kernel, source: int) -> int:
    """Add the (PAD and) convolution operators of `kernel` and return the output tensor."""
    padded = source
    padding_mode = schema.Padding.SAME if kernel.padding else schema.Padding.VALID
    if needs_explicit_pad(kernel):
        pad = kernel.padding
        paddings = np.asarray([[0, 0], [pad, pad], [pad, pad], [0, 0]], np.int32)
        padded = model.tensor(
            [1, kernel.height + 2 * pad, kernel.width + 2 * pad, kernel.in_channels]
        )
        pad_values = model.tensor([4, 2], paddings, dtype=schema.TensorType.INT32)
        model.operator("PAD", [source, pad_values], [padded])
        padding_mode = schema.Padding.VALID
    size = kernel.kernel_size
    bias = model.tensor([kernel.out_channels], np.zeros(kernel.out_channels, np.float32))
    output = model.tensor([1, kernel.out_height, kernel.out_width, kernel.out_channels])
    depthwise = kernel.op == "depthwise" or kernel.in_channels == 1
    if depthwise:
        weight = model.weights([1, size, size, kernel.out_channels])
        options = schema.DepthwiseConv2DOptionsT()
        options.depthMultiplier = kernel.out_channels // kernel.in_channels
        name, options_type = "DEPTHWISE_CONV_2D", schema.BuiltinOptions.DepthwiseConv2DOptions
    else:
        weight = model.weights([kernel.out_channels, size, size, kernel.in_channels])
        options = schema.Conv2DOptionsT()
        name, options_type = "CONV_2D", schema.BuiltinOptions.Conv2DOptions
    options.padding = padding_mode
    options.strideH = options.strideW = kernel.stride
    options.dilationHFactor = options.dilationWFactor = 1
    options.fusedActivationFunction = _ACTIVATION_CODES[kernel.activation]
    model.operator(name, [padded, weight, bias], [output], options_type, options)
    return output


def build_onnx_kernel(kernel: Kernel, copies: int = 1) -> bytes:
    """Return a float32 ONNX model (opset 18, NCHW input) that runs `kernel` `copies` times.

    Copies of "add" are chained (each adds the second input to the previous sum), because ONNX
    Runtime's common-subexpression elimination would merge identical adds of the same inputs.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if copies < 1:
        raise ValueError(f"invalid copies={copies}: use 1 or more")
    rng = np.random.default_rng(0)
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []

    def constant(name: str, values: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(values, name))
        return name

    def weights(name: str, shape: list[int]) -> str:
        return constant(name, (_WEIGHT_SCALE * rng.standard_normal(shape)).astype(np.float32))

    if kernel.op == "linear":
        in_shape = [1, kernel.in_channels]
        out_shape = [1, kernel.out_channels]
    else:
        in_shape = [1, kernel.in_channels, kernel.height, kernel.width]
        if kernel.op == "add":
            out_shape = in_shape
        elif kernel.op == "mean":
            out_shape = [1, kernel.in_channels]
        else:
            out_shape = [1, kernel.out_channels, kernel.out_height, kernel.out_width]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)]
    if kernel.op == "add":
        inputs.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, in_shape))

    results = []
    for copy in range(copies):
        suffix = f"_{copy}"
        raw = f"y0{suffix}"
        if kernel.op == "linear":
            weight = weights(f"w{suffix}", [kernel.out_channels, kernel.in_channels])
            bias = constant(f"b{suffix}", np.zeros(kernel.out_channels, np.float32))
            nodes.append(helper.make_node("Gemm", ["x", weight, bias], [raw], transB=1))
        elif kernel.op == "add":
            previous = results[-1] if results else "x"
            nodes.append(helper.make_node("Add", [previous, "x2"], [raw]))
        elif kernel.op == "mean":
            axes = constant(f"axes{suffix}", np.asarray([2, 3], np.int64))
            nodes.append(helper.make_node("ReduceMean", ["x", axes], [raw], keepdims=0))
        else:
            groups = kernel.in_channels if kernel.op == "depthwise" else 1
            size = kernel.kernel_size
            weight = weights(
                f"w{suffix}", [kernel.out_channels, kernel.in_channels // groups, size, size]
            )
            bias = constant(f"b{suffix}", np.zeros(kernel.out_channels, np.float32))
            nodes.append(
                helper.make_node(
                    "Conv",
                    ["x", weight, bias],
                    [raw],
                    kernel_shape=[size, size],
                    strides=[kernel.stride] * 2,
                    pads=[kernel.padding] * 4,
                    group=groups,
                )
            )
        results.append(_add_onnx_activation(nodes, constant, kernel.activation, raw, suffix))
    outputs = [
        helper.make_tensor_value_info(result, TensorProto.FLOAT, out_shape) for result in results
    ]
    graph = helper.make_graph(nodes, "kernel", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString()


def _add_onnx_activation(nodes: list, constant, activation: str, source: str, suffix: str) -> str:
    """Append the node of `activation` after `source`; return the name of the result."""
    from onnx import helper

    if activation == "none":
        return source
    result = f"y{suffix}"
    if activation == "relu":
        nodes.append(helper.make_node("Relu", [source], [result]))
    else:
        low = constant(f"low{suffix}", np.asarray(0.0, np.float32))
        high = constant(f"high{suffix}", np.asarray(6.0, np.float32))
        nodes.append(helper.make_node("Clip", [source, low, high], [result]))
    return result
