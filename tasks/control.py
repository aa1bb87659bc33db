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
    yield from _per_target(ctx, rollback_target, "roll {} back to its previous releases (held until unpin)")


def unpin_tasks(ctx: Context):
    yield {"name": None, "doc": "end the holds left by rollback"}
    yield from _per_target(ctx, unpin_target, "end {}'s rollback holds; the next deploy activates the wanted engines")


def _per_target(ctx: Context, control, doc: str):
    """One task per target running `control(ctx, target, models, say)`; always runs, never probes."""
    for target in ctx.fleet.targets.values():
        yield {"name": target.name, "doc": doc.format(target.name),
               "actions": [action(lambda models, t=target: control(ctx, t, models or None, say=say))],
               "params": [MODEL_PARAM], "uptodate": [False], "verbosity": 2}
