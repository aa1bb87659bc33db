"""cache-check and status: reports that build nothing and need no device."""
from __future__ import annotations

import json
from pathlib import Path

from doit.exceptions import TaskFailed

from kiln.errors import KilnError
from kiln.pipeline.context import Context
from kiln.pipeline.reports import (cache_json, cache_junit, cache_ok, cache_report, fleet_status,
                                   format_cache_table, format_status)

JSON_PARAM = {"name": "json_out", "long": "json", "type": bool, "default": False,
              "help": "print a machine-readable JSON report (and nothing else) on stdout"}


def _cache_check(ctx: Context, json_out: bool, junit: str):
    try:
        rows = cache_report(ctx)
    except KilnError as exc:
        return TaskFailed(str(exc))
    print(cache_json(rows, ctx.fleet.store_url) if json_out else format_cache_table(rows))
    if junit:
        Path(junit).write_text(cache_junit(rows))
    for r in rows:
        ctx.events.emit("cache-check", "cache-hit" if r.status == "hit" else "skip", key=r.key,
                        target=",".join(r.targets), why=f"{r.model}@{r.hardware_class}: {r.status}; {r.why}")
    if not cache_ok(rows):
        return TaskFailed(f"{sum(r.status != 'hit' for r in rows)} engine(s) missing from {ctx.fleet.store_url}")
    return None


def cache_check_task(ctx: Context) -> dict:
    return {"basename": "cache-check", "actions": [lambda json_out, junit: _cache_check(ctx, json_out, junit)],
            "uptodate": [False], "verbosity": 2,
            "params": [JSON_PARAM, {"name": "junit", "long": "junit", "type": str, "default": "",
                                    "help": "also write a JUnit XML report to this path"}]}


def _status(ctx: Context, json_out: bool):
    try:
        rows = fleet_status(ctx)
    except KilnError as exc:
        return TaskFailed(str(exc))
    print(json.dumps(rows, indent=2, sort_keys=True) if json_out else format_status(rows))
    return None


def status_task(ctx: Context) -> dict:
    return {"basename": "status", "actions": [lambda json_out: _status(ctx, json_out)], "uptodate": [False],
            "verbosity": 2, "params": [JSON_PARAM]}


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
    return {"basename": "report", "actions": [lambda live: _report_page(ctx, live)], "uptodate": [False],
            "verbosity": 2, "params": [LIVE_PARAM]}
