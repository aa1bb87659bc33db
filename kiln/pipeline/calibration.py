"""INT8 calibration caches: built once per (ONNX, calibration data, TensorRT, hardware class).

trtexec cannot calibrate from data (docs/trtexec.md §10), so an INT8 build of a model with a
calibration data set ([models.X.calibration], kiln.calibration) first makes sure of its calibration
cache: from the store (`calibration-caches/<ab>/<key>.cache`), else calibrated on the builder with
the TensorRT Python API (the device runs kiln/device_side/trt_api_build.py with the data set's
batches; kiln.backends.tensorrt.TensorRTBackend.calibrate) and published. Every INT8 build of that
class then gets the cache (`--calib`, or the Python API calibrator reading it): another engine of
the same ONNX and data on that class (another workspace, a per-target variant, a second
controller) calibrates nothing. Within a run each cache key is made once (`Context.once`).

The cache's key holds the ONNX's sha256, the data set's digest, the builder version (TensorRT
and its build) and the class digest; the engine key holds the data set's digest (with the ONNX,
class and builder version already in it, the cache is a function of the engine key's inputs).
"""
from __future__ import annotations

import logging
import posixpath

from kiln.calibration import dataset_digest, write_batches
from kiln.config import Model
from kiln.errors import CorruptEntry
from kiln.keys import digest, sha256_file
from kiln.stores.base import calibration_cache_entry

log = logging.getLogger(__name__)

__all__ = ["needs_calibration", "calibration_digest", "calibration_key", "ensure_calibration_cache"]

INT8_PRECISIONS = ("int8", "best")


def needs_calibration(model: Model, backend: str) -> bool:
    """A TensorRT INT8 (or best) build of a model with a calibration data set whose ONNX is not
    already quantized by its export (`export.quantize = "qdq"` uses the data set at export)."""
    return (backend == "tensorrt" and model.calibration is not None
            and model.build.get("precision") in INT8_PRECISIONS and model.export.get("quantize") != "qdq")


def calibration_digest(hashes, model: Model, backend: str) -> str | None:
    """The data set's digest when the engine needs a calibration cache, else None (stat-cached)."""
    return dataset_digest(model, hashes) if needs_calibration(model, backend) else None


def calibration_key(onnx_sha256: str, data_digest: str, builder_version: str, class_digest: str) -> str:
    return digest({"onnx_sha256": onnx_sha256, "calibration_data": data_digest, "builder": builder_version,
                   "class": class_digest})


def ensure_calibration_cache(ctx, spec, device, target, onnx_remote: str, onnx_sha256: str, out_dir: str,
                             fingerprint: dict, say=print, stream=None) -> str:
    """The calibration cache for `spec` on the device (its path there): from the store, else
    calibrated on `device` and published. Returns the remote path of the cache."""
    backend = spec.backend
    key = calibration_key(onnx_sha256, spec.calibration, backend.builder_version(fingerprint), spec.hwclass.digest)
    entry = calibration_cache_entry(key)
    local = ctx.artifacts / "cache" / "calibration" / f"{key}.cache"
    remote = posixpath.join(out_dir, "int8-calibration.cache")
    task = f"calibrate:{spec.task_name}"   # an audit name in events.jsonl, not a doit task

    def fetch_or_calibrate() -> str:
        try:
            ctx.store.get_file(entry, local)
            ctx.events.emit(task, "cache-hit", key=key, why=f"INT8 calibration cache for {spec.hwclass.id} in the store")
            say(f"  calibration cache {key[:12]} for {spec.hwclass.id} is in the store")
            return "store"
        except (KeyError, CorruptEntry):
            pass
        bundle = ctx.artifacts / "cache" / "calibration" / f"{spec.calibration}.npz"
        if not bundle.exists():
            count = write_batches(spec.model, bundle)
            log.info("calibration data of %s: %d batches in %s", spec.model.name, count, bundle)
        batches = device.ensure_input(bundle, sha256_file(bundle), ".npz")
        say(f"  calibrating INT8 for {spec.model.name} on {target.name} (class {spec.hwclass.id})")
        ctx.events.emit(task, "build", key=key, target=target.name,
                        why=f"no INT8 calibration cache for this ONNX and data on class {spec.hwclass.id}")
        facts = backend.calibrate(device, onnx_remote, out_dir, backend.build_settings(spec.build_inputs),
                                  fingerprint, batches=batches, cache=remote, stream=stream)
        device.transport.get(remote, local)
        ctx.store.put_file(entry, local)
        ctx.events.emit(task, "publish", key=key, target=target.name, seconds=facts.get("seconds"),
                        why=f"INT8 calibration cache ({facts.get('batches')} batches) built on {target.name}")
        say(f"  published calibration cache {key[:12]} ({facts.get('batches')} batches, on {target.name})")
        return "calibrated"

    ctx.once(("calibration", key), fetch_or_calibrate)
    device.mkdir(out_dir)
    device.transport.put(local, remote)
    return remote
