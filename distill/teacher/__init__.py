"""Teachers: what they return (TopKTeacher, defined with the losses that take it:
``distill.losses.teacher_output``) and where they run (local, Ray service, cache).

Only light modules are imported here (torch-only dataclasses); the Ray service
(``distill.teacher.ray_service``) imports ray itself, and ``distill.teacher.local`` transformers, on use.
"""

from distill.losses.teacher_output import TopKTeacher
from distill.teacher.pipeline import Generation, SamplingParams, TeacherUnavailable

__all__ = ["TopKTeacher", "SamplingParams", "Generation", "TeacherUnavailable"]
