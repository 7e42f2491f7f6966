"""Plain float64 autograd references the fast paths are tested against."""

from __future__ import annotations

import torch
from torch import Tensor


def assert_rel(
    actual: Tensor, expected: Tensor, rel: float, what: str, scale: float | None = None,
    atol: float = 0.0,
) -> None:  # fmt: skip
    """Max absolute error within ``rel`` times ``scale`` (default: the largest expected
    magnitude) plus ``atol``, compared in float64."""
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item() if scale is None else float(scale)
    assert err <= rel * max(scale, 1e-30) + atol, f"{what}: max err {err:.3g}, scale {scale:.3g}"


def per_token_forward_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)) per row, in float64, with 0·log 0 = 0 (NaN inputs
    stay NaN)."""
    log_q = torch.log_softmax(student.double() / temperature, -1)
    log_p = torch.log_softmax(teacher.double() / temperature, -1)
    p = log_p.exp()
    terms = torch.where(p == 0, torch.zeros_like(p), p * (log_p - log_q))
    return terms.sum(-1) * temperature**2


def per_token_reverse_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T² · KL(softmax(s/T) ‖ softmax(t/T)) per row, in float64."""
    return per_token_forward_kl(teacher, student, temperature)


def kd_loss_reference(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    num_batch_labels: float | None = None,
    ignore_index: int = -100,
    per_token=per_token_forward_kl,
) -> Tensor:
    """The loss KDLoss must equal: Σ over valid tokens / (valid count or num_batch_labels)."""
    kl = per_token(student, teacher, temperature)
    valid = labels != ignore_index
    denom = num_batch_labels if num_batch_labels is not None else max(int(valid.sum()), 1)
    return torch.where(valid, kl, torch.zeros_like(kl)).sum() / denom


def reference_with_grad(student: Tensor, teacher: Tensor, labels: Tensor, **kwargs):
    """(loss, d loss / d student) of :func:`kd_loss_reference`, both float64."""
    s = student.detach().double().requires_grad_()
    loss = kd_loss_reference(s, teacher.detach().double(), labels, **kwargs)
    loss.backward()
    return loss.detach(), s.grad
