"""Ansible inventories, read the way Ansible reads them: hosts, their groups and their variables.

Two readers give the same `Inventory`:

- `ansible-core`, when it is installed (the `ansible` extra): Ansible's own `DataLoader` +
  `InventoryManager` parse the source, and its `VariableManager` merges each host's variables
  (with `group_vars/` and `host_vars/` next to the inventory). Anything Ansible can read under the
  user's configuration works, dynamic inventory plugins included.
- a built-in reader for static INI and YAML inventories (PyYAML, imported only when needed),
  following the rules of ansible-core's `ini` and `yaml` inventory plugins and of its variable
  manager. The facts it relies on, with their sources, are in docs/ansible-inventory.md.

`tests/test_inventory.py` checks that both give the same result on the same inventories.

Nothing here knows about targets.toml: kiln.ansible_import turns an `Inventory` into targets.
"""
from __future__ import annotations

import ast
import os
import re
import shlex
import string
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError, KilnError

PARSERS = ("auto", "ansible", "builtin")
#: extensions the yaml plugin accepts (it also tries files without one)
YAML_EXTENSIONS = (".yaml", ".yml", ".json")
#: group_vars/<name> and host_vars/<name>: the first of these that exists
VARS_FILE_EXTENSIONS = ("", ".yml", ".yaml", ".json")
#: variables ansible-core adds to every host itself (not from the inventory)
ANSIBLE_MAGIC_VARS = frozenset({
    "inventory_file", "inventory_dir", "inventory_hostname", "inventory_hostname_short", "group_names",
    "groups", "ansible_facts", "playbook_dir", "ansible_playbook_python", "ansible_config_file",
    "ansible_version", "omit"})


class InventoryError(ConfigError):
    """An Ansible inventory cannot be read or has something enginekiln cannot use."""


@dataclass(frozen=True)
class InventoryHost:
    name: str
    groups: tuple[str, ...]       # every group it is in, parents of its groups included; sorted; no "all"
    vars: dict[str, Any]          # merged as Ansible merges them (all < parent < child < host)


@dataclass
class Inventory:
    path: Path
    parser: str                   # "ansible-core <version>" or "builtin"
    hosts: dict[str, InventoryHost]   # in the order the inventory first names them
    groups: tuple[str, ...]       # every group defined, sorted ("all" and "ungrouped" included)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Vaulted:
    """A `!vault` value: kept opaque (the built-in reader cannot and does not decrypt)."""

    text: str

    def __str__(self) -> str:
        return "<vault-encrypted>"


def load_inventory(path: Path | str, parser: str = "auto") -> Inventory:
    """Read the inventory at `path` with ansible-core ("ansible"), the built-in reader ("builtin"),
    or ansible-core when it is importable, else the built-in reader ("auto")."""
    path = Path(path)
    if parser not in PARSERS:
        raise InventoryError(f"unknown inventory parser {parser!r}", hint=f"use one of: {', '.join(PARSERS)}")
    if not path.exists():
        raise InventoryError(f"inventory {path} not found", hint="give the path of an Ansible inventory file")
    if parser == "auto":
        parser = "ansible" if ansible_available() else "builtin"
    if parser == "ansible":
        return _load_with_ansible(path)
    return _BuiltinReader(path).read()


def ansible_available() -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec("ansible.inventory.manager") is not None
    except ImportError:  # "ansible" exists but is not a package
        return False


# -- ansible-core --------------------------------------------------------------------------

def _load_with_ansible(path: Path) -> Inventory:
    try:
        import ansible
        from ansible import constants as C
        from ansible.errors import AnsibleError
        from ansible.inventory.manager import InventoryManager
        from ansible.parsing.dataloader import DataLoader
        from ansible.vars.manager import VariableManager
    except ImportError as exc:
        raise InventoryError(f"ansible-core is not installed ({exc})",
                             hint="pip install 'enginekiln[ansible]' (ansible-core), or use the built-in "
                                  "reader: --parser builtin") from exc
    source = str(path.absolute())
    saved = C.INVENTORY_ANY_UNPARSED_IS_FAILED
    C.INVENTORY_ANY_UNPARSED_IS_FAILED = True  # Ansible's default only warns and goes on with no hosts
    try:
        loader = DataLoader()
        manager = InventoryManager(loader=loader, sources=[source])
        variables = VariableManager(loader=loader, inventory=manager)
        magic = set(ANSIBLE_MAGIC_VARS) | set(variables.get_vars(include_hostvars=False))
        hosts = {}
        for name, host in manager.hosts.items():
            merged = variables.get_vars(host=host, include_hostvars=False)
            drop = magic | set(host.get_magic_vars())
            hosts[str(name)] = InventoryHost(
                name=str(name),
                groups=tuple(sorted(str(g.name) for g in host.get_groups() if g.name != "all")),
                vars={str(k): v for k, v in merged.items() if k not in drop})
        groups = tuple(sorted(str(g) for g in manager.groups))
    except AnsibleError as exc:
        # Ansible prints its reasons as warnings; the built-in reader, when it has one, says where
        detail = _first_line(exc)
        try:
            _BuiltinReader(path).read()
        except KilnError as builtin:
            detail = f"{detail}; the built-in reader says: {builtin.message}"
        except Exception:  # a source only Ansible knows how to read (a plugin, a script)
            pass
        raise InventoryError(f"{path}: ansible-core could not read this inventory: {detail}",
                             hint="fix the inventory (ansible-inventory -i INVENTORY --list shows what Ansible "
                                  "makes of it)") from exc
    finally:
        C.INVENTORY_ANY_UNPARSED_IS_FAILED = saved
    return Inventory(path=path, parser=f"ansible-core {ansible.__version__}", hosts=hosts, groups=groups)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def plain(value: Any) -> Any:
    """A value as plain Python (ansible-core hands out tagged subclasses of str, int, dict...)."""
    if isinstance(value, Vaulted) or type(value).__name__ in ("EncryptedString", "AnsibleVaultEncryptedUnicode"):
        return Vaulted("")
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


# -- the built-in reader -------------------------------------------------------------------

_SECTION = re.compile(r"^\[([^:\]\s]+)(?::(\w+))?\]\s*(?:#.*)?$")
_GROUP_NAME = re.compile(r"^([^:\]\s]+)\s*(?:#.*)?$")
# a range [a:b] or [a:b:step] inside a host pattern, as parse_address accepts it
_RANGE = r"\[(?:[a-z]:[a-z]|[0-9]+:[0-9]+)(?::[0-9]+)?\]"
_LABEL = rf"(?:\w|{_RANGE})(?:[\w-]|{_RANGE})*(?<![_-])"
_HOSTNAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$", re.I)
_IPV4_PART = r"(?:[01]?[0-9]{1,2}|2[0-4][0-9]|25[0-5]|\[[0-9]+:[0-9]+(?::[0-9]+)?\])"
_IPV4 = re.compile(rf"^(?:{_IPV4_PART}\.){{3}}{_IPV4_PART}$")
_BRACKETED_PORT = re.compile(r"^\[(.+)\]:([0-9]+)$")
_HOST_PORT = re.compile(r"^((?:[^:\[\]]|\[[^\]]*\])*):([0-9]+)$")


class _Group:
    def __init__(self, name: str) -> None:
        self.name = name
        self.vars: dict[str, Any] = {}
        self.children: list[str] = []
        self.parents: list[str] = []
        self.priority = 1


class _Host:
    def __init__(self, name: str) -> None:
        self.name = name
        self.vars: dict[str, Any] = {}
        self.groups: list[str] = []   # the groups it was put in directly


class _BuiltinReader:
    """Static INI and YAML inventories, with group_vars/ and host_vars/ next to them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.groups: dict[str, _Group] = {"all": _Group("all"), "ungrouped": _Group("ungrouped")}
        self._add_child("all", "ungrouped")
        self.hosts: dict[str, _Host] = {}
        self.warnings: list[str] = []
        self.line = 0

    # -- errors
    def error(self, problem: str, hint: str = "fix the inventory (see README, \"Importing an Ansible "
                                                "inventory\", for what the built-in reader supports)",
              line: int | None = None) -> InventoryError:
        line = self.line if line is None else line
        where = f"{self.path}:{line}" if line else f"{self.path}"
        return InventoryError(f"{where}: {problem}", hint=hint)

    # -- the inventory's structure
    def _add_group(self, name: Any) -> str:
        if not isinstance(name, str) or not name:
            raise self.error(f"invalid group name {name!r}: a group name must be a non-empty string")
        self.groups.setdefault(name, _Group(name))
        return name

    def _add_child(self, parent: str, child: str) -> None:
        if child == parent:
            raise self.error(f"group {parent!r} cannot be its own child")
        if child in self.groups:
            if child not in self.groups[parent].children:
                self.groups[parent].children.append(child)
                self.groups[child].parents.append(parent)
        elif child in self.hosts:  # as InventoryData.add_child: a host name adds that host
            self._add_host_to(child, parent)
        else:
            raise self.error(f"{child!r} is not a known host nor group")

    def _add_host(self, name: str, group: str | None, port: int | None) -> None:
        if name not in self.hosts:
            self.hosts[name] = _Host(name)
            if port:  # only where the host is first named, as Ansible does
                self.hosts[name].vars["ansible_port"] = int(port)
        if group:
            self._add_host_to(name, group)

    def _add_host_to(self, host: str, group: str) -> None:
        if group not in self.hosts[host].groups:
            self.hosts[host].groups.append(group)

    def _set_group_var(self, group: str, key: Any, value: Any) -> None:
        if key == "ansible_group_priority":
            try:
                self.groups[group].priority = int(value)
            except (TypeError, ValueError):
                raise self.error(f"group {group!r}: ansible_group_priority must be an integer, got {value!r}") from None
        else:
            self.groups[group].vars[str(key)] = value

    def _populate(self, names: list[str], port: int | None, variables: Any, group: str) -> None:
        if not isinstance(variables, dict):
            raise self.error(f"host variables must be a mapping, got {type(variables).__name__}: {variables!r}")
        for name in names:
            self._add_host(name, group, port)
            for key, value in variables.items():
                self.hosts[name].vars[str(key)] = value

    # -- host patterns: name[:port], ranges
    def _expand(self, pattern: Any) -> tuple[list[str], int | None]:
        if not isinstance(pattern, str):
            raise self.error(f"host pattern {pattern!r} must be a string (quote numbers)")
        host, port = pattern, None
        m = _BRACKETED_PORT.match(pattern) or _HOST_PORT.match(pattern)
        if m and (_IPV4.match(m.group(1)) or _HOSTNAME.match(m.group(1)) or ":" in m.group(1)):
            host, port = m.group(1), int(m.group(2))
        if "[" in host:
            try:
                return _expand_ranges(host), port
            except ValueError as exc:
                raise self.error(f"host pattern {pattern!r}: {exc}") from None
        return [host], port

    # -- reading
    def read(self) -> Inventory:
        if self.path.is_dir():
            raise self.error("is a folder; the built-in reader reads one INI or YAML file",
                             hint="import one file of it, or install ansible-core (pip install 'enginekiln[ansible]'), "
                                  "which reads inventory folders")
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise self.error(f"cannot read the inventory: {exc.strerror}") from exc
        if raw.startswith(b"$ANSIBLE_VAULT;"):
            raise self.error("the inventory is vault-encrypted; the import cannot decrypt it",
                             hint="decrypt a copy (ansible-vault view) and import that")
        try:
            text = raw.decode()
        except UnicodeDecodeError as exc:
            raise self.error(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        ext = self.path.suffix.lower()
        if ext == ".toml":
            raise self.error("TOML inventories are not supported by the built-in reader",
                             hint="install ansible-core (pip install 'enginekiln[ansible]') or convert it to INI/YAML")
        data = None
        if ext in YAML_EXTENSIONS or not ext:
            data = self._try_yaml(text, required=ext in YAML_EXTENSIONS)
        if data is not None:
            self._read_yaml(data)
        else:
            self._read_ini(text)
        self._reconcile()
        return self._result()

    def _try_yaml(self, text: str, required: bool) -> dict | None:
        """The YAML inventory as a mapping, or None if it is not one (then it is read as INI, as the
        yaml plugin declines and the ini plugin takes over)."""
        yaml = _yaml()
        try:
            data = yaml.load(text, Loader=_yaml_loader())
        except yaml.YAMLError as exc:
            if required:
                raise self.error(f"not valid YAML: {exc}") from None
            return None
        if not isinstance(data, dict) or not data:
            if required:
                raise self.error("a YAML inventory must be a non-empty mapping of group names "
                                 "(all:, ungrouped:, webservers: ...)")
            return None
        if data.get("plugin"):
            raise self.error(f"this is the configuration of the inventory plugin {data['plugin']!r}, not an inventory",
                             hint="dynamic inventories need ansible-core: pip install 'enginekiln[ansible]'")
        return data

    def _read_ini(self, text: str) -> None:
        pending: dict[str, dict] = {}
        group, state = "ungrouped", "hosts"
        for self.line, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            m = _SECTION.match(line)
            if m:
                group, state = m.group(1), m.group(2) or "hosts"
                if state not in ("hosts", "children", "vars"):
                    raise self.error(f"section [{line.strip('[]')}] has unknown type {state!r}",
                                     hint="sections are [group], [group:children] or [group:vars]")
                if group not in self.groups:
                    # [g] or [g:children] declares a group; [g:vars] alone must be declared elsewhere
                    if state == "vars" and group not in pending:
                        pending[group] = {"line": self.line, "state": state, "name": group}
                    self._add_group(group)
                if group in pending and state != "vars":
                    if pending[group]["state"] == "children":
                        self._add_pending_children(group, pending)
                    elif pending[group]["state"] == "vars":
                        del pending[group]
                continue
            if line.startswith("[") and line.endswith("]"):
                raise self.error(f"invalid section {line!r}",
                                 hint="a section header has no spaces and no characters other than [group:kind]")
            if state == "hosts":
                self._ini_host_line(line, group)
            elif state == "vars":
                if "=" not in line:
                    raise self.error(f"expected key=value, got {line!r}")
                key, value = (part.strip() for part in line.split("=", 1))
                self._set_group_var(group, key, _ini_value(value))
            else:  # children
                m = _GROUP_NAME.match(line)
                if not m:
                    raise self.error(f"expected a group name, got {line!r}")
                child = m.group(1)
                if child not in self.groups:
                    decl = pending.setdefault(child, {"line": self.line, "state": state, "name": child, "parents": []})
                    decl.setdefault("parents", []).append(group)
                else:
                    self._add_child(group, child)
        for decl in pending.values():
            if decl["state"] == "vars":
                raise self.error(f"section [{decl['name']}:vars] is for a group that is never defined",
                                 hint=f"declare the group with [{decl['name']}] or [{decl['name']}:children]",
                                 line=decl["line"])
            raise self.error(f"section [{decl['parents'][-1]}:children] names the undefined group {decl['name']!r}",
                             hint=f"declare it with [{decl['name']}] (or [{decl['name']}:children])", line=decl["line"])

    def _add_pending_children(self, group: str, pending: dict) -> None:
        for parent in pending[group]["parents"]:
            self._add_child(parent, group)
            if parent in pending and pending[parent]["state"] == "children":
                self._add_pending_children(parent, pending)
        del pending[group]

    def _ini_host_line(self, line: str, group: str) -> None:
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as exc:
            raise self.error(f"cannot split the host line {line!r}: {exc}",
                             hint="quote values with spaces, and close every quote") from None
        if not tokens:
            return
        pattern = tokens[0]
        names, port = self._expand(pattern)
        if pattern.strip().endswith(":") and port is None:
            raise self.error(f"invalid host pattern {pattern!r}: a trailing ':' is reserved for a port")
        if any(n.strip() == "---" for n in names):
            raise self.error("'---' in an INI inventory: is this a YAML file without a .yml/.yaml extension?")
        variables = {}
        for token in tokens[1:]:
            if "=" not in token:
                raise self.error(f"expected key=value after the host name, got {token!r}")
            key, value = token.split("=", 1)
            variables[key] = _ini_value(value)
        self._populate(names, port, variables, group)

    def _read_yaml(self, data: dict) -> None:
        for name, body in data.items():
            self._yaml_group(name, body)

    def _yaml_group(self, name: Any, body: Any) -> Any:
        if not isinstance(body, (dict, type(None))):
            self.warnings.append(f"{self.path}: skipped {name!r}: it is not a valid group definition")
            return name
        group = self._add_group(name)
        if body is None:
            return group
        for section in ("vars", "children", "hosts"):
            if isinstance(body.get(section), str):
                body[section] = {body[section]: None}
            if section in body and not isinstance(body[section], (dict, type(None))):
                raise self.error(f"group {group!r}: {section} must be a mapping, found {type(body[section]).__name__}")
        for key, value in body.items():
            if not isinstance(value, (dict, type(None))):
                self.warnings.append(f"{self.path}: skipped key {key!r} of group {group!r}: it is not a mapping")
            elif value is None:
                continue
            elif key == "vars":
                for var, val in value.items():
                    self._set_group_var(group, var, val)
            elif key == "children":
                for sub, sub_body in value.items():
                    self._add_child(group, self._yaml_group(sub, sub_body))
            elif key == "hosts":
                for pattern, host_vars in value.items():
                    names, port = self._expand(pattern)
                    self._populate(names, port, host_vars or {}, group)
            else:
                self.warnings.append(f"{self.path}: skipped key {key!r} of group {group!r}: only vars, children and "
                                     "hosts belong in a group")
        return group

    # -- after parsing: ungrouped, depths, merged variables
    def _reconcile(self) -> None:
        self.line = 0
        for g in list(self.groups.values()):
            if g.name != "all" and not g.parents:
                self._add_child("all", g.name)
        for h in self.hosts.values():
            others = [g for g in h.groups if g not in ("all", "ungrouped")]
            if others and "ungrouped" in h.groups:
                h.groups.remove("ungrouped")
            elif not others and "ungrouped" not in h.groups:
                h.groups.append("ungrouped")
        for name in set(self.groups) & set(self.hosts):
            self.warnings.append(f"{self.path}: {name!r} is both a group and a host")

    def _depths(self) -> dict[str, int]:
        """A group's depth is its longest path from "all" (Ansible's Group.depth)."""
        depth: dict[str, int] = {}
        visiting: set[str] = set()

        def of(name: str) -> int:
            if name in depth:
                return depth[name]
            if name in visiting:
                raise self.error(f"group {name!r} is its own ancestor (a cycle of children)")
            visiting.add(name)
            g = self.groups[name]
            depth[name] = 0 if name == "all" else 1 + max(of(p) for p in g.parents)
            visiting.discard(name)
            return depth[name]
        for name in self.groups:
            of(name)
        return depth

    def _ancestors(self, group: str) -> set[str]:
        out, todo = set(), [group]
        while todo:
            g = todo.pop()
            if g not in out:
                out.add(g)
                todo.extend(self.groups[g].parents)
        return out

    def _result(self) -> Inventory:
        depth = self._depths()
        base = self.path.absolute().parent
        group_files = {g: _vars_files(base / "group_vars", g) for g in self.groups}
        loaded: dict[Path, dict] = {}

        def file_vars(files: list[Path]) -> dict:
            out: dict = {}
            for f in files:
                if f not in loaded:
                    loaded[f] = self._load_vars_file(f)
                out.update(loaded[f])
            return out

        hosts = {}
        for h in self.hosts.values():
            member = set().union(*(self._ancestors(g) for g in h.groups)) if h.groups else {"all"}
            member.add("all")
            ordered = sorted((g for g in member if g != "all"),
                             key=lambda g: (depth[g], self.groups[g].priority, g))
            # ansible-core's default precedence (VARIABLE_PRECEDENCE, then host vars):
            # all_inventory, groups_inventory, all_plugins_inventory, groups_plugins_inventory,
            # host (inventory), host_vars/
            merged: dict[str, Any] = dict(self.groups["all"].vars)
            for g in ordered:
                merged.update(self.groups[g].vars)
            merged.update(file_vars(group_files["all"]))
            for g in ordered:
                merged.update(file_vars(group_files[g]))
            merged.update(h.vars)
            merged.update(file_vars(_vars_files(base / "host_vars", h.name)))
            hosts[h.name] = InventoryHost(name=h.name, groups=tuple(sorted(ordered)), vars=merged)
        return Inventory(path=self.path, parser="builtin", hosts=hosts, groups=tuple(sorted(self.groups)),
                         warnings=self.warnings)

    def _load_vars_file(self, path: Path) -> dict:
        raw = path.read_bytes()
        if raw.startswith(b"$ANSIBLE_VAULT;"):
            raise InventoryError(f"{path} is vault-encrypted; the import cannot decrypt it",
                                 hint="decrypt it for the import (ansible-vault decrypt --output ...) or use "
                                      "ansible-core with your vault password")
        yaml = _yaml()
        try:
            data = yaml.load(raw.decode(), Loader=_yaml_loader())
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise InventoryError(f"{path}: not valid YAML: {exc}", hint="fix the variables file") from None
        if not data:
            return {}
        if not isinstance(data, dict):
            raise InventoryError(f"{path}: a variables file must hold a mapping, got {type(data).__name__}",
                                 hint="write it as key: value lines")
        return {str(k): v for k, v in data.items()}


def _vars_files(folder: Path, name: str) -> list[Path]:
    """group_vars/<name> or host_vars/<name>: the first of <name>, .yml, .yaml, .json that exists;
    a folder gives all its files (sorted, recursively; hidden files and backups~ skipped)."""
    if name.startswith(os.sep) or not folder.is_dir():
        return []
    for ext in VARS_FILE_EXTENSIONS:
        candidate = folder / (name + ext)
        if candidate.exists():
            return _folder_files(candidate) if candidate.is_dir() else [candidate]
    return []


def _folder_files(folder: Path) -> list[Path]:
    out = []
    for entry in sorted(os.listdir(folder)):
        if entry.startswith(".") or entry.endswith("~"):
            continue
        full, ext = folder / entry, os.path.splitext(entry)[1]
        if full.is_dir() and not ext:
            out.extend(_folder_files(full))
        elif full.is_file() and (not ext or ext in YAML_EXTENSIONS):
            out.append(full)
    return out


def _expand_ranges(pattern: str) -> list[str]:
    """orin-[01:03] -> orin-01, orin-02, orin-03; [a:c], [1:9:2]; several ranges multiply."""
    head, _, rest = pattern.partition("[")
    inner, sep, tail = rest.partition("]")
    if not sep:
        raise ValueError("a range must be closed with ']'")
    bounds = inner.split(":")
    if len(bounds) not in (2, 3):
        raise ValueError("a host range must be [begin:end] or [begin:end:step]")
    begin, end, step = bounds[0] or "0", bounds[1], bounds[2] if len(bounds) == 3 else "1"
    if not end:
        raise ValueError("a host range must have an end value")
    width = len(begin) if begin[0] == "0" and len(begin) > 1 else 0
    if width and len(end) != width:
        raise ValueError("the begin and end of a zero-padded range must have the same length")
    try:
        step_n = int(step)
        if begin in string.ascii_letters and end in string.ascii_letters:
            i, j = string.ascii_letters.index(begin), string.ascii_letters.index(end)
            if i > j:
                raise ValueError("a host range must have begin <= end")
            seq = list(string.ascii_letters[i:j + 1:step_n])
        else:
            seq = [str(n).zfill(width) if width else str(n) for n in range(int(begin), int(end) + 1, step_n)]
    except ValueError as exc:
        raise ValueError(str(exc) if "range" in str(exc) else f"bad range [{inner}]") from None
    out = []
    for item in seq:
        name = head + item + tail
        out.extend(_expand_ranges(name) if "[" in name else [name])
    return out


def _ini_value(text: str) -> Any:
    """A value in an INI inventory, as the ini plugin reads it: a Python literal if it is one
    (numbers, quoted strings, lists, dicts, True/False/None), else the text itself."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = text
    return _coerce(value)


def _coerce(value: Any) -> Any:
    if isinstance(value, (list, tuple, set)):
        return [_coerce(v) for v in value]
    if isinstance(value, dict):
        return {k: _coerce(v) for k, v in value.items()}
    if value is ...:
        return "..."
    if isinstance(value, complex):
        return str(value)
    if isinstance(value, bytes):
        return value.decode(errors="surrogateescape")
    return value


def _yaml():
    try:
        import yaml
    except ImportError as exc:
        raise InventoryError("reading YAML inventories needs PyYAML, which is not installed",
                             hint="pip install pyyaml (or ansible-core: pip install 'enginekiln[ansible]')") from exc
    return yaml


_LOADER = None


def _yaml_loader():
    """PyYAML's safe loader, plus Ansible's tags: !vault stays opaque, !unsafe is the plain string."""
    global _LOADER
    if _LOADER is None:
        yaml = _yaml()

        class Loader(yaml.SafeLoader):
            pass
        Loader.add_constructor("!vault", lambda loader, node: Vaulted(loader.construct_scalar(node)))
        Loader.add_constructor("!unsafe", lambda loader, node: (
            loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode) else
            loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else
            loader.construct_mapping(node)))
        _LOADER = Loader
    return _LOADER
