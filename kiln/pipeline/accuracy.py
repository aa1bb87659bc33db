"""The task metric of the accuracy gate: `verify.metric = "module:function"` with `verify.metric_threshold`.

Per-output tolerances catch numbers that moved; a reduced-precision engine (INT8) may move numbers
and still do its job, or stay within loose tolerances and not do it. The metric says which, in the
task's own terms: `function(outputs, reference) -> float`, higher is better, where both are
{output name: numpy array} (the engine's outputs on the reference inputs, as trtexec exported them,
and PyTorch's outputs saved at export), e.g. top-k agreement of class scores or the mean IoU of
boxes. It runs on the controller after the on-device comparison passed, once per shape point (a
dynamic model: min, opt, max; the lowest value counts); the module is found like a factory (the
fleet file's folder, python_path, Python's path). A value below the threshold fails the build: the
engine is not published, and the error names model, class, metric, value and threshold. The value
goes into the engine manifest's verification report (`verification.metric`).
"""
from __future__ import annotations

import math
from pathlib import Path

from kiln.errors import KilnError, VerificationError

__all__ = ["check_metric", "load_metric"]


def load_metric(model):
    """The metric function of `model` (imported like a factory)."""
    from kiln.factories import factory_imports, import_factory
    name = model.verify["metric"]
    try:
        with factory_imports(model.factory_path):
            return import_factory(name, model.factory_path, model=model.name)
    except KilnError as exc:
        raise VerificationError(f"cannot load verify.metric {name!r} of model {model.name}: {exc.message}",
                                model=model.name, hint="fix verify.metric (a 'module:function' found like a factory)"
                                ) from exc


def check_metric(spec, target, outputs_dir: Path, reference: Path) -> dict:
    """Evaluate the metric on the outputs the verification fetched into `outputs_dir`; raise
    VerificationError below the threshold. -> the report {name, value, threshold, points}."""
    from kiln.device_side.agent import load_arrays, parse_trt_outputs, reference_points
    model = spec.model
    name, threshold = model.verify["metric"], float(model.verify["metric_threshold"])
    function = load_metric(model)
    values = {}
    for point, _, expected in reference_points(load_arrays(str(reference))):
        got = parse_trt_outputs((Path(outputs_dir) / f"{point or 'static'}.json").read_text())
        try:
            value = float(function(got, expected))
        except Exception as exc:  # noqa: BLE001 - user code: any failure is reported the same way
            raise VerificationError(f"verify.metric {name} of model {model.name} raised {type(exc).__name__}: {exc}",
                                    model=model.name, hint="fix the metric function") from exc
        values[point or "static"] = value
    worst = min(values.values())
    report = {"name": name, "value": worst, "threshold": threshold, "points": values}
    if math.isnan(worst) or worst < threshold:
        at = "" if list(values) == ["static"] else " (per point: " + ", ".join(f"{p} {v:.4g}" for p, v in values.items()) + ")"
        raise VerificationError(
            f"accuracy gate: model {model.name} on class {spec.hwclass.id} (built on {target.name}, precision "
            f"{model.build.get('precision')}): metric {name} = {worst:.4g} is below the threshold {threshold:g}{at}",
            model=model.name, target=target.name,
            hint="the engine was not published and nothing was deployed; improve the calibration data (or use "
                 "Q/DQ export, or fp16 for this model/target), or lower verify.metric_threshold")
    return report
