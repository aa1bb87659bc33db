"""fingerprint:<target> — probe each target; the record changes only when the device does."""
from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from kiln.config import Target
from kiln.devices.workarea import Device
from kiln.errors import KilnError
from kiln.devices.hwclass import describe_change
from kiln.keys import read_json, write_json_if_changed
from kiln.devices.fingerprint import probe_local, probe_remote
from kiln.stores.base import fingerprint_entry

from .common import CTX, action, say


class Probe:
    """The probe is the up-to-date check: cheap locally, one command over SSH.

    Its result is kept for the action, so a changed device is probed once per run.
    """

    def __init__(self, target: Target, fleet: "FleetProbes | None" = None) -> None:
        self.target = target
        self.fleet = fleet
        self.result: dict | None = None
        self.active: dict[str, str | None] | None = None  # releases active on the device when probed
        self.error: KilnError | None = None
        self.seconds = 0.0
        self._lock = threading.Lock()

    def run(self) -> dict:
        with self._lock:
            self._run_once()
        if self.error:
            raise self.error
        return self.result

    def _run_once(self) -> None:
        if self.result is None and self.error is None:
            start = time.time()
            try:
                if self.target.transport == "local":
                    self.result = probe_local()
                else:
                    transport = CTX.transport(self.target)
                    self.result = probe_remote(transport, trtexec=self.target.trtexec, python=self.target.python)
                    # read while we are there: deploy's up-to-date check needs it next
                    self.active = Device(transport, self.target).active_releases(self.target.models)
            except KilnError as exc:
                self.error = exc
            self.seconds = time.time() - start

    def __call__(self, task, values) -> bool:
        if self.fleet:
            self.fleet.prefetch()
        try:
            current = self.run()
        except KilnError:
            return False
        if CTX.probe_error_file(self.target.name).exists():
            return False
        if current == read_json(CTX.fingerprint_file(self.target.name)):
            CTX.events.emit(f"fingerprint:{self.target.name}", "skip", target=self.target.name,
                            why="fingerprint unchanged")
            return True
        return False


class FleetProbes:
    """doit checks up-to-date-ness one task at a time, so twenty devices would be probed one
    after another. On the first check, every remote probe this command will need starts at
    once in a thread pool (each on the connection its tasks reuse); each check then only
    waits for its own result.

    Any `engine` or `deploy` task needs every fingerprint (classes come from all of them),
    so the whole fleet is probed, unless the command names only `fingerprint:<target>` tasks.
    """

    MAX_PARALLEL = 16

    def __init__(self, targets) -> None:
        self.probes = {t.name: Probe(t, self) for t in targets}
        self._started = False
        self._lock = threading.Lock()

    def prefetch(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        wanted = [p for name, p in self.probes.items() if p.target.transport != "local" and name in _selected()]
        if len(wanted) > 1:
            pool = ThreadPoolExecutor(min(self.MAX_PARALLEL, len(wanted)), thread_name_prefix="kiln-probe")
            for probe in wanted:
                pool.submit(probe.run)  # results and errors stay on each Probe
            pool.shutdown(wait=False)


PROBES = FleetProbes(CTX.fleet.targets.values())


def _task_args() -> list[str]:
    return [a for a in sys.argv[1:] if not a.startswith("-") and not a.isdigit()]


def _named_on_command_line() -> set[str]:
    """Targets whose fingerprint task the user asked for by name."""
    return {a.split(":", 1)[1] for a in _task_args() if a.startswith("fingerprint:")}


def _selected() -> set[str]:
    """Targets the command will probe (see FleetProbes)."""
    names = _task_args()
    if names and all(a.startswith("fingerprint:") for a in names):
        return _named_on_command_line()
    return set(CTX.fleet.targets)


def _record(probe: Probe) -> None:
    name = probe.target.name
    error_file = CTX.probe_error_file(name)
    try:
        fingerprint = probe.run()
    except KilnError as exc:
        write_json_if_changed(error_file, {"target": name, "error": exc.message, "at": time.time()})
        CTX.events.emit(f"fingerprint:{name}", "fail", target=name, why=f"probe failed: {exc.message}")
        if name in _named_on_command_line():
            raise
        # Every deploy probes the whole fleet (classes come from all fingerprints): an offline
        # device must not fail `doit deploy:<another target>`. Its own deploy task fails instead.
        say(f"  WARNING {name}: probe failed, its engine/deploy tasks will fail: {exc.message}")
        return
    old = read_json(CTX.fingerprint_file(name))
    changes = describe_change(old, fingerprint, probe.target.backend, tuple(probe.target.class_fields))
    if old is not None and old != fingerprint:
        write_json_if_changed(CTX.previous_fingerprint_file(name), old)  # for `status` drift
    if write_json_if_changed(CTX.fingerprint_file(name), fingerprint):
        try:
            CTX.store.put_file(fingerprint_entry(name), CTX.fingerprint_file(name), overwrite=True)
        except KilnError:
            # not published (CI workers read it from the store): put the old record back so the
            # next run sees the change again and publishes it
            if old is None:
                CTX.fingerprint_file(name).unlink(missing_ok=True)
            else:
                write_json_if_changed(CTX.fingerprint_file(name), old)
            raise
    error_file.unlink(missing_ok=True)
    why = "; ".join(changes) or "fingerprint changed outside the class fields"
    CTX.events.emit(f"fingerprint:{name}", "probe", target=name, why=why, seconds=probe.seconds)
    say(f"  {name}: {why}")


def task_fingerprint():
    """Probe targets (CPU ISA, GPU, L4T/JetPack, TensorRT, CUDA, cuDNN, ...)."""
    yield {"name": None, "doc": "probe every target"}
    for target in CTX.fleet.targets.values():
        probe = PROBES.probes[target.name]
        yield {"name": target.name, "doc": f"probe {target.name} ({target.transport}, {target.backend})",
               "actions": [action(lambda p=probe: _record(p))],
               "uptodate": [probe], "verbosity": 2}
