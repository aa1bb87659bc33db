"""kiln.transports.ssh_files: ssh_config and known_hosts parsed once per process, answers as paramiko's."""
from __future__ import annotations

import paramiko
import pytest

from kiln.transports import ssh_files


def _key_line(names: str, key) -> str:
    return f"{names} {key.get_name()} {key.get_base64()}\n"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    import subprocess
    folder = tmp_path_factory.mktemp("keys")
    for i in range(3):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / f"k{i}")], check=True)
    return [paramiko.Ed25519Key.from_private_key_file(str(folder / f"k{i}")) for i in range(3)]


def test_known_host_keys_are_what_paramiko_loads(tmp_path, keys):
    rsa = paramiko.RSAKey.generate(1024)
    hashed = paramiko.HostKeys.hash_host("[10.0.0.9]:2209")
    text = ("# comment\n\n"
            + _key_line("orin-01,10.0.0.1", keys[0])
            + _key_line("[10.0.0.2]:2202", keys[1])
            + _key_line("[10.0.0.2]:2202", keys[2])      # a second key of the same type: the first wins
            + _key_line("[10.0.0.2]:2202", rsa)          # another type: both offered
            + _key_line(hashed, keys[2])
            + "broken line\n"
            + _key_line("*.lab", keys[1]))               # paramiko knows no wildcards
    path = tmp_path / "known_hosts"
    path.write_text(text)
    reference = paramiko.HostKeys(str(path))
    for name in ["orin-01", "10.0.0.1", "[10.0.0.2]:2202", "[10.0.0.9]:2209", "10.0.0.9", "x.lab", "nobody"]:
        ours = paramiko.HostKeys()
        for key in ssh_files.known_host_keys(str(path), name):
            if key.get_name() not in (ours.lookup(name) or {}):
                ours.add(name, key.get_name(), key)
        theirs = reference.lookup(name)
        assert ({k: v.asbytes() for k, v in (ours.lookup(name) or {}).items()}
                == {k: v.asbytes() for k, v in (theirs or {}).items()}), name


def test_files_are_parsed_once_per_version(tmp_path, keys, monkeypatch):
    path = tmp_path / "known_hosts"
    path.write_text(_key_line("orin-01", keys[0]))
    parsed = []
    real = ssh_files._KnownHosts
    monkeypatch.setattr(ssh_files, "_KnownHosts", lambda p: parsed.append(p) or real(p))
    for _ in range(5):
        assert [k.asbytes() for k in ssh_files.known_host_keys(str(path), "orin-01")] == [keys[0].asbytes()]
    assert len(parsed) == 1
    path.write_text(_key_line("orin-01", keys[1]))  # an edited file is read again
    assert [k.asbytes() for k in ssh_files.known_host_keys(str(path), "orin-01")] == [keys[1].asbytes()]
    assert len(parsed) == 2

    config = tmp_path / "ssh_config"
    config.write_text("Host orin-01\n  HostName 10.0.0.1\n  Port 2201\n")
    first = ssh_files.ssh_config((str(config),))
    assert first is ssh_files.ssh_config((str(config),))
    assert first.lookup("orin-01")["port"] == "2201"
    config.write_text("Host orin-01\n  HostName 10.0.0.1\n  Port 2202\n")
    assert ssh_files.ssh_config((str(config),)).lookup("orin-01")["port"] == "2202"


def test_a_broken_known_hosts_line_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "known_hosts"
    path.write_text("orin-01 ssh-ed25519 !!!not-base64!!!\n")
    with pytest.raises(paramiko.hostkeys.InvalidHostKey):
        ssh_files.known_host_keys(str(path), "orin-01")
