"""Packed sequences on the model side: documents packed in one row, isolated from each other.

A packed batch (``position_ids`` restarting at 0 at every document, a padding block at a row's
end) gives the same per-token logits and hidden states (1e-5, fp32) as the same documents run
one by one from position 0: TinyLlama (multi-head, grouped-query and multi-query attention),
tiny HF Llama and Qwen2 (sdpa and eager), and all three at TP=2 in real gloo processes
(``tests/scripts/packing_tp.py``). A DistillationModule training step on a packed batch has the
loss token sum and student gradients of the documents one by one, unfused and fused; a model
that cannot take ``position_ids`` is refused on a packed batch.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_kd import DistillationModule, KDLoss, TinyLlama
from lightning_kd.models import SupportsPackedSequences
from lightning_kd.models.contract import (
    accepts_position_ids,
    check_position_ids,
    document_ids,
    packed_causal_mask,
)
from tests.helpers.distributed import run_workers
from tests.scripts.packing_tp import (
    VOCAB,
    check_all,
    hf_model,
    one_by_one,
    packed_batch,
    tiny_llama,
)


def _assert_isolated(model: nn.Module, batch: dict) -> None:
    ids, pos = batch["input_ids"], batch["position_ids"]
    with torch.no_grad():
        packed = model(ids, position_ids=pos)
        packed_out = model(ids, output_hidden=True, position_ids=pos)
        hidden = model.hidden_states(ids, position_ids=pos)
        expected = one_by_one(model, batch)
        expected_hidden = one_by_one(model.hidden_states, batch)
        crossing = model(ids)  # no position_ids: documents see each other
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_out["logits"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_out["hidden"], expected_hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden, expected_hidden, rtol=1e-5, atol=1e-5)
    # The check has teeth: the first document of each row is unaffected, later ones are not.
    assert torch.allclose(crossing[:, :5], expected[:, :5], atol=1e-5)
    assert not torch.allclose(crossing, expected, atol=1e-3)


def test_packed_batch_layout():
    batch = packed_batch()
    assert batch["input_ids"].shape == batch["position_ids"].shape == (2, 13)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 0, 1, 2]
    assert batch["input_ids"][0, 10:].tolist() == [0, 0, 0]
    assert (batch["labels"][0, 9:] == -100).all() and batch["labels"][0, 5] == -100


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_tiny_llama_packed_equals_one_by_one(n_kv_heads):
    _assert_isolated(tiny_llama(n_kv_heads).eval(), packed_batch())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hf_packed_equals_one_by_one(family, attn):
    pytest.importorskip("transformers")
    _assert_isolated(hf_model(family, attn), packed_batch())


def test_single_document_rows_match_the_causal_fast_path():
    model = tiny_llama().eval()
    ids = torch.randint(0, VOCAB, (3, 9))
    pos = torch.arange(9).expand(3, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, position_ids=pos), model(ids), rtol=1e-5, atol=1e-6)


def test_tiny_llama_positions_not_row_length_are_bounded_by_max_seq_len():
    model = tiny_llama().eval()  # max_seq_len=16
    ids = torch.randint(1, VOCAB, (1, 24))
    pos = torch.cat([torch.arange(12), torch.arange(12)])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=pos)  # a row longer than max_seq_len is fine
        torch.testing.assert_close(packed[:, 12:], model(ids[:, 12:]), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="exceeds max_seq_len 16"):
            model(ids)
        with pytest.raises(ValueError, match=r"reach 16, beyond the model's max_seq_len 16"):
            model(ids[:, :17], position_ids=torch.arange(17)[None])


@pytest.mark.parametrize(
    ("pos", "match"),
    [
        (torch.tensor([[0, 1, 3, 4]]), r"count up by one.*row 0 goes from 1 to 3 at column 2"),
        (torch.tensor([[0, 1, 2]]), r"input_ids' shape \[B, S\] = \(1, 4\)"),
        (torch.tensor([[0.0, 1.0, 2.0, 3.0]]), "must be int64"),
        (torch.tensor([[-1, 0, 1, 2]]), "non-negative"),
    ],
)
def test_malformed_position_ids_are_refused(pos, match):
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        check_position_ids(pos, ids)
    with pytest.raises(ValueError, match=match):
        tiny_llama()(ids, position_ids=pos)


def test_a_row_may_start_inside_a_document():
    pos = torch.tensor([[3, 4, 0, 1]])
    check_position_ids(pos, pos)
    assert document_ids(pos).tolist() == [[0, 0, 1, 1]]
    mask = packed_causal_mask(pos)
    assert mask.shape == (1, 1, 4, 4) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]


def test_the_models_implement_the_protocol():
    assert isinstance(tiny_llama(), SupportsPackedSequences)
    for method in ("forward", "hidden_states"):
        assert accepts_position_ids(tiny_llama(), method)

    class Plain(nn.Module):
        def forward(self, input_ids, **kwargs):
            return input_ids

    assert not accepts_position_ids(Plain()) and not accepts_position_ids(Plain(), "hidden_states")


def test_hf_protocol_and_backends_that_would_not_isolate():
    pytest.importorskip("transformers")
    model = hf_model("llama")
    assert isinstance(model, SupportsPackedSequences)
    assert accepts_position_ids(model) and accepts_position_ids(model, "hidden_states")
    batch = packed_batch()
    # Transformers isolates packed rows for flash attention only at batch size 1.
    model.attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=r"flash_attention_2.*batch size 2.*would not keep"):
        model(batch["input_ids"], position_ids=batch["position_ids"])
    with pytest.raises(ValueError, match="would not keep the documents apart"):
        model.hidden_states(batch["input_ids"], position_ids=batch["position_ids"])


# About 14 s on 2 busy CPU cores (three models, transformers imported in each process).
@pytest.mark.distributed
@pytest.mark.slow
def test_tp2_packed_equals_one_by_one_single_process():
    run_workers(check_all, 2)


# ------------------------------------------------------------------ DistillationModule
def _module(fused: bool, student=None, teacher=None) -> DistillationModule:
    student = tiny_llama(2) if student is None else student
    if teacher is None:
        torch.manual_seed(1)
        teacher = TinyLlama(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=1,
                            hidden_dim=48, max_seq_len=16, init_std=0.3)  # fmt: skip
    loss = KDLoss(temperature=2.0, chunk_size=4, divergence="jsd", kd_ratio=0.5)
    module = DistillationModule(student, teacher, loss=loss, fused_head=fused)
    module.configure_model()
    return module


def _step(module: DistillationModule, batch: dict) -> tuple[torch.Tensor, dict]:
    """The training step's returned token sum, and the student's gradients of it."""
    module.student.zero_grad(set_to_none=True)
    with pytest.warns(Warning, match="self.log"):  # no Trainer attached: logging is skipped
        out = module.training_step(batch, 0)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in module.student.named_parameters()}
    return out["loss"].detach(), grads


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused_head"])
def test_training_step_on_a_packed_batch_equals_the_documents_one_by_one(fused):
    """The step returns ``loss * tokens``, the token sum of the per-token objective: packed,
    it is the sum over documents of each document's own token sum, and so are the gradients."""
    batch = packed_batch()
    module = _module(fused)
    packed_sum, packed_grads = _step(module, {k: batch[k] for k in ("input_ids", "labels",
                                                                      "position_ids")})  # fmt: skip
    total = torch.zeros(())
    grads: dict[str, torch.Tensor] = {}
    for row, start, n, padding in batch["docs"]:
        if padding:
            continue
        doc = {k: batch[k][row : row + 1, start : start + n] for k in ("input_ids", "labels")}
        if n == 1:  # nothing to predict in a one-token document
            assert (doc["labels"] == -100).all()
            continue
        doc_sum, doc_grads = _step(module, doc)
        total += doc_sum
        for key, grad in doc_grads.items():
            grads[key] = grads.get(key, 0) + grad
    torch.testing.assert_close(packed_sum, total, rtol=1e-5, atol=1e-6)
    for key, grad in grads.items():  # fp32 sums in another order: tolerance to the scale
        scale = float(grad.abs().max())
        torch.testing.assert_close(packed_grads[key], grad, rtol=1e-4, atol=2e-5 * scale,
                                   msg=lambda m, key=key: f"{key}: {m}")  # fmt: skip


def test_teacher_and_student_see_the_same_packing():
    batch = packed_batch()
    module = _module(False)
    seen = {}
    for role in ("student", "teacher"):
        model = getattr(module, role)
        model.register_forward_pre_hook(
            lambda mod, args, kwargs, role=role: seen.update({role: kwargs["position_ids"]}),
            with_kwargs=True,
        )
    with pytest.warns(Warning, match="self.log"):
        module.training_step(batch, 0)
    assert seen["student"] is batch["position_ids"] and seen["teacher"] is batch["position_ids"]


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused_head"])
def test_a_model_without_position_ids_is_refused_on_a_packed_batch(fused):
    class NoPacking(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_llama(2)

        def forward(self, input_ids):
            return self.inner(input_ids)

        def hidden_states(self, input_ids):
            return self.inner.hidden_states(input_ids)

        def output_head(self):
            return self.inner.lm_head

    module = _module(fused, student=NoPacking())
    batch = packed_batch()
    method = "hidden_states" if fused else "forward"
    with pytest.raises(ValueError, match=rf"student \(NoPacking\) has no position_ids parameter "
                       rf"in {method}\(\).*SupportsPackedSequences.*no position_ids"):  # fmt: skip
        module.training_step(batch, 0)
    # Without position_ids in the batch the same model runs as before.
    plain = {k: batch[k] for k in ("input_ids", "labels")}
    with pytest.warns(Warning, match="self.log"):
        module.training_step(plain, 0)


def test_hf_packing_needs_a_transformers_that_isolates_documents(monkeypatch):
    """transformers < 4.54 ignores position_ids for the mask: documents would attend to each
    other silently, so packed batches are refused there."""
    pytest.importorskip("transformers")
    from lightning_kd.models.hf import causal_lm

    model = hf_model("llama")
    ids = torch.randint(0, 16, (1, 6))
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]])
    model(ids, position_ids=positions)  # the installed transformers isolates them
    monkeypatch.setattr(causal_lm, "_transformers_isolates_packed_sequences", lambda: False)
    with pytest.raises(ValueError, match=r"transformers >= 4\.56"):
        model(ids, position_ids=positions)
    model(ids)  # unpacked batches need nothing
