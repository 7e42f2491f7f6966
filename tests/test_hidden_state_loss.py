"""Intermediate-layer (hidden-state) distillation: the distances against a float64 reference,
``DistillationModule(hidden_state_loss=)`` against a plain block-by-block reference (values and
gradients, with activation checkpointing and the fused head), checkpoints and resume, a config
from YAML, and errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_kd import DistillationModule, KDLoss, TinyLlama
from lightning_kd.cli import KDLightningCLI
from lightning_kd.losses.hidden_state import HIDDEN_DISTANCES, hidden_state_distance
from lightning_kd.models.layer_taps import LayerTaps
from lightning_kd.training.hidden_state_loss import HiddenStateLoss, evenly_spaced_pairs
from tests.helpers.cli import SMALL_DATA
from tests.helpers.hf import hf_config
from tests.helpers.runs import ROOT
from tests.helpers.trainer import cpu_trainer

VOCAB = 37


def _reference_distance(student, teacher, mask, distance):
    """Token by token in float64."""
    rows = []
    for s, t in zip(student[mask].double(), teacher[mask].double(), strict=True):
        if distance == "mse":
            rows.append(((s - t) ** 2).mean())
        elif distance == "cosine":
            rows.append(1 - (s @ t) / (s.norm() * t.norm()))
        else:
            rows.append(((s - t) ** 2).sum() / (t**2).sum())
    return torch.stack(rows).mean()


@pytest.mark.parametrize("distance", HIDDEN_DISTANCES)
def test_distance_values_and_gradients_match_a_float64_reference(distance):
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 5, 8, generator=gen)
    mask = torch.rand(2, 5, generator=gen) > 0.3
    got = hidden_state_distance(student, teacher, mask, distance)
    (grad,) = torch.autograd.grad(got, student)
    s64 = student.detach().double().requires_grad_()
    want = _reference_distance(s64, teacher, mask, distance)
    (want_grad,) = torch.autograd.grad(want, s64)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-8)
    assert grad[~mask].abs().max() == 0  # ignored tokens get no gradient


def test_distances_in_bf16_are_computed_in_fp32_and_an_empty_mask_gives_zero():
    s, t = torch.randn(1, 3, 4).bfloat16().requires_grad_(), torch.randn(1, 3, 4).bfloat16()
    out = hidden_state_distance(s, t, torch.ones(1, 3, dtype=torch.bool), "normalized_mse")
    assert out.dtype == torch.float32
    empty = hidden_state_distance(s, t, torch.zeros(1, 3, dtype=torch.bool), "mse")
    assert empty.item() == 0 and empty.requires_grad


def test_evenly_spaced_pairs_end_on_the_last_blocks():
    assert evenly_spaced_pairs(2, 4) == [(0, 1), (1, 3)]
    assert evenly_spaced_pairs(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert evenly_spaced_pairs(4, 2) == [(0, 0), (1, 0), (2, 1), (3, 1)]


def _models(student_dim: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    student = TinyLlama(vocab_size=VOCAB, dim=student_dim, n_layers=2, n_heads=2, n_kv_heads=2,
                        hidden_dim=32, init_std=0.1)  # fmt: skip
    teacher = TinyLlama(vocab_size=VOCAB, dim=32, n_layers=4, n_heads=4, n_kv_heads=2,
                        hidden_dim=64, init_std=0.3)  # fmt: skip
    return student, teacher


def _batch(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 9), generator=gen)
    labels = torch.randint(0, VOCAB, (2, 9), generator=gen)
    labels[:, :2] = -100
    return {"input_ids": ids, "labels": labels}


def _block_outputs(model: TinyLlama, ids: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream after each block, computed by hand (no hooks)."""
    seq = ids.shape[1]
    cos, sin = model.rope_cos[:seq], model.rope_sin[:seq]
    x, outputs = model.embed(ids), []
    for layer in model.layers:
        x = layer(x, cos, sin)
        outputs.append(x)
    return outputs


def _module(student, teacher, hidden: HiddenStateLoss, **kwargs) -> DistillationModule:
    module = DistillationModule(student, teacher, loss=KDLoss(kd_ratio=0.6, temperature=2.0),
                                hidden_state_loss=hidden, **kwargs)  # fmt: skip
    module.configure_model()
    return module


def _loss_and_grads(module: DistillationModule, batch):
    module.zero_grad(set_to_none=True)
    terms = module.compute_loss(*module._forward_both(batch), batch)
    terms.loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return terms, grads


@pytest.mark.parametrize("distance", HIDDEN_DISTANCES)
def test_module_loss_and_gradients_match_a_plain_reference(distance):
    student, teacher = _models()
    pairs = [(0, 1), (-1, -1)]
    module = _module(student, teacher, HiddenStateLoss(pairs, distance=distance, weight=0.7))
    batch = _batch()
    terms, grads = _loss_and_grads(module, batch)

    # Reference: a copy of everything, the logit loss plus the term computed by hand.
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    projections = copy.deepcopy(module.hidden_state_loss.projections)
    ref_student.zero_grad(set_to_none=True)
    projections.zero_grad(set_to_none=True)
    kd = KDLoss(kd_ratio=0.6, temperature=2.0)
    ids, labels = batch["input_ids"], batch["labels"]
    logit_loss = kd(ref_student(ids), ref_teacher(ids).detach(), labels)
    s_out, t_out = _block_outputs(ref_student, ids), _block_outputs(ref_teacher, ids)
    mask = labels != -100
    distances = [
        _reference_distance(projections[k](s_out[s]), t_out[t].detach(), mask, distance)
        for k, (s, t) in enumerate([(0, 1), (1, 3)])
    ]
    want = logit_loss.double() + 0.7 * torch.stack(distances).mean()
    want.backward()

    torch.testing.assert_close(terms.loss.double(), want, rtol=1e-5, atol=1e-6)
    assert set(terms.extra) == {"hidden_loss", "hidden/s0_t1", "hidden/s1_t3"}
    torch.testing.assert_close(terms.extra["hidden/s1_t3"].double(), distances[1].detach(),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    for name, p in ref_student.named_parameters():
        torch.testing.assert_close(grads[f"student.{name}"], p.grad, rtol=1e-4, atol=1e-6)
    for name, p in projections.named_parameters():
        got = grads[f"hidden_state_loss.projections.{name}"]
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)
    assert not any(name.startswith("teacher.") for name in grads)


@pytest.mark.parametrize("option", ["activation_checkpointing", "fused_head"])
def test_activation_checkpointing_and_the_fused_head_give_the_same_loss_and_gradients(option):
    hidden = HiddenStateLoss(distance="normalized_mse", weight=0.5)
    plain = _module(*_models(), copy.deepcopy(hidden))
    other = _module(*_models(), copy.deepcopy(hidden), **{option: True})
    batch = _batch()
    want, want_grads = _loss_and_grads(plain, batch)
    got, got_grads = _loss_and_grads(other, batch)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.extra["hidden_loss"], want.extra["hidden_loss"])
    assert set(got_grads) == set(want_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_equal_widths_need_no_projection_and_only_tapped_outputs_are_kept():
    student, teacher = _models(student_dim=32)
    module = _module(student, teacher, HiddenStateLoss([(1, 3)]))
    assert module.hidden_state_loss.projections is None
    taps = module.hidden_state_loss._taps["teacher"]
    module._forward_both(_batch())
    assert sorted(taps._outputs) == [3]  # block 3 only, of 4
    module.hidden_state_loss.collect()
    assert taps._outputs == {}  # handed over and forgotten
    with pytest.raises(ValueError, match="no output of the student's blocks"):
        module.hidden_state_loss.collect()


def test_taps_work_on_hugging_face_decoder_layers():
    pytest.importorskip("transformers")
    from lightning_kd.models.hf import HFCausalLM

    torch.manual_seed(0)
    model = HFCausalLM(config=hf_config(VOCAB, hidden=16, layers=3))
    taps = LayerTaps(model, [0, 1], "student")
    ids = _batch()["input_ids"]
    out = model.model(input_ids=ids, output_hidden_states=True)
    kept = taps.take()
    # hidden_states[i + 1] is block i's output (the last entry is after the final norm).
    for i in (0, 1):
        torch.testing.assert_close(kept[i], out.hidden_states[i + 1])


def test_hugging_face_models_distil_hidden_states_through_the_module():
    pytest.importorskip("transformers")
    from lightning_kd.models.hf import HFCausalLM

    torch.manual_seed(0)
    student = HFCausalLM(config=hf_config(VOCAB, hidden=16, layers=2))
    teacher = HFCausalLM(config=hf_config(VOCAB, hidden=32, layers=4))
    module = _module(student, teacher, HiddenStateLoss(distance="mse", weight=1.0))
    batch = _batch()
    terms, grads = _loss_and_grads(module, batch)
    ids, mask = batch["input_ids"], batch["labels"] != -100
    with torch.no_grad():
        s_out = student.model(input_ids=ids, output_hidden_states=True).hidden_states
        t_out = teacher.model(input_ids=ids, output_hidden_states=True).hidden_states
        projections = module.hidden_state_loss.projections
        # Pairs (0, 1) and (1, 3); HF's last hidden state is after the final norm: block 1 of
        # the student is its last, so its output comes from the tap (compared for pair 0 only).
        want = _reference_distance(projections[0](s_out[1]), t_out[2], mask, "mse")
    torch.testing.assert_close(terms.extra["hidden/s0_t1"].double(), want, rtol=1e-5, atol=1e-7)
    assert grads["hidden_state_loss.projections.1.weight"].abs().sum() > 0
    assert any(n.startswith("student.") and g.abs().sum() > 0 for n, g in grads.items())


def test_projections_are_checkpointed_and_resume_exactly(tmp_path):
    import lightning as L

    def fit(steps: int, ckpt=None, ckpt_dir=None) -> DistillationModule:
        L.seed_everything(0, verbose=False)
        module = DistillationModule(
            *_models(), loss=KDLoss(kd_ratio=0.5),
            hidden_state_loss=HiddenStateLoss(distance="mse", weight=0.3),
            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        )  # fmt: skip
        callbacks = []
        if ckpt_dir:
            callbacks.append(
                L.pytorch.callbacks.ModelCheckpoint(ckpt_dir, save_last=True, every_n_train_steps=2)
            )
        # Two batches: the checkpoint at step 2 ends an epoch (the list loader does not resume
        # mid-epoch).
        loader = DataLoader([_batch(seed) for seed in range(2)], batch_size=None)
        trainer = cpu_trainer(max_steps=steps, callbacks=callbacks,
                              enable_checkpointing=bool(ckpt_dir))  # fmt: skip
        trainer.fit(module, loader, ckpt_path=ckpt)
        return module

    full = fit(4)
    fit(2, ckpt_dir=tmp_path)
    path = tmp_path / "last.ckpt"
    state = torch.load(path, weights_only=False)["state_dict"]
    assert "hidden_state_loss.projections.0.weight" in state
    assert not any(k.startswith("teacher.") for k in state)
    resumed = fit(4, ckpt=path)
    assert resumed.trainer.global_step == 4
    for name, p in full.hidden_state_loss.state_dict().items():
        torch.testing.assert_close(resumed.hidden_state_loss.state_dict()[name], p)
    for name, p in full.student.state_dict().items():
        torch.testing.assert_close(resumed.student.state_dict()[name], p)
    # Export (the student alone) drops the projections.
    model, prefix = full.export_model()
    assert model is full.student and prefix == "student."


def test_hidden_state_config_trains_from_yaml(tmp_path, monkeypatch, teacher_ckpt):
    monkeypatch.chdir(tmp_path)
    cli = KDLightningCLI(
        args=["--config", str(ROOT / "configs/hidden_state.yaml"),
              "--model.init_args.teacher_checkpoint", str(teacher_ckpt),
              "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
              "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
              *SMALL_DATA],
        run=False,
    )  # fmt: skip
    before = cli.model.hidden_state_loss
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = cli.trainer.callback_metrics
    for key in ("train/loss", "train/kd_loss", "train/hidden_loss", "train/hidden/s0_t1",
                "train/hidden/s1_t3"):  # fmt: skip
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert metrics["train/hidden_loss"] > 0
    assert cli.model.hidden_state_loss is before and len(before.projections) == 2
    optimizer = cli.trainer.optimizers[0]
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in before.parameters())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="distance must be one of"):
        HiddenStateLoss(distance="l1")
    with pytest.raises(ValueError, match="weight must be a number >= 0"):
        HiddenStateLoss(weight=-1)
    with pytest.raises(ValueError, match="pairs must be a non-empty list"):
        HiddenStateLoss(pairs=[[0, 1, 2]])
    with pytest.raises(ValueError, match="pairs must be a non-empty list"):
        HiddenStateLoss(pairs=[])
    with pytest.raises(ValueError, match="teacher layer 4 is out of range"):
        _module(*_models(), HiddenStateLoss([(0, 4)]))
    with pytest.raises(ValueError, match="a teacher cache holds only its logits"):
        DistillationModule(
            _models()[0], teacher_cache=str(ROOT), hidden_state_loss=HiddenStateLoss()
        )
    with pytest.raises(ValueError, match="hidden_state_loss must be a HiddenStateLoss"):
        DistillationModule(*_models(), hidden_state_loss=torch.nn.Linear(1, 1))
