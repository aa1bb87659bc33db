#!/usr/bin/env python3
"""Build a TensorRT engine with the TensorRT Python API (runs ON the device).

Standalone: stdlib + tensorrt only, Python 3.6+ (JetPack 4 ships 3.6), so it can
be copied to a device and run by the system python3 that has `python3-libnvinfer`.

Usage:  python3 trt_api_build.py '<json>'      or      python3 trt_api_build.py @args.json

JSON args:
  onnx (str, required), engine (str, required),
  precision: "fp32" | "fp16" | "int8" | "best"   (default "fp16"; int8/best need a Q/DQ model:
             without a calibrator TensorRT reports "Calibration failure")
  workspace_mib: int > 0 | null,  builder_optimization_level: 0..5 | null (TensorRT >= 8.6),
  timing_cache: path | null  (loaded if it exists, saved after the build),
  shapes: {input: {"min": [..], "opt": [..], "max": [..]}} | null,  verbose: bool,
  refit: bool  (BuilderFlag.REFIT: a refittable engine, see trt_api_refit.py)
  calibration: {"cache": path, "batches": path | null} | null   (INT8 implicit quantization;
             docs/trtexec.md §10). With "batches" (an .npz written by kiln.calibration: arrays
             "batch00000.<input>", C order) the calibrator feeds every batch to TensorRT and
             writes the calibration cache to "cache"; without, it only reads "cache" (written
             by this TensorRT for this class: no calibration runs).

Output: progress lines "kiln-trt: ..." and, last, one JSON line
  {"kiln": "trt_api_build", "ok": true, "engine": ..., "sha256": ..., "bytes": ..., "seconds": ...,
   "tensorrt": ...}   or   {"kiln": "trt_api_build", "ok": false, "error": ..., "details": [...]}
Exit codes: 0 built, 1 build/parse failed, 2 bad arguments, 3 tensorrt not importable.
"""
import hashlib
import json
import os
import sys
import time

PRECISIONS = ("fp32", "fp16", "int8", "best")
KEYS = {"onnx", "engine", "precision", "workspace_mib", "builder_optimization_level", "timing_cache",
        "shapes", "verbose", "dla_core", "dla_gpu_fallback", "refit", "calibration"}


class ArgError(ValueError):
    pass


def _positive_dims(value, where):
    if not isinstance(value, list) or not value or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value):
        raise ArgError("%s must be a non-empty list of positive integers" % where)
    return value


def parse_args(argv):
    """argv (without the program name) -> validated dict; raises ArgError."""
    if len(argv) != 1:
        raise ArgError("expected exactly one argument: a JSON object or @file")
    text = argv[0]
    if text.startswith("@"):
        try:
            with open(text[1:]) as f:
                text = f.read()
        except OSError as exc:
            raise ArgError("cannot read %s: %s" % (text[1:], exc.strerror))
    try:
        args = json.loads(text)
    except ValueError as exc:
        raise ArgError("arguments are not valid JSON: %s" % exc)
    if not isinstance(args, dict):
        raise ArgError("arguments must be a JSON object")
    unknown = sorted(set(args) - KEYS)
    if unknown:
        raise ArgError("unknown argument(s): %s" % ", ".join(unknown))
    for key in ("onnx", "engine"):
        if not isinstance(args.get(key), str) or not args[key]:
            raise ArgError("%s must be a non-empty path" % key)
    args.setdefault("precision", "fp16")
    if args["precision"] not in PRECISIONS:
        raise ArgError("precision must be one of %s" % ", ".join(PRECISIONS))
    for key, lo, hi in (("workspace_mib", 1, None), ("builder_optimization_level", 0, 5)):
        v = args.get(key)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
            raise ArgError("%s must be an integer %s" % (key, ">= %d" % lo if hi is None else "%d..%d" % (lo, hi)))
    tc = args.get("timing_cache")
    if tc is not None and (not isinstance(tc, str) or not tc):
        raise ArgError("timing_cache must be a path or null")
    shapes = args.get("shapes")
    if shapes is not None:
        if not isinstance(shapes, dict) or not shapes:
            raise ArgError("shapes must be an object {input: {min, opt, max}} or null")
        for name, spec in shapes.items():
            if not isinstance(spec, dict) or set(spec) != {"min", "opt", "max"}:
                raise ArgError("shapes.%s needs exactly min, opt, max" % name)
            dims = [_positive_dims(spec[k], "shapes.%s.%s" % (name, k)) for k in ("min", "opt", "max")]
            if len(set(len(d) for d in dims)) != 1 or not all(a <= b <= c for a, b, c in zip(*dims)):
                raise ArgError("shapes.%s: need equal ranks and min <= opt <= max" % name)
    for key in ("verbose", "refit"):
        if not isinstance(args.get(key, False), bool):
            raise ArgError("%s must be true or false" % key)
    core = args.get("dla_core")
    if core is not None and (not isinstance(core, int) or isinstance(core, bool) or core < 0):
        raise ArgError("dla_core must be a DLA core number or null")
    if not isinstance(args.get("dla_gpu_fallback", False), bool):
        raise ArgError("dla_gpu_fallback must be true or false")
    calib = args.get("calibration")
    if calib is not None:
        if not isinstance(calib, dict) or set(calib) - {"cache", "batches"} or not isinstance(calib.get("cache"), str):
            raise ArgError("calibration must be an object {cache: path, batches: path or null}")
        if calib.get("batches") is not None and not isinstance(calib["batches"], str):
            raise ArgError("calibration.batches must be a path or null")
        if args["precision"] not in ("int8", "best"):
            raise ArgError("calibration needs precision int8 or best")
    return args


def use_dla(builder, config, trt, core, gpu_fallback, precision):
    """The network's layers on DLA core `core` (docs/trtexec.md §12), as trtexec's --useDLACore:
    default device type DLA, the core, GPU fallback if asked; the DLA runs FP16 or INT8, so FP16
    is turned on unless INT8 is. Returns an error text, or None."""
    cores = builder.num_DLA_cores
    if core >= cores:
        return "Cannot create DLA engine, %d not available (this device has %d DLA cores)" % (core, cores)
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = core
    if gpu_fallback:
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    if precision not in ("int8", "best"):
        config.set_flag(trt.BuilderFlag.FP16)
    say("DLA core %d%s" % (core, ", GPU fallback" if gpu_fallback else ""))
    return None


# ---------------------------------------------------------------------------- INT8 calibration

def read_npz_batches(path):
    """The calibration batches of kiln's .npz: [{input: (shape, raw bytes)}] in batch order.
    Reads the .npy members itself (no numpy on the device's python3 needed)."""
    import ast
    import struct
    import zipfile
    batches = {}
    with zipfile.ZipFile(path) as z:
        for member in z.namelist():
            if not member.endswith(".npy") or not member.startswith("batch"):
                continue
            index, _, name = member[len("batch"):-len(".npy")].partition(".")
            data = z.read(member)
            if data[:6] != b"\x93NUMPY":
                raise ValueError("%s in %s is not a .npy array" % (member, path))
            major = data[6]
            if major == 1:
                (hlen,), start = struct.unpack("<H", data[8:10]), 10
            else:
                (hlen,), start = struct.unpack("<I", data[8:12]), 12
            header = ast.literal_eval(data[start:start + hlen].decode("latin1"))
            if header.get("fortran_order"):
                raise ValueError("%s in %s is not in C order" % (member, path))
            batches.setdefault(int(index), {})[name] = (tuple(header["shape"]), data[start + hlen:])
    return [batches[i] for i in sorted(batches)]


class DeviceMemory(object):
    """cudaMalloc / cudaMemcpy(host to device) / cudaFree for the calibrator's get_batch, from
    cuda-python when installed, else libcudart.so through ctypes (docs/trtexec.md §10)."""

    def __init__(self):
        import ctypes
        self._ctypes, self._cudart, self._lib, self._host = ctypes, None, None, []
        try:
            try:
                from cuda.bindings import runtime as cudart      # cuda-python >= 12.6
            except ImportError:
                from cuda import cudart                         # cuda-python 11.x / 12.x
            self._cudart = cudart
        except ImportError:
            import ctypes.util
            for name in ("libcudart.so", ctypes.util.find_library("cudart"), "/usr/local/cuda/lib64/libcudart.so"):
                if not name:
                    continue
                try:
                    self._lib = ctypes.CDLL(name)
                    break
                except OSError:
                    continue
            if self._lib is None:
                raise RuntimeError("no CUDA runtime for calibration: neither cuda-python (`from cuda import cudart`) "
                                   "nor libcudart.so could be loaded")

    def _check(self, err, what):
        code = err if isinstance(err, int) else getattr(err, "value", err)
        if int(code) != 0:
            raise RuntimeError("%s failed with CUDA error %s" % (what, err))

    def malloc(self, size):
        if self._cudart is not None:
            err, ptr = self._cudart.cudaMalloc(size)
            self._check(err, "cudaMalloc(%d)" % size)
            return int(ptr)
        ptr = self._ctypes.c_void_p()
        self._check(self._lib.cudaMalloc(self._ctypes.byref(ptr), self._ctypes.c_size_t(size)), "cudaMalloc")
        return int(ptr.value)

    def copy_to_device(self, ptr, data):
        host = self._ctypes.create_string_buffer(data, len(data))
        self._host.append(host)                                 # alive until the copy returned
        if self._cudart is not None:
            (err,) = self._cudart.cudaMemcpy(ptr, self._ctypes.addressof(host), len(data),
                                             self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice)
        else:
            err = self._lib.cudaMemcpy(self._ctypes.c_void_p(ptr), host, self._ctypes.c_size_t(len(data)), 1)
        self._check(err, "cudaMemcpy")
        self._host.pop()

    def free(self, ptr):
        if self._cudart is not None:
            self._cudart.cudaFree(ptr)
        else:
            self._lib.cudaFree(self._ctypes.c_void_p(ptr))


def make_calibrator(trt, cache_path, batches):
    """An IInt8EntropyCalibrator2 that feeds `batches` (None: read the cache only) and writes the
    cache TensorRT gives it to `cache_path`."""
    memory = DeviceMemory() if batches else None

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)   # the bindings need the base constructor
            self.index, self.buffers, self.fed = 0, {}, 0

        def get_batch_size(self):
            return 1          # explicit-batch networks: the batch is part of each input's shape

        def get_batch(self, names):
            if not batches or self.index >= len(batches):
                return None
            batch = batches[self.index]
            self.index += 1
            pointers = []
            for name in names:
                if name not in batch:
                    say("calibration batch %d has no input %r (it has %s)" % (self.index - 1, name, sorted(batch)))
                    return None
                data = batch[name][1]
                ptr, size = self.buffers.get(name, (None, 0))
                if ptr is None or size < len(data):
                    if ptr is not None:
                        memory.free(ptr)
                    ptr = memory.malloc(len(data))
                    self.buffers[name] = (ptr, len(data))
                memory.copy_to_device(ptr, data)
                pointers.append(ptr)
            self.fed += 1
            return pointers

        def read_calibration_cache(self):
            if batches or not os.path.exists(cache_path):
                return None   # calibrating: a cache left from before must not stand in for the data
            with open(cache_path, "rb") as f:
                return f.read()

        def write_calibration_cache(self, cache):
            _atomic_write(cache_path, bytes(memoryview(cache)))
            say("wrote the calibration cache %s (%d bytes)" % (cache_path, len(bytes(memoryview(cache)))))

    return Calibrator()


def say(msg):
    print("kiln-trt: " + msg)
    sys.stdout.flush()


def finish(code, **result):
    result["kiln"] = "trt_api_build"
    result["ok"] = code == 0
    print(json.dumps(result, sort_keys=True))
    sys.stdout.flush()
    return code


def _atomic_write(path, data):
    tmp = "%s.tmp-%d" % (path, os.getpid())
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def _version_tuple(text):
    parts = []
    for p in text.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (3 - len(parts)))


def build(args, trt):
    version = getattr(trt, "__version__", "0")
    ver = _version_tuple(version)
    say("TensorRT %s, building %s -> %s (%s)" % (version, args["onnx"], args["engine"], args["precision"]))
    logger = trt.Logger(trt.Logger.VERBOSE if args.get("verbose") else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if ver[0] >= 10:
        network = builder.create_network(0)            # explicit batch is the only mode in 10.x (docs/trtexec.md §8)
    else:
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(args["onnx"]):
        details = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        return finish(1, error="failed to parse the ONNX file", details=details, tensorrt=version)
    say("parsed ONNX: %d inputs, %d outputs" % (network.num_inputs, network.num_outputs))

    config = builder.create_builder_config()
    if args.get("workspace_mib"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, args["workspace_mib"] << 20)
    if args["precision"] in ("fp16", "best"):
        config.set_flag(trt.BuilderFlag.FP16)
    calibrator = None
    if args["precision"] in ("int8", "best"):
        config.set_flag(trt.BuilderFlag.INT8)
        calib = args.get("calibration")
        if calib:
            batches = read_npz_batches(calib["batches"]) if calib.get("batches") else None
            if calib.get("batches"):
                say("calibrating INT8 with %d batches from %s" % (len(batches), calib["batches"]))
            calibrator = make_calibrator(trt, calib["cache"], batches)
            config.int8_calibrator = calibrator
    if args.get("refit"):
        config.set_flag(trt.BuilderFlag.REFIT)  # weights can be replaced later without a rebuild
    level = args.get("builder_optimization_level")
    if level is not None:
        if hasattr(config, "builder_optimization_level"):
            config.builder_optimization_level = level
        else:
            say("warning: builder_optimization_level needs TensorRT >= 8.6; ignored")
    if args.get("dla_core") is not None:
        problem = use_dla(builder, config, trt, args["dla_core"], args.get("dla_gpu_fallback", False),
                          args["precision"])
        if problem:
            return finish(1, error=problem, tensorrt=version)
    if args.get("shapes"):
        profile = builder.create_optimization_profile()
        for name, spec in sorted(args["shapes"].items()):
            profile.set_shape(name, spec["min"], spec["opt"], spec["max"])
        config.add_optimization_profile(profile)
        if calibrator is not None and hasattr(config, "set_calibration_profile"):
            config.set_calibration_profile(profile)    # calibration runs at the profile's opt shapes

    # trtexec passes ignore_mismatch=False up to 10.0 and True from 10.1 (docs/trtexec.md §7)
    ignore_mismatch = ver >= (10, 1, 0)
    cache_path = args.get("timing_cache")
    if cache_path:
        blob = b""
        if os.path.exists(cache_path):
            with open(cache_path, "rb") as f:
                blob = f.read()
            say("loaded %d bytes of timing cache from %s" % (len(blob), cache_path))
        cache = config.create_timing_cache(blob)
        if not config.set_timing_cache(cache, ignore_mismatch):
            say("warning: timing cache %s was rejected; building without it" % cache_path)
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch)

    start = time.time()
    plan = builder.build_serialized_network(network, config)
    seconds = time.time() - start
    if plan is None:
        details = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        return finish(1, error="build_serialized_network returned None (see the TensorRT log above)",
                      details=details, tensorrt=version, seconds=round(seconds, 3))
    data = bytes(memoryview(plan))
    _atomic_write(args["engine"], data)
    say("engine built in %.1f sec, %d bytes" % (seconds, len(data)))
    if cache_path:
        serialized = config.get_timing_cache().serialize()
        _atomic_write(cache_path, bytes(memoryview(serialized)))
        say("saved timing cache to %s" % cache_path)
    extra = {}
    if calibrator is not None:
        extra = {"calibration_batches": calibrator.fed, "calibration_cache": args["calibration"]["cache"]}
    return finish(0, engine=args["engine"], sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
                  seconds=round(seconds, 3), tensorrt=version, **extra)


def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except ArgError as exc:
        return finish(2, error="bad arguments: %s" % exc)
    if not os.path.isfile(args["onnx"]):
        return finish(2, error="ONNX file not found: %s" % args["onnx"])
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or a broken install raising something else
        return finish(3, error="tensorrt is not importable by %s: %s" % (sys.executable, exc))
    try:
        return build(args, trt)
    except Exception as exc:
        return finish(1, error="%s: %s" % (type(exc).__name__, exc))


if __name__ == "__main__":
    sys.exit(main())
