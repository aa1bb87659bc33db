"""`SSHTransport`: the Transport contract over one SSH connection per target (fabric/paramiko).

- The connection (and any ProxyJump hops) is built hardened and opened lazily on
  first use by kiln.transports.hostkeys: host keys verified against known_hosts,
  unknown and changed keys refused. It is reused by every call and every thread
  (paramiko multiplexes channels); `close()` closes it and its hops, the next call
  reconnects. `connections_opened` counts real connections (reconnects included).
- `run` quotes argv for the remote shell (env is exported inside that command line, so it is
  no place for secrets: `stdin` is sent in the channel's data stream), streams output lines live, kills the
  remote process group on timeout, and raises `CommandFailed` on non-zero exit.
- `put` uploads to `<dir>/.<name>.<random>.part`, hashes the bytes ON the
  target (sha256sum, else the device's python3), fsyncs, and renames into
  place; a mismatch deletes the temp file and raises. `get` downloads to a
  local temp file (kiln.files.atomic_file), compares the local digest with the
  digest computed on the target, and only then renames.

Secrets (passwords, passphrases, key material) are never logged nor put into
messages; only key *fingerprints* are.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import select
import shlex
import socket
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Sequence

from kiln.errors import TransportError, UnreachableError
from kiln.files import atomic_file
from kiln.progress import short_name, transfer
from kiln.transports.base import Result, Stream, Transport, quote_argv
from kiln.transports.hostkeys import (DEFAULT_CONNECT_TIMEOUT, Hop, build_chain, key_fingerprint,
                                      open_verified, paramiko as _paramiko)
from kiln.transports.lines import LineSink

log = logging.getLogger(__name__)

DEFAULT_KEEPALIVE = 15
#: concurrent channels per connection; OpenSSH's default MaxSessions is 10
DEFAULT_MAX_CHANNELS = 8
#: an SFTP transfer that moves no byte for this long fails (a dead network is otherwise silent)
TRANSFER_IDLE_TIMEOUT = 120.0
CHUNK = 1 << 20
_PID_MARK = "\x1ekiln-pid:"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
#: sh fragment printing the sha256 of file "$1" on the device (sha256sum, else python "$2")
_REMOTE_SHA256 = ('{ if command -v sha256sum >/dev/null 2>&1; then sha256sum < "$1"; else '
                  '"$2" -c \'import hashlib,sys\nh=hashlib.sha256()\nf=open(sys.argv[1],"rb")\n'
                  'for b in iter(lambda: f.read(1<<20), b""): h.update(b)\nprint(h.hexdigest())\' "$1"; fi; } '
                  '| cut -c1-64')


class SSHTransport(Transport):
    """A target reached over SSH (fabric). Constructing it does no I/O."""

    def __init__(self, target: str, host: str, *, user: str | None = None, port: int | None = None,
                 identity_file: str | os.PathLike | None = None,
                 ssh_config: str | os.PathLike | None = None,
                 known_hosts: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                 proxy_jump: str | None = None,
                 connect_timeout: float | None = None,
                 command_timeout: float | None = None,
                 keepalive: int = DEFAULT_KEEPALIVE,
                 python: str = "python3",
                 allow_agent: bool = True,
                 max_channels: int = DEFAULT_MAX_CHANNELS) -> None:
        if not host:
            raise TransportError("an SSH target needs a host", target=target,
                                 hint="set `host` for this target in the fleet file")
        self.target = target
        self.host = host
        self.user = user
        self.port = int(port) if port is not None else None
        self.identity_file = os.fspath(identity_file) if identity_file else None
        self.ssh_config = os.fspath(ssh_config) if ssh_config else None
        if known_hosts is None or isinstance(known_hosts, (str, os.PathLike)):
            self.known_hosts = [os.fspath(known_hosts)] if known_hosts else None
        else:
            self.known_hosts = [os.fspath(p) for p in known_hosts]
        self.proxy_jump = proxy_jump
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.keepalive = keepalive
        self.python = python
        self.allow_agent = allow_agent
        #: real SSH connections opened to the target (not counting ProxyJump hops)
        self.connections_opened = 0
        #: connections opened to ProxyJump hops
        self.hop_connections_opened = 0
        self._lock = threading.Lock()
        self._channels = threading.BoundedSemaphore(max_channels)
        self._hops: list[Hop] = []  # outermost bastion first, target last
        self._conn = None

    def __repr__(self) -> str:
        return f"SSHTransport(target={self.target!r}, host={self.host!r})"

    # -- connection -----------------------------------------------------------

    @property
    def address(self) -> str:
        """host:port as resolved after connecting (or as given before)."""
        if self._conn is not None:
            return f"{self._conn.host}:{self._conn.port}"
        return f"{self.host}:{self.port or 22}"

    def _connection(self):
        """The open fabric Connection, connecting (once, under a lock) if needed."""
        conn = self._conn
        if conn is not None and conn.is_connected:
            return conn
        with self._lock:
            conn = self._conn
            if conn is not None and conn.is_connected:
                return conn
            if conn is not None:
                log.info("connection to %s (%s) dropped; reconnecting", self.target, self.address)
                self._close_chain()
            conn, hops = build_chain(
                self.target, self.host, user=self.user, port=self.port, ssh_config=self.ssh_config,
                proxy_jump=self.proxy_jump, known_hosts=self.known_hosts,
                identity_file=self.identity_file, connect_timeout=self.connect_timeout,
                allow_agent=self.allow_agent)
            self._conn, self._hops = conn, hops
            try:
                for hop in hops:
                    self._open_hop(hop)
            except BaseException:
                self._close_chain()
                raise
            return conn

    def _open_hop(self, hop: Hop) -> None:
        conn = hop.conn
        if conn.is_connected:
            return
        t0 = time.monotonic()
        what = open_verified(hop, self.target)
        if self.keepalive:
            conn.transport.set_keepalive(int(self.keepalive))
        sock = conn.transport.sock
        if isinstance(sock, socket.socket):  # small request/response exchanges: no Nagle delays
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if hop.role == "target":
            self.connections_opened += 1
        else:
            self.hop_connections_opened += 1
        log.info("connected to %s (%s) in %.2fs", what, hop.where, time.monotonic() - t0)

    def _close_chain(self) -> None:
        for hop in reversed(self._hops):
            try:
                hop.conn.close()
                hop.conn.client.close()  # also when connect() failed half-way (fabric skips that)
            except Exception:  # closing must never mask the original error
                log.debug("error closing %s", hop.where, exc_info=True)
        self._hops = []
        self._conn = None

    def close(self) -> None:
        """Close the connection and its hops now (the next call reconnects)."""
        with self._lock:
            self._close_chain()

    @property
    def host_key_fingerprint(self) -> str | None:
        """SHA256 fingerprint of the (verified) host key of the connected target, else None."""
        conn = self._conn
        if conn is None or not conn.is_connected:
            return None
        return key_fingerprint(conn.transport.get_remote_server_key())

    @property
    def is_connected(self) -> bool:
        conn = self._conn
        return bool(conn is not None and conn.is_connected)

    # -- channels ---------------------------------------------------------------

    def _open_channel(self, kind: str):
        paramiko = _paramiko()
        conn = self._connection()
        try:
            return conn.transport.open_session(timeout=self.connect_timeout or DEFAULT_CONNECT_TIMEOUT)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            # the connection may have died between the check and the open: retry once on a fresh one
            if conn.is_connected:
                raise TransportError(f"target {self.target} refused to open a {kind} channel: {exc}",
                                     target=self.target, address=self.address,
                                     hint="the device's sshd may limit sessions (MaxSessions)") from exc
        conn = self._connection()
        try:
            return conn.transport.open_session(timeout=self.connect_timeout or DEFAULT_CONNECT_TIMEOUT)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise UnreachableError(f"lost the connection to target {self.target}: {exc}",
                                   target=self.target, address=self.address) from exc

    def _wire_command(self, argv: Sequence[str], env: dict[str, str] | None) -> str:
        """What the remote login shell runs: report our pid (for kill on timeout), set env, exec argv."""
        if not argv:
            raise TransportError("empty command", target=self.target)
        parts = [f"printf '{_PID_MARK}%s\\n' \"$$\" >&2"]
        for name, value in (env or {}).items():
            if not _ENV_NAME.match(name):
                raise TransportError(f"invalid environment variable name {name!r}", target=self.target)
            parts.append(f"export {name}={shlex.quote(str(value))}")
        parts.append("exec " + quote_argv(argv))
        return "; ".join(parts)

    def run(self, argv, *, timeout=None, check=True, stream=None, env=None, stdin=None) -> Result:
        command = quote_argv(argv)
        wire = self._wire_command(argv, env)
        timeout = timeout if timeout is not None else self.command_timeout
        with self._channels:
            chan = self._open_channel("command")
            try:
                code, out, err = self._exec(chan, wire, command, timeout, stream, stdin)
            finally:
                chan.close()
        result = Result(command, code, out, err)
        if check and code != 0:
            raise self._fail(result, f"command {PurePosixPath(str(argv[0])).name}")
        return result

    def _exec(self, chan, wire: str, command: str, timeout: float | None, stream: Stream | None,
              stdin: str | None = None):
        paramiko = _paramiko()
        out = LineSink(stream)
        err = LineSink(stream, pid_mark=_PID_MARK)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            chan.exec_command(wire)
            if stdin:  # inside the channel's data stream: in no command line, environment or log
                chan.sendall(stdin.encode())
            chan.shutdown_write()  # then end-of-file (without stdin: nothing, like LocalTransport's DEVNULL)
            fd = chan.fileno()
            while True:
                progressed = False
                while chan.recv_ready():
                    out.feed(chan.recv(CHUNK))
                    progressed = True
                while chan.recv_stderr_ready():
                    err.feed(chan.recv_stderr(CHUNK))
                    progressed = True
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready() \
                        and (chan.eof_received or chan.closed):
                    break
                # the deadline holds on every iteration: a command that exited while a background
                # child keeps its output open sends its exit status but never EOF
                if deadline is not None and time.monotonic() > deadline:
                    self._kill_remote(err.pid)
                    raise TransportError(f"command timed out after {timeout}s on target {self.target}",
                                         target=self.target, command=command,
                                         hint="raise the timeout for this target or check why it hangs"
                                              " (a background child holding the output open counts too)")
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    # exit status arrives before EOF; drain what is still in flight
                    if not progressed:
                        wait = 0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic()))
                        select.select([fd], [], [], wait)
                    continue
                if not progressed:
                    wait = 0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic()))
                    select.select([fd], [], [], wait)
                    if chan.closed and not chan.recv_ready() and not chan.recv_stderr_ready() \
                            and not chan.exit_status_ready():
                        raise UnreachableError(f"connection to target {self.target} closed during a command",
                                               target=self.target, command=command)
            code = chan.recv_exit_status()
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise UnreachableError(f"lost the connection to target {self.target} during a command: {exc}",
                                   target=self.target, command=command) from exc
        out.close()
        err.close()
        # -1: the process died of a signal (paramiko drops "exit-signal") or sshd sent no status
        return code, out.text, err.text

    def _kill_remote(self, pid: int | None) -> None:
        if not pid:
            log.warning("timed-out command on %s reported no pid; it may still run", self.target)
            return
        try:
            chan = self._open_channel("kill")
            try:
                # sshd runs each session under setsid(): the shell's pid is its process group
                chan.exec_command(f"kill -s KILL -- -{pid} 2>/dev/null || kill -s KILL {pid}")
                chan.recv_exit_status()
            finally:
                chan.close()
        except TransportError:
            log.warning("could not kill timed-out process group %s on %s", pid, self.target)

    # -- files ------------------------------------------------------------------

    def _sftp(self):
        paramiko = _paramiko()
        conn = self._connection()
        try:
            sftp = paramiko.SFTPClient.from_transport(conn.transport)
            sftp.get_channel().settimeout(max(TRANSFER_IDLE_TIMEOUT, self.command_timeout or 0))
            return sftp
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise TransportError(f"cannot open SFTP on target {self.target}: {exc}", target=self.target,
                                 address=self.address,
                                 hint="enable the sftp subsystem in the device's sshd_config") from exc

    def _remote_sha256(self, path: str) -> str:
        res = self.run(["sh", "-c", _REMOTE_SHA256, "sh", path, self.python], check=False)
        digest = res.stdout.strip()
        if res.exit_code != 0 or not _SHA.match(digest):
            raise self._fail(res, f"sha256 of {path}", hint="the device needs sha256sum or python3")
        return digest

    def put(self, local, remote, *, sha256=None) -> str:
        paramiko = _paramiko()
        local = Path(local)
        remote = str(remote)
        if not local.is_file():
            raise TransportError(f"cannot upload {local}: no such local file", target=self.target)
        rpath = PurePosixPath(remote)
        tmp = str(rpath.parent / f".{rpath.name}.{secrets.token_hex(6)}.part")
        self.run(["mkdir", "-p", "--", str(rpath.parent)])
        h = hashlib.sha256()
        with self._channels, transfer(self.display, f"upload {short_name(local.name)} to {self.target}",
                                      local.stat().st_size) as shown:
            sftp = self._sftp()
            try:
                with open(local, "rb") as fin, sftp.open(tmp, "wb") as fout:
                    fout.set_pipelined(True)
                    for block in iter(lambda: fin.read(CHUNK), b""):
                        h.update(block)
                        fout.write(block)
                        shown.advance(len(block))
                    mode = os.fstat(fin.fileno()).st_mode & 0o777
                sftp.chmod(tmp, mode)
            except FileNotFoundError as exc:
                raise TransportError(f"cannot write {tmp} on target {self.target}: {exc}",
                                     target=self.target) from exc
            except (paramiko.SSHException, EOFError, OSError) as exc:
                self._cleanup(tmp)
                raise TransportError(f"upload of {local.name} to {self.target}:{remote} failed: {exc}",
                                     target=self.target, address=self.address) from exc
            finally:
                sftp.close()
        sent = h.hexdigest()
        expected = sha256 or sent
        if sha256 and sent != sha256:
            self._cleanup(tmp)
            raise TransportError(f"local file {local} does not match its expected sha256; not uploaded",
                                 target=self.target, expected=sha256, actual=sent)
        # hash on the device, fsync, rename; or delete on mismatch (one round trip)
        script = ('act=$(' + _REMOTE_SHA256 + '); echo "$act"; '
                  'if [ "$act" = "$3" ]; then sync -- "$1" 2>/dev/null || sync; mv -f -- "$1" "$4"; '
                  'else rm -f -- "$1"; exit 3; fi')
        res = self.run(["sh", "-c", script, "sh", tmp, self.python, expected, remote], check=False)
        actual = res.stdout.strip().splitlines()[0] if res.stdout.strip() else ""
        if res.exit_code == 3:
            raise TransportError(f"upload of {local.name} to {self.target}:{remote} arrived corrupted "
                                 f"(removed; the previous file is untouched)",
                                 target=self.target, expected=expected, actual=actual or None,
                                 hint="retry; if it persists check the device's disk and memory")
        if res.exit_code != 0:
            self._cleanup(tmp)
            raise self._fail(res, f"verifying the upload of {local.name}")
        return actual

    def _cleanup(self, path: str) -> None:
        try:
            self.run(["rm", "-f", "--", path], check=False)
        except TransportError:
            log.warning("could not remove %s on %s", path, self.target)

    def get(self, remote, local) -> str:
        paramiko = _paramiko()
        remote = str(remote)
        h = hashlib.sha256()
        with atomic_file(local) as fout:
            with self._channels:
                sftp = self._sftp()
                try:
                    with sftp.open(remote, "rb") as fin:
                        size = fin.stat().st_size
                        fin.prefetch(size)
                        with transfer(self.display, f"download {short_name(PurePosixPath(remote).name)} from {self.target}",
                                      size) as shown:
                            for block in iter(lambda: fin.read(CHUNK), b""):
                                h.update(block)
                                fout.write(block)
                                shown.advance(len(block))
                except FileNotFoundError as exc:
                    raise TransportError(f"{remote} does not exist on target {self.target}",
                                         target=self.target) from exc
                except (paramiko.SSHException, EOFError, OSError) as exc:
                    raise TransportError(f"download of {self.target}:{remote} failed: {exc}",
                                         target=self.target, address=self.address) from exc
                finally:
                    sftp.close()
            got = h.hexdigest()
            there = self._remote_sha256(remote)
            if got != there:  # raised inside atomic_file: discarded, `local` untouched
                raise TransportError(f"download of {self.target}:{remote} arrived corrupted (discarded)",
                                     target=self.target, expected=there, actual=got,
                                     hint="retry; the file may be changing on the device while read")
        return got
