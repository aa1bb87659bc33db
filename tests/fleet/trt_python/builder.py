"""Simulated TensorRT Python API, builder part: Logger, Builder, INetworkDefinition, OnnxParser,
IBuilderConfig, BuilderFlag, MemoryPoolType, IOptimizationProfile, ITimingCache, IHostMemory and
the INT8 calibrator interfaces (IInt8EntropyCalibrator2 & co.), with the names and behaviour of
TensorRT 8.5 and 10.x (docs/trtexec.md §8 and §10, with sources).

What it simulates (stdlib only; runs in the device's system python3):
- OnnxParser reads the ONNX with onnx_reader (inputs, outputs, nodes); a file that is no
  ModelProto fails to parse with the real error text.
- build_serialized_network returns the plan trtexec_sim.py writes (the same header, metadata and
  embedded ONNX, so the simulated trtexec loads and runs it), or None on failure after logging
  the real error lines.
- INT8 (BuilderFlag.INT8): a network with QuantizeLinear/DequantizeLinear nodes is explicitly
  quantized (a calibrator is ignored, with TensorRT's warning); otherwise the config's
  int8_calibrator must give the scales: its read_calibration_cache() is used when its header
  matches this TensorRT and algorithm, else calibration runs: get_batch_size(), then
  get_batch(input names) until it returns None/[]; each pointer is read as device memory (the
  simulated cuda-python allocates host memory: tests/fleet/cuda_python), the max-abs of each
  input is its range, and write_calibration_cache() receives the cache in TensorRT's text format.
  No calibrator, no Q/DQ: "Calibration failure occurred with no scaling factors detected" and None.
  Each calibration is logged in the device's state/calibrations.log, each build in builds.log.
"""
import array
import ctypes
import enum
import hashlib
import json
import os
import struct
import sys
import time

from . import __version__, _SIM
from . import onnx_reader

__all__ = ["Logger", "ILogger", "Builder", "INetworkDefinition", "ITensor", "OnnxParser", "ParserError",
           "IBuilderConfig", "BuilderFlag", "MemoryPoolType", "NetworkDefinitionCreationFlag", "DataType",
           "IOptimizationProfile", "ITimingCache", "IHostMemory", "CalibrationAlgoType", "IInt8Calibrator",
           "IInt8EntropyCalibrator2", "IInt8EntropyCalibrator", "IInt8MinMaxCalibrator", "IInt8LegacyCalibrator",
           "trt_version_tuple", "sim_state_log", "DeviceType"]


def trt_version_tuple():
    parts = [int("".join(c for c in p if c.isdigit()) or 0) for p in __version__.split(".")]
    return tuple((parts + [0, 0, 0, 0])[:4])


_VER = trt_version_tuple()


def _banner_number():
    """8502 for 8.5.2, 100300 for 10.3.0: trtexec's banner number, also the calibration cache's."""
    major, minor, patch = _VER[:3]
    return major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch


def sim_state_log(name, record):
    """Append one JSON line to the device's state/<name> (the test harness counts them)."""
    state = _SIM.get("state")
    if not state:
        return
    try:
        os.makedirs(state, exist_ok=True)
        record = dict(record, ts=round(time.time(), 3))
        with open(os.path.join(state, name), "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
    except OSError:
        pass


def _trtexec_sim():
    """tests/fleet/trtexec_sim.py, for the plan format (one format for both simulated builders)."""
    mod = sys.modules.get("_kiln_trtexec_sim")
    if mod is None:
        import importlib.util
        spec = importlib.util.spec_from_file_location("_kiln_trtexec_sim", _SIM["trtexec_sim"])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules["_kiln_trtexec_sim"] = mod
    return mod


# ---------------------------------------------------------------------------- logging

class ILogger(object):
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = (Severity.INTERNAL_ERROR, Severity.ERROR, Severity.WARNING,
                                                     Severity.INFO, Severity.VERBOSE)

    def log(self, severity, msg):
        raise NotImplementedError


class Logger(ILogger):
    """trt.Logger(min_severity=WARNING): prints `[MM/DD/YYYY-HH:MM:SS] [TRT] [W] msg` (to stderr, as
    the bindings' default logger; docs/trtexec.md §10)."""

    def __init__(self, min_severity=ILogger.Severity.WARNING):
        self.min_severity = min_severity

    def log(self, severity, msg):
        if int(severity) <= int(self.min_severity):
            tag = "FEWIV"[int(severity)]
            sys.stderr.write("%s [TRT] [%s] %s\n" % (time.strftime("[%m/%d/%Y-%H:%M:%S]"), tag, msg))
            sys.stderr.flush()


# ---------------------------------------------------------------------------- enums

class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    if _VER >= (8, 6):
        FP8 = 6
    if _VER >= (10, 0):
        BF16 = 7
        INT64 = 8
        INT4 = 9


#: ONNX TensorProto.DataType -> TensorRT DataType name (INT64 I/O becomes INT32 before 10.0)
_ONNX_TYPES = {1: "FLOAT", 10: "HALF", 3: "INT8", 6: "INT32", 9: "BOOL", 2: "UINT8",
               7: "INT64" if _VER >= (10, 0) else "INT32", 11: "FLOAT"}


class DeviceType(enum.IntEnum):
    GPU = 0
    DLA = 1


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0          # 10.x: deprecated and ignored (every network is explicit batch)
    if _VER < (10, 0):
        EXPLICIT_PRECISION = 1  # 8.x: deprecated, ignored
    if _VER >= (10, 0):
        STRONGLY_TYPED = 1


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0
    DLA_MANAGED_SRAM = 1
    DLA_LOCAL_DRAM = 2
    DLA_GLOBAL_DRAM = 3
    if _VER >= (8, 6):
        TACTIC_DRAM = 4
    if _VER >= (10, 0):
        TACTIC_SHARED_MEMORY = 5


_FLAGS_85 = ["FP16", "INT8", "DEBUG", "GPU_FALLBACK", "STRICT_TYPES", "REFIT", "DISABLE_TIMING_CACHE", "TF32",
             "SPARSE_WEIGHTS", "SAFETY_SCOPE", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS",
             "DIRECT_IO", "REJECT_EMPTY_ALGORITHMS", "ENABLE_TACTIC_HEURISTIC"]
_FLAGS_10 = ["FP16", "INT8", "DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32", "SPARSE_WEIGHTS",
             "SAFETY_SCOPE", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO",
             "REJECT_EMPTY_ALGORITHMS", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "FP8",
             "ERROR_ON_TIMING_CACHE_MISS", "BF16", "DISABLE_COMPILATION_CACHE", "STRIP_PLAN", "REFIT_IDENTICAL",
             "WEIGHT_STREAMING"]
#: the builder flags of this TensorRT, in NvInfer.h order (8.5: STRICT_TYPES still there; 10.x: STRIP_PLAN ...)
BuilderFlag = enum.IntEnum("BuilderFlag", [(n, i) for i, n in enumerate(_FLAGS_10 if _VER >= (10, 0) else _FLAGS_85)])


class CalibrationAlgoType(enum.IntEnum):
    LEGACY_CALIBRATION = 0
    ENTROPY_CALIBRATION = 1
    ENTROPY_CALIBRATION_2 = 2
    MINMAX_CALIBRATION = 3


#: the calibration cache header word per algorithm (`TRT-8502-EntropyCalibration2`)
_ALGO_WORDS = {CalibrationAlgoType.LEGACY_CALIBRATION: "LegacyCalibration",
               CalibrationAlgoType.ENTROPY_CALIBRATION: "EntropyCalibration",
               CalibrationAlgoType.ENTROPY_CALIBRATION_2: "EntropyCalibration2",
               CalibrationAlgoType.MINMAX_CALIBRATION: "MinMaxCalibration"}


# ---------------------------------------------------------------------------- memory

class IHostMemory(bytes):
    """Serialized plan / cache: supports the buffer protocol (`bytes(memoryview(m))`), `nbytes`."""

    @property
    def nbytes(self):
        return len(self)

    @property
    def dtype(self):
        return DataType.UINT8


class ITimingCache(object):
    def __init__(self, blob):
        self._blob = bytes(blob)

    def serialize(self):
        line = "KILNSIM-TIMING-CACHE %s %s api\n" % (".".join(map(str, _VER)), _SIM.get("compute", ""))
        return IHostMemory(line.encode())

    def combine(self, other, ignore_mismatch):
        return True

    def reset(self):
        return True


# ---------------------------------------------------------------------------- network

class ITensor(object):
    def __init__(self, name, shape, dtype, is_input):
        self.name, self.shape, self.dtype = name, tuple(shape), dtype
        self.is_network_input, self.is_network_output = is_input, not is_input

    def __repr__(self):
        return "<ITensor %s %s>" % (self.name, self.shape)


class INetworkDefinition(object):
    def __init__(self, flags):
        self.flags = flags
        self._inputs, self._outputs, self._model, self._onnx = [], [], None, None
        self._externals = {}   # external weights the parser read next to the ONNX file {location: bytes}

    @property
    def num_inputs(self):
        return len(self._inputs)

    @property
    def num_outputs(self):
        return len(self._outputs)

    @property
    def num_layers(self):
        return len(self._model.nodes) if self._model else 0

    def get_input(self, index):
        return self._inputs[index]

    def get_output(self, index):
        return self._outputs[index]

    def _load(self, data):
        model = onnx_reader.read_model(data)

        def tensor(info, is_input):
            shape = [d if isinstance(d, int) and d > 0 else -1 for d in (info.dims or [])]
            return ITensor(info.name, shape, getattr(DataType, _ONNX_TYPES.get(info.elem_type, "FLOAT")), is_input)
        self._inputs = [tensor(i, True) for i in model.graph_inputs]
        self._outputs = [tensor(o, False) for o in model.outputs]
        self._model, self._onnx = model, bytes(data)


class ParserError(object):
    def __init__(self, desc, node=-1, code=1):
        self._desc, self._node, self._code = desc, node, code

    def desc(self):
        return self._desc

    def node(self):
        return self._node

    def code(self):
        return self._code

    def __str__(self):
        return "In node %d (parseGraph): INVALID_GRAPH: %s" % (self._node, self._desc)


class _ParserErrors(object):
    """The error list both ONNX parsers share (OnnxParser here, OnnxParserRefitter in refit.py)."""

    def __init__(self):
        self._errors = []

    @property
    def num_errors(self):
        return len(self._errors)

    def get_error(self, index):
        return self._errors[index]

    def clear_errors(self):
        self._errors = []

    def _read_file(self, model):
        """The file's bytes, or None when it cannot be opened."""
        try:
            with open(model, "rb") as f:
                return f.read()
        except OSError:
            return None


class OnnxParser(_ParserErrors):
    def __init__(self, network, logger):
        _ParserErrors.__init__(self)
        self.network, self.logger = network, logger

    def parse(self, model, path=None):
        try:
            self.network._load(bytes(model))
        except onnx_reader.OnnxReadError as exc:
            where = "ModelImporter.cpp:735" if _VER < (10, 0) else "ModelImporter.cpp:1001"
            self.logger.log(ILogger.ERROR, "%s: Failed to parse ONNX model from file: %s" % (where, path or "<bytes>"))
            self._errors.append(ParserError("Failed to parse ONNX model: %s" % exc))
            return False
        # external weights, relative to the ONNX file's folder (`path`; without it, as the real parser,
        # relative to the working folder): trtexec_sim's reader, docs/trtexec.md §11
        externals, problems = _trtexec_sim().read_external_weights(path or "", bytes(model), _VER[:2])
        if problems:
            for line in problems:
                self.logger.log(ILogger.ERROR, line.replace("[TRT] ", "", 1))
                self._errors.append(ParserError(line.replace("[TRT] ", "", 1)))
            return False
        self.network._externals = externals
        return True

    def parse_from_file(self, model):
        data = self._read_file(model)
        if data is None:
            self.logger.log(ILogger.ERROR, "Could not open file %s" % model)
            self._errors.append(ParserError("Could not open file %s" % model))
            return False
        return self.parse(data, model)


# ---------------------------------------------------------------------------- calibrators

class IInt8Calibrator(object):
    """Subclass it (calling the base __init__) and implement get_batch_size, get_batch(names),
    read_calibration_cache and write_calibration_cache, as TensorRT's samples do."""

    def __init__(self):
        pass

    def get_batch_size(self):
        raise NotImplementedError

    def get_batch(self, names):
        raise NotImplementedError

    def read_calibration_cache(self):
        return None

    def write_calibration_cache(self, cache):
        return None

    def get_algorithm(self):
        return CalibrationAlgoType.ENTROPY_CALIBRATION_2


class IInt8EntropyCalibrator2(IInt8Calibrator):
    def get_algorithm(self):
        return CalibrationAlgoType.ENTROPY_CALIBRATION_2


class IInt8EntropyCalibrator(IInt8Calibrator):
    def get_algorithm(self):
        return CalibrationAlgoType.ENTROPY_CALIBRATION


class IInt8MinMaxCalibrator(IInt8Calibrator):
    def get_algorithm(self):
        return CalibrationAlgoType.MINMAX_CALIBRATION


class IInt8LegacyCalibrator(IInt8Calibrator):
    def get_algorithm(self):
        return CalibrationAlgoType.LEGACY_CALIBRATION


# ---------------------------------------------------------------------------- config

class IOptimizationProfile(object):
    def __init__(self):
        self._shapes = {}

    def set_shape(self, input, min, opt, max):
        self._shapes[input] = {"min": list(min), "opt": list(opt), "max": list(max)}

    def get_shape(self, input):
        s = self._shapes.get(input)
        return [] if s is None else [tuple(s["min"]), tuple(s["opt"]), tuple(s["max"])]

    def __bool__(self):
        return bool(self._shapes)


class IBuilderConfig(object):
    def __init__(self):
        self._flags = set()
        self._pools = {}
        self._profiles = []
        self._timing_cache = None
        self.int8_calibrator = None
        self._calibration_profile = None
        self._level = 3
        self.default_device_type = DeviceType.GPU
        self.DLA_core = -1

    def set_flag(self, flag):
        self._flags.add(BuilderFlag(int(flag)))

    def clear_flag(self, flag):
        self._flags.discard(BuilderFlag(int(flag)))

    def get_flag(self, flag):
        return BuilderFlag(int(flag)) in self._flags

    def set_memory_pool_limit(self, pool, pool_size):
        self._pools[MemoryPoolType(int(pool))] = int(pool_size)

    def get_memory_pool_limit(self, pool):
        return self._pools.get(MemoryPoolType(int(pool)), 0)

    def add_optimization_profile(self, profile):
        self._profiles.append(profile)
        return len(self._profiles) - 1

    @property
    def num_optimization_profiles(self):
        return len(self._profiles)

    def set_calibration_profile(self, profile):
        self._calibration_profile = profile
        return True

    def get_calibration_profile(self):
        return self._calibration_profile

    def create_timing_cache(self, serialized_timing_cache):
        return ITimingCache(serialized_timing_cache)

    def set_timing_cache(self, cache, ignore_mismatch):
        self._timing_cache = cache
        return True

    def get_timing_cache(self):
        return self._timing_cache


if _VER >= (8, 6):   # builder_optimization_level exists from TensorRT 8.6 (docs/trtexec.md §8)
    def _get_level(self):
        return self._level

    def _set_level(self, value):
        self._level = int(value)
    IBuilderConfig.builder_optimization_level = property(_get_level, _set_level)


# ---------------------------------------------------------------------------- builder

def _error_lines(code, kind, where, message):
    """An ERROR of the builder as 8.x (`4: [file::func::line] Error Code 4: kind (msg)`) or 10.x
    (`IBuilder::buildSerializedNetwork: Error Code 4: kind (msg)`)."""
    if _VER >= (10, 0):
        return "IBuilder::buildSerializedNetwork: Error Code %d: %s (%s)" % (code, kind, message)
    return "%d: [%s] Error Code %d: %s (%s)" % (code, where, code, kind, message)


CALIBRATION_FAILURE = ("Calibration failure occurred with no scaling factors detected. This could be due to no "
                       "int8 calibrator or insufficient custom scales for network layers. Please see int8 sample "
                       "to setup calibration correctly.")


def calibration_header(algorithm):
    return "TRT-%d-%s" % (_banner_number(), _ALGO_WORDS[CalibrationAlgoType(int(algorithm))])


def _scale_hex(scale):
    return "%08x" % struct.unpack(">I", struct.pack(">f", scale))[0]


class Builder(object):
    def __init__(self, logger):
        self.logger = logger
        self.platform_has_fast_fp16 = True
        self.platform_has_fast_int8 = True
        self.platform_has_tf32 = _SIM.get("compute", "8.7") >= "8.0"
        self.num_DLA_cores = int(_SIM.get("dla_cores", 0))

    def create_network(self, flags=0):
        return INetworkDefinition(flags)

    def create_builder_config(self):
        return IBuilderConfig()

    def create_optimization_profile(self):
        return IOptimizationProfile()

    def build_serialized_network(self, network, config):
        log = self.logger.log
        if network._model is None:
            log(ILogger.ERROR, _error_lines(4, "Internal Error", "network.cpp::validate::2789",
                                            "Network must have at least one output"))
            return None
        profile = {}
        for p in config._profiles:
            profile.update(p._shapes)
        dynamic = [t.name for t in network._inputs if any(d < 0 for d in t.shape)]
        missing = [n for n in dynamic if n not in profile]
        if missing:
            log(ILogger.ERROR, _error_lines(4, "API Usage Error", "network.cpp::validate::2997",
                                            "Network has dynamic or shape inputs, but no optimization profile has "
                                            "been defined."))
            return None
        int8, cache, self._calibrated_now = None, None, False
        if config.get_flag(BuilderFlag.INT8):
            int8, cache = self._int8_scales(network, config, profile)
            if int8 is None:
                return None
        fp16 = config.get_flag(BuilderFlag.FP16)
        precision = "best" if fp16 and int8 else "int8" if int8 else "fp16" if fp16 else "fp32"
        sim = _trtexec_sim()
        library = [int(x) for x in (_SIM.get("library") or ".".join(map(str, _VER))).split(".")]
        ident = {"trt": (library + [0, 0, 0, 0])[:4], "compute": _SIM.get("compute", "8.7"), "gpu": _SIM.get("gpu", "Orin")}
        onnx_sha = hashlib.sha256(network._onnx).hexdigest()
        time.sleep(float(_SIM.get("build_seconds", 0.2)))
        extra = dict([("int8", int8)] if int8 else [])
        if cache:
            extra["int8_input_scales"] = sim.input_scales(network._onnx, sim.read_calibration_scales(cache))
        if DeviceType(int(config.default_device_type)) == DeviceType.DLA:   # marked as trtexec_sim's DLA plans
            extra.update(dla_core=config.DLA_core, gpu_fallback=config.get_flag(BuilderFlag.GPU_FALLBACK))
        plan = sim.engine_bytes(ident, onnx_sha, precision, network._onnx, profile or None, extra=extra or None,
                                externals=network._externals)
        sim_state_log("builds.log", {"tool": "python-api", "onnx_sha256": onnx_sha, "precision": precision,
                                     "trt": ".".join(map(str, _VER)), "compute": ident["compute"],
                                     "profile": profile, "int8": int8, "dla_core": extra.get("dla_core"),
                                     "calibration_run": self._calibrated_now,
                                     "external_data": sorted(network._externals),
                                     "flags": sorted(f.name for f in config._flags),
                                     "timing_cache_loaded": bool(config._timing_cache and config._timing_cache._blob)})
        log(ILogger.INFO, "Engine generation completed in 0.2 seconds.")
        return IHostMemory(plan)

    # -- INT8 ------------------------------------------------------------------------
    def _int8_scales(self, network, config, profile):
        """("qdq", None), ("calibrated", the cache's text) from a calibrator's cache or a calibration
        run, or (None, None) after logging the failure as TensorRT does."""
        log, calibrator = self.logger.log, config.int8_calibrator
        if network._model.op_types() & {"QuantizeLinear", "DequantizeLinear"}:
            if calibrator is not None:
                log(ILogger.WARNING, "Calibrator won't be used in explicit precision mode. Use quantization aware "
                                     "training to generate network with Quantize/Dequantize nodes.")
            return "qdq", None
        if calibrator is None:
            log(ILogger.WARNING, "Calibrator is not being used. Users must provide dynamic range for all tensors "
                                 "that are not Int32 or Bool.")
            log(ILogger.ERROR, _error_lines(4, "Internal Error", "standardEngineBuilder.cpp::initCalibrationParams::1402",
                                            CALIBRATION_FAILURE))
            if _VER < (10, 0):
                log(ILogger.ERROR, _error_lines(2, "Internal Error", "builder.cpp::buildSerializedNetwork::609",
                                                "Assertion enginePtr != nullptr failed. "))
            return None, None
        header = calibration_header(calibrator.get_algorithm())
        cache = calibrator.read_calibration_cache()
        if cache:
            text = bytes(cache).decode("ascii", "replace")
            if text.split("\n", 1)[0].strip() == header:
                log(ILogger.INFO, "Calibration table was read from the cache; skipping calibration")
                return "calibrated", text
            log(ILogger.WARNING, "The calibration cache header %r does not match %r: recalibrating"
                % (text.split("\n", 1)[0][:64], header))
        ranges, batches = self._calibrate(network, config, calibrator, profile)
        if ranges is None:
            return None, None
        if not batches:
            log(ILogger.ERROR, _error_lines(4, "Internal Error", "standardEngineBuilder.cpp::initCalibrationParams::1402",
                                            CALIBRATION_FAILURE))
            return None, None
        lines = [header]
        digest = hashlib.sha256(json.dumps(sorted(ranges.items())).encode()).digest()
        for name, amax in sorted(ranges.items()):
            lines.append("%s: %s" % (name, _scale_hex(max(amax, 1e-8) / 127.0)))
        # activations the simulator does not compute get scales derived from the data (deterministic)
        for node in network._model.nodes:
            for out in node.outputs:
                if out and out not in ranges:
                    h = hashlib.sha256(digest + out.encode()).digest()
                    lines.append("%s: %s" % (out, _scale_hex((1 + h[0] / 255.0) / 127.0)))
        blob = ("\n".join(lines) + "\n").encode()
        calibrator.write_calibration_cache(IHostMemory(blob))
        self._calibrated_now = True
        sim_state_log("calibrations.log", {"onnx_sha256": hashlib.sha256(network._onnx).hexdigest(),
                                           "batches": batches, "header": header,
                                           "cache_sha256": hashlib.sha256(blob).hexdigest()})
        return "calibrated", blob.decode()

    def _calibrate(self, network, config, calibrator, profile):
        """Feed every batch: -> ({input: max-abs}, number of batches) or (None, 0) on a bad batch."""
        names = [t.name for t in network._inputs]
        calib_profile = config._calibration_profile._shapes if config._calibration_profile else profile
        shapes = {}
        for t in network._inputs:
            if any(d < 0 for d in t.shape):
                shapes[t.name] = calib_profile[t.name]["opt"]   # TensorRT calibrates at kOPT
            else:
                shapes[t.name] = list(t.shape)
        ranges, batches = dict((n, 0.0) for n in names), 0
        batch_size = calibrator.get_batch_size()
        while True:
            pointers = calibrator.get_batch(names)
            if not pointers:
                break
            if len(pointers) != len(names):
                self.logger.log(ILogger.ERROR, "Calibrator returned %d pointers for %d inputs"
                                % (len(pointers), len(names)))
                return None, 0
            for name, ptr, t in zip(names, pointers, network._inputs):
                count = 1
                for d in shapes[name]:
                    count *= d
                if t.dtype != DataType.FLOAT:
                    continue
                values = array.array("f")
                values.frombytes(ctypes.string_at(int(ptr), count * 4))
                if sys.byteorder != "little":
                    values.byteswap()
                ranges[name] = max([ranges[name]] + [abs(v) for v in values])
            batches += 1
        del batch_size
        return ranges, batches
