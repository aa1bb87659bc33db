"""`python -m kiln import-ansible`: an Ansible inventory becomes `[targets.*]` in a fleet file.

Each inventory host becomes one target named like the host, reached the way Ansible reaches it:

    ansible_host / ansible_ssh_host                      -> host   (default: the inventory name)
    ansible_port / ansible_ssh_port, `name:port`         -> port
    ansible_user / ansible_ssh_user                      -> user
    ansible_ssh_private_key_file / ansible_private_key_file -> identity_file
    ansible_python_interpreter                           -> python (not "auto...")
    ansible_connection  local | ssh, smart, paramiko     -> transport local | ssh
    ansible_ssh_common_args / ansible_ssh_extra_args     -> proxy_jump (-J, -o ProxyJump=),
                                                            known_hosts (-o UserKnownHostsFile=)

(where two names mean the same, the second wins, as in Ansible's ssh connection plugin), and
the host's groups, parents included (less `all` and `ungrouped`), become its `groups`. Every
other `ansible_*` variable is reported, once, as not carried over.

The fleet file is written atomically and only after the whole result has been loaded with
`kiln.config.load_fleet`. An existing file is never replaced: with `merge` the inventory's hosts
are added to it, and targets it already has get their connection keys (the keys above, and
`groups`) from the inventory while keeping everything else; the rest of the file, comments
included, is left as it was.
"""
from __future__ import annotations

import os
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.config import NAME_RULE, load_fleet, valid_name
from kiln.errors import ConfigError
from kiln.inventory import Inventory, InventoryError, InventoryHost, Vaulted, load_inventory, plain
from kiln.toml_text import render_string, render_table, render_value, replace_tables

DEFAULT_INSTALL_DIR = "/opt/kiln"
DEFAULT_BACKEND = "onnxruntime"
#: the target keys an import sets from the inventory, in the order they are written
CONNECTION_KEYS = ("transport", "host", "port", "user", "identity_file", "proxy_jump", "known_hosts", "python")
#: Ansible's names for them; when two are set, the later one in each tuple wins (ssh plugin options)
HOST_VARS = ("ansible_host", "ansible_ssh_host")
PORT_VARS = ("ansible_port", "ansible_ssh_port")
USER_VARS = ("ansible_user", "ansible_ssh_user")
KEY_VARS = ("ansible_private_key_file", "ansible_ssh_private_key_file")
SSH_ARGS_VARS = ("ansible_ssh_common_args", "ansible_ssh_extra_args")
USED_VARS = frozenset(HOST_VARS + PORT_VARS + USER_VARS + KEY_VARS + SSH_ARGS_VARS
                      + ("ansible_python_interpreter", "ansible_connection"))
SSH_CONNECTIONS = ("ssh", "smart", "paramiko", "paramiko_ssh", "ansible.builtin.ssh", "ansible.builtin.paramiko_ssh",
                   "ansible.legacy.ssh", "ansible.legacy.paramiko_ssh")
LOCAL_CONNECTIONS = ("local", "ansible.builtin.local", "ansible.legacy.local")
AUTO_INTERPRETERS = ("auto", "auto_silent", "auto_legacy", "auto_legacy_silent")
ALIAS_HINT = ("give the host a valid inventory name and keep its address in ansible_host, e.g. "
              "`orin-01 ansible_host=<address>`; " + NAME_RULE)


@dataclass
class ImportResult:
    out: Path
    text: str                          # the fleet file as written (or as it would be, dry run)
    inventory: Inventory
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    written: bool = False


# -- inventory host -> target keys -----------------------------------------------------------

def target_settings(inv: Inventory, host: InventoryHost, warnings: dict[str, list[str]], cwd: Path) -> dict[str, Any]:
    """The connection keys and groups of the target for `host` (see the module doc). Warnings are
    collected as {text: [hosts it applies to]}."""
    where = f"{inv.path}: host {host.name!r}"

    def get(names: tuple[str, ...]) -> Any:
        value, used = None, None
        for name in names:
            if host.vars.get(name) is not None:
                value, used = host.vars[name], name
        if value is None:
            return None
        value = plain(value)
        if isinstance(value, Vaulted):
            raise InventoryError(f"{where}: {used} is vault-encrypted; the import cannot decrypt it",
                                 hint="give the value in clear for the import (it is a connection setting, not a "
                                      "secret), or leave it to ~/.ssh/config")
        if isinstance(value, str) and ("{{" in value or "{%" in value):
            raise InventoryError(f"{where}: {used} = {value!r} is a Jinja2 template; the import does not "
                                 "render templates", hint=f"write the value of {used} itself in the inventory")
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise InventoryError(f"{where}: {used} must be a string, got {value!r}", hint=f"fix {used}")
        return value

    out: dict[str, Any] = {}
    connection = get(("ansible_connection",))
    if connection is None or connection in SSH_CONNECTIONS:
        out["transport"] = "ssh"
    elif connection in LOCAL_CONNECTIONS:
        out["transport"] = "local"
    else:
        raise InventoryError(f"{where}: ansible_connection={connection} is not supported",
                             hint="enginekiln reaches devices over ssh (ssh, smart, paramiko) or runs on this "
                                  "machine (local); leave this host out with --group")
    if out["transport"] == "ssh":
        out["host"] = str(get(HOST_VARS) or host.name)
        port = get(PORT_VARS)
        if port is not None:
            try:
                out["port"] = int(port)
            except ValueError:
                raise InventoryError(f"{where}: the port {port!r} is not a number", hint="fix ansible_port") from None
            if not 0 < out["port"] < 65536:
                raise InventoryError(f"{where}: the port {out['port']} is not a TCP port", hint="fix ansible_port")
        user = get(USER_VARS)
        if user is not None:
            out["user"] = str(user)
        key = get(KEY_VARS)
        if key is not None:
            key = str(key)
            # Ansible hands the path to ssh as it is: relative to where ansible runs (here)
            out["identity_file"] = key if key.startswith(("~", "/")) else str(cwd / key)
        out.update(_ssh_args(host, warnings, where, cwd))
    python = get(("ansible_python_interpreter",))
    if python is not None and str(python) not in AUTO_INTERPRETERS:
        out["python"] = str(python)
    out["groups"] = [g for g in host.groups if g != "ungrouped"]
    return out


def _ssh_args(host: InventoryHost, warnings: dict[str, list[str]], where: str, cwd: Path) -> dict[str, str]:
    """proxy_jump and known_hosts from ansible_ssh_common_args / ansible_ssh_extra_args; other ssh
    options have no enginekiln equivalent (use ~/.ssh/config) and are reported."""
    out: dict[str, str] = {}
    ignored: list[str] = []
    for var in SSH_ARGS_VARS:
        value = host.vars.get(var)
        if value is None or value == "":
            continue
        value = plain(value)
        if not isinstance(value, str):
            raise InventoryError(f"{where}: {var} must be a string, got {value!r}", hint=f"fix {var}")
        try:
            args = shlex.split(value)
        except ValueError as exc:
            raise InventoryError(f"{where}: cannot split {var} ({exc})", hint=f"fix the quoting in {var}") from None
        i = 0
        while i < len(args):
            arg = args[i]
            option = None
            if arg == "-o" and i + 1 < len(args):
                option, i = args[i + 1], i + 2
            elif arg.startswith("-o") and len(arg) > 2:
                option, i = arg[2:], i + 1
            elif arg == "-J" and i + 1 < len(args):
                out["proxy_jump"], i = args[i + 1], i + 2
                continue
            else:
                ignored.append(arg)
                i += 1
                continue
            name, _, val = option.replace("=", " ", 1).partition(" ")
            val = val.strip().strip('"')
            if name.lower() == "proxyjump" and val:
                out["proxy_jump"] = val
            elif name.lower() == "userknownhostsfile" and val:
                files = val.split()
                out["known_hosts"] = files[0] if files[0].startswith(("~", "/")) else str(cwd / files[0])
                if len(files) > 1:
                    warnings.setdefault(f"UserKnownHostsFile lists {len(files)} files; enginekiln uses the first, "
                                        f"{files[0]}", []).append(host.name)
            elif name.lower() == "stricthostkeychecking":
                warnings.setdefault("StrictHostKeyChecking is ignored: enginekiln always verifies host keys against "
                                    "known_hosts", []).append(host.name)
            else:
                ignored.append(f"-o {option}")
    if ignored:
        warnings.setdefault(f"ssh options not carried over (put them in ~/.ssh/config): {' '.join(ignored)}",
                            []).append(host.name)
    return out


def _unsupported_vars(hosts: list[InventoryHost]) -> list[str]:
    seen: dict[str, int] = {}
    for h in hosts:
        for name in h.vars:
            if name.startswith("ansible_") and name not in USED_VARS:
                seen[name] = seen.get(name, 0) + 1
    return [f"{name} ({n} host{'s' if n != 1 else ''})" for name, n in sorted(seen.items())]


# -- the fleet file ---------------------------------------------------------------------------

def import_inventory(inventory: Path | str, out: Path | str = "targets.toml", *, groups: list[str] | None = None,
                     backend: str | None = None, models: list[str] | None = None,
                     install_dir: str | None = None, merge: bool = False, parser: str = "auto",
                     dry_run: bool = False, cwd: Path | None = None) -> ImportResult:
    out = Path(out).absolute()
    cwd = cwd or Path.cwd()
    inv = load_inventory(inventory, parser)
    result = ImportResult(out=out, text="", inventory=inv, warnings=list(inv.warnings))

    selected = _select(inv, groups or [])
    _check_names(inv, selected)
    per_host: dict[str, list[str]] = {}
    settings = {h.name: target_settings(inv, h, per_host, cwd) for h in selected}
    for text, names in per_host.items():
        result.warnings.append(f"{inv.path}: {text} (host{'s' if len(names) > 1 else ''} {', '.join(names)})")
    unsupported = _unsupported_vars(selected)
    if unsupported:
        result.warnings.append(f"{inv.path}: ansible_* variables not carried over (enginekiln has no equivalent): "
                               + ", ".join(unsupported))
    if backend is not None and backend not in ("onnxruntime", "tensorrt"):
        raise ConfigError(f"unknown backend {backend!r}", hint="use --backend onnxruntime or --backend tensorrt")
    if install_dir is not None and not install_dir.startswith("/"):
        raise ConfigError(f"--install-dir {install_dir!r} must be an absolute path on the devices",
                          hint="e.g. --install-dir /opt/kiln")

    existing = None
    if out.exists():
        if not merge:
            raise ConfigError(f"{out} already exists; the import does not replace a fleet file",
                              hint="add --merge to add the inventory's hosts to it (its models, store and other "
                                   "targets are kept), or write elsewhere with --out")
        existing = out.read_text()
        _validate(out, existing)     # a broken fleet file is reported as it is, first
    raw = tomllib.loads(existing) if existing is not None else {}
    defined_models = list(raw.get("models", {}))
    for m in models or []:
        if not valid_name(m):
            raise ConfigError(f"invalid model name {m!r} in --model", hint=NAME_RULE)
        if existing is not None and m not in defined_models:
            raise ConfigError(f"{out}: --model {m}: no [models.{m}] in this fleet file",
                              hint=f"define [models.{m}] first, or use one of: {', '.join(defined_models) or '(none)'}")
    new_models = list(models) if models else defined_models

    text = existing if existing is not None else _new_file_header(inv)
    appended: list[str] = []
    replacements: dict[tuple[str, ...], str] = {}
    old_targets = raw.get("targets", {})
    for name, conn in settings.items():
        if name in old_targets:
            old = old_targets[name]
            table = _updated_table(old, conn, backend=backend, models=models, install_dir=install_dir)
            if table == old:
                result.unchanged.append(name)
                continue
            replacements[("targets", name)] = render_table(["targets", name], table)
            result.updated.append(name)
        else:
            table = _new_table(conn, backend=backend or DEFAULT_BACKEND, models=new_models,
                               install_dir=install_dir or DEFAULT_INSTALL_DIR)
            appended.append(render_table(["targets", name], table))
            result.added.append(name)
    if replacements:
        try:
            text = replace_tables(text, replacements)
        except KeyError as exc:
            raise ConfigError(f"{out}: cannot update target(s) {exc.args[0]}: not written as [targets.<name>] "
                              "tables", hint="write each target as a [targets.<name>] table and import again") from None
    if appended:
        text = text.rstrip("\n") + "\n\n" if text.strip() else text
        if existing is not None:
            text += f"# imported from the Ansible inventory {inv.path.name}\n"
        text += "\n".join(appended)

    final = tomllib.loads(text)
    _check_group_target_clash(out, inv, final)
    _check_same_address(out, inv, final, set(settings))
    _validate(out, text)
    result.text = text
    if not defined_models:
        wanted = new_models or ["<name>"]
        result.notes.append(
            f"{out.name} defines no models yet: add " + ", ".join(f"[models.{m}]" for m in wanted)
            + " (factory, checkpoint, inputs, outputs; README \"targets.toml\")"
            + ("" if new_models else " and list them in each target's models")
            + " before running doit")
    if not dry_run and (result.added or result.updated):
        from kiln.files import atomic_write
        atomic_write(out, text)
        result.written = True
    return result


def _select(inv: Inventory, groups: list[str]) -> list[InventoryHost]:
    unknown = [g for g in groups if g not in inv.groups]
    if unknown:
        raise InventoryError(f"{inv.path}: no group {', '.join(map(repr, unknown))} in this inventory",
                             hint=f"use one of: {', '.join(inv.groups)}")
    wanted = set(groups)
    hosts = [h for h in inv.hosts.values() if not wanted or wanted & (set(h.groups) | {"all"})]
    if not hosts:
        raise InventoryError(f"{inv.path}: no hosts" + (f" in {', '.join(groups)}" if groups else ""),
                             hint="check the inventory with: ansible-inventory -i INVENTORY --graph")
    return hosts


def _check_names(inv: Inventory, hosts: list[InventoryHost]) -> None:
    bad_hosts = [h.name for h in hosts if not valid_name(h.name)]
    if bad_hosts:
        raise InventoryError(f"{inv.path}: host name(s) that cannot name an enginekiln target: "
                             + ", ".join(map(repr, bad_hosts)), hint=ALIAS_HINT)
    bad_groups = sorted({g for h in hosts for g in h.groups if g != "ungrouped" and not valid_name(g)})
    if bad_groups:
        raise InventoryError(f"{inv.path}: group name(s) that cannot name an enginekiln group: "
                             + ", ".join(map(repr, bad_groups)),
                             hint="rename the group in the inventory, or import only other groups with --group; "
                                  + NAME_RULE)


def _check_group_target_clash(out: Path, inv: Inventory, doc: dict) -> None:
    targets = doc.get("targets", {})
    for name, table in targets.items():
        for g in table.get("groups", []):
            if g in targets:
                raise ConfigError(f"{out}: group {g!r} (of target {name!r}) has the same name as a target",
                                  hint=f"`deploy:{g}` must name one thing: rename the group or the host in "
                                       f"{inv.path.name} (an inventory alias with ansible_host keeps the address), "
                                       "or leave one out with --group")


def _check_same_address(out: Path, inv: Inventory, doc: dict, imported: set[str]) -> None:
    """Two ssh targets written with the same host, port and proxy jump are one device (enginekiln
    refuses them before connecting; say so now, naming the inventory)."""
    seen: dict[tuple, str] = {}
    for name, t in doc.get("targets", {}).items():
        if t.get("transport", "local") != "ssh":
            continue
        address = (str(t.get("host") or name).lower(), t.get("port"), t.get("proxy_jump"))
        if address in seen and {name, seen[address]} & imported:
            where = f"{address[0]}" + (f":{address[1]}" if address[1] else "")
            raise ConfigError(f"{out}: targets {seen[address]!r} and {name!r} both reach {where}",
                              hint=f"one device, one target: give each host of {inv.path.name} its own ansible_host "
                                   "(or port), or leave one out")
        seen.setdefault(address, name)


def _new_table(conn: dict, *, backend: str, models: list[str], install_dir: str) -> dict[str, Any]:
    table: dict[str, Any] = {"transport": conn["transport"], "backend": backend}
    table.update({k: conn[k] for k in CONNECTION_KEYS if k in conn and k != "transport"})
    table.update(models=list(models), groups=list(conn["groups"]), install_dir=install_dir)
    return table


def _updated_table(old: dict, conn: dict, *, backend: str | None, models: list[str] | None,
                   install_dir: str | None) -> dict[str, Any]:
    """An existing target with the inventory's connection keys and groups (a key the inventory
    does not set is removed), and everything else kept unless given on the command line."""
    table: dict[str, Any] = {"transport": conn["transport"]}
    if backend or "backend" in old:
        table["backend"] = backend or old["backend"]
    table.update({k: conn[k] for k in CONNECTION_KEYS if k in conn and k != "transport"})
    table["models"] = list(models) if models else old.get("models", [])
    table["groups"] = list(conn["groups"])
    table["install_dir"] = install_dir or old.get("install_dir", DEFAULT_INSTALL_DIR)
    for key, value in old.items():
        if key not in table and key not in CONNECTION_KEYS:
            table[key] = value
    return table


def _new_file_header(inv: Inventory) -> str:
    return (f"# enginekiln fleet file (README.md, \"targets.toml\"), imported from the Ansible inventory "
            f"{inv.path.name}\n# with `python -m kiln import-ansible`. Paths are relative to this file.\n")


def _validate(out: Path, text: str) -> None:
    """Load `text` as the fleet file at `out` would be loaded (a file next to it, so relative paths
    mean the same). What the import adds later may be missing: models referenced but not defined
    yet, or (in a file about to receive its first targets) targets, get placeholders for this check."""
    doc = tomllib.loads(text)
    check = text
    if not doc.get("targets"):
        check += "\n[targets.kiln-import-placeholder]\nmodels = []\ninstall_dir = \".kiln-import-placeholder\"\n"
    if not doc.get("models"):
        wanted = sorted({m for t in doc.get("targets", {}).values() for m in t.get("models", [])}) or ["placeholder"]
        check += "".join(f"\n[models.{render_string(m)}]\nfactory = \"placeholder:build\"\ncheckpoint = \"x.pt\"\n"
                         f"inputs = {render_value({'x': [1]})}\noutputs = [\"y\"]\n" for m in wanted)
    import tempfile
    folder = out.parent if out.parent.is_dir() else None   # (a dry run creates no folder)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".check", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(check)
        load_fleet(tmp, out.parent / "artifacts")
    except ConfigError as exc:
        raise ConfigError(exc.message.replace(tmp, str(out)), hint=exc.hint) from None
    finally:
        os.unlink(tmp)
