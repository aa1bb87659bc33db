"""`LocalStore`: the store contract (kiln.stores.base.Store) on a local folder."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable

from kiln.errors import CorruptEntry, StoreError
from kiln.files import atomic_file, copy_hashing, fsync_dir, sha256_file
from kiln.stores.base import EntryInfo, Store, check_name

log = logging.getLogger(__name__)

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
        with open(path, "rb") as fin, atomic_file(blob) as fout:  # same name = same bytes: replacing is harmless
            sha, _ = copy_hashing(fin, fout, self._progress(name, os.fstat(fin.fileno()).st_size))
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

    def _progress(self, name: str, total: int) -> Callable[[int], None] | None:
        if not self.progress:
            return None
        done = 0

        def progress(n: int) -> None:
            nonlocal done
            done += n
            self.progress(name, done, total)
        return progress

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
        info = self.info(name)
        if info is None:
            raise KeyError(name)
        try:
            with open(self._entry(name), "rb") as fin, atomic_file(dest) as fout:
                actual, size = copy_hashing(fin, fout)
                if actual != info.sha256 or (sha256 and actual != sha256):
                    raise _Refused  # dest never appears
        except FileNotFoundError:
            raise KeyError(name) from None
        except _Refused:
            self.delete(name)
            (self.root / "blobs" / info.sha256).unlink(missing_ok=True)
            log.warning("store entry %s was corrupt (sha256 %s, recorded %s); removed it", name,
                        actual[:12], info.sha256[:12])
            raise CorruptEntry(f"store entry {name} is corrupt and has been removed",
                               hint="it will be rebuilt or re-published on the next run",
                               store=self.url, recorded=info.sha256, actual=actual) from None
        return EntryInfo(name, actual, size)

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
