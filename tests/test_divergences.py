"""KDLoss's divergences and the cross-entropy mix, on one process, against float64 references.

The references below are written plainly, in float64 autograd, from the definitions (with
``P = softmax(t / T)``, ``Q = softmax(s / T)``, every divergence multiplied by ``T²``):

* forward KL: KL(P ‖ Q); reverse KL: KL(Q ‖ P);
* JSD(β): TRL's ``generalized_jsd_loss``: β = 0 is KL(P ‖ Q), β = 1 is KL(Q ‖ P), otherwise
  ``β KL(P ‖ M) + (1 − β) KL(Q ‖ M)`` with ``log M = logsumexp(log P + log β, log Q + log(1 − β))``;
* TVD: ½ Σ |P − Q|;
* skew KL(α): KL(P ‖ α P + (1 − α) Q); skew reverse KL(α): KL(Q ‖ α Q + (1 − α) P) (DistiLLM);
* ``loss = kd_ratio · Σ div + (1 − kd_ratio) · Σ CE`` over valid tokens, over their count or
  ``num_batch_labels``; CE is ``F.cross_entropy`` of the student at temperature 1.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_kd import KDLoss, KDLossOutput
from lightning_kd.losses import (
    DIVERGENCES,
    JSD,
    TVD,
    Divergence,
    ForwardKL,
    ReverseKL,
    SkewKL,
    SkewReverseKL,
    engine,
    resolve_divergence,
)
from lightning_kd.losses.divergences import row_sum_of_products
from tests.helpers.reference import assert_rel

NAMES = ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"]


# ----------------------------------------------------------------------------- references
def _kl(log_a, log_b):
    """Σ_v A (log A − log B) per row, with 0 · log 0 = 0 (also for the gradient)."""
    live = log_a > -math.inf
    a = log_a.exp()
    la = torch.where(live, log_a, 0.0)
    lb = torch.where(live, log_b, 0.0)
    return torch.where(live, a * (la - lb), 0.0).sum(-1)


def ref_divergence(divergence: Divergence, student, teacher, temperature):
    """T² · divergence per row, float64, differentiable w.r.t. ``student``."""
    log_q = torch.log_softmax(student.double() / temperature, -1)
    log_p = torch.log_softmax(teacher.double() / temperature, -1)
    p, q = log_p.exp(), log_q.exp()
    if isinstance(divergence, ForwardKL):
        value = _kl(log_p, log_q)
    elif isinstance(divergence, ReverseKL):
        value = _kl(log_q, log_p)
    elif isinstance(divergence, JSD):
        beta = divergence.beta
        if beta == 0:
            value = _kl(log_p, log_q)
        elif beta == 1:
            value = _kl(log_q, log_p)
        else:
            log_m = torch.logsumexp(
                torch.stack([log_q + math.log(1 - beta), log_p + math.log(beta)]), 0
            )
            value = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    elif isinstance(divergence, TVD):
        value = 0.5 * (p - q).abs().sum(-1)
    elif isinstance(divergence, SkewKL):
        a = divergence.alpha
        value = _kl(log_p, torch.log(a * p + (1 - a) * q))
    elif isinstance(divergence, SkewReverseKL):
        a = divergence.alpha
        value = _kl(log_q, torch.log(a * q + (1 - a) * p))
    else:
        raise AssertionError(divergence)
    return value * temperature**2


def ref_cross_entropy(student, labels, ignore_index=-100):
    """Per-token CE at temperature 1, float64, 0 where ignored."""
    flat = student.double().reshape(-1, student.shape[-1])
    ce = F.cross_entropy(flat, labels.reshape(-1), ignore_index=ignore_index, reduction="none")
    return ce.reshape(labels.shape)


def ref_loss(divergence, student, teacher, labels, *, temperature=1.0, kd_ratio=1.0,
             num_batch_labels=None, ignore_index=-100):  # fmt: skip
    """(loss, grad, per-token divergence, per-token CE), all float64."""
    s = student.detach().double().requires_grad_()
    valid = labels != ignore_index
    div = ref_divergence(divergence, s, teacher.detach(), temperature)
    div = torch.where(valid, div, 0.0)
    ce = ref_cross_entropy(s, labels, ignore_index)
    denom = num_batch_labels if num_batch_labels is not None else max(int(valid.sum()), 1)
    loss = torch.zeros((), dtype=torch.float64)
    if kd_ratio > 0:
        loss = loss + kd_ratio * div.sum() / denom
    if kd_ratio < 1:
        loss = loss + (1 - kd_ratio) * ce.sum() / denom
    (grad,) = torch.autograd.grad(loss, s) if loss.requires_grad else (torch.zeros_like(s),)
    return loss.detach(), grad, div.detach(), ce.detach()


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to a busy machine (two threads
    waiting on each other made each softmax take milliseconds under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(shape=(3, 13), vocab=97, dtype=torch.float32, ignored=5, scale=3.0, label_vocab=None):
    student = (torch.randn(*shape, vocab) * scale).to(dtype).requires_grad_()
    teacher = (torch.randn(*shape, vocab) * scale).to(dtype)
    labels = torch.randint(0, label_vocab or vocab, shape)
    labels.view(-1)[torch.randperm(labels.numel())[:ignored]] = -100
    return student, teacher, labels


def _fresh(student):
    return student.detach().clone().requires_grad_()


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("num_batch_labels", [None, 50])
@pytest.mark.parametrize("chunk_size", [0, 1, 7, 64])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("kd_ratio", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("name", NAMES)
def test_matches_float64_reference(name, kd_ratio, temperature, chunk_size, num_batch_labels):
    student, teacher, labels = _inputs()
    loss_fn = KDLoss(
        temperature=temperature, chunk_size=chunk_size, divergence=name, kd_ratio=kd_ratio
    )
    ref, ref_grad, ref_div, ref_ce = ref_loss(
        loss_fn.divergence, student, teacher, labels, temperature=temperature,
        kd_ratio=kd_ratio, num_batch_labels=num_batch_labels,
    )  # fmt: skip
    what = f"{name} kd={kd_ratio} T={temperature} chunk={chunk_size} nbl={num_batch_labels}"

    loss = loss_fn(student, teacher, labels, num_batch_labels=num_batch_labels)
    loss.backward()
    assert loss.dtype == torch.float32 and student.grad.dtype == torch.float32
    assert_rel(loss, ref, 1e-5, f"loss, {what}")
    assert_rel(student.grad, ref_grad, 1e-4, f"grad, {what}")

    # The per-token outputs come from the same pass and give the same loss and gradient.
    s2 = _fresh(student)
    out = loss_fn(s2, teacher, labels, num_batch_labels=num_batch_labels, return_per_token=True)
    out.loss.backward()
    valid = labels != -100
    assert_rel(out.loss, ref, 1e-5, f"loss with per-token outputs, {what}")
    assert_rel(s2.grad, ref_grad, 1e-4, f"grad with per-token outputs, {what}")
    assert_rel(out.per_token_kl, ref_div, 1e-5, f"per-token divergence, {what}")
    assert_rel(out.per_token_ce, ref_ce, 1e-5, f"per-token CE, {what}")
    denom = num_batch_labels or int(valid.sum())
    assert_rel(out.div_loss, ref_div.sum() / denom, 1e-5, f"div_loss, {what}")
    assert_rel(out.ce_loss, ref_ce.sum() / denom, 1e-5, f"ce_loss, {what}")
    assert out.per_token_div is out.per_token_kl
    assert not out.per_token_ce.requires_grad and not out.div_loss.requires_grad
    assert out.per_token_kl[~valid].abs().max() == 0 and out.per_token_ce[~valid].abs().max() == 0


@pytest.mark.parametrize(
    "divergence",
    [JSD(0.0), JSD(0.1), JSD(0.9), JSD(1.0), SkewKL(0.0), SkewKL(0.5), SkewKL(1.0),
     SkewReverseKL(0.0), SkewReverseKL(0.5), SkewReverseKL(1.0)],
    ids=repr,
)  # fmt: skip
@pytest.mark.parametrize("kd_ratio", [1.0, 0.5])
def test_parameters_match_float64_reference(divergence, kd_ratio):
    student, teacher, labels = _inputs()
    loss = KDLoss(temperature=2.0, chunk_size=7, divergence=divergence, kd_ratio=kd_ratio)(
        student, teacher, labels, num_batch_labels=40
    )
    loss.backward()
    ref, ref_grad, _, _ = ref_loss(
        divergence, student, teacher, labels, temperature=2.0, kd_ratio=kd_ratio,
        num_batch_labels=40,
    )  # fmt: skip
    # At alpha = 1 the skew divergences are 0: value and gradient are float32 rounding noise
    # (log Q − log M with M = Q recomputed from probabilities).
    atol = 1e-7 if getattr(divergence, "alpha", None) == 1.0 else 0.0
    err = (loss.double() - ref).abs().item()
    assert err <= 1e-5 * ref.abs().item() + atol, f"loss: {err:.3g}"
    err = (student.grad.double() - ref_grad).abs().max().item()
    assert err <= 1e-4 * ref_grad.abs().max().item() + atol, f"grad: {err:.3g}"


@pytest.mark.parametrize("kd_ratio", [1e-4, 0.02, 0.999])
@pytest.mark.parametrize("name", ["jsd", "skew_reverse_kl"])
def test_lopsided_mixes_match_float64_reference(name, kd_ratio):
    """CE-dominated mixes (small kd_ratio, T < 1: at 0.02 the divergence is still ~2% of the
    gradient) are exact too; they store the gradient scaled the other way round."""
    student, teacher, labels = _inputs()
    loss_fn = KDLoss(temperature=0.5, chunk_size=7, divergence=name, kd_ratio=kd_ratio)
    loss = loss_fn(student, teacher, labels)
    loss.backward()
    ref, ref_grad, _, _ = ref_loss(
        loss_fn.divergence, student, teacher, labels, temperature=0.5, kd_ratio=kd_ratio
    )
    assert_rel(loss, ref, 1e-5, "loss")
    assert_rel(student.grad, ref_grad, 1e-4, "grad")


def test_jsd_endpoints_are_forward_and_reverse_kl():
    student, teacher, labels = _inputs()
    for beta, other in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        a = KDLoss(temperature=2.0, divergence=JSD(beta))(student, teacher, labels)
        b = KDLoss(temperature=2.0, divergence=other)(student, teacher, labels)
        assert torch.equal(a, b)
    for alpha, other in ((0.0, "forward_kl"), (0.0, "reverse_kl")):
        skew = SkewKL(alpha) if other == "forward_kl" else SkewReverseKL(alpha)
        a = KDLoss(divergence=skew)(student, teacher, labels)
        assert torch.equal(a, KDLoss(divergence=other)(student, teacher, labels))


def _trl_generalized_jsd(student_logits, teacher_logits, labels, beta, temperature):
    """TRL's ``GKDTrainer.generalized_jsd_loss`` (reduction "batchmean"), restated in float64."""
    student_log_probs = F.log_softmax(student_logits.double() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.double() / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta_t = torch.tensor(beta, dtype=torch.float64)
        mixture_log_probs = torch.logsumexp(
            torch.stack(
                [student_log_probs + torch.log(1 - beta_t), teacher_log_probs + torch.log(beta_t)]
            ),
            dim=0,
        )
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none",
                              log_target=True)  # fmt: skip
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none",
                              log_target=True)  # fmt: skip
        jsd = beta_t * kl_teacher + (1 - beta_t) * kl_student
    mask = labels != -100
    return jsd[mask].sum() / mask.sum()


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_jsd_is_trl_generalized_jsd_times_t_squared(beta):
    student, teacher, labels = _inputs()
    for temperature in (1.0, 2.0):
        ours = KDLoss(temperature=temperature, divergence=JSD(beta), chunk_size=5)(
            student, teacher, labels
        )
        trl = _trl_generalized_jsd(student, teacher, labels, beta, temperature)
        assert_rel(ours, trl * temperature**2, 1e-5, f"beta={beta} T={temperature}")


def test_skew_divergences_follow_distillm():
    """DistiLLM's ``skewed_forward_kl`` is the cross-entropy −Σ P log(λP + (1 − λ)Q): ours adds
    the teacher's Σ P log P (a constant, same gradient). Its ``skewed_reverse_kl`` is
    KL(Q ‖ λQ + (1 − λ)P), ours exactly."""
    student, teacher, labels = _inputs(ignored=0)
    lam = 0.1
    p = torch.softmax(teacher.double(), -1)
    q = torch.softmax(student.double(), -1)
    log_p = torch.log_softmax(teacher.double(), -1)
    log_q = torch.log_softmax(student.double(), -1)
    skew_ce = -(p * torch.log(lam * p + (1 - lam) * q)).sum(-1).mean()
    neg_entropy = (p * log_p).sum(-1).mean()
    ours = KDLoss(divergence=SkewKL(lam))(student, teacher, labels)
    assert_rel(ours, skew_ce + neg_entropy, 1e-5, "skew KL")
    mixed = (1 - lam) * p + lam * q
    skew_rkl = -(q * torch.log(mixed) - q * log_q).sum(-1).mean()
    ours = KDLoss(divergence=SkewReverseKL(lam))(student, teacher, labels)
    assert_rel(ours, skew_rkl, 1e-5, "skew reverse KL")


@pytest.mark.parametrize("chunk_size", [0, 8])
@pytest.mark.parametrize("kd_ratio", [1.0, 0.5])
@pytest.mark.parametrize("name", NAMES)
def test_bf16_logits_with_upcast(name, kd_ratio, chunk_size):
    student, teacher, labels = _inputs(dtype=torch.bfloat16)
    loss_fn = KDLoss(chunk_size=chunk_size, temperature=2.0, divergence=name, kd_ratio=kd_ratio)
    loss = loss_fn(student, teacher, labels)
    loss.backward()
    # Reference on the same (rounded) values, in float64.
    ref, ref_grad, _, _ = ref_loss(
        loss_fn.divergence, student, teacher, labels, temperature=2.0, kd_ratio=kd_ratio
    )
    assert loss.dtype == torch.float32 and student.grad.dtype == torch.bfloat16
    assert_rel(loss, ref, 2e-3, "loss")
    assert_rel(student.grad, ref_grad, 2e-3 * 4, "grad")  # bf16 grad storage rounds to 2^-8


# ----------------------------------------------------------------------------- -inf, empty
@pytest.mark.parametrize("chunk_size", [0, 5])
@pytest.mark.parametrize("kd_ratio", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("name", NAMES)
def test_masked_vocabulary_contributes_nothing(name, kd_ratio, chunk_size):
    """Entries -inf in both logits (a padded vocabulary) change nothing: same loss, gradient
    and per-token values as the vocabulary without them, and a zero gradient there."""
    student, teacher, labels = _inputs(vocab=40, label_vocab=30)
    s_masked, t_masked = student.detach().clone(), teacher.clone()
    s_masked[..., 30:] = -math.inf
    t_masked[..., 30:] = -math.inf
    s_masked.requires_grad_()
    loss_fn = KDLoss(chunk_size=chunk_size, divergence=name, kd_ratio=kd_ratio, temperature=2.0)
    out = loss_fn(s_masked, t_masked, labels, return_per_token=True)
    out.loss.backward()
    s_small = student.detach()[..., :30].clone().requires_grad_()
    ref = loss_fn(s_small, teacher[..., :30], labels, return_per_token=True)
    ref.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(s_masked.grad).all()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s_masked.grad[..., :30], s_small.grad, rtol=1e-5, atol=1e-8)
    assert s_masked.grad[..., 30:].abs().max() == 0
    torch.testing.assert_close(out.per_token_kl, ref.per_token_kl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.per_token_ce, ref.per_token_ce, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("name", "side"),
    [("forward_kl", "teacher"), ("reverse_kl", "student"), ("jsd", "teacher"),
     ("jsd", "student"), ("tvd", "teacher"), ("tvd", "student"), ("skew_kl", "teacher"),
     ("skew_kl", "student"), ("skew_reverse_kl", "teacher"), ("skew_reverse_kl", "student")],
)  # fmt: skip
def test_minus_inf_in_one_of_the_logits(name, side):
    """-inf on one side only, where the divergence stays finite, matches the reference."""
    student, teacher, labels = _inputs(vocab=40, label_vocab=39)
    labels = torch.where(labels % 3 == 0, labels + 1, labels)  # never a masked entry
    masked = (student if side == "student" else teacher).detach().clone()
    masked[..., ::3] = -math.inf
    if side == "student":
        student, teacher = masked.requires_grad_(), teacher
    else:
        teacher = masked
    loss_fn = KDLoss(chunk_size=6, divergence=name, kd_ratio=0.5, temperature=2.0)
    loss = loss_fn(student, teacher, labels)
    loss.backward()
    ref, ref_grad, _, _ = ref_loss(
        loss_fn.divergence, student, teacher, labels, temperature=2.0, kd_ratio=0.5
    )
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert_rel(loss, ref, 1e-5, "loss")
    assert_rel(student.grad, ref_grad, 1e-4, "grad")


@pytest.mark.parametrize("chunk_size", [0, 4])
@pytest.mark.parametrize("kd_ratio", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("name", NAMES)
def test_all_labels_ignored_gives_connected_zero(name, kd_ratio, chunk_size):
    student, teacher, _ = _inputs()
    labels = torch.full(student.shape[:-1], -100)
    loss_fn = KDLoss(chunk_size=chunk_size, divergence=name, kd_ratio=kd_ratio)
    loss = loss_fn(student, teacher, labels)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))
    out = loss_fn(_fresh(student), teacher, labels, return_per_token=True)
    assert out.loss.item() == 0.0 and out.div_loss.item() == 0.0 and out.ce_loss.item() == 0.0
    assert out.per_token_kl.abs().max() == 0 and out.per_token_ce.abs().max() == 0


def test_nan_logits_of_a_valid_token_give_nan_for_every_divergence():
    student, teacher, labels = _inputs(ignored=0)
    bad = student.detach().clone()
    bad[1, 2, 5] = math.nan
    for name in NAMES:
        for kd_ratio in (1.0, 0.5):
            loss = KDLoss(chunk_size=3, divergence=name, kd_ratio=kd_ratio)(bad, teacher, labels)
            assert loss.isnan(), (name, kd_ratio)


# ----------------------------------------------------------------------------- the CE term
def test_kd_ratio_zero_is_the_cross_entropy():
    student, teacher, labels = _inputs()
    loss = KDLoss(kd_ratio=0.0, temperature=2.0, chunk_size=4)(student, teacher, labels)
    loss.backward()
    s = _fresh(student)
    ref = F.cross_entropy(s.reshape(-1, 97), labels.reshape(-1), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(student.grad, s.grad, rtol=1e-5, atol=1e-8)


def test_loss_is_the_mix_of_its_terms():
    student, teacher, labels = _inputs()
    out = KDLoss(divergence="jsd", kd_ratio=0.3, temperature=2.0, chunk_size=5)(
        student, teacher, labels, return_per_token=True
    )
    assert isinstance(out, KDLossOutput)
    torch.testing.assert_close(out.loss, 0.3 * out.div_loss + 0.7 * out.ce_loss)
    valid = out.valid_mask
    torch.testing.assert_close(out.per_token_kl.sum() / valid.sum(), out.div_loss)
    torch.testing.assert_close(out.per_token_ce.sum() / valid.sum(), out.ce_loss)


def test_student_logits_may_be_a_shifted_view_with_the_ce_term():
    base = torch.randn(2, 9, 31, requires_grad=True)
    teacher = torch.randn(2, 9, 31)
    labels = torch.randint(0, 31, (2, 8))
    labels[1, 2] = -100
    student = base[:, :-1]
    loss_fn = KDLoss(chunk_size=3, divergence="skew_reverse_kl", kd_ratio=0.5)
    loss = loss_fn(student, teacher[:, :-1], labels)
    loss.backward()
    ref, ref_grad, _, _ = ref_loss(
        loss_fn.divergence, student, teacher[:, :-1], labels, kd_ratio=0.5
    )
    assert_rel(loss, ref, 1e-5, "loss")
    assert_rel(base.grad[:, :-1], ref_grad, 1e-4, "grad")
    assert base.grad[:, -1].abs().max() == 0


def test_custom_ignore_index_with_the_ce_term():
    student, teacher, labels = _inputs(ignored=0)
    labels[0] = 7  # ignored tokens whose "label" is a real vocabulary id
    loss_fn = KDLoss(ignore_index=7, divergence="tvd", kd_ratio=0.5, chunk_size=4)
    loss = loss_fn(student, teacher, labels)
    loss.backward()
    ref, ref_grad, _, _ = ref_loss(
        loss_fn.divergence, student, teacher, labels, kd_ratio=0.5, ignore_index=7
    )
    assert_rel(loss, ref, 1e-5, "loss")
    assert_rel(student.grad, ref_grad, 1e-4, "grad")


def test_labels_outside_the_vocabulary():
    student, teacher, labels = _inputs(ignored=0)
    labels[0, 3] = 97
    # Refused whatever kd_ratio: with pure distillation too (data padded with an id outside
    # the vocabulary would otherwise be distilled on its padding).
    for kd_ratio in (0.5, 1.0):
        with pytest.raises(ValueError, match=r"vocabulary ids in \[0, 97\), got 97"):
            KDLoss(kd_ratio=kd_ratio)(student, teacher, labels)


def test_backward_scales_by_the_incoming_gradient_with_the_ce_term():
    student, teacher, labels = _inputs()
    loss_fn = KDLoss(chunk_size=4, divergence="reverse_kl", kd_ratio=0.25, temperature=0.5)
    (loss_fn(student, teacher, labels) * 3.0).backward()
    _, ref_grad, _, _ = ref_loss(
        loss_fn.divergence, student, teacher, labels, kd_ratio=0.25, temperature=0.5
    )
    assert_rel(student.grad, 3.0 * ref_grad, 1e-4, "grad of 3·loss")


def test_no_grad_mode_with_the_ce_term():
    student, teacher, labels = _inputs()
    with torch.no_grad():
        loss = KDLoss(divergence="skew_kl", kd_ratio=0.5, chunk_size=3)(student, teacher, labels)
    assert not loss.requires_grad
    ref, _, _, _ = ref_loss(SkewKL(), student, teacher, labels, kd_ratio=0.5)
    assert_rel(loss, ref, 1e-5, "loss")


# ----------------------------------------------------------------------------- API
def test_names_and_objects():
    assert set(DIVERGENCES) == set(NAMES)
    for name in NAMES:
        loss_fn = KDLoss(divergence=name)
        assert type(loss_fn.divergence) is DIVERGENCES[name] and loss_fn.divergence.name == name
    assert isinstance(KDLoss().divergence, ForwardKL) and KDLoss().kd_ratio == 1.0
    assert KDLoss(divergence="jsd").divergence == JSD(0.5)
    assert KDLoss(divergence="skew_kl").divergence == SkewKL(alpha=0.1)
    jsd = JSD(beta=0.3)
    assert KDLoss(divergence=jsd).divergence is jsd
    assert repr(jsd) == "JSD(beta=0.3)" and repr(TVD()) == "TVD()"
    assert JSD(0.3) == JSD(beta=0.3) != JSD(0.4) and hash(JSD(0.3)) == hash(JSD(beta=0.3))
    assert SkewKL(0.2) != SkewReverseKL(0.2)
    assert resolve_divergence("tvd") == TVD()
    assert "divergence=JSD(beta=0.3), kd_ratio=0.5" in repr(KDLoss(divergence=jsd, kd_ratio=0.5))


def test_new_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        KDLoss(-100, 1.0, True, None, 0, "jsd")  # a sixth positional argument
    loss_fn = KDLoss(-100, 2.0, True, None, 16, divergence="tvd", kd_ratio=0.5)
    assert (loss_fn.temperature, loss_fn.chunk_size, loss_fn.kd_ratio) == (2.0, 16, 0.5)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: JSD(beta=-0.1), "beta"),
        (lambda: JSD(beta=1.5), "beta"),
        (lambda: JSD(beta=math.nan), "beta"),
        (lambda: JSD(beta="0.5"), "beta"),
        (lambda: JSD(beta=True), "beta"),
        (lambda: SkewKL(alpha=-1e-9), "alpha"),
        (lambda: SkewKL(alpha=2), "alpha"),
        (lambda: SkewReverseKL(alpha=math.inf), "alpha"),
        (lambda: KDLoss(divergence="kl"), "unknown divergence 'kl'"),
        (lambda: KDLoss(divergence="JSD"), "unknown divergence"),
        (lambda: KDLoss(divergence=JSD), "Divergence object"),
        (lambda: KDLoss(divergence=3), "Divergence object"),
        (lambda: KDLoss(divergence=None), "Divergence object"),
        (lambda: KDLoss(divergence=torch.nn.KLDivLoss()), "Divergence object"),
        (lambda: KDLoss(kd_ratio=1.5), "kd_ratio"),
        (lambda: KDLoss(kd_ratio=-0.1), "kd_ratio"),
        (lambda: KDLoss(kd_ratio=True), "kd_ratio"),
        (lambda: KDLoss(kd_ratio=math.nan), "kd_ratio"),
    ],
)
def test_bad_parameters_are_refused_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


class _OldStyleKL(Divergence):
    """A user divergence written against the 0.1 interface (no ``extra`` argument)."""

    def chunk(self, student, teacher, temperature, vocab, work, grad, need_grad):
        log_p = vocab.log_softmax(teacher, temperature, out=work)
        log_q = vocab.log_softmax(student, temperature, out=grad)
        delta = torch.sub(log_p, log_q, out=grad)
        p = log_p.exp_()
        value = vocab.all_sum(row_sum_of_products(delta.mul_(p), p))
        if need_grad:
            vocab.softmax(student, temperature, out=grad).sub_(p)
        return value


def test_user_divergence_with_the_old_chunk_signature():
    student, teacher, labels = _inputs()
    loss = KDLoss(divergence=_OldStyleKL(), kd_ratio=0.5, chunk_size=4)(student, teacher, labels)
    loss.backward()
    ref, ref_grad, _, _ = ref_loss(ForwardKL(), student, teacher, labels, kd_ratio=0.5)
    assert_rel(loss, ref, 1e-5, "loss")
    assert_rel(student.grad, ref_grad, 1e-4, "grad")


def test_built_from_yaml_by_jsonargparse():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--loss", type=KDLoss)
    configs = {
        "name": "loss:\n  class_path: lightning_kd.KDLoss\n  init_args:\n"
        "    temperature: 2.0\n    divergence: reverse_kl\n    kd_ratio: 0.5\n",
        "object": "loss:\n  class_path: lightning_kd.KDLoss\n  init_args:\n"
        "    chunk_size: 1024\n    divergence:\n      class_path: lightning_kd.losses.JSD\n"
        "      init_args:\n        beta: 0.3\n",
        "default": "loss:\n  class_path: lightning_kd.KDLoss\n",
    }
    built = {}
    for key, text in configs.items():
        cfg = parser.parse_string(text)
        built[key] = parser.instantiate(cfg).loss
    assert built["name"].divergence == ReverseKL() and built["name"].kd_ratio == 0.5
    assert built["name"].temperature == 2.0
    assert built["object"].divergence == JSD(beta=0.3) and built["object"].chunk_size == 1024
    assert built["default"].divergence == ForwardKL() and built["default"].kd_ratio == 1.0

    # Command-line flags, as LightningCLI passes them.
    def from_flags(*flags):
        return parser.instantiate(parser.parse_args(["--loss", "lightning_kd.KDLoss", *flags])).loss

    assert from_flags("--loss.init_args.divergence", "tvd").divergence == TVD()
    skew = from_flags(
        "--loss.init_args.divergence", "{class_path: lightning_kd.losses.SkewKL, init_args: "
        "{alpha: 0.2}}", "--loss.init_args.kd_ratio", "0.25",
    )  # fmt: skip
    assert skew.divergence == SkewKL(0.2) and skew.kd_ratio == 0.25
    # A bad parameter in a config is the divergence's own ValueError, not a silent default.
    bad = "loss:\n  class_path: lightning_kd.KDLoss\n  init_args:\n    divergence:\n" + (
        "      class_path: lightning_kd.losses.JSD\n      init_args: {beta: 1.5}\n"
    )
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        parser.instantiate(parser.parse_string(bad))
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        from_flags("--loss.init_args.divergence", "kl")


class _Allocations(TorchDispatchMode):
    """Records the element counts of the tensors ``torch.empty`` creates."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.empty.memory_format:
            self.numels.append(out.numel())
        return out


@pytest.mark.parametrize("kd_ratio", [1.0, 0.5])
@pytest.mark.parametrize("chunk_size", [0, 7])
@pytest.mark.parametrize(
    "divergence", [JSD(0.5), JSD(0.2), SkewKL(0.1), SkewReverseKL(0.1)], ids=repr
)
def test_mixture_blocks_match_float64_reference(monkeypatch, divergence, chunk_size, kd_ratio):
    """The mixture divergences work through their extra workspaces a few rows at a time
    (here 2 rows of 97: blocks that do not divide the chunks); values and gradients stay
    those of the reference, and no extra workspace is a chunk's size."""
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 2 * 97)
    student, teacher, labels = _inputs()
    loss_fn = KDLoss(temperature=2.0, chunk_size=chunk_size, divergence=divergence,
                     kd_ratio=kd_ratio)  # fmt: skip
    ref, ref_grad, ref_div, _ = ref_loss(
        divergence, student, teacher, labels, temperature=2.0, kd_ratio=kd_ratio
    )
    with _Allocations() as rec:
        out = loss_fn(student, teacher, labels, return_per_token=True)
    out.loss.backward()
    what = f"{divergence!r} chunk={chunk_size} kd={kd_ratio}"
    assert_rel(out.loss, ref, 1e-5, f"loss, {what}")
    assert_rel(student.grad, ref_grad, 1e-4, f"grad, {what}")
    assert_rel(out.per_token_kl, ref_div, 1e-5, f"per-token divergence, {what}")
    big = sorted(n for n in rec.numels if n > 2 * 97)  # the gradient and one workspace
    assert len(big) == 2 and big[0] <= (chunk_size or labels.numel()) * 97, f"{what}: {big}"
    assert big[1] == student.numel(), f"{what}: {big}"
    with torch.no_grad():
        value = loss_fn(student, teacher, labels)
    assert_rel(value, ref, 1e-5, f"no-grad loss, {what}")
