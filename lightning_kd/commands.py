"""The ``lightning-kd`` entry point: the list of subcommands, and a dispatcher that imports the
heavy modules (torch, Lightning) only for the subcommand that needs them.

``lightning-kd``, ``lightning-kd --help`` and ``lightning-kd -h`` print :data:`COMMANDS` at
once; everything else goes to :func:`lightning_kd.cli.main`. This module imports nothing but
the standard library, so the top-level help takes well under a second (importing Lightning
takes several).
"""

from __future__ import annotations

import sys

#: Every subcommand of ``lightning-kd``, with its one-line summary (in the order shown).
COMMANDS: tuple[tuple[str, str], ...] = (
    ("fit", "train (distil) a model from a config: lightning-kd fit --config C"),
    ("validate", "run one evaluation epoch on the validation data"),
    ("test", "run one evaluation epoch on the test data"),
    ("predict", "run inference on the prediction data"),
    ("cache-teacher", "write the teacher's distribution over the data (an offline teacher)"),
    ("export", "write a checkpoint's student as a Hugging Face directory"),
    ("generate", "sample text from a checkpoint or an exported Hugging Face directory"),
    ("evaluate", "compare the teacher and students on held-out text: a table and a JSON file"),
)
HELP_FLAGS = ("-h", "--help")


def help_text() -> str:
    """The top-level help: usage, one line per subcommand, and where to read more."""
    width = max(len(name) for name, _ in COMMANDS)
    lines = [
        "usage: lightning-kd <command> [options]",
        "       python -m lightning_kd <command> [options]",
        "",
        "Knowledge distillation of language models with PyTorch Lightning.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {summary}" for name, summary in COMMANDS),
        "",
        "Run `lightning-kd <command> --help` for a command's options; `lightning-kd fit --config C",
        "--print_config` prints a complete config to copy. The end-to-end demo:",
        "python -m lightning_kd.demo [--fast]; on a real pretrained model: make demo-real.",
    ]
    return "\n".join(lines) + "\n"


def main(args: list[str] | None = None) -> int:
    """Entry point of ``lightning-kd`` and ``python -m lightning_kd``: the exit status.

    No arguments or only ``-h`` / ``--help``: prints :func:`help_text` (exit status 0 for the
    help, 2 without any argument, a usage error). Everything else:
    :func:`lightning_kd.cli.main` (see there for the exit statuses).
    """
    argv = list(sys.argv[1:] if args is None else args)
    if not argv:
        sys.stderr.write(help_text())
        return 2
    if len(argv) == 1 and argv[0] in HELP_FLAGS:
        sys.stdout.write(help_text())
        return 0
    from lightning_kd.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
