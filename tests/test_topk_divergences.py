"""Every divergence on a top-k teacher's (k + 1)-bucket distribution (TopKKDLoss): against a
plain float64 definition of the coarsened divergence, equal to KDLoss when k = V, a lower bound
of the full divergence, with a stored tail log-mass that keeps tiny tails exact."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_kd import KDLoss, KDLossOutput, TopKKDLoss
from lightning_kd.losses import JSD, TVD, ForwardKL, ReverseKL, SkewKL, SkewReverseKL
from tests.helpers.reference import assert_rel

VOCAB = 19
SHAPE = (2, 9)
DIVERGENCES = [
    ForwardKL(), ReverseKL(), JSD(0.5), JSD(0.1), JSD(0.0), JSD(1.0), TVD(), SkewKL(0.1),
    SkewKL(0.0), SkewReverseKL(0.3),
]  # fmt: skip


def _kl(a_log, b_log):
    """Σ A (log A − log B) over the last dim, 0·log 0 = 0 (float64)."""
    a = a_log.exp()
    return torch.where(a == 0, 0.0, a * (a_log - torch.where(a == 0, 0.0, b_log))).sum(-1)


def _mix_log(a_log, b_log, w):
    """log(w A + (1 − w) B)."""
    return torch.log(w * a_log.exp() + (1 - w) * b_log.exp())


def divergence_of(p_log, q_log, div):
    """The plain definition of ``div`` between two distributions given by their logs."""
    if isinstance(div, ForwardKL):
        return _kl(p_log, q_log)
    if isinstance(div, ReverseKL):
        return _kl(q_log, p_log)
    if isinstance(div, JSD):
        if div.beta in (0.0, 1.0):
            return _kl(p_log, q_log) if div.beta == 0 else _kl(q_log, p_log)
        m_log = _mix_log(p_log, q_log, div.beta)
        return div.beta * _kl(p_log, m_log) + (1 - div.beta) * _kl(q_log, m_log)
    if isinstance(div, TVD):
        return 0.5 * (p_log.exp() - q_log.exp()).abs().sum(-1)
    if isinstance(div, SkewKL):
        return _kl(p_log, _mix_log(p_log, q_log, div.alpha))
    if isinstance(div, SkewReverseKL):
        return _kl(q_log, _mix_log(q_log, p_log, div.alpha))
    raise AssertionError(div)


def bucket_logs(student, ids, logprobs, tail, temperature):
    """float64 ``(log P_b, log Q_b)`` [*, k + 1]: the k ids then the rest, written plainly."""
    log_q = torch.log_softmax(student.double() / temperature, -1)
    in_top = torch.zeros_like(log_q, dtype=torch.bool).scatter(-1, ids, True)
    q_rest = torch.where(in_top, 0.0, log_q.exp()).sum(-1)
    log_p = logprobs.double()
    if ids.shape[-1] == student.shape[-1]:
        p_rest = torch.zeros_like(q_rest)
    elif tail is None:
        p_rest = (1 - log_p.exp().sum(-1)).clamp_min(0)
    else:
        p_rest = tail.double().exp()
    q_b = torch.cat([log_q.gather(-1, ids), q_rest.log().unsqueeze(-1)], -1)
    p_b = torch.cat([log_p, p_rest.log().unsqueeze(-1)], -1)
    return p_b, q_b


def reference(student, ids, logprobs, labels, temperature, div, kd_ratio=1.0, tail=None):
    """``(loss, grad, per-token divergence)`` in float64 via autograd."""
    s = student.detach().double().requires_grad_()
    p_b, q_b = bucket_logs(s, ids, logprobs, tail, temperature)
    valid = labels != -100
    per_token = torch.where(valid, divergence_of(p_b, q_b, div), 0.0) * temperature**2
    ce = torch.nn.functional.cross_entropy(
        s.reshape(-1, VOCAB), labels.reshape(-1), reduction="sum", ignore_index=-100
    )
    n = int(valid.sum())
    loss = (kd_ratio * per_token.sum() + (1 - kd_ratio) * ce) / n
    loss.backward()
    return loss.detach(), s.grad, per_token.detach()


def _inputs(k, temperature, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(*SHAPE, VOCAB, generator=gen) * 2
    teacher = torch.randn(*SHAPE, VOCAB, generator=gen) * 2
    log_p = torch.log_softmax(teacher.double() / temperature, -1)
    ids = torch.rand(*SHAPE, VOCAB, generator=gen).argsort(-1)[..., :k]
    in_top = torch.zeros_like(log_p, dtype=torch.bool).scatter(-1, ids, True)
    tail = torch.logsumexp(log_p.masked_fill(in_top, -math.inf), -1)
    labels = torch.randint(0, VOCAB, SHAPE, generator=gen)
    labels[0, :3] = -100
    return student, ids, log_p.gather(-1, ids).float(), tail.float(), labels


def _run(loss_fn, student, *args, **kwargs):
    s = student.clone().requires_grad_()
    out = loss_fn(s, *args, return_per_token=True, **kwargs)
    out.loss.backward()
    return out, s.grad


@pytest.mark.parametrize("div", DIVERGENCES, ids=repr)
@pytest.mark.parametrize(
    ("k", "temperature", "chunk_size", "kd_ratio", "given_tail"),
    [(1, 1.0, 0, 1.0, True), (5, 2.0, 4, 0.5, False), (5, 0.5, 0, 1.0, True),
     (12, 1.0, 7, 1.0, False)],
)  # fmt: skip
def test_matches_float64_definition(div, k, temperature, chunk_size, kd_ratio, given_tail):
    student, ids, logprobs, tail, labels = _inputs(k, temperature)
    tail = tail if given_tail else None
    loss_fn = TopKKDLoss(
        temperature=temperature, chunk_size=chunk_size, divergence=div, kd_ratio=kd_ratio
    )
    out, grad = _run(loss_fn, student, ids, logprobs, labels, teacher_tail_logprob=tail)
    ref_loss, ref_grad, ref_div = reference(
        student, ids, logprobs, labels, temperature, div, kd_ratio, tail
    )
    what = f"{div!r} k={k} T={temperature}"
    assert_rel(out.loss, ref_loss, 1e-5, f"loss, {what}", atol=1e-7)
    assert_rel(out.per_token_div, ref_div, 1e-5, f"per-token, {what}", atol=1e-7)
    assert_rel(grad, ref_grad, 1e-4, f"grad, {what}", atol=1e-8)


@pytest.mark.parametrize("div", DIVERGENCES, ids=repr)
def test_full_vocabulary_equals_kd_loss_and_bounds_it_below(div):
    temperature = 1.5
    student, ids, logprobs, _, labels = _inputs(VOCAB, temperature, seed=1)
    kwargs = dict(temperature=temperature, chunk_size=5, divergence=div, kd_ratio=0.7)
    out, grad = _run(TopKKDLoss(**kwargs), student, ids, logprobs, labels)
    # log_softmax(T · logprobs / T) = logprobs: KDLoss sees the same teacher distribution.
    teacher = torch.empty(*SHAPE, VOCAB).scatter_(-1, ids, logprobs * temperature)
    ref, ref_grad = _run(KDLoss(**kwargs), student, teacher, labels)
    for name in ("loss", "per_token_div", "per_token_ce"):
        assert_rel(getattr(out, name), getattr(ref, name), 1e-5, f"{name}, {div!r}", atol=1e-7)
    assert_rel(grad, ref_grad, 1e-4, f"grad, {div!r}", atol=1e-8)
    # Coarsening never increases the divergence: k = 4 gives a lower value per token.
    _, ids4, logprobs4, tail4, _ = _inputs(4, temperature, seed=1)
    loss4 = TopKKDLoss(**kwargs)
    coarse = loss4(student, ids4, logprobs4, labels, teacher_tail_logprob=tail4,
                   return_per_token=True)  # fmt: skip
    full_teacher = _full_teacher(temperature, seed=1)
    full = KDLoss(**kwargs)(student, full_teacher, labels, return_per_token=True)
    valid = labels != -100
    gap = full.per_token_div[valid] - coarse.per_token_div[valid]
    assert bool((gap >= -1e-6).all()) and bool((gap > 0).any()), gap


def _full_teacher(temperature, seed):
    """The full teacher logits behind :func:`_inputs` (same generator stream)."""
    gen = torch.Generator().manual_seed(seed)
    torch.randn(*SHAPE, VOCAB, generator=gen)
    return torch.randn(*SHAPE, VOCAB, generator=gen) * 2


@pytest.mark.parametrize("div", DIVERGENCES, ids=repr)
def test_zero_when_the_student_matches_the_buckets(div):
    student, _, _, _, labels = _inputs(6, 1.0, seed=2)
    log_q = torch.log_softmax(student.double(), -1)
    ids = log_q.topk(6, -1).indices
    in_top = torch.zeros_like(log_q, dtype=torch.bool).scatter(-1, ids, True)
    tail = torch.logsumexp(log_q.masked_fill(in_top, -math.inf), -1).float()
    out, grad = _run(TopKKDLoss(divergence=div), student, ids, log_q.gather(-1, ids).float(),
                     labels, teacher_tail_logprob=tail)  # fmt: skip
    assert abs(out.loss.item()) < 1e-6
    if not isinstance(div, TVD):  # |P − Q| has no gradient at 0 (the sign of rounding noise)
        assert grad.abs().max() < 1e-5


def test_a_stored_tail_keeps_tiny_tails_exact():
    """A teacher tail of ~1e-12: 1 − Σ P_i of float32 log-probabilities reads it as 0 (reverse
    KL infinite); its stored log-mass gives the float64 value."""
    student, ids, _, _, labels = _inputs(5, 1.0, seed=3)
    teacher = torch.full((*SHAPE, VOCAB), -30.0, dtype=torch.float64)
    teacher.scatter_(-1, ids, torch.randn(*SHAPE, 5, dtype=torch.float64))
    log_p = torch.log_softmax(teacher, -1)
    in_top = torch.zeros_like(log_p, dtype=torch.bool).scatter(-1, ids, True)
    tail = torch.logsumexp(log_p.masked_fill(in_top, -math.inf), -1)
    assert float(tail.max()) < math.log(1e-10)
    logprobs = log_p.gather(-1, ids).float()
    for div in (ReverseKL(), SkewReverseKL(0.0), JSD(0.9)):
        implied = TopKKDLoss(divergence=div)(student, ids, logprobs, labels)
        stored = TopKKDLoss(divergence=div)(student, ids, logprobs, labels,
                                            teacher_tail_logprob=tail.float())  # fmt: skip
        ref_loss, _, _ = reference(student, ids, logprobs, labels, 1.0, div, tail=tail)
        assert_rel(stored, ref_loss, 1e-5, f"stored tail, {div!r}")
        if not isinstance(div, JSD):
            assert torch.isinf(implied), f"{div!r}: the implied tail should read as 0"


def test_bad_tails_are_refused():
    student, ids, logprobs, tail, labels = _inputs(5, 1.0)
    loss_fn = TopKKDLoss(divergence="jsd")
    for bad, match in (
        (tail[:, :3], "labels' shape"),
        (tail.long(), "floating-point"),
        (tail.masked_fill(labels != -100, math.nan), "NaN or a positive"),
        (tail.masked_fill(labels != -100, 0.5), "NaN or a positive"),
        (tail.masked_fill(labels != -100, 0.0), "top-k mass"),  # P_rest = 1 plus the top-k
    ):
        with pytest.raises(ValueError, match=match):
            loss_fn(student, ids, logprobs, labels, teacher_tail_logprob=bad)
    out = loss_fn(student, ids, logprobs, labels, teacher_tail_logprob=tail,
                  return_per_token=True)  # fmt: skip
    assert isinstance(out, KDLossOutput) and torch.isfinite(out.loss)


@pytest.mark.parametrize("div", [JSD(0.3), TVD(), SkewKL(0.1), SkewReverseKL(0.1)], ids=repr)
def test_garbage_in_ignored_rows_changes_nothing(div):
    """Ignored rows may hold anything (a cache's padding): -1 ids, NaN log-probabilities."""
    student, ids, logprobs, tail, labels = _inputs(5, 1.0, seed=4)
    ignored = labels == -100
    bad_ids, bad_lp, bad_tail = ids.clone(), logprobs.clone(), tail.clone()
    bad_ids[ignored], bad_lp[ignored], bad_tail[ignored] = -1, math.nan, math.nan
    for chunk_size in (0, 4):
        loss_fn = TopKKDLoss(divergence=div, chunk_size=chunk_size)
        out, grad = _run(loss_fn, student, bad_ids, bad_lp, labels, teacher_tail_logprob=bad_tail)
        ref, ref_grad = _run(loss_fn, student, ids, logprobs, labels, teacher_tail_logprob=tail)
        assert torch.equal(out.loss, ref.loss) and torch.equal(grad, ref_grad)
