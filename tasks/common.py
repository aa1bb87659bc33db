"""Glue shared by the task creators: action wrapping and console lines.

Task creators only build dicts; the work happens in kiln's functions, called
from actions. A KilnError inside an action becomes a doit TaskFailed (the work
said no, with a clear message), and so does an OSError that says something about
the machine (disk full, read-only, no permission, a program not installed:
kiln.oserrors explains it in one line, no traceback). Anything else is a TaskError
(a bug, with its traceback). Exit codes: 1 when a task failed, 2 for a bug or a
wrong fleet file (tasks/project.py), 3 for a bad command line (doit's own).
"""
from __future__ import annotations

import functools
import logging
import sys

from doit.exceptions import BaseFail, TaskFailed

from kiln.errors import KilnError
from kiln.oserrors import resource_error


def setup_logging() -> None:
    """Warnings of the library on stderr, once per process."""
    root = logging.getLogger("kiln")
    if root.handlers:
        return
    root.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("kiln: %(levelname)s: %(message)s"))
    root.addHandler(console)


def say(line: str) -> None:
    # one write per line: with `doit -n N` several tasks talk at once, and print() writes
    # the text and the newline separately, which interleaves lines
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def action(fn):
    """Wrap a library call as a doit python-action."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except KilnError as exc:
            return TaskFailed(str(exc))
        except Exception as exc:
            # the machine said no (ENOSPC, EROFS, EACCES, a missing program), possibly wrapped by a
            # library: one line naming the path and the fix. Any other exception is a bug: doit
            # shows it with its traceback
            if (err := resource_error(exc)) is None:
                raise
            return TaskFailed(str(err))
        # values for doit to keep, or a failure the action chose (e.g. cache-check's exit 2)
        return result if isinstance(result, (dict, BaseFail)) else None
    return run


def check(fn):
    """Wrap a library predicate as a doit `uptodate` callable. A task doit has no saved values
    for (never run here, or `doit forget`) is not up to date, whatever the records say. A check
    that cannot decide (a KilnError or an OSError, e.g. the hash cache on a full disk) says
    "not up to date": the action then runs and reports the problem as a failed task; doit
    itself would end the whole run with a traceback (exit 3)."""
    def uptodate(task, values):
        if not values:
            return False
        try:
            return fn()
        except (KilnError, OSError):
            return False
    return uptodate


def step(name: str, doc: str, run, is_current, task_dep=()) -> dict:
    """A task whose work is `run()` (a library call returning the values doit keeps) and whose
    up-to-date check is `is_current()`."""
    return {"name": name, "doc": doc, "actions": [action(run)], "uptodate": [check(is_current)],
            "task_dep": list(task_dep), "verbosity": 2}
