"""``ChatDataModule``: chat and instruction data to packed, completion-only next-token batches.

The pipeline: records (:func:`~lightning_kd.data.chat_records.read_chat_records`, or the
generated instruction set of :mod:`lightning_kd.data.instructions`) -> rendered with a chat
template and tokenised once with offsets, a target flag per token
(:class:`~lightning_kd.data.chat_template.ChatEncoder`), cached under ``cache_dir``
(``prepare_data``) -> a train/val split by conversation (``setup``) -> the ``overlong`` rule
and rows of whole conversations (:mod:`lightning_kd.data.packing`) -> batches.

Batches are dicts of int64 tensors [B, S]: ``input_ids``, ``labels`` (the next token where it
is a target, else ``ignore_index``) and ``position_ids`` (restarting at 0 at every packed
conversation and at the padding block, so models isolate the documents of a row), and
``index`` [B], each row's index in its split (what an offline teacher cache is keyed on).

The token cache stores each token as its id when it is a target and as ``~id`` (``-1 - id``)
when it is context, in the ``tokens`` tensor of :class:`~lightning_kd.data.token_cache.TokenCache`
(int16, or int32 for vocabularies over 32768), with the conversation boundaries as ``offsets``.
"""

from __future__ import annotations

import json
import logging
from array import array
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_kd.checks import check_bool, check_int
from lightning_kd.data.chat_records import (
    CHAT_EXTENSIONS,
    Messages,
    ReadStats,
    RecordError,
    RecordFields,
    read_chat_records,
)
from lightning_kd.data.chat_template import ChatEncoder
from lightning_kd.data.instructions import INSTRUCTIONS_VERSION, generate_instructions
from lightning_kd.data.packing import OVERLONG, PackedRows, fit_documents, pack_rows
from lightning_kd.data.split_datamodule import SplitDataModule, check_paths
from lightning_kd.data.text_files import check_encoding, expand_paths
from lightning_kd.data.token_cache import TokenCache
from lightning_kd.io import atomic_write

log = logging.getLogger(__name__)

#: Bump when the cached tokens of the same inputs change (template rules, mask encoding).
#: 2: assistant spans searched in their own turn's window; template errors are records.
CHAT_CACHE_VERSION = 2
#: Seconds of tokenising before a progress bar appears.
_PROGRESS_DELAY_S = 2.0


class ChatDataModule(SplitDataModule):
    """Completion-only batches from chat/instruction files or the generated instruction set.

    Args:
        paths: ``.jsonl``, ``.json`` or ``.parquet`` files, directories or globs (see
            :mod:`lightning_kd.data.chat_records`); None uses the generated instruction set.
        tokenizer: ``"byte"`` or a local directory with a fast Hugging Face tokenizer.
        seq_len: positions per row, S. A conversation of ``n`` tokens takes ``n - 1``.
        batch_size: rows per batch on each data-parallel rank, B.
        val_fraction: the fraction of conversations held out for validation, in [0, 1).
        packing: pack several whole conversations per row; False: one per row, padded.
        train_on_all_tokens: every token is a target, not only the assistant's.
        overlong: conversations over ``seq_len + 1`` tokens: ``"truncate"`` (keep the start)
            or ``"drop"``. The counts are logged; one left without targets is dropped.
        format: ``"auto"`` (per record), ``"messages"`` or ``"prompt_completion"``.
        messages_field: the key of the message list in conversation records.
        prompt_field: the key of the prompt in prompt/completion records.
        completion_field: the key of the completion in prompt/completion records.
        chat_template: a Jinja chat template overriding the tokenizer's (or the byte one's).
        strict: a malformed, empty or unrenderable record is a ``ValueError`` naming its file
            and line (or index) instead of being skipped and counted.
        synthetic_conversations: the size of the generated set when ``paths`` is None.
        seed: seeds the generated set, the train/val split and the per-epoch shuffle.
        cache_dir: where the tokenised conversations are cached.
        num_workers: DataLoader worker processes.
        ignore_index: the label of non-targets and padding; must not be a token id.
        encoding: the text encoding of the ``.jsonl``/``.json`` files in ``paths`` (a Python
            codec name, e.g. ``"latin-1"``); a file mostly undecodable in it is a ValueError.

    Raises:
        ValueError: for an argument of the wrong type or range, ``paths`` that match no file,
            or a tokenizer without offsets or chat template; the message says what was expected.
    """

    def __init__(
        self,
        paths: list[str] | None = None,
        tokenizer: str = "byte",
        seq_len: int = 512,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        packing: bool = True,
        train_on_all_tokens: bool = False,
        overlong: Literal["truncate", "drop"] = "truncate",
        format: Literal["auto", "messages", "prompt_completion"] = "auto",
        messages_field: str = "messages",
        prompt_field: str = "prompt",
        completion_field: str = "completion",
        chat_template: str | None = None,
        strict: bool = False,
        synthetic_conversations: int = 4000,
        seed: int = 0,
        cache_dir: str = ".cache/lightning_kd",
        num_workers: int = 0,
        ignore_index: int = -100,
        encoding: str = "utf-8",
    ) -> None:
        super().__init__(tokenizer, seq_len, batch_size, val_fraction, seed, cache_dir,
                         num_workers, ignore_index)  # fmt: skip
        self._encoder = ChatEncoder(self._tokenizer, chat_template)
        paths = check_paths(paths, CHAT_EXTENSIONS)
        self.fields = RecordFields(format, messages_field, prompt_field, completion_field)
        for name, value in (("packing", packing), ("train_on_all_tokens", train_on_all_tokens),
                            ("strict", strict)):  # fmt: skip
            check_bool(name, value)
        if overlong not in OVERLONG:
            raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}.")
        check_int("synthetic_conversations", synthetic_conversations, 1)
        self.encoding = check_encoding(encoding)
        self.paths = paths
        self.packing, self.train_on_all_tokens = packing, train_on_all_tokens
        self.overlong, self.strict = overlong, strict
        self.synthetic_conversations = synthetic_conversations
        self.save_hyperparameters()
        # the counts of kept and skipped records: from tokenising, or from the cache's stats file
        self.read_stats: ReadStats | None = None
        self._stats_logged = False

    @property
    def encoder(self) -> ChatEncoder:
        """Renders and tokenises conversations (``encoder.render(messages)`` shows the text)."""
        return self._encoder

    # ------------------------------------------------------------------ cache
    @property
    def token_cache(self) -> TokenCache:
        """The cache of the tokenised conversations: keyed on the files (path, size,
        modification time) or the generator's settings, the tokenizer (its full serialisation
        and special tokens, see :class:`~lightning_kd.data.tokenizer.HFTokenizer`), the
        effective chat template, the special texts that end an assistant turn, the record
        format and fields, ``strict`` and a non-UTF-8 ``encoding``. ``seq_len``, ``packing``,
        ``overlong``, ``train_on_all_tokens`` and the split do not change it."""
        source: dict[str, Any] = {"chat": CHAT_CACHE_VERSION, "tokenizer": repr(self._tokenizer),
                                  "template": self._encoder.effective_template,
                                  "end_of_turn": self._encoder.special_texts}  # fmt: skip
        content: dict[str, Any] = {}
        if self.paths is None:
            source["instructions"] = {"generator": INSTRUCTIONS_VERSION, "seed": self.seed,
                                      "conversations": self.synthetic_conversations}  # fmt: skip
        else:
            files = [p.resolve() for p in expand_paths(self.paths, extensions=CHAT_EXTENSIONS)]
            source.update(files=[str(p) for p in files], fields=vars(self.fields),
                          strict=self.strict)  # fmt: skip
            if self.encoding != "utf-8":  # (caches of UTF-8 files keep their 0.2 key)
                source["encoding"] = self.encoding
            content["stat"] = [[p.stat().st_size, p.stat().st_mtime_ns] for p in files]
        return TokenCache(self.cache_dir, source, content)

    @property
    def cache_path(self) -> Path:
        """The cache file of the tokenised conversations."""
        return self.token_cache.path

    @staticmethod
    def _stats_path(cache: TokenCache) -> Path:
        """The JSON file next to the cache file with the counts of kept and skipped records."""
        return cache.path.with_suffix(".stats.json")

    def _write_stats(self, cache: TokenCache, stats: ReadStats) -> None:
        """Store ``stats`` next to the cache file atomically (temporary file, then rename),
        removing the stats files of stale caches of the same source."""
        path = self._stats_path(cache)
        atomic_write(path, json.dumps(stats.to_dict()).encode())
        source = cache.path.name.split("-")[1]  # tokens-{source}-{content}.pt
        for stale in path.parent.glob(f"tokens-{source}-*.stats.json"):
            if stale != path:
                stale.unlink(missing_ok=True)

    def _read_stats(self, cache: TokenCache) -> ReadStats | None:
        """The counts stored next to the cache file, or None when they cannot be read."""
        try:
            return ReadStats.from_dict(json.loads(self._stats_path(cache).read_text()))
        except (OSError, ValueError):
            return None

    def _log_stats(self, cache: TokenCache) -> None:
        """Log the counts of kept and skipped records (once per process)."""
        if self._stats_logged:
            return
        self._stats_logged = True
        where = self.paths or "generated"
        if self.read_stats is None:
            log.warning(
                "chat data %s: the counts of skipped records are unknown (%s is missing or "
                "unreadable); delete %s to tokenise again and count them.",
                where, self._stats_path(cache), cache.path,
            )  # fmt: skip
            return
        report = log.warning if self.read_stats.skipped else log.info
        report("chat data %s: %s", where, self.read_stats.summary())

    def _load(self) -> dict[str, Tensor]:
        """The verified cached tokens, tokenising first (and storing the counts of skipped
        records next to them) when needed; the counts are logged either way."""
        cache = self.token_cache

        def build() -> dict[str, Tensor]:
            data = self._tokenize(self._records())
            self._write_stats(cache, self.read_stats)  # before the tokens: never tokens alone
            return data

        data = cache.load_or_build(build)
        if self.read_stats is None:
            self.read_stats = self._read_stats(cache)
        self._log_stats(cache)
        return data

    def _records(self) -> Iterable[tuple[str, Messages | RecordError]]:
        if self.paths is None:
            generated = generate_instructions(self.synthetic_conversations, seed=self.seed)
            return [(f"generated[{i}]", messages) for i, messages in enumerate(generated)]
        return read_chat_records(self.paths, self.fields, strict=self.strict,
                                 encoding=self.encoding)  # fmt: skip

    def _tokenize(self, records: Iterable[tuple[str, Messages | RecordError]]) -> dict[str, Tensor]:
        wide = self._tokenizer.vocab_size > 2**15
        tokens = array("i" if wide else "h")
        offsets = [0]
        stats = ReadStats()
        total = len(records) if isinstance(records, list) else None
        for where, messages in tqdm(records, total=total, desc="Tokenising", unit=" convs",
                                    delay=_PROGRESS_DELAY_S):  # fmt: skip
            try:
                if isinstance(messages, RecordError):
                    raise messages
                ids, targets = self._encoder.encode(messages)
            except RecordError as error:
                if self.strict:
                    raise ValueError(f"{where}: {error} ({error.kind} record).") from None
                stats.skip(where, error)
                continue
            tokens.extend(i if t else ~i for i, t in zip(ids, targets, strict=True))
            offsets.append(len(tokens))
            stats.kept += 1
        self.read_stats = stats
        if stats.kept == 0:
            raise ValueError(f"no usable conversation in {self.paths!r}: {stats.summary()}.")
        return {
            "tokens": torch.frombuffer(tokens, dtype=torch.int32 if wide else torch.int16).clone(),
            "offsets": torch.tensor(offsets, dtype=torch.long),
        }

    def prepare_data(self) -> None:
        """Tokenise the conversations and cache them under ``cache_dir``, unless a verified
        cache exists (see :class:`~lightning_kd.data.token_cache.TokenCache`), with the counts
        of kept and skipped records in a JSON file next to the cache file; the counts are
        logged (once per process, from that file when the cache was already there).
        Lightning calls this on one process per node."""
        self._load()

    # ------------------------------------------------------------------ split
    def setup(self, stage: str | None = None) -> None:
        """Load the cached tokens (tokenising first if needed), split the conversations and
        pack the rows; logs the counts of skipped records (also from a warm cache), how many
        conversations ``overlong`` truncated or dropped and how many were too short for a
        label. Deterministic: every rank and every run gets the same rows."""
        if self._train is not None:
            return
        data = self._load()
        stored, offsets = data["tokens"], data["offsets"]
        targets = stored >= 0
        tokens = torch.where(targets, stored, torch.bitwise_not(stored))
        if self.train_on_all_tokens:
            targets = torch.ones_like(targets)
        is_val = self._held_out(len(offsets) - 1)
        splits = []
        for name, mask in (("train", ~is_val), ("val", is_val)):
            fit = fit_documents(offsets, targets, torch.nonzero(mask).flatten(),
                                self.seq_len, self.overlong)  # fmt: skip
            bounds = pack_rows(fit.positions, self.seq_len, self.packing)
            affected = fit.truncated + fit.dropped + fit.no_targets + fit.too_short
            (log.warning if affected else log.info)(
                "chat %s split: %d conversations in %d rows of %d positions; over seq_len + 1 "
                "tokens: %d truncated, %d dropped; %d dropped without targets after truncation, "
                "%d shorter than 2 tokens (no label).",
                name, len(fit.documents), len(bounds) - 1, self.seq_len,
                fit.truncated, fit.dropped, fit.no_targets, fit.too_short,
            )  # fmt: skip
            splits.append(PackedRows(tokens, targets, offsets, fit, bounds, self.seq_len,
                                     self._tokenizer.pad_id, self.ignore_index))  # fmt: skip
        self._train, self._val = splits
