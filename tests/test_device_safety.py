"""Devices cannot be escaped, and presigned URLs stay secret (DESIGN.md "Invariants").

1. Nothing is written or deleted outside a target's install_dir, and symlinks are not
   followed out of it: a `<model>`, `<model>/releases` or `.kiln/inputs` that is a
   symlink leading outside makes the agent (and the working area's own mkdir) refuse,
   naming the link and where it points; prune deletes a symlinked release's link, never
   what it points at. These run the real agent locally (LocalTransport + Device, or
   `python agent.py` directly) in a tmp install_dir, with a canary outside it.
2. A presigned URL reaches the agent on stdin: while the agent downloads/uploads through
   the real SSH transport of a simulated device, no process on the machine has the URL
   in its /proc/<pid>/cmdline or /proc/<pid>/environ, and sshd's log never sees it.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from kiln.config import Target
from kiln.devices.workarea import AGENT_SOURCE, Device
from kiln.errors import KilnError
from kiln.transports.local import LocalTransport

AGENT = str(AGENT_SOURCE)


def make_target(install_dir: str, name: str = "local") -> Target:
    return Target(name=name, transport="local", backend="onnxruntime", models=("det",), groups=(),
                  install_dir=install_dir)


@pytest.fixture
def area(tmp_path):
    """(install_dir, outside folder with a canary, Device on this machine)."""
    root = tmp_path / "install"
    root.mkdir()
    outside = tmp_path / "outside"
    (outside / "old").mkdir(parents=True)
    (outside / "canary").write_text("keep me")
    (outside / "old" / "canary").write_text("keep me too")
    device = Device(LocalTransport("local"), make_target(str(root)))
    return root, outside, device


def untouched(outside: Path) -> bool:
    return (sorted(str(p.relative_to(outside)) for p in outside.rglob("*")) == ["canary", "old", "old/canary"]
            and (outside / "canary").read_text() == "keep me"
            and (outside / "old" / "canary").read_text() == "keep me too")


def refused(device: Device, *args: str) -> str:
    """Run an agent subcommand that must fail; returns its error output."""
    with pytest.raises(KilnError) as info:
        device.agent(*args)
    return str(info.value) + "\n" + (getattr(info.value, "output_tail", "") or "")


def run_agent(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, AGENT, *args], input=stdin, capture_output=True, text=True,
                          timeout=60)


# ---------------------------------------------------------------- releases folder symlinked outside

def test_activate_refuses_a_releases_folder_that_leads_outside(area):
    root, outside, device = area
    (root / "det").mkdir()
    (root / "det" / "releases").symlink_to(outside)
    error = refused(device, "activate", "--model-dir", str(root / "det"), "--release", "old")
    assert str(root / "det" / "releases") in error and str(outside) in error and "outside" in error
    assert not os.path.lexists(root / "det" / "current")
    assert untouched(outside)


def test_activate_refuses_a_model_folder_that_leads_outside(area):
    root, outside, device = area
    (outside / "releases" / "old").mkdir(parents=True)
    try:
        (root / "det").symlink_to(outside)
        error = refused(device, "activate", "--model-dir", str(root / "det"), "--release", "old")
        assert str(root / "det") in error and str(outside) in error
        assert sorted(p.name for p in outside.iterdir()) == ["canary", "old", "releases"]  # no current link there
    finally:
        (outside / "releases" / "old").rmdir()
        (outside / "releases").rmdir()
    assert untouched(outside)


def test_rollback_refuses_a_model_folder_that_leads_outside(area):
    root, outside, device = area
    (outside / "current").symlink_to("old")
    try:
        (root / "det").symlink_to(outside)
        error = refused(device, "rollback", "--model-dir", str(root / "det"))
        assert str(root / "det") in error and str(outside) in error
        assert os.readlink(outside / "current") == "old"  # not unlinked through the symlink
    finally:
        (outside / "current").unlink()
    assert untouched(outside)


def test_prune_never_deletes_through_a_releases_symlink(area):
    root, outside, device = area
    (root / "det").mkdir()
    (root / "det" / "releases").symlink_to(outside)
    error = refused(device, "prune", "--model-dir", str(root / "det"), "--keep", "k1")
    assert str(root / "det" / "releases") in error and str(outside) in error
    assert untouched(outside)
    assert (root / "det" / "releases").is_symlink()


def test_prune_removes_a_symlinked_release_link_not_its_target(area):
    root, outside, device = area
    releases = root / "det" / "releases"
    (releases / "k1").mkdir(parents=True)
    (releases / "stale").mkdir()
    (releases / "stale" / "engine").write_text("x")
    (releases / "old").symlink_to(outside / "old")
    (releases / "gone").symlink_to(outside / "no-such-folder")  # dangling: removed too
    assert device.agent("activate", "--model-dir", str(root / "det"), "--release", "k1")["active"] == "k1"
    assert device.agent("prune", "--model-dir", str(root / "det"), "--keep", "k1") == \
        {"removed": ["gone", "old", "stale"]}
    assert sorted(p.name for p in releases.iterdir()) == ["k1"]
    assert untouched(outside)


def test_symlinks_that_stay_inside_the_install_dir_are_fine(area):
    root, outside, device = area
    (root / "shared" / "k1").mkdir(parents=True)
    (root / "det").mkdir()
    (root / "det" / "releases").symlink_to("../shared")
    assert device.agent("activate", "--model-dir", str(root / "det"), "--release", "k1")["active"] == "k1"
    assert (root / "det" / "current").is_symlink()
    assert untouched(outside)


# ---------------------------------------------------------------- inputs / fetch

def test_fetch_refuses_an_inputs_folder_that_leads_outside(area, tmp_path):
    root, outside, device = area
    (root / ".kiln").mkdir()
    (root / ".kiln" / "inputs").symlink_to(outside)
    src = tmp_path / "payload"
    src.write_bytes(b"bytes from the store")
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    out = root / ".kiln" / "inputs" / (sha + ".npz")
    res = run_agent("fetch", "--root", str(root), "--out", str(out), "--sha256", sha, stdin=src.as_uri() + "\n")
    assert res.returncode != 0
    assert str(root / ".kiln" / "inputs") in res.stderr and str(outside) in res.stderr, res.stderr
    assert untouched(outside)
    # and the same download into a real folder works (the URL read from stdin)
    (root / ".kiln" / "inputs").unlink()
    (root / ".kiln" / "inputs").mkdir()
    res = run_agent("fetch", "--root", str(root), "--out", str(out), "--sha256", sha, stdin=src.as_uri() + "\n")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[-1]) == {"sha256": sha, "size": src.stat().st_size}
    assert out.read_bytes() == b"bytes from the store"


def test_fetch_refuses_a_path_outside_the_install_dir(area, tmp_path):
    root, outside, _ = area
    src = tmp_path / "payload"
    src.write_bytes(b"x")
    sha = hashlib.sha256(b"x").hexdigest()
    for out in (outside / "new", root / ".." / "outside" / "new"):
        res = run_agent("fetch", "--root", str(root), "--out", str(out), "--sha256", sha, stdin=src.as_uri() + "\n")
        assert res.returncode != 0 and "outside the install_dir" in res.stderr, res.stderr
    assert untouched(outside)


def test_raw_inputs_refuse_a_scratch_folder_that_leads_outside(area, tmp_path):
    import numpy as np
    from kiln.device_side import agent
    root, outside, device = area
    ref = tmp_path / "reference.npz"
    agent.save_arrays(str(ref), {"input.x": np.ones((1, 3), np.float32)})
    (root / ".kiln").mkdir()
    (root / ".kiln" / "verify").symlink_to(outside)
    error = refused(device, "raw-inputs", "--reference", str(ref), "--out-dir", str(root / ".kiln" / "verify" / "w1"))
    assert str(root / ".kiln" / "verify") in error and str(outside) in error
    assert untouched(outside)


def test_writing_subcommands_need_the_install_dir(area):
    root, _, _ = area
    (root / "det" / "releases" / "k1").mkdir(parents=True)
    res = run_agent("activate", "--model-dir", str(root / "det"), "--release", "k1")
    assert res.returncode == 2 and "--root" in res.stderr
    assert not os.path.lexists(root / "det" / "current")


def test_the_agent_itself_is_not_put_through_an_inputs_symlink(area):
    """The working area's own mkdir/put (before any agent runs) refuses the link too."""
    root, outside, device = area
    (root / ".kiln").mkdir()
    (root / ".kiln" / "inputs").symlink_to(outside)
    with pytest.raises(KilnError) as info:
        device.agent("sha256", AGENT)
    assert str(root / ".kiln" / "inputs") in str(info.value) and str(outside) in str(info.value)
    assert untouched(outside)


def test_device_mkdir_refuses_a_link_out_and_paths_outside(area):
    root, outside, device = area
    (root / "det").symlink_to(outside)
    with pytest.raises(KilnError, match="outside the install_dir"):
        device.mkdir(str(root / "det" / "releases" / ".staging-k1"))
    with pytest.raises(KilnError, match="outside the install_dir"):
        device.mkdir(str(outside / "x"))
    assert untouched(outside)
    device.mkdir(str(root / "m2" / "releases" / ".staging-k1"))
    assert (root / "m2" / "releases" / ".staging-k1").is_dir()


# ---------------------------------------------------------------- presigned URLs stay secret

class _Watch:
    """Records every process whose cmdline or environ holds `marker`, in a tight loop
    and once more while the device's request is being served."""

    def __init__(self, marker: str) -> None:
        self.marker = marker.encode()
        self.hits: list[str] = []
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def scan(self) -> None:
        self.scans += 1
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            for what in ("cmdline", "environ"):
                try:
                    with open(f"/proc/{pid}/{what}", "rb") as f:
                        data = f.read()
                except OSError:
                    continue
                if self.marker in data:
                    self.hits.append(f"/proc/{pid}/{what}: {data[:300]!r}")

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.scan()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _url_server(watch: _Watch, payload: bytes, received: list):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            watch.scan()  # the agent is blocked in this very request now
            received.append(("GET", self.path))
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_PUT(self):
            watch.scan()
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(("PUT", self.path, body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class _PresigningStore:
    def __init__(self, url: str) -> None:
        self.url = url

    def presign_get(self, entry: str) -> str:
        return self.url

    def presign_put(self, entry: str) -> str:
        return self.url


def test_presigned_urls_never_reach_a_command_line_or_environment(new_fleet):
    fleet = new_fleet()
    fleet.add_device("dev", "cpu")
    fleet.start()
    marker = "kilnsecret" + uuid.uuid4().hex
    payload = b"engine bytes " * 1000
    sha = hashlib.sha256(payload).hexdigest()
    received: list = []
    with _Watch(marker) as watch:
        server = _url_server(watch, payload, received)
        try:
            url = f"http://127.0.0.1:{server.server_port}/bucket/{marker}?X-Amz-Signature={marker}"
            with fleet.transport("dev") as t:
                device = Device(t, make_target("/srv/kiln", "dev"))
                remote = device.path(".kiln", "inputs", sha + ".plan")
                device.mkdir(device.path(".kiln", "inputs"))
                assert device.fetch_from_store(_PresigningStore(url), "engines/x", remote, sha)
                assert device.upload_to_store(_PresigningStore(url), remote, "tok") is not None
        finally:
            server.shutdown()
            server.server_close()
    assert [r[0] for r in received] == ["GET", "PUT"] and marker in received[0][1] and received[1][2] == payload
    assert (fleet.srv("dev") / "kiln" / ".kiln" / "inputs" / (sha + ".plan")).read_bytes() == payload
    assert watch.scans > 2 and watch.hits == [], watch.hits[:3]
    assert marker not in fleet.log_text("dev")


# ---------------------------------------------------------------- the same over real SSH

def test_staging_inputs_space_and_lock_over_ssh(fleet, tmp_path):
    """On a simulated device over real sshd: a releases link out is refused, a truncated cached
    input is replaced, an upload bigger than the device's free space is refused (df -Pk), and
    the lock is taken, refused, taken over when ownerless past the grace, released by its owner."""
    name = f"kiln-faults-{uuid.uuid4().hex[:8]}"
    host_root, host_outside = fleet.srv("cpu-01") / name, fleet.srv("cpu-01") / (name + "-outside")
    host_outside.mkdir()
    (host_outside / "canary").write_text("keep me")
    (host_root / "det").mkdir(parents=True)
    (host_root / "det" / "releases").symlink_to(f"/srv/{name}-outside")
    with fleet.transport("cpu-01") as t:
        device = Device(t, make_target(f"/srv/{name}", "cpu-01"))
        with pytest.raises(KilnError) as info:
            device.stage_begin("det", "k1")
        assert f"/srv/{name}/det/releases" in str(info.value) and "outside the install_dir" in str(info.value)
        assert [p.name for p in host_outside.iterdir()] == ["canary"]
        src = tmp_path / "input.onnx"
        src.write_bytes(b"onnx bytes " * 5000)
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        remote = device.ensure_input(src, digest, ".onnx")
        cached = host_root / ".kiln" / "inputs" / f"{digest}.onnx"
        cached.write_bytes(src.read_bytes()[:100])  # truncated behind kiln's back
        assert device.ensure_input(src, digest, ".onnx") == remote
        assert cached.read_bytes() == src.read_bytes()
        big = tmp_path / "big.onnx"
        with open(big, "wb") as f:
            f.truncate(os.statvfs(host_root).f_bavail * os.statvfs(host_root).f_frsize + (1 << 30))
        with pytest.raises(KilnError, match=rf"needs \d+ MB, has \d+ MB on cpu-01:/srv/{name}/.kiln/inputs"):
            device.ensure_input(big, "0" * 64, ".onnx")
        lock = host_root / ".kiln" / "lock"
        with device.lock("run-1"):
            assert json.loads((lock / "owner").read_text())["owner"] == "run-1"
            with pytest.raises(KilnError, match=r"locked by another deploy \(run-1"):
                with Device(t, make_target(f"/srv/{name}", "cpu-01")).lock("run-2"):
                    pass
        assert not lock.exists()
        lock.mkdir()  # a run killed by older code: no owner
        with pytest.raises(KilnError, match="locked by another deploy"):
            with device.lock("run-3", grace=60):
                pass
        os.utime(lock, (time.time() - 120, time.time() - 120))
        with device.lock("run-3", grace=60):
            assert json.loads((lock / "owner").read_text())["owner"] == "run-3"
        assert not lock.exists()
