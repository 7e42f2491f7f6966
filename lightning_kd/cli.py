"""The ``lightning-kd`` command line: LightningCLI over DistillationModule and TextDataModule.

``lightning-kd fit --config configs/quickstart.yaml`` (also ``python -m lightning_kd``), plus
``validate``, ``test`` and ``--print_config``. Model and data are given with ``class_path`` /
``init_args`` (subclass mode), so subclasses of :class:`~lightning_kd.DistillationModule`
(e.g. the hidden-state example) and other LightningModules such as
:class:`~lightning_kd.CausalLMModule` run from the same command.

The CLI's own ``--optimizer`` / ``--lr_scheduler`` are switched off on purpose: LightningCLI
would build them before ``configure_model()`` parallelises the model, so they would hold the
pre-TP parameters (or none) and training would silently do nothing. Optimizers are module
arguments instead (``model.init_args.optimizer``), built in ``configure_optimizers``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch.distributed as dist
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_kd.callbacks.checkpoint_on_stop import CheckpointOnStop, Stopped
from lightning_kd.callbacks.frozen_modules import QuietFrozenModules
from lightning_kd.callbacks.run_progress import run_progress_bar
from lightning_kd.checkpoint import resolve_last_checkpoint
from lightning_kd.io import ensure_writable_dir
from lightning_kd.rollout.vllm_logprobs import ServedTeacherError

#: Exit status of a run stopped by SIGTERM (128 + 15), the shell's convention.
EXIT_SIGTERM = 143
#: Keys of a subcommand's config (arguments of ``Trainer.fit``/``validate``/``test``/``predict``)
#: that the commands without a subcommand accept and ignore.
SUBCOMMAND_ONLY_KEYS = ("ckpt_path", "weights_only", "verbose", "return_predictions")
#: Set to 1 to see the full traceback of errors the CLI reports in one line.
TRACEBACK_ENV = "LIGHTNING_KD_TRACEBACK"


#: The program name in usage and error messages.
PROG = "lightning-kd"
#: Lightning's advertisements (``rank_zero_info``), dropped from the log.
_TIPS = re.compile(r"💡 Tip: For seamless cloud (logging|uploads)")
#: The shipped configs that train a teacher another shipped config reads (see
#: :meth:`KDLightningCLI.before_instantiate_classes`): checkpoint → (config, demo command).
SHIPPED_TEACHERS = {
    "runs/teacher/checkpoints/last.ckpt": ("teacher.yaml", "python -m lightning_kd.demo"),
    "runs/chat_teacher/checkpoints/last.ckpt": (
        "chat_teacher.yaml",
        "python -m lightning_kd.demo --chat",
    ),
}


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _TIPS.match(str(record.msg))


def quiet_expected_messages() -> None:
    """Drop the messages every run printed that say nothing about the run (idempotent).

    - Lightning's tips advertising litlogger / litmodels (``rank_zero_info`` log records);
    - torch's FutureWarning about ``LeafSpec``, raised by Lightning's own ``_pytree`` helper
      (only from that module: the same warning from user code still shows).
    """
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


class KDArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose command-line errors are two short lines, the error last.

    jsonargparse prints the whole usage (50+ lines for a config's options) before the one
    line that matters; here it is a pointer to ``--help`` and then the error itself.
    """

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not self.exit_on_error:
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"tip: `{prog} --help` lists every option\n{prog}: error: {message}\n")
        self.exit(2)


class KDLightningCLI(LightningCLI):
    """LightningCLI with lightning_kd's defaults (see the module docstring).

    Also: abbreviated options are refused (``--trainer.max_step`` is not ``max_steps``),
    command-line errors are reported in two lines (:class:`KDArgumentParser`), and the
    progress bar counts the whole run (:func:`~lightning_kd.callbacks.run_progress.
    run_progress_bar`) unless the config names one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        parser_kwargs = dict(kwargs.get("parser_kwargs") or {})
        parser_kwargs.setdefault("allow_abbrev", False)
        parser_kwargs.setdefault("prog", PROG)
        parser_kwargs.setdefault(
            "description",
            "lightning-kd: knowledge distillation with "
            "PyTorch Lightning (`lightning-kd --help` lists every command)",
        )
        kwargs["parser_kwargs"] = parser_kwargs
        kwargs.setdefault("parser_class", KDArgumentParser)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        quiet_expected_messages()
        with warnings.catch_warnings():
            # Lightning warns whenever `args` is given while sys.argv has arguments: by
            # design here (cache-teacher, export, generate and the demo build their own).
            warnings.filterwarnings(
                "ignore",
                message=r"LightningCLI's args parameter is intended to run from within Python",
                category=UserWarning,
            )
            super().__init__(LightningModule, LightningDataModule, *args, **kwargs)

    def before_instantiate_classes(self) -> None:
        """A shipped student config whose shipped teacher was not trained yet: say how to
        train it (before the model fails to load it)."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        init_args = (config or {}).get("model", {}).get("init_args", {}) or {}
        path = init_args.get("teacher_checkpoint") if hasattr(init_args, "get") else None
        if isinstance(path, str) and path in SHIPPED_TEACHERS and not Path(path).exists():
            teacher, demo = SHIPPED_TEACHERS[path]
            raise ValueError(
                f"the teacher checkpoint {path!r} does not exist yet: train the teacher first "
                f"with `lightning-kd fit --config configs/{teacher}` (or run everything with "
                f"`{demo}`), or set --model.init_args.teacher_checkpoint."
            )

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        """Without subcommands (``run=False``: ``cache-teacher``, ``export``), also accept and
        ignore the keys that only a subcommand takes, so that a config written by ``lightning-kd
        fit --print_config`` (``ckpt_path: null``, ``weights_only: null``) is accepted."""
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:
            return
        for key in SUBCOMMAND_ONLY_KEYS:
            self.parser.add_argument(
                f"--{key}",
                type=Any,
                default=None,
                help="ignored here: a key of the fit/validate/test/predict configs.",
            )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--allow_remote_checkpoint",
            type=bool,
            default=False,
            help="Allow --ckpt_path to be a URL (http://, s3://, ...). Off by default: a "
            "checkpoint is a pickle, and loading one from elsewhere can run code.",
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with :class:`~lightning_kd.callbacks.CheckpointOnStop` added unless the
        config has one (a preempted or finished fit always leaves a resumable last.ckpt), and
        Lightning's default progress bar replaced by one that counts the whole run."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        configured = (config.get("trainer") or {}).get("callbacks")
        configured = configured if isinstance(configured, list) else [configured]
        own_bar = any(isinstance(cb, ProgressBar) for cb in configured)
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(cb, CheckpointOnStop) for cb in trainer.callbacks):
            trainer.callbacks.append(CheckpointOnStop())
        if not any(isinstance(cb, QuietFrozenModules) for cb in trainer.callbacks):
            trainer.callbacks.append(QuietFrozenModules())
        default_bar = trainer.progress_bar_callback
        if default_bar is not None and not own_bar:
            index = trainer.callbacks.index(default_bar)
            trainer.callbacks[index] = run_progress_bar()
        return trainer

    def _check_checkpoint_source(self) -> None:
        config = self.config_init[self.subcommand]
        path = config.get("ckpt_path")
        remote = isinstance(path, str) and urlparse(path).scheme not in ("", "file")
        if remote and not self.config[self.subcommand].get("allow_remote_checkpoint"):
            raise ValueError(
                f"--ckpt_path {path!r} is a remote URL. Checkpoints are pickles and loading "
                "one can run code, so lightning-kd reads local files only; download it "
                "yourself from a source you trust, or pass --allow_remote_checkpoint true."
            )
        if path == "last":
            config["ckpt_path"] = self._newest_complete_checkpoint()
        if "weights_only" in config and config["weights_only"] is None:
            config["weights_only"] = True  # tensors and plain containers only: no code runs

    def _newest_complete_checkpoint(self) -> str | None:
        """``--ckpt_path last``: the newest *complete* checkpoint in the run's checkpoint
        folders (see :func:`~lightning_kd.checkpoint.resolve_last_checkpoint`), by global step;
        torn ones left by an interrupted save are skipped with a warning that names them.
        Lightning's own ``last`` picks the newest ``last*.ckpt`` by modification time, torn or
        not, and starts from scratch when a crash left none under that name."""
        folders = [cb.dirpath for cb in self.trainer.checkpoint_callbacks
                   if isinstance(cb, ModelCheckpoint) and cb.dirpath]  # fmt: skip
        for callback in self.trainer.callbacks:
            if isinstance(callback, CheckpointOnStop):
                folders.append(str(callback.last_path(self.trainer).parent))
        chosen = resolve_last_checkpoint(dict.fromkeys(folders))
        if chosen is None:
            rank_zero_warn(
                "--ckpt_path last: no complete checkpoint in "
                f"{', '.join(dict.fromkeys(folders)) or '(no checkpoint folder)'}; starting fresh."
            )
        else:
            rank_zero_info(f"--ckpt_path last: resuming from {chosen}")
        return chosen

    def before_fit(self) -> None:
        self._check_checkpoint_source()

    def before_validate(self) -> None:
        self._check_checkpoint_source()

    def before_test(self) -> None:
        self._check_checkpoint_source()

    def before_predict(self) -> None:
        self._check_checkpoint_source()


def shutdown_distributed(barrier: bool = True) -> None:
    """Leave the process group together and destroy it.

    Lightning leaves the default process group alive at exit; with gloo, a rank whose
    interpreter exits while a peer still talks to it can abort ("terminate called without an
    active exception", exit code -6) after a successful run. A final barrier and an explicit
    destroy make the exit clean. ``barrier=False`` only destroys (for exits that the ranks did
    not agree on, where a barrier could wait forever).
    """
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def _own_value_error(error: BaseException) -> Exception | None:
    """The outermost ``ValueError`` (or :class:`ServedTeacherError`: a served teacher that
    stopped answering) raised by lightning_kd's own code in ``error``'s chain of causes
    (jsonargparse wraps a constructor's error in its own ValueErrors), or None."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = traceback.extract_tb(current.__traceback__)
        raised_here = bool(frames) and os.path.abspath(frames[-1].filename).startswith(package)
        if isinstance(current, (ValueError, ServedTeacherError)) and raised_here:
            return current
        suppress = current.__suppress_context__
        current = current.__cause__ or (None if suppress else current.__context__)
    return None


CACHE_TEACHER = "cache-teacher"


def cache_teacher(args: list[str]) -> None:
    """``lightning-kd cache-teacher --config CONFIG --output_dir DIR --top_k K [--splits
    train,val] [--shard_size N] [--batch_size B] [config overrides ...]``: write the config's
    teacher distribution over its data (see :mod:`lightning_kd.teacher_cache`).

    The config is instantiated without running (``KDLightningCLI(..., run=False)``); every
    argument the options above do not take (``--model.init_args.teacher_checkpoint X``,
    ``--trainer.devices 2``, ...) goes to it. The teacher runs under the config's trainer and
    strategy (TP/DP as configured); the temperature and ``ignore_index`` are the loss's.
    """
    import argparse

    from lightning_kd.teacher_cache import describe_teacher, write_teacher_cache

    parser = argparse.ArgumentParser(
        prog=f"lightning-kd {CACHE_TEACHER}",
        description="Cache the config's teacher distribution (top-k, or exact with --top_k 0).",
        allow_abbrev=False,
    )
    parser.add_argument("--config", action="append", required=True, help="a config file")
    parser.add_argument("--output_dir", required=True, help="the cache directory")
    parser.add_argument("--top_k", type=int, required=True, help="entries per token; 0: exact")
    parser.add_argument("--splits", default="train,val", help="comma-separated: train,val")
    parser.add_argument("--shard_size", type=int, default=64, help="sequences per shard file")
    parser.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="sequences per teacher forward (default: the data's batch_size)",
    )
    ours, rest = parser.parse_known_args(args)
    ensure_writable_dir(ours.output_dir, "--output_dir")
    configs = [arg for path in ours.config for arg in ("--config", path)]
    cli = KDLightningCLI(args=[*configs, *rest], run=False)
    teacher_config = cli.config.get("model", {}).get("init_args", {}).get("teacher")
    write_teacher_cache(
        cli.model,
        cli.datamodule,
        cli.trainer,
        ours.output_dir,
        ours.top_k,
        [s.strip() for s in ours.splits.split(",") if s.strip()],
        shard_size=ours.shard_size,
        batch_size=ours.batch_size,
        teacher=describe_teacher(cli.model, teacher_config),
    )


EXPORT = "export"
EVALUATE = "evaluate"
#: Export builds the student on one CPU process, whatever the run's trainer was.
_EXPORT_TRAINER = ("--trainer.accelerator", "cpu", "--trainer.devices", "1",
                   "--trainer.num_nodes", "1", "--trainer.strategy", "auto",
                   "--trainer.logger", "false")  # fmt: skip


def export(args: list[str]) -> None:
    """``lightning-kd export --config CONFIG --ckpt_path CKPT --output_dir DIR
    [--max_shard_size 5GB] [--overwrite] [config overrides ...]``: write the student of a
    checkpoint as a Hugging Face directory (see :mod:`lightning_kd.export`).

    ``CKPT`` is a single-file Lightning checkpoint or a distributed checkpoint directory (TP/
    FSDP2 shards, consolidated here on one process). The config is instantiated without
    running (``KDLightningCLI(..., run=False)``) on one CPU process (the trainer's accelerator,
    devices, nodes and strategy are overridden); the student is built from it without the
    teacher, and the data module's HF tokenizer is saved with it. Every argument the options
    above do not take goes to the config.

    Raises:
        ValueError: a missing or unreadable checkpoint, one without student weights, weights
            that are not the config's student's, or a non-empty output directory without
            ``--overwrite``.
    """
    import argparse

    from lightning_kd.export import export_checkpoint
    from lightning_kd.export.hf_export import DEFAULT_MAX_SHARD_SIZE

    parser = argparse.ArgumentParser(
        prog=f"lightning-kd {EXPORT}",
        description="Write the student of a checkpoint as a Hugging Face model directory.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", action="append", required=True, help="a config file")
    parser.add_argument("--ckpt_path", required=True, help="checkpoint file or directory")
    parser.add_argument("--output_dir", required=True, help="the Hugging Face directory")
    parser.add_argument(
        "--max_shard_size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help="largest safetensors file, bytes or e.g. 5GB (default: 5GB)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export")
    ours, rest = parser.parse_known_args(args)
    ckpt = Path(ours.ckpt_path)
    if not ckpt.exists():
        raise ValueError(f"--ckpt_path {ours.ckpt_path!r} does not exist.")
    ensure_writable_dir(ours.output_dir, "--output_dir")
    configs = [arg for path in ours.config for arg in ("--config", path)]
    cli = KDLightningCLI(args=[*configs, *_EXPORT_TRAINER, *rest], run=False)
    directory = export_checkpoint(
        cli.model, ckpt, ours.output_dir, datamodule=cli.datamodule,
        max_shard_size=ours.max_shard_size, overwrite=ours.overwrite,
    )  # fmt: skip
    print(f"lightning-kd: exported the student to {directory}")


def main(args: list[str] | None = None) -> int:
    """Entry point of ``lightning-kd`` and ``python -m lightning_kd``: the exit status.

    The contract, for both entry points:

    - 0: the run finished.
    - 1: it failed. A ``ValueError`` raised by lightning_kd's own checks (a bad setting, a
      file that is not what it should be) is printed as one line, ``lightning-kd: error:
      ...``, without the traceback (set ``LIGHTNING_KD_TRACEBACK=1`` to see it); any other
      error propagates with its traceback.
    - 2: the command line itself was wrong (jsonargparse's usage error).

    ``lightning-kd cache-teacher ...`` writes an offline teacher cache instead (see
    :func:`cache_teacher`), ``lightning-kd export ...`` writes the student of a checkpoint
    as a Hugging Face directory (see :func:`export`) and ``lightning-kd generate ...`` samples
    text (see :mod:`lightning_kd.generate_cli`), with the same exit statuses. No arguments,
    ``-h`` or ``--help``: the list of commands (:mod:`lightning_kd.commands`).
    - 143 / 130: the run was stopped by SIGTERM / SIGINT (preemption, ``timeout``, Ctrl-C),
      after saving ``last.ckpt`` when training had started (see
      :class:`~lightning_kd.callbacks.CheckpointOnStop`).

    The installed console script calls ``sys.exit(main())``, so the return value must be an
    exit status. For the trainer, model and datamodule, build the CLI yourself:
    ``KDLightningCLI(args=[...], run=False)``.
    """
    from lightning_kd import commands
    from lightning_kd.generate_cli import GENERATE, generate

    argv = list(sys.argv[1:] if args is None else args)
    if not argv or (len(argv) == 1 and argv[0] in commands.HELP_FLAGS):
        return commands.main(argv)
    try:
        if argv[:1] == [CACHE_TEACHER]:
            cache_teacher(argv[1:])
        elif argv[:1] == [EXPORT]:
            export(argv[1:])
        elif argv[:1] == [GENERATE]:
            generate(argv[1:])
        elif argv[:1] == [EVALUATE]:  # students and teacher on held-out text: table + JSON
            from lightning_kd.evaluate import evaluate

            evaluate(argv[1:])
        else:
            KDLightningCLI(args=args)
    except Stopped as stop:  # every rank stopped at the same step: leave together
        shutdown_distributed()
        return int(stop.code)
    except SIGTERMException:  # Lightning's own stop (before training started): exit 0 otherwise
        shutdown_distributed(barrier=False)
        return EXIT_SIGTERM
    except Exception as error:
        ours = _own_value_error(error)
        if ours is not None and os.environ.get(TRACEBACK_ENV) != "1":
            print(f"lightning-kd: error: {ours}", file=sys.stderr)
            return 1
        raise
    shutdown_distributed()  # only after success: a failed rank must not wait in a barrier
    return 0


if __name__ == "__main__":
    sys.exit(main())
