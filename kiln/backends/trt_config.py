"""TensorRT build settings: what may be asked of TensorRT, validated in one place.

`TrtBuildConfig` is the only validator of TensorRT build settings: precision,
workspace, optimisation level, dynamic shapes, pass-through trtexec flags, and
whether those settings fit a TensorRT version (`check_version`) and a build tool
(`check_tool`). kiln/config.py checks only the TOML types of `[models.X.build]`;
the argv builders (kiln/backends/trtexec.py) call the checks here and validate
nothing of their own about build settings.

Which flag exists in which TensorRT version: docs/trtexec.md §2.
Every error is a BuildConfigError naming the field and how to fix it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from kiln.errors import BuildError, ConfigError

__all__ = [
    "BuildConfigError", "PRECISIONS", "ShapeRange", "ExtraFlag", "EXTRA_FLAGS", "TrtBuildConfig",
    "parse_trt_version", "check_input_name", "shape_range", "check_extra_flag",
]

PRECISIONS = ("fp32", "fp16", "int8", "best")
#: input names trtexec's `name:value[,name:value]` specs can carry: no ',' ':' or quotes
#: (docs/trtexec.md §6)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]{0,127}")


class BuildConfigError(ConfigError, BuildError):
    """A TensorRT build setting is invalid (names the field and how to fix it)."""


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


# ---------------------------------------------------------------------------- shapes

@dataclass(frozen=True)
class ShapeRange:
    """Dynamic shape profile of one input: dims for --minShapes / --optShapes / --maxShapes."""
    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def check_input_name(name: object, field: str, flags: str = "shape flags") -> str:
    """An input name that trtexec's spec parser keeps whole (docs/trtexec.md §6)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BuildConfigError(f"input name {name!r} cannot be passed to trtexec {flags}", field=field,
                               hint="input names must match [A-Za-z_][A-Za-z0-9_./-]* (no ':' or ',')")
    return name


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


def shape_range(name: str, spec: object) -> ShapeRange:
    """{"min", "opt", "max"} (lists or "1x3x8x8" strings) -> a checked ShapeRange."""
    check_input_name(name, "shapes")
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


def _shape_ranges(shapes: object) -> tuple[ShapeRange, ...]:
    if isinstance(shapes, Mapping):
        ranges = [shape_range(k, v) for k, v in shapes.items()]
    elif isinstance(shapes, (list, tuple)) and all(isinstance(s, ShapeRange) for s in shapes):
        ranges = [shape_range(s.name, s) for s in shapes]
    else:
        raise BuildConfigError(f"shapes must be a table of input -> {{min, opt, max}}, got {shapes!r}",
                               field="shapes")
    if not ranges:
        raise BuildConfigError("shapes is empty; leave it out for static shapes", field="shapes")
    return tuple(sorted(ranges, key=lambda r: r.name))


# ---------------------------------------------------------------------------- extra flags

@dataclass(frozen=True)
class ExtraFlag:
    """A trtexec flag a user may pass through: value pattern (None = bare flag) and version range."""
    value: str | None = None
    since: tuple[int, int] = (8, 0)
    until: tuple[int, int] | None = None   # first version without it
    note: str = ""


#: Pass-through flags (docs/trtexec.md §2). Anything that our own fields control (--onnx,
#: --saveEngine, --fp16, --workspace, shapes, DLA: --useDLACore/--allowGPUFallback, ...) is
#: deliberately not here.
EXTRA_FLAGS: dict[str, ExtraFlag] = {
    "--noTF32": ExtraFlag(),
    "--refit": ExtraFlag(),
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


def check_extra_flag(flag: object) -> tuple[str, str | None]:
    """"--name" or "--name=value" from EXTRA_FLAGS -> (name, value or None)."""
    if not isinstance(flag, str):
        raise BuildConfigError(f"extra flag {flag!r} is not a string", field="extra_flags")
    name, eq, value = flag.partition("=")
    spec = EXTRA_FLAGS.get(name)
    if name in ("--useDLACore", "--allowGPUFallback"):
        raise BuildConfigError(f"extra flag {name} is a build setting of its own", field="extra_flags",
                               hint="set dla_core = <core> (and dla_gpu_fallback = true|false) in the build "
                                    "settings, e.g. [targets.<target>.build] dla_core = 0")
    if name == "--calib":
        raise BuildConfigError("extra flag --calib is not passed through: INT8 calibration is a setting of its own",
                               field="extra_flags",
                               hint="give the model a calibration data set ([models.<m>.calibration] data = "
                                    "\"<folder>\" or function = \"module:function\"): kiln builds the cache once per "
                                    "hardware class and passes it to every INT8 build (README, Precision and INT8)")
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


# ---------------------------------------------------------------------------- the config

@dataclass(frozen=True)
class TrtBuildConfig:
    """What to ask TensorRT for. Validated at construction; `shapes` None = static input shapes.

    precision: fp32 | fp16 | int8 | best. Note: trtexec `--int8` without `--calib`
      uses placeholder ranges (performance only) unless the ONNX is Q/DQ-quantized
      (docs/trtexec.md §5).
    workspace_mib: workspace memory pool limit in MiB (None = TensorRT default).
    shapes: {input: {"min": dims, "opt": dims, "max": dims}} (stored as sorted ShapeRange tuple).
    builder_optimization_level: 0..5 (TensorRT >= 8.6; dropped with a warning before).
    extra_flags: pass-through flags from EXTRA_FLAGS, e.g. ("--noTF32",).
    timing_cache: use a timing cache file when the caller provides one.
    dla_core: run the network on this DLA core (None = the GPU only); DLA runs FP16 or INT8,
      so precision fp32 is refused (trtexec would turn FP16 on by itself: docs/trtexec.md §12).
    dla_gpu_fallback: layers the DLA cannot run go to the GPU (`--allowGPUFallback`,
      BuilderFlag.GPU_FALLBACK); without it such a layer fails the build. Only with dla_core.
    refit: build a refittable engine (trtexec `--refit`, BuilderFlag.REFIT) so that a later
      weights-only retrain is refitted on the device instead of rebuilt (kiln/pipeline/refit.py;
      docs/trtexec.md §13). Part of the engine key only when true (keys of models without it
      stay as they were).
    calibration: sha256 digest of the INT8 calibration data set (kiln.calibration), or None. Only
      with precision int8 or best; the engine key holds it, the build gets the calibration cache
      built from that data for its hardware class (`--calib`, docs/trtexec.md §10).
    """
    precision: str = "fp16"
    workspace_mib: int | None = None
    shapes: tuple[ShapeRange, ...] | Mapping[str, object] | None = None
    builder_optimization_level: int | None = None
    extra_flags: tuple[str, ...] = ()
    timing_cache: bool = True
    dla_core: int | None = None
    dla_gpu_fallback: bool = True
    refit: bool = False
    calibration: str | None = None

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
        core = self.dla_core
        if core is not None and (isinstance(core, bool) or not isinstance(core, int) or core < 0):
            raise BuildConfigError(f"dla_core must be a DLA core number (0, 1, ...), got {core!r}", field="dla_core",
                                   hint="Xavier and AGX Orin have DLA cores 0 and 1; leave dla_core out for the GPU")
        if core is not None and self.precision == "fp32":
            raise BuildConfigError("dla_core needs precision fp16, int8 or best: the DLA runs FP16 or INT8 only",
                                   field="precision", hint='set precision = "fp16" for this model or target')
        if not isinstance(self.dla_gpu_fallback, bool):
            raise BuildConfigError("dla_gpu_fallback must be true or false", field="dla_gpu_fallback")
        if not isinstance(self.refit, bool):
            raise BuildConfigError("refit must be true or false", field="refit",
                                   hint="refit = true builds refittable engines (see README, Refit after retraining)")
        if self.calibration is not None:
            if not (isinstance(self.calibration, str) and re.fullmatch(r"[0-9a-f]{64}", self.calibration)):
                raise BuildConfigError(f"calibration must be the sha256 of a calibration data set, got "
                                       f"{self.calibration!r}", field="calibration")
            if self.precision not in ("int8", "best"):
                raise BuildConfigError(f"a calibration data set is used by int8 or best builds, not {self.precision}",
                                       field="calibration", hint="set precision = \"int8\" or leave calibration out")
        if self.shapes is not None:
            object.__setattr__(self, "shapes", _shape_ranges(self.shapes))
        if isinstance(self.extra_flags, str):
            raise BuildConfigError("extra_flags must be a list of flags, not one string", field="extra_flags",
                                   hint='e.g. extra_flags = ["--noTF32"]')
        flags = tuple(self.extra_flags)
        for flag in flags:
            check_extra_flag(flag)
        object.__setattr__(self, "extra_flags", flags)
        if self.refit and {"--versionCompatible", "--vc"} & set(flags):
            raise BuildConfigError("refit cannot be combined with --versionCompatible: version-compatible plans "
                                   "are not refittable (docs/trtexec.md §9)", field="refit",
                                   hint="drop refit = true or the --versionCompatible flag")

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> "TrtBuildConfig":
        """From a `[models.X.build]` table; accepts `optimization_level` as an alias and
        ignores keys of other backends (ort_optimization)."""
        known = {"precision", "workspace_mib", "shapes", "builder_optimization_level", "extra_flags", "timing_cache",
                 "dla_core", "dla_gpu_fallback", "refit",
                 "calibration"}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "optimization_level" in data and "builder_optimization_level" not in data:
            kwargs["builder_optimization_level"] = data["optimization_level"]
        if "extra_flags" in kwargs and isinstance(kwargs["extra_flags"], list):
            kwargs["extra_flags"] = tuple(kwargs["extra_flags"])
        return cls(**kwargs)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        """Canonical, JSON-friendly form (for engine keys); `refit` only when true."""
        out = {
            "precision": self.precision, "workspace_mib": self.workspace_mib,
            "shapes": None if self.shapes is None else {
                r.name: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)} for r in self.shapes},
            "builder_optimization_level": self.builder_optimization_level,
            "extra_flags": list(self.extra_flags), "timing_cache": self.timing_cache,
            # only for DLA engines, so every GPU engine keeps the key it had before DLA existed
            **({"dla_core": self.dla_core, "dla_gpu_fallback": self.dla_gpu_fallback}
               if self.dla_core is not None else {}),
            # only when set: engine keys without calibration stay what they were
            **({"calibration": self.calibration} if self.calibration else {}),
        }
        if self.refit:
            out["refit"] = True
        return out

    def check_version(self, trt_version: str | Sequence[int]) -> tuple[int, int, int]:
        """Refuse extra flags that TensorRT `trt_version` lacks (docs/trtexec.md §2); -> the
        parsed version. (builder_optimization_level before 8.6 is dropped with a warning
        by the argv builder, not refused: TensorRT's own default applies.)"""
        ver = parse_trt_version(trt_version)
        for flag in self.extra_flags:
            name, _ = check_extra_flag(flag)
            spec = EXTRA_FLAGS[name]
            if ver[:2] < spec.since or (spec.until and ver[:2] >= spec.until):
                raise BuildConfigError(f"{name} is not available in TensorRT {'.'.join(map(str, ver))}",
                                       field="extra_flags", trt_version=".".join(map(str, ver)),
                                       hint=f"{name} needs TensorRT >= {spec.since[0]}.{spec.since[1]}; "
                                            "drop it for this hardware class")
        return ver

    def check_dla(self, dla_cores: int | None, device: str, target: str | None = None) -> None:
        """Refuse dla_core on a device (class) without that DLA core. `dla_cores`: how many it has
        (kiln.devices.nvidia.jetson_dla_cores), None when unknown."""
        if self.dla_core is None:
            return
        if not dla_cores or self.dla_core >= dla_cores:
            has = ("no DLA" if dla_cores == 0 else "an unknown number of DLA cores" if dla_cores is None
                   else f"DLA cores 0..{dla_cores - 1} only")
            raise BuildConfigError(f"dla_core = {self.dla_core} asked for {device}, which has {has}",
                                   field="dla_core", target=target,
                                   hint="DLA: Jetson AGX Xavier, Xavier NX, AGX Orin and Orin NX 16GB have cores 0 "
                                        "and 1, Orin NX 8GB core 0, Orin Nano none (docs/devices.md §9); leave "
                                        "dla_core out for this target (e.g. set it in [targets.<target>.build] of the "
                                        "targets that have one)")

    def check_tool(self, build_tool: str) -> None:
        """Refuse settings the target's build tool ("trtexec" | "python-api", a target setting
        that kiln/config.py checks) cannot apply: extra_flags are trtexec flags."""
        if build_tool == "python-api" and self.extra_flags:
            raise BuildConfigError("extra_flags are trtexec flags; the python-api builder cannot apply them",
                                   field="extra_flags", hint="use build_tool = 'trtexec' or drop extra_flags")
