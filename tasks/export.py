"""checkpoint:<model> (demo models only) and export:<model>."""
from __future__ import annotations

from kiln.pipeline.context import Context
from kiln.pipeline.export import create_checkpoint, ensure_export, export_is_current

from .common import action, check, say


def checkpoint_tasks(ctx: Context):
    for model in ctx.fleet.models.values():
        if model.seed is None:
            continue
        yield {"name": model.name, "doc": f"create {model.checkpoint.name} from a fixed seed if missing",
               "actions": [action(lambda m=model: say(f"  created {create_checkpoint(m)}"))],
               "uptodate": [lambda task, values, p=model.checkpoint: p.exists()],
               "targets": [str(model.checkpoint)], "verbosity": 2}


def export_tasks(ctx: Context):
    yield {"name": None, "doc": "export every model to ONNX"}
    for model in ctx.fleet.models.values():
        yield {"name": model.name, "doc": f"export {model.name} to ONNX",
               "actions": [action(lambda m=model: {"onnx_sha256": ensure_export(ctx, m, say=say)["onnx_sha256"]})],
               "uptodate": [check(lambda m=model: export_is_current(ctx, m))],
               "task_dep": [f"checkpoint:{model.name}"] if model.seed is not None else [],
               "verbosity": 2}
