"""ULDLoss and HybridKDLoss: against a float64 reference, TRL's ULD and KDLoss, on real
tokenizer pairs; chunking, half precision and the input checks."""

from __future__ import annotations

import pytest
import torch

from lightning_kd.data.alignment import (
    align_offsets,
    encode_with_offsets,
    shared_token_ids,
    token_strings,
)
from lightning_kd.data.tokenizer import ByteTokenizer
from lightning_kd.losses import JSD, KDLoss, SkewKL
from lightning_kd.losses.cross_tokenizer_loss import HybridKDLoss, ULDLoss
from lightning_kd.losses.token_spans import TokenSpans
from lightning_kd.losses.vocab_map import VocabMap
from tests.helpers.bpe import trained_bpe
from tests.helpers.reference import assert_rel
from tests.helpers.trl_uld import trl_uld_loss

TEXT = "Héllo  wörld, the fox found a ball 🙂 and a cake.\n\n  The end."


def uld_reference(student, teacher, s_labels, t_labels, spans, temperature=1.0):
    """Per-span ULD in float64 with plain autograd, one span at a time."""
    s = student.double().reshape(-1, student.shape[-1])
    t = teacher.double().reshape(-1, teacher.shape[-1])
    sl, tl = s_labels.reshape(-1), t_labels.reshape(-1)
    out = []
    for k in range(spans.num_spans):
        vec = []
        for x, lab, start, n in (
            (s, sl, spans.student_start[k], spans.student_len[k]),
            (t, tl, spans.teacher_start[k], spans.teacher_len[k]),
        ):
            probs = torch.softmax(x[start : start + n] / temperature, -1)
            factor = torch.prod(probs[torch.arange(1, n), lab[start + 1 : start + n]])
            vec.append(torch.sort(probs[0] * factor, descending=True).values)
        width = max(v.numel() for v in vec)
        q, p = (torch.nn.functional.pad(v, (0, width - v.numel())) for v in vec)
        out.append((q - p).abs().sum())
    return torch.stack(out)


def _size(tok):
    return tok.vocab_size if isinstance(tok, ByteTokenizer) else tok.get_vocab_size()


def real_pair(text=TEXT, student_tok=None, teacher_tok=None, seed=0):
    """Student: a trained BPE (512 tokens); teacher: the byte tokenizer (by default). Logits are
    random, rows predict the text's tokens; spans from the real alignment."""
    bpe = student_tok or trained_bpe()
    byte = teacher_tok or ByteTokenizer()
    s_enc, t_enc = encode_with_offsets(bpe, text), encode_with_offsets(byte, text)
    spans = align_offsets(s_enc.offsets, t_enc.offsets, len(text))
    gen = torch.Generator().manual_seed(seed)
    vs, vt = _size(bpe), _size(byte)
    student = torch.randn(1, len(s_enc.ids), vs, generator=gen) * 2
    teacher = torch.randn(1, len(t_enc.ids), vt, generator=gen) * 2
    (torch.tensor([s_enc.ids]),)
    token_spans = TokenSpans.from_rows(
        [[(a.s_start, a.s_stop, a.t_start, a.t_stop) for a in spans]],
        len(s_enc.ids),
        len(t_enc.ids),
    )
    return (
        student,
        teacher,
        torch.tensor([s_enc.ids]),
        torch.tensor([t_enc.ids]),
        token_spans,
        s_enc,
        t_enc,
    )


@pytest.mark.parametrize("temperature, chunk_size", [(1.0, 0), (2.0, 7), (0.7, 1)])
def test_uld_matches_a_float64_reference_on_a_real_pair(chunk_size, temperature):
    student, teacher, sl, tl, spans, *_ = real_pair()
    assert int(spans.teacher_len.max()) > 1  # multi-row spans are exercised
    s = student.clone().requires_grad_()
    out = ULDLoss(temperature=temperature, chunk_size=chunk_size)(
        s, teacher, sl, tl, spans, return_per_span=True
    )
    (out.loss * 1.7).backward()
    ref_s = student.double().requires_grad_()
    ref = uld_reference(ref_s, teacher, sl, tl, spans, temperature)
    (ref.mean() * 1.7).backward()
    assert_rel(out.per_span, ref, 1e-5, "per-span ULD")
    assert_rel(out.loss, ref.mean(), 1e-5, "ULD loss")
    assert_rel(s.grad, ref_s.grad, 1e-4, "ULD gradient")
    assert not out.exact.any()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_matches_trl(temperature):
    # TRL walks byte offsets; on ASCII text character offsets are byte offsets. Both sides
    # are BPEs here (512 and 1000 tokens, trained on different corpora), so both sides have
    # multi-token spans.
    text = "The little fox juggled quantum xylophones near the zebra's old tree, 42 times."
    student, teacher, sl, tl, spans, s_enc, t_enc = real_pair(
        text, trained_bpe(512), trained_bpe(1000, seed=3)
    )
    assert int(spans.student_len.max()) > 1 and int(spans.teacher_len.max()) > 1
    s = student.clone().requires_grad_()
    ours = ULDLoss(temperature=temperature, chunk_size=5)(s, teacher, sl, tl, spans)
    ours.backward()
    ref_s = student.clone().requires_grad_()
    ref, s_groups, _t_groups = trl_uld_loss(
        ref_s[0], teacher[0], sl[0].tolist(), tl[0].tolist(), s_enc.offsets, t_enc.offsets,
        temperature,
    )  # fmt: skip
    ref.backward()
    # On this text TRL's greedy walk and our clean boundaries give the same groups.
    assert [(g[0], g[-1] + 1) for g in s_groups] == list(
        zip(
            spans.student_start.tolist(),
            (spans.student_start + spans.student_len).tolist(),
            strict=False,
        )
    )
    assert_rel(ours, ref, 1e-5, "ULD vs TRL")
    assert_rel(s.grad, ref_s.grad, 1e-4, "ULD gradient vs TRL")


DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "tvd", JSD(0.3), SkewKL(0.25)]


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_hybrid_with_one_tokenizer_equals_kd_loss(divergence):
    gen = torch.Generator().manual_seed(1)
    vocab = 37
    student = torch.randn(2, 6, vocab, generator=gen) * 3
    teacher = torch.randn(2, 6, vocab, generator=gen) * 3
    labels = torch.randint(0, vocab, (2, 6), generator=gen)
    labels[0, :2] = -100
    labels[1, 4] = -100
    rows = [[(i, i + 1, i, i + 1) for i in range(6) if labels[b, i] != -100] for b in range(2)]
    spans = TokenSpans.from_rows(rows, 6, 6)
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    hybrid = HybridKDLoss(VocabMap.identity(vocab), divergence, temperature=2.0, chunk_size=4)
    out = hybrid(s1, teacher, labels, labels, spans, return_per_span=True)
    (out.loss * 3.0).backward()
    ref = KDLoss(temperature=2.0, divergence=divergence)(s2, teacher, labels, return_per_token=True)
    (ref.loss * 3.0).backward()
    assert out.exact.all()
    assert_rel(out.loss, ref.loss, 1e-6, "loss")
    assert_rel(out.per_span, ref.per_token_div[labels != -100], 1e-6, "per span")
    assert_rel(s1.grad, s2.grad, 1e-6, "gradient")


def test_hybrid_on_a_real_pair_is_exact_on_shared_single_tokens_and_uld_elsewhere():
    student, teacher, sl, tl, spans, _s_enc, _t_enc = real_pair()
    s_ids, t_ids = shared_token_ids(token_strings(trained_bpe()), token_strings(ByteTokenizer()))
    vmap = VocabMap(s_ids, t_ids, student.shape[-1], teacher.shape[-1])
    s = student.clone().requires_grad_()
    out = HybridKDLoss(vmap, "forward_kl", chunk_size=6)(
        s, teacher, sl, tl, spans, return_per_span=True
    )
    out.loss.backward()
    single = (spans.student_len == 1) & (spans.teacher_len == 1)
    assert out.exact.any() and (~out.exact).any() and bool((out.exact <= single).all())
    # Exact spans: KL over the shared tokens, both renormalised.
    e = out.exact
    s_rows = student[0, spans.student_start[e]][:, s_ids]
    t_rows = teacher[0, spans.teacher_start[e]][:, t_ids]
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(s_rows.double(), -1), torch.log_softmax(t_rows.double(), -1),
        log_target=True, reduction="none",
    ).sum(-1)  # fmt: skip
    assert_rel(out.per_span[e], kl, 1e-5, "exact spans")
    uld = uld_reference(student, teacher, sl, tl, spans)
    assert_rel(out.per_span[~e], uld[~e], 1e-5, "ULD spans")
    # The gradient is that of the same sum in float64.
    ref_s = student.double().requires_grad_()
    ref_rows = ref_s[0, spans.student_start[e]][:, s_ids]
    kl_ref = torch.nn.functional.kl_div(
        torch.log_softmax(ref_rows, -1), torch.log_softmax(t_rows.double(), -1),
        log_target=True, reduction="sum",
    )  # fmt: skip
    total = (kl_ref + uld_reference(ref_s, teacher, sl, tl, spans)[~e].sum()) / spans.num_spans
    total.backward()
    assert_rel(s.grad, ref_s.grad, 1e-4, "hybrid gradient")


def test_half_precision_logits_are_computed_in_fp32():
    student, teacher, sl, tl, spans, *_ = real_pair()
    s = student.bfloat16().requires_grad_()
    loss = ULDLoss(chunk_size=8)(s, teacher.bfloat16(), sl, tl, spans)
    loss.backward()
    assert loss.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    ref = uld_reference(student.bfloat16(), teacher.bfloat16(), sl, tl, spans).mean()
    assert_rel(loss, ref, 1e-4, "bf16 ULD")


def test_no_spans_gives_a_connected_zero():
    s = torch.randn(1, 3, 5, requires_grad=True)
    empty = TokenSpans.from_rows([[]], 3, 4)
    loss = ULDLoss()(s, torch.randn(1, 4, 6), torch.zeros(1, 3, dtype=torch.long),
                     torch.zeros(1, 4, dtype=torch.long), empty)  # fmt: skip
    loss.backward()
    assert loss.item() == 0.0 and s.grad.abs().sum() == 0


def _inputs():
    s, t = torch.randn(1, 4, 5), torch.randn(1, 3, 6)
    return s, t, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)


@pytest.mark.parametrize(
    "rows, match",
    [
        ([(0, 2, 0, 1), (1, 3, 1, 2)], "disjoint"),
        ([(0, 5, 0, 1)], "inside"),
    ],
)
def test_bad_spans_are_refused(rows, match):
    s, t, sl, tl = _inputs()
    spans = TokenSpans(
        *(
            torch.tensor(x)
            for x in zip(*[(a, b - a, c, d - c) for a, b, c, d in rows], strict=False)
        )
    )
    with pytest.raises(ValueError, match=match):
        ULDLoss()(s, t, sl, tl, spans)


def test_ignored_label_inside_a_span_is_refused():
    s, t, sl, tl = _inputs()
    sl[0, 1] = -100
    with pytest.raises(ValueError, match="predict a vocabulary id"):
        ULDLoss()(s, t, sl, tl, TokenSpans.from_rows([[(0, 2, 0, 1)]], 4, 3))


def test_options_and_vocab_map_are_checked():
    s, t, sl, tl = _inputs()
    with pytest.raises(ValueError, match="vocab_map is for vocabularies of 5"):
        HybridKDLoss(VocabMap.identity(5))(
            s, t, sl, tl, TokenSpans.from_rows([[(0, 1, 0, 1)]], 4, 3)
        )
    with pytest.raises(ValueError, match="temperature"):
        ULDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="uld_weight"):
        ULDLoss(uld_weight=-1.0)
    with pytest.raises(ValueError, match="shares no token"):
        HybridKDLoss(VocabMap([], [], 5, 6))
    with pytest.raises(ValueError, match="distinct"):
        VocabMap([1, 1], [0, 2], 5, 6)
    with pytest.raises(ValueError, match="leading shape"):
        ULDLoss()(s, t, sl[:, :2], tl, TokenSpans.from_rows([[(0, 1, 0, 1)]], 4, 3))
