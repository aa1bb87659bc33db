"""OSError -> ResourceError: one message a person can act on, instead of a traceback.

A full disk, a read-only mount, a folder without permission, a program that is not installed:
these are facts about the machine, not bugs. `resource_error(exc)` turns such an OSError
(the exception itself or one it was raised from) into a `ResourceError` that names the path,
what was needed, and the fix; for any other OSError it returns None (that one stays a bug, with
its traceback). One helper, used

* by the task wrapper (tasks/common.py), for anything that escapes a task action;
* by the library where it knows better what a folder is and which setting moves it
  (`translated(places=fleet_places(fleet))`: the artifacts folder -> KILN_ARTIFACTS, a local
  target's install_dir -> its `install_dir`, the local store -> `[store] url`);
  `@explain_os_errors` does that for the pipeline's entry
  points (export, fingerprint, engine, deploy), which take the run's Context first.

Errors over SSH never get here: the SSH transport maps them to TransportError on the device.
"""
from __future__ import annotations

import contextlib
import errno as E
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from kiln.errors import ResourceError

#: errno values explained here; every other OSError is left alone
SPACE = (E.ENOSPC, E.EDQUOT)
READ_ONLY = (E.EROFS,)
PERMISSION = (E.EACCES, E.EPERM)
PROGRAM = (E.ENOENT, E.EACCES, E.ENOEXEC)


@dataclass(frozen=True)
class Place:
    """A folder the user chose, and how to choose another one."""
    folder: Path
    what: str     # "the artifacts folder"
    change: str   # "point KILN_ARTIFACTS at another folder"


def fleet_places(fleet) -> list[Place]:
    """The folders a fleet file names (duck-typed kiln.config.Fleet: no import cycle)."""
    places = [Place(Path(fleet.artifacts), "the artifacts folder", "point KILN_ARTIFACTS at another folder")]
    url = getattr(fleet, "store_url", "") or ""
    if url.startswith("file://"):
        root = Path(url[len("file://"):])
        root = root if root.is_absolute() else Path(fleet.path).parent / root
        places.append(Place(root, "the local store", f"set [store] url in {fleet.path} to another folder"))
    for t in fleet.targets.values():
        if t.transport == "local":
            places.append(Place(Path(t.install_dir), f"the install_dir of target {t.name}",
                                f"set install_dir of [targets.{t.name}] in {fleet.path} to another folder"))
    # (checkpoint folders are not places here: often the fleet file's own folder, which holds
    # everything else too; writing a demo checkpoint names its folder itself, see create_checkpoint)
    return places


def resource_error(exc: BaseException, *, path: str | os.PathLike | None = None,
                   places: Iterable[Place] = (), program: str | None = None,
                   doing: str | None = None, fix: str | None = None) -> ResourceError | None:
    """The ResourceError for `exc` (or an OSError it was raised from), or None if it is not a
    disk-space, read-only, permission or missing-program error.

    `path`: the file being written when the OSError does not name one (a write() that hits a
    full disk names none). `program`: the caller was starting this program. `doing`: what the
    program was needed for. `fix`: replaces the generic fix."""
    os_exc = _os_error(exc)
    if os_exc is None:
        return None
    number = os_exc.errno
    if program is not None or _raised_starting_a_program(os_exc):
        if number not in PROGRAM:
            return None
        return _program_error(os_exc, program or str(os_exc.filename), doing, fix)
    if number not in SPACE + READ_ONLY + PERMISSION:
        return None
    where = _destination(os.path.abspath(os.fspath(os_exc.filename if os_exc.filename is not None else path or ".")))
    place = _place_of(where, places)
    about = [place.what] if place else []
    mount = _mount_point(where)
    if number in SPACE:
        problem = "no space left on device" if number == E.ENOSPC else "disk quota exceeded"
        free = _free_space(where)
        if free is not None:
            about.append(f"{free} free on {mount}")
        hint = f"free space on {mount} (`df -h {mount}`)"
        hint += f", or {place.change} on a disk with room" if place else ", or write to a disk with room"
        message = f"{problem}: cannot write {where}"
    elif number in READ_ONLY:
        hint = f"remount {mount} read-write"
        hint += f", or {place.change} that is writable" if place else ", or use a writable folder"
        about.append(f"mounted read-only at {mount}")
        message = f"read-only file system: cannot write {where}"
    else:
        user = _user()
        folder = where if os.path.isdir(where) else os.path.dirname(where)
        about.insert(0, f"running as user {user}")
        hint = f"give user {user} access to {folder} (check `ls -ld {folder}`)"
        hint += f", or {place.change}" if place else ""
        message = f"permission denied: {where}"
    if about:
        message += f" ({'; '.join(about)})"
    return ResourceError(message, path=where, errno=number, hint=fix or hint)


def machine_error(exc: BaseException, path: str | os.PathLike | None = None) -> OSError | None:
    """The disk-space, read-only or permission OSError inside `exc` (a library may wrap it), with
    `path` as its file when it names none; None if there is none. For code that catches broadly
    (an exporter raises anything) and re-raises this for a caller who knows the places."""
    os_exc = _os_error(exc)
    if os_exc is None or os_exc.errno not in SPACE + READ_ONLY + PERMISSION:
        return None
    if os_exc.filename is None and path is not None:
        return type(os_exc)(os_exc.errno, os_exc.strerror, os.fspath(path))
    return os_exc


@contextlib.contextmanager
def translated(*, path: str | os.PathLike | None = None,
               places: Iterable[Place] | Callable[[], Iterable[Place]] = ()) -> Iterator[None]:
    """Inside the block, an explainable OSError becomes its ResourceError (chained);
    `places` may be a callable, called only when there is an error to explain."""
    try:
        yield
    except OSError as exc:
        err = resource_error(exc, path=path, places=places() if callable(places) else places)
        if err is None:
            raise
        raise err from exc


def explain_os_errors(fn):
    """Decorate a pipeline entry point `fn(ctx, ...)`: an explainable OSError inside it becomes a
    ResourceError naming the fleet's folder it hit and the setting that moves it."""
    @functools.wraps(fn)
    def run(ctx, *args, **kwargs):
        with translated(places=lambda: fleet_places(ctx.fleet)):
            return fn(ctx, *args, **kwargs)
    return run


# -- helpers -------------------------------------------------------------------------

def _os_error(exc: BaseException | None) -> OSError | None:
    """`exc` if it is an OSError, else the first OSError it was explicitly raised from
    (`raise X from oserror`: exporters and libraries wrap them)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        exc, seen = exc.__cause__, seen + 1
    return None


def _raised_starting_a_program(exc: OSError) -> bool:
    """True if the OSError came out of starting a process (subprocess, os.exec*/spawn*)."""
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    if last is None:
        return False
    code = last.tb_frame.f_code
    return code.co_name in ("_execute_child", "_fork_exec") or (
        os.path.basename(code.co_filename) in ("subprocess.py", "os.py") and code.co_name.startswith(("exec", "spawn")))


def _program_error(exc: OSError, program: str, doing: str | None, fix: str | None) -> ResourceError:
    needed = f" (needed for {doing})" if doing else ""
    if exc.errno == E.ENOENT:
        message = f"program not found: {program}{needed}"
        hint = f"install {os.path.basename(program)} on this machine, or give the full path of the right program"
    elif exc.errno == E.EACCES:
        message = f"cannot run {program}: permission denied (not executable){needed}"
        hint = f"make it executable (`chmod +x {program}`), or give the path of the right program"
    else:
        message = f"cannot run {program}: not a program for this machine (exec format error){needed}"
        hint = "install the build of the program for this machine's architecture"
    return ResourceError(message, path=program, errno=exc.errno, hint=fix or hint)


def _destination(path: str) -> str:
    """The file being written, not the temp name kiln.files.atomic_file writes it under
    (`.<name>.<random>.part` next to it)."""
    folder, base = os.path.split(path)
    if base.startswith(".") and base.endswith(".part") and base.count(".") >= 3:
        return os.path.join(folder, base[1:-len(".part")].rsplit(".", 1)[0])
    return path


def _place_of(path: str, places: Iterable[Place]) -> Place | None:
    """The deepest place holding `path` (the store and install dirs may sit inside artifacts)."""
    best, depth = None, -1
    for place in places:
        folder = os.path.abspath(place.folder)
        if path == folder or path.startswith(folder.rstrip(os.sep) + os.sep):
            if folder.count(os.sep) > depth:
                best, depth = place, folder.count(os.sep)
    return best


def _existing(path: str) -> str:
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path or "/"


def _mount_point(path: str) -> str:
    """The mount point holding `path`: the longest one in /proc/self/mounts that contains it
    (bind mounts included, which os.path.ismount cannot see), else by walking up."""
    path = os.path.realpath(_existing(path))
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            points = [line.split()[1] for line in f if len(line.split()) > 1]
    except OSError:
        points = []
    best = ""
    for point in points:
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)  # \040 is a space
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best = point
    if best:
        return best
    if not os.path.isdir(path):
        path = os.path.dirname(path)
    while not os.path.ismount(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _free_space(path: str) -> str | None:
    import shutil
    try:
        free = shutil.disk_usage(_existing(path)).free
    except OSError:
        return None
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if free < 1000 or unit == "TB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1000
    return None


def _user() -> str:
    import pwd
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
