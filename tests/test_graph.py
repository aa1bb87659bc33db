"""The task graph doit sees: every fingerprint/deploy task exists from the fleet file alone,
unknown names fail, doit's own commands work on every task, and loading dodo.py does nothing
but read the fleet file. Plus the library used from Python without doit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from kiln_project import REPO, TINY, Project

TINY_MODEL = TINY.format(name="tiny", seed=1)

SSH_TARGETS = """
[targets.orin-01]
transport = "ssh"
backend = "tensorrt"
host = "127.0.0.1"
port = 9
models = ["tiny"]
groups = ["line-1"]
install_dir = "/opt/kiln"

[targets.orin-02]
transport = "ssh"
backend = "tensorrt"
host = "127.0.0.2"
port = 9
models = ["tiny"]
groups = ["line-1"]
install_dir = "/opt/kiln"
"""


@pytest.fixture
def fleet(tmp_path) -> Project:
    """Two SSH targets where nobody listens (the discard port): any attempt to reach them fails."""
    p = Project(tmp_path)
    p.fleet.write_text(p.fleet.read_text() + SSH_TARGETS)
    return p


def listed(p: Project) -> set[str]:
    return {line.split()[0] for line in p.doit("list", "--all").out.splitlines() if line.strip()}


def test_every_fingerprint_and_deploy_task_exists_from_the_fleet_file(fleet):
    names = listed(fleet)
    for t in ("local", "orin-01", "orin-02"):
        assert {f"fingerprint:{t}", f"deploy:{t}"} <= names
    assert "deploy:line-1" in names
    assert {"export", "fingerprint", "engine", "deploy", "cache-check", "status"} <= names
    assert not (fleet.artifacts / "fingerprints").exists()  # nothing was probed to list them


@pytest.mark.parametrize("name", ["deploy:orin-1", "fingerprint:nope", "engine:whatever@x", "deploy:line-2"])
def test_an_unknown_task_name_fails_and_names_it(fleet, name):
    run = fleet.doit(name, check=False, timeout=30)
    assert run.returncode != 0, run.out
    assert name in run.out
    assert "up to date" not in run.out


@pytest.mark.parametrize("command", [["info", "--no-status"], ["forget"], ["ignore"], ["clean"]])
def test_doits_own_commands_work_on_every_listed_task(fleet, command):
    names = sorted(listed(fleet))
    if command[0] in ("ignore", "clean"):  # one of each kind is enough for these
        names = sorted({n.split(":")[0]: n for n in names}.values())
    for name in names:
        run = fleet.doit(*command, name, check=False, timeout=30)
        assert run.returncode == 0, f"doit {' '.join(command)} {name}:\n{run.out}"
        assert "Traceback" not in run.out


def test_info_says_whether_a_task_is_up_to_date(fleet):
    """doit's convention: `info` exits 0 for an up-to-date task, 1 for one that would run (with the reasons)."""
    for name in sorted(listed(fleet)):
        run = fleet.doit("info", name, check=False, timeout=30)
        assert run.returncode in (0, 1) and "Traceback" not in run.out, f"doit info {name}:\n{run.out}"
    fleet.fleet.write_text(fleet.fleet.read_text().split("[targets.orin-01]")[0])
    fleet.doit("deploy:local")
    run = fleet.doit("info", "deploy:local", check=False)
    assert run.returncode == 0 and "status     : up-to-date" in run.out, run.out


def test_forget_makes_the_next_run_do_the_work_again(tmp_path):
    p = Project(tmp_path)
    p.doit("deploy:local")
    assert p.doit("deploy:local").ran() == set()
    p.doit("forget", "deploy:local")
    run = p.doit("deploy:local")
    assert run.ran() == {"deploy:local"}, run.out
    assert "releases already active" in run.out  # the device already runs it: nothing re-sent


LOAD_PROBE = textwrap.dedent("""
    import socket, sys, threading
    events = []
    real_connect, real_start = socket.socket.connect, threading.Thread.start
    socket.socket.connect = lambda self, *a: events.append(("connect", a)) or real_connect(self, *a)
    socket.socket.__init__ = (lambda init: lambda self, *a, **k: events.append(("socket", a)) or init(self, *a, **k))(socket.socket.__init__)
    threading.Thread.start = lambda self: events.append(("thread", self.name)) or real_start(self)
    sys.path.insert(0, ".")
    import dodo
    from doit.loader import load_tasks
    tasks = load_tasks(vars(dodo), allow_delayed=True)
    heavy = [m for m in ("torch", "onnx", "onnxruntime", "boto3", "paramiko", "fabric") if m in sys.modules]
    print(repr((events, heavy, len(tasks), threading.active_count())))
""")


def test_loading_dodo_opens_no_socket_starts_no_thread_imports_nothing_heavy(fleet):
    fleet.doit("fingerprint:local")  # a recorded fingerprint: engine tasks are created from it at load
    proc = subprocess.run([sys.executable, "-c", LOAD_PROBE], cwd=REPO, env=fleet.env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    events, heavy, n_tasks, threads = eval(proc.stdout.strip().splitlines()[-1])
    assert events == [] and heavy == [] and threads == 1, (events, heavy, threads)
    assert n_tasks > 10


@pytest.mark.parametrize("fleet_text, message", [
    ("[targets.x]\nmodels = []\n", "no models defined"),
    (TINY_MODEL + "[targets.x]\nmodels = [\"tiny\"]\n", "missing required key 'install_dir'"),
    ("[models.m\n", "not valid TOML"),
])
def test_a_bad_fleet_file_is_a_clear_error_not_a_traceback(tmp_path, fleet_text, message):
    p = Project(tmp_path)
    p.fleet.write_text(fleet_text)
    for args in (["list"], ["deploy:local"]):
        run = p.doit(*args, check=False, timeout=30)
        assert run.returncode == 2 and message in run.out and "Traceback" not in run.out, run.out
        assert str(p.fleet) in run.out


def test_an_unusable_artifacts_folder_is_a_clear_error(tmp_path):
    p = Project(tmp_path)
    (tmp_path / "file").write_text("not a folder")
    p.artifacts = tmp_path / "file"
    run = p.doit("list", check=False, timeout=30)
    assert run.returncode == 2 and "is not a folder" in run.out and "KILN_ARTIFACTS" in run.out, run.out
    assert "Traceback" not in run.out


def test_list_shows_the_known_classes_and_the_targets_each_serves(tmp_path):
    p = Project(tmp_path)
    assert not [n for n in p.doit("list", "--all").out.split() if n.startswith("engine:")]
    p.doit("deploy:local")
    engines = [line for line in p.doit("list", "--all").out.splitlines() if line.startswith("engine:")]
    assert len(engines) == 1 and engines[0].split()[0].startswith("engine:tiny@cpu-"), engines
    assert "serves local" in engines[0]
    name = engines[0].split()[0]
    assert p.doit(name).engines() == {name: "cache-hit"}  # the deploy published it already
    assert p.doit(name).ran() == set()


def test_the_library_works_from_python_without_doit(tmp_path):
    """Load the fleet, probe, export, ensure the engine, deploy: in this process, no doit."""
    from kiln.pipeline.context import Context
    from kiln.pipeline.deploy import deploy_is_current, ensure_deployed, target_engines
    from kiln.pipeline.engines import ensure_engine
    from kiln.pipeline.export import create_checkpoint, ensure_export, export_is_current
    from kiln.pipeline.fingerprints import fingerprint_is_current, probe_target, record_fingerprint

    p = Project(tmp_path)
    lines: list[str] = []
    with Context.load(p.fleet, p.artifacts) as ctx:
        model, target = ctx.fleet.models["tiny"], ctx.fleet.targets["local"]
        create_checkpoint(model)
        assert not export_is_current(ctx, model)
        ensure_export(ctx, model, say=lines.append)
        assert export_is_current(ctx, model)
        assert probe_target(ctx, target).error is None
        record_fingerprint(ctx, target)
        assert fingerprint_is_current(ctx, target)
        (spec,) = target_engines(ctx, target)
        record = ensure_engine(ctx, spec, say=lines.append)
        assert ensure_engine(ctx, spec, say=lines.append) == record  # once per run: no second build
        result = ensure_deployed(ctx, target, say=lines.append)
        assert result["releases"] == {"tiny": record["key"]} and deploy_is_current(ctx, target)
    assert p.active() == record["key"]
    assert any("published engine" in line for line in lines), lines
    kinds = [e["event"] for e in p.events()]
    assert {"export", "probe", "build", "publish", "deploy"} <= set(kinds), kinds
    # and doit agrees that nothing is left to do... once it has its own record of the tasks
    run = p.doit("deploy:local")
    assert run.ran() <= {"export:tiny", "fingerprint:local", "deploy:local", "checkpoint:tiny"}
    assert "building engine" not in run.out and "exporting" in run.out or "exporting" not in run.out
    assert json.loads((p.artifacts / "deployments" / "local.json").read_text())["releases"] == {"tiny": record["key"]}


IMPORT_ALL = textwrap.dedent("""
    import atexit, pkgutil, importlib, socket, sys, threading
    # third-party libraries first: what they do when imported (boto3/urllib3 opens an IPv6 socket
    # to test support and registers an exit hook) is theirs; what happens after is ours
    for lib in ("boto3", "botocore.config", "paramiko", "fabric", "numpy"):
        importlib.import_module(lib)
    opened, hooks = [], atexit._ncallbacks()
    socket.socket.__init__ = (lambda init: lambda self, *a, **k: opened.append(a) or init(self, *a, **k))(socket.socket.__init__)
    sys.path.insert(0, ".")
    import kiln
    names = [m.name for m in pkgutil.walk_packages(kiln.__path__, "kiln.")]
    for name in names:
        importlib.import_module(name)
    print(repr((len(names), opened, threading.active_count(), atexit._ncallbacks() - hooks)))
""")


def test_importing_every_library_module_creates_nothing():
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    modules, opened, threads, exit_hooks = eval(proc.stdout.strip().splitlines()[-1])
    assert modules >= 30, modules
    assert (opened, threads, exit_hooks) == ([], 1, 0)


def test_a_second_run_on_one_checkout_waits_for_the_first(tmp_path):
    """Two writing runs on one artifacts folder: the second says who holds it and waits; reports don't."""
    from kiln.pipeline.context import Context

    p = Project(tmp_path)
    p.doit("deploy:local")
    with Context.load(p.fleet, p.artifacts) as holder:
        lines: list[str] = []
        holder.lock_artifacts(say=lines.append)
        assert lines == []
        second = subprocess.Popen([sys.executable, "-m", "doit", "deploy:local"], cwd=REPO, env=p.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        first_line = second.stdout.readline()
        assert "is in use by run" in first_line and f"pid {os.getpid()}" in first_line, first_line
        assert second.poll() is None  # waiting, not failing and not working
        assert p.doit("status").returncode == 0  # a report does not wait
        events_before = len(p.events())
    out = first_line + second.communicate(timeout=60)[0]
    assert second.returncode == 0, out
    assert "nothing to do" in out
    assert len(p.events()) > events_before  # it ran once the first run let go


def test_once_runs_a_waiting_callers_own_work_while_another_computes(tmp_path):
    """ctx.once (an engine built once per run while other deploys wait for it): a caller that has
    to wait runs `while_waiting` first (a deploy puts its reference data on its device meanwhile);
    one that finds the value ready, or computes it, does not."""
    import threading

    from kiln.pipeline.context import Context

    p = Project(tmp_path)
    with Context.load(p.fleet, tmp_path / "artifacts") as ctx:
        started, release, events = threading.Event(), threading.Event(), []

        def compute():
            started.set()
            release.wait(10)
            events.append("computed")
            return 42

        first = threading.Thread(target=lambda: events.append(("first", ctx.once_or_offer(
            "k", compute, lambda: events.append("never"), take_offer=False)[0])))
        first.start()
        assert started.wait(10)

        def waiting():
            events.append("waited")
            release.set()
        assert ctx.once_or_offer("k", lambda: events.append("again"), waiting, take_offer=False) == (42, False)
        first.join(10)
        assert events == ["waited", "computed", ("first", 42)]
        assert ctx.once_or_offer("k", lambda: 0, lambda: events.append("late"), take_offer=False) == (42, False)
        assert "late" not in events


def test_once_or_offer_takes_an_offer_only_while_it_stands_and_if_wanted(tmp_path):
    """A deploy waiting for this run's build takes the engine the build offers early (uploaded,
    being verified), unless it declines it (its own device built it); an offer withdrawn before a
    waiter came, or ended with the build, leaves the waiter with the build's value."""
    import threading

    from kiln.pipeline.context import Context

    p = Project(tmp_path)
    with Context.load(p.fleet, tmp_path / "artifacts") as ctx:
        offered, release = threading.Event(), threading.Event()

        def build():
            ctx.offer("k", {"built_on": "a"})
            offered.set()
            release.wait(10)
            return "verified"

        builder = threading.Thread(target=lambda: ctx.once("k", build))
        builder.start()
        assert offered.wait(10)
        assert ctx.once_or_offer("k", lambda: "never") == ({"built_on": "a"}, True)
        results = []
        declining = threading.Thread(target=lambda: results.append(
            ctx.once_or_offer("k", lambda: "never", take_offer=lambda o: o["built_on"] != "a")))
        declining.start()
        release.set()
        builder.join(10)
        declining.join(10)
        assert results == [("verified", False)]
        assert ctx.once_or_offer("k", lambda: "never") == ("verified", False)  # the offer ended with the build
