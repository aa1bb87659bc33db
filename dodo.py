"""enginekiln: `doit list` to see the tasks, `doit deploy:<target>` to ship. See README.md."""
import os

from tasks import *  # noqa: F401,F403  (task creators)
from tasks.reporter import SummaryReporter

_artifacts = os.environ.get("KILN_ARTIFACTS", "artifacts")
os.makedirs(_artifacts, exist_ok=True)

DOIT_CONFIG = {
    "default_tasks": ["deploy"],
    "dep_file": os.path.join(_artifacts, ".doit.db"),
    "backend": "json",
    "continue": True,          # like make -k: one failing device does not stop the fleet
    "par_type": "thread",      # `doit -n N` shares one SSH connection per device
    "reporter": SummaryReporter,
}
