"""On-policy distillation (OnPolicySequences): prompt/completion split, the loss on samples,
resume, refusals, and TP / FSDP2 runs against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_kd import DistillationModule, KDLoss
from lightning_kd.rollout import Rollout, SamplingOptions, generate
from lightning_kd.training.on_policy import (
    OnPolicySequences,
    counter_seed,
    join_completions,
    split_prompts,
)
from tests.scripts.fit_run import RandomTokens, make_models

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "on_policy_run.py"


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    labels = torch.tensor([[-100, 7, 8, 9, 10, -100], [-100, -100, -100, 15, 16, -100]])
    return {"input_ids": ids, "labels": labels}


def test_prompts_are_the_tokens_up_to_the_first_label_left_padded():
    prompt, mask = split_prompts(_batch(), -100, pad_token_id=0)
    assert prompt.tolist() == [[0, 0, 5, 6], [11, 12, 13, 14]]
    assert mask.tolist() == [[False, False, True, True], [True] * 4]


def test_completions_join_the_prompts_and_only_they_are_labelled():
    prompt, mask = split_prompts(_batch(), -100, pad_token_id=0)
    rollout = Rollout(torch.tensor([[30, 31, 2], [40, 0, 0]]),
                      torch.tensor([[True, True, True], [True, False, False]]))  # fmt: skip
    out = join_completions(prompt, mask, rollout, -100, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 30, 31, 2], [11, 12, 13, 14, 40]]
    assert out["labels"].tolist() == [[-100, 30, 31, 2, -100], [-100, -100, -100, 40, -100]]


def _trainer(steps: int, callbacks=(), **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False,
                     enable_checkpointing=bool(kwargs.pop("checkpointing", False)),
                     enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, deterministic=True, callbacks=list(callbacks),
                     **kwargs)  # fmt: skip


class Losses(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(trainer.callback_metrics["train/kd_loss"]))


def _module(on_policy: OnPolicySequences | None = None, **kwargs) -> DistillationModule:
    student, teacher = make_models()
    return DistillationModule(
        student, teacher, loss=KDLoss(temperature=2.0, divergence="reverse_kl"),
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), on_policy=on_policy, **kwargs,
    )  # fmt: skip


def _loader(samples: int = 8, batch_size: int = 4) -> DataLoader:
    return DataLoader(RandomTokens(samples), batch_size=batch_size)


def test_loss_on_student_samples_equals_the_off_policy_loss_on_the_same_sequences():
    source = OnPolicySequences(lmbda=1.0, max_new_tokens=5, temperature=1.0, seed=7)
    on_policy, losses = _module(source), Losses()
    batch = next(iter(_loader()))
    # The samples the run will draw: the initial student, the first call's seed, rank 0.
    student, _ = make_models()
    prompts = [row[: int((lab != -100).int().argmax()) + 1].tolist()
               for row, lab in zip(batch["input_ids"], batch["labels"], strict=True)]  # fmt: skip
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    gen = torch.Generator().manual_seed(counter_seed(7, 0, 1))
    samples = generate(student, ids, mask, SamplingOptions(5, 1.0), gen, vocab_limit=37).tokens
    # The same sequences built by hand, distilled off-policy (labels on the completion only).
    rows = [p + s for p, s in zip(prompts, samples.tolist(), strict=True)]
    length = max(map(len, rows))
    hand_ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    hand_labels = torch.full_like(hand_ids, -100)
    for b, p in enumerate(prompts):
        hand_labels[b, len(p) - 1 : len(p) + 4] = samples[b]
    off_policy, off_losses = _module(), Losses()
    L.seed_everything(0, verbose=False)
    _trainer(1, [losses]).fit(on_policy, _loader())
    hand = [{"input_ids": hand_ids[b], "labels": hand_labels[b]} for b in range(4)]
    L.seed_everything(0, verbose=False)
    _trainer(1, [off_losses]).fit(off_policy, DataLoader(hand, batch_size=4))
    assert source.calls == 1
    assert losses.values == pytest.approx(off_losses.values, rel=1e-6)
    # ... and differs from the loss on the dataset's completions
    data_losses = Losses()
    _trainer(1, [data_losses]).fit(_module(), _loader())
    assert abs(data_losses.values[0] - losses.values[0]) > 1e-3


def _resumable_run(tmp_path: Path, steps: int, resume: str | None = None) -> list[float]:
    L.seed_everything(0, verbose=False)
    source = OnPolicySequences(lmbda=0.5, max_new_tokens=5, temperature=1.0, top_k=20, seed=1)
    losses = Losses()
    ckpt = ModelCheckpoint(tmp_path, every_n_train_steps=2, save_top_k=-1)
    _trainer(steps, [losses, ckpt], checkpointing=True).fit(
        _module(source),
        _loader(4, 2),
        ckpt_path=resume,  # epochs of 2 steps: resumable
    )
    return losses.values


def test_resumed_run_draws_what_an_uninterrupted_one_draws(tmp_path):
    full = _resumable_run(tmp_path / "full", 6)
    _resumable_run(tmp_path / "part", 2)
    ckpt = next((tmp_path / "part").glob("*step=2.ckpt"))
    assert torch.load(ckpt, weights_only=False)["sequence_source"] == {"calls": 2, "seed": 1}
    resumed = _resumable_run(tmp_path / "resumed", 6, resume=str(ckpt))
    assert resumed == pytest.approx(full[2:], rel=1e-6)
    # Without the recorded counter the resumed run draws other samples (the test can fail).
    state = torch.load(ckpt, weights_only=False)
    del state["sequence_source"]
    forgetful = tmp_path / "forgetful.ckpt"
    torch.save(state, forgetful)
    other = _resumable_run(tmp_path / "other", 6, resume=str(forgetful))
    assert other != pytest.approx(full[2:], rel=1e-6)


def test_validation_batches_are_the_data_loaders():
    source = OnPolicySequences(lmbda=1.0)
    batch = _batch()
    assert source(None, batch, "val") is batch and source.calls == 0


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="teacher cache"):
        student, _ = make_models()
        DistillationModule(student, teacher_cache=str(tmp_path), on_policy=OnPolicySequences())
    module = _module(OnPolicySequences(lmbda=0.5), kd_ratio=0.5)
    with pytest.raises(ValueError, match=r"kd_ratio=0.5 < 1 with lmbda=0.5"):
        _trainer(1).fit(module, _loader())
    _module(OnPolicySequences(lmbda=0.0, seq_kd=True), kd_ratio=0.5)  # sequence-level KD: fine
    packed = dict(_batch(), position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]] * 2))
    with pytest.raises(ValueError, match="packing: false"):
        split_prompts(packed, -100, 0)
    unlabelled = dict(_batch(), labels=torch.full((2, 6), -100))
    with pytest.raises(ValueError, match="no supervised label"):
        split_prompts(unlabelled, -100, 0)
    with pytest.raises(ValueError, match="lmbda"):
        OnPolicySequences(lmbda=1.5)
    with pytest.raises(ValueError, match="seed"):
        OnPolicySequences(seed=-1)
    with pytest.raises(ValueError, match="on-policy seed"):
        OnPolicySequences(seed=2).load_state_dict({"calls": 3, "seed": 1})


def _run(tmp_path: Path, name: str, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("single")
    return {family: _run(tmp, family, "--seq-kd", "--family", family)
            for family in ("tiny", "llama")}  # fmt: skip


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "args"),
    [("tiny", ["--devices", "2", "--tp", "2"]),
     ("tiny", ["--devices", "2", "--dp", "2", "--batch-size", "2"]),
     ("llama", ["--devices", "2", "--dp", "2", "--batch-size", "2"])],
    ids=["tp2", "fsdp2_dp2", "hf_fsdp2_dp2"],
)  # fmt: skip
def test_greedy_on_policy_fit_matches_one_process(tmp_path, single, family, args):
    reference = single[family]
    result = _run(tmp_path, "run", "--seq-kd", "--family", family, *args)
    # Student samples, teacher samples and the dataset's all occur in the 4 steps.
    assert reference["student_samples"] == [0.0, 1.0, 0.0, 1.0] and reference["calls"] == 4
    assert result["student_samples"] == reference["student_samples"]
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]),
                               rtol=0, atol=1e-5)  # fmt: skip
    assert result["student_abs_sum"] == pytest.approx(reference["student_abs_sum"], rel=1e-5)


def test_fused_head_teacher_and_gradient_accumulation_run_on_policy():
    """The fused-head teacher scores the samples too; with accumulation each micro-batch
    makes its own draw (the counter counts micro-batches)."""
    source = OnPolicySequences(lmbda=1.0, max_new_tokens=4, temperature=1.0, seed=5)
    losses = Losses()
    _trainer(2, [losses], accumulate_grad_batches=2).fit(
        _module(source, fused_head=True), _loader(8, 2)
    )
    assert source.calls == 4 and len(losses.values) == 4
    assert all(v == v and v > 0 for v in losses.values)


@pytest.mark.distributed
@pytest.mark.slow
def test_resumed_tp2_run_with_sampling_equals_an_uninterrupted_one(tmp_path):
    common = ["--devices", "2", "--tp", "2", "--temperature", "1.0", "--samples", "8"]
    full = _run(tmp_path, "full", *common)
    _run(tmp_path, "part", *common, "--steps", "2", "--ckpt-dir", str(tmp_path / "ckpt"))
    ckpt = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"  # an epoch end: the data resumes exactly
    resumed = _run(tmp_path, "resumed", *common, "--resume", str(ckpt))
    assert resumed["student_samples"] == full["student_samples"][2:] == [0.0, 1.0]
    assert resumed["losses"] == full["losses"][2:]
    assert resumed["student_abs_sum"] == full["student_abs_sum"]
