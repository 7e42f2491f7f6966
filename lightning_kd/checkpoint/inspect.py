"""What one checkpoint is: complete or not, and at which step, without reading its weights.

A directory with a completion marker (:mod:`lightning_kd.checkpoint.layout`) is checked against
it: cheaply (every file there with its size, the SHA-256 of the two small index files
``.metadata`` and ``meta.pt``), or in full (``contents=True``: every file's SHA-256, and
``meta.pt``'s global step against the marker's), which reads every byte once, streaming. A
directory without a marker is taken as Lightning's ``ModelParallelStrategy``'s (``"legacy"``):
DCP's index must be there and every shard it references at least as long as it says. A file is
read with ``torch.load`` memory-mapped (the pickle only).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_kd.checkpoint.layout import (
    DCP_METADATA_FILENAME,
    MARKER_FILENAME,
    MARKER_FORMAT,
    MARKER_VERSION,
    METADATA_FILENAME,
    REQUIRED_FILES,
    Kind,
    role,
)
from lightning_kd.io import sha256_file

__all__ = [
    "CheckpointInfo",
    "TornCheckpointWarning",
    "UnverifiedCheckpointWarning",
    "check_marked",
    "inspect_checkpoint",
]


class TornCheckpointWarning(UserWarning):
    """A checkpoint was skipped because a save was interrupted while writing it, or its files
    are not the ones it was saved with."""


class UnverifiedCheckpointWarning(UserWarning):
    """A distributed checkpoint without a completion marker: its completeness is unknown."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`inspect_checkpoint` found out about one checkpoint.

    Attributes:
        path: the checkpoint (a file or a directory).
        kind: ``"file"`` (single file), ``"directory"`` (distributed, with a marker),
            ``"staged"`` / ``"aside"`` (leftovers of an interrupted save, named
            ``*.partial`` / ``*.aside``), ``"legacy"`` (distributed, without a marker).
        complete: whether it can be resumed from (as far as it was checked).
        global_step: the step it was saved at (None when unreadable).
        mtime: when it was completed (seconds since the epoch), to order equal steps.
        problem: why it is not complete (None when it is).
    """

    path: Path
    kind: Kind
    complete: bool
    global_step: int | None
    mtime: float
    problem: str | None = None


Check = tuple[str | None, int | None, float]  # (problem or None, global_step, mtime)

# Directories whose contents were verified in this process, by the stat of every file: resolving
# `last` and then loading it hashes the files once.
# (A file rewritten or copied in with its old mtime, `cp -p`, still changes inode or ctime.)
_VERIFIED: set[tuple[str, tuple[tuple[str, int, int, int, int], ...]]] = set()


def _fingerprint(path: Path) -> tuple[str, tuple[tuple[str, int, int, int, int], ...]]:
    stats = ((f.name, f.stat()) for f in sorted(path.iterdir()) if f.is_file())
    return str(path.resolve()), tuple(
        (name, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for name, s in stats
    )


def load_meta(path: Path, weights_only: bool | None) -> Mapping[str, Any]:
    """``meta.pt``'s dict (loops, callbacks, ``global_step``, ...)."""
    meta = torch.load(path, map_location="cpu", weights_only=weights_only)
    if not isinstance(meta, Mapping):
        raise ValueError(f"holds a {type(meta).__name__}, not a checkpoint dict")
    return meta


def check_marked(path: Path, contents: bool, weights_only: bool | None = True) -> Check:
    """Check a directory against its completion marker.

    Args:
        path: the directory.
        contents: hash every file the marker lists and compare ``meta.pt``'s global step with
            the marker's; otherwise only sizes and the two small index files' hashes.
        weights_only: passed to ``torch.load`` for ``meta.pt``.

    Returns:
        ``(problem or None, global_step, mtime)``.
    """
    marker = path / MARKER_FILENAME
    try:
        data = json.loads(marker.read_text())
        mtime = marker.stat().st_mtime
        step, files, hashes = data["global_step"], data["files"], data["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its completion marker {MARKER_FILENAME} is unreadable ({error})", None, 0.0
    if data.get("format") != MARKER_FORMAT or not isinstance(data.get("version"), int):
        return f"{MARKER_FILENAME} is not a {MARKER_FORMAT} marker", None, mtime
    if data["version"] > MARKER_VERSION:
        return (
            f"it was written in format version {data['version']} (this lightning_kd reads up to "
            f"{MARKER_VERSION}): upgrade lightning_kd",
            step,
            mtime,
        )
    # Sizes first: a half-written or half-deleted checkpoint shows up without reading shards.
    # (meta.pt's is not: one from another save is reported by its global step, below.)
    for name, size in files.items():
        if name == METADATA_FILENAME:
            continue
        file = path / name
        if not file.is_file():
            return f"{name} is missing", step, mtime
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, the marker says {size}", step, mtime
    if not (path / METADATA_FILENAME).is_file():
        return f"{METADATA_FILENAME} is missing", step, mtime
    fingerprint = _fingerprint(path)
    if fingerprint in _VERIFIED:
        return None, int(step), mtime
    if contents:
        try:
            meta_step = load_meta(path / METADATA_FILENAME, weights_only).get("global_step")
        except Exception as error:  # any unpickling failure means the same: unusable
            return f"{METADATA_FILENAME} cannot be read ({error})", step, mtime
        if meta_step != step:
            return (
                f"{METADATA_FILENAME} says global_step {meta_step}, the completion marker says "
                f"{step}: the loop state and the weights come from different saves",
                step,
                mtime,
            )
    for name, digest in hashes.items():
        if not contents and name not in REQUIRED_FILES:
            continue
        if sha256_file(path / name) != digest:
            return (
                f"{name} is not the file this checkpoint was saved with (its SHA-256 differs "
                "from the marker's)",
                step,
                mtime,
            )
    if contents:
        _VERIFIED.add(fingerprint)
    return None, int(step), mtime


def check_legacy(path: Path) -> Check:
    """A marker-less distributed checkpoint: its files must be there and cover what DCP's
    ``.metadata`` references; that ``meta.pt`` matches the shards cannot be checked."""
    from torch.distributed.checkpoint import FileSystemReader

    meta_file = path / METADATA_FILENAME
    if not (path / DCP_METADATA_FILENAME).is_file():
        return f"{DCP_METADATA_FILENAME} (the index of the shards) is missing", None, 0.0
    if not meta_file.is_file():
        return f"{METADATA_FILENAME} is missing", None, 0.0
    try:
        extents: dict[str, int] = {}
        for info in FileSystemReader(str(path)).read_metadata().storage_data.values():
            end = int(info.offset) + int(info.length)
            extents[info.relative_path] = max(extents.get(info.relative_path, 0), end)
    except Exception as error:
        return f"{DCP_METADATA_FILENAME} cannot be read ({error})", None, 0.0
    for name, end in sorted(extents.items()):
        file = path / name
        if not file.is_file() or file.stat().st_size < end:
            return (
                f"shard {name} is missing or shorter than {DCP_METADATA_FILENAME} says",
                None,
                0.0,
            )
    try:
        step = load_meta(meta_file, weights_only=True).get("global_step")
    except Exception as error:
        return f"{METADATA_FILENAME} cannot be read ({error})", None, 0.0
    if not isinstance(step, int):
        return f"{METADATA_FILENAME} has no global_step", None, 0.0
    return None, step, meta_file.stat().st_mtime


def inspect_checkpoint(path: str | os.PathLike[str], *, contents: bool = False) -> CheckpointInfo:
    """Say whether ``path`` is a complete checkpoint and at which step.

    Reads no weights unless ``contents``: a directory's completion marker, the sizes of its
    files and the SHA-256 of its two small index files (``.metadata``, ``meta.pt``); a file's
    pickled header, memory-mapped (Lightning writes files through a rename, but a truncated
    one still fails here). Marker-less directories are taken as Lightning's
    (``kind="legacy"``).

    Args:
        path: a checkpoint file or directory.
        contents: for a marked directory, also hash every file and compare ``meta.pt``'s
            global step with the marker's (see :func:`check_marked`).

    Returns:
        The :class:`CheckpointInfo`.

    Raises:
        FileNotFoundError: nothing is at ``path``.
    """
    path = Path(path)
    if path.is_file():
        mtime = path.stat().st_mtime
        try:
            # mmap: the tensors stay on disk, only the pickle is read.
            meta = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            step = meta.get("global_step") if isinstance(meta, Mapping) else None
        except Exception as error:
            return CheckpointInfo(path, "file", False, None, mtime, f"cannot be read ({error})")
        if not isinstance(step, int):
            return CheckpointInfo(path, "file", False, None, mtime, "has no global_step")
        return CheckpointInfo(path, "file", True, step, mtime)
    if not path.is_dir():
        raise FileNotFoundError(f"No checkpoint at {path}")
    kind = role(path)
    if (path / MARKER_FILENAME).is_file():
        problem, step, mtime = check_marked(path, contents=contents)
        return CheckpointInfo(path, kind, problem is None, step, mtime, problem)
    if kind != "directory":
        problem = f"no completion marker ({MARKER_FILENAME}), its save did not finish"
        return CheckpointInfo(path, kind, False, None, path.stat().st_mtime, problem)
    problem, step, mtime = check_legacy(path)
    return CheckpointInfo(path, "legacy", problem is None, step, mtime, problem)
