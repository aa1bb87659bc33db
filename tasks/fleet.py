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
from kiln.pipeline.engines import engine_is_current, engine_spec, ensure_engine
from kiln.pipeline.fingerprints import (fingerprint_is_current, record_fingerprint, recorded_classes,
                                        recorded_fingerprint)

from .common import action, check, say


def _record(ctx: Context, target) -> dict:
    say(f"  {target.name}: {record_fingerprint(ctx, target)}")
    return {"fingerprint": digest(recorded_fingerprint(ctx, target))}


def fingerprint_tasks(ctx: Context):
    yield {"name": None, "doc": "probe every target"}
    for target in ctx.fleet.targets.values():
        yield {"name": target.name, "doc": f"probe {target.name} ({target.transport}, {target.backend})",
               "actions": [action(lambda t=target: _record(ctx, t))],
               "uptodate": [check(lambda t=target: fingerprint_is_current(ctx, t))], "verbosity": 2}


def engine_tasks(ctx: Context):
    yield {"name": None, "doc": "engines for every known hardware class (from the recorded fingerprints)"}
    classes = recorded_classes(ctx)
    served: dict[tuple[str, str], list[str]] = {}
    for target in ctx.fleet.targets.values():
        if target.name in classes:
            for model in target.models:
                served.setdefault((model, classes[target.name].id), []).append(target.name)
    for (model, _), members in sorted(served.items()):
        first = ctx.fleet.targets[members[0]]
        spec = engine_spec(ctx, ctx.fleet.models[model], classes[first.name], recorded_fingerprint(ctx, first))
        yield {"name": spec.task_name, "doc": f"engine for {model} on {spec.hwclass.id}, serves {', '.join(members)}",
               "actions": [action(lambda s=spec: {"key": ensure_engine(ctx, s, say=say)["key"]})],
               "uptodate": [check(lambda s=spec: engine_is_current(ctx, s))],
               "task_dep": [f"export:{model}"], "verbosity": 2}


def deploy_tasks(ctx: Context):
    yield {"name": None, "doc": "deploy every target"}
    for target in ctx.fleet.targets.values():
        yield {"name": target.name, "doc": f"deploy {', '.join(target.models)} to {target.name}",
               "actions": [action(lambda t=target: {"releases": ensure_deployed(ctx, t, say=say)["releases"]})],
               "uptodate": [check(lambda t=target: deploy_is_current(ctx, t))],
               "task_dep": [f"fingerprint:{target.name}"] + [f"export:{m}" for m in target.models],
               "verbosity": 2}
    for group, members in sorted(ctx.fleet.groups().items()):
        yield {"name": group, "doc": f"deploy the group {group}: {', '.join(members)}",
               "actions": None, "task_dep": [f"deploy:{m}" for m in members]}
