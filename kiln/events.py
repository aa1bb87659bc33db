"""The audit trail: one JSON line per decision in <artifacts>/logs/events.jsonl.

`{"ts", "task", "event", "key", "target", "why", "seconds"}` — so a run can answer
"why did orin-03 rebuild?". Lines are appended with O_APPEND in one write, so
concurrent tasks never interleave within a line.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

EVENTS = ("export", "probe", "cache-hit", "build", "publish", "deploy", "rollback", "skip", "fail")
log = logging.getLogger(__name__)


class EventLog:
    def __init__(self, path: Path | str, run: str | None = None) -> None:
        self.path = Path(path)
        self.run = run  # recorded with each event, so one run's decisions can be picked out
        self.emitted: list[dict] = []  # this process's events, for the closing summary

    def emit(self, task: str, event: str, *, why: str, key: str | None = None,
             target: str | None = None, seconds: float | None = None, **extra) -> dict:
        assert event in EVENTS, event
        record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "task": task, "event": event, "key": key,
                  "target": target, "why": why,
                  "seconds": round(seconds, 3) if seconds is not None else None, "run": self.run, **extra}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, sort_keys=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        self.emitted.append(record)
        log.debug("%s %s: %s", task, event, why)
        return record

    def read(self) -> list[dict]:
        try:
            return [json.loads(l) for l in self.path.read_text().splitlines() if l.strip()]
        except FileNotFoundError:
            return []
