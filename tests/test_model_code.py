"""All of the model's code in the export key (kiln/model_code.py): a factory next to the fleet file
that imports a helper module, and a third-party package installed in a site-packages folder.
Real doit runs, real torch export, real ONNX Runtime, local deploy."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kiln.devices.local_probe import package_version
from kiln_project import Project, doit_watching_imports

FACTORY = '''\
import torch
from examples.tiny_detector import build_model
from kiln_mc_helpers import scaled
import kiln_mc_dep


class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = build_model()

    def forward(self, pixel_values):
        logits, boxes = self.inner(pixel_values)
        return scaled(logits), boxes


def build():
    return Scaled()
'''

HELPER = '''\
# helper module of the model: the deployed engine must follow it
SCALE = {scale}


def scaled(x):
    return x * SCALE
'''


def _install_dep(site: Path, version: str) -> None:
    """A pure-Python distribution as pip lays it out: the package and its .dist-info (a pip upgrade
    replaces the .dist-info folder with the new version's)."""
    for old in site.glob("kiln_mc_dep-*.dist-info"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    (site / "kiln_mc_dep").mkdir(parents=True, exist_ok=True)
    (site / "kiln_mc_dep" / "__init__.py").write_text(f"VERSION = {version!r}\n")
    info = site / f"kiln_mc_dep-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kiln-mc-dep\nVersion: {version}\n")
    (info / "top_level.txt").write_text("kiln_mc_dep\n")
    (info / "RECORD").write_text("")


@pytest.fixture
def project(tmp_path, monkeypatch):
    p = Project(tmp_path)
    p.fleet.write_text(p.fleet.read_text().replace("examples.tiny_detector:build_model", "kiln_mc_model:build"))
    (tmp_path / "kiln_mc_model.py").write_text(FACTORY)
    (tmp_path / "kiln_mc_helpers.py").write_text(HELPER.format(scale="1.0"))
    p.site = tmp_path / "venv" / "site-packages"
    _install_dep(p.site, "1.0")
    monkeypatch.setenv("PYTHONPATH", str(p.site))  # the installed package; doit runs see it through Project.env
    first = p.doit("deploy:local")
    assert "export:tiny" in first.ran() and len(first.engines()) == 1, first.out
    return p


def provenance(p: Project) -> dict:
    return json.loads((p.artifacts / "onnx" / "tiny.provenance.json").read_text())


def test_the_export_records_the_model_code_and_a_noop_reads_nothing(project):
    code = provenance(project)["code"]
    modules = {m["module"]: m for m in code["modules"]}
    # the factory, its helper next to it, and the checkout's module it builds on; not the installed package
    assert set(modules) == {"kiln_mc_model", "kiln_mc_helpers", "examples", "examples.tiny_detector"}, modules
    assert modules["kiln_mc_helpers"]["file"] == str((project.root / "kiln_mc_helpers.py").resolve())
    assert code["packages"] == {"kiln-mc-dep": "1.0", "torch": package_version("torch")}
    assert set(provenance(project)["inputs"]["code"]["modules"]) == set(modules)

    proc, heavy = doit_watching_imports(
        project.env, ["deploy:local"], ("torch", "onnx", "onnxruntime", "kiln_mc_model", "kiln_mc_helpers", "kiln_mc_dep"),
        after="import dodo; print('BYTES', dodo.project.ctx.hashes.bytes_read)")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BYTES 0\n" in proc.stdout and heavy == set(), proc.stdout
    lines = [l for l in proc.stdout.splitlines() if l.startswith(("-- ", ".  "))]
    assert lines and all(l.startswith("-- ") for l in lines), proc.stdout


def test_helper_changes_reexport_comment_only_stops_at_early_cutoff(project):
    before = project.active()
    helper = project.root / "kiln_mc_helpers.py"

    helper.write_text("# the scale of the logits, see the paper\n" + HELPER.format(scale="1.0"))
    run = project.doit("deploy:local")
    assert "export:tiny" in run.ran(), run.out
    assert "same ONNX bytes" in run.out and "module kiln_mc_helpers changed" in run.out, run.out
    assert not run.engines() and "deploy:local" not in run.ran(), run.out
    assert project.active() == before
    last = [e for e in project.events() if e["task"] == "export:tiny"][-1]
    assert last["event"] == "export" and "module kiln_mc_helpers changed" in last["why"]
    later = project.events()[project.events().index(last) + 1:]
    assert not [e for e in later if e["event"] in ("build", "publish", "deploy")], later

    helper.write_text(HELPER.format(scale="2.0"))
    run = project.doit("deploy:local")
    assert "export:tiny" in run.ran() and "deploy:local" in run.ran(), run.out
    assert len(run.engines("publish")) == 1, run.out
    after = project.active()
    assert after and after != before
    assert len(project.store_engines()) == 2


def test_a_package_upgrade_reexports(project):
    _install_dep(project.site, "1.1")
    run = project.doit("export:tiny")
    assert "export:tiny" in run.ran(), run.out
    assert "package kiln-mc-dep 1.0 -> 1.1" in run.out, run.out
    assert provenance(project)["code"]["packages"]["kiln-mc-dep"] == "1.1"
    assert project.doit("export:tiny").ran() == set()
