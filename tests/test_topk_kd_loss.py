"""TopKKDLoss on one process: the bucketed divergences against a float64 reference, k = V
against KDLoss, the tail bucket's edge cases, half precision and bad inputs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightning_kd import KDLoss, KDLossOutput, TopKKDLoss
from lightning_kd.losses import JSD, TVD, ForwardKL, ReverseKL
from tests.helpers.reference import assert_rel

VOCAB = 23
SHAPE = (3, 13)


def _teacher_topk(teacher, k, temperature, random_ids=True):
    """``(ids, logprobs)``: k distinct ids per token (random, or the teacher's top-k) and
    ``log_softmax(teacher / T)`` there."""
    log_p = torch.log_softmax(teacher.double() / temperature, -1)
    if random_ids:
        ids = torch.rand(teacher.shape).argsort(-1)[..., :k]
    else:
        ids = log_p.topk(k, -1).indices
    return ids, log_p.gather(-1, ids).to(teacher.dtype)


def _inputs(k, temperature=1.0, vocab=VOCAB, shape=SHAPE, ignored=5, dtype=torch.float32):
    student = (torch.randn(*shape, vocab) * 3).to(dtype)
    teacher = torch.randn(*shape, vocab) * 3
    ids, logprobs = _teacher_topk(teacher, k, temperature)
    labels = torch.randint(0, vocab, shape)
    labels.view(-1)[torch.randperm(labels.numel())[:ignored]] = -100
    return student, ids, logprobs.float(), labels


def reference_per_token(student, ids, logprobs, temperature, divergence):
    """``T² · D`` per token on the k + 1 buckets, in float64, written plainly."""
    log_q = torch.log_softmax(student.double() / temperature, -1)
    log_q_top = log_q.gather(-1, ids)
    tail = torch.ones_like(log_q, dtype=torch.bool).scatter(-1, ids, False)
    # Rows whose tail is all -inf (or empty) get a constant -inf, so autograd sees no NaN.
    has_tail = (tail & torch.isfinite(log_q)).any(-1, keepdim=True)
    masked = log_q.masked_fill(~tail, -math.inf).masked_fill(~has_tail, 0.0)
    log_q_rest = torch.logsumexp(masked, -1).masked_fill(~has_tail.squeeze(-1), -math.inf)
    log_p = logprobs.double()
    p = log_p.exp()
    p_rest = (1 - p.sum(-1)).clamp_min(0) if ids.shape[-1] < student.shape[-1] else 0 * p[..., 0]

    def xlogy(weight, log_ratio):
        zero = weight == 0
        return torch.where(zero, 0.0, weight * torch.where(zero, 0.0, log_ratio))

    if divergence == "forward_kl":
        value = xlogy(p, log_p - log_q_top).sum(-1) + xlogy(p_rest, p_rest.log() - log_q_rest)
    else:
        q_top, q_rest = log_q_top.exp(), log_q_rest.exp()
        value = xlogy(q_top, log_q_top - log_p).sum(-1) + xlogy(q_rest, log_q_rest - p_rest.log())
    return value * temperature**2


def reference(student, ids, logprobs, labels, temperature, divergence="forward_kl",
              kd_ratio=1.0, num_batch_labels=None):  # fmt: skip
    """``(loss, grad, per-token divergence, per-token CE)`` in float64 via autograd."""
    s = student.detach().double().requires_grad_()
    div = reference_per_token(s, ids, logprobs, temperature, divergence)
    valid = labels != -100
    ce = torch.nn.functional.cross_entropy(
        s.reshape(-1, s.shape[-1]), labels.reshape(-1), reduction="none", ignore_index=-100
    ).reshape(labels.shape)
    denom = num_batch_labels if num_batch_labels is not None else max(int(valid.sum()), 1)
    div = torch.where(valid, div, torch.zeros_like(div))
    loss = kd_ratio * div.sum() / denom
    if kd_ratio < 1:
        loss = loss + (1 - kd_ratio) * ce.sum() / denom
    loss.backward()
    return loss.detach(), s.grad, div.detach(), ce.detach()


def _run(loss_fn, student, *args, **kwargs):
    s = student.detach().clone().requires_grad_()
    out = loss_fn(s, *args, **kwargs)
    (out.loss if isinstance(out, KDLossOutput) else out).backward()
    return out, s.grad


CASES = list(itertools.product((0.5, 1.0, 2.0), (0, 1, 7), (1, 5, VOCAB), (1.0, 0.5)))


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize(("temperature", "chunk_size", "k", "kd_ratio"), CASES)
def test_matches_float64_reference(divergence, temperature, chunk_size, k, kd_ratio):
    student, ids, logprobs, labels = _inputs(k, temperature)
    nbl = 50 if chunk_size == 1 else None
    loss_fn = TopKKDLoss(
        temperature=temperature, chunk_size=chunk_size, divergence=divergence, kd_ratio=kd_ratio
    )
    loss, grad = _run(loss_fn, student, ids, logprobs, labels, num_batch_labels=nbl)
    ref_loss, ref_grad, _, _ = reference(
        student, ids, logprobs, labels, temperature, divergence, kd_ratio, nbl
    )
    assert_rel(loss, ref_loss, 1e-5, "loss")
    assert_rel(grad, ref_grad, 1e-4, "grad")
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_per_token_outputs(divergence):
    student, ids, logprobs, labels = _inputs(4, temperature=2.0)
    loss_fn = TopKKDLoss(temperature=2.0, chunk_size=5, divergence=divergence, kd_ratio=0.3)
    out, grad = _run(loss_fn, student, ids, logprobs, labels, return_per_token=True)
    ref_loss, ref_grad, ref_div, ref_ce = reference(
        student, ids, logprobs, labels, 2.0, divergence, 0.3
    )
    n = int((labels != -100).sum())
    assert isinstance(out, KDLossOutput) and torch.equal(out.valid_mask, labels != -100)
    assert_rel(out.loss, ref_loss, 1e-5, "loss")
    assert_rel(out.per_token_div, ref_div, 1e-5, "per-token divergence")
    assert_rel(out.per_token_ce, ref_ce, 1e-5, "per-token CE")
    assert_rel(out.div_loss, ref_div.sum() / n, 1e-5, "div_loss")
    assert_rel(out.ce_loss, ref_ce.sum() / n, 1e-5, "ce_loss")
    assert_rel(grad, ref_grad, 1e-4, "grad")
    plain = loss_fn(student, ids, logprobs, labels)
    assert torch.equal(plain, out.loss)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize(("kd_ratio", "chunk_size"), [(1.0, 0), (0.5, 5), (0.0, 3)])
def test_full_vocabulary_equals_kd_loss(divergence, kd_ratio, chunk_size):
    temperature = 2.0
    student, _, _, labels = _inputs(VOCAB, temperature)
    teacher = torch.randn(*SHAPE, VOCAB) * 3
    ids, logprobs = _teacher_topk(teacher, VOCAB, temperature)  # every id, shuffled
    kwargs = dict(
        temperature=temperature, chunk_size=chunk_size, divergence=divergence, kd_ratio=kd_ratio
    )
    out, grad = _run(TopKKDLoss(**kwargs), student, ids, logprobs, labels, return_per_token=True)
    # log_softmax(T · logprobs / T) = logprobs: KDLoss sees the same teacher distribution.
    teacher_logits = torch.empty_like(teacher).scatter_(-1, ids, logprobs * temperature)
    ref, ref_grad = _run(KDLoss(**kwargs), student, teacher_logits, labels, return_per_token=True)
    for name in ("loss", "per_token_div", "per_token_ce", "div_loss", "ce_loss"):
        assert_rel(getattr(out, name), getattr(ref, name), 1e-5, name)
    assert_rel(grad, ref_grad, 1e-4, "grad")


def test_zero_when_the_student_matches_the_buckets():
    student = torch.randn(*SHAPE, VOCAB) * 3
    ids, logprobs = _teacher_topk(student, 6, 1.5, random_ids=False)
    labels = torch.zeros(SHAPE, dtype=torch.int64)
    for divergence in ("forward_kl", "reverse_kl"):
        loss, grad = _run(TopKKDLoss(temperature=1.5, divergence=divergence), student, ids,
                          logprobs, labels)  # fmt: skip
        assert abs(loss.item()) < 1e-6 and grad.abs().max() < 1e-6


def test_bf16_student_logits():
    student, ids, logprobs, labels = _inputs(5, 2.0, dtype=torch.bfloat16)
    for divergence, chunk_size in (("forward_kl", 0), ("reverse_kl", 4)):
        loss_fn = TopKKDLoss(temperature=2.0, chunk_size=chunk_size, divergence=divergence)
        loss, grad = _run(loss_fn, student, ids, logprobs, labels)
        ref_loss, ref_grad, _, _ = reference(student, ids, logprobs, labels, 2.0, divergence)
        assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
        assert_rel(loss, ref_loss, 2e-3, f"bf16 loss, {divergence}")
        assert_rel(grad, ref_grad, 2e-3 * 4, f"bf16 grad, {divergence}")  # bf16 rounding


def test_noncontiguous_logits_and_int32_ids():
    student, ids, logprobs, labels = _inputs(5, 1.0, shape=(3, 14))
    view = student[:, :-1]  # [3, 13, V], not viewable as rows
    ids, logprobs, labels = ids[:, :-1], logprobs[:, :-1], labels[:, :-1]
    s = student.clone().requires_grad_()
    loss = TopKKDLoss(chunk_size=4)(s[:, :-1], ids.to(torch.int32), logprobs, labels)
    loss.backward()
    ref_loss, ref_grad, _, _ = reference(view, ids, logprobs, labels, 1.0)
    assert_rel(loss, ref_loss, 1e-5, "loss")
    assert_rel(s.grad[:, :-1], ref_grad, 1e-4, "grad")
    assert s.grad[:, -1].abs().max() == 0


def test_fully_ignored_batch_and_garbage_in_ignored_rows():
    student, ids, logprobs, labels = _inputs(5)
    s = student.clone().requires_grad_()
    loss = TopKKDLoss(kd_ratio=0.5, chunk_size=4)(s, ids, logprobs, torch.full_like(labels, -100))
    assert loss.requires_grad and loss.item() == 0.0
    loss.backward()
    assert s.grad.abs().max() == 0
    # Ignored rows may hold anything (a cache's padding): duplicates, -1, NaN.
    ids, logprobs = ids.clone(), logprobs.clone()
    ignored = labels == -100
    ids[ignored] = -1
    ids[tuple(ignored.nonzero()[0].tolist())] = 0
    logprobs[ignored] = math.nan
    for chunk_size in (0, 4):
        loss, grad = _run(TopKKDLoss(chunk_size=chunk_size), student, ids, logprobs, labels)
        ref_loss, ref_grad, _, _ = reference(student, ids.clamp_min(0), logprobs.nan_to_num(-9),
                                             labels, 1.0)  # fmt: skip
        assert_rel(loss, ref_loss, 1e-5, "loss")
        assert_rel(grad, ref_grad, 1e-4, "grad")


def test_tail_edge_cases():
    student, ids, _, labels = _inputs(4)
    labels[0, 1] = labels[1, 2] = 0
    teacher = torch.randn(*SHAPE, VOCAB)
    # The teacher's mass entirely in its top-k: P_rest = 0 exactly.
    masked = torch.full_like(teacher, -math.inf).scatter(-1, ids, teacher.gather(-1, ids))
    logprobs = torch.log_softmax(masked, -1).gather(-1, ids)
    # Some student logits outside the top-k at -inf, and a token whose whole tail is -inf.
    tail = torch.ones_like(student, dtype=torch.bool).scatter(-1, ids, False)
    s = student.masked_fill(tail & (torch.arange(VOCAB) < 3), -math.inf)
    s[0, 1][tail[0, 1]] = -math.inf
    # A tail far below the top-k (Q_rest ~ e^-200, 0 in float32 as 1 − Σ Q_i).
    s[1, 2] = torch.where(tail[1, 2], s[1, 2] - 200, s[1, 2])
    loss, grad = _run(TopKKDLoss(chunk_size=5), s, ids, logprobs, labels)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    ref_loss, ref_grad, _, _ = reference(s, ids, logprobs, labels, 1.0)
    assert_rel(loss, ref_loss, 1e-5, "P_rest = 0")
    assert_rel(grad, ref_grad, 1e-4, "P_rest = 0")
    # Reverse KL: infinite where the teacher's tail is empty and the student's is not.
    out = TopKKDLoss(divergence="reverse_kl")(s, ids, logprobs, labels, return_per_token=True)
    assert torch.isfinite(out.per_token_div[0, 1])  # both tails empty (all -inf)
    assert torch.isinf(out.per_token_div[labels != -100]).sum() >= 1
    # Teacher tail mass > 0 against a tiny student tail: large but finite, as in float64.
    _, _, logprobs, _ = _inputs(4)
    logprobs = torch.log_softmax(teacher, -1).gather(-1, ids)
    labels[0, 1] = -100  # the all -inf tail would make forward KL infinite there
    loss, grad = _run(TopKKDLoss(chunk_size=5), s, ids, logprobs, labels)
    ref_loss, ref_grad, ref_div, _ = reference(s, ids, logprobs, labels, 1.0)
    assert ref_div[1, 2] > 100
    assert_rel(loss, ref_loss, 1e-5, "tiny student tail")
    assert_rel(grad, ref_grad, 1e-4, "tiny student tail")


def test_bad_arguments():
    for kwargs, match in (
        ({"temperature": 0.0}, "temperature"),
        ({"chunk_size": -1}, "chunk_size"),
        ({"kd_ratio": 1.5}, "kd_ratio"),
        ({"fp32_upcast": "yes"}, "fp32_upcast"),
        ({"divergence": "nope"}, "unknown divergence"),
    ):
        with pytest.raises(ValueError, match=match):
            TopKKDLoss(**kwargs)
    assert isinstance(TopKKDLoss(divergence=ReverseKL()).divergence, ReverseKL)
    assert TopKKDLoss().divergence == ForwardKL()
    # Every divergence has a bucketed form (tests/test_topk_divergences.py checks them).
    assert TopKKDLoss(divergence=TVD()).divergence == TVD()
    assert TopKKDLoss(divergence="jsd").divergence == JSD(0.5)


def test_bad_inputs():
    student, ids, logprobs, labels = _inputs(5)
    loss_fn = TopKKDLoss()

    def refused(match, s=student, i=ids, lp=logprobs, lab=labels, fn=loss_fn):
        with pytest.raises(ValueError, match=match):
            fn(s, i, lp, lab)

    refused("student_logits must be a floating", s=student.long())
    refused("teacher_ids must be an integer", i=ids.float())
    refused("teacher_logprobs must be a floating", lp=ids)
    refused("teacher_ids must have shape", i=ids[:, :5])
    refused("teacher_ids must have shape", i=ids[..., :0], lp=logprobs[..., :0])
    refused("teacher_logprobs must have the shape", lp=logprobs[..., :3])
    refused("labels must have the logits' leading shape", lab=labels[:, :3])
    refused("labels must be an integer", lab=labels.float())
    refused("more than the vocabulary", s=student[..., :4])
    valid = (labels != -100).nonzero()[0].tolist()
    bad = ids.clone()
    bad[tuple(valid)][0] = VOCAB
    refused(r"vocabulary ids in \[0, 23\), got 23", i=bad)
    bad[tuple(valid)][0] = -1
    refused(r"got -1", i=bad)
    bad = ids.clone()
    bad[tuple(valid)][1] = bad[tuple(valid)][0]
    refused("distinct", i=bad)
    lp = logprobs.clone()
    lp[tuple(valid)][2] = math.nan
    refused("NaN", lp=lp)
    refused("log-probabilities", lp=torch.randn_like(logprobs) * 3 + 3)  # logits, not logprobs
    bad_labels = labels.clone()
    bad_labels[tuple(valid)] = VOCAB
    refused(r"labels of valid tokens", lab=bad_labels, fn=TopKKDLoss(kd_ratio=0.5))
    with pytest.raises(ValueError, match="num_batch_labels"):
        loss_fn(student, ids, logprobs, labels, num_batch_labels=0)
    with pytest.raises(ValueError, match="return_per_token"):
        loss_fn(student, ids, logprobs, labels, return_per_token=1)
