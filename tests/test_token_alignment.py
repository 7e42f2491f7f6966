"""Two tokenizations of one text and the spans where they agree, on real tokenizer pairs:
SmolLM2's (49,152 tokens), the byte tokenizer and a BPE trained on the corpus."""

from __future__ import annotations

import pytest

from lightning_kd.data.alignment import (
    align_offsets,
    content_offsets,
    encode_with_offsets,
    shared_token_ids,
    token_strings,
)
from lightning_kd.data.tokenizer import ByteTokenizer
from tests.helpers.bpe import trained_bpe
from tests.helpers.real_model import needs_real_model, smollm2_tokenizer

TEXTS = [
    "Once upon a time, a little fox found a red ball.",
    "Héllo  wörld 🙂\n\n  naïve café — ½ × 3",
    "tabs\tand   runs of    spaces\n\n\n  and trailing   ",
    "<|im_start|>user\nWhat did Mia find?<|im_end|>\n<|im_start|>assistant\nA 🦊 and 日本語.",
    "",
    "a",
]


def _decode_bytes(pieces: list[bytes]) -> str:
    return b"".join(pieces).decode("utf-8")


def check_spans(text, student, teacher):
    """Every span covers the same characters on both sides, spans are ordered and disjoint."""
    spans = align_offsets(student.offsets, teacher.offsets, len(text))
    last_s = last_t = last_c = 0
    for span in spans:
        assert span.s_start >= last_s and span.t_start >= last_t and span.c_start >= last_c
        assert span.s_start < span.s_stop and span.t_start < span.t_stop
        for enc, lo, hi in (
            (student, span.s_start, span.s_stop),
            (teacher, span.t_start, span.t_stop),
        ):
            covered = set()
            for a, b in enc.offsets[lo:hi]:
                covered.update(range(a, b))
            assert covered == set(range(span.c_start, span.c_stop))
        last_s, last_t, last_c = span.s_stop, span.t_stop, span.c_stop
    return spans


def _tokenizers():
    return {"bytes": ByteTokenizer(), "bpe": trained_bpe()}


@pytest.mark.parametrize("text", TEXTS)
def test_byte_and_bpe_spans_cover_the_same_text(text):
    toks = _tokenizers()
    byte_enc = encode_with_offsets(toks["bytes"], text)
    bpe_enc = encode_with_offsets(toks["bpe"], text)
    spans = check_spans(text, bpe_enc, byte_enc)
    # The byte tokenizer cuts at every character, so every BPE token boundary that is not
    # inside a character is common: the spans tile the whole text.
    assert "".join(text[s.c_start : s.c_stop] for s in spans) == text
    for s in spans:
        assert (
            ByteTokenizer().decode(byte_enc.ids[s.t_start : s.t_stop]) == text[s.c_start : s.c_stop]
        )
        assert (
            trained_bpe().decode(bpe_enc.ids[s.s_start : s.s_stop], skip_special_tokens=False)
            == text[s.c_start : s.c_stop]
        )


def test_identical_tokenizations_give_one_token_spans():
    # (A character split into several byte tokens stays one span, on both sides alike.)
    text = TEXTS[0] + TEXTS[2]
    enc = encode_with_offsets(trained_bpe(), text)
    spans = align_offsets(enc.offsets, enc.offsets, len(text))
    assert [(s.s_start, s.s_stop) for s in spans] == [(i, i + 1) for i in range(len(enc.ids))]
    assert all((s.t_start, s.t_stop) == (s.s_start, s.s_stop) for s in spans)


def test_a_character_split_into_bytes_holds_no_boundary():
    # SmolLM2-style byte tokens of one character report the same range: no cut inside.
    student = [(0, 1), (1, 2), (1, 2), (2, 3)]  # "a", two bytes of "é", "b"
    teacher = [(0, 2), (2, 3)]
    spans = align_offsets(student, teacher, 3)
    assert [(s.s_start, s.s_stop, s.t_start, s.t_stop) for s in spans] == [
        (0, 3, 0, 1),
        (3, 4, 1, 2),
    ]


def test_uncovered_characters_break_a_span():
    # The student left out a token over characters 0..2 (merged template markup): the span
    # [0, 4) would compare different text, so it is dropped; [4, 6) is kept.
    spans = align_offsets([(2, 4), (4, 6)], [(0, 4), (4, 6)], 6)
    assert [(s.c_start, s.c_stop) for s in spans] == [(4, 6)]


def test_empty_range_tokens_join_no_span():
    spans = align_offsets([(0, 0), (0, 2), (2, 2)], [(0, 1), (1, 2)], 2)
    assert [(s.s_start, s.s_stop, s.t_start, s.t_stop) for s in spans] == [(1, 2, 0, 2)]


@pytest.mark.parametrize(
    "student, teacher, match",
    [
        ([(0, 5)], [(0, 1)], r"inside \[0, 3\]"),
        ([(2, 3), (0, 1)], [(0, 1)], "text order"),
        ([(1, 0)], [(0, 1)], "not a range"),
    ],
)
def test_bad_offsets_are_refused(student, teacher, match):
    with pytest.raises(ValueError, match=match):
        align_offsets(student, teacher, 3)


def test_content_offsets_leave_out_tokens_across_the_edges():
    indices, ranges = content_offsets([(0, 3), (3, 6), (6, 9), (9, 12)], 4, 12)
    assert indices == [2, 3] and ranges == [(2, 5), (5, 8)]


def test_byte_token_strings_match_a_byte_level_bpe():
    bpe_strings = token_strings(trained_bpe())
    byte_strings = token_strings(ByteTokenizer())
    s_ids, t_ids = shared_token_ids(byte_strings, bpe_strings)
    assert len(s_ids) == 256  # every byte is in the BPE's initial alphabet
    for s, t in zip(s_ids, t_ids, strict=True):
        assert trained_bpe().decode([t]) == ByteTokenizer().decode([s]) or s >= 128


@needs_real_model
@pytest.mark.real_model
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("other", ["bytes", "bpe"])
def test_smollm2_against_other_tokenizers(text, other):
    smol = smollm2_tokenizer()
    student = encode_with_offsets(_tokenizers()[other], text)
    teacher = encode_with_offsets(smol, text)
    spans = check_spans(text, student, teacher)
    for s in spans:
        assert (
            smol.decode(teacher.ids[s.t_start : s.t_stop], skip_special_tokens=False)
            == text[s.c_start : s.c_stop]
        )
    if other == "bytes":  # the byte side cuts at every character: nothing is lost
        assert "".join(text[s.c_start : s.c_stop] for s in spans) == text


@needs_real_model
@pytest.mark.real_model
def test_smollm2_markup_is_one_token_and_aligns_as_a_span():
    smol = smollm2_tokenizer()
    text = TEXTS[3]
    teacher = encode_with_offsets(smol, text)
    student = encode_with_offsets(ByteTokenizer(), text)
    spans = check_spans(text, student, teacher)
    markup = [s for s in spans if text[s.c_start : s.c_stop] == "<|im_start|>"]
    assert len(markup) == 2 and all(s.t_stop - s.t_start == 1 for s in markup)
    s_ids, t_ids = shared_token_ids(token_strings(smol), token_strings(smol))
    assert s_ids == t_ids == list(range(len(smol)))
