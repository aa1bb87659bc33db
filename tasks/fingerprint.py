"""fingerprint:<target> — probe each target; the record changes only when the device does."""
from __future__ import annotations

import time

from kiln.config import Target
from kiln.errors import KilnError
from kiln.hwclass import describe_change
from kiln.keys import read_json, write_json_if_changed
from kiln.probe import probe_local, probe_remote
from kiln.store import fingerprint_entry

from .common import CTX, action, say


class Probe:
    """The probe is the up-to-date check: cheap locally, one command over SSH.

    Its result is kept for the action, so a changed device is probed once per run.
    """

    def __init__(self, target: Target) -> None:
        self.target = target
        self.result: dict | None = None
        self.error: KilnError | None = None
        self.seconds = 0.0

    def run(self) -> dict:
        if self.result is None and self.error is None:
            start = time.time()
            try:
                if self.target.transport == "local":
                    self.result = probe_local()
                else:
                    self.result = probe_remote(CTX.transport(self.target), trtexec=self.target.trtexec,
                                               python=self.target.python)
            except KilnError as exc:
                self.error = exc
            self.seconds = time.time() - start
        if self.error:
            raise self.error
        return self.result

    def __call__(self, task, values) -> bool:
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


def _record(probe: Probe) -> None:
    name = probe.target.name
    error_file = CTX.probe_error_file(name)
    try:
        fingerprint = probe.run()
    except KilnError as exc:
        write_json_if_changed(error_file, {"target": name, "error": exc.message, "at": time.time()})
        CTX.events.emit(f"fingerprint:{name}", "fail", target=name, why=f"probe failed: {exc.message}")
        raise
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
        probe = Probe(target)
        yield {"name": target.name, "doc": f"probe {target.name} ({target.transport}, {target.backend})",
               "actions": [action(lambda p=probe: _record(p))],
               "uptodate": [probe], "verbosity": 2}
