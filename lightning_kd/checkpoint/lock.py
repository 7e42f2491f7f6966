"""One live run per checkpoint folder: a lock file naming the holder's pid and host.

Two fits writing into the same folder overwrite each other's ``last.ckpt``, and
``--ckpt_path last`` would then continue the wrong run. The first run to start takes
``<folder>/.lightning_kd.lock`` (created atomically, with its content, by a hard link); a second
run is refused with a ``ValueError`` naming the holder. The holder removes it when it ends
(normally, on an exception, or on SIGTERM/SIGINT, see
:class:`~lightning_kd.callbacks.CheckpointOnStop`). A lock left by a process that was killed
outright (SIGKILL, power loss) is stale: when its pid is dead on this host, the next run takes it
over with a warning; a lock of another host cannot be checked and is refused (remove the file
when that run is gone).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path

__all__ = ["LOCK_FILENAME", "FolderLock", "StaleLockWarning"]

#: The lock file in a checkpoint folder.
LOCK_FILENAME = ".lightning_kd.lock"


class StaleLockWarning(UserWarning):
    """A lock left by a run that is gone was taken over."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class FolderLock:
    """The lock of one folder, held by this process.

    Args:
        folder: the folder to lock (it must exist and be writable).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.path = Path(folder) / LOCK_FILENAME
        self.held = False
        self._owner = {"pid": os.getpid(), "host": socket.gethostname()}

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _create(self) -> bool:
        """Create the lock file with our content in one step; False if it exists."""
        content = json.dumps({**self._owner, "since": time.time()}).encode()
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f"{LOCK_FILENAME}.")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True

    def acquire(self) -> None:
        """Take the lock (again, if this process already holds it).

        Raises:
            ValueError: another live run holds it (the message names its pid and host), or
                the lock file is unreadable.
        """
        for _ in range(3):
            if self._create():
                self.held = True
                return
            holder = self._holder()
            if holder is None:  # released in between: try again
                continue
            pid, host = holder.get("pid"), holder.get("host")
            if not isinstance(pid, int) or not isinstance(host, str):
                raise ValueError(
                    f"checkpoint folder {str(self.path.parent)!r} has an unreadable lock file "
                    f"{str(self.path)!r}; remove it if no run is using this folder."
                )
            if {"pid": pid, "host": host} == self._owner:
                self.held = True
                return
            if host == self._owner["host"] and not _alive(pid):
                warnings.warn(
                    f"Taking over the lock of checkpoint folder {self.path.parent}: the run "
                    f"that held it (pid {pid} on {host}) is gone.",
                    StaleLockWarning,
                    stacklevel=2,
                )
                self._remove_stale(holder)
                continue
            where = "this host" if host == self._owner["host"] else f"host {host}"
            raise ValueError(
                f"checkpoint folder {str(self.path.parent)!r} is in use by another run (pid "
                f"{pid} on {where}, lock file {str(self.path)!r}); expected one run per folder: "
                "give this run another checkpoint folder, or wait for that one to end."
            )
        raise ValueError(f"could not take the lock {str(self.path)!r}: it keeps changing.")

    def _remove_stale(self, holder: dict) -> None:
        """Remove the lock file if it still names the dead ``holder``. Two runs may find the same
        stale lock: each moves the file aside under a name of its own (one atomic rename) and
        deletes it only if it is still the dead holder's; a live lock moved aside by mistake
        (another run took the stale one over in between) goes back in place."""
        aside = self.path.with_name(f"{LOCK_FILENAME}.stale.{os.getpid()}.{time.time_ns()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # another run removed it first
            return
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = None
        if moved is not None and moved != holder:
            # A third run may have locked in between: it holds the folder then.
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock file if this process holds it (idempotent)."""
        if not self.held:
            return
        self.held = False
        holder = self._holder()
        if holder and {"pid": holder.get("pid"), "host": holder.get("host")} == self._owner:
            self.path.unlink(missing_ok=True)
