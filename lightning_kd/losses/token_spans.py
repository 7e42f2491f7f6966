"""Aligned spans of student and teacher logit rows: the input of the cross-tokenizer losses.

A student and a teacher with different tokenizers predict different tokens for the same text.
An aligned span pairs a run of student rows with a run of teacher rows that predict the same
characters (see :mod:`lightning_kd.data.alignment`, which finds them). Rows are indices into the
flattened leading dims of the logits (``[B, S, V]`` → row ``b · S + s``); row ``r`` predicts
the token ``labels[r]``. Spans are disjoint, and each row of a span is valid (its label is a
vocabulary id).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class TokenSpans(NamedTuple):
    """``K`` aligned spans; each field is a [K] int64 tensor.

    Attributes:
        student_start: first student row of each span (flattened row index).
        student_len: number of student rows of each span (>= 1).
        teacher_start: first teacher row of each span.
        teacher_len: number of teacher rows of each span (>= 1).
    """

    student_start: Tensor
    student_len: Tensor
    teacher_start: Tensor
    teacher_len: Tensor

    @classmethod
    def from_rows(
        cls,
        spans: Sequence[Sequence[tuple[int, int, int, int]]],
        student_seq_len: int,
        teacher_seq_len: int,
        device: torch.device | str | None = None,
    ) -> TokenSpans:
        """Spans of a batch from each example's ``(s_start, s_stop, t_start, t_stop)`` row
        ranges (rows of that example, stop exclusive).

        Args:
            spans: one list of row ranges per example of the batch.
            student_seq_len: the student logits' sequence length ``S`` (rows per example).
            teacher_seq_len: the teacher's.
            device: where the tensors go.

        Raises:
            ValueError: for an empty or out-of-range range.
        """
        fields: list[list[int]] = [[], [], [], []]
        for b, example in enumerate(spans):
            for s0, s1, t0, t1 in example:
                if not (0 <= s0 < s1 <= student_seq_len and 0 <= t0 < t1 <= teacher_seq_len):
                    raise ValueError(
                        f"span {(s0, s1, t0, t1)} of example {b} must hold rows of both sides "
                        f"inside [0, {student_seq_len}) and [0, {teacher_seq_len})."
                    )
                fields[0].append(b * student_seq_len + s0)
                fields[1].append(s1 - s0)
                fields[2].append(b * teacher_seq_len + t0)
                fields[3].append(t1 - t0)
        return cls(*(torch.tensor(f, dtype=torch.int64, device=device) for f in fields))

    @property
    def num_spans(self) -> int:
        return int(self.student_start.numel())

    def to(self, device: torch.device | str) -> TokenSpans:
        return TokenSpans(*(t.to(device) for t in self))


def check_spans(spans: TokenSpans, student_rows: int, teacher_rows: int) -> None:
    """Raise ``ValueError`` unless ``spans`` are [K] integer tensors of spans of at least one
    row each, inside ``student_rows`` / ``teacher_rows``, disjoint on each side."""
    if not isinstance(spans, TokenSpans):
        raise ValueError(f"spans must be a TokenSpans, got {type(spans).__name__}.")
    k = spans.student_start.shape
    for name, t in zip(spans._fields, spans, strict=True):
        if not isinstance(t, Tensor) or t.ndim != 1 or t.shape != k:
            raise ValueError(f"spans.{name} must be a 1-D tensor of {tuple(k)} elements.")
        if t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"spans.{name} must be an integer tensor, got {t.dtype}.")
    for side, start, length, rows in (
        ("student", spans.student_start, spans.student_len, student_rows),
        ("teacher", spans.teacher_start, spans.teacher_len, teacher_rows),
    ):
        if k[0] == 0:
            continue
        if (
            bool((length < 1).any())
            or bool((start < 0).any())
            or int((start + length).max()) > rows
        ):
            raise ValueError(
                f"every {side} span must hold at least one row inside the {rows} rows of the "
                f"{side} logits."
            )
        cover = torch.zeros(rows + 1, dtype=torch.int64, device=start.device)
        cover.index_add_(0, start, torch.ones_like(start))
        cover.index_add_(0, start + length, -torch.ones_like(start))
        if bool((cover.cumsum(0) > 1).any()):
            raise ValueError(f"{side} spans must be disjoint; two spans share a row.")


def span_rows(start: Tensor, length: Tensor) -> tuple[Tensor, Tensor]:
    """``(rows, owner)``: every row after the first of each span (the chained rows) and the
    index of its span, in span order. [M] int64 each."""
    extra = length - 1
    owner = torch.repeat_interleave(torch.arange(start.numel(), device=start.device), extra)
    first_of_owner = torch.cumsum(extra, 0) - extra
    step = torch.arange(owner.numel(), device=start.device) - first_of_owner[owner] + 1
    return start[owner] + step, owner
