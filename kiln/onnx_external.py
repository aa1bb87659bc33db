"""ONNX with external data (models over 2 GB): one graph file plus one data file, one artifact.

Layout. A protobuf message cannot exceed 2 GB, so a large model's weights live outside the
graph, in a file the graph names in each tensor's `external_data` `location`, resolved relative
to the graph file's folder by every reader (onnx, ONNX Runtime, TensorRT's ONNX parser:
docs/trtexec.md §11). enginekiln writes exactly one data file per graph, named by its own
sha256: `<sha256 of the data>.onnx.data`. So the graph's bytes name the data's digest, and the
graph's sha256 (the ONNX hash every key uses) covers graph and data as one artifact; two
versions of a model never share a data file name, and the data file can sit next to any
graph (in artifacts/onnx/, in `.kiln/inputs/` on a device) without a folder of its own.

Security: a `location` is a path the device's tools open. Only a name matching `LOCATION`
is accepted (no folder, no `..`, nothing absolute): `check_graph` reads the graph (without its
weights) and refuses any other, before the graph is sent anywhere.

Memory: weights are copied to the data file in blocks, and digests are streamed; nothing
reads a whole data file into memory. Only the graph (without weights) is parsed.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import ExportError, KilnError
from kiln.files import CHUNK, fsync_dir

__all__ = ["DATA_SUFFIX", "LOCATION", "ExternalData", "data_location", "check_location", "graph_locations",
           "check_graph", "pack_external_data", "needs_packing"]

DATA_SUFFIX = ".onnx.data"
#: the only external-data location accepted: `<sha256>.onnx.data`, a plain name in the graph's folder
LOCATION = re.compile(r"[0-9a-f]{64}\.onnx\.data")
#: tensors smaller than this stay inside the graph (onnx's own default threshold)
SIZE_THRESHOLD = 1024
#: each tensor starts on a page boundary in the data file, so readers may map it in place
ALIGN = 4096


@dataclass(frozen=True)
class ExternalData:
    """The data file of an ONNX graph, as the export record holds it."""
    location: str   # file name next to the graph, `<sha256>.onnx.data`
    sha256: str
    size: int

    def to_record(self) -> dict:
        return {"location": self.location, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_record(cls, record: dict, model: str | None = None) -> "ExternalData | None":
        """The record's `external_data`, checked; None for a single-file ONNX."""
        raw = record.get("external_data")
        if not raw:
            return None
        if not isinstance(raw, dict):
            raise ExportError("the export record's external_data is not a table", model=model,
                              hint="export the model again (`doit forget export:<model>`, then run)")
        data = cls(str(raw.get("location")), str(raw.get("sha256")), int(raw.get("size") or 0))
        check_location(data.location, model=model)
        if data.location != data_location(data.sha256):
            raise ExportError(f"external data {data.location!r} is not named by its sha256 {data.sha256[:12]}",
                              model=model, hint="export the model again")
        return data


def data_location(sha256: str) -> str:
    return f"{sha256}{DATA_SUFFIX}"


def check_location(location: object, model: str | None = None) -> str:
    """A location enginekiln accepts: `<sha256>.onnx.data`; anything else (a folder, `..`, an
    absolute path, another name) is refused: the tools on the device would open it."""
    if not isinstance(location, str) or not LOCATION.fullmatch(location):
        raise ExportError(f"refusing ONNX external data at {location!r}: only a plain file name "
                          f"'<sha256>{DATA_SUFFIX}' next to the graph is accepted (no folders, no '..')",
                          model=model, hint="export the model with enginekiln (it writes one data file named by "
                                            "its sha256); never use an ONNX whose data points elsewhere")
    return location


def _all_tensors(proto):
    """(tensor, is_initializer) for every tensor that may hold external data: initializers and
    attribute tensors of the graph and its subgraphs, then those of the model's functions."""
    stack = [proto.graph]
    while stack:
        g = stack.pop()
        for tensor in g.initializer:
            yield tensor, True
        yield from _attribute_tensors(g.node, stack)
    for function in proto.functions:
        yield from _attribute_tensors(function.node, None)


def _attribute_tensors(nodes, subgraphs: list | None):
    """(tensor, False) for the tensors in the nodes' attributes; their subgraphs go onto
    `subgraphs` (when given) to be walked next."""
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t, False
            for tensor in attr.tensors:
                yield tensor, False
            if subgraphs is not None:
                if attr.HasField("g"):
                    subgraphs.append(attr.g)
                subgraphs.extend(attr.graphs)


def _is_external(tensor) -> bool:
    from onnx import TensorProto
    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


def _entries(tensor) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def graph_locations(graph: Path | str) -> set[str]:
    """The external-data locations a graph file names (its weights are not read)."""
    import onnx
    proto = onnx.load(str(graph), load_external_data=False)
    return {_entries(t).get("location", "") for t, _ in _all_tensors(proto) if _is_external(t)}


#: a serialized TensorProto.external_data entry whose key is "location" (StringStringEntryProto:
#: key = field 1, value = field 2): every external tensor carries one
_LOCATION_KEY = b"\x0a\x08location\x12"


def _mentions_location(path: Path | str) -> bool:
    """Whether the file holds a serialized `location` entry: a streamed scan, so a single-file ONNX
    of up to 2 GB is not parsed into memory just to learn it names no external data."""
    tail = b""
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            if _LOCATION_KEY in tail + block:
                return True
            tail = block[-len(_LOCATION_KEY):]
    return False


def check_graph(graph: Path | str, expected: ExternalData | None, model: str | None = None) -> None:
    """The graph names exactly the data file its record says (or none for a single-file ONNX),
    and that name is an accepted location. Raises ExportError otherwise. A single-file ONNX is
    only scanned (streamed); the graph is parsed (without its weights) when it names data."""
    if expected is None and not _mentions_location(graph):
        return
    try:
        found = graph_locations(graph)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and others
        raise ExportError(f"cannot read the ONNX graph {graph}: {exc}", model=model,
                          hint="export the model again") from exc
    for location in sorted(found):
        check_location(location, model=model)
    want = {expected.location} if expected else set()
    if found != want:
        raise ExportError(f"the ONNX graph names external data {sorted(found) or 'none'}, its record "
                          f"{sorted(want) or 'none'}", model=model, hint="export the model again")


def needs_packing(folder: Path | str, graph_name: str) -> bool:
    """The exporter wrote more than the graph into `folder` (weights outside it: torch writes
    them once a model passes 2 GB, one file per tensor or one `.data` file)."""
    return any(p.name != graph_name for p in Path(folder).iterdir())


def pack_external_data(src: Path, dest_dir: Path, *, threshold: int = SIZE_THRESHOLD,
                       model: str | None = None) -> tuple[Path, ExternalData | None]:
    """Rewrite graph `src` (whose external data, if any, is next to it) into `dest_dir` as
    `model.onnx` plus one data file `<sha256>.onnx.data` holding every initializer of at least
    `threshold` bytes and every tensor that was external already, in graph order, each at a
    page-aligned offset. Deterministic: the same graph and weights give the same bytes.
    Returns (graph path, its data) - data None when no tensor qualified (a single file)."""
    import onnx
    proto = onnx.load(str(src), load_external_data=False)
    dest_dir.mkdir(parents=True, exist_ok=True)
    part = dest_dir / "data.part"
    digest, offset, moved = hashlib.sha256(), 0, []
    with open(part, "wb") as out:
        for tensor, initializer in _all_tensors(proto):
            if _is_external(tensor):
                length = _copy_external(tensor, src.parent, out, digest, offset, model)
            elif initializer and tensor.HasField("raw_data") and len(tensor.raw_data) >= threshold:
                length = _write_padded(out, digest, offset, tensor.raw_data)
                tensor.ClearField("raw_data")
            else:
                continue
            start = offset + (-offset % ALIGN)
            moved.append((tensor, start, length))
            offset = start + length
        out.flush()
        os.fsync(out.fileno())
    graph = dest_dir / "model.onnx"
    if not moved:
        part.unlink()
        onnx.save(proto, str(graph))
        return graph, None
    data = ExternalData(data_location(digest.hexdigest()), digest.hexdigest(), offset)
    os.replace(part, dest_dir / data.location)
    for tensor, start, length in moved:
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", data.location), ("offset", str(start)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    onnx.save(proto, str(graph))
    fsync_dir(dest_dir)
    return graph, data


def _pad(out, digest, offset: int) -> None:
    gap = -offset % ALIGN
    if gap:
        zeros = bytes(gap)
        out.write(zeros)
        digest.update(zeros)


def _write_padded(out, digest, offset: int, data: bytes) -> int:
    _pad(out, digest, offset)
    out.write(data)
    digest.update(data)
    return len(data)


def _copy_external(tensor, folder: Path, out, digest, offset: int, model: str | None) -> int:
    """Copy one external tensor (as the exporter wrote it, next to its graph) into `out`, in blocks."""
    info = _entries(tensor)
    location = info.get("location", "")
    path = (folder / location).resolve()
    if not location or os.path.isabs(location) or path.parent != folder.resolve():
        raise ExportError(f"the exporter wrote tensor {tensor.name!r} to {location!r}, outside its folder",
                          model=model, hint="report this: torch.onnx wrote an unexpected layout")
    start = int(info.get("offset") or 0)
    try:
        size = path.stat().st_size
        length = int(info["length"]) if info.get("length") else size - start
        if start < 0 or length < 0 or start + length > size:
            raise ExportError(f"external tensor {tensor.name!r}: offset {start} + length {length} is beyond "
                              f"{location} ({size} bytes)", model=model, hint="export again")
        _pad(out, digest, offset)
        with open(path, "rb") as f:
            f.seek(start)
            left = length
            while left:
                block = f.read(min(CHUNK, left))
                if not block:
                    raise ExportError(f"{location} ended early", model=model, hint="export again")
                out.write(block)
                digest.update(block)
                left -= len(block)
    except OSError as exc:
        raise KilnError(f"cannot read the exporter's external data {path}: {exc.strerror}", model=model) from exc
    return length
