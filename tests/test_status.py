"""Status and release planning as pure functions: the device's answer parsed the same way from
the shell script and from the local reader, the plan per model, and both table renderers."""
from __future__ import annotations

import io
import os
import subprocess

import pytest

from kiln.config import Target
from kiln.devices.workarea import _RELEASE_STATE, ReleaseState, _local_release_state, parse_release_state
from kiln.errors import DeployError
from kiln.pipeline.releases import plan_release
from kiln.pipeline.status import format_status, print_status_table

A, B, C = "a" * 64, "b" * 64, "c" * 64


def target(pin: dict | None = None) -> Target:
    return Target("orin-03", "ssh", "tensorrt", ("det",), (), "/opt/kiln", {"pin": pin or {}})


def install_dir(tmp_path):
    det = tmp_path / "det"
    for key in (A, B):
        (det / "releases" / key).mkdir(parents=True)
    os.symlink(f"releases/{A}", det / "current")
    os.symlink(f"releases/{B}", det / "previous")
    (det / "releases" / A / "manifest.json").write_text(
        '{\n  "deployed_at": "2026-12-06T10:00:00+0000",\n  "smoke_test": {"latency_ms": {"median": 3.25}},\n'
        '  "note": "a line\\nbreak inside a string"\n}\n')
    (det / "hold.json").write_text('{"release": "%s", "wanted": "%s"}' % (A, C))
    (tmp_path / "gone" / "releases" / C).mkdir(parents=True)
    os.symlink(f"releases/{C}", tmp_path / "gone" / "current")
    (tmp_path / ".kiln").mkdir()
    return tmp_path


def test_the_shell_script_and_the_local_reader_agree(tmp_path):
    root = str(install_dir(tmp_path))
    remote = subprocess.run(["sh", "-c", _RELEASE_STATE, "kiln-state", root, "det", "new"],
                            capture_output=True, text=True, check=True).stdout
    states, others = parse_release_state(remote, ["det", "new"])
    assert (states, others) == parse_release_state(_local_release_state(root, ["det", "new"]), ["det", "new"])
    det = states["det"]
    assert (det.current, det.previous, det.hold["wanted"]) == (A, B, C)
    assert det.latency_ms == 3.25 and det.deployed_at.startswith("2026-12-06")
    assert det.manifest["note"] == "a line\nbreak inside a string"
    assert states["new"] == ReleaseState("new") and others == {"gone": C}


def test_a_plan_follows_pins_then_holds_then_the_wanted_engine():
    state = ReleaseState("det", current=A, previous=B, hold={"release": A, "wanted": C, "at": "then"})
    assert plan_release(target(), "det", C, state).source == "hold"           # wanted unchanged: held
    assert plan_release(target(), "det", "d" * 64, state).key == "d" * 64     # a new engine ends it
    pinned = plan_release(target({"det": B[:8]}), "det", C, state)
    assert (pinned.source, pinned.key) == ("pin", B)                           # a pin wins over a hold
    with pytest.raises(DeployError, match="pinned to 'eeeeee'.*active aaaaaaaaaaaa, previous bbbbbbbbbbbb"):
        plan_release(target({"det": "eeeeee"}), "det", C, state)
    fresh = plan_release(target(), "det", C, ReleaseState("det"))
    assert (fresh.source, fresh.key) == ("engine", C)


ROWS = [{"target": "orin-03", "model": "det", "class": "orin-jp6", "wanted": C, "active": A, "previous": B,
         "state": "differs from wanted", "deployed_at": "2026-12-06T10:00:00+0000", "latency_ms": 3.25,
         "drift": ["TensorRT 8.5.2 → 10.3.0"], "why": ["the device runs aaaaaaaaaaaa"]},
        {"target": "orin-04", "model": "det", "class": None, "wanted": None, "active": None, "previous": None,
         "state": "unreachable", "deployed_at": None, "latency_ms": None, "drift": [], "why": ["no route"]}]


def test_the_plain_table_is_aligned_and_says_why():
    lines = format_status(ROWS).splitlines()
    header, first, note, second = lines[0], lines[1], lines[2], lines[3]
    assert header.index("state") == first.index("differs from wanted") == second.index("unreachable")
    assert "aaaaaaaaaaaa" in first and "3.2" in first and "TensorRT 8.5.2 → 10.3.0" in note


def test_the_rich_table_shows_every_row():
    out = io.StringIO()
    print_status_table(ROWS, out, width=200)
    text = out.getvalue()
    assert "orin-03" in text and "orin-04" in text and "differs from wanted" in text and "unreachable" in text
