#!/usr/bin/env python3
"""Refit a refittable TensorRT engine with the weights of a new ONNX (runs ON the device).

Standalone: stdlib + tensorrt (+ numpy on TensorRT 8.x), Python 3.6+, run by the device's
python3 like trt_api_build.py. The API names per version are docs/trtexec.md §13:
- TensorRT 10.x: trt.OnnxParserRefitter(refitter, logger).refit_from_file(onnx) sets every
  weight from the ONNX's initializers;
- TensorRT 8.5/8.6 (no ONNX parser refitter): each refittable weight is set by its name, which
  the ONNX parser took from the initializer, from `weights` (an .npz of the initializers the
  controller extracted: the device has no `onnx` package). A refittable weight the .npz does not
  name would keep its old value: refused (exit 4), so the controller builds instead.
Then get_missing_weights() must be empty, refit_cuda_engine() must succeed, and the engine is
serialized to `engine` (temp name + fsync + rename).

Usage:  python3 trt_api_refit.py '{"base": ..., "onnx": ..., "engine": ..., "weights": ...}'
JSON args: base (refittable plan), onnx (the new model), engine (where the refitted plan goes),
weights (.npz of the ONNX initializers, used by TensorRT < 10), verbose (bool).

Output: progress lines "kiln-trt: ..." and, last, one JSON line
  {"kiln": "trt_api_refit", "ok": true, "engine", "sha256", "bytes", "seconds", "tensorrt", "weights"}
  or {"kiln": "trt_api_refit", "ok": false, "error": ..., "details": [...]}
Exit codes: 0 refitted, 1 refit failed, 2 bad arguments, 3 tensorrt not importable,
4 this engine cannot be refitted here (not refittable, weights the ONNX does not name).
"""
import hashlib
import json
import os
import sys
import time

KEYS = {"base", "onnx", "engine", "weights", "verbose"}


class ArgError(ValueError):
    pass


def parse_args(argv):
    if len(argv) != 1:
        raise ArgError("expected exactly one argument: a JSON object")
    try:
        args = json.loads(argv[0])
    except ValueError as exc:
        raise ArgError("arguments are not valid JSON: %s" % exc)
    if not isinstance(args, dict):
        raise ArgError("arguments must be a JSON object")
    unknown = sorted(set(args) - KEYS)
    if unknown:
        raise ArgError("unknown argument(s): %s" % ", ".join(unknown))
    for key in ("base", "onnx", "engine"):
        if not isinstance(args.get(key), str) or not args[key]:
            raise ArgError("%s must be a non-empty path" % key)
    if args.get("weights") is not None and not isinstance(args["weights"], str):
        raise ArgError("weights must be a path or null")
    if not isinstance(args.get("verbose", False), bool):
        raise ArgError("verbose must be true or false")
    return args


def say(msg):
    print("kiln-trt: " + msg)
    sys.stdout.flush()


def finish(code, **result):
    result["kiln"] = "trt_api_refit"
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


def _major(version):
    digits = "".join(ch for ch in version.split(".")[0] if ch.isdigit())
    return int(digits or 0)


def _set_from_onnx(trt, refitter, logger, args):
    """10.x: the ONNX parser refitter reads the initializers itself. -> (code, error, details)."""
    parser_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not parser_refitter.refit_from_file(args["onnx"]):
        details = [str(parser_refitter.get_error(i)) for i in range(parser_refitter.num_errors)]
        return 1, "refit_from_file failed (the ONNX's weights do not fit this engine)", details
    return 0, None, []


def _set_by_name(refitter, args):
    """8.x: every refittable weight by its (initializer) name from the .npz. -> (code, error, details)."""
    if not args.get("weights"):
        return 2, "TensorRT < 10 needs the initializers as an .npz (weights)", []
    import numpy as np
    with np.load(args["weights"], allow_pickle=False) as data:
        weights = dict((name, data[name]) for name in data.files)
    names = list(refitter.get_all_weights())
    unnamed = sorted(n for n in names if n not in weights)
    if unnamed:
        return 4, "%d refittable weight(s) are not ONNX initializers; they would keep their old values" \
            % len(unnamed), unnamed[:20]
    rejected = [n for n in names if not refitter.set_named_weights(n, np.ascontiguousarray(weights[n]))]
    if rejected:
        return 1, "set_named_weights refused %d weight(s) (another count or type)" % len(rejected), rejected[:20]
    return 0, None, []


def refit(args, trt):
    version = getattr(trt, "__version__", "0")
    say("TensorRT %s, refitting %s with the weights of %s" % (version, args["base"], args["onnx"]))
    logger = trt.Logger(trt.Logger.VERBOSE if args.get("verbose") else trt.Logger.WARNING)
    with open(args["base"], "rb") as f:
        blob = f.read()
    start = time.time()
    engine = trt.Runtime(logger).deserialize_cuda_engine(blob)
    if engine is None:
        return finish(1, error="deserialize_cuda_engine returned None (see the TensorRT log above)", tensorrt=version)
    if not engine.refittable:
        return finish(4, error="the base engine was not built refittable", tensorrt=version)
    refitter = trt.Refitter(engine, logger)
    if _major(version) >= 10:
        code, error, details = _set_from_onnx(trt, refitter, logger, args)
        how = "OnnxParserRefitter.refit_from_file"
    else:
        code, error, details = _set_by_name(refitter, args)
        how = "Refitter.set_named_weights"
    if code:
        return finish(code, error=error, details=details, tensorrt=version)
    missing = list(refitter.get_missing_weights())
    if missing:
        return finish(1, error="%d weight(s) still missing after setting them" % len(missing),
                      details=missing[:20], tensorrt=version)
    if not refitter.refit_cuda_engine():
        return finish(1, error="refit_cuda_engine returned False (see the TensorRT log above)", tensorrt=version)
    data = bytes(memoryview(engine.serialize()))
    seconds = time.time() - start
    _atomic_write(args["engine"], data)
    say("engine refitted in %.1f sec (%s), %d bytes" % (seconds, how, len(data)))
    return finish(0, engine=args["engine"], sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
                  seconds=round(seconds, 3), tensorrt=version, weights=how)


def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except ArgError as exc:
        return finish(2, error="bad arguments: %s" % exc)
    for key in ("base", "onnx") + (("weights",) if args.get("weights") else ()):
        if not os.path.isfile(args[key]):
            return finish(2, error="%s file not found: %s" % (key, args[key]))
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or a broken install raising something else
        return finish(3, error="tensorrt is not importable by %s: %s" % (sys.executable, exc))
    try:
        return refit(args, trt)
    except Exception as exc:
        return finish(1, error="%s: %s" % (type(exc).__name__, exc))


if __name__ == "__main__":
    sys.exit(main())
