"""Which release each model should have active, and manual control over it.

The engine the current inputs want is the default. Two things override it, both read from
the device itself, never from this controller's notes:

* a **pin** in the fleet file (`pin = { "<model>" = "<engine key prefix>" }`): that release,
  which must be on the device (active or previous) or be the wanted engine;
* a **hold**, left by `doit rollback:<target>` in `<install_dir>/<model>/hold.json`: the release
  rolled back to stays active while the wanted engine is the one it was rolled back from; a
  new engine (a retrain, a changed build setting) ends the hold, and so does `doit unpin:<target>`.

`plan_releases` is a pure function of the device's state and the wanted engine keys;
`deploy` acts on it, `status` reports it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from kiln.config import Target
from kiln.devices.workarea import Device, ReleaseState
from kiln.errors import DeployError, KilnError
from kiln.keys import read_json, write_json_if_changed
from kiln.pipeline.context import Context


@dataclass(frozen=True)
class Plan:
    """What a deploy makes active for one model, and why."""
    model: str
    key: str | None            # the release to have active (None: not known yet)
    source: str                # "engine" (the wanted engine) | "pin" | "hold"
    engine_key: str | None     # the engine the current inputs want
    why: str = ""

    @property
    def overridden(self) -> bool:
        return self.source != "engine"


def hold_applies(hold: dict | None, engine_key: str | None) -> bool:
    """A hold lasts while the wanted engine is the one the rollback turned away from."""
    return bool(hold) and (engine_key is None or hold.get("wanted") == engine_key)


def plan_release(target: Target, model: str, engine_key: str | None, state: ReleaseState) -> Plan:
    pin = (target.settings.get("pin") or {}).get(model)
    if pin:
        for key, where in ((state.current, "active"), (state.previous, "previous"), (engine_key, "wanted")):
            if key and key.startswith(pin):
                return Plan(model, key, "pin", engine_key, f"pinned to {pin} in the fleet file ({where} release)")
        have = ", ".join(f"{w} {k[:12]}" for w, k in (("active", state.current), ("previous", state.previous),
                                                      ("wanted", engine_key)) if k) or "no release at all"
        raise DeployError(f"targets.{target.name}.pin: {model} is pinned to {pin!r}, which is neither the active, "
                          f"the previous nor the wanted release on {target.name} ({have})", target=target.name,
                          model=model, hint="pin a key that `doit status` shows for it, or remove the pin")
    if hold_applies(state.hold, engine_key):
        hold = state.hold or {}
        return Plan(model, hold.get("release"), "hold", engine_key,
                    f"rolled back at {hold.get('at', '?')}; held until the wanted engine changes or "
                    f"`doit unpin:{target.name}`")
    return Plan(model, engine_key, "engine", engine_key)


def plan_releases(target: Target, engine_keys: dict[str, str | None],
                  states: dict[str, ReleaseState]) -> dict[str, Plan]:
    return {m: plan_release(target, m, engine_keys.get(m), states.get(m) or ReleaseState(m)) for m in target.models}


def wanted_engine_keys(ctx: Context, target: Target) -> dict[str, str | None]:
    """The engine key each model of `target` should run for its recorded class (None: unknown)."""
    from kiln.pipeline.deploy import target_engines  # deploy builds on this module
    from kiln.pipeline.engines import current_engine_key
    try:
        return {spec.model.name: current_engine_key(ctx, spec) for spec in target_engines(ctx, target)}
    except KilnError:
        return {m: None for m in target.models}


def _models(target: Target, models: list[str] | None) -> list[str]:
    chosen = list(models or target.models)
    unknown = [m for m in chosen if m not in target.models]
    if unknown:
        raise DeployError(f"{target.name} does not run {', '.join(unknown)}", target=target.name,
                          hint=f"its models are: {', '.join(target.models)}")
    return chosen


def _record_active(ctx: Context, target: Target, active: dict[str, str | None]) -> None:
    """This controller's deployment record follows what it just made active on the device."""
    path = ctx.deployment_record(target.name)
    record = read_json(path) or {"target": target.name, "releases": {}, "sha256": {}}
    for model, key in active.items():
        record.setdefault("releases", {})[model] = key
        record.setdefault("sha256", {}).pop(model, None)
    write_json_if_changed(path, record)


def rollback_target(ctx: Context, target: Target, models: list[str] | None = None, say=print) -> dict:
    """Switch the chosen models (default all) to their previous release, atomically per model,
    and hold them there. Then the target's restart and health check run. Returns {model: key}."""
    from kiln.pipeline.deploy import run_hooks
    chosen, task = _models(target, models), f"rollback:{target.name}"
    wanted = wanted_engine_keys(ctx, target)
    device = Device(ctx.transport(target), target)
    done: dict[str, str] = {}
    with device.lock(owner=ctx.run_id):
        states, _ = device.release_states(chosen)
        problems = []
        for m in chosen:
            s = states[m]
            if s.hold:
                problems.append(f"{m} is already rolled back to {str(s.hold.get('release'))[:12]} "
                                f"(run `doit unpin:{target.name}` and deploy to roll forward)")
            elif not s.previous:
                problems.append(f"{m} has no previous release to roll back to"
                                + (f" (active: {s.current[:12]})" if s.current else " (nothing active)"))
        if problems:
            raise DeployError(f"cannot roll back {target.name}: " + "; ".join(problems), target=target.name,
                              hint="nothing was changed")
        for m in chosen:
            s = states[m]
            device.agent("rollback", "--swap", "--model-dir", device.path(m))
            hold = {"release": s.previous, "from": s.current, "wanted": wanted.get(m) or s.current,
                    "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "by": ctx.run_id, "reason": "rollback"}
            device.agent("hold", "--model-dir", device.path(m), stdin=json.dumps(hold) + "\n")
            done[m] = s.previous
            ctx.events.emit(task, "rollback", key=s.previous, target=target.name, action="rollback",
                            why=f"{m}: rolled back by hand from {s.current[:12] if s.current else 'nothing'} to "
                                f"{s.previous[:12]}; held until the wanted engine changes or unpin")
            say(f"  {target.name}: {m} rolled back {s.current[:12] if s.current else '-'} → {s.previous[:12]} (held)")
        _record_active(ctx, target, done)
        run_hooks(device, target, say)
    return {"rolled_back": done}


def unpin_target(ctx: Context, target: Target, models: list[str] | None = None, say=print) -> dict:
    """End the holds of the chosen models (default all): the next deploy activates the wanted engines.
    Pins in the fleet file stay: they are removed by editing it."""
    chosen, task = _models(target, models), f"unpin:{target.name}"
    device = Device(ctx.transport(target), target)
    released = {}
    for m in chosen:
        old = device.agent("unhold", "--model-dir", device.path(m)).get("removed")
        if old:
            released[m] = old.get("release")
            ctx.events.emit(task, "deploy", key=old.get("release"), target=target.name, action="unpin",
                            why=f"{m}: hold on {str(old.get('release'))[:12]} removed by hand")
            say(f"  {target.name}: {m} no longer held at {str(old.get('release'))[:12]}; "
                f"`doit deploy:{target.name}` activates the wanted engine")
        else:
            say(f"  {target.name}: {m} was not held")
        pin = (target.settings.get("pin") or {}).get(m)
        if pin:
            say(f"  {target.name}: {m} stays pinned to {pin} by targets.{target.name}.pin in {ctx.fleet.path}; "
                "remove it there to unpin")
    return {"unheld": released}
