"""Teachers: what they return (TopKTeacher) and where they run (local, Ray service, cache).

Only light modules are imported here (torch-only dataclasses); the Ray service
(``distill.teacher.ray_service``) imports ray itself, and ``distill.teacher.local`` transformers, on use.
"""

from distill.teacher.output import TopKTeacher
from distill.teacher.pipeline import Generation, SamplingParams, TeacherUnavailable

__all__ = ["TopKTeacher", "SamplingParams", "Generation", "TeacherUnavailable"]
