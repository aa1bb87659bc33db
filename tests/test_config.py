"""The fleet file is checked before any work starts, with errors that say where and how to fix."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from kiln.config import load_fleet
from kiln.errors import ConfigError
from kiln_project import REPO

GOOD = """
[store]
url = "file://store"

[defaults.build]
precision = "fp16"

[models.det]
factory = "examples.tiny_detector:build_model"
checkpoint = "ckpt/det.pt"
inputs = { pixel_values = [1, 3, 32, 32] }
outputs = ["logits", "pred_boxes"]

[models.det.build]
workspace_mib = 2048

[targets.orin-01]
transport = "ssh"
backend = "tensorrt"
host = "orin-01.lab"
models = ["det"]
groups = ["jetsons"]
install_dir = "/opt/kiln"

[targets.local]
models = ["det"]
install_dir = "deploy"
"""


def load(tmp_path, text):
    path = tmp_path / "targets.toml"
    path.write_text(textwrap.dedent(text))
    return load_fleet(path, tmp_path / "artifacts")


def error(tmp_path, text) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return str(info.value)


def test_a_good_fleet_loads_with_defaults_applied(tmp_path):
    fleet = load(tmp_path, GOOD)
    det = fleet.models["det"]
    assert det.checkpoint == tmp_path / "ckpt/det.pt"
    assert det.build["precision"] == "fp16" and det.build["workspace_mib"] == 2048
    assert det.export == {"opset": 17, "exporter": "torchscript"}
    orin = fleet.targets["orin-01"]
    assert orin.transport == "ssh" and orin.python == "python3" and orin.host == "orin-01.lab"
    assert orin.trtexec == "/usr/src/tensorrt/bin/trtexec"
    assert fleet.targets["local"].install_dir == str(tmp_path / "deploy")
    assert fleet.store_url == "file://store"
    assert fleet.groups() == {"jetsons": ["orin-01"]}


@pytest.mark.parametrize("change, expected", [
    (("install_dir = \"deploy\"", "install_dir = \"deploy\"\ncolour = \"red\""),
     ["targets.local.colour: unknown key", "fix: remove it or use one of:"]),
    (("workspace_mib = 2048", "workspace_mib = \"2G\""),
     ["models.det.build.workspace_mib: must be an integer, got a string '2G'"]),
    (("models = [\"det\"]\ngroups", "models = [\"dett\"]\ngroups"),
     ["targets.orin-01.models: unknown model 'dett'", "define [models.dett]"]),
    (("[targets.local]", "[targets.\"bad name!\"]"),
     ["invalid target name 'bad name!'", "[A-Za-z0-9._-]"]),
    (("[targets.local]\nmodels", "[targets.orin-01]\nmodels"),
     ["not valid TOML", "duplicate target"]),
    (("install_dir = \"/opt/kiln\"", "install_dir = \"opt/kiln\""),
     ["targets.orin-01.install_dir: must be an absolute path on the device"]),
    (("backend = \"tensorrt\"", "backend = \"tensorflow\""),
     ["targets.orin-01.backend: must be one of onnxruntime, tensorrt"]),
    (("factory = \"examples.tiny_detector:build_model\"", "factory = \"examples/tiny_detector.py\""),
     ["models.det.factory: must look like 'package.module:function'"]),
    (("inputs = { pixel_values = [1, 3, 32, 32] }", "inputs = { pixel_values = [1, 3, -32, 32] }"),
     ["models.det.inputs", "positive integers"]),
    (("groups = [\"jetsons\"]", "groups = [\"local\"]"),
     ["a group has the same name as a target"]),
])
def test_bad_fleet_files_name_file_line_key_and_fix(tmp_path, change, expected):
    old, new = change
    assert old in GOOD
    message = error(tmp_path, GOOD.replace(old, new, 1))
    assert str(tmp_path / "targets.toml") in message
    for part in expected:
        assert part in message, message


def test_errors_point_at_the_line(tmp_path):
    message = error(tmp_path, GOOD.replace("install_dir = \"deploy\"", "install_dir = \"deploy\"\ncolour = 1"))
    line = textwrap.dedent(GOOD.replace("install_dir = \"deploy\"", "install_dir = \"deploy\"\ncolour = 1")) \
        .splitlines().index("colour = 1") + 1
    assert f"targets.toml:{line}:" in message


def test_missing_required_key(tmp_path):
    message = error(tmp_path, GOOD.replace("checkpoint = \"ckpt/det.pt\"\n", ""))
    assert "models.det: missing required key 'checkpoint'" in message


def test_doit_reports_a_bad_fleet_before_any_work(tmp_path):
    bad = tmp_path / "targets.toml"
    bad.write_text(textwrap.dedent(GOOD).replace("[targets.local]", "[targets.local]\nport = \"22\""))
    env = {"KILN_TARGETS": str(bad), "KILN_ARTIFACTS": str(tmp_path / "artifacts"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "doit", "list"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "targets.local.port: must be an integer" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "artifacts" / "logs").exists()


@pytest.mark.parametrize("change, expected", [
    (("precision = \"fp16\"", "precision = \"fp8\""), "precision"),
    (("workspace_mib = 2048", "workspace_mib = 0"), "workspace_mib"),
    (("workspace_mib = 2048", "workspace_mib = 2048\noptimization_level = 9"), "optimization_level"),
])
def test_tensorrt_build_settings_are_checked_when_the_fleet_is_loaded(tmp_path, change, expected):
    """One validator (TrtBuildConfig), run for the models a tensorrt target uses, before any work."""
    from kiln.pipeline.context import Context
    path = tmp_path / "targets.toml"
    path.write_text(textwrap.dedent(GOOD).replace(*change, 1))
    load_fleet(path, tmp_path / "artifacts")  # types are fine: the schema alone accepts it
    with pytest.raises(ConfigError) as err:
        Context.load(path, tmp_path / "artifacts")
    message = str(err.value)
    assert f"{path}:" in message and "models.det.build" in message and expected in message, message
    # a model that only CPU targets run is not held to TensorRT's rules
    cpu_only = textwrap.dedent(GOOD).replace(*change, 1).replace("backend = \"tensorrt\"", "backend = \"onnxruntime\"")
    path.write_text(cpu_only)
    Context.load(path, tmp_path / "artifacts")
