"""LoRA students through peft (``lora`` option of TinyLlama and HFCausalLM): only the adapters
train, checkpoints hold them alone and resume exactly (a different base is refused), the
merged export equals the unmerged student, the adapters load with ``PeftModel``, the TP plan
splits adapters like their base layers, the memory estimate knows the frozen base, errors."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from torch.utils.data import DataLoader

from lightning_kd import DistillationModule, KDLoss, TinyLlama
from lightning_kd.export import export_student
from lightning_kd.export.checkpoint_export import export_checkpoint
from lightning_kd.export.lora_adapters import export_lora_adapters
from lightning_kd.models.lora import LoraOptions, lora_layers
from lightning_kd.training.memory_estimate import estimate_memory, model_size
from tests.helpers.hf import hf_config
from tests.helpers.trainer import cpu_trainer

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 37
LORA = {"rank": 4, "alpha": 8.0}


def _tiny(lora=LORA, seed: int = 0, **kwargs) -> TinyLlama:
    torch.manual_seed(seed)
    return TinyLlama(vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, n_kv_heads=2,
                     hidden_dim=32, init_std=0.1, lora=lora, **kwargs)  # fmt: skip


def _teacher() -> TinyLlama:
    torch.manual_seed(1)
    return TinyLlama(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     hidden_dim=64, init_std=0.3)  # fmt: skip


def _hf(lora=LORA, seed: int = 0):
    from lightning_kd.models.hf import HFCausalLM

    torch.manual_seed(seed)
    return HFCausalLM(config=hf_config(VOCAB, hidden=16, layers=2), lora=lora)


def _perturb_adapters(model: torch.nn.Module) -> None:
    """lora_B starts at zero (the student equals its base); give it values to test with."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))


def test_only_adapters_train_and_the_optimizer_sees_only_them():
    student = _tiny()
    base = _tiny(lora=None)
    ids = _ids()
    torch.testing.assert_close(student(ids), base(ids))  # lora_B = 0: the base's logits
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}
    module = DistillationModule(student, _teacher())
    module.configure_model()
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in student.parameters() if p.requires_grad}
    size = model_size(student)
    assert size.trainable == sum(p.numel() for p in student.parameters() if p.requires_grad)
    assert size.trainable < size.params / 3
    estimate = estimate_memory(size, None, batch_size=2, seq_len=9, vocab_size=VOCAB)
    assert estimate.gradients == size.trainable * 4  # fp32, the adapters only
    assert estimate.optimizer_state == 2 * size.trainable * 4
    assert estimate.student_weights == size.params * 4


def test_hf_student_targets_peft_defaults_and_yaml_style_mapping():
    student = _hf(lora={"rank": 2, "alpha": 4, "target_modules": ["q_proj", "o_proj"]})
    names = {name.rsplit(".", 1)[-1] for name in lora_layers(student)}
    assert names == {"q_proj", "o_proj"}
    default = _hf()
    assert {n.rsplit(".", 1)[-1] for n in lora_layers(default)} == {"q_proj", "v_proj"}


def test_tp_plan_puts_the_style_on_the_base_layer_and_splits_the_adapter():
    plan = _tiny().tensor_parallel_plan(2)
    assert isinstance(plan["layers.0.attn.wq.base_layer"], ColwiseParallel)
    assert isinstance(plan["layers.0.attn.wq.lora_B.default"], ColwiseParallel)
    assert "layers.0.attn.wq.lora_A.default" not in plan  # replicated
    assert isinstance(plan["layers.0.attn.wo.base_layer"], RowwiseParallel)
    assert isinstance(plan["layers.0.attn.wo.lora_A.default"], RowwiseParallel)
    assert "layers.0.attn.wq" not in plan and "lm_head" in plan
    hf_plan = _hf().tensor_parallel_plan(2)
    assert "model.model.layers.*.self_attn.q_proj.base_layer" in hf_plan
    assert "model.model.layers.*.self_attn.k_proj" in hf_plan  # not adapted: unchanged


@pytest.mark.parametrize("family", ["tiny", "hf"])
def test_merged_export_and_peft_adapters_give_the_students_logits(tmp_path, family):
    student = _tiny() if family == "tiny" else _hf()
    base = _tiny(lora=None) if family == "tiny" else _hf(lora=None)
    _perturb_adapters(student)
    ids = _ids()
    with torch.no_grad():
        want = student(ids)
        assert (want - base(ids)).abs().max() > 1e-2  # the adapters matter
    state = {k: v.detach().clone() for k, v in student.state_dict().items()}

    merged_dir = export_student(student, state, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want, rtol=0, atol=1e-5)

    adapters = export_lora_adapters(student, state, tmp_path / "adapters")
    assert {p.name for p in adapters.iterdir()} == {"adapter_config.json",
                                                    "adapter_model.safetensors"}  # fmt: skip
    target = base if family == "tiny" else base.model
    loaded = peft.PeftModel.from_pretrained(target, str(adapters))
    with torch.no_grad():
        got = loaded(ids) if family == "tiny" else loaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def _fit(steps: int, ckpt=None, ckpt_dir=None, seed: int = 0) -> DistillationModule:
    L.seed_everything(0, verbose=False)
    module = DistillationModule(_tiny(seed=seed), _teacher(), loss=KDLoss(kd_ratio=0.5),
                                optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))  # fmt: skip
    callbacks = []
    if ckpt_dir:
        callbacks.append(
            L.pytorch.callbacks.ModelCheckpoint(ckpt_dir, save_last=True, every_n_train_steps=2)
        )
    gen = torch.Generator().manual_seed(7)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (2, 2, 9),
                                                                        generator=gen)]  # fmt: skip
    trainer = cpu_trainer(max_steps=steps, callbacks=callbacks, enable_checkpointing=bool(ckpt_dir))
    # Two batches: the checkpoint at step 2 ends an epoch (the list loader does not resume).
    trainer.fit(module, DataLoader(data, batch_size=None), ckpt_path=ckpt)
    return module


def test_checkpoints_hold_the_adapters_only_and_resume_exactly(tmp_path):
    full = _fit(4)
    _fit(2, ckpt_dir=tmp_path)
    path = tmp_path / "last.ckpt"
    saved = torch.load(path, weights_only=False)
    keys = list(saved["state_dict"])
    assert keys and all(".lora_" in k for k in keys), keys[:5]
    resumed = _fit(4, ckpt=path)
    for name, value in full.student.state_dict().items():
        torch.testing.assert_close(resumed.student.state_dict()[name], value)
    # The export of that checkpoint takes the base from the config and merges the adapters.
    module = DistillationModule(_tiny(), _teacher())
    out = export_checkpoint(module, path, tmp_path / "export")
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    trained = _fit(2)
    with torch.no_grad():
        torch.testing.assert_close(
            merged(_ids()).logits, trained.student(_ids()), atol=1e-5, rtol=0
        )
    with pytest.raises(ValueError, match="another frozen base model"):
        _fit(4, ckpt=path, seed=1)  # a different base: refused, never silently trained on


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="lora rank must be an integer >= 1"):
        LoraOptions(rank=0)
    with pytest.raises(ValueError, match="lora dropout must be in"):
        LoraOptions(dropout=1.0)
    with pytest.raises(ValueError, match="unknown lora options"):
        _tiny(lora={"r": 4})
    with pytest.raises(ValueError, match="the output head"):
        _tiny(lora={"target_modules": ["lm_head"]})
    with pytest.raises(ValueError, match=r"nn\.Linear layers of the blocks only"):
        _tiny(lora={"target_modules": ["embed"]})
    with pytest.raises(ValueError, match=r"lora target_modules=\['nothing_here'\]: Target modules"):
        _tiny(lora={"target_modules": ["nothing_here"]})
    with pytest.raises(ValueError, match=r"sharded \(meta-device\) loading"), torch.device("meta"):
        _tiny()
    with pytest.raises(ValueError, match="no LoRA adapters"):
        export_lora_adapters(_tiny(lora=None), {}, "unused")


def test_a_lora_student_can_be_copied():
    student = _tiny()
    clone = copy.deepcopy(student)
    assert set(clone.state_dict()) == set(student.state_dict())


def test_lora_config_trains_from_yaml_and_checkpoints_the_adapters(
    tmp_path, monkeypatch, teacher_ckpt
):
    from lightning_kd.cli import KDLightningCLI
    from tests.helpers.cli import SMALL_DATA
    from tests.helpers.runs import ROOT

    monkeypatch.chdir(tmp_path)
    cli = KDLightningCLI(
        args=["--config", str(ROOT / "configs/lora.yaml"),
              "--model.init_args.teacher_checkpoint", str(teacher_ckpt),
              "--model.init_args.student.init_args.init_from", str(teacher_ckpt),
              "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
              "--trainer.enable_progress_bar", "false", *SMALL_DATA],
        run=False,
    )  # fmt: skip
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    student = cli.model.student
    assert student.lora == LoraOptions(8, 16.0, 0.0, ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    trained = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained)
    ckpt = tmp_path / "runs/lora/checkpoints/last.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    keys = torch.load(ckpt, weights_only=False)["state_dict"]
    assert keys and all(".lora_" in k for k in keys)


@pytest.mark.parametrize("option", ["activation_checkpointing", "fused_head"])
def test_lora_with_checkpointing_or_the_fused_head_and_a_hidden_loss_matches_plain(option):
    from lightning_kd.training.hidden_state_loss import HiddenStateLoss

    results = []
    for options in ({}, {option: True}):
        student = _tiny()
        _perturb_adapters(student)
        module = DistillationModule(student, _teacher(), loss=KDLoss(kd_ratio=0.5),
                                    hidden_state_loss=HiddenStateLoss(), **options)  # fmt: skip
        module.configure_model()
        ids = _ids()
        batch = {"input_ids": ids, "labels": ids}
        loss = module.compute_loss(*module._forward_both(batch), batch).loss
        loss.backward()
        grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
        assert grads and all(".lora_" in n or "projections" in n for n in grads), sorted(grads)
        results.append((loss, grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6)
