"""Fingerprints, one target at a time: probe it, record what it said, read what others said.

A probe runs at most once per target per run (`Context.once`), and reads the active
releases on the same connection, so a deploy's up-to-date check needs no second trip.
The classes of targets not named by a command come from their recorded fingerprints
(`artifacts/fingerprints/<target>.json`): nothing here contacts a device it was not asked about.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from kiln.config import Target
from kiln.devices.local_probe import probe_local
from kiln.devices.hwclass import HardwareClass, describe_change, hardware_class
from kiln.devices.workarea import Device
from kiln.errors import KilnError, ProbeError
from kiln.keys import read_json, write_json_if_changed
from kiln.oserrors import explain_os_errors
from kiln.pipeline.context import Context
from kiln.stores.base import fingerprint_entry


@dataclass
class Probe:
    target: str
    fingerprint: dict | None = None
    #: the device's releases when probed (kiln.devices.workarea.Device.release_states), read on the
    #: probe's connection so a deploy's up-to-date check needs no second trip; None for local targets
    releases: tuple[dict, dict] | None = None
    error: KilnError | None = None
    seconds: float = 0.0


def probe_target(ctx: Context, target: Target) -> Probe:
    """Probe `target` (once per run); errors are kept on the result, not raised."""
    return ctx.once(("probe", target.name), lambda: _probe(ctx, target))


def _probe(ctx: Context, target: Target) -> Probe:
    probe, start = Probe(target.name), time.monotonic()
    try:
        if target.transport == "local":
            probe.fingerprint = probe_local()
        else:
            from kiln.devices.fingerprint import probe_remote  # the NVIDIA parsers load for remote targets only
            transport = ctx.transport(target)
            probe.fingerprint = probe_remote(transport, trtexec=target.trtexec, python=target.python,
                                             backend=target.backend)
            probe.releases = Device(transport, target).release_states(target.models)
    except KilnError as exc:
        probe.error = exc
    probe.seconds = time.monotonic() - start
    return probe


def probe_in_background(ctx: Context, targets: list[Target]) -> None:
    """Start the remote probes a command will need all at once; each task then waits only
    for its own (doit checks up-to-date-ness one task at a time)."""
    remote = [t for t in targets if t.transport != "local"]
    if len(remote) > 1:
        ctx.in_background(lambda t=t: probe_target(ctx, t) for t in remote)


def fingerprint_is_current(ctx: Context, target: Target) -> bool:
    """True iff the device says what its record says (and its last probe did not fail)."""
    probe = probe_target(ctx, target)
    if probe.error is not None or ctx.probe_error_file(target.name).exists():
        return False
    if probe.fingerprint != read_json(ctx.fingerprint_file(target.name)):
        return False
    ctx.events.emit(f"fingerprint:{target.name}", "skip", target=target.name, why="fingerprint unchanged")
    return True


@explain_os_errors
def record_fingerprint(ctx: Context, target: Target) -> str:
    """Probe `target` and record its fingerprint (locally, then in the store for CI workers).

    Returns what changed, in words. A failed probe, or a fingerprint its backend
    cannot form a hardware class from (a `tensorrt` target without TensorRT), raises
    ProbeError and is remembered in `<target>.error.json` until a probe succeeds.
    """
    try:
        return _record(ctx, target)
    finally:
        ctx.forget("recorded fingerprints")  # read again by whoever needs them next


def _record(ctx: Context, target: Target) -> str:
    name = target.name
    probe = probe_target(ctx, target)
    try:
        if probe.error is not None:
            raise probe.error
        fingerprint = probe.fingerprint
        hardware_class(target.backend, fingerprint, tuple(target.class_fields), target=name)
    except KilnError as exc:
        write_json_if_changed(ctx.probe_error_file(name), {"target": name, "error": exc.message, "at": time.time()})
        ctx.events.emit(f"fingerprint:{name}", "fail", target=name, why=f"probe failed: {exc.message}")
        raise
    old = read_json(ctx.fingerprint_file(name))
    changes = describe_change(old, fingerprint, target.backend, tuple(target.class_fields))
    if old is not None and old != fingerprint:
        write_json_if_changed(ctx.previous_fingerprint_file(name), old)  # for `status` drift
    if write_json_if_changed(ctx.fingerprint_file(name), fingerprint):
        try:
            ctx.store.put_file(fingerprint_entry(name), ctx.fingerprint_file(name), overwrite=True)
        except KilnError:
            # not published (CI workers read it from the store): put the old record back so the
            # next run sees the change again and publishes it
            if old is None:
                ctx.fingerprint_file(name).unlink(missing_ok=True)
            else:
                write_json_if_changed(ctx.fingerprint_file(name), old)
            raise
    ctx.probe_error_file(name).unlink(missing_ok=True)
    why = "; ".join(changes) or ("fingerprint unchanged" if old == fingerprint
                                 else "fingerprint changed outside the class fields")
    ctx.events.emit(f"fingerprint:{name}", "probe", target=name, why=why, seconds=probe.seconds)
    return why


def _records(ctx: Context) -> dict[str, tuple[dict, HardwareClass | None]]:
    """Every target's last good fingerprint and its class, read once per run and again only after
    `record_fingerprint` changed one (deploying to one of 500 targets must not read 500 files per
    engine it looks at)."""
    def read() -> dict[str, tuple[dict, HardwareClass | None]]:
        out = {}
        for target in ctx.fleet.targets.values():
            if ctx.probe_error_file(target.name).exists():
                continue
            fingerprint = read_json(ctx.fingerprint_file(target.name))
            if fingerprint is None:
                continue
            try:
                hw = hardware_class(target.backend, fingerprint, tuple(target.class_fields), target=target.name)
            except ProbeError:
                hw = None
            out[target.name] = (fingerprint, hw)
        return out
    return ctx.once("recorded fingerprints", read)


def recorded_fingerprint(ctx: Context, target: Target) -> dict | None:
    """The last good fingerprint of `target`, or None if it was never probed or its last probe failed."""
    record = _records(ctx).get(target.name)
    return record[0] if record else None


def recorded_class(ctx: Context, target: Target) -> HardwareClass | None:
    record = _records(ctx).get(target.name)
    return record[1] if record else None


def recorded_classes(ctx: Context) -> dict[str, HardwareClass]:
    """Class of every target with a good recorded fingerprint, by target name (no device contacted)."""
    return {name: hw for name, (_, hw) in _records(ctx).items() if hw is not None}


def require_class(ctx: Context, target: Target) -> HardwareClass:
    hw = recorded_class(ctx, target)
    if hw is None:
        error = read_json(ctx.probe_error_file(target.name)) or {}
        reason = f"its probe failed: {error['error']}" if error.get("error") else "it was never probed"
        raise ProbeError(f"no hardware class for {target.name}: {reason}", target=target.name,
                         hint=f"run `doit fingerprint:{target.name}` once the device is reachable")
    return hw
