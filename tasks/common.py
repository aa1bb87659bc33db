"""Glue shared by the task creators: action wrapping and console lines.

Task creators only build dicts; the work happens in kiln's functions, called
from actions. A KilnError inside an action becomes a doit TaskFailed (the work
said no, with a clear message); anything else is a TaskError (a bug).
"""
from __future__ import annotations

import functools
import logging
import sys

from doit.exceptions import TaskFailed

from kiln.errors import KilnError


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
        return result if isinstance(result, dict) else None
    return run


def check(fn):
    """Wrap a library predicate as a doit `uptodate` callable. A task doit has no saved values
    for (never run here, or `doit forget`) is not up to date, whatever the records say."""
    return lambda task, values: bool(values) and fn()


def step(name: str, doc: str, run, is_current, task_dep=()) -> dict:
    """A task whose work is `run()` (a library call returning the values doit keeps) and whose
    up-to-date check is `is_current()`."""
    return {"name": name, "doc": doc, "actions": [action(run)], "uptodate": [check(is_current)],
            "task_dep": list(task_dep), "verbosity": 2}
