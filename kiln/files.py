"""Files on the controller: the one file hash and the one atomic write.

Nothing half-written is ever visible: every write goes to a temp name next to
its destination, is fsynced, renamed over the destination, and the folder is
fsynced so the rename survives a crash. A failure (or an exception raised by the
caller inside `atomic_file`, e.g. a digest mismatch) removes the temp file and
leaves the destination untouched.

(kiln/device_side/ keeps its own copies on purpose: it runs on devices with the
Python 3.6 standard library only.)
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from kiln.errors import HashError

CHUNK = 1 << 20
#: mode of files written here (mkstemp makes 0600; artifacts are meant to be read)
FILE_MODE = 0o644


def sha256_file(path: Path | str) -> str:
    """Stream a file through sha256 (no cache: see kiln.keys.HashCache for that)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        raise HashError(f"cannot read {path} to hash it: {exc.strerror}", file=str(path)) from exc


def copy_hashing(src: BinaryIO, dst: BinaryIO,
                 progress: Callable[[int], None] | None = None) -> tuple[str, int]:
    """Copy file object `src` into `dst` in one pass, returning (sha256, size).
    `progress(n)` is called after each block of n bytes."""
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


def fsync_dir(path: Path | str) -> None:
    """Make renames and new names in folder `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path | str, *, mode: int = FILE_MODE) -> Iterator[BinaryIO]:
    """Yield a binary file open on a temp name next to `path`. When the block ends
    normally the file is fsynced and renamed to `path`; when it raises, the temp
    file is removed and `path` is untouched (raise inside the block to refuse bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    import tempfile  # here: it pulls in random and shutil, which a no-op run never needs
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def move_into_place(src: Path | str, dest: Path | str) -> None:
    """Publish a finished file written elsewhere on the same filesystem (e.g. by a tool into a
    temp folder): fsync it, rename it over `dest`, fsync the folder."""
    fd = os.open(src, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(src, dest)
    fsync_dir(Path(dest).parent)


def atomic_write(path: Path | str, data: bytes | str) -> None:
    """Write `data` (str is UTF-8 encoded) to `path` atomically."""
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def atomic_copy(src: Path | str, dest: Path | str) -> tuple[str, int]:
    """Copy `src` to `dest` atomically; returns (sha256, size) of the bytes copied."""
    with open(src, "rb") as fin, atomic_file(dest) as fout:
        return copy_hashing(fin, fout)
