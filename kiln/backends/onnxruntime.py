"""The ONNX Runtime backend: the engine is ONNX Runtime's fully optimised model for the
device's CPU, built and checked by the device agent (kiln/device_side/agent.py)."""
from __future__ import annotations

import posixpath

from kiln.backends.base import Backend, engine_tolerances
from kiln.errors import BuildError, CommandFailed, VerificationError

__all__ = ["OnnxRuntimeBackend"]


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

    def build(self, device, onnx, out_dir, settings, fingerprint, stream=None, timing_cache=None,
              external_data=False, calibration_cache=None) -> dict:
        device.mkdir(out_dir)
        out = posixpath.join(out_dir, self.engine_file)
        # ONNX Runtime's optimised model keeps pointing at the ONNX's external data file for the
        # initializers it did not change: --inline-weights makes the engine one file (agent.py)
        inline = ["--inline-weights"] if external_data else []
        try:
            facts = device.agent("ort-build", "--onnx", onnx, "--out", out, "--level", settings["ort_optimization"],
                                 *inline, stream=stream)
        except CommandFailed as exc:
            raise BuildError(f"ONNX Runtime could not optimise the model on {device.target}",
                             target=device.target, hint="see the output below") from exc
        return {"engine": out, "sha256": facts["sha256"], "size": facts["size"],
                "build_seconds": facts["seconds"], "tool": f"onnxruntime {facts['onnxruntime']}"}

    def verify(self, device, engine, reference, verify, settings=None, reference_local=None) -> dict:
        rtol, atol = engine_tolerances(verify)   # a Q/DQ model: the int8 tolerances, as at export
        args = ["ort-verify", "--engine", engine, "--reference", reference, "--rtol", repr(rtol), "--atol", repr(atol)]
        if not verify["rows_may_permute"]:
            args.append("--strict-order")
        report = device.agent(*args)
        if not report.get("ok"):
            raise VerificationError(f"engine outputs differ from the reference on {device.target}: "
                                    f"{report.get('reason')}", target=device.target,
                                    hint="nothing was published or activated; check the build or loosen verify.rtol/atol")
        return report
