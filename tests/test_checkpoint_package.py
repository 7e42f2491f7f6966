"""The checkpoint package and the file helpers under it (lightning_kd.io): one atomic write and
one file hash for every writer, files that follow the umask, one live run per checkpoint folder
(the lock on its own), a package that imports no Lightning, and the 0.2 import paths."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from lightning_kd.checkpoint import LOCK_FILENAME, FolderLock, StaleLockWarning
from lightning_kd.io import atomic_write, ensure_writable_dir, sha256_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask():
    """Set a umask for one test (and put the old one back)."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# ------------------------------------------------------------------------------ io
@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_write_follows_the_umask_and_replaces_whole(tmp_path, umask, mask, expected):
    umask(mask)
    path = tmp_path / "sub" / "file.bin"
    atomic_write(path, b"one")
    assert path.read_bytes() == b"one" and mode(path) == expected
    atomic_write(path, lambda handle: handle.write(b"two"))
    assert path.read_bytes() == b"two" and mode(path) == expected
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.bin"]  # no temporary left


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "file.bin"
    atomic_write(path, b"old")

    def fail(handle):
        handle.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_sha256_file_streams_the_same_digest_as_hashlib(tmp_path):
    import hashlib

    data = os.urandom((1 << 20) * 2 + 123)  # crosses block boundaries
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_ensure_writable_dir_names_the_path_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"'.*file/sub/dir' cannot be created: '.*file' is a file"):
        ensure_writable_dir(tmp_path / "file" / "sub" / "dir", "checkpoint folder")
    assert ensure_writable_dir(tmp_path / "new" / "dir").is_dir()

    def refuse(*args, **kwargs):  # what a read-only or immutable folder answers (even root)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(ValueError) as caught:
        ensure_writable_dir(tmp_path / "new", "output folder")
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "new") in message
    assert "not writable (Permission denied)" in message


def test_every_writer_of_shared_files_follows_the_umask(tmp_path, umask):
    """Teacher caches, token caches, exported weights and checkpoints were 0600 (mkstemp,
    safetensors) next to a 0644 config.json."""
    from lightning_kd.checkpoint.strategy import AtomicModelParallelStrategy
    from lightning_kd.data.token_cache import TokenCache
    from lightning_kd.export.hf_export import write_safetensors
    from lightning_kd.teacher_cache.format import atomic_write as cache_write

    umask(0o022)
    cache_write(tmp_path / "cache" / "metadata.json", b"{}")
    tokens = TokenCache(tmp_path / "tokens", {"a": 1}, {"b": 2})
    tokens.write(torch.arange(5), torch.tensor([0, 5]))
    write_safetensors({"w": torch.ones(2, 2)}, tmp_path, 10**9)
    (tmp_path / "s").mkdir()
    write_safetensors({"a": torch.ones(64), "b": torch.ones(64)}, tmp_path / "s", 300)
    checkpoint = {"state_dict": {"w": torch.ones(2)}, "global_step": 1, "epoch": 0}
    AtomicModelParallelStrategy().save_checkpoint(checkpoint, tmp_path / "ckpt" / "last.ckpt")
    written = [tmp_path / "cache" / "metadata.json", tokens.path, tmp_path / "model.safetensors",
               *(tmp_path / "s").glob("*.safetensors"),
               *(tmp_path / "ckpt" / "last.ckpt").iterdir()]  # fmt: skip
    assert len(written) >= 8
    assert {str(p.relative_to(tmp_path)): oct(mode(p)) for p in written} == {
        str(p.relative_to(tmp_path)): oct(0o644) for p in written
    }


# ------------------------------------------------------------------------------ lock
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_lock_is_exclusive_reentrant_and_released(tmp_path):
    lock = FolderLock(tmp_path)
    lock.acquire()
    holder = json.loads((tmp_path / LOCK_FILENAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    FolderLock(tmp_path).acquire()  # the same process again (a second fit in one process)
    lock.release()
    assert not (tmp_path / LOCK_FILENAME).exists()
    lock.release()  # idempotent


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path):
    pid = dead_pid()
    (tmp_path / LOCK_FILENAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    lock = FolderLock(tmp_path)
    with pytest.warns(StaleLockWarning, match=f"pid {pid} .* is gone"):
        lock.acquire()
    assert json.loads((tmp_path / LOCK_FILENAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_two_runs_taking_over_one_stale_lock_leave_one_holder(tmp_path):
    """Both runs read the dead holder; the first takes the lock over, then the second's removal
    of what it thinks is the stale file must leave the first's lock in place."""
    dead = {"pid": dead_pid(), "host": socket.gethostname()}
    path = tmp_path / LOCK_FILENAME
    path.write_text(json.dumps(dead))
    first = FolderLock(tmp_path)
    with pytest.warns(StaleLockWarning):
        first.acquire()
    second = FolderLock(tmp_path)
    second._owner = {"pid": os.getppid(), "host": socket.gethostname()}  # another live run
    second._remove_stale(dead)  # late: the stale lock it read is gone already
    assert json.loads(path.read_text())["pid"] == os.getpid()
    with pytest.raises(ValueError, match=rf"in use by another run \(pid {os.getpid()} on this"):
        second.acquire()
    assert first.held and not second.held
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_FILENAME]  # nothing left aside
    first.release()


def test_a_live_or_foreign_or_unreadable_lock_is_refused(tmp_path):
    path = tmp_path / LOCK_FILENAME
    path.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(ValueError, match=rf"in use by another run \(pid {os.getppid()} on this"):
        FolderLock(tmp_path).acquire()
    path.write_text(json.dumps({"pid": dead_pid(), "host": "another-host.example"}))
    with pytest.raises(ValueError, match=r"on host another-host\.example"):
        FolderLock(tmp_path).acquire()
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable lock file"):
        FolderLock(tmp_path).acquire()
    assert path.read_text() == "{not json"  # someone else's file: left alone


# ------------------------------------------------------------------------------ imports
def test_the_package_imports_no_lightning_and_old_paths_still_work():
    code = (
        "import sys\n"
        "import lightning_kd.io, lightning_kd.checkpoint, lightning_kd.parallel\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'lightning'], 'lightning'\n"
        "import lightning_kd.checkpoint as c, lightning_kd.parallel as p\n"
        "from lightning_kd.checkpoint.strategy import AtomicModelParallelStrategy as S\n"
        "from lightning_kd.parallel import atomic_checkpoint as a, distributed_state as d\n"
        "assert p.AtomicModelParallelStrategy is S is a.AtomicModelParallelStrategy\n"
        "assert p.resolve_last_checkpoint is c.resolve_last_checkpoint\n"
        "assert a.resolve_last_checkpoint is c.resolve_last_checkpoint\n"
        "assert d.read_distributed_state is c.read_distributed_state\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
