"""Progress on stderr (kiln/progress.py): plain, throttled lines in logs; a rich live display on a
terminal; nothing on stdout; nothing at all with KILN_PROGRESS=off. Real transfers (local files,
SSH to a simulated device, S3 on moto) and real doit runs of the tiny model (stderr on a pipe, and
on a pseudo-terminal)."""
from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import threading
import time

import pytest

from kiln.progress import PLAIN_PREFIX, GuardedStream, Progress
from kiln.stores.local import LocalStore
from kiln.transports.local import LocalTransport
from kiln_project import REPO, Project

MiB = 1 << 20
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(PLAIN_PREFIX)]


def big_file(path, size: int = 10 * MiB):
    path.write_bytes(os.urandom(size))
    return path


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    """A text stream that says it is a terminal (what rich and the guards look at)."""

    def isatty(self) -> bool:
        return True


# -- plain lines, from real transfers -----------------------------------------------------------

def test_a_local_upload_prints_a_start_and_an_end_line_with_bytes_and_rate(tmp_path):
    out = io.StringIO()
    transport = LocalTransport("edge-1")
    transport.display = Progress("plain", out, interval=10)
    transport.put(big_file(tmp_path / "model.onnx"), str(tmp_path / "device" / "model.onnx"))
    transport.display.close()
    lines = plain_lines(out.getvalue())
    assert lines == out.getvalue().splitlines() and "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    # copy_hashing reports ten 1 MiB blocks; within 10 s only the start and the end are printed
    assert len(lines) == 2, lines
    assert lines[0] == "progress: upload model.onnx to edge-1: 10.0 MiB"
    assert lines[1].startswith("progress: upload model.onnx to edge-1: done, 10.0 MiB in ") and "MiB/s)" in lines[1]


def test_store_puts_and_gets_of_large_entries_are_shown_small_ones_not(tmp_path):
    out = io.StringIO()
    store = LocalStore(tmp_path / "store")
    store.display = Progress("plain", out, interval=10)
    src = big_file(tmp_path / "engine")
    store.put_file("blobs/ab/" + "ab" * 32, src)
    store.get_file("blobs/ab/" + "ab" * 32, tmp_path / "back")
    store.put_bytes("models/tiny/onnx.json", b"{}" * 1000)  # small: silent
    store.get_bytes("models/tiny/onnx.json")
    lines = plain_lines(out.getvalue())
    assert [line.split(":")[1].strip() for line in lines] == ["store put blobs/ab/abababababab"] * 2 + \
        ["store get blobs/ab/abababababab"] * 2, lines
    assert "10.0 MiB" in lines[0] and "done, 10.0 MiB in" in lines[3] and "MiB/s" in lines[3]


def test_plain_lines_are_throttled_to_one_per_interval_per_activity():
    out, clock = io.StringIO(), FakeClock()
    progress = Progress("plain", out, interval=10, clock=clock)
    upload = progress.transfer("upload engine.plan to orin-01", 100 * MiB)
    export = progress.activity("export rtdetr")
    export.phase("torch export")
    for _ in range(100):  # 35 s of updates, 100 of them: lines at 10, 20 and 30 s only
        clock.now += 0.35
        upload.advance(MiB)
        export.note("still exporting")
    upload.finish()
    export.finish()
    progress.close()
    lines = plain_lines(out.getvalue())
    uploads = [line for line in lines if "upload" in line]
    exports = [line for line in lines if "export rtdetr" in line]
    assert len(uploads) == 5 and len(exports) == 5, lines
    assert "35.0/100.0 MiB" not in uploads[1] and "MiB/s, ETA" in uploads[1], uploads
    assert uploads[-1] == "progress: upload engine.plan to orin-01: done, 100.0 MiB in 35.0 s (2.9 MiB/s)"
    assert exports[1].startswith("progress: export rtdetr: torch export; 10.") and "last: still exporting" in exports[1]
    assert exports[-1] == "progress: export rtdetr: done in 35.0 s (torch export 35.0 s)"


def test_an_activity_that_goes_quiet_still_prints_every_interval():
    out = io.StringIO()
    progress = Progress("plain", out, interval=0.2)
    with progress.activity("build tiny@cpu on local") as build:
        build.phase("building")
        time.sleep(0.7)  # nobody reports: the ticker prints what it is doing
    lines = plain_lines(out.getvalue())
    assert 4 <= len(lines) <= 6, lines
    assert all("building" in line for line in lines[1:-1]) and lines[-1].startswith(
        "progress: build tiny@cpu on local: done in 0.")


def test_a_failed_activity_says_where_it_failed():
    out = io.StringIO()
    progress = Progress("plain", out, interval=10)
    with pytest.raises(RuntimeError):
        with progress.activity("export tiny") as export:
            export.phase("onnx check")
            raise RuntimeError("checker said no")
    assert plain_lines(out.getvalue())[-1].startswith("progress: export tiny: failed after ")
    assert plain_lines(out.getvalue())[-1].endswith("(during onnx check)")


def test_ssh_uploads_and_downloads_show_bytes(new_fleet, tmp_path):
    fleet = new_fleet()
    fleet.add_device("cpu-9", "cpu")
    fleet.start()
    out = io.StringIO()
    with fleet.transport("cpu-9") as transport:
        transport.display = Progress("plain", out, interval=10)
        src = big_file(tmp_path / "model.onnx", 12 * MiB)
        sha = transport.put(src, "/srv/kiln/model.onnx")
        assert transport.get("/srv/kiln/model.onnx", tmp_path / "back.onnx") == sha
    lines = plain_lines(out.getvalue())
    assert lines[0] == "progress: upload model.onnx to cpu-9: 12.0 MiB", lines
    assert lines[1].startswith("progress: upload model.onnx to cpu-9: done, 12.0 MiB in ") and "MiB/s" in lines[1]
    assert lines[2] == "progress: download model.onnx from cpu-9: 12.0 MiB"
    assert lines[3].startswith("progress: download model.onnx from cpu-9: done, 12.0 MiB in ")
    assert len(lines) == 4


def test_s3_puts_and_gets_show_bytes(moto_s3, tmp_path):
    from kiln.stores.s3 import S3Store

    out = io.StringIO()
    seen = []
    store = S3Store(moto_s3.new_bucket(), "p", endpoint_url=moto_s3.endpoint, max_attempts=2,
                    progress=lambda n, d, t: seen.append(d))
    store.display = Progress("plain", out, interval=10)
    src = big_file(tmp_path / "model.onnx", 17 * MiB)  # three 8 MiB parts
    assert store.put_file("onnx/aa/x.onnx", src)
    store.get_file("onnx/aa/x.onnx", tmp_path / "back")
    lines = plain_lines(out.getvalue())
    assert [line.split(": ")[1] for line in lines] == ["store put onnx/aa/x.onnx"] * 2 + ["store get onnx/aa/x.onnx"] * 2
    assert lines[0].endswith("17.0 MiB") and "done, 17.0 MiB in" in lines[1] and "done, 17.0 MiB in" in lines[3]
    assert seen[-1] == 17 * MiB  # the store's own callback still gets every step


# -- choosing a renderer -------------------------------------------------------------------------

def test_kiln_progress_off_prints_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_PROGRESS", "off")
    out = Terminal()
    transport = LocalTransport("edge-1")
    transport.display = progress = Progress(stream=out)
    transport.put(big_file(tmp_path / "model.onnx"), str(tmp_path / "copy"))
    with progress.activity("export tiny") as export:
        export.phase("torch export")
    progress.close()
    assert progress.mode == "off" and out.getvalue() == ""


def test_auto_is_rich_on_a_terminal_and_plain_elsewhere_and_the_variable_overrides(monkeypatch):
    monkeypatch.delenv("KILN_PROGRESS", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert Progress(stream=Terminal()).mode == "rich"
    assert Progress(stream=io.StringIO()).mode == "plain"
    monkeypatch.setenv("TERM", "dumb")
    assert Progress(stream=Terminal()).mode == "plain"
    monkeypatch.setenv("KILN_PROGRESS", "plain")
    assert Progress(stream=Terminal()).mode == "plain"
    monkeypatch.setenv("KILN_PROGRESS", "fancy")  # a typo is warned about, not fatal
    assert Progress(stream=io.StringIO()).mode == "plain"


# -- the rich renderer ----------------------------------------------------------------------------

def test_the_rich_display_shows_running_activities_and_leaves_one_line_each(tmp_path):
    out = Terminal()
    progress = Progress("rich", out, width=120)
    transport = LocalTransport("edge-1")
    transport.display = progress
    with progress.activity("export tiny") as export:
        export.phase("torch export")
        time.sleep(0.3)  # the display refreshes 8 times a second
        transport.put(big_file(tmp_path / "model.onnx"), str(tmp_path / "copy"))
    progress.close()
    assert "\x1b[" in out.getvalue()  # drawn live
    text = ANSI.sub("", out.getvalue())
    assert "export tiny" in text and "torch export" in text  # with the running phase
    assert "✓ export tiny: done in " in text and "(torch export " in text
    assert "✓ upload model.onnx to edge-1: done, 10.0 MiB in " in text


def test_stdout_lines_pass_whole_while_the_live_display_steps_aside():
    err, stdout = Terminal(), Terminal()
    progress = Progress("rich", err, width=100)
    guarded = progress.guard(stdout)
    assert isinstance(guarded, GuardedStream) and progress.guard(io.StringIO()).__class__ is io.StringIO
    with progress.activity("build tiny@cpu on local") as build:
        build.phase("building")
        time.sleep(0.2)
        guarded.write(".  deploy:lo")
        assert stdout.getvalue() == ""  # a part line waits for its end
        guarded.write("cal\n")
        build.note("[I] Engine built")
        print("  staging tiny", file=guarded)
        time.sleep(0.2)
    progress.close()
    assert stdout.getvalue() == ".  deploy:local\n  staging tiny\n"  # untouched: no escape codes
    assert "\x1b" not in stdout.getvalue() and "\x1b" in err.getvalue()


# -- real doit runs -----------------------------------------------------------------------------

TWO_LOCAL_TARGETS = """
[targets.edge-2]
models = ["tiny"]
install_dir = "deploy-2"
"""


def test_progress_goes_to_stderr_in_plain_lines_and_never_to_stdout(tmp_path):
    p = Project(tmp_path, extra=TWO_LOCAL_TARGETS)
    env = {k: v for k, v in p.env.items() if k not in ("KILN_PROGRESS", "KILN_PROGRESS_INTERVAL")}
    # `-n 2`: doit's worker threads start both deploys at once, and the fleet's activity is still one
    proc = subprocess.run([sys.executable, "-m", "doit", "-n", "2", "deploy"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert PLAIN_PREFIX not in proc.stdout and "\x1b" not in proc.stdout + proc.stderr
    assert ".  deploy:local" in proc.stdout and ".  deploy:edge-2" in proc.stdout
    lines = plain_lines(proc.stderr)
    assert "progress: export tiny: started" in lines, proc.stderr
    assert any(line.startswith("progress: export tiny: done in ") and "torch export " in line
               for line in lines), lines
    assert any(line.startswith("progress: build tiny@cpu-") and "done in" in line and "building" in line
               for line in lines), lines
    assert "progress: deploy 0/2 devices" in lines or "progress: deploy 1/2 devices" in lines, lines
    assert any(line.startswith("progress: deploy 2/2 devices in ") for line in lines), lines
    fleet_lines = [line for line in lines if line.startswith("progress: deploy ")]
    assert sum(line.startswith(("progress: deploy 0/2 devices", "progress: deploy 1/2 devices"))
               and " in " not in line for line in fleet_lines) <= 2, fleet_lines  # one activity's lines
    assert not any("failed" in line for line in fleet_lines), fleet_lines

    # a report's JSON is all of stdout
    check = subprocess.run([sys.executable, "-m", "doit", "cache-check", "--json"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout) and PLAIN_PREFIX not in check.stdout


def run_with_stderr_on_a_terminal(argv: list[str], env: dict, timeout: float = 300) -> tuple[int, str, str]:
    """Run argv with stdout on a pipe and stderr on a pseudo-terminal; (exit code, stdout, terminal)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=slave)
    os.close(slave)
    stdout: list[bytes] = []
    reader = threading.Thread(target=lambda: stdout.append(proc.stdout.read()), daemon=True)
    reader.start()
    seen, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child's side is closed
                break
            if not data:
                break
            seen.append(data)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    reader.join(10)
    return proc.returncode, b"".join(stdout).decode(), b"".join(seen).decode(errors="replace")


def test_a_doit_run_with_stderr_on_a_terminal_shows_the_live_display(tmp_path):
    p = Project(tmp_path)
    env = {k: v for k, v in p.env.items() if k != "KILN_PROGRESS"}
    env.update(TERM="xterm-256color", COLUMNS="120")
    code, stdout, terminal = run_with_stderr_on_a_terminal([sys.executable, "-m", "doit", "deploy:local"], env)
    assert code == 0, stdout + terminal
    assert ".  deploy:local" in stdout and "\x1b" not in stdout and "✓" not in stdout
    assert "\x1b[" in terminal and PLAIN_PREFIX not in terminal  # the live display, not plain lines
    terminal = ANSI.sub("", terminal)
    assert "✓ export tiny: done in " in terminal and "torch export" in terminal, terminal[-3000:]
    assert "✓ build tiny@cpu-" in terminal, terminal[-3000:]
    assert p.active() is not None
