"""An ONNX model's architecture and its weights, told apart (for refitting engines).

`architecture_sha256` digests the model with every initializer's *values* removed: graph,
nodes, attributes, inputs/outputs, opsets, metadata (the declared input ranges) and each
initializer's name, dims and data type stay. Two exports whose digests are equal differ in
weights only, so an engine built from one can be refitted with the other's weights (TensorRT
names refittable weights after the ONNX initializers: docs/trtexec.md §13). Constant nodes
keep their values in the digest: a change there counts as a graph change (a rebuild), which
is never wrong, only slower.

`save_initializers` writes the initializers as a deterministic .npz for devices whose TensorRT
has no ONNX parser refitter (8.x: the refit script sets each weight by name from it).
Heavy imports (onnx) happen inside the functions: only an export or a refit needs them.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

_VALUE_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data",
                 "uint64_data", "external_data")


def _strip_values(tensor) -> None:
    for name in _VALUE_FIELDS:
        tensor.ClearField(name)


def architecture_sha256(path: Path | str) -> str:
    """sha256 of the ONNX at `path` with initializer values removed (names, dims, types kept)."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    graphs = [model.graph]
    while graphs:  # subgraphs (If/Loop bodies) carry initializers too
        graph = graphs.pop()
        for tensor in graph.initializer:
            _strip_values(tensor)
        for sparse in graph.sparse_initializer:
            _strip_values(sparse.values)
            _strip_values(sparse.indices)
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def initializer_arrays(path: Path | str) -> dict:
    """{initializer name: numpy array} of the main graph (what a refit sets, by name)."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def save_initializers(path: Path | str, dest: Path | str) -> None:
    """The ONNX's initializers as an .npz whose bytes depend only on them (atomic)."""
    from kiln.device_side.agent import save_arrays
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    save_arrays(str(dest), initializer_arrays(path))
