"""The hidden-state loss under ModelParallelStrategy on 2 CPU processes (gloo): TP=2 and
FSDP2 DP=2 follow the single-process trajectory (losses, the hidden term, and the final student
and projection weights), with the logits path and the fused head. Runs
``tests/scripts/fit_run.py`` like ``tests/test_module_distributed.py``."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.fit import assert_same_trajectory, fit_runs

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LAYOUTS = {
    "tp2": ["--devices", "2", "--tp", "2"],
    "dp2": ["--devices", "2", "--dp", "2", "--batch-size", "2"],
    "fused_dp2": ["--devices", "2", "--dp", "2", "--batch-size", "2", "--fused-head"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    runs = fit_runs(tmp_path_factory.mktemp("hidden_fits"))
    runs.add("single", "--hidden", "cosine", "--steps", "3")
    for name, args in LAYOUTS.items():
        runs.add(name, *args, "--hidden", "cosine", "--steps", "3")
    return runs


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_hidden_state_loss_under_tp_and_fsdp2_matches_one_process(runs, name):
    single, result = runs["single"], runs[name]
    assert len(single["hidden_losses"]) == 3 and all(h > 0 for h in single["hidden_losses"])
    got, want = torch.tensor(result["hidden_losses"]), torch.tensor(single["hidden_losses"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    # Losses and the final student and projection weights (their absolute sum).
    assert_same_trajectory(result, single)
    assert result["teacher_unchanged"] and not result["teacher_requires_grad"]
