"""trtexec argv builders: one build, one load-and-time run, one Python API build.

Pure functions: the caller runs the argv over a Transport and reads the output with
kiln/backends/trtexec_output.py (trtexec sends INFO to stdout and WARNING/ERROR to
stderr: feed it `result.stdout + "\\n" + result.stderr`). Which flag exists in which
TensorRT version is docs/trtexec.md §2; the build settings themselves are validated by
TrtBuildConfig (kiln/backends/trt_config.py), which these builders call, never repeat.

The TensorRT Python API builder is a standalone script, `TRT_API_BUILD_SCRIPT`
(kiln/device_side/trt_api_build.py): copy it to the device and run it with the
device's python3 (`api_build_argv`), then read its last line with
`trtexec_output.parse_api_build_output`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

from kiln.backends.trt_config import (BuildConfigError, ShapeRange, TrtBuildConfig, check_input_name,
                                      shape_range)

log = logging.getLogger(__name__)

__all__ = ["build_argv", "load_argv", "TRT_API_BUILD_SCRIPT", "api_build_argv", "TRT_API_REFIT_SCRIPT",
           "api_refit_argv"]


def _shape_flags(shapes: Sequence[ShapeRange] | None) -> list[str]:
    if not shapes:
        return []
    out = []
    for flag, attr in (("--minShapes", "min"), ("--optShapes", "opt"), ("--maxShapes", "max")):
        spec = ",".join(f"{r.name}:" + "x".join(map(str, getattr(r, attr))) for r in shapes)
        out.append(f"{flag}={spec}")
    return out


def build_argv(trtexec_path: str, onnx: str, engine_out: str, cfg: TrtBuildConfig,
               trt_version: str | Sequence[int], timing_cache: str | None = None,
               calibration_cache: str | None = None) -> list[str]:
    """trtexec argv for a build-only run on a device with TensorRT `trt_version`
    (flags per version: docs/trtexec.md §2).

    - workspace: `--workspace=N` before 8.4 (removed in 10.0), else
      `--memPoolSize=workspace:N` with a bare integer (MiB in every version; suffixes
      are dropped by 8.4-8.6 and double-scaled by 10.0).
    - `--builderOptimizationLevel` only from 8.6 (dropped with a warning before).
    - build only: `--skipInference` from 8.6, `--buildOnly` before (gone in 10.0).
    - `--timingCacheFile` when cfg.timing_cache and a path is given (docs/trtexec.md §7).
    - DLA: `--useDLACore=N` (+ `--allowGPUFallback` with cfg.dla_gpu_fallback), 8.x-10.x (§12).
    - extra flags: refused by `cfg.check_version` when this TensorRT lacks them.
    - `--calib=<cache>`: the INT8 calibration cache built for cfg.calibration on this class
      (trtexec reads a cache, it cannot calibrate from data: docs/trtexec.md §10).
    """
    ver = cfg.check_version(trt_version)
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
    argv += _dla_flags(cfg.dla_core, cfg.dla_gpu_fallback)
    if cfg.refit and "--refit" not in cfg.extra_flags:
        argv.append("--refit")  # BuilderFlag::kREFIT, 8.5 .. 10.x (docs/trtexec.md §13)
    if cfg.calibration:
        if not calibration_cache:
            raise BuildConfigError("an INT8 build with a calibration data set needs its calibration cache",
                                   field="calibration", hint="build it first (kiln.pipeline.calibration)")
        argv.append(f"--calib={calibration_cache}")
    argv += cfg.extra_flags
    argv.append("--skipInference" if ver >= (8, 6) else "--buildOnly")
    return argv


def _dla_flags(dla_core: int | None, gpu_fallback: bool = False) -> list[str]:
    """trtexec's DLA flags (docs/trtexec.md §12): none for a GPU engine."""
    if dla_core is None:
        return []
    if isinstance(dla_core, bool) or not isinstance(dla_core, int) or dla_core < 0:
        raise BuildConfigError(f"dla_core must be a DLA core number, got {dla_core!r}", field="dla_core")
    return [f"--useDLACore={dla_core}"] + (["--allowGPUFallback"] if gpu_fallback else [])


def _load_inputs_spec(load_inputs: Mapping[str, str]) -> str:
    """`--loadInputs` value: `name:file[,name:file]`.

    trtexec splits the list on ',' and each piece on its *last* ':' unless the name is
    wrapped in single quotes (`'name':file`, meant for Windows paths), in which case the
    file is everything after the closing quote and ':' (docs/trtexec.md §6). So: no ','
    or "'" anywhere, and the name is quoted when the file contains ':'.
    """
    pieces = []
    for name, path in sorted(load_inputs.items()):
        check_input_name(name, "load_inputs", "--loadInputs")
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
              load_inputs: Mapping[str, str] | None = None, export_output: str | None = None,
              export_times: str | None = None, dla_core: int | None = None) -> list[str]:
    """trtexec argv that deserializes and times an engine (verification on the device).

    The summary reports percentiles 90/95/99 by default (docs/trtexec.md §4); `percentile`
    asks for one more (a single value: the multi-value form is not confirmed for every version).

    `load_inputs` {input name: file}: `--loadInputs`, raw little-endian bytes of each
    input in the engine's input type, C order, nothing else; the size must match the
    binding. Inputs left out get random values. `export_output`: `--exportOutput=<file>`,
    a JSON list of {"name", "dimensions" ("1x300x4"), "values" (flat, C order)} written
    from the last inference iteration. Both flags exist unchanged in 8.5.2 .. v10.16, so
    no version gate (docs/trtexec.md §6). `export_times`: `--exportTimes=<file>`, a JSON list
    with one record per timed iteration (its `latencyMs` gives the percentiles; §4). `dla_core`: a DLA
    engine runs on the core the runtime is given (`--useDLACore=N`: IRuntime::setDLACore at
    deserialization, docs/trtexec.md §12).
    Every iteration reuses the loaded inputs, so `--iterations/--warmUp/--duration` only
    change the timing (trtexec runs for at least max(iterations, duration) after warm-up).
    """
    argv = [trtexec_path, f"--loadEngine={engine}", *_dla_flags(dla_core)]
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
        spec = ",".join(f"{shape_range(n, {'min': d, 'opt': d, 'max': d}).name}:" + "x".join(map(str, d))
                        for n, d in sorted(shapes.items()))
        argv.append(f"--shapes={spec}")
    if load_inputs:
        argv.append(f"--loadInputs={_load_inputs_spec(load_inputs)}")
    if export_output is not None:
        if not str(export_output):
            raise BuildConfigError("export_output needs a file name", field="export_output")
        argv.append(f"--exportOutput={export_output}")
    if export_times is not None:
        if not str(export_times):
            raise BuildConfigError("export_times needs a file name", field="export_times")
        argv.append(f"--exportTimes={export_times}")
    return argv


# ---------------------------------------------------------------------------- Python API builder

#: Standalone build script (stdlib + tensorrt), copied to the device and run by its python3.
TRT_API_BUILD_SCRIPT = Path(__file__).parent.parent / "device_side" / "trt_api_build.py"


def api_build_argv(python: str, script: str, *, onnx: str, engine: str, cfg: TrtBuildConfig,
                   timing_cache: str | None = None, calibration_cache: str | None = None,
                   calibration_batches: str | None = None) -> list[str]:
    """argv for the API build script on the device; args travel as one JSON argument.

    INT8 with a calibration data set: `calibration_cache` is read by the script's calibrator
    (no calibration runs when it was written by this TensorRT); with `calibration_batches` (an
    .npz of batches, kiln.calibration) the calibrator feeds them and writes the cache there."""
    cfg.check_tool("python-api")
    args = {"onnx": onnx, "engine": engine, "precision": cfg.precision, "workspace_mib": cfg.workspace_mib,
            "builder_optimization_level": cfg.builder_optimization_level,
            "timing_cache": timing_cache if cfg.timing_cache else None,
            "shapes": cfg.to_dict()["shapes"],
            **({"dla_core": cfg.dla_core, "dla_gpu_fallback": cfg.dla_gpu_fallback} if cfg.dla_core is not None else {}),
            **({"refit": True} if cfg.refit else {})}
    if cfg.calibration:
        if not calibration_cache:
            raise BuildConfigError("an INT8 build with a calibration data set needs its calibration cache path",
                                   field="calibration")
        args["calibration"] = {"cache": calibration_cache, "batches": calibration_batches}
    return [python, script, json.dumps(args, sort_keys=True)]


#: Standalone refit script (stdlib + tensorrt, numpy on 8.x): trtexec cannot save a refitted plan
#: (docs/trtexec.md §13), so every refit goes through the Python API, whatever the build tool.
TRT_API_REFIT_SCRIPT = Path(__file__).parent.parent / "device_side" / "trt_api_refit.py"


def api_refit_argv(python: str, script: str, *, base: str, onnx: str, engine: str,
                   weights: str | None = None) -> list[str]:
    """argv for the refit script on the device; args travel as one JSON argument."""
    args = {"base": base, "onnx": onnx, "engine": engine, "weights": weights}
    return [python, script, json.dumps(args, sort_keys=True)]
