"""``VocabMap``: which student and teacher token ids carry the same token string.

The hybrid cross-tokenizer loss compares the teacher's and the student's distributions
directly on the tokens both vocabularies hold. Build one from each tokenizer's token strings
(:func:`lightning_kd.data.alignment.shared_token_ids`) or with :meth:`VocabMap.identity` for
one tokenizer shared by both models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class VocabMap:
    """The token ids two vocabularies share.

    Args:
        student_ids: student ids of the shared tokens (distinct).
        teacher_ids: the teacher id of each (distinct, same length).
        student_vocab_size: ``V_s``.
        teacher_vocab_size: ``V_t``.

    Raises:
        ValueError: for lists of different lengths, repeated ids or ids outside the vocabularies.
    """

    def __init__(
        self,
        student_ids: Sequence[int] | Tensor,
        teacher_ids: Sequence[int] | Tensor,
        student_vocab_size: int,
        teacher_vocab_size: int,
    ) -> None:
        s = torch.as_tensor(student_ids, dtype=torch.int64).reshape(-1)
        t = torch.as_tensor(teacher_ids, dtype=torch.int64).reshape(-1)
        if s.shape != t.shape:
            raise ValueError(
                f"student_ids and teacher_ids must pair up, got {s.numel()} and {t.numel()} ids."
            )
        for name, ids, size in (
            ("student", s, student_vocab_size),
            ("teacher", t, teacher_vocab_size),
        ):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
                raise ValueError(f"{name}_ids must lie in [0, {size}).")
            if ids.unique().numel() != ids.numel():
                raise ValueError(f"{name}_ids must be distinct.")
        self.student_ids, self.teacher_ids = s, t
        self.student_vocab_size, self.teacher_vocab_size = student_vocab_size, teacher_vocab_size
        self.teacher_to_student = torch.full((teacher_vocab_size,), -1, dtype=torch.int64)
        self.teacher_to_student[t] = s
        self.is_identity = (
            student_vocab_size == teacher_vocab_size == s.numel()
            and bool((s == torch.arange(s.numel())).all())
            and bool((t == s).all())
        )
        self._on: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    @classmethod
    def identity(cls, vocab_size: int) -> VocabMap:
        """One vocabulary shared by both models."""
        ids = torch.arange(vocab_size)
        return cls(ids, ids, vocab_size, vocab_size)

    def on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``(student_ids, teacher_ids, teacher_to_student)`` on ``device`` (cached)."""
        if device not in self._on:
            self._on[device] = (
                self.student_ids.to(device),
                self.teacher_ids.to(device),
                self.teacher_to_student.to(device),
            )
        return self._on[device]

    @property
    def num_shared(self) -> int:
        return int(self.student_ids.numel())

    def __repr__(self) -> str:
        return (
            f"VocabMap(shared={self.num_shared}, student_vocab={self.student_vocab_size}, "
            f"teacher_vocab={self.teacher_vocab_size})"
        )
