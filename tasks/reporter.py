"""doit's console output, plus a closing summary: what ran, what was up to date, who failed and why."""
from __future__ import annotations

import time

from doit.reporter import ConsoleReporter


class SummaryReporter(ConsoleReporter):
    def __init__(self, outstream, options):
        super().__init__(outstream, options)
        self.ran: list[str] = []
        self.uptodate: list[str] = []
        self.failed: dict[str, str] = {}
        self.started = time.time()

    def add_success(self, task):
        if task.actions and task.name[0] != "_":
            self.ran.append(task.name)

    def skip_uptodate(self, task):
        super().skip_uptodate(task)
        if task.name[0] != "_":
            self.uptodate.append(task.name)

    def add_failure(self, task, fail):
        super().add_failure(task, fail)
        first = (fail.get_msg() or "").strip().splitlines()
        if ":" not in task.name and fail.get_name() == "UnmetDependency":
            return  # a group placeholder: its members are listed already
        if fail.get_name() == "UnmetDependency":
            self.failed[task.name] = f"not run: depends on failed {', '.join(first) or 'tasks'}"
        else:
            self.failed[task.name] = first[0] if first else fail.get_name()

    @staticmethod
    def _why_this_run() -> dict[str, str]:
        """The last decision of each task in this run, from the event log."""
        from .common import CTX
        out = {}
        for e in CTX.events.emitted:
            if e["event"] not in ("skip", "fail"):
                out[e["task"]] = f"{e['event']}: {e['why']}"
        return out

    def complete_run(self):
        super().complete_run()
        interesting = [n for n in self.ran + list(self.failed) if n.split(":")[0] in ("engine", "deploy", "export")]
        if not interesting and not self.failed:
            if self.uptodate:
                self.write(f"enginekiln: nothing to do, {len(self.uptodate)} tasks up to date "
                           f"({time.time() - self.started:.1f} s)\n")
            return
        self.write("\n== enginekiln summary " + "=" * 40 + "\n")
        self.write(f"ran {len(self.ran)}, up to date {len(self.uptodate)}, failed {len(self.failed)} "
                   f"in {time.time() - self.started:.1f} s\n")
        why = self._why_this_run()
        for name in self.ran:
            if name.split(":")[0] in ("engine", "deploy", "export", "fingerprint"):
                self.write(f"  ok      {name}" + (f": {why[name]}" if name in why else "") + "\n")
        for name, why in self.failed.items():
            self.write(f"  FAILED  {name}: {why}\n")
        from .common import CTX
        self.write(f"why each decision was taken: {CTX.events.path}\n")
