"""Fingerprints: what a target says about itself.

The local probe reads /proc/cpuinfo and package metadata in-process (no
subprocess, no import of onnxruntime), so probing this machine on every run is
cheap enough to be the up-to-date check itself. Remote targets run a shell probe
over their transport (see kiln.nvidia.PROBE_SCRIPT) and parse its output.
"""
from __future__ import annotations

import importlib.metadata
import platform
import re
from pathlib import Path

from kiln.errors import ProbeError

# Flags that change which kernels ONNX Runtime (and its optimised graphs) use.
ISA_FLAGS = re.compile(
    r"^(sse4_1|sse4_2|ssse3|avx|avx2|fma|f16c|avx_vnni|avx512\w*|amx\w*|"
    r"asimd|asimdhp|asimddp|asimdfhm|sve|sve2|sme|i8mm|bf16|fphp|neon)$")


def parse_cpuinfo(text: str) -> dict[str, object]:
    """CPU model and ISA flags of the first processor in /proc/cpuinfo (x86 or ARM)."""
    model, flags = None, []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and model is None:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = sorted({f for f in value.split() if ISA_FLAGS.match(f)})
        elif not line.strip() and flags and model:
            break
    return {"cpu_model": model, "cpu_flags": flags}


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe_local(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, object]:
    """Fingerprint of this machine for the ONNX Runtime backend."""
    try:
        text = cpuinfo.read_text()
    except OSError as exc:
        raise ProbeError(f"cannot read {cpuinfo}: {exc.strerror}", target="local") from exc
    fp: dict[str, object] = {"kind": "cpu", "os": platform.system().lower(), "arch": platform.machine()}
    fp.update(parse_cpuinfo(text))
    fp["onnxruntime"] = package_version("onnxruntime")
    if fp["onnxruntime"] is None:
        raise ProbeError("onnxruntime is not installed on this machine", target="local",
                         hint="install onnxruntime (make demo does) to build CPU engines here")
    return fp


def probe_remote(transport, trtexec: str | None = None, python: str = "python3") -> dict[str, object]:
    """Run the shell probe on a device (nothing needed there beyond sh) and parse it."""
    from kiln.errors import KilnError
    from kiln.devices.nvidia import parse_probe_output, probe_argv
    try:
        result = transport.run(probe_argv(trtexec=trtexec, python=python), timeout=60)
    except KilnError as exc:
        raise ProbeError(f"cannot probe {transport.target}: {exc.message}", target=transport.target,
                         hint=exc.hint or "check that the device is up and reachable") from exc
    return parse_probe_output(result.stdout)
