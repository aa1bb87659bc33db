"""The TensorRT backend: engines built and checked on the device by trtexec
(default) or by the TensorRT Python API script, with a per-class timing cache.

Nothing here runs TensorRT on the controller; every command is built by
kiln.builders.trtexec for the device's TensorRT version and run through the
target's transport. Build output streams live and is kept in full in the log.
"""
from __future__ import annotations

import posixpath

from .backends import Backend
from .builders.trtexec import (TRT_API_BUILD_SCRIPT, TrtBuildConfig, api_build_argv, build_argv,
                               check_trtexec_result, load_argv, parse_api_build_output)
from .device import Device
from .errors import BuildError, VerificationError
from .keys import sha256_file


class TensorRTBackend(Backend):
    name = "tensorrt"
    engine_file = "model.plan"

    def build_settings(self, build: dict) -> dict:
        settings = TrtBuildConfig.from_mapping(build).to_dict()
        settings.pop("timing_cache", None)  # speeds the build up; does not define the engine
        return settings

    def builder_version(self, fingerprint: dict) -> str:
        build = fingerprint.get("tensorrt_build")
        return f"tensorrt-{fingerprint.get('tensorrt')}" + (f"-b{build}" if build else "")

    def build(self, device: Device, onnx, out_dir, settings, fingerprint, stream=None, timing_cache=None) -> dict:
        target = device.config
        version = fingerprint.get("tensorrt")
        if not version:
            raise BuildError(f"{device.target} reports no TensorRT version", target=device.target,
                             hint="install TensorRT (JetPack ships it) or check the fingerprint with `doit status`")
        cfg = TrtBuildConfig.from_mapping({**settings, "timing_cache": timing_cache is not None})
        device.mkdir(out_dir)
        engine = posixpath.join(out_dir, self.engine_file)
        if target.build_tool == "python-api":
            script = device.ensure_input(TRT_API_BUILD_SCRIPT, sha256_file(TRT_API_BUILD_SCRIPT), ".py")
            argv = api_build_argv(target.python, script, onnx=onnx, engine=engine, cfg=cfg, timing_cache=timing_cache)
            result = device.transport.run(argv, stream=stream, check=False, timeout=target.command_timeout)
            answer = parse_api_build_output(result.stdout)
            if not answer.get("ok") or result.exit_code != 0:
                raise BuildError(f"the TensorRT API build failed on {device.target}: {answer.get('error')}",
                                 target=device.target, hint="see the build log")
            seconds, tool = answer.get("seconds"), f"tensorrt-python {version}"
        else:
            argv = build_argv(target.trtexec, onnx, engine, cfg, version, timing_cache=timing_cache)
            result = device.transport.run(argv, stream=stream, check=False, timeout=target.command_timeout)
            report = check_trtexec_result(result.stdout + "\n" + result.stderr, result.exit_code,
                                          target=device.target)
            seconds, tool = report.build_seconds, f"trtexec {report.tensorrt_version or version}"
        facts = device.agent("sha256", engine)
        size = int(device.transport.run(["wc", "-c", engine]).stdout.split()[0])
        return {"engine": engine, "sha256": facts["sha256"], "size": size, "build_seconds": seconds or 0.0,
                "tool": tool, "command": result.command}

    def verify(self, device: Device, engine, reference, verify) -> dict:
        """Deserialize and run the engine with trtexec: catches plans for another
        TensorRT/GPU and broken plans; reports latency percentiles for the manifest."""
        target = device.config
        result = device.transport.run(load_argv(target.trtexec, engine, iterations=50, percentile=99),
                                      check=False, timeout=target.command_timeout)
        try:
            report = check_trtexec_result(result.stdout + "\n" + result.stderr, result.exit_code,
                                          target=device.target)
        except BuildError as exc:
            raise VerificationError(f"the engine does not load on {device.target}: {exc.message}",
                                    target=device.target, hint=exc.hint) from exc
        return {"ok": True, "latency_ms": report.latency_ms, "throughput_qps": report.throughput_qps,
                "tensorrt": report.tensorrt_version}
