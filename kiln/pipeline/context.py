"""One run's shared machinery: the fleet, the store, the hash cache, the event log,
one transport per target (opened on first use, reused by all its tasks), and
once-per-run results (a probe, an engine) shared by the threads of a run.

Constructing a Context does no I/O: the store and transports are created when first
needed, and a thread pool only when something asks to run in the background, so
`doit list` stays instant. `close()` ends it all; a Context is also a context manager.
"""
from __future__ import annotations

import threading
import os
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable

from kiln.backends.base import check_build_settings
from kiln.config import Fleet, Target, load_fleet
from kiln.errors import StoreError
from kiln.events import EventLog
from kiln.keys import HashCache
from kiln.progress import Progress
from kiln.stores import open_store
from kiln.stores.base import Store
from kiln.transports.base import Transport
from kiln.transports.local import LocalTransport

#: remote probes started at once when a command names many targets
MAX_PARALLEL = 16


class _Once:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None


class Context:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.artifacts = fleet.artifacts
        self.run_id = os.urandom(6).hex()
        self.events = EventLog(self.artifacts / "logs" / "events.jsonl", run=self.run_id)
        self.hashes = HashCache(self.artifacts / "cache" / "hashes.json")
        self._transports: dict[str, Transport] = {}
        self._store: Store | StoreError | None = None
        self._once: dict[Hashable, _Once] = {}
        self._pool = None  # a ThreadPoolExecutor, made on first use
        self._artifacts_lock: int | None = None  # fd holding the flock, see lock_artifacts
        self._progress: Progress | None = None  # made on first use, see `progress`
        self._lock = threading.Lock()
        #: names of the tasks this run may execute (set by the doit reporter; empty without doit)
        self.selected: set[str] = set()
        #: (target, engine sha256) -> {"path", "report"}: an engine this run built and verified on
        #: that target, kept there for its deploy (kiln.pipeline.engines, kiln.pipeline.deploy)
        self.verified_here: dict[tuple[str, str], dict] = {}
        #: once() key -> what its computation offers before it is done (an engine built, uploaded
        #: to the store's staging and being verified): see offer / wait_offer
        self._offers: dict[Hashable, Any] = {}
        self._offers_changed = threading.Condition()

    @classmethod
    def load(cls, fleet_file: Path | str | None = None, artifacts: Path | str | None = None) -> "Context":
        fleet = load_fleet(fleet_file, artifacts)
        check_build_settings(fleet)
        return cls(fleet)

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- where things live in artifacts/ -------------------------------------------
    def fingerprint_file(self, target: str) -> Path:
        return self.artifacts / "fingerprints" / f"{target}.json"

    def previous_fingerprint_file(self, target: str) -> Path:
        return self.artifacts / "fingerprints" / f"{target}.previous.json"

    def probe_error_file(self, target: str) -> Path:
        return self.artifacts / "fingerprints" / f"{target}.error.json"

    def engine_record(self, model: str, class_id: str) -> Path:
        return self.artifacts / "engines" / f"{model}@{class_id}.json"

    def deployment_record(self, target: str) -> Path:
        return self.artifacts / "deployments" / f"{target}.json"

    def build_log(self, key: str) -> Path:
        return self.artifacts / "logs" / "builds" / f"{key}.log"

    def engine_cache(self, key: str) -> Path:
        return self.artifacts / "cache" / "engines" / key

    # -- lazily opened resources ---------------------------------------------------
    @property
    def progress(self) -> Progress:
        """The run's progress display on stderr (kiln.progress): exports, large transfers, builds
        report to it. Made on first use; it picks its renderer (KILN_PROGRESS) when first shown."""
        with self._lock:
            if self._progress is None:
                self._progress = Progress()
            return self._progress

    @property
    def store(self) -> Store:
        """Opened and checked once per run; a broken store fails every later use the same way
        without asking the server again."""
        display = self.progress
        with self._lock:
            if self._store is None:
                try:
                    store = open_store(self.fleet.store_url, base_dir=self.fleet.base_dir)
                    store.display = display  # large puts and gets are shown
                    store.check()
                except StoreError as exc:
                    self._store = exc
                else:
                    self._store = store
        if isinstance(self._store, StoreError):
            raise self._store
        return self._store

    @store.setter
    def store(self, store: Store) -> None:
        """Use an already opened store (benchmarks that instrument its client)."""
        self._store = store

    def transport(self, target: Target) -> Transport:
        if target.transport == "ssh":  # one device, one target: checked before the first connection
            from kiln.transports.addresses import check_ssh_addresses
            self.once("ssh addresses", lambda: check_ssh_addresses(self.fleet))
        display = self.progress
        with self._lock:
            if target.name not in self._transports:
                self._transports[target.name] = self._open_transport(target)
                self._transports[target.name].display = display  # large uploads/downloads are shown
            return self._transports[target.name]

    def _open_transport(self, target: Target) -> Transport:
        if target.transport == "local":
            return LocalTransport(target.name, python=target.python)
        from kiln.transports.ssh import SSHTransport  # paramiko/fabric load only for fleets with ssh targets

        def path(value: str | None) -> str | None:  # relative to the fleet file, ~ expanded
            return str(self.fleet.base_dir / Path(value).expanduser()) if value else None
        return SSHTransport(target.name, target.host, user=target.user, port=target.port,
                            identity_file=path(target.identity_file), ssh_config=path(target.ssh_config),
                            known_hosts=path(target.known_hosts), proxy_jump=target.proxy_jump,
                            connect_timeout=target.connect_timeout, command_timeout=target.command_timeout,
                            python=target.python)

    # -- once per run ----------------------------------------------------------------
    def once(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """`compute()` the first time `key` is asked for in this run; every later (or
        concurrent) call gets the same value, or the same exception, without computing again."""
        return self.once_or_offer(key, compute, take_offer=False)[0]

    def once_or_offer(self, key: Hashable, compute: Callable[[], Any], while_waiting: Callable[[], Any] | None = None,
                      take_offer: Callable[[Any], bool] | bool = True) -> tuple[Any, bool]:
        """once(), except that a call that has to wait first runs `while_waiting()` (work of its own
        that needs no value), then takes what the running computation offers (`offer`) as soon as
        it does, if `take_offer(offered)` (or `take_offer` is True): (value, False) or (offered, True)."""
        with self._lock:
            entry = self._once.setdefault(key, _Once())
        if not entry.lock.acquire(blocking=False):
            if while_waiting is not None:
                while_waiting()
            if take_offer and (offered := self.wait_offer(key)) is not None \
                    and (take_offer is True or take_offer(offered)):
                return offered, True
            entry.lock.acquire()
        try:
            if not entry.done:
                try:
                    entry.value = compute()
                except Exception as exc:  # noqa: BLE001 - kept and re-raised to every caller
                    entry.error = exc
                entry.done = True
                with self._offers_changed:  # its offer ends with it; its waiters look again
                    self._offers.pop(key, None)
                    self._offers_changed.notify_all()
        finally:
            entry.lock.release()
        if entry.error is not None:
            raise entry.error
        return entry.value, False

    def _computing(self, key: Hashable) -> bool:
        """True while a once() computation of `key` has started and not ended."""
        with self._lock:
            entry = self._once.get(key)
        return entry is not None and not entry.done and entry.lock.locked()

    def offer(self, key: Hashable, value: Any) -> None:
        """While computing `key`: make `value` available early to wait_offer (withdrawn by
        offer(key, None) or when the computation ends)."""
        with self._offers_changed:
            if value is None:
                self._offers.pop(key, None)
            else:
                self._offers[key] = value
            self._offers_changed.notify_all()

    def wait_offer(self, key: Hashable) -> Any:
        """What the running computation of `key` offers, as soon as it does; None if it ends (or
        is not running) without an offer standing."""
        with self._offers_changed:
            while True:
                if key in self._offers:
                    return self._offers[key]
                if not self._computing(key):
                    return None
                self._offers_changed.wait(timeout=5.0)

    def forget(self, key: Hashable) -> None:
        """Drop a once-per-run result (the thing it describes has just changed)."""
        with self._lock:
            self._once.pop(key, None)

    def in_background(self, jobs: Iterable[Callable[[], Any]]) -> None:
        """Start jobs on the run's thread pool (created on first use); their results are not
        awaited here: jobs are `once()` computations that the tasks then wait for."""
        jobs = list(jobs)
        if not jobs:
            return
        with self._lock:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor
                self._pool = ThreadPoolExecutor(MAX_PARALLEL, thread_name_prefix="kiln")
            pool = self._pool
        for job in jobs:
            pool.submit(job)

    # -- one writing run per artifacts folder ---------------------------------------
    def lock_artifacts(self, say=print) -> None:
        """Hold `<artifacts>/.lock` until close(): a second run that writes the same artifacts
        (two `doit` on one checkout) waits for this one, saying who holds it, instead of both
        exporting and building into the same files. An flock dies with its process: a killed
        run leaves nothing to clean up."""
        import fcntl

        from kiln.oserrors import fleet_places, translated

        if self._artifacts_lock is not None:
            return
        path = self.artifacts / ".lock"
        # a full disk or a read-only artifacts folder: a ResourceError naming the path and the fix
        with translated(path=path, places=lambda: fleet_places(self.fleet)):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another run"
                    say(f"enginekiln: {self.artifacts} is in use by {holder}; waiting for it to finish")
                    fcntl.flock(fd, fcntl.LOCK_EX)
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"run {self.run_id} (pid {os.getpid()})\n".encode(), 0)
            except BaseException:
                os.close(fd)
                raise
        self._artifacts_lock = fd

    def close(self) -> None:
        with self._lock:
            lock, self._artifacts_lock = self._artifacts_lock, None
            if lock is not None:
                os.close(lock)  # releases the flock
            pool, self._pool = self._pool, None
            transports = list(self._transports.values())
            self._transports.clear()
            progress = self._progress
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for t in transports:
            t.close()
        if progress is not None:
            progress.close()
