"""A minimal ONNX (protobuf) reader for the simulated `tensorrt` package (stdlib only, Python 3.6+).

The device's system python3 has neither `onnx` nor numpy, so the simulated OnnxParser reads
the few fields it needs straight from the protobuf wire format (onnx/onnx.proto field numbers):
  ModelProto  ir_version=1 graph=7 opset_import=8 metadata_props=14
  GraphProto  node=1 name=2 initializer=5 input=11 output=12
  NodeProto   input=1 output=2 name=3 op_type=4 domain=7
  ValueInfoProto name=1 type=2; TypeProto tensor_type=1; TypeProto.Tensor elem_type=1 shape=2
  TensorShapeProto dim=1; Dimension dim_value=1 dim_param=2
  TensorProto dims=1 data_type=2 name=8 raw_data=9 (external data: data_location=14, external_data=13)
Anything else is skipped. A malformed message raises OnnxReadError.
"""
import struct


class OnnxReadError(ValueError):
    pass


def _varint(buf, pos):
    result, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise OnnxReadError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise OnnxReadError("varint too long")


def fields(buf):
    """Yield (field number, wire type, value) of one message; value is an int or a memoryview."""
    buf = memoryview(buf)
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack("<Q", buf[pos:pos + 8])[0], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise OnnxReadError("truncated field %d" % number)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = struct.unpack("<I", buf[pos:pos + 4])[0], pos + 4
        else:
            raise OnnxReadError("unsupported wire type %d" % wire)
        if pos > end:
            raise OnnxReadError("truncated message")
        yield number, wire, value


def _text(value):
    return bytes(value).decode("utf-8", "replace")


def _packed_ints(wire, value):
    if wire == 0:
        return [value]
    out, pos = [], 0
    while pos < len(value):
        v, pos = _varint(value, pos)
        out.append(v)
    return out


class ValueInfo(object):
    def __init__(self, name, elem_type, dims):
        self.name, self.elem_type, self.dims = name, elem_type, dims   # dims: int or str (dim_param) or None

    def __repr__(self):
        return "ValueInfo(%r, %r, %r)" % (self.name, self.elem_type, self.dims)


class Node(object):
    def __init__(self, name, op_type, domain, inputs, outputs):
        self.name, self.op_type, self.domain, self.inputs, self.outputs = name, op_type, domain, inputs, outputs


class Initializer(object):
    def __init__(self, name, data_type, dims, raw_data, external):
        self.name, self.data_type, self.dims = name, data_type, dims
        self.raw_data = raw_data          # bytes or None (then float_data etc., or external)
        self.external = external          # {"location": ..., "offset": ..., "length": ...} or None


class Model(object):
    def __init__(self):
        self.ir_version = None
        self.opsets = {}
        self.nodes, self.initializers, self.inputs, self.outputs = [], [], [], []
        self.metadata = {}

    @property
    def graph_inputs(self):
        """Inputs that are not initializers (IR < 4 lists initializers as inputs too)."""
        weights = set(i.name for i in self.initializers)
        return [i for i in self.inputs if i.name not in weights]

    def op_types(self):
        return set(n.op_type for n in self.nodes)


def _value_info(buf):
    name, elem, dims = "", 0, None
    for number, _, value in fields(buf):
        if number == 1:
            name = _text(value)
        elif number == 2:
            for n2, _, tensor in fields(value):
                if n2 != 1:
                    continue
                for n3, _, v3 in fields(tensor):
                    if n3 == 1:
                        elem = v3
                    elif n3 == 2:
                        dims = []
                        for n4, _, dim in fields(v3):
                            if n4 != 1:
                                continue
                            d = None
                            for n5, _, v5 in fields(dim):
                                d = v5 if n5 == 1 else _text(v5) if n5 == 2 else d
                            dims.append(d)
    return ValueInfo(name, elem, dims)


def _node(buf):
    name, op, domain, ins, outs = "", "", "", [], []
    for number, _, value in fields(buf):
        if number == 1:
            ins.append(_text(value))
        elif number == 2:
            outs.append(_text(value))
        elif number == 3:
            name = _text(value)
        elif number == 4:
            op = _text(value)
        elif number == 7:
            domain = _text(value)
    return Node(name, op, domain, ins, outs)


def _initializer(buf):
    name, dtype, dims, raw, external, location = "", 0, [], None, None, 0
    for number, wire, value in fields(buf):
        if number == 1:
            dims.extend(_packed_ints(wire, value))
        elif number == 2:
            dtype = value
        elif number == 8:
            name = _text(value)
        elif number == 9:
            raw = bytes(value)
        elif number == 13:
            key = val = ""
            for n2, _, v2 in fields(value):
                key = _text(v2) if n2 == 1 else key
                val = _text(v2) if n2 == 2 else val
            external = external or {}
            external[key] = val
        elif number == 14:
            location = value
    return Initializer(name, dtype, dims, raw, external if location == 1 else None)


def read_model(data):
    """ONNX bytes -> Model; raises OnnxReadError if it is not a ModelProto with a graph."""
    if not data or data[:1] != b"\x08":
        raise OnnxReadError("not an ONNX ModelProto (no ir_version first)")
    model, graph = Model(), None
    for number, _, value in fields(data):
        if number == 1:
            model.ir_version = value
        elif number == 7:
            graph = value
        elif number == 8:
            domain, version = "", 0
            for n2, _, v2 in fields(value):
                domain = _text(v2) if n2 == 1 else domain
                version = v2 if n2 == 2 else version
            model.opsets[domain] = version
        elif number == 14:
            key = val = ""
            for n2, _, v2 in fields(value):
                key = _text(v2) if n2 == 1 else key
                val = _text(v2) if n2 == 2 else val
            model.metadata[key] = val
    if graph is None:
        raise OnnxReadError("the model has no graph")
    for number, _, value in fields(graph):
        if number == 1:
            model.nodes.append(_node(value))
        elif number == 5:
            model.initializers.append(_initializer(value))
        elif number == 11:
            model.inputs.append(_value_info(value))
        elif number == 12:
            model.outputs.append(_value_info(value))
    return model
