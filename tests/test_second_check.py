"""`verify_on = 2`: a new engine is checked on a second member of its class before it is published."""
from __future__ import annotations

import json

from kiln_project import Project

SECOND = """
[targets.bench-b]
models = ["tiny"]
install_dir = "deploy-b"
"""


def project(tmp_path, verify_on: int, second: bool) -> Project:
    p = Project(tmp_path, extra=f"\n[defaults.build]\nverify_on = {verify_on}\n")
    if second:
        p.fleet.write_text(p.fleet.read_text() + SECOND)
    return p


def test_a_new_engine_is_checked_on_a_second_member_before_it_is_published(tmp_path):
    p = project(tmp_path, 2, second=True)
    p.doit("fingerprint")  # both members recorded: the class has two
    run = p.doit("deploy:local")
    assert "verify_on = 2: checking engine" in run.out and "on bench-b too" in run.out, run.out
    (key,) = p.store_engines()
    manifest = json.loads(next((p.artifacts / "store/entries/engines").rglob("manifest.json")).read_text())
    assert manifest["built_on"] == "local"
    assert manifest["verification"]["second_member"]["target"] == "bench-b"
    assert manifest["verification"]["second_member"]["ok"] is True
    inputs = [f.name for f in (tmp_path / "deploy-b/.kiln/inputs").iterdir()]
    assert any(name.startswith(manifest["sha256"]) for name in inputs), inputs  # the builder's bytes, not a rebuild
    assert p.active() == key and not (tmp_path / "deploy-b/tiny/current").exists()  # checked there, not deployed


def test_verify_on_2_without_a_second_member_fails_and_publishes_nothing(tmp_path):
    p = project(tmp_path, 2, second=False)
    run = p.doit("deploy:local", check=False)
    assert run.returncode != 0
    assert "verify_on = 2: no second member of class" in run.out and "the class has no other recorded member" in run.out, run.out
    assert p.store_engines() == [] and p.active() is None


def test_verify_on_must_be_1_or_2(tmp_path):
    p = project(tmp_path, 3, second=False)
    run = p.doit("list", check=False)
    assert run.returncode == 2 and "defaults.build.verify_on: must be 1 or 2" in run.out, run.out
