"""Backends: how an engine is built and checked on a device of a hardware class.

Each backend says which build settings change its engines (they enter the
engine key), which tool version builds them, and how to build and verify on a
`Device`. This module holds the contract (`Backend`) and `get_backend`; the
backends are kiln/backends/onnxruntime.py (real end to end) and
kiln/backends/tensorrt.py (trtexec or the TensorRT Python API on the device),
each imported only when a fleet uses it.
"""
from __future__ import annotations

from kiln.devices.workarea import Device
from kiln.transports.base import Stream

__all__ = ["Backend", "get_backend"]


class Backend:
    name: str
    engine_file: str

    def build_settings(self, build: dict) -> dict:
        """The subset of a model's build config that changes this backend's engines."""
        raise NotImplementedError

    def builder_version(self, fingerprint: dict) -> str:
        raise NotImplementedError

    def build(self, device: Device, onnx: str, out_dir: str, settings: dict, fingerprint: dict,
              stream: Stream | None = None, timing_cache: str | None = None) -> dict:
        """Build `out_dir/engine_file` on the device; returns facts for the manifest."""
        raise NotImplementedError

    def verify(self, device: Device, engine: str, reference: str, verify: dict) -> dict:
        """Load the engine on the device and run it; raise VerificationError if it is wrong."""
        raise NotImplementedError


def get_backend(name: str) -> Backend:
    if name == "onnxruntime":
        from kiln.backends.onnxruntime import OnnxRuntimeBackend
        return OnnxRuntimeBackend()
    if name == "tensorrt":
        from kiln.backends.tensorrt import TensorRTBackend  # the trtexec helpers load only when a fleet uses TensorRT
        return TensorRTBackend()
    raise KeyError(name)


def check_build_settings(fleet) -> None:
    """Every model's build settings, checked by the backends of the targets that run it, before any
    work starts; a bad value is a ConfigError pointing at the fleet file's line."""
    from kiln.errors import ConfigError

    checked: set[tuple[str, str]] = set()
    for target in fleet.targets.values():
        for model in target.models:
            if (model, target.backend) in checked:
                continue
            checked.add((model, target.backend))
            try:
                get_backend(target.backend).build_settings(fleet.models[model].build)
            except ConfigError as exc:
                keys = ["models", model, "build"] + ([str(exc.context["field"])] if "field" in exc.context else [])
                raise fleet.error_at(keys, exc.message, exc.hint or "fix this build setting") from exc
