"""enginekiln: `doit list` to see the tasks, `doit deploy:<target>` to ship. See README.md."""
from tasks import Project

project = Project.load()  # reads the fleet file (KILN_TARGETS); exits 2 with a clear message if it is wrong

task_checkpoint = project.task_checkpoint
task_export = project.task_export
task_fingerprint = project.task_fingerprint
task_engine = project.task_engine
task_deploy = project.task_deploy
task_cache_check = project.task_cache_check
task_status = project.task_status
task_rollback = project.task_rollback
task_unpin = project.task_unpin
task_report = project.task_report

DOIT_CONFIG = project.doit_config()
