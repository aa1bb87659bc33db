"""Glue shared by the task creators: the run context, action wrapping, logging.

Task creators only build dicts; the work happens in kiln's functions, called
from actions. A KilnError inside an action becomes a doit TaskFailed (the work
said no, with a clear message); anything else is a TaskError (a bug).
"""
from __future__ import annotations

import functools
import logging
import sys

from doit.exceptions import TaskFailed

from kiln.pipeline.context import Context
from kiln.errors import ConfigError, KilnError


def _load_context() -> Context:
    try:
        return Context.load()
    except ConfigError as exc:
        # before any work starts, and without a traceback: the message says what to fix
        print(f"enginekiln: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


CTX = _load_context()


def _setup_logging() -> None:
    root = logging.getLogger("kiln")
    if root.handlers:
        return
    root.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("kiln: %(levelname)s: %(message)s"))
    root.addHandler(console)


_setup_logging()


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
