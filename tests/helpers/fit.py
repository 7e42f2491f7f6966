"""``tests/scripts/fit_run.py`` (a small distillation fit under ModelParallelStrategy) run from
the tests: one fit per launch (:func:`fit`) or several (:func:`fit_runs`), and the comparison of
two runs' trajectories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import ROOT, BatchedRuns, launch

SCRIPT = ROOT / "tests" / "scripts" / "fit_run.py"


def fit(tmp_path: Path, name: str, *args: str) -> dict:
    """One fit_run.py launch with ``args``; its JSON result."""
    out = tmp_path / f"{name}.json"
    launch(SCRIPT, [[*args, "--out", str(out)]], tmp_path, f"case_{name}")
    return json.loads(out.read_text())


def fit_runs(directory: Path) -> BatchedRuns:
    """Named fit_run.py cases, launched together per world size (see :class:`BatchedRuns`)."""
    return BatchedRuns(SCRIPT, directory)


def assert_same_trajectory(result: dict, reference: dict, rel: float = 1e-4) -> None:
    got, want = torch.tensor(result["losses"]), torch.tensor(reference["losses"])
    assert got.shape == want.shape and len(want) > 0
    torch.testing.assert_close(got, want, rtol=rel, atol=0)
    assert result["student_abs_sum"] == pytest.approx(reference["student_abs_sum"], rel=rel)
