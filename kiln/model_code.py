"""All of a model's code in its export key: the modules its factory imports and the packages they use.

At export, in the export's own process, the factory's module and everything it pulls in are
imported anyway. `watch_imports` notes the modules that appear in `sys.modules` meanwhile, and
`record_model_code` keeps those that are *the user's code*: a file outside the Python
installation (stdlib, site-packages, the venv) and outside enginekiln itself (its own code is
covered by the export format version). Modules imported earlier in the same process (a doit run
that created the checkpoint first, two models sharing a helper) do not appear in that diff, so
the record also follows the import statements of each recorded file (parsed, anywhere in the
file, relative imports resolved) to the modules already loaded. The third-party distributions
those files import are recorded with their versions, read from their `.dist-info` folder names.

The record goes into the export's provenance:
    {"modules": [{"module": "helpers", "file": "/abs/helpers.py", "sha256": "..."}, ...],
     "packages": {"torch": "2.13.0", ...}}
`code_key` turns it into what the export key holds, {"modules": {name: sha256}, "packages":
{name: version}} -- module names, not paths, so moving the checkout changes no key. It imports
nothing: each module is found again by name on the fleet's folders and Python's path (no import,
like kiln.factories), hashed through the stat cache (an unchanged stat is not re-read), and
package versions are directory listings. A new import added by a code change is seen because the
file that gained it changed, and the export that follows records the new set.
"""
from __future__ import annotations

import ast
import functools
import importlib.machinery
import importlib.util
import os
import site
import sys
import sysconfig
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from kiln.devices.local_probe import package_version
from kiln.errors import HashError
from kiln.keys import HashCache

MISSING = "missing"
_KILN = os.path.realpath(Path(__file__).resolve().parent) + os.sep


@contextmanager
def watch_imports() -> Iterator[list[str]]:
    """Yields a list that holds, after the block, the names of the modules imported in it."""
    before = set(sys.modules)
    new: list[str] = []
    try:
        yield new
    finally:
        new.extend(name for name in list(sys.modules) if name not in before)


@functools.lru_cache(maxsize=1)
def _installation_dirs() -> tuple[str, ...]:
    dirs: set[str] = set()
    for base, platbase in ((sys.prefix, sys.exec_prefix), (sys.base_prefix, sys.base_exec_prefix)):
        paths = sysconfig.get_paths(vars={"base": base, "platbase": platbase,
                                          "installed_base": base, "installed_platbase": platbase})
        dirs.update(paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths)
    try:
        dirs.update(site.getsitepackages())
    except AttributeError:  # some embedded/virtualenv builds have no getsitepackages
        pass
    if site.ENABLE_USER_SITE and site.USER_SITE:
        dirs.add(site.USER_SITE)
    return tuple(os.path.realpath(d) + os.sep for d in dirs if d)


def _user_file(module) -> str | None:
    """The module's file if it is the user's code, else None."""
    file = getattr(module, "__file__", None)
    if not isinstance(file, str) or not os.path.isfile(file):
        return None
    real = os.path.realpath(file)
    parts = Path(real).parts
    if "site-packages" in parts or "dist-packages" in parts or real.startswith(_KILN):
        return None
    if real.startswith(_installation_dirs()):
        return None
    return real


def _package_of(name: str, module) -> str:
    package = getattr(module, "__package__", None)
    if package is not None:
        return package
    return name if hasattr(module, "__path__") else name.rpartition(".")[0]


def _imports(file: str, package: str) -> tuple[set[str], set[str]]:
    """(absolute module names the file imports, with their parent packages; top-level names of its
    absolute imports). Relative imports are resolved against `package`."""
    try:
        tree = ast.parse(Path(file).read_bytes(), filename=file)
    except (SyntaxError, ValueError, OSError):
        return set(), set()
    names: set[str] = set()
    tops: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found = [a.name for a in node.names]
            tops.update(n.split(".")[0] for n in found)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                try:
                    base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                except (ImportError, ValueError):
                    continue
            else:
                base = node.module or ""
                tops.add(base.split(".")[0])
            found = [base] + [f"{base}.{a.name}" for a in node.names if a.name != "*"]
        else:
            continue
        for name in found:
            parts = name.split(".")
            names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return names, tops


def record_model_code(factory_module: str, imported: Sequence[str], hashes: HashCache) -> dict:
    """The model's code as imported in this process (see the module docstring). Call it after the
    factory module was imported and the factory called; `imported` is from `watch_imports`."""
    modules: dict[str, str] = {}
    tops: set[str] = set()
    todo = [factory_module, *imported]
    while todo:
        name = todo.pop()
        module = sys.modules.get(name)
        if name in modules or module is None or name == "__main__":
            continue
        file = _user_file(module)
        if file is None:
            continue
        modules[name] = file
        names, file_tops = _imports(file, _package_of(name, module))
        tops |= file_tops
        todo.extend(n for n in names if n not in modules)
    local_tops = {n.split(".")[0] for n in modules}
    third_party = tops - local_tops - set(sys.stdlib_module_names) - {""}
    packages: dict[str, str | None] = {}
    if third_party:
        import importlib.metadata
        owners = importlib.metadata.packages_distributions()
        for top in sorted(third_party):
            for dist in owners.get(top, ()):
                packages[dist] = package_version(dist)
    return {"modules": [{"module": n, "file": f, "sha256": hashes.sha256(f)} for n, f in sorted(modules.items())],
            "packages": dict(sorted(packages.items()))}


def find_module_file(name: str, search: Sequence[Path] = ()) -> Path | None:
    """The file Python would import for module `name` from `search` then sys.path, found without
    importing anything (not even its parent packages); None if not found that way."""
    locations = [str(p) for p in search] + [p or os.getcwd() for p in sys.path]
    parts = name.split(".")
    spec = None
    for i in range(len(parts)):
        try:
            spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: i + 1]), locations)
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        if i < len(parts) - 1:
            locations = list(spec.submodule_search_locations or [])
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None
    return Path(spec.origin)


def code_key(recorded: dict | None, search: Sequence[Path], hashes: HashCache) -> dict:
    """What the export key holds of a recorded model code: module name -> sha256 of the file it
    resolves to now (MISSING if none), distribution -> installed version (None if uninstalled).
    Imports nothing; hashes through the stat cache."""
    if not recorded:
        return {}
    modules = {}
    for entry in recorded.get("modules", ()):
        path = find_module_file(entry["module"], search) or Path(entry["file"])
        try:
            modules[entry["module"]] = hashes.sha256(path)
        except HashError:
            modules[entry["module"]] = MISSING
    packages = {dist: package_version(dist) for dist in recorded.get("packages", {})}
    return {"modules": modules, "packages": packages}


def describe_change(old: dict | None, new: dict | None) -> str:
    """'helpers changed, torch 2.12.0 -> 2.13.0' for the export's "why"."""
    old, new = old or {}, new or {}
    parts = []
    om, nm = old.get("modules", {}), new.get("modules", {})
    for name in sorted(set(om) | set(nm)):
        if om.get(name) != nm.get(name):
            parts.append(f"module {name} {'missing' if nm.get(name) in (None, MISSING) else 'changed'}")
    op, np_ = old.get("packages", {}), new.get("packages", {})
    for name in sorted(set(op) | set(np_)):
        if op.get(name) != np_.get(name):
            parts.append(f"package {name} {op.get(name)} -> {np_.get(name)}")
    return "model code changed (" + ", ".join(parts) + ")" if parts else "model code changed"
