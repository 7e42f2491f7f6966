"""The ``lightning-kd`` command as the tests run it: the repository's configs on small data,
in-process or as a subprocess."""

from __future__ import annotations

import os
from pathlib import Path

from tests.helpers.runs import ROOT, script_env

#: Small synthetic data for the shipped configs (a few batches of 4).
SMALL_DATA = ["--data.init_args.synthetic_chars", "30000", "--data.init_args.batch_size", "4"]


def cli_env() -> dict[str, str]:
    """The environment of a ``python -m lightning_kd`` subprocess (this checkout first)."""
    return script_env()


def train_teacher(directory: Path) -> Path:
    """A teacher trained for a few steps with configs/teacher.yaml, saved like the demo does,
    in this process; returns ``directory / "teacher.ckpt"``."""
    from lightning_kd.cli import KDLightningCLI

    cwd = os.getcwd()
    os.chdir(directory)
    try:
        cli = KDLightningCLI(
            args=["--config", str(ROOT / "configs/teacher.yaml"), "--trainer.max_steps", "3",
                  "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
                  "--trainer.enable_progress_bar", "false", *SMALL_DATA],
            run=False,
        )  # fmt: skip
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        path = directory / "teacher.ckpt"
        cli.trainer.save_checkpoint(path)
    finally:
        os.chdir(cwd)
    return path
