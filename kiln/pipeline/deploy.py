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
import logging
import posixpath
import time

from kiln.backends.base import get_backend
from kiln.config import Target
from kiln.devices.workarea import Device
from kiln.errors import CommandFailed, CorruptEntry, DeployError, KilnError
from kiln.faults import kill_point
from kiln.oserrors import explain_os_errors
from kiln.keys import read_json, write_json_if_changed
from kiln.pipeline.context import Context
from kiln.devices.workarea import ReleaseState
from kiln.pipeline.engines import (EngineReplaced, EngineSpec, confirm_engine, current_engine_key, engine_blob,
                                   engine_spec, engine_verify, ensure_engine)
from kiln.pipeline.export import ExportPaths
from kiln.pipeline.fingerprints import probe_target, recorded_fingerprint, require_class
from kiln.pipeline.busy import wait_until_free
from kiln.pipeline.gates import latency_regression
from kiln.pipeline.releases import plan_releases, wanted_engine_keys
from kiln.stores.base import reference_entry

log = logging.getLogger(__name__)


def target_engines(ctx: Context, target: Target) -> list[EngineSpec]:
    """The engines `target` runs, for its class by its recorded fingerprint (no device contacted)."""
    hw = require_class(ctx, target)
    fingerprint = recorded_fingerprint(ctx, target)
    return [engine_spec(ctx, ctx.fleet.model_for(target, m), hw, fingerprint, deploying=target) for m in target.models]


def device_releases(ctx: Context, target: Target) -> tuple[dict[str, ReleaseState], dict[str, str]]:
    """The device's releases: from this run's probe when it read them, else asked now."""
    releases = probe_target(ctx, target).releases
    if releases is None:  # a local target, or the probe failed: ask the device itself
        releases = Device(ctx.transport(target), target).release_states(target.models)
    return releases


def deploy_is_current(ctx: Context, target: Target) -> bool:
    """Up to date iff the recorded deployment names the releases the target should run now (the
    wanted engines, or a pinned or held release), the device has exactly those active, and no
    model that left the target's list is still active there."""
    wanted = wanted_engine_keys(ctx, target)
    if None in wanted.values():
        return False
    try:
        states, others = device_releases(ctx, target)
        plans = plan_releases(target, wanted, states)
    except KilnError:
        return False
    keys = {m: p.key for m, p in plans.items()}
    deployed = read_json(ctx.deployment_record(target.name)) or {}
    if deployed.get("releases") != keys or others:
        return False
    if any(states[m].current != key for m, key in keys.items()):
        return False
    # a hold the wanted engine has outgrown is ended by the deploy that activates it
    if any(states[m].hold and plans[m].source != "hold" for m in keys):
        return False
    held = [f"{m} ({p.why})" for m, p in plans.items() if p.overridden]
    ctx.events.emit(f"deploy:{target.name}", "skip", target=target.name,
                    why="the wanted releases are active" + (f"; kept by hand: {'; '.join(held)}" if held else ""))
    return True


@explain_os_errors
def ensure_deployed(ctx: Context, target: Target, say=print, max_latency_regression: float | None = None) -> dict:
    """Engines for the target's class (from the store, else built on one builder of the class),
    then staged, verified and activated on the target. Needs its fingerprint recorded. A model
    pinned in the fleet file or held by a rollback keeps that release (kiln.pipeline.releases)."""
    specs = target_engines(ctx, target)
    states, _ = device_releases(ctx, target)
    plans = plan_releases(target, {s.model.name: current_engine_key(ctx, s) for s in specs}, states)
    device = Device(ctx.transport(target), target)
    engines, confirms = {}, {}
    for spec in specs:
        plan = plans[spec.model.name]
        if plan.overridden:
            say(f"  {target.name}: {plan.model} stays on {plan.key[:12]}: {plan.why}")
            engines[plan.model] = {"key": plan.key, "sha256": None, "kept": plan.source}
            continue
        # while another task builds the engine, its reference data goes onto this device; the
        # engine itself is staged and smoke-tested here while its builder verifies it
        record = ensure_engine(ctx, spec, say=say, provisional_for=target.name,
                               while_waiting=lambda m=plan.model: _reference_on_device(ctx, device, m))
        engines[plan.model] = record
        if record.get("provisional"):
            confirms[plan.model] = lambda staged, spec=spec: confirm_engine(ctx, spec, staged, say=say)
    result = deploy_target(ctx, target, engines, say=say, max_latency_regression=max_latency_regression,
                           confirms=confirms)
    if not result["changed"] and not result.get("pending"):
        say(f"  {target.name}: releases already active")
    return result


def deploy_target(ctx: Context, target: Target, engines: dict[str, dict], say=print,
                  max_latency_regression: float | None = None, confirms: dict | None = None) -> dict:
    """Make `engines` (model -> engine record) the active releases on `target`. With
    `max_latency_regression` (a rollout), a new release slower than the one it replaces on this
    device fails before anything is switched (kiln.pipeline.gates). `confirms`: model ->
    confirm(record) for a provisional record (kiln.pipeline.engines.ensure_engine): its engine is
    staged and smoke-tested, then committed only with the verified record confirm returns."""
    confirms = dict(confirms or {})
    task = f"deploy:{target.name}"
    device = Device(ctx.transport(target), target)
    start = time.time()
    with device.lock(owner=f"{ctx.run_id}") as held:
        kill_point("deploy:locked")
        states, leftover = device.release_states(target.models)  # under the lock: what is really there
        active = {m: s.current for m, s in states.items()}
        todo = {m: rec for m, rec in engines.items() if active.get(m) != rec["key"]}
        # a release still on the device (a pinned or held one, or the one a rollback turned away
        # from) was verified when it was staged: it is switched back without a new upload
        on_device = {m for m, rec in todo.items() if rec.get("kept") or states[m].previous == rec["key"]}
        ended_holds = [m for m, s in states.items() if s.hold and not engines.get(m, {}).get("kept")]
        # active but never confirmed by this controller (a run killed between activation and its
        # health check, or another controller's deploy): checked again below, as if just switched
        confirmed = (read_json(ctx.deployment_record(target.name)) or {}).get("releases", {})
        unconfirmed = [m for m, rec in engines.items() if m not in todo and confirmed.get(m) != rec["key"]]
        for model in sorted(set(engines) - set(todo)):
            ctx.events.emit(task, "skip", key=engines[model]["key"], target=target.name,
                            why=f"{model} release {engines[model]['key'][:12]} already active")
        staged = {}
        for model, record in todo.items():
            if model in on_device:
                staged[model] = {"smoke": {}}  # its smoke test ran when it was staged
                continue
            staged[model] = _stage(ctx, device, target, model, record, say, confirms.pop(model, None))
            engines[model] = todo[model] = staged[model]["record"]   # the verified one, if it was provisional
        for model, confirm in confirms.items():  # not staged here (already on the device): wait for it
            engines[model] = _confirmed(engines[model], confirm)
            if model in todo:
                todo[model] = engines[model]
        kill_point("deploy:staged")
        if max_latency_regression is not None:
            _latency_gate(ctx, target, states, staged, max_latency_regression)
        busy = wait_until_free(ctx, target, device, say) if (todo or leftover) else None
        if busy:  # pending, not failed: the new releases wait on the device, the old ones serve
            ctx.events.emit(task, "skip", target=target.name, action="busy",
                            why=f"{target.name} is busy ({busy}); nothing switched, the next run tries again")
            say(f"  {target.name}: PENDING, still busy after {target.busy_timeout:g} s ({busy}); "
                "nothing was switched, the next run tries again")
            return {"target": target.name, "releases": confirmed, "changed": [], "pending": busy,
                    "seconds": time.time() - start}
        for model, key in sorted(leftover.items()):  # it left the target's list: nothing active
            todo[model] = {"key": None, "deactivated": key}
        # nothing to run between the switch and the clean-up (no restart, health check or release
        # to check again): both in one agent call, the lock's release last
        then = [] if (unconfirmed or target.restart or target.health_check) else \
            _finish_steps(device, target, engines, ended_holds, held)
        try:
            switched, finished = _switch(device, todo, then)
        except _SwitchFailed as failed:  # all models switch, or none
            exc = failed.cause
            states = _roll_back(ctx, device, target, failed.switched, todo, why=f"activation failed: {exc.message}")
            raise DeployError(f"activation failed on {target.name}: {exc.message}; {_summary(states)}",
                              target=target.name, hint=exc.hint) from exc
        kill_point("deploy:activated")
        if unconfirmed:
            previous = device.transport.read_links([device.path(m, "previous") for m in unconfirmed])
            for model, link in zip(unconfirmed, previous.values()):
                switched[model] = posixpath.basename(link) if link else None
            say(f"  {target.name}: {', '.join(unconfirmed)} active but not confirmed by this controller: "
                "restart and health check again")
        if switched:
            _after_activation(ctx, device, target, switched, {**todo, **{m: engines[m] for m in unconfirmed}}, say)
        kill_point("deploy:checked")
        removed = _finish(device, target, engines, ended_holds, say, held, finished if then else None)
        for model in ended_holds:  # the wanted engine changed since the rollback (or it was unpinned)
            ctx.events.emit(task, "deploy", key=engines[model]["key"], target=target.name, action="hold-ended",
                            why=f"{model}: the wanted engine changed since the rollback; the hold ends")
        if removed:
            say(f"  {target.name}: removed {len(removed)} unused input(s) from {device.path('.kiln', 'inputs')}")
    seconds = time.time() - start
    for model, record in todo.items():
        if record.get("deactivated"):
            ctx.events.emit(task, "deploy", key=record["deactivated"], target=target.name, action="deactivate",
                            why=f"{model} is no longer in targets.{target.name}.models: release "
                                f"{record['deactivated'][:12]} deactivated (kept on the device as previous)")
            say(f"  {target.name}: deactivated {model} (no longer in its models; release "
                f"{record['deactivated'][:12]} kept as previous)")
            continue
        why = (f"{model}: {active.get(model)[:12]} → {record['key'][:12]}" if active.get(model)
               else f"{model}: first release {record['key'][:12]}")
        if record.get("kept"):
            why += f" ({record['kept']})"
        ctx.events.emit(task, "deploy", key=record["key"], target=target.name, why=why, seconds=seconds)
        median = (staged[model]["smoke"].get("latency_ms") or {}).get("median")
        say(f"  {target.name}: activated {model} release {record['key'][:12]}"
            + (f" (smoke test median {median:.1f} ms)" if isinstance(median, (int, float)) else ""))
    deployment = {"target": target.name, "releases": {m: r["key"] for m, r in engines.items()},
                  "sha256": {m: r["sha256"] for m, r in engines.items() if r.get("sha256")}}
    write_json_if_changed(ctx.deployment_record(target.name), deployment)
    return {**deployment, "changed": sorted(todo), "seconds": seconds}


class _SwitchFailed(Exception):
    """The switch failed part-way: `switched` says which models it switched (to roll back)."""

    def __init__(self, cause: KilnError, switched: dict[str, str | None]) -> None:
        super().__init__(cause.message)
        self.cause, self.switched = cause, switched


def _switch(device: Device, todo: dict[str, dict], then: list) -> tuple[dict[str, str | None], list]:
    """Activate the release of every model in `todo` (deactivate one whose record says
    "deactivated"), then run the agent steps `then`, all in one agent call. Returns (model -> the
    release it had active before, the answers to `then`, fewer if they stopped). A failure raises
    _SwitchFailed naming what was switched: read from the device when the answer was lost."""
    switch = [(m, ("deactivate", "--model-dir", device.path(m)) if r.get("deactivated") else
               ("activate", "--model-dir", device.path(m), "--release", r["key"])) for m, r in todo.items()]
    try:
        answers = device.agent_batch([(step, None) for _, step in switch] + list(then))
    except KilnError as exc:  # a switch may have happened before the answer was lost
        raise _SwitchFailed(exc, _switched_now(device, todo)) from exc
    done = [a for a in answers[:len(switch)] if a.get("ok", True)]  # the batch stops at a failed step
    switched = {m: (todo[m]["deactivated"] if todo[m].get("deactivated") else answer.get("previous"))
                for (m, _), answer in zip(switch, done)}
    if len(done) < len(switch):
        model, step = switch[len(done)]
        reason = answers[len(done)].get("reason") if len(answers) > len(done) else "no answer"
        raise _SwitchFailed(DeployError(f"`{step[0]}` of {model} failed: {reason}", target=device.target), switched)
    return switched, answers[len(switch):]


def _switched_now(device: Device, todo: dict[str, dict]) -> dict[str, str | None]:
    """Which models of `todo` the device has switched (asked after an answer was lost), and the
    release each had before: its `previous` link (or the deactivated one)."""
    active = {m: _active_now(device, m) for m in todo}
    switched: dict[str, str | None] = {}
    for model, record in todo.items():
        if record.get("deactivated"):
            if active[model] is None:
                switched[model] = record["deactivated"]
        elif active[model] == record["key"]:
            link = next(iter(device.transport.read_links([device.path(model, "previous")]).values()))
            switched[model] = posixpath.basename(link) if link else None
    return switched


def _finish_steps(device: Device, target: Target, engines: dict, ended_holds: list[str], held=None) -> list:
    """The clean-up's agent steps: end outgrown holds, prune old releases (and `.staging-*`
    folders of dead runs), clean unused inputs, release the deploy lock (`held`)."""
    holds = [("unhold", "--model-dir", device.path(m)) for m in ended_holds]
    prunes = [("prune", "--model-dir", device.path(m), "--keep", r["key"]) for m, r in engines.items()]
    clean = ("clean-inputs", "--install-dir", device.root, *target.models)
    return [(step, None) for step in [*holds, *prunes, clean]] + ([held.release_step()] if held else [])


def _finish(device: Device, target: Target, engines: dict, ended_holds: list[str], say, held=None,
            answers: list | None = None) -> list[str]:
    """After activation: the clean-up (`_finish_steps`) in one agent call, unless `answers` are
    those of a call that ran them already (with the switch). Returns the inputs removed. If the
    steps did not all run, they run one by one: a hold or prune that fails fails the deploy,
    cleaning only says so (and the lock is released as usual)."""
    steps = _finish_steps(device, target, engines, ended_holds, held)
    if answers is None:
        try:
            answers = device.agent_batch(steps)
        except KilnError:
            answers = []
    if len(answers) == len(steps):
        if held:
            held.released_by(answers[-1])
            answers = answers[:-1]
        return answers[-1].get("removed", [])
    for step, _ in steps[:len(ended_holds) + len(engines)]:
        device.agent(*step)
    try:
        return device.clean_inputs(target.models)
    except KilnError as exc:  # the releases are active and healthy: cleaning is not worth failing for
        say(f"  {target.name}: could not clean {device.path('.kiln', 'inputs')}: {exc.message}")
        return []


def _latency_gate(ctx: Context, target: Target, states: dict, staged: dict, limit: float) -> None:
    slow = {m: why for m, result in staged.items()
            if (why := latency_regression((states[m].manifest.get("smoke_test") or {}).get("latency_ms"),
                                          (result.get("smoke") or {}).get("latency_ms"), limit))}
    if slow:
        for model, why in slow.items():
            ctx.events.emit(f"deploy:{target.name}", "fail", target=target.name, action="latency-gate",
                            why=f"{model}: {why}")
        raise DeployError(f"latency gate on {target.name}: " + "; ".join(f"{m}: {w}" for m, w in slow.items())
                          + "; nothing was switched, the previous releases serve", target=target.name,
                          hint="find why the new engine is slower (precision, shapes, a busy device), or raise "
                               "the group's rollout.max_latency_regression")


def _confirmed(record: dict, confirm) -> dict:
    """The verified record of a provisional one (its build's error if its verification failed)."""
    try:
        return confirm(record)
    except EngineReplaced as exc:   # nothing of it was staged: the published one is used as it is
        return exc.record


def _stage(ctx: Context, device: Device, target: Target, model: str, record: dict, say, confirm=None) -> dict:
    """Upload and smoke-test one release; nothing becomes active here. Every write and delete
    on the device goes through the agent (inside install_dir, never through a link out of it).
    A provisional record (`confirm` given) is staged and smoke-tested from the store's staging,
    then committed only once `confirm` returns its verified record; if the published engine is
    other bytes, that one is staged instead. Returns {"smoke", "manifest", "record"}."""
    try:
        return _stage_one(ctx, device, target, model, record, say, confirm)
    except EngineReplaced as exc:
        say(f"  {target.name}: engine {record['key'][:12]} was published as other bytes; staging those")
        return _stage_one(ctx, device, target, model, exc.record, say, None)


def _stage_one(ctx: Context, device: Device, target: Target, model: str, record: dict, say, confirm) -> dict:
    key, backend = record["key"], get_backend(record["backend"])
    releases = device.path(model, "releases")
    staging = f"{releases}/.staging-{key}"
    paths = ExportPaths.for_model(ctx.artifacts, model)
    onnx = read_json(paths.record) or {}
    provenance = read_json(paths.provenance) or {}
    ref_remote = _reference_on_device(ctx, device, model)
    say(f"  {target.name}: staging {model} release {key[:12]}"
        + (f" while {record.get('built_on')} verifies it" if confirm is not None else ""))
    t0 = time.time()
    committed = _stage_verified(ctx, device, target, model, record, staging, ref_remote, onnx, provenance)
    if committed is not None:
        return committed
    filled = _stage_from_store(ctx, device, model, record, staging, ref_remote, onnx)
    if confirm is not None and not filled:   # not from its staged upload: wait for the published engine
        record, confirm = confirm(record), None
    # stage-begin refuses a releases folder that leads out of install_dir
    begun = {} if filled else device.stage_begin(model, key)
    try:
        return _fill_staging(ctx, device, target, model, record, backend, staging, begun, ref_remote,
                             onnx, provenance, t0, filled, confirm)
    except BaseException:
        device.remove(staging, check=False)
        raise


def _reference_on_device(ctx: Context, device: Device, model: str) -> str:
    """The model's reference data (its export's inputs and outputs) in the device's .kiln/inputs,
    verified by its sha256; its path there."""
    paths = ExportPaths.for_model(ctx.artifacts, model)
    onnx = read_json(paths.record) or {}
    return device.ensure_input(paths.reference, onnx["reference_sha256"], ".npz", store=ctx.store,
                               entry=reference_entry(onnx["onnx_sha256"]))


def _stage_verified(ctx: Context, device: Device, target: Target, model: str, record: dict, staging: str,
                    ref_remote: str, onnx: dict, provenance: dict) -> dict | None:
    """The engine this run built and verified on this device (`_take_verified`) staged with the
    reference and committed, by one agent call: its verification is this release's smoke test.
    The staged release ({"smoke", "manifest", "record"}), or None if there is no such engine or
    that call failed (then the usual steps, from a fresh staging folder)."""
    kept = ctx.verified_here.get((device.target, record["sha256"]))
    if kept is None or device.is_local:
        return None
    smoke = _smoke_from_build(kept)
    # staged with its commit in the call below; its smoke test is the build's verification
    manifest = _release_manifest(ctx, target, model, record, onnx, provenance, ref_remote, smoke,
                                 {"stage_seconds": None, "smoke_seconds": 0.0})
    steps = [(("stage-begin", "--model-dir", device.path(model), "--release", record["key"]), None),
             (("copy", "--src", kept["path"], "--dst", f"{staging}/{record['engine_file']}", "--sha256",
               record["sha256"], "--move"), None),
             (("copy", "--src", ref_remote, "--dst", f"{staging}/reference.npz", "--sha256", onnx["reference_sha256"]),
              None), *_commit_steps(device, model, staging, manifest)]
    try:
        answers = device.agent_batch(steps)
    except KilnError as exc:
        log.info("%s: staging the engine it verified in one call failed (%s); step by step", device.target, exc.message)
        return None
    if len(answers) != len(steps):
        return None
    ctx.verified_here.pop((device.target, record["sha256"]), None)
    return {"smoke": smoke, "manifest": manifest, "record": record}


def _stage_from_store(ctx: Context, device: Device, model: str, record: dict, staging: str, ref_remote: str,
                      onnx: dict) -> bool:
    """A fresh staging folder with the engine downloaded from the store (presigned URL, on stdin)
    and the reference copied in, by one agent call. False if this needs the usual steps (an engine
    verified here by this run's build, a store that cannot presign, a local target) or that call
    failed (the usual steps then start over and report what is wrong)."""
    if (device.target, record["sha256"]) in ctx.verified_here or device.is_local \
            or not hasattr(ctx.store, "presign_get"):
        return False
    blob, sha = engine_blob(ctx, record)
    try:
        answers = device.agent_batch([
            (("stage-begin", "--model-dir", device.path(model), "--release", record["key"]), None),
            (("fetch", "--out", f"{staging}/{record['engine_file']}", "--sha256", sha), ctx.store.presign_get(blob) + "\n"),
            (("copy", "--src", ref_remote, "--dst", f"{staging}/reference.npz", "--sha256", onnx["reference_sha256"]),
             None)])
    except KilnError as exc:
        log.info("%s: staging in one call failed (%s); step by step", device.target, exc.message)
        return False
    return len(answers) == 3


def _fill_staging(ctx: Context, device: Device, target: Target, model: str, record: dict, backend,
                  staging: str, begun: dict, ref_remote: str, onnx: dict, provenance: dict, t0: float,
                  filled: bool = False, confirm=None) -> dict:
    """Engine and reference into the staging folder (unless `filled` already), smoke test, manifest,
    commit (of a provisional record: after `confirm` returned its verified record)."""
    key = record["key"]
    reference = ExportPaths.for_model(ctx.artifacts, model).reference
    ref_bytes = reference.stat().st_size if reference.exists() else 0
    engine_remote = f"{staging}/{record['engine_file']}"
    blob, _ = engine_blob(ctx, record)  # the bytes by their own sha256, as the manifest names them
    verified = None if filled else _take_verified(ctx, device, record, engine_remote)
    if not filled and verified is None and not device.fetch_from_store(ctx.store, blob, engine_remote,
                                                                       record["sha256"]):
        local = ctx.engine_cache(key)
        if not (local.exists() and ctx.hashes.sha256(local) == record["sha256"]):
            try:
                ctx.store.get_file(blob, local, sha256=record["sha256"])
            except (KeyError, CorruptEntry) as exc:
                # forget the engine so the next run's engine task rebuilds and republishes it
                variant = record.get("variant")
                ctx.engine_record(f"{model}~{variant}" if variant else model, record["class"]).unlink(missing_ok=True)
                why = "corrupt" if isinstance(exc, CorruptEntry) else "missing"
                ctx.events.emit(f"deploy:{target.name}", "fail", key=key, target=target.name,
                                why=f"engine {key[:12]} is {why} in the store")
                raise DeployError(f"engine {key[:12]} for {model} is {why} in the store {ctx.store.url}; "
                                  "the previous release stays active", target=target.name, model=model,
                                  hint="run again: the engine will be rebuilt and republished") from exc
        device.check_space(local.stat().st_size + ref_bytes, begun.get("free_bytes"), staging)
        device.transport.put(local, engine_remote, sha256=record["sha256"])
    if not filled:
        device.copy(ref_remote, f"{staging}/reference.npz", onnx["reference_sha256"])
    staged_s = time.time() - t0
    t0 = time.time()
    try:
        model_run = ctx.fleet.model_for(target, model)   # with the target's build overrides
        smoke = verified if verified is not None else backend.verify(
            device, engine_remote, f"{staging}/reference.npz", engine_verify(model_run),
            backend.build_settings(model_run.build), reference_local=_same_reference(ctx, reference, onnx))
    except KilnError as exc:
        ctx.events.emit(f"deploy:{target.name}", "fail", key=key, target=target.name,
                        why=f"smoke test of {model} failed: {exc.message}")
        raise DeployError(f"smoke test of {model} release {key[:12]} failed on {target.name}; "
                          f"the previous release stays active: {exc.message}", target=target.name, model=model,
                          hint="see the reason above; the engine in the store may be bad for this device") from exc
    if confirm is not None:
        record = confirm(record)   # raises if its builder's verification failed: nothing is committed
    manifest = _release_manifest(ctx, target, model, record, onnx, provenance, ref_remote, smoke,
                                 {"stage_seconds": round(staged_s, 3), "smoke_seconds": round(time.time() - t0, 3)})
    # written and committed by one agent call: the release folder appears complete or not at all
    device.agent_batch(_commit_steps(device, model, staging, manifest))
    return {"smoke": smoke, "manifest": manifest, "record": record}


def _release_manifest(ctx: Context, target: Target, model: str, record: dict, onnx: dict, provenance: dict,
                      ref_remote: str, smoke: dict, timings: dict) -> dict:
    """What a release folder's manifest.json says: the engine, where it came from, its smoke test."""
    return {"model": model, "target": target.name, "engine_key": record["key"], "engine_sha256": record["sha256"],
            "engine_file": record["engine_file"], "hardware_class": record["class"],
            "onnx_sha256": onnx.get("onnx_sha256"),
            # the .kiln/inputs files this release came from: kept while it is current or previous
            "inputs": [posixpath.basename(ref_remote)] + ([f"{onnx['onnx_sha256']}.onnx"] if onnx.get("onnx_sha256") else [])
            + ([onnx["external_data"]["location"]] if isinstance(onnx.get("external_data"), dict) else []),
            "checkpoint_sha256": (provenance.get("inputs") or {}).get("checkpoint_sha256"),
            "fingerprint": read_json(ctx.fingerprint_file(target.name)),
            "timings": timings, "smoke_test": smoke, "deployed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "run": ctx.run_id}


def _commit_steps(device: Device, model: str, staging: str, manifest: dict) -> list:
    """The agent steps that write a staged release's manifest and commit it (`releases/<key>`)."""
    return [(("write", "--path", f"{staging}/manifest.json"), json.dumps(manifest, indent=2, sort_keys=True)),
            (("stage-commit", "--model-dir", device.path(model), "--release", manifest["engine_key"]), None)]


def _same_reference(ctx: Context, local, onnx: dict):
    """The controller's reference file if it holds the bytes staged on the device, else None."""
    if local.exists() and ctx.hashes.sha256(local) == onnx.get("reference_sha256"):
        return local
    return None


def _take_verified(ctx: Context, device: Device, record: dict, engine_remote: str) -> dict | None:
    """The engine this run built and verified on this very device (kiln.pipeline.engines
    `_keep_verified`), moved into the staging folder after checking its sha256: its verification
    (the same backend check on the same reference data) is this release's smoke test. None if there
    is no such engine or it is gone or changed (then it is fetched and smoke-tested as usual)."""
    kept = ctx.verified_here.pop((device.target, record["sha256"]), None)
    if kept is None:
        return None
    try:
        device.copy(kept["path"], engine_remote, record["sha256"], move=True)
    except KilnError as exc:
        log.warning("%s: the engine its build verified is gone or changed (%s); fetching it from the store",
                    device.target, exc.message)
        return None
    return _smoke_from_build(kept)


def _smoke_from_build(kept: dict) -> dict:
    """A release's smoke test when it is the engine its build verified on this very device."""
    return {**{k: v for k, v in kept["report"].items() if k != "second_member"}, "verified_by": "build"}


def _after_activation(ctx: Context, device: Device, target: Target, switched: dict[str, str | None],
                      todo: dict[str, dict], say) -> None:
    """Restart and health-check; on any failure (a command failing or timing out, the connection
    dropping) put every switched model back, then restart and health-check the previous releases."""
    what = "restart"
    try:
        for what in ("restart", "health_check"):
            _run_hook(device, target, what, say)
    except KilnError as exc:
        label = what.replace("_", " ")
        if isinstance(exc, CommandFailed):
            cause, detail = f" (exit {exc.exit_code})", (
                f"command: {exc.command}; exit code {exc.exit_code}; output: {exc.output_tail[-500:]}")
        else:
            cause, detail = f": {exc.message}", exc.hint
        states = _roll_back(ctx, device, target, switched, todo, why=f"{label} failed{cause}")
        after = _recheck_previous(device, target, states, say)
        raise DeployError(f"{label} failed on {target.name}{cause}; {_summary(states)}{after}", target=target.name,
                          hint=detail) from exc


def run_hooks(device: Device, target: Target, say) -> None:
    """The target's restart, then its health check (each only if set)."""
    for what in ("restart", "health_check"):
        _run_hook(device, target, what, say)


def _run_hook(device: Device, target: Target, what: str, say) -> None:
    command = getattr(target, what)
    if command:
        say(f"  {target.name}: {what.replace('_', ' ')}: {command}")
        device.transport.run(["sh", "-c", command], env=None, timeout=target.command_timeout)


def _recheck_previous(device: Device, target: Target, states: dict[str, str], say) -> str:
    """After a rollback: restart and health-check again, so the previous releases really serve."""
    if not states or not any(s.startswith("rolled back") for s in states.values()):
        return ""
    what = "restart"
    try:
        for what in ("restart", "health_check"):
            _run_hook(device, target, what, say)
    except KilnError as exc:
        return f"; after the rollback the {what.replace('_', ' ')} failed too: {exc.message}"
    return "; the previous releases were restarted and pass the health check" if target.health_check else (
        "; the previous releases were restarted" if target.restart else "")


def _roll_back(ctx: Context, device: Device, target: Target, switched: dict[str, str | None],
               todo: dict[str, dict], why: str) -> dict[str, str]:
    """Put every switched model back, one by one (a failure for one does not stop the others);
    returns each model's state: "rolled back to <key>", "still on new <key>" or "unknown: <why>"."""
    states: dict[str, str] = {}
    for model, previous in switched.items():
        back = previous[:12] if previous else "nothing"
        try:
            device.agent("rollback", "--model-dir", device.path(model))
            states[model] = f"rolled back to {back}"
            ctx.events.emit(f"deploy:{target.name}", "rollback", target=target.name, key=previous,
                            why=f"{why}; {model} back to {back}")
        except KilnError as exc:
            active = _active_now(device, model)
            new = todo[model]["key"]
            if active == previous:
                states[model] = f"rolled back to {back}"
            elif active == new:
                states[model] = f"still on new {(new or 'nothing')[:12]} (rollback failed: {exc.message})"
            else:
                states[model] = f"unknown (rollback failed: {exc.message})"
            ctx.events.emit(f"deploy:{target.name}", "rollback", target=target.name, key=previous,
                            why=f"{why}; {model}: {states[model]}")
    return states


def _active_now(device: Device, model: str) -> str | None:
    try:
        return device.active_releases([model]).get(model)
    except KilnError:
        return "?"


def _summary(states: dict[str, str]) -> str:
    if all(s.startswith("rolled back") for s in states.values()):
        return "rolled back to the previous releases" + (
            f" ({', '.join(f'{m}: {s}' for m, s in sorted(states.items()))})" if states else "")
    return "ROLLBACK INCOMPLETE: " + "; ".join(f"{m}: {s}" for m, s in sorted(states.items()))
