"""checkpoint:<model> (demo models only) and export:<model>."""
from __future__ import annotations

from kiln.config import Model
from kiln.errors import ExportError, KilnError
from kiln.pipeline.export import ExportPaths, create_checkpoint, export_inputs, export_model
from kiln.keys import digest, read_json
from kiln.stores.base import onnx_entry, onnx_record_entry, reference_entry

from .common import CTX, action, say


class ExportCheck:
    """Up to date iff the export key (checkpoint hash, factory source, options,
    versions) equals the one recorded by the last export and its files exist."""

    def __init__(self, model: Model) -> None:
        self.model = model

    def __call__(self, task, values) -> bool:
        paths = ExportPaths.for_model(CTX.artifacts, self.model.name)
        provenance = read_json(paths.provenance)
        if provenance is None or not (paths.onnx.exists() and paths.reference.exists() and paths.record.exists()):
            return False
        try:
            key = digest(export_inputs(self.model, CTX.hashes))
        except ExportError:
            return False  # the action reports it properly
        if key == provenance["export_key"]:
            CTX.events.emit(f"export:{self.model.name}", "skip", key=key,
                            why="checkpoint, factory source, export options and versions unchanged")
            return True
        return False


def _export(model: Model) -> dict:
    store = CTX.store  # a missing bucket or bad credentials fail here, before minutes of export
    paths = ExportPaths.for_model(CTX.artifacts, model.name)
    inputs = export_inputs(model, CTX.hashes)
    before = read_json(paths.provenance) or {}
    why = _why_export(before.get("inputs"), inputs)
    say(f"  exporting {model.name} ({why})")
    result = export_model(model, paths, inputs)
    try:
        store.put_file(onnx_entry(result["onnx_sha256"]), paths.onnx, sha256=result["onnx_sha256"])
        store.put_file(reference_entry(result["onnx_sha256"]), paths.reference, sha256=result["reference_sha256"])
        store.put_file(onnx_record_entry(model.name), paths.record, overwrite=True)
    except KilnError:
        # not published: forget the export so the next run is not "up to date" and publishes it
        paths.provenance.unlink(missing_ok=True)
        raise
    outcome = "new ONNX" if result["changed"] else "same ONNX bytes as before: nothing downstream rebuilds"
    CTX.events.emit(f"export:{model.name}", "export", key=result["onnx_sha256"], seconds=result["seconds"],
                    why=f"{why}; {outcome}")
    diff = max(result["max_abs_diff"].values())
    say(f"  {model.name}: ONNX {result['onnx_sha256'][:12]} ({result['onnx_size'] / 1e6:.1f} MB, opset {result['opset']}), "
        f"ONNX Runtime vs PyTorch max abs diff {diff:.2e}, {result['seconds']:.1f} s; {outcome}")
    return {"onnx_sha256": result["onnx_sha256"]}


def _why_export(old: dict | None, new: dict) -> str:
    if not old:
        return "first export"
    changed = [k for k in sorted(new) if old.get(k) != new.get(k)]
    names = {"checkpoint_sha256": "checkpoint changed", "factory_source_sha256": "factory source changed"}
    return ", ".join(names.get(k, f"{k} changed") for k in changed) or "outputs missing"


def task_checkpoint():
    """Create demo checkpoints (models with `seed`) when they are missing."""
    for model in CTX.fleet.models.values():
        if model.seed is None:
            continue
        yield {"name": model.name, "doc": f"create {model.checkpoint.name} from a fixed seed if missing",
               "actions": [action(lambda m=model: say(f"  created {create_checkpoint(m)}"))],
               "uptodate": [lambda task, values, p=model.checkpoint: p.exists()],
               "targets": [str(model.checkpoint)], "verbosity": 2}


def task_export():
    """PyTorch checkpoint -> checked ONNX + reference outputs, published to the store."""
    yield {"name": None, "doc": "export every model to ONNX"}
    for model in CTX.fleet.models.values():
        yield {"name": model.name, "doc": f"export {model.name} to ONNX",
               "actions": [action(lambda m=model: _export(m))],
               "uptodate": [ExportCheck(model)],
               "task_dep": [f"checkpoint:{model.name}"] if model.seed is not None else [],
               "verbosity": 2}
