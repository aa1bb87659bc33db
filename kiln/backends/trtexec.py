"""The trtexec builder: argv per TensorRT version, output parsing, failure explanations.

Facts are from /work/shared/reference/tensorrt-jetson-facts.md (§4 CLI, §5 output).
Pure functions only: the caller runs the argv over a Transport and feeds
`result.stdout + "\\n" + result.stderr` to `parse_trtexec_output` (trtexec sends
INFO to stdout and WARNING/ERROR to stderr).

The TensorRT Python API builder is a standalone script, `TRT_API_BUILD_SCRIPT`
(kiln/device_side/trt_api_build.py): copy it to the device and run it with the
device's python3 (`api_build_argv`), then read its last line with `parse_api_build_output`.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from kiln.errors import BuildError, ConfigError
from kiln.devices.nvidia import decode_trt_version_number

log = logging.getLogger(__name__)

__all__ = [
    "BuildConfigError", "TrtexecFailed", "TrtBuildConfig", "ShapeRange", "EXTRA_FLAGS",
    "parse_trt_version", "build_argv", "load_argv", "TrtexecReport", "parse_trtexec_output",
    "explain_failure", "check_trtexec_result", "TRT_API_BUILD_SCRIPT", "api_build_argv",
    "parse_api_build_output",
]

PRECISIONS = ("fp32", "fp16", "int8", "best")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]{0,127}")


class BuildConfigError(ConfigError, BuildError):
    """A TensorRT build setting is invalid (names the field and how to fix it)."""


class TrtexecFailed(BuildError):
    """trtexec ran and said no; `report` holds the parsed output."""

    def __init__(self, message: str, *, report: "TrtexecReport", exit_code: int,
                 hint: str | None = None, **context: object) -> None:
        self.report = report
        self.exit_code = exit_code
        super().__init__(message, hint=hint, **context)


# ---------------------------------------------------------------------------- versions

def parse_trt_version(version: str | Sequence[int]) -> tuple[int, int, int]:
    """"8.5.2", "8.5.2.2", "10.3.0" or (10, 3) -> (major, minor, patch)."""
    if isinstance(version, str):
        m = re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.(\d+))?(?:\.\d+)*\s*", version)
        if not m:
            raise BuildConfigError(f"not a TensorRT version: {version!r}", field="trt_version",
                                   hint="use the fingerprint's 'tensorrt' value, e.g. '8.5.2' or '10.3.0'")
        return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    parts = tuple(int(p) for p in version) + (0, 0)
    return parts[0], parts[1], parts[2]


# ---------------------------------------------------------------------------- config

@dataclass(frozen=True)
class ShapeRange:
    """Dynamic shape profile of one input: dims for --minShapes / --optShapes / --maxShapes."""
    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class ExtraFlag:
    """A trtexec flag a user may pass through: value pattern (None = bare flag) and version range."""
    value: str | None = None
    since: tuple[int, int] = (8, 0)
    until: tuple[int, int] | None = None   # first version without it
    note: str = ""


#: Pass-through flags (facts §4). Anything that our own fields control (--onnx,
#: --saveEngine, --fp16, --workspace, shapes, ...) is deliberately not here.
EXTRA_FLAGS: dict[str, ExtraFlag] = {
    "--noTF32": ExtraFlag(),
    "--refit": ExtraFlag(),
    "--useDLACore": ExtraFlag(r"\d"),
    "--allowGPUFallback": ExtraFlag(),
    "--calib": ExtraFlag(r"[\w./-]+", note="INT8 calibration cache on the device"),
    "--hardwareCompatibilityLevel": ExtraFlag(r"none|ampere\+|sameComputeCapability", since=(8, 6),
                                              note="not supported on JetPack"),
    "--versionCompatible": ExtraFlag(since=(8, 6)),
    "--vc": ExtraFlag(since=(8, 6)),
    "--excludeLeanRuntime": ExtraFlag(since=(8, 6)),
    "--stronglyTyped": ExtraFlag(since=(10, 0)),
    "--stripWeights": ExtraFlag(since=(10, 0)),
    "--bf16": ExtraFlag(since=(10, 0)),
    "--stripAllWeights": ExtraFlag(since=(10, 1)),
    "--sparsity": ExtraFlag(r"disable|enable|force"),
    "--verbose": ExtraFlag(),
}


def _dims(value: object, where: str) -> tuple[int, ...]:
    if isinstance(value, str):
        value = value.split("x")
    try:
        dims = tuple(int(d) for d in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise BuildConfigError(f"shape {where} must be a list of positive integers, got {value!r}",
                               field="shapes", hint="write shapes like [1, 3, 640, 640] or '1x3x640x640'") from None
    if not dims or any(d <= 0 for d in dims) or any(isinstance(d, bool) for d in value):  # type: ignore[union-attr]
        raise BuildConfigError(f"shape {where} must be a non-empty list of positive integers, got {value!r}",
                               field="shapes", hint="write shapes like [1, 3, 640, 640]")
    return dims


def _shape_range(name: str, spec: object) -> ShapeRange:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BuildConfigError(f"input name {name!r} cannot be passed to trtexec shape flags", field="shapes",
                               hint="input names must match [A-Za-z_][A-Za-z0-9_./-]* (no ':' or ',')")
    if isinstance(spec, ShapeRange):
        spec = {"min": spec.min, "opt": spec.opt, "max": spec.max}
    if not isinstance(spec, Mapping) or set(spec) != {"min", "opt", "max"}:
        raise BuildConfigError(f"shapes.{name} must have exactly min, opt and max", field="shapes",
                               hint="e.g. shapes.images = {min=[1,3,640,640], opt=[4,3,640,640], max=[8,3,640,640]}")
    lo, mid, hi = (_dims(spec[k], f"{name}.{k}") for k in ("min", "opt", "max"))
    if not len(lo) == len(mid) == len(hi):
        raise BuildConfigError(f"shapes.{name}: min, opt and max have different ranks", field="shapes")
    if not all(a <= b <= c for a, b, c in zip(lo, mid, hi)):
        raise BuildConfigError(f"shapes.{name}: need min <= opt <= max in every dimension", field="shapes",
                               min=lo, opt=mid, max=hi)
    return ShapeRange(name, lo, mid, hi)


@dataclass(frozen=True)
class TrtBuildConfig:
    """What to ask TensorRT for. Validated at construction; `shapes` None = static input shapes.

    precision: fp32 | fp16 | int8 | best. Note: trtexec `--int8` without `--calib`
      uses placeholder ranges (performance only) unless the ONNX is Q/DQ-quantized.
    workspace_mib: workspace memory pool limit in MiB (None = TensorRT default).
    shapes: {input: {"min": dims, "opt": dims, "max": dims}} (stored as sorted ShapeRange tuple).
    builder_optimization_level: 0..5 (TensorRT >= 8.6; dropped with a warning before).
    extra_flags: pass-through flags from EXTRA_FLAGS, e.g. ("--noTF32",).
    timing_cache: use a timing cache file when the caller provides one.
    """
    precision: str = "fp16"
    workspace_mib: int | None = None
    shapes: tuple[ShapeRange, ...] | Mapping[str, object] | None = None
    builder_optimization_level: int | None = None
    extra_flags: tuple[str, ...] = ()
    timing_cache: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise BuildConfigError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}",
                                   field="precision", hint="set build.precision to fp16 (usual on Jetson)")
        w = self.workspace_mib
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w <= 0):
            raise BuildConfigError(f"workspace_mib must be a positive integer (MiB), got {w!r}",
                                   field="workspace_mib", hint="e.g. workspace_mib = 2048")
        lvl = self.builder_optimization_level
        if lvl is not None and (isinstance(lvl, bool) or not isinstance(lvl, int) or not 0 <= lvl <= 5):
            raise BuildConfigError(f"builder_optimization_level must be an integer 0..5, got {lvl!r}",
                                   field="builder_optimization_level", hint="TensorRT's default is 3")
        if not isinstance(self.timing_cache, bool):
            raise BuildConfigError("timing_cache must be true or false", field="timing_cache")
        shapes = self.shapes
        if shapes is not None:
            if isinstance(shapes, Mapping):
                ranges = [_shape_range(k, v) for k, v in shapes.items()]
            else:
                ranges = [_shape_range(s.name, s) if isinstance(s, ShapeRange) else _bad_shapes(s) for s in shapes]
            if not ranges:
                raise BuildConfigError("shapes is empty; leave it out for static shapes", field="shapes")
            object.__setattr__(self, "shapes", tuple(sorted(ranges, key=lambda r: r.name)))
        if isinstance(self.extra_flags, str):
            raise BuildConfigError("extra_flags must be a list of flags, not one string", field="extra_flags",
                                   hint='e.g. extra_flags = ["--noTF32"]')
        flags = tuple(self.extra_flags)
        for flag in flags:
            _check_extra_flag(flag)
        object.__setattr__(self, "extra_flags", flags)

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> "TrtBuildConfig":
        """From a `[models.X.build]` table; accepts `optimization_level` as an alias and
        ignores keys of other backends (ort_optimization)."""
        known = {"precision", "workspace_mib", "shapes", "builder_optimization_level", "extra_flags", "timing_cache"}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "optimization_level" in data and "builder_optimization_level" not in data:
            kwargs["builder_optimization_level"] = data["optimization_level"]
        if "extra_flags" in kwargs and isinstance(kwargs["extra_flags"], list):
            kwargs["extra_flags"] = tuple(kwargs["extra_flags"])
        return cls(**kwargs)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        """Canonical, JSON-friendly form (for engine keys)."""
        return {
            "precision": self.precision, "workspace_mib": self.workspace_mib,
            "shapes": None if self.shapes is None else {
                r.name: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)} for r in self.shapes},
            "builder_optimization_level": self.builder_optimization_level,
            "extra_flags": list(self.extra_flags), "timing_cache": self.timing_cache,
        }


def _bad_shapes(value: object):
    raise BuildConfigError(f"shapes must be a table of input -> {{min, opt, max}}, got {value!r}", field="shapes")


def _check_extra_flag(flag: object) -> tuple[str, str | None]:
    if not isinstance(flag, str):
        raise BuildConfigError(f"extra flag {flag!r} is not a string", field="extra_flags")
    name, eq, value = flag.partition("=")
    spec = EXTRA_FLAGS.get(name)
    if spec is None:
        raise BuildConfigError(f"extra flag {name!r} is not allowed", field="extra_flags",
                               hint="allowed: " + " ".join(sorted(EXTRA_FLAGS)) +
                                    "; precision, workspace, shapes and caches have their own settings")
    if spec.value is None and eq:
        raise BuildConfigError(f"extra flag {name} takes no value", field="extra_flags")
    if spec.value is not None and not (eq and re.fullmatch(spec.value, value)):
        raise BuildConfigError(f"extra flag {name} needs a value matching {spec.value}", field="extra_flags",
                               hint=f"write it as {name}=<value>")
    return name, value if eq else None


# ---------------------------------------------------------------------------- argv

def _shape_flags(shapes: Sequence[ShapeRange] | None) -> list[str]:
    if not shapes:
        return []
    out = []
    for flag, attr in (("--minShapes", "min"), ("--optShapes", "opt"), ("--maxShapes", "max")):
        spec = ",".join(f"{r.name}:" + "x".join(map(str, getattr(r, attr))) for r in shapes)
        out.append(f"{flag}={spec}")
    return out


def build_argv(trtexec_path: str, onnx: str, engine_out: str, cfg: TrtBuildConfig,
               trt_version: str | Sequence[int], timing_cache: str | None = None) -> list[str]:
    """trtexec argv for a build-only run on a device with TensorRT `trt_version`.

    - workspace: `--workspace=N` before 8.4 (removed in 10.0), else
      `--memPoolSize=workspace:N` with a bare integer (MiB in every version; suffixes
      are dropped by 8.4-8.6 and double-scaled by 10.0).
    - `--builderOptimizationLevel` only from 8.6 (dropped with a warning before).
    - build only: `--skipInference` from 8.6, `--buildOnly` before (gone in 10.0).
    - `--timingCacheFile` when cfg.timing_cache and a path is given.
    """
    ver = parse_trt_version(trt_version)
    argv = [trtexec_path, f"--onnx={onnx}", f"--saveEngine={engine_out}"]
    if cfg.precision != "fp32":
        argv.append(f"--{cfg.precision}")
    if cfg.workspace_mib is not None:
        argv.append(f"--workspace={cfg.workspace_mib}" if ver < (8, 4)
                    else f"--memPoolSize=workspace:{cfg.workspace_mib}")
    argv += _shape_flags(cfg.shapes)
    if cfg.builder_optimization_level is not None:
        if ver >= (8, 6):
            argv.append(f"--builderOptimizationLevel={cfg.builder_optimization_level}")
        else:
            log.warning("builder_optimization_level=%s ignored: TensorRT %s.%s.%s has no "
                        "--builderOptimizationLevel (8.6+)", cfg.builder_optimization_level, *ver)
    if cfg.timing_cache and timing_cache:
        argv.append(f"--timingCacheFile={timing_cache}")
    for flag in cfg.extra_flags:
        name, _ = _check_extra_flag(flag)
        spec = EXTRA_FLAGS[name]
        if ver[:2] < spec.since or (spec.until and ver[:2] >= spec.until):
            raise BuildConfigError(f"{name} is not available in TensorRT {'.'.join(map(str, ver))}",
                                   field="extra_flags", trt_version=".".join(map(str, ver)),
                                   hint=f"{name} needs TensorRT >= {spec.since[0]}.{spec.since[1]}; "
                                        "drop it for this hardware class")
        argv.append(flag)
    argv.append("--skipInference" if ver >= (8, 6) else "--buildOnly")
    return argv


def _load_inputs_spec(load_inputs: Mapping[str, str]) -> str:
    """`--loadInputs` value: `name:file[,name:file]`.

    trtexec splits the list on ',' and each piece on its *last* ':' unless the name is
    wrapped in single quotes (`'name':file`, meant for Windows paths), in which case the
    file is everything after the closing quote and ':'. Same parser in 8.5.2, v8.6.1,
    v10.3.0 and v10.16 (samples/common/sampleOptions.cpp `splitNameAndValue`, and
    `getAndDelOption(arguments, "--loadInputs", list)` + `splitToStringVec(list, ',')`).
    So: no ',' or "'" anywhere, and the name is quoted when the file contains ':'.
    """
    pieces = []
    for name, path in sorted(load_inputs.items()):
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise BuildConfigError(f"input name {name!r} cannot be passed to trtexec --loadInputs",
                                   field="load_inputs", hint="input names must match [A-Za-z_][A-Za-z0-9_./-]*")
        path = str(path)
        if not path or "," in path or "'" in path:
            raise BuildConfigError(f"input file {path!r} cannot be passed to trtexec --loadInputs "
                                   "(',' and \"'\" split the spec)", field="load_inputs",
                                   hint="use a relative file name and run trtexec from its folder")
        pieces.append(f"'{name}':{path}" if ":" in path else f"{name}:{path}")
    return ",".join(pieces)


def load_argv(trtexec_path: str, engine: str, *, warmup_ms: int | None = None,
              iterations: int | None = None, duration_s: int | None = None,
              percentile: float | None = None, shapes: Mapping[str, Sequence[int]] | None = None,
              load_inputs: Mapping[str, str] | None = None, export_output: str | None = None) -> list[str]:
    """trtexec argv that deserializes and times an engine (verification on the device).

    The summary reports percentiles 90/95/99 by default; `percentile` asks for one
    more (a single value: the multi-value form is not confirmed for every version).

    `load_inputs` {input name: file}: `--loadInputs`, raw little-endian bytes of each
    input in the engine's input type, C order, nothing else (samples/trtexec/README.md
    "Using custom input data": `np.ones(..., np.float32).tofile("data.bin")`; the size
    must match the binding: 8.5.2 samples/common/sampleUtils.cpp `loadFromFile` reads
    exactly the binding size, v10.3.0 also rejects a file of another size). Inputs
    left out get random values. `export_output`: `--exportOutput=<file>`, a JSON list of
    {"name", "dimensions" ("1x300x4"), "values" (flat, C order)} written from the last
    inference iteration (samples/common/sampleReporting.cpp `exportJSONOutput`, same in
    8.5.2 .. v10.16). Both flags exist unchanged in 8.5.2 .. v10.16, so no version gate.
    Every iteration reuses the loaded inputs, so `--iterations/--warmUp/--duration` only
    change the timing (trtexec runs for at least max(iterations, duration) after warm-up).
    """
    argv = [trtexec_path, f"--loadEngine={engine}"]
    for flag, value in (("--warmUp", warmup_ms), ("--iterations", iterations), ("--duration", duration_s)):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BuildConfigError(f"{flag} needs a non-negative integer, got {value!r}", field=flag[2:])
            argv.append(f"{flag}={value}")
    if percentile is not None:
        if not 0 <= float(percentile) <= 100:
            raise BuildConfigError(f"percentile must be within 0..100, got {percentile!r}", field="percentile")
        argv.append(f"--percentile={float(percentile):g}")
    if shapes:
        spec = ",".join(f"{_shape_range(n, {'min': d, 'opt': d, 'max': d}).name}:" + "x".join(map(str, d))
                        for n, d in sorted(shapes.items()))
        argv.append(f"--shapes={spec}")
    if load_inputs:
        argv.append(f"--loadInputs={_load_inputs_spec(load_inputs)}")
    if export_output is not None:
        if not str(export_output):
            raise BuildConfigError("export_output needs a file name", field="export_output")
        argv.append(f"--exportOutput={export_output}")
    return argv


# ---------------------------------------------------------------------------- output

@dataclass
class TrtexecReport:
    status: str = "unknown"                  # PASSED | FAILED | unknown
    tensorrt_version: str | None = None      # "8.5.2" from the banner
    tensorrt_build: str | None = None        # "43" from " [b43]" (10.4+)
    command: str | None = None               # argv after "# " in the banner
    build_seconds: float | None = None
    engine_size_mib: float | None = None
    throughput_qps: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)      # min max mean median p90 p95 p99
    gpu_compute_ms: dict[str, float] = field(default_factory=dict)
    selected_device: str | None = None
    compute_capability: str | None = None
    errors: list[str] = field(default_factory=list)    # "[E]" messages without the prefix
    warnings: list[str] = field(default_factory=list)
    infos: list[str] = field(default_factory=list)     # kept for explain_failure (op names)

    @property
    def passed(self) -> bool:
        return self.status == "PASSED"


_PREFIX = re.compile(r"^(?:\[\d\d/\d\d/\d{4}-\d\d:\d\d:\d\d\] )?\[([VIWEF])\] (.*)$")
_STAT = re.compile(r"(min|max|mean|median|percentile\((\d+(?:\.\d+)?)%\))\s*=\s*([-+\d.eE]+)\s*ms")
_RESULT = re.compile(r"^&&&& (RUNNING|PASSED|FAILED|WAIVED) TensorRT\.trtexec (.*)$")


def _stats(text: str) -> dict[str, float]:
    out = {}
    for name, pct, value in _STAT.findall(text):
        out[f"p{pct}" if pct else name] = float(value)
    return out


def parse_trtexec_output(text: str) -> TrtexecReport:
    """Parse trtexec output (stdout and stderr together) into a TrtexecReport."""
    r = TrtexecReport()
    continues: str | bool = False  # an [E]/[W] message may go on over unprefixed lines
    for raw in text.splitlines():
        line = raw.rstrip()
        m = _RESULT.match(line)
        if m:
            continues = False
            kind, rest = m.groups()
            if kind != "RUNNING":
                r.status = kind
            b = re.match(r"\[TensorRT v(\d+)\](?:\s*\[b(\d+)\])?\s*(?:#\s*(.*))?", rest)
            if b and (kind == "RUNNING" or r.tensorrt_version is None):
                r.tensorrt_version = decode_trt_version_number(int(b.group(1)))
                r.tensorrt_build, r.command = b.group(2), b.group(3)
            continue
        m = _PREFIX.match(line)
        if not m:
            if continues and line.strip() and not line.startswith("==="):
                target = r.errors if continues == "E" else r.warnings
                target[-1] = f"{target[-1]} {line.strip()}"
            else:
                continues = False
            continue
        sev, msg = m.groups()
        continues = False
        if sev in "EF":
            r.errors.append(msg)
            continues = "E"
        elif sev == "W":
            r.warnings.append(msg)
            continues = "W"
        elif sev == "I":
            r.infos.append(msg)
        if msg.startswith("Latency:"):                     # anchored: "H2D Latency:" does not match
            r.latency_ms = _stats(msg)
        elif msg.startswith("GPU Compute Time:"):
            r.gpu_compute_ms = _stats(msg)
        elif msg.startswith("Throughput:"):
            t = re.match(r"Throughput:\s*([\d.eE+-]+)", msg)
            r.throughput_qps = float(t.group(1)) if t else None
        elif (b := re.match(r"Engine built in ([\d.]+) sec", msg)):
            r.build_seconds = float(b.group(1))
        elif (b := re.search(r"Engine generation completed in ([\d.]+) seconds", msg)) and r.build_seconds is None:
            r.build_seconds = float(b.group(1))
        elif (b := re.match(r"Created engine with size: ([\d.]+) MiB", msg)):
            r.engine_size_mib = float(b.group(1))
        elif msg.startswith("Selected Device:"):
            r.selected_device = msg.split(":", 1)[1].strip()
        elif (b := re.match(r"Compute Capability: (\d+\.\d+)", msg)):
            r.compute_capability = b.group(1)
        elif (b := re.match(r"TensorRT version: (\d+(?:\.\d+)+)", msg)) and r.tensorrt_version is None:
            r.tensorrt_version = b.group(1)
    return r


def explain_failure(report: TrtexecReport, exit_code: int) -> str:
    """One paragraph: why trtexec failed and what to do next (known error shapes, facts §5)."""
    errors = "\n".join(report.errors)
    where = f"TensorRT {report.tensorrt_version}" if report.tensorrt_version else "this TensorRT"
    if m := re.search(r"expecting library version (\S+?),? got (\S+?),? please rebuild", errors):
        return (f"The engine was built with another TensorRT version: the plan says {m.group(2)} "
                f"(garbled if the major versions differ) but this device runs {m.group(1)}. Engines only "
                "load on the exact TensorRT they were built with. Hint: rebuild the engine for this hardware "
                "class (re-run `doit fingerprint` so the class records the new version).")
    if m := re.search(r"incompatible device, expecting compute (\S+) got compute (\S+?),? please rebuild", errors):
        return (f"The engine was built for compute capability {m.group(1)} but this GPU is {m.group(2)}. "
                "Hint: build on the target itself or an identical device; check the target's hardware class.")
    if "Magic tag does not match" in errors or "magicTagRead" in errors:
        return ("The file is not a TensorRT engine plan (bad magic tag): it is corrupt, truncated or some "
                "other file. Hint: delete it and re-fetch it from the store (its sha256 is checked) or rebuild.")
    if m := re.search(r"Unknown option: (\S+)", errors):
        return (f"{where} trtexec does not know the option {m.group(1)} (flags differ by version: "
                "--workspace was removed in 10.0, --skipInference and --builderOptimizationLevel need 8.6). "
                "Hint: check the fingerprint's TensorRT version or drop the flag from build.extra_flags.")
    if "OutOfMemory" in errors or "out of memory" in errors.lower():
        m = re.search(r"Requested size was (\d+) bytes", errors)
        size = f" ({int(m.group(1)) / 2**20:.1f} MiB requested)" if m else ""
        return (f"The GPU ran out of memory{size}. Hint: lower workspace_mib or the max shapes, stop other "
                "GPU processes on the device, or build on a device of the same class with more free memory.")
    if "Plugin not found" in errors or "UNSUPPORTED_NODE" in errors or "INVALID_NODE" in errors:
        ops = sorted(set(re.findall(r"No importer registered for op: (\w+)", "\n".join(report.infos + report.errors))))
        what = f"operator {', '.join(ops)}" if ops else "an operator"
        return (f"{where} cannot import {what} from the ONNX model and found no plugin for it. "
                "Hint: export with another opset or rewrite that part of the model, or load a plugin library.")
    if "Calibration failure" in errors:
        return ("INT8 calibration found no scaling factors. Hint: provide a calibration cache, use a Q/DQ-"
                "quantized ONNX, or build with precision fp16.")
    if "Failed to parse onnx file" in errors or "Failed to parse ONNX" in errors or "Could not open file" in errors:
        first = next((e for e in report.errors if "parse" in e.lower() or "open" in e.lower()), report.errors[0])
        return (f"The ONNX file could not be parsed by {where}: {first}. Hint: check that the file arrived "
                "intact (sha256) and that its opset is supported by this TensorRT version.")
    if exit_code < 0 or exit_code > 128:
        sig = -exit_code if exit_code < 0 else exit_code - 128
        return (f"trtexec was killed by signal {sig} (9 is usually the kernel's OOM killer on Jetson). "
                "Hint: lower workspace_mib, free memory on the device (stop services, add swap) and retry.")
    if report.status == "PASSED" and exit_code == 0:
        return "trtexec passed."
    detail = report.errors[-1] if report.errors else "no [E] lines were printed"
    return (f"trtexec failed with exit code {exit_code}: {detail}. Hint: read the full log in "
            "artifacts/logs and re-run the printed command on the device with --verbose.")


def check_trtexec_result(text: str, exit_code: int, *, target: str | None = None,
                         model: str | None = None) -> TrtexecReport:
    """Parse and return the report; raise TrtexecFailed (a BuildError) unless it PASSED with exit 0."""
    report = parse_trtexec_output(text)
    if exit_code == 0 and report.status == "PASSED":
        return report
    reason = explain_failure(report, exit_code)
    message, _, hint = reason.partition(" Hint: ")
    raise TrtexecFailed(f"trtexec failed: {message}", report=report, exit_code=exit_code,
                        hint=hint or None, target=target, model=model)


# ---------------------------------------------------------------------------- Python API builder

#: Standalone build script (stdlib + tensorrt), copied to the device and run by its python3.
TRT_API_BUILD_SCRIPT = Path(__file__).parent.parent / "device_side" / "trt_api_build.py"


def api_build_argv(python: str, script: str, *, onnx: str, engine: str, cfg: TrtBuildConfig,
                   timing_cache: str | None = None) -> list[str]:
    """argv for the API build script on the device; args travel as one JSON argument."""
    args = {"onnx": onnx, "engine": engine, "precision": cfg.precision, "workspace_mib": cfg.workspace_mib,
            "builder_optimization_level": cfg.builder_optimization_level,
            "timing_cache": timing_cache if cfg.timing_cache else None,
            "shapes": cfg.to_dict()["shapes"]}
    if cfg.extra_flags:
        raise BuildConfigError("extra_flags are trtexec flags; the python-api builder cannot apply them",
                               field="extra_flags", hint="use build_tool = 'trtexec' or drop extra_flags")
    return [python, script, json.dumps(args, sort_keys=True)]


def parse_api_build_output(text: str) -> dict[str, object]:
    """The script's last JSON line: {"kiln": "trt_api_build", "ok": bool, ...}."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and '"kiln"' in line:
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if data.get("kiln") == "trt_api_build":
                return data
    raise BuildError("the TensorRT API build script printed no result line",
                     hint="run it by hand on the device; is python3 able to import tensorrt?",
                     output_tail=text[-500:] or "<empty>")
