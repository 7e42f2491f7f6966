"""The checkpoint holes a fault probe found (issue 21, section 6), each with a real fit or real
files: a save that did not reach the disk, shards of another save under a valid marker, two
live runs in one folder, and a checkpoint folder under a file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from lightning_kd.checkpoint import (
    LOCK_FILENAME,
    TornCheckpointWarning,
    resolve_last_checkpoint,
    verify_checkpoint,
)
from lightning_kd.checkpoint.strategy import AtomicModelParallelStrategy
from lightning_kd.cli import main

ROOT = Path(__file__).resolve().parents[1]
single_process = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """In-process fits write their config.yaml into the working directory."""
    monkeypatch.chdir(tmp_path)


def fit_config(tmp_path: Path, ckpts: Path, *, gate_at: int | None = None, name: str = "c") -> Path:
    """A tiny distillation fit that checkpoints into ``ckpts`` (every 2 steps, 4 steps)."""
    callbacks: list[dict] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(ckpts), "save_last": True, "every_n_train_steps": 2}},
    ]  # fmt: skip
    if gate_at is not None:
        callbacks.append({"class_path": "tests.scripts.gate.Gate",
                          "init_args": {"at_step": gate_at, "ready_file": str(tmp_path / "ready"),
                                        "go_file": str(tmp_path / "go")}})  # fmt: skip
    llama = {"class_path": "lightning_kd.TinyLlama",
             "init_args": {"vocab_size": 258, "n_heads": 2, "n_kv_heads": 2, "hidden_dim": 32,
                           "max_seq_len": 32, "dim": 16, "n_layers": 1}}  # fmt: skip
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 4, "limit_val_batches": 0,
                    "logger": False, "enable_progress_bar": False, "callbacks": callbacks},
        "model": {"class_path": "lightning_kd.DistillationModule",
                  "init_args": {"student": llama, "teacher": llama}},
        "data": {"class_path": "lightning_kd.data.TextDataModule",
                 "init_args": {"seq_len": 32, "batch_size": 2, "synthetic_chars": 4000,
                               "cache_dir": str(tmp_path / "cache")}},
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def one_line_error(captured: str) -> str:
    lines = [line for line in captured.strip().splitlines() if line.startswith("lightning-kd:")]
    assert len(lines) == 1, captured[-3000:]
    assert "Traceback" not in captured, captured[-3000:]
    return lines[0]


# ------------------------------------------------------------------ hole 1: nothing on disk
@pytest.mark.slow
@pytest.mark.parametrize("older_last", [False, True], ids=["empty-folder", "older-last-ckpt"])
def test_a_save_that_did_not_reach_the_disk_fails_the_fit(
    tmp_path, monkeypatch, capsys, older_last
):
    """Lightning 2.6.6's ``_atomic_save`` swallows ``PermissionError``: a save into a folder
    that became unwritable "succeeds" with nothing written. Simulated by the same silence. A
    ``last.ckpt`` of an earlier run in the folder is not this save's."""
    import lightning.fabric.plugins.io.torch_io as torch_io

    monkeypatch.setattr(torch_io, "_atomic_save", lambda checkpoint, path: None)
    ckpts = tmp_path / "ckpts"
    if older_last:
        ckpts.mkdir()
        (ckpts / "last.ckpt").write_bytes(b"old")
    assert main(["fit", "--config", str(fit_config(tmp_path, ckpts))]) == 1
    error = one_line_error(capsys.readouterr().err)
    assert f"checkpoint '{ckpts / 'last.ckpt'}' was not written" in error
    assert not (ckpts / LOCK_FILENAME).exists()  # released on the way out
    if older_last:
        assert (ckpts / "last.ckpt").read_bytes() == b"old"


@pytest.mark.slow
def test_an_unwritable_checkpoint_folder_fails_before_training(tmp_path, monkeypatch, capsys):
    """Root writes into read-only folders, so the refusal of an immutable one is simulated
    where the check asks (``chattr +i`` below does it for real where allowed)."""
    ckpts = tmp_path / "ckpts"
    config = fit_config(tmp_path, ckpts)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Operation not permitted")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    assert main(["fit", "--config", str(config)]) == 1
    error = one_line_error(capsys.readouterr().err)
    assert f"checkpoint folder '{ckpts}' is not writable (Operation not permitted)" in error
    assert list(ckpts.iterdir()) == []  # no step was trained, nothing saved


@pytest.mark.slow
def test_an_immutable_checkpoint_folder_fails_before_training(tmp_path, capsys):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    if subprocess.run(["chattr", "+i", str(ckpts)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        assert main(["fit", "--config", str(fit_config(tmp_path, ckpts))]) == 1
    finally:
        subprocess.run(["chattr", "-i", str(ckpts)], check=True)
    error = one_line_error(capsys.readouterr().err)
    assert f"checkpoint folder '{ckpts}' is not writable" in error
    assert list(ckpts.iterdir()) == []


@pytest.mark.slow
def test_a_checkpoint_folder_under_a_file_is_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a file")
    ckpts = tmp_path / "notes.txt" / "ckpts"
    assert main(["fit", "--config", str(fit_config(tmp_path, ckpts))]) == 1
    error = one_line_error(capsys.readouterr().err)
    assert f"checkpoint folder '{ckpts}' cannot be created" in error
    assert f"'{tmp_path / 'notes.txt'}' is a file" in error


# ------------------------------------------------------------------ hole 2: shard contents
def checkpoint(step: int, value: float) -> dict:
    return {
        "state_dict": {"w": torch.full((64, 8), value)},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.full((64, 8), value)}}}],
        "global_step": step,
        "epoch": 0,
    }


def saves(folder: Path) -> Path:
    """``folder`` with ``step=4.ckpt`` and ``last.ckpt`` (step 8); returns ``last.ckpt``."""
    strategy = AtomicModelParallelStrategy()
    strategy.save_checkpoint(checkpoint(4, 4.0), folder / "step=4.ckpt")
    strategy.save_checkpoint(checkpoint(8, 8.0), folder / "last.ckpt")
    return folder / "last.ckpt"


def resolve_warned(folder: Path) -> tuple[str | None, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = resolve_last_checkpoint([folder])
    return chosen, [str(w.message) for w in caught if w.category is TornCheckpointWarning]


def damage_and_check(folder: Path, last: Path) -> None:
    chosen, warned = resolve_warned(folder)
    assert chosen == str(folder / "step=4.ckpt")
    (message,) = warned
    assert "\n" not in message and f"{last}:" in message and "SHA-256" in message
    assert f"Using {folder / 'step=4.ckpt'} (global step 4)" in message
    with pytest.raises(ValueError, match=r"SHA-256 differs.*step=4\.ckpt \(global step 4\)"):
        AtomicModelParallelStrategy().load_checkpoint(last)


@single_process
def test_same_size_shards_of_another_save_are_not_resumed(tmp_path):
    """A checkpoint directory whose shards were restored by hand from another save (same
    sizes) kept a valid marker, and resumed silently at its step with the other weights."""
    last = saves(tmp_path)
    backup = tmp_path / "backup"
    AtomicModelParallelStrategy().save_checkpoint(checkpoint(8, -1.0), backup / "other.ckpt")
    shards = sorted(last.glob("*.distcp"))
    assert shards
    for shard in shards:
        other = backup / "other.ckpt" / shard.name
        assert other.stat().st_size == shard.stat().st_size
        assert other.read_bytes() != shard.read_bytes()
        shutil.copyfile(other, shard)
    shutil.rmtree(backup)
    damage_and_check(tmp_path, last)


@single_process
def test_a_flipped_byte_in_a_shard_falls_back_to_the_previous_checkpoint(tmp_path):
    last = saves(tmp_path)
    shard = sorted(last.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[20] ^= 0xFF  # inside the first record's zip header
    shard.write_bytes(bytes(data))
    damage_and_check(tmp_path, last)


@single_process
def test_an_intact_checkpoint_is_hashed_once_per_process(tmp_path, monkeypatch):
    import lightning_kd.checkpoint.inspect as inspect_module

    last = saves(tmp_path)
    hashed: list[str] = []
    real = inspect_module.sha256_file
    monkeypatch.setattr(inspect_module, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    assert resolve_warned(tmp_path) == (str(last), [])
    files = {p.name for p in last.iterdir() if p.name != "COMPLETE"}
    assert set(hashed) == files  # every file, shards included
    hashed.clear()
    verify_checkpoint(last)  # what loading checks: verified already, not hashed again
    assert hashed == []
    stat = (last / "meta.pt").stat()  # a file changed since: verified again
    os.utime(last / "meta.pt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    verify_checkpoint(last)
    assert set(hashed) == files


# ------------------------------------------------------------------ hole 3: two live runs
def wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 600  # guards against a hung run only
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the first run ended early:\n{proc.stderr.read()[-4000:]}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_second_live_run_in_the_same_folder_is_refused(tmp_path, capsys):
    """Two fits in one checkpoint folder both wrote last.ckpt, one silently replacing the
    other's. The first holds its step (a gate file) while the second starts."""
    ckpts = tmp_path / "ckpts"
    first = fit_config(tmp_path, ckpts, gate_at=1, name="first")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "lightning_kd", "fit", "--config", str(first)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for(tmp_path / "ready.0", proc)
        holder = json.loads((ckpts / LOCK_FILENAME).read_text())
        assert holder["pid"] == proc.pid

        second = fit_config(tmp_path, ckpts, name="second")
        assert main(["fit", "--config", str(second)]) == 1
        error = one_line_error(capsys.readouterr().err)
        assert f"checkpoint folder '{ckpts}' is in use by another run (pid {proc.pid}" in error
        assert not (ckpts / "last.ckpt").exists()  # the second run wrote nothing

        proc.send_signal(signal.SIGTERM)  # the first stops with its checkpoint, and unlocks
        (tmp_path / "go").touch()
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-4000:]
    assert (ckpts / "last.ckpt").is_file() and not (ckpts / LOCK_FILENAME).exists()


@single_process
def test_only_rank_zero_hashes_when_resolving(tmp_path, monkeypatch):
    """Every rank of a launch resolves ``last``; the strategy loads what rank 0 chose."""
    last = saves(tmp_path)
    shard = sorted(last.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[20] ^= 0xFF
    shard.write_bytes(bytes(data))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_warned(tmp_path) == (str(last), [])  # cheap: sizes and index files only
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_warned(tmp_path)[0] == str(tmp_path / "step=4.ckpt")


# ------------------------------------------------------------------ other output folders
def test_an_export_folder_under_a_file_or_unwritable_is_one_value_error(tmp_path, monkeypatch):
    from lightning_kd import TinyLlama
    from lightning_kd.export.hf_export import export_student

    student = TinyLlama(vocab_size=32, dim=8, n_layers=1, n_heads=2, hidden_dim=16)
    (tmp_path / "notes.txt").write_text("a file")
    with pytest.raises(ValueError, match=r"output_dir '.*notes\.txt/out' cannot be created"):
        export_student(student, student.state_dict(), tmp_path / "notes.txt" / "out")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(ValueError, match=r"output_dir '.*/out' is not writable"):
        export_student(student, student.state_dict(), tmp_path / "out")


@pytest.mark.slow
def test_a_teacher_cache_folder_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a file")
    output = tmp_path / "notes.txt" / "cache"
    config = fit_config(tmp_path, tmp_path / "ckpts")
    args = ["cache-teacher", "--config", str(config), "--output_dir", str(output), "--top_k", "4"]
    assert main(args) == 1
    error = one_line_error(capsys.readouterr().err)
    assert f"output_dir '{output}' cannot be created" in error
