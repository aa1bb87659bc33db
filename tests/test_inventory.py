"""`python -m kiln import-ansible`: Ansible inventories (the formats Ansible documents) become
targets of a fleet file; the built-in reader agrees with ansible-core's own parser; the result
deploys to real (simulated) SSH devices unchanged."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from kiln.ansible_import import import_inventory
from kiln.config import load_fleet
from kiln.errors import ConfigError
from kiln.inventory import InventoryError, load_inventory, plain
from kiln.toml_text import find_table, render_string, render_table, replace_table
from kiln_project import REPO, TINY, Project

SAMPLES = REPO / "tests" / "samples" / "ansible"
SAMPLE_FILES = ["docs.ini", "docs.yml", "fleet.ini", "with-vars/hosts.yml"]


def targets(path: Path) -> dict:
    return tomllib.loads(path.read_text())["targets"]


def imported(tmp_path, inventory: str | Path, parser: str = "builtin", **kwargs) -> dict:
    out = tmp_path / f"fleet-{parser}.toml"
    import_inventory(inventory, out, parser=parser, **kwargs)
    return targets(out)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


# -- reading inventories -----------------------------------------------------------------

def test_the_documented_ini_inventory_becomes_targets(tmp_path):
    t = imported(tmp_path, SAMPLES / "docs.ini")
    # ranges with a stride and alphabetic ranges are expanded; ungrouped hosts have no groups
    assert {"www01.example.com", "www03.example.com", "www05.example.com"} <= set(t)
    assert "www02.example.com" not in t
    assert {"db-a.example.com", "db-b.example.com", "db-c.example.com"} <= set(t)
    assert t["mail.example.com"]["groups"] == []
    # children: a host of atlanta is in southeast and usa too
    assert t["host1"]["groups"] == ["atlanta", "southeast", "usa"]
    assert t["host2"]["groups"] == ["atlanta", "raleigh", "southeast", "usa"]
    # `name:port`, inventory aliases, connection types
    assert (t["badwolf.example.com"]["host"], t["badwolf.example.com"]["port"]) == ("badwolf.example.com", 5309)
    assert (t["jumper"]["host"], t["jumper"]["port"]) == ("192.0.2.50", 5555)
    assert t["other1.example.com"]["user"] == "myuser" and t["other1.example.com"]["transport"] == "ssh"
    assert t["localhost"]["transport"] == "local" and "host" not in t["localhost"]
    for name, table in t.items():
        assert table["models"] == [] and table["install_dir"] == "/opt/kiln" and table["backend"] == "onnxruntime"


def test_the_yaml_form_of_the_same_inventory_gives_the_same_targets(tmp_path):
    assert imported(tmp_path / "ini", SAMPLES / "docs.ini") == imported(tmp_path / "yml", SAMPLES / "docs.yml")


def test_group_vars_are_inherited_through_children_and_host_vars_win(tmp_path):
    t = imported(tmp_path, SAMPLES / "fleet.ini", backend="tensorrt", install_dir="/srv/kiln", models=["det"])
    # [all:vars] < [jetsons:vars] (parent) < [orins:vars] (child) < the host line
    assert t["orin-05"]["user"] == "nvidia"                 # jetsons:vars over all:vars
    assert t["orin-05"]["host"] == "10.0.1.5" and t["orin-05"]["port"] == 2200   # orin-05:2200, ansible_ssh_host
    assert t["orin-01"]["user"] == "jetson"                 # the host line wins
    assert t["orin-04"]["user"] == "nvidia" and t["orin-04"]["port"] == 2222
    assert t["orin-01"]["port"] == 2201                     # line_1:vars
    # xaviers is deeper than line_1 (a child of jetsons): its port wins; jetsons and line_1 are at one
    # depth, where jetsons' ansible_group_priority=10 merges it last (else: by name, line_1 last)
    assert t["xavier-01"]["port"] == 2300 and t["xavier-01"]["user"] == "nvidia"
    assert t["xavier-01"]["python"] == "/usr/bin/python3.8" and "python" not in t["orin-01"]   # auto_silent: default
    assert t["orin-01"]["identity_file"] == "~/.ssh/fleet_ed25519"
    assert t["orin-01"]["proxy_jump"] == "bastion.example.com"
    assert t["orin-01"]["known_hosts"] == "~/.ssh/fleet_known_hosts"
    assert t["orin-01"]["groups"] == ["jetsons", "line_1", "orins"]
    assert t["localhost"] == {"transport": "local", "backend": "tensorrt", "python": "/usr/bin/python3",
                              "models": ["det"], "groups": ["controller"], "install_dir": "/srv/kiln"}


def test_group_vars_and_host_vars_folders_next_to_the_inventory(tmp_path):
    t = imported(tmp_path, SAMPLES / "with-vars" / "hosts.yml")
    # group_vars/orins/ (a folder: its files in order) over group_vars/all.yml over the inventory's groups
    assert t["orin-01"]["user"] == "from-group_vars-orins"
    assert t["orin-01"]["identity_file"] == "/etc/kiln/id_orins"
    assert t["orin-01"]["port"] == 2200
    # orin-02: the inventory's host var, then host_vars/orin-02.json; group_vars/lab (no extension) loses
    assert (t["orin-02"]["host"], t["orin-02"]["port"]) == ("10.9.9.2", 2202)
    assert t["orin-02"]["groups"] == ["lab", "orins"]


@pytest.mark.parametrize("sample", SAMPLE_FILES)
def test_the_built_in_reader_agrees_with_ansible_core(sample, tmp_path):
    pytest.importorskip("ansible.inventory.manager", reason="ansible-core is not installed (requirements-dev.txt)")
    theirs, ours = load_inventory(SAMPLES / sample, "ansible"), load_inventory(SAMPLES / sample, "builtin")
    assert theirs.parser.startswith("ansible-core ") and ours.parser == "builtin"
    assert [(h.name, h.groups, plain(h.vars)) for h in ours.hosts.values()] == \
        [(h.name, h.groups, plain(h.vars)) for h in theirs.hosts.values()]
    assert ours.groups == theirs.groups
    assert imported(tmp_path, SAMPLES / sample, "builtin") == imported(tmp_path, SAMPLES / sample, "ansible")


TRICKY = {
    "pending.ini": """\
        [parent:children]
        child            # declared below: Ansible resolves it at the end
        [child:vars]
        ansible_port='2222'
        [child]
        box-[8:10] x="a b" y="[1, 2]" z=None
        [parent:vars]
        ansible_user = spaced out
        """,
    "noext": """\
        all:
          children:
            a:
              hosts: lone          # a string where a mapping is expected: allowed for hosts
            b:
              vars: {ansible_group_priority: 5, ansible_user: from-b}
              hosts: {lone: {ansible_host: 192.0.2.9}}
            c:
              vars: {ansible_user: from-c}
              hosts: {lone: }
        """,
}


@pytest.mark.parametrize("name", sorted(TRICKY))
def test_both_readers_agree_on_less_common_forms(name, tmp_path):
    pytest.importorskip("ansible.inventory.manager", reason="ansible-core is not installed (requirements-dev.txt)")
    path = write(tmp_path / name, TRICKY[name])
    theirs, ours = load_inventory(path, "ansible"), load_inventory(path, "builtin")
    assert {n: (h.groups, plain(h.vars)) for n, h in ours.hosts.items()} == \
        {n: (h.groups, plain(h.vars)) for n, h in theirs.hosts.items()}
    assert ours.hosts  # something was read


def test_less_common_forms_read_as_ansible_documents(tmp_path):
    inv = load_inventory(write(tmp_path / "pending.ini", TRICKY["pending.ini"]), "builtin")
    assert list(inv.hosts) == ["box-8", "box-9", "box-10"]
    assert inv.hosts["box-9"].vars == {"ansible_port": "2222", "x": "a b", "y": [1, 2], "z": None,
                                       "ansible_user": "spaced out"}
    assert inv.hosts["box-9"].groups == ("child", "parent")
    lone = load_inventory(write(tmp_path / "noext", TRICKY["noext"]), "builtin").hosts["lone"]
    assert lone.vars["ansible_user"] == "from-b"  # b and c are at one depth: priority 5 beats the name order


# -- what cannot be imported -------------------------------------------------------------

@pytest.mark.parametrize("line, bad", [
    ("web:x", "web:x"),                                      # not host:port, so a name with a colon
    ("fe80::1", "fe80::1"),                                  # an IPv6 address as the inventory name
    ("a" * 65 + ".example.com", "a" * 65 + ".example.com"),  # longer than 64 characters
])
def test_a_host_name_that_cannot_name_a_target_is_a_clear_error(tmp_path, line, bad):
    inv = write(tmp_path / "hosts.ini", f"[edge]\nok-1\n{line}\n")
    with pytest.raises(InventoryError) as err:
        import_inventory(inv, tmp_path / "targets.toml", parser="builtin")
    assert str(inv) in str(err.value) and repr(bad) in str(err.value)
    assert "ansible_host=" in err.value.hint
    assert not (tmp_path / "targets.toml").exists()


def test_bad_group_names_and_groups_named_like_a_target_are_refused(tmp_path):
    inv = write(tmp_path / "hosts.ini", "[_private]\nbox-1\n")
    with pytest.raises(InventoryError, match=r"group name\(s\).*'_private'"):
        import_inventory(inv, tmp_path / "a.toml", parser="builtin")
    inv = write(tmp_path / "clash.ini", "[orin-01]\norin-02\n[lab]\norin-01\n")
    with pytest.raises(ConfigError) as err:
        import_inventory(inv, tmp_path / "b.toml", parser="builtin")
    assert "group 'orin-01'" in str(err.value) and "same name as a target" in str(err.value)
    assert "clash.ini" in err.value.hint
    # importing only the group without the clash works
    assert set(imported(tmp_path, inv, groups=["lab"])) == {"orin-01"}


def test_unsupported_connections_templates_and_vaulted_values_are_errors(tmp_path):
    cases = {
        "winrm.ini": ("win-1 ansible_connection=winrm\n", "ansible_connection=winrm is not supported"),
        "tmpl.ini": ("box-1 ansible_host='{{ inventory_hostname }}.lan'\n", "Jinja2 template"),
        "vault.yml": ("all:\n  hosts:\n    box-1:\n      ansible_user: !vault |\n        $ANSIBLE_VAULT;1.1;AES256\n"
                      "        6232\n", "vault-encrypted"),
    }
    for name, (text, problem) in cases.items():
        with pytest.raises(InventoryError, match=problem) as err:
            import_inventory(write(tmp_path / name, text), tmp_path / "t.toml", parser="builtin")
        assert name in str(err.value)
    with pytest.raises(InventoryError, match="is a folder") as err:
        load_inventory(SAMPLES, "builtin")
    assert "ansible-core" in err.value.hint


def test_unused_ansible_variables_and_ssh_options_are_reported(tmp_path):
    inv = write(tmp_path / "hosts.ini", """\
        [boxes]
        box-[1:3] ansible_become=yes
        [boxes:vars]
        ansible_password=secret
        ansible_ssh_extra_args='-o StrictHostKeyChecking=no -C'
        """)
    result = import_inventory(inv, tmp_path / "t.toml", parser="builtin", dry_run=True)
    text = "\n".join(result.warnings)
    assert "ansible_become (3 hosts), ansible_password (3 hosts)" in text
    assert "StrictHostKeyChecking is ignored" in text and "-C (hosts box-1, box-2, box-3)" in text
    assert not result.written and not (tmp_path / "t.toml").exists()


# -- the fleet file ----------------------------------------------------------------------

EXISTING = """\
# our fleet: models live here, targets come from Ansible
[store]
url = "file://shared/store"

[defaults.build]
precision = "fp16"

[models.tiny]
factory = "examples.tiny_detector:build_model"
checkpoint = "ckpt/tiny.pt"
inputs = { pixel_values = [1, 3, 32, 32] }
outputs = ["logits", "pred_boxes"]

[models.big]
factory = "examples.tiny_detector:build_model"
checkpoint = "ckpt/big.pt"
inputs = { pixel_values = [1, 3, 32, 32] }
outputs = ["logits", "pred_boxes"]

[targets.orin-01]   # the builder
transport = "ssh"
backend = "tensorrt"
host = "old-address"
user = "old-user"
models = ["big"]
install_dir = "/srv/kiln"
builder = true
health_check = \"\"\"
[ -e /srv/kiln/big/current ] && echo ok
\"\"\"

# a box the inventory does not know
[targets.bench]
models = ["tiny"]
install_dir = "deploy"
"""


def test_merge_adds_and_updates_targets_and_keeps_the_rest_of_the_file(tmp_path):
    out = write(tmp_path / "targets.toml", EXISTING)
    inv = write(tmp_path / "hosts.ini", """\
        [orins]
        orin-01 ansible_host=10.0.0.1
        orin-02 ansible_host=10.0.0.2
        [orins:vars]
        ansible_user=nvidia
        """)
    with pytest.raises(ConfigError, match="already exists") as err:
        import_inventory(inv, out, parser="builtin")
    assert "--merge" in err.value.hint and out.read_text() == textwrap.dedent(EXISTING)
    with pytest.raises(ConfigError, match=r"--model huge: no \[models.huge\]"):
        import_inventory(inv, out, parser="builtin", merge=True, models=["huge"])

    result = import_inventory(inv, out, parser="builtin", merge=True)
    assert (result.added, result.updated, result.written) == (["orin-02"], ["orin-01"], True)
    fleet = load_fleet(out, tmp_path / "artifacts")
    assert fleet.store_url == "file://shared/store" and set(fleet.models) == {"tiny", "big"}
    assert fleet.models["tiny"].build["precision"] == "fp16"
    one, two = fleet.targets["orin-01"], fleet.targets["orin-02"]
    # the inventory's connection settings; the target's own settings kept
    assert (one.host, one.user, one.groups, one.backend, one.models) == ("10.0.0.1", "nvidia", ("orins",),
                                                                        "tensorrt", ("big",))
    assert one.builder is True and "[ -e /srv/kiln/big/current ]" in one.health_check
    # a new target gets every model of the file, the default backend and install dir
    assert (two.host, two.models, two.backend, two.install_dir) == ("10.0.0.2", ("tiny", "big"), "onnxruntime",
                                                                    "/opt/kiln")
    text = out.read_text()
    assert text.startswith("# our fleet: models live here") and "# a box the inventory does not know" in text
    assert text.count("[targets.bench]") == 1 and fleet.targets["bench"].models == ("tiny",)
    assert "old-address" not in text

    # again: nothing changes, the file is not rewritten
    mtime = out.stat().st_mtime_ns
    again = import_inventory(inv, out, parser="builtin", merge=True)
    assert again.unchanged == ["orin-01", "orin-02"] and not again.written and out.stat().st_mtime_ns == mtime


def test_a_new_fleet_file_without_models_says_what_to_add(tmp_path):
    out = tmp_path / "new" / "targets.toml"
    result = import_inventory(SAMPLES / "fleet.ini", out, parser="builtin", models=["det"])
    assert result.written and "add [models.det]" in result.notes[0]
    doc = tomllib.loads(out.read_text())
    assert "models" not in doc and all(t["models"] == ["det"] for t in doc["targets"].values())
    with pytest.raises(ConfigError, match="no models defined"):
        load_fleet(out, tmp_path / "artifacts")
    # once the model is there, the file loads, and the next import merges into it
    out.write_text(out.read_text() + TINY.format(name="det", seed=1))
    assert len(load_fleet(out, tmp_path / "artifacts").targets) == 7
    assert import_inventory(SAMPLES / "fleet.ini", out, parser="builtin", merge=True).unchanged


def test_the_command_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "targets.toml"

    def kiln(*args):
        return subprocess.run([sys.executable, "-m", "kiln", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60)
    run = kiln("import-ansible", str(SAMPLES / "docs.ini"), "--out", str(out), "--group", "southeast",
               "--parser", "builtin", "--dry-run")
    assert run.returncode == 0, run.stderr
    assert set(tomllib.loads(run.stdout)["targets"]) == {"host1", "host2", "host3"} and not out.exists()
    assert "would import 3 hosts" in run.stderr
    run = kiln("import-ansible", str(SAMPLES / "docs.ini"), "--out", str(out), "--group", "nowhere")
    assert run.returncode == 1 and "no group 'nowhere'" in run.stderr and "fix: use one of:" in run.stderr
    assert kiln("import-ansible").returncode == 2
    assert kiln("import-ansible", str(SAMPLES / "docs.ini"), "--backend", "cuda").returncode == 2


def test_toml_text_writes_what_tomllib_reads_and_replaces_one_table():
    tricky = "quote \" back \\ tab \t nl \n nul \x00 del \x7f é"
    doc = {"name with.dot": tricky, "n": -3, "f": 0.5, "ok": True, "list": ["a", 1], "table": {"k v": [1]}}
    text = render_table(["targets", "10.0.0.5"], doc)
    assert text.startswith('[targets."10.0.0.5"]\n') and render_string("x") == '"x"'
    assert tomllib.loads(text) == {"targets": {"10.0.0.5": doc}}
    # a line starting with '[' inside a multi-line string is not a table header
    src = textwrap.dedent(EXISTING)
    first, end = find_table(src, ["targets", "orin-01"])
    assert src.splitlines()[first].startswith("[targets.orin-01]") and src.splitlines()[end:end + 2] == ["", "# a box the inventory does not know"]
    new = replace_table(src, ["targets", "orin-01"], render_table(["targets", "orin-01"], {"models": [],
                                                                                         "install_dir": "/x"}))
    assert tomllib.loads(new)["targets"]["orin-01"] == {"models": [], "install_dir": "/x"}
    assert tomllib.loads(new)["targets"]["bench"] == tomllib.loads(src)["targets"]["bench"]


# -- an imported inventory deploys --------------------------------------------------------

def test_an_imported_inventory_deploys_to_the_simulated_fleet_unchanged(tmp_path, new_fleet):
    sim = new_fleet()
    for name in ("cpu-a", "cpu-b"):
        sim.add_device(name, "cpu")
    sim.start()
    p = Project(tmp_path)
    p.fleet.write_text(p.fleet.read_text().split("[targets.local]")[0])   # models only: targets come from Ansible
    lines = "".join(f"{n} ansible_port={sim.port(n)}\n" for n in ("cpu-a", "cpu-b"))
    inventory = write(tmp_path / "inventory" / "hosts.ini", f"""\
        [edge]
        {lines}
        [edge:vars]
        ansible_host=127.0.0.1
        ansible_user=root
        ansible_ssh_private_key_file={sim.client_key}
        ansible_ssh_common_args='-o UserKnownHostsFile={sim.known_hosts_path}'
        ansible_python_interpreter={sys.executable}
        """)
    result = import_inventory(inventory, p.fleet, merge=True, backend="onnxruntime", install_dir="/srv/kiln")
    assert result.added == ["cpu-a", "cpu-b"]

    run = p.doit("-n", "2", "deploy:edge")
    assert {"deploy:cpu-a", "deploy:cpu-b"} <= run.ran(), run.out
    for name in ("cpu-a", "cpu-b"):
        current = sim.srv(name) / "kiln" / "tiny" / "current"
        assert current.is_symlink(), run.out
        manifest = json.loads((current / "manifest.json").read_text())
        assert manifest["target"] == name
        assert sim.logins(name) >= 1
    assert p.doit("deploy:edge").ran() == set()


def test_two_hosts_with_one_address_are_refused(tmp_path):
    inv = write(tmp_path / "hosts.ini", "[orins]\norin-[01:02] ansible_host=10.0.1.1[1:2]  # ranges are for names\n")
    with pytest.raises(ConfigError, match=r"targets 'orin-01' and 'orin-02' both reach 10\.0\.1\.1\[1:2\]") as err:
        import_inventory(inv, tmp_path / "t.toml", parser="builtin")
    assert "hosts.ini" in err.value.hint and not (tmp_path / "t.toml").exists()
