"""The student options of issue 26 under ModelParallelStrategy on 2 CPU processes (gloo): a
hidden-state loss and a LoRA student under TP=2 and FSDP2 DP=2 follow the single-process
trajectory (losses, the hidden term, the final student, adapter and projection weights), and a
LoRA student's distributed checkpoint holds its adapters only and resumes exactly. Runs
``tests/scripts/fit_run.py`` like ``tests/test_module_distributed.py``."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from tests.helpers.fit import assert_same_trajectory, fit, fit_runs

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LAYOUTS = {
    "tp2": ["--devices", "2", "--tp", "2"],
    "dp2": ["--devices", "2", "--dp", "2", "--batch-size", "2"],
}
HIDDEN = ["--hidden", "cosine", "--steps", "3"]
LORA = ["--lora", "4", "--steps", "3"]
LORA_RESUME = ["--devices", "2", "--tp", "2", "--lora", "4", "--samples", "12"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    runs = fit_runs(tmp_path_factory.mktemp("student_options"))
    runs.add("hidden", *HIDDEN)
    runs.add("lora", *LORA)
    runs.add("lora_short_epochs", "--lora", "4", "--samples", "12", "--steps", "6")
    for name, args in LAYOUTS.items():
        runs.add(f"hidden_{name}", *args, *HIDDEN)
        runs.add(f"lora_{name}", *args, *LORA)
    runs.add("hidden_fused_dp2", *LAYOUTS["dp2"], *HIDDEN, "--fused-head")
    # A Hugging Face student (wildcard plan keys), a column- and a row-parallel target.
    runs.add("lora_llama", "--family", "llama", *LORA)
    runs.add("lora_llama_tp2", "--family", "llama", *LAYOUTS["tp2"], *LORA)
    runs.add("lora_first", *LORA_RESUME, "--steps", "3",
             "--ckpt-dir", str(runs.directory / "lora_ckpt"), "--ckpt-every", "3")  # fmt: skip
    return runs


@pytest.mark.parametrize("name", ["tp2", "dp2", "fused_dp2"])
def test_hidden_state_loss_under_tp_and_fsdp2_matches_one_process(runs, name):
    single, result = runs["hidden"], runs[f"hidden_{name}"]
    assert len(single["hidden_losses"]) == 3 and all(h > 0 for h in single["hidden_losses"])
    got, want = torch.tensor(result["hidden_losses"]), torch.tensor(single["hidden_losses"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    # Losses and the final student and projection weights (their absolute sum).
    assert_same_trajectory(result, single)
    assert result["teacher_unchanged"] and not result["teacher_requires_grad"]


@pytest.mark.parametrize(("name", "reference"), [("tp2", "lora"), ("dp2", "lora"),
                                                ("llama_tp2", "lora_llama")])  # fmt: skip
def test_lora_student_under_tp_and_fsdp2_matches_one_process(runs, name, reference):
    single, result = runs[reference], runs[f"lora_{name}"]
    assert single["trainable"] and all(".lora_" in n for n in single["trainable"])
    assert result["trainable"] == single["trainable"]
    assert_same_trajectory(result, single)


def test_lora_distributed_checkpoint_holds_adapters_and_resumes_exactly(tmp_path, runs):
    first = runs["lora_first"]
    ckpt = runs.directory / "lora_ckpt" / "epoch=0-step=3.ckpt"
    assert ckpt.is_dir(), list(ckpt.parent.iterdir())
    keys = {k.removeprefix("state_dict.") for k in
            FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
            if k.startswith("state_dict.")}  # fmt: skip
    assert keys and all(".lora_" in k for k in keys), sorted(keys)[:5]
    resumed = fit(tmp_path, "lora_resumed", *LORA_RESUME, "--steps", "6", "--resume", str(ckpt))
    straight = runs["lora_short_epochs"]
    assert resumed["global_step"] == 6
    torch.testing.assert_close(
        torch.tensor(first["losses"] + resumed["losses"]), torch.tensor(straight["losses"]),
        rtol=1e-4, atol=0,
    )  # fmt: skip
    assert resumed["student_abs_sum"] == pytest.approx(straight["student_abs_sum"], rel=1e-4)
