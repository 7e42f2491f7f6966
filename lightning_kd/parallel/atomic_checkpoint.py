"""Crash-safe distributed checkpoints: a reader sees a checkpoint whole, or not at all.

Lightning's ``ModelParallelStrategy`` writes a distributed checkpoint in place: the weight and
optimizer shards (torch.distributed.checkpoint, "DCP") first, then ``meta.pt`` (loop, callback
and data state) on rank 0. A job killed between the two leaves ``last.ckpt`` with new weights
and old loop state, which resumes silently at the wrong step; one killed while the shards are
written leaves ``last.ckpt`` unloadable, and the previous checkpoint is gone.

:class:`AtomicModelParallelStrategy` writes every distributed checkpoint ``<dir>/<name>`` as:

1. rank 0 clears (or finishes, see below) what an earlier interrupted save of ``<name>`` left;
2. every rank writes its shards into ``<dir>/<name>.partial`` (DCP fsyncs them, rank 0 writes
   DCP's ``.metadata`` last);
3. rank 0 writes ``meta.pt`` there (fsynced);
4. rank 0 writes the completion marker ``COMPLETE`` there: JSON with the format version, the
   global step, every file's size and the SHA-256 of ``.metadata`` and ``meta.pt`` (written to
   a temporary name, fsynced, renamed);
5. rank 0 swaps it in: ``<name>`` → ``<name>.aside``, ``<name>.partial`` → ``<name>``, then
   removes ``<name>.aside``.

The marker is the commit point: a directory with a valid marker is complete wherever it is;
one without is torn. What a reader (:func:`resolve_last_checkpoint`) finds if the job is
killed during a save of step ``n`` over a complete ``<name>`` of step ``m``:

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
refuses a torn directory, and one whose files or ``meta.pt`` do not match its marker, with a
``ValueError`` that names the newest complete checkpoint in the same folder.

Directory checkpoints without a marker (written by Lightning's ``ModelParallelStrategy``) still
load, with an :class:`UnverifiedCheckpointWarning`: the shards that DCP's ``.metadata``
references are checked to be there, but not that ``meta.pt`` comes from the same save.

Single-file checkpoints (``save_distributed_checkpoint=False``) keep Lightning's save
(``torch.save`` into memory, then an fsspec transaction: a temporary file renamed over the
target); a directory previously at that path is moved aside first instead of being deleted.
Lightning's rename is atomic only when the temporary directory (``tempfile.gettempdir()``) is on
the checkpoint's filesystem, otherwise it falls back to a copy; :func:`inspect_checkpoint`
therefore still reads a file's header (cheaply, memory-mapped) before trusting it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed.checkpoint as dcp
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter, StorageWriter
from typing_extensions import override

log = logging.getLogger(__name__)

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
MARKER_VERSION = 1
_HASHED = (DCP_METADATA_FILENAME, METADATA_FILENAME)  # small files: hash them, size the shards

Kind = Literal["file", "directory", "staged", "aside", "legacy"]


class TornCheckpointWarning(UserWarning):
    """A checkpoint was skipped because a save was interrupted while writing it."""


class UnverifiedCheckpointWarning(UserWarning):
    """A distributed checkpoint without a completion marker: its completeness is unknown."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`inspect_checkpoint` found out about one checkpoint, cheaply.

    Attributes:
        path: the checkpoint (a file or a directory).
        kind: ``"file"`` (single file), ``"directory"`` (distributed, with a marker),
            ``"staged"`` / ``"aside"`` (leftovers of an interrupted save, named
            ``*.partial`` / ``*.aside``), ``"legacy"`` (distributed, without a marker).
        complete: whether it can be resumed from.
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


# --------------------------------------------------------------------------- file helpers
def staging_path(path: str | os.PathLike[str]) -> Path:
    """Where a save of ``path`` writes before swapping in: ``<path>.partial``."""
    path = Path(path)
    return path.with_name(path.name + STAGING_SUFFIX)


def aside_path(path: str | os.PathLike[str]) -> Path:
    """Where the previous checkpoint at ``path`` waits during a swap: ``<path>.aside``."""
    path = Path(path)
    return path.with_name(path.name + ASIDE_SUFFIX)


def _fsync_dir(path: Path) -> None:
    # Makes renames and new entries in `path` durable; some filesystems refuse, which only
    # weakens durability against power loss, not atomicity against a killed process.
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


def _write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name: the file appears whole or not."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _discard(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_meta(path: Path, weights_only: bool | None) -> Mapping[str, Any]:
    meta = torch.load(path, map_location="cpu", weights_only=weights_only)
    if not isinstance(meta, Mapping):
        raise ValueError(f"holds a {type(meta).__name__}, not a checkpoint dict")
    return meta


def _role(path: Path) -> Kind:
    if path.name.endswith(STAGING_SUFFIX):
        return "staged"
    if path.name.endswith(ASIDE_SUFFIX):
        return "aside"
    return "directory"


# --------------------------------------------------------------------------- inspection
def _check_marked(
    path: Path, deep: bool, weights_only: bool | None
) -> tuple[str | None, int | None, float]:
    """Check a directory against its completion marker.

    Returns:
        ``(problem or None, global_step, mtime)``. ``deep`` also loads ``meta.pt`` and compares
        its ``global_step`` with the marker's (the cheap check relies on its SHA-256).
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
    for name, size in files.items():
        if name == METADATA_FILENAME:
            continue
        file = path / name
        if not file.is_file():
            return f"{name} is missing", step, mtime
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, the marker says {size}", step, mtime
    meta_file = path / METADATA_FILENAME
    if not meta_file.is_file():
        return f"{METADATA_FILENAME} is missing", step, mtime
    if deep:
        try:
            meta_step = _load_meta(meta_file, weights_only).get("global_step")
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
        if _sha256(path / name) != digest:
            return (
                f"{name} is not the one this checkpoint was saved with (SHA-256 differs from "
                "the marker's)",
                step,
                mtime,
            )
    return None, int(step), mtime


def _check_legacy(path: Path) -> tuple[str | None, int | None, float]:
    """A marker-less distributed checkpoint: its files must be there and cover what DCP's
    ``.metadata`` references; that ``meta.pt`` matches the shards cannot be checked."""
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
        step = _load_meta(meta_file, weights_only=True).get("global_step")
    except Exception as error:
        return f"{METADATA_FILENAME} cannot be read ({error})", None, 0.0
    if not isinstance(step, int):
        return f"{METADATA_FILENAME} has no global_step", None, 0.0
    return None, step, meta_file.stat().st_mtime


def inspect_checkpoint(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Say, cheaply, whether ``path`` is a complete checkpoint and at which step.

    Reads no weights: a directory's completion marker, the sizes of its files and the SHA-256
    of its two small index files (``.metadata``, ``meta.pt``); a file's pickled header,
    memory-mapped (Lightning writes files through a rename, but a truncated one still fails
    here). Marker-less directories named ``*.ckpt`` are taken as Lightning's
    (``kind="legacy"``).

    Args:
        path: a checkpoint file or directory.

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
    role = _role(path)
    if (path / MARKER_FILENAME).is_file():
        problem, step, mtime = _check_marked(path, deep=False, weights_only=True)
        return CheckpointInfo(path, role, problem is None, step, mtime, problem)
    if role != "directory":
        problem = f"no completion marker ({MARKER_FILENAME}), its save did not finish"
        return CheckpointInfo(path, role, False, None, path.stat().st_mtime, problem)
    problem, step, mtime = _check_legacy(path)
    return CheckpointInfo(path, "legacy", problem is None, step, mtime, problem)


def _candidates(dirpath: Path) -> list[Path]:
    """Entries of ``dirpath`` that are (or were meant to be) checkpoints."""
    found = []
    for entry in sorted(dirpath.iterdir()):
        name = entry.name
        if entry.is_file():
            wanted = name.endswith(".ckpt")
        else:
            wanted = entry.is_dir() and (
                name.endswith((".ckpt", STAGING_SUFFIX, ASIDE_SUFFIX))
                or (entry / MARKER_FILENAME).is_file()
            )
        if wanted:
            found.append(entry)
    return found


def _survey(
    dirpaths: Iterable[str | os.PathLike[str]],
) -> tuple[list[CheckpointInfo], list[CheckpointInfo]]:
    complete, torn = [], []
    for dirpath in dict.fromkeys(Path(p) for p in dirpaths):
        if not dirpath.is_dir():
            continue
        for entry in _candidates(dirpath):
            try:
                info = inspect_checkpoint(entry)
            except FileNotFoundError:  # removed while we looked (another job's cleanup)
                continue
            (complete if info.complete else torn).append(info)
    return complete, torn


def _newest(infos: list[CheckpointInfo]) -> CheckpointInfo | None:
    return max(infos, key=lambda i: (i.global_step, i.mtime, str(i.path)), default=None)


def resolve_last_checkpoint(dirpaths: Iterable[str | os.PathLike[str]]) -> str | None:
    """The newest complete checkpoint in ``dirpaths``, for ``--ckpt_path last``.

    Looks at every ``*.ckpt`` file and every directory checkpoint directly in each folder
    (``*.ckpt`` directories, and the ``*.partial`` / ``*.aside`` leftovers of an interrupted
    save), keeps the complete ones (see :func:`inspect_checkpoint`; no weights are read) and
    returns the one with the highest global step, then the latest completion time. A complete
    ``*.partial`` directory is a checkpoint whose final rename was interrupted: it is returned
    like any other, and the next save of that name finishes the swap.

    Warns (:class:`TornCheckpointWarning`, on global rank 0) naming each torn checkpoint it
    skipped, why, and what it picked instead. An incomplete ``*.aside`` directory is skipped
    silently: it is a replaced checkpoint whose removal was interrupted.

    Args:
        dirpaths: folders to search (missing ones are ignored).

    Returns:
        The path (``str``), or None when no complete checkpoint was found.
    """
    complete, torn = _survey(dirpaths)
    best = _newest(complete)
    torn = [info for info in torn if info.kind != "aside"]
    if torn:
        lines = "\n".join(f"  {info.path}: {info.problem}" for info in torn)
        chosen = (
            f"Using {best.path} (global step {best.global_step}), the newest complete checkpoint."
            if best is not None
            else "No complete checkpoint was found."
        )
        rank_zero_warn(
            f"Skipped {len(torn)} incomplete checkpoint(s), left by a save that was "
            f"interrupted:\n{lines}\n{chosen}",
            category=TornCheckpointWarning,
            stacklevel=5,  # the caller of resolve_last_checkpoint (past rank_zero_only)
        )
    if best is not None and best.kind == "staged":
        log.info("%s is complete; its save was interrupted before its final rename", best.path)
    return None if best is None else str(best.path)


def verify_checkpoint(
    path: str | os.PathLike[str], *, weights_only: bool | None = None
) -> CheckpointInfo:
    """Check a checkpoint before loading it; refuse a torn or mismatched one.

    On top of :func:`inspect_checkpoint`, loads ``meta.pt`` of a marked directory and checks
    that its ``global_step`` is the marker's. A marker-less ``*.ckpt`` directory (Lightning's
    ``ModelParallelStrategy``) passes with an :class:`UnverifiedCheckpointWarning` when its
    files are there.

    Args:
        path: the checkpoint.
        weights_only: passed to ``torch.load`` for ``meta.pt`` (as Lightning's load does).

    Returns:
        The :class:`CheckpointInfo` of a loadable checkpoint.

    Raises:
        ValueError: the checkpoint is incomplete or inconsistent; the message names the
            newest complete checkpoint in the same folder when there is one.
        FileNotFoundError: nothing is at ``path``.
    """
    info = inspect_checkpoint(path)
    if info.kind in ("directory", "staged", "aside") and (info.path / MARKER_FILENAME).is_file():
        # The deep check compares meta.pt's global_step with the marker's before the hashes,
        # so that a meta.pt from another save is reported as such.
        problem, step, mtime = _check_marked(info.path, deep=True, weights_only=weights_only)
        info = CheckpointInfo(info.path, info.kind, problem is None, step, mtime, problem)
    if not info.complete:
        raise ValueError(_refusal(info))
    if info.kind == "legacy":
        rank_zero_warn(
            f"{info.path} has no completion marker ({MARKER_FILENAME}): it was written by "
            "Lightning's ModelParallelStrategy, which writes in place, so whether its weights "
            "and its loop state (meta.pt) come from the same save cannot be verified. Its files "
            "are all there; loading it. Checkpoints written by "
            "lightning_kd.parallel.AtomicModelParallelStrategy are verified.",
            category=UnverifiedCheckpointWarning,
        )
    return info


def _refusal(info: CheckpointInfo) -> str:
    folder = info.path.parent
    complete, _ = _survey([folder])
    alternative = _newest([i for i in complete if i.path != info.path])
    if alternative is not None:
        advice = (
            f"The newest complete checkpoint in {folder} is {alternative.path} (global step "
            f"{alternative.global_step}): resume from it (--ckpt_path {alternative.path}, or "
            "--ckpt_path last, which skips incomplete checkpoints)."
        )
    else:
        advice = f"There is no complete checkpoint in {folder} to use instead."
    return (
        f"Refusing to load {info.path}, which is not a complete checkpoint: {info.problem}. A "
        "save that was interrupted (the job was killed or crashed while writing) leaves such a "
        f"directory, whose weights and loop state may come from different steps. {advice}"
    )


# --------------------------------------------------------------------------- strategy
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
        if self.global_rank == 0:
            self._write_metadata(checkpoint, staged)
            self._write_marker(checkpoint, staged)
            self._commit(staged, path)
        self.barrier()

    def _save_single_file(self, checkpoint: dict[str, Any], path: Path) -> None:
        # Lightning deletes a directory checkpoint at `path` before writing the file; moving it
        # aside instead keeps a complete checkpoint on disk until the file is in place.
        aside = aside_path(path)
        if self.global_rank == 0 and path.is_dir():
            _discard(aside)
            path.rename(aside)
        self.barrier()
        super().save_checkpoint(checkpoint, path)
        if self.global_rank == 0:
            _discard(aside)

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
                _discard(staged)
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

    def _write_metadata(self, checkpoint: dict[str, Any], staged: Path) -> None:
        """Rank 0: write ``meta.pt`` (what is left of ``checkpoint``: loops, callbacks, ...)."""
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        _write_durably(staged / METADATA_FILENAME, buffer.getvalue())

    def _write_marker(self, checkpoint: dict[str, Any], staged: Path) -> None:
        """Rank 0: seal ``staged`` with the completion marker, after everything else."""
        files = {
            f.name: f.stat().st_size
            for f in sorted(staged.iterdir())
            if f.is_file() and f.name != MARKER_FILENAME
        }
        missing = [name for name in _HASHED if name not in files]
        if missing:  # a writer that did not produce what the loader needs: do not seal
            raise RuntimeError(f"Checkpoint {staged} lacks {missing} after writing; not sealing it")
        marker = {
            "format": MARKER_FORMAT,
            "version": MARKER_VERSION,
            "global_step": int(checkpoint["global_step"]),
            "epoch": int(checkpoint.get("epoch", -1)),
            "world_size": self.world_size,
            "files": files,
            "sha256": {name: _sha256(staged / name) for name in _HASHED},
        }
        _write_durably(staged / MARKER_FILENAME, json.dumps(marker, indent=1).encode())

    def _commit(self, staged: Path, path: Path) -> None:
        """Rank 0: swap the sealed ``staged`` into ``path``; at every moment one of them (or
        ``path.aside`` before ``staged`` exists) is a complete checkpoint."""
        aside = aside_path(path)
        _discard(aside)  # a leftover: `staged` (complete) or `path` supersedes it
        if path.exists() or path.is_symlink():
            self._move_aside(path, aside)
        self._move_into_place(staged, path)
        self._discard_aside(aside)

    def _move_aside(self, path: Path, aside: Path) -> None:
        path.rename(aside)
        _fsync_dir(path.parent)

    def _move_into_place(self, staged: Path, path: Path) -> None:
        staged.rename(path)
        _fsync_dir(path.parent)

    def _discard_aside(self, aside: Path) -> None:
        _discard(aside)

    @override
    def remove_checkpoint(self, filepath: str | os.PathLike[str]) -> None:
        """Rank 0: remove a checkpoint and the leftovers of its interrupted saves. A directory
        is renamed to ``*.aside`` first, so a removal cut short leaves no torn ``*.ckpt``."""
        if not self.is_global_zero:
            return
        path = Path(filepath)
        _discard(staging_path(path))
        aside = aside_path(path)
        _discard(aside)
        if path.is_dir() and not path.is_symlink():
            path.rename(aside)
            _fsync_dir(path.parent)
            _discard(aside)
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
