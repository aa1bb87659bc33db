"""Refit instead of rebuild (README "Refit after retraining", docs/trtexec.md §13): the export's
architecture digest, the `refit` build setting and its flags, the simulated refittable and
stripped plans, and the device-side refit script's contract."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.backends.trt_config import BuildConfigError, TrtBuildConfig
from kiln.backends.trtexec import TRT_API_REFIT_SCRIPT, api_build_argv, api_refit_argv, build_argv
from kiln.backends.tensorrt import TensorRTBackend
from kiln_project import python

REPO = Path(__file__).resolve().parent.parent
SIM = REPO / "tests" / "fleet" / "trtexec_sim.py"

EXPORT = """
import sys, torch
from examples.tiny_detector import build_model
from kiln.onnx_weights import architecture_sha256
import hashlib
def export(m, path, opset=17):
    torch.onnx.export(m, (torch.zeros(1, 3, 32, 32),), path, input_names=["pixel_values"],
                      output_names=["logits", "pred_boxes"], opset_version=opset, dynamo=False)
    return hashlib.sha256(open(path, "rb").read()).hexdigest(), architecture_sha256(path)
m = build_model().eval()
out = {"a": export(m, sys.argv[1] + "/a.onnx")}
with torch.no_grad():
    next(p for n, p in m.named_parameters() if n.endswith("weight")).add_(0.01)
out["retrained"] = export(m, sys.argv[1] + "/b.onnx")
out["opset18"] = export(m, sys.argv[1] + "/c.onnx", 18)
print(repr(out))
"""


def test_the_architecture_digest_ignores_weights_and_sees_the_graph(tmp_path):
    script = tmp_path / "export.py"
    script.write_text(EXPORT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    got = eval(proc.stdout.strip().splitlines()[-1])
    (a_sha, a_arch), (b_sha, b_arch), (c_sha, c_arch) = got["a"], got["retrained"], got["opset18"]
    assert a_sha != b_sha and a_arch == b_arch          # new weights, same graph: refit
    assert c_arch != a_arch                              # another opset is another graph: rebuild


def test_refit_is_a_build_setting_in_the_key_only_when_on_and_each_builder_asks_for_it():
    backend = TensorRTBackend()
    off = backend.build_settings({"precision": "fp16", "refit": False})
    assert "refit" not in off and backend.build_settings({"precision": "fp16"}) == off  # old keys unchanged
    on = backend.build_settings({"precision": "fp16", "refit": True})
    assert on["refit"] is True
    cfg = TrtBuildConfig.from_mapping(on)
    for version in ("8.5.2", "10.3.0"):
        argv = build_argv("trtexec", "m.onnx", "m.plan", cfg, version)
        assert argv.count("--refit") == 1 and argv[-1] in ("--buildOnly", "--skipInference")
    assert "--refit" not in build_argv("trtexec", "m.onnx", "m.plan", TrtBuildConfig.from_mapping(off), "10.3.0")
    both = TrtBuildConfig.from_mapping({**on, "extra_flags": ["--refit"]})
    assert build_argv("trtexec", "m.onnx", "m.plan", both, "10.3.0").count("--refit") == 1
    assert json.loads(api_build_argv("python3", "b.py", onnx="m.onnx", engine="m.plan", cfg=cfg)[2])["refit"] is True
    with pytest.raises(BuildConfigError, match="version-compatible plans"):
        TrtBuildConfig.from_mapping({"refit": True, "extra_flags": ["--versionCompatible"]})
    with pytest.raises(BuildConfigError, match="refit must be true or false"):
        TrtBuildConfig.from_mapping({"refit": "yes"})


def test_the_fleet_file_takes_refit_per_model(tmp_path):
    from kiln.config import load_fleet
    from kiln.errors import ConfigError
    text = ('[models.det]\nfactory = "examples.tiny_detector:build_model"\ncheckpoint = "c.pt"\n'
            'inputs = { pixel_values = [1, 3, 32, 32] }\noutputs = ["logits"]\n[models.det.build]\nrefit = %s\n'
            '[targets.local]\nmodels = ["det"]\ninstall_dir = "deploy"\n')
    (tmp_path / "targets.toml").write_text(text % "true")
    assert load_fleet(tmp_path / "targets.toml", tmp_path / "a").models["det"].build["refit"] is True
    (tmp_path / "targets.toml").write_text(text % '"yes"')
    with pytest.raises(ConfigError, match=r"targets.toml:\d+.*refit"):
        load_fleet(tmp_path / "targets.toml", tmp_path / "a")


def test_int8_calibrated_on_data_is_rebuilt_and_a_qdq_export_is_refitted():
    from types import SimpleNamespace as Model
    from kiln.pipeline.refit import calibrated_int8
    data = {"data": "calib", "function": None}
    assert calibrated_int8(Model(build={"precision": "int8"}, calibration=data, export={}))
    assert calibrated_int8(Model(build={"precision": "best"}, calibration=data, export={"quantize": None}))
    assert not calibrated_int8(Model(build={"precision": "int8"}, calibration=data, export={"quantize": "qdq"}))
    assert not calibrated_int8(Model(build={"precision": "fp16"}, calibration=data, export={}))
    assert not calibrated_int8(Model(build={"precision": "int8"}, calibration=None, export={}))


def _sim(tmp_path, version, *argv):
    env = {"PATH": "/usr/bin:/bin", "KILN_SIM_STATE": str(tmp_path / "state"), "KILN_SIM_BUILD_SECONDS": "0.01",
           "KILN_SIM_TRT_VERSION": version}
    return subprocess.run([sys.executable, str(SIM), *argv], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=60)


def test_trtexec_sim_marks_refittable_and_stripped_plans_and_a_stripped_one_does_not_run(tmp_path):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"\x08\x08\x12\x07pytorch" + b"Conv " * 20)
    built = _sim(tmp_path, "8.5.2", f"--onnx={onnx}", "--saveEngine=r.plan", "--refit", "--buildOnly")
    assert built.returncode == 0, built.stderr
    assert "Unknown option: --stripWeights" in _sim(tmp_path, "8.5.2", f"--onnx={onnx}", "--stripWeights").stderr
    assert "Unknown option: --stripAllWeights" in _sim(tmp_path, "10.0.1", f"--onnx={onnx}",
                                                       "--stripAllWeights").stderr
    for name, flags in (("i.plan", ["--stripWeights"]), ("s.plan", ["--stripWeights", "--refit"]),
                        ("a.plan", ["--stripAllWeights"])):
        assert _sim(tmp_path, "10.3.0", f"--onnx={onnx}", f"--saveEngine={name}", *flags,
                    "--skipInference").returncode == 0
    logged = [json.loads(l)["refit"] for l in (tmp_path / "state/builds.log").read_text().splitlines()]
    assert logged == [{"mode": "refit", "stripped": False, "refits": 0},
                      {"mode": "identical", "stripped": True, "refits": 0},      # REFIT_IDENTICAL by default
                      {"mode": "refit", "stripped": True, "refits": 0},
                      {"mode": "refit", "stripped": True, "refits": 0}]
    assert _sim(tmp_path, "8.5.2", "--loadEngine=r.plan").returncode == 0
    stripped = _sim(tmp_path, "10.3.0", "--loadEngine=s.plan")
    assert stripped.returncode == 1 and "has not been refitted" in stripped.stderr and "&&&& FAILED" in stripped.stdout


def test_the_refit_script_refuses_bad_arguments_and_says_when_tensorrt_is_missing(tmp_path):
    def run(arg):
        proc = subprocess.run([sys.executable, str(TRT_API_REFIT_SCRIPT), arg], capture_output=True, text=True,
                              timeout=60, env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)
        return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])
    code, out = run("{}")
    assert code == 2 and out == {"kiln": "trt_api_refit", "ok": False, "error": "bad arguments: base must be a non-empty path"}
    (tmp_path / "b.plan").write_bytes(b"x")
    (tmp_path / "m.onnx").write_bytes(b"x")
    argv = api_refit_argv("python3", "r.py", base="b.plan", onnx="m.onnx", engine="n.plan")
    assert json.loads(argv[2]) == {"base": "b.plan", "onnx": "m.onnx", "engine": "n.plan", "weights": None}
    code, out = run(argv[2])
    assert code == 3 and "tensorrt is not importable" in out["error"]


# -- on simulated Jetsons: refit, rebuild, fall back --------------------------------------------

from tests.fleet.sim import JETSON_PYTHON  # noqa: E402

REFIT_ON = '[models.tiny.build]\nrefit = true\n'


def refit_project(tmp_path, sim, devices: dict[str, dict]):
    from test_fleet import fleet_project
    p = fleet_project(tmp_path, sim, {n: {"python": JETSON_PYTHON, **o} for n, o in devices.items()})
    p.fleet.write_text(p.fleet.read_text().replace('outputs = ["logits", "pred_boxes"]\n',
                                                   'outputs = ["logits", "pred_boxes"]\n' + REFIT_ON, 1))
    return p


def counts(sim, names) -> tuple[int, int]:
    """(full builds, refits) counted on the devices."""
    return sum(len(sim.builds(n)) for n in names), sum(len(sim.refits(n)) for n in names)


def manifests(p) -> dict[str, dict]:
    base = p.artifacts / "store" / "entries" / "engines"
    return {m.parent.name: json.loads(m.read_text()) for m in base.glob("*/*/manifest.json")}


def test_a_weights_only_retrain_refits_on_each_class_and_a_graph_change_rebuilds(tmp_path, new_fleet):
    from test_fleet import retrain
    sim = new_fleet()
    sim.add_device("orin6-a", "orin-jp6")     # TensorRT 10.3: OnnxParserRefitter
    sim.add_device("orin6-b", "orin-jp6")
    sim.add_device("orin5", "orin-jp5")       # TensorRT 8.5: set_named_weights from the initializers
    sim.start()
    names = ["orin6-a", "orin6-b", "orin5"]
    p = refit_project(tmp_path, sim, {n: {} for n in names})
    p.doit("-n", "3", "deploy")
    assert counts(sim, names) == (2, 0)       # one refittable build per class
    assert all("--refit" in b["argv"] and b["refit"]["mode"] == "refit" for n in names for b in sim.builds(n))
    bases = list((p.artifacts / "store/entries/refit-bases").rglob("*.json"))
    assert len(bases) == 2 and all(json.loads(b.read_text())["signature"] for b in bases)
    first = {n: (sim.srv(n) / "kiln/tiny/current").resolve().name for n in names}

    retrain(p, 0.05)
    run = p.doit("-n", "3", "deploy")
    assert counts(sim, names) == (2, 2), run.out   # no full build on any device: one refit per class
    assert {r["trt"] for n in names for r in sim.refits(n)} == {"10.3.0", "8.5.2.2"}
    refitted = [m for m in manifests(p).values() if m.get("made_by", {}).get("how") == "refit"]
    assert len(refitted) == 2 and all(m["verification"]["max_abs_diff"] for m in refitted)
    assert {m["tool"].split("(")[1] for m in refitted} == {"OnnxParserRefitter.refit_from_file)",
                                                          "Refitter.set_named_weights)"}
    onnx_now = json.loads((p.artifacts / "onnx/tiny.json").read_text())["onnx_sha256"]
    for n in names:                            # every device runs the refitted engine of the new weights
        current = sim.srv(n) / "kiln/tiny/current"
        assert current.resolve().name != first[n]
        release = json.loads((current / "manifest.json").read_text())
        assert release["onnx_sha256"] == onnx_now and release["smoke_test"]["latency_ms"]["p99"] > 0
    assert any("refitted from base" in e.get("why", "") for e in p.events() if e["event"] == "publish")

    p.fleet.write_text(p.fleet.read_text() + "\n[models.tiny.export]\nopset = 18\n")   # another graph
    p.doit("-n", "3", "deploy")
    assert counts(sim, names) == (4, 2)        # rebuilt in full, once per class


def test_a_refit_that_fails_or_computes_wrong_is_not_published_and_the_engine_is_built(tmp_path, new_fleet):
    from test_fleet import retrain
    sim = new_fleet()
    sim.add_device("orin", "orin-jp6", sim_env={"KILN_SIM_REFIT_FAULT": "drop-bias"})
    sim.start()
    p = refit_project(tmp_path, sim, {"orin": {}})
    p.doit("deploy")
    assert counts(sim, ["orin"]) == (1, 0)

    retrain(p, 0.05)                           # the refit runs, but its engine fails the accuracy gate
    run = p.doit("deploy")
    assert counts(sim, ["orin"]) == (2, 1), run.out
    assert "refit not used" in run.out and "differ from the reference" in run.out
    assert all(m.get("made_by", {}).get("how") != "refit" for m in manifests(p).values())
    assert any(e.get("refit_base") and "not used" in e["why"] for e in p.events())

    sim.upgrade("orin", sim_env={"KILN_SIM_REFIT_FAULT": "fail"})
    retrain(p, 0.1)                            # refit_cuda_engine() returns False
    run = p.doit("deploy")
    assert counts(sim, ["orin"]) == (3, 1) and "refit_cuda_engine returned False" in run.out, run.out

    p.fleet.write_text(p.fleet.read_text().replace(JETSON_PYTHON, sys.executable))  # no tensorrt module
    retrain(p, 0.15)
    run = p.doit("deploy")
    assert counts(sim, ["orin"]) == (4, 1) and "tensorrt is not importable" in run.out, run.out
    assert all(m.get("made_by", {}).get("how") == "build" for m in manifests(p).values())


def test_the_simulated_refitter_reads_initializers_from_every_field_and_rewrites_only_their_values():
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from tests.fleet.trt_python.refit import initializer_bytes, replace_initializers
    a, b, c = np.array([1.5, -2.25, 3], np.float32), np.array([-3, 5, 127, -128], np.int8), np.array([7, -9], np.int64)
    tensors = [helper.make_tensor("a", TensorProto.FLOAT, [3], a.tolist()),      # float_data
               helper.make_tensor("b", TensorProto.INT8, [4], b.tolist()),       # int32_data
               helper.make_tensor("c", TensorProto.INT64, [2], c.tolist()),      # int64_data
               numpy_helper.from_array(a, "r")]                                   # raw_data
    model = helper.make_model(helper.make_graph([], "g", [], [], tensors)).SerializeToString()
    assert initializer_bytes(model) == {"a": a.tobytes(), "b": b.tobytes(), "c": c.tobytes(), "r": a.tobytes()}
    new = replace_initializers(model, {"a": (a * 2).tobytes()})
    loaded = onnx.load_from_string(new)
    assert np.array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), a * 2)
    assert [t.name for t in loaded.graph.initializer] == ["a", "b", "c", "r"]
    assert np.array_equal(numpy_helper.to_array(loaded.graph.initializer[1]), b)


def test_a_dynamic_batch_int8_model_deploys_to_a_mixed_fleet_and_a_retrain_refits_it(tmp_path, new_fleet):
    """issue 10's "done when", all from targets.toml: a dynamic-batch INT8 (Q/DQ) model on a JetPack 6
    Orin and on this CPU (ONNX Runtime); a weights-only retrain refits the Orin's engine."""
    from test_fleet import retrain
    from test_int8_qdq import use_the_classifier
    sim = new_fleet()
    sim.add_device("orin6", "orin-jp6")
    sim.start()
    p = refit_project(tmp_path, sim, {"orin6": {"tensorrt_python": JETSON_PYTHON}})
    text = use_the_classifier(tmp_path, p.fleet.read_text()).replace(
        "inputs = { pixel_values = [1, 3, 32, 32] }",
        "inputs = { pixel_values = { min = [1, 3, 32, 32], opt = [2, 3, 32, 32], max = [4, 3, 32, 32] } }", 1)
    text = text.replace(REFIT_ON, REFIT_ON + 'precision = "int8"\n[models.tiny.export]\nquantize = "qdq"\n'
                                  # ONNX Runtime runs the Q/DQ graph in INT8 too: its engine is checked
                                  # with the int8 tolerances (engine_tolerances), as TensorRT's
                                  '[models.tiny.calibration]\ndata = "calib"\n', 1)
    p.fleet.write_text(text + '\n[targets.cpu]\nmodels = ["tiny"]\ninstall_dir = "deploy"\n')
    p.doit("deploy")
    assert counts(sim, ["orin6"]) == (1, 0)
    built = sim.builds("orin6")[0]
    assert built["precision"] == "int8" and built["int8"] == "qdq" and built["profile"]["pixel_values"]["max"][0] == 4
    cpu_first = p.active()

    retrain(p, 0.05)
    run = p.doit("deploy")
    assert counts(sim, ["orin6"]) == (1, 1), run.out            # refitted, not rebuilt
    refitted = [m for m in manifests(p).values() if m.get("made_by", {}).get("how") == "refit"]
    assert len(refitted) == 1 and set(refitted[0]["verification"]["points"]) == {"min", "opt", "max"}
    assert p.active() != cpu_first                                # the CPU target follows with ONNX Runtime


def test_a_refit_base_is_used_only_when_a_trusted_key_signed_it_and_its_plan_is_stored(tmp_path):
    from kiln.pipeline.context import Context
    from kiln.pipeline.refit import KIND, stored_base
    from kiln.signing import controller_trust
    from kiln.stores.base import blob_entry, refit_base_entry
    from kiln_project import Project
    p = Project(tmp_path)
    plan = b"a refittable plan"
    sha = __import__("hashlib").sha256(plan).hexdigest()
    key = "ab" * 32
    with Context.load(p.fleet, p.artifacts) as ctx:
        store, quiet = ctx.store, (lambda *a: None)
        record = {"kind": KIND, "base_key": key, "sha256": sha, "engine_key": "cd" * 32, "onnx_sha256": "ef" * 32}
        store.put_bytes(refit_base_entry(key), json.dumps(controller_trust(ctx).sign(record, say=quiet)).encode())
        assert stored_base(ctx, key, quiet) is None                  # its plan is not in the store
        store.put_bytes(blob_entry(sha), plan)
        assert stored_base(ctx, key, quiet)["sha256"] == sha
        verdicts = []
        for forged in ({**controller_trust(ctx).sign(record, say=quiet), "sha256": "00" * 32},   # altered after signing
                       record):                                                                 # never signed
            store.put_bytes(refit_base_entry(key), json.dumps(forged).encode(), overwrite=True)
            assert stored_base(ctx, key, quiet) is None
            reason = p.artifacts / "store" / f"quarantine/{refit_base_entry(key)}.reason.json"
            assert not store.exists(refit_base_entry(key))                # moved aside, with its reason
            verdicts.append(json.loads(reason.read_text())["verdict"])
        assert len(set(verdicts)) == 2 and "unsigned" in verdicts[1], verdicts
