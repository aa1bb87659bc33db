"""doit task creators: turn the fleet file and library calls into task dicts (see project.py)."""
from .project import Project  # noqa: F401
