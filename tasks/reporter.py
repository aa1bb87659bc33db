"""doit's console output, plus a closing summary: what ran, what was up to date, who failed and why.

The reporter is also where a run starts and ends: `initialize` receives the tasks the
command selected (doit's own answer, no re-parsing of sys.argv), so the probes those
tasks need start at once in parallel; `complete_run` closes the run's connections.
It also starts the run's progress display (kiln/progress.py, on stderr) and counts the
selected deploys as they finish ("deploy 7/12 devices").
"""
from __future__ import annotations

import os
import sys
import threading
import time

from doit.exceptions import TaskFailed, UnmetDependency
from doit.reporter import ConsoleReporter

from kiln.errors import ResourceError
from kiln.pipeline.context import Context
from kiln.pipeline.fingerprints import probe_in_background


#: task groups that write artifacts (reports only read them, and need not wait for a running deploy)
WRITERS = ("checkpoint", "export", "fingerprint", "engine", "deploy")


def reporter_for(ctx: Context) -> type:
    class Reporter(SummaryReporter):
        context = ctx
    return Reporter


def selected_closure(tasks: dict, selected: list[str]) -> set[str]:
    """Every task a run of `selected` may execute (their task_dep closure)."""
    seen, todo = set(), list(selected)
    while todo:
        name = todo.pop()
        if name in seen or name not in tasks:
            continue
        seen.add(name)
        todo.extend(tasks[name].task_dep)
    return seen


class DependencyFailed(TaskFailed):
    """A task not run because a task it depends on failed (doit's UnmetDependency).

    doit counts UnmetDependency as an error (exit 2, like a bug), so `doit deploy` after a failed
    export would exit 2, the code enginekiln keeps for "nothing could start" (a wrong fleet
    file). doit's runner decides between 1 and 2 by the type of the failure right after handing
    it to the reporter; the reporter re-types an UnmetDependency whose dependencies all *failed*
    (TaskFailed, or this) so the run exits 1, "a task failed". One caused by a bug stays 2."""

    def get_name(self) -> str:
        return "UnmetDependency"


class SummaryReporter(ConsoleReporter):
    context: Context

    def __init__(self, outstream, options):
        super().__init__(outstream, options)
        self.failures_kind: dict[str, str] = {}  # task -> "failed" | "error", for DependencyFailed
        self.ran: list[str] = []
        self.uptodate: list[str] = []
        self.failed: dict[str, str] = {}
        self.started = time.time()
        self.deploys: set[str] = set()       # the selected deploy:<target> tasks
        self.deployed: dict[str, bool] = {}  # those finished (up to date, done or failed): ok?
        self.fleet_progress = None           # "deploy 7/12 devices", from the first deploy that runs
        self._fleet_lock = threading.Lock()  # `doit -n N` (threads) starts and ends deploys at once

    def initialize(self, tasks, selected_tasks):
        super().initialize(tasks, selected_tasks)
        will_run = selected_closure(tasks, selected_tasks)
        self.context.selected = will_run  # e.g. a group's rollout takes over its members' deploys
        if any(n.split(":")[0] in WRITERS for n in will_run):
            try:
                self.context.lock_artifacts(say=self.write_line)
            except ResourceError as exc:  # e.g. a full disk: nothing can run, as with an unwritable folder
                sys.stderr.write(f"enginekiln: {exc}\n")
                self.context.close()
                sys.stdout.flush()
                sys.stderr.flush()
                # nothing ran, so there is nothing to record; a SystemExit would still let doit rewrite
                # its state file in the same full folder (<artifacts>/.doit.db, rewritten in place: a
                # full disk would leave it truncated) and end with its traceback
                os._exit(2)
        wanted = {n.split(":", 1)[1] for n in will_run if n.startswith("fingerprint:")}
        probe_in_background(self.context, [t for n, t in self.context.fleet.targets.items() if n in wanted])
        self._start_progress(will_run)

    def _start_progress(self, will_run: set[str]) -> None:
        """The progress display picks its renderer now, before a task swaps sys.stderr; on a
        terminal, lines to stdout (doit's and the tasks') are routed around its live display."""
        progress = self.context.progress.start()
        progress.guard_streams()
        self.outstream = progress.guard(self.outstream)
        targets = self.context.fleet.targets
        self.deploys = {n for n in will_run if n.startswith("deploy:") and n.split(":", 1)[1] in targets}

    def _deploy_started(self, task) -> None:
        if task.name not in self.deploys or len(self.deploys) < 2:
            return
        with self._fleet_lock:  # one activity: a second one, never finished, would end as "failed"
            if self.fleet_progress is None:
                self.fleet_progress = self.context.progress.activity("deploy", total=len(self.deploys), unit="devices")
                self._count_deploys()

    def _deploy_finished(self, task, ok: bool) -> None:
        with self._fleet_lock:
            if task.name in self.deploys and task.name not in self.deployed:
                self.deployed[task.name] = ok
                self._count_deploys()

    def _count_deploys(self) -> None:
        if self.fleet_progress is None:
            return
        failed = sum(not ok for ok in self.deployed.values())
        if failed:
            self.fleet_progress.set_extra(f"{failed} failed")
        self.fleet_progress.update(len(self.deployed))
        if len(self.deployed) == len(self.deploys):
            self.fleet_progress.finish()

    def execute_task(self, task):
        # `--json`: stdout carries the document and nothing else, so doit's own lines (this one,
        # failures, the summary) go to stderr from here on
        if (task.options or {}).get("json_out"):
            self.outstream = sys.stderr
        super().execute_task(task)
        self._deploy_started(task)

    def write_line(self, line: str) -> None:
        self.write(line + "\n")
        self.outstream.flush()

    def add_success(self, task):
        self._deploy_finished(task, ok=True)
        if task.actions and task.name[0] != "_":
            self.ran.append(task.name)

    def skip_uptodate(self, task):
        super().skip_uptodate(task)
        self._deploy_finished(task, ok=True)
        if task.name[0] != "_":
            self.uptodate.append(task.name)

    def add_failure(self, task, fail):
        self._deploy_finished(task, ok=False)
        if type(fail) is UnmetDependency and all(self.failures_kind.get(n) == "failed" for n in fail.message.split()):
            fail.__class__ = DependencyFailed  # see DependencyFailed: exit 1, not 2
        self.failures_kind[task.name] = "failed" if isinstance(fail, TaskFailed) else "error"
        super().add_failure(task, fail)
        first = (fail.get_msg() or "").strip().splitlines()
        if ":" not in task.name and fail.get_name() == "UnmetDependency":
            return  # a group placeholder: its members are listed already
        if fail.get_name() == "UnmetDependency":
            self.failed[task.name] = f"not run: depends on failed {', '.join(first) or 'tasks'}"
        elif fail.traceback:  # a bug: its exception line, the traceback is printed above
            self.failed[task.name] = f"{(first[-1] if first else fail.get_name())} (a bug: traceback above)"
        else:
            self.failed[task.name] = first[0] if first else fail.get_name()

    def _why_this_run(self) -> dict[str, str]:
        """The last decision of each task in this run, from the event log."""
        return {e["task"]: f"{e['event']}: {e['why']}" for e in self.context.events.emitted
                if e["event"] not in ("skip", "fail")}

    def complete_run(self):
        try:
            self.context.progress.close()  # the live display ends before doit's report and the summary
            super().complete_run()
            self._summary()
        finally:
            self.context.close()

    def _engines_ensured_by_deploys(self) -> dict[str, str]:
        """Engines a deploy made sure of itself (a class first seen in this run has no engine task)."""
        out = {}
        for e in self.context.events.emitted:
            if e["task"].startswith("engine:") and e["task"] not in self.ran and e["event"] in ("cache-hit", "publish"):
                out[e["task"]] = f"{e['event']}: {e['why']}"
        return out

    def _summary(self) -> None:
        engines = self._engines_ensured_by_deploys()
        interesting = [n for n in self.ran + list(self.failed) if n.split(":")[0] in ("engine", "deploy", "export")]
        if not interesting and not self.failed and not engines:
            if self.uptodate:
                self.write(f"enginekiln: nothing to do, {len(self.uptodate)} tasks up to date "
                           f"({time.time() - self.started:.1f} s)\n")
            return
        self.write("\n== enginekiln summary " + "=" * 40 + "\n")
        self.write(f"ran {len(self.ran)}, up to date {len(self.uptodate)}, failed {len(self.failed)} "
                   f"in {time.time() - self.started:.1f} s\n")
        why = self._why_this_run()
        pending = {e["task"]: e["why"] for e in self.context.events.emitted if e.get("action") == "busy"}
        for name in self.ran:
            if name in pending:  # a busy device: not failed, nothing switched, the next run tries again
                self.write(f"  PENDING {name}: {pending[name]}\n")
            elif name.split(":")[0] in ("engine", "deploy", "export", "fingerprint"):
                self.write(f"  ok      {name}" + (f": {why[name]}" if name in why else "") + "\n")
        for name, decision in engines.items():
            self.write(f"  engine  {name}: {decision}\n")
        for name, reason in self.failed.items():
            self.write(f"  FAILED  {name}: {reason}\n")
        self.write(f"why each decision was taken: {self.context.events.path}\n")
