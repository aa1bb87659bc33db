"""cache-check and status: reports that build nothing and need no device."""
from __future__ import annotations

import json
from pathlib import Path

from doit.exceptions import TaskFailed

from kiln.errors import KilnError
from kiln.pipeline.reports import (cache_json, cache_junit, cache_ok, cache_report, fleet_status, format_cache_table,
                         format_status)

from .common import CTX


def _cache_check(json_out: bool, junit: str):
    try:
        rows = cache_report(CTX)
    except KilnError as exc:
        return TaskFailed(str(exc))
    print(cache_json(rows, CTX.fleet.store_url) if json_out else format_cache_table(rows))
    if junit:
        Path(junit).write_text(cache_junit(rows))
    for r in rows:
        CTX.events.emit("cache-check", "cache-hit" if r.status == "hit" else "skip", key=r.key,
                        target=",".join(r.targets), why=f"{r.model}@{r.hardware_class}: {r.status}; {r.why}")
    if not cache_ok(rows):
        return TaskFailed(f"{sum(r.status != 'hit' for r in rows)} engine(s) missing from {CTX.fleet.store_url}")
    return None


def task_cache_check():
    """Is every (model, target) engine in the store for the recorded fingerprints? Exit 1 if not."""
    return {"basename": "cache-check", "actions": [_cache_check], "uptodate": [False], "verbosity": 2,
            "params": [{"name": "json_out", "long": "json", "type": bool, "default": False,
                        "help": "print a machine-readable JSON report"},
                       {"name": "junit", "long": "junit", "type": str, "default": "",
                        "help": "also write a JUnit XML report to this path"}]}


def _status(json_out: bool):
    try:
        rows = fleet_status(CTX)
    except KilnError as exc:
        return TaskFailed(str(exc))
    print(json.dumps(rows, indent=2, sort_keys=True) if json_out else format_status(rows))
    return None


def task_status():
    """Fleet table: hardware class, engine key, deployed release, drift, and why a rebuild would happen."""
    return {"actions": [_status], "uptodate": [False], "verbosity": 2,
            "params": [{"name": "json_out", "long": "json", "type": bool, "default": False,
                        "help": "print a machine-readable JSON report"}]}
