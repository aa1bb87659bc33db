"""Build settings per (model, target): `[targets.<t>.build]` overrides the build settings of every
model the target runs, `[targets.<t>.model_build.<m>]` those of one model. A target whose effective
settings differ from the model's own gets its own engine (a variant `<model>~<digest>`): two targets
of one hardware class with different settings get two engines, two with the same overrides share one,
and without overrides nothing changes (names, keys, records)."""
from __future__ import annotations

import json
import textwrap

import pytest

from kiln.config import load_fleet
from kiln.errors import ConfigError
from kiln.pipeline.context import Context

from test_config import GOOD
from test_fleet import builds, fleet_project

TWO_ORINS = GOOD.replace('[targets.local]', '''[targets.orin-02]
transport = "ssh"
backend = "tensorrt"
models = ["det"]
install_dir = "/opt/kiln"

[targets.local]''')


def load(tmp_path, text):
    path = tmp_path / "targets.toml"
    path.write_text(textwrap.dedent(text))
    return load_fleet(path, tmp_path / "artifacts")


def test_no_override_is_the_model_itself_and_an_override_makes_a_named_variant(tmp_path):
    fleet = load(tmp_path, TWO_ORINS)
    assert fleet.model_for("orin-01", "det") is fleet.models["det"]
    assert fleet.models["det"].engine_name == "det" and fleet.models["det"].variant == ""

    text = TWO_ORINS + '\n[targets.orin-01.build]\nprecision = "int8"\n'
    fleet = load(tmp_path, text)
    mine, other = fleet.model_for("orin-01", "det"), fleet.model_for("orin-02", "det")
    assert mine.build["precision"] == "int8" and mine.build["workspace_mib"] == 2048   # the rest is the model's
    assert other is fleet.models["det"] and other.build["precision"] == "fp16"
    assert len(mine.variant) == 6 and mine.engine_name == f"det~{mine.variant}"

    # the same override on the other target: the same variant (one engine for both); one that
    # repeats the model's own value is no override at all
    both = text.replace('install_dir = "/opt/kiln"\n\n[targets.local]',
                        'install_dir = "/opt/kiln"\nbuild = { precision = "int8" }\n\n[targets.local]')
    fleet = load(tmp_path, both)
    assert fleet.model_for("orin-02", "det").variant == mine.variant
    same = TWO_ORINS + '\n[targets.orin-01.build]\nprecision = "fp16"\n'
    assert load(tmp_path, same).model_for("orin-01", "det") is not None
    assert load(tmp_path, same).model_for("orin-01", "det").variant == ""


def test_a_per_model_override_wins_over_the_targets_build(tmp_path):
    text = TWO_ORINS + textwrap.dedent('''
        [targets.orin-01.build]
        precision = "int8"
        workspace_mib = 1024

        [targets.orin-01.model_build.det]
        precision = "fp32"
        ''')
    model = load(tmp_path, text).model_for("orin-01", "det")
    assert (model.build["precision"], model.build["workspace_mib"]) == ("fp32", 1024)


@pytest.mark.parametrize("extra, where, words", [
    ('\n[targets.orin-01.build]\nshapes = { pixel_values = { min = [1, 3, 32, 32], opt = [1, 3, 32, 32], '
     'max = [2, 3, 32, 32] } }\n', "targets.orin-01.build.shapes", "cannot be overridden per target"),
    ('\n[targets.orin-01.model_build.other]\nprecision = "fp32"\n', "targets.orin-01.model_build.other",
     "is not one of the target's models"),
    ('\n[targets.orin-01.build]\nprecison = "fp32"\n', "targets.orin-01.build.precison", "unknown key"),
    ('\n[targets.orin-01.build]\nworkspace_mib = "big"\n', "targets.orin-01.build.workspace_mib", "must be an integer"),
])
def test_bad_overrides_are_refused_at_their_line(tmp_path, extra, where, words):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, TWO_ORINS + extra)
    message = str(info.value)
    assert where in message and words in message, message
    assert f"{tmp_path / 'targets.toml'}:" in message


def test_an_override_value_tensorrt_refuses_points_at_the_targets_line(tmp_path):
    text = TWO_ORINS + '\n[targets.orin-02.model_build.det]\nprecision = "fp8"\n'
    path = tmp_path / "targets.toml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as info:
        Context.load(path, tmp_path / "artifacts")
    message = str(info.value)
    line = textwrap.dedent(text).split("\n").index('precision = "fp8"') + 1
    assert f"{path}:{line}: targets.orin-02.model_build.det.precision" in message, message


def test_two_targets_of_one_class_with_different_settings_get_two_engines(tmp_path, new_fleet):
    sim = new_fleet()
    for name in ("orin-a", "orin-b", "orin-c"):
        sim.add_device(name, "orin-jp5")
    sim.start()
    p = fleet_project(tmp_path, sim, {"orin-a": {}, "orin-b": {}, "orin-c": {}})
    # orin-b and orin-c run tiny in fp32 (the model's own precision is the default, fp16)
    p.fleet.write_text(p.fleet.read_text() + '\n[targets.orin-b.model_build.tiny]\nprecision = "fp32"\n'
                       '\n[targets.orin-c.build]\nprecision = "fp32"\n')
    first = p.doit("-n", "2", "deploy")
    assert first.returncode == 0, first.out
    names = ["orin-a", "orin-b", "orin-c"]
    assert builds(sim, names) == 2, first.out                           # one per (class, settings)
    precisions = sorted(b["precision"] for n in names for b in sim.builds(n))
    assert precisions == ["fp16", "fp32"]
    engines = sorted(first.engines())
    assert len(engines) == 2 and engines[0].startswith("engine:tiny@") and engines[1].startswith("engine:tiny~")
    released = {n: (sim.srv(n) / "kiln/tiny/current").resolve().name for n in names}
    assert released["orin-b"] == released["orin-c"] != released["orin-a"]
    records = sorted(f.name for f in (p.artifacts / "engines").glob("*.json"))
    assert len(records) == 2 and records[0].startswith("tiny@") and records[1].startswith("tiny~"), records
    assert json.loads((p.artifacts / "engines" / records[1]).read_text())["variant"] == engines[1].split("~")[1].split("@")[0]
    listed = p.doit("list", "--all", "engine").out
    assert engines[0] in listed and engines[1] in listed, listed
    code, report, _ = p.doit_json("cache-check", "--json")
    assert code == 0 and len(report["engines"]) == 2, report

    second = p.doit("-n", "2", "deploy")
    assert second.ran() == set() and builds(sim, names) == 2, second.out
