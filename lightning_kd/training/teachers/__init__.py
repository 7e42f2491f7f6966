"""The kinds of teacher ``DistillationModule`` distils from, one class each behind one interface.

- :class:`TeacherBackend` (``base.py``): the interface, and how to add a kind (one new file
  plus its tests; pass an instance as ``DistillationModule(teacher_backend=...)``).
- :class:`LiveTeacher` (``live.py``): a frozen model run on every batch, compared on logits.
- :class:`FusedHeadTeacher` (``fused.py``): the same with both lm_heads fused into the loss
  (``fused_head=True``): no ``[N, V]`` logits.
- :class:`CacheTeacher` (``cached.py``): a teacher cache (``teacher_cache=DIR``), no model.
- :class:`ServedTeacher` (``served.py``): a teacher served by vLLM (its top-k per position),
  no model in process (``teacher_backend=ServedTeacher(url=...)``).

:func:`select_teacher` maps the module's constructor arguments to one of them.
"""

from __future__ import annotations

from typing import Any

from lightning_kd.training.teacher import TeacherSource
from lightning_kd.training.teachers.base import TeacherBackend, run_model
from lightning_kd.training.teachers.cached import CacheTeacher
from lightning_kd.training.teachers.fused import FusedHeadTeacher
from lightning_kd.training.teachers.live import LiveTeacher
from lightning_kd.training.teachers.served import ServedTeacher


def select_teacher(
    teacher: Any,
    teacher_cache: str | None,
    teacher_checkpoint: str | None,
    teacher_checkpoint_prefix: str,
    fused_head: bool,
    teacher_backend: TeacherBackend | None = None,
) -> TeacherBackend:
    """The backend for ``DistillationModule``'s teacher arguments: exactly one of a model (or
    factory), a cache directory and a backend, and nothing that needs another.

    Raises:
        ValueError: for none or several of them, ``teacher_checkpoint`` or ``fused_head``
            with a teacher cache, a ``teacher_backend`` that is not one, or
            ``fused_head=True`` with a backend that does not fuse the heads.
    """
    given = [x is not None for x in (teacher, teacher_cache, teacher_backend)]
    if sum(given) != 1:
        raise ValueError(
            "DistillationModule needs exactly one of teacher (a model or factory) and "
            "teacher_cache (a directory), or a teacher_backend, got "
            f"teacher={type(teacher).__name__}, teacher_cache={teacher_cache!r}, "
            f"teacher_backend={type(teacher_backend).__name__}."
        )
    if teacher_cache is not None and teacher_checkpoint is not None:
        raise ValueError("teacher_checkpoint has no use with teacher_cache (no teacher is built).")
    if teacher_cache is not None and fused_head:
        raise ValueError(
            "fused_head=True needs the teacher's lm_head; a teacher cache has none. Use "
            "fused_head=False with teacher_cache."
        )
    if teacher_backend is not None:
        if not isinstance(teacher_backend, TeacherBackend):
            raise ValueError(
                "teacher_backend must be a TeacherBackend (lightning_kd.training.teachers), "
                f"got {type(teacher_backend).__name__}."
            )
        if teacher_checkpoint is not None:
            raise ValueError(
                "teacher_checkpoint is for teacher=; a teacher_backend loads its own weights."
            )
        if fused_head and not teacher_backend.fused_head:
            raise ValueError(
                f"fused_head=True but the {type(teacher_backend).__name__} backend does not "
                "fuse the heads; leave fused_head at its default with a teacher_backend."
            )
        return teacher_backend
    if teacher_cache is not None:
        return CacheTeacher(teacher_cache)
    source = TeacherSource(teacher, teacher_checkpoint, teacher_checkpoint_prefix)
    return FusedHeadTeacher(source) if fused_head else LiveTeacher(source)


__all__ = [
    "CacheTeacher",
    "FusedHeadTeacher",
    "LiveTeacher",
    "ServedTeacher",
    "TeacherBackend",
    "run_model",
    "select_teacher",
]
