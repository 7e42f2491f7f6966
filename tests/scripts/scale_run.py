"""``fit_run.py`` with DistillationModule's scale options switched on from the environment.

``LKD_SCALE_OPTIONS`` is a comma-separated list of ``activation_checkpointing``, ``compile``
and ``teacher_offload`` (an environment variable rather than flags: Lightning relaunches the
other ranks with this script's own arguments, which ``fit_run``'s parser must accept). All
other arguments are ``fit_run.py``'s.
"""

from __future__ import annotations

import functools
import os

from tests.helpers.distributed import exit_now
from tests.scripts import fit_run

OPTIONS = ("activation_checkpointing", "compile", "teacher_offload")


def main() -> None:
    names = [n for n in os.environ.get("LKD_SCALE_OPTIONS", "").split(",") if n]
    unknown = set(names) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown LKD_SCALE_OPTIONS {sorted(unknown)}; expected {OPTIONS}.")
    options = {name: True for name in names}
    fit_run.CheckedModule = functools.partial(fit_run.CheckedModule, **options)
    fit_run.main()


if __name__ == "__main__":
    main()
    exit_now(0)
