"""cache-check and status: reports. Machine output is a document: with `--json` stdout carries
the JSON and nothing else (the reporter sends doit's own lines to stderr, see reporter.py), or
`--json-out PATH` writes it to a file (atomically) beside the human table on stdout."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from doit.exceptions import TaskError, TaskFailed

from kiln.errors import KilnError, StoreError
from kiln.files import atomic_write
from kiln.pipeline.context import Context
from kiln.pipeline.reports import cache_json, cache_junit, cache_ok, cache_report, format_cache_table
from kiln.pipeline.status import fleet_status, format_status, print_status_table

from .common import action  # a full disk or read-only folder: one line, not a traceback

JSON_PARAM = {"name": "json_out", "long": "json", "type": bool, "default": False,
              "help": "print a machine-readable JSON report (and nothing else) on stdout"}
JSON_FILE_PARAM = {"name": "json_path", "long": "json-out", "type": str, "default": "",
                   "help": "also write the JSON report to this file"}
MACHINE_PARAMS = [JSON_PARAM, JSON_FILE_PARAM]


def machine_output(options: dict) -> bool:
    """Does this task's stdout carry a document (so doit's own lines must go to stderr)?"""
    return bool(options.get("json_out"))


def _emit(document: str, human: str, json_out: bool, json_path: str) -> None:
    if json_path:
        atomic_write(Path(json_path), document + "\n")
    sys.stdout.write((document if json_out else human) + "\n")
    sys.stdout.flush()


def _cache_check(ctx: Context, json_out: bool, json_path: str, junit: str):
    try:
        rows = cache_report(ctx)
    except StoreError as exc:  # exit 2: could not check, which is not a miss
        reason = exc.message + (f" (fix: {exc.hint})" if exc.hint else "")
        if json_out or json_path:
            _emit(json.dumps({"ok": False, "checked": False, "store": ctx.fleet.store_url, "error": reason,
                              "engines": []}, indent=2, sort_keys=True), "", json_out, json_path)
        return TaskError(f"could not check the store {ctx.fleet.store_url}: {reason}")
    except KilnError as exc:
        return TaskError(str(exc))
    _emit(cache_json(rows, ctx.fleet.store_url), format_cache_table(rows), json_out, json_path)
    if junit:
        atomic_write(Path(junit), cache_junit(rows))
    for r in rows:
        ctx.events.emit("cache-check", "cache-hit" if r.status == "hit" else "skip", key=r.key,
                        target=",".join(r.targets), why=f"{r.model}@{r.hardware_class}: {r.status}; {r.why}")
    if not cache_ok(rows):
        return TaskFailed(f"{sum(r.status != 'hit' for r in rows)} engine(s) missing from {ctx.fleet.store_url}")
    return None


def cache_check_task(ctx: Context) -> dict:
    return {"basename": "cache-check",
            "doc": "is every engine in the store? exit 0 all present, 1 something missing, 2 could not check",
            "actions": [action(lambda json_out, json_path, junit: _cache_check(ctx, json_out, json_path, junit))],
            "uptodate": [False], "verbosity": 2,
            "params": MACHINE_PARAMS + [{"name": "junit", "long": "junit", "type": str, "default": "",
                                         "help": "also write a JUnit XML report to this path"}]}


def _status(ctx: Context, json_out: bool, json_path: str, offline: bool):
    try:
        rows = fleet_status(ctx, offline=offline)
    except KilnError as exc:
        return TaskFailed(str(exc))
    document = json.dumps({"source": "records" if offline else "devices", "rows": rows}, indent=2, sort_keys=True)
    if not json_out and sys.stdout.isatty():
        if json_path:
            atomic_write(Path(json_path), document + "\n")
        print_status_table(rows, sys.stdout)
    else:
        _emit(document, format_status(rows), json_out, json_path)
    return None


def status_task(ctx: Context) -> dict:
    return {"basename": "status", "doc": "what each device actually runs vs what it should (--offline: records only)",
            "actions": [action(lambda json_out, json_path, offline: _status(ctx, json_out, json_path, offline))],
            "uptodate": [False], "verbosity": 2,
            "params": MACHINE_PARAMS + [{"name": "offline", "long": "offline", "type": bool, "default": False,
                                         "help": "use this controller's records; contact no device"}]}


LIVE_PARAM = {"name": "live", "long": "live", "type": bool, "default": False,
              "help": "read the active releases from the devices (default: records only, no device contacted)"}


def _report_page(ctx: Context, live: bool):
    from kiln.pipeline.report_page import write_report
    try:
        path = write_report(ctx, live=live)
    except KilnError as exc:
        return TaskFailed(str(exc))
    print(path.resolve().as_uri())
    return None


def report_page_task(ctx: Context) -> dict:
    """`doit report`: <artifacts>/report/index.html. A report: it takes no artifacts lock (tasks/reporter.py)."""
    return {"basename": "report", "actions": [action(lambda live: _report_page(ctx, live))], "uptodate": [False],
            "verbosity": 2, "params": [LIVE_PARAM]}
