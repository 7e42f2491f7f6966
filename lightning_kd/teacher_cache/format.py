"""The on-disk layout of a teacher cache: ``metadata.json`` and checksummed shard files.

A cache directory holds::

    metadata.json              CacheMetadata as JSON (written by the writer's rank 0)
    <split>/shard-<j>.bin      sequences [j · shard_size, (j + 1) · shard_size) of the split

Every file is written to a temporary name in the same directory and renamed: a reader (or a
restarted writer) sees a shard whole or not at all. A shard file is::

    magic      8 bytes   b"LKDTCSH1"
    hlen       8 bytes   uint64 little-endian, the length of the header
    hsha      32 bytes   SHA-256 of the header bytes
    header     hlen      UTF-8 JSON: split, shard, first, count, codec, top_k, vocab_size,
                         temperature, fingerprint (of the split's data), num_valid [count]
                         (valid tokens per sequence), sizes [count] (bytes per record),
                         sha256 [count] (hex SHA-256 per record)
    records    Σ sizes   one record per sequence, in index order (see :mod:`.codec`)

The file's size must be ``48 + hlen + Σ sizes``; each record is verified against its own
checksum when read, so reading one sequence does not hash the whole shard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_kd.io import atomic_write

#: Bump when the layout or the meaning of a field changes. Version 2 stores each token's tail
#: log-mass in top-k records (see :mod:`.codec`); version 1 caches are still read (their tail
#: is implied by the top-k mass, enough for forward KL only).
FORMAT_VERSION = 2
#: The versions this lightning_kd reads.
READABLE_VERSIONS = (1, 2)
METADATA_FILENAME = "metadata.json"
SHARD_MAGIC = b"LKDTCSH1"
_PREFIX = len(SHARD_MAGIC) + 8 + 32


@dataclass(frozen=True)
class CacheMetadata:
    """What a cache holds and how it was made (``metadata.json``).

    Attributes:
        format_version: :data:`FORMAT_VERSION` of the writer (2 stores the tail log-mass).
        teacher: where the teacher came from (its config hash and checkpoint path/digest).
        vocab_size: V, the width of the teacher's logits.
        tokenizer: the data module's tokenizer (its ``repr``).
        temperature: T; the cache stores ``log_softmax(teacher_logits / T)``.
        top_k: k entries per token, or 0 for the exact full distribution.
        splits: split name -> :func:`~lightning_kd.teacher_cache.data_fingerprint` of its data.
        seq_len: S, positions per sequence.
        num_sequences: split name -> number of sequences.
        shard_size: sequences per shard file.
        codec: ``"f32"`` (exact) or ``"q8rice"`` (top-k), see :mod:`.codec`.
        ignore_index: the label of positions that have no entry.
        complete: whether every shard was written (an interrupted writer leaves False).
    """

    format_version: int
    teacher: str
    vocab_size: int
    tokenizer: str
    temperature: float
    top_k: int
    splits: dict[str, str]
    seq_len: int
    num_sequences: dict[str, int]
    shard_size: int
    codec: str
    ignore_index: int = -100
    complete: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> CacheMetadata:
        """Parse ``metadata.json`` text; ``source`` names it in errors.

        Raises:
            ValueError: for invalid JSON, an unknown format version, or missing/mistyped fields.
        """
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source} is not valid JSON ({error}).") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{source} does not hold a JSON object.")
        version = raw.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"{source} has format_version {version!r}; this lightning_kd reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}. Write the cache again with this "
                "version's cache-teacher."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(raw))
        if missing:
            raise ValueError(f"{source} lacks the field(s) {', '.join(missing)}.")
        try:
            meta = cls(**{k: v for k, v in raw.items() if k in names})
            checks = (
                isinstance(meta.vocab_size, int) and meta.vocab_size > 0,
                isinstance(meta.top_k, int) and 0 <= meta.top_k <= meta.vocab_size,
                isinstance(meta.temperature, (int, float)) and meta.temperature > 0,
                isinstance(meta.splits, dict) and isinstance(meta.num_sequences, dict),
                isinstance(meta.shard_size, int) and meta.shard_size > 0,
            )
        except TypeError as error:
            raise ValueError(f"{source} has malformed fields ({error}).") from None
        if not all(checks):
            raise ValueError(f"{source} has out-of-range fields: {raw!r}.")
        return meta


def read_metadata(directory: Path) -> CacheMetadata:
    """The verified metadata of the cache in ``directory``.

    Raises:
        ValueError: when the directory or its metadata.json is missing or invalid.
    """
    if not directory.is_dir():
        raise ValueError(f"teacher cache {directory} does not exist (or is not a directory).")
    path = directory / METADATA_FILENAME
    if not path.is_file():
        raise ValueError(f"teacher cache {directory} has no {METADATA_FILENAME}; is it a cache?")
    return CacheMetadata.from_json(path.read_text(encoding="utf-8"), str(path))


def write_metadata(directory: Path, meta: CacheMetadata) -> None:
    atomic_write(directory / METADATA_FILENAME, meta.to_json().encode())


def shard_path(directory: Path, split: str, shard: int) -> Path:
    """Where shard ``shard`` of ``split`` lives."""
    return directory / split / f"shard-{shard:06d}.bin"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_shard(header: dict[str, Any], records: list[bytes]) -> bytes:
    """A shard file's bytes from its header fields (without sizes/sha256) and its records."""
    header = {**header, "sizes": [len(r) for r in records], "sha256": [sha256(r) for r in records]}
    text = json.dumps(header, sort_keys=True).encode()
    return b"".join([SHARD_MAGIC, struct.pack("<Q", len(text)), hashlib.sha256(text).digest(),
                     text, *records])  # fmt: skip


@dataclass(frozen=True)
class ShardHeader:
    """A parsed, size-checked shard header.

    Attributes:
        path: the shard file.
        fields: the header JSON (see the module docstring).
        offsets: [count + 1] byte offsets of the records in the file.
    """

    path: Path
    fields: dict[str, Any]
    offsets: tuple[int, ...]


def read_shard_header(path: Path) -> ShardHeader:
    """Parse and check ``path``'s header and total size (reads only the header).

    Raises:
        ValueError: ``corrupt shard <path>: ...`` for a bad magic, header checksum or size.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(_PREFIX)
        if len(prefix) < _PREFIX or prefix[:8] != SHARD_MAGIC:
            raise ValueError(f"corrupt shard {path}: not a teacher-cache shard (bad header).")
        (hlen,) = struct.unpack("<Q", prefix[8:16])
        if hlen > size:
            raise ValueError(f"corrupt shard {path}: header length {hlen} exceeds the file.")
        text = handle.read(hlen)
    if hashlib.sha256(text).digest() != prefix[16:48]:
        raise ValueError(f"corrupt shard {path}: its header fails its checksum.")
    fields = json.loads(text)
    sizes = fields["sizes"]
    offsets = [_PREFIX + hlen]
    for s in sizes:
        offsets.append(offsets[-1] + int(s))
    if offsets[-1] != size:
        raise ValueError(
            f"corrupt shard {path}: {size} bytes, its header says {offsets[-1]} (truncated?)."
        )
    return ShardHeader(path, fields, tuple(offsets))


def read_record(header: ShardHeader, position: int) -> bytes:
    """The verified record of the ``position``-th sequence of the shard.

    Raises:
        ValueError: ``corrupt shard <path>: ...`` when the record fails its checksum.
    """
    begin, end = header.offsets[position], header.offsets[position + 1]
    with open(header.path, "rb") as handle:
        handle.seek(begin)
        data = handle.read(end - begin)
    if len(data) != end - begin or sha256(data) != header.fields["sha256"][position]:
        raise ValueError(
            f"corrupt shard {header.path}: the record of sequence "
            f"{header.fields['first'] + position} fails its checksum."
        )
    return data
