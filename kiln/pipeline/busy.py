"""Busy devices: a target's optional `busy_check` decides whether now is a good moment to switch.

The check is a shell command run on the device right before activation (after the new releases
are uploaded and smoke-tested, which disturbs nothing): exit 0 means free, any other exit code
means busy (its output says why). A busy device is asked again every `busy_interval` seconds
until `busy_timeout`; still busy then, its deploy ends *pending*, not failed: nothing is switched,
the previous releases keep serving, and the next run tries again. `status` shows it.
"""
from __future__ import annotations

import json
import time

from kiln.config import Target
from kiln.devices.workarea import Device
from kiln.files import atomic_write
from kiln.keys import read_json
from kiln.pipeline.context import Context


def _busy_reason(device: Device, target: Target) -> str | None:
    """None when the device is free; else what the check said."""
    result = device.transport.run(["sh", "-c", target.busy_check], check=False, timeout=target.command_timeout)
    if result.exit_code == 0:
        return None
    said = (result.stdout + result.stderr).strip().splitlines()
    return f"busy_check exited {result.exit_code}" + (f": {said[-1][:200]}" if said else "")


def wait_until_free(ctx: Context, target: Target, device: Device, say=print, sleep=time.sleep) -> str | None:
    """Wait (within `busy_timeout`) for the device to be free; None when it is, else why it is not."""
    if not target.busy_check:
        return None
    deadline = time.monotonic() + float(target.busy_timeout)
    reason = _busy_reason(device, target)
    while reason is not None and time.monotonic() < deadline:
        left = deadline - time.monotonic()
        say(f"  {target.name}: busy ({reason}); asking again in {target.busy_interval:g} s "
            f"(gives up in {left:.0f} s)")
        sleep(min(float(target.busy_interval), max(left, 0)))
        reason = _busy_reason(device, target)
    path = ctx.deployment_record(target.name).with_suffix(".busy.json")
    if reason is None:
        path.unlink(missing_ok=True)
    else:
        atomic_write(path, json.dumps({"since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "why": reason}) + "\n")
    return reason


def last_busy(ctx: Context, target: Target) -> dict | None:
    """The busy marker of the target's last deploy that stayed pending (None if it was not)."""
    return read_json(ctx.deployment_record(target.name).with_suffix(".busy.json"))

