"""The TensorRT backend: engines built and checked on the device by trtexec
(default) or by the TensorRT Python API script, with a per-class timing cache.

Nothing here runs TensorRT on the controller; every command is built by
kiln.backends.trtexec for the device's TensorRT version and run through the
target's transport, and its output is read by kiln.backends.trtexec_output.
Build settings are validated only by TrtBuildConfig (kiln.backends.trt_config).
Build output streams live and is kept in full in the log. trtexec's behaviour:
docs/trtexec.md.
"""
from __future__ import annotations

import logging
import os
import posixpath
import sys
import uuid

from kiln.device_side import agent as agent_module
from kiln.backends.base import Backend, engine_tolerances
from kiln.backends.trt_config import TrtBuildConfig
from kiln.backends.trtexec import (TRT_API_BUILD_SCRIPT, TRT_API_REFIT_SCRIPT, api_build_argv, api_refit_argv,
                                   build_argv, load_argv)
from kiln.backends.trtexec_output import check_trtexec_result, parse_api_build_output
from kiln.devices.nvidia import dla_cores
from kiln.devices.workarea import Device
from kiln.errors import BuildError, RefitUnsupported, VerificationError
from kiln.keys import sha256_file

log = logging.getLogger(__name__)


class TensorRTBackend(Backend):
    name = "tensorrt"
    engine_file = "model.plan"

    def build_settings(self, build: dict) -> dict:
        """The engine-defining settings, validated by TrtBuildConfig (the only validator)."""
        settings = TrtBuildConfig.from_mapping(build).to_dict()
        settings.pop("timing_cache", None)  # speeds the build up; does not define the engine
        return settings

    def check_class(self, settings: dict, fingerprint: dict, device: str, target: str | None = None) -> None:
        """dla_core only where the class has that DLA core (its module: kiln.devices.nvidia.dla_cores)."""
        TrtBuildConfig.from_mapping(settings).check_dla(dla_cores(fingerprint), device, target=target)

    def builder_version(self, fingerprint: dict) -> str:
        build = fingerprint.get("tensorrt_build")
        return f"tensorrt-{fingerprint.get('tensorrt')}" + (f"-b{build}" if build else "")

    def build(self, device: Device, onnx, out_dir, settings, fingerprint, stream=None, timing_cache=None,
              external_data=False, calibration_cache=None) -> dict:
        """trtexec --onnx / the API's parse_from_file read external weights next to the ONNX file
        (docs/trtexec.md §11); the plan holds them, so `external_data` changes nothing here."""
        target = device.config
        version = _tensorrt_version(device, fingerprint)
        cfg = TrtBuildConfig.from_mapping({**settings, "timing_cache": timing_cache is not None})
        cfg.check_tool(target.build_tool)
        cfg.check_dla(dla_cores(fingerprint), _device_text(fingerprint, device.target), target=device.target)
        device.mkdir(out_dir)
        engine = posixpath.join(out_dir, self.engine_file)
        if target.build_tool == "python-api":
            answer, result = self._run_api_script(device, onnx=onnx, engine=engine, cfg=cfg, stream=stream,
                                                  timing_cache=timing_cache, calibration_cache=calibration_cache)
            if not answer.get("ok") or result.exit_code != 0:
                raise BuildError(f"the TensorRT API build failed on {device.target}: {answer.get('error')}",
                                 target=device.target, hint="see the build log")
            seconds, tool = answer.get("seconds"), f"tensorrt-python {version}"
        else:
            argv = build_argv(target.trtexec, onnx, engine, cfg, version, timing_cache=timing_cache,
                              calibration_cache=calibration_cache)
            result = device.transport.run(argv, stream=stream, check=False, timeout=target.command_timeout)
            report = check_trtexec_result(result.stdout + "\n" + result.stderr, result.exit_code,
                                          target=device.target)
            seconds, tool = report.build_seconds, f"trtexec {report.tensorrt_version or version}"
        facts = device.agent("sha256", engine)   # and its size: one command
        return {"engine": engine, "sha256": facts["sha256"], "size": facts["size"], "build_seconds": seconds or 0.0,
                "tool": tool, "command": result.command}

    def refit(self, device: Device, base, onnx, weights, out_dir, fingerprint, stream=None) -> dict:
        """Refit the refittable plan `base` with the weights of `onnx` (the .npz `weights` of its
        initializers serves TensorRT 8.x) by the TensorRT Python API on the device (trtexec cannot
        save a refitted plan: docs/trtexec.md §13); returns facts for the manifest like `build`.
        Raises RefitUnsupported when this device cannot refit it (no tensorrt module for the
        target's python, a base that is not refittable, weights the ONNX does not name), BuildError
        when the refit itself fails: the caller builds instead either way."""
        target = device.config
        version = fingerprint.get("tensorrt")
        device.mkdir(out_dir)
        engine = posixpath.join(out_dir, self.engine_file)
        script = device.ensure_input(TRT_API_REFIT_SCRIPT, sha256_file(TRT_API_REFIT_SCRIPT), ".py")
        argv = api_refit_argv(_api_python(target), script, base=base, onnx=onnx, engine=engine, weights=weights)
        result = device.transport.run(argv, stream=stream, check=False, timeout=target.command_timeout)
        answer = parse_api_build_output(result.stdout, "trt_api_refit")
        if not answer.get("ok") or result.exit_code != 0:
            details = "; ".join(str(d) for d in (answer.get("details") or [])[:3])
            reason = f"{answer.get('error')}" + (f" ({details})" if details else "")
            error = RefitUnsupported if result.exit_code in (3, 4) else BuildError
            raise error(f"the TensorRT refit failed on {device.target}: {reason}", target=device.target,
                        hint="the engine is built instead")
        facts = device.agent("sha256", engine)
        if facts["sha256"] != answer.get("sha256"):
            raise BuildError(f"the refitted plan on {device.target} does not match the sha256 the refit reported",
                             target=device.target, hint="check the device's storage")
        return {"engine": engine, "sha256": facts["sha256"], "size": facts["size"],
                "build_seconds": answer.get("seconds") or 0.0,
                "tool": f"tensorrt-python {answer.get('tensorrt') or version} ({answer.get('weights')})",
                "command": result.command}

    def calibrate(self, device: Device, onnx, out_dir, settings, fingerprint, *, batches: str, cache: str,
                  stream=None) -> dict:
        """INT8 calibration on the device with the TensorRT Python API (trtexec cannot calibrate from
        data: docs/trtexec.md §10): the build script feeds `batches` (.npz on the device) to an
        IInt8EntropyCalibrator2 and writes the calibration cache to `cache`. The engine of that run
        is thrown away: every build, this one's included, reads the cache. -> {"seconds", "batches"}"""
        _tensorrt_version(device, fingerprint)
        cfg = TrtBuildConfig.from_mapping({**settings, "timing_cache": False})
        device.mkdir(out_dir)
        scratch = posixpath.join(out_dir, "calibration.plan")
        answer, result = self._run_api_script(device, onnx=onnx, engine=scratch, cfg=cfg, stream=stream,
                                              calibration_cache=cache, calibration_batches=batches)
        device.transport.run(["rm", "-f", scratch], check=False)
        if not answer.get("ok") or result.exit_code != 0:
            raise BuildError(f"INT8 calibration failed on {device.target}: {answer.get('error')}",
                             target=device.target,
                             hint=f"calibration runs the TensorRT Python API with {_api_python(device.config)} "
                                  "(set tensorrt_python to a python3 with python3-libnvinfer and cuda-python or "
                                  "libcudart); see the build log")
        return {"seconds": answer.get("seconds"), "batches": answer.get("calibration_batches")}

    def _run_api_script(self, device: Device, *, onnx, engine, cfg, stream=None, timing_cache=None,
                        calibration_cache=None, calibration_batches=None):
        target = device.config
        script = device.ensure_input(TRT_API_BUILD_SCRIPT, sha256_file(TRT_API_BUILD_SCRIPT), ".py")
        argv = api_build_argv(_api_python(target), script, onnx=onnx, engine=engine, cfg=cfg,
                              timing_cache=timing_cache, calibration_cache=calibration_cache,
                              calibration_batches=calibration_batches)
        result = device.transport.run(argv, stream=stream, check=False, timeout=target.command_timeout)
        return parse_api_build_output(result.stdout), result

    def verify(self, device: Device, engine, reference, verify, settings=None, keep_outputs=None,
               reference_local=None) -> dict:
        """Run the engine on the reference inputs on the device and compare its outputs with
        PyTorch's, like the ONNX Runtime backend; keep trtexec's latency percentiles.

        1. the agent writes each reference input as a raw .bin for --loadInputs (`raw-inputs`);
        2. one trtexec run: --loadEngine + --loadInputs + --exportOutput (+ --shapes, needed
           for dynamic engines, checked against static ones from 10.x) times the engine and
           writes the outputs of its last iteration as JSON; run in the scratch folder so
           the --loadInputs spec holds plain relative names (',' "'" ':' would split it;
           docs/trtexec.md §6);
        3. the agent compares that JSON with the reference outputs (`trt-compare`, the
           same compare_outputs as ONNX Runtime engines and the export check).
        A dynamic model's reference holds the shape points min, opt and max: steps 2-3 run once
        per point (its own folder, `--shapes` at that point), and opt's latency is reported.
        With `reference_local` (the controller's copy of `reference`) the input names and shapes
        are known here (agent `raw_plan`), so all the steps and the clean-up go to the device as
        one agent batch: one command and one python start instead of four or more.
        A plan for another TensorRT/GPU, a broken plan or outputs beyond the tolerances
        raise VerificationError. With `keep_outputs` (a local folder), each point's exported
        outputs are fetched there as `<point>.json` ("static.json" for a static model), for the
        task metric the controller evaluates (kiln.pipeline.accuracy).
        """
        target = device.config
        rtol, atol = trt_tolerances(verify)
        work = device.path(".kiln", "verify", f"{os.getpid()}-{uuid.uuid4().hex[:12]}")
        raw_step = ("raw-inputs", "--reference", reference, "--out-dir", work)
        removed = False
        try:
            plan = _local_plan(reference_local)
            planned = plan is not None   # else written first, by its own agent call
            if not planned:
                plan = _raw_answer(device, device.agent(*raw_step))
            runs = ([(p, posixpath.join(work, p), plan["points"][p]) for p in plan["order"]] if "points" in plan
                    else [(None, work, plan)])
            dla_core = (settings or {}).get("dla_core")   # a DLA engine runs on the core the runtime is given
            steps = [(raw_step, None)] if planned else []
            for point, folder, one in runs:
                steps += self._point_steps(target, engine, reference, verify, point, folder, one, rtol, atol, dla_core)
            if keep_outputs is None:
                steps.append((("remove", "--path", work), None))
            timeout = target.command_timeout * len(runs) + 120 if target.command_timeout else None
            answers = device.agent_batch(steps, timeout=timeout)
            if planned:
                written = _raw_answer(device, answers.pop(0))
                if _plan_of(written) != _plan_of(plan):  # the same function on the same bytes: a bug if not
                    raise VerificationError(f"the raw inputs written on {device.target} are not the ones planned: "
                                            f"{_plan_of(written)} vs {_plan_of(plan)}", target=device.target)
            report, compared, points = None, {}, {}
            for i, (point, folder, one) in enumerate(runs):
                got, result = self._point_result(device, point, one, answers[2 * i:2 * i + 2], rtol, atol)
                points[point] = {"shapes": one["shapes"], "max_abs_diff": got["max_abs_diff"],
                                 "permuted": got.get("permuted", False),
                                 "latency_ms": result.latency_ms}
                for name, diff in got["max_abs_diff"].items():
                    compared[name] = max(diff, compared.get(name, 0.0))
                if keep_outputs is not None:
                    device.transport.get(posixpath.join(folder, agent_module.TRT_OUTPUTS_FILE),
                                         os.path.join(keep_outputs, f"{point or 'static'}.json"))
                if point in (None, "opt") or report is None:
                    report = result
            removed = keep_outputs is None and len(answers) == 2 * len(runs) + 1
        finally:
            if not removed:
                device.transport.run(["rm", "-rf", work], check=False)
        memory = report.device_memory_mib
        out = {"ok": True, "latency_ms": report.latency_ms, "latency_source": report.latency_source,
               "device_memory_bytes": round(memory * (1 << 20)) if memory is not None else None,
               "throughput_qps": report.throughput_qps,
               "tensorrt": report.tensorrt_version, "max_abs_diff": compared,
               "permuted": any(p.get("permuted", False) for p in points.values()), "rtol": rtol, "atol": atol,
               "compared": "trtexec --exportOutput vs reference outputs"}
        if None not in points:
            out["points"] = points
        return out

    def _point_steps(self, target, engine, reference, verify, point, folder, raw, rtol, atol, dla_core) -> list:
        """The agent steps of one shape point: the trtexec run in its folder, then the comparison."""
        argv = load_argv(target.trtexec, engine, iterations=50, percentile=99, shapes=raw["shapes"],
                         load_inputs=raw["files"], export_output=agent_module.TRT_OUTPUTS_FILE,
                         export_times=agent_module.TRT_TIMES_FILE, dla_core=dla_core)
        run = ("run", "--cwd", folder, *(("--timeout", repr(float(target.command_timeout)))
                                         if target.command_timeout else ()), "--", *argv)
        compare = ["trt-compare", "--reference", reference, "--outputs",
                   posixpath.join(folder, agent_module.TRT_OUTPUTS_FILE), "--rtol", repr(rtol), "--atol", repr(atol),
                   "--times", posixpath.join(folder, agent_module.TRT_TIMES_FILE)]
        if point is not None:
            compare += ["--point", point]
        if not verify.get("rows_may_permute", True):
            compare.append("--strict-order")
        return [(run, None), (tuple(compare), None)]

    def _point_result(self, device: Device, point, raw, answers: list, rtol, atol):
        """One point's trtexec run and comparison, from their answers (a batch that stopped at the
        run has no comparison): (the comparison, the run's report), or VerificationError."""
        at = "" if point is None else f" at {point} ({_shapes_text(raw['shapes'])})"
        if not answers:
            raise VerificationError(f"the verification of {device.target}{at} stopped before its trtexec run",
                                    target=device.target)
        ran = answers[0]
        if ran.get("timed_out"):
            raise VerificationError(f"trtexec did not finish on {device.target}{at}: {ran.get('reason')}",
                                    target=device.target, hint="raise the target's command_timeout, or check the device")
        try:
            report = check_trtexec_result(ran.get("stdout", "") + "\n" + ran.get("stderr", ""), ran.get("exit_code"),
                                          target=device.target)
        except BuildError as exc:
            low = exc.message.lower()
            inputs = "input file" in low or "cannot open file" in low
            what = ("could not feed the reference inputs to the engine" if inputs else
                    "the engine's optimisation profile does not accept the reference shapes"
                    if "optimization profile" in low else "the engine does not load")
            raise VerificationError(f"{what} on {device.target}{at}: {exc.message}",
                                    target=device.target, hint=exc.hint) from exc
        compared = answers[1] if len(answers) > 1 else {"ok": False, "reason": "the comparison did not run"}
        if not compared.get("ok"):
            raise VerificationError(
                f"TensorRT engine outputs differ from the reference on {device.target}{at}: {compared.get('reason')}",
                target=device.target,
                hint=f"nothing was published or activated; compared with rtol={rtol:g} atol={atol:g} (the looser "
                     "of verify.rtol/atol and verify.trt_rtol/trt_atol); check the build or loosen them")
        return compared, _with_latency(report, compared)


def _local_plan(reference_local) -> dict | None:
    """The raw inputs `raw-inputs` will write, read from the controller's copy of the reference;
    None without one or if it cannot be read (the device's own answer then says what is wrong)."""
    if reference_local is None:
        return None
    try:
        return agent_module.raw_plan(str(reference_local))
    except (SystemExit, OSError, ValueError, KeyError) as exc:
        log.info("cannot plan the raw inputs from %s (%s); the device writes them first", reference_local, exc)
        return None


def _raw_answer(device: Device, raw: dict) -> dict:
    if not raw.get("ok", True):
        raise VerificationError(f"cannot prepare the reference inputs on {device.target}: {raw.get('reason')}",
                                target=device.target)
    return raw


def _plan_of(raw: dict) -> dict:
    """The names and shapes of a `raw-inputs` answer or a `raw_plan` (what trtexec is given)."""
    if "points" in raw:
        return {p: _plan_of(raw["points"][p]) for p in raw["order"]}
    return {"files": raw["files"], "shapes": raw["shapes"]}


def _with_latency(report, compared: dict):
    """The report's latency from trtexec's --exportTimes file (computed on the device by the agent,
    trtexec's own statistics) when it was written, else from its text summary; and which."""
    times = compared.get("latency_ms")
    if isinstance(times, dict) and isinstance(times.get("median"), (int, float)):
        report.latency_ms = {k: float(v) for k, v in times.items() if k in _STATS and isinstance(v, (int, float))}
        report.latency_source = f"trtexec --exportTimes ({times.get('iterations')} iterations)"
    else:
        report.latency_source = "trtexec performance summary (text)" + (
            f"; {compared['latency_error']}" if compared.get("latency_error") else "")
    return report


_STATS = ("min", "max", "mean", "median", "p90", "p95", "p99")


def _device_text(fingerprint: dict, target: str) -> str:
    """"orin-nano (Jetson Orin Nano Developer Kit, p3767-0005)": the device a DLA refusal names."""
    what = ", ".join(x for x in (fingerprint.get("module_name") or fingerprint.get("board_model")
                                 or fingerprint.get("gpu_name"), fingerprint.get("module")) if x)
    return f"{target} ({what})" if what else target


def _shapes_text(shapes: dict) -> str:
    return ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in sorted(shapes.items()))


def trt_tolerances(verify: dict) -> tuple[float, float]:
    """TensorRT's tolerances: the looser of verify.rtol/atol and verify.trt_rtol/trt_atol, and for
    an INT8 engine also verify.int8_rtol/int8_atol (kiln.backends.base.engine_tolerances).

    fp16 (and TF32 on Ampere+/Orin even for fp32) kernels differ from PyTorch's fp32
    outputs by more than ONNX Runtime on the CPU does; INT8 more again; exported values also
    carry only 6 significant digits (see kiln/device_side/agent.py on --exportOutput).
    """
    rtol, atol = engine_tolerances(verify)
    return max(rtol, float(verify.get("trt_rtol") or 0.0)), max(atol, float(verify.get("trt_atol") or 0.0))


def _tensorrt_version(device: Device, fingerprint: dict) -> str:
    version = fingerprint.get("tensorrt")
    if not version:
        raise BuildError(f"{device.target} reports no TensorRT version", target=device.target,
                         hint="install TensorRT (JetPack ships it) or check the fingerprint with `doit status`")
    return version


def _api_python(target) -> str:
    """The interpreter that runs the TensorRT Python API: tensorrt_python, else python (a local target
    without either: this one)."""
    return target.tensorrt_python or target.python or sys.executable
