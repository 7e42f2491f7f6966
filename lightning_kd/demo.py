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
``configs/chat_quickstart.yaml``; runs in ``runs/chat_*``). ``--on-policy`` (chat only) adds a
fourth student distilled on its own samples (``configs/chat_on_policy.yaml``, GKD with reverse KL)
for the same number of steps, and a second table: the off- and on-policy students' divergence to
the teacher on held-out answers and on completions each student samples itself
(:func:`~lightning_kd.evaluation.own_samples.divergence_on_own_samples`).

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
from lightning_kd.evaluation.own_samples import divergence_on_own_samples
from lightning_kd.evaluation.run import evaluate_models
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
) -> tuple[dict, KDLightningCLI]:
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
    return {k: float(v) for k, v in metrics.items()}, cli


def _row(name: str, ce: float, div: float | None) -> str:
    div_text = "-" if div is None else f"{div:.4f}"
    return f"| {name:<28} | {ce:>13.4f} | {math.exp(ce):>10.3f} | {div_text:>21} |"


#: Held-out batches of the on-policy comparison (8 conversations each).
OWN_SAMPLE_BATCHES = 4


def _print_on_policy_table(students: dict[str, KDLightningCLI], on_policy: KDLightningCLI) -> None:
    """Each student's KL(teacher ‖ student) on held-out answers and on its own samples (drawn
    as the on-policy run draws them), on the on-policy run's held-out conversations."""
    teacher = on_policy.model.teacher
    data = on_policy.datamodule  # one conversation per row: prompts split cleanly
    tokenizer = data.tokenizer
    source = on_policy.model.sequence_source
    models = {name: cli.model.student for name, cli in students.items()}
    held_out = evaluate_models(models, data.val_dataloader(), teacher=teacher,
                               max_batches=OWN_SAMPLE_BATCHES, show_progress=False)  # fmt: skip
    kl = {row["name"]: row["kl_to_teacher"] for row in held_out["models"]}
    print(f"\nOn-policy vs off-policy, on {OWN_SAMPLE_BATCHES} held-out batches of conversations; "
          f"samples: {source.options}\n")  # fmt: skip
    print(
        "| model                        | KL(t‖s) held-out answers | KL(t‖s) own samples "
        "| KL(s‖t) own samples |"
    )
    print(
        "|------------------------------|--------------------------|---------------------"
        "|---------------------|"
    )
    for name, model in models.items():
        own = divergence_on_own_samples(
            model, teacher, data.val_dataloader(), options=source.options, seed=source.seed,
            eos_token_id=tokenizer.eos_id, pad_token_id=getattr(tokenizer, "pad_id", 0),
            max_batches=OWN_SAMPLE_BATCHES, ignore_index=on_policy.model.loss.options.ignore_index,
        )  # fmt: skip
        print(
            f"| {name:<28} | {kl[name]:>24.4f} | {own['kl_to_teacher']:>19.4f} "
            f"| {own['reverse_kl']:>19.4f} |"
        )


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
        "--steps",
        type=int,
        default=None,
        metavar="N",
        help="training steps of each student (default: the configs', 300; 20 with --fast); "
        "the learning-rate schedules stay the configs'",
    )
    parser.add_argument(
        "--on-policy",
        action="store_true",
        help="the chat demo plus a student distilled on its own samples "
        "(configs/chat_on_policy.yaml) for the same steps, compared with the off-policy one",
    )
    parser.add_argument(
        "--divergence",
        choices=list(DIVERGENCES),
        default=None,
        help="the divergence to distil with (default: the config's, forward_kl); the baseline "
        "is measured with the same one",
    )
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be a positive number of steps, got {args.steps}")
    short = ["--trainer.max_steps", "20", "--trainer.val_check_interval", "10"] if args.fast else []
    loss_args = "--model.init_args.loss.init_args."
    student = list(short)  # the two students' runs (the teacher has no distillation loss)
    if args.steps is not None:
        student += ["--trainer.max_steps", str(args.steps)]
    if args.divergence is not None:
        student += [loss_args + "divergence", args.divergence]
    label = resolve_divergence(args.divergence or "forward_kl").label
    setup = CHAT if args.chat or args.on_policy else STORIES
    start = time.time()

    stages = 4 if args.on_policy else 3
    teacher_ckpt = setup.teacher_ckpt
    if args.fast or args.retrain_teacher or not _cached_teacher_ok(setup):
        print(f"== 1/{stages} training the teacher (configs/{setup.teacher_config})", flush=True)
        if teacher_ckpt.parent.exists():
            shutil.rmtree(teacher_ckpt.parent)
        _fit_and_validate(config_path(setup.teacher_config), *short)  # writes teacher_ckpt
        if not args.fast:  # a smoke-run teacher is never reused
            setup.teacher_stamp.write_text(_config_digest(setup))
    else:
        print(f"== 1/{stages} reusing the cached teacher {teacher_ckpt}", flush=True)

    config = config_path(setup.student_config)
    print(f"== 2/{stages} distilling into the student (configs/{setup.student_config}, {label})",
          flush=True)  # fmt: skip
    exported = f"{setup.runs}_kd/hf"
    kd, kd_cli = _fit_and_validate(config, *student, run_dir=f"{setup.runs}_kd", export_to=exported)
    on_policy = None
    if args.on_policy:
        print(f"== 3/{stages} distilling on the student's own samples "
              "(configs/chat_on_policy.yaml)", flush=True)  # fmt: skip
        steps = ["--trainer.max_steps", str(kd_cli.trainer.max_steps)]
        on_policy = _fit_and_validate(config_path("chat_on_policy.yaml"), *student, *steps,
                                      run_dir=f"{setup.runs}_on_policy")  # fmt: skip
    print(f"== {stages}/{stages} training the same student on labels only (kd_ratio=0)", flush=True)
    baseline, baseline_cli = _fit_and_validate(
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
    if on_policy is not None:
        students = {"student, distilled (KD)": kd_cli, "student, on-policy KD": on_policy[1],
                    "student, labels only": baseline_cli}  # fmt: skip
        _print_on_policy_table(students, on_policy[1])
    plots = sorted(Path(f"{setup.runs}_kd").glob("**/divergence_per_token.png"))
    if plots:
        print(f"Per-token divergence plot: {plots[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
