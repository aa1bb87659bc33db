"""Engines: one per (ONNX, hardware class, build settings, builder version).

`engine_key` is computed from inputs only (engine bytes may differ between two
builds: optimisers are not deterministic). `ensure_engine` is the cache-first
path: a store hit means no build; a miss is built on one builder of the class,
verified there against the reference outputs, and only then published. Within a
run each key is ensured once (`Context.once`), so parallel deploys to ten
identical devices wait for one build.

Store layout and publish order (records follow bytes): the engine bytes go to
`blobs/<ab>/<sha256>` (named by their own digest, verified on the way in), then
`engines/<ab>/<key>/manifest.json` naming that blob is created by a conditional
write (never overwritten: a racer that loses adopts the winner's manifest; its own
blob stays as a harmless orphan), and only then the local engine record is written.
The store's manifest is the truth: a local record that disagrees with it is stale
and is re-read, never a reason to remove anything. Bytes that do not match their
own digest are quarantined by the store (kiln.stores.base) and rebuilt.

Provenance (kiln.signing): the controller signs the manifest of what it verified before the
conditional write, and every use of a stored manifest (a cache hit, or a lost race's winner)
checks the signature against the trusted keys first. A manifest no trusted key signed is never
used; the run that needed it fails with UntrustedEngine, loudly (a planted engine is an attack
or a misconfiguration, not a cache miss):
- unsigned, or its signature does not verify (a field changed after signing): it proves nothing
  about anyone, so it is quarantined at once (`quarantine/`, reason "not signed by a trusted
  key"); the next run rebuilds the engine and publishes a signed manifest.
- validly signed by a key not trusted here (another controller): left in place this run, so
  that trusting its key (`[signing] trusted`) makes it a cache hit; the refusal is remembered
  in <artifacts>/cache/untrusted/<key>.json, and a later run that still does not trust that
  very manifest quarantines it and rebuilds. The fleet is never wedged: at worst every other
  run of two controllers that do not trust each other rebuilds (give them separate stores).
"""
from __future__ import annotations

import json
import logging
import posixpath
import time
from dataclasses import dataclass
from pathlib import Path

from kiln.backends.base import Backend, get_backend
from kiln.config import Model, Target
from kiln.devices.hwclass import HardwareClass, hardware_class
from kiln.devices.workarea import Device
from kiln.errors import BuildError, CorruptEntry, KilnError, UnreachableError
from kiln.keys import digest, read_json, write_json_if_changed
from kiln.oserrors import explain_os_errors
from kiln.pipeline.calibration import INT8_PRECISIONS, calibration_digest, ensure_calibration_cache
from kiln.pipeline.context import Context
from kiln.pipeline.export import ExportPaths
from kiln.pipeline.fingerprints import probe_target, recorded_class, recorded_classes
from kiln.signing import UntrustedEngine, Verdict, controller_trust
from kiln.onnx_external import DATA_SUFFIX, ExternalData, check_graph
from kiln.stores.base import (blob_entry, engine_entry, engine_manifest_entry, lease_entry, onnx_data_entry,
                              onnx_entry, quarantine_entry, read_checked_record, reference_entry, timing_cache_entry)
from kiln.faults import kill_point
from kiln.progress import NULL

log = logging.getLogger(__name__)
ENGINE_FORMAT = 1


@dataclass(frozen=True)
class EngineSpec:
    model: Model
    hwclass: HardwareClass
    fingerprint: dict                # of a member: the builder version comes from it
    builders: tuple[Target, ...]     # who may build it, in order of preference
    #: digest of the INT8 calibration data set when the build needs a calibration cache
    #: (kiln.pipeline.calibration.calibration_digest), else None
    calibration: str | None = None

    @property
    def build_inputs(self) -> dict:
        """The model's build settings plus the calibration data's digest (an engine-defining input)."""
        return {**self.model.build, "calibration": self.calibration} if self.calibration else self.model.build

    @property
    def task_name(self) -> str:
        """`det@<class>`; a target's build overrides make a variant: `det~3f9c2a@<class>`."""
        return f"{self.model.engine_name}@{self.hwclass.id}"

    @property
    def backend(self) -> Backend:
        return get_backend(self.hwclass.backend)


def engine_spec(ctx: Context, model: Model, hwclass: HardwareClass, fingerprint: dict,
                deploying: Target | None = None) -> EngineSpec:
    """The engine of `model` (as a target runs it: Fleet.model_for) for `hwclass`. Builders: the class's `builder = true` members
    (by recorded fingerprints), then the target being deployed; with no target being
    deployed (an `engine:` task), every recorded member in fleet-file order."""
    classes = recorded_classes(ctx)
    # by digest: `id` formats a label per call, and this runs once per deployed target over all targets
    members = [t for t in ctx.fleet.targets.values() if t.name in classes and classes[t.name].digest == hwclass.digest]
    builders = [t for t in members if t.builder]
    if deploying is not None:
        builders += [] if deploying in builders else [deploying]
    else:
        builders += [t for t in members if t not in builders]
    return EngineSpec(model, hwclass, fingerprint, tuple(builders),
                      calibration_digest(ctx.hashes, model, hwclass.backend))


def engine_key_inputs(spec: EngineSpec, onnx_record: dict) -> dict:
    backend = spec.backend
    return {"format": ENGINE_FORMAT, "onnx_sha256": onnx_record["onnx_sha256"],
            "class": spec.hwclass.digest, "build": backend.build_settings(spec.build_inputs),
            "builder": backend.builder_version(spec.fingerprint)}


def current_engine_key(ctx: Context, spec: EngineSpec) -> str | None:
    """The key the engine should have now, or None if the ONNX was never exported."""
    record = read_json(ExportPaths.for_model(ctx.artifacts, spec.model.name).record)
    return digest(engine_key_inputs(spec, record)) if record is not None else None


def engine_is_current(ctx: Context, spec: EngineSpec) -> bool:
    """The local engine record names the key the engine should have now (no store access)."""
    record = read_json(ctx.engine_record(spec.model.engine_name, spec.hwclass.id))
    key = current_engine_key(ctx, spec)
    return record is not None and key is not None and record["key"] == key


@explain_os_errors
def ensure_engine(ctx: Context, spec: EngineSpec, say=print, while_waiting=None, provisional_for: str | None = None) -> dict:
    """Make sure the store holds a verified engine for `spec`; returns its record. A call that
    waits for this run's build of it (by another task) first runs `while_waiting()`; with
    `provisional_for` (a target), it then returns as soon as that build offers its engine, built
    on another device and uploaded to the store's staging but not yet verified: a record with
    "provisional": True and the staging entry as "store_entry", for a deploy to stage and
    smoke-test on that target meanwhile. Such a deploy activates only what `confirm_engine`
    confirms (kiln.pipeline.deploy). The builder's own deploy waits: it takes the engine its
    build verified there."""
    onnx_record = read_json(ExportPaths.for_model(ctx.artifacts, spec.model.name).record)
    if onnx_record is None:
        raise BuildError(f"model {spec.model.name} has not been exported", model=spec.model.name,
                         hint=f"run `doit export:{spec.model.name}` first")
    check_engine_fits_class(spec)
    key = digest(engine_key_inputs(spec, onnx_record))
    # once per key and run; the record is per (model, class): two models whose ONNX bytes are
    # equal share one engine, and each gets its record
    manifest, offered = ctx.once_or_offer(("engine", key), lambda: _ensure(ctx, spec, key, onnx_record, say),
                                          while_waiting, take_offer=provisional_for is not None and (
                                              lambda offered: offered["built_on"] != provisional_for))
    if offered:
        return _engine_record(spec, key, manifest)
    return _write_record(ctx, spec, key, manifest)


def confirm_engine(ctx: Context, spec: EngineSpec, staged: dict, say=print) -> dict:
    """The verified, published record of the engine a provisional record (`staged`) named: waits
    for this run's build to end. Raises the build's error if its verification failed, and
    EngineReplaced if the published engine is other bytes (another controller published first)."""
    record = ensure_engine(ctx, spec, say=say)
    if record["key"] != staged["key"] or record["sha256"] != staged["sha256"]:
        raise EngineReplaced(record)
    return record


class EngineReplaced(Exception):
    """The engine published for a key is not the provisional one a deploy staged: stage it instead."""

    def __init__(self, record: dict) -> None:
        super().__init__(f"engine {record['key'][:12]} was published as other bytes ({record['sha256'][:12]})")
        self.record = record


def check_engine_fits_class(spec: EngineSpec) -> None:
    """Refuse, before any store access or build, settings the class cannot build (dla_core on a
    class without that DLA core: a ConfigError naming the class, its module and its targets)."""
    fp = spec.fingerprint
    what = ", ".join(x for x in (fp.get("module_name") or fp.get("board_model") or fp.get("gpu_name"),
                                 fp.get("module")) if x)
    members = ", ".join(t.name for t in spec.builders) or None
    spec.backend.check_class(spec.backend.build_settings(spec.model.build), fp,
                             f"hardware class {spec.hwclass.id}" + (f" ({what})" if what else ""), target=members)


def _ensure(ctx: Context, spec: EngineSpec, key: str, onnx_record: dict, say) -> dict:
    """The engine's manifest in the store: found there, else built on one builder and published."""
    task, store = f"engine:{spec.task_name}", ctx.store
    manifest = _stored_manifest(ctx, key, say)
    if manifest is not None:
        ctx.events.emit(task, "cache-hit", key=key, why=f"engine for {spec.hwclass.id} already in {store.url}")
        say(f"  cache hit: engine {key[:12]} for {spec.hwclass.id} is in the store")
        return manifest
    return _build_leased(ctx, spec, key, lambda: _build_any(ctx, spec, key, onnx_record, say), say)


def lease_seconds(ctx: Context, spec: EngineSpec) -> float:
    """How long a build lease lasts: `[store] lease_seconds`, else twice the longest builder's
    `command_timeout` (a build and its verification each run within it)."""
    if ctx.fleet.lease_seconds:
        return float(ctx.fleet.lease_seconds)
    return 2.0 * max((float(t.settings.get("command_timeout") or 3600) for t in spec.builders), default=3600.0)


def _build_leased(ctx: Context, spec: EngineSpec, key: str, build, say) -> dict:
    """Build under the key's lease in the store (kiln.stores.lease): when another controller holds
    it, wait for its manifest (shown as "waiting for <owner>'s build") and use it as a cache hit."""
    from kiln.stores.lease import build_once, describe, new_owner
    task, shown = f"engine:{spec.task_name}", {"said": -1e9, "activity": None, "holder": None}

    def waiting(holder, seconds: float) -> None:
        line = f"waiting for {describe(holder.owner)}'s build of {key[:12]} (since {seconds:.0f} s)"
        if shown["activity"] is None:  # shown only while waiting (the build has its own activity)
            shown["activity"] = ctx.progress.activity(f"engine {spec.task_name}")
        if shown["holder"] != holder.owner:
            shown["holder"] = holder.owner
            shown["activity"].phase(f"waiting for {describe(holder.owner)}'s build")
        shown["activity"].note(line)
        if seconds - shown["said"] >= 30:  # the log gets a line now and then, the display every look
            shown["said"] = seconds
            say(f"  {line}")

    try:
        outcome = build_once(ctx.store, lease_entry(key), new_owner(ctx.run_id), lease_seconds(ctx, spec),
                             ready=lambda: _stored_manifest(ctx, key, say), build=build, waiting=waiting,
                             what=f"{task} {key}")
    finally:
        if shown["activity"] is not None:
            shown["activity"].finish()
    if outcome.built:
        return outcome.value
    who = describe(outcome.holder) if outcome.holder else "another controller"
    ctx.events.emit(task, "cache-hit", key=key, waited=round(outcome.waited, 3), built_by=outcome.holder,
                    why=f"built by another controller ({who}) while this run waited {outcome.waited:.0f} s")
    say(f"  cache hit: engine {key[:12]} for {spec.hwclass.id} was built by {who} (waited {outcome.waited:.0f} s)")
    return outcome.value


def _build_any(ctx: Context, spec: EngineSpec, key: str, onnx_record: dict, say) -> dict:
    """Build on the first builder of the class that can (the caller holds the key's lease). A
    weights-only change of a model built refittable is refitted from its base instead
    (kiln.pipeline.refit); a refit that cannot be done or fails falls back to the full build."""
    from kiln.pipeline.refit import plan_refit, publish_base, refit_wanted
    model = spec.model
    errors = []
    refit = plan_refit(ctx, spec, onnx_record, say)
    for target in spec.builders:
        if not _still_in_class(ctx, spec, target):
            errors.append(f"{target.name}: no longer in class {spec.hwclass.id}")
            continue
        try:
            if refit is not None:
                try:
                    with ctx.progress.activity(f"refit {spec.task_name} on {target.name}") as activity:
                        return _build_on(ctx, spec, target, key, engine_key_inputs(spec, onnx_record), onnx_record,
                                         say, activity, refit=refit)
                except UnreachableError:
                    raise
                except BuildError as exc:  # unsupported, failed, or its engine failed verification
                    _refit_failed(ctx, spec, key, target, refit, exc, say)
                    refit = None
            with ctx.progress.activity(f"build {spec.task_name} on {target.name}") as activity:
                manifest = _build_on(ctx, spec, target, key, engine_key_inputs(spec, onnx_record), onnx_record,
                                     say, activity)
        except UnreachableError as exc:
            errors.append(f"{target.name}: {exc.message}")
            log.warning("builder %s unreachable, trying the next builder of %s", target.name, spec.hwclass.id)
            continue
        if refit_wanted(spec):  # records follow bytes: the engine is published, now name it a base
            publish_base(ctx, spec, onnx_record, manifest, say)
        return manifest
    tried = "; ".join(errors) or "the class has no recorded member"
    raise BuildError(f"no builder of hardware class {spec.hwclass.id} could build {model.name}: {tried}",
                     model=model.name, hint="bring one of the class's devices online (or run "
                                            "`doit fingerprint:<target>` for it), then run again")


def _refit_failed(ctx: Context, spec: EngineSpec, key: str, target: Target, refit, exc: KilnError, say) -> None:
    """A refit that could not be used: said, logged and recorded; the caller builds instead."""
    ctx.events.emit(f"engine:{spec.task_name}", "build", key=key, target=target.name, refit_base=refit.base_key,
                    why=f"refit on {target.name} not used ({exc.message}); building the engine in full")
    log.warning("refit of %s on %s not used: %s", spec.task_name, target.name, exc.message)
    say(f"  refit not used ({exc.message}); building in full")


def _still_in_class(ctx: Context, spec: EngineSpec, target: Target) -> bool:
    """A builder chosen by its recorded fingerprint is probed first (on the connection the
    build uses anyway): an engine built on a device that changed would be married to the wrong
    hardware."""
    probe = probe_target(ctx, target)
    if probe.error is not None:
        return True  # unreachable: the build attempt says so, and the next builder is tried
    recorded = recorded_class(ctx, target)
    try:
        now = hardware_class(target.backend, probe.fingerprint, tuple(target.class_fields), target=target.name)
    except KilnError:
        return False
    if now.id != spec.hwclass.id:
        log.warning("%s is recorded in class %s but is now %s; not building on it (run `doit fingerprint:%s`)",
                    target.name, recorded.id if recorded else "?", now.id, target.name)
        return False
    return True


def engine_blob(ctx: Context, record: dict) -> tuple[str, str]:
    """(store entry, sha256) of the engine bytes an engine record names: what deploy fetches (the
    staging entry of a provisional record, see ensure_engine)."""
    return record.get("store_entry") or blob_entry(record["sha256"]), record["sha256"]


def _read_manifest(store, key: str) -> dict | None:
    """The key's manifest as stored, or None if absent or unreadable (kiln.stores.base.read_checked_record:
    one that is no engine manifest, or names another key, is quarantined)."""
    def problem(manifest) -> dict | None:
        if not isinstance(manifest, dict) or not isinstance(manifest.get("sha256"), str):
            return {"reason": "not an engine manifest (no JSON object with a sha256)"}
        if manifest.get("key") != key:
            # a manifest validly signed for one engine, copied under another key, would otherwise pass:
            # the signature covers the key it names, so the name it is stored under must be that key
            return {"reason": MISPLACED_REASON, "names_key": manifest.get("key")}
        return None
    return read_checked_record(store, engine_manifest_entry(key), problem)


MISPLACED_REASON = "names another engine key than the one it is stored under"


def _blob_present(store, key: str, manifest: dict) -> bool:
    """The blob the manifest names is in the store (by its record: no payload read). A store
    written before blobs/ holds the engine under the key: it is copied into its blob once."""
    sha = manifest["sha256"]
    info = store.info(blob_entry(sha))
    if info is not None:
        if info.sha256 != sha:  # its record disagrees with its own name: corrupt by definition
            store.quarantine(blob_entry(sha), {"reason": "recorded sha256 differs from the blob's name",
                                               "recorded_sha256": info.sha256})
            return False
        return True
    legacy = store.info(engine_entry(key))
    if legacy is None or legacy.sha256 != sha:
        return False
    import tempfile
    with tempfile.TemporaryDirectory(prefix="kiln-migrate-") as tmp:
        try:
            store.get_file(engine_entry(key), Path(tmp) / "engine", sha256=sha)
        except (KeyError, CorruptEntry):
            return False
        store.put_file(blob_entry(sha), Path(tmp) / "engine", sha256=sha)
    log.info("engine %s: copied the bytes stored under its key into %s", key[:12], blob_entry(sha))
    return True


def _stored_manifest(ctx: Context, key: str, say=print) -> dict | None:
    """The manifest of `key` if a trusted key signed it and the blob it names is in the store (a
    hit), else None. Raises UntrustedEngine for a manifest no trusted key signed (see the module
    doc: it is quarantined now or on the next run that still does not trust it)."""
    manifest = _read_manifest(ctx.store, key)
    if manifest is None or not _trusted(ctx, key, manifest, say):
        return None
    if not _blob_present(ctx.store, key, manifest):
        return None
    return manifest


UNTRUSTED_REASON = "not signed by a trusted key"


def _refusals(ctx: Context, key: str) -> Path:
    return ctx.artifacts / "cache" / "untrusted" / f"{key}.json"


def _trusted(ctx: Context, key: str, manifest: dict, say=print) -> bool:
    """True if a trusted key signed `manifest`. Otherwise raises UntrustedEngine, except for a
    validly signed manifest this controller already refused on an earlier run: that one is
    quarantined now and False (a miss: rebuild) is returned."""
    verdict = controller_trust(ctx).verdict(manifest)
    memo = _refusals(ctx, key)
    if verdict.ok:
        memo.unlink(missing_ok=True)
        return True
    store, name = ctx.store, engine_manifest_entry(key)
    seen = {"manifest": digest(manifest), "signed_by": verdict.signed_by}
    reason = {"reason": UNTRUSTED_REASON, "verdict": verdict.status, "signed_by": verdict.signed_by,
              "sha256": manifest.get("sha256")}
    if verdict.status == "untrusted" and read_json(memo) == seen:
        store.quarantine(name, {**reason, "refused_before": True})
        memo.unlink(missing_ok=True)
        log.warning("engine %s: its manifest is still %s; moved it to %s and rebuilding it", key[:12],
                    verdict.describe(), quarantine_entry(name))
        say(f"  engine {key[:12]}: the manifest refused on an earlier run is still not signed by a trusted key; "
            f"moved it to {quarantine_entry(name)}, rebuilding")
        return False
    if verdict.status == "untrusted":
        write_json_if_changed(memo, seen)
        then = (f"it stays in the store for now; if it is still not trusted on the next run it is moved to "
                f"{quarantine_entry(name)} and the engine is rebuilt here")
    else:
        store.quarantine(name, reason)
        log.warning("engine %s: manifest %s; moved it to %s", key[:12], verdict.describe(), quarantine_entry(name))
        then = f"it was moved to {quarantine_entry(name)}; the next run rebuilds the engine and signs it"
    raise _untrusted_error(ctx, key, verdict, then)


def _untrusted_error(ctx: Context, key: str, verdict: Verdict, then: str) -> UntrustedEngine:
    signed = f"signed by {verdict.signed_by}" if verdict.status == "untrusted" else verdict.describe()
    if verdict.status == "untrusted":
        hint = (f"add {verdict.signed_by} to [signing] trusted in {ctx.fleet.path} if you trust the controller "
                f"that built it (then run again: it is a cache hit), or run again to rebuild it here")
    else:
        hint = ("run again to rebuild it (and find out who wrote to the store: no controller you trust "
                "published this manifest)")
    return UntrustedEngine(f"engine {key[:12]} in {ctx.store.url} is not signed by a trusted key ({signed}); "
                           f"it was not used: {then}", key=key[:12], hint=hint)


def publish_manifest(store, key: str, manifest: dict) -> dict:
    """Create the key's manifest (its blob already published) by a conditional write; returns
    the manifest in force. A lost race adopts the winner's manifest. A winner whose blob is gone
    (quarantined as corrupt) names bytes nobody has any more: it is quarantined, not deleted, with
    its reason, and the create is tried again."""
    name = engine_manifest_entry(key)
    body = json.dumps(manifest, indent=2, sort_keys=True).encode()
    for _ in range(3):
        if store.put_bytes(name, body):
            return manifest
        winner = _read_manifest(store, key)
        if winner is None:
            continue  # unreadable (now quarantined) or gone: create ours
        if _blob_present(store, key, winner):
            return winner
        if winner["sha256"] == manifest["sha256"]:
            return winner  # it names our bytes, which are published now
        store.quarantine(name, {"reason": f"names blob {blob_entry(winner['sha256'])}, which is not in the store",
                                "sha256": winner["sha256"]})
        log.warning("engine %s: manifest named missing bytes %s; moved it to %s", key[:12],
                    winner["sha256"][:12], quarantine_entry(name))
    raise BuildError(f"could not publish the manifest of engine {key[:12]}: other writers keep changing it",
                     key=key[:12], hint="run again")


def engine_profile(manifest: dict) -> dict:
    """What the engine costs on its class, as measured when it was verified on its builder (the
    backend's own numbers: ONNX Runtime's timed runs, trtexec's --exportTimes file or else its
    summary, throughput and execution-context device memory (TensorRT 9+), `latency_source` saying
    which), stored with the engine. Fields a backend does not report are None, never estimated."""
    report = manifest.get("verification") or {}
    latency = report.get("latency_ms") if isinstance(report.get("latency_ms"), dict) else {}
    return {"latency_ms": {"p50": latency.get("median"), "p90": latency.get("p90"), "p99": latency.get("p99")},
            "throughput_qps": report.get("throughput_qps"), "engine_bytes": manifest.get("size"),
            "device_memory_bytes": report.get("device_memory_bytes"), "latency_source": report.get("latency_source"),
            "measured_on": manifest.get("built_on"),
            "measured_at": manifest.get("built_at")}


def _write_record(ctx: Context, spec: EngineSpec, key: str, manifest: dict) -> dict:
    """The local record follows the store's manifest (rewritten when they differ). Build facts
    (seconds, builder, time, the verification's median latency) are copied for `doit report`."""
    record = _engine_record(spec, key, manifest)
    write_json_if_changed(ctx.engine_record(spec.model.engine_name, spec.hwclass.id), record)
    kill_point("engine:record-written")
    return record


def _engine_record(spec: EngineSpec, key: str, manifest: dict) -> dict:
    """An engine's record (what deploy reads) from its manifest, or from a provisional offer (its
    "store_entry" and "provisional" are kept: see ensure_engine)."""
    latency = (manifest.get("verification") or {}).get("latency_ms")
    latency = latency.get("median") if isinstance(latency, dict) else None
    record = {"model": spec.model.name, "class": spec.hwclass.id, "class_digest": spec.hwclass.digest,
              "key": key, "sha256": manifest["sha256"], "size": manifest.get("size"),
              "backend": spec.hwclass.backend, "engine_file": spec.backend.engine_file,
              "build_seconds": manifest.get("build_seconds"), "built_on": manifest.get("built_on"),
              "built_at": manifest.get("built_at"), "latency_ms": latency, "profile": engine_profile(manifest)}
    if spec.model.variant:  # a target's build overrides: the record of that variant (absent otherwise)
        record["variant"] = spec.model.variant
    if manifest.get("provisional"):
        record.update(provisional=True, store_entry=manifest["store_entry"])
    return record


def _build_on(ctx: Context, spec: EngineSpec, target: Target, key: str, inputs: dict, onnx_record: dict,
              say, activity=NULL, refit=None) -> dict:
    """Build on `target` (or, given a kiln.pipeline.refit.RefitPlan, refit its base there), verify,
    publish. `activity` (kiln.progress) is told each phase and the builder's output lines as they arrive."""
    from kiln.pipeline.refit import made_by, send_refit_inputs
    task = f"engine:{spec.task_name}"
    store, backend = ctx.store, spec.backend
    device = Device(ctx.transport(target), target)
    why = f"no engine in the store for ONNX {onnx_record['onnx_sha256'][:12]} on class {spec.hwclass.id}"
    if refit is None:
        say(f"  building engine {key[:12]} for {spec.hwclass.id} on {target.name} ({backend.name})")
        ctx.events.emit(task, "build", key=key, target=target.name, why=why)
    else:
        say(f"  refitting engine {key[:12]} for {spec.hwclass.id} on {target.name} from base {refit.base_key[:12]} "
            f"(same architecture, new weights)")
        ctx.events.emit(task, "build", key=key, target=target.name, refit_base=refit.base_key,
                        why=f"{why}; same architecture as engine {refit.base['engine_key'][:12]}: refit with the new weights")
    start = time.time()

    # ONNX and reference come from the store, verified, so any controller can build
    activity.phase("sending inputs")
    onnx_sha = onnx_record["onnx_sha256"]
    onnx_local, ref_local = _ensure_local_inputs(ctx, onnx_record, ExportPaths.for_model(ctx.artifacts, spec.model.name))
    onnx_remote, ref_remote = send_build_inputs(device, store, onnx_record, onnx_local, ref_local)
    out_dir = device.path(".kiln", "build", key)

    timing_remote = None
    if spec.model.build.get("timing_cache") and backend.name == "tensorrt" and refit is None:
        timing_remote = _fetch_timing_cache(ctx, device, spec, out_dir)
    fingerprint = probe_target(ctx, target).fingerprint or spec.fingerprint

    log_path = ctx.build_log(key)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    early = None  # the engine's staged upload, once offered
    with open(log_path, "w") as build_log:
        def stream(line: str) -> None:
            build_log.write(line + "\n")
            build_log.flush()
            if line.strip():
                say(f"    [{target.name}] {line}")
                activity.note(line)
        try:
            extra = {}
            if refit is None and spec.calibration:
                activity.phase("calibrating")
                extra["calibration_cache"] = ensure_calibration_cache(
                    ctx, spec, device, target, onnx_remote, onnx_sha, out_dir, fingerprint, say, stream)
            elif refit is None and backend.name == "tensorrt" and spec.model.build.get("precision") in INT8_PRECISIONS:
                _check_explicitly_quantized(spec, onnx_local)
            if refit is None:
                activity.phase("building")
                facts = backend.build(device, onnx_remote, out_dir, backend.build_settings(spec.build_inputs),
                                      fingerprint, stream=stream, timing_cache=timing_remote,
                                      external_data=bool(onnx_record.get("external_data")), **extra)
            else:
                activity.phase("refitting")
                base_remote, weights_remote = send_refit_inputs(ctx, device, refit, onnx_local, fingerprint)
                facts = backend.refit(device, base_remote, onnx_remote, weights_remote, out_dir, fingerprint,
                                      stream=stream)
            # uploaded now, offered to this run's other deploys of the class while it is verified
            early = _offer_early(ctx, device, key, facts, target)
            activity.phase("verifying")
            outputs_dir = (ctx.artifacts / "cache" / "outputs" / key
                           if spec.model.verify.get("metric") and backend.name == "tensorrt" else None)
            report = backend.verify(device, facts["engine"], ref_remote, engine_verify(spec.model),
                                    backend.build_settings(spec.model.build), reference_local=ref_local,
                                    **({"keep_outputs": outputs_dir} if outputs_dir else {}))
            if outputs_dir:
                from kiln.pipeline.accuracy import check_metric
                report["metric"] = check_metric(spec, target, outputs_dir, ref_local)
            if spec.model.build.get("verify_on", 1) >= 2:
                activity.phase("checking on a second member")
                from kiln.pipeline.second_check import verify_on_second_member
                report["second_member"] = verify_on_second_member(
                    ctx, spec, device, facts["engine"], facts["sha256"], onnx_record, ref_local, _still_in_class, say)
        except KilnError as exc:
            _withdraw_offer(ctx, key, early)
            build_log.write(f"\nFAILED: {exc}\n")
            hint = f"{exc.hint}; " if exc.hint else ""
            verb = "building" if refit is None else "refitting"
            if refit is not None:  # the full build that follows starts from an empty folder
                device.transport.run(["rm", "-rf", out_dir], check=False)
            raise BuildError(f"{verb} {spec.model.name} for {spec.hwclass.id} on {target.name} failed: {exc.message}",
                             model=spec.model.name, target=target.name, key=key[:12],
                             hint=f"{hint}full build output: {log_path}") from exc
    seconds = time.time() - start

    sha = facts["sha256"]
    kill_point("engine:built")
    activity.phase("publishing")
    how = _publish_engine(ctx, device, facts, key, staged=early)
    kill_point("engine:blob-published")
    manifest = {"key": key, "key_inputs": inputs, "model": spec.model.name, "class": spec.hwclass.id,
                "class_fields": spec.hwclass.fields, "backend": backend.name, "built_on": target.name,
                "sha256": sha, "blob": blob_entry(sha), "size": facts["size"], "tool": facts.get("tool"),
                "build_seconds": round(facts.get("build_seconds", seconds), 3),
                "verification": {k: v for k, v in report.items() if k != "ok"},
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if refit is not None or spec.model.build.get("refit"):
        manifest["made_by"] = made_by(refit)
    # the controller vouches for what it verified: signed before the conditional write
    manifest = controller_trust(ctx).sign(manifest, say=say)
    in_force = publish_manifest(store, key, manifest)
    kill_point("engine:manifest-published")
    if in_force != manifest and not _trusted(ctx, key, in_force, say):  # a racer's: never used unchecked
        device.transport.run(["rm", "-rf", out_dir], check=False)
        raise _untrusted_error(ctx, key, controller_trust(ctx).verdict(in_force),
                               "it was published while this run built the engine; run again to publish ours")
    if in_force["sha256"] != sha:
        # another controller published first: use its engine (ours stays as an orphan blob)
        say(f"  another run published engine {key[:12]} first; using it")
        device.transport.run(["rm", "-rf", out_dir], check=False)
        return in_force
    if timing_remote:
        _publish_timing_cache(ctx, device, spec, timing_remote)
    _keep_verified(ctx, device, facts["engine"], sha, report, out_dir)
    made = "built" if refit is None else f"refitted from base {refit.base_key[:12]}"
    ctx.events.emit(task, "publish", key=key, target=target.name, seconds=seconds,
                    why=f"{made} and verified on {target.name}; {how}")
    say(f"  published engine {key[:12]} ({facts['size'] / 1e6:.1f} MB, {made} in {seconds:.1f} s on {target.name})")
    return in_force


def engine_verify(model: Model) -> dict:
    """The verify settings an engine of `model` is checked with: the model's `verify` table plus the
    precision it is built with and whether its ONNX is Q/DQ-quantized (INT8 engines of either kind
    get the int8 tolerances: kiln.backends.base.engine_tolerances)."""
    return {**model.verify, "engine_precision": model.build.get("precision"),
            "quantized": model.export.get("quantize") == "qdq"}


def _check_explicitly_quantized(spec: EngineSpec, onnx: Path) -> None:
    """An INT8 build without a calibration data set needs Q/DQ nodes in the ONNX: otherwise trtexec
    would use placeholder ranges and the Python API refuses (docs/trtexec.md §10)."""
    import onnx as onnx_lib
    graph = onnx_lib.load(str(onnx), load_external_data=False).graph
    if not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node):
        raise BuildError(f"model {spec.model.name} is built with precision {spec.model.build.get('precision')} but "
                         "has no INT8 calibration data set and its ONNX has no Q/DQ nodes: TensorRT would have no "
                         "scales (trtexec uses placeholder ranges, good for timing only)", model=spec.model.name,
                         hint=f"add [models.{spec.model.name}.calibration] data = \"<folder of .npz/.npy batches>\" "
                              "(or function = \"module:function\"), or export with Q/DQ nodes "
                              "(export.quantize = \"qdq\"), or build fp16")


def _keep_verified(ctx: Context, device: Device, engine: str, sha: str, report: dict, out_dir: str) -> None:
    """Keep the engine just verified on this device in its .kiln/inputs (one command, which also
    removes the build folder): a deploy to this device in this run moves it into the release and
    takes this verification as its smoke test, instead of downloading it again and running the same
    check twice (kiln.pipeline.deploy). One no deploy takes is removed by a later clean-inputs."""
    from kiln.device_side.agent import VERIFIED_SUFFIX
    if posixpath.dirname(engine) != out_dir:  # not the build's own output: leave it where it is
        device.transport.run(["rm", "-rf", out_dir], check=False)
        return
    kept = device.path(".kiln", "inputs", sha + VERIFIED_SUFFIX)
    done = device.transport.run(["sh", "-c", 'mv -f -- "$1" "$2"; rm -rf -- "$3"', "kiln-keep", engine, kept, out_dir],
                                check=False)
    if done.exit_code == 0:
        ctx.verified_here[(device.target, sha)] = {"path": kept, "report": report}


def _offer_early(ctx: Context, device: Device, key: str, facts: dict, target: Target) -> str | None:
    """Upload the built engine to the store's staging (S3, through a presigned URL) and offer it to
    this run's deploys waiting for it (ctx.offer): they stage and smoke-test it while this device
    verifies it, and activate it only once it is published. The staging entry, or None (a store
    that cannot presign, an upload that failed: the engine is published the usual way)."""
    staging = device.upload_to_store(ctx.store, facts["engine"], f"{key}.{device.target}.{ctx.run_id}")
    if staging:
        ctx.offer(("engine", key), {"sha256": facts["sha256"], "size": facts["size"], "built_on": target.name,
                                    "provisional": True, "store_entry": staging})
    return staging


def _withdraw_offer(ctx: Context, key: str, staging: str | None) -> None:
    """The engine failed: no deploy may take it any more, and its staged upload goes."""
    ctx.offer(("engine", key), None)
    if staging:
        try:
            ctx.store.delete(staging)
        except Exception as exc:  # noqa: BLE001 - the build's own error is what the user needs
            log.info("could not delete the staged upload %s: %s", staging, exc)


def _publish_engine(ctx: Context, device: Device, facts: dict, key: str, staged: str | None = None) -> str:
    """Engine bytes from the device into the store as `blob_entry(sha)`, verified against the
    sha256 the device reported. With S3 the device uploads to staging/ through a presigned URL
    (it holds no credentials; `staged`: already uploaded there) and the controller promotes the
    verified bytes into the blob; otherwise the controller fetches the file over the transport
    and publishes it. A blob that already exists holds these very bytes (its name is its digest)."""
    store, sha = ctx.store, facts["sha256"]
    staging = staged or device.upload_to_store(store, facts["engine"], f"{key}.{device.target}.{ctx.run_id}")
    if staging:
        store.promote(staging, blob_entry(sha), sha)
        return "uploaded by the device to staging, promoted after verification"
    local = ctx.engine_cache(key)
    if device.transport.get(facts["engine"], local) != sha:
        local.unlink(missing_ok=True)
        raise BuildError(f"the engine fetched from {device.target} does not match the sha256 it reported",
                         target=device.target, key=key[:12], hint="retry; if it persists check the device's storage")
    store.put_file(blob_entry(sha), local, sha256=sha)
    return "fetched and published by the controller"


def _ensure_local_inputs(ctx: Context, onnx_record: dict, paths: ExportPaths) -> tuple[Path, Path]:
    """The ONNX (graph, and its external data first if it has any) and reference data, from the
    local export if it matches (stat-cached hashes, streamed), else from the store. The graph is
    then checked to name no external data but its own (kiln.onnx_external)."""
    onnx_sha, model = onnx_record["onnx_sha256"], onnx_record.get("model")
    external = ExternalData.from_record(onnx_record, model)
    wanted = [(paths.onnx.parent / external.location, external.sha256, onnx_data_entry(external.sha256))] \
        if external else []
    wanted += [(paths.onnx, onnx_sha, onnx_entry(onnx_sha)),
               (paths.reference, onnx_record["reference_sha256"], reference_entry(onnx_sha))]
    for local, sha, name in wanted:
        if not (local.exists() and ctx.hashes.sha256(local) == sha):
            ctx.store.get_file(name, local, sha256=sha)
    check_graph(paths.onnx, external, model=model)
    return paths.onnx, paths.reference


def send_build_inputs(device: Device, store, onnx_record: dict, local: Path, reference: Path) -> tuple[str, str]:
    """Put the ONNX and the reference data into the device's `.kiln/inputs` (by content, each part
    verified by its sha256; one agent call from a store that presigns): the ONNX's external data
    file first, under the name the graph gives it (`<sha256>.onnx.data`, next to the graph, where
    ONNX Runtime and TensorRT's parser look), then the graph, then the reference. Returns the
    graph's and the reference's paths on the device."""
    onnx_sha = onnx_record["onnx_sha256"]
    external = ExternalData.from_record(onnx_record, onnx_record.get("model"))
    wanted = [(local.parent / external.location, external.sha256, DATA_SUFFIX, onnx_data_entry(external.sha256))] \
        if external is not None else []
    wanted += [(local, onnx_sha, ".onnx", onnx_entry(onnx_sha)),
               (reference, onnx_record["reference_sha256"], ".npz", reference_entry(onnx_sha))]
    *_, onnx_remote, ref_remote = device.ensure_inputs(wanted, store)
    return onnx_remote, ref_remote


def _fetch_timing_cache(ctx: Context, device: Device, spec: EngineSpec, out_dir: str) -> str:
    remote = posixpath.join(out_dir, "timing.cache")
    device.mkdir(out_dir)
    local = ctx.artifacts / "cache" / "timing" / f"{spec.hwclass.digest}.cache"
    try:
        ctx.store.get_file(timing_cache_entry(spec.hwclass.digest), local)
    except (KeyError, CorruptEntry):
        return remote  # trtexec creates it
    device.transport.put(local, remote)
    return remote


def _publish_timing_cache(ctx: Context, device: Device, spec: EngineSpec, remote: str) -> None:
    local = ctx.artifacts / "cache" / "timing" / f"{spec.hwclass.digest}.cache"
    try:
        device.transport.get(remote, local)
    except KilnError:
        return
    ctx.store.put_file(timing_cache_entry(spec.hwclass.digest), local, overwrite=True)
