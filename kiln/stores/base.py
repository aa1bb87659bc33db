"""Content-addressed artifact store: the interface, the layout, and the local folder store.

Every entry is recorded with the sha256 of its bytes when it is written, and
every read verifies the bytes against that record before they are used; a
mismatch is a *miss*: the entry is removed, a warning is logged and
`CorruptEntry` is raised so the caller rebuilds or re-downloads.

Writes never overwrite an existing entry unless asked to (`overwrite=True`,
used only for mutable entries: recorded fingerprints, timing caches, pointers).
A write that loses a race returns False and the caller uses the winner's entry.

`S3Store` (kiln.stores.s3) implements the same contract; `open_store(url)` picks one.
"""
from __future__ import annotations

import abc
import hashlib
import logging
import os
import re
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from kiln.errors import CorruptEntry, StoreError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@=+-]*(/[A-Za-z0-9][A-Za-z0-9._@=+-]*)*$")
CHUNK = 1 << 20


# -- layout: the one place that says where things live in a store -------------

def onnx_entry(onnx_sha256: str) -> str:
    return f"onnx/{onnx_sha256[:2]}/{onnx_sha256}.onnx"


def reference_entry(onnx_sha256: str) -> str:
    """Fixed inputs and PyTorch outputs that every engine of this ONNX is checked against."""
    return f"onnx/{onnx_sha256[:2]}/{onnx_sha256}.reference.npz"


def onnx_record_entry(model: str) -> str:
    """Pointer to the model's current ONNX (its export record), for CI workers."""
    return f"models/{model}/onnx.json"


def engine_entry(engine_key: str) -> str:
    return f"engines/{engine_key[:2]}/{engine_key}/engine"


def engine_manifest_entry(engine_key: str) -> str:
    return f"engines/{engine_key[:2]}/{engine_key}/manifest.json"


def timing_cache_entry(class_digest: str) -> str:
    return f"timing-caches/{class_digest[:2]}/{class_digest}.cache"


def fingerprint_entry(target: str) -> str:
    return f"fingerprints/{target}.json"


def staging_entry(token: str) -> str:
    """Uploads from devices land here; the controller verifies and promotes them."""
    return f"staging/{token}"


def check_name(name: str) -> str:
    if not _NAME.match(name) or ".." in name.split("/"):
        raise StoreError(f"invalid store entry name {name!r}",
                         hint="entry names are relative paths of [A-Za-z0-9._@=+-] segments")
    return name


@dataclass(frozen=True)
class EntryInfo:
    name: str
    sha256: str
    size: int


class Store(abc.ABC):
    """What every store offers. Names are relative, `/`-separated (see `check_name`)."""

    url: str

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
        (and against `sha256` if given). Raises KeyError if absent, CorruptEntry if the
        bytes do not match (the entry is then removed)."""

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Remove an entry; absent entries are ignored."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Names of the entries under `prefix`, sorted."""

    # -- small payloads ---------------------------------------------------------
    def put_bytes(self, name: str, data: bytes, *, overwrite: bool = False) -> bool:
        with tempfile.NamedTemporaryFile(prefix=".kiln-put-", delete=False) as tmp:
            tmp.write(data)
        try:
            return self.put_file(name, tmp.name, sha256=hashlib.sha256(data).hexdigest(),
                                 overwrite=overwrite)
        finally:
            os.unlink(tmp.name)

    def get_bytes(self, name: str) -> bytes:
        with tempfile.TemporaryDirectory(prefix="kiln-get-") as tmp:
            dest = Path(tmp) / "entry"
            self.get_file(name, dest)
            return dest.read_bytes()

    # -- uploads from devices -----------------------------------------------------
    def promote(self, staging_name: str, final_name: str, sha256: str) -> bool:
        """Verify a staged upload (see `staging_entry`) against `sha256` and publish exactly
        the verified bytes as `final_name` (never overwriting); the staging entry is removed
        either way. Returns True if written, False if `final_name` already existed.
        Raises KeyError if nothing is staged, CorruptEntry if the staged bytes do not match."""
        with tempfile.TemporaryDirectory(prefix="kiln-promote-") as tmp:
            verified = Path(tmp) / "staged"
            try:
                self.get_file(staging_name, verified, sha256=sha256)
            except CorruptEntry as exc:
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


def copy_hashing(src, dst, progress=None) -> tuple[str, int]:
    """Copy file object `src` into `dst`, returning (sha256, size)."""
    digest, size = hashlib.sha256(), 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while n := src.readinto(buf):
        digest.update(view[:n])
        dst.write(view[:n])
        size += n
        if progress:
            progress(n)
    return digest.hexdigest(), size


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_copy(src: Path, dest: Path) -> tuple[str, int]:
    """Copy src to dest via a temp name + fsync + rename; returns (sha256, size)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
            sha, size = copy_hashing(fin, fout)
            fout.flush()
            os.fchmod(fout.fileno(), 0o644)  # mkstemp makes 0600; artifacts are meant to be read
            os.fsync(fout.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return sha, size


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
        blobs = self.root / "blobs"
        fd, tmp = tempfile.mkstemp(prefix=".incoming-", dir=blobs)
        try:
            with open(path, "rb") as fin, os.fdopen(fd, "wb") as fout:
                progress = None
                if self.progress:
                    total, done = os.fstat(fin.fileno()).st_size, 0

                    def progress(n: int) -> None:
                        nonlocal done
                        done += n
                        self.progress(name, done, total)
                sha, _ = copy_hashing(fin, fout, progress)
                fout.flush()
                os.fsync(fout.fileno())
            if sha256 and sha != sha256:
                raise StoreError(f"refusing to store {name}: its bytes do not match the expected sha256",
                                 hint="the source file changed or was corrupted while being published; rebuild it",
                                 expected=sha256, actual=sha)
            blob = blobs / sha
            os.replace(tmp, blob)  # same name = same bytes, so replacing is harmless
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        entry.parent.mkdir(parents=True, exist_ok=True)
        link_target = os.path.relpath(blob, entry.parent)
        if overwrite:
            tmp_link = entry.with_name(f".{entry.name}.{uuid.uuid4().hex}.link")  # unique per writer
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
        aside = entry.with_name(f".{entry.name}.{uuid.uuid4().hex}.stale")
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
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        try:
            with open(self._entry(name), "rb") as fin, os.fdopen(fd, "wb") as fout:
                actual, size = copy_hashing(fin, fout)
                fout.flush()
                os.fsync(fout.fileno())
            if actual == info.sha256 and (not sha256 or actual == sha256):
                os.replace(tmp, dest)  # verified: only now does dest appear
        except FileNotFoundError:
            raise KeyError(name) from None
        finally:
            Path(tmp).unlink(missing_ok=True)
        if actual != info.sha256 or (sha256 and actual != sha256):
            self.delete(name)
            (self.root / "blobs" / info.sha256).unlink(missing_ok=True)
            log.warning("store entry %s was corrupt (sha256 %s, recorded %s); removed it", name,
                        actual[:12], info.sha256[:12])
            raise CorruptEntry(f"store entry {name} is corrupt and has been removed",
                               hint="it will be rebuilt or re-published on the next run",
                               store=self.url, recorded=info.sha256, actual=actual)
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


def open_store(url: str, *, base_dir: Path | str = ".") -> Store:
    """Store for a URL: `file://path` (relative to `base_dir`) or `s3://bucket/prefix`."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        path = Path(parsed.netloc + parsed.path) if parsed.netloc else Path(parsed.path)
        return LocalStore(path if path.is_absolute() else Path(base_dir) / path)
    if parsed.scheme == "s3":
        from kiln.stores.s3 import S3Store  # boto3 is imported only when an S3 store is used
        return S3Store.from_url(url)
    raise StoreError(f"unsupported store url {url!r}",
                     hint="use file://<folder> or s3://<bucket>/<prefix> in [store] url")
