"""Build leases: one controller builds an engine key while the others wait for it.

Several controllers (CI runners, each with its own checkout and artifacts) share one store.
Before building an engine on a store miss, a controller takes the key's lease, a small JSON
record `leases/<ab>/<key>.json` (kiln.stores.base.lease_entry) created with the store's
compare-and-swap methods (`Store.create_exclusive`: S3 `If-None-Match: *`, a flock-guarded
file in a folder store):

    {"owner": {"run": ..., "host": ..., "pid": ..., "token": ...}, "what": ...,
     "created": <epoch s>, "expires": <epoch s>, "ttl": <s>}

- The winner builds and publishes, then releases: it deletes the record only if it still holds
  its own version (`delete_if` by etag), so it never removes a lease someone else took over.
- A loser waits: it polls the engine's manifest (backoff from `POLL` up to `POLL_MAX` seconds)
  and reports "waiting for <owner>'s build of <key> (since N s)"; when the manifest appears it
  is a cache hit. If the lease disappears without a manifest (the owner's build failed and it
  released), the waiter takes the lease and builds.
- A lease past its `expires` (its owner died: killed runner, lost machine) is taken over by a
  conditional replace pinned to the etag the waiter read (`replace_if`): of several waiters
  exactly one wins, the others keep waiting on the new owner.

Expiry compares the owner's clock (written in the record) with the waiter's: keep controllers'
clocks in sync (NTP) and the TTL generous (default: twice the builders' `command_timeout`).
A lease is an optimisation, not the safety net: if two controllers ever both build (an expired
lease whose owner was only slow), the manifest's conditional create still keeps one engine.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from kiln.stores.base import Store

log = logging.getLogger(__name__)
T = TypeVar("T")
POLL = 0.2        # first wait between two looks at the manifest, seconds
POLL_MAX = 5.0    # the backoff stops growing here


def new_owner(run: str) -> dict:
    """Who takes a lease: the controller's run id, host and pid, and a token unique to this lease."""
    return {"run": run, "host": socket.gethostname(), "pid": os.getpid(), "token": os.urandom(8).hex()}


def describe(owner: dict) -> str:
    """`run 1a2b3c on ci-runner-4 (pid 123)`: how a waiting controller names the builder."""
    return f"run {owner.get('run', '?')} on {owner.get('host', '?')} (pid {owner.get('pid', '?')})"


@dataclass(frozen=True)
class Lease:
    """A lease as read from (or written to) the store; `etag` names that version."""
    name: str
    owner: dict
    created: float
    expires: float
    etag: str
    taken_over: dict | None = None   # the expired owner this lease replaced, if any

    def expired(self, now: float) -> bool:
        """Past its expiry, or its owner ran on this host and its process is gone (a killed run
        must not make the next one wait out the whole lease)."""
        return now >= self.expires or _dead_here(self.owner)


def _dead_here(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    if owner["pid"] == os.getpid():
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by someone else
        return False
    return False


def _body(owner: dict, what: str, now: float, ttl: float, previous: dict | None) -> bytes:
    record = {"owner": owner, "what": what, "created": now, "expires": now + ttl, "ttl": ttl,
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now))}
    if previous is not None:
        record["took_over_from"] = previous
    return json.dumps(record, indent=2, sort_keys=True).encode()


def _parse(name: str, data: bytes, etag: str) -> Lease:
    try:
        record = json.loads(data)
        return Lease(name, dict(record["owner"]), float(record["created"]), float(record["expires"]), etag)
    except (ValueError, KeyError, TypeError):
        # unreadable: treat as expired, so it is replaced (by etag) rather than waited on forever
        return Lease(name, {"run": "?", "host": "unreadable lease"}, 0.0, 0.0, etag)


def read(store: Store, name: str) -> Lease | None:
    found = store.read_record(name)
    return None if found is None else _parse(name, *found)


def acquire(store: Store, name: str, owner: dict, ttl: float, *, what: str = "",
            clock: Callable[[], float] = time.time) -> tuple[Lease | None, Lease | None]:
    """Try once to take the lease `name`: (ours, None) if taken (created, or an expired one
    replaced), else (None, the holder's lease)."""
    for _ in range(5):  # the record may vanish or change between two steps: look again
        now = clock()
        etag = store.create_exclusive(name, _body(owner, what, now, ttl, None))
        if etag is not None:
            return Lease(name, owner, now, now + ttl, etag), None
        held = read(store, name)
        if held is None:
            continue  # released in between: try to create it again
        if not held.expired(now):
            return None, held
        etag = store.replace_if(name, _body(owner, what, now, ttl, held.owner), held.etag)
        if etag is not None:
            log.warning("lease %s: took over the expired lease of %s", name, describe(held.owner))
            return Lease(name, owner, now, now + ttl, etag, taken_over=held.owner), None
        held = read(store, name)  # another waiter took it over first (or its owner released it)
        if held is not None and not held.expired(clock()):
            return None, held
    held = read(store, name)
    return None, held or Lease(name, {"run": "?", "host": "unknown"}, clock(), clock() + POLL, "")


def release(store: Store, lease: Lease) -> bool:
    """Delete our lease if the store still holds our version (never someone else's)."""
    released = store.delete_if(lease.name, lease.etag)
    if not released:
        log.warning("lease %s was no longer ours when released (it expired and was taken over)", lease.name)
    return released


@dataclass(frozen=True)
class Outcome:
    value: object
    built: bool                 # True: this controller built it under the lease
    waited: float = 0.0         # seconds spent waiting on other controllers' leases
    holder: dict | None = None  # the owner waited on last, if any
    taken_over: dict | None = None


def build_once(store: Store, name: str, owner: dict, ttl: float, *, ready: Callable[[], T | None],
               build: Callable[[], T], waiting: Callable[[Lease, float], None] = lambda lease, s: None,
               what: str = "", clock: Callable[[], float] = time.time,
               sleep: Callable[[float], None] = time.sleep, poll: float = POLL, poll_max: float = POLL_MAX) -> Outcome:
    """`build()` under the lease `name`, unless `ready()` (the published result, or None) shows
    that another holder produced it meanwhile. `waiting(holder, seconds)` is called on every
    look while another controller holds the lease."""
    started, holder, delay = None, None, poll
    while True:
        ours, held = acquire(store, name, owner, ttl, what=what, clock=clock)
        if ours is not None:
            try:
                value = ready()
                if value is not None:  # published between the caller's (or our last) look and now
                    return Outcome(value, False, clock() - started if started else 0.0, holder)
                return Outcome(build(), True, clock() - started if started else 0.0, holder, ours.taken_over)
            finally:
                release(store, ours)
        holder = held.owner
        if started is None:
            started = clock()
        waiting(held, clock() - started)
        sleep(delay)
        delay = min(delay * 1.5, poll_max)
        value = ready()
        if value is not None:
            return Outcome(value, False, clock() - started, holder)
