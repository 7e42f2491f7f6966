"""Issue 27, the first hour of a new user: the demo without the ``hf`` extra, a top-level help
that is fast and lists every command, short command-line errors and no abbreviations, a
progress bar over the run's real length, the expected warnings silenced (and only those), the
chat quickstart's missing teacher named with the command that trains it."""

from __future__ import annotations

import importlib.abc
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_kd import commands, demo
from lightning_kd.callbacks.frozen_modules import QuietFrozenModules
from lightning_kd.callbacks.run_progress import (
    PlainProgress,
    RunProgressBar,
    run_progress_bar,
    run_total_batches,
)
from lightning_kd.cli import (
    CACHE_TEACHER,
    EVALUATE,
    EXPORT,
    KDLightningCLI,
    main,
    quiet_expected_messages,
)
from lightning_kd.generate_cli import GENERATE

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
TEACHER = str(ROOT / "configs" / "teacher.yaml")


# ------------------------------------------------------------------------- 1. the demo
class _Block(importlib.abc.MetaPathFinder):
    """Makes ``import transformers`` fail, as in an install without the ``hf`` extra."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "transformers":
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None


@pytest.fixture
def no_transformers(monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] == "transformers"]:
        monkeypatch.delitem(sys.modules, name)
    blocker = _Block()
    sys.meta_path.insert(0, blocker)
    yield
    sys.meta_path.remove(blocker)


def _fake_cli(*_args, **_kwargs):
    trainer = SimpleNamespace(
        checkpoint_callbacks=[],
        fit=lambda *a, **k: None,
        validate=lambda *a, **k: [{"val/loss": 1.0}],
    )
    return SimpleNamespace(trainer=trainer, model=None, datamodule=None)


@pytest.mark.parametrize("installed", [True, False], ids=["hf-extra", "plain-install"])
def test_demo_export_step_needs_the_hf_extra_only(
    installed, request, monkeypatch, capsys, tmp_path
):
    if not installed:
        request.getfixturevalue("no_transformers")
    else:
        pytest.importorskip("transformers")
    exported = []
    monkeypatch.setattr(demo, "_cli", _fake_cli)
    monkeypatch.setattr(demo, "export_checkpoint", lambda *a, **k: exported.append(a))
    hf = str(tmp_path / "hf")
    metrics, _ = demo._fit_and_validate("c.yaml", run_dir=str(tmp_path), export_to=hf)
    assert metrics == {"val/loss": 1.0}
    out = capsys.readouterr().out
    assert demo.hf_export_available() is installed
    assert len(exported) == int(installed)
    assert ("pip install 'lightning_kd[hf]'" in out) is not installed


def _site_without(tmp_path: Path, hidden: tuple[str, ...]) -> Path:
    """A copy (symlinks) of this interpreter's site-packages without the ``hidden``
    distributions (packages and metadata): what ``pip install .`` without an extra leaves."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    farm = tmp_path / "site"
    farm.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower().replace("-", "_")
        if not any(name == h or name.startswith((f"{h}_", f"{h}.")) for h in hidden):
            (farm / entry.name).symlink_to(entry)
    return farm


@pytest.mark.slow  # the whole --fast demo in a fresh interpreter (~2-4 min on 2 cores)
def test_fast_demo_runs_to_the_end_without_transformers(tmp_path):
    farm = _site_without(tmp_path, ("transformers", "tokenizers"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(farm)]), OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    run.mkdir()
    check = subprocess.run([sys.executable, "-S", "-c", "import transformers"], env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert check.returncode != 0 and "No module named 'transformers'" in check.stderr
    proc = subprocess.run([sys.executable, "-S", "-m", "lightning_kd.demo", "--fast"], cwd=run,
                          env=env, capture_output=True, text=True, timeout=1800)  # fmt: skip
    tail = f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, tail
    assert "pip install 'lightning_kd[hf]'" in proc.stdout and "Traceback" not in proc.stderr, tail
    assert "| student, labels only" in proc.stdout, tail


def test_demo_help_names_the_module_in_plain_text(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m lightning_kd.demo")
    assert "``" not in out and "--fast" in out and "--retrain-teacher" in out


# ---------------------------------------------------------------------- 3. top-level help
def test_top_level_help_lists_every_command_without_importing_torch():
    code = (
        "import sys\n"
        "from lightning_kd.commands import main\n"
        "assert main(['--help']) == 0\n"
        "heavy = [m for m in ('torch', 'lightning') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for name, _ in commands.COMMANDS:
        assert f"\n  {name} " in proc.stdout, name


def test_the_help_lists_exactly_the_commands_main_runs(capsys):
    lightning = set(KDLightningCLI.subcommands())
    assert {name for name, _ in commands.COMMANDS} == lightning | {
        CACHE_TEACHER,
        EXPORT,
        GENERATE,
        EVALUATE,
    }
    assert main(["--help"]) == 0  # lightning_kd.cli.main, the 0.2 entry point, too
    assert "cache-teacher" in capsys.readouterr().out
    assert commands.main([]) == 2  # no command: the help, as a usage error


# ------------------------------------------------------------------------ 7. typos
@pytest.mark.parametrize("typo", ["--trainer.max_stpes", "--trainer.max_step"])
def test_unknown_or_abbreviated_option_is_one_final_line(typo, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", QUICKSTART, typo, "4"])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) <= 3, lines
    assert lines[-1] == f"lightning-kd fit: error: unrecognized arguments: {typo} 4"


@pytest.mark.parametrize("command", [EXPORT, CACHE_TEACHER, GENERATE, EVALUATE])
def test_own_options_of_the_other_commands_are_not_abbreviated(command, tmp_path, capsys):
    # `--ckpt`/`--output_d`/`--promp` would have been taken for the full option names
    args = {EXPORT: ["--ckpt", "x.ckpt", "--output_dir", str(tmp_path)],
            CACHE_TEACHER: ["--output_d", str(tmp_path), "--top_k", "2"],
            GENERATE: ["--ckpt_path", "x.ckpt", "--promp", "hi"],
            EVALUATE: ["--output", str(tmp_path), "--ckpt_path", "x.ckpt"]}[command]  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        main([command, "--config", QUICKSTART, *args])
    assert stop.value.code == 2
    assert "required" in capsys.readouterr().err


# -------------------------------------------------------------------- 5. progress
class _Steps(BoringModel):
    """BoringModel with 3 batches an epoch (64 by default)."""

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(12, 32), batch_size=4)


def _fit(tmp_path: Path, bar, **kwargs) -> Trainer:
    trainer = Trainer(default_root_dir=tmp_path, max_steps=7, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_model_summary=False, callbacks=[bar],
                      **kwargs)  # fmt: skip
    trainer.fit(_Steps())
    return trainer


def test_progress_bar_total_is_the_run_not_one_epoch(tmp_path):
    bar = RunProgressBar()
    trainer = _fit(tmp_path, bar)
    assert trainer.num_training_batches == 3  # 7 batches: three epochs
    assert run_total_batches(trainer) == 7
    assert bar.train_progress_bar.total == 7 and bar.train_progress_bar.n == 7


def test_plain_progress_prints_lines_over_the_run(tmp_path, capsys):
    _fit(tmp_path, PlainProgress(every_n_batches=2), accumulate_grad_batches=2)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train")]
    # 7 optimizer steps of 2 batches, but an epoch of 3 batches ends with a step of 1 batch:
    # 2 steps an epoch, 3 epochs and 1 step: 11 batches; a line every 2 batches and at the end
    assert [line.split(" | ")[0] for line in lines] == [
        f"train {n}/11 ({100 * n / 11:.0f}%)" for n in (2, 4, 6, 8, 10, 11)
    ]
    assert all("\x1b" not in line and "\r" not in line for line in lines)


def test_the_cli_picks_plain_lines_off_a_terminal(tmp_path, monkeypatch):
    class Tty:
        def isatty(self) -> bool:
            return True

    assert isinstance(run_progress_bar(Tty()), RunProgressBar)
    assert isinstance(run_progress_bar(open(os.devnull, "w")), PlainProgress)  # noqa: SIM115
    monkeypatch.chdir(tmp_path)
    cli = KDLightningCLI(args=["--config", TEACHER, "--trainer.logger", "false"], run=False)
    assert isinstance(cli.trainer.progress_bar_callback, PlainProgress)  # pytest's stdout
    off = ["--config", TEACHER, "--trainer.logger", "false"]
    off += ["--trainer.enable_progress_bar", "false"]
    assert KDLightningCLI(args=off, run=False).trainer.progress_bar_callback is None
    named = ["--config", TEACHER, "--trainer.logger", "false"]
    named += ["--trainer.callbacks+=lightning_kd.callbacks.RunProgressBar"]  # the config's own
    bars = [c for c in KDLightningCLI(args=named, run=False).trainer.callbacks
            if isinstance(c, (RunProgressBar, PlainProgress))]  # fmt: skip
    assert [type(bar) for bar in bars] == [RunProgressBar]


# -------------------------------------------------------------------- 6. warnings
class _WithFrozen(_Steps):
    def __init__(self, frozen: bool) -> None:
        super().__init__()
        self.side = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        self.side.requires_grad_(not frozen)

    def configure_model(self) -> None:
        self.side.eval()


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-teacher", "trainable-in-eval"])
def test_eval_mode_warning_is_silenced_for_frozen_modules_only(frozen, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(default_root_dir=tmp_path, max_steps=1, limit_val_batches=0,
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, callbacks=[QuietFrozenModules()])  # fmt: skip
        trainer.fit(_WithFrozen(frozen))
        warnings.warn("an unrelated warning", UserWarning, stacklevel=1)
    texts = [str(w.message) for w in caught]
    assert any("in eval mode" in t for t in texts) is not frozen, texts
    assert "an unrelated warning" in texts


def test_expected_messages_are_dropped_and_others_kept(caplog):
    quiet_expected_messages()
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=log.name):
        log.info("💡 Tip: For seamless cloud logging and experiment tracking, try ...")
        log.info("`Trainer.fit` stopped: `max_steps=6` reached.")
    kept = [r.getMessage() for r in caplog.records]
    assert kept == ["`Trainer.fit` stopped: `max_steps=6` reached."]
    message = "`isinstance(treespec, LeafSpec)` is deprecated, use ..."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_expected_messages()
        for module in ("lightning.pytorch.utilities._pytree", "my_code"):
            warnings.warn_explicit(message, FutureWarning, "f.py", 1, module=module)
    assert len(caught) == 1  # the user's own use still warns


def test_cli_args_warning_is_silenced(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-kd", "export", "--config", TEACHER])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        KDLightningCLI(args=["--config", TEACHER, "--trainer.logger", "false"], run=False)
        warnings.warn("an unrelated warning", UserWarning, stacklevel=1)
    texts = [str(w.message) for w in caught]
    assert not any("args parameter" in t for t in texts), texts
    assert "an unrelated warning" in texts


# -------------------------------------------------------------- 8. the chat quickstart
def test_missing_shipped_teacher_names_the_command_that_trains_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    chat = str(ROOT / "configs" / "chat_quickstart.yaml")
    assert main(["fit", "--config", chat]) == 1
    err = capsys.readouterr().err
    assert "lightning-kd fit --config configs/chat_teacher.yaml" in err
    assert "python -m lightning_kd.demo --chat" in err


def test_every_quickstart_plots_the_divergence():
    import yaml

    for name in ("quickstart.yaml", "chat_quickstart.yaml"):
        config = yaml.safe_load((ROOT / "configs" / name).read_text())
        paths = [cb["class_path"] for cb in config["trainer"]["callbacks"]]
        assert "lightning_kd.callbacks.DivergencePlot" in paths, name


# ------------------------------------------------------------------ 9. TensorBoard
def test_divergence_plot_goes_to_loggers_with_add_figure(tmp_path):
    """TensorBoard's ``experiment.add_figure``; a CSV logger (no add_figure) is skipped."""
    pytest.importorskip("matplotlib")
    from lightning_kd.callbacks import DivergencePlot
    from lightning_kd.callbacks.divergence_plot import DivergenceSample

    figures = []
    board = SimpleNamespace(
        add_figure=lambda tag, fig, global_step: figures.append((tag, global_step))
    )
    csv = SimpleNamespace(experiment=object())
    trainer = SimpleNamespace(global_step=5, loggers=[csv, SimpleNamespace(experiment=board)])
    data = DivergenceSample(torch.rand(8), torch.rand(8), torch.ones(4).double(),
                            torch.ones(4).double(), 8)  # fmt: skip
    path = DivergencePlot()._write(tmp_path / "p.png", data, "KL", trainer)
    assert path.is_file() and figures == [("div/per_token", 5)]
