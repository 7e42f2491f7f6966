"""Script runs launched in batches: the cases of one world size run one after the other in a
single launch (one interpreter per rank), so a module's reference runs and parallel layouts cost
one start-up instead of one per case. A script takes part by calling :func:`run_cases`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

#: Seconds allowed per case of a launch: a bound for a real hang, far above a loaded machine's
#: slowest case (about a minute on 2 busy cores).
SECONDS_PER_CASE = 300


def script_env() -> dict[str, str]:
    """The environment of a script run: this checkout first on the path, one thread per
    process (the ranks share the cores)."""
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_cases(parse: Callable[[list[str]], Any], run: Callable[[Any], None]) -> None:
    """A script's entry: ``--cases FILE`` (a JSON list of argument lists) runs ``run(parse(args))``
    for each list in order in this process; any other command line is one case."""
    argv = sys.argv[1:]
    cases = json.loads(Path(argv[1]).read_text()) if argv[:1] == ["--cases"] else [argv]
    for args in cases:
        # The last such line before a traceback names the case that failed.
        print(f"case: {' '.join(args)}", file=sys.stderr, flush=True)
        run(parse(args))


def launch(script: Path, cases: Sequence[Sequence[str]], cwd: Path, name: str = "cases") -> None:
    """Run ``script`` once over ``cases`` (all of one world size); fail with its output's tail."""
    file = cwd / f"{name}.json"
    file.write_text(json.dumps([list(c) for c in cases]))
    proc = subprocess.run([sys.executable, str(script), "--cases", str(file)], cwd=cwd,
                          env=script_env(), capture_output=True, text=True,
                          timeout=SECONDS_PER_CASE * len(cases))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _devices(args: Sequence[str]) -> str:
    args = list(args)
    return args[args.index("--devices") + 1] if "--devices" in args else "1"


class BatchedRuns:
    """Named runs of a script that writes its result as JSON to ``--out``. ``add`` declares a
    case; the first ``runs[name]`` launches every declared case of that case's ``--devices``
    not run yet, in one launch, and caches each result (a failed launch fails each of them)."""

    def __init__(self, script: Path, directory: Path) -> None:
        self.script, self.directory = script, directory
        self.cases: dict[str, list[str]] = {}
        self.results: dict[str, dict] = {}
        self.errors: dict[str, str] = {}

    def add(self, name: str, *args: str) -> None:
        if name in self.cases:
            raise ValueError(f"case {name!r} declared twice")
        self.cases[name] = [*args, "--out", str(self.directory / f"{name}.json")]

    def __getitem__(self, name: str) -> dict:
        if name not in self.results and name not in self.errors:
            devices = _devices(self.cases[name])
            batch = [n for n, args in self.cases.items()
                     if _devices(args) == devices and n not in self.results
                     and n not in self.errors]  # fmt: skip
            try:
                launch(self.script, [self.cases[n] for n in batch], self.directory,
                       f"cases_{name}")  # fmt: skip
            except (AssertionError, subprocess.TimeoutExpired) as error:
                self.errors.update(dict.fromkeys(batch, str(error)))
            else:
                for n in batch:
                    self.results[n] = json.loads((self.directory / f"{n}.json").read_text())
        if name in self.errors:
            raise AssertionError(f"the launch running {name!r} failed:\n{self.errors[name]}")
        return self.results[name]
