"""rollback:<target> and unpin:<target>: manual control of what a device runs.

Neither probes the device first nor builds anything: a rollback during an incident must be
quick. Both take the device's deploy lock (a running deploy finishes first).
"""
from __future__ import annotations

from kiln.pipeline.context import Context
from kiln.pipeline.releases import rollback_target, unpin_target

from .common import action, say

MODEL_PARAM = {"name": "models", "long": "model", "type": list, "default": [],
               "help": "only this model (repeat for several); default: all of the target's models"}


def rollback_tasks(ctx: Context):
    yield {"name": None, "doc": "switch a target back to its previous releases and hold them there"}
    for target in ctx.fleet.targets.values():
        yield {"name": target.name, "doc": f"roll {target.name} back to its previous releases (held until unpin)",
               "actions": [action(lambda models, t=target: rollback_target(ctx, t, models or None, say=say))],
               "params": [MODEL_PARAM], "uptodate": [False], "verbosity": 2}


def unpin_tasks(ctx: Context):
    yield {"name": None, "doc": "end the holds left by rollback"}
    for target in ctx.fleet.targets.values():
        yield {"name": target.name, "doc": f"end {target.name}'s rollback holds; the next deploy activates the wanted engines",
               "actions": [action(lambda models, t=target: unpin_target(ctx, t, models or None, say=say))],
               "params": [MODEL_PARAM], "uptodate": [False], "verbosity": 2}
