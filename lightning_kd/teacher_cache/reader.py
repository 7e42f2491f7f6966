"""Reading a teacher cache: ``TeacherCache(directory).read(split, indices, valid)``."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_kd.teacher_cache.codec import (
    EXACT_CODEC,
    TOPK_CODEC,
    decode_exact,
    decode_topk_with_tail,
)
from lightning_kd.teacher_cache.format import (
    CacheMetadata,
    ShardHeader,
    read_metadata,
    read_record,
    read_shard_header,
    shard_path,
)


class CachedTeacher(NamedTuple):
    """The cached teacher distribution of a batch.

    At invalid positions (``valid`` False) the entries are a placeholder that is a proper
    distribution, so that nothing computed there is NaN: ids ``0 .. k−1`` and log-probabilities
    ``−log k`` (exact mode: ``−log V`` everywhere). Losses must mask those positions.

    Attributes:
        ids: [B, S, k] int64 token ids, sorted ascending within a token; None in exact mode.
        logprobs: [B, S, k] float32 ``log_softmax(teacher_logits / T)`` of those ids (exact
            mode: [B, S, V], the whole distribution). The top-k mass's complement, the tail
            ``1 − Σ exp(logprobs)``, is the teacher's own to float32.
        tail_logprob: [B, S] float32 log of the teacher's mass outside the top-k (``−inf`` at
            invalid positions), stored by format version 2; None for an exact cache or a
            version 1 cache (the tail is then implied by the top-k mass).
    """

    ids: Tensor | None
    logprobs: Tensor
    tail_logprob: Tensor | None = None


class TeacherCache:
    """A teacher cache written by ``lightning-kd cache-teacher`` (see :mod:`.format`).

    Args:
        directory: the cache directory.

    Raises:
        ValueError: when the directory or its metadata is missing, invalid, of an unknown
            format version, or from a writer that did not finish.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.metadata: CacheMetadata = read_metadata(self.directory)
        if not self.metadata.complete:
            raise ValueError(
                f"teacher cache {self.directory} is incomplete (its writer stopped before the "
                "end); run the same cache-teacher command again to finish it."
            )
        self._headers: dict[Path, tuple[tuple[int, int], ShardHeader]] = {}

    def check_compatible(
        self, *, vocab_size: int, temperature: float, tokenizer: str, fingerprints: dict[str, str]
    ) -> None:
        """Raise unless the cache was written for this run's vocabulary, temperature, tokenizer
        and data (``fingerprints``: split -> :func:`~lightning_kd.teacher_cache.data_fingerprint`).

        Raises:
            ValueError: listing every field that differs, e.g. ``teacher cache D does not match
                this run: temperature: cache 2.0, run 1.0; data (train): cache ab12.., run
                cd34..``.
        """
        meta = self.metadata
        problems = []
        if meta.vocab_size != vocab_size:
            problems.append(f"vocab_size: cache {meta.vocab_size}, run {vocab_size}")
        if not math.isclose(meta.temperature, temperature, rel_tol=0, abs_tol=0):
            problems.append(f"temperature: cache {meta.temperature}, run {temperature}")
        if meta.tokenizer != tokenizer:
            problems.append(f"tokenizer: cache {meta.tokenizer}, run {tokenizer}")
        for split, fingerprint in fingerprints.items():
            cached = meta.splits.get(split)
            if cached != fingerprint:
                shown = "(not cached)" if cached is None else f"{cached[:12]}.."
                problems.append(f"data ({split}): cache {shown}, run {fingerprint[:12]}..")
        if problems:
            raise ValueError(
                f"teacher cache {self.directory} does not match this run: {'; '.join(problems)}."
            )

    def _header(self, split: str, index: int) -> tuple[ShardHeader, int]:
        meta = self.metadata
        count = meta.num_sequences.get(split)
        if count is None:
            raise ValueError(
                f"teacher cache {self.directory} has no split {split!r} (it has "
                f"{', '.join(sorted(meta.num_sequences)) or 'none'})."
            )
        if not 0 <= index < count:
            raise ValueError(
                f"sequence {index} of split {split!r} is not in teacher cache {self.directory} "
                f"(it holds {count}); the cache does not match the data."
            )
        shard, position = divmod(index, meta.shard_size)
        path = shard_path(self.directory, split, shard)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise ValueError(
                f"teacher cache {self.directory} lacks shard {path} (sequence {index} of "
                f"{split!r}); run cache-teacher again to complete it."
            ) from None
        key = (stat.st_size, stat.st_mtime_ns)
        cached = self._headers.get(path)
        if cached is None or cached[0] != key:
            header = read_shard_header(path)
            fields = header.fields
            expected = {"split": split, "shard": shard, "first": shard * meta.shard_size,
                        "codec": meta.codec, "top_k": meta.top_k,
                        "fingerprint": meta.splits.get(split)}  # fmt: skip
            wrong = [name for name, value in expected.items() if fields.get(name) != value]
            if wrong:
                raise ValueError(
                    f"corrupt shard {path}: its {', '.join(wrong)} do not match "
                    f"{self.directory / 'metadata.json'}."
                )
            cached = (key, header)
            self._headers[path] = cached
        return cached[1], position

    def read(self, split: str, indices: Tensor, valid: Tensor) -> CachedTeacher:
        """The cached teacher distribution of a batch of sequences.

        Args:
            split: ``"train"`` or ``"val"`` (a split of the cache).
            indices: [B] int64, the sequences' indices in the split's dataset.
            valid: [B, S] bool, the positions with a target (label != ignore_index).

        Returns:
            :class:`CachedTeacher` on CPU, entries at the valid positions in order.

        Raises:
            ValueError: when an index is not in the cache, a sequence's number of valid
                tokens differs from what was written ("the cache does not match the data"),
                or a shard is missing, truncated or fails its checksum ("corrupt shard <file>").
        """
        meta = self.metadata
        indices = torch.as_tensor(indices).reshape(-1).tolist()
        valid = torch.as_tensor(valid, device="cpu").bool()
        if valid.ndim != 2 or valid.shape[0] != len(indices):
            raise ValueError(
                f"valid must be [B, S] with B = len(indices) = {len(indices)}, got "
                f"{tuple(valid.shape)}."
            )
        batch, seq = valid.shape
        exact = meta.codec == EXACT_CODEC
        width = meta.vocab_size if exact else meta.top_k
        logprobs = torch.full((batch, seq, width), -math.log(width), dtype=torch.float32)
        ids = None if exact else torch.arange(width).expand(batch, seq, width).clone()
        tail = None
        if not exact and meta.format_version >= 2:
            tail = torch.full((batch, seq), -math.inf, dtype=torch.float32)
        for row, index in enumerate(indices):
            header, position = self._header(split, int(index))
            n = int(valid[row].sum())
            written = int(header.fields["num_valid"][position])
            if n != written:
                raise ValueError(
                    f"sequence {index} of {split!r} has {n} valid tokens, the teacher cache "
                    f"{self.directory} holds {written}: the cache does not match the data."
                )
            record = read_record(header, position)
            try:
                if exact:
                    logprobs[row, valid[row]] = decode_exact(record, n, width)
                elif meta.codec == TOPK_CODEC:
                    token_ids, values, stored = decode_topk_with_tail(record, n, width)
                    if (stored is None) != (tail is None):
                        raise ValueError(
                            "its tail log-mass is "
                            f"{'missing' if stored is None else 'present'} in a format "
                            f"version {meta.format_version} cache"
                        )
                    ids[row, valid[row]] = token_ids  # type: ignore[index]
                    logprobs[row, valid[row]] = values
                    if tail is not None:
                        tail[row, valid[row]] = stored
                else:
                    raise ValueError(f"unknown codec {meta.codec!r}")
            except ValueError as error:
                raise ValueError(
                    f"corrupt shard {header.path}: sequence {index}: {error}"
                ) from None
        return CachedTeacher(ids, logprobs, tail)
