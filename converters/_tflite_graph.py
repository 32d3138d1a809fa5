"""Edits of TFLite flatbuffers: a float interface around int8 models, and metadata."""

from __future__ import annotations

import json
from collections.abc import Mapping

from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils

METADATA_NAME = "edgeopt"


def _opcode_index(model: schema.ModelT, builtin: int) -> int:
    for index, code in enumerate(model.operatorCodes):
        if flatbuffer_utils.get_builtin_code_from_operator_code(code) == builtin:
            return index
    code = schema.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(
        builtin, schema.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES
    )
    code.version = 2
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _float_twin(model: schema.ModelT, tensor: schema.TensorT) -> schema.TensorT:
    twin = schema.TensorT()
    twin.shape = tensor.shape
    twin.shapeSignature = tensor.shapeSignature
    twin.type = schema.TensorType.FLOAT32
    twin.name = tensor.name
    tensor.name = (tensor.name or b"") + b"_int8"
    model.buffers.append(schema.BufferT())
    twin.buffer = len(model.buffers) - 1
    return twin


def _replace_in_signatures(model: schema.ModelT, old: int, new: int, field: str) -> None:
    for signature in model.signatureDefs or []:
        for tensor_map in getattr(signature, field) or []:
            if tensor_map.tensorIndex == old:
                tensor_map.tensorIndex = new


def _wrap_tensor(
    model: schema.ModelT, subgraph: schema.SubGraphT, index: int, is_input: bool
) -> int:
    """Add a float32 twin of tensor `index` linked to it by QUANTIZE or DEQUANTIZE; return it."""
    subgraph.tensors.append(_float_twin(model, subgraph.tensors[index]))
    new_index = len(subgraph.tensors) - 1
    op = schema.OperatorT()
    if is_input:
        op.opcodeIndex = _opcode_index(model, schema.BuiltinOperator.QUANTIZE)
        op.inputs, op.outputs = [new_index], [index]
        subgraph.operators.insert(0, op)
    else:
        op.opcodeIndex = _opcode_index(model, schema.BuiltinOperator.DEQUANTIZE)
        op.inputs, op.outputs = [index], [new_index]
        subgraph.operators.append(op)
    _replace_in_signatures(model, index, new_index, "inputs" if is_input else "outputs")
    return new_index


def add_float_interface(content: bytes) -> bytes:
    """Give an int8-interface model float32 inputs and outputs.

    A QUANTIZE op is inserted after each int8 input and a DEQUANTIZE op before each int8
    output, using the tensors' own scales and zero points, so callers feed and read float32.
    """
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    int_types = (schema.TensorType.INT8, schema.TensorType.UINT8, schema.TensorType.INT16)
    for subgraph in model.subgraphs[:1]:
        for is_input, indices in ((True, subgraph.inputs), (False, subgraph.outputs)):
            for position, index in enumerate(list(indices)):
                if subgraph.tensors[index].type in int_types:
                    indices[position] = _wrap_tensor(model, subgraph, index, is_input)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def add_metadata(content: bytes, metadata: Mapping[str, str]) -> bytes:
    """Store `metadata` as JSON in the model's metadata entry named `edgeopt`."""
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    buffer = schema.BufferT()
    buffer.data = list(json.dumps(dict(metadata), sort_keys=True).encode())
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name != METADATA_NAME.encode()]
    model.metadata.append(entry)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def read_metadata(content: bytes) -> dict[str, str]:
    """Return the metadata written by `add_metadata`, or an empty dict."""
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    for entry in model.metadata or []:
        if entry.name in (METADATA_NAME, METADATA_NAME.encode()):
            data = model.buffers[entry.buffer].data
            return json.loads(bytes(bytearray(data)).decode())
    return {}
