"""Multi-process checks of LinearKDLoss on a vocabulary-sharded head (gloo, CPU).

``check_all(rank, world)`` runs in every rank of a ``world``-process group (TP = world): for
every divergence × kd_ratio × setting (temperature, chunk size, biases, uneven vocabulary,
``num_batch_labels``, ignored tokens) it compares, against the unfused single-process path
(``KDLoss`` on ``F.linear`` logits):

* DTensor heads: weights and biases as ``nn.Parameter`` DTensors sharded ``Shard(0)`` on a 1-D
  mesh (the group inferred): loss and per-token outputs equal; the hidden-state gradient on
  every rank equals the whole one; the weight/bias gradients are DTensors with the weight's
  placements whose full tensors equal the whole ones;
* plain local vocabulary slices with ``tp_group`` (``tensor_split``, other uneven shards) and
  ``Replicate`` DTensor hidden states: the weight gradient is the rank's slice of the whole one;

plus a fully ignored batch, the collectives (forward: all-reduces of at most two values per
token, and exactly one of ``n_valid × d`` values, the hidden-state gradient; backward: none),
and mismatched labels refused on every rank. The pytest wrapper is
``tests/test_linear_kd_loss_tp.py``; standalone: ``python -m tests.scripts.linear_kd_loss_tp
--world 4``.
"""

from __future__ import annotations

import argparse
import itertools

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from lightning_kd import KDLoss, LinearKDLoss
from lightning_kd.losses import JSD, SkewKL, engine, linear_engine
from tests.helpers.distributed import CollectiveRecorder, run_workers
from tests.helpers.reference import assert_rel

LEAD = (2, 6)  # 12 tokens
D_S, D_T = 5, 8
DIVERGENCES = [
    "forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", JSD(0.3), SkewKL(0.25)
]  # fmt: skip
SETTINGS = [  # temperature, chunk_size, vocabulary, biases, num_batch_labels
    (1.0, 0, 40, True, None),
    (2.0, 5, 37, False, 31),
    (0.5, 1, 37, True, None),
]
CASES = list(itertools.product(DIVERGENCES, (1.0, 0.5, 0.0), SETTINGS))


def _inputs(vocab: int, seed: int, bias: bool = True):
    gen = torch.Generator().manual_seed(seed)
    hs = torch.randn(*LEAD, D_S, generator=gen)
    w = torch.randn(vocab, D_S, generator=gen)
    ht = torch.randn(*LEAD, D_T, generator=gen)
    wt = torch.randn(vocab, D_T, generator=gen)
    b = torch.randn(vocab, generator=gen) if bias else None
    bt = torch.randn(vocab, generator=gen) if bias else None
    labels = torch.randint(0, vocab, LEAD, generator=gen)
    labels[0, :2] = -100
    labels[1, 4] = -100
    return hs, w, b, ht, wt, bt, labels


def _single_process(hs, w, b, ht, wt, bt, labels, nbl=None, **kwargs):
    """The unfused path in one process: KDLoss on F.linear logits."""
    hs, w = hs.clone().requires_grad_(), w.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    s = nn.functional.linear(hs, w, b)
    t = nn.functional.linear(ht, wt, bt)
    out = KDLoss(**kwargs)(s, t, labels, num_batch_labels=nbl, return_per_token=True)
    (out.loss * 2.5).backward()  # a non-unit incoming gradient
    return out, (hs.grad, w.grad, b.grad if b is not None else None)


def _compare_values(out, ref, what, per_token=True):
    assert_rel(out.loss if per_token else out, ref.loss, 1e-5, f"loss, {what}")
    if per_token:
        for field in ("per_token_kl", "per_token_ce", "div_loss", "ce_loss"):
            assert_rel(getattr(out, field), getattr(ref, field), 1e-5, f"{field}, {what}")


def _dtensor_case(mesh, inputs, nbl, kwargs, ref, ref_grads, what):
    hs, w, b, ht, wt, bt, labels = inputs
    weight = nn.Parameter(distribute_tensor(w, mesh, [Shard(0)]))
    bias = nn.Parameter(distribute_tensor(b, mesh, [Shard(0)])) if b is not None else None
    t_weight = distribute_tensor(wt, mesh, [Shard(0)])
    t_bias = distribute_tensor(bt, mesh, [Shard(0)]) if bt is not None else None
    hidden = hs.clone().requires_grad_()
    out = LinearKDLoss(**kwargs)(
        hidden, weight, ht, t_weight, labels, bias, t_bias, num_batch_labels=nbl,
        return_per_token=True,
    )  # fmt: skip
    assert not isinstance(out.loss, DTensor)
    (out.loss * 2.5).backward()
    _compare_values(out, ref, f"DTensor, {what}")
    assert_rel(hidden.grad, ref_grads[0], 1e-4, f"hidden grad, DTensor, {what}")
    for param, full, name in ((weight, ref_grads[1], "weight"), (bias, ref_grads[2], "bias")):
        if param is None:
            continue
        assert isinstance(param.grad, DTensor) and param.grad.placements == param.placements
        assert param.grad.to_local().shape == param.to_local().shape
        assert_rel(param.grad.full_tensor(), full, 1e-4, f"{name} grad, DTensor, {what}")


def _local_case(mesh, group, inputs, nbl, kwargs, ref, ref_grads, what):
    """Plain local slices (tensor_split: other uneven shards than DTensor's), a Replicate
    DTensor for the student's hidden states, the plain call."""
    hs, w, b, ht, wt, bt, labels = inputs
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    weight = torch.tensor_split(w, tp)[rank].clone().requires_grad_()
    bias = torch.tensor_split(b, tp)[rank].clone().requires_grad_() if b is not None else None
    t_weight = torch.tensor_split(wt, tp)[rank]
    t_bias = torch.tensor_split(bt, tp)[rank] if bt is not None else None
    hidden = DTensor.from_local(hs.clone(), mesh, [Replicate()]).requires_grad_()
    loss = LinearKDLoss(**kwargs, tp_group=group)(
        hidden, weight, ht, t_weight, labels, bias, t_bias, num_batch_labels=nbl
    )
    (loss * 2.5).backward()
    _compare_values(loss, ref, f"tp_group, {what}", per_token=False)
    assert isinstance(hidden.grad, DTensor)
    assert_rel(hidden.grad.to_local(), ref_grads[0], 1e-4, f"hidden grad, tp_group, {what}")
    for param, full, name in ((weight, ref_grads[1], "weight"), (bias, ref_grads[2], "bias")):
        if param is None:
            continue
        # A slice's gradient is compared at the scale of the whole one.
        assert_rel(param.grad, torch.tensor_split(full, tp)[rank], 1e-4,
                    f"{name} grad slice, tp_group, {what}", scale=full.abs().max())  # fmt: skip


def check_all(rank: int, world: int) -> None:
    mesh = init_device_mesh("cpu", (world,))
    group = mesh.get_group(0)
    for i, (divergence, kd_ratio, (temperature, chunk, vocab, bias, nbl)) in enumerate(CASES):
        inputs = _inputs(vocab, seed=i, bias=bias)
        kwargs = dict(
            temperature=temperature, chunk_size=chunk, divergence=divergence, kd_ratio=kd_ratio
        )
        what = (f"rank {rank} case {i}: {divergence} kd={kd_ratio} T={temperature} "
                f"chunk={chunk} V={vocab} bias={bias} nbl={nbl}")  # fmt: skip
        ref, ref_grads = _single_process(*inputs, nbl=nbl, **kwargs)
        _dtensor_case(mesh, inputs, nbl, kwargs, ref, ref_grads, what)
        _local_case(mesh, group, inputs, nbl, kwargs, ref, ref_grads, what)

    # Small row blocks (the teacher's 3 rows, the chunk math's 2, from the widest shard's
    # width): with uneven shards every rank still cuts the same blocks and collectives.
    width = -(-37 // world)
    saved = engine.BLOCK_ELEMENTS, linear_engine.TEACHER_BLOCK_ELEMENTS
    engine.BLOCK_ELEMENTS, linear_engine.TEACHER_BLOCK_ELEMENTS = 2 * width, 3 * width
    try:
        for divergence in ("forward_kl", "jsd", "skew_reverse_kl"):
            inputs = _inputs(37, seed=50, bias=True)
            kwargs = dict(temperature=2.0, chunk_size=5, divergence=divergence, kd_ratio=0.5)
            what = f"rank {rank} blocks: {divergence}"
            ref, ref_grads = _single_process(*inputs, **kwargs)
            _dtensor_case(mesh, inputs, None, kwargs, ref, ref_grads, what)
            _local_case(mesh, group, inputs, None, kwargs, ref, ref_grads, what)
    finally:
        engine.BLOCK_ELEMENTS, linear_engine.TEACHER_BLOCK_ELEMENTS = saved

    # All labels ignored: a finite zero, connected, zero gradients.
    hs, w, _b, ht, wt, _bt, labels = _inputs(37, seed=99)
    weight = nn.Parameter(distribute_tensor(w, mesh, [Shard(0)]))
    hidden = hs.clone().requires_grad_()
    t_weight = distribute_tensor(wt, mesh, [Shard(0)])
    loss = LinearKDLoss(kd_ratio=0.5)(hidden, weight, ht, t_weight, torch.full_like(labels, -100))
    loss.backward()
    assert loss.item() == 0.0
    assert hidden.grad.abs().max() == 0 and weight.grad.to_local().abs().max() == 0

    _collectives_are_small(mesh)
    _bad_inputs_refused_on_every_rank(mesh, rank)


def _collectives_are_small(mesh):
    """Forward: per-row all-reduces (at most two values per token, the same as KDLoss) plus
    exactly one all-reduce of the valid rows' hidden-state gradient; backward: nothing."""
    vocab = 1024  # ≫ the values per collective allowed
    hs, w, _b, ht, wt, _bt, labels = _inputs(vocab, seed=7)
    n_tokens, n_valid = labels.numel(), int((labels != -100).sum())
    for divergence, kd_ratio, per_token in itertools.product(
        ["forward_kl", "jsd", "tvd", "skew_reverse_kl"], (1.0, 0.5, 0.0), (False, True)
    ):
        weight = nn.Parameter(distribute_tensor(w, mesh, [Shard(0)]))
        t_weight = distribute_tensor(wt, mesh, [Shard(0)])
        hidden = hs.clone().requires_grad_()
        loss_fn = LinearKDLoss(chunk_size=4, divergence=divergence, kd_ratio=kd_ratio,
                               temperature=2.0)  # fmt: skip
        with CollectiveRecorder() as fwd:
            out = loss_fn(hidden, weight, ht, t_weight, labels, return_per_token=per_token)
        loss = out.loss if per_token else out
        with CollectiveRecorder() as bwd:
            loss.backward()
        what = f"{divergence} kd={kd_ratio} per_token={per_token}"
        big = [sizes for name, sizes in fwd.calls if max(sizes) > 2 * n_tokens]
        assert big == [[n_valid * D_S]], f"{what}: one hidden-gradient all-reduce, saw {big}"
        for name, _sizes in fwd.calls:
            assert "allreduce" in name or "all_reduce" in name, f"{what}: {name}"
        assert bwd.calls == [], f"{what}: backward must not communicate, saw {bwd.calls}"
    # Without a gradient to compute, no hidden-gradient all-reduce.
    weight = distribute_tensor(w, mesh, [Shard(0)])
    t_weight = distribute_tensor(wt, mesh, [Shard(0)])
    with torch.no_grad(), CollectiveRecorder() as fwd:
        LinearKDLoss(chunk_size=4)(hs.requires_grad_(), weight, ht, t_weight, labels)
    assert fwd.calls and all(max(sizes) <= 2 * n_tokens for _, sizes in fwd.calls)


def _bad_inputs_refused_on_every_rank(mesh, rank):
    hs, w, b, ht, wt, _bt, labels = _inputs(37, seed=3)
    weight = distribute_tensor(w, mesh, [Shard(0)])
    t_weight = distribute_tensor(wt, mesh, [Shard(0)])
    bad = labels.clone()
    bad[1, 1] = 37  # one past the whole vocabulary
    with pytest.raises(ValueError, match=r"vocabulary ids in \[0, 37\)"):
        LinearKDLoss(kd_ratio=0.5)(hs, weight, ht, t_weight, bad)
    other = labels.clone()
    if rank == 0:
        other[0, 3] = (other[0, 3] + 1) % 37
    with pytest.raises(ValueError, match="labels differ"):
        LinearKDLoss(kd_ratio=0.5)(hs, weight, ht, t_weight, other)
    with pytest.raises(ValueError, match="both be DTensors"):
        LinearKDLoss()(hs, weight, ht, wt, labels)
    with pytest.raises(ValueError, match="sharded on the vocabulary"):
        LinearKDLoss()(hs, distribute_tensor(w, mesh, [Shard(1)]), ht,
                       distribute_tensor(wt, mesh, [Shard(1)]), labels)  # fmt: skip
    with pytest.raises(ValueError, match="replicated"):
        LinearKDLoss()(distribute_tensor(hs, mesh, [Shard(0)]), weight, ht, t_weight, labels)
    with pytest.raises(ValueError, match="same placements"):
        LinearKDLoss()(hs, weight, ht, t_weight, labels, distribute_tensor(b, mesh, [Replicate()]))


def check_fsdp_shards_are_not_vocabulary_shards(rank: int, world: int) -> None:
    """An FSDP2 head's weight read outside the head's forward is a ``Shard(0)``
    DTensor over the data-parallel mesh. Data-parallel ranks hold different batches, so taking
    it for a vocabulary shard must be refused (labels differ), never a silently wrong loss."""
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
    torch.manual_seed(0)
    head, teacher_head = nn.Linear(8, 40, bias=False), nn.Linear(8, 40, bias=False)
    fully_shard(head, mesh=mesh)
    fully_shard(teacher_head, mesh=mesh)
    gen = torch.Generator().manual_seed(10 + rank)  # data parallel: each rank its own batch
    hs = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    ht = torch.randn(2, 5, 8, generator=gen)
    labels = torch.randint(0, 40, (2, 5), generator=gen)
    for kd_ratio in (1.0, 0.5):
        with pytest.raises(ValueError, match=r"labels differ.*FSDP2"):
            LinearKDLoss(chunk_size=4, kd_ratio=kd_ratio)(
                hs, head.weight, ht, teacher_head.weight, labels
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2, help="processes = TP size")
    args = parser.parse_args()
    run_workers(check_all, args.world)
    print(f"LinearKDLoss TP={args.world}: all checks passed")


if __name__ == "__main__":
    main()
