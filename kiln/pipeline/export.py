"""PyTorch checkpoint -> ONNX, with the checks that make the ONNX trustworthy.

`export_key` says whether an export is needed without importing torch: it hashes
the checkpoint (stat-cached), the factory's source file, every module of the model's
code and the versions of the packages it imports as recorded by the last export
(kiln.model_code, stat-cached too), the export options and the torch/onnx versions. `export_model` does the work: load the checkpoint safely,
export a single deterministic ONNX file, run onnx.checker, check the opset is the
one asked for, save fixed reference inputs with PyTorch's outputs, and check ONNX
Runtime against them.

Factories are found next to the fleet file, then in its python_path, then on Python's
path (kiln.factories); checkpoints are read without running code from them, as a
state_dict, a training checkpoint holding one, or safetensors (kiln.checkpoints).
"""
from __future__ import annotations

import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kiln.calibration import dataset_digest, quantize_qdq
from kiln.config import ENGINE_ONLY_VERIFY_KEYS, Model
from kiln.errors import ExportError
from kiln.factories import factory_imports, find_factory_source, import_factory
from kiln.files import atomic_file, move_into_place
from kiln.keys import HashCache, digest, read_json, sha256_file
from kiln.onnx_external import DATA_SUFFIX, ExternalData, check_graph, needs_packing, pack_external_data
from kiln.onnx_weights import architecture_sha256
from kiln.model_code import code_key, describe_change, record_model_code, watch_imports
from kiln.devices.local_probe import package_version
from kiln.faults import kill_point
from kiln.oserrors import Place, explain_os_errors, machine_error, translated
from kiln.progress import NULL

log = logging.getLogger(__name__)
EXPORT_FORMAT = 1  # bump when this module changes what it writes
REFERENCE_SEED = 20240229


@dataclass(frozen=True)
class ExportPaths:
    onnx: Path
    reference: Path
    record: Path       # what downstream depends on: rewritten only when the ONNX changes
    provenance: Path   # what produced it: checkpoint hash, export key, timings

    def data(self, record: dict | None) -> Path | None:
        """The external data file next to the graph that `record` names, or None (a single file)."""
        external = ExternalData.from_record(record or {})
        return self.onnx.parent / external.location if external else None

    @classmethod
    def for_model(cls, artifacts: Path, model: str) -> "ExportPaths":
        base = artifacts / "onnx"
        return cls(base / f"{model}.onnx", base / f"{model}.reference.npz", base / f"{model}.json",
                   base / f"{model}.provenance.json")


def factory_source(model: Model) -> Path:
    """The source file of the model's factory module, found without importing anything:
    next to the fleet file, in its python_path, then on Python's path (kiln.factories)."""
    return find_factory_source(model.factory, model.factory_path, model.name)


def export_inputs(model: Model, hashes: HashCache, provenance: dict | None = None) -> dict:
    """Everything that determines the exported ONNX. Its digest is the export key.

    `provenance` is the last export's (ExportPaths.provenance): the model code it recorded
    (modules, packages) is hashed again by name through the stat cache; none before a first export."""
    if not model.checkpoint.exists():
        raise ExportError(f"checkpoint {model.checkpoint} does not exist", model=model.name,
                          hint="train/copy the checkpoint there, or fix `checkpoint` in the fleet file")
    return {
        "format": EXPORT_FORMAT,
        "checkpoint_sha256": hashes.sha256(model.checkpoint),
        "factory": model.factory,
        "factory_source_sha256": hashes.sha256(factory_source(model)),
        "code": code_key((provenance or {}).get("code"), model.factory_path, hashes),
        "inputs": {k: list(v) for k, v in model.inputs.items()},
        **({"shapes": _shapes_json(model)} if model.shapes else {}),  # static models: key as before
        "outputs": list(model.outputs),
        "export": _export_options_key(model.export),
        # the engine-only gate (int8 tolerances, metric) is no export input: changing it re-exports nothing
        "verify": {k: v for k, v in model.verify.items() if k not in ENGINE_ONLY_VERIFY_KEYS or _quantized(model)},
        # a Q/DQ export takes its scales from the calibration data: new data, new ONNX
        **({"calibration": dataset_digest(model, hashes)} if _quantized(model) else {}),
        "torch": package_version("torch"),
        "onnx": package_version("onnx"),
        "onnxruntime": package_version("onnxruntime"),
    }


def _quantized(model: Model) -> bool:
    return model.export.get("quantize") == "qdq"


def _export_options_key(export: dict) -> dict:
    """The export options in the key. `external_data = "auto"` (the default) writes exactly what
    enginekiln wrote before the option existed, so it is left out: existing keys stay as they were."""
    return {k: v for k, v in export.items() if not (k == "external_data" and v == "auto")
            and not (k == "quantize" and v is None)}   # no Q/DQ asked: the key as before the option


def export_key(model: Model, hashes: HashCache, provenance: dict | None = None) -> str:
    return digest(export_inputs(model, hashes, provenance))


def build_module(model: Model):
    """Call the model's factory (imports torch and the factory's module), with the fleet file's
    folder and python_path first on sys.path while it is imported and called."""
    with factory_imports(model.factory_path):
        factory = import_factory(model.factory, model.factory_path, model.name)
        try:
            return factory()
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"factory {model.factory} raised {type(exc).__name__}: {exc}", model=model.name,
                              hint="fix the factory; it must return a torch.nn.Module") from exc


def create_checkpoint(model: Model) -> Path:
    """Demo/test models: make the checkpoint from the factory under a fixed seed (a safetensors
    file if its name ends in .safetensors, else a torch state_dict)."""
    import torch
    torch.manual_seed(model.seed or 0)
    module = build_module(model)
    place = Place(model.checkpoint.parent, f"the checkpoint folder of model {model.name}",
                  f"set checkpoint of [models.{model.name}] to a file in a writable folder")
    with translated(path=model.checkpoint, places=[place]):
        if model.checkpoint.suffix == ".safetensors":
            from safetensors.torch import save
            data = save({k: v.contiguous() for k, v in module.state_dict().items()})
            with atomic_file(model.checkpoint) as f:
                f.write(data)
        else:
            with atomic_file(model.checkpoint) as f:
                torch.save(module.state_dict(), f)
    return model.checkpoint


def load_module(model: Model, activity=NULL):
    import torch
    activity.phase("building model")
    module = build_module(model)
    activity.phase("loading checkpoint")
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"factory {model.factory} returned {type(module).__name__}, not a torch.nn.Module",
                          model=model.name, hint="return the model instance from the factory")
    from kiln.checkpoints import fit_state_dict, read_state_dict
    state = read_state_dict(model.checkpoint, model=model.name)  # no code from the file is run
    state, prefix = fit_state_dict(state, set(module.state_dict()), path=model.checkpoint, model=model.name)
    if prefix:
        log.info("%s: checkpoint keys carry the prefix %r (a LightningModule attribute, DataParallel...): removed",
                 model.name, prefix)
    try:
        module.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"checkpoint {model.checkpoint.name} does not fit the factory's model: {exc}",
                          model=model.name, hint="the checkpoint and the factory must describe the same architecture") from exc
    return module.eval()


def _shapes_json(model: Model) -> dict:
    return {k: {p: list(v[p]) for p in ("min", "opt", "max")} for k, v in sorted(model.shapes.items())}


def reference_inputs(model: Model, point: str | None = None) -> dict:
    """Fixed inputs: the same for every export of this model, independent of global RNG state.
    `point` (min/opt/max of a dynamic model): the inputs at that point of the declared ranges."""
    import numpy as np
    rng = np.random.default_rng(REFERENCE_SEED if point is None else
                                [REFERENCE_SEED, ("min", "opt", "max").index(point)])
    return {name: rng.random(shape, dtype=np.float32) for name, shape in model.input_shapes(point).items()}


def dynamic_axes(model: Model) -> dict[str, dict[int, str]]:
    """torch.onnx.export's dynamic_axes: each axis whose min and max differ, named <input>_<axis>."""
    return {name: {i: f"{name}_{i}" for i, (lo, hi) in enumerate(zip(r["min"], r["max"])) if lo != hi}
            for name, r in model.shapes.items()}


def reference_arrays(points: dict) -> dict:
    """The reference .npz's arrays: `input.<name>`/`output.<name>` for a static model (one point,
    key None), `point.<p>.input.<name>`/`point.<p>.output.<name>` for each of min/opt/max of a
    dynamic one (kiln/device_side/agent.py `reference_points` reads both)."""
    out = {}
    for point, (feeds, expected) in points.items():
        prefix = "" if point is None else f"point.{point}."
        out.update({f"{prefix}input.{k}": v for k, v in feeds.items()})
        out.update({f"{prefix}output.{k}": v for k, v in expected.items()})
    return out


def _record_shapes(path: Path, model: Model) -> None:
    """Write the declared ranges into the ONNX's metadata, so the ONNX (and with it the reference
    entry and every engine key) changes when a range does, though the graph's symbolic axes do not."""
    import json

    import onnx
    proto = onnx.load(str(path), load_external_data=False)  # the graph only: weights stay where they are
    entry = proto.metadata_props.add()
    entry.key, entry.value = "kiln.input_shapes", json.dumps(_shapes_json(model), sort_keys=True)
    onnx.save(proto, str(path))


@contextmanager
def _quiet_exporter():
    """Tracer and deprecation chatter is expected here; real problems raise."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _strip_locations(path: Path) -> None:
    """The dynamo exporter records source paths and line numbers in metadata_props;
    without this the ONNX hash would change when the checkout moves."""
    import onnx
    proto = onnx.load(str(path), load_external_data=False)  # the graph only: weights stay where they are
    graphs = [proto.graph]
    while graphs:
        g = graphs.pop()
        for item in [*g.node, *g.input, *g.output, *g.value_info, *g.initializer]:
            del item.metadata_props[:]
        for node in g.node:
            graphs.extend(a.g for a in node.attribute if a.HasField("g"))
            graphs.extend(sub for a in node.attribute for sub in a.graphs)
    onnx.save(proto, str(path))


def _torch_export(module, feeds: dict, model: Model, path: Path) -> None:
    import torch
    args = tuple(torch.from_numpy(feeds[name]) for name in model.inputs)
    opts = model.export
    if model.shapes and opts["exporter"] == "dynamo":  # kiln.config refuses it; a Model made in code too
        raise ExportError("the dynamo exporter is not supported with dynamic input shapes", model=model.name,
                          hint='use exporter = "torchscript" or static input shapes')
    with _quiet_exporter():
        if opts["exporter"] == "dynamo":
            torch.onnx.export(module, args, str(path), input_names=list(model.inputs),
                              output_names=list(model.outputs), opset_version=opts["opset"], dynamo=True,
                              external_data=False, verbose=False)
            _strip_locations(path)
        else:
            torch.onnx.export(module, args, str(path), input_names=list(model.inputs),
                              output_names=list(model.outputs), opset_version=opts["opset"], dynamo=False,
                              do_constant_folding=True, dynamic_axes=dynamic_axes(model) or None)
    if model.shapes:
        _record_shapes(path, model)


def _external_data_layout(tmp: Path, graph: Path, model: Model, activity=NULL) -> tuple[Path, ExternalData | None]:
    """The exported graph in enginekiln's layout: as it is when it holds its weights, else (the
    exporter wrote weights outside it: a model over 2 GB) or with `external_data = true`, one graph
    plus one data file named by its sha256 (kiln.onnx_external). Returns (graph, data or None)."""
    option = model.export.get("external_data", "auto")
    outside = needs_packing(tmp, graph.name)
    if outside and option is False:
        raise ExportError("the model's weights do not fit in one ONNX file (over 2 GB): the exporter wrote them "
                          "as external data, and export.external_data = false forbids it", model=model.name,
                          hint='set external_data = "auto" (or true) in [models.%s.export]' % model.name)
    if not outside and option is not True:
        return graph, None
    activity.phase("writing external data")
    packed, external = pack_external_data(graph, tmp / "packed", model=model.name)
    check_graph(packed, external, model=model.name)
    return packed, external


def _remove_unused_data_files(folder: Path) -> None:
    """External data files in artifacts/onnx that no model's export record names any more (an
    earlier export's weights). Records follow bytes: called after the new record is written."""
    named = set()
    for record_file in folder.glob("*.json"):
        record = read_json(record_file) or {}
        if isinstance(record, dict) and isinstance(record.get("external_data"), dict):
            named.add(record["external_data"].get("location"))
    for data in folder.glob("*" + DATA_SUFFIX):
        if data.name not in named:
            data.unlink(missing_ok=True)


def _shapes_text(feeds: dict) -> str:
    return ", ".join(f"{k}={'x'.join(map(str, v.shape))}" for k, v in feeds.items())


def _torch_reference(module, model: Model, point: str | None) -> tuple[dict, dict]:
    """PyTorch's outputs on the fixed inputs at `point`: (inputs, outputs) by name."""
    import torch
    feeds = reference_inputs(model, point)
    at = "" if point is None else f" at {point} ({_shapes_text(feeds)})"
    with torch.no_grad():
        try:
            outputs = module(*[torch.from_numpy(feeds[n]) for n in model.inputs])
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"the model fails on its declared inputs{at}: {type(exc).__name__}: {exc}",
                              model=model.name, hint="check `inputs` shapes in the fleet file") from exc
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
    if isinstance(outputs, dict):
        outputs = tuple(outputs.values())
    if len(outputs) != len(model.outputs):
        raise ExportError(f"the model returns {len(outputs)} outputs, the fleet file names {len(model.outputs)}",
                          model=model.name, hint="make `outputs` match the model's forward() outputs")
    return feeds, {n: o.detach().numpy() for n, o in zip(model.outputs, outputs)}


def check_onnx(path: Path, model: Model) -> int:
    """onnx.checker plus the opset check; returns the default-domain opset."""
    import onnx
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises ValidationError and others
        raise ExportError(f"the exported ONNX fails onnx.checker: {exc}", model=model.name,
                          hint="the model uses something ONNX cannot express at this opset; try another opset/exporter") from exc
    proto = onnx.load(str(path), load_external_data=False)
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    got = opsets.get("ai.onnx")
    if got != model.export["opset"]:
        raise ExportError(f"the exported ONNX has opset {got}, but opset {model.export['opset']} was asked for",
                          model=model.name,
                          hint="the dynamo exporter may raise the opset silently; set export.opset to one it supports "
                               "(and that the devices' TensorRT accepts) or use exporter = \"torchscript\"")
    names = [o.name for o in proto.graph.output]
    if names != list(model.outputs):
        raise ExportError(f"the ONNX outputs are {names}, expected {list(model.outputs)}", model=model.name,
                          hint="make `outputs` in the fleet file match the model's forward() outputs")
    return got


def run_onnxruntime(path: Path, feeds: dict) -> dict:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def export_model(model: Model, paths: ExportPaths, key_inputs: dict, publish=None, activity=NULL,
                 hashes: HashCache | None = None) -> dict:
    """Export, check, write reference data; returns the record (written only if changed).

    Records follow bytes: `publish(record)` (if given) runs after the ONNX and reference
    files are verified and in place, and before the local record and the provenance are
    written; the provenance (what `export_is_current` reads) is written last. A kill at
    any point leaves the previous provenance, so the next run exports and publishes again.

    `activity` (a kiln.progress activity) is told each phase as it starts. The model code the
    factory imports is recorded in the provenance and its key replaces `key_inputs["code"]`
    (kiln.model_code; `hashes` is the run's stat cache, a private one under artifacts if None)."""
    activity.phase("importing torch")
    import torch

    from kiln.device_side import agent
    from kiln.keys import write_json_if_changed

    start = time.time()
    torch.manual_seed(0)
    with watch_imports() as imported:
        module = load_module(model, activity)
    hashes = hashes or HashCache(paths.onnx.parent.parent / "cache" / "hashes.json")
    code = record_model_code(model.factory.split(":")[0], imported, hashes)
    key_inputs = {**key_inputs, "code": code_key(code, model.factory_path, hashes)}
    activity.phase("reference outputs")
    # one point (None) for a static model; min, opt and max for a dynamic one
    points = {point: _torch_reference(module, model, point) for point in (model.shape_points or (None,))}
    feeds, _ = points["opt" if model.shapes else None]  # the export traces at opt

    paths.onnx.parent.mkdir(parents=True, exist_ok=True)
    import tempfile
    with tempfile.TemporaryDirectory(dir=paths.onnx.parent, prefix=f".{model.name}.export-") as tmp:
        onnx_tmp = Path(tmp) / "model.onnx"
        activity.phase("torch export")
        try:
            _torch_export(module, feeds, model, onnx_tmp)
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - exporter errors come in many types
            if (os_exc := machine_error(exc, onnx_tmp)) is not None:
                raise os_exc from exc  # a full disk is not the exporter's fault: explained by ensure_export
            raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {str(exc)[:2000]}",
                              model=model.name, hint="see the exporter message; try the other exporter or opset") from exc
        if not onnx_tmp.exists():
            raise ExportError("the exporter wrote no ONNX file", model=model.name,
                              hint="see the exporter's messages; try the other exporter or opset")
        onnx_tmp, external = _external_data_layout(Path(tmp), onnx_tmp, model, activity)
        if _quantized(model):
            if external is not None:
                raise ExportError("a Q/DQ export (export.quantize = \"qdq\") of a model with external data is not "
                                  "supported", model=model.name, hint="set external_data = false, or export without quantize")
            activity.phase("quantizing (Q/DQ)")
            check_onnx(onnx_tmp, model)
            onnx_tmp = quantize_qdq(model, onnx_tmp, Path(tmp) / "model.qdq.onnx")
        activity.phase("onnx check")
        opset = check_onnx(onnx_tmp, model)
        activity.phase("ONNX Runtime verification")
        report = {"max_abs_diff": {}, "permuted": False}
        for point, (point_feeds, point_expected) in points.items():
            at = "" if point is None else f" at {point} ({_shapes_text(point_feeds)})"
            try:
                actual = run_onnxruntime(onnx_tmp, point_feeds)
            except Exception as exc:  # noqa: BLE001
                raise ExportError(f"ONNX Runtime cannot run the exported model{at}: {exc}", model=model.name,
                                  hint="the export is not usable; try another opset/exporter"
                                       + ("; check the model works across the declared ranges" if point else "")) from exc
            rtol, atol = model.verify["rtol"], model.verify["atol"]
            if _quantized(model):   # INT8 Q/DQ against PyTorch's fp32: the int8 tolerances
                rtol, atol = max(rtol, model.verify["int8_rtol"]), max(atol, model.verify["int8_atol"])
            got = agent.compare_outputs(point_expected, actual, rtol, atol, model.verify["rows_may_permute"])
            if not got["ok"]:
                raise ExportError(f"ONNX Runtime disagrees with PyTorch{at}: {got['reason']}", model=model.name,
                                  hint="the export changed the model's numerics; check unsupported ops or loosen verify.rtol/atol")
            for name, diff in got["max_abs_diff"].items():
                report["max_abs_diff"][name] = max(diff, report["max_abs_diff"].get(name, 0.0))
            report["permuted"] = report["permuted"] or got["permuted"]
        activity.phase("writing reference data")
        ref_tmp = Path(tmp) / "reference.npz"
        agent.save_arrays(str(ref_tmp), reference_arrays(points))
        onnx_sha, ref_sha = sha256_file(onnx_tmp), sha256_file(ref_tmp)
        architecture = architecture_sha256(onnx_tmp)  # equal for a weights-only retrain: refit, not rebuild
        kill_point("export:exported")
        # bytes, not records: the local record below still names the previous ONNX until published;
        # the data file first, so a graph in place always finds the data it names
        if external is not None:
            move_into_place(onnx_tmp.parent / external.location, paths.onnx.parent / external.location)
        move_into_place(onnx_tmp, paths.onnx)
        move_into_place(ref_tmp, paths.reference)

    record = {"model": model.name, "onnx_sha256": onnx_sha, "onnx_size": paths.onnx.stat().st_size,
              "reference_sha256": ref_sha, "architecture_sha256": architecture, "opset": opset,
              "inputs": {k: list(v) for k, v in model.inputs.items()},
              "outputs": list(model.outputs)}
    if model.shapes:
        record["shapes"] = _shapes_json(model)
    if external is not None:
        record["external_data"] = external.to_record()
    activity.phase("publishing")
    if publish is not None:
        publish(record)
    seconds = time.time() - start
    changed = write_json_if_changed(paths.record, record)
    kill_point("export:record-written")
    write_json_if_changed(paths.provenance, {"export_key": digest(key_inputs), "inputs": key_inputs, "code": code,
                                             "onnx_sha256": onnx_sha, "seconds": round(seconds, 3),
                                             "ort_max_abs_diff": report["max_abs_diff"],
                                             "ort_rows_permuted": report["permuted"]})
    _remove_unused_data_files(paths.onnx.parent)
    return {**record, "changed": changed, "seconds": seconds, "max_abs_diff": report["max_abs_diff"]}


# -- the export step of a run: up-to-date check, export, publish -------------------------

def export_is_current(ctx, model: Model) -> bool:
    """True iff the export key (checkpoint hash, factory source, options, versions) equals
    the one recorded by the last export and its files exist. Imports no torch."""
    paths = ExportPaths.for_model(ctx.artifacts, model.name)
    provenance = read_json(paths.provenance)
    if provenance is None or not (paths.onnx.exists() and paths.reference.exists() and paths.record.exists()):
        return False
    try:
        data = paths.data(read_json(paths.record))
    except ExportError:
        return False
    if data is not None and not data.exists():
        return False
    try:
        key = digest(export_inputs(model, ctx.hashes, provenance))
    except ExportError:
        return False  # the export itself reports it properly
    if key != provenance["export_key"]:
        return False
    ctx.events.emit(f"export:{model.name}", "skip", key=key,
                    why="checkpoint, model code, export options and versions unchanged")
    return True


@explain_os_errors
def ensure_export(ctx, model: Model, say=print) -> dict:
    """Export `model` and publish its ONNX, reference data and record to the store.

    Order (records follow bytes): ONNX bytes, reference bytes, then the store's pointer
    `models/<model>/onnx.json`, then the local record and provenance (see export_model)."""
    paths = ExportPaths.for_model(ctx.artifacts, model.name)
    before = read_json(paths.provenance) or {}
    inputs = export_inputs(model, ctx.hashes, before)
    why = _why_export(before.get("inputs"), inputs)
    say(f"  exporting {model.name} ({why})")
    with ctx.progress.activity(f"export {model.name}") as activity:
        if ctx.fleet.path.is_file():  # torch loads in a child, never in the run's process
            from kiln.pipeline.export_child import export_in_child
            result = export_in_child(ctx, model, inputs, activity,
                                     publish=lambda record: publish_export(ctx.store, paths, record))
        else:  # a fleet made in code: its child could not read it
            store = ctx.store  # a missing bucket or bad credentials fail here, before minutes of export
            result = export_model(model, paths, inputs, publish=lambda record: publish_export(store, paths, record),
                                  activity=activity, hashes=ctx.hashes)
    outcome = "new ONNX" if result["changed"] else "same ONNX bytes as before: nothing downstream rebuilds"
    ctx.events.emit(f"export:{model.name}", "export", key=result["onnx_sha256"], seconds=result["seconds"],
                    why=f"{why}; {outcome}")
    diff = max(result["max_abs_diff"].values())
    data = result.get("external_data")
    size = f"{result['onnx_size'] / 1e6:.1f} MB" + (f" + {data['size'] / 1e6:.1f} MB external data" if data else "")
    say(f"  {model.name}: ONNX {result['onnx_sha256'][:12]} ({size}, opset {result['opset']}), "
        f"ONNX Runtime vs PyTorch max abs diff {diff:.2e}, {result['seconds']:.1f} s; {outcome}")
    return result


def publish_export(store, paths: ExportPaths, record: dict) -> None:
    """ONNX and reference bytes into the store (verified against their sha256 on the way in),
    then the pointer that names them. An entry that already exists holds the same bytes (its
    name is its content), so a rerun after a kill only writes what is missing."""
    import json

    from kiln.stores.base import onnx_data_entry, onnx_entry, onnx_record_entry, reference_entry

    onnx_sha = record["onnx_sha256"]
    external = ExternalData.from_record(record, record.get("model"))
    if external is not None:  # the data first: a graph in the store always finds the data it names
        store.put_file(onnx_data_entry(external.sha256), paths.data(record), sha256=external.sha256)
    store.put_file(onnx_entry(onnx_sha), paths.onnx, sha256=onnx_sha)
    kill_point("export:onnx-published")
    store.put_file(reference_entry(onnx_sha), paths.reference, sha256=record["reference_sha256"])
    _adopt_stored_reference(store, paths, record)
    kill_point("export:reference-published")
    store.put_bytes(onnx_record_entry(record["model"]),
                    (json.dumps(record, sort_keys=True, indent=2) + "\n").encode(), overwrite=True)
    kill_point("export:pointer-published")


def _adopt_stored_reference(store, paths: ExportPaths, record: dict) -> None:
    """The reference entry is named by the ONNX, not by its own bytes: if another export of the
    same ONNX (another machine, another run) published first, its reference wins and is adopted
    (record and local file), like a lost race; it is never overwritten."""
    from kiln.stores.base import reference_entry
    name = reference_entry(record["onnx_sha256"])
    info = store.info(name)
    if info is not None and info.sha256 != record["reference_sha256"]:
        log.info("reference data of ONNX %s was published before with sha256 %s; using it",
                 record["onnx_sha256"][:12], info.sha256[:12])
        store.get_file(name, paths.reference, sha256=info.sha256)
        record["reference_sha256"] = info.sha256


def _why_export(old: dict | None, new: dict) -> str:
    if not old:
        return "first export"
    changed = [k for k in sorted(new) if old.get(k) != new.get(k)]
    names = {"checkpoint_sha256": "checkpoint changed", "factory_source_sha256": "factory source changed",
             "code": describe_change(old.get("code"), new.get("code"))}
    return ", ".join(names.get(k, f"{k} changed") for k in changed) or "outputs missing"
