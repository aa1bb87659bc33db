"""SSH transport (fabric/paramiko) with verified host keys, and a per-target connection pool.

`SSHTransport` implements the `Transport` contract of kiln.transports.base over one
SSH connection per target:

- The connection is opened lazily on first use and reused by every call (and
  by every thread: paramiko multiplexes channels); `close()` closes it and any
  ProxyJump hops. `connections_opened` counts real connections (reconnects
  after a drop included).
- Host keys are checked like OpenSSH with `StrictHostKeyChecking yes`: known
  hosts are loaded (the given files, else the ssh_config's
  GlobalKnownHostsFile/UserKnownHostsFile, else /etc/ssh/ssh_known_hosts and
  ~/.ssh/known_hosts), an unknown key is refused (`HostKeyError`, with the
  offered SHA256 fingerprint and the command that trusts it), a changed key is
  refused. Fabric hard-codes AutoAddPolicy on every Connection it builds,
  including the gateway Connections it builds for ProxyJump; every hop is
  hardened here before anything is opened. `StrictHostKeyChecking no` in an
  ssh_config is deliberately ignored.
- `run` quotes argv for the remote shell, streams output lines live, kills the
  remote process group on timeout, and raises `CommandFailed` on non-zero exit.
- `put` uploads to `<dir>/.<name>.<random>.part`, hashes the bytes ON the
  target (sha256sum, else the device's python3), fsyncs, and renames into
  place; a mismatch deletes the temp file and raises. `get` downloads to a
  local temp file, compares the local digest with the digest computed on the
  target, fsyncs and renames.

Secrets (passwords, passphrases, key material) are never logged nor put into
messages; only key *fingerprints* are.
"""
from __future__ import annotations

import atexit
import base64
import codecs
import hashlib
import logging
import os
import re
import secrets
import select
import shlex
import socket
import tempfile
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Sequence

from kiln.errors import AuthenticationFailed, HostKeyError, TransportError, UnreachableError  # noqa: F401
from kiln.transports.base import Result, Stream, Transport, quote_argv

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_KEEPALIVE = 15
#: concurrent channels per connection; OpenSSH's default MaxSessions is 10
DEFAULT_MAX_CHANNELS = 8
#: an SFTP transfer that moves no byte for this long fails (a dead network is otherwise silent)
TRANSFER_IDLE_TIMEOUT = 120.0
CHUNK = 1 << 20
_PID_MARK = "\x1ekiln-pid:"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


def key_fingerprint(key) -> str:
    """OpenSSH-style `SHA256:...` fingerprint of a paramiko public key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _known_hosts_name(host: str, port: int) -> str:
    return host if int(port) == 22 else f"[{host}]:{port}"


def _keyscan_hint(host: str, port: int) -> str:
    scan = f"ssh-keyscan -t ed25519 -p {port} {host}" if int(port) != 22 else f"ssh-keyscan -t ed25519 {host}"
    return (f"verify the fingerprint out of band (on the device: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub), "
            f"then: {scan} >> ~/.ssh/known_hosts (or the known_hosts file configured for this target)")


def _paramiko():
    import paramiko  # local import: keeps `doit list` light
    return paramiko


class _UnknownHostKey(Exception):
    def __init__(self, name: str, key) -> None:
        self.name = name
        self.key = key
        super().__init__(f"unknown host key for {name}")


def _reject_policy():
    paramiko = _paramiko()

    class RejectUnknown(paramiko.MissingHostKeyPolicy):
        """Refuse unknown host keys (never add, never save)."""

        def missing_host_key(self, client, hostname, key):
            raise _UnknownHostKey(hostname, key)

    return RejectUnknown()


class _Hop:
    """One SSH connection of the chain (the target itself or a ProxyJump bastion)."""

    def __init__(self, conn, role: str) -> None:
        self.conn = conn
        self.role = role
        self.known_hosts: list[str] = []

    @property
    def where(self) -> str:
        return f"{self.conn.host}:{self.conn.port}"


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
        self.pooled = False
        self._lock = threading.Lock()
        self._channels = threading.BoundedSemaphore(max_channels)
        self._hops: list[_Hop] = []  # outermost bastion first, target last
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

    def _build(self):
        """Build (but do not open) the fabric Connection chain, hardened."""
        from fabric import Config, Connection

        if self.ssh_config and not Path(self.ssh_config).is_file():
            raise TransportError(f"ssh config file {self.ssh_config} does not exist", target=self.target,
                                 hint="fix the ssh_config path of this target")
        # lazy=True: do not read fabric/invoke yaml files; then load only ssh configs
        config = Config(runtime_ssh_path=self.ssh_config, lazy=True)
        config.load_ssh_config()
        if self.proxy_jump is not None:  # explicit ("" = none), wins over the ssh_config's ProxyJump
            prev = None
            for hop in reversed([h.strip() for h in self.proxy_jump.split(",") if h.strip()]):
                kwargs = {"config": config.clone()}
                if prev is not None:
                    kwargs["gateway"] = prev
                prev = Connection(hop, **kwargs)
            gateway = prev if prev is not None else False
        else:
            gateway = None  # fabric looks at the ssh_config's ProxyJump
        try:
            conn = Connection(self.host, user=self.user, port=self.port, config=config, gateway=gateway)
        except ValueError as exc:  # e.g. user/port given both in "user@host:port" and as arguments
            raise TransportError(f"bad SSH address for target {self.target}: {exc}", target=self.target,
                                 hint="give the user and port either in host or as separate settings") from exc
        if isinstance(conn.gateway, str):
            raise TransportError(f"ProxyCommand is not supported for target {self.target}",
                                 target=self.target, hint="use ProxyJump (or proxy_jump=) instead")
        chain = []
        node = conn
        while node:
            chain.append(node)
            node = node.gateway if not isinstance(node.gateway, str) else None
        hops = [_Hop(c, "proxy jump host" if c is not conn else "target") for c in reversed(chain)]
        for hop in hops:
            hop.known_hosts = self._harden(hop.conn, is_target=hop.conn is conn)
        return conn, hops

    def _known_hosts_files(self, conn) -> list[str]:
        if self.known_hosts is not None:
            return self.known_hosts
        files: list[str] = []
        for key in ("globalknownhostsfile", "userknownhostsfile"):
            val = conn.ssh_config.get(key)
            if val:
                files += shlex.split(val) if isinstance(val, str) else list(val)
        if not files:
            files = ["/etc/ssh/ssh_known_hosts", "~/.ssh/known_hosts"]
        return [os.path.expanduser(f) for f in files]

    def _harden(self, conn, *, is_target: bool) -> list[str]:
        """Reject unknown host keys, load known_hosts, set timeouts and keys; returns the known_hosts files."""
        client = conn.client
        client.set_missing_host_key_policy(_reject_policy())
        known_hosts = self._known_hosts_files(conn)
        for path in known_hosts:
            if os.path.isfile(path):
                try:
                    client.load_system_host_keys(path)
                except (OSError, ValueError) as exc:
                    raise HostKeyError(f"cannot read known_hosts file {path}: {exc}", target=self.target,
                                       hint="fix or remove the broken line in that file") from exc
        timeout = self.connect_timeout or conn.connect_timeout or DEFAULT_CONNECT_TIMEOUT
        conn.connect_timeout = None  # fabric int()s it; we pass our own float below
        keys = list(conn.connect_kwargs.get("key_filename") or [])
        if self.identity_file and self.identity_file not in keys:
            # the target tries the explicit key first; hops fall back to it after their own
            if is_target:
                keys.insert(0, self.identity_file)
            else:
                keys.append(self.identity_file)
        kwargs = {k: v for k, v in conn.connect_kwargs.items() if k != "key_filename"}
        kwargs.update(timeout=float(timeout), banner_timeout=float(timeout), auth_timeout=float(timeout),
                      channel_timeout=float(timeout), allow_agent=self.allow_agent)
        if keys:
            kwargs["key_filename"] = [os.path.expanduser(k) for k in keys]
            if conn.ssh_config.get("identitiesonly", "no").lower() == "yes":
                kwargs["look_for_keys"] = False
                kwargs["allow_agent"] = False
        conn.connect_kwargs = kwargs
        return known_hosts

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
            conn, hops = self._build()
            self._conn, self._hops = conn, hops
            try:
                for hop in hops:
                    self._open_hop(hop)
            except BaseException:
                self._close_chain()
                raise
            return conn

    def _open_hop(self, hop: _Hop) -> None:
        paramiko = _paramiko()
        conn = hop.conn
        if conn.is_connected:
            return
        what = f"target {self.target}" if hop.role == "target" else \
            f"{hop.role} {conn.original_host} ({hop.where}) of target {self.target}"
        where = hop.where
        t0 = time.monotonic()
        try:
            conn.open()
        except _UnknownHostKey as exc:
            fp = key_fingerprint(exc.key)
            raise HostKeyError(
                f"host key of {what} is not known: {exc.key.get_name()} {fp} "
                f"(not in {', '.join(hop.known_hosts)}); refusing to connect",
                target=self.target, address=where, fingerprint=fp,
                hint=_keyscan_hint(conn.host, conn.port)) from None
        except paramiko.BadHostKeyException as exc:
            name = _known_hosts_name(conn.host, conn.port)
            raise HostKeyError(
                f"HOST KEY CHANGED for {what}: it offered {exc.key.get_name()} {key_fingerprint(exc.key)}, "
                f"known_hosts has {exc.expected_key.get_name()} {key_fingerprint(exc.expected_key)}; "
                f"refusing to connect (possible man-in-the-middle, or the device was reinstalled)",
                target=self.target, address=where,
                hint=f"if the change is expected (reflash), verify the new fingerprint out of band, then "
                     f"ssh-keygen -R '{name}' and re-add it: {_keyscan_hint(conn.host, conn.port)}") from None
        except paramiko.AuthenticationException as exc:
            raise AuthenticationFailed(
                f"authentication as {conn.user} failed on {what}", target=self.target, address=where,
                hint="check User/IdentityFile in the ssh config (or identity_file=) and the device's "
                     "authorized_keys") from exc
        except (socket.timeout, TimeoutError) as exc:
            raise UnreachableError(
                f"timed out after {time.monotonic() - t0:.1f}s connecting to {what}", target=self.target,
                address=where, hint="check that the device is powered and on the network, or raise connect_timeout"
            ) from exc
        except (OSError, EOFError) as exc:  # refused, no route, DNS, NoValidConnectionsError
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise UnreachableError(
                f"cannot connect to {what}: {reason}", target=self.target, address=where,
                hint="check host/port in the fleet file or ssh config, and that sshd runs on the device") from exc
        except paramiko.ChannelException as exc:
            raise UnreachableError(
                f"the proxy jump host cannot reach {what}: {exc}", target=self.target, address=where,
                hint="check the target's HostName/Port as seen from the bastion") from exc
        except paramiko.SSHException as exc:  # banner timeout, protocol errors, gateway refused
            raise UnreachableError(
                f"SSH handshake with {what} failed: {exc}", target=self.target, address=where,
                hint="check that the port is an SSH server and that it answers; raise connect_timeout if slow"
            ) from exc
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
        log.info("connected to %s (%s) in %.2fs", what, where, time.monotonic() - t0)

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
        if self.pooled:
            log.debug("close() on pooled transport %s ignored; the pool closes it", self.target)
            return
        self.disconnect()

    def disconnect(self) -> None:
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

    def run(self, argv, *, timeout=None, check=True, stream=None, env=None) -> Result:
        command = quote_argv(argv)
        wire = self._wire_command(argv, env)
        timeout = timeout if timeout is not None else self.command_timeout
        with self._channels:
            chan = self._open_channel("command")
            try:
                code, out, err = self._exec(chan, wire, command, timeout, stream)
            finally:
                chan.close()
        result = Result(command, code, out, err)
        if check and code != 0:
            raise self._fail(result, f"command {PurePosixPath(str(argv[0])).name}")
        return result

    def _exec(self, chan, wire: str, command: str, timeout: float | None, stream: Stream | None):
        paramiko = _paramiko()
        out = _LineSink(stream)
        err = _LineSink(stream, pid_mark=_PID_MARK)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            chan.exec_command(wire)
            chan.shutdown_write()  # stdin: nothing (like LocalTransport's DEVNULL)
            fd = chan.fileno()
            while True:
                progressed = False
                while chan.recv_ready():
                    out.feed(chan.recv(CHUNK))
                    progressed = True
                while chan.recv_stderr_ready():
                    err.feed(chan.recv_stderr(CHUNK))
                    progressed = True
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    # exit status arrives before EOF; drain what is still in flight
                    if chan.eof_received or chan.closed:
                        break
                    if not progressed:
                        select.select([fd], [], [], 0.05)
                    continue
                if deadline is not None and time.monotonic() > deadline:
                    self._kill_remote(err.pid)
                    raise TransportError(f"command timed out after {timeout}s on target {self.target}",
                                         target=self.target, command=command,
                                         hint="raise the timeout for this target or check why it hangs")
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
        script = ('if command -v sha256sum >/dev/null 2>&1; then sha256sum < "$1"; else '
                  '"$2" -c \'import hashlib,sys\nh=hashlib.sha256()\nf=open(sys.argv[1],"rb")\n'
                  'for b in iter(lambda: f.read(1<<20), b""): h.update(b)\nprint(h.hexdigest())\' "$1"; fi')
        res = self.run(["sh", "-c", script, "sh", path, self.python], check=False)
        digest = res.stdout.split()[0] if res.stdout.split() else ""
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
        with self._channels:
            sftp = self._sftp()
            try:
                with open(local, "rb") as fin, sftp.open(tmp, "wb") as fout:
                    fout.set_pipelined(True)
                    for block in iter(lambda: fin.read(CHUNK), b""):
                        h.update(block)
                        fout.write(block)
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
        script = ('act=$( { if command -v sha256sum >/dev/null 2>&1; then sha256sum < "$1"; else '
                  '"$4" -c \'import hashlib,sys\nh=hashlib.sha256()\nf=open(sys.argv[1],"rb")\n'
                  'for b in iter(lambda: f.read(1<<20), b""): h.update(b)\nprint(h.hexdigest())\' "$1"; fi; } '
                  '| cut -c1-64); echo "$act"; '
                  'if [ "$act" = "$2" ]; then sync -- "$1" 2>/dev/null || sync; mv -f -- "$1" "$3"; '
                  'else rm -f -- "$1"; exit 3; fi')
        res = self.run(["sh", "-c", script, "sh", tmp, expected, remote, self.python], check=False)
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
        local = Path(local)
        remote = str(remote)
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", suffix=".part", dir=local.parent)
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as fout:
                with self._channels:
                    sftp = self._sftp()
                    try:
                        with sftp.open(remote, "rb") as fin:
                            fin.prefetch()
                            for block in iter(lambda: fin.read(CHUNK), b""):
                                h.update(block)
                                fout.write(block)
                    except FileNotFoundError as exc:
                        raise TransportError(f"{remote} does not exist on target {self.target}",
                                             target=self.target) from exc
                    except (paramiko.SSHException, EOFError, OSError) as exc:
                        raise TransportError(f"download of {self.target}:{remote} failed: {exc}",
                                             target=self.target, address=self.address) from exc
                    finally:
                        sftp.close()
                fout.flush()
                os.fsync(fout.fileno())
            got = h.hexdigest()
            there = self._remote_sha256(remote)
            if got != there:
                raise TransportError(f"download of {self.target}:{remote} arrived corrupted (discarded)",
                                     target=self.target, expected=there, actual=got,
                                     hint="retry; the file may be changing on the device while read")
            os.replace(tmp, local)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return got


class _LineSink:
    """Collects a byte stream as text and hands complete lines to `stream` as they arrive."""

    def __init__(self, stream: Stream | None, pid_mark: str | None = None) -> None:
        self.stream = stream
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.parts: list[str] = []
        self.partial = ""
        self.pid_mark = pid_mark
        self.pid: int | None = None

    def feed(self, data: bytes) -> None:
        self._text(self.decoder.decode(data))

    def _text(self, text: str) -> None:
        if not text:
            return
        self.partial += text
        if "\n" not in self.partial:
            return
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            self._line(line + "\n")

    def _line(self, line: str) -> None:
        if self.pid_mark and self.pid is None and line.startswith(self.pid_mark):
            try:
                self.pid = int(line[len(self.pid_mark):].strip())
            except ValueError:
                pass
            return
        self.parts.append(line)
        if self.stream:
            self.stream(line.rstrip("\n"))

    def close(self) -> None:
        self._text(self.decoder.decode(b"", final=True))
        if self.partial:
            line, self.partial = self.partial, ""
            self._line(line)

    @property
    def text(self) -> str:
        return "".join(self.parts)


class ConnectionPool:
    """One `SSHTransport` (hence one SSH connection) per target, shared by all threads of a run.

    `transport(target, host, **options)` returns the pooled transport for
    `target`, creating it on first request (no I/O until it is used). Pooled
    transports ignore `close()`; `pool.close()` closes them all.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._transports: dict[str, SSHTransport] = {}
        self._options: dict[str, tuple] = {}

    def transport(self, target: str, host: str, **options) -> SSHTransport:
        key = (host, tuple(sorted((k, repr(v)) for k, v in options.items())))
        with self._lock:
            existing = self._transports.get(target)
            if existing is not None:
                if self._options[target] != key:
                    raise TransportError(f"target {target} requested with different connection settings",
                                         target=target, hint="use one pool per fleet file")
                return existing
            t = SSHTransport(target, host, **options)
            t.pooled = True
            self._transports[target] = t
            self._options[target] = key
            return t

    def add(self, transport: SSHTransport) -> SSHTransport:
        """Adopt an already constructed transport (it becomes pooled)."""
        with self._lock:
            existing = self._transports.get(transport.target)
            if existing is not None and existing is not transport:
                raise TransportError(f"target {transport.target} is already pooled", target=transport.target)
            transport.pooled = True
            self._transports[transport.target] = transport
            self._options[transport.target] = ("<adopted>", id(transport))
            return transport

    def get(self, target: str) -> SSHTransport | None:
        with self._lock:
            return self._transports.get(target)

    def connections_opened(self) -> dict[str, int]:
        """Connections opened per target so far (ProxyJump hops not included)."""
        with self._lock:
            return {name: t.connections_opened for name, t in self._transports.items()}

    def close(self) -> None:
        with self._lock:
            transports = list(self._transports.values())
            self._transports.clear()
            self._options.clear()
        for t in transports:
            t.disconnect()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_shared_pool: ConnectionPool | None = None
_shared_lock = threading.Lock()


def shared_pool() -> ConnectionPool:
    """The process-wide pool (closed at interpreter exit): one connection per device per run."""
    global _shared_pool
    with _shared_lock:
        if _shared_pool is None:
            _shared_pool = ConnectionPool()
            atexit.register(_shared_pool.close)
        return _shared_pool
