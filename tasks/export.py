"""checkpoint:<model> (demo models only) and export:<model>."""
from __future__ import annotations

from kiln.pipeline.context import Context
from kiln.pipeline.export import create_checkpoint, ensure_export, export_is_current

from .common import action, say, step


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
    yield from (_export_task(ctx, model) for model in ctx.fleet.models.values())


def _export_task(ctx: Context, model) -> dict:
    after = [f"checkpoint:{model.name}"] if model.seed is not None else []
    return step(model.name, f"export {model.name} to ONNX",
                lambda: {"onnx_sha256": ensure_export(ctx, model, say=say)["onnx_sha256"]},
                lambda: export_is_current(ctx, model), after)
