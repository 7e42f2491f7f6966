"""Documents read from text files: paths and globs, ``.txt`` and ``.jsonl``, any encoding.

``read_documents`` turns a list of paths and globs into a stream of documents: a ``.txt`` file
is one document, a ``.jsonl`` file holds one document per line in a text field. Files are
decoded with the ``encoding`` you name (UTF-8 by default). Bytes that do not decode are never
replaced silently: each file's count is checked against :data:`MAX_UNDECODABLE_FRACTION`; a
file above it (e.g. Latin-1 read as UTF-8, where every accented letter is undecodable) is a
``ValueError`` that names the file and suggests ``encoding=``, and a file below it is decoded
with U+FFFD for those bytes and a warning that counts them.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

#: File extensions ``read_documents`` understands.
SUPPORTED_EXTENSIONS = (".txt", ".jsonl")

#: Share of a file's bytes that may fail to decode (replaced by U+FFFD, with a warning) before
#: the file is refused: a few stray bytes are tolerated, a wrong encoding is not.
MAX_UNDECODABLE_FRACTION = 0.001


def expand_paths(
    paths: Sequence[str], extensions: Sequence[str] = SUPPORTED_EXTENSIONS
) -> list[Path]:
    """The files named by ``paths``, in a deterministic order.

    Each entry is a file, a directory (its files with one of ``extensions``, recursively) or a
    glob (``*``, ``?``, ``[...]``; ``**`` matches directories recursively). Each entry's matches
    are sorted; entries keep their order; a file named twice is kept once (first place).

    Args:
        paths: files, directories or glob patterns.
        extensions: the accepted file extensions, lower case with the dot (default ``.txt``
            and ``.jsonl``; the chat data module passes its own).

    Returns:
        The matched files.

    Raises:
        ValueError: when ``paths`` is empty, an entry matches nothing, or a matched file has an
            extension not in ``extensions``.
    """
    if isinstance(paths, str):
        raise ValueError(f"paths must be a list of paths or globs, got the string {paths!r}.")
    if len(paths) == 0:
        raise ValueError("paths is empty: expected at least one file, directory or glob.")
    files: list[Path] = []
    seen: set[Path] = set()
    for entry in paths:
        pattern = os.path.expanduser(str(entry))
        if glob.has_magic(pattern):
            matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
            matches = [p for p in matches if p.is_file()]
        elif Path(pattern).is_dir():
            matches = sorted(
                p
                for p in Path(pattern).rglob("*")
                if p.is_file() and _extension(p, extensions) is not None
            )
        elif Path(pattern).is_file():
            matches = [Path(pattern)]
        else:
            matches = []
        if not matches:
            raise ValueError(f"{entry!r} matches no file (expected a file, directory or glob).")
        for path in matches:
            if _extension(path, extensions) is None:
                raise ValueError(
                    f"{str(path)!r} has an unsupported extension; expected one of "
                    f"{', '.join(extensions)}."
                )
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files


def _extension(path: Path, extensions: Sequence[str] = SUPPORTED_EXTENSIONS) -> str | None:
    suffix = path.suffix.lower()
    return suffix if suffix in extensions else None


def check_encoding(encoding: object) -> str:
    """``encoding`` if it is a Python codec name.

    Raises:
        ValueError: for anything else, naming what was given.
    """
    try:
        codecs.lookup(encoding)  # type: ignore[arg-type]
    except (LookupError, TypeError):
        raise ValueError(
            f"encoding must be a Python codec name (e.g. 'utf-8', 'latin-1'), got {encoding!r}."
        ) from None
    return encoding  # type: ignore[return-value]


def decode_file(path: Path, encoding: str = "utf-8") -> str:
    """The text of ``path`` decoded with ``encoding``, undecodable bytes checked.

    Args:
        path: the file.
        encoding: a Python codec name (``"utf-8"``, ``"latin-1"``, ``"cp1252"``, ...).

    Returns:
        The decoded text; undecodable bytes (at most :data:`MAX_UNDECODABLE_FRACTION` of the
        file) become U+FFFD, with a warning that counts them.

    Raises:
        ValueError: for an unknown encoding, or when more bytes fail to decode than allowed;
            the message names the file, the count and the ``encoding`` option.
    """
    check_encoding(encoding)
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError:
        pass
    bad = 0
    pieces = []
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    position = 0
    while position < len(data):
        try:
            pieces.append(decoder.decode(data[position:], final=True))
            break
        except UnicodeDecodeError as error:
            # error.start/end are relative to the chunk just given to the decoder.
            pieces.append(data[position : position + error.start].decode(encoding))
            pieces.append("\ufffd")
            bad += error.end - error.start
            position += error.end
            decoder.reset()
            if bad > MAX_UNDECODABLE_FRACTION * len(data):
                break  # refused below: no need to decode the rest
    if bad > MAX_UNDECODABLE_FRACTION * len(data):
        raise ValueError(
            f"{path}: {bad} of {len(data)} bytes are not valid {encoding}; the file is probably "
            "in another encoding. Set encoding= (e.g. 'latin-1' or 'cp1252') on the data "
            "module, or convert the file to UTF-8."
        )
    warnings.warn(
        f"{path}: {bad} of {len(data)} bytes are not valid {encoding} and were replaced by U+FFFD.",
        stacklevel=2,
    )
    return "".join(pieces)


def read_documents(
    paths: list[str], text_field: str = "text", encoding: str = "utf-8"
) -> Iterator[str]:
    """Documents from text files, in a deterministic order.

    ``.txt`` files are one document each. ``.jsonl`` files hold one JSON object per line with
    the document in ``text_field``; blank lines are skipped. Files are decoded with
    :func:`decode_file`. The paths are resolved (see :func:`expand_paths`) before this function
    returns, so a bad path fails at the call, not at the first document.

    Args:
        paths: files, directories or globs.
        text_field: the key of the text in each JSONL object.
        encoding: the files' text encoding.

    Returns:
        An iterator over the documents.

    Raises:
        ValueError: for a path or glob that matches nothing, an unsupported extension, a file
            in another encoding (see :func:`decode_file`), or a JSONL line that is not a JSON
            object with a string in ``text_field`` (the message names the file and line).
    """
    files = expand_paths(paths)

    def documents() -> Iterator[str]:
        for path in files:
            text = decode_file(path, encoding)
            if _extension(path) == ".txt":
                yield text
            else:
                yield from _read_jsonl(path, text, text_field)

    return documents()


def _read_jsonl(path: Path, text: str, text_field: str) -> Iterator[str]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: invalid JSON ({error.msg}).") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
        if text_field not in record:
            raise ValueError(
                f"{where}: no field {text_field!r} (fields: {sorted(record)}); set "
                "text_field to the key that holds the text."
            )
        value = record[text_field]
        if not isinstance(value, str):
            raise ValueError(
                f"{where}: field {text_field!r} is a {type(value).__name__}, expected a string."
            )
        yield value
