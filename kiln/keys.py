"""Hashing and key derivation.

Keys are digests of canonical JSON (sorted keys, no whitespace), never of paths,
mtimes or dict order. File hashes are streamed and cached by (size, mtime_ns,
inode, ctime_ns), so a no-op run reads zero bytes: the cheap check before the
expensive one.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from kiln.errors import HashError

#: bytes actually read for hashing in this process (the benchmark reports it)
bytes_hashed = 0
_counter_lock = threading.Lock()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(value: Any) -> str:
    """sha256 of a JSON-able value in canonical form."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def sha256_file(path: Path | str) -> str:
    """Stream a file through sha256 (no stat cache)."""
    global bytes_hashed
    try:
        with open(path, "rb") as f:
            h = hashlib.file_digest(f, "sha256")
            size = f.tell()
    except OSError as exc:
        raise HashError(f"cannot read {path} to hash it: {exc.strerror}", file=str(path)) from exc
    with _counter_lock:
        bytes_hashed += size
    return h.hexdigest()


class HashCache:
    """sha256 of files, remembered by stat signature in a small JSON file.

    Touching a file changes its mtime, so it is re-read once; the digest comes out
    the same and nothing downstream changes.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._entries: dict[str, list] | None = None
        self._lock = threading.Lock()

    def _load(self) -> dict[str, list]:
        if self._entries is None:
            try:
                self._entries = json.loads(self.path.read_text())
            except (FileNotFoundError, ValueError):
                self._entries = {}
        return self._entries

    def sha256(self, file: Path | str) -> str:
        file = Path(file).resolve()
        try:
            st = file.stat()
        except OSError as exc:
            raise HashError(f"cannot read {file}: {exc.strerror}", file=str(file)) from exc
        signature = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
        with self._lock:
            entry = self._load().get(str(file))
        if entry and entry[:4] == signature:
            return entry[4]
        sha = sha256_file(file)
        with self._lock:
            self._load()[str(file)] = signature + [sha]
            write_if_changed(self.path, canonical_json(self._entries) + "\n")
        return sha


def write_if_changed(path: Path | str, text: str) -> bool:
    """Atomically write `text` unless the file already holds exactly it. Returns True if written."""
    path = Path(path)
    try:
        if path.read_text() == text:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return True


def write_json_if_changed(path: Path | str, value: Any) -> bool:
    return write_if_changed(path, json.dumps(value, sort_keys=True, indent=2) + "\n")


def read_json(path: Path | str, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default
