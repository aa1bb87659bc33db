"""Config identity: names are whole-string matches, and one device is one target (SSH targets that
resolve to the same host:port, local targets sharing or nesting an install_dir, are refused)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from kiln.config import check_name, load_fleet, valid_name
from kiln.transports.addresses import check_ssh_addresses
from kiln.errors import ConfigError
from kiln_project import REPO

MODEL = """
[models.det]
factory = "examples.tiny_detector:build_model"
checkpoint = "ckpt/det.pt"
inputs = { pixel_values = [1, 3, 32, 32] }
outputs = ["logits", "pred_boxes"]
"""

RULE = "names are 1-64 characters of [A-Za-z0-9._-] starting with a letter or digit"


def write(tmp_path, text):
    path = tmp_path / "targets.toml"
    path.write_text(MODEL + textwrap.dedent(text))
    return path


def load(tmp_path, text):
    return load_path(write(tmp_path, text), tmp_path)


def load_path(path, tmp_path):
    """The fleet file, then the SSH address rule (which a run applies before its first connection)."""
    fleet = load_fleet(path, tmp_path / "artifacts")
    check_ssh_addresses(fleet)
    return fleet


def error(tmp_path, text) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return str(info.value)


def ssh(name, **fields) -> str:
    fields = {"transport": "ssh", "models": ["det"], "install_dir": "/opt/kiln", **fields}
    return f"\n[targets.{name}]\n" + "".join(
        f"{k} = {v}\n" if isinstance(v, int) else f"{k} = {v!r}\n".replace("'", '"') for k, v in fields.items())


def ssh_config(tmp_path, text, name="ssh_config"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


# -- names: the whole string, no trailing newline ------------------------------------

@pytest.mark.parametrize("name", ["orin-01\n", "orin-01\r\n", "\norin-01", "orin 01", "-orin", "a" * 65, ""])
def test_a_name_is_matched_as_a_whole(name):
    assert not valid_name(name)
    with pytest.raises(ConfigError, match="invalid target name"):
        check_name(name, "target")


def test_good_names_still_pass():
    for name in ("orin-01", "a", "A.b_c-9", "0" * 64):
        assert valid_name(name) and check_name(name, "target") == name


def test_a_target_key_with_an_escaped_newline_is_refused_at_its_line(tmp_path):
    text = """
    [targets."orin-01\\n"]
    models = ["det"]
    install_dir = "deploy"
    """
    path = write(tmp_path, text)
    assert "orin-01\n" in __import__("tomllib").loads(path.read_text())["targets"]  # TOML allows it
    with pytest.raises(ConfigError) as info:
        load_fleet(path, tmp_path / "artifacts")
    message = str(info.value)
    line = path.read_text().splitlines().index('[targets."orin-01\\n"]') + 1
    assert f"{path}:{line}: targets.\"orin-01\\n\": invalid target name 'orin-01\\n'" in message, message
    assert RULE in message and "no newlines" in message
    assert "\n" not in message.split("\n  fix:")[0]  # the newline is shown escaped, not printed


def test_a_model_key_with_a_trailing_newline_is_refused(tmp_path):
    message = error(tmp_path, """
    [models."det\\n"]
    factory = "examples.tiny_detector:build_model"
    checkpoint = "ckpt/det.pt"
    inputs = { pixel_values = [1, 3, 32, 32] }
    outputs = ["logits"]

    [targets.local]
    models = ["det"]
    install_dir = "deploy"
    """)
    assert "models.\"det\\n\": invalid model name 'det\\n'" in message and RULE in message, message


@pytest.mark.parametrize("key, what", [("groups", "group"), ("models", "model")])
def test_a_names_list_entry_with_a_trailing_newline_is_refused(tmp_path, key, what):
    lists = {"groups": 'groups = ["dev\\n"]\nmodels = ["det"]', "models": 'models = ["det\\n"]'}[key]
    path = write(tmp_path, f"""
[targets.local]
{lists}
install_dir = "deploy"
""")
    with pytest.raises(ConfigError) as info:
        load_fleet(path, tmp_path / "artifacts")
    message = str(info.value)
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if t.startswith(f"{key} ="))
    expected = f"{path}:{line}: targets.local.{key}: contains invalid {what} name(s) '{'dev' if what == 'group' else 'det'}\\n'"
    assert expected in message and RULE in message, message


def test_a_factory_with_a_trailing_newline_is_refused(tmp_path):
    message = error(tmp_path, MODEL.replace("[models.det]", "[models.other]").replace(
        '"examples.tiny_detector:build_model"', '"examples.tiny_detector:build_model\\n"') + """
    [targets.local]
    models = ["det"]
    install_dir = "deploy"
    """)
    assert "models.other.factory: must look like 'package.module:function'" in message, message


# -- SSH targets: one address, one target -------------------------------------------

def test_two_targets_on_one_host_and_default_port_are_refused(tmp_path):
    empty = ssh_config(tmp_path, "")
    path = write(tmp_path, ssh("orin-a", host="10.0.0.5", ssh_config=empty)
                 + ssh("orin-b", host="10.0.0.5", port=22, ssh_config=empty))
    with pytest.raises(ConfigError) as info:
        load_path(path, tmp_path)
    message = str(info.value)
    line = path.read_text().splitlines().index("[targets.orin-b]") + 1
    assert (f"{path}:{line}: targets.orin-b: targets orin-a and orin-b are one device: both reach 10.0.0.5:22"
            in message), message
    assert "fix: one device, one target" in message and "groups" in message


def test_hostnames_compare_case_insensitively(tmp_path):
    empty = ssh_config(tmp_path, "")
    message = error(tmp_path, ssh("orin-a", host="Orin.LAB", ssh_config=empty)
                    + ssh("orin-b", host="orin.lab", ssh_config=empty))
    assert "targets orin-a and orin-b are one device: both reach orin.lab:22" in message, message


def test_ssh_config_aliases_resolving_to_one_address_are_refused(tmp_path):
    cfg = ssh_config(tmp_path, """
        Host cam-left
          HostName 10.0.0.7
          Port 2222
        Host cam-right
          HostName 10.0.0.7
          Port 2222
        """)
    message = error(tmp_path, ssh("left", host="cam-left", ssh_config=cfg) + ssh("right", host="cam-right", ssh_config=cfg))
    assert "targets left and right are one device: both reach 10.0.0.7:2222" in message, message
    assert "host 'cam-left' via" in message and cfg in message


def test_the_target_name_is_the_default_host_and_is_looked_up_too(tmp_path):
    cfg = ssh_config(tmp_path, """
        Host orin-a
          HostName 10.0.0.7
          Port 2222
        """)
    message = error(tmp_path, ssh("orin-a", ssh_config=cfg)
                    + ssh("orin-b", host="root@10.0.0.7:2222", ssh_config=cfg))
    assert "targets orin-a and orin-b are one device: both reach 10.0.0.7:2222" in message, message


def test_an_explicit_port_wins_over_the_ssh_config_port(tmp_path):
    cfg = ssh_config(tmp_path, """
        Host cam
          HostName 10.0.0.7
          Port 2222
        """)
    message = error(tmp_path, ssh("a", host="cam", port=22, ssh_config=cfg) + ssh("b", host="10.0.0.7", ssh_config=cfg))
    assert "both reach 10.0.0.7:22 " in message, message


def test_aliases_on_one_host_with_different_ports_are_different_devices(tmp_path):
    cfg = ssh_config(tmp_path, """
        Host cam-left
          HostName 10.0.0.7
          Port 2222
        Host cam-right
          HostName 10.0.0.7
          Port 2223
        Host *
          User root
        """)
    fleet = load(tmp_path, ssh("left", host="cam-left", ssh_config=cfg) + ssh("right", host="cam-right", ssh_config=cfg)
                 + ssh("plain", host="10.0.0.7", ssh_config=cfg))
    assert set(fleet.targets) == {"left", "right", "plain"}


def test_the_same_address_behind_different_bastions_is_two_devices(tmp_path):
    cfg = ssh_config(tmp_path, """
        Host line-2-*
          ProxyJump bastion-2
        """)
    targets = (ssh("a", host="192.168.1.10", proxy_jump="bastion-1", ssh_config=cfg)
               + ssh("b", host="192.168.1.10", proxy_jump="bastion-2", ssh_config=cfg)
               + ssh("line-2-cam", host="line-2-cam", ssh_config=cfg))
    assert set(load(tmp_path, targets).targets) == {"a", "b", "line-2-cam"}
    # the ssh_config's ProxyJump counts like proxy_jump = ...
    cfg2 = ssh_config(tmp_path, """
        Host cam
          HostName 192.168.1.10
          ProxyJump bastion-2
        """, name="ssh_config2")
    message = error(tmp_path, targets + ssh("c", host="cam", ssh_config=cfg2))
    assert "targets b and c are one device: both reach 192.168.1.10:22 behind proxy jump bastion-2" in message, message


def test_the_default_ssh_config_is_the_users(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text("Host cam\n  HostName 10.9.9.9\n  Port 2200\n")
    monkeypatch.setenv("HOME", str(home))
    message = error(tmp_path, ssh("a", host="cam") + ssh("b", host="10.9.9.9", port=2200))
    assert "targets a and b are one device: both reach 10.9.9.9:2200" in message, message
    assert str(home / ".ssh" / "config") in message


def test_a_port_in_host_and_as_port_is_refused(tmp_path):
    message = error(tmp_path, ssh("a", host="10.0.0.5:2222", port=2222))
    assert "targets.a.host: gives a port ('10.0.0.5:2222') and port = 2222 too" in message, message


def test_a_missing_ssh_config_file_is_refused(tmp_path):
    message = error(tmp_path, ssh("a", host="10.0.0.5", ssh_config="nope/ssh_config"))
    assert f"targets.a.ssh_config: ssh config file {tmp_path / 'nope/ssh_config'} does not exist" in message, message


def test_loading_a_local_only_fleet_does_not_import_paramiko():
    code = ("import sys; from kiln.config import load_fleet; load_fleet('targets.toml'); "
            "print('paramiko' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False", proc.stdout + proc.stderr


# -- local targets: one install_dir each, none inside another ------------------------

def local(name, install_dir):
    return f'\n[targets.{name}]\nmodels = ["det"]\ninstall_dir = "{install_dir}"\n'


@pytest.mark.parametrize("first, second, how", [
    ("deploy", "./deploy", "is the install_dir of target"),
    ("deploy", "deploy/sub/../", "is the install_dir of target"),
    ("deploy", "deploy/inner", "is inside the install_dir of target"),
    ("deploy/inner", "deploy", "contains the install_dir of target"),
])
def test_local_targets_sharing_or_nesting_an_install_dir_are_refused(tmp_path, first, second, how):
    path = write(tmp_path, local("one", first) + local("two", second))
    with pytest.raises(ConfigError) as info:
        load_fleet(path, tmp_path / "artifacts")
    message = str(info.value)
    line = path.read_text().splitlines().index(f'install_dir = "{second}"') + 1
    mine, theirs = (tmp_path / second).resolve(), (tmp_path / first).resolve()
    assert f"{path}:{line}: targets.two.install_dir: {mine} {how} one ({theirs})" in message, message
    assert "own install_dir" in message


def test_local_targets_in_sibling_folders_load(tmp_path):
    fleet = load(tmp_path, local("a", "deploy") + local("b", "deploy-b") + local("c", "x/a") + local("d", "x/b"))
    assert len(fleet.targets) == 4


def test_the_fast_lookup_gives_what_paramiko_gives():
    """Big fleets look names up among the stanzas that can apply; the answers are paramiko's own."""
    import paramiko

    from kiln.transports.ssh_files import IndexedSSHConfig
    text = "".join(f"Host jetson-{i:03d} alias-{i:03d}\n  HostName 10.0.{i // 200}.{i % 200}\n  Port {2000 + i}\n"
                   for i in range(300))
    text += ("Host jetson-0* !jetson-007\n  ProxyJump bastion\n  Port 1\nMatch originalhost other\n  Port 5\n"
             "Host *\n  User root\n  HostName fallback.lab\n")
    config = paramiko.SSHConfig.from_text(text)
    fast = IndexedSSHConfig.from_text(text).index()
    assert fast.literal is not None  # the fast path is taken with this paramiko
    for host in ["jetson-001", "jetson-007", "alias-299", "jetson-299", "other", "nothing", "JETSON-001"]:
        assert dict(fast.lookup(host)) == dict(config.lookup(host)), host


def test_a_run_applies_the_address_rule_before_its_first_connection(tmp_path):
    """Loading stays light (no ssh_config parsing, no paramiko); the first SSH transport of a run
    refuses, before connecting, when two targets are one device."""
    from kiln.pipeline.context import Context
    empty = ssh_config(tmp_path, "")
    path = write(tmp_path, ssh("orin-a", host="10.0.0.5", ssh_config=empty)
                 + ssh("orin-b", host="10.0.0.5", ssh_config=empty))
    with Context.load(path, tmp_path / "artifacts") as ctx:
        with pytest.raises(ConfigError) as info:
            ctx.transport(ctx.fleet.targets["orin-a"])
    assert "targets orin-a and orin-b are one device: both reach 10.0.0.5:22" in str(info.value)
