"""A DistillationModule subclass that adds a hidden-state loss to the KD loss.

It overrides the two documented override points:

* ``run_student`` / ``run_teacher`` ask the models for their final hidden states as well as
  the logits (``TinyLlama(..., output_hidden=True)`` returns ``{"logits", "hidden"}``);
* ``compute_loss`` adds ``hidden_weight · MSE(projection(h_student), h_teacher)`` over the
  valid tokens to the KD loss. The projection maps the student's width to the teacher's; it is
  a trainable submodule, so the module's optimizer (built from ``trainable_parameters()``)
  trains it, and it is sharded with FSDP2 like the student under data parallelism.

Run it from the repository root with its own config:

    python -m lightning_kd fit --config examples/hidden_state.yaml
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_kd import DistillationModule, LossTerms


class HiddenStateDistillation(DistillationModule):
    """KD plus a hidden-state matching term.

    Args:
        student_dim: width of the student's hidden states.
        teacher_dim: width of the teacher's hidden states.
        hidden_weight: weight of the hidden-state MSE term (per-token mean).
        **kwargs: everything :class:`~lightning_kd.DistillationModule` takes.
    """

    def __init__(
        self, *args: Any, student_dim: int, teacher_dim: int, hidden_weight: float = 0.1,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        if hidden_weight < 0:
            raise ValueError(f"hidden_weight must be >= 0, got {hidden_weight!r}.")
        self.hidden_weight = hidden_weight
        self.projection = nn.Linear(student_dim, teacher_dim, bias=False)

    def run_student(self, batch):
        return self.student(batch["input_ids"], output_hidden=True)

    def run_teacher(self, batch):
        return self.teacher(batch["input_ids"], output_hidden=True)

    def compute_loss(self, student_output, teacher_output, batch) -> LossTerms:
        terms = super().compute_loss(student_output, teacher_output, batch)
        valid = terms.valid_mask
        diff = self.projection(student_output["hidden"]) - teacher_output["hidden"]
        mse = diff.pow(2).mean(-1)[valid].mean() if valid.any() else diff.sum() * 0
        self.log("train/hidden_mse", mse.detach(), on_step=True)
        return terms._replace(loss=terms.loss + self.hidden_weight * mse)


__all__ = ["HiddenStateDistillation"]

if __name__ == "__main__":  # pragma: no cover - a smoke run without the CLI
    torch.manual_seed(0)
    from lightning_kd import TinyLlama

    module = HiddenStateDistillation(
        TinyLlama(vocab_size=64, dim=32), TinyLlama(vocab_size=64, dim=64),
        student_dim=32, teacher_dim=64,
    )  # fmt: skip
    ids = torch.randint(0, 64, (2, 16))
    batch = {"input_ids": ids, "labels": ids}
    print(module.compute_loss(module.run_student(batch), module.run_teacher(batch), batch).loss)
