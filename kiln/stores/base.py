"""Content-addressed artifact store: the contract and the layout.

Every entry is recorded with the sha256 of its bytes when it is written, and
every read verifies the bytes against that record before they are used. An entry
is corrupt only when its bytes do not match ITS OWN recorded digest: it is then
moved to `quarantine/<name>` with a `quarantine/<name>.reason.json` next to it
(never deleted), a warning is logged and `CorruptEntry` is raised so the caller
rebuilds or re-downloads. A caller whose expected sha256 differs from an intact
entry's own digest holds a stale expectation, not a corrupt entry: `StaleDigest`
(a KeyError: "no entry with those bytes") is raised and the entry is left alone.

Engines are addressed in two steps: the engine key names a manifest
(`engines/<ab>/<key>/manifest.json`, created by a conditional write, never
overwritten by a racer) and the manifest names the engine's bytes by their own
digest (`blobs/<ab>/<sha256>`). `engines/<ab>/<key>/engine` is kept as a read
alias (resolved through the manifest) for callers that still fetch by key.

Writes never overwrite an existing entry unless asked to (`overwrite=True`,
used only for mutable entries: recorded fingerprints, timing caches, pointers).
A write that loses a race returns False and the caller uses the winner's entry.

`LocalStore` (kiln.stores.local) and `S3Store` (kiln.stores.s3) implement the
contract; `kiln.stores.open_store(url)` picks one.
"""
from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from kiln.errors import CorruptEntry, StoreError

log = logging.getLogger(__name__)

_SHA = re.compile(r"^[0-9a-f]{64}$")
_ENGINE_ALIAS = re.compile(r"^engines/[0-9a-f]{2}/([0-9a-f]{64})/engine$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@=+-]*(/[A-Za-z0-9][A-Za-z0-9._@=+-]*)*$")


# -- layout: the one place that says where things live in a store -------------

def _by_digest(folder: str, leaf: str):
    """Entry names for things named by a digest, sharded by its first two characters."""
    return lambda digest: f"{folder}/{digest[:2]}/{digest}{leaf}"


onnx_entry = _by_digest("onnx", ".onnx")
#: an ONNX's external data file, by its own sha256 (the graph names it `<sha256>.onnx.data`: kiln.onnx_external)
onnx_data_entry = _by_digest("onnx", ".onnx.data")
#: fixed inputs and PyTorch outputs that every engine of this ONNX is checked against
reference_entry = _by_digest("onnx", ".reference.npz")
#: payloads addressed by their own sha256 (engines); a blob is corrupt iff its bytes hash otherwise
blob_entry = _by_digest("blobs", "")
#: engine key -> manifest naming the engine blob by sha256 (created once, by a conditional write)
engine_manifest_entry = _by_digest("engines", "/manifest.json")
#: read alias of the engine of a key: resolves through its manifest to `blob_entry(sha)`.
#: (Stores written before blobs/ hold the bytes here; they are read as they are.)
engine_entry = _by_digest("engines", "/engine")
timing_cache_entry = _by_digest("timing-caches", ".cache")  # by class digest
#: refit base key (architecture, class, build settings, builder) -> signed record naming the blob of a
#: refittable engine of that architecture (kiln.pipeline.refit); created once, by a conditional write
refit_base_entry = _by_digest("refit-bases", ".json")
#: INT8 calibration caches, by kiln.pipeline.calibration.calibration_key (ONNX, data, TensorRT, class)
calibration_cache_entry = _by_digest("calibration-caches", ".cache")


def lease_entry(key: str) -> str:
    """The build lease of an engine key (kiln.stores.lease): a mutable record, see `Store.create_exclusive`."""
    return f"leases/{key[:2]}/{key}.json"


def onnx_record_entry(model: str) -> str:
    """Pointer to the model's current ONNX (its export record), for CI workers."""
    return f"models/{model}/onnx.json"


def fingerprint_entry(target: str) -> str:
    return f"fingerprints/{target}.json"


def quarantine_entry(name: str) -> str:
    """Where a corrupt entry is moved (its reason in `quarantine_entry(name) + ".reason.json"`)."""
    return f"quarantine/{name}"


def staging_entry(token: str) -> str:
    """Uploads from devices land here; the controller verifies and promotes them."""
    return f"staging/{token}"


def check_name(name: str) -> str:
    if not _NAME.match(name) or ".." in name.split("/"):
        raise StoreError(f"invalid store entry name {name!r}",
                         hint="entry names are relative paths of [A-Za-z0-9._@=+-] segments")
    return name


class StaleDigest(StoreError, KeyError):
    """The entry is intact (its bytes match its own digest) but is not the bytes the caller
    expected: the caller's record is stale. Nothing is removed; a KeyError, like a miss."""

    __str__ = StoreError.__str__


@dataclass(frozen=True)
class EntryInfo:
    name: str
    sha256: str
    size: int


class Transferring:
    """One put or get under way: its bytes go to the store's `progress(name, done, total)`
    callback and to its `display` (see `Store.transferring`)."""

    def __init__(self, store: "Store", name: str, size: int, shown) -> None:
        self.store, self.name, self.size, self.shown = store, name, size, shown
        self.done = 0

    def advance(self, n: int) -> None:
        self.update(self.done + n)

    def update(self, done: int) -> None:
        self.done = done
        if self.store.progress:
            self.store.progress(self.name, done, self.size)
        self.shown.update(done)


class Store(abc.ABC):
    """What every store offers. Names are relative, `/`-separated (see `check_name`)."""

    url: str
    #: progress(name, bytes_done, bytes_total) for every put and get (benchmarks, tests), or None
    progress: Callable[[str, int, int], None] | None = None
    #: where large puts and gets are shown (a kiln.progress.Progress; the run's Context sets it)
    display = None

    @contextmanager
    def transferring(self, verb: str, name: str, size: int) -> Iterator[Transferring]:
        """Report a put or get of `size` bytes of entry `name` while the block runs."""
        from kiln.progress import short_name, transfer
        with transfer(self.display, f"store {verb} {short_name(name)}", size) as shown:
            yield Transferring(self, name, size, shown)

    @abc.abstractmethod
    def check(self) -> None:
        """Fail early, with one clear StoreError, if the store is unusable (missing bucket, credentials)."""

    @abc.abstractmethod
    def info(self, name: str) -> EntryInfo | None:
        """Recorded sha256 and size of an entry, or None if absent. Reads no payload."""

    def exists(self, name: str) -> bool:
        return self.info(name) is not None

    @abc.abstractmethod
    def put_file(self, name: str, path: Path | str, *, sha256: str | None = None,
                 overwrite: bool = False) -> bool:
        """Store a file's bytes under `name`. If `sha256` is given the bytes must match it.

        Returns True if written, False if the entry already existed (and `overwrite` is False).
        """

    @abc.abstractmethod
    def get_file(self, name: str, dest: Path | str, *, sha256: str | None = None) -> EntryInfo:
        """Copy an entry to `dest` (atomically), verified against its recorded sha256
        (and against `sha256` if given). Raises KeyError if absent, StaleDigest (a KeyError)
        if the entry is intact but not the `sha256` asked for, CorruptEntry if its bytes do
        not match its own digest (the entry is then quarantined, see `quarantine`)."""

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Remove an entry; absent entries are ignored. Readers never call this on their own
        expectations: a corrupt entry is quarantined, a stale record is re-read."""

    @abc.abstractmethod
    def quarantine(self, name: str, reason: dict) -> None:
        """Move a corrupt entry to `quarantine_entry(name)` with `reason` (JSON) next to it;
        the entry is then absent. An entry already gone is ignored."""

    def resolve(self, name: str) -> str | None:
        """The entry an alias name reads: `engine_entry(key)` -> the blob its manifest names.
        None if `name` is no alias or has nothing to resolve to. Called only when `name`
        itself is absent (stores written before blobs/ hold the bytes under the alias)."""
        m = _ENGINE_ALIAS.match(name)
        if not m:
            return None
        import json
        try:
            manifest = json.loads(self.get_bytes(engine_manifest_entry(m.group(1))))
        except (KeyError, CorruptEntry, ValueError):
            return None
        sha = manifest.get("sha256") if isinstance(manifest, dict) else None
        return blob_entry(sha) if isinstance(sha, str) and _SHA.match(sha) else None

    @staticmethod
    def reason_bytes(name: str, reason: dict) -> bytes:
        import json
        import time
        return json.dumps({"entry": name, "quarantined_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           **reason}, indent=2, sort_keys=True).encode()

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Names of the entries under `prefix`, sorted."""

    # -- mutable records with compare-and-swap (build leases) ----------------------
    # Small JSON records that several controllers race on. They are not content-addressed
    # entries: no recorded sha256, read and written only through these four methods. Each
    # version of a record has an opaque `etag`; a write or delete pinned to an etag succeeds
    # only if the record still holds that version, and only one of several racers wins.

    @abc.abstractmethod
    def create_exclusive(self, name: str, data: bytes) -> str | None:
        """Create record `name` holding `data` unless it exists. Returns the new version's etag,
        or None if the record already existed (another writer won)."""

    @abc.abstractmethod
    def read_record(self, name: str) -> tuple[bytes, str] | None:
        """(bytes, etag) of record `name`, or None if absent."""

    @abc.abstractmethod
    def replace_if(self, name: str, data: bytes, etag: str) -> str | None:
        """Replace record `name` with `data` only if it still holds version `etag`. Returns the
        new etag, or None if the record changed or is gone (another writer won)."""

    @abc.abstractmethod
    def delete_if(self, name: str, etag: str) -> bool:
        """Delete record `name` only if it still holds version `etag`; True if deleted."""

    # -- small payloads ---------------------------------------------------------
    def put_bytes(self, name: str, data: bytes, *, overwrite: bool = False) -> bool:
        import tempfile
        with tempfile.NamedTemporaryFile(prefix=".kiln-put-", delete=False) as tmp:
            tmp.write(data)
        try:
            return self.put_file(name, tmp.name, sha256=hashlib.sha256(data).hexdigest(),
                                 overwrite=overwrite)
        finally:
            os.unlink(tmp.name)

    def get_bytes(self, name: str) -> bytes:
        import tempfile
        with tempfile.TemporaryDirectory(prefix="kiln-get-") as tmp:
            dest = Path(tmp) / "entry"
            self.get_file(name, dest)
            return dest.read_bytes()

    # -- uploads from devices -----------------------------------------------------
    def promote(self, staging_name: str, final_name: str, sha256: str) -> bool:
        """Verify a staged upload (see `staging_entry`) against `sha256` and publish exactly
        the verified bytes as `final_name` (never overwriting); the staging entry (the caller's
        own upload) is removed either way. Returns True if written, False if `final_name` already existed.
        Raises KeyError if nothing is staged, CorruptEntry if the staged bytes do not match."""
        import tempfile
        with tempfile.TemporaryDirectory(prefix="kiln-promote-") as tmp:
            verified = Path(tmp) / "staged"
            try:
                self.get_file(staging_name, verified, sha256=sha256)
            except (CorruptEntry, StaleDigest) as exc:
                self.delete(staging_name)
                raise CorruptEntry(
                    f"refusing to promote {staging_name} to {final_name}: the uploaded bytes do "
                    "not match the expected sha256 (the staging entry was removed)",
                    hint="the device's upload was corrupt or incomplete; upload it again",
                    store=self.url, expected=sha256) from exc
            written = self.put_file(final_name, verified, sha256=sha256)
        self.delete(staging_name)
        return written

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def read_checked_record(store, name: str, problem: Callable[[object], dict | None]) -> dict | None:
    """The JSON object stored as `name`, or None if absent or unreadable. Bytes the store finds corrupt
    are quarantined by the store; a record of which `problem` (given the parsed JSON, or None if the
    bytes are no JSON) says what is wrong, as a quarantine reason {"reason": ..., ...}, is quarantined
    here with that reason."""
    try:
        record = json.loads(store.get_bytes(name))
    except (KeyError, CorruptEntry):
        return None
    except ValueError:
        record = None
    reason = problem(record)
    if reason is not None:
        store.quarantine(name, reason)
        log.warning("%s: %s; moved it to %s", name, reason["reason"], quarantine_entry(name))
        return None
    return record
