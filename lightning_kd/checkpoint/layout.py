"""The on-disk layout of a crash-safe distributed checkpoint and its completion marker.

A distributed checkpoint ``<dir>/<name>`` is a directory: DCP's shard files and its index
``.metadata``, Lightning's ``meta.pt`` (loops, callbacks, data state) and, written last, the
completion marker ``COMPLETE``: JSON with the format version, the global step and, for every
other file, its size and SHA-256. A save writes into ``<name>.partial`` and swaps it in through
``<name>.aside`` (see :mod:`lightning_kd.checkpoint.strategy`).

Marker versions: 1 hashed ``.metadata`` and ``meta.pt`` only and sized the shards (still read:
what it lists is checked); 2 hashes every file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from lightning_kd.io import sha256_file

#: The completion marker, written last into a distributed checkpoint directory.
MARKER_FILENAME = "COMPLETE"
#: Lightning's file for everything but weights and optimizer states (loops, callbacks, ...).
METADATA_FILENAME = "meta.pt"
#: DCP's index of the shards, written by rank 0 after every rank wrote its shards.
DCP_METADATA_FILENAME = ".metadata"
#: Suffix of the directory a checkpoint is written into before it is swapped into place.
STAGING_SUFFIX = ".partial"
#: Suffix the previous checkpoint is renamed to while the new one is swapped in.
ASIDE_SUFFIX = ".aside"
MARKER_FORMAT = "lightning_kd.distributed_checkpoint"
MARKER_VERSION = 2
#: Files the loader cannot do without: a writer that did not produce them must not seal.
REQUIRED_FILES = (DCP_METADATA_FILENAME, METADATA_FILENAME)

Kind = Literal["file", "directory", "staged", "aside", "legacy"]


def staging_path(path: str | os.PathLike[str]) -> Path:
    """Where a save of ``path`` writes before swapping in: ``<path>.partial``."""
    path = Path(path)
    return path.with_name(path.name + STAGING_SUFFIX)


def aside_path(path: str | os.PathLike[str]) -> Path:
    """Where the previous checkpoint at ``path`` waits during a swap: ``<path>.aside``."""
    path = Path(path)
    return path.with_name(path.name + ASIDE_SUFFIX)


def role(path: Path) -> Kind:
    """A marked directory's role, from its name: a checkpoint, or a save's leftover."""
    if path.name.endswith(STAGING_SUFFIX):
        return "staged"
    if path.name.endswith(ASIDE_SUFFIX):
        return "aside"
    return "directory"


def discard(path: Path) -> None:
    """Remove a checkpoint file or directory (or a leftover); nothing there is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def listed_files(directory: Path) -> list[str]:
    """The files a marker for ``directory`` lists: every plain file but the marker, sorted."""
    return sorted(f.name for f in directory.iterdir() if f.is_file() and f.name != MARKER_FILENAME)


def build_marker(
    directory: Path,
    global_step: int,
    epoch: int,
    world_size: int,
    digests: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The completion marker of ``directory`` (every file sized and hashed).

    Args:
        directory: the sealed-to-be checkpoint directory, all files written.
        global_step: the step it was saved at.
        epoch: the epoch it was saved in.
        world_size: how many ranks wrote it.
        digests: SHA-256 already computed (e.g. by the ranks that wrote the shards), by file
            name; the rest are computed here.

    Raises:
        RuntimeError: a file the loader needs (``.metadata``, ``meta.pt``) is missing.
    """
    names = listed_files(directory)
    missing = [name for name in REQUIRED_FILES if name not in names]
    if missing:  # a writer that did not produce what the loader needs: do not seal
        raise RuntimeError(f"Checkpoint {directory} lacks {missing} after writing; not sealing it")
    digests = dict(digests or {})
    return {
        "format": MARKER_FORMAT,
        "version": MARKER_VERSION,
        "global_step": int(global_step),
        "epoch": int(epoch),
        "world_size": int(world_size),
        "files": {name: (directory / name).stat().st_size for name in names},
        "sha256": {name: digests.get(name) or sha256_file(directory / name) for name in names},
    }


def encode_marker(marker: Mapping[str, Any]) -> bytes:
    """The marker file's bytes."""
    return json.dumps(marker, indent=1).encode()


def file_signature(path: Path) -> tuple[int, int, int, int] | None:
    """``(inode, size, mtime_ns, ctime_ns)`` of ``path``, or None when nothing is there: taken
    before and after a save, equal values mean the save did not replace the file."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def not_written_message(path: Path, before: tuple[int, int, int, int] | None = None) -> str | None:
    """Why a save of ``path`` did not reach the disk (None when it did). Lightning's
    ``_atomic_save`` swallows a ``PermissionError``, so a save into a folder that cannot be
    written "succeeds" with nothing new on disk: look.

    Args:
        path: the file just saved.
        before: :func:`file_signature` of ``path`` taken before the save (None: nothing was
            there); an unchanged file is an older checkpoint, not this save.
    """
    after = file_signature(path)
    if after is not None and after != before:
        return None
    found = (
        "nothing is there after saving"
        if after is None
        else "the file there is still the one from before this save"
    )
    return (
        f"checkpoint {str(path)!r} was not written: {found}. Expected a checkpoint folder "
        f"this process can write; is {str(path.parent)!r} read-only, immutable or full?"
    )
