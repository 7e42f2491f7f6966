"""Two tokenizations of the same text and the spans where they agree (cross-tokenizer KD).

A teacher and a student with different tokenizers cut the same text into different tokens.
:func:`encode_with_offsets` gives each token's character range in the text (HF fast tokenizers,
``tokenizers.Tokenizer``, the repository's :class:`~lightning_kd.data.tokenizer.ByteTokenizer`
and :class:`~lightning_kd.data.tokenizer.HFTokenizer`), and :func:`align_offsets` pairs them up
into :class:`Span` s: a run of student tokens and a run of teacher tokens that cover exactly the
same characters, cut only where *both* tokenizations have a clean boundary.

Rules (tested on real tokenizer pairs in ``tests/test_token_alignment.py``):

- A *clean boundary* of a tokenization at character ``c``: every token so far ends at or before
  ``c`` and every later token starts at or after ``c``. Byte-level tokenizers split one character
  into several tokens that all report that character's range; no boundary falls inside them.
- A span runs from one common clean boundary to the next and holds every token of each side
  between them, and is kept only if both sides' tokens cover the same characters (a side that
  skips characters the other covers, e.g. where a chat template's markup merged into a token
  was left out, breaks the span).
- Tokens with an empty range (a BOS with no text) belong to no span; a span whose characters
  one side covers only with such tokens, or not at all, is dropped (it would compare a
  distribution with nothing).
- Only tokens inside ``[0, len(text))`` take part: the offsets are those of one text (for chat
  data, each model renders its own template and the caller maps each message's content onto
  shared coordinates, see :func:`content_offsets`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, NamedTuple

Offsets = list[tuple[int, int]]


class Encoding(NamedTuple):
    """A text's token ids and each token's ``[start, end)`` character range in that text."""

    ids: list[int]
    offsets: Offsets


class Span(NamedTuple):
    """Tokens ``student[s_start:s_stop]`` and ``teacher[t_start:t_stop]``, which cover the same
    characters ``text[c_start:c_stop]``."""

    s_start: int
    s_stop: int
    t_start: int
    t_stop: int
    c_start: int
    c_stop: int


def _byte_offsets_of(text: str) -> Offsets:
    """The character range of each UTF-8 byte of ``text`` (a multi-byte character's bytes all
    report that character)."""
    out: Offsets = []
    for i, ch in enumerate(text):
        out.extend([(i, i + 1)] * len(ch.encode("utf-8")))
    return out


def encode_with_offsets(tokenizer: Any, text: str) -> Encoding:
    """``text``'s tokens (no special tokens added) with their character ranges.

    Args:
        tokenizer: a ``transformers`` fast tokenizer, a ``tokenizers.Tokenizer``, a
            :class:`~lightning_kd.data.tokenizer.ByteTokenizer` or an
            :class:`~lightning_kd.data.tokenizer.HFTokenizer`.
        text: any string.

    Returns:
        An :class:`Encoding` with one ``(start, end)`` per id.

    Raises:
        ValueError: for a tokenizer that cannot report offsets (a slow ``transformers`` one).
    """
    from lightning_kd.data.tokenizer import ByteTokenizer, HFTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return Encoding(tokenizer.encode(text), _byte_offsets_of(text))
    if isinstance(tokenizer, HFTokenizer):
        tokenizer = tokenizer.hf_tokenizer
    if hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "get_vocab_size"):
        enc = tokenizer.encode(text, add_special_tokens=False)  # tokenizers.Tokenizer
        return Encoding(list(enc.ids), [tuple(o) for o in enc.offsets])
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} cannot report character offsets; pass a fast "
            "(Rust-backed) tokenizer, a tokenizers.Tokenizer or a ByteTokenizer."
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return Encoding(list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]])


def _clean_cuts(offsets: Offsets, limit: int) -> dict[int, int]:
    """``{character position: number of tokens before it}`` for every clean boundary."""
    cuts = {0: 0}
    reach = 0
    for i, (start, end) in enumerate(offsets):
        if start < reach:  # overlaps what came before: no boundary at the earlier cut
            cuts.pop(reach, None)
        reach = max(reach, end)
        if reach <= limit and (i + 1 == len(offsets) or offsets[i + 1][0] >= reach):
            cuts[reach] = i + 1
    return cuts


def _check_offsets(name: str, offsets: Offsets, limit: int) -> None:
    for i, (start, end) in enumerate(offsets):
        if not 0 <= start <= end <= limit:
            raise ValueError(
                f"{name} offsets[{i}] = {(start, end)} is not a range inside [0, {limit}]."
            )
        if i and start < offsets[i - 1][0]:
            raise ValueError(
                f"{name} offsets must start in text order, got {offsets[i - 1]} then "
                f"{(start, end)} at {i}."
            )


def align_offsets(student: Offsets, teacher: Offsets, text_length: int) -> list[Span]:
    """The spans on which two tokenizations of one text agree (see the module's rules).

    Args:
        student: ``(start, end)`` character range of each student token, in text order.
        teacher: the same for the teacher's tokens.
        text_length: length of the text (the ranges lie inside ``[0, text_length]``).

    Returns:
        The spans in text order; consecutive spans share their boundary character. Tokens in
        no span (empty ranges, or ranges across a boundary only one side has, at the ends) are
        left out.

    Raises:
        ValueError: for ranges outside the text or not in text order.
    """
    _check_offsets("student", student, text_length)
    _check_offsets("teacher", teacher, text_length)
    s_cuts, t_cuts = _clean_cuts(student, text_length), _clean_cuts(teacher, text_length)
    common = sorted(set(s_cuts) & set(t_cuts))
    spans = []
    for lo, hi in itertools.pairwise(common):
        s_lo, s_hi = _trim(student, s_cuts[lo], s_cuts[hi])
        t_lo, t_hi = _trim(teacher, t_cuts[lo], t_cuts[hi])
        same = _covered(student[s_lo:s_hi]) == _covered(teacher[t_lo:t_hi])
        if s_lo < s_hi and t_lo < t_hi and same:
            spans.append(Span(s_lo, s_hi, t_lo, t_hi, lo, hi))
    return spans


def _covered(offsets: Offsets) -> list[tuple[int, int]]:
    """The characters ``offsets`` cover, as sorted disjoint ranges."""
    merged: list[tuple[int, int]] = []
    for a, b in sorted(o for o in offsets if o[0] < o[1]):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _trim(offsets: Offsets, lo: int, hi: int) -> tuple[int, int]:
    """Tokens ``[lo, hi)`` without the empty-range tokens at either end."""
    while lo < hi and offsets[lo][0] == offsets[lo][1]:
        lo += 1
    while hi > lo and offsets[hi - 1][0] == offsets[hi - 1][1]:
        hi -= 1
    return lo, hi


def content_offsets(offsets: Offsets, start: int, stop: int) -> tuple[list[int], Offsets]:
    """The tokens lying wholly inside ``[start, stop)`` of a rendered text, with ranges relative
    to ``start``: how a chat template's tokens are mapped onto a message's own characters.

    Returns:
        ``(indices, ranges)``: the indices of the non-empty tokens inside the range and their
        ranges shifted by ``-start``. A token across ``start`` or ``stop`` (template markup
        merged with content) is left out; the characters it covered are then covered on this
        side by no token, so no span includes them.
    """
    indices, ranges = [], []
    for i, (a, b) in enumerate(offsets):
        if start <= a < b <= stop:
            indices.append(i)
            ranges.append((a - start, b - start))
    return indices, ranges


# GPT-2's byte → printable character table, the alphabet of byte-level BPE vocabularies.
@lru_cache(maxsize=1)
def _byte_alphabet() -> list[str]:
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def token_strings(tokenizer: Any) -> list[str | None]:
    """Each id's token string (``None`` for an id with none), the key of the vocabulary
    mapping between two tokenizers. ``ByteTokenizer``'s byte ids are written in the byte-level
    BPE alphabet (GPT-2's), so its bytes match a byte-level BPE's single-byte tokens; its EOS
    and PAD have no string.

    Args:
        tokenizer: as for :func:`encode_with_offsets`.
    """
    from lightning_kd.data.tokenizer import ByteTokenizer, HFTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return [*_byte_alphabet(), None, None]
    if isinstance(tokenizer, HFTokenizer):
        tokenizer = tokenizer.hf_tokenizer
    vocab = tokenizer.get_vocab()
    size = max(vocab.values(), default=-1) + 1
    if hasattr(tokenizer, "__len__"):
        size = max(size, len(tokenizer))
    out: list[str | None] = [None] * size
    for string, index in vocab.items():
        out[index] = string
    return out


def shared_token_ids(
    student_strings: Sequence[str | None], teacher_strings: Sequence[str | None]
) -> tuple[list[int], list[int]]:
    """``(student_ids, teacher_ids)``: the ids of the token strings both vocabularies hold, in
    the student's id order (the vocabulary mapping of the hybrid loss)."""
    teacher_of = {s: i for i, s in enumerate(teacher_strings) if s is not None}
    pairs = [(i, teacher_of[s]) for i, s in enumerate(student_strings) if s in teacher_of]
    return [p[0] for p in pairs], [p[1] for p in pairs]
