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

__all__ = ["Backend", "get_backend", "engine_tolerances"]


class Backend:
    name: str
    engine_file: str

    def build_settings(self, build: dict) -> dict:
        """The subset of a model's build config that changes this backend's engines."""
        raise NotImplementedError

    def check_class(self, settings: dict, fingerprint: dict, device: str, target: str | None = None) -> None:
        """Refuse settings a hardware class cannot build (a ConfigError naming it); nothing by default."""

    def builder_version(self, fingerprint: dict) -> str:
        raise NotImplementedError

    def build(self, device: Device, onnx: str, out_dir: str, settings: dict, fingerprint: dict,
              stream: Stream | None = None, timing_cache: str | None = None, external_data: bool = False,
              calibration_cache: str | None = None) -> dict:
        """Build `out_dir/engine_file` on the device; returns facts for the manifest. `external_data`:
        the ONNX's weights are in a data file next to it (kiln.onnx_external); the engine must
        still be one self-contained file. A backend that calibrates (TensorRT INT8) gets the
        calibration cache's path on the device."""
        raise NotImplementedError

    def verify(self, device: Device, engine: str, reference: str, verify: dict, settings: dict | None = None,
               reference_local=None) -> dict:
        """Load the engine on the device and run it; raise VerificationError if it is wrong.
        `settings`: the engine's build settings (`build_settings`), for what loading needs (a DLA core);
        `reference_local`: the controller's copy of `reference`, if it has one (fewer round trips)."""
        raise NotImplementedError


def engine_tolerances(verify: dict) -> tuple[float, float]:
    """(rtol, atol) an engine's outputs are compared with against PyTorch's reference: verify.rtol/atol,
    and for INT8 (built with precision int8/best, or a Q/DQ-quantized ONNX: the `engine_precision`
    and `quantized` entries kiln.pipeline.engines.engine_verify adds) the looser int8_rtol/int8_atol."""
    int8 = verify.get("engine_precision") in ("int8", "best") or bool(verify.get("quantized"))
    rtol, atol = float(verify.get("rtol", 1e-3)), float(verify.get("atol", 1e-4))
    if int8:
        rtol, atol = max(rtol, float(verify.get("int8_rtol") or 0.0)), max(atol, float(verify.get("int8_atol") or 0.0))
    return rtol, atol


def get_backend(name: str) -> Backend:
    if name == "onnxruntime":
        from kiln.backends.onnxruntime import OnnxRuntimeBackend
        return OnnxRuntimeBackend()
    if name == "tensorrt":
        from kiln.backends.tensorrt import TensorRTBackend  # the trtexec helpers load only when a fleet uses TensorRT
        return TensorRTBackend()
    raise KeyError(name)


def check_build_settings(fleet) -> None:
    """Every model's build settings as each target runs it (its own, with the target's overrides:
    kiln.config.Fleet.model_for), checked by the target's backend before any work starts; a bad value
    is a ConfigError pointing at the fleet file's line that set it."""
    from kiln.errors import ConfigError

    checked: set[tuple[str, str, str]] = set()
    for target in fleet.targets.values():
        for name in target.models:
            model = fleet.model_for(target, name)
            if (name, model.variant, target.backend) in checked:
                continue
            checked.add((name, model.variant, target.backend))
            try:
                get_backend(target.backend).build_settings(model.build)
            except ConfigError as exc:
                field = str(exc.context["field"]) if "field" in exc.context else None
                raise fleet.error_at(_where_set(target, name, field), exc.message,
                                     exc.hint or "fix this build setting") from exc


def _where_set(target, model: str, field: str | None) -> list[str]:
    """The fleet-file keys of the table that set `field` for `model` on `target`."""
    aliases = {field, "optimization_level" if field == "builder_optimization_level" else field}
    per_model = (target.settings.get("model_build") or {}).get(model) or {}
    for keys, table in ((["targets", target.name, "model_build", model], per_model),
                        (["targets", target.name, "build"], target.settings.get("build") or {})):
        hit = next((k for k in aliases if k in table), None)
        if hit:
            return keys + [hit]
    return ["models", model, "build"] + ([field] if field else [])
