"""A busy device is pending, not failed: nothing switched, then deployed once it is free."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

from kiln_project import REPO, Project
from test_operator import retrain, status


def test_a_busy_device_is_pending_then_deployed_when_free(tmp_path):
    p = Project(tmp_path)
    flag = tmp_path / "inference-running"
    fleet = p.fleet.read_text() + f'busy_check = "test ! -e {flag}"\nbusy_interval = 0.2\n'
    p.fleet.write_text(fleet + "busy_timeout = 1\n")
    p.doit("deploy:local")  # free: deployed at once
    old = p.active()
    retrain(p)
    flag.touch()
    run = p.doit("deploy:local")  # busy for longer than busy_timeout: exit 0, pending
    assert "PENDING deploy:local" in run.out and "busy_check exited 1" in run.out, run.out
    assert p.active() == old  # nothing switched: the previous release serves
    row = status(p)[("local", "tiny")]
    assert row["state"] == "pending" and any("busy" in w for w in row["why"]), row
    assert any(e.get("action") == "busy" for e in p.events())

    p.fleet.write_text(fleet + "busy_timeout = 60\n")
    proc = subprocess.Popen([sys.executable, "-m", "doit", "deploy:local"], cwd=REPO, env=p.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while not any("asking again" in line for line in out) and time.monotonic() < deadline:
        time.sleep(0.1)  # the run is waiting for the device
    assert p.active() == old, "".join(out)
    flag.unlink()  # the device becomes free: the same run goes on
    assert proc.wait(timeout=60) == 0
    reader.join(timeout=5)
    text = "".join(out)
    assert p.active() not in (None, old) and "PENDING" not in text, text
    assert status(p)[("local", "tiny")]["state"] == "up to date"
