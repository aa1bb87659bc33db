"""Hashing and key derivation.

Keys are digests of canonical JSON (sorted keys, no whitespace), never of paths,
mtimes or dict order. File hashes are streamed and cached by (size, mtime_ns,
inode, ctime_ns), so a no-op run reads zero bytes: the cheap check before the
expensive one. The file hash and the atomic write themselves live in kiln.files.
"""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from kiln.errors import HashError
from kiln.files import atomic_write, sha256_file

__all__ = ["canonical_json", "digest", "sha256_file", "HashCache", "write_if_changed",
           "write_json_if_changed", "read_json"]


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(value: Any) -> str:
    """sha256 of a JSON-able value in canonical form."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


class HashCache:
    """sha256 of files, remembered by stat signature in a small JSON file.

    Touching a file changes its mtime, so it is re-read once; the digest comes out
    the same and nothing downstream changes. `bytes_read` counts the bytes this
    cache actually read to hash (0 for a no-op run; the benchmark reports it).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.bytes_read = 0
        self._entries: dict[str, list] | None = None
        self._lock = threading.Lock()

    def _load(self) -> dict[str, list]:
        if self._entries is None:
            try:
                self._entries = json.loads(self.path.read_text())
            except (FileNotFoundError, ValueError):
                self._entries = {}
        return self._entries

    def reload(self) -> None:
        """Read the file again at the next use: another process (an export's child) wrote to it."""
        with self._lock:
            self._entries = None

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
            self.bytes_read += st.st_size
            self._load()[str(file)] = signature + [sha]
            write_if_changed(self.path, canonical_json(self._entries) + "\n")
        return sha


def write_if_changed(path: Path | str, text: str) -> bool:
    """Atomically write `text` unless the file already holds exactly it. Returns True if written."""
    path = Path(path)
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    atomic_write(path, text)
    return True


def write_json_if_changed(path: Path | str, value: Any) -> bool:
    return write_if_changed(path, json.dumps(value, sort_keys=True, indent=2) + "\n")


def read_json(path: Path | str, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default
