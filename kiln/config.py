"""The fleet file (`targets.toml`): schema, validation, and the objects the rest reads.

Everything is checked before any work starts: unknown keys, wrong types, bad
names, unknown model references, missing required fields. Every error names the
file, the line when it can be found, the key, and how to fix it.
"""
from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from kiln.errors import ConfigError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # always used with fullmatch
NAME_RULE = ("names are 1-64 characters of [A-Za-z0-9._-] starting with a letter or digit "
             "(no spaces, no newlines)")
DEFAULT_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"
TRANSPORTS = ("local", "ssh")
BACKENDS = ("onnxruntime", "tensorrt")
EXPORTERS = ("torchscript", "dynamo")
BUILDER_TOOLS = ("trtexec", "python-api")


def fleet_path() -> Path:
    return Path(os.environ.get("KILN_TARGETS", "targets.toml")).absolute()


def artifacts_dir() -> Path:
    return Path(os.environ.get("KILN_ARTIFACTS", "artifacts")).absolute()


def valid_name(name: object) -> bool:
    """A whole-string match: `re.match` with `$` would let a trailing newline through."""
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def check_name(name: object, what: str) -> str:
    if not valid_name(name):
        raise ConfigError(f"invalid {what} name {name!r}", hint=NAME_RULE)
    return name


TOML_TYPES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", dict: "a table",
              list: "an array"}


# -- a tiny declarative schema ---------------------------------------------------

@dataclass(frozen=True)
class Key:
    types: tuple[type, ...]
    required: bool = False
    default: Any = None
    check: Callable[[Any], str | None] | None = None  # returns an error text, or None
    doc: str = ""


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def _names_list(what: str) -> Callable[[Any], str | None]:
    def check(v):
        bad = [x for x in v if not valid_name(x)]
        return f"contains invalid {what} name(s) {', '.join(map(repr, bad))} ({NAME_RULE})" if bad else None
    return check


def _positive(v) -> str | None:
    return None if v > 0 else "must be > 0"


def _factory(v) -> str | None:
    return None if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v) else "must look like 'package.module:function'"


def _dims_problem(name: str, dims) -> str | None:
    if not isinstance(dims, list) or not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                                         for d in dims):
        return f"input {name!r} must have a shape given as a list of positive integers"
    return None


def _shape(v) -> str | None:
    """Each input: a static shape [1, 3, 640, 640] or a range { min = [..], opt = [..], max = [..] }."""
    if not isinstance(v, dict) or not v:
        return "must be a table of input name -> shape, e.g. { images = [1, 3, 640, 640] }"
    for name, dims in v.items():
        if isinstance(dims, dict):
            if sorted(dims) != ["max", "min", "opt"]:
                return (f"input {name!r}: a shape range needs exactly min, opt and max, "
                        f"got {', '.join(sorted(dims)) or 'none'}")
            for point in ("min", "opt", "max"):
                if problem := _dims_problem(f"{name}.{point}", dims[point]):
                    return problem
            ranks = {point: len(dims[point]) for point in ("min", "opt", "max")}
            if len(set(ranks.values())) != 1:
                return (f"input {name!r}: min, opt and max have different ranks "
                        f"({', '.join(f'{p} {r}' for p, r in ranks.items())})")
            if not all(a <= b <= c for a, b, c in zip(dims["min"], dims["opt"], dims["max"])):
                return (f"input {name!r}: need min <= opt <= max in every dimension, got min {dims['min']}, "
                        f"opt {dims['opt']}, max {dims['max']}")
        elif problem := _dims_problem(name, dims):
            return problem
    return None


SHAPE_POINTS = ("min", "opt", "max")


def dynamic_shapes(inputs: dict) -> dict[str, dict[str, tuple[int, ...]]]:
    """The inputs declared as ranges whose min and max differ: {name: {"min", "opt", "max": dims}}."""
    out = {}
    for name, dims in inputs.items():
        if isinstance(dims, dict) and tuple(dims["min"]) != tuple(dims["max"]):
            out[name] = {p: tuple(dims[p]) for p in SHAPE_POINTS}
    return out


EXPORT_KEYS = {
    "opset": Key((int,), default=17, check=lambda v: None if 7 <= v <= 30 else "must be between 7 and 30",
                 doc="ONNX opset to export; checked in the file (older TensorRT rejects newer opsets)"),
    "exporter": Key((str,), default="torchscript", check=_one_of(EXPORTERS),
                    doc="torch.onnx exporter: 'torchscript' (dynamo=False) or 'dynamo'"),
    "external_data": Key((bool, str), default="auto",
                         check=lambda v: None if v in (True, False, "auto") else 'must be true, false or "auto"',
                         doc="weights in a data file next to the graph: \"auto\" when the model needs it (over 2 GB), "
                             "true always, false never (a model over 2 GB then fails to export)"),
    "quantize": Key((str,), check=_one_of(("qdq",)),
                    doc="\"qdq\": write INT8 Quantize/DequantizeLinear nodes into the ONNX (ONNX Runtime's "
                        "quantize_static on the model's calibration data set) for TensorRT's explicit quantization"),
}
VERIFY_KEYS = {
    "rtol": Key((float, int), default=1e-3, doc="relative tolerance against the PyTorch reference outputs"),
    "atol": Key((float, int), default=1e-4, doc="absolute tolerance"),
    "rows_may_permute": Key((bool,), default=True,
                            doc="accept detection rows in another order where the model's top-k has ties"),
    "trt_rtol": Key((float, int), default=1e-2, check=lambda v: None if v >= 0 else "must be >= 0",
                    doc="relative tolerance for TensorRT engines (fp16/TF32 kernels); the looser of this and rtol applies"),
    "trt_atol": Key((float, int), default=1e-2, check=lambda v: None if v >= 0 else "must be >= 0",
                    doc="absolute tolerance for TensorRT engines; the looser of this and atol applies"),
    # the accuracy gate of reduced precision (README, Precision and INT8); not part of the export key
    "int8_rtol": Key((float, int), default=5e-2, check=lambda v: None if v >= 0 else "must be >= 0",
                     doc="relative tolerance for INT8 TensorRT engines (precision int8 or best); the looser "
                         "of this and the fp16 ones applies"),
    "int8_atol": Key((float, int), default=5e-2, check=lambda v: None if v >= 0 else "must be >= 0",
                     doc="absolute tolerance for INT8 TensorRT engines"),
    "metric": Key((str,), check=_factory,
                  doc="'module:function' (engine outputs, reference outputs) -> a number, higher is better "
                      "(e.g. top-k agreement, box IoU); a new engine below metric_threshold is not published"),
    "metric_threshold": Key((float, int), doc="the lowest metric value a new engine may have"),
}
#: verify keys that only gate engines: left out of the export key (an export does not use them)
ENGINE_ONLY_VERIFY_KEYS = ("int8_rtol", "int8_atol", "metric", "metric_threshold")
CALIBRATION_KEYS = {
    "data": Key((str,), doc="folder of .npz (one batch each: arrays named by input) or .npy (one batch of "
                            "the only input) files, relative to the fleet file"),
    "function": Key((str,), check=_factory, doc="'module:function' yielding batches: {input: array} (or an "
                                                "array for a one-input model)"),
    "batches": Key((int,), check=_positive, doc="use at most this many batches (in file-name order)"),
}
BUILD_KEYS = {
    # TensorRT values are checked by kiln.backends.trt_config.TrtBuildConfig (the one validator of
    # TensorRT build settings), for the models a tensorrt target runs: kiln.backends.base.check_build_settings
    "precision": Key((str,), default="fp16", doc="TensorRT precision: fp32, fp16, int8 or best"),
    "workspace_mib": Key((int,), doc="TensorRT workspace memory pool, MiB"),
    "optimization_level": Key((int,), doc="TensorRT builder optimisation level 0..5 (8.6+)"),
    "timing_cache": Key((bool,), default=True, doc="reuse a per-class timing cache from the store"),
    "shapes": Key((dict,), doc="deprecated: declare ranges in the model's inputs (the TensorRT profile comes "
                               "from them); still read as { input = { min = [..], opt = [..], max = [..] } }"),
    "extra_flags": Key((list,), default=[], doc="extra trtexec flags from an allowlist, e.g. [\"--noTF32\"]"),
    "refit": Key((bool,), default=False, doc="TensorRT: build refittable engines; a weights-only retrain is then "
                                             "refitted on a device of the class instead of rebuilt"),
    "verify_on": Key((int,), default=1, check=lambda v: None if v in (1, 2) else "must be 1 or 2",
                     doc="members of the class that load and check a new engine before it is published: "
                         "1 (the builder) or 2 (the builder and a second member)"),
    "dla_core": Key((int,), check=lambda v: None if v >= 0 else "must be a DLA core number (0, 1, ...)",
                    doc="TensorRT: run the network on this DLA core (Jetson Xavier/Orin; usually per target: "
                        "[targets.<t>.build] dla_core = 0); not set = the GPU"),
    "dla_gpu_fallback": Key((bool,), default=True,
                            doc="TensorRT with dla_core: layers the DLA cannot run go to the GPU (false: such a "
                                "layer fails the build)"),
    "ort_optimization": Key((str,), default="all", check=_one_of(("basic", "extended", "all")),
                            doc="ONNX Runtime graph optimisation level for the CPU engine"),
}
MODEL_KEYS = {
    "factory": Key((str,), required=True, check=_factory, doc="'module:function' returning an nn.Module"),
    "checkpoint": Key((str,), required=True, doc="state_dict file, relative to the fleet file"),
    "seed": Key((int,), doc="if set and the checkpoint is missing, create it from the factory (demo/tests)"),
    "inputs": Key((dict,), required=True, check=_shape,
                  doc="input name -> static shape [1, 3, 640, 640] or range { min = [..], opt = [..], max = [..] }"),
    "outputs": Key((list,), required=True, check=lambda v: None if v and all(isinstance(x, str) for x in v)
                   else "must be a non-empty list of output names", doc="output names"),
    "export": EXPORT_KEYS,
    "verify": VERIFY_KEYS,
    "build": BUILD_KEYS,
    "calibration": CALIBRATION_KEYS,
}
#: what a target may override of the models it runs (`[targets.<t>.build]`, `[targets.<t>.model_build.<m>]`):
#: every build setting except the TensorRT profile, which follows the model's inputs and references
TARGET_BUILD_KEYS = {k: v for k, v in BUILD_KEYS.items() if k != "shapes"}
TARGET_KEYS = {
    "transport": Key((str,), default="local", check=_one_of(TRANSPORTS)),
    "backend": Key((str,), default="onnxruntime", check=_one_of(BACKENDS)),
    "models": Key((list,), required=True, check=_names_list("model")),
    "groups": Key((list,), default=[], check=_names_list("group")),
    "install_dir": Key((str,), required=True, doc="where releases live on the device"),
    "health_check": Key((str,), doc="shell command run on the device after activation; non-zero = roll back"),
    "restart": Key((str,), doc="shell command run on the device after activation (e.g. restart a service)"),
    "busy_check": Key((str,), doc="shell command run on the device before switching: exit 0 = free, "
                                  "anything else = busy (the deploy waits, then stays pending)"),
    "busy_timeout": Key((int, float), default=300, check=lambda v: None if v >= 0 else "must be >= 0",
                        doc="seconds a deploy waits for a busy device before it ends pending"),
    "busy_interval": Key((int, float), default=10, check=_positive, doc="seconds between two busy checks"),
    "host": Key((str,), doc="ssh host or ~/.ssh/config alias (ssh transport)"),
    "user": Key((str,)),
    "port": Key((int,), check=lambda v: None if 0 < v < 65536 else "must be a TCP port"),
    "identity_file": Key((str,)),
    "proxy_jump": Key((str,), doc="bastion host (its key is verified too)"),
    "ssh_config": Key((str,), doc="ssh config file (default ~/.ssh/config)"),
    "known_hosts": Key((str,), doc="known_hosts file (default ~/.ssh/known_hosts)"),
    "connect_timeout": Key((int, float), default=10, check=_positive),
    "command_timeout": Key((int, float), default=3600, check=_positive),
    "python": Key((str,), doc="python interpreter on the device (default: this one locally, python3 over ssh)"),
    "builder": Key((bool,), default=False, doc="prefer this target for builds in its hardware class"),
    "build_tool": Key((str,), default="trtexec", check=_one_of(BUILDER_TOOLS)),
    "trtexec": Key((str,), default=DEFAULT_TRTEXEC),
    "tensorrt_python": Key((str,), doc="python with TensorRT's bindings (python3-libnvinfer), for build_tool = "
                                       "\"python-api\" and INT8 calibration; default: python"),
    "class_fields": Key((list,), default=[], doc="extra fingerprint fields that split hardware classes"),
    "pin": Key((dict,), default={}, check=lambda v: _pins(v),
               doc="{ <model> = \"<engine key prefix>\" }: keep that release active (see README, rollback and pins)"),
    # per-target build overrides (validated by _target_builds, without schema defaults: only what is written)
    "build": TARGET_BUILD_KEYS,
    "model_build": None,
}
def _pins(value: dict) -> str | None:
    for model, prefix in value.items():
        if not isinstance(prefix, str) or not re.fullmatch(r"[0-9a-f]{6,64}", prefix):
            return (f"{model} = {prefix!r}: an engine key prefix is 6 to 64 lowercase hex digits "
                    "(as `doit status` shows them)")
    return None


def _waves(value: list) -> str | None:
    shares = []
    for wave in value:
        if not (isinstance(wave, str) and re.fullmatch(r"(100|[1-9][0-9]?)%", wave)):
            return f"{wave!r} is not a share of the group like \"25%\" (1% to 100%)"
        shares.append(int(wave[:-1]))
    if not shares or shares != sorted(set(shares)) or shares[-1] != 100:
        return "must be growing shares of the group ending with \"100%\", e.g. [\"10%\", \"50%\", \"100%\"]"
    return None


ROLLOUT_KEYS = {
    "canary": Key((int,), default=1, check=lambda v: None if v >= 0 else "must be >= 0",
                  doc="devices (the group's first, in fleet-file order) deployed and gated before any other"),
    "waves": Key((list,), default=["100%"], check=_waves,
                 doc="cumulative shares of the group deployed wave after wave, ending with \"100%\""),
    "max_fail_percentage": Key((int, float), default=0, check=lambda v: None if 0 <= v <= 100 else "must be 0..100",
                               doc="abort the remaining waves when more than this share of the devices tried so far failed"),
    "soak_seconds": Key((int, float), default=0, check=lambda v: None if v >= 0 else "must be >= 0",
                        doc="wait after each wave, then health-check its devices again before the next"),
    "max_latency_regression": Key((int, float), default=0.10, check=lambda v: None if v >= 0 else "must be >= 0",
                                  doc="a new release whose smoke-test p50 or p99 is slower than the previous "
                                      "release's on the same device by more than this fraction fails its gate"),
}
GROUP_KEYS = {"rollout": ROLLOUT_KEYS}

STORE_KEYS = {"url": Key((str,), doc="file://<folder> or s3://<bucket>/<prefix>; default <artifacts>/store"),
              "lease_seconds": Key((int, float), check=_positive,
                                   doc="how long a controller's build lease on an engine key lasts before "
                                       "other controllers take it over (its owner presumed dead); default "
                                       "twice the builders' command_timeout")}


def _key_ids(v) -> str | None:
    from kiln.signing import key_id_problem  # syntax only: no cryptography import at load time
    for kid in v:
        if (problem := key_id_problem(kid)) is not None:
            return f"contains an invalid public key id: {problem}"
    return None


SIGNING_KEYS = {
    "key": Key((str,), doc="this controller's Ed25519 private key file, relative to the fleet file; "
                           "default <artifacts>/keys/signing.key, created (0600) on the first publish"),
    "trusted": Key((list,), default=[], check=_key_ids,
                   doc="public key ids (\"ed25519:<base64>\") of other controllers whose engines are used; "
                       "this controller's own key is always trusted"),
}
PYTHON_PATH = Key((list,), default=[], check=lambda v: None if all(isinstance(x, str) and x for x in v)
                  else "must be a list of folder paths (strings)",
                  doc="folders searched for factory modules after the fleet file's own folder, relative to "
                      "the fleet file, e.g. python_path = [\"src\", \"../models\"] (a top-level key: before any [table])")
TOP_KEYS = {"store": STORE_KEYS, "signing": SIGNING_KEYS, "defaults": {"export": EXPORT_KEYS, "verify": VERIFY_KEYS, "build": BUILD_KEYS},
            "python_path": PYTHON_PATH, "models": None, "targets": None, "groups": None}


# -- the objects -------------------------------------------------------------------

@dataclass(frozen=True)
class Model:
    name: str
    factory: str
    checkpoint: Path
    seed: int | None
    inputs: dict[str, tuple[int, ...]]   # static shape, or the opt shape of a range
    outputs: tuple[str, ...]
    export: dict[str, Any]
    verify: dict[str, Any]
    build: dict[str, Any]
    #: folders searched for the factory module before sys.path: the fleet file's folder, then
    #: its python_path (kiln.factories)
    factory_path: tuple[Path, ...] = ()
    #: inputs declared as a range (min != max): {name: {"min", "opt", "max": dims}}; empty = static model.
    #: The TensorRT optimisation profile (build["shapes"]) is made from it (kiln.config._model_shapes).
    shapes: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)
    #: "" for the model's own build settings; a short digest when a target overrides them
    #: (Fleet.model_for): its engines, tasks and records are then `<model>~<variant>`
    variant: str = ""
    #: the INT8 calibration data set ([models.X.calibration]): {"data": Path | None, "function": str | None,
    #: "batches": int | None}, or None
    calibration: dict[str, Any] | None = None

    @property
    def engine_name(self) -> str:
        """The model's name in engine task and record names: `det`, or `det~3f9c2a` for a variant."""
        return f"{self.name}~{self.variant}" if self.variant else self.name

    @property
    def shape_points(self) -> tuple[str, ...]:
        """The shape points verified: min, opt and max for a dynamic model, none for a static one."""
        return SHAPE_POINTS if self.shapes else ()

    def input_shapes(self, point: str | None = None) -> dict[str, tuple[int, ...]]:
        """Every input's shape at `point` (min/opt/max; None = opt, the static shape of a static input)."""
        return {name: (self.shapes[name][point] if point and name in self.shapes else dims)
                for name, dims in self.inputs.items()}


@dataclass(frozen=True)
class Target:
    name: str
    transport: str
    backend: str
    models: tuple[str, ...]
    groups: tuple[str, ...]
    install_dir: str
    settings: dict[str, Any] = field(default_factory=dict)  # ssh/builder details, see TARGET_KEYS

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["settings"][key]
        except KeyError:
            raise AttributeError(key) from None


@dataclass(frozen=True)
class Fleet:
    path: Path
    artifacts: Path
    store_url: str
    models: dict[str, Model]
    targets: dict[str, Target]
    signing_key: Path | None = None          # None: <artifacts>/keys/signing.key (kiln.signing)
    trusted: tuple[str, ...] = ()            # public key ids trusted besides the controller's own
    rollouts: dict[str, dict] = field(default_factory=dict)  # group -> [groups.<g>] rollout (ROLLOUT_KEYS)
    lease_seconds: float | None = None       # [store] lease_seconds; None: from the builders' timeouts

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def error_at(self, keys: list[str], problem: str, fix: str) -> ConfigError:
        """An error about `keys` of this fleet file, pointing at its line when it can be found."""
        try:
            text = self.path.read_text()
        except OSError:
            text = ""
        return _Source(self.path, text).error(keys, problem, fix)

    def model_for(self, target: "Target | str", model: str) -> Model:
        """`model` as `target` runs it: its build settings with the target's overrides applied
        (`[targets.<t>.build]`, then `[targets.<t>.model_build.<model>]`). The model itself when
        nothing changes; else a copy whose `variant` names the effective settings, so two targets
        of one class with different settings get different engines, tasks and records, and two
        targets with the same overrides share one."""
        target = self.targets[target] if isinstance(target, str) else target
        base = self.models[model]
        overrides = {**(target.settings.get("build") or {}), **(target.settings.get("model_build") or {}).get(model, {})}
        build = {**base.build, **overrides}
        if build == base.build:
            return base
        from kiln.keys import digest  # config is imported by everything; keys only when a variant exists
        changed = {k: v for k, v in build.items() if base.build.get(k) != v}
        return replace(base, build=build, variant=digest(changed)[:6])

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for t in self.targets.values():
            for g in t.groups:
                out.setdefault(g, []).append(t.name)
        return out


# -- loading -----------------------------------------------------------------------

class _Source:
    """The fleet file's text, to point errors at a line."""

    def __init__(self, path: Path, text: str) -> None:
        self.path, self.lines = path, text.splitlines()

    def line_of(self, keys: list[str]) -> int | None:
        """Best effort: the line of the deepest table header or key of `keys` found."""
        if len(keys) == 1:  # a top-level key (python_path = [...]) is set before the first table
            key_re = re.compile(rf"^\s*(?:{_key_pattern(keys[0])})\s*=")
            for i, line in enumerate(self.lines):
                if line.lstrip().startswith("["):
                    break
                if key_re.match(line):
                    return i + 1
        for cut in range(len(keys), 0, -1):
            parts = [_key_pattern(k) for k in keys[:cut]]
            table_re = re.compile(r"^\s*\[\s*" + r"\s*\.\s*".join(f"(?:{p})" for p in parts) + r"\s*\]")
            leaf = keys[cut] if cut < len(keys) else None
            for i, line in enumerate(self.lines):
                if table_re.match(line):
                    if leaf is None:
                        return i + 1
                    leaf_re = re.compile(rf"^\s*(?:{_key_pattern(leaf)})\s*=")
                    for j in range(i + 1, len(self.lines)):
                        if self.lines[j].lstrip().startswith("["):
                            break
                        if leaf_re.match(self.lines[j]):
                            return j + 1
                    return i + 1
        return None

    def error(self, keys: list[str], problem: str, fix: str) -> ConfigError:
        line = self.line_of(keys)
        where = f"{self.path}" + (f":{line}" if line else "")
        return ConfigError(f"{where}: {_key_path(keys)}: {problem}", hint=fix)


def _key_pattern(key: str) -> str:
    """A regex for `key` as TOML may spell it: bare, "quoted" (with escapes such as \\n), 'literal'."""
    forms = {key, f'"{key}"', f"'{key}'", json.dumps(key), json.dumps(key, ensure_ascii=False)}
    return "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))


def _key_path(keys: list[str]) -> str:
    """`keys` as a TOML dotted key: bare where TOML allows it, else quoted with escapes (a newline shows as \\n)."""
    return ".".join(k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k, ensure_ascii=False) for k in keys)


def _validate(table: dict, schema: dict, src: _Source, where: list[str], fill: bool = True) -> dict:
    """Check `table` against `schema`; with `fill`, absent keys get the schema's defaults."""
    out = {}
    for key, value in table.items():
        spec = schema.get(key)
        if spec is None and key not in schema:
            known = ", ".join(sorted(schema))
            if where and key == "python_path":  # TOML puts a key written after [a table] into that table
                raise src.error(where + [key], "unknown key", "python_path is a top-level key: move it above "
                                                              "the first [table] of the file")
            raise src.error(where + [key], "unknown key", f"remove it or use one of: {known}")
        if isinstance(spec, dict):
            if not isinstance(value, dict):
                raise src.error(where + [key], "must be a table", f"write it as [{'.'.join(where + [key])}]")
            out[key] = _validate(value, spec, src, where + [key], fill)
            continue
        # bool is an int in Python: keep them apart
        if not isinstance(value, spec.types) or (isinstance(value, bool) and bool not in spec.types):
            wanted = " or ".join(TOML_TYPES[t] for t in spec.types)
            raise src.error(where + [key], f"must be {wanted}, got {TOML_TYPES.get(type(value), 'a value')} {value!r}",
                            f"write {key} as {wanted}" + (f" ({spec.doc})" if spec.doc else ""))
        if spec.check and (problem := spec.check(value)):
            raise src.error(where + [key], problem, spec.doc or f"fix the value of {key}")
        out[key] = value
    for key, spec in schema.items():
        if isinstance(spec, Key) and key not in out:
            if spec.required:
                raise src.error(where, f"missing required key '{key}'",
                                f"add {key} = ... to [{'.'.join(where)}]" + (f" ({spec.doc})" if spec.doc else ""))
            if fill:
                out[key] = spec.default
        elif isinstance(spec, dict) and key not in out:
            out[key] = _validate({}, spec, src, where + [key], fill)
    return out


def load_fleet(path: Path | str | None = None, artifacts: Path | str | None = None) -> Fleet:
    path = Path(path).absolute() if path else fleet_path()
    artifacts = Path(artifacts).absolute() if artifacts else artifacts_dir()
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"fleet file {path} not found",
                          hint="create targets.toml (see README) or point KILN_TARGETS at your fleet file") from None
    src = _Source(path, text)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        from kiln.toml_errors import toml_error  # the line at fault, quoted, in plain words
        raise toml_error(path, text, exc) from exc

    top = {k: v for k, v in raw.items() if k not in ("models", "targets", "groups")}
    checked = _validate(top, {k: v for k, v in TOP_KEYS.items() if v is not None}, src, [])
    for section in ("models", "targets", "groups"):
        if not isinstance(raw.get(section, {}), dict):
            raise src.error([section], "must be a table of named entries", f"write entries as [{section}.<name>]")
    if not raw.get("models"):
        raise src.error(["models"], "no models defined", "add a [models.<name>] table")
    if not raw.get("targets"):
        raise src.error(["targets"], "no targets defined", "add a [targets.<name>] table")

    defaults = checked["defaults"]
    factory_path = [path.parent]
    for folder in checked["python_path"]:
        resolved = (path.parent / Path(folder).expanduser()).resolve()
        if not resolved.is_dir():
            raise src.error(["python_path"], f"folder {folder!r} ({resolved}) does not exist",
                            "python_path folders are relative to the fleet file; fix or remove this one")
        factory_path.append(resolved)
    models = {}
    for name, table in raw["models"].items():
        _checked_name(src, ["models", name], name, "model")
        m = _validate(table, MODEL_KEYS, src, ["models", name], fill=False)
        build = {**defaults["build"], **m["build"]}
        export = {**defaults["export"], **m["export"]}
        shapes = _model_shapes(src, name, m["inputs"], build, export, from_defaults="shapes" not in m["build"])
        verify = {**defaults["verify"], **m["verify"]}
        if export.get("quantize") == "qdq" and not m.get("calibration"):
            raise src.error(["models", name, "export", "quantize"], "a Q/DQ export needs the model's calibration data set",
                            f'add [models.{name}.calibration] data = "<folder of .npz/.npy batches>" '
                            '(or function = "module:function"): its batches set the quantization scales')
        if (verify["metric"] is None) != (verify["metric_threshold"] is None):
            given = "metric" if verify["metric"] is not None else "metric_threshold"
            raise src.error(["models", name, "verify", given], "metric and metric_threshold go together",
                            "give both: metric = \"module:function\" and metric_threshold = <lowest value>")
        models[name] = Model(
            name=name, factory=m["factory"], checkpoint=(path.parent / m["checkpoint"]).resolve(),
            seed=m.get("seed"),
            inputs={k: tuple(v["opt"] if isinstance(v, dict) else v) for k, v in m["inputs"].items()},
            outputs=tuple(m["outputs"]),
            # the model's own values win over [defaults], which win over the schema's defaults
            export=export,
            verify=verify,
            build=build,
            factory_path=tuple(dict.fromkeys(factory_path)), shapes=shapes,
            calibration=_calibration(src, name, m.get("calibration"), path.parent))

    targets = {}
    for name, table in raw["targets"].items():
        _checked_name(src, ["targets", name], name, "target")
        overrides = {k: table.pop(k) for k in ("build", "model_build") if k in table}
        t = _validate(table, {k: v for k, v in TARGET_KEYS.items() if v is not None and k != "build"}, src,
                      ["targets", name])
        for model in t["models"]:
            if model not in models:
                raise src.error(["targets", name, "models"], f"unknown model {model!r}",
                                f"define [models.{model}] or use one of: {', '.join(sorted(models))}")
        t.update(_target_builds(src, name, overrides, t["models"]))
        for model in t["pin"]:
            if model not in t["models"]:
                raise src.error(["targets", name, "pin"], f"pins {model!r}, which is not one of its models",
                                f"pin one of: {', '.join(t['models'])}")
        install_dir = t["install_dir"]
        if t["transport"] == "local":
            install_dir = str((path.parent / install_dir).resolve())
        else:
            if not install_dir.startswith("/"):
                raise src.error(["targets", name, "install_dir"], "must be an absolute path on the device",
                                "e.g. install_dir = \"/opt/kiln\"")
            t.setdefault("host", None)
            t["host"] = t["host"] or name
        if t["python"] is None:
            t["python"] = None if t["transport"] == "local" else "python3"
        settings = {k: v for k, v in t.items() if k not in ("transport", "backend", "models", "groups", "install_dir")}
        targets[name] = Target(name=name, transport=t["transport"], backend=t["backend"],
                               models=tuple(t["models"]), groups=tuple(t["groups"]),
                               install_dir=install_dir, settings=settings)
    clash = set(targets) & {g for t in targets.values() for g in t.groups}
    if clash:
        raise src.error(["targets", sorted(clash)[0]], "a group has the same name as a target",
                        "rename the group or the target so `deploy:<name>` is unambiguous")
    _check_local_install_dirs(src, targets)
    # two SSH targets on one host:port: kiln.transports.addresses, before the first connection (it
    # needs the ssh_config parsed by paramiko, which `doit list` should not pay for)

    store_url = checked["store"]["url"] or f"file://{artifacts / 'store'}"
    signing = checked["signing"]
    signing_key = (path.parent / Path(signing["key"]).expanduser()) if signing["key"] else artifacts / "keys" / "signing.key"
    known_groups = {g for t in targets.values() for g in t.groups}
    rollouts = {}
    for name, table in raw.get("groups", {}).items():
        if name not in known_groups:
            raise src.error(["groups", name], f"no target is in group {name!r}",
                            f"add \"{name}\" to some target's groups, or use one of: {', '.join(sorted(known_groups)) or '(none)'}")
        group = _validate(table, GROUP_KEYS, src, ["groups", name])
        if group.get("rollout") is not None:
            rollouts[name] = _validate(group["rollout"], ROLLOUT_KEYS, src, ["groups", name, "rollout"])
    return Fleet(path=path, artifacts=artifacts, store_url=store_url, models=models, targets=targets,
                 rollouts=rollouts,
                 signing_key=signing_key, trusted=tuple(dict.fromkeys(signing["trusted"])),
                 lease_seconds=checked["store"]["lease_seconds"])


def _calibration(src: _Source, name: str, table: dict | None, base: Path) -> dict | None:
    """[models.X.calibration]: exactly one of `data` (an existing folder) and `function`."""
    if not table:
        return None
    where = ["models", name, "calibration"]
    if ("data" in table) == ("function" in table):
        raise src.error(where, "needs exactly one of data and function",
                        'data = "<folder of .npz/.npy batches>" or function = "module:function"')
    folder = None
    if "data" in table:
        folder = (base / Path(table["data"]).expanduser()).resolve()
        if not folder.is_dir():
            raise src.error(where + ["data"], f"folder {table['data']!r} ({folder}) does not exist",
                            "calibration data is a folder of .npz/.npy files, relative to the fleet file")
    return {"data": folder, "function": table.get("function"), "batches": table.get("batches")}


def _target_builds(src: _Source, name: str, tables: dict, models: list[str]) -> dict:
    """`build` (every model of the target) and `model_build.<model>` (one model) of a target: only the
    keys written there (no schema defaults: an absent key is not an override); types checked here,
    values by the backend with the model's own settings (kiln.backends.base.check_build_settings)."""
    where = ["targets", name]
    out = {"build": {}, "model_build": {}}
    for keys, table in [(["build"], tables.get("build"))] + [(["model_build", m], t) for m, t in
                                                            (tables.get("model_build") or {}).items()]:
        if isinstance(table, dict) and "shapes" in table:
            raise src.error(where + keys + ["shapes"], "the TensorRT profile cannot be overridden per target",
                            f"it follows the model's inputs (and its reference data): change the ranges in "
                            f"[models.<model>] inputs, or define a second model")
    if "build" in tables:
        if not isinstance(tables["build"], dict):
            raise src.error(where + ["build"], "must be a table", f"write it as [targets.{name}.build]")
        out["build"] = _validate(tables["build"], TARGET_BUILD_KEYS, src, where + ["build"], fill=False)
    per_model = tables.get("model_build", {})
    if not isinstance(per_model, dict):
        raise src.error(where + ["model_build"], "must be a table of model -> build settings",
                        f"write it as [targets.{name}.model_build.<model>]")
    for model, table in per_model.items():
        if model not in models:
            raise src.error(where + ["model_build", model], f"{model!r} is not one of the target's models",
                            f"override one of: {', '.join(models)}")
        if not isinstance(table, dict):
            raise src.error(where + ["model_build", model], "must be a table",
                            f"write it as [targets.{name}.model_build.{model}]")
        out["model_build"][model] = _validate(table, TARGET_BUILD_KEYS, src, where + ["model_build", model],
                                              fill=False)
    return out


def _model_shapes(src: _Source, name: str, inputs: dict, build: dict, export: dict,
                  from_defaults: bool) -> dict[str, dict[str, tuple[int, ...]]]:
    """One place declares the shapes: the model's `inputs` (a static shape or a {min, opt, max} range).
    The TensorRT profile `build["shapes"]` is set from the ranges (only the dynamic inputs). The older
    `build.shapes` table is still read, as the ranges of those inputs, when `inputs` declares none."""
    where = ["models", name]
    legacy = build.get("shapes")
    if legacy is not None and not from_defaults:
        if any(isinstance(v, dict) for v in inputs.values()):
            raise src.error(where + ["build", "shapes"], "shape ranges are declared both in inputs and here",
                            "declare each input's range once, in inputs = { name = { min = [..], opt = [..], "
                            "max = [..] } }, and remove build.shapes")
        if not isinstance(legacy, dict) or not legacy:
            raise src.error(where + ["build", "shapes"], "must be a table of input -> { min, opt, max }",
                            "declare ranges in inputs instead (see README, dynamic input shapes)")
        for k, rng in legacy.items():
            if k not in inputs:
                raise src.error(where + ["build", "shapes"], f"input {k!r} is not one of the model's inputs",
                                f"use one of: {', '.join(inputs)}")
            if problem := _shape({k: rng}):
                raise src.error(where + ["build", "shapes"], problem,
                                "e.g. { images = { min = [1, 3, 640, 640], opt = [4, 3, 640, 640], max = [8, 3, 640, 640] } }")
            if len(rng["opt"]) != len(inputs[k]) or isinstance(inputs[k], dict):
                raise src.error(where + ["build", "shapes"], f"input {k!r}: the range's rank differs from inputs",
                                "declare the range in inputs instead")
        inputs = {**inputs, **legacy}
    shapes = dynamic_shapes(inputs)
    build["shapes"] = ({k: {p: list(v[p]) for p in SHAPE_POINTS} for k, v in shapes.items()} if shapes else None)
    if shapes and export.get("exporter") == "dynamo":
        raise src.error(where + ["export", "exporter"] if "exporter" in export else where + ["inputs"],
                        "the dynamo exporter is not supported with dynamic input shapes",
                        'use exporter = "torchscript" (exported with dynamic_axes) or give every input a static shape')
    return shapes


# -- one device, one target -----------------------------------------------------------

ONE_DEVICE_ONE_TARGET = ("one device, one target: remove one of them (or point it at its own device); "
                         "to deploy a device as part of several sets, list the sets in its groups = [...]")


def _check_local_install_dirs(src: _Source, targets: dict[str, Target]) -> None:
    """Two local targets may not share an install_dir, nor have one inside the other: each would
    replace or prune the other's releases and `current` links."""
    order = {name: i for i, name in enumerate(targets)}
    local = sorted((Path(t.install_dir).parts, t.name) for t in targets.values() if t.transport == "local")
    # sorted by path parts, everything inside a folder follows it in one block: a shared or nested
    # install_dir always shows up in a neighbouring pair
    for (outer, first), (inner, second) in zip(local, local[1:]):
        if inner[:len(outer)] != outer:
            continue
        later, other = (second, first) if order[second] > order[first] else (first, second)
        mine, theirs = targets[later].install_dir, targets[other].install_dir
        how = ("is the install_dir of target" if mine == theirs else
               "is inside the install_dir of target" if Path(mine).is_relative_to(theirs) else
               "contains the install_dir of target")
        raise src.error(["targets", later, "install_dir"], f"{mine} {how} {other} ({theirs})",
                        "give each local target its own install_dir, not inside another's (paths are relative "
                        "to the fleet file); " + ONE_DEVICE_ONE_TARGET)


def _checked_name(src: _Source, keys: list[str], name: str, what: str) -> None:
    if not valid_name(name):
        raise src.error(keys, f"invalid {what} name {name!r}", NAME_RULE)


def check_artifacts(path: Path) -> Path:
    """Create the artifacts folder if needed; a path that cannot hold artifacts is a ConfigError."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"artifacts folder {path} is not a folder",
                          hint="point KILN_ARTIFACTS at a folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the artifacts folder {path}: {exc.strerror}",
                          hint="point KILN_ARTIFACTS at a writable folder") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"artifacts folder {path} is not writable",
                          hint="fix its permissions or point KILN_ARTIFACTS at a writable folder")
    return path
