"""Crash safety of the command line, with real processes, real signals and real files.

- SIGTERM/SIGINT stop a fit at a step boundary, save ``last.ckpt`` and exit 143/130 from both
  entry points (``lightning-kd`` and ``python -m lightning_kd``), on 1 process and on 2.
- The final step of a successful fit is in ``last.ckpt`` whatever the checkpoint interval.
- A remote ``--ckpt_path`` is refused unless opted in; checkpoints load with
  ``weights_only=True``, so a malicious pickle runs nothing (served from a local HTTP server).
- lightning_kd's own errors are one line, last, with exit status 1.

The signal tests hold training at a step with ``tests/scripts/gate.py`` and signal the process
while it waits, so nothing depends on timing; timeouts only guard against a hung run.
"""

from __future__ import annotations

import functools
import http.server
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONSOLE = Path(sys.executable).parent / "lightning-kd"
pytestmark = pytest.mark.slow


def tiny_config(tmp_path: Path, *, max_steps: int = 6, every: int = 4, gate_at: int | None = None,
                devices: int = 1, tp: int = 1) -> Path:  # fmt: skip
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpts"), "save_last": True,
                          "every_n_train_steps": every},
        },
    ]  # fmt: skip
    if gate_at is not None:
        callbacks.append(
            {
                "class_path": "tests.scripts.gate.Gate",
                "init_args": {"at_step": gate_at, "ready_file": str(tmp_path / "ready"),
                              "go_file": str(tmp_path / "go")},
            }
        )  # fmt: skip
    model = {"vocab_size": 258, "n_heads": 2, "n_kv_heads": 2, "hidden_dim": 32, "max_seq_len": 32}
    trainer = {
        "accelerator": "cpu", "devices": devices, "max_steps": max_steps,
        "limit_val_batches": 0, "logger": False, "enable_progress_bar": False,
        "callbacks": callbacks,
    }  # fmt: skip
    if tp > 1:
        trainer["strategy"] = {
            "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
            "init_args": {"tensor_parallel_size": tp, "data_parallel_size": devices // tp},
        }
    config = {
        "seed_everything": 0,
        "trainer": trainer,
        "model": {
            "class_path": "lightning_kd.DistillationModule",
            "init_args": {
                "student": {"class_path": "lightning_kd.TinyLlama",
                            "init_args": {**model, "dim": 16, "n_layers": 1}},
                "teacher": {"class_path": "lightning_kd.TinyLlama",
                            "init_args": {**model, "dim": 32, "n_layers": 1}},
            },
        },
        "data": {
            "class_path": "lightning_kd.data.TextDataModule",
            "init_args": {"seq_len": 32, "batch_size": 2, "synthetic_chars": 20000,
                          "cache_dir": str(tmp_path / "cache")},
        },
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def command(entry: str, *args: str) -> list[str]:
    if entry == "console":
        return [str(CONSOLE), *args]
    return [sys.executable, "-m", "lightning_kd", *args]


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def run(tmp_path: Path, *args: str, entry: str = "module") -> subprocess.CompletedProcess:
    return subprocess.run(command(entry, *args), cwd=tmp_path, env=env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def wait_for(path: Path, proc: subprocess.Popen, limit_s: float = 600.0) -> None:
    deadline = time.monotonic() + limit_s  # guards against a hung run only
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early:\n{proc.stderr.read()[-4000:]}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def saved_step(path: Path) -> int:
    if path.is_dir():  # a distributed checkpoint: loop state in meta.pt
        path = path / "meta.pt"
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


# ---------------------------------------------------------------------------- signals
@pytest.mark.parametrize(
    ("entry", "sig", "status"),
    [
        ("console", signal.SIGTERM, 143),
        ("module", signal.SIGTERM, 143),
        ("module", signal.SIGINT, 130),
    ],
)
def test_a_signal_saves_the_step_and_exits_non_zero(tmp_path, entry, sig, status):
    config = tiny_config(tmp_path, gate_at=3)
    proc = subprocess.Popen(command(entry, "fit", "--config", str(config)), cwd=tmp_path,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        wait_for(tmp_path / "ready.0", proc)
        proc.send_signal(sig)
        (tmp_path / "go").touch()
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == status, err[-4000:]
    assert saved_step(tmp_path / "ckpts" / "last.ckpt") == 3  # the interval (4) was not reached

    resumed = run(tmp_path, "fit", "--config", str(config), "--ckpt_path", "last",
                  "--trainer.callbacks.init_args.at_step", "99")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "Restored all states" in resumed.stdout + resumed.stderr
    assert saved_step(tmp_path / "ckpts" / "last.ckpt") == 6


@pytest.mark.distributed
def test_sigterm_to_the_launcher_stops_every_rank_at_the_same_step(tmp_path):
    config = tiny_config(tmp_path, gate_at=3, devices=2, tp=2)
    proc = subprocess.Popen(command("module", "fit", "--config", str(config)), cwd=tmp_path,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        wait_for(tmp_path / "ready.0", proc)
        wait_for(tmp_path / "ready.1", proc)
        proc.send_signal(signal.SIGTERM)  # rank 0 only: rank 1 learns it from the all-reduce
        (tmp_path / "go").touch()
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-4000:]
    assert saved_step(tmp_path / "ckpts" / "last.ckpt") == 3


def test_the_final_step_is_in_last_ckpt_whatever_the_interval(tmp_path):
    config = tiny_config(tmp_path, max_steps=6, every=4)
    result = run(tmp_path, "fit", "--config", str(config), entry="console")
    assert result.returncode == 0, result.stderr[-4000:]
    assert saved_step(tmp_path / "ckpts" / "last.ckpt") == 6


def test_every_shipped_config_gets_the_stop_checkpoint_callback():
    from lightning_kd.callbacks import CheckpointOnStop
    from lightning_kd.cli import KDLightningCLI

    cli = KDLightningCLI(args=["--config", str(ROOT / "configs" / "quickstart.yaml"),
                               "--model.init_args.teacher_checkpoint", "null"],
                         run=False)  # fmt: skip
    assert sum(isinstance(cb, CheckpointOnStop) for cb in cli.trainer.callbacks) == 1


# ---------------------------------------------------------------------------- untrusted input
class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _serve(directory: Path) -> tuple[http.server.HTTPServer, str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_a_malicious_checkpoint_runs_nothing(tmp_path):
    config = tiny_config(tmp_path, max_steps=2)
    marker = tmp_path / "pwned"
    served = tmp_path / "served"
    served.mkdir()
    torch.save({"state_dict": {}, "payload": _Evil(str(marker))}, served / "evil.ckpt")
    server, url = _serve(served)
    try:
        remote = run(tmp_path, "fit", "--config", str(config), "--ckpt_path", f"{url}/evil.ckpt")
        assert remote.returncode == 1
        assert (
            remote.stderr.strip()
            .splitlines()[-1]
            .startswith("lightning-kd: error: --ckpt_path 'http://127.0.0.1:")
        )
        assert "--allow_remote_checkpoint true" in remote.stderr
        opted_in = run(tmp_path, "fit", "--config", str(config), "--ckpt_path",
                       f"{url}/evil.ckpt", "--allow_remote_checkpoint", "true")  # fmt: skip
        assert opted_in.returncode != 0  # weights_only=True refuses the pickled object
    finally:
        server.shutdown()
    local = run(tmp_path, "fit", "--config", str(config), "--ckpt_path", str(served / "evil.ckpt"))
    assert local.returncode != 0
    assert not marker.exists(), "the checkpoint's code ran"


def test_our_errors_are_one_line_last_with_status_1(tmp_path):
    config = tiny_config(tmp_path, max_steps=1)
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not a checkpoint\n")
    result = run(tmp_path, "fit", "--config", str(config),
                 "--model.init_args.teacher_checkpoint", str(notes))  # fmt: skip
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"lightning-kd: error: teacher_checkpoint '{notes}' is not a readable")
    assert "Traceback" not in result.stderr and "Namespace(" not in result.stderr
    bad = run(tmp_path, "fit", "--config", str(config),
              "--model.init_args.kd_ratio", "2.0")  # fmt: skip
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == (
        "lightning-kd: error: kd_ratio must be in [0, 1], got 2.0."
    )


def test_ckpt_path_last_skips_a_torn_checkpoint_and_says_so(tmp_path):
    config = tiny_config(tmp_path, max_steps=4, every=2)
    first = run(tmp_path, "fit", "--config", str(config))
    assert first.returncode == 0, first.stderr[-4000:]
    ckpts = tmp_path / "ckpts"
    last = ckpts / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # torn mid-write: the newest file by mtime
    resumed = run(tmp_path, "fit", "--config", str(config), "--ckpt_path", "last",
                  "--trainer.max_steps", "6")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    out = resumed.stdout + resumed.stderr
    (warning,) = [line for line in out.splitlines() if "Skipped the incomplete" in line]
    assert f"checkpoint {last}: " in warning  # one line, naming it
    assert f"resuming from {ckpts / 'epoch=0-step=4.ckpt'}" in out
    assert saved_step(last) == 6
