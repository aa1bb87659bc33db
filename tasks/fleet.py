"""fingerprint:<target>, engine:<model>@<class> and deploy:<target|group>.

Every fingerprint and deploy task exists from the fleet file alone, so doit rejects
an unknown name and `info`/`forget` work on all of them. `deploy:<t>` depends on
`fingerprint:<t>` only: it contacts `<t>`, plus one builder of its class when the
store misses its engine. Engine tasks come from the recorded fingerprints (the
classes known so far); a deploy ensures its own engines through the same function,
so a class first seen in this run needs no second run.
"""
from __future__ import annotations

from kiln.keys import digest
from kiln.pipeline.context import Context
from kiln.pipeline.deploy import deploy_is_current, ensure_deployed
from kiln.pipeline.rollout import roll_out, rollout_error
from kiln.pipeline.engines import engine_is_current, engine_spec, ensure_engine
from kiln.pipeline.fingerprints import (fingerprint_is_current, record_fingerprint, recorded_classes,
                                        recorded_fingerprint)

from .common import say, step


def _record(ctx: Context, target) -> dict:
    say(f"  {target.name}: {record_fingerprint(ctx, target)}")
    return {"fingerprint": digest(recorded_fingerprint(ctx, target))}


def fingerprint_tasks(ctx: Context):
    yield {"name": None, "doc": "probe every target"}
    yield from (_fingerprint_task(ctx, target) for target in ctx.fleet.targets.values())


def _fingerprint_task(ctx: Context, target) -> dict:
    return step(target.name, f"probe {target.name} ({target.transport}, {target.backend})",
                lambda: _record(ctx, target), lambda: fingerprint_is_current(ctx, target))


def engine_tasks(ctx: Context):
    yield {"name": None, "doc": "engines for every known hardware class (from the recorded fingerprints)"}
    classes = recorded_classes(ctx)
    served: dict[tuple[str, str], list[str]] = {}   # (model or model~variant, class) -> targets
    models = {}
    for target in ctx.fleet.targets.values():
        if target.name in classes:
            for name in target.models:
                model = ctx.fleet.model_for(target, name)  # with the target's build overrides
                models[model.engine_name] = model
                served.setdefault((model.engine_name, classes[target.name].id), []).append(target.name)
    for (engine_name, _), members in sorted(served.items()):
        first = ctx.fleet.targets[members[0]]
        spec = engine_spec(ctx, models[engine_name], classes[first.name], recorded_fingerprint(ctx, first))
        yield _engine_task(ctx, spec, members)


def _engine_task(ctx: Context, spec, members: list[str]) -> dict:
    serves = ", ".join(members) if len(members) <= 8 else f"{', '.join(members[:6])} and {len(members) - 6} more"
    return step(spec.task_name, f"engine for {spec.model.name} on {spec.hwclass.id}, serves {serves}",
                lambda: {"key": ensure_engine(ctx, spec, say=say)["key"]},
                lambda: engine_is_current(ctx, spec), [f"export:{spec.model.name}"])


def deploy_tasks(ctx: Context):
    yield {"name": None, "doc": "deploy every target"}
    yield from (_deploy_task(ctx, target) for target in ctx.fleet.targets.values())
    for group, members in sorted(ctx.fleet.groups().items()):
        if group in ctx.fleet.rollouts:
            yield _rollout_task(ctx, group, [ctx.fleet.targets[m] for m in members])
            continue
        yield {"name": group, "doc": f"deploy the group {group}: {', '.join(members)}",
               "actions": None, "task_dep": [f"deploy:{m}" for m in members]}


def _deploy_task(ctx: Context, target) -> dict:
    return step(target.name, f"deploy {', '.join(target.models)} to {target.name}",
                lambda: _deploy_unless_rolled_out(ctx, target),
                lambda: deploy_is_current(ctx, target),
                _exports_first(ctx, target.models) + [f"fingerprint:{target.name}"])


def _exports_first(ctx: Context, models) -> list[str]:
    """The exports (and a demo model's checkpoint, the export's own dependency) before the probes:
    doit checks up-to-date-ness in the main thread one task at a time, in about this order, so the
    export starts on its own thread before the checks wait for the devices' probes (it needs none)."""
    first = [f"checkpoint:{m}" for m in models if ctx.fleet.models[m].seed is not None]
    return first + [f"export:{m}" for m in models]


def _deploy_unless_rolled_out(ctx: Context, target) -> dict:
    """A member of a group whose rollout runs in this run (`doit deploy`, `doit deploy:<g>`) is
    deployed by that rollout, in its wave; named alone (`doit deploy:<t>`) it deploys at once."""
    rollouts = [g for g in target.groups if g in ctx.fleet.rollouts and f"deploy:{g}" in ctx.selected]
    if rollouts:
        say(f"  {target.name}: deployed by the rollout of deploy:{rollouts[0]}")
        return {"deployed_by": f"deploy:{rollouts[0]}"}
    return {"releases": ensure_deployed(ctx, target, say=say)["releases"]}


def _rollout_task(ctx: Context, group: str, members: list) -> dict:
    def run():
        error = rollout_error(roll_out(ctx, group, members, ctx.fleet.rollouts[group], say=say))
        if error:
            raise error
        return {}
    models = sorted({m for t in members for m in t.models})
    task = step(group, f"roll out to the group {group} in waves: {', '.join(t.name for t in members)}", run,
                lambda: all(deploy_is_current(ctx, t) for t in members),
                _exports_first(ctx, models) + [f"fingerprint:{t.name}" for t in members])
    return task
