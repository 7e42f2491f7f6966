"""Which checkpoint to resume from: the newest complete one in a run's folders
(``--ckpt_path last``), and the check that refuses an incomplete one before it is loaded."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from lightning_kd.checkpoint._rank import global_rank, warn_rank_zero
from lightning_kd.checkpoint.inspect import (
    CheckpointInfo,
    TornCheckpointWarning,
    UnverifiedCheckpointWarning,
    check_marked,
    inspect_checkpoint,
)
from lightning_kd.checkpoint.layout import ASIDE_SUFFIX, MARKER_FILENAME, STAGING_SUFFIX

__all__ = ["resolve_last_checkpoint", "verify_checkpoint"]

log = logging.getLogger(__name__)
_MARKED = ("directory", "staged", "aside")


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
    """The checkpoints in ``dirpaths``, cheaply checked: ``(complete, torn)``."""
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


def _by_recency(infos: list[CheckpointInfo]) -> list[CheckpointInfo]:
    return sorted(infos, key=lambda i: (i.global_step, i.mtime, str(i.path)), reverse=True)


def _verified_newest(
    complete: list[CheckpointInfo], torn: list[CheckpointInfo], contents: bool = True
) -> CheckpointInfo | None:
    """The newest of ``complete`` whose files all hash to its marker's (marked directories
    only, when ``contents``); the ones that do not are appended to ``torn``."""
    for info in _by_recency(complete):
        if info.kind not in _MARKED or not contents:
            return info
        problem, step, mtime = check_marked(info.path, contents=True)
        if problem is None:
            return info
        torn.append(CheckpointInfo(info.path, info.kind, False, step, mtime, problem))
    return None


def resolve_last_checkpoint(
    dirpaths: Iterable[str | os.PathLike[str]], *, verify_contents: bool | None = None
) -> str | None:
    """The newest complete checkpoint in ``dirpaths``, for ``--ckpt_path last``.

    Looks at every ``*.ckpt`` file and every directory checkpoint directly in each folder
    (``*.ckpt`` directories, and the ``*.partial`` / ``*.aside`` leftovers of an interrupted
    save), keeps the complete ones and returns the one with the highest global step, then the
    latest completion time. The one returned, if a marked directory, has had every file hashed
    against its marker; one that fails (a flipped byte, a shard of another save restored by
    hand) is skipped for the next newest. A complete ``*.partial`` directory is a checkpoint
    whose final rename was interrupted: it is returned like any other, and the next save of that
    name finishes the swap.

    Warns (:class:`TornCheckpointWarning`, on global rank 0) naming each checkpoint it skipped,
    why, and what it picked instead. An incomplete ``*.aside`` directory is skipped silently:
    it is a replaced checkpoint whose removal was interrupted.

    Args:
        dirpaths: folders to search (missing ones are ignored).
        verify_contents: hash the chosen directory's files (default: on global rank 0 only;
            the other ranks of a launch resolve cheaply, and the strategy loads what rank 0
            chose, so the files are read once, not once per rank).

    Returns:
        The path (``str``), or None when no complete checkpoint was found.
    """
    if verify_contents is None:
        verify_contents = global_rank() == 0
    complete, torn = _survey(dirpaths)
    best = _verified_newest(complete, torn, verify_contents)
    torn = [info for info in torn if info.kind != "aside"]
    if torn:
        chosen = (
            f"Using {best.path} (global step {best.global_step}), the newest complete checkpoint."
            if best is not None
            else "No complete checkpoint was found."
        )
        if len(torn) == 1:
            message = f"Skipped the incomplete checkpoint {torn[0].path}: {torn[0].problem}. "
        else:
            lines = "".join(f"\n  {info.path}: {info.problem}" for info in torn)
            message = f"Skipped {len(torn)} incomplete checkpoints:{lines}\n"
        warn_rank_zero(message + chosen, TornCheckpointWarning, stacklevel=2)
    if best is not None and best.kind == "staged":
        log.info("%s is complete; its save was interrupted before its final rename", best.path)
    return None if best is None else str(best.path)


def verify_checkpoint(
    path: str | os.PathLike[str], *, weights_only: bool | None = None
) -> CheckpointInfo:
    """Check a checkpoint before loading it; refuse a torn or mismatched one.

    On top of :func:`~lightning_kd.checkpoint.inspect.inspect_checkpoint`, a marked directory
    has every file hashed against its marker and ``meta.pt``'s ``global_step`` compared with
    the marker's. A marker-less ``*.ckpt`` directory (Lightning's ``ModelParallelStrategy``)
    passes with an :class:`UnverifiedCheckpointWarning` when its files are there.

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
    if info.kind in _MARKED and (info.path / MARKER_FILENAME).is_file():
        # meta.pt's global_step is compared with the marker's before the hashes, so that a
        # meta.pt from another save is reported as such.
        problem, step, mtime = check_marked(info.path, contents=True, weights_only=weights_only)
        info = CheckpointInfo(info.path, info.kind, problem is None, step, mtime, problem)
    if not info.complete:
        raise ValueError(_refusal(info))
    if info.kind == "legacy":
        warn_rank_zero(
            f"{info.path} has no completion marker ({MARKER_FILENAME}): it was written by "
            "Lightning's ModelParallelStrategy, which writes in place, so whether its weights "
            "and its loop state (meta.pt) come from the same save cannot be verified. Its files "
            "are all there; loading it. Checkpoints written by "
            "lightning_kd.checkpoint.strategy.AtomicModelParallelStrategy are verified.",
            UnverifiedCheckpointWarning,
        )
    return info


def _refusal(info: CheckpointInfo) -> str:
    folder = info.path.parent
    complete, torn = _survey([folder])
    alternative = _verified_newest([i for i in complete if i.path != info.path], torn)
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
        "save that was interrupted (the job was killed or crashed while writing), or files "
        "replaced since, leave such a directory, whose weights and loop state may come from "
        f"different saves. {advice}"
    )
