"""Dynamic input shapes: a {min, opt, max} range per input in the fleet file, exported with dynamic
axes, verified at min, opt and max on ONNX Runtime (deploy:local) and on a simulated Jetson
(TensorRT optimisation profile through trtexec), and part of the export and engine keys."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.backends.trt_config import TrtBuildConfig
from kiln.backends.trtexec import api_build_argv, build_argv
from kiln.backends.trtexec_output import check_trtexec_result
from kiln.config import load_fleet
from kiln.errors import BuildError, ConfigError
from kiln_project import Project
from test_fleet import fleet_project

SIM = Path(__file__).resolve().parent / "fleet" / "trtexec_sim.py"
STATIC = "inputs = { pixel_values = [1, 3, 32, 32] }"
DYNAMIC = "inputs = { pixel_values = { min = [1, 3, 32, 32], opt = [2, 3, 32, 32], max = [%d, 3, 32, 32] } }"


def dynamic_project(root: Path, max_batch: int = 4) -> Project:
    p = Project(root)
    p.fleet.write_text(p.fleet.read_text().replace(STATIC, DYNAMIC % max_batch))
    return p


def fleet_text(inputs: str, extra: str = "") -> str:
    return f"""
[models.det]
factory = "examples.tiny_detector:build_model"
checkpoint = "ckpt/det.pt"
{inputs}
outputs = ["logits", "pred_boxes"]
{extra}
[targets.local]
models = ["det"]
install_dir = "deploy"
"""


def config_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "targets.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_fleet(path, tmp_path / "artifacts")
    return str(info.value)


# -- config: one place declares the shapes --------------------------------------------------

def test_a_range_becomes_the_tensorrt_profile_and_static_files_stay_as_they_were(tmp_path):
    (tmp_path / "targets.toml").write_text(fleet_text(DYNAMIC % 8))
    model = load_fleet(tmp_path / "targets.toml", tmp_path / "a").models["det"]
    assert model.inputs == {"pixel_values": (2, 3, 32, 32)}       # opt: what the export traces with
    assert model.shape_points == ("min", "opt", "max")
    assert model.input_shapes("max") == {"pixel_values": (8, 3, 32, 32)}
    assert model.build["shapes"] == {"pixel_values": {"min": [1, 3, 32, 32], "opt": [2, 3, 32, 32],
                                                      "max": [8, 3, 32, 32]}}
    (tmp_path / "targets.toml").write_text(fleet_text(STATIC))
    static = load_fleet(tmp_path / "targets.toml", tmp_path / "a").models["det"]
    assert static.shapes == {} and static.shape_points == () and static.build["shapes"] is None
    assert static.inputs == {"pixel_values": (1, 3, 32, 32)}
    # the older build.shapes table is read as the input's range
    legacy = '[models.det.build]\nshapes = { pixel_values = { min = [1, 3, 32, 32], opt = [1, 3, 32, 32], max = [2, 3, 32, 32] } }\n'
    (tmp_path / "targets.toml").write_text(fleet_text(STATIC, legacy))
    old = load_fleet(tmp_path / "targets.toml", tmp_path / "a").models["det"]
    assert old.shapes["pixel_values"]["max"] == (2, 3, 32, 32) and old.build["shapes"]["pixel_values"]["max"] == [2, 3, 32, 32]


def test_both_tensorrt_builders_get_the_profile_from_the_inputs(tmp_path):
    (tmp_path / "targets.toml").write_text(fleet_text(DYNAMIC % 8))
    model = load_fleet(tmp_path / "targets.toml", tmp_path / "a").models["det"]
    from kiln.backends.tensorrt import TensorRTBackend
    cfg = TrtBuildConfig.from_mapping(TensorRTBackend().build_settings(model.build))
    argv = build_argv("trtexec", "m.onnx", "m.plan", cfg, "10.3.0")
    assert {"--minShapes=pixel_values:1x3x32x32", "--optShapes=pixel_values:2x3x32x32",
            "--maxShapes=pixel_values:8x3x32x32"} <= set(argv)
    args = json.loads(api_build_argv("python3", "b.py", onnx="m.onnx", engine="m.plan", cfg=cfg)[-1])
    assert args["shapes"] == {"pixel_values": {"min": [1, 3, 32, 32], "opt": [2, 3, 32, 32], "max": [8, 3, 32, 32]}}


@pytest.mark.parametrize("inputs, extra, expected", [
    ("inputs = { pixel_values = { min = [4, 3, 32, 32], opt = [2, 3, 32, 32], max = [1, 3, 32, 32] } }", "",
     "need min <= opt <= max"),
    ("inputs = { pixel_values = { min = [1, 3, 32], opt = [2, 3, 32, 32], max = [4, 3, 32, 32] } }", "",
     "different ranks"),
    ("inputs = { pixel_values = { min = [1, 3, 32, 32], max = [4, 3, 32, 32] } }", "", "exactly min, opt and max"),
    (DYNAMIC % 4, '[models.det.export]\nexporter = "dynamo"\n', "dynamo exporter is not supported"),
    (DYNAMIC % 4, '[models.det.build]\nshapes = { pixel_values = { min = [1, 3, 32, 32], opt = [1, 3, 32, 32], '
                  'max = [1, 3, 32, 32] } }\n', "declared both in inputs and here"),
])
def test_a_bad_range_is_a_config_error_at_its_line(tmp_path, inputs, extra, expected):
    text = fleet_text(inputs, extra)
    message = config_error(tmp_path, text)
    assert expected in message, message
    key_line = next(i + 1 for i, line in enumerate(text.splitlines())
                    if line.startswith(("exporter", "shapes")) and extra or (not extra and line.startswith("inputs")))
    assert f"targets.toml:{key_line}:" in message, message


# -- the simulator keeps to trtexec's profile contract -------------------------------------

def test_trtexec_sim_refuses_shapes_outside_the_profile(tmp_path):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"\x08\x08\x12\x07pytorch" + b"Conv " * 20)
    env = {"PATH": "/usr/bin:/bin", "KILN_SIM_STATE": str(tmp_path / "state"), "KILN_SIM_BUILD_SECONDS": "0.01"}

    def run(*argv):
        return subprocess.run([sys.executable, str(SIM), *argv], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=60)
    built = run(f"--onnx={onnx}", "--saveEngine=m.plan", "--minShapes=x:1x3", "--optShapes=x:2x3",
                "--maxShapes=x:4x3", "--buildOnly")   # 8.5.2 (the sim default)
    assert built.returncode == 0, built.stdout + built.stderr
    assert json.loads((tmp_path / "state/builds.log").read_text())["profile"] == {
        "x": {"min": [1, 3], "opt": [2, 3], "max": [4, 3]}}
    inside = run("--loadEngine=m.plan", "--shapes=x:4x3")
    assert inside.returncode == 0 and "&&&& PASSED" in inside.stdout, inside.stderr
    for outside in ("x:5x3", "x:1x2", "x:4x3x1"):
        out = run("--loadEngine=m.plan", f"--shapes={outside}")
        assert out.returncode == 1 and "does not satisfy any optimization profile" in out.stderr, out.stderr
        assert "&&&& FAILED" in out.stdout
        with pytest.raises(BuildError, match="outside the engine's optimization profile"):
            check_trtexec_result(out.stdout + "\n" + out.stderr, out.returncode)
    bad = run(f"--onnx={onnx}", "--saveEngine=n.plan", "--minShapes=x:4x3", "--optShapes=x:2x3", "--maxShapes=x:4x3")
    assert bad.returncode == 1 and "MIN <= OPT <= MAX" in bad.stderr


# -- export and ONNX Runtime ----------------------------------------------------------------

def test_dynamic_batch_exports_verifies_at_min_opt_max_and_max_is_in_the_keys(tmp_path):
    import numpy as np
    import onnx
    import onnxruntime as ort

    from kiln.device_side.agent import load_arrays, reference_points

    p = dynamic_project(tmp_path, max_batch=4)
    first = p.doit("deploy:local")
    ref = load_arrays(str(p.artifacts / "onnx/tiny.reference.npz"))
    points = reference_points(ref)
    assert [(pt, feeds["pixel_values"].shape, out["logits"].shape) for pt, feeds, out in points] == [
        ("min", (1, 3, 32, 32), (1, 10, 5)), ("opt", (2, 3, 32, 32), (2, 10, 5)), ("max", (4, 3, 32, 32), (4, 10, 5))]
    graph = onnx.load(str(p.artifacts / "onnx/tiny.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "pixel_values_0"   # a dynamic axis
    current = tmp_path / "deploy/tiny/current"
    manifest = json.loads((current / "manifest.json").read_text())
    assert set(manifest["smoke_test"]["points"]) == {"min", "opt", "max"}, manifest["smoke_test"]
    assert all(r["ok"] for r in manifest["smoke_test"]["points"].values())
    # the deployed engine runs any batch in range, here 3 (not one of the points)
    session = ort.InferenceSession(str(current / "model.ort.onnx"), providers=["CPUExecutionProvider"])
    (logits, boxes) = session.run(None, {"pixel_values": np.zeros((3, 3, 32, 32), np.float32)})
    assert logits.shape == (3, 10, 5) and boxes.shape == (3, 10, 4)
    engine = current.resolve().name
    assert p.doit("deploy:local").ran() == set()

    # a new max: a new export (the ONNX records its ranges), a new engine, verified at the new max
    p.fleet.write_text(p.fleet.read_text().replace("max = [4, 3, 32, 32]", "max = [6, 3, 32, 32]"))
    again = p.doit("deploy:local")
    assert "export:tiny" in again.ran(), again.out
    assert current.resolve().name != engine, again.out
    ref = load_arrays(str(p.artifacts / "onnx/tiny.reference.npz"))
    assert ref["point.max.input.pixel_values"].shape == (6, 3, 32, 32)
    assert json.loads((current / "manifest.json").read_text())["smoke_test"]["points"]["max"]["shapes"] \
        == "pixel_values=6x3x32x32"
    assert first.returncode == 0


def test_dynamic_batch_on_a_simulated_jetson_builds_a_profile_and_verifies_each_point(tmp_path, new_fleet):
    sim = new_fleet()
    sim.add_device("orin-a", "orin-jp5")
    sim.start()
    p = fleet_project(tmp_path, sim, {"orin-a": {}})
    p.fleet.write_text(p.fleet.read_text().replace(STATIC, DYNAMIC % 4))
    run = p.doit("deploy:orin-a")
    [build] = sim.builds("orin-a")
    assert {"--minShapes=pixel_values:1x3x32x32", "--optShapes=pixel_values:2x3x32x32",
            "--maxShapes=pixel_values:4x3x32x32"} <= set(build["argv"]), build["argv"]
    # one trtexec run per point: the build's verification, which is also the smoke test of the
    # builder's own deploy (an engine is verified once per device)
    shapes = sorted(a for load in sim.loads("orin-a") for a in load["argv"] if a.startswith("--shapes="))
    assert shapes == ["--shapes=pixel_values:1x3x32x32", "--shapes=pixel_values:2x3x32x32",
                      "--shapes=pixel_values:4x3x32x32"], run.out
    manifest = json.loads((sim.srv("orin-a") / "kiln/tiny/current/manifest.json").read_text())
    assert set(manifest["smoke_test"]["points"]) == {"min", "opt", "max"}, manifest["smoke_test"]
    assert manifest["smoke_test"]["latency_ms"]["p99"] > 0
