"""The divergence to the teacher on the student's own samples (the on-policy demo's table)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_kd import TinyLlama
from lightning_kd.evaluation.own_samples import divergence_on_own_samples
from lightning_kd.rollout import SamplingOptions

V, IGNORE, PAD, EOS = 24, -100, 0, 1


def _tiny(seed: int) -> TinyLlama:
    torch.manual_seed(seed)
    model = TinyLlama(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                      max_seq_len=64)  # fmt: skip
    return model.double().eval()


def _batch() -> dict[str, torch.Tensor]:
    """Two conversations of different prompt lengths (3 and 5 tokens), right-padded."""
    input_ids = torch.tensor([[5, 6, 7, 8, 9, PAD, PAD], [4, 5, 6, 7, 8, 9, 10]])
    labels = torch.full_like(input_ids, IGNORE)
    labels[0, 2:4] = input_ids[0, 3:5]  # first target at position 2: the prompt is 3 tokens
    labels[1, 4:6] = input_ids[1, 5:7]
    return {"input_ids": input_ids, "labels": labels}


@torch.no_grad()
def _reference(student, teacher, steps: int) -> tuple[float, float, int]:
    """Greedy completions, one unpadded row at a time, scored token by token in float64."""
    forward = reverse = 0.0
    tokens = 0
    for prompt in ([5, 6, 7], [4, 5, 6, 7, 8]):
        ids = list(prompt)
        for _ in range(steps):
            s_log = F.log_softmax(student(torch.tensor([ids]))[0, -1], -1)
            t_log = F.log_softmax(teacher(torch.tensor([ids]))[0, -1], -1)
            nxt = int(s_log.argmax())
            forward += float((t_log.exp() * (t_log - s_log)).sum())
            reverse += float((s_log.exp() * (s_log - t_log)).sum())
            tokens += 1
            ids.append(nxt)
            if nxt == EOS:
                break
    return forward, reverse, tokens


def test_greedy_own_sample_divergences_equal_a_row_by_row_reference():
    student, teacher = _tiny(0), _tiny(1)
    options = SamplingOptions(max_new_tokens=6, temperature=0.0)
    got = divergence_on_own_samples(student, teacher, [_batch()], options=options,
                                    eos_token_id=EOS, pad_token_id=PAD)  # fmt: skip
    forward, reverse, tokens = _reference(student, teacher, 6)
    assert got["tokens"] == tokens
    assert got["kl_to_teacher"] == pytest.approx(forward / tokens, rel=1e-9)
    assert got["reverse_kl"] == pytest.approx(reverse / tokens, rel=1e-9)
    assert got["kl_to_teacher"] > 0 and got["reverse_kl"] > 0


def test_a_student_equal_to_its_teacher_is_at_zero_and_max_batches_is_honoured():
    model = _tiny(0)
    options = SamplingOptions(max_new_tokens=4, temperature=1.0)
    got = divergence_on_own_samples(model, model, [_batch(), _batch()], options=options,
                                    max_batches=1, pad_token_id=PAD)  # fmt: skip
    assert got["tokens"] == 2 * 4  # no EOS: every row samples max_new_tokens, one batch only
    assert abs(got["kl_to_teacher"]) < 1e-12 and abs(got["reverse_kl"]) < 1e-12


def test_rows_without_a_prompt_split_are_refused():
    batch = _batch()
    batch["labels"][1] = IGNORE
    with pytest.raises(ValueError, match="no supervised label"):
        divergence_on_own_samples(_tiny(0), _tiny(1), [batch], options=SamplingOptions(2))
