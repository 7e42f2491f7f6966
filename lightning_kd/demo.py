"""The end-to-end demo behind ``make demo``: teacher → distilled student vs. labels-only student.

1. Prepare the embedded corpus (generated locally; cached under ``.cache/lightning_kd``).
2. Train the teacher with ``configs/teacher.yaml``, or reuse its checkpoint if it exists.
3. Distil it into a smaller student with ``configs/quickstart.yaml`` (pure KD).
4. Train the same student, from the same initialisation, on labels alone for the same steps.
5. Validate all three on the same held-out data and print a table: loss and perplexity of
   each model on the labels, and each student's divergence to the teacher (forward KL unless
   ``--divergence`` picks another, for both students). The table reports what was measured,
   whichever student comes out ahead.

``--chat`` runs the same three stages on instruction data instead: the generated question-answer
conversations of :class:`~lightning_kd.data.ChatDataModule` (packed, each attending only to
itself), with the loss on the assistant's answers only (``configs/chat_teacher.yaml``,
``configs/chat_quickstart.yaml``; runs in ``runs/chat_*``).

Every stage runs through the ``lightning-kd`` CLI with the shipped configs, so the demo also
proves them. The configs ship inside the package (``lightning_kd/configs``, which the repository's
``configs/`` links to) and are found with :mod:`importlib.resources`, so the demo runs from any
working directory after a plain ``pip install``: ``python -m lightning_kd.demo [--fast]``. It
writes ``runs/`` and ``.cache/`` under the current directory. The last step, the distilled
student as a Hugging Face directory, needs the ``hf`` extra (``transformers``); without it the
demo skips that step with a one-line note.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import shutil
import sys
import time
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from lightning_kd.cli import KDLightningCLI
from lightning_kd.export import export_checkpoint
from lightning_kd.losses.divergences import DIVERGENCES, resolve_divergence

#: What ``python -m lightning_kd.demo --help`` says it does.
DESCRIPTION = (
    "The end-to-end demo of lightning_kd (what `make demo` runs): train a teacher, distil it "
    "into a smaller student, train the same student on labels alone, and compare the three "
    "on held-out data. Writes runs/ and .cache/ under the current directory."
)
HF_EXTRA_NOTE = (
    "note: skipped the Hugging Face export of the student: it needs the optional extra, "
    "pip install 'lightning_kd[hf]'"
)


def hf_export_available() -> bool:
    """Whether ``transformers`` (the ``hf`` extra, needed by the export step) imports."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


#: The shipped configs, inside the installed package (a real directory: the configs include
#: each other by relative path, so they are read in place, not extracted one by one).
CONFIGS = resources.files("lightning_kd") / "configs"


class DemoSetup(NamedTuple):
    """One demo: its configs, where the teacher's checkpoint lands, where the students run.

    ``teacher_files`` is everything that defines the teacher: a cached checkpoint is reused
    only if none of them changed."""

    teacher_config: str
    teacher_files: tuple[str, ...]
    teacher_ckpt: Path
    student_config: str
    runs: str  # prefix of the students' run directories: <runs>_kd, <runs>_baseline
    what: str  # what the loss is on, for the table

    @property
    def teacher_stamp(self) -> Path:
        return self.teacher_ckpt.with_suffix(".config-sha256")


#: The story demo (``make demo``): plain text, loss on every token.
STORIES = DemoSetup(
    "teacher.yaml", ("teacher.yaml", "models/demo_teacher.yaml"),
    Path("runs/teacher/checkpoints/last.ckpt"), "quickstart.yaml", "runs/demo", "every token",
)  # fmt: skip
#: The chat demo (``--chat``): the generated instruction set, loss on the answers only.
CHAT = DemoSetup(
    "chat_teacher.yaml", ("chat_teacher.yaml", "models/chat_teacher.yaml"),
    Path("runs/chat_teacher/checkpoints/last.ckpt"), "chat_quickstart.yaml", "runs/chat",
    "the assistant's answers only",
)  # fmt: skip


def config_path(name: str) -> str:
    """The path of the shipped config ``name`` (e.g. ``"quickstart.yaml"``)."""
    path = CONFIGS / name
    if not isinstance(path, Path) or not path.is_file():
        raise FileNotFoundError(
            f"shipped config {name!r} not found as a file at {path}: lightning_kd must be "
            "installed as a directory (not zipped) with its package data (lightning_kd/configs)."
        )
    return str(path)


def _config_digest(setup: DemoSetup) -> str:
    digest = hashlib.sha256()
    for name in setup.teacher_files:
        digest.update(name.encode() + b"\0" + Path(config_path(name)).read_bytes() + b"\0")
    return digest.hexdigest()


def _cached_teacher_ok(setup: DemoSetup) -> bool:
    """A cached teacher is reused only if it was trained by the current teacher config."""
    return (
        setup.teacher_ckpt.is_file()
        and setup.teacher_stamp.is_file()
        and setup.teacher_stamp.read_text().strip() == _config_digest(setup)
    )


def _cli(config: str, *overrides: str) -> KDLightningCLI:
    return KDLightningCLI(args=["--config", config, *overrides], run=False)


def _fit_and_validate(
    config: str, *overrides: str, run_dir: str | None = None, export_to: str | None = None
) -> dict:
    """Fit and validate ``config``; ``run_dir`` receives the run's logs and checkpoints (so
    the demo never touches the runs of ``lightning-kd fit --config <config>``). The final
    weights land in ``checkpoints/last.ckpt`` whatever the checkpoint interval: the CLI adds
    :class:`~lightning_kd.callbacks.CheckpointOnStop`, which saves it at the end of fit."""
    if run_dir is not None:
        overrides = (*overrides, "--trainer.default_root_dir", run_dir,
                     "--trainer.logger.init_args.save_dir", run_dir)  # fmt: skip
    cli = _cli(config, *overrides)
    if run_dir is not None:
        for callback in cli.trainer.checkpoint_callbacks:
            callback.dirpath = str(Path(run_dir) / "checkpoints")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    (metrics,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    if export_to is not None and not hf_export_available():
        print(HF_EXTRA_NOTE, flush=True)
    elif export_to is not None:  # the final student as a Hugging Face directory
        ckpt = Path(run_dir or ".") / "checkpoints" / "last.ckpt"
        export_checkpoint(cli.model, ckpt, export_to, datamodule=cli.datamodule, overwrite=True)
    return {k: float(v) for k, v in metrics.items()}


def _row(name: str, ce: float, div: float | None) -> str:
    div_text = "-" if div is None else f"{div:.4f}"
    return f"| {name:<28} | {ce:>13.4f} | {math.exp(ce):>10.3f} | {div_text:>21} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_kd.demo", description=DESCRIPTION)
    parser.add_argument(
        "--retrain-teacher",
        action="store_true",
        help="train the teacher again even if "
        "runs/ holds one trained by the same teacher config (reused by default)",
    )
    parser.add_argument(
        "--fast",
        action="store_true",
        help="20 steps per stage: a smoke run that "
        "checks the set-up in a minute or two (its numbers mean nothing)",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="the chat demo: the generated instruction set, loss on the answers only "
        "(configs/chat_teacher.yaml, configs/chat_quickstart.yaml)",
    )
    parser.add_argument(
        "--divergence",
        choices=list(DIVERGENCES),
        default=None,
        help="the divergence to distil with (default: the config's, forward_kl); the baseline "
        "is measured with the same one",
    )
    args = parser.parse_args(argv)
    short = ["--trainer.max_steps", "20", "--trainer.val_check_interval", "10"] if args.fast else []
    loss_args = "--model.init_args.loss.init_args."
    student = list(short)  # the two students' runs (the teacher has no distillation loss)
    if args.divergence is not None:
        student += [loss_args + "divergence", args.divergence]
    label = resolve_divergence(args.divergence or "forward_kl").label
    setup = CHAT if args.chat else STORIES
    start = time.time()

    teacher_ckpt = setup.teacher_ckpt
    if args.fast or args.retrain_teacher or not _cached_teacher_ok(setup):
        print(f"== 1/3 training the teacher (configs/{setup.teacher_config})", flush=True)
        if teacher_ckpt.parent.exists():
            shutil.rmtree(teacher_ckpt.parent)
        _fit_and_validate(config_path(setup.teacher_config), *short)  # writes teacher_ckpt
        if not args.fast:  # a smoke-run teacher is never reused
            setup.teacher_stamp.write_text(_config_digest(setup))
    else:
        print(f"== 1/3 reusing the cached teacher {teacher_ckpt}", flush=True)

    config = config_path(setup.student_config)
    print(f"== 2/3 distilling into the student (configs/{setup.student_config}, {label})",
          flush=True)  # fmt: skip
    exported = f"{setup.runs}_kd/hf"
    kd = _fit_and_validate(config, *student, run_dir=f"{setup.runs}_kd", export_to=exported)
    print("== 3/3 training the same student on labels only (kd_ratio=0)", flush=True)
    baseline = _fit_and_validate(
        config,
        loss_args + "kd_ratio",
        "0.0",
        "--trainer.callbacks",
        "[]",
        *student,
        run_dir=f"{setup.runs}_baseline",
    )

    print(f"\nValidation on held-out data (after {time.time() - start:.0f} s)\n")
    print(f"Loss on {setup.what}; divergence: {label}, per token\n")
    print("| model                        | loss (CE/tok) | perplexity | divergence to teacher |")
    print("|------------------------------|---------------|------------|-----------------------|")
    print(_row("teacher", kd["val/teacher_ce"], None))
    print(_row("student, distilled (KD)", kd["val/student_ce"], kd["val/kd_loss"]))
    print(_row("student, labels only", baseline["val/student_ce"], baseline["val/kd_loss"]))
    better = kd["val/kd_loss"] < baseline["val/kd_loss"]
    print(
        f"\nThe distilled student is {'closer to' if better else 'NOT closer to'} the teacher "
        f"than the labels-only baseline ({label} {kd['val/kd_loss']:.4f} vs "
        f"{baseline['val/kd_loss']:.4f} per token)."
    )
    if hf_export_available():
        print(f"The distilled student in Hugging Face format (LlamaForCausalLM): {exported}")
    plots = sorted(Path(f"{setup.runs}_kd").glob("**/divergence_per_token.png"))
    if plots:
        print(f"Per-token divergence plot: {plots[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
