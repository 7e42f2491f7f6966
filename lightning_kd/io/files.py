"""Writing a file so that readers see it whole or not at all, hashing one without reading it
into memory, and checking up front that a folder can be written.

Files are created with the mode an ordinary ``open()`` would give them (``0o666`` less the
umask, e.g. ``0o644`` under umask 022): ``tempfile.mkstemp``, which the atomic write needs for
a unique temporary name, creates ``0o600`` files, unreadable to the rest of a team sharing a
checkpoint, cache or export.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "atomic_write",
    "default_file_mode",
    "ensure_writable_dir",
    "follow_umask",
    "fsync_dir",
    "sha256_file",
]

_UMASK_LOCK = threading.Lock()
_BLOCK = 1 << 20


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` less the process umask."""
    try:  # Linux: read it without changing it
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:  # elsewhere: the only way to read it is to set it
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def follow_umask(path: str | os.PathLike[str]) -> None:
    """Give a file written by a library that creates ``0o600`` files (``mkstemp``,
    safetensors) the mode of an ordinary new file (:func:`default_file_mode`)."""
    os.chmod(path, default_file_mode())


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make new entries and renames in the folder ``path`` durable. Some filesystems refuse;
    that only weakens durability against power loss, not atomicity against a killed process."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes | Callable[[BinaryIO], object]) -> None:
    """Write a file atomically and durably: into a temporary file in the same folder (fsynced),
    renamed over ``path``, then the folder fsynced. Readers see the old file or the new one,
    never a part; a failed write leaves no temporary file behind.

    Args:
        path: the file (its folder is created when missing).
        data: the bytes, or a function that writes them to the binary handle it is given
            (e.g. ``lambda f: torch.save(obj, f)``).

    Raises:
        OSError: the folder or the file cannot be written (nothing is left at ``path``'s
            temporary name; ``path`` itself is unchanged).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "wb") as handle:
            if isinstance(data, (bytes, bytearray, memoryview)):
                handle.write(data)
            else:
                data(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB blocks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_writable_dir(path: str | os.PathLike[str], what: str = "output folder") -> Path:
    """Create the folder ``path`` if needed and check that a file can be created in it.

    Args:
        path: the folder.
        what: what the folder is for, for the message (e.g. ``"checkpoint folder"``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: one line naming ``path``: it (or a parent) is a file, or it cannot be
            created or written (permissions, read-only or immutable filesystem).
    """
    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ValueError(
            f"{what} {str(path)!r} cannot be created: {str(blocker)!r} is a file, not a folder; "
            "expected a folder path (or one that can be created)."
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".write-check."):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ValueError(
            f"{what} {str(path)!r} is not writable ({reason}); expected a folder this process "
            "can create files in."
        ) from None
    return path
