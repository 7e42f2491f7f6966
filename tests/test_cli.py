"""The lightning-kd command line with the shipped configs: parsing, short runs (1 and 2
processes), a real crash (SIGKILL) and resume, and a simulated 2-node torchrun launch."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lightning_kd import DistillationModule, KDLoss, TinyLlama
from lightning_kd.cli import KDLightningCLI, main
from tests.helpers.cli import SMALL_DATA, cli_env
from tests.helpers.runs import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        KDLightningCLI(args=["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] and printed["data"]["class_path"]


def test_cli_rejects_the_auto_optimizer_that_would_miss_parallelised_parameters(capsys):
    with pytest.raises(SystemExit) as exit_info:
        KDLightningCLI(args=["fit", "--config", str(CONFIGS[0]), "--optimizer", "AdamW"])
    assert exit_info.value.code == 2
    # Refused for the --optimizer option itself, not for any other parse error.
    err = capsys.readouterr().err
    assert "error: unrecognized arguments: --optimizer AdamW" in err, err[-2000:]


def _quick_args(teacher: Path, steps: int) -> list[str]:
    return [
        "--model.init_args.teacher_checkpoint", str(teacher),
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps),
        "--trainer.limit_val_batches", "2",
        "--trainer.enable_progress_bar", "false",
        "--trainer.log_every_n_steps", "1",
        *SMALL_DATA,
    ]  # fmt: skip


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted(run_dir.glob("**/metrics.csv")):
        with open(path) as f:
            rows.extend(csv.DictReader(f))
    return rows


def _step_losses(run_dir: Path, version: str | None = None) -> dict[int, float]:
    losses = {}
    pattern = f"**/{version}/metrics.csv" if version else "**/metrics.csv"
    for path in sorted(run_dir.glob(pattern)):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("train/kd_loss"):
                    losses[int(row["step"])] = float(row["train/kd_loss"])
    return losses


def test_quickstart_runs_in_process(tmp_path, monkeypatch, teacher_ckpt):
    monkeypatch.chdir(tmp_path)
    cli = KDLightningCLI(
        args=["--config", str(ROOT / "configs/quickstart.yaml"), *_quick_args(teacher_ckpt, 4)],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 4
    metrics = cli.trainer.callback_metrics
    for key in ("train/kd_loss", "train/tokens_per_sec", "val/kd_loss", "val/teacher_ppl"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert list((tmp_path / "runs/quickstart").glob("**/divergence_per_token.png"))
    rows = _metrics(tmp_path / "runs/quickstart")
    assert any(row.get("train/kd_loss") for row in rows), "CSV logger did not record the loss"


def test_validate_and_test_subcommands(tmp_path, monkeypatch, teacher_ckpt, capsys):
    monkeypatch.chdir(tmp_path)
    for command in ("validate", "test"):
        KDLightningCLI(
            args=[command, "--config", str(ROOT / "configs/quickstart.yaml"),
                  *_quick_args(teacher_ckpt, 1)],
        )  # fmt: skip
        prefix = "val" if command == "validate" else "test"
        assert f"{prefix}/teacher_ppl" in capsys.readouterr().out


def test_hidden_state_example_runs_from_its_config(tmp_path, monkeypatch, teacher_ckpt):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    cli = KDLightningCLI(
        args=["--config", str(ROOT / "examples/hidden_state.yaml"), *_quick_args(teacher_ckpt, 3)],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert type(cli.model).__name__ == "HiddenStateDistillation"
    assert "train/hidden_mse" in cli.trainer.callback_metrics
    optimized = {id(p) for g in cli.trainer.optimizers[0].param_groups for p in g["params"]}
    assert id(cli.model.projection.weight) in optimized


def test_plain_pytorch_example_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "examples/kd_loss_plain_pytorch.py")],
                          env=cli_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step  59" in proc.stdout


def _fit_tp2(run: Path, teacher: Path, *extra: str) -> Path:
    """quickstart_tp2 for 4 steps as a real ``python -m lightning_kd fit`` on 2 processes, in
    ``run``; returns ``run``."""
    run.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_kd", "fit", "--config",
         str(ROOT / "configs/quickstart_tp2.yaml"), *_quick_args(teacher, 4), *extra],
        cwd=run, env=cli_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    return run


@pytest.fixture(scope="module")
def tp2_live(tmp_path_factory, teacher_ckpt) -> Path:
    """One quickstart_tp2 run with the live teacher (unfused), shared by the tests that
    compare against it."""
    return _fit_tp2(tmp_path_factory.mktemp("tp2") / "live", teacher_ckpt)


@pytest.mark.distributed
@pytest.mark.slow
def test_quickstart_tp2_runs_on_two_processes_fused_or_not(tmp_path, teacher_ckpt, tp2_live):
    losses = {"false": _step_losses(tp2_live / "runs/quickstart_tp2")}
    fused = _fit_tp2(tmp_path / "fused_true", teacher_ckpt, "--model.init_args.fused_head", "true")
    losses["true"] = _step_losses(fused / "runs/quickstart_tp2")
    assert len(losses["false"]) >= 2 and all(v == v for v in losses["false"].values())
    assert losses["true"].keys() == losses["false"].keys()
    for step, value in losses["false"].items():
        assert losses["true"][step] == pytest.approx(value, rel=1e-5), step


def test_quickstart_with_a_fused_head_follows_the_unfused_run(tmp_path, monkeypatch, teacher_ckpt):
    """``--model.init_args.fused_head true``: the same 4 steps and validation within 1e-5."""
    results = {}
    for fused in ("false", "true"):
        run = tmp_path / f"fused_{fused}"
        run.mkdir()
        monkeypatch.chdir(run)
        cli = KDLightningCLI(
            args=["--config", str(ROOT / "configs/quickstart.yaml"), *_quick_args(teacher_ckpt, 4),
                  "--model.init_args.fused_head", fused, "--trainer.callbacks", "[]"],
            run=False,
        )  # fmt: skip
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        results[fused] = (_step_losses(run / "runs/quickstart"), dict(cli.trainer.callback_metrics))
    (plain, plain_metrics), (fused, fused_metrics) = results["false"], results["true"]
    assert len(plain) == 4 and fused.keys() == plain.keys()
    for step, value in plain.items():
        assert fused[step] == pytest.approx(value, rel=1e-5), step
    for key in ("val/loss", "val/kd_loss", "val/student_ce", "val/teacher_ce"):
        assert float(fused_metrics[key]) == pytest.approx(float(plain_metrics[key]), rel=1e-5)


def _crash_config(tmp_path: Path, teacher: Path, steps: int, every: int) -> Path:
    source = ROOT / "configs/quickstart.yaml"
    config = yaml.safe_load(source.read_text())
    # Model files named relative to the shipped config (e.g. the teacher's architecture) must
    # still be found from the copy written to tmp_path.
    for key, value in config["model"]["init_args"].items():
        if isinstance(value, str) and value.endswith(".yaml"):
            config["model"]["init_args"][key] = str(source.parent / value)
    config["trainer"].update(max_steps=steps, log_every_n_steps=1, limit_val_batches=0,
                             enable_progress_bar=False)  # fmt: skip
    config["trainer"].pop("val_check_interval")
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = every
    config["model"]["init_args"]["teacher_checkpoint"] = str(teacher)
    config["data"]["init_args"].update(synthetic_chars=30000, batch_size=4)
    path = tmp_path / "crash.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fit_cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lightning_kd", "fit", "--config", str(config), *extra]


@pytest.mark.slow
def test_killed_run_resumes_from_last_checkpoint(tmp_path, teacher_ckpt):
    steps, every = 32, 4  # a multiple, so the last checkpoint is at the final step
    straight_dir, crash_dir = tmp_path / "straight", tmp_path / "crash"
    straight_dir.mkdir()
    crash_dir.mkdir()
    config = _crash_config(tmp_path, teacher_ckpt, steps, every)
    subprocess.run(_fit_cmd(config), cwd=straight_dir, env=cli_env(), check=True, timeout=300,
                   capture_output=True)  # fmt: skip
    straight = _step_losses(straight_dir / "runs/quickstart")
    assert len(straight) == steps

    proc = subprocess.Popen(_fit_cmd(config), cwd=crash_dir, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    ckpts = crash_dir / "runs/quickstart/checkpoints"

    def last_step() -> int:
        # ModelCheckpoint writes `step=N.ckpt` first and `last.ckpt` after it: wait for the
        # latter (a file being written does not load yet).
        try:
            return torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"]
        except Exception:
            return -1

    deadline = time.time() + 240
    while last_step() < 12 and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # a real crash: no handler, no final checkpoint
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = torch.load(ckpts / "last.ckpt", weights_only=False, map_location="cpu")
    stopped_at = saved["global_step"]
    assert 12 <= stopped_at < steps

    subprocess.run(_fit_cmd(config, "--ckpt_path", "last"), cwd=crash_dir, env=cli_env(),
                   check=True, timeout=300, capture_output=True)  # fmt: skip
    final = torch.load(ckpts / "last.ckpt", weights_only=False, map_location="cpu")
    assert final["global_step"] == steps
    resumed = _step_losses(crash_dir / "runs/quickstart", version="version_1")
    assert sorted(resumed) == list(range(stopped_at, steps)), sorted(resumed)
    for step, loss in resumed.items():
        assert loss == pytest.approx(straight[step], rel=1e-5), step


@pytest.mark.distributed
@pytest.mark.slow
def test_two_simulated_nodes_with_torchrun(tmp_path, teacher_ckpt):
    """quickstart_tp2 as 2 nodes x 2 processes on this host (loopback): TP=2 inside each
    'node', data parallel across the two."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for node_rank in (0, 1):
        workdir = tmp_path / f"node{node_rank}"
        workdir.mkdir()
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
            "--nproc_per_node", "2", "--node_rank", str(node_rank),
            "--master_addr", "127.0.0.1", "--master_port", str(port),
            "-m", "lightning_kd", "fit", "--config", str(ROOT / "configs/quickstart_tp2.yaml"),
            "--trainer.num_nodes", "2", *_quick_args(teacher_ckpt, 3),
        ]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-5000:]
    assert "MEMBER: 4/4" in "".join(outputs), "expected one 4-process job across both nodes"
    assert len(_step_losses(tmp_path / "runs/quickstart_tp2")) >= 2


# ---------------------------------------------------------------- offline teacher (cache)
def _cache_teacher(run: Path, teacher: Path, config: str, top_k: int, *extra: str) -> Path:
    """``lightning-kd cache-teacher`` for ``config`` with the small data of these tests: a
    subprocess for a multi-process config, in this process (``main``) otherwise."""
    out = run / f"cache_k{top_k}"
    args = ["cache-teacher", "--config", str(ROOT / config), "--output_dir", str(out),
            "--top_k", str(top_k), "--model.init_args.teacher_checkpoint", str(teacher),
            *SMALL_DATA, *extra]  # fmt: skip
    if "tp2" not in config:
        cwd = os.getcwd()
        os.chdir(run)
        try:
            assert main(args) == 0
        finally:
            os.chdir(cwd)
        return out
    proc = subprocess.run([sys.executable, "-m", "lightning_kd", *args], cwd=run, env=cli_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out


def _from_cache(cache: Path) -> list[str]:
    return ["--model.init_args.teacher", "null", "--model.init_args.teacher_checkpoint", "null",
            "--model.init_args.teacher_cache", str(cache)]  # fmt: skip


def _fit_steps(
    run: Path, teacher: Path, *overrides: str, callbacks: bool = False
) -> tuple[dict, dict, dict]:
    """4 steps of the quickstart config in-process: (step losses, val metrics, student)."""
    run.mkdir()
    cwd = os.getcwd()
    os.chdir(run)
    try:
        no_callbacks = [] if callbacks else ["--trainer.callbacks", "[]"]
        cli = KDLightningCLI(
            args=["--config", str(ROOT / "configs/quickstart.yaml"), *_quick_args(teacher, 4),
                  *no_callbacks, *overrides],
            run=False,
        )  # fmt: skip
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        os.chdir(cwd)
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    student = {k: v.detach().clone() for k, v in cli.model.student.state_dict().items()}
    return _step_losses(run / "runs/quickstart"), metrics, student


@pytest.mark.slow
def test_training_from_an_exact_teacher_cache_follows_the_live_teacher(tmp_path, teacher_ckpt):
    """``--top_k 0`` stores the teacher's whole distribution: 4 steps from the cache match 4
    steps with the live teacher within 1e-5 (losses, validation, student weights); no teacher
    is built. A top-k cache trains too (no teacher CE in validation: it is not known)."""
    cache = _cache_teacher(tmp_path, teacher_ckpt, "configs/quickstart.yaml", 0)
    live, live_metrics, live_student = _fit_steps(tmp_path / "live", teacher_ckpt)
    cached, cached_metrics, cached_student = _fit_steps(
        tmp_path / "cached", teacher_ckpt, *_from_cache(cache)
    )
    assert len(live) == 4 and cached.keys() == live.keys()
    for step, value in live.items():
        assert cached[step] == pytest.approx(value, rel=1e-5), step
    for key in ("val/kd_loss", "val/student_ce", "val/teacher_ce"):
        assert cached_metrics[key] == pytest.approx(live_metrics[key], rel=1e-5), key
    # Weights relative to their norm: AdamW turns a rounding-level difference of a near-zero
    # gradient element into an lr-sized step, so element-wise tolerances do not apply.
    for key, value in live_student.items():
        diff = float((cached_student[key] - value).norm() / value.norm())
        assert diff < 1e-5, (key, diff)

    topk = _cache_teacher(tmp_path, teacher_ckpt, "configs/quickstart.yaml", 8)
    sparse, sparse_metrics, _ = _fit_steps(
        tmp_path / "topk", teacher_ckpt, *_from_cache(topk), callbacks=True
    )
    # The cache stores each token's tail log-mass: every divergence trains on the buckets.
    student = TinyLlama(vocab_size=258, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    DistillationModule(student, teacher_cache=str(topk), loss=KDLoss(divergence="reverse_kl"))
    # The per-token callbacks work from the cache too.
    assert list((tmp_path / "topk/runs/quickstart").glob("**/divergence_per_token.png"))
    assert sparse.keys() == live.keys() and all(v == v for v in sparse.values())
    assert "val/kd_loss" in sparse_metrics and "val/teacher_ce" not in sparse_metrics
    # Same student at step 0: bucketing the vocabulary (8 tokens + the rest) can only lower
    # the KL (data-processing inequality), and it is a true divergence, so positive.
    first = min(live)
    assert 0 < sparse[first] <= live[first] * (1 + 1e-6), (sparse[first], live[first])


@pytest.mark.slow
def test_a_teacher_cache_of_other_data_or_temperature_is_refused(tmp_path, teacher_ckpt):
    cache = _cache_teacher(tmp_path, teacher_ckpt, "configs/quickstart.yaml", 4)
    for overrides, message in (
        (["--model.init_args.loss.init_args.temperature", "2.0"], r"temperature: cache 1\.0"),
        (["--data.init_args.seq_len", "64"], r"data \((train|val)\): cache"),
    ):
        with pytest.raises(ValueError, match=message):
            _fit_steps(tmp_path / f"bad{len(message)}", teacher_ckpt, *_from_cache(cache),
                       *overrides)  # fmt: skip


def _student_of(checkpoint: Path, out: Path) -> dict[str, torch.Tensor]:
    """The student weights of a distributed (DCP directory) checkpoint, consolidated."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(checkpoint), str(out))
    state = torch.load(out, weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("student.")}


@pytest.mark.distributed
@pytest.mark.slow
def test_exact_teacher_cache_on_two_tensor_parallel_processes(tmp_path, teacher_ckpt, tp2_live):
    """quickstart_tp2 (TP=2): cache written and read under tensor parallelism; 4 steps from the
    exact cache follow 4 steps with the live teacher within 1e-5 (losses, student weights)."""
    config = "configs/quickstart_tp2.yaml"
    cache = _cache_teacher(tmp_path, teacher_ckpt, config, 0)
    cached = _fit_tp2(tmp_path / "cached", teacher_ckpt, *_from_cache(cache))
    losses, students = {}, {}
    for name, run in (("live", tp2_live), ("cached", cached)):
        losses[name] = _step_losses(run / "runs/quickstart_tp2")
        last = run / "runs/quickstart_tp2/checkpoints/last.ckpt"
        students[name] = _student_of(last, tmp_path / f"{name}_student.pt")
    assert len(losses["live"]) == 4 and losses["cached"].keys() == losses["live"].keys()
    for step, value in losses["live"].items():
        assert losses["cached"][step] == pytest.approx(value, rel=1e-5), step
    assert students["live"].keys() == students["cached"].keys() and students["live"]
    for key, value in students["live"].items():
        diff = float((students["cached"][key] - value).norm() / value.norm())
        assert diff < 1e-5, (key, diff)


def test_teacher_ce_from_an_exact_cache_is_at_temperature_one():
    """The cache holds log softmax(z / T); validation reports the teacher's CE at T = 1, as the
    live path does."""
    from lightning_kd.teacher_cache import CachedTeacher
    from lightning_kd.training.cached_teacher import cached_teacher_ce

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11) * 3
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100
    cached = CachedTeacher(None, torch.log_softmax(logits / 2.0, dim=-1))
    got = cached_teacher_ce(cached, labels, -100, temperature=2.0)
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                             reduction="sum")  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
