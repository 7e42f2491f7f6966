"""``CrossTokenizerDataModule``: each document tokenised by the student's and the teacher's
tokenizer, with the aligned spans between them (cross-tokenizer distillation).

One document per sequence (no packing). Each document is cut to the characters both
tokenizations hold within their sequence lengths, each side is tokenised on its own, and
:func:`~lightning_kd.data.alignment.align_offsets` finds the spans where both cut the text at
the same places. Row ``r`` of a model's logits predicts its token ``r + 1``, so a span of tokens
``[a, b)`` becomes rows ``[a − 1, b − 1)``; a span holding either side's first token (which no
row predicts) is dropped.

Batches: ``input_ids`` / ``labels`` [B, S] (the student's, as for every data module),
``teacher_input_ids`` / ``teacher_labels`` [B, S_t], ``xtok_spans`` [B, S, 4] int64 (each row
``(s_start, s_stop, t_start, t_stop)`` in that example's rows, -1 past its spans) and ``index``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from lightning_kd.checks import check_int
from lightning_kd.data.alignment import align_offsets, encode_with_offsets
from lightning_kd.data.corpus import generate_corpus
from lightning_kd.data.split_datamodule import SplitDataModule, check_paths
from lightning_kd.data.text_files import SUPPORTED_EXTENSIONS, read_documents
from lightning_kd.data.tokenizer import ByteTokenizer, HFTokenizer


def encode_pair(
    text: str,
    student_tokenizer: ByteTokenizer | HFTokenizer,
    teacher_tokenizer: ByteTokenizer | HFTokenizer,
    seq_len: int,
    teacher_seq_len: int,
    pad_ids: tuple[int, int],
    ignore_index: int,
) -> dict[str, Tensor]:
    """One training example of cross-tokenizer distillation (see the module docstring).

    Returns:
        The example's tensors: ``input_ids``, ``labels`` [seq_len], ``teacher_input_ids``,
        ``teacher_labels`` [teacher_seq_len] and ``xtok_spans`` [seq_len, 4].
    """
    s_enc = encode_with_offsets(student_tokenizer, text)
    t_enc = encode_with_offsets(teacher_tokenizer, text)
    # The characters both sides hold: up to the end of each side's last token that fits.
    cut = len(text)
    for enc, length in ((s_enc, seq_len + 1), (t_enc, teacher_seq_len + 1)):
        if len(enc.ids) > length:
            cut = min(cut, enc.offsets[length][0])
    s_keep = [i for i, (_, b) in enumerate(s_enc.offsets[: seq_len + 1]) if b <= cut]
    t_keep = [i for i, (_, b) in enumerate(t_enc.offsets[: teacher_seq_len + 1]) if b <= cut]
    s_ids = [s_enc.ids[i] for i in s_keep]
    t_ids = [t_enc.ids[i] for i in t_keep]
    spans = align_offsets(
        [s_enc.offsets[i] for i in s_keep], [t_enc.offsets[i] for i in t_keep], cut
    )
    out = {}
    for prefix, ids, length, pad in (
        ("", s_ids, seq_len, pad_ids[0]),
        ("teacher_", t_ids, teacher_seq_len, pad_ids[1]),
    ):
        window = torch.full((length + 1,), pad, dtype=torch.long)
        window[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels = window[1:].clone()
        labels[max(len(ids) - 1, 0) :] = ignore_index
        out[f"{prefix}input_ids"], out[f"{prefix}labels"] = window[:-1], labels
    rows = torch.full((seq_len, 4), -1, dtype=torch.long)
    kept = [
        (s.s_start - 1, s.s_stop - 1, s.t_start - 1, s.t_stop - 1)
        for s in spans
        if s.s_start > 0 and s.t_start > 0
    ]
    if kept:
        rows[: len(kept)] = torch.tensor(kept, dtype=torch.long)
    out["xtok_spans"] = rows
    return out


class PairedDocuments(Dataset):
    """Examples already encoded by :func:`encode_pair`, one per document."""

    def __init__(self, examples: Sequence[dict[str, Tensor]]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} out of range [0, {len(self)}).")
        return {**self.examples[index], "index": torch.tensor(index)}


class CrossTokenizerDataModule(SplitDataModule):
    """Documents tokenised by both models' tokenizers, with the spans where they agree.

    Args:
        tokenizer: the student's: ``"byte"`` or a local Hugging Face tokenizer directory.
        teacher_tokenizer: the teacher's, likewise.
        paths: ``.txt`` / ``.jsonl`` files, directories or globs; None uses the generated
            story corpus (``synthetic_chars`` characters).
        seq_len: student tokens per sequence, S.
        teacher_seq_len: teacher tokens per sequence (default: ``seq_len``).
        batch_size, val_fraction, seed, num_workers, ignore_index: as for
            :class:`~lightning_kd.data.TextDataModule`.
        text_field: the key of the text in JSONL objects.
        synthetic_chars: size of the generated corpus.
        cache_dir: unused (the pairs are encoded in ``setup``, in memory); kept for the shared
            options.

    Raises:
        ValueError: for an argument of the wrong type or range, an ``ignore_index`` that is a
            token id of either tokenizer, or a corpus with no text.
    """

    def __init__(
        self,
        tokenizer: str = "byte",
        teacher_tokenizer: str = "byte",
        paths: list[str] | None = None,
        seq_len: int = 128,
        teacher_seq_len: int | None = None,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        ignore_index: int = -100,
        text_field: str = "text",
        synthetic_chars: int = 200_000,
        cache_dir: str = ".cache/data",
    ) -> None:
        super().__init__(
            tokenizer, seq_len, batch_size, val_fraction, seed, cache_dir, num_workers,
            ignore_index,
        )  # fmt: skip
        if not isinstance(teacher_tokenizer, str) or not teacher_tokenizer:
            raise ValueError(
                f"teacher_tokenizer must be 'byte' or a local directory, got {teacher_tokenizer!r}."
            )
        self._teacher_tokenizer = (
            ByteTokenizer() if teacher_tokenizer == "byte" else HFTokenizer(teacher_tokenizer)
        )
        vocab = self._teacher_tokenizer.vocab_size
        if 0 <= ignore_index < vocab:
            raise ValueError(
                f"ignore_index={ignore_index} is a token id of the teacher's tokenizer; expected "
                f"a value outside [0, {vocab}), e.g. -100."
            )
        self.teacher_seq_len = check_int(
            "teacher_seq_len", seq_len if teacher_seq_len is None else teacher_seq_len, 1
        )
        self.paths = check_paths(paths, SUPPORTED_EXTENSIONS)
        self.text_field = text_field
        self.synthetic_chars = check_int("synthetic_chars", synthetic_chars, 1)

    @property
    def teacher_tokenizer(self) -> ByteTokenizer | HFTokenizer:
        """The teacher's tokenizer."""
        return self._teacher_tokenizer

    @property
    def teacher_vocab_size(self) -> int:
        return self._teacher_tokenizer.vocab_size

    def _documents(self) -> list[str]:
        if self.paths is None:
            docs = generate_corpus(self.synthetic_chars, seed=self.seed)
        else:
            docs = list(read_documents(self.paths, self.text_field))
        docs = [d for d in docs if d]
        if not docs:
            raise ValueError(f"no text found in {self.paths!r}: every document is empty.")
        return docs

    def setup(self, stage: str | None = None) -> None:
        """Encode every document with both tokenizers and split them (deterministic)."""
        if self._train is not None:
            return
        docs = self._documents()
        pads = (self._tokenizer.pad_id, self._teacher_tokenizer.pad_id)
        examples = [
            encode_pair(
                text,
                self._tokenizer,
                self._teacher_tokenizer,
                self.seq_len,
                self.teacher_seq_len,
                pads,
                self.ignore_index,
            )
            for text in tqdm(docs, desc="Aligning tokenizations", unit=" docs", delay=2.0)
        ]
        is_val = self._held_out(len(examples)).tolist()
        self._train = PairedDocuments([e for e, v in zip(examples, is_val, strict=True) if not v])
        self._val = PairedDocuments([e for e, v in zip(examples, is_val, strict=True) if v])
