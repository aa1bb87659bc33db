"""Refit instead of rebuild: a weights-only retrain refits a refittable engine on the device.

A model with `build.refit = true` (TensorRT only) is built refittable (trtexec `--refit`,
BuilderFlag.REFIT; docs/trtexec.md §13). After its engine is published, a *refit base* is
recorded for (architecture, class, build settings, builder version): the architecture is the
export's `architecture_sha256` (the ONNX with initializer values removed, kiln.onnx_weights),
so a retrain whose graph is unchanged finds the base, and a graph change does not.

On an engine miss (kiln.pipeline.engines) with a base in the store, the new engine is made by
refitting the base's plan on a builder of the class with the new ONNX's weights (the device's
TensorRT Python API: kiln/device_side/trt_api_refit.py), then verified against the new reference
outputs like any build (NVIDIA warns that kREFIT can change numerics: every refitted engine
passes the accuracy gate), and published under its full engine key with `made_by` naming the
base. A refit that is unsupported there or fails (or whose engine fails verification) is
logged and the engine is built in full instead; nothing of the refit is published.

Store layout (records follow bytes): `refit-bases/<ab>/<base key>.json` is created by a
conditional write after the base engine's blob and manifest are published, signed by the
controller like manifests (kiln.signing) and checked the same way before use: a base no trusted
key signed is not used (an unsigned or tampered one is quarantined), and a base whose blob is
gone is not used. Bases are never overwritten: any base of the architecture serves, since a
refit replaces every weight.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import TransportError
from kiln.keys import digest, sha256_file
from kiln.signing import controller_trust
from kiln.stores.base import blob_entry, read_checked_record, refit_base_entry

log = logging.getLogger(__name__)
REFIT_FORMAT = 1
KIND = "refit-base"


@dataclass(frozen=True)
class RefitPlan:
    """A base in the store that the engine of `spec` can be refitted from."""
    base_key: str
    base: dict          # the signed base record (sha256 of the plan, the ONNX it was built from, ...)


def refit_wanted(spec) -> bool:
    return spec.backend.name == "tensorrt" and bool(spec.model.build.get("refit"))


def calibrated_int8(model) -> bool:
    """INT8 from a calibration data set (implicit quantization): its activation ranges were measured
    with the old weights and a refit cannot renew them (the Refitter's dynamic-range calls are
    deprecated from 10.1, docs/trtexec.md §13), so such an engine is rebuilt (with a new
    calibration); a Q/DQ export (export.quantize = "qdq") carries its scales as initializers and
    is refitted like any weights."""
    return (model.build.get("precision") in ("int8", "best") and getattr(model, "calibration", None) is not None
            and (model.export or {}).get("quantize") != "qdq")


def architecture_of(ctx, spec, onnx_record: dict) -> str | None:
    """The export record's architecture digest; an export made before it was recorded is read
    from the local ONNX (if it is that ONNX), else None: no refit, a full build."""
    if onnx_record.get("architecture_sha256"):
        return onnx_record["architecture_sha256"]
    from kiln.onnx_weights import architecture_sha256
    from kiln.pipeline.export import ExportPaths
    onnx = ExportPaths.for_model(ctx.artifacts, spec.model.name).onnx
    if onnx.exists() and ctx.hashes.sha256(onnx) == onnx_record["onnx_sha256"]:
        return architecture_sha256(onnx)
    return None


def base_key_inputs(spec, architecture: str) -> dict:
    backend = spec.backend
    return {"format": REFIT_FORMAT, "architecture_sha256": architecture, "class": spec.hwclass.digest,
            "build": backend.build_settings(spec.model.build), "builder": backend.builder_version(spec.fingerprint)}


def plan_refit(ctx, spec, onnx_record: dict, say=print) -> RefitPlan | None:
    """The base to refit from, or None (refit off, unknown architecture, no usable base, or the
    base was built from this very ONNX)."""
    if not refit_wanted(spec):
        return None
    if calibrated_int8(spec.model):
        log.info("%s: INT8 calibrated on data; new weights need a new calibration: building", spec.task_name)
        return None
    architecture = architecture_of(ctx, spec, onnx_record)
    if architecture is None:
        return None
    key = digest(base_key_inputs(spec, architecture))
    base = stored_base(ctx, key, say)
    if base is None or base["onnx_sha256"] == onnx_record["onnx_sha256"]:
        return None
    return RefitPlan(key, base)


def stored_base(ctx, key: str, say=print) -> dict | None:
    """The base record of `key` if a trusted key signed it and its plan is in the store."""
    store, name = ctx.store, refit_base_entry(key)
    def problem(r) -> dict | None:
        ok = isinstance(r, dict) and r.get("kind") == KIND and r.get("base_key") == key and isinstance(r.get("sha256"), str)
        return None if ok else {"reason": "not a refit base record"}
    record = read_checked_record(store, name, problem)
    if record is None:
        return None
    verdict = controller_trust(ctx).verdict(record)
    if not verdict.ok:
        if verdict.status != "untrusted":  # unsigned or altered: proves nothing about anyone
            store.quarantine(name, {"reason": "not signed by a trusted key", "verdict": verdict.status})
        log.warning("refit base %s is %s; not refitting from it", key[:12], verdict.describe())
        say(f"  refit base {key[:12]} is not signed by a trusted key; building instead")
        return None
    info = store.info(blob_entry(record["sha256"]))
    if info is None or info.sha256 != record["sha256"]:
        log.info("refit base %s names plan %s, which is not in the store", key[:12], record["sha256"][:12])
        return None
    return record


def publish_base(ctx, spec, onnx_record: dict, manifest: dict, say=print) -> str | None:
    """Record the just-published engine (`manifest`, a refittable build) as the refit base of its
    architecture; a base already there stays. Returns the base key (None: architecture unknown)."""
    architecture = architecture_of(ctx, spec, onnx_record)
    if architecture is None:
        return None
    key = digest(base_key_inputs(spec, architecture))
    record = {"kind": KIND, "base_key": key, "key_inputs": base_key_inputs(spec, architecture),
              "engine_key": manifest["key"], "sha256": manifest["sha256"], "size": manifest.get("size"),
              "onnx_sha256": onnx_record["onnx_sha256"], "model": spec.model.name, "class": spec.hwclass.id,
              "built_on": manifest.get("built_on"), "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    record = controller_trust(ctx).sign(record, say=say)
    if ctx.store.put_bytes(refit_base_entry(key), json.dumps(record, indent=2, sort_keys=True).encode()):
        log.info("refit base %s: engine %s of %s on %s", key[:12], manifest["key"][:12], spec.model.name,
                 spec.hwclass.id)
    return key


def send_refit_inputs(ctx, device, plan: RefitPlan, onnx_local: Path, fingerprint: dict) -> tuple[str, str | None]:
    """The base plan and (TensorRT 8.x) the new ONNX's initializers onto the device, by content:
    -> (base path, weights path or None)."""
    store, sha = ctx.store, plan.base["sha256"]
    try:  # straight from the store where it presigns (S3), else through the controller
        base = device.ensure_input(None, sha, ".plan", store=store, entry=blob_entry(sha))
    except TransportError:
        local = ctx.engine_cache(plan.base["engine_key"])
        if not (local.exists() and ctx.hashes.sha256(local) == sha):
            store.get_file(blob_entry(sha), local, sha256=sha)
        base = device.ensure_input(local, sha, ".plan")
    weights = None
    if int(str(fingerprint.get("tensorrt") or "0").split(".")[0]) < 10:  # no ONNX parser refitter
        from kiln.onnx_weights import save_initializers
        npz = ctx.artifacts / "cache" / "refit-weights" / f"{sha256_file(onnx_local)}.npz"
        if not npz.exists():
            save_initializers(onnx_local, npz)
        weights = device.ensure_input(npz, sha256_file(npz), ".npz")
    return base, weights


def made_by(plan: RefitPlan | None) -> dict:
    """The manifest's account of how the engine was made."""
    if plan is None:
        return {"how": "build"}
    return {"how": "refit", "base": plan.base_key, "base_engine_key": plan.base["engine_key"],
            "base_sha256": plan.base["sha256"], "base_onnx_sha256": plan.base["onnx_sha256"]}
