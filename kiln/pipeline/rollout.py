"""Rollouts: a group deployed in waves, canaries first, each wave gated on the one before.

`[groups.<g>] rollout = { canary = 1, waves = ["10%", "50%", "100%"], max_fail_percentage = 10,
soak_seconds = 0, max_latency_regression = 0.1 }`. The canaries (the group's first members in
fleet-file order) deploy first; every later wave starts only when the devices so far passed:

* the smoke test (outputs against the PyTorch reference: the accuracy gate) and the latency gate
  (kiln.pipeline.gates, checked before anything is switched on that device);
* the restart and health check after the switch (a failure there rolls that device back);
* after `soak_seconds`, the health check again.

A failed canary stops the rollout: canaries that did switch are rolled back and held (like
`doit rollback:<t>`: until the wanted engine changes or `doit unpin:<t>`), no other device is
touched. A wave whose failures push the share of failed devices over `max_fail_percentage`
stops the remaining waves. Devices in one wave deploy in parallel.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from kiln.config import Target
from kiln.devices.workarea import Device
from kiln.errors import DeployError, KilnError
from kiln.pipeline.context import MAX_PARALLEL, Context


def plan_waves(members: list[str], policy: dict) -> list[list[str]]:
    """[canaries, wave 1, ...]: each wave adds the devices up to its cumulative share of the group."""
    n, canary = len(members), min(policy["canary"], len(members))
    waves, done = ([members[:canary]] if canary else []), canary
    for share in policy["waves"]:
        upto = max(done + 1, math.ceil(n * int(share[:-1]) / 100)) if done < n else n
        upto = min(upto, n)
        if upto > done:
            waves.append(members[done:upto])
            done = upto
    return waves


@dataclass
class RolloutResult:
    group: str
    waves: list[list[str]]
    deployed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    rolled_back: list[str] = field(default_factory=list)
    untouched: list[str] = field(default_factory=list)
    stopped: str | None = None


def roll_out(ctx: Context, group: str, members: list[Target], policy: dict, say=print) -> RolloutResult:
    from kiln.pipeline.deploy import ensure_deployed
    from kiln.pipeline.releases import rollback_target

    task = f"deploy:{group}"
    by_name = {t.name: t for t in members}
    waves = plan_waves([t.name for t in members], policy)
    result = RolloutResult(group, waves)
    switched: dict[str, list[str]] = {}

    def deploy_one(name: str) -> tuple[str, str | None]:
        try:
            done = ensure_deployed(ctx, by_name[name], say=say, max_latency_regression=policy["max_latency_regression"])
        except KilnError as exc:
            return name, exc.message
        if done.get("pending"):
            return name, f"busy: {done['pending']}"
        switched[name] = list(done.get("changed") or [])
        return name, None

    tried = 0
    for i, wave in enumerate(waves):
        label = "canary" if i == 0 and policy["canary"] else f"wave {i + (0 if policy['canary'] else 1)}"
        say(f"  {group}: {label}: {', '.join(wave)}")
        with ThreadPoolExecutor(min(len(wave), MAX_PARALLEL), thread_name_prefix="kiln-rollout") as pool:
            outcomes = list(pool.map(deploy_one, wave))
        if policy["soak_seconds"] and not any(why for _, why in outcomes):
            say(f"  {group}: soaking {policy['soak_seconds']:g} s, then checking the {label} again")
            time.sleep(policy["soak_seconds"])
            outcomes = [(name, _recheck(ctx, by_name[name])) for name, _ in outcomes]
            for name in [n for n, why in outcomes if why and switched.get(n)]:
                rollback_target(ctx, by_name[name], switched.pop(name), say=say)
                result.rolled_back.append(name)
        tried += len(wave)
        for name, why in outcomes:
            if why:
                result.failed[name] = why
            else:
                result.deployed.append(name)
        later = [n for w in waves[i + 1:] for n in w]
        failed_here = [n for n, why in outcomes if why]
        if label == "canary" and failed_here:
            result.stopped = f"canary {', '.join(failed_here)} failed: " + "; ".join(result.failed[n] for n in failed_here)
            for name in [n for n, why in outcomes if not why and switched.get(n)]:
                rollback_target(ctx, by_name[name], switched[name], say=say)
                result.rolled_back.append(name)
                result.deployed.remove(name)
            result.untouched = later
            break
        share = 100.0 * len(result.failed) / tried
        if result.failed and share > policy["max_fail_percentage"]:
            result.stopped = (f"{len(result.failed)} of {tried} devices failed ({share:.0f}%, more than "
                              f"max_fail_percentage = {policy['max_fail_percentage']:g}%)")
            result.untouched = later
            break
    why = (f"rollout stopped: {result.stopped}; rolled back: {', '.join(result.rolled_back) or 'none'}; "
           f"not touched: {', '.join(result.untouched) or 'none'}") if result.stopped else \
        f"rollout done in {len(waves)} wave(s); failed: {', '.join(result.failed) or 'none'}"
    ctx.events.emit(task, "rollback" if result.rolled_back else "deploy", target=",".join(t.name for t in members),
                    action="rollout", why=why)
    say(f"  {group}: {why}")
    return result


def _recheck(ctx: Context, target: Target) -> str | None:
    """After the soak: the health check again (not the restart)."""
    if not target.health_check:
        return None
    try:
        device = Device(ctx.transport(target), target)
        device.transport.run(["sh", "-c", target.health_check], env=None, timeout=target.command_timeout)
    except KilnError as exc:
        return f"health check after the soak failed: {exc.message}"
    return None


def rollout_error(result: RolloutResult) -> DeployError | None:
    """The task's failure, if the rollout stopped or a device failed."""
    if result.stopped:
        return DeployError(f"rollout of {result.group} stopped: {result.stopped}; rolled back: "
                           f"{', '.join(result.rolled_back) or 'none'}; not touched: {', '.join(result.untouched) or 'none'}",
                           hint="see the reasons above; fix and run again (held canaries: `doit unpin:<t>` or a new engine)")
    if result.failed:
        return DeployError(f"rollout of {result.group}: {len(result.failed)} device(s) failed: "
                           + "; ".join(f"{n}: {w}" for n, w in result.failed.items()))
    return None
