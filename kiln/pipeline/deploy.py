"""Deploy: stage, verify, activate atomically, health-check, roll back on failure.

For each model of the target, the engine is fetched from the store (verified),
uploaded into `releases/.staging-<key>` (verified on the device), moved to
`releases/<key>`, and smoke-tested there (load + infer on the reference inputs).
Only when every model passed are the `current` links switched (atomic renames);
then the optional restart and health check run, and a failure switches the
links back. At every moment each model has a complete release active, or none
if it never had one.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from kiln.backends.base import get_backend
from kiln.config import Target
from kiln.devices.workarea import Device
from kiln.errors import CommandFailed, CorruptEntry, DeployError, KilnError
from kiln.keys import read_json, write_json_if_changed
from kiln.pipeline.context import Context
from kiln.pipeline.engines import EngineSpec, current_engine_key, engine_spec, ensure_engine
from kiln.pipeline.export import ExportPaths
from kiln.pipeline.fingerprints import probe_target, recorded_fingerprint, require_class
from kiln.stores.base import engine_entry, reference_entry


def target_engines(ctx: Context, target: Target) -> list[EngineSpec]:
    """The engines `target` runs, for its class by its recorded fingerprint (no device contacted)."""
    hw = require_class(ctx, target)
    fingerprint = recorded_fingerprint(ctx, target)
    return [engine_spec(ctx, ctx.fleet.models[m], hw, fingerprint, deploying=target) for m in target.models]


def deploy_is_current(ctx: Context, target: Target) -> bool:
    """Up to date iff the recorded deployment names the engines the target should run now,
    and the device agrees (its active releases are read with its probe, on one connection)."""
    try:
        wanted = {spec.model.name: current_engine_key(ctx, spec) for spec in target_engines(ctx, target)}
    except KilnError:
        return False
    deployed = read_json(ctx.deployment_record(target.name)) or {}
    if None in wanted.values() or deployed.get("releases") != wanted:
        return False
    active = probe_target(ctx, target).active
    if active is None:  # a local target, or the probe failed: ask the device itself
        try:
            active = Device(ctx.transport(target), target).active_releases(target.models)
        except KilnError:
            return False
    if active != wanted:
        return False
    ctx.events.emit(f"deploy:{target.name}", "skip", target=target.name, why="the wanted releases are active")
    return True


def ensure_deployed(ctx: Context, target: Target, say=print) -> dict:
    """Engines for the target's class (from the store, else built on one builder of the class),
    then staged, verified and activated on the target. Needs its fingerprint recorded."""
    engines = {spec.model.name: ensure_engine(ctx, spec, say=say) for spec in target_engines(ctx, target)}
    result = deploy_target(ctx, target, engines, say=say)
    if not result["changed"]:
        say(f"  {target.name}: releases already active")
    return result


def deploy_target(ctx: Context, target: Target, engines: dict[str, dict], say=print) -> dict:
    """Make `engines` (model -> engine record) the active releases on `target`."""
    task = f"deploy:{target.name}"
    device = Device(ctx.transport(target), target)
    start = time.time()
    with device.lock(owner=f"{ctx.run_id}"):
        active = device.active_releases(target.models)
        todo = {m: rec for m, rec in engines.items() if active.get(m) != rec["key"]}
        for model in sorted(set(engines) - set(todo)):
            ctx.events.emit(task, "skip", key=engines[model]["key"], target=target.name,
                            why=f"{model} release {engines[model]['key'][:12]} already active")
        staged = {}
        for model, record in todo.items():
            staged[model] = _stage(ctx, device, target, model, record, say)
        switched: dict[str, str | None] = {}
        try:
            for model, record in todo.items():
                result = device.agent("activate", "--model-dir", device.path(model), "--release", record["key"])
                switched[model] = result.get("previous")
        except KilnError as exc:  # all models switch, or none
            _roll_back(ctx, device, target, switched, why=f"activation failed: {exc.message}")
            raise DeployError(f"activation failed on {target.name}; rolled back to the previous releases",
                              target=target.name, hint=exc.hint) from exc
        if switched:
            _after_activation(ctx, device, target, switched, say)
        for model, record in engines.items():
            device.agent("prune", "--model-dir", device.path(model), "--keep", record["key"])
    seconds = time.time() - start
    for model, record in todo.items():
        why = (f"{model}: {active.get(model)[:12]} → {record['key'][:12]}" if active.get(model)
               else f"{model}: first release {record['key'][:12]}")
        ctx.events.emit(task, "deploy", key=record["key"], target=target.name, why=why, seconds=seconds)
        say(f"  {target.name}: activated {model} release {record['key'][:12]}"
            f" (smoke test median {staged[model]['smoke'].get('latency_ms', {}).get('median', float('nan')):.1f} ms)")
    deployment = {"target": target.name, "releases": {m: r["key"] for m, r in engines.items()},
                  "sha256": {m: r["sha256"] for m, r in engines.items()}}
    write_json_if_changed(ctx.deployment_record(target.name), deployment)
    return {**deployment, "changed": sorted(todo), "seconds": seconds}


def _stage(ctx: Context, device: Device, target: Target, model: str, record: dict, say) -> dict:
    """Upload and smoke-test one release; nothing becomes active here."""
    key, backend = record["key"], get_backend(record["backend"])
    releases = device.path(model, "releases")
    final = f"{releases}/{key}"
    staging = f"{releases}/.staging-{key}"
    paths = ExportPaths.for_model(ctx.artifacts, model)
    onnx = read_json(paths.record) or {}
    provenance = read_json(paths.provenance) or {}
    ref_remote = device.ensure_input(paths.reference, onnx["reference_sha256"], ".npz", store=ctx.store,
                                     entry=reference_entry(onnx["onnx_sha256"]))
    say(f"  {target.name}: staging {model} release {key[:12]}")
    t0 = time.time()
    device.transport.run(["rm", "-rf", staging])
    device.mkdir(staging)
    engine_remote = f"{staging}/{record['engine_file']}"
    if not device.fetch_from_store(ctx.store, engine_entry(key), engine_remote, record["sha256"]):
        local = ctx.engine_cache(key)
        if not (local.exists() and ctx.hashes.sha256(local) == record["sha256"]):
            try:
                ctx.store.get_file(engine_entry(key), local, sha256=record["sha256"])
            except (KeyError, CorruptEntry) as exc:
                # forget the engine so the next run's engine task rebuilds and republishes it
                ctx.engine_record(model, record["class"]).unlink(missing_ok=True)
                device.transport.run(["rm", "-rf", staging], check=False)
                why = "corrupt" if isinstance(exc, CorruptEntry) else "missing"
                ctx.events.emit(f"deploy:{target.name}", "fail", key=key, target=target.name,
                                why=f"engine {key[:12]} is {why} in the store")
                raise DeployError(f"engine {key[:12]} for {model} is {why} in the store {ctx.store.url}; "
                                  "the previous release stays active", target=target.name, model=model,
                                  hint="run again: the engine will be rebuilt and republished") from exc
        device.transport.put(local, engine_remote, sha256=record["sha256"])
    device.transport.run(["cp", ref_remote, f"{staging}/reference.npz"])
    staged_s = time.time() - t0
    t0 = time.time()
    try:
        smoke = backend.verify(device, engine_remote, f"{staging}/reference.npz", ctx.fleet.models[model].verify)
    except KilnError as exc:
        device.transport.run(["rm", "-rf", staging], check=False)
        ctx.events.emit(f"deploy:{target.name}", "fail", key=key, target=target.name,
                        why=f"smoke test of {model} failed: {exc.message}")
        raise DeployError(f"smoke test of {model} release {key[:12]} failed on {target.name}; "
                          f"the previous release stays active: {exc.message}", target=target.name, model=model,
                          hint="see the reason above; the engine in the store may be bad for this device") from exc
    manifest = {"model": model, "target": target.name, "engine_key": key, "engine_sha256": record["sha256"],
                "engine_file": record["engine_file"], "hardware_class": record["class"],
                "onnx_sha256": onnx.get("onnx_sha256"),
                "checkpoint_sha256": (provenance.get("inputs") or {}).get("checkpoint_sha256"),
                "fingerprint": read_json(ctx.fingerprint_file(target.name)),
                "timings": {"stage_seconds": round(staged_s, 3), "smoke_seconds": round(time.time() - t0, 3)},
                "smoke_test": smoke, "deployed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run": ctx.run_id}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    try:
        device.transport.put(f.name, f"{staging}/manifest.json")
    finally:
        Path(f.name).unlink()
    # the release folder appears complete or not at all
    device.transport.run(["sh", "-c", 'rm -rf "$1" && mv "$2" "$1"', "kiln-mv", final, staging])
    return {"smoke": smoke, "manifest": manifest}


def _after_activation(ctx: Context, device: Device, target: Target, switched: dict[str, str | None], say) -> None:
    """Restart and health-check; on failure put every switched model back."""
    try:
        for what in ("restart", "health_check"):
            command = getattr(target, what)
            if command:
                say(f"  {target.name}: {what.replace('_', ' ')}: {command}")
                device.transport.run(["sh", "-c", command], env=None, timeout=target.command_timeout)
    except CommandFailed as exc:
        _roll_back(ctx, device, target, switched, why=f"{what.replace('_', ' ')} failed (exit {exc.exit_code})")
        raise DeployError(f"{what.replace('_', ' ')} failed on {target.name}; rolled back to the previous releases",
                          target=target.name, hint=f"command: {exc.command}; exit code {exc.exit_code}; "
                                                   f"output: {exc.output_tail[-500:]}") from exc


def _roll_back(ctx: Context, device: Device, target: Target, switched: dict[str, str | None], why: str) -> None:
    for model, previous in switched.items():
        device.agent("rollback", "--model-dir", device.path(model))
        ctx.events.emit(f"deploy:{target.name}", "rollback", target=target.name, key=previous,
                        why=f"{why}; {model} back to {previous[:12] if previous else 'nothing'}")
