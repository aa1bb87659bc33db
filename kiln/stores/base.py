"""Content-addressed artifact store: the contract and the layout.

Every entry is recorded with the sha256 of its bytes when it is written, and
every read verifies the bytes against that record before they are used; a
mismatch is a *miss*: the entry is removed, a warning is logged and
`CorruptEntry` is raised so the caller rebuilds or re-downloads.

Writes never overwrite an existing entry unless asked to (`overwrite=True`,
used only for mutable entries: recorded fingerprints, timing caches, pointers).
A write that loses a race returns False and the caller uses the winner's entry.

`LocalStore` (kiln.stores.local) and `S3Store` (kiln.stores.s3) implement the
contract; `kiln.stores.open_store(url)` picks one.
"""
from __future__ import annotations

import abc
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import CorruptEntry, StoreError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@=+-]*(/[A-Za-z0-9][A-Za-z0-9._@=+-]*)*$")


# -- layout: the one place that says where things live in a store -------------

def _by_digest(folder: str, leaf: str):
    """Entry names for things named by a digest, sharded by its first two characters."""
    return lambda digest: f"{folder}/{digest[:2]}/{digest}{leaf}"


onnx_entry = _by_digest("onnx", ".onnx")
#: fixed inputs and PyTorch outputs that every engine of this ONNX is checked against
reference_entry = _by_digest("onnx", ".reference.npz")
engine_entry = _by_digest("engines", "/engine")
engine_manifest_entry = _by_digest("engines", "/manifest.json")
timing_cache_entry = _by_digest("timing-caches", ".cache")  # by class digest


def onnx_record_entry(model: str) -> str:
    """Pointer to the model's current ONNX (its export record), for CI workers."""
    return f"models/{model}/onnx.json"


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
        the verified bytes as `final_name` (never overwriting); the staging entry is removed
        either way. Returns True if written, False if `final_name` already existed.
        Raises KeyError if nothing is staged, CorruptEntry if the staged bytes do not match."""
        import tempfile
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
