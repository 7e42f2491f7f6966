"""Hugging Face models as teacher and student (tiny random models built from HF configs and
saved to temporary directories; nothing is downloaded)."""

from __future__ import annotations

import math
from fnmatch import fnmatchcase

import pytest
import torch

pytest.importorskip("transformers")

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
)
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_kd import DistillationModule, KDLoss
from lightning_kd.data import TextDataModule
from lightning_kd.models.hf import HFCausalLM
from lightning_kd.parallel.plans import untie_planned_weights
from lightning_kd.training.distillation import logits_of
from tests.helpers.fit import assert_same_trajectory, fit_runs
from tests.helpers.hf import hf_config, save_tokenizer
from tests.helpers.trainer import cpu_trainer

# olmo2 is outside the families the plan was once hard-coded for: its config's plan gathers
# the q/k/v outputs (colwise_gather_output) and splits the o_proj input (rowwise_split_input).
FAMILIES = ["llama", "qwen2", "qwen3", "olmo2"]
PADDED = ["--family", "qwen2", "--teacher-vocab", "44"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each family (and a padded teacher vocabulary) on one process and under TP=2: the
    single-process runs in one launch, the TP=2 runs in another."""
    runs = fit_runs(tmp_path_factory.mktemp("hf_fits"))
    for name, args in [*((f, ["--family", f]) for f in FAMILIES), ("pad", PADDED)]:
        runs.add(f"{name}1", *args)
        runs.add(f"{name}2", *args, "--devices", "2", "--tp", "2")
    runs.add("pad2fused", *PADDED, "--devices", "2", "--tp", "2", "--fused-head")
    return runs


# olmo2 is outside the families the plan was once hard-coded for: its config's plan gathers
# the q/k/v outputs (colwise_gather_output) and splits the o_proj input (rowwise_split_input).
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_matches_single_process(runs, family):
    single, tp2 = runs[f"{family}1"], runs[f"{family}2"]
    assert_same_trajectory(tp2, single)
    assert tp2["saw_sharded"] is True and tp2["teacher_unchanged"]


@pytest.mark.distributed
@pytest.mark.slow
def test_padded_teacher_vocabulary_on_the_tp_path(runs):
    single, tp2 = runs["pad1"], runs["pad2"]
    assert_same_trajectory(tp2, single)
    assert tp2["saw_sharded"] is True


def test_local_checkpoint_reproduces_logits_and_offline_errors(tmp_path):
    torch.manual_seed(0)
    built = HFCausalLM(config=hf_config(50))
    built.model.save_pretrained(tmp_path / "model")
    loaded = HFCausalLM(pretrained_path=str(tmp_path / "model"))
    ids = torch.randint(0, 50, (2, 9))
    assert torch.equal(built(ids), loaded(ids))
    half = HFCausalLM(pretrained_path=str(tmp_path / "model"), dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="nowhere"):
        HFCausalLM(pretrained_path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="exactly one"):
        HFCausalLM()
    with pytest.raises(ValueError, match="model_type"):
        HFCausalLM(config={"vocab_size": 10})


def _megatron_plan(model: HFCausalLM) -> dict[str, ParallelStyle]:
    """The plan HFCausalLM hard-coded for llama/mistral/qwen2/qwen3 before it read the config's."""
    plan: dict[str, ParallelStyle] = {}
    for i, layer in enumerate(model.model.model.layers):
        prefix = f"model.model.layers.{i}"
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "mlp.gate_proj", "mlp.up_proj"):  # fmt: skip
            plan[f"{prefix}.{name}"] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"{prefix}.{name}"] = RowwiseParallel()
        for name in ("q_norm", "k_norm"):
            if hasattr(layer.self_attn, name):
                plan[f"{prefix}.self_attn.{name}"] = SequenceParallel(
                    sequence_dim=2, use_local_output=True
                )
    plan["model.lm_head"] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    return plan


def _coverage(model: nn.Module, plan: dict[str, ParallelStyle]) -> dict[str, tuple]:
    """{module path: (style class, its layouts)}, wildcard keys expanded atom by atom as
    ``parallelize_module`` does; every key must reach a module, and no module twice."""
    names = [name.split(".") for name, _ in model.named_modules() if name]
    covered: dict[str, tuple] = {}
    for key, style in plan.items():
        atoms = key.split(".")
        matched = [
            ".".join(parts)
            for parts in names
            if len(parts) == len(atoms) and all(map(fnmatchcase, parts, atoms))
        ]
        assert matched, f"{key} reaches no module"
        for name in matched:
            assert name not in covered, f"{name} planned twice"
            covered[name] = _signature(style)
    return covered


def _signature(style: ParallelStyle) -> tuple:
    """A style's class and settings (layouts, use_local_output, ...), comparable by value."""
    return type(style).__name__, sorted((k, repr(v)) for k, v in vars(style).items())


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_config_plan_matches_the_former_megatron_plan(family):
    model = HFCausalLM(config=hf_config(40, model_type=family))
    plan = model.tensor_parallel_plan(2)
    assert any("*" in key for key in plan)  # the config's wildcards, not one key per layer
    expected = _coverage(model, _megatron_plan(model))
    assert _coverage(model, plan) == expected
    if family == "qwen3":
        assert "model.model.layers.1.self_attn.k_norm" in expected


def test_config_plan_of_a_family_outside_the_four():
    """olmo2: q/k/v gathered and o_proj fed replicated, so its q_norm/k_norm (over the whole
    projection, not per head) stay plain replicated modules."""
    model = HFCausalLM(config=hf_config(40, model_type="olmo2"))
    covered = _coverage(model, model.tensor_parallel_plan(2))
    gathered = _signature(ColwiseParallel(output_layouts=Replicate()))
    split_input = _signature(RowwiseParallel(input_layouts=Replicate()))
    colwise, rowwise = _signature(ColwiseParallel()), _signature(RowwiseParallel())
    layer = "model.model.layers.1"
    assert covered[f"{layer}.self_attn.k_proj"] == gathered
    assert covered[f"{layer}.self_attn.o_proj"] == split_input
    assert covered[f"{layer}.mlp.up_proj"] == colwise
    assert covered[f"{layer}.mlp.down_proj"] == rowwise
    assert covered["model.lm_head"] == _signature(
        ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    )
    assert not any("norm" in name or "embed" in name for name in covered)
    assert len(covered) == 2 * 7 + 1


def test_per_head_norms_the_config_leaves_out_are_still_planned():
    model = HFCausalLM(config=hf_config(40, model_type="qwen3"))
    full = _coverage(model, model.tensor_parallel_plan(2))
    config = model.model.config
    config.base_model_tp_plan = {
        k: v for k, v in config.base_model_tp_plan.items() if not k.endswith("_norm")
    }
    assert _coverage(model, model.tensor_parallel_plan(2)) == full


def test_embeddings_stay_replicated():
    model = HFCausalLM(config=hf_config(40))
    full = _coverage(model, model.tensor_parallel_plan(2))
    config = model.model.config
    config.base_model_tp_plan = {"embed_tokens": "embedding_rowwise", **config.base_model_tp_plan}
    assert _coverage(model, model.tensor_parallel_plan(2)) == full
    config.base_model_tp_plan = {"embed_tokens": "colwise"}  # a sharded embedding output
    with pytest.raises(ValueError, match="'colwise' on the embedding 'embed_tokens'"):
        model.tensor_parallel_plan(2)


@pytest.mark.parametrize(
    ("family", "hf_plan", "message"),
    [
        ("qwen3", {"layers.*.mlp.gate_proj": "packed_colwise"}, "style 'packed_colwise'"),
        ("qwen3", {"layers.*.mlp.gate_proj": "local_colwise"}, "style 'local_colwise'"),
        ("qwen3", {"layers.*.mlp.gate_proj": "sequence_parallel"}, "style 'sequence_parallel'"),
        ("qwen3", {"layers.*.mlp.up_proj.weight": "colwise"}, "names a parameter"),
        ("qwen3", {"layers.*.self_attn.q_norm": "replicated_with_grad_allreduce"},
         "supported only for q_norm"),
        # olmo2's q_norm spans the whole projection: a sharded q_proj would split its statistics
        ("olmo2", {"layers.*.self_attn.q_proj": "colwise"}, r"only one \[head_dim=8\] weight"),
        ("qwen3", {}, "no tensor-parallel plan for model_type 'qwen3'.*student_tp_plan"),
    ],
)  # fmt: skip
def test_plans_that_cannot_be_mapped_are_refused(family, hf_plan, message):
    model = HFCausalLM(config=hf_config(40, model_type=family))
    model.model.config.base_model_tp_plan = hf_plan
    with pytest.raises(ValueError, match=message):
        model.tensor_parallel_plan(2)


def test_tp_plan_errors_and_tied_heads():
    gpt2 = HFCausalLM(config=dict(model_type="gpt2", vocab_size=40, n_embd=32, n_layer=1,
                                  n_head=4))  # fmt: skip
    with pytest.raises(ValueError, match="no tensor-parallel plan for model_type 'gpt2'"):
        gpt2.tensor_parallel_plan(2)
    llama = HFCausalLM(config=hf_config(40))
    with pytest.raises(ValueError, match="must divide"):
        llama.tensor_parallel_plan(4)

    tied = HFCausalLM(config={**hf_config(40), "tie_word_embeddings": True})
    head, embed = tied.model.lm_head, tied.model.model.embed_tokens
    assert head.weight is embed.weight
    n_params = len(list(tied.parameters()))
    tied.tensor_parallel_plan(2)  # asking for the plan changes nothing
    assert head.weight is embed.weight
    plan = {"model.lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
    with pytest.warns(UserWarning, match="untying"):
        untie_planned_weights(tied, plan)
    assert head.weight is not embed.weight and torch.equal(head.weight, embed.weight)
    assert not tied.model.config.tie_word_embeddings
    assert len(list(tied.parameters())) == n_params + 1  # trained as two matrices now


def test_padded_vocabulary_is_distilled_over_the_shared_tokenizer(tmp_path):
    words = [f"w{i}" for i in range(37)]  # 40 tokens with the specials
    torch.manual_seed(0)
    for name, vocab, hidden in (("teacher", 48, 32), ("student", 40, 16)):
        model = HFCausalLM(config=hf_config(vocab, hidden))
        model.model.save_pretrained(tmp_path / name)
        save_tokenizer(tmp_path / name, words)
    teacher_full = HFCausalLM(pretrained_path=str(tmp_path / "teacher"))
    module = DistillationModule(
        lambda: HFCausalLM(pretrained_path=str(tmp_path / "student")),
        lambda: HFCausalLM(pretrained_path=str(tmp_path / "teacher")),
        loss=KDLoss(temperature=2.0),
    )
    module.configure_model()
    assert module.teacher.vocab_size == module.student.vocab_size == 40
    ids = torch.randint(0, 40, (2, 10))
    batch = {"input_ids": ids, "labels": ids}
    terms = module.compute_loss(module.run_student(batch), module.run_teacher(batch), batch)
    with torch.no_grad():
        reference = KDLoss(temperature=2.0)(
            module.student(ids), teacher_full(ids)[..., :40], ids
        )  # fmt: skip
    torch.testing.assert_close(terms.kd_loss, reference, rtol=1e-5, atol=1e-7)
    only_teacher_tokenizer = DistillationModule(  # a student from a config has none
        HFCausalLM(config=hf_config(40, 16)), HFCausalLM(pretrained_path=str(tmp_path / "teacher"))
    )
    only_teacher_tokenizer.configure_model()
    assert only_teacher_tokenizer.teacher.vocab_size == 40

    save_tokenizer(tmp_path / "teacher", list(reversed(words)))  # a different vocabulary
    refused = DistillationModule(
        lambda: HFCausalLM(pretrained_path=str(tmp_path / "student")),
        lambda: HFCausalLM(pretrained_path=str(tmp_path / "teacher")),
    )
    with pytest.raises(ValueError, match="different tokenizers"):
        refused.configure_model()
    with pytest.raises(ValueError, match="shared_vocab_size"):
        DistillationModule(
            HFCausalLM(config=hf_config(40)), HFCausalLM(config=hf_config(48))
        ).configure_model()  # fmt: skip


def test_raw_hf_model_outputs_are_accepted():
    config = LlamaConfig(
        vocab_size=30,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = LlamaForCausalLM(config)
    output = model(torch.randint(0, 30, (1, 5)))
    assert logits_of(output).shape == (1, 5, 30)


def test_datamodule_with_a_local_hf_tokenizer(tmp_path):
    words = ["the", "cat", "sat", "on", "mat", "a", "dog"]
    save_tokenizer(tmp_path / "tok", words)
    text = tmp_path / "doc.txt"
    text.write_text(" ".join(words[i % 7] for i in range(400)))
    data = TextDataModule(
        paths=[str(text)], tokenizer=str(tmp_path / "tok"), seq_len=16, batch_size=2,
        cache_dir=str(tmp_path / "cache"), val_fraction=0.1,
    )  # fmt: skip
    assert data.vocab_size == 10
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (2, 16) and int(batch["input_ids"].max()) < 10
    assert data.tokenizer.decode(batch["input_ids"][0, :3].tolist()).split()[0] in words
    with pytest.raises(ValueError, match="missing_tok"):
        TextDataModule(tokenizer=str(tmp_path / "missing_tok"))


def test_padded_teacher_checkpoint_survives_fit_then_validate(tmp_path):
    """configure_model runs again for validate; the checkpoint must not be reloaded into the
    restricted teacher, and the restricted teacher stays frozen."""
    from tests.scripts.fit_run import RandomTokens  # token ids < 37

    torch.manual_seed(0)
    trained = HFCausalLM(config=hf_config(48))
    torch.save(trained.state_dict(), tmp_path / "teacher.pt")
    module = DistillationModule(
        lambda: HFCausalLM(config=hf_config(40, 16, 1)),
        lambda: HFCausalLM(config=hf_config(48)),
        teacher_checkpoint=str(tmp_path / "teacher.pt"),
        shared_vocab_size=40,
    )
    loader = DataLoader(RandomTokens(samples=4), batch_size=4)
    trainer = cpu_trainer(max_steps=1, limit_val_batches=1)
    trainer.fit(module, loader)
    metrics = trainer.validate(module, loader, verbose=False)[0]
    assert math.isfinite(metrics["val/kd_loss"]) and module.teacher.vocab_size == 40
    assert not module.teacher.training
    assert not any(p.requires_grad for p in module.teacher.parameters())
    assert torch.equal(module.teacher.model.lm_head.weight, trained.model.lm_head.weight[:40])


def test_hidden_states_and_output_head_reproduce_the_logits():
    torch.manual_seed(0)
    model = HFCausalLM(config=hf_config(40)).eval()
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        head = model.output_head()
        fused = head(model.hidden_states(ids))
        torch.testing.assert_close(fused, model(ids), rtol=0, atol=0)


def test_output_head_refuses_families_that_post_process_logits():
    gemma2 = HFCausalLM(config={**hf_config(40, model_type="gemma2"), "head_dim": 8},
                        attn_implementation="eager")  # fmt: skip
    assert gemma2.model.config.final_logit_softcapping  # the family's default
    with pytest.raises(ValueError, match=r"final_logit_softcapping=.*fused_head=False"):
        gemma2.output_head()
    plain = HFCausalLM(config={**hf_config(40, model_type="gemma2"), "head_dim": 8,
                               "final_logit_softcapping": None},
                       attn_implementation="eager")  # fmt: skip
    assert plain.output_head() is plain.model.get_output_embeddings()


@pytest.mark.distributed
@pytest.mark.slow
def test_fused_head_with_a_padded_teacher_on_the_tp_path(runs):
    """HF models, a teacher head padded beyond the tokenizer (restricted before sharding), TP=2
    with fused_head: the trajectory of the unfused single-process run."""
    single, fused = runs["pad1"], runs["pad2fused"]
    assert_same_trajectory(fused, single)
    assert fused["teacher_unchanged"]
