"""Errors a person can act on: a read-only or full folder, a missing program, a pickled checkpoint,
a factory module next to the fleet file. Real doit runs in subprocesses; read-only and full file
systems are real mounts (a read-only bind mount, a tiny tmpfs) in a private mount namespace of the
doit process, so nothing on this machine changes. Exit codes: 1 a task failed, 2 nothing could
start (fleet file, artifacts folder), 3 doit's own (an unknown task)."""
from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.errors import ExportError, ResourceError, TransportError
from kiln.oserrors import Place, resource_error, translated
from kiln_project import REPO, Project, Run, python

TORCH_ADVICE = "weights_only=False"


# -- real mounts in a private mount namespace ----------------------------------------------

def _mounts_unusable() -> str | None:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "needs Linux and root (mount namespaces); CI runs as root"
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare/mount not found (util-linux)"
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(tmp)}"],
                              capture_output=True, text=True, timeout=20)
    return None if proc.returncode == 0 else f"mounts not permitted here: {proc.stderr.strip()[:200]}"


UNUSABLE = _mounts_unusable()
needs_mounts = pytest.mark.skipif(UNUSABLE is not None, reason=str(UNUSABLE))


def read_only(folder: Path) -> str:
    q = shlex.quote(str(folder))
    return f"mkdir -p {q} && mount --bind {q} {q} && mount -o remount,bind,ro {q}"


def full(folder: Path) -> str:
    """A 64 kB tmpfs at `folder`, filled up: the next write that needs a page gets ENOSPC."""
    q = shlex.quote(str(folder))
    return (f"mkdir -p {q} && mount -t tmpfs -o size=64k kiln-full {q} && "
            f"(dd if=/dev/zero of={q}/.filler bs=4096 count=64 2>/dev/null || true)")


def doit_mounted(p: Project, mounts: list[str], *args: str, timeout: float = 300) -> Run:
    """`doit args` with `mounts` applied in its own mount namespace (gone when it exits)."""
    env = {k: v for k, v in p.env.items() if k != "PYTHONPATH"}
    script = " && ".join(mounts) + ' && exec "$0" -m doit "$@"'
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                           sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return Run(proc.returncode, proc.stdout)


def one_line_reason(run: Run, task: str) -> str:
    lines = [l for l in run.out.splitlines() if l.startswith(f"  FAILED  {task}: ")]
    assert len(lines) == 1, run.out
    return lines[0]


@needs_mounts
def test_a_read_only_install_dir_is_one_line_naming_it_exit_1(tmp_path):
    p = Project(tmp_path)
    run = doit_mounted(p, [read_only(tmp_path / "deploy")], "deploy:local")
    assert run.returncode == 1, run.out
    assert "Traceback" not in run.out and "PythonAction Error" not in run.out, run.out
    reason = one_line_reason(run, "deploy:local")
    assert f"read-only file system: cannot write {tmp_path / 'deploy'}" in reason, run.out
    assert "the install_dir of target local" in reason
    assert f"fix: remount {tmp_path / 'deploy'} read-write, or set install_dir of [targets.local]" in run.out
    assert p.active() is None


@needs_mounts
def test_a_read_only_artifacts_folder_fails_the_export_and_the_deploy_exits_1(tmp_path):
    p = Project(tmp_path)
    run = doit_mounted(p, [read_only(p.artifacts / "onnx")], "deploy:local")
    assert run.returncode == 1, run.out  # the deploy was not run because its export failed: still 1, not 2
    assert "Traceback" not in run.out, run.out
    reason = one_line_reason(run, "export:tiny")
    assert f"read-only file system: cannot write {p.artifacts / 'onnx'}" in reason
    assert "the artifacts folder" in reason
    assert "point KILN_ARTIFACTS at another folder that is writable" in run.out
    assert "not run: depends on failed export:tiny" in one_line_reason(run, "deploy:local")


@needs_mounts
def test_a_full_disk_during_export_says_so_not_try_the_other_exporter(tmp_path):
    p = Project(tmp_path)
    run = doit_mounted(p, [full(p.artifacts / "onnx")], "export:tiny")
    assert run.returncode == 1, run.out
    assert "Traceback" not in run.out, run.out
    reason = one_line_reason(run, "export:tiny")
    assert f"no space left on device: cannot write {p.artifacts / 'onnx'}" in reason, run.out
    assert f"free on {p.artifacts / 'onnx'}" in reason
    assert "other exporter" not in run.out
    assert "point KILN_ARTIFACTS at another folder on a disk with room" in run.out


@needs_mounts
def test_a_full_artifacts_disk_stops_before_any_task_exit_2(tmp_path):
    p = Project(tmp_path)
    run = doit_mounted(p, [full(p.artifacts)], "export:tiny", timeout=60)
    assert run.returncode == 2, run.out
    assert "Traceback" not in run.out, run.out
    assert f"enginekiln: no space left on device: cannot write {p.artifacts / '.lock'}" in run.out
    assert "export:tiny" not in run.out  # nothing ran


@needs_mounts
def test_a_report_written_into_a_read_only_folder_names_the_file(tmp_path):
    p = Project(tmp_path)
    junit = tmp_path / "reports" / "cache.xml"
    run = doit_mounted(p, [read_only(junit.parent)], "cache-check", "--junit", str(junit), timeout=60)
    assert run.returncode == 1 and "Traceback" not in run.out, run.out
    assert f"read-only file system: cannot write {junit} (mounted read-only at {junit.parent})" in run.out


# -- the translator, with real OSErrors ------------------------------------------------

def test_enospc_from_dev_full_names_the_file_the_free_space_and_the_setting(tmp_path):
    place = Place(Path("/dev"), "the artifacts folder", "point KILN_ARTIFACTS at another folder")
    with pytest.raises(ResourceError) as info:
        with translated(path="/dev/full", places=[place]):
            with open("/dev/full", "wb", buffering=0) as f:
                f.write(b"x")  # a real ENOSPC: the write names no file, `path` does
    err = info.value
    assert err.errno == errno.ENOSPC and err.path == "/dev/full"
    assert str(err).startswith("no space left on device: cannot write /dev/full (the artifacts folder; ")
    assert "\n  fix: free space on " in str(err) and "point KILN_ARTIFACTS at another folder on a disk with room" in str(err)
    assert isinstance(err.__cause__, OSError)


def test_a_wrapped_oserror_is_found_and_other_errors_are_left_alone(tmp_path):
    try:
        raise RuntimeError("exporter failed") from OSError(errno.EROFS, "Read-only file system", str(tmp_path / "x"))
    except RuntimeError as exc:
        err = resource_error(exc)
    assert err is not None and f"read-only file system: cannot write {tmp_path / 'x'}" in str(err)
    try:
        open(tmp_path / "missing" / "file")
    except OSError as exc:
        assert resource_error(exc) is None  # a missing data file is not explained away: it stays a bug
    assert resource_error(KeyError("x")) is None


def test_a_missing_program_names_it_and_the_setting(tmp_path):
    try:
        subprocess.run([str(tmp_path / "trtexec")])
    except OSError as exc:
        err = resource_error(exc)  # found as a program from where it was raised
    assert err is not None and str(err).startswith(f"program not found: {tmp_path / 'trtexec'}")

    from kiln.transports.local import LocalTransport
    with pytest.raises(TransportError) as info:
        LocalTransport("edge", python=str(tmp_path / "python3")).run([str(tmp_path / "python3"), "-V"])
    text = str(info.value)
    assert f"program not found: {tmp_path / 'python3'}" in text
    assert "fix: set python of [targets.edge] in the fleet file" in text


# -- checkpoints and factories next to the fleet file --------------------------------

NETMOD = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x).relu()


def build():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        return Net()
'''

MODEL = """
[models.{name}]
factory = "{factory}"
checkpoint = "ckpt/{file}"
inputs = {{ x = [1, 4] }}
outputs = ["y"]
"""

SAVE = """
import argparse, pathlib, sys, torch
from safetensors.torch import save_file
sys.path.insert(0, {folder!r})
import netmod
m = netmod.build()
sd = m.state_dict()
torch.save(sd, "ckpt/plain.pt")
torch.save({{"epoch": 3, "global_step": 30, "pytorch-lightning_version": "2.4.0",
            "state_dict": {{"model." + k: v for k, v in sd.items()}},
            "optimizer_states": [{{"state": {{}}, "param_groups": [{{"lr": 0.1, "params": [0, 1]}}]}}],
            "hyper_parameters": {{"args": argparse.Namespace(lr=0.1), "root": pathlib.PosixPath("/data")}}}},
           "ckpt/lightning.ckpt")
save_file(sd, "ckpt/weights.safetensors")
torch.save(m, "ckpt/whole.pt")
"""


def test_checkpoint_formats_and_factories_found_next_to_the_fleet_file(tmp_path):
    """One export run, no PYTHONPATH: a factory module next to the fleet file and one in python_path;
    a state_dict, a Lightning-style checkpoint (prefix `model.`, hyper-parameters that are not plain
    data) and a safetensors file give the same ONNX bytes; a pickled whole model is refused without
    torch's advice to load it with weights_only=False."""
    (tmp_path / "netmod.py").write_text(NETMOD)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "srcmod.py").write_text(NETMOD)
    (tmp_path / "ckpt").mkdir()
    python(f"import os; os.chdir({str(tmp_path)!r})\n" + SAVE.format(folder=str(tmp_path)))
    p = Project(tmp_path)
    models = [("plain", "netmod:build", "plain.pt"), ("lightning", "netmod:build", "lightning.ckpt"),
              ("safe", "netmod:build", "weights.safetensors"), ("srcpath", "srcmod:build", "plain.pt"),
              ("whole", "netmod:build", "whole.pt")]
    p.fleet.write_text('python_path = ["src"]\n' + "".join(MODEL.format(name=n, factory=f, file=c) for n, f, c in models)
                       + '\n[targets.local]\nmodels = ["plain"]\ninstall_dir = "deploy"\n')
    env = {k: v for k, v in p.env.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "doit", "export"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 1, out
    shas = {name: json.loads((p.artifacts / "onnx" / f"{name}.json").read_text())["onnx_sha256"]
            for name in ("plain", "lightning", "safe", "srcpath")}
    assert len(set(shas.values())) == 1, shas
    reason = one_line_reason(Run(proc.returncode, out), "export:whole")
    assert "holds" not in reason and "is a pickled Python object (netmod.Net)" in reason, out
    assert "torch.save(model.state_dict()" in out and "safetensors.torch.save_file" in out
    assert TORCH_ADVICE not in out and "Traceback" not in out, out

    # a no-op needs no PYTHONPATH either, and imports no factory
    again = subprocess.run([sys.executable, "-m", "doit", "export:plain", "export:srcpath", "export:safe"],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert again.returncode == 0, again.stdout
    assert {"export:plain", "export:srcpath", "export:safe"} <= Run(0, again.stdout).uptodate(), again.stdout


def test_an_unimportable_factory_names_the_module_the_folders_and_the_fix(tmp_path):
    from kiln.factories import find_factory_source
    (tmp_path / "src").mkdir()
    with pytest.raises(ExportError) as info:
        find_factory_source("nosuchmod:build", [tmp_path, tmp_path / "src"], "det")
    text = str(info.value)
    assert "cannot find the factory module 'nosuchmod' of model det" in text
    assert f"searched {tmp_path} (the fleet file's folder), {tmp_path / 'src'} (python_path)" in text
    assert "put nosuchmod.py" in text and "python_path" in text.split("fix:")[1]


def test_factory_source_is_found_without_importing_and_import_leaves_sys_path_alone(tmp_path):
    from kiln.factories import factory_imports, find_factory_source, import_factory
    for name, value in (("a", "A"), ("b", "B")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "kiln_test_fleetmod.py").write_text(
            f"import pathlib\npathlib.Path({str(tmp_path / name / 'imported')!r}).touch()\n"
            f"def build():\n    import kiln_test_sibling\n    return {value!r}\n")
        (tmp_path / name / "kiln_test_sibling.py").write_text("")
    before = list(sys.path)
    try:
        src = find_factory_source("kiln_test_fleetmod:build", [tmp_path / "a"])
        assert src == tmp_path / "a" / "kiln_test_fleetmod.py" and not (tmp_path / "a" / "imported").exists()
        with factory_imports([tmp_path / "a"]):
            assert import_factory("kiln_test_fleetmod:build", [tmp_path / "a"], "m")() == "A"
        assert sys.path == before
        # another fleet in the same process with a module of the same name: refused, never mixed up
        with factory_imports([tmp_path / "b"]), pytest.raises(ExportError) as info:
            import_factory("kiln_test_fleetmod:build", [tmp_path / "b"], "m")
        assert "already imported another 'kiln_test_fleetmod'" in str(info.value)
        assert sys.path == before
    finally:
        for mod in ("kiln_test_fleetmod", "kiln_test_sibling"):
            sys.modules.pop(mod, None)


def test_state_dict_prefixes_are_removed_only_when_exact_and_unambiguous(tmp_path):
    from kiln.checkpoints import fit_state_dict
    wanted = {"fc.weight", "fc.bias"}
    ckpt = tmp_path / "m.ckpt"
    assert fit_state_dict({"fc.weight": 1, "fc.bias": 2}, wanted, path=ckpt) == ({"fc.weight": 1, "fc.bias": 2}, "")
    state, prefix = fit_state_dict({"model.fc.weight": 1, "model.fc.bias": 2, "loss.pos_weight": 3}, wanted, path=ckpt)
    assert prefix == "model." and state == {"fc.weight": 1, "fc.bias": 2}
    with pytest.raises(ExportError, match="several times, under 'ema.', 'model.'"):
        fit_state_dict({"model.fc.weight": 1, "model.fc.bias": 2, "ema.fc.weight": 1, "ema.fc.bias": 2}, wanted, path=ckpt)
    with pytest.raises(ExportError, match="does not fit the factory's model \\(keys under 'model.'\\): missing fc.bias; unexpected fc.extra"):
        fit_state_dict({"model.fc.weight": 1, "model.fc.extra": 2}, wanted, path=ckpt)
    with pytest.raises(ExportError, match="does not fit the factory's model: missing fc.bias; unexpected other"):
        fit_state_dict({"fc.weight": 1, "other": 2}, wanted, path=ckpt)
