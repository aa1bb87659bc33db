"""doit task creators. `dodo.py` imports everything from here."""
from .export import task_checkpoint, task_export  # noqa: F401
from .fingerprint import task_fingerprint  # noqa: F401
from .fleet import task_fleet  # noqa: F401
from .report import task_cache_check, task_status  # noqa: F401
