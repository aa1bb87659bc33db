"""Where an SSH target's connection goes (host, port, proxy jump after the ssh_config), and the
rule that follows: two targets that reach one address are one device, a ConfigError naming both.

It reads the ssh_config files the connection will read, with the parser the connection uses
(paramiko's), so it runs when a run first needs an SSH connection (`Context.transport`), not when
the fleet file is loaded: `doit list` should not import paramiko.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.config import ONE_DEVICE_ONE_TARGET, Fleet, Target

__all__ = ["check_ssh_addresses"]


def _split_host(host: str) -> tuple[str | None, str, int | None]:
    """user, host, port of "[user@]host[:port]", parsed as fabric's Connection does (an IPv6
    address, with more than one ':', is all host); a port that is not a number is -1."""
    user, _, hostport = host.rpartition("@")
    if hostport.count(":") > 1:
        return user or None, hostport, None
    name, _, port = hostport.partition(":") if ":" in hostport else (hostport, "", "")
    return user or None, name, (int(port) if port.isdigit() else -1) if port else None


def _ssh_config_files(fleet_dir: Path, value: str | None) -> tuple[Path, ...]:
    """The ssh_config files the connection reads: the target's own (relative to the fleet file,
    ~ expanded), else the user's and the system's, where they exist (as fabric loads them)."""
    if value:
        return (fleet_dir / Path(value).expanduser(),)
    return tuple(p for p in (Path("~/.ssh/config").expanduser(), Path("/etc/ssh/ssh_config")) if p.is_file())


def _has_directives(path: Path) -> bool:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return True  # let the parser say what is wrong
    return any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines())


def check_ssh_addresses(fleet: Fleet) -> None:
    """Two SSH targets that reach the same host:port (after the ssh_config's HostName/Port, behind
    the same proxy jump) are one device: a ConfigError naming both and the address."""
    ssh = [t for t in fleet.targets.values() if t.transport == "ssh"]
    if not ssh:
        return
    fleet_dir = fleet.base_dir
    configs: dict[tuple[Path, ...], Any] = {}  # parsed once per set of files (paramiko.SSHConfig or None)

    def ssh_config(t: Target, files: tuple[Path, ...]):
        if files not in configs:
            for f in files:
                if t.ssh_config and not f.is_file():
                    raise fleet.error_at(["targets", t.name, "ssh_config"], f"ssh config file {f} does not exist",
                                    "fix the path (relative to the fleet file), or remove ssh_config to use "
                                    "~/.ssh/config")
            parsed = None
            if any(_has_directives(f) for f in files):
                import paramiko  # only for fleets with ssh targets and an ssh_config to read

                from kiln.transports.ssh_files import IndexedSSHConfig
                parsed = IndexedSSHConfig()
                for f in files:
                    try:
                        with open(f) as fd:
                            parsed.parse(fd)
                    except (OSError, UnicodeDecodeError, paramiko.SSHException) as exc:
                        keys = ["targets", t.name] + (["ssh_config"] if t.ssh_config else [])
                        raise fleet.error_at(keys, f"cannot read ssh config file {f}: {exc}",
                                        "fix that file (it is what the SSH connection reads)") from exc
            configs[files] = parsed.index() if parsed is not None else None
        return configs[files]

    seen: dict[tuple[str, int, str], tuple[str, str]] = {}
    for t in ssh:
        user, alias, port = _split_host(t.host)
        key = ["targets", t.name, "host"]
        if port == -1:
            raise fleet.error_at(key, f"{t.host!r}: the port after ':' is not a number",
                            "write host as \"[user@]host[:port]\" or set port = ...")
        if port is not None and t.port is not None:
            raise fleet.error_at(key, f"gives a port ({t.host!r}) and port = {t.port} too",
                            "give the port either in host (\"host:port\") or as port = ..., not both")
        if user is not None and t.user is not None:
            raise fleet.error_at(key, f"gives a user ({t.host!r}) and user = {t.user!r} too",
                            "give the user either in host (\"user@host\") or as user = ..., not both")
        files = _ssh_config_files(fleet_dir, t.ssh_config)
        options = {}
        cfg = ssh_config(t, files)
        if cfg is not None:
            try:
                options = cfg.lookup(alias)
            except Exception as exc:  # noqa: BLE001 - e.g. a Match exec that fails: paramiko's own errors
                raise fleet.error_at(key, f"cannot resolve {alias!r} with {', '.join(map(str, files))}: {exc}",
                                "fix the ssh config file (it is what the SSH connection reads)") from exc
        hostname = (options.get("hostname") or alias).lower()
        try:
            port = port or t.port or int(options.get("port", 22))
        except ValueError:
            raise fleet.error_at(key, f"the ssh config gives {alias!r} a port that is not a number: "
                            f"{options.get('port')!r}", "fix Port in the ssh config file") from None
        jump = t.proxy_jump if t.proxy_jump is not None else options.get("proxyjump", "")
        jump = ",".join(h.strip().lower() for h in (jump or "").split(",") if h.strip() and h.strip() != "none")
        address = f"{hostname}:{port}"
        how = f"host {t.host!r}" + (f" via {', '.join(map(str, files))}" if cfg is not None else "")
        if (hostname, port, jump) in seen:
            other, other_how = seen[(hostname, port, jump)]
            behind = f" behind proxy jump {jump}" if jump else ""
            raise fleet.error_at(["targets", t.name], f"targets {other} and {t.name} are one device: both reach {address}{behind} "
                            f"({other}: {other_how}; {t.name}: {how})", ONE_DEVICE_ONE_TARGET)
        seen[(hostname, port, jump)] = (t.name, how)
