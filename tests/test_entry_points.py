"""The installed entry points: the ``lightning-kd`` console script and ``python -m lightning_kd``
exit 0 on success and non-zero on failure; the shipped configs are package data (found from any
working directory, the demo teacher defined once); ``python -m lightning_kd.demo`` runs outside
the repository.

The subprocess tests are ``slow`` (each starts an interpreter); ``main()``'s status and the
config checks run in-process in the fast suite. The subprocesses run the *installed* package (no
``PYTHONPATH``) from a temporary directory, as a user would after ``pip install``. Their timeouts
are generous: they guard against hangs only.
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import yaml

from lightning_kd.checkpoint import inspect_checkpoint
from lightning_kd.cli import KDLightningCLI, main

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_CONFIGS = Path(str(resources.files("lightning_kd") / "configs"))
SCRIPT = Path(sys.executable).with_name("lightning-kd")
TIMEOUT = 900  # seconds; a hang guard on a loaded machine, not a performance bound
TINY_RUN = [
    "--trainer.max_steps", "2",
    "--trainer.val_check_interval", "2",
    "--trainer.limit_val_batches", "1",
    "--trainer.enable_progress_bar", "false",
    "--data.init_args.synthetic_chars", "30000",
    "--data.init_args.batch_size", "4",
]  # fmt: skip
DEMO_TEACHER = {
    "vocab_size": 258,
    "dim": 128,
    "n_layers": 4,
    "n_heads": 4,
    "n_kv_heads": 2,
    "hidden_dim": 344,
    "max_seq_len": 128,
}


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # the installed package, not the checkout on the path
    return env


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)  # fmt: skip


def _tail(proc: subprocess.CompletedProcess) -> str:
    out, err = proc.stdout[-3000:], proc.stderr[-3000:]
    return f"rc={proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"


def _entry_point(kind: str) -> list[str]:
    if kind == "script":
        assert SCRIPT.is_file(), (
            f"console script {SCRIPT} not found: install the package (pip install -e .)"
        )
        return [str(SCRIPT)]
    return [sys.executable, "-m", "lightning_kd"]


# ---------------------------------------------------------------- exit status


@pytest.mark.slow  # a fresh interpreter: ~5-10 s each
@pytest.mark.parametrize(
    ("kind", "command"),
    [("script", "fit"), ("script", "validate"), ("module", "fit")],
    ids=lambda v: v,
)
def test_entry_point_exits_zero_after_success(kind, command, tmp_path):
    config = PACKAGE_CONFIGS / "teacher.yaml"
    proc = _run([*_entry_point(kind), command, "--config", str(config), *TINY_RUN], tmp_path)
    assert proc.returncode == 0, _tail(proc)
    # sys.exit(<object>) prints the object and exits 1: main() must return a status.
    assert "KDLightningCLI object" not in proc.stdout + proc.stderr, _tail(proc)
    if command == "fit":
        assert (tmp_path / "runs/teacher/checkpoints/last.ckpt").is_file(), _tail(proc)
    else:
        assert "val/loss" in proc.stdout, _tail(proc)  # the validate results table


@pytest.mark.slow  # a fresh interpreter: ~5-10 s each
@pytest.mark.parametrize(
    ("kind", "bad_args"),
    [("script", ["--trainer.max_steps", "not-a-number"]), ("module", ["--no_such_argument", "1"])],
    ids=["script-bad-value", "module-unknown-argument"],
)
def test_entry_point_exits_nonzero_on_bad_arguments(kind, bad_args, tmp_path):
    config = PACKAGE_CONFIGS / "teacher.yaml"
    proc = _run([*_entry_point(kind), "fit", "--config", str(config), *bad_args], tmp_path)
    assert proc.returncode != 0, _tail(proc)
    assert not (tmp_path / "runs").exists(), "nothing may run after a parse error"


@pytest.mark.slow  # a fresh interpreter: ~5-10 s each
@pytest.mark.parametrize("kind", ["script", "module"])
def test_entry_point_exits_nonzero_when_the_run_fails(kind, tmp_path):
    """Arguments that parse, a run that raises (the teacher checkpoint does not exist)."""
    config = PACKAGE_CONFIGS / "quickstart.yaml"
    missing = tmp_path / "no_such_teacher.ckpt"
    cmd = [*_entry_point(kind), "fit", "--config", str(config), *TINY_RUN,
           "--model.init_args.teacher_checkpoint", str(missing)]  # fmt: skip
    proc = _run(cmd, tmp_path)
    assert proc.returncode != 0, _tail(proc)
    assert "no_such_teacher.ckpt" in proc.stderr, _tail(proc)


def test_main_returns_exit_status_zero(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-kd"])  # pytest's own arguments are not ours
    status = main(["fit", "--config", str(PACKAGE_CONFIGS / "teacher.yaml"), *TINY_RUN])
    assert status == 0


# ---------------------------------------------------------------- shipped configs


def test_configs_are_package_data_and_the_repository_configs_link_to_them():
    shipped = sorted(p.relative_to(PACKAGE_CONFIGS).as_posix()
                     for p in PACKAGE_CONFIGS.rglob("*.yaml"))  # fmt: skip
    assert {"teacher.yaml", "quickstart.yaml", "models/demo_teacher.yaml"} <= set(shipped)
    # Every shipped file is matched by the package-data globs, so it is in the wheel too.
    pyproject = (ROOT / "pyproject.toml").read_text()
    tomllib = pytest.importorskip("tomllib")
    globs = tomllib.loads(pyproject)["tool"]["setuptools"]["package-data"]["lightning_kd"]
    for name in shipped:
        assert any(fnmatch.fnmatch(f"configs/{name}", g) for g in globs), name
    # The repository path users type (configs/quickstart.yaml) is the same directory.
    if (ROOT / "configs").exists():
        assert (ROOT / "configs").resolve() == PACKAGE_CONFIGS.resolve()


def _printed_config(config: Path, capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        KDLightningCLI(args=["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_demo_teacher_is_defined_once_and_resolved_from_any_directory(
    tmp_path, monkeypatch, capsys
):
    """Every config that trains or loads the demo teacher includes models/demo_teacher.yaml by
    a path relative to itself, not to the working directory (a decoy there is ignored)."""
    decoy = tmp_path / "models" / "demo_teacher.yaml"
    decoy.parent.mkdir()
    decoy.write_text("class_path: lightning_kd.TinyLlama\ninit_args: {vocab_size: 7, dim: 8}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-kd"])  # pytest's own arguments are not ours
    monkeypatch.syspath_prepend(str(ROOT))  # examples.hidden_state_distillation
    users = {
        PACKAGE_CONFIGS / "teacher.yaml": "model",
        PACKAGE_CONFIGS / "quickstart.yaml": "teacher",
        PACKAGE_CONFIGS / "quickstart_tp2.yaml": "teacher",
        ROOT / "examples" / "hidden_state.yaml": "teacher",
    }
    for config, key in users.items():
        if not config.is_file():  # the examples are not installed
            continue
        model = _printed_config(config, capsys)["model"]["init_args"][key]
        assert model["class_path"] == "lightning_kd.TinyLlama", config
        arch = {k: model["init_args"][k] for k in DEMO_TEACHER}
        assert arch == DEMO_TEACHER, config
        assert "hidden_dim: 344" not in config.read_text(), f"{config} inlines the teacher"


# ---------------------------------------------------------------- the demo


@pytest.mark.slow
def test_demo_runs_outside_the_repository(tmp_path):
    """`python -m lightning_kd.demo --fast --divergence jsd` from an empty directory: no
    configs/ there, no PYTHONPATH; the shipped configs come from the package. It writes runs/
    and .cache/ here. One flag switches both students' divergence."""
    proc = _run([sys.executable, "-m", "lightning_kd.demo", "--fast", "--divergence", "jsd"],
                tmp_path)  # fmt: skip
    assert proc.returncode == 0, _tail(proc)
    out = proc.stdout
    assert "| model " in out and "| teacher " in out, _tail(proc)
    assert "| student, distilled (KD)" in out and "| student, labels only" in out, _tail(proc)
    assert "closer to" in out and "divergence: JSD(β=0.5)" in out, _tail(proc)
    for run in ("demo_kd", "demo_baseline"):
        config = next((tmp_path / "runs" / run).glob("logs/*/config.yaml")).read_text()
        assert "divergence: jsd" in config, run
    assert (tmp_path / "runs/teacher/checkpoints/last.ckpt").is_file()
    assert (tmp_path / "runs/demo_kd/checkpoints/last.ckpt").is_file()
    # The distilled student exported for inference stacks, and the demo says where.
    assert "Hugging Face format (LlamaForCausalLM): runs/demo_kd/hf" in out, _tail(proc)
    assert (tmp_path / "runs/demo_kd/hf/config.json").is_file()
    assert list((tmp_path / "runs/demo_kd/hf").glob("*.safetensors"))
    assert (tmp_path / ".cache").is_dir()
    # Its runs stay in runs/demo_*, never in the quickstart run that
    # `lightning-kd fit --config configs/quickstart.yaml --ckpt_path last` would resume.
    assert list((tmp_path / "runs/demo_baseline/checkpoints").glob("*.ckpt"))
    assert not (tmp_path / "runs" / "quickstart").exists()


@pytest.mark.slow
def test_chat_demo_runs_outside_the_repository(tmp_path):
    """`python -m lightning_kd.demo --fast --on-policy --steps 8`: the chat configs train a
    teacher and three students (off-policy KD, on-policy KD, labels only) for the same steps
    on the generated instruction set, with the loss on the answers only, and the students are
    compared on held-out answers and on their own samples."""
    args = ["--fast", "--on-policy", "--steps", "8"]
    proc = _run([sys.executable, "-m", "lightning_kd.demo", *args], tmp_path)
    assert proc.returncode == 0, _tail(proc)
    out = proc.stdout
    assert "Loss on the assistant's answers only" in out, _tail(proc)
    assert "| student, distilled (KD)" in out and "| student, labels only" in out, _tail(proc)
    assert "== 3/4 distilling on the student's own samples" in out, _tail(proc)
    table = out[out.index("On-policy vs off-policy") :]
    for name in ("student, distilled (KD)", "student, on-policy KD", "student, labels only"):
        (row,) = [line for line in table.splitlines() if line.startswith(f"| {name} ")]
        values = [float(cell) for cell in row.strip("|").split("|")[1:]]
        assert len(values) == 3 and all(v >= 0 for v in values), row
    assert (tmp_path / "runs/chat_teacher/checkpoints/last.ckpt").is_file()
    for run in ("chat_kd", "chat_on_policy", "chat_baseline"):
        assert (tmp_path / "runs" / run / "checkpoints" / "last.ckpt").is_file(), run
        step = inspect_checkpoint(tmp_path / "runs" / run / "checkpoints" / "last.ckpt").global_step
        assert step == 8, (run, step)  # --steps: the same number of steps for every student
