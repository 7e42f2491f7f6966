"""TopKKDLoss on vocab-sharded student logits, in real gloo processes (TP=2 and TP=4, uneven).

One spawn per tensor-parallel size runs every case (divergence (forward and reverse KL, and JSD
through the generic bucketed form) × kd_ratio × temperature,
chunking, k from 1 to V, uneven vocabularies, ``num_batch_labels``) on two input kinds:
vocab-sharded DTensors (the group inferred from the mesh) and plain local shards with an
explicit ``tp_group`` (split with ``tensor_split``: other uneven shards than DTensor's). Loss,
per-token values, both terms and each rank's gradient slice must equal the single-process
result (1e-5 / 1e-4 relative); the forward communicates only O(tokens) all-reduces and the
backward nothing; bad top-k data is refused on every rank.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from lightning_kd import TopKKDLoss
from tests.helpers.distributed import CollectiveRecorder, run_workers
from tests.helpers.reference import assert_rel

LEAD = (2, 6)  # [batch, seq]; 12 tokens
SETTINGS = [  # temperature, chunk_size, vocabulary, k, num_batch_labels
    (1.0, 0, 40, 5, None),
    (2.0, 5, 37, 1, 31),
    (0.5, 3, 37, 37, None),
    (1.0, 4, 37, 9, None),
]
CASES = list(itertools.product(("forward_kl", "reverse_kl", "jsd"), (1.0, 0.5), SETTINGS))


def _case_inputs(vocab, k, temperature, seed):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(*LEAD, vocab, generator=gen) * 3
    teacher = torch.randn(*LEAD, vocab, generator=gen) * 3
    ids = torch.rand(*LEAD, vocab, generator=gen).argsort(-1)[..., :k]
    logprobs = torch.log_softmax(teacher / temperature, -1).gather(-1, ids)
    labels = torch.randint(0, vocab, LEAD, generator=gen)
    labels[0, :2] = -100
    labels[1, 4] = -100
    return student, ids, logprobs, labels


def _single_process(student, ids, logprobs, labels, nbl=None, **kwargs):
    s = student.clone().requires_grad_()
    out = TopKKDLoss(**kwargs)(s, ids, logprobs, labels, num_batch_labels=nbl,
                               return_per_token=True)  # fmt: skip
    (out.loss * 2.5).backward()  # a non-unit incoming gradient
    return out, s.grad


def _compare(out, grad, ref, ref_grad, what, per_token=True, grad_scale=None, t2=1.0):
    # Every float32 log Q carries the log-normaliser's rounding, about 1e-7 · |logsumexp| in
    # absolute terms, whatever the divergence's size: small bucketed values (k = 1) sit near
    # that floor, so values also get an absolute 1e-6 · T².
    atol = 1e-6 * t2
    assert_rel(out.loss if per_token else out, ref.loss, 1e-5, f"loss, {what}", atol=atol)
    if per_token:
        for name in ("per_token_div", "per_token_ce", "div_loss", "ce_loss"):
            assert_rel(getattr(out, name), getattr(ref, name), 1e-5, f"{name}, {what}",
                        atol=atol)  # fmt: skip
    assert_rel(grad, ref_grad, 1e-4, f"grad, {what}", grad_scale)


def _both_kinds(rank, mesh, tp_group, student, ids, logprobs, labels, nbl, kwargs, what):
    """The DTensor and the local-shard paths against one process."""
    tp_size, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    t2 = kwargs["temperature"] ** 2
    ref, ref_grad = _single_process(student, ids, logprobs, labels, nbl, **kwargs)

    s = distribute_tensor(student, mesh, [Shard(-1)]).requires_grad_()
    out = TopKKDLoss(**kwargs)(s, ids, logprobs, labels, num_batch_labels=nbl,
                               return_per_token=True)  # fmt: skip
    assert not isinstance(out.loss, DTensor)
    (out.loss * 2.5).backward()
    assert isinstance(s.grad, DTensor) and s.grad.placements == s.placements
    _compare(out, s.grad.full_tensor(), ref, ref_grad, f"DTensor, {what}", t2=t2)

    s_local = torch.tensor_split(student, tp_size, dim=-1)[tp_rank].clone().requires_grad_()
    loss = TopKKDLoss(**kwargs, tp_group=tp_group)(s_local, ids, logprobs, labels,
                                                   num_batch_labels=nbl)  # fmt: skip
    (loss * 2.5).backward()
    ref_slice = torch.tensor_split(ref_grad, tp_size, dim=-1)[tp_rank]
    _compare(loss, s_local.grad, ref, ref_slice, f"tp_group, {what}", per_token=False,
             grad_scale=ref_grad.abs().max(), t2=t2)  # fmt: skip
    return ref


def _all_cases_match_single_process(rank, world):
    mesh = init_device_mesh("cpu", (world,))
    tp_group = mesh.get_group(0)
    for i, (divergence, kd_ratio, (temperature, chunk, vocab, k, nbl)) in enumerate(CASES):
        student, ids, logprobs, labels = _case_inputs(vocab, k, temperature, seed=i)
        kwargs = dict(
            temperature=temperature, chunk_size=chunk, divergence=divergence, kd_ratio=kd_ratio
        )
        what = f"rank {rank} case {i}: {divergence} kd={kd_ratio} T={temperature} " + (
            f"chunk={chunk} V={vocab} k={k} nbl={nbl}"
        )
        _both_kinds(rank, mesh, tp_group, student, ids, logprobs, labels, nbl, kwargs, what)

    # The tail on a few ranks only: the last 9 columns (a whole shard for TP=4) at -inf in the
    # student and never in the top-k, and one token whose teacher mass is all in its top-k.
    student, ids, logprobs, labels = _case_inputs(37, 6, 2.0, seed=100)
    student[..., 28:] = -math.inf
    labels = torch.where(labels >= 28, labels - 28, labels)  # finite cross-entropy
    ids = torch.rand(*LEAD, 28, generator=torch.Generator().manual_seed(5)).argsort(-1)[..., :6]
    ids = ids.to(torch.int32)
    teacher = torch.randn(*LEAD, 37, generator=torch.Generator().manual_seed(6))
    logprobs = torch.log_softmax(teacher / 2.0, -1).gather(-1, ids.long())
    logprobs[0, 3] = torch.log_softmax(logprobs[0, 3], -1)  # P_rest = 0
    for divergence in ("forward_kl", "reverse_kl"):
        kwargs = dict(temperature=2.0, chunk_size=4, divergence=divergence, kd_ratio=0.5)
        if divergence == "reverse_kl":
            labels[0, 3] = -100  # infinite there (P_rest = 0 < Q_rest)
        ref = _both_kinds(rank, mesh, tp_group, student, ids, logprobs, labels, None, kwargs,
                          f"rank {rank} sparse tail, {divergence}")  # fmt: skip
        assert torch.isfinite(ref.loss)

    # All labels ignored: a finite zero, connected, with a zero gradient.
    s = distribute_tensor(student, mesh, [Shard(-1)]).requires_grad_()
    loss = TopKKDLoss(kd_ratio=0.5)(s, ids, logprobs, torch.full_like(labels, -100))
    loss.backward()
    assert loss.item() == 0.0 and s.grad.to_local().abs().max() == 0

    if world == 2:
        _collectives_are_small(rank, mesh)
        _bad_inputs_refused_on_every_rank(rank, mesh)


def _collectives_are_small(rank, mesh):
    """All-reduces of at most two values per token in forward, none in backward, however
    large V and k."""
    student, ids, logprobs, labels = _case_inputs(1024, 64, 2.0, seed=7)
    n_tokens = labels.numel()
    for divergence, kd_ratio, per_token in itertools.product(
        ("forward_kl", "reverse_kl"), (1.0, 0.5, 0.0), (False, True)
    ):
        s = distribute_tensor(student, mesh, [Shard(-1)]).requires_grad_()
        loss_fn = TopKKDLoss(chunk_size=4, divergence=divergence, kd_ratio=kd_ratio)
        with CollectiveRecorder() as fwd:
            out = loss_fn(s, ids, logprobs, labels, return_per_token=per_token)
        with CollectiveRecorder() as bwd:
            (out.loss if per_token else out).backward()
        what = f"{divergence} kd={kd_ratio} per_token={per_token}"
        assert fwd.calls, f"the TP path must communicate in forward ({what})"
        for name, sizes in fwd.calls:
            assert "allreduce" in name or "all_reduce" in name, f"{what}: {name}"
            assert max(sizes) <= 2 * n_tokens, f"{what}: {name} moved {sizes} elements"
        assert bwd.calls == [], f"{what}: backward must not communicate, saw {bwd.calls}"


def _bad_inputs_refused_on_every_rank(rank, mesh):
    student, ids, logprobs, labels = _case_inputs(37, 5, 1.0, seed=3)
    s = distribute_tensor(student, mesh, [Shard(-1)]).requires_grad_()
    bad = ids.clone()
    bad[1, 1, 2] = 37  # one past the whole vocabulary (each rank holds ~18 columns)
    with pytest.raises(ValueError, match=r"vocabulary ids in \[0, 37\), got 37"):
        TopKKDLoss()(s, bad, logprobs, labels)
    bad[1, 1, 2] = bad[1, 1, 0]
    with pytest.raises(ValueError, match="distinct"):
        TopKKDLoss()(s, bad, logprobs, labels)
    other = labels.clone()
    if rank == 0:
        other[0, 3] = (other[0, 3] + 1) % 37
    with pytest.raises(ValueError, match="labels differ"):
        TopKKDLoss()(s, ids, logprobs, other)


# One spawn runs ~20 cases on two input kinds: a few seconds on 2 busy CPU cores.
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world", [pytest.param(2, id="tp2"), pytest.param(4, id="tp4")])
def test_topk_loss_matches_single_process(world):
    run_workers(_all_cases_match_single_process, world)
