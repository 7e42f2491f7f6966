"""Durable files, with nothing but the standard library: the one atomic write, the one
streaming file hash and the one writability check, shared by checkpoints, teacher caches, token
caches and exports.

It lives below every other package (``data``, ``teacher_cache``, ``checkpoint``, ``export``)
so that each can use it without importing Lightning or each other.
"""

from lightning_kd.io.files import (
    atomic_write,
    default_file_mode,
    ensure_writable_dir,
    follow_umask,
    fsync_dir,
    sha256_file,
)

__all__ = [
    "atomic_write",
    "default_file_mode",
    "ensure_writable_dir",
    "follow_umask",
    "fsync_dir",
    "sha256_file",
]
