"""Simulated TensorRT Python API, refit part: Runtime.deserialize_cuda_engine, ICudaEngine
(refittable, serialize), Refitter (get_all_weights, set_named_weights, get_missing_weights,
refit_cuda_engine, max_threads) and, from 10.0 only, OnnxParserRefitter (refit_from_file,
refit_from_bytes, num_errors, get_error, clear_errors), with the names of docs/trtexec.md §13.

What it simulates (stdlib only; runs in the device's system python3):
- a plan is the one tests/fleet/trtexec_sim.py writes (header, JSON line, embedded ONNX); it
  deserializes only on the TensorRT version and compute capability it was built for (None and
  an error otherwise, as the real runtime returns None);
- an engine is refittable when it was built with --refit/--stripAllWeights/--stripWeights
  (BuilderFlag.REFIT); its refittable weights are the embedded ONNX's initializers, by name;
- set_named_weights(name, array) accepts anything with the buffer protocol (a numpy array) whose
  element count is the initializer's, and returns False otherwise (as the real one: a wrong name
  or a changed count); refit_from_file checks every initializer of the new ONNX the same way;
- refit_cuda_engine() sleeps build time x KILN_SIM_REFIT_RATIO (docs/trtexec.md §13 for the
  figure), writes the new weights into the embedded ONNX (so the simulated trtexec computes with
  them), and logs one line in the device's state/refits.log (never builds.log);
- faults: KILN_SIM_REFIT_FAULT=fail (refit_cuda_engine returns False) or drop-bias (Conv/Gemm
  biases zeroed in the refitted engine: NVIDIA's kREFIT known issue, docs/trtexec.md §13).
"""
import struct
import time

from . import _SIM, __version__
from . import onnx_reader
from .builder import IHostMemory, _ParserErrors, _trtexec_sim, sim_state_log, trt_version_tuple

__all__ = ["Runtime", "ICudaEngine", "Refitter"]
_VER = trt_version_tuple()
if _VER[0] >= 10:  # IParserRefitter is new in TensorRT 10.0
    __all__.append("OnnxParserRefitter")

_ELEMENT_BYTES = {1: 4, 2: 1, 3: 1, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 16: 2}   # onnx.TensorProto types
#: TensorProto fields holding data: float 4, int32 5, string 6, int64 7, raw 9, double 10, uint64 11,
#: external_data 13, data_location 14 (name 8, dims 1, data_type 2 stay)
_DATA_FIELDS = (4, 5, 6, 7, 9, 10, 11, 13, 14)


def _log(logger, text):
    logger.log(logger.Severity.ERROR, text)


# ---------------------------------------------------------------------------- protobuf writing

def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number, wire, value):
    key = _varint(number << 3 | wire)
    if wire == 0:
        return key + _varint(value)
    if wire == 1:
        return key + struct.pack("<Q", value)
    if wire == 5:
        return key + struct.pack("<I", value)
    data = bytes(value)
    return key + _varint(len(data)) + data


def _tensor_name(buf):
    for number, _, value in onnx_reader.fields(buf):
        if number == 8:
            return bytes(value).decode("utf-8", "replace")
    return ""


def _with_raw(tensor, raw):
    """A TensorProto with its data replaced by `raw` (raw_data, field 9)."""
    body = b"".join(_field(n, w, v) for n, w, v in onnx_reader.fields(tensor) if n not in _DATA_FIELDS)
    return body + _field(9, 2, raw)


_INT32_PACK = {2: "B", 3: "b", 4: "H", 5: "h", 6: "i", 9: "B", 10: "H"}   # types kept in int32_data


def _varints(wire, value):
    """A repeated varint field, packed or not -> signed 64-bit ints."""
    out = onnx_reader._packed_ints(wire, value)
    return [v - (1 << 64) if v >= 1 << 63 else v for v in out]


def _tensor_raw(tensor):
    """Little-endian bytes of a TensorProto's values, whichever field holds them (None: external)."""
    dtype, raw, chunks = 1, None, []
    for number, wire, value in onnx_reader.fields(tensor):
        if number == 2:
            dtype = value
        elif number == 9:
            raw = bytes(value)
        elif number in (4, 10):      # float_data / double_data: packed bytes are already little-endian
            chunks.append(bytes(value) if wire == 2 else struct.pack("<I" if number == 4 else "<Q", value))
        elif number == 5:
            chunks.append(b"".join(struct.pack("<" + _INT32_PACK.get(dtype, "i"), v) for v in _varints(wire, value)))
        elif number == 7:
            chunks.append(b"".join(struct.pack("<q", v) for v in _varints(wire, value)))
    return raw if raw is not None else (b"".join(chunks) if chunks else None)


def initializer_bytes(model):
    """{initializer name: little-endian bytes} of an ONNX's main graph."""
    out = {}
    for number, _, value in onnx_reader.fields(model):
        if number == 7:
            for n2, _, v2 in onnx_reader.fields(value):
                if n2 == 5:
                    out[_tensor_name(v2)] = _tensor_raw(v2)
    return out


def replace_initializers(model, raws):
    """ONNX bytes with the initializers named in `raws` {name: little-endian bytes} replaced."""
    out = []
    for number, wire, value in onnx_reader.fields(model):
        if number == 7:
            graph = []
            for n2, w2, v2 in onnx_reader.fields(value):
                if n2 == 5 and _tensor_name(v2) in raws:
                    v2 = _with_raw(v2, raws[_tensor_name(v2)])
                graph.append(_field(n2, w2, v2))
            value = b"".join(graph)
        out.append(_field(number, wire, value))
    return b"".join(out)


# ---------------------------------------------------------------------------- runtime and engine

class ICudaEngine(object):
    def __init__(self, meta, model):
        self._meta, self._model = meta, model

    @property
    def refittable(self):
        return (self._meta.get("refit") or {}).get("mode") in ("refit", "identical")

    def _initializers(self):
        return dict((i.name, i) for i in onnx_reader.read_model(self._model).initializers)

    def serialize(self):
        sim, meta = _trtexec_sim(), self._meta
        ident = {"trt": [int(p) for p in meta["trt"].split(".")] + [0] * (4 - len(meta["trt"].split("."))),
                 "compute": meta.get("compute", ""), "gpu": meta.get("gpu", "")}
        import hashlib
        extra = dict((k, meta[k]) for k in ("int8", "refit") if k in meta)
        data = sim.engine_bytes(ident, hashlib.sha256(self._model).hexdigest(), meta.get("precision", "fp32"),
                                self._model, meta.get("profile"), extra or None)
        return IHostMemory(data)


class Runtime(object):
    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine):
        sim = _trtexec_sim()
        data = bytes(serialized_engine)
        meta, problem = sim.read_engine_meta(data)
        model = sim.engine_onnx(data) if not problem else None
        running = ".".join(str(p) for p in _VER[:3])
        if problem or model is None:
            _log(self.logger, "1: [stdArchiveReader.cpp::StdArchiveReader::40] Error Code 1: Serialization "
                              "(Serialization assertion magicTagRead == kMAGIC_TAG failed.Magic tag does not match)")
            return None
        if ".".join(meta["trt"].split(".")[:3]) != running:
            _log(self.logger, "6: The engine plan file is not compatible with this version of TensorRT, expecting "
                              "library version %s got %s, please rebuild." % (running, meta["trt"]))
            return None
        if _SIM.get("compute") and meta.get("compute") and meta["compute"] != _SIM["compute"]:
            _log(self.logger, "6: The engine plan file is generated on an incompatible device, expecting compute "
                              "%s got compute %s, please rebuild." % (meta["compute"], _SIM["compute"]))
            return None
        return ICudaEngine(meta, model)


# ---------------------------------------------------------------------------- refitters

class Refitter(object):
    def __init__(self, engine, logger):
        self.engine, self.logger, self.max_threads = engine, logger, 1
        self.weights_validation = True
        self._all = engine._initializers() if engine.refittable else {}
        if not engine.refittable:
            _log(logger, "simulator: the engine was not built refittable (BuilderFlag.REFIT)")
        self._new = {}

    def get_all_weights(self):
        return sorted(self._all)

    def get_missing_weights(self):
        stripped = (self.engine._meta.get("refit") or {}).get("stripped") and \
            not (self.engine._meta.get("refit") or {}).get("refits")
        return sorted(n for n in self._all if n not in self._new) if stripped else []

    def _accept(self, name, raw, what):
        init = self._all.get(name)
        if init is None:
            _log(self.logger, "simulator: no refittable weights named %s" % name)
            return False
        count = _count(init)
        if len(raw) != count * _ELEMENT_BYTES.get(init.data_type, 4):
            _log(self.logger, "simulator: %s for %s has %d bytes, the engine's weights %d elements"
                 % (what, name, len(raw), count))
            return False
        self._new[name] = raw
        return True

    def set_named_weights(self, name, weights):
        try:
            raw = memoryview(weights).tobytes()
        except TypeError:
            _log(self.logger, "simulator: weights for %s are not a contiguous buffer" % name)
            return False
        return self._accept(name, raw, "Weights")

    def refit_cuda_engine(self):
        if not self.engine.refittable or self.get_missing_weights():
            return False
        if _SIM.get("refit_fault") == "fail":
            _log(self.logger, "simulator: refit_cuda_engine failed (KILN_SIM_REFIT_FAULT=fail)")
            return False
        seconds = float(_SIM.get("build_seconds") or 0.2) * float(_SIM.get("refit_ratio") or 0.2)
        time.sleep(seconds)
        raws = dict(self._new)
        if _SIM.get("refit_fault") == "drop-bias":  # the refitted engine computes without its biases
            for node in onnx_reader.read_model(self.engine._model).nodes:
                bias = node.inputs[2] if node.op_type in ("Conv", "Gemm") and len(node.inputs) > 2 else None
                if bias in self._all:
                    init = self._all[bias]
                    raws[bias] = bytes(_count(init) * _ELEMENT_BYTES.get(init.data_type, 4))
        import hashlib
        before = hashlib.sha256(self.engine._model).hexdigest()
        self.engine._model = replace_initializers(self.engine._model, raws)
        refit = dict(self.engine._meta.get("refit") or {})
        refit["refits"] = refit.get("refits", 0) + 1
        self.engine._meta = dict(self.engine._meta, refit=refit)
        sim_state_log("refits.log", {"trt": __version__, "weights": len(self._new),
                                     "onnx_sha256_before": before, "seconds": round(seconds, 3),
                                     "onnx_sha256_after": hashlib.sha256(self.engine._model).hexdigest(),
                                     "fault": _SIM.get("refit_fault") or None})
        return True


def _count(init):
    n = 1
    for d in init.dims:
        n *= d
    return n


class OnnxParserRefitter(_ParserErrors):
    def __init__(self, refitter, logger):
        _ParserErrors.__init__(self)
        self.refitter, self.logger = refitter, logger

    def refit_from_bytes(self, model, path=None):
        try:
            new = onnx_reader.read_model(bytes(model))
        except onnx_reader.OnnxReadError as exc:
            self._errors.append("ModelImporter.cpp: Failed to parse ONNX model: %s" % exc)
            return False
        ok, values = True, initializer_bytes(bytes(model))
        for init in new.initializers:
            if values.get(init.name) is None:
                self._errors.append("simulator: initializer %s holds no data here (external?)" % init.name)
                ok = False
            elif not self.refitter._accept(init.name, values[init.name], "initializer"):
                self._errors.append("[REFIT_FAILED] weights %s do not fit the engine" % init.name)
                ok = False
        return ok

    def refit_from_file(self, model):
        data = self._read_file(model)
        if data is None:
            self._errors.append("Failed to open file: %s" % model)
            return False
        return self.refit_from_bytes(data, model)
