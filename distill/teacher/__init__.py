"""Teachers: what they return (TopKTeacher) and where they run (local, Ray service, cache).

Only ``distill.teacher.output`` is imported here; the Ray service imports ray itself, on use.
"""

from distill.teacher.output import TopKTeacher

__all__ = ["TopKTeacher"]
