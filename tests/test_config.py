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
    assert det.export == {"opset": 17, "exporter": "torchscript", "external_data": "auto", "quantize": None}
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


# -- malformed TOML: the line at fault, quoted, in plain words -----------------------------------

def _line(text: str, marker: str) -> int:
    """1-based number of the line of `text` (dedented) that contains `marker`."""
    return next(i for i, l in enumerate(textwrap.dedent(text).split("\n"), 1) if marker in l)


MALFORMED = [
    # (change to GOOD, the line the message must point at, words it must use)
    pytest.param(("[targets.local]\nmodels", "[targets.orin-01]\nmodels"), "[targets.orin-01]", 2,
                 ["[targets.orin-01] is defined twice (first at line {first})", "a duplicate target",
                  "merge the two [targets.orin-01] tables"], id="table-twice"),
    # tomllib reports a key set twice after its whole value, here three lines further
    pytest.param(("groups = [\"jetsons\"]", "groups = [\"jetsons\"]\nmodels = [\n  \"det\",\n]"), "models = [", 2,
                 ["the key models is set twice in the same table (first at line {first})"], id="key-twice-multiline"),
    pytest.param(("host = \"orin-01.lab\"", "host = \"orin-01.lab"), "host = \"orin-01.lab", 1,
                 ["a string is missing its closing quote"], id="missing-quote"),
    # tomllib reports an unclosed array at the next key
    pytest.param(("groups = [\"jetsons\"]", "groups = [\"jetsons\""), "groups = [\"jetsons\"", 1,
                 ["the array [ opened on this line is never closed", "add the closing ]"], id="unclosed-array"),
    pytest.param(("inputs = { pixel_values = [1, 3, 32, 32] }", "inputs = { pixel_values = [1, 3, 32, 32],\n"
                  "           other = [1] }"), "inputs = {", 1,
                 ["the inline table {{ opened on this line is not closed on this line"], id="inline-table-two-lines"),
    pytest.param(("install_dir = \"/opt/kiln\"", "install_dir = \"C:\\kiln\""), "install_dir = \"C:", 1,
                 ["a backslash", "'literal string'"], id="backslash"),
    pytest.param(("precision = \"fp16\"", "precision = fp16"), "precision = fp16", 1,
                 ["the value after = is not a TOML value"], id="unquoted-string"),
]


@pytest.mark.parametrize("change, marker, nth, words", MALFORMED)
def test_malformed_toml_points_at_the_real_line(tmp_path, change, marker, nth, words):
    text = GOOD.replace(*change, 1)
    lines = textwrap.dedent(text).split("\n")
    hits = [i for i, l in enumerate(lines, 1) if marker in l]
    line, first = hits[nth - 1], hits[0]
    message = error(tmp_path, text)
    head, quoted = message.splitlines()[:2]
    assert head.startswith(f"{tmp_path / 'targets.toml'}:{line}: not valid TOML: "), message
    assert quoted == f"  {line:>5} | {lines[line - 1]}", message
    for word in words:
        assert word.format(first=first) in message, message
    assert "Cannot declare" not in message and "(at line" not in message  # tomllib's wording and position


def test_a_string_left_open_to_the_end_of_the_file_points_at_its_start(tmp_path):
    text = textwrap.dedent(GOOD) + "\n[targets.extra]\nmodels = [\"det\"]\ninstall_dir = \"/srv/kiln\n"
    message = error(tmp_path, text)
    line = text.split("\n").index("install_dir = \"/srv/kiln") + 1
    assert message.startswith(f"{tmp_path / 'targets.toml'}:{line}: not valid TOML: a string is missing its closing quote")


# -- python_path ---------------------------------------------------------------------------------

def test_python_path_folders_are_resolved_after_the_fleet_files_own(tmp_path):
    (tmp_path / "src").mkdir()
    fleet = load(tmp_path, 'python_path = ["src", "."]\n' + GOOD)
    assert fleet.models["det"].factory_path == (tmp_path, tmp_path / "src")


def test_a_missing_python_path_folder_is_refused_at_its_line(tmp_path):
    message = error(tmp_path, '# models live elsewhere\npython_path = ["../nope"]\n' + GOOD)
    assert message.startswith(f"{tmp_path / 'targets.toml'}:2: python_path: folder '../nope'"), message
    assert "relative to the fleet file" in message


def test_python_path_below_a_table_says_it_is_a_top_level_key(tmp_path):
    message = error(tmp_path, GOOD.replace("[store]\nurl = \"file://store\"",
                                           "[store]\nurl = \"file://store\"\npython_path = [\"src\"]"))
    assert "store.python_path: unknown key" in message and "move it above the first [table]" in message
