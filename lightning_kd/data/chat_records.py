"""Chat records read from local files: JSONL, JSON and Parquet, conversations or prompt/completion.

Files (paths, directories or globs, resolved by :func:`~lightning_kd.data.text_files.expand_paths`):

- ``.jsonl``: one JSON object per line; blank lines are skipped. A record's location is
  ``file:line`` (1-based).
- ``.json``: a JSON list of objects, or an object whose ``"data"`` key holds that list (the
  layout ``datasets`` writes with ``to_json(lines=False)``). Location: ``file[index]``
  (0-based). Any other top-level value is a ``ValueError`` naming the file.
- ``.parquet``: one record per row (needs the ``data`` extra, ``pip install
  lightning_kd[data]``, for ``pyarrow``). Location: ``file[row]`` (0-based).

Record formats (``format``):

- ``"messages"``: ``{messages_field: [{"role": "system"|"user"|"assistant", "content": str},
  ...]}``;
- ``"prompt_completion"``: ``{prompt_field: str, completion_field: str}``, which becomes a user
  message followed by an assistant message;
- ``"auto"`` (default): decided per record, so one file may mix them: a record with
  ``messages_field`` is a conversation, otherwise it must have the prompt and completion fields.

A record is *malformed* when it is not an object, lacks the fields, or has a message that is not
``{"role": one of the three, "content": str}`` (extra keys are ignored); it is *empty* when no
assistant message has non-whitespace content (nothing to learn). Both are skipped and counted in
:class:`ReadStats`, or raise a ``ValueError`` naming the location when ``strict``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_kd.data.text_files import check_encoding, decode_file, expand_paths

#: File extensions :func:`read_chat_records` understands.
CHAT_EXTENSIONS = (".jsonl", ".json", ".parquet")
#: The roles a message may have.
ROLES = ("system", "user", "assistant")
#: The values of ``format``.
FORMATS = ("auto", "messages", "prompt_completion")

Messages = list[dict[str, str]]


class RecordError(ValueError):
    """A record that cannot be used; ``kind`` is ``"malformed"``, ``"empty"`` or
    ``"unrenderable"`` (its chat template refuses it or does not show an assistant message
    verbatim)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class ReadStats:
    """What happened to the records: ``kept``, and the skipped ones by kind, with the location
    of the first few (``examples``)."""

    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def skip(self, where: str, error: RecordError) -> None:
        """Count one skipped record."""
        self.skipped[error.kind] = self.skipped.get(error.kind, 0) + 1
        if len(self.examples) < 3:
            self.examples.append(f"{where}: {error}")

    def to_dict(self) -> dict[str, Any]:
        """The counts as JSON-serialisable values (see :meth:`from_dict`)."""
        return {"kept": self.kept, "skipped": dict(self.skipped), "examples": list(self.examples)}

    @classmethod
    def from_dict(cls, data: Any) -> ReadStats:
        """The counts :meth:`to_dict` wrote.

        Raises:
            ValueError: when ``data`` is not such a dict.
        """
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("kept"), int)
            or not isinstance(data.get("skipped"), dict)
            or not all(isinstance(k, str) and isinstance(n, int)
                       for k, n in data["skipped"].items())
            or not isinstance(data.get("examples"), list)
            or not all(isinstance(e, str) for e in data["examples"])
        ):  # fmt: skip
            raise ValueError(f"expected read stats (kept, skipped, examples), got {data!r}.")
        return cls(data["kept"], dict(data["skipped"]), list(data["examples"]))

    def summary(self) -> str:
        """One line: kept and skipped counts, and the first problems."""
        skipped = ", ".join(f"{n} {kind}" for kind, n in sorted(self.skipped.items()))
        text = f"{self.kept} conversations kept, skipped: {skipped or 'none'}"
        return text + (f" (first: {'; '.join(self.examples)})" if self.examples else "")


@dataclass(frozen=True)
class RecordFields:
    """The record format and its field names (see the module docstring)."""

    format: str = "auto"
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    completion_field: str = "completion"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}.")
        for name in ("messages_field", "prompt_field", "completion_field"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}.")


def to_messages(record: Any, fields: RecordFields) -> Messages:
    """The conversation of one record, as ``[{"role": ..., "content": ...}, ...]``.

    Raises:
        RecordError: for a malformed or empty record (the message says what was wrong).
    """
    if not isinstance(record, dict):
        raise RecordError("malformed", f"expected a JSON object, got {type(record).__name__}")
    as_messages = fields.format == "messages" or (
        fields.format == "auto" and fields.messages_field in record
    )
    if as_messages:
        messages = _check_messages(record.get(fields.messages_field), fields.messages_field)
    else:
        prompt, completion = (record.get(f) for f in (fields.prompt_field, fields.completion_field))
        if not isinstance(prompt, str) or not isinstance(completion, str):
            expected = f"{fields.prompt_field!r} and {fields.completion_field!r} strings"
            if fields.format == "auto":
                expected = f"a {fields.messages_field!r} list, or {expected}"
            raise RecordError("malformed", f"expected {expected}; fields: {sorted(record)}")
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": completion}]  # fmt: skip
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise RecordError("empty", "no assistant message with content")
    return messages


def _check_messages(value: Any, name: str) -> Messages:
    if not isinstance(value, list):
        raise RecordError("malformed", f"{name!r} must be a list of messages")
    messages = []
    for i, message in enumerate(value):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise RecordError(
                "malformed",
                f"message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {message!r}",
            )
        messages.append({"role": role, "content": content})
    return messages


def _raw_records(path: Path, encoding: str = "utf-8") -> Iterator[tuple[str, Any]]:
    """(location, parsed record or a ``RecordError``) for every record of one file; text files
    are decoded with ``encoding``."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(
                f"reading {path} needs pyarrow: pip install 'lightning_kd[data]' (the data extra)."
            ) from None
        yield from _parquet_records(path, pq)
        return
    text = decode_file(path, encoding)
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: invalid JSON ({error.msg}, line {error.lineno}).") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(
                f"{path}: expected a JSON list of records or an object with a 'data' list, got "
                f"{type(data).__name__}."
            )
        for index, record in enumerate(data):
            yield f"{path}[{index}]", record
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as error:
                yield f"{path}:{number}", RecordError("malformed", f"invalid JSON ({error.msg})")


def _parquet_records(path: Path, pq: Any) -> Iterator[tuple[str, Any]]:
    """The rows of a Parquet file; a file pyarrow cannot read is a ValueError naming it."""
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{path}[{index}]", row
                index += 1
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid/ArrowIOError subclass these
        raise ValueError(f"{path}: not a readable Parquet file ({error}).") from None


def read_chat_records(
    paths: Sequence[str], fields: RecordFields, strict: bool = False, encoding: str = "utf-8"
) -> Iterator[tuple[str, Messages | RecordError]]:
    """Every record of ``paths``, in file order, as ``(location, messages)``, or
    ``(location, RecordError)`` for one that cannot be used when not ``strict``.

    Args:
        paths: ``.jsonl``, ``.json`` or ``.parquet`` files, directories or globs.
        fields: the record format and field names.
        strict: raise at the first unusable record instead of yielding its error.
        encoding: the text encoding of ``.jsonl`` and ``.json`` files (a Python codec name).

    Returns:
        An iterator; the paths are resolved before this function returns.

    Raises:
        ValueError: for paths that match nothing or have another extension, a ``.json`` file
            that is not a list of records, a Parquet file without pyarrow or that pyarrow
            cannot read, a file not in ``encoding`` (see
            :func:`~lightning_kd.data.text_files.decode_file`), and (``strict``) an
            unusable record: ``"<file>:<line>: ..."`` or ``"<file>[<index>]: ..."``.
    """
    check_encoding(encoding)
    files = expand_paths(list(paths), extensions=CHAT_EXTENSIONS)

    def records() -> Iterator[tuple[str, Messages | RecordError]]:
        for path in files:
            for where, record in _raw_records(path, encoding):
                try:
                    if isinstance(record, RecordError):
                        raise record
                    yield where, to_messages(record, fields)
                except RecordError as error:
                    if strict:
                        raise ValueError(f"{where}: {error} ({error.kind} record).") from None
                    yield where, error

    return records()
