"""Truth under faults: deploys on a local target (a tmp install_dir, the real pipeline through
`doit deploy:local`, the real agent) when links lead out, locks are left behind, health checks
hang, cached inputs rot, dead runs leave temp files, or the disk is full."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiln.config import Target
from kiln.device_side import agent
from kiln.devices.workarea import AGENT_SOURCE, Device
from kiln.errors import DeployError, KilnError
from kiln.pipeline import deploy as deploy_mod
from kiln.transports.local import LocalTransport
from kiln_project import Project, python

AGENT = str(AGENT_SOURCE)
OLD = time.time() - 2 * 3600


def make_device(root: Path, models=("det",)) -> Device:
    return Device(LocalTransport("local"), Target(name="local", transport="local", backend="onnxruntime",
                                                  models=tuple(models), groups=(), install_dir=str(root)))


def change_weights(p: Project, delta: float) -> None:
    python(f"import torch; sd = torch.load({str(p.checkpoint())!r}, weights_only=True);"
           f"k = next(k for k in sd if k.endswith('weight')); sd[k] = sd[k] + {delta};"
           f"torch.save(sd, {str(p.checkpoint())!r})")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def project(tmp_path):
    p = Project(tmp_path)
    p.doit("deploy:local")
    assert p.active()
    return p


# ---------------------------------------------------------------- A. no writes through a link out

def test_a_symlinked_releases_folder_is_refused_and_the_outside_untouched(project, tmp_path):
    key = project.active()
    outside = tmp_path / "outside"
    (outside / f".staging-{key}").mkdir(parents=True)
    (outside / f".staging-{key}" / "canary").write_text("keep me")
    (outside / "canary").write_text("keep me too")
    model = project.root / "deploy" / "tiny"
    for link in ("current", "previous"):
        if (model / link).is_symlink():
            (model / link).unlink()
    subprocess.run(["rm", "-rf", str(model / "releases")], check=True)
    (model / "releases").symlink_to(outside)
    run = project.doit("deploy:local", check=False)
    assert run.returncode != 0
    assert str(model / "releases") in run.out and str(outside) in run.out and "outside the install_dir" in run.out, run.out
    assert sorted(str(p.relative_to(outside)) for p in outside.rglob("*")) == \
        [f".staging-{key}", f".staging-{key}/canary", "canary"]
    assert (outside / f".staging-{key}" / "canary").read_text() == "keep me"
    assert project.active() is None


def test_agent_remove_and_stage_never_follow_a_link_out(tmp_path):
    root, outside = tmp_path / "install", tmp_path / "outside"
    (root / "det" / "releases").mkdir(parents=True)
    outside.mkdir()
    (outside / "canary").write_text("x")
    device = make_device(root)
    (root / "det" / "releases" / "k0").symlink_to(outside)  # a release that is a link: unlinked only
    device.remove(str(root / "det" / "releases" / "k0"))
    assert not os.path.lexists(root / "det" / "releases" / "k0") and (outside / "canary").exists()
    (root / "link").symlink_to(outside)
    with pytest.raises(DeployError, match="outside the install_dir"):
        device.remove(str(root / "link" / "canary"))
    with pytest.raises(DeployError, match="outside the install_dir"):
        device.remove(str(outside / "canary"))
    (root / "m2").symlink_to(outside)
    with pytest.raises(DeployError, match=f"{root / 'm2'}.*symlink"):
        device.stage_begin("m2", "k1")
    with pytest.raises(DeployError, match="outside the install_dir"):
        device.copy(str(outside / "canary"), str(root / "m2" / "copy"), "")
    assert sorted(p.name for p in outside.iterdir()) == ["canary"]
    # inside: a fresh staging folder (an old one of a dead run removed), committed by a rename
    (root / "det" / "releases" / ".staging-dead").mkdir()
    begun = device.stage_begin("det", "k1")
    assert begun["removed"] == [".staging-dead"] and begun["free_bytes"] > 0
    (root / "det" / "releases" / ".staging-k1" / "f").write_text("y")
    device.stage_commit("det", "k1")
    assert (root / "det" / "releases" / "k1" / "f").read_text() == "y"
    assert sorted(p.name for p in (root / "det" / "releases").iterdir()) == ["k1"]


# ---------------------------------------------------------------- B. locks that neither wedge nor double

def test_a_killed_runs_ownerless_lock_blocks_only_for_the_grace(tmp_path):
    root = tmp_path / "install"
    lock = root / ".kiln" / "lock"
    lock.mkdir(parents=True)
    (lock / "owner").write_text("")  # the old code was killed between mkdir and writing the owner
    device = make_device(root)
    with pytest.raises(DeployError, match="locked by another deploy"):
        with device.lock("run-2", grace=60):
            pass
    os.utime(lock / "owner", (time.time() - 5, time.time() - 5))
    os.utime(lock, (time.time() - 5, time.time() - 5))
    with device.lock("run-2", grace=2):
        assert json.loads((lock / "owner").read_text())["owner"] == "run-2"
    assert not lock.exists()


def test_a_killed_runs_lock_does_not_block_the_next_deploy(project):
    lock = project.root / "deploy" / ".kiln" / "lock"
    lock.mkdir()
    os.utime(lock, (OLD, OLD))  # no owner file at all, two hours old
    before = project.active()
    change_weights(project, 0.01)
    project.doit("deploy:local")
    assert project.active() != before and not lock.exists()


def test_a_lock_whose_process_is_gone_on_this_host_is_stale(tmp_path):
    root = tmp_path / "install"
    lock = root / ".kiln" / "lock"
    lock.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (lock / "owner").write_text(json.dumps({"owner": "crashed", "token": "t", "since": time.time(),
                                            "pid": dead.pid, "host": agent.host_id()}))
    with make_device(root).lock("next"):
        assert json.loads((lock / "owner").read_text())["owner"] == "next"
    # a live process keeps its lock
    (lock.parent).mkdir(exist_ok=True)
    lock.mkdir()
    (lock / "owner").write_text(json.dumps({"owner": "alive", "token": "t", "since": time.time(),
                                            "pid": os.getpid(), "host": agent.host_id()}))
    with pytest.raises(DeployError, match=r"locked by another deploy \(alive"):
        with make_device(root).lock("next"):
            pass


def test_two_concurrent_takeovers_of_a_stale_lock_one_wins(tmp_path):
    root = tmp_path / "install"
    lock = root / ".kiln" / "lock"
    for round_ in range(4):
        lock.mkdir(parents=True)
        (lock / "owner").write_text(json.dumps({"owner": "died", "token": "old", "since": OLD}))
        procs = []
        for i in range(6):
            info = {"owner": f"r{round_}-{i}", "token": f"tok-{round_}-{i}", "since": time.time(), "pid": 1, "host": "elsewhere"}
            procs.append(subprocess.Popen([sys.executable, AGENT, "lock-take", "--root", str(root), "--path", str(lock),
                                           "--stale-after", "3600", "--grace", "60"], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            procs[-1].stdin.write(json.dumps(info) + "\n")
        for p in procs:
            p.stdin.close()
        answers = [json.loads(p.stdout.read().splitlines()[-1]) for p in procs]
        for p in procs:
            p.wait()
        winners = [i for i, a in enumerate(answers) if a["taken"]]
        assert len(winners) == 1, answers
        assert json.loads((lock / "owner").read_text())["token"] == f"tok-{round_}-{winners[0]}"
        assert sorted(p.name for p in lock.parent.iterdir()) == ["lock"]  # no temp folders left
        subprocess.run(["rm", "-rf", str(lock)], check=True)


def test_a_lock_is_released_only_by_its_owner(tmp_path):
    root = tmp_path / "install"
    lock = root / ".kiln" / "lock"
    device = make_device(root)
    with device.lock("run-a"):
        mine = json.loads((lock / "owner").read_text())
        assert mine["owner"] == "run-a" and mine["token"] and mine["pid"] == os.getpid()
        assert device.agent("lock-release", "--path", str(lock), "--token", "not-mine")["released"] is False
        assert lock.exists()
        # our lock was judged stale and taken over by another run meanwhile
        (lock / "owner").write_text(json.dumps({"owner": "run-b", "token": "b", "since": time.time()}))
    assert json.loads((lock / "owner").read_text())["owner"] == "run-b"  # left alone


# ---------------------------------------------------------------- C. rollback that really restores

def test_a_health_check_that_times_out_rolls_back_and_restarts_the_previous_release(tmp_path):
    p = Project(tmp_path)
    log = tmp_path / "restarts.log"
    current = tmp_path / "deploy" / "tiny" / "current"
    p.fleet.write_text(p.fleet.read_text() + f'restart = "readlink {current} >> {log}"\n')
    p.doit("deploy:local")
    first = p.active()
    assert log.read_text().split() == [f"releases/{first}"]
    # healthy only on the first release: the new one hangs past the command timeout
    p.fleet.write_text(p.fleet.read_text() + f'health_check = "test $(readlink {current}) = releases/{first} || sleep 5"\n'
                       "command_timeout = 1\n")
    change_weights(p, 0.02)
    t0 = time.monotonic()
    run = p.doit("deploy:local", check=False)
    assert run.returncode != 0 and time.monotonic() - t0 < 120
    assert "health check failed" in run.out and "timed out after 1" in run.out, run.out
    assert "rolled back to the previous releases" in run.out and "pass the health check" in run.out, run.out
    assert p.active() == first
    new = log.read_text().split()[1]
    assert new != f"releases/{first}" and log.read_text().split() == [f"releases/{first}", new, f"releases/{first}"]
    rollbacks = [e for e in p.events() if e["event"] == "rollback"]
    assert rollbacks and rollbacks[-1]["key"] == first


class _Events:
    def __init__(self):
        self.seen = []

    def emit(self, task, event, **fields):
        self.seen.append((event, fields))


class _Ctx:
    def __init__(self):
        self.events = _Events()


def test_a_failed_rollback_names_each_models_state_and_continues(tmp_path):
    root, outside = tmp_path / "install", tmp_path / "outside"
    for base in (root / "a", outside):
        (base / "releases" / "new").mkdir(parents=True)
        (base / "releases" / "old").mkdir()
        (base / "current").symlink_to("releases/new")
        (base / "previous").symlink_to("releases/old")
    (root / "b").symlink_to(outside)  # the agent refuses to roll back through this link
    (root / "c" / "releases" / "new").mkdir(parents=True)
    (root / "c" / "current").symlink_to("releases/new")
    (root / "c" / "previous").symlink_to("releases/old-gone")
    device = make_device(root, models=("b", "a", "c"))
    ctx = _Ctx()
    todo = {m: {"key": "new"} for m in ("b", "a", "c")}
    states = deploy_mod._roll_back(ctx, device, device.config, {"b": "old", "a": "old", "c": "old-gone"}, todo, why="test")
    assert states["a"] == "rolled back to old" and os.readlink(root / "a" / "current") == "releases/old"
    assert states["b"].startswith("still on new new") and "outside the install_dir" in states["b"]
    assert states["c"] == "rolled back to old-gone"
    summary = deploy_mod._summary(states)
    assert summary.startswith("ROLLBACK INCOMPLETE") and "a: rolled back" in summary and "b: still on new" in summary
    assert os.readlink(outside / "current") == "releases/new"  # nothing changed outside


# ---------------------------------------------------------------- D. clean devices

def test_truncated_cached_inputs_are_fetched_again(project):
    inputs = project.root / "deploy" / ".kiln" / "inputs"
    record = json.loads((project.artifacts / "onnx" / "tiny.json").read_text())
    onnx, ref = inputs / f"{record['onnx_sha256']}.onnx", inputs / f"{record['reference_sha256']}.npz"
    for f in (onnx, ref):
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    # a new build option: the engine is rebuilt from the cached ONNX, then staged with the reference
    p = project
    p.fleet.write_text(p.fleet.read_text().replace("[models.tiny]\n", '[models.tiny]\nbuild = { ort_optimization = "extended" }\n'))
    before = p.active()
    run = p.doit("deploy:local")
    assert p.active() != before, run.out
    assert sha(onnx) == record["onnx_sha256"] and sha(ref) == record["reference_sha256"]


def test_dead_runs_temp_files_and_unused_inputs_are_removed_by_the_next_deploy(project):
    deploy = project.root / "deploy"
    inputs = deploy / ".kiln" / "inputs"
    record = json.loads((project.artifacts / "onnx" / "tiny.json").read_text())
    dead_part = inputs / ".x.onnx.abc123.part"
    young_part = inputs / ".y.onnx.def456.part"  # maybe an upload in progress right now: kept
    unused = inputs / ("0" * 64 + ".onnx")
    for f in (dead_part, young_part, unused):
        f.write_bytes(b"junk")
    for f in (dead_part, unused):
        os.utime(f, (OLD, OLD))
    staging = deploy / "tiny" / "releases" / ".staging-deadbeef"
    staging.mkdir()
    (staging / ".engine.part").write_bytes(b"half")
    for f in inputs.iterdir():  # everything old: only what the releases use may stay
        if f != young_part:
            os.utime(f, (OLD, OLD))
    before = project.active()
    change_weights(project, 0.03)
    project.doit("deploy:local")
    assert project.active() != before and project.previous() == before
    names = sorted(f.name for f in inputs.iterdir())
    assert dead_part.name not in names and unused.name not in names and not staging.exists()
    assert young_part.name in names
    new = json.loads((project.artifacts / "onnx" / "tiny.json").read_text())
    manifest = json.loads((deploy / "tiny" / "current" / "manifest.json").read_text())
    assert sorted(manifest["inputs"]) == sorted([f"{new['reference_sha256']}.npz", f"{new['onnx_sha256']}.onnx"])
    for wanted in (f"{new['onnx_sha256']}.onnx", f"{new['reference_sha256']}.npz",  # current
                   f"{record['onnx_sha256']}.onnx",                                 # previous
                   f"{hashlib.sha256(AGENT_SOURCE.read_bytes()).hexdigest()}.py"):  # the agent
        assert wanted in names, (wanted, names)


def test_free_space_is_checked_before_an_upload(tmp_path):
    root = tmp_path / "install"
    root.mkdir()
    device = make_device(root)
    free = agent.free_bytes(str(root))
    big = tmp_path / "big.onnx"
    with open(big, "wb") as f:
        f.truncate(free + (1 << 30))  # sparse: claims more than the disk has
    with pytest.raises(DeployError) as info:
        device.ensure_input(big, "0" * 64, ".onnx")
    text = str(info.value)
    assert "needs " in text and " MB, has " in text and f"MB on local:{root}/.kiln/inputs" in text, text
    assert [f.name for f in (root / ".kiln" / "inputs").iterdir()] == [
        f"{hashlib.sha256(AGENT_SOURCE.read_bytes()).hexdigest()}.py"] or \
        not list((root / ".kiln" / "inputs").iterdir())  # nothing of the big file was written


def test_a_device_download_checks_free_space_first(tmp_path):
    import http.server
    import threading
    root = tmp_path / "install"
    (root / ".kiln" / "inputs").mkdir(parents=True)
    claim = agent.free_bytes(str(root)) + (1 << 30)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(claim))
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = root / ".kiln" / "inputs" / ("1" * 64 + ".onnx")
        res = subprocess.run([sys.executable, AGENT, "fetch", "--root", str(root), "--out", str(out), "--sha256", "1" * 64],
                             input=f"http://127.0.0.1:{server.server_port}/x\n", capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert res.returncode != 0 and "not enough space: needs" in res.stderr and "MB on" in res.stderr, res.stderr
    assert list((root / ".kiln" / "inputs").iterdir()) == []
