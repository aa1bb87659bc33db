"""A hardened, host-key-verified fabric Connection chain (the target and its ProxyJump hops).

Host keys are checked like OpenSSH with `StrictHostKeyChecking yes`: known hosts
are loaded (the given files, else the ssh_config's GlobalKnownHostsFile /
UserKnownHostsFile, else /etc/ssh/ssh_known_hosts and ~/.ssh/known_hosts), an
unknown key is refused (`HostKeyError`, with the offered SHA256 fingerprint and
the command that trusts it), a changed key is refused. Fabric hard-codes
AutoAddPolicy on every Connection it builds, including the gateway Connections
it builds for ProxyJump; `build_chain` hardens every hop before anything is
opened, and `open_verified` maps every way opening a hop fails to our errors.
`StrictHostKeyChecking no` in an ssh_config is deliberately ignored; known_hosts
files are never written.

Only key *fingerprints* appear in messages; secrets (passwords, passphrases, key
material) never do. paramiko and fabric are imported on first use.
"""
from __future__ import annotations

import base64
import hashlib
import os
import shlex
import socket
import time
from pathlib import Path

from kiln.errors import AuthenticationFailed, HostKeyError, TransportError, UnreachableError

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "~/.ssh/known_hosts")


def key_fingerprint(key) -> str:
    """OpenSSH-style `SHA256:...` fingerprint of a paramiko public key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_hosts_name(host: str, port: int) -> str:
    """How known_hosts names a host (`host`, or `[host]:port` off port 22)."""
    return host if int(port) == 22 else f"[{host}]:{port}"


def keyscan_hint(host: str, port: int) -> str:
    scan = f"ssh-keyscan -t ed25519 -p {port} {host}" if int(port) != 22 else f"ssh-keyscan -t ed25519 {host}"
    return (f"verify the fingerprint out of band (on the device: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub), "
            f"then: {scan} >> ~/.ssh/known_hosts (or the known_hosts file configured for this target)")


def paramiko():
    import paramiko  # local import: keeps `doit list` light
    return paramiko


class _UnknownHostKey(Exception):
    def __init__(self, name: str, key) -> None:
        self.name = name
        self.key = key
        super().__init__(f"unknown host key for {name}")


def reject_policy():
    """A paramiko policy that refuses unknown host keys (never adds, never saves)."""
    class RejectUnknown(paramiko().MissingHostKeyPolicy):
        def missing_host_key(self, client, hostname, key):
            raise _UnknownHostKey(hostname, key)

    return RejectUnknown()


class Hop:
    """One SSH connection of the chain (the target itself or a ProxyJump bastion)."""

    def __init__(self, conn, role: str, known_hosts: list[str]) -> None:
        self.conn = conn
        self.role = role
        self.known_hosts = known_hosts

    @property
    def where(self) -> str:
        return f"{self.conn.host}:{self.conn.port}"


def build_chain(target: str, host: str, *, user: str | None, port: int | None, ssh_config: str | None,
                proxy_jump: str | None, known_hosts: list[str] | None, identity_file: str | None,
                connect_timeout: float | None, allow_agent: bool):
    """Build (but do not open) the fabric Connection to `host` and its hops, every one hardened.
    Returns (connection, hops), hops ordered outermost bastion first, the target last.
    `proxy_jump`: None = the ssh_config's ProxyJump; "" = none; else "hop1,hop2"."""
    from fabric import Config, Connection

    if ssh_config and not Path(ssh_config).is_file():
        raise TransportError(f"ssh config file {ssh_config} does not exist", target=target,
                             hint="fix the ssh_config path of this target")
    # lazy=True: do not read fabric/invoke yaml files; the ssh configs fabric would load (this
    # target's own, else the user's and the system's), parsed once per process (kiln.transports.ssh_files)
    from kiln.transports.ssh_files import ssh_config as parsed_ssh_config
    files = [os.path.expanduser(ssh_config)] if ssh_config else [p for p in (os.path.expanduser("~/.ssh/config"), "/etc/ssh/ssh_config")
                                             if os.path.isfile(p)]
    config = Config(ssh_config=parsed_ssh_config(tuple(files)), lazy=True)
    if proxy_jump is not None:  # explicit, wins over the ssh_config's ProxyJump
        prev = None
        for name in reversed([h.strip() for h in proxy_jump.split(",") if h.strip()]):
            kwargs = {"config": config.clone()}
            if prev is not None:
                kwargs["gateway"] = prev
            prev = Connection(name, **kwargs)
        gateway = prev if prev is not None else False
    else:
        gateway = None  # fabric looks at the ssh_config's ProxyJump
    try:
        conn = Connection(host, user=user, port=port, config=config, gateway=gateway)
    except ValueError as exc:  # e.g. user/port given both in "user@host:port" and as arguments
        raise TransportError(f"bad SSH address for target {target}: {exc}", target=target,
                             hint="give the user and port either in host or as separate settings") from exc
    if isinstance(conn.gateway, str):
        raise TransportError(f"ProxyCommand is not supported for target {target}",
                             target=target, hint="use ProxyJump (or proxy_jump=) instead")
    chain = []
    node = conn
    while node:
        chain.append(node)
        node = node.gateway if not isinstance(node.gateway, str) else None
    hops = []
    for c in reversed(chain):
        files = _harden(c, target=target, known_hosts=known_hosts, identity_file=identity_file,
                        connect_timeout=connect_timeout, allow_agent=allow_agent, is_target=c is conn)
        hops.append(Hop(c, "target" if c is conn else "proxy jump host", files))
    return conn, hops


def _known_hosts_files(conn, known_hosts: list[str] | None) -> list[str]:
    if known_hosts is not None:
        return known_hosts
    files: list[str] = []
    for key in ("globalknownhostsfile", "userknownhostsfile"):
        val = conn.ssh_config.get(key)
        if val:
            files += shlex.split(val) if isinstance(val, str) else list(val)
    return [os.path.expanduser(f) for f in files or DEFAULT_KNOWN_HOSTS]


def _harden(conn, *, target: str, known_hosts: list[str] | None, identity_file: str | None,
            connect_timeout: float | None, allow_agent: bool, is_target: bool) -> list[str]:
    """Reject unknown host keys, load known_hosts, set timeouts and keys; returns the known_hosts files."""
    from kiln.transports.ssh_files import known_host_keys
    client = conn.client
    client.set_missing_host_key_policy(reject_policy())
    files = _known_hosts_files(conn, known_hosts)
    # What paramiko's load_system_host_keys(path) would give this host, from files parsed once
    # per process; the first key of each type wins, as in paramiko's lookup.
    name = known_hosts_name(conn.host, conn.port)
    trusted = client.get_host_keys()
    for path in files:
        if os.path.isfile(path):
            try:
                keys = known_host_keys(path, name)
            except (OSError, ValueError, paramiko().hostkeys.InvalidHostKey) as exc:
                raise HostKeyError(f"cannot read known_hosts file {path}: {exc}", target=target,
                                   hint="fix or remove the broken line in that file") from exc
            for key in keys:
                if key.get_name() not in (trusted.lookup(name) or {}):
                    trusted.add(name, key.get_name(), key)
    timeout = float(connect_timeout or conn.connect_timeout or DEFAULT_CONNECT_TIMEOUT)
    conn.connect_timeout = None  # fabric int()s it; we pass our own float below
    keys = list(conn.connect_kwargs.get("key_filename") or [])
    if identity_file and identity_file not in keys:
        # the target tries the explicit key first; hops fall back to it after their own
        if is_target:
            keys.insert(0, identity_file)
        else:
            keys.append(identity_file)
    kwargs = {k: v for k, v in conn.connect_kwargs.items() if k != "key_filename"}
    kwargs.update(timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                  channel_timeout=timeout, allow_agent=allow_agent)
    if keys:
        kwargs["key_filename"] = [os.path.expanduser(k) for k in keys]
        if conn.ssh_config.get("identitiesonly", "no").lower() == "yes":
            kwargs["look_for_keys"] = False
            kwargs["allow_agent"] = False
    conn.connect_kwargs = kwargs
    return files


def open_verified(hop: Hop, target: str) -> str:
    """Open one hop (its gateway must be open already), refusing unknown or changed host keys.
    Returns the description of the hop used in messages; raises HostKeyError,
    AuthenticationFailed or UnreachableError, each with the next step for the user."""
    pm = paramiko()
    conn = hop.conn
    what = f"target {target}" if hop.role == "target" else \
        f"{hop.role} {conn.original_host} ({hop.where}) of target {target}"
    where = hop.where
    t0 = time.monotonic()
    try:
        conn.open()
    except _UnknownHostKey as exc:
        fp = key_fingerprint(exc.key)
        raise HostKeyError(
            f"host key of {what} is not known: {exc.key.get_name()} {fp} "
            f"(not in {', '.join(hop.known_hosts)}); refusing to connect",
            target=target, address=where, fingerprint=fp,
            hint=keyscan_hint(conn.host, conn.port)) from None
    except pm.BadHostKeyException as exc:
        name = known_hosts_name(conn.host, conn.port)
        raise HostKeyError(
            f"HOST KEY CHANGED for {what}: it offered {exc.key.get_name()} {key_fingerprint(exc.key)}, "
            f"known_hosts has {exc.expected_key.get_name()} {key_fingerprint(exc.expected_key)}; "
            f"refusing to connect (possible man-in-the-middle, or the device was reinstalled)",
            target=target, address=where,
            hint=f"if the change is expected (reflash), verify the new fingerprint out of band, then "
                 f"ssh-keygen -R '{name}' and re-add it: {keyscan_hint(conn.host, conn.port)}") from None
    except pm.AuthenticationException as exc:
        raise AuthenticationFailed(
            f"authentication as {conn.user} failed on {what}", target=target, address=where,
            hint="check User/IdentityFile in the ssh config (or identity_file=) and the device's "
                 "authorized_keys") from exc
    except (socket.timeout, TimeoutError) as exc:
        raise UnreachableError(
            f"timed out after {time.monotonic() - t0:.1f}s connecting to {what}", target=target,
            address=where, hint="check that the device is powered and on the network, or raise connect_timeout"
        ) from exc
    except (OSError, EOFError) as exc:  # refused, no route, DNS, NoValidConnectionsError
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise UnreachableError(
            f"cannot connect to {what}: {reason}", target=target, address=where,
            hint="check host/port in the fleet file or ssh config, and that sshd runs on the device") from exc
    except pm.ChannelException as exc:
        raise UnreachableError(
            f"the proxy jump host cannot reach {what}: {exc}", target=target, address=where,
            hint="check the target's HostName/Port as seen from the bastion") from exc
    except pm.SSHException as exc:  # banner timeout, protocol errors, gateway refused
        raise UnreachableError(
            f"SSH handshake with {what} failed: {exc}", target=target, address=where,
            hint="check that the port is an SSH server and that it answers; raise connect_timeout if slow"
        ) from exc
    return what
