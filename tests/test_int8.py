"""INT8 on the simulated fleet: a calibration data set ([models.X.calibration]) is turned into a
calibration cache once per hardware class, with the TensorRT Python API on a device (simulated
`tensorrt` package, tests/fleet/trt_python), kept in the store, and passed to every later INT8
build of that class (`--calib` for trtexec, the calibrator's read_calibration_cache for the Python
API); precision overridden per target; the accuracy gate (int8 tolerances, task metric) keeps an
INT8 engine whose outputs are off from being published. Calibrations are counted on the devices."""
from __future__ import annotations

import json
import struct
import textwrap

import numpy as np
import pytest

from test_fleet import fleet_project

SYSTEM_PYTHON = "/usr/bin/python3"   # the simulated Jetsons' python3 with the tensorrt bindings
DEVICES = {"orin-a": "orin-jp5", "orin-b": "orin-jp5", "orin-c": "orin-jp6"}


@pytest.fixture
def orins(new_fleet):
    sim = new_fleet()
    for name, profile in DEVICES.items():
        sim.add_device(name, profile)
    return sim.start()


def _calibration_data(folder, scale=1.0, count=4, seed=7):
    """Batches like the model's real inputs (uniform 0..1 images), times `scale`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        np.savez(folder / f"batch{i:02d}.npz", pixel_values=(rng.random((1, 3, 32, 32)) * scale).astype(np.float32))
    return folder


def _project(tmp_path, sim, model_extra: str, targets: dict[str, dict] | None = None, overrides: str = ""):
    devices = targets or {n: {} for n in DEVICES}
    devices = {n: {"tensorrt_python": SYSTEM_PYTHON, **opts} for n, opts in devices.items()}
    p = fleet_project(tmp_path, sim, devices)
    text = p.fleet.read_text()
    head, rest = text.split("[targets.", 1)
    p.fleet.write_text(head + textwrap.dedent(model_extra) + "\n[targets." + rest + textwrap.dedent(overrides))
    return p


def builds(sim, names) -> int:
    """Engine builds on the devices (a calibration run's own build, whose plan is thrown away, not counted)."""
    return sum(1 for n in names for b in sim.builds(n) if not b.get("calibration_run"))


def _calibrations(sim) -> int:
    return sum(len(sim.calibrations(n)) for n in DEVICES)


def test_int8_calibrates_once_per_class_reuses_the_cache_and_overrides_precision_per_target(tmp_path, orins):
    _calibration_data(tmp_path / "calib")
    p = _project(tmp_path, orins, '''
        [models.tiny.calibration]
        data = "calib"
        ''', {"orin-a": {}, "orin-b": {}, "orin-c": {"build_tool": "python-api"}}, overrides='''
        [targets.orin-b.model_build.tiny]
        precision = "int8"

        [targets.orin-c.build]
        precision = "int8"
        ''')
    first = p.doit("-n", "3", "deploy")
    # orin-a runs the model's own fp16; orin-b (JP5 class) and orin-c (JP6 class) run INT8 variants:
    # one calibration per class that builds INT8, on a device, with the Python API
    assert _calibrations(orins) == 2, first.out
    assert len(orins.calibrations("orin-c")) == 1
    assert builds(orins, DEVICES) == 3, first.out
    jp5 = [b for n in ("orin-a", "orin-b") for b in orins.builds(n) if not b.get("calibration_run")]
    trtexec_int8 = [b for b in jp5 if b["precision"] == "int8"]
    assert len(trtexec_int8) == 1 and trtexec_int8[0]["int8"] == "calibrated"
    assert any(a.startswith("--calib=") for a in trtexec_int8[0]["argv"]), trtexec_int8[0]["argv"]
    api = [b for b in orins.builds("orin-c") if b.get("tool") == "python-api" and b["precision"] == "int8"]
    assert [b["int8"] for b in api][-1] == "calibrated"       # the build read the cache: no second calibration
    for name in DEVICES:   # each device runs its own engine, verified
        assert (orins.srv(name) / "kiln/tiny/current/model.plan").exists(), name
    caches = sorted((p.artifacts / "store" / "entries" / "calibration-caches").glob("*/*.cache"))
    assert len(caches) == 2 and all(c.read_text().startswith("TRT-") for c in caches)
    assert {c.read_text().split("\n")[0] for c in caches} == {"TRT-8502-EntropyCalibration2",
                                                             "TRT-100300-EntropyCalibration2"}
    # the input's scale is its range over the data (max |x| / 127), as a float32's hex bits
    amax = max(float(np.abs(np.load(f)["pixel_values"]).max()) for f in (tmp_path / "calib").glob("*.npz"))
    line = next(l for l in caches[0].read_text().splitlines() if l.startswith("pixel_values: "))
    assert struct.unpack(">f", bytes.fromhex(line.split(": ")[1]))[0] == pytest.approx(amax / 127, rel=1e-6)

    # another engine of the same ONNX and data on those classes: new builds, no new calibration
    p.fleet.write_text(p.fleet.read_text().replace('precision = "int8"\n', 'precision = "int8"\nworkspace_mib = 512\n'))
    second = p.doit("-n", "3", "deploy")
    assert builds(orins, DEVICES) == 5, second.out
    assert _calibrations(orins) == 2, second.out
    assert "calibration cache" in second.out and "is in the store" in second.out

    # nothing changed: nothing runs; more calibration data: the INT8 engines' keys change (not fp16's)
    assert p.doit("-n", "3", "deploy").ran() == set()
    _calibration_data(tmp_path / "calib", count=5)
    code, report, _ = p.doit_json("cache-check", "--json")
    status = {(r["model"].split("~")[0], "~" in r["model"], r["hardware_class"].split("-")[-2]): r["status"]
              for r in report["engines"]}
    assert code == 1 and sorted(status.values()) == ["hit", "miss", "miss"], report
    assert [s for (m, variant, _), s in status.items() if not variant] == ["hit"]


METRIC = '''
import numpy as np


def top1_agreement(outputs, reference):
    """Share of queries whose best class is the reference's."""
    return float(np.mean(np.argmax(outputs["logits"], -1) == np.argmax(reference["logits"], -1)))
'''


def test_accuracy_gate_refuses_int8_without_scales_fails_off_outputs_and_a_low_metric(tmp_path, orins):
    """One model on one Orin, step by step: INT8 with neither calibration data nor Q/DQ is refused
    before building; calibration images in 0..0.05 while the model sees 0..1 saturate the engine's
    inputs, and the int8 tolerances fail it; with good data, a task metric below its threshold fails
    it, naming model, class, metric, value and threshold; above it, the engine is published with
    the metric in its manifest. Nothing is published or deployed by a failed step."""
    (tmp_path / "task_metrics.py").write_text(METRIC)
    p = _project(tmp_path, orins, "", {"orin-a": {}}, overrides='\n[targets.orin-a.build]\nprecision = "int8"\n')
    run = p.doit("deploy:orin-a", check=False)
    assert run.returncode != 0
    assert "no INT8 calibration data set and its ONNX has no Q/DQ nodes" in run.out, run.out
    assert "[models.tiny.calibration]" in run.out
    assert builds(orins, ["orin-a"]) == 0 and p.store_engines() == []

    _calibration_data(tmp_path / "calib", scale=0.05)
    head, rest = p.fleet.read_text().split("[targets.", 1)
    p.fleet.write_text(head + '[models.tiny.calibration]\ndata = "calib"\n\n[targets.' + rest)
    run = p.doit("deploy:orin-a", check=False)
    assert run.returncode != 0
    assert "TensorRT engine outputs differ from the reference on orin-a" in run.out, run.out
    assert "rtol=0.05 atol=0.05" in run.out     # the int8 tolerances applied
    assert _calibrations(orins) == 1 and builds(orins, ["orin-a"]) == 1
    assert p.store_engines() == [] and not (orins.srv("orin-a") / "kiln/tiny/current").exists()

    for f in (tmp_path / "calib").glob("*.npz"):
        f.unlink()
    _calibration_data(tmp_path / "calib")
    head, rest = p.fleet.read_text().split("[targets.", 1)
    p.fleet.write_text(head + '[models.tiny.verify]\nmetric = "task_metrics:top1_agreement"\nmetric_threshold = 1.5\n'
                       '\n[targets.' + rest)
    run = p.doit("deploy:orin-a", check=False)
    assert run.returncode != 0 and p.store_engines() == []
    assert _calibrations(orins) == 2            # new data: a new calibration cache
    assert "accuracy gate: model tiny on class p3701-0005-sm8.7-trt8.5.2-" in run.out, run.out
    assert "metric task_metrics:top1_agreement = 1 is below the threshold 1.5" in run.out, run.out

    p.fleet.write_text(p.fleet.read_text().replace("metric_threshold = 1.5", "metric_threshold = 0.9"))
    again = p.doit("deploy:orin-a")
    assert _calibrations(orins) == 2, again.out          # the cache of the failed build was kept
    manifest = json.loads((orins.srv("orin-a") / "kiln/tiny/current/manifest.json").read_text())
    stored = json.loads(next((p.artifacts / "store" / "entries" / "engines").glob("*/*/manifest.json")).read_text())
    assert stored["verification"]["metric"] == {"name": "task_metrics:top1_agreement", "value": 1.0,
                                                "threshold": 0.9, "points": {"static": 1.0}}
    assert manifest["engine_key"] == stored["key"]


def test_a_dynamic_batch_int8_model_calibrates_at_opt_and_deploys_to_a_mixed_fleet(tmp_path, orins):
    """Batch 1..4 (opt 2): the calibration batches have the opt shape (TensorRT calibrates at the
    calibration profile's opt), JP5 builds with trtexec --calib, JP6 with the Python API reading
    the cache; every engine is verified at min, opt and max."""
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        np.savez(folder / f"b{i}.npz", pixel_values=rng.random((2, 3, 32, 32)).astype(np.float32))
    p = _project(tmp_path, orins, '''
        [models.tiny.build]
        precision = "int8"
        [models.tiny.calibration]
        data = "calib"
        ''', {"orin-a": {}, "orin-c": {"build_tool": "python-api"}})
    p.fleet.write_text(p.fleet.read_text().replace(
        "inputs = { pixel_values = [1, 3, 32, 32] }",
        "inputs = { pixel_values = { min = [1, 3, 32, 32], opt = [2, 3, 32, 32], max = [4, 3, 32, 32] } }"))
    run = p.doit("-n", "2", "deploy")
    assert _calibrations(orins) == 2, run.out
    assert all(c["batches"] == 3 for n in DEVICES for c in orins.calibrations(n))
    for name in ("orin-a", "orin-c"):
        manifest = json.loads((orins.srv(name) / "kiln/tiny/current/manifest.json").read_text())
        assert sorted(manifest["smoke_test"]["points"]) == ["max", "min", "opt"], manifest["smoke_test"]
    (jp5,) = [b for b in orins.builds("orin-a") if not b.get("calibration_run")]
    assert jp5["int8"] == "calibrated" and jp5["profile"]["pixel_values"]["opt"] == [2, 3, 32, 32]
