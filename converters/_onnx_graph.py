"""ONNX graph rewrites: output names, opset-safe Softmax, shared weights, metadata."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeopt.errors import ConversionError

# Before opset 13, Softmax, LogSoftmax and Hardmax flatten the input to 2-D at `axis` and
# normalise over all trailing dimensions together. From opset 13 they normalise over `axis` only.
SOFTMAX_FAMILY = ("Softmax", "LogSoftmax", "Hardmax")


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """Yield `graph` and every subgraph nested in its nodes' attributes (If, Loop, Scan)."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from iter_graphs(subgraph)


def rename_value(model: onnx.ModelProto, old: str, new: str) -> None:
    """Rename tensor `old` to `new` wherever a node, a graph output or a value_info uses it."""
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            node.input[:] = [new if name == old else name for name in node.input]
            node.output[:] = [new if name == old else name for name in node.output]
        for value in list(graph.output) + list(graph.value_info):
            if value.name == old:
                value.name = new
        for initializer in graph.initializer:
            if initializer.name == old:
                initializer.name = new


def _all_value_names(graph: onnx.GraphProto) -> set[str]:
    names = {value.name for value in graph.input} | {init.name for init in graph.initializer}
    for node in graph.node:
        names.update(node.output)
    return names


def set_output_names(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Give the graph outputs `names`, in order, inserting Identity nodes where a rename is unsafe.

    A rename is unsafe when the output is also a graph input or initializer, when two outputs are
    the same tensor, or when the new name is already taken by another tensor.
    """
    graph = model.graph
    if len(graph.output) != len(names):
        raise ConversionError(
            f"the exported graph has {len(graph.output)} outputs but the model returns "
            f"{len(names)} ({list(names)})"
        )
    # Outputs whose current name another output should take (a swap) move to a temporary name.
    for index, output in enumerate(graph.output):
        produced = any(output.name in node.output for node in graph.node)
        if output.name != names[index] and output.name in names and produced:
            rename_value(model, output.name, f"{output.name}__swap{index}")
    old_names = [output.name for output in graph.output]
    input_names = {value.name for value in graph.input}
    for old, new in zip(old_names, names, strict=True):
        # Move an unrelated tensor (a constant named `zeros`, say) out of the way of the name.
        if new != old and new in _all_value_names(graph) and new not in old_names:
            if new in input_names:
                raise ConversionError(f"output name {new!r} is already the name of a graph input")
            rename_value(model, new, f"{new}__renamed")
    for index, (old, new) in enumerate(zip(old_names, names, strict=True)):
        if old == new:
            continue
        used_names = _all_value_names(graph)
        produced_by_node = any(old in node.output for node in graph.node)
        shared = old_names.count(old) > 1
        if produced_by_node and not shared and new not in used_names:
            rename_value(model, old, new)
            old_names[index] = new
            continue
        graph.node.append(helper.make_node("Identity", [old], [new], name=f"rename_{new}"))
        graph.output[index].name = new
        old_names[index] = new


def set_input_names(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Rename the graph's non-initializer inputs to `names`, in order."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    if len(inputs) != len(names):
        raise ConversionError(
            f"the exported graph has {len(inputs)} inputs but {len(names)} names were given"
        )
    for value, new in zip(inputs, names, strict=True):
        old = value.name
        if old == new:
            continue
        for graph in iter_graphs(model.graph):
            for node in graph.node:
                node.input[:] = [new if name == old else name for name in node.input]
        value.name = new


def make_softmax_axis_last(model: onnx.ModelProto) -> int:
    """Rewrite Softmax-family nodes so that they normalise over the last axis.

    Normalising over the last axis means the same thing under the pre-13 (flatten from `axis`)
    and the 13+ (single axis) definitions, so the model keeps its meaning when the version
    converter lowers the opset. Other axes get a Transpose pair around the node. The model must
    carry shapes (run shape inference first). Returns the number of nodes rewritten.
    """
    ranks = {}
    for value in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            ranks[value.name] = len(value.type.tensor_type.shape.dim)
    new_nodes = []
    rewritten = 0
    for node in model.graph.node:
        if node.op_type not in SOFTMAX_FAMILY:
            new_nodes.append(node)
            continue
        rank = ranks.get(node.input[0])
        if rank is None:
            raise ConversionError(
                f"cannot lower {node.op_type} node {node.name!r} below opset 13 because the rank "
                "of its input is unknown; export at opset 13 or later"
            )
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        axis = axis + rank if axis < 0 else axis
        if axis == rank - 1:
            new_nodes.append(node)
            continue
        perm = list(range(rank))
        perm[axis], perm[-1] = perm[-1], perm[axis]
        moved_in = f"{node.output[0]}__axis_last_in"
        moved_out = f"{node.output[0]}__axis_last_out"
        new_nodes.append(
            helper.make_node(
                "Transpose", [node.input[0]], [moved_in], perm=perm, name=f"{node.name}_to_last"
            )
        )
        new_nodes.append(
            helper.make_node(node.op_type, [moved_in], [moved_out], axis=rank - 1, name=node.name)
        )
        new_nodes.append(
            helper.make_node(
                "Transpose",
                [moved_out],
                [node.output[0]],
                perm=perm,
                name=f"{node.name}_from_last",
            )
        )
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return rewritten


def _tensor_key(array: np.ndarray) -> tuple[str, tuple[int, ...], str]:
    digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
    return str(array.dtype), tuple(array.shape), digest


def deduplicate_initializers(model: onnx.ModelProto, min_bytes: int = 1024) -> list[str]:
    """Store each weight once: merge identical initializers, and rebuild transposed copies.

    A weight shared by two modules (an embedding tied to the output projection) can reach the
    file twice, as the same bytes or, after constant folding, as its transpose. Identical copies
    are replaced by references to the first; a 2-D initializer equal to the transpose of another
    becomes a Transpose node. Only initializers of at least `min_bytes` are considered. Returns
    the names removed.
    """
    graph = model.graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    first_by_key: dict[tuple[str, tuple[int, ...], str], str] = {}
    replacements: dict[str, str] = {}
    transposed: dict[str, str] = {}
    for name, array in arrays.items():
        if array.nbytes < min_bytes:
            continue
        key = _tensor_key(array)
        if key in first_by_key:
            replacements[name] = first_by_key[key]
            continue
        if array.ndim == 2:
            transpose_key = _tensor_key(array.T)
            if transpose_key in first_by_key:
                transposed[name] = first_by_key[transpose_key]
                continue
        first_by_key[key] = name
    if not replacements and not transposed:
        return []
    for sub in iter_graphs(graph):
        for node in sub.node:
            node.input[:] = [replacements.get(name, name) for name in node.input]
    removed = set(replacements) | set(transposed)
    remaining = [init for init in graph.initializer if init.name not in removed]
    del graph.initializer[:]
    graph.initializer.extend(remaining)
    graph_inputs = [value for value in graph.input if value.name not in removed]
    del graph.input[:]
    graph.input.extend(graph_inputs)
    for name, source in transposed.items():
        graph.node.insert(
            0, helper.make_node("Transpose", [source], [name], perm=[1, 0], name=f"tied_{name}")
        )
    return sorted(removed)


def set_metadata(model: onnx.ModelProto, metadata: Mapping[str, str]) -> None:
    """Write `metadata` into `metadata_props`, replacing entries with the same keys."""
    existing = {prop.key: prop.value for prop in model.metadata_props}
    existing.update({str(key): str(value) for key, value in metadata.items()})
    del model.metadata_props[:]
    for key, value in existing.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def training_mode_batch_norms(model: onnx.ModelProto) -> list[str]:
    """List BatchNormalization nodes exported in training mode (`training_mode=1`)."""
    names = []
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            if node.op_type != "BatchNormalization":
                continue
            if any(a.name == "training_mode" and a.i == 1 for a in node.attribute):
                names.append(node.name)
    return names
