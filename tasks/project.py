"""What dodo.py hands to doit: the fleet file, read once, and the task creators.

Loading reads the fleet file and nothing else: no connection, no thread, no probe.
A bad fleet file or an unusable artifacts folder stops here with a clear message
(exit 2), never a traceback.
"""
from __future__ import annotations

import sys

from kiln.config import check_artifacts
from kiln.errors import ConfigError
from kiln.pipeline.context import Context

from . import control, export, fleet, report
from .common import setup_logging
from .reporter import reporter_for


class Project:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    @classmethod
    def load(cls) -> "Project":
        try:
            ctx = Context.load()
            check_artifacts(ctx.artifacts)
        except ConfigError as exc:
            print(f"enginekiln: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        setup_logging()
        return cls(ctx)

    def doit_config(self) -> dict:
        return {
            "default_tasks": ["deploy"],
            "dep_file": str(self.ctx.artifacts / ".doit.db"),
            "backend": "json",
            "continue": True,        # like make -k: one failing device does not stop the fleet
            "par_type": "thread",    # `doit -n N` shares one SSH connection per device
            "reporter": reporter_for(self.ctx),
        }

    # doit finds task creators by their `task_` names; each one only builds dicts.
    def task_checkpoint(self):
        """Create demo checkpoints (models with `seed`) when they are missing."""
        yield from export.checkpoint_tasks(self.ctx)

    def task_export(self):
        """PyTorch checkpoint -> checked ONNX + reference outputs, published to the store."""
        yield from export.export_tasks(self.ctx)

    def task_fingerprint(self):
        """Probe targets (CPU ISA, GPU, L4T/JetPack, TensorRT, CUDA, cuDNN, ...)."""
        yield from fleet.fingerprint_tasks(self.ctx)

    def task_engine(self):
        """Engines per (model, hardware class) for the classes recorded so far."""
        yield from fleet.engine_tasks(self.ctx)

    def task_deploy(self):
        """Deploy to a target or a group: its engines (store, else built on one of its class), then activate."""
        yield from fleet.deploy_tasks(self.ctx)

    def task_cache_check(self):
        """Is every (model, target) engine in the store for the recorded fingerprints? Exit 1 if not."""
        return report.cache_check_task(self.ctx)

    def task_rollback(self):
        """Switch a target back to its previous releases and hold them there until unpin or a new engine."""
        yield from control.rollback_tasks(self.ctx)

    def task_unpin(self):
        """End the holds a rollback left; the next deploy activates the wanted engines."""
        yield from control.unpin_tasks(self.ctx)

    def task_status(self):
        """What each device actually runs against what it should: state, drift, holds, pins (--offline: records)."""
        return report.status_task(self.ctx)

    def task_report(self):
        """Write <artifacts>/report/index.html: fleet, classes, engines, task graph, recent events (--live: ask devices)."""
        return report.report_page_task(self.ctx)
