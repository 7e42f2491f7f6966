"""The parallel layer: plan resolution, tied weights, the vocab-sharded logits check, the FSDP2
precision policy, and evaluation on uneven data-parallel ranks.

The multi-process cases run ``tests/scripts/parallel_checks.py`` (Lightning re-runs the script
for every rank) and each fails on version 0.1 of the module: a plain-tensor lm_head trained
silently with a wrong loss, FSDP2 gathered fp32 weights under bf16-mixed, and a rank without
validation batches left the others waiting forever.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel

from lightning_kd import TinyLlama
from lightning_kd.parallel import (
    apply_tensor_parallel,
    check_vocab_parallel_logits,
    mixed_precision_policy,
    resolve_tensor_parallel_plan,
)
from lightning_kd.parallel.plans import untie_planned_weights
from tests.helpers.distributed import run_workers

SCRIPT = Path(__file__).parent / "scripts" / "parallel_checks.py"
ROOT = Path(__file__).resolve().parents[1]


def run_checks(tmp_path: Path, mode: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = tmp_path / f"{mode}.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--mode", mode, "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # a hang, not a slow machine: the runs take seconds
    )
    return proc, json.loads(out.read_text()) if out.exists() else None


# ---------------------------------------------------------------------------- plans
def test_resolve_plan_prefers_the_explicit_plan_and_refuses_models_without_one():
    model = TinyLlama()
    explicit = {"lm_head": ColwiseParallel()}
    assert resolve_tensor_parallel_plan(model, 2, explicit) == explicit
    assert "lm_head" in resolve_tensor_parallel_plan(model, 2)
    with pytest.raises(ValueError, match="Linear has no tensor-parallel plan"):
        resolve_tensor_parallel_plan(nn.Linear(2, 2), 2)


def test_a_tied_head_in_an_explicit_plan_is_refused_when_the_model_cannot_untie():
    model = TinyLlama(tie_embeddings=True)
    plan = {"lm_head": ColwiseParallel()}
    with pytest.raises(ValueError, match=r"embed\.weight, lm_head\.weight.*split silently"):
        untie_planned_weights(model, plan)
    # A plan that leaves both tied modules alone is fine.
    untie_planned_weights(model, {"layers.*.attn.wq": ColwiseParallel()})
    assert model.lm_head.weight is model.embed.weight


class _Untieable(TinyLlama):
    def untie_lm_head(self) -> None:
        self.lm_head.weight = nn.Parameter(self.embed.weight.detach().clone())


def test_a_tied_head_is_untied_by_the_model_whatever_the_plan():
    model = _Untieable(tie_embeddings=True)
    untie_planned_weights(model, {"lm_*": ColwiseParallel()})  # wildcard keys count too
    assert model.lm_head.weight is not model.embed.weight
    torch.testing.assert_close(model.lm_head.weight, model.embed.weight, rtol=0, atol=0)


def _apply_explicit_plan_to_tied_model(rank: int, world_size: int) -> None:
    model = _Untieable(tie_embeddings=True)
    mesh = init_device_mesh("cpu", (world_size,))
    apply_tensor_parallel(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Shard(-1))})
    assert isinstance(model.lm_head.weight, DTensor)
    assert not isinstance(model.embed.weight, DTensor)


@pytest.mark.distributed
def test_apply_tensor_parallel_unties_before_sharding():
    run_workers(_apply_explicit_plan_to_tied_model, 1)


# ---------------------------------------------------------------------------- logits check
def _logits_check(rank: int, world_size: int) -> None:
    model = TinyLlama(vocab_size=10)
    mesh = init_device_mesh("cpu", (world_size,))
    full = torch.randn(2, 3, 10)
    sharded = distribute_tensor(full, mesh, [Shard(-1)])
    check_vocab_parallel_logits(sharded, model, "student", 2, None)  # the intended layout
    check_vocab_parallel_logits(distribute_tensor(full, mesh, [Replicate()]), model, "s", 2, None)
    check_vocab_parallel_logits(full, model, "student", 2, None)  # full width: correct
    check_vocab_parallel_logits(sharded.to_local(), model, "student", 1, None)  # no TP
    check_vocab_parallel_logits(sharded.to_local(), model, "student", 2, object())  # tp_group
    with pytest.raises(ValueError, match=r"the teacher \(TinyLlama\) returns plain-tensor logits"):
        check_vocab_parallel_logits(full[..., :5], model, "teacher", 2, None)
    with pytest.raises(ValueError, match="use_local_output=False"):
        check_vocab_parallel_logits(full[..., :5], nn.Linear(2, 2), "student", 2, None)


@pytest.mark.distributed
def test_vocab_parallel_logits_check():
    run_workers(_logits_check, 1)


@pytest.mark.distributed
@pytest.mark.slow
def test_tp_plan_with_plain_local_lm_head_is_an_error_not_a_wrong_loss(tmp_path):
    proc, _ = run_checks(tmp_path, "local_head")
    assert proc.returncode != 0
    assert "the student (TinyLlama) returns plain-tensor logits of width 19" in proc.stderr
    assert "ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)" in proc.stderr


# ---------------------------------------------------------------------------- precision
@pytest.mark.parametrize(
    ("precision", "param", "reduce"),
    [
        ("bf16-mixed", torch.bfloat16, torch.float32),
        ("16-mixed", torch.float16, torch.float32),
    ],
)
def test_mixed_precision_policy_for_mixed_precisions(precision, param, reduce):
    policy = mixed_precision_policy(precision, trainable=True)
    assert (policy.param_dtype, policy.reduce_dtype) == (param, reduce)
    assert mixed_precision_policy(precision, trainable=False).reduce_dtype is None


@pytest.mark.parametrize("precision", ["32-true", "bf16-true", "16-true", "64-true"])
def test_true_precisions_need_no_policy(precision):
    assert mixed_precision_policy(precision, trainable=True) is None


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="unsupported precision 'transformer-engine'"):
        mixed_precision_policy("transformer-engine", trainable=True)


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_gathers_bf16_weights_and_reduces_fp32_gradients_under_bf16_mixed(tmp_path):
    proc, seen = run_checks(tmp_path, "precision")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert seen == {
        "student_gathered": "torch.bfloat16",
        "teacher_gathered": "torch.bfloat16",
        "student_grad": ["torch.float32"],
    }


# ---------------------------------------------------------------------------- evaluation
@pytest.mark.distributed
@pytest.mark.slow
def test_a_rank_without_validation_batches_takes_part_in_the_metrics(tmp_path):
    proc, result = run_checks(tmp_path, "uneven_eval")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1 = result["metrics_per_rank"]
    assert rank0 == rank1  # both ranks report the reduced metrics of rank 0's batches
    assert rank0["val/kd_loss"] > 0 and rank0["val/student_ce"] > 0
