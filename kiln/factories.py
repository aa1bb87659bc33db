"""Finding and importing a model's factory (`factory = "module:function"` in the fleet file).

A factory module is looked for, in this order (README "Where factories are found"):

1. the fleet file's folder (a `models.py` next to `targets.toml` just works, no PYTHONPATH);
2. the folders of the fleet file's top-level `python_path = ["src", "../models"]`, relative to it;
3. Python's own path (the checkout, PYTHONPATH, installed packages).

`find_factory_source` finds the module's file without importing anything, not even its package:
the export key hashes that file, and a no-op run must not import user code. `factory_imports`
puts the folders of (1) and (2) first on `sys.path` while a factory is imported and called, and
takes them off again afterwards, under a lock: several fleets (several Contexts) in one process
do not see each other's folders. Python keeps an imported module for the life of the process,
so two fleets in one process whose factory modules have the same name would share the first one
imported; that is refused with a clear error, never used silently.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import threading
from pathlib import Path
from typing import Iterator, Sequence

from kiln.errors import ExportError

_LOCK = threading.RLock()


def _describe(search: Sequence[Path]) -> str:
    folders = [str(p) for p in search]
    if not folders:
        return "Python's path"
    first = f"{folders[0]} (the fleet file's folder)"
    rest = f", {', '.join(folders[1:])} (python_path)" if len(folders) > 1 else ""
    return f"{first}{rest} and Python's path"


def _not_found(factory: str, model: str | None, search: Sequence[Path], why: str) -> ExportError:
    module = factory.split(":")[0]
    top = module.split(".")[0]
    here = search[0] if search else Path(".")
    return ExportError(
        f"cannot find the factory module {module!r}{f' of model {model}' if model else ''}: {why}; "
        f"searched {_describe(search)}",
        hint=f"put {top}.py (or the package folder {top}/) next to the fleet file in {here}, or list the folder "
             f"that holds it in python_path = [\"...\"] at the top of the fleet file (before any [table]; "
             f"paths relative to the fleet file), or fix `factory`")


def find_factory_source(factory: str, search: Sequence[Path] = (), model: str | None = None) -> Path:
    """The source file of the factory's module, found in `search`, then sys.path; nothing is imported."""
    module = factory.split(":")[0]
    parts = module.split(".")
    locations = [str(p) for p in search] + [p or os.getcwd() for p in sys.path]
    spec = None
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        try:
            spec = importlib.machinery.PathFinder.find_spec(name, locations)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            return _installed_source(factory, search, model, name)
        if i < len(parts) - 1:
            locations = list(spec.submodule_search_locations or [])
            if not locations:
                raise _not_found(factory, model, search, f"{name} is a module, not a package")
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        raise _not_found(factory, model, search, f"{module} is a folder without an __init__.py or has no source file")
    return Path(spec.origin)


def _installed_source(factory: str, search: Sequence[Path], model: str | None, missing: str) -> Path:
    """Not on any path folder: a package installed with its own finder (e.g. an editable install)."""
    module = factory.split(":")[0]
    try:
        spec = importlib.util.find_spec(module)  # imports the parent packages, as any import would
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        raise _not_found(factory, model, search, f"no module named {missing!r}")
    return Path(spec.origin)


@contextlib.contextmanager
def factory_imports(search: Sequence[Path]) -> Iterator[None]:
    """`search` first on sys.path for the duration (one fleet at a time in this process)."""
    added = [str(p) for p in search]
    with _LOCK:
        sys.path[:0] = added
        importlib.invalidate_caches()  # a module written since the last import in this process
        try:
            yield
        finally:
            for entry in added:
                try:
                    sys.path.remove(entry)  # the first occurrence: the one added above
                except ValueError:
                    pass


def import_factory(factory: str, search: Sequence[Path] = (), model: str | None = None):
    """The factory function (call it inside `factory_imports(search)`)."""
    module_name, func_name = factory.split(":")
    source = find_factory_source(factory, search, model)
    loaded = sys.modules.get(module_name)
    loaded_file = getattr(loaded, "__file__", None) if loaded is not None else None
    if loaded_file and os.path.realpath(loaded_file) != os.path.realpath(source):
        raise ExportError(f"factory module {module_name!r} of model {model} is {source}, but this process has "
                          f"already imported another {module_name!r} from {loaded_file}",
                          model=model, hint="give the factory modules of different fleets different names, "
                                            "or run the fleets in separate processes (doit does)")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any failure of user code is reported the same way
        raise ExportError(f"importing factory module {module_name!r} ({source}) raised {type(exc).__name__}: {exc}",
                          model=model, hint="fix the module, or install what it imports into enginekiln's "
                                            "environment") from exc
    if getattr(module, "__file__", None) and os.path.realpath(module.__file__) != os.path.realpath(source):
        raise ExportError(f"factory module {module_name!r} of model {model} is {source}, but Python imported "
                          f"{module.__file__} (its package was already imported from elsewhere)", model=model,
                          hint="give the factory modules of different fleets different names, "
                               "or run the fleets in separate processes (doit does)")
    try:
        return getattr(module, func_name)
    except AttributeError:
        raise ExportError(f"factory module {module_name!r} ({source}) has no function {func_name!r}", model=model,
                          hint="fix `factory` in the fleet file (module:function)") from None
