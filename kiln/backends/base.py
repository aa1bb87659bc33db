"""Backends: how an engine is built and checked on a device of a hardware class.

Each backend says which build settings change its engines (they enter the
engine key), which tool version builds them, and how to build and verify on a
`Device`. The ONNX Runtime backend is real end to end; the TensorRT backend
drives trtexec (or the TensorRT Python API) on the device.
"""
from __future__ import annotations

import posixpath
from kiln.devices.workarea import Device
from kiln.errors import BuildError, CommandFailed, VerificationError
from kiln.transports.base import Stream


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


class OnnxRuntimeBackend(Backend):
    """The engine is ONNX Runtime's fully optimised model for the device's CPU.

    ONNX Runtime warns that such a model may hold hardware-specific optimisations
    (e.g. NCHWc layouts for the CPU's vector width) and must only be used where it
    was optimised: the same property a TensorRT plan has, at CPU scale.
    """

    name = "onnxruntime"
    engine_file = "model.ort.onnx"

    def build_settings(self, build: dict) -> dict:
        return {"ort_optimization": build["ort_optimization"]}

    def builder_version(self, fingerprint: dict) -> str:
        return f"onnxruntime-{fingerprint.get('onnxruntime')}"

    def build(self, device, onnx, out_dir, settings, fingerprint, stream=None, timing_cache=None) -> dict:
        device.mkdir(out_dir)
        out = posixpath.join(out_dir, self.engine_file)
        try:
            facts = device.agent("ort-build", "--onnx", onnx, "--out", out, "--level", settings["ort_optimization"],
                                 stream=stream)
        except CommandFailed as exc:
            raise BuildError(f"ONNX Runtime could not optimise the model on {device.target}",
                             target=device.target, hint="see the output below") from exc
        return {"engine": out, "sha256": facts["sha256"], "size": facts["size"],
                "build_seconds": facts["seconds"], "tool": f"onnxruntime {facts['onnxruntime']}"}

    def verify(self, device, engine, reference, verify) -> dict:
        args = ["ort-verify", "--engine", engine, "--reference", reference,
                "--rtol", repr(float(verify["rtol"])), "--atol", repr(float(verify["atol"]))]
        if not verify["rows_may_permute"]:
            args.append("--strict-order")
        report = device.agent(*args)
        if not report.get("ok"):
            raise VerificationError(f"engine outputs differ from the reference on {device.target}: "
                                    f"{report.get('reason')}", target=device.target,
                                    hint="nothing was published or activated; check the build or loosen verify.rtol/atol")
        return report


def get_backend(name: str) -> Backend:
    if name == "onnxruntime":
        return OnnxRuntimeBackend()
    if name == "tensorrt":
        from kiln.backends.tensorrt import TensorRTBackend  # the trtexec helpers load only when a fleet uses TensorRT
        return TensorRTBackend()
    raise KeyError(name)
