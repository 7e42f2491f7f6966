"""``lightning-kd evaluate``: a run's students (checkpoints or exported Hugging Face directories)
and its teacher on the held-out split, as a table and a JSON file.

::

    lightning-kd evaluate --config C --output_dir D [--ckpt_path [NAME=]CKPT ...]
        [--hf_dir [NAME=]DIR ...] [--max_batches 20] [--prompt TEXT ...] [--max_new_tokens 32]
        [--no_teacher] [config overrides ...]

The config is instantiated without running, on one CPU process (like ``lightning-kd export``):
its data module gives the validation split and the tokenizer; its ``DistillationModule`` gives
the teacher (built as for training; not with a ``teacher_cache``, where the teacher columns are
left empty) and the student architecture each ``--ckpt_path`` is loaded into. ``--hf_dir`` loads
a directory written by ``lightning-kd export`` (or any causal LM ``save_pretrained`` output).
Each model is named ``NAME`` (default: the path's stem or directory name).

Writes ``OUTPUT_DIR/evaluation.json`` and ``OUTPUT_DIR/evaluation.md`` and prints both. The
greedy samples use a minimal decoder of this package (:mod:`lightning_kd.evaluation.greedy`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from torch import nn

from lightning_kd.cli import KDLightningCLI
from lightning_kd.evaluation import DEFAULT_PROMPTS, evaluate_models, format_table, write_report
from lightning_kd.evaluation.report import format_samples
from lightning_kd.export import load_student
from lightning_kd.io import ensure_writable_dir

EVALUATE = "evaluate"
#: Evaluation runs on one CPU process, whatever the run's trainer was.
ONE_CPU_PROCESS = ("--trainer.accelerator", "cpu", "--trainer.devices", "1",
                   "--trainer.num_nodes", "1", "--trainer.strategy", "auto",
                   "--trainer.logger", "false")  # fmt: skip


def _named(spec: str, flag: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = "", spec
    source = Path(path)
    if not source.exists():
        raise ValueError(f"{flag} {path!r} does not exist.")
    return name or (source.stem if source.is_file() else source.name), source


def parse_args(args: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(the command's own options, the rest: config files and overrides)."""
    parser = argparse.ArgumentParser(
        prog=f"lightning-kd {EVALUATE}",
        description="Evaluate students and the teacher on the held-out split.",
        allow_abbrev=False,  # `--output` is not `--output_dir`: a typo is an error
    )
    parser.add_argument("--config", action="append", required=True, help="a config file")
    parser.add_argument("--output_dir", required=True, help="where the table and JSON go")
    parser.add_argument("--ckpt_path", action="append", default=[], help="[NAME=]checkpoint")
    parser.add_argument("--hf_dir", action="append", default=[], help="[NAME=]HF directory")
    parser.add_argument("--max_batches", type=int, default=20, help="held-out batches (0: all)")
    parser.add_argument("--prompt", action="append", default=None, help="a sample's prompt")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="tokens per sample")
    parser.add_argument("--no_teacher", action="store_true", help="skip the teacher")
    return parser.parse_known_args(args)


def evaluate(args: list[str]) -> dict[str, Any]:
    """Run ``lightning-kd evaluate`` (see the module docstring); the result dict.

    Raises:
        ValueError: no model to evaluate, a missing path, a checkpoint that is not the config's
            student, or a duplicate name.
    """
    ours, rest = parse_args(args)
    if ours.max_batches < 0 or ours.max_new_tokens < 0:
        raise ValueError("--max_batches and --max_new_tokens must be >= 0.")
    named = [_named(s, "--ckpt_path") for s in ours.ckpt_path]
    named_hf = [_named(s, "--hf_dir") for s in ours.hf_dir]
    names = [n for n, _ in named + named_hf]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must differ, got {names}; use NAME=PATH.")
    ensure_writable_dir(ours.output_dir, "--output_dir")
    configs = [arg for path in ours.config for arg in ("--config", path)]
    cli = KDLightningCLI(args=[*configs, *ONE_CPU_PROCESS, *rest], run=False)
    module, datamodule = cli.model, cli.datamodule
    if not ours.no_teacher and getattr(module, "teacher_source", None) is not None:
        module.configure_model()  # builds the student and the teacher, vocabularies reconciled
    teacher = None if ours.no_teacher else getattr(module, "teacher", None)
    models: dict[str, nn.Module] = {}
    for name, path in named:
        models[name] = load_student(module, path, copy=True)
    for name, path in named_hf:
        from lightning_kd.models.hf import HFCausalLM

        models[name] = HFCausalLM(pretrained_path=str(path))
    if not models and teacher is None:
        raise ValueError("nothing to evaluate: give --ckpt_path or --hf_dir (or a teacher).")
    datamodule.setup("validate")
    result = evaluate_models(
        models,
        datamodule.val_dataloader(),
        teacher=teacher,
        tokenizer=datamodule.tokenizer,
        prompts=ours.prompt or DEFAULT_PROMPTS,
        max_new_tokens=ours.max_new_tokens,
        max_context=getattr(datamodule, "seq_len", None),
        max_batches=ours.max_batches or None,
        ignore_index=getattr(datamodule, "ignore_index", -100),
    )
    result["sources"] = {n: str(p) for n, p in named + named_hf}
    json_path, table_path = write_report(result, ours.output_dir)
    print(format_table(result["models"]))
    print()
    print(format_samples(result["samples"]))
    print(f"\nlightning-kd: wrote {json_path} and {table_path}")
    return result
