"""Reconcile the teacher's and the student's vocabularies before distillation.

Token-level distillation compares distributions over one vocabulary. Different tokenizers are
refused; lm_heads padded to different widths (common in Hugging Face checkpoints) are cut to the
shared vocabulary with the models' ``restrict_vocab``.
"""

from __future__ import annotations

from torch import nn

from lightning_kd.models.contract import SupportsVocabulary, lm_head_width, tokenizer_vocab


def reconcile_vocabularies(
    student: nn.Module, teacher: nn.Module, shared_vocab_size: int | None = None
) -> None:
    """Refuse different tokenizers; restrict padded lm_heads to the shared vocabulary.

    Args:
        student: the student model.
        teacher: the teacher model.
        shared_vocab_size: the size of the common vocabulary; default the size of the
            tokenizer either model carries.

    Raises:
        ValueError: for different tokenizers, unknown shared size with different widths, a
            shared size beyond a head's width, or a wider model without ``restrict_vocab``.
    """
    models = {"student": student, "teacher": teacher}
    vocabs = [tokenizer_vocab(m) for m in models.values()]
    if all(v is not None for v in vocabs) and dict(vocabs[0]) != dict(vocabs[1]):
        raise ValueError(
            "teacher and student use different tokenizers (their vocabularies differ); "
            "token-level distillation needs one shared tokenizer."
        )
    widths = [lm_head_width(m) for m in models.values()]
    if None in widths or (widths[0] == widths[1] and shared_vocab_size is None):
        return
    shared = shared_vocab_size
    known = [v for v in vocabs if v is not None]
    if shared is None and known:  # either model's tokenizer (they agree when both exist)
        shared = len(known[0])
    if shared is None:
        raise ValueError(
            f"student and teacher lm_heads differ in width ({widths[0]} vs {widths[1]}); "
            "set shared_vocab_size to the size of their common tokenizer."
        )
    if shared > min(widths):
        raise ValueError(
            f"shared_vocab_size={shared} exceeds an lm_head width ({widths[0]}, {widths[1]})."
        )
    for (role, model), width in zip(models.items(), widths, strict=True):
        if width > shared:
            if not isinstance(model, SupportsVocabulary):
                raise ValueError(
                    f"the {role} has {width} vocabulary rows but distillation uses "
                    f"{shared}; it needs a restrict_vocab(size) method to drop the rest."
                )
            model.restrict_vocab(shared)
