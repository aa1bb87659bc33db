"""Reading what trtexec and the API build script print: reports, failure explanations.

`parse_trtexec_output` reads stdout and stderr together (INFO goes to stdout,
WARNING/ERROR to stderr): the `&&&& RUNNING/PASSED/FAILED TensorRT.trtexec
[TensorRT vNNNN]` lines, the `[I]/[W]/[E]` prefixed lines, build facts and the
performance summary (docs/trtexec.md §1, §4). `explain_failure` turns the known error
texts and exit codes (docs/trtexec.md §3, §5) into one paragraph with a hint;
`check_trtexec_result` raises it as a TrtexecFailed (a BuildError).
`parse_api_build_output` reads the last line of kiln/device_side/trt_api_build.py.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from kiln.devices.nvidia import decode_trt_version_number
from kiln.errors import BuildError

__all__ = ["TrtexecFailed", "TrtexecReport", "parse_trtexec_output", "explain_failure", "check_trtexec_result",
           "parse_api_build_output"]


class TrtexecFailed(BuildError):
    """trtexec ran and said no; `report` holds the parsed output."""

    def __init__(self, message: str, *, report: "TrtexecReport", exit_code: int,
                 hint: str | None = None, **context: object) -> None:
        self.report = report
        self.exit_code = exit_code
        super().__init__(message, hint=hint, **context)


@dataclass
class TrtexecReport:
    status: str = "unknown"                  # PASSED | FAILED | unknown
    tensorrt_version: str | None = None      # "8.5.2" from the banner (docs/trtexec.md §1)
    tensorrt_build: str | None = None        # "43" from " [b43]" (10.4+)
    command: str | None = None               # argv after "# " in the banner
    build_seconds: float | None = None
    engine_size_mib: float | None = None
    throughput_qps: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)      # min max mean median p90 p95 p99
    latency_source: str = "trtexec performance summary (text)"     # or its --exportTimes file (agent)
    gpu_compute_ms: dict[str, float] = field(default_factory=dict)
    device_memory_mib: float | None = None   # an execution context's device memory (9.x/10.x; §4)
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
        if msg.startswith("Latency:"):      # anchored: "H2D Latency:" does not match (docs/trtexec.md §4)
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
        elif (b := re.match(r"Created execution context with device memory size: ([\d.eE+-]+) MiB", msg)):
            r.device_memory_mib = float(b.group(1))
        elif msg.startswith("Selected Device:"):
            r.selected_device = msg.split(":", 1)[1].strip()
        elif (b := re.match(r"Compute Capability: (\d+\.\d+)", msg)):
            r.compute_capability = b.group(1)
        elif (b := re.match(r"TensorRT version: (\d+(?:\.\d+)+)", msg)) and r.tensorrt_version is None:
            r.tensorrt_version = b.group(1)
    return r


def explain_failure(report: TrtexecReport, exit_code: int) -> str:
    """One paragraph: why trtexec failed and what to do next (known error texts: docs/trtexec.md §5,
    exit codes and signals: §3)."""
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
    if "does not satisfy any optimization profile" in errors or "exceed min ~ max range" in errors:
        return ("The input shapes (--shapes) lie outside the engine's optimization profile (the min..max it "
                "was built for). Hint: rebuild with a wider range in the model's inputs, or run it within it.")
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

def parse_api_build_output(text: str, script: str = "trt_api_build") -> dict[str, object]:
    """The script's last JSON line: {"kiln": "trt_api_build" (or `script`), "ok": bool, ...}."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and '"kiln"' in line:
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if data.get("kiln") == script:
                return data
    raise BuildError(f"the TensorRT API script {script}.py printed no result line",
                     hint="run it by hand on the device; is python3 able to import tensorrt?",
                     output_tail=text[-500:] or "<empty>")
