"""``AtomicModelParallelStrategy``: Lightning's ``ModelParallelStrategy`` whose distributed
checkpoints are written atomically (the only module of :mod:`lightning_kd.checkpoint` that
imports Lightning).

Lightning writes a distributed checkpoint in place: the weight and optimizer shards
(torch.distributed.checkpoint, "DCP") first, then ``meta.pt`` (loop, callback and data state) on
rank 0. A job killed between the two leaves ``last.ckpt`` with new weights and old loop state,
which resumes silently at the wrong step; one killed while the shards are written leaves
``last.ckpt`` unloadable, and the previous checkpoint is gone. This strategy writes every
distributed checkpoint ``<dir>/<name>`` as:

1. rank 0 clears (or finishes, see below) what an earlier interrupted save of ``<name>`` left;
2. every rank writes its shards into ``<dir>/<name>.partial`` (DCP fsyncs them, rank 0 writes
   DCP's ``.metadata`` last), then hashes its share of the files (SHA-256, streaming);
3. rank 0 writes ``meta.pt`` there (fsynced);
4. rank 0 writes the completion marker ``COMPLETE`` there: JSON with the format version, the
   global step, every file's size and SHA-256 (written to a temporary name, fsynced, renamed);
5. rank 0 swaps it in: ``<name>`` → ``<name>.aside``, ``<name>.partial`` → ``<name>``, then
   removes ``<name>.aside``.

The marker is the commit point: a directory with a valid marker is complete wherever it is;
one without is torn. What a reader (:func:`~lightning_kd.checkpoint.resolve_last_checkpoint`)
finds if the job is killed during a save of step ``n`` over a complete ``<name>`` of step ``m``:

============================  ===================================  =========================
killed                        on disk                              newest complete
============================  ===================================  =========================
during/after shards, after    ``<name>`` (m), ``.partial`` torn    ``<name>`` (m); warns
``meta.pt``                                                        about ``.partial``
after the marker              ``<name>`` (m), ``.partial`` (n)     ``<name>.partial`` (n)
between the renames           ``.aside`` (m), ``.partial`` (n)     ``<name>.partial`` (n)
after the renames             ``<name>`` (n), ``.aside`` (m)       ``<name>`` (n)
while removing ``.aside``     ``<name>`` (n), ``.aside`` torn      ``<name>`` (n), no warning
============================  ===================================  =========================

The next save of ``<name>`` rolls a complete leftover ``.partial`` forward (finishes its swap)
before writing, so resuming from it loses nothing; a torn one is removed. ``load_checkpoint``
refuses a torn directory, and one whose files or ``meta.pt`` do not match its marker (every
file is hashed), with a ``ValueError`` that names the newest complete checkpoint in the same
folder.

Directory checkpoints without a marker (written by Lightning's ``ModelParallelStrategy``) still
load, with an :class:`~lightning_kd.checkpoint.UnverifiedCheckpointWarning`.

Single-file checkpoints (``save_distributed_checkpoint=False``) keep Lightning's save; a
directory previously at that path is moved aside first instead of being deleted, and a save
that left nothing on disk (Lightning swallows a ``PermissionError``) fails on every rank.
"""

from __future__ import annotations

import io
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint import FileSystemWriter, StorageWriter
from typing_extensions import override

from lightning_kd.checkpoint.inspect import inspect_checkpoint
from lightning_kd.checkpoint.layout import (
    MARKER_FILENAME,
    METADATA_FILENAME,
    aside_path,
    build_marker,
    discard,
    encode_marker,
    file_signature,
    listed_files,
    not_written_message,
    staging_path,
)
from lightning_kd.checkpoint.resolve import verify_checkpoint
from lightning_kd.io import atomic_write, fsync_dir, sha256_file

__all__ = ["AtomicModelParallelStrategy"]


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` whose distributed checkpoints are written atomically.

    Same arguments and behaviour as Lightning's, except that a distributed checkpoint is
    written into ``<path>.partial``, sealed with a completion marker and renamed into place
    (see the module docstring for the layout and what a crash at each moment leaves), and that
    loading refuses a directory that is torn or does not match its marker.

    Args:
        data_parallel_size: devices in a data-parallel group (``"auto"``: the number of nodes).
        tensor_parallel_size: devices in a tensor-parallel group (``"auto"``: devices per node).
        save_distributed_checkpoint: save a directory of shards (True) or one consolidated
            file on rank 0 (False, Lightning's save unchanged).
        process_group_backend: e.g. ``"nccl"`` or ``"gloo"`` (default from the device).
        timeout: for collectives.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self._atomic_distributed = save_distributed_checkpoint

    # ------------------------------------------------------------------ saving
    @override
    def save_checkpoint(
        self,
        checkpoint: dict[str, Any],
        filepath: str | os.PathLike[str],
        storage_options: Any = None,
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"`{type(self).__name__}.save_checkpoint(..., storage_options=...)` is not "
                "supported: the strategy writes the files itself, not through CheckpointIO."
            )
        # Every rank must write into the same directory: rank 0's path wins.
        path = Path(self.broadcast(str(filepath)))
        if not self._atomic_distributed:
            self._save_single_file(checkpoint, path)
            return
        staged = staging_path(path)
        if self.global_rank == 0:
            self._prepare(path, staged)
        self.barrier()
        self._write_shards(checkpoint, staged)
        self.barrier()
        digests = self._hash_files(staged)
        if self.global_rank == 0:
            self._write_metadata(checkpoint, staged)
            self._write_marker(checkpoint, staged, digests=digests)
            self._commit(staged, path)
        self.barrier()

    def _save_single_file(self, checkpoint: dict[str, Any], path: Path) -> None:
        # Lightning deletes a directory checkpoint at `path` before writing the file; moving it
        # aside instead keeps a complete checkpoint on disk until the file is in place.
        aside = aside_path(path)
        if self.global_rank == 0 and path.is_dir():
            discard(aside)
            path.rename(aside)
        self.barrier()
        before = file_signature(path) if self.global_rank == 0 else None
        super().save_checkpoint(checkpoint, path)
        problem = not_written_message(path, before) if self.global_rank == 0 else None
        if self.global_rank == 0 and problem is None:
            discard(aside)
        problem = self.broadcast(problem)  # every rank fails together
        if problem is not None:
            raise ValueError(problem)

    def _prepare(self, path: Path, staged: Path) -> None:
        """Rank 0: deal with what an interrupted save of ``path`` left, create ``staged``."""
        if staged.exists():
            leftover = inspect_checkpoint(staged)
            current = inspect_checkpoint(path) if path.exists() else None
            newer = (
                current is None
                or not current.complete
                or ((leftover.global_step or -1) >= (current.global_step or -1))
            )
            if leftover.kind == "staged" and leftover.complete and newer:
                # Killed after its marker: it is the newest checkpoint (maybe the one this run
                # resumed from). Finish its swap rather than lose it while the new one is written.
                self._commit(staged, path)
            else:
                discard(staged)
        staged.mkdir(parents=True)

    def _storage_writer(self, staged: Path) -> StorageWriter:
        """The DCP writer for the shards (fsyncs each file)."""
        return FileSystemWriter(staged, sync_files=True)

    def _write_shards(self, checkpoint: dict[str, Any], staged: Path) -> None:
        """All ranks: write the weight and optimizer shards (moves them out of ``checkpoint``).

        Same keys as Lightning's ``ModelParallelStrategy`` (``state_dict``, ``optimizer_{i}``),
        so its ``load_checkpoint`` reads them.
        """
        state: dict[str, Any] = {"state_dict": checkpoint.pop("state_dict")}
        for idx, optimizer_state in enumerate(checkpoint.pop("optimizer_states", [])):
            state[f"optimizer_{idx}"] = optimizer_state
        dcp.save(state, storage_writer=self._storage_writer(staged))

    def _hash_files(self, staged: Path) -> dict[str, str]:
        """All ranks: the SHA-256 of the files in ``staged`` (the shards and ``.metadata``),
        each rank hashing its share; the result on every rank."""
        names = self.broadcast(listed_files(staged) if self.global_rank == 0 else None)
        share = names[self.global_rank :: self.world_size]
        digests = {name: sha256_file(staged / name) for name in share}
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            parts: list[Any] = [None] * self.world_size
            dist.all_gather_object(parts, digests)
            digests = {name: digest for part in parts for name, digest in part.items()}
        return digests

    def _write_metadata(self, checkpoint: dict[str, Any], staged: Path) -> None:
        """Rank 0: write ``meta.pt`` (what is left of ``checkpoint``: loops, callbacks, ...)."""
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(staged / METADATA_FILENAME, buffer.getvalue())

    def _write_marker(
        self, checkpoint: dict[str, Any], staged: Path, digests: dict[str, str] | None = None
    ) -> None:
        """Rank 0: seal ``staged`` with the completion marker, after everything else.
        ``digests``: SHA-256 of files already hashed (the others are hashed here)."""
        marker = build_marker(
            staged,
            global_step=int(checkpoint["global_step"]),
            epoch=int(checkpoint.get("epoch", -1)),
            world_size=self.world_size,
            digests=digests,
        )
        atomic_write(staged / MARKER_FILENAME, encode_marker(marker))

    def _commit(self, staged: Path, path: Path) -> None:
        """Rank 0: swap the sealed ``staged`` into ``path``; at every moment one of them (or
        ``path.aside`` before ``staged`` exists) is a complete checkpoint."""
        aside = aside_path(path)
        discard(aside)  # a leftover: `staged` (complete) or `path` supersedes it
        if path.exists() or path.is_symlink():
            self._move_aside(path, aside)
        self._move_into_place(staged, path)
        self._discard_aside(aside)

    def _move_aside(self, path: Path, aside: Path) -> None:
        path.rename(aside)
        fsync_dir(path.parent)

    def _move_into_place(self, staged: Path, path: Path) -> None:
        staged.rename(path)
        fsync_dir(path.parent)

    def _discard_aside(self, aside: Path) -> None:
        discard(aside)

    @override
    def remove_checkpoint(self, filepath: str | os.PathLike[str]) -> None:
        """Rank 0: remove a checkpoint and the leftovers of its interrupted saves. A directory
        is renamed to ``*.aside`` first, so a removal cut short leaves no torn ``*.ckpt``."""
        if not self.is_global_zero:
            return
        path = Path(filepath)
        discard(staging_path(path))
        aside = aside_path(path)
        discard(aside)
        if path.is_dir() and not path.is_symlink():
            path.rename(aside)
            fsync_dir(path.parent)
            discard(aside)
        else:
            super().remove_checkpoint(filepath)

    # ------------------------------------------------------------------ loading
    @override
    def load_checkpoint(
        self, checkpoint_path: str | os.PathLike[str], weights_only: bool | None = None
    ) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        refusal = None
        if self.global_rank == 0 and path.is_dir():
            try:
                verify_checkpoint(path, weights_only=weights_only)
            except ValueError as error:
                refusal = str(error)
        # Every rank raises the same error (none is left waiting in a collective).
        refusal = self.broadcast(refusal)
        if refusal is not None:
            raise ValueError(refusal)
        return super().load_checkpoint(path, weights_only=weights_only)
