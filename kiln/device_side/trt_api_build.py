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
        "shapes", "verbose", "dla_core", "dla_gpu_fallback", "refit"}


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
    if args["precision"] in ("int8", "best"):
        config.set_flag(trt.BuilderFlag.INT8)
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
    return finish(0, engine=args["engine"], sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
                  seconds=round(seconds, 3), tensorrt=version)


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
