"""`LocalStore`: the store contract (kiln.stores.base.Store) on a local folder.

Physical layout under the root: `blobs/<sha256>` (payloads, read-only 0444 once
written), `entries/<name>` (symlinks to blobs: the recorded digest is the link's
target name), `quarantine/<name>` + `quarantine/<name>.reason.json` (corrupt bytes
moved aside, never deleted), `records/<name>` (mutable records such as build leases:
plain files, changed only under an exclusive `flock` on `records/<dir>/.<leaf>.lock`, so
compare-and-swap holds across processes and controllers sharing the folder)."""
from __future__ import annotations

import hashlib
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from kiln.errors import CorruptEntry, StoreError
from kiln.files import atomic_file, copy_hashing, fsync_dir, sha256_file
from kiln.stores.base import EntryInfo, StaleDigest, Store, check_name, quarantine_entry

log = logging.getLogger(__name__)
BLOB_MODE = 0o444  # blobs are never written in place: a flipped byte is damage, not an update

_SHA = re.compile(r"^[0-9a-f]{64}$")


class _Refused(Exception):
    """Raised inside atomic_file to discard bytes that failed verification."""


class LocalStore(Store):
    """A folder. Payloads live once in `blobs/<sha256>`; an entry is a symlink
    `entries/<name>` -> its blob, so the recorded digest and the bytes appear
    together atomically (symlink creation fails if the entry exists: no overwrite,
    and a lost race is detected), and a flipped byte in a blob is caught on read."""

    def __init__(self, root: Path | str, *,
                 progress: Callable[[str, int, int], None] | None = None) -> None:
        self.root = Path(root)
        self.url = f"file://{self.root}"
        self.progress = progress  # progress(name, bytes_done, bytes_total), as in S3Store

    def _entry(self, name: str) -> Path:
        return self.root / "entries" / check_name(name)

    def check(self) -> None:
        try:
            (self.root / "blobs").mkdir(parents=True, exist_ok=True)
            (self.root / "entries").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot use the local store folder {self.root}: {exc.strerror}",
                             hint="check the [store] url in the fleet file and the folder's permissions") from exc

    def info(self, name: str) -> EntryInfo | None:
        found = self._info(name)
        if found is None and (alias := self.resolve(name)) is not None:
            found = self._info(alias)
        return found

    def _info(self, name: str) -> EntryInfo | None:
        entry = self._entry(name)
        try:
            sha = os.path.basename(os.readlink(entry))
            size = entry.stat().st_size
        except OSError:  # absent, a folder of entries (EINVAL), or a dangling link (blob removed)
            return None
        return EntryInfo(name, sha, size)

    def put_file(self, name, path, *, sha256=None, overwrite=False) -> bool:
        entry = self._entry(name)
        if not overwrite and os.path.lexists(entry) and not self._clear_dangling(entry):
            return False
        self.check()
        # The blob is named by its digest: without the caller's, hash first (one extra read).
        expected = sha256 or sha256_file(path)
        if not _SHA.match(expected):
            raise StoreError(f"refusing to store {name}: {expected!r} is not a sha256 hex digest",
                             hint="pass the lowercase hex sha256 of the file", store=self.url)
        blob = self.root / "blobs" / expected
        # same name = same bytes: replacing is harmless (and repairs a blob damaged behind our back)
        with open(path, "rb") as fin, self.transferring("put", name, os.fstat(fin.fileno()).st_size) as shown, \
                atomic_file(blob, mode=BLOB_MODE) as fout:
            sha, _ = copy_hashing(fin, fout, shown.advance)
            if sha != expected:
                raise StoreError(f"refusing to store {name}: its bytes do not match the expected sha256",
                                 hint="the source file changed or was corrupted while being published; rebuild it",
                                 expected=expected, actual=sha)
        entry.parent.mkdir(parents=True, exist_ok=True)
        link_target = os.path.relpath(blob, entry.parent)
        if overwrite:
            tmp_link = entry.with_name(f".{entry.name}.{os.urandom(8).hex()}.link")  # unique per writer
            os.symlink(link_target, tmp_link)
            os.replace(tmp_link, entry)
        else:
            try:
                os.symlink(link_target, entry)
            except FileExistsError:
                if not self._clear_dangling(entry):
                    return False  # lost a race: the caller uses the winner's entry
                try:
                    os.symlink(link_target, entry)
                except FileExistsError:
                    return False
        fsync_dir(entry.parent)
        return True

    @staticmethod
    def _clear_dangling(entry: Path) -> bool:
        """Remove `entry` if it is a link to a removed (corrupt) blob; True if it is now absent.
        Safe against concurrent writers: the link is renamed aside (only one renamer wins) and
        put back if it turns out to be live (a writer re-created it in between)."""
        if os.path.exists(entry):
            return False
        aside = entry.with_name(f".{entry.name}.{os.urandom(8).hex()}.stale")
        try:
            os.rename(entry, aside)
        except FileNotFoundError:
            return True
        if os.path.exists(aside):  # live after all: restore it unless someone else took the name
            try:
                os.link(aside, entry, follow_symlinks=False)
            except FileExistsError:
                pass
            os.unlink(aside)
            return False
        os.unlink(aside)
        return True

    def get_file(self, name, dest, *, sha256=None) -> EntryInfo:
        info = self._info(name)
        if info is None and (alias := self.resolve(name)) is not None:
            name, info = alias, self._info(alias)
        if info is None:
            raise KeyError(name)
        if sha256 and sha256 != info.sha256:  # intact or not, it is not what the caller wants
            raise StaleDigest(f"store entry {name} holds other bytes than expected (its record is stale)",
                              hint="re-read the record that named these bytes", store=self.url,
                              recorded=info.sha256, expected=sha256)
        try:
            with open(self._entry(name), "rb") as fin, self.transferring("get", name, info.size) as shown, \
                    atomic_file(dest) as fout:
                actual, size = copy_hashing(fin, fout, shown.advance)
                if actual != info.sha256:
                    raise _Refused  # dest never appears
        except FileNotFoundError:
            raise KeyError(name) from None
        except _Refused:
            where = quarantine_entry(name)
            self.quarantine(name, {"reason": "bytes do not match their own sha256",
                                   "recorded_sha256": info.sha256, "actual_sha256": actual})
            log.warning("store entry %s was corrupt (sha256 %s, recorded %s); moved it to %s", name,
                        actual[:12], info.sha256[:12], where)
            raise CorruptEntry(f"store entry {name} is corrupt and has been moved to {where}",
                               hint="it will be rebuilt or re-published on the next run",
                               store=self.url, recorded=info.sha256, actual=actual) from None
        return EntryInfo(name, actual, size)

    def quarantine(self, name: str, reason: dict) -> None:
        """The damaged blob is renamed into `quarantine/<name>` (every entry linking to it is
        then dangling, i.e. absent, and is re-created by the next put); the entry link is
        removed. Concurrent readers: one rename wins, the others find nothing to move."""
        info = self._info(name)
        if info is None:
            return
        dest = self.root / quarantine_entry(name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(self.root / "blobs" / info.sha256, dest)
        except FileNotFoundError:
            return  # another reader moved it first
        (dest.parent / f"{dest.name}.reason.json").write_bytes(self.reason_bytes(name, reason))
        self._clear_dangling(self._entry(name))

    def delete(self, name: str) -> None:
        try:
            self._entry(name).unlink(missing_ok=True)
        except (IsADirectoryError, NotADirectoryError):
            pass  # a folder of entries, or below an entry: not an entry, so absent

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / "entries"
        if not base.is_dir():
            return []
        found = []
        for dirpath, _dirs, files in os.walk(base):
            for f in files:
                if f.startswith("."):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), base).replace(os.sep, "/")
                if rel.startswith(prefix):
                    found.append(rel)
        return sorted(found)

    # -- mutable records (kiln.stores.base.Store.create_exclusive) -------------------
    def _record(self, name: str) -> Path:
        return self.root / "records" / check_name(name)

    @contextmanager
    def _record_lock(self, name: str):
        """An exclusive flock next to the record (the lock file is never removed: removing it
        would let two processes hold locks on two different files of one name)."""
        import fcntl
        path = self._record(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot lock record {name} in {self.root}: {exc.strerror}",
                             hint="check the local store folder's permissions", store=self.url) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield path
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _etag(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def _write_record(self, path: Path, data: bytes) -> str:
        with atomic_file(path) as out:
            out.write(data)
        return self._etag(data)

    def read_record(self, name: str) -> tuple[bytes, str] | None:
        try:
            data = self._record(name).read_bytes()  # replaced by rename: always one whole version
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        return data, self._etag(data)

    def create_exclusive(self, name: str, data: bytes) -> str | None:
        with self._record_lock(name) as path:
            if path.exists():
                return None
            return self._write_record(path, data)

    def replace_if(self, name: str, data: bytes, etag: str) -> str | None:
        with self._record_lock(name) as path:
            now = self.read_record(name)
            if now is None or now[1] != etag:
                return None
            return self._write_record(path, data)

    def delete_if(self, name: str, etag: str) -> bool:
        with self._record_lock(name) as path:
            now = self.read_record(name)
            if now is None or now[1] != etag:
                return False
            path.unlink()
            return True
