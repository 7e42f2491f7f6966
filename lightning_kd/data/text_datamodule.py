"""``TextDataModule``: text files (or the generated story corpus) to next-token batches.

The pipeline: documents (``read_documents`` or ``generate_corpus``) -> byte tokens with an EOS
after each document, cached once as a tensor under ``cache_dir`` (``prepare_data``) -> a
document-level train/val split (``setup``) -> fixed-length sequences -> batches of
``{"input_ids": [B, S], "labels": [B, S], "index": [B]}`` (int64), the format
``DistillationModule`` takes: ``labels[:, t]`` is the token after ``input_ids[:, t]``, or
``ignore_index`` where that token is padding; ``index`` is each sequence's index in its split
(what an offline teacher cache is keyed on).

With ``packing=True`` (the default) the documents are concatenated, EOS-separated, and cut
into consecutive sequences, so there is no padding. With ``packing=False`` each sequence is one
document, truncated to ``seq_len + 1`` tokens or padded with PAD.

Training batches come from a :class:`~lightning_kd.data.sampler.ResumableDataLoader`: a
per-epoch shuffle, one shard per data-parallel rank (all tensor-parallel ranks of a replica
get the same batches), and a position that Lightning checkpoints, so a resumed run continues
mid-epoch with the next batch. Validation is sequential, also sharded over data parallel.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from lightning_kd.checks import check_bool, check_int
from lightning_kd.data.corpus import CORPUS_VERSION, expand_paths, generate_corpus, read_documents
from lightning_kd.data.split_datamodule import SplitDataModule, check_paths
from lightning_kd.data.text_files import SUPPORTED_EXTENSIONS, check_encoding
from lightning_kd.data.token_cache import TokenCache

#: Seconds of tokenising before a progress bar appears.
_PROGRESS_DELAY_S = 2.0


class PackedSequences(Dataset):
    """Consecutive ``seq_len``-token windows of a token stream (no padding).

    Sequence ``i`` is ``stream[i·S : i·S + S]`` with labels ``stream[i·S + 1 : i·S + S + 1]``,
    so every token of the stream (except the first) is a target exactly once.

    Args:
        stream: [T] integer token ids.
        seq_len: S.
    """

    def __init__(self, stream: Tensor, seq_len: int) -> None:
        self.stream = stream
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max((len(self.stream) - 1) // self.seq_len, 0)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} out of range [0, {len(self)}).")
        begin = index * self.seq_len
        window = self.stream[begin : begin + self.seq_len + 1].long()
        return {"input_ids": window[:-1], "labels": window[1:], "index": torch.tensor(index)}


class DocumentSequences(Dataset):
    """One document per sequence, truncated to ``seq_len + 1`` tokens or padded with PAD.

    Args:
        tokens: [T] integer token ids of all documents, each followed by its EOS.
        offsets: [D + 1] int64, document ``d`` is ``tokens[offsets[d]:offsets[d + 1]]``.
        documents: [N] int64, the documents of this dataset (indices into ``offsets``).
        seq_len: S.
        pad_id: the PAD token id (fills input positions past the document).
        ignore_index: the label of targets past the document. Masking is by position, not
            by token id, so a tokenizer whose PAD falls back to EOS still trains on EOS.
    """

    def __init__(
        self,
        tokens: Tensor,
        offsets: Tensor,
        documents: Tensor,
        seq_len: int,
        pad_id: int,
        ignore_index: int,
    ) -> None:
        self.tokens = tokens
        self.offsets = offsets
        self.documents = documents
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} out of range [0, {len(self)}).")
        doc = int(self.documents[index])
        begin = int(self.offsets[doc])
        end = min(int(self.offsets[doc + 1]), begin + self.seq_len + 1)
        window = torch.full((self.seq_len + 1,), self.pad_id, dtype=torch.long)
        window[: end - begin] = self.tokens[begin:end]
        labels = window[1:].clone()
        labels[end - begin - 1 :] = self.ignore_index  # targets past the document's last token
        return {"input_ids": window[:-1], "labels": labels, "index": torch.tensor(index)}


class TextDataModule(SplitDataModule):
    """Next-token batches from text files or the generated story corpus.

    Batches are dicts ``{"input_ids": [B, S] int64, "labels": [B, S] int64}`` with
    ``B = batch_size`` and ``S = seq_len``; ``labels[:, t]`` is the token that follows
    ``input_ids[:, t]``, or ``ignore_index`` where that token is padding. Token ids come from
    :class:`~lightning_kd.data.ByteTokenizer` (vocab 258: bytes, EOS, PAD) or a local Hugging
    Face tokenizer.

    Args:
        paths: ``.txt`` files (one document each), ``.jsonl`` files (one document per line),
            directories or globs; None uses :func:`~lightning_kd.data.generate_corpus`.
        text_field: the key of the text in JSONL objects.
        seq_len: tokens per sequence, S.
        batch_size: sequences per batch on each data-parallel rank, B.
        val_fraction: the fraction of documents held out for validation, in [0, 1). The
            split is by document (with a single document and ``packing``, by position).
        packing: concatenate the documents (EOS-separated) and cut them into consecutive
            sequences; False: one document per sequence, truncated or padded.
        synthetic_chars: the size of the generated corpus when ``paths`` is None.
        seed: seeds the generated corpus, the train/val split and the per-epoch shuffle.
        cache_dir: where the tokenised corpus is cached (one file per distinct input).
        num_workers: DataLoader worker processes.
        ignore_index: the label of padding targets; must not be a token id.
        tokenizer: ``"byte"`` (the default byte-level tokenizer) or a local directory with a
            Hugging Face tokenizer (needs the ``hf`` extra; nothing is downloaded).
        encoding: the text encoding of the files in ``paths`` (a Python codec name). A file
            with more than a few undecodable bytes is refused with a message naming it (see
            :mod:`lightning_kd.data.text_files`).

    Raises:
        ValueError: for an argument of the wrong type or range, or ``paths`` that match no
            file; the message says what was expected.
    """

    def __init__(
        self,
        paths: list[str] | None = None,
        text_field: str = "text",
        seq_len: int = 128,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        packing: bool = True,
        synthetic_chars: int = 2_000_000,
        seed: int = 0,
        cache_dir: str = ".cache/lightning_kd",
        num_workers: int = 0,
        ignore_index: int = -100,
        tokenizer: str = "byte",
        encoding: str = "utf-8",
    ) -> None:
        super().__init__(tokenizer, seq_len, batch_size, val_fraction, seed, cache_dir,
                         num_workers, ignore_index)  # fmt: skip
        paths = check_paths(paths, SUPPORTED_EXTENSIONS)
        if not isinstance(text_field, str) or not text_field:
            raise ValueError(f"text_field must be a non-empty string, got {text_field!r}.")
        check_bool("packing", packing)
        check_int("synthetic_chars", synthetic_chars, 1)
        check_encoding(encoding)
        self.paths = paths
        self.text_field = text_field
        self.packing = packing
        self.synthetic_chars = synthetic_chars
        self.encoding = encoding
        self.save_hyperparameters()

    # ------------------------------------------------------------------ cache
    @property
    def token_cache(self) -> TokenCache:
        """The cache of the tokenised corpus (see :mod:`lightning_kd.data.token_cache`): keyed
        on the input files (path, size, modification time) or the generator's settings, the
        text field, the encoding and the tokenizer; ``seq_len``, ``packing`` and the split do
        not change it."""
        source: dict[str, Any] = {"tokenizer": repr(self._tokenizer)}
        content: dict[str, Any] = {}
        if self.paths is None:
            source["corpus"] = {
                "generator": CORPUS_VERSION,
                "chars": self.synthetic_chars,
                "seed": self.seed,
            }
        else:
            files = [path.resolve() for path in expand_paths(self.paths)]
            source.update(files=[str(p) for p in files], text_field=self.text_field,
                          encoding=self.encoding)  # fmt: skip
            content["stat"] = [[p.stat().st_size, p.stat().st_mtime_ns] for p in files]
        return TokenCache(self.cache_dir, source, content)

    @property
    def cache_path(self) -> Path:
        """The cache file of the tokenised corpus."""
        return self.token_cache.path

    def _documents(self) -> Iterable[str]:
        if self.paths is None:
            return generate_corpus(self.synthetic_chars, seed=self.seed)
        return read_documents(self.paths, self.text_field, self.encoding)

    def _tokenize(self, documents: Iterable[str]) -> dict[str, Tensor]:
        tokenizer = self._tokenizer
        wide = tokenizer.vocab_size > 2**15
        ids = array("i" if wide else "h")
        offsets = [0]
        total = len(documents) if isinstance(documents, list) else None
        progress = tqdm(
            documents, total=total, desc="Tokenising", unit=" docs", delay=_PROGRESS_DELAY_S
        )
        for text in progress:
            if not text:
                continue
            ids.extend(tokenizer.encode(text))
            ids.append(tokenizer.eos_id)
            offsets.append(len(ids))
        if len(ids) == 0:
            raise ValueError(f"no text found in {self.paths!r}: every document is empty.")
        dtype = torch.int32 if wide else torch.int16
        return {
            "tokens": torch.frombuffer(ids, dtype=dtype).clone(),
            "offsets": torch.tensor(offsets, dtype=torch.long),
        }

    def prepare_data(self) -> None:
        """Tokenise the corpus and cache it under ``cache_dir``, unless a verified cache exists.

        The cache holds ``tokens`` ([T] int16, or int32 for vocabularies over 32768: every
        document followed by EOS), ``offsets`` ([D + 1] int64 document boundaries) and their
        checksum. It is written to a temporary file and renamed, so concurrent writers and
        interrupted runs never leave a partial cache; a corrupt one is rebuilt with a warning.
        Lightning calls this on one process per node.
        """
        self.token_cache.load_or_build(lambda: self._tokenize(self._documents()))

    # ------------------------------------------------------------------ split
    def setup(self, stage: str | None = None) -> None:
        """Load the cached tokens (tokenising first if needed) and build the train and
        validation sequences. Deterministic: every rank and every run gets the same split."""
        if self._train is not None:
            return
        data = self.token_cache.load_or_build(lambda: self._tokenize(self._documents()))
        tokens, offsets = data["tokens"], data["offsets"]
        lengths = offsets.diff()
        is_val = self._held_out(len(lengths))
        single = len(lengths) < 2 and self.val_fraction > 0.0
        if self.packing:
            if single:  # one document: hold out its tail
                cut = round(len(tokens) * (1.0 - self.val_fraction))
                train_stream, val_stream = tokens[:cut], tokens[cut:]
            else:
                in_val = torch.repeat_interleave(is_val, lengths)
                train_stream, val_stream = tokens[~in_val], tokens[in_val]
            self._train = PackedSequences(train_stream, self.seq_len)
            self._val = PackedSequences(val_stream, self.seq_len)
        else:
            if single:
                raise ValueError(
                    "val_fraction > 0 with packing=False needs at least 2 documents, the corpus "
                    "has 1; set val_fraction=0, packing=True, or provide more documents."
                )
            pad, ignore = self._tokenizer.pad_id, self.ignore_index
            self._train, self._val = (
                DocumentSequences(
                    tokens, offsets, torch.nonzero(mask).flatten(), self.seq_len, pad, ignore
                )
                for mask in (~is_val, is_val)
            )
