"""The ssh_config and known_hosts files SSH connections read, parsed once per process and looked
up by host name without walking the whole file.

A fleet of N SSH targets usually comes with an ssh_config of N `Host` stanzas and a known_hosts of
N lines. Through fabric, paramiko parsed both files again for every connection, walked every stanza
on each ssh_config lookup (asking the OS for the local user name at each) and re-checked every
known_hosts line against all earlier ones while loading: N connections cost O(N^2) controller CPU
(a no-op deploy: 24 ms per device at 50 devices, 59 ms at 200). Here a file is parsed once per
version (inode, size, mtime; an edited file is read again) and a lookup reads only what can apply
to the name. The answers are paramiko's own: the stanzas and lines that cannot match a name change
nothing in paramiko's lookup. Imported only where paramiko is needed.
"""
from __future__ import annotations

import hmac
import os
import threading
from pathlib import Path
from typing import Any, Callable

import paramiko

_lock = threading.Lock()
_parsed: dict[tuple, tuple[tuple, Any]] = {}  # (kind, paths) -> (file versions, parsed)


def _version(path: str) -> tuple:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _once_per_version(kind: str, paths: tuple[str, ...], parse: Callable[[], Any]) -> Any:
    """`parse()` the first time these files are asked for in this version; the same object after.
    Parsed under the lock: threads opening connections at once wait for one parse."""
    with _lock:
        versions = tuple(_version(p) for p in paths)
        known = _parsed.get((kind, paths))
        if known is None or known[0] != versions:
            known = _parsed[(kind, paths)] = (versions, parse())
        return known[1]


class IndexedSSHConfig(paramiko.SSHConfig):
    """`paramiko.SSHConfig` whose `lookup` runs on the stanzas that can apply to the name: the
    literal `Host` entries for it, every pattern and every `Match`. Falls back to paramiko's full
    walk if its internals differ, or for CanonicalizeHostname (the second pass looks up another
    name). Call `index()` after the last `parse()`; shared read-only between threads."""

    literal: dict[str, list[int]] | None = None
    always: list[int] = []

    def index(self) -> "IndexedSSHConfig":
        contexts = getattr(self, "_config", None)
        self.literal = None
        if isinstance(contexts, list) and hasattr(self, "_pattern_matches"):
            literal: dict[str, list[int]] = {}
            always: list[int] = []
            for i, c in enumerate(contexts):
                hosts = c.get("host", [])
                if not c.get("matches") and isinstance(hosts, list) and hosts \
                        and not any(set(h) & set("*?[!") for h in hosts):
                    for h in hosts:
                        literal.setdefault(h, []).append(i)
                else:
                    always.append(i)
            self.literal, self.always = literal, always
        return self

    def lookup(self, hostname):
        if self.literal is not None:
            small = paramiko.SSHConfig()
            small._config = [self._config[i] for i in sorted({*self.literal.get(hostname, ()), *self.always})]
            options = small.lookup(hostname)
            if options.get("canonicalizehostname") not in ("yes", "always"):
                return options
        return super().lookup(hostname)


def ssh_config(paths: tuple[str, ...]) -> IndexedSSHConfig:
    """The ssh_config files, parsed in order into one config, as fabric loads them."""
    def parse() -> IndexedSSHConfig:
        config = IndexedSSHConfig()
        for path in paths:
            with open(path) as fd:
                config.parse(fd)
        return config.index()
    return _once_per_version("ssh_config", tuple(paths), parse)


class _KnownHosts:
    """One known_hosts file's entries, plain host names indexed; hashed names (`|1|salt|hmac`)
    are checked one by one, as paramiko does."""

    def __init__(self, path: str) -> None:
        self.plain: dict[str, list[tuple[int, Any]]] = {}
        self.hashed: list[tuple[int, str, Any]] = []
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                try:  # as paramiko.HostKeys.load: lines it cannot use are skipped
                    entry = paramiko.hostkeys.HostKeyEntry.from_line(line, lineno)
                except paramiko.SSHException:
                    continue
                if entry is None:
                    continue
                for name in entry.hostnames:
                    if name.startswith("|1|"):
                        self.hashed.append((lineno, name, entry.key))
                    else:
                        self.plain.setdefault(name, []).append((lineno, entry.key))

    def keys(self, name: str) -> list:
        found = list(self.plain.get(name, ()))
        found += [(lineno, key) for lineno, hashed, key in self.hashed
                  if hmac.compare_digest(paramiko.HostKeys.hash_host(name, hashed), hashed)]
        return [key for _, key in sorted(found, key=lambda f: f[0])]


def known_host_keys(path: str, name: str) -> list:
    """The keys a known_hosts file gives `name` (`host`, or `[host]:port`), in file order.
    Raises OSError, ValueError or paramiko.hostkeys.InvalidHostKey for a file it cannot read."""
    return _once_per_version("known_hosts", (str(Path(path)),), lambda: _KnownHosts(path)).keys(name)
