"""Refit instead of rebuild (README "Refit after retraining", docs/trtexec.md §10): the export's
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
