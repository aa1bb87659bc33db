"""The fingerprint of this machine, read in-process: cheap enough to be the up-to-date check.

No subprocess, no import of onnxruntime: /proc/cpuinfo through the one cpuinfo parser
(the same one the SSH probe's output goes through, so one machine gets one class either way),
and package versions from the installed distributions' records.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from kiln.devices.cpuinfo import parse_cpuinfo
from kiln.errors import ProbeError

__all__ = ["LOCAL_KEYS", "package_version", "probe_local"]

LOCAL_KEYS = ("kind", "os", "arch", "cpu_model", "cpu_flags", "onnxruntime")


def package_version(name: str) -> str | None:
    """Installed version of a Python distribution in this interpreter, None if absent.

    An installed distribution is recorded as `<name>-<version>.dist-info` on sys.path, with the
    name normalised to lowercase and `_` (the packaging spec "Recording installed projects"), so
    one directory listing answers; importlib.metadata, which normalises every installed name on
    every call, is the fallback for other layouts (eggs, editable installs)."""
    wanted = re.sub(r"[-_.]+", "_", name).lower()
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for item in names:
            if item.endswith(".dist-info") and "-" in item:
                dist, _, version = item[:-len(".dist-info")].partition("-")
                if re.sub(r"[-_.]+", "_", dist).lower() == wanted:
                    return version
    import importlib.metadata
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe_local(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, object]:
    """Fingerprint of this machine for the ONNX Runtime backend (keys: LOCAL_KEYS)."""
    try:
        text = cpuinfo.read_text()
    except OSError as exc:
        raise ProbeError(f"cannot read {cpuinfo}: {exc.strerror}", target="local") from exc
    uname = os.uname()
    fp: dict[str, object] = {"kind": "cpu", "os": uname.sysname.lower(), "arch": uname.machine}
    fp.update(parse_cpuinfo(text))
    fp["onnxruntime"] = package_version("onnxruntime")
    if fp["onnxruntime"] is None:
        raise ProbeError("onnxruntime is not installed on this machine", target="local",
                         hint="install onnxruntime (make demo does) to build CPU engines here")
    return fp
