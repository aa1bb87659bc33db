#!/usr/bin/env python3
"""A stand-in for TensorRT's trtexec, for simulated devices in tests (no GPU, no TensorRT).

It follows the real CLI contract (docs/trtexec.md §1-§5; files §6, plans §9):
`--name=value` flags checked per simulated TensorRT version (unknown ->
`[E] Unknown option: --foo <value>` + help + `&&&& FAILED`, exit 1; `--workspace`
and `--buildOnly` are unknown from 10.0), the `&&&& RUNNING TensorRT.trtexec
[TensorRT vNNNN] # <argv>` banner (`[bNN]` from 10.4), `[MM/DD/YYYY-HH:MM:SS] [I] `
prefixes with INFO on stdout and W/E on stderr, exit 0 = PASSED or --help.

Identity (environment wins over the JSON config file; config keys are the
lower-case names without the KILN_SIM_ prefix, e.g. {"trt_version": "10.3.0"}):
  KILN_SIM_CONFIG          JSON config file (default: trtexec-sim.json next to argv[0], if present)
  KILN_SIM_TRT_VERSION     simulated TensorRT, "8.5.2" or "10.3.0.30"   (default 8.5.2)
  KILN_SIM_TRT_BUILD       build number if the version has 3 parts      (default 0; shown as [bNN] >= 10.4)
  KILN_SIM_COMPUTE         compute capability of the GPU, "8.7"         (default 8.7)
  KILN_SIM_GPU             GPU name for "Selected Device:"              (default Orin)
  KILN_SIM_BUILD_SECONDS   sleep modelling the build (halved with a loaded timing cache; default 0.2)
  KILN_SIM_LATENCY_MS      base latency of the fp32 model (default 10.8)
  KILN_SIM_STATE           directory for builds.log / loads.log (one JSON line per build / load)
                           and trt_invocations.log (one JSON line per start of this trtexec)
  KILN_SIM_UNSUPPORTED_OPS comma-separated op types the ONNX "importer" rejects (plugin not found)
  KILN_SIM_FAIL            "oom": every build fails with Error Code 2: OutOfMemory
  KILN_SIM_OUTPUT_NOISE    std of Gaussian noise added to exported float outputs (default 0)
  KILN_SIM_WRONG_OUTPUTS   "1": exported float outputs are perturbed far beyond any tolerance
  KILN_SIM_DLA_CORES       DLA cores of the device (default 0): `--useDLACore=N` with N beyond them
                           fails as trtexec does (`Cannot create DLA engine, N not available`); a DLA
                           plan's JSON line says {"dla_core", "gpu_fallback"} (docs/trtexec.md §12)
  KILN_SIM_REFIT_RATIO     refit time / build time of the simulated TensorRT refitter (default 0.2: the
                           slow end of Torch-TensorRT's "typically 80-95% faster", docs/trtexec.md §13)
  KILN_SIM_REFIT_FAULT     "fail": every refit fails (refit_cuda_engine() returns False); "drop-bias":
                           refitted engines compute with Conv/Gemm biases zeroed (NVIDIA's kREFIT known
                           issue, docs/trtexec.md §13)

Refit (docs/trtexec.md §13): `--refit`, `--stripWeights` (10.0+) and `--stripAllWeights` (10.1+)
are recorded in the plan's JSON line as "refit" ({"mode": "refit" | "identical", "stripped",
"refits"}) and in builds.log; a stripped plan refuses to run until refitted. The refit itself
is done through the simulated TensorRT Python API (tests/fleet/trt_python/refit.py), which
rewrites the plan with the new weights and logs refits.log, never builds.log.

Outputs (`--loadInputs`, `--exportOutput`, as trtexec 8.5.2 .. 10.16): the sim cannot run a
network, so at build time it embeds the ONNX bytes in the plan, and an inference that must
export outputs runs that ONNX with onnxruntime (imported only then: the interpreter running
the sim needs numpy + onnxruntime for it) on the inputs given by
`--loadInputs=name:file[,name:file]` (raw little-endian bytes in TensorRT's input type:
int64 inputs are int32 before 10.0; `'name':file` quoting as the real parser; a missing
file -> `Cannot open file X!`, a file of the wrong size -> `Unexpected file size for input
file: ...`, both as `[E] Uncaught exception detected: ...` + FAILED; inputs not given are
random, as in trtexec). With fp16/int8/best engines the float outputs are rounded through
float16, like reduced-precision kernels. `--exportOutput=<file>` is written in
exportJSONOutput's format (samples/common/sampleReporting.cpp): a list of
{ "name", "dimensions" ("1x300x4"), "values" (flat, %g: 6 significant digits) }.
Without --exportOutput, --loadInputs files are size-checked when onnxruntime is importable,
otherwise only checked to exist.

Timing (docs/trtexec.md §4): an inference makes a per-iteration trace (warm-ups for --warmUp ms,
default 200, then at least max(--iterations, 3 s worth) timed iterations about the model's
latency, seeded by the plan's bytes); the performance summary is computed from it with
sampleReporting.cpp's rules (warm-ups out, findMedian, findPercentile in float), and
`--exportTimes=<file>` writes it in exportJSONTrace's layout (warm-ups left out from 8.5). From
9.0 setting up inference prints `Created execution context with device memory size: N MiB`.

Dynamic shapes: `--minShapes/--optShapes/--maxShapes` (each `name:AxBxC[,name:...]`; an input
given in only some of them takes the others from opt, min, max in that order) are the plan's
optimization profile, kept in its JSON line as "profile" and in builds.log; a profile without
MIN <= OPT <= MAX fails the build. A load whose `--shapes` lie outside the profile (another
rank, or a dim beyond min..max) fails like TensorRT's setInputShape (docs/trtexec.md §5:
"does not satisfy any optimization profile") + `Inference set up failed`; a dynamic input
without `--shapes` runs at the profile's opt.

Engine file ("plan"): bytes 0-3 `ftrt` (uint32 0x74727466), bytes 24-27 TensorRT
major.minor.patch.build (as real 8.6+ plans), then b"KILNSIM1\\n" + one JSON line
{trt, compute, gpu, onnx_sha256, onnx_size, precision} + the ONNX bytes (+ its external weights) + filler.
External weights (docs/trtexec.md §11): each `location` the ONNX names is read relative to the
ONNX file's folder, as the real parser does; a missing file -> `Failed to open file: <path>`, and
from 10.0 a location through '../' is refused with the parser's text. `--loadEngine` refuses
a bad magic tag, another TensorRT version, or another compute capability with
the real error texts; another GPU name with the same capability only warns.
ONNX "validity": non-empty and starting with the protobuf tag of ModelProto.ir_version (0x08).
Python 3.6+, stdlib only.
"""
import hashlib
import json
import os
import random
import re
import struct
import sys
import time

MAGIC = b"ftrt"
SIM_TAG = b"KILNSIM1\n"

# option -> (takes a value, first version with it, first version without it)
_ALWAYS = (0, 0)
OPTIONS = {
    "--onnx": (True, _ALWAYS, None), "--saveEngine": (True, _ALWAYS, None),
    "--loadEngine": (True, _ALWAYS, None), "--fp16": (False, _ALWAYS, None),
    "--int8": (False, _ALWAYS, None), "--best": (False, _ALWAYS, None),
    "--noTF32": (False, _ALWAYS, None), "--refit": (False, _ALWAYS, None),
    "--timingCacheFile": (True, _ALWAYS, None), "--minShapes": (True, _ALWAYS, None),
    "--optShapes": (True, _ALWAYS, None), "--maxShapes": (True, _ALWAYS, None),
    "--shapes": (True, _ALWAYS, None), "--calib": (True, _ALWAYS, None),
    "--useDLACore": (True, _ALWAYS, None), "--allowGPUFallback": (False, _ALWAYS, None),
    "--sparsity": (True, _ALWAYS, None), "--verbose": (False, _ALWAYS, None),
    "--warmUp": (True, _ALWAYS, None), "--iterations": (True, _ALWAYS, None),
    "--duration": (True, _ALWAYS, None), "--percentile": (True, _ALWAYS, None),
    "--avgRuns": (True, _ALWAYS, None), "--separateProfileRun": (False, _ALWAYS, None),
    "--dumpProfile": (False, _ALWAYS, None), "--exportTimes": (True, _ALWAYS, None),
    "--exportProfile": (True, _ALWAYS, None), "--exportOutput": (True, _ALWAYS, None),
    "--loadInputs": (True, _ALWAYS, None),
    "--useCudaGraph": (False, _ALWAYS, None), "--noDataTransfers": (False, _ALWAYS, None),
    "--useSpinWait": (False, _ALWAYS, None), "--threads": (False, _ALWAYS, None),
    "--streams": (True, _ALWAYS, None), "--device": (True, _ALWAYS, None),
    "--memPoolSize": (True, (8, 4), None),
    "--workspace": (True, _ALWAYS, (10, 0)), "--buildOnly": (False, _ALWAYS, (10, 0)),
    "--explicitBatch": (False, _ALWAYS, (10, 0)), "--maxBatch": (True, _ALWAYS, (10, 0)),
    "--batch": (True, _ALWAYS, (10, 0)), "--minTiming": (True, _ALWAYS, (10, 0)),
    "--skipInference": (False, (8, 6), None), "--builderOptimizationLevel": (True, (8, 6), None),
    "--hardwareCompatibilityLevel": (True, (8, 6), None), "--versionCompatible": (False, (8, 6), None),
    "--vc": (False, (8, 6), None), "--excludeLeanRuntime": (False, (8, 6), None),
    "--stronglyTyped": (False, (10, 0), None), "--stripWeights": (False, (10, 0), None),
    "--bf16": (False, (10, 0), None), "--getPlanVersionOnly": (False, (10, 0), None),
    "--stripAllWeights": (False, (10, 1), None),
}


# ------------------------------------------------------------------ identity

def load_identity():
    conf = {}
    path = os.environ.get("KILN_SIM_CONFIG") or os.path.join(
        os.path.dirname(os.path.abspath(sys.argv[0])), "trtexec-sim.json")
    if os.path.isfile(path):
        with open(path) as f:
            conf = json.load(f)

    def get(key, default):
        value = os.environ.get("KILN_SIM_" + key.upper())
        if value in (None, ""):
            value = conf.get(key)
        return default if value in (None, "") else str(value)

    parts = [int(p) for p in get("trt_version", "8.5.2").split(".")]
    while len(parts) < 3:
        parts.append(0)
    if len(parts) == 3:
        parts.append(int(get("trt_build", "0")))
    return {
        "output_noise": float(get("output_noise", "0")), "wrong_outputs": get("wrong_outputs", "") not in ("", "0"),
        "trt": parts[:4], "compute": get("compute", "8.7"), "gpu": get("gpu", "Orin"),
        "build_seconds": float(get("build_seconds", "0.2")),
        "latency_ms": float(get("latency_ms", "10.8")), "state": get("state", ""),
        "unsupported_ops": [o for o in get("unsupported_ops", "").split(",") if o],
        "fail": get("fail", ""),
        "dla_cores": int(get("dla_cores", "0")),
        "refit_ratio": float(get("refit_ratio", "0.2")), "refit_fault": get("refit_fault", ""),
    }


def trt_str(v, parts=4):
    return ".".join(str(p) for p in v[:parts])


def banner_tag(v):
    major, minor, patch, build = v
    number = major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch
    tag = "[TensorRT v%d]" % number
    if tuple(v[:2]) >= (10, 4):
        tag += " [b%d]" % build
    return tag


# ------------------------------------------------------------------ logging

def _ts():
    return time.strftime("[%m/%d/%Y-%H:%M:%S]")


def info(msg):
    sys.stdout.write("%s [I] %s\n" % (_ts(), msg))
    sys.stdout.flush()


def warn(msg):
    sys.stderr.write("%s [W] %s\n" % (_ts(), msg))
    sys.stderr.flush()


def error(msg):
    sys.stderr.write("%s [E] %s\n" % (_ts(), msg))
    sys.stderr.flush()


class Run:
    def __init__(self, ident, argv):
        self.ident = ident
        self.argv = argv
        self.tag = banner_tag(ident["trt"])
        self.cmd = " ".join([argv[0]] + argv[1:])

    def result(self, word):
        sys.stdout.write("&&&& %s TensorRT.trtexec %s # %s\n" % (word, self.tag, self.cmd))
        sys.stdout.flush()

    def passed(self):
        self.result("PASSED")
        return 0

    def failed(self):
        self.result("FAILED")
        return 1

    def setup_failed(self):
        error("Failed to create engine from model or file.")
        error("Engine set up failed")
        return self.failed()


def help_text(ver):
    lines = ["=== Model Options ===", "  --onnx=<file>               ONNX model", "",
             "=== Build Options ===",
             "  --minShapes=spec            Build with dynamic shapes using a profile with the min shapes provided",
             "  --optShapes=spec            Build with dynamic shapes using a profile with the opt shapes provided",
             "  --maxShapes=spec            Build with dynamic shapes using a profile with the max shapes provided"]
    if ver < (10, 0):
        lines.append("  --workspace=N               Set workspace size in MiB.")
    lines += ["  --memPoolSize=poolspec      Specify the size constraints of the designated memory pool(s)",
              "  --fp16                      Enable fp16 precision, in addition to fp32 (default = disabled)",
              "  --int8                      Enable int8 precision, in addition to fp32 (default = disabled)",
              "  --best                      Enable all precisions to achieve the best performance (default = disabled)",
              "  --saveEngine=<file>         Save the serialized engine",
              "  --loadEngine=<file>         Load a serialized engine",
              "  --timingCacheFile=<file>    Save/load the serialized global timing cache"]
    if ver >= (8, 6):
        lines += ["  --builderOptimizationLevel  Set the builder optimization level. (default is 3)",
                  "  --skipInference             Exit after the engine has been built and skip inference perf measurement"]
    if ver < (10, 0):
        lines.append("  --buildOnly                 Exit after the engine has been built and skip inference perf measurement")
    lines += ["", "=== Inference Options ===",
              "  --shapes=spec               Set input shapes for dynamic shapes inference inputs.",
              "  --iterations=N              Run at least N inference iterations (default = 10)",
              "  --warmUp=N                  Run for N milliseconds to warmup before measuring performance (default = 200)",
              "  --duration=N                Run performance measurements for at least N seconds wallclock time (default = 3)",
              "  --loadInputs=spec           Load input values from files (default = generate random inputs). Input names can be "
              "wrapped with single quotes (ex: 'Input:0')",
              '                              Input values spec ::= Ival[","spec]',
              '                                           Ival ::= name":"file',
              "", "=== Reporting Options ===",
              "  --verbose                   Use verbose logging (default = false)",
              "  --exportOutput=<file>       Write the output tensors to a json file (default = disabled)",
              "  --percentile=P1,P2,P3,...   Report performance for the P1,P2,P3,... percentages (default = 90,95,99%)",
              "", "=== System Options ===", "  --device=N                  Select cuda device N (default = 0)",
              "", "  --help, -h                  Print this message"]
    return "\n".join(lines) + "\n"


def parse_options(argv, ver):
    """-> (options dict, None) or (None, message) for the first unknown option."""
    opts = {}
    for arg in argv:
        if arg in ("--help", "-h"):
            opts["--help"] = ""
            continue
        name, eq, value = arg.partition("=")
        spec = OPTIONS.get(name)
        if spec is None or ver < spec[1] or (spec[2] is not None and ver >= spec[2]):
            return None, "Unknown option: %s %s" % (name, value)
        opts[name] = value if eq else ""
    return opts, None


# ------------------------------------------------------------------ engines

def engine_bytes(ident, onnx_sha, precision, model, profile=None, extra=None, externals=None):
    """The plan; `extra` adds metadata (e.g. {"int8": "calibrated" | "qdq" | "placeholder"}). After the
    ONNX graph come the external weights files it read (`externals` {location: bytes}, listed in the
    JSON line as "external": [[location, size]])."""
    v = ident["trt"]
    onnx_size = len(model)
    head = MAGIC + bytes(20) + bytes([v[0] & 0xFF, v[1] & 0xFF, v[2] & 0xFF, v[3] & 0xFF]) + bytes(4)
    meta = {"trt": trt_str(v), "compute": ident["compute"], "gpu": ident["gpu"],
            "onnx_sha256": onnx_sha, "onnx_size": onnx_size, "precision": precision}
    if profile:
        meta["profile"] = profile
    meta.update(extra or {})
    weights = b""
    if externals:
        meta["external"] = [[loc, len(externals[loc])] for loc in sorted(externals)]
        weights = b"".join(externals[loc] for loc in sorted(externals))
    body = SIM_TAG + json.dumps(meta, sort_keys=True).encode() + b"\n" + model + weights
    size = max(4096, (onnx_size + len(weights)) // (2 if precision != "fp32" else 1))
    filler, block = bytearray(), hashlib.sha256(onnx_sha.encode()).digest()
    while len(filler) < size:
        block = hashlib.sha256(block).digest()
        filler += block
    return head + body + bytes(filler[:size])


def read_engine_meta(data):
    """-> (meta, None) or (None, reason) where reason is 'magic'."""
    if len(data) < 32 or data[:4] != MAGIC:
        return None, "magic"
    meta = {"trt": ".".join(str(b) for b in data[24:28])}
    rest = data[32:]
    if rest.startswith(SIM_TAG):
        line = rest[len(SIM_TAG):].split(b"\n", 1)[0]
        try:
            meta.update(json.loads(line.decode()))
        except ValueError:
            return None, "magic"
    return meta, None


def engine_onnx(data):
    """The ONNX bytes embedded at build time, or None (a plan without them)."""
    meta, problem = read_engine_meta(data)
    if problem or "onnx_size" not in meta:
        return None
    start = 32 + len(SIM_TAG) + data[32 + len(SIM_TAG):].index(b"\n") + 1
    model = data[start:start + meta["onnx_size"]]
    if hashlib.sha256(model).hexdigest() != meta.get("onnx_sha256"):
        return None
    return model


def engine_externals(data):
    """{location: bytes} of the external weights embedded at build time ({} if none)."""
    meta, problem = read_engine_meta(data)
    if problem or not meta.get("external"):
        return {}
    start = 32 + len(SIM_TAG) + data[32 + len(SIM_TAG):].index(b"\n") + 1 + meta["onnx_size"]
    out = {}
    for location, size in meta["external"]:
        out[location] = data[start:start + size]
        start += size
    return out


def _varint(data, i):
    value, shift = 0, 0
    while True:
        b = data[i]
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return value, i
        shift += 7


#: a TensorProto.external_data entry whose key is "location" (StringStringEntryProto: key = field 1,
#: value = field 2), as serialized: the value follows as a length-delimited string
_LOCATION_KEY = b"\x0a\x08location\x12"


def external_locations(model):
    """The external-data locations an ONNX names (a byte scan: the sim has no protobuf)."""
    found, i = [], model.find(_LOCATION_KEY)
    while i >= 0:
        size, start = _varint(model, i + len(_LOCATION_KEY))
        name = model[start:start + size].decode("utf-8", "replace")
        if name not in found:
            found.append(name)
        i = model.find(_LOCATION_KEY, start + size)
    return found


def read_external_weights(onnx, model, ver):
    """({location: bytes}, None) or (None, [error lines]) like the ONNX parser's parseExternalWeights
    (onnx-tensorrt WeightsContext.cpp, onnx2trt_utils.cpp; docs/trtexec.md §11): each location is
    relative to the folder of the ONNX file; from 10.0 a path through '../' is refused."""
    out = {}
    for location in external_locations(model):
        normalized = os.path.normpath(location) if location else location
        if ver >= (10, 0) and "../" in normalized + "/":
            return None, ["[TRT] Relative paths to parent (../) are not allowed in ONNX external weights! "
                          "Normalized path is: %s" % normalized]
        slash = onnx.rfind("/")
        path = onnx[:slash + 1] + normalized if slash >= 0 else normalized
        try:
            with open(path, "rb") as f:
                out[location] = f.read()
        except OSError:
            return None, ["[TRT] Failed to open file: %s" % path]
    return out, None


def write_output(path, data):
    """trtexec writes its outputs (plan, timing cache, exported outputs) in place, not via a temp name."""
    with open(path, "wb") as f:
        f.write(data)


def parse_shapes(spec):
    """A --shapes/--minShapes/... value -> {name: [dims]} (split on ',', then on the last ':', as
    sampleOptions.cpp; dims joined by 'x')."""
    out = {}
    for piece in [p for p in spec.split(",") if p]:
        name, _, dims = piece.rpartition(":")
        name = name[1:-1] if len(name) > 1 and name[0] == name[-1] == "'" else name
        out[name] = [int(d) for d in dims.split("x") if d]
    return out


def build_profile(opts):
    """The optimization profile of --minShapes/--optShapes/--maxShapes: {name: {min, opt, max}}.
    As trtexec (sampleOptions.cpp), an input given in only some of the three takes the missing
    ones from the others (opt first)."""
    given = dict((k, parse_shapes(opts.get("--%sShapes" % k, ""))) for k in ("min", "opt", "max"))
    profile = {}
    for name in sorted(set(given["min"]) | set(given["opt"]) | set(given["max"])):
        got = dict((k, given[k][name]) for k in ("min", "opt", "max") if name in given[k])
        first = got.get("opt") or got.get("min") or got.get("max")
        profile[name] = dict((k, got.get(k, first)) for k in ("min", "opt", "max"))
    return profile


def profile_error(profile, shapes):
    """The message TensorRT gives when --shapes lie outside the engine's profile, or None.
    IExecutionContext::setInputShape refuses them (text as reported in NVIDIA/TensorRT#4011 and
    NVIDIA/TensorRT-LLM#818), and trtexec then fails to set up inference."""
    for name, dims in sorted(shapes.items()):
        rng = profile.get(name)
        if rng is None:
            continue
        if len(dims) != len(rng["min"]) or not all(lo <= d <= hi for lo, d, hi in zip(rng["min"], dims, rng["max"])):
            return ("Error[3]: [executionContext.cpp::setInputShape::2288] Error Code 3: API Usage Error "
                    "(Parameter check failed at: runtime/api/executionContext.cpp::setInputShape::2288, condition: "
                    "satisfyProfile Runtime dimension does not satisfy any optimization profile.)")
    return None


def log_state(ident, name, record):
    if not ident["state"]:
        return
    os.makedirs(ident["state"], exist_ok=True)
    record["ts"] = round(time.time(), 3)
    with open(os.path.join(ident["state"], name), "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def has_qdq(model):
    """The ONNX holds QuantizeLinear/DequantizeLinear nodes (explicit quantization)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "trt_python"))
    try:
        import onnx_reader
        return bool(onnx_reader.read_model(model).op_types() & {"QuantizeLinear", "DequantizeLinear"})
    except ValueError:
        return False
    finally:
        sys.path.pop(0)


def calibration_header(ident):
    return "TRT-%s-" % banner_tag(ident["trt"]).split("v", 1)[1].split("]", 1)[0]


def read_calibration_scales(text):
    """{tensor: scale} of a calibration cache's `name: <hex float32>` lines (docs/trtexec.md §10)."""
    import struct
    scales = {}
    for line in text.splitlines()[1:]:
        name, sep, value = line.rpartition(": ")
        if sep and re.fullmatch(r"[0-9a-fA-F]{1,8}", value.strip()):
            scales[name] = struct.unpack(">f", struct.pack(">I", int(value.strip(), 16)))[0]
    return scales


def input_scales(model, scales):
    """The scales of the network's inputs, from a calibration cache's scales."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "trt_python"))
    try:
        import onnx_reader
        names = [i.name for i in onnx_reader.read_model(model).graph_inputs]
    except ValueError:
        names = []
    finally:
        sys.path.pop(0)
    return dict((n, scales[n]) for n in names if n in scales)


def int8_mode(opts, model, ident):
    """How an INT8 build gets its scales (docs/trtexec.md §10): "qdq" (Q/DQ nodes in the ONNX),
    "calibrated" (--calib=<cache> written by this TensorRT), "random" (--calib names a missing or
    foreign cache: trtexec's calibrator then calibrates on random data), else "placeholder"
    (no --calib: trtexec sets placeholder dynamic ranges; performance runs only)."""
    if has_qdq(model):
        if "--calib" in opts:
            warn("[TRT] Calibrator won't be used in explicit precision mode. Use quantization aware training to "
                 "generate network with Quantize/Dequantize nodes.")
        info("Calibration: explicit quantization (Q/DQ)")
        return "qdq", None
    calib = opts.get("--calib")
    if not calib:
        info("Calibration: Dynamic")
        return "placeholder", None
    info("Calibration: %s" % calib)
    try:
        with open(calib, "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        text = ""
    head = text.split("\n", 1)[0]
    if head.startswith(calibration_header(ident)):
        return "calibrated", input_scales(model, read_calibration_scales(text))
    warn("[TRT] Calibration cache %s %s; calibrating with random data" % (
        calib, "was written by another TensorRT (%s)" % head if head else "cannot be read"))
    return "random", None


def dla_setup(opts, ident):
    """--useDLACore=N [--allowGPUFallback], as trtexec's setupNetworkAndConfig (docs/trtexec.md §12):
    {"dla_core", "gpu_fallback"} for the plan's JSON line, None without DLA, False (error printed)
    when this device has no DLA core N."""
    if "--useDLACore" not in opts:
        return None
    try:
        core = int(opts["--useDLACore"])
    except ValueError:
        error("Invalid DLA core: %s" % opts["--useDLACore"])
        return False
    if core < 0 or core >= ident["dla_cores"]:
        error("Cannot create DLA engine, %d not available" % core)
        return False
    info("DLACore: %d%s" % (core, " (GPU fallback allowed)" if "--allowGPUFallback" in opts else ""))
    return {"dla_core": core, "gpu_fallback": "--allowGPUFallback" in opts}


def refit_mode(opts):
    """What the build flags make of the plan (docs/trtexec.md §13): --refit = kREFIT; --stripWeights
    = kSTRIP_PLAN with kREFIT_IDENTICAL unless --refit is given too; --stripAllWeights = both."""
    stripped = "--stripWeights" in opts or "--stripAllWeights" in opts
    refit = "--refit" in opts or "--stripAllWeights" in opts
    if not (stripped or refit):
        return None
    return {"mode": "refit" if refit else "identical", "stripped": stripped, "refits": 0}


def precision_of(opts):
    for p in ("best", "int8", "fp16"):
        if "--" + p in opts:
            return p
    return "fp32"


def trt_error(ver, code, kind, message, where):
    """Library error line as 8.x (`6: msg`) or 10.x (`IRuntime::...: Error Code 6: API Usage Error (msg)`)."""
    if ver >= (10, 0):
        error("IRuntime::deserializeCudaEngine: Error Code %d: %s (%s)" % (code, kind, message))
    else:
        error("%d: %s" % (code, message) if code == 6 else "%d: [%s] Error Code %d: %s (%s)" % (code, where, code, kind, message))


# ------------------------------------------------------------------ actions

def do_build(run, opts, ver):
    ident = run.ident
    onnx = opts["--onnx"]
    info("=== Model Options ===")
    info("Format: ONNX")
    info("Model: %s" % onnx)
    info("=== Build Options ===")
    pools = "default"
    if "--memPoolSize" in opts:
        m = re.match(r"workspace:([\d.]+)([BKMG]?)$", opts["--memPoolSize"])
        if not m:
            error("Invalid memPoolSize: %s" % opts["--memPoolSize"])
            return run.failed()
        value, suffix = float(m.group(1)), m.group(2)
        if ver < (10, 0) or not suffix:      # 8.4-8.6 std::stod drops the suffix
            mib = value
        else:
            mib = value * {"B": 1.0 / 2 ** 20, "K": 1.0 / 1024, "M": 1, "G": 1024}[suffix]
        pools = "workspace: %g MiB" % mib
    elif "--workspace" in opts:
        warn("--workspace flag has been deprecated by --memPoolSize flag.")
        pools = "workspace: %s MiB" % opts["--workspace"]
    info("Memory Pools: %s, dlaSRAM: default, dlaLocalDRAM: default, dlaGlobalDRAM: default" % pools)
    precision = precision_of(opts)
    info("Precision: FP32" + {"fp32": "", "fp16": "+FP16", "int8": "+INT8", "best": "+FP16+INT8"}[precision])
    info("TensorRT version: %s" % trt_str(ident["trt"], 3))
    info("Selected Device: %s" % ident["gpu"])
    info("Compute Capability: %s" % ident["compute"])

    try:
        with open(onnx, "rb") as f:
            model = f.read()
    except OSError:
        error("Could not open file %s" % onnx)
        error("Failed to parse onnx file")
        error("Parsing model failed")
        return run.setup_failed()
    if not model or model[:1] != b"\x08":
        error("[TRT] ModelImporter.cpp:735: Failed to parse ONNX model from file: %s" % onnx)
        error("Failed to parse onnx file")
        error("Parsing model failed")
        return run.setup_failed()
    for op in ident["unsupported_ops"]:
        if op.encode() in model:
            info("[TRT] No importer registered for op: %s. Attempting to import as plugin." % op)
            info("[TRT] Searching for plugin: %s, plugin_version: 1, plugin_namespace: " % op)
            if ver >= (10, 0):
                error('[TRT] ModelImporter.cpp:949: ERROR: onnxOpCheckers.cpp:780 In function '
                      'checkFallbackPluginImporter: [6] INVALID_NODE: creator && "Plugin not found, are the '
                      'plugin name, version, and namespace correct?"')
            else:
                error('[TRT] ModelImporter.cpp:773: ERROR: builtin_op_importers.cpp:5404 In function '
                      'importFallbackPluginImporter: [8] UNSUPPORTED_NODE: Assertion failed: creator && '
                      '"Plugin not found, are the plugin name, version, and namespace correct?"')
            error("Failed to parse onnx file")
            error("Parsing model failed")
            return run.setup_failed()
    externals, problems = read_external_weights(onnx, model, ver)
    if problems:
        for line in problems:
            error(line)
        error("Failed to parse onnx file")
        error("Parsing model failed")
        return run.setup_failed()
    onnx_sha = hashlib.sha256(model).hexdigest()

    cache_path = opts.get("--timingCacheFile")
    cache_loaded = False
    if cache_path and os.path.isfile(cache_path):
        with open(cache_path, "rb") as f:
            blob = f.read()
        info("Loaded %d bytes of timing cache from %s" % (len(blob), cache_path))
        cache_loaded = True
    if ident["fail"] == "oom":
        time.sleep(ident["build_seconds"] / 4)
        error("[TRT] 2: [virtualMemoryBuffer.cpp::resizePhysical::140] Error Code 2: OutOfMemory "
              "(Requested size was 4294967296 bytes.)")
        error("Engine could not be created from network")
        error("Building engine failed")
        return run.setup_failed()
    profile = build_profile(opts)
    for name, rng in sorted(profile.items()):
        if len(set(len(rng[k]) for k in rng)) != 1 or not all(
                a <= b <= c for a, b, c in zip(rng["min"], rng["opt"], rng["max"])):
            error("[TRT] 4: [network.cpp::validate::2789] Error Code 4: Internal Error (%s: for dimension number 0 "
                  "in profile 0 does not satisfy MIN <= OPT <= MAX)" % name)  # shape as TensorRT 8.x's validate
            error("Engine could not be created from network")
            error("Building engine failed")
            return run.setup_failed()
    dla = dla_setup(opts, ident)
    if dla is False:
        return run.setup_failed()
    if dla and precision == "fp32":
        precision = "fp16"        # trtexec turns FP16 on for DLA unless INT8 is (sampleEngines.cpp)
    int8, scales = int8_mode(opts, model, ident) if precision in ("int8", "best") else (None, None)
    seconds = ident["build_seconds"] / (2 if cache_loaded else 1)
    start = time.time()
    time.sleep(seconds)
    elapsed = time.time() - start
    extra = dict([("int8", int8)] if int8 else [])
    extra.update({"int8_input_scales": scales} if scales else {})
    extra.update(dla or {})
    if refit_mode(opts):
        extra["refit"] = refit_mode(opts)
    data = engine_bytes(ident, onnx_sha, precision, model, profile, extra or None, externals)
    info("[TRT] Engine generation completed in %.4f seconds." % elapsed)
    if cache_path:
        cache = ("KILNSIM-TIMING-CACHE %s %s %s\n" % (trt_str(ident["trt"]), ident["compute"], onnx_sha)).encode()
        write_output(cache_path, cache)
        info("Saved %d bytes of timing cache to %s" % (len(cache), cache_path))
    if ver >= (9, 0):
        info("Engine built in %.4f sec." % elapsed)
    if ver >= (10, 0):
        info("Created engine with size: %.4f MiB" % (len(data) / 2.0 ** 20))
    engine_out = opts.get("--saveEngine")
    if engine_out:
        try:
            write_output(engine_out, data)
        except OSError as exc:
            error("Cannot write engine to %s: %s" % (engine_out, exc.strerror))
            return run.setup_failed()
        if ver >= (10, 0):
            info("Engine saved to %s" % engine_out)
    log_state(ident, "builds.log", {"onnx": onnx, "onnx_sha256": onnx_sha, "engine": engine_out,
                                    "external_data": sorted(externals), "dla_core": (dla or {}).get("dla_core"),
                                    "gpu_fallback": (dla or {}).get("gpu_fallback"),
                                    "trt": trt_str(ident["trt"]), "compute": ident["compute"],
                                    "gpu": ident["gpu"], "precision": precision, "argv": run.argv[1:],
                                    "profile": profile, "int8": int8, "refit": refit_mode(opts),
                                    "timing_cache_loaded": cache_loaded})
    if "--skipInference" in opts or "--buildOnly" in opts:
        info("Skipped inference phase since --%s is added." % ("skipInference" if "--skipInference" in opts else "buildOnly"))
        return run.passed()
    return do_inference(run, opts, data)


def do_load(run, opts, ver):
    ident = run.ident
    path = opts["--loadEngine"]
    info("=== Model Options ===")
    info("Format: *")
    info("Model: ")
    info("TensorRT version: %s" % trt_str(ident["trt"], 3))
    info("Selected Device: %s" % ident["gpu"])
    info("Compute Capability: %s" % ident["compute"])
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        error("Error opening engine file: %s" % path)
        return run.setup_failed()
    info("Engine loaded in 0.0123 sec.")
    meta, problem = read_engine_meta(data)
    running = trt_str(ident["trt"])
    if problem == "magic":
        trt_error(ver, 1, "Serialization", "Serialization assertion magicTagRead == kMAGIC_TAG failed."
                  "Magic tag does not match", "stdArchiveReader.cpp::StdArchiveReader::40")
        trt_error(ver, 4, "Internal Error", "Engine deserialization failed.", "runtime.cpp::deserializeCudaEngine::50")
        return run.setup_failed()
    if meta["trt"] != running:
        trt_error(ver, 6, "API Usage Error", "The engine plan file is not compatible with this version of TensorRT, "
                  "expecting library version %s got %s, please rebuild." % (running, meta["trt"]), "")
        return run.setup_failed()
    if meta.get("compute") and meta["compute"] != ident["compute"]:
        trt_error(ver, 6, "API Usage Error", "The engine plan file is generated on an incompatible device, "
                  "expecting compute %s got compute %s, please rebuild." % (meta["compute"], ident["compute"]), "")
        return run.setup_failed()
    if meta.get("gpu") and meta["gpu"] != ident["gpu"]:
        warn("[TRT] Using an engine plan file across different models of devices is not recommended and is "
             "likely to affect performance or even cause errors.")
    loaded_core = int(opts["--useDLACore"]) if opts.get("--useDLACore", "").isdigit() else None
    log_state(ident, "loads.log", {"engine": path, "sha256": hashlib.sha256(data).hexdigest(),
                                   "trt": running, "argv": run.argv[1:], "dla_core": loaded_core,
                                   "plan_dla_core": meta.get("dla_core")})
    return do_inference(run, opts, data)


def parse_load_inputs(spec):
    """--loadInputs value -> {name: file}, with the real parser's rules (sampleOptions.cpp
    splitNameAndValue: split on ',', then on the last ':' unless the name is 'quoted')."""
    out = {}
    for piece in [p for p in spec.split(",") if p]:
        quoted = piece.split("'")
        if len(quoted) != 1:
            if len(quoted) != 3:
                raise ValueError("Found invalid number of 's when parsing %s. Expected: 2, received: %d"
                                 % (piece, len(quoted) - 1))
            out[quoted[0] + quoted[1]] = quoted[2][1:]
        else:
            name, _, path = piece.rpartition(":")
            out[name] = path
    return out


ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float32",
             "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(int8)": "int8",
             "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def trt_io_type(ort_type, ver):
    """numpy dtype name of a TensorRT binding for an ONNX tensor type (INT64 I/O from 10.0)."""
    name = ORT_TYPES.get(ort_type, "float32")
    return "int32" if name == "int64" and ver < (10, 0) else name


def input_bindings(model, opts, ver, profile=None, externals=None):
    """[(name, trt dtype, ort dtype, shape)] of the ONNX inputs, dynamic dims from --shapes (else the
    profile's opt shape, else 1). External weights are written next to a graph file for onnxruntime."""
    import tempfile

    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if externals:
        with tempfile.TemporaryDirectory(prefix="trtexec-sim-") as tmp:
            for location, blob in externals.items():
                with open(os.path.join(tmp, location), "wb") as f:
                    f.write(blob)
            with open(os.path.join(tmp, "model.onnx"), "wb") as f:
                f.write(model)
            session = ort.InferenceSession(os.path.join(tmp, "model.onnx"), so, providers=["CPUExecutionProvider"])
    else:
        session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    shapes = parse_shapes(opts.get("--shapes", ""))
    out = []
    for i in session.get_inputs():
        dims = (shapes.get(i.name) or (profile or {}).get(i.name, {}).get("opt")
                or [d if isinstance(d, int) and d > 0 else 1 for d in i.shape])
        out.append((i.name, trt_io_type(i.type, ver), ORT_TYPES.get(i.type, "float32"), dims))
    return session, out


def load_inputs(run, opts, data, ver):
    """-> (ok, feeds or None): check the --loadInputs files like trtexec, and read them."""
    files = parse_load_inputs(opts.get("--loadInputs", ""))
    for name, path in sorted(files.items()):
        if not os.path.isfile(path):
            error("Uncaught exception detected: Cannot open file %s!" % path)
            return False, None
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        if "--exportOutput" in opts:
            error("Uncaught exception detected: simulator: --exportOutput needs numpy and onnxruntime in %s"
                  % sys.executable)
            return False, None
        return True, None                       # existence is all the sim can check without it
    model = engine_onnx(data)
    if model is None:
        if "--exportOutput" in opts:
            error("Uncaught exception detected: simulator: this plan embeds no ONNX, cannot compute outputs")
            return False, None
        return True, None
    import numpy as np
    session, bindings = input_bindings(model, opts, ver, (read_engine_meta(data)[0] or {}).get("profile"),
                                       engine_externals(data))
    known = {b[0] for b in bindings}
    for name in sorted(set(files) - known):
        error("Cannot find input tensor with name \"%s\" in the engine bindings! Please make sure the input "
              "tensor names are correct." % name)
        return False, None
    feeds = {}
    rng = np.random.default_rng(0)
    for name, trt_type, ort_type, dims in bindings:
        size = int(np.prod(dims)) * np.dtype(trt_type).itemsize
        if name in files:
            got = os.path.getsize(files[name])
            if got != size:
                if ver >= (10, 0):
                    error("Uncaught exception detected: Unexpected file size for input file: %s. Note: Input binding "
                          "size is: %d bytes but the file size is %d bytes. Double check the size and datatype of "
                          "the provided data." % (files[name], size, got))
                    return False, None
                if got < size:
                    error("Uncaught exception detected: Unexpected file size for input file: %s. Note: Expected: "
                          "%d bytes but only read: %d bytes" % (files[name], size, got))
                    return False, None
            value = np.fromfile(files[name], dtype=np.dtype(trt_type).newbyteorder("<"), count=int(np.prod(dims)))
            info("Using values loaded from %s for input %s" % (files[name], name))
        else:
            value = rng.uniform(-1, 1, dims) if trt_type.startswith("float") else rng.integers(0, 2, dims)
            info("Using random values for input %s" % name)
        feeds[name] = value.reshape(dims).astype(ort_type)
    return True, (session, feeds)


def compute_outputs(run, session, feeds, precision, ver, int8=None, input_scales=None):
    """Run the embedded ONNX; model TensorRT's output types, fp16 rounding and the noise knobs.
    An INT8 engine without real scales (placeholder ranges or random-data calibration) is off by
    several per cent of each output's range; calibrated or Q/DQ INT8 is rounded like fp16, and a
    calibrated engine quantizes its inputs with the cache's scales: values beyond the calibrated
    range saturate (calibration data of another scale than the real inputs shows in the outputs)."""
    import numpy as np
    feeds = dict(feeds)
    for name, scale in sorted((input_scales or {}).items()):
        if name in feeds and feeds[name].dtype.kind == "f" and scale > 0:
            q = np.clip(np.round(feeds[name] / scale), -127, 127)
            feeds[name] = (q * scale).astype(feeds[name].dtype)
    names = [o.name for o in session.get_outputs()]
    types = {o.name: o.type for o in session.get_outputs()}
    outputs = {}
    rng = np.random.default_rng(1234)
    for name, value in zip(names, session.run(names, feeds)):
        value = np.asarray(value)
        if value.dtype.kind == "f":
            value = value.astype(np.float32)
            if precision != "fp32":
                value = value.astype(np.float16).astype(np.float32)
            if int8 in ("placeholder", "random") and value.size:
                span = float(np.max(np.abs(value))) or 1.0
                value = value + (0.3 * span * np.cos(np.arange(value.size) * 1.7)).reshape(value.shape).astype(np.float32)
            if run.ident["output_noise"]:
                value = value + rng.normal(0, run.ident["output_noise"], value.shape).astype(np.float32)
            if run.ident["wrong_outputs"]:
                value = value * 1.5 + 0.75
        else:
            value = value.astype(trt_io_type(types[name], ver))
        outputs[name] = value
    return outputs


def _number(v):
    if isinstance(v, float):
        return "%g" % v                    # std::ostream default: 6 significant digits; nan, inf
    return str(int(v))


def export_outputs(path, outputs):
    """The JSON of sampleReporting.cpp exportJSONOutput, byte for byte in layout."""
    lines, sep = ["["], "  "
    for name, value in outputs.items():
        lines.append('%s{ "name" : "%s"' % (sep, name))
        sep = ", "
        lines.append('  %s"dimensions" : "%s"' % (sep, "x".join(str(d) for d in value.shape)))
        flat = value.reshape(-1).tolist()
        lines.append('  %s"values" : [ %s ]' % (sep, sep.join(_number(v) for v in flat)))
        lines.append("  }")
    lines.append("]")
    write_output(path, ("\n".join(lines) + "\n").encode())


TRACE_FIELDS = ("startEnqMs", "endEnqMs", "startH2dMs", "endH2dMs", "startComputeMs", "endComputeMs",
                "startD2hMs", "endD2hMs", "h2dMs", "computeMs", "d2hMs", "latencyMs")


def timing_trace(base, warmup_ms, min_iterations, seed):
    """Per-iteration times as trtexec records them (InferenceTrace, ms from the start of inference):
    warm-up iterations for `warmup_ms`, then at least max(min_iterations, 3 s worth: the default
    --duration) timed ones; latencies spread about `base` (+-1.5%, every 50th one 4% slower),
    the same for the same engine (seeded by its bytes)."""
    rng = random.Random(seed)
    trace, now, timed = [], 0.0, 0
    while now < warmup_ms or timed < max(min_iterations, int(3000 / base)):
        latency = base * (1.04 if timed % 50 == 49 else 0.985 + 0.03 * rng.random())
        h2d, d2h = latency * 0.03, latency * 0.02
        t = {"startEnqMs": now, "endEnqMs": now + base * 0.12, "startH2dMs": now, "endH2dMs": now + h2d}
        t["startComputeMs"] = t["endH2dMs"]
        t["endComputeMs"] = t["startComputeMs"] + latency - h2d - d2h
        t["startD2hMs"], t["endD2hMs"] = t["endComputeMs"], t["endComputeMs"] + d2h
        t["h2dMs"], t["computeMs"], t["d2hMs"] = h2d, latency - h2d - d2h, d2h
        t["latencyMs"] = latency
        trace.append(t)
        timed += t["startComputeMs"] >= warmup_ms
        now = t["endD2hMs"]
    return trace


def _f32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def summary(values, pcts):
    """"min = .. ms, max = .., mean = .., median = .., percentile(P%) = .." as printEpilog prints it:
    findMedian (the middle, or the mean of the two) and findPercentile (ascending, the value at
    all-1-int((1-p/100)*all), float arithmetic) of sampleReporting.cpp."""
    v = sorted(values)
    n, m = len(v), len(v) // 2
    median = v[m] if n % 2 else (v[m - 1] + v[m]) / 2

    def percentile(p):
        return v[max(n - 1 - int(_f32(_f32(1 - _f32(_f32(p) / 100)) * n)), 0)]
    pct = ", ".join("percentile(%g%%) = %.6g ms" % (p, percentile(p)) for p in pcts)
    return ("min = %.6g ms, max = %.6g ms, mean = %.6g ms, median = %.6g ms, %s"
            % (v[0], v[-1], sum(v) / n, median, pct))


def export_times(path, trace):
    """The JSON of sampleReporting.cpp exportJSONTrace, byte for byte in layout: one object per
    line, fields separated by ", ", values as std::ostream prints floats (6 significant digits)."""
    lines, sep = ["["], "  "
    for t in trace:
        lines.append(sep + "{ " + ", ".join('"%s" : %s' % (k, _number(t[k])) for k in TRACE_FIELDS) + " }")
        sep = ", "
    lines.append("]")
    write_output(path, ("\n".join(lines) + "\n").encode())


def do_inference(run, opts, data):
    ident = run.ident
    meta, _ = read_engine_meta(data)
    precision = (meta or {}).get("precision", "fp32")
    ver = tuple(ident["trt"][:2])
    refit = (meta or {}).get("refit") or {}
    if refit.get("stripped") and not refit.get("refits"):
        # a weight-stripped plan has no weights until it is refitted (TensorRT's own message for
        # this is not quoted in docs/trtexec.md: this text is the simulator's)
        error("simulator: this plan was built with --stripWeights and has not been refitted; "
              "its weights are missing")
        error("Inference set up failed")
        return run.failed()
    problem = profile_error((meta or {}).get("profile") or {}, parse_shapes(opts.get("--shapes", "")))
    if problem:
        error(problem)
        error("Inference set up failed")
        return run.failed()
    try:
        ok, prepared = load_inputs(run, opts, data, ver) if ("--loadInputs" in opts or "--exportOutput" in opts) \
            else (True, None)
    except ValueError as exc:
        error("Uncaught exception detected: %s" % exc)
        ok, prepared = False, None
    if not ok:
        return run.failed()
    seed = hashlib.sha256(data[:4096]).hexdigest()
    jitter = 1 + (int(seed[:4], 16) % 50) / 1000.0
    base = ident["latency_ms"] * {"fp32": 1.0, "fp16": 0.55, "int8": 0.4, "best": 0.38}.get(precision, 1.0) * jitter
    if ver >= (9, 0):  # setUpInference, default --allocationStrategy=static (sampleInference.cpp, 9.x/10.x)
        info("Created execution context with device memory size: %g MiB" % (len(data) / 1048576.0 * 0.75 + 1.5))
    info("Starting inference")
    time.sleep(0.01)
    if "--dumpProfile" in opts and "--separateProfileRun" not in opts:
        info("=== Profile (309 iterations ) ===")
        return run.passed()
    pcts = [90.0, 95.0, 99.0]
    if opts.get("--percentile"):
        try:
            pcts = [float(p) for p in opts["--percentile"].split(",")]
        except ValueError:
            error("Invalid percentile: %s" % opts["--percentile"])
            return run.failed()
    warmup_ms = float(opts.get("--warmUp") or 200)
    trace = timing_trace(base, warmup_ms, int(opts.get("--iterations") or 10), seed)
    timed = [t for t in trace if t["startComputeMs"] >= warmup_ms]  # isNotWarmup (sampleReporting.cpp)

    def stats(key):
        return summary([t[key] for t in timed], pcts)

    walltime = timed[-1]["endD2hMs"] - timed[0]["startH2dMs"]
    info("Timing trace has %d queries over %.6g s" % (len(timed), walltime / 1000.0))
    info("")
    info("=== Trace details ===")
    info("=== Performance summary ===")
    info("Throughput: %.6g qps" % (len(timed) / walltime * 1000.0))
    info("Latency: " + stats("latencyMs"))
    info("Enqueue Time: " + summary([t["endEnqMs"] - t["startEnqMs"] for t in timed], pcts))
    info("H2D Latency: " + stats("h2dMs"))
    info("GPU Compute Time: " + stats("computeMs"))
    info("D2H Latency: " + stats("d2hMs"))
    info("Total Host Walltime: %.6g s" % (walltime / 1000.0))
    info("Total GPU Compute Time: %.6g s" % (sum(t["computeMs"] for t in timed) / 1000.0))
    info("Explanations of the performance metrics are printed in the verbose logs.")
    info("")
    if "--exportTimes" in opts:  # from 8.5 without the warm-ups, before with them (exportJSONTrace)
        export_times(opts["--exportTimes"], timed if ver >= (8, 5) else trace)
    if "--exportOutput" in opts and prepared is not None:
        session, feeds = prepared
        export_outputs(opts["--exportOutput"], compute_outputs(run, session, feeds, precision, ver,
                                                               (meta or {}).get("int8"),
                                                               (meta or {}).get("int8_input_scales")))
    return run.passed()


def main(argv):
    ident = load_identity()
    ver = tuple(ident["trt"][:2])
    run = Run(ident, argv)
    # every start of trtexec loads libnvinfer (and CUDA) on a real device, --help included
    log_state(ident, "trt_invocations.log", {"tool": "trtexec", "argv": argv[1:]})
    run.result("RUNNING")
    opts, problem = parse_options(argv[1:], ver)
    if problem:
        error(problem)
        sys.stdout.write(help_text(ver))
        return run.failed()
    if "--help" in opts:
        sys.stdout.write(help_text(ver))
        return 0
    if "--onnx" in opts:
        return do_build(run, opts, ver)
    if "--loadEngine" in opts:
        return do_load(run, opts, ver)
    error("Model missing or format not recognized")
    sys.stdout.write(help_text(ver))
    return run.failed()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
