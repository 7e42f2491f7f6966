"""Export of the student as a Hugging Face directory (``lightning_kd.export``, the
``lightning-kd export`` command and the ``ExportOnFitEnd`` callback): what
``AutoModelForCausalLM.from_pretrained`` reads back must give the trained student's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import yaml
from safetensors import safe_open
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_kd import DistillationModule, KDLoss, TinyLlama
from lightning_kd.callbacks import ExportOnFitEnd
from lightning_kd.cli import main
from lightning_kd.export import (
    export_checkpoint,
    export_student,
    gather_full_state,
    student_state_from_checkpoint,
)
from lightning_kd.export.tiny_llama_to_llama import rope_theta_of
from lightning_kd.models.hf import HFCausalLM
from tests.helpers.distributed import parallelize, run_workers
from tests.helpers.fit import fit_runs
from tests.helpers.hf import hf_config, save_tokenizer
from tests.helpers.trainer import cpu_trainer
from tests.scripts.fit_run import VOCAB, RandomTokens, make_hf_models, make_models


def _ids(vocab: int, seq: int = 20) -> torch.Tensor:
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(1))


def _assert_same_logits(directory: Path, student: torch.nn.Module, vocab: int) -> None:
    exported = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    exported.eval()
    student.eval()
    ids = _ids(vocab)
    with torch.no_grad():
        got = exported(input_ids=ids).logits
        want = student(ids)
    want = want.logits if hasattr(want, "logits") else want
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _train(module: DistillationModule, ckpt: Path, steps: int = 2, **trainer_kwargs) -> None:
    trainer = cpu_trainer(max_steps=steps, **trainer_kwargs)
    trainer.fit(module, DataLoader(RandomTokens(samples=8), batch_size=4))
    trainer.save_checkpoint(ckpt)


def _tiny(vocab: int = VOCAB, **kwargs) -> TinyLlama:
    torch.manual_seed(0)
    return TinyLlama(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     hidden_dim=48, max_seq_len=64, init_std=0.2, **kwargs)  # fmt: skip


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"tie_embeddings": True, "rope_theta": 500000.0, "norm_eps": 1e-6}],
    ids=["untied", "tied-theta5e5-eps1e-6"],
)
def test_tiny_llama_exports_as_llama_with_the_same_logits(tmp_path, kwargs):
    """GQA (4 query heads, 2 key/value heads); RoPE halves as HF's rotate_half, no permutation."""
    module = DistillationModule(_tiny(**kwargs), make_models()[1], loss=KDLoss(temperature=2.0))
    _train(module, tmp_path / "run.ckpt")
    fresh = DistillationModule(_tiny(**kwargs), make_models()[1])  # the config's, untrained
    out = export_checkpoint(fresh, tmp_path / "run.ckpt", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == 2 and config["num_attention_heads"] == 4
    assert config["intermediate_size"] == 48 and config["max_position_embeddings"] == 64
    assert config["rms_norm_eps"] == kwargs.get("norm_eps", 1e-5)
    assert config["rope_parameters"]["rope_theta"] == kwargs.get("rope_theta", 10000.0)
    assert config["tie_word_embeddings"] == bool(kwargs.get("tie_embeddings"))
    assert (out / "generation_config.json").is_file()
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert ("lm_head.weight" in set(weights.keys())) != bool(kwargs.get("tie_embeddings"))
    _assert_same_logits(out, module.student, VOCAB)
    assert rope_theta_of(module.student) == kwargs.get("rope_theta", 10000.0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_hf_student_exports_under_hf_names(tmp_path, family, tied):
    def student() -> HFCausalLM:
        torch.manual_seed(0)
        return HFCausalLM(config={**hf_config(VOCAB, 16, 2, family), "tie_word_embeddings": tied})

    module = DistillationModule(student(), make_models()[1], loss=KDLoss(temperature=2.0))
    _train(module, tmp_path / "run.ckpt")
    out = export_checkpoint(DistillationModule(student(), make_models()[1]),
                            tmp_path / "run.ckpt", tmp_path / "hf")  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and config["tie_word_embeddings"] == tied
    with safe_open(out / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
    assert "model.embed_tokens.weight" in names and not any(
        n.startswith("model.model.") for n in names
    )
    assert ("lm_head.weight" in names) != tied
    _assert_same_logits(out, module.student, VOCAB)


def test_head_untied_by_tensor_parallelism_is_exported_untied(tmp_path):
    """TP unties a tied HF head (``HFCausalLM.untie_lm_head``) and the two train apart; the
    config's student is tied, the checkpoint's head is not: exported with
    ``tie_word_embeddings=False`` and its own lm_head."""

    def student() -> HFCausalLM:
        torch.manual_seed(0)
        return HFCausalLM(config={**hf_config(VOCAB, 16, 1), "tie_word_embeddings": True})

    trained = student()
    with pytest.warns(UserWarning, match="untying"):
        trained.untie_lm_head()
    module = DistillationModule(trained, make_models()[1], loss=KDLoss(temperature=2.0))
    _train(module, tmp_path / "run.ckpt")
    head, embed = trained.model.lm_head.weight, trained.model.model.embed_tokens.weight
    assert not torch.equal(head, embed)
    out = export_checkpoint(DistillationModule(student(), make_models()[1]),
                            tmp_path / "run.ckpt", tmp_path / "hf")  # fmt: skip
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    _assert_same_logits(out, trained, VOCAB)


def test_padded_vocabulary_student_exports_its_restricted_size_and_tokenizer(tmp_path):
    """A student whose lm_head is padded beyond the shared tokenizer (48 rows, 40 tokens) is
    restricted before training; the export's config says 40, its weights have 40 rows."""
    words = [f"w{i}" for i in range(37)]  # 40 tokens with the specials
    torch.manual_seed(0)
    for name, vocab, hidden in (("teacher", 40, 32), ("student", 48, 16)):
        HFCausalLM(config=hf_config(vocab, hidden)).model.save_pretrained(tmp_path / name)
        save_tokenizer(tmp_path / name, words)

    def build() -> DistillationModule:
        return DistillationModule(
            lambda: HFCausalLM(pretrained_path=str(tmp_path / "student")),
            lambda: HFCausalLM(pretrained_path=str(tmp_path / "teacher")),
        )

    module = build()
    _train(module, tmp_path / "run.ckpt")
    assert module.student.vocab_size == 40
    out = export_checkpoint(build(), tmp_path / "run.ckpt", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 40
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert weights.get_slice("lm_head.weight").get_shape()[0] == 40
    _assert_same_logits(out, module.student, 40)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tmp_path / "student").get_vocab()


def test_sharded_weights_with_an_index_load_back(tmp_path):
    student = _tiny()
    state = {k: v.clone() for k, v in student.state_dict().items()}
    out = export_student(student, state, tmp_path / "hf", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / shard).is_file() for shard in shards)
    assert not (out / "model.safetensors").exists()
    _assert_same_logits(out, student, VOCAB)
    with pytest.raises(ValueError, match="not empty"):
        export_student(student, state, out)
    export_student(student, state, out, overwrite=True)  # one file now: stale shards removed
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    _assert_same_logits(out, student, VOCAB)


def test_export_errors(tmp_path):
    student = _tiny()
    with pytest.raises(ValueError, match="does not exist"):
        student_state_from_checkpoint(tmp_path / "missing.ckpt")
    torch.save({"state_dict": {"teacher.embed.weight": torch.zeros(2)}}, tmp_path / "t.ckpt")
    with pytest.raises(ValueError, match="no student weights"):
        student_state_from_checkpoint(tmp_path / "t.ckpt")
    (tmp_path / "not_dcp").mkdir()
    with pytest.raises(ValueError, match="without DCP metadata"):
        student_state_from_checkpoint(tmp_path / "not_dcp")
    other = TinyLlama(vocab_size=VOCAB, dim=32, n_layers=3, n_heads=4, n_kv_heads=2)
    with pytest.raises(ValueError, match="do not match the student"):
        export_student(student, other.state_dict(), tmp_path / "hf")
    with pytest.raises(ValueError, match="max_shard_size"):
        export_student(student, student.state_dict(), tmp_path / "hf", max_shard_size="5 apples")
    with pytest.raises(ValueError, match="cannot export a Linear"):
        export_student(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).state_dict(), tmp_path / "x")


def test_callback_exports_at_the_end_of_fit(tmp_path):
    module = DistillationModule(_tiny(), make_models()[1], loss=KDLoss(temperature=2.0))
    trainer = cpu_trainer(max_steps=2, callbacks=[ExportOnFitEnd(str(tmp_path / "hf"))])
    trainer.fit(module, DataLoader(RandomTokens(samples=8), batch_size=4))
    _assert_same_logits(tmp_path / "hf", module.student, VOCAB)


# ------------------------------------------------------------------ the command line
def _cli_config(tmp_path: Path) -> Path:
    words = ["the", "cat", "sat", "on", "mat", "a", "dog"]
    save_tokenizer(tmp_path / "tok", words)  # 10 tokens
    text = tmp_path / "doc.txt"
    text.write_text(" ".join(words[i % 7] for i in range(600)))
    tiny = {"vocab_size": 10, "n_layers": 1, "dim": 16, "n_heads": 2, "n_kv_heads": 1,
            "hidden_dim": 32, "max_seq_len": 32}  # fmt: skip
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 2,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "limit_val_batches": 0,
            "default_root_dir": str(tmp_path / "run"),
        },
        "model": {
            "class_path": "lightning_kd.DistillationModule",
            "init_args": {
                "student": {"class_path": "lightning_kd.TinyLlama", "init_args": tiny},
                "teacher": {
                    "class_path": "lightning_kd.TinyLlama",
                    "init_args": {**tiny, "dim": 32},
                },
            },
        },
        "data": {
            "class_path": "lightning_kd.data.TextDataModule",
            "init_args": {
                "paths": [str(text)],
                "tokenizer": str(tmp_path / "tok"),
                "seq_len": 16,
                "batch_size": 2,
                "cache_dir": str(tmp_path / "cache"),
                "val_fraction": 0.1,
            },
        },
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_export_writes_model_and_tokenizer(tmp_path, capsys):
    from lightning_kd.cli import KDLightningCLI

    config = _cli_config(tmp_path)
    cli = KDLightningCLI(args=["--config", str(config)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.save_checkpoint(tmp_path / "run.ckpt")
    out = tmp_path / "hf"
    args = ["export", "--config", str(config), "--ckpt_path", str(tmp_path / "run.ckpt"),
            "--output_dir", str(out)]  # fmt: skip
    assert main(args) == 0
    assert str(out) in capsys.readouterr().out
    _assert_same_logits(out, cli.model.student, 10)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer.get_vocab() == cli.datamodule.tokenizer.hf_tokenizer.get_vocab()
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id

    assert main(args) == 1  # the directory is not empty now
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


@pytest.mark.parametrize(
    ("make_ckpt", "message"),
    [
        (None, "does not exist"),
        (lambda p: torch.save({"state_dict": {"teacher.x": torch.zeros(1)}}, p), "no student"),
        (lambda p: p.write_bytes(b"not a checkpoint"), "not a readable checkpoint"),
    ],
    ids=["missing", "no-student", "garbage"],
)
def test_cli_export_errors_are_one_line(tmp_path, capsys, make_ckpt, message):
    config = _cli_config(tmp_path)
    ckpt = tmp_path / "bad.ckpt"
    if make_ckpt is not None:
        make_ckpt(ckpt)
    code = main(["export", "--config", str(config), "--ckpt_path", str(ckpt),
                 "--output_dir", str(tmp_path / "hf")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("lightning-kd: error:") and message in err and "\n" not in err


# ------------------------------------------------------------------ distributed
def _gather_and_export(rank: int, world_size: int, dp: int, out: str) -> None:
    """The live path of ExportOnFitEnd: a TinyLlama under TP (and FSDP2 with dp > 1), its
    full weights gathered by every rank, written by rank 0."""
    reference = _tiny()
    model = parallelize(_tiny(), dp, world_size // dp)
    state = gather_full_state(model, keep=rank == 0)
    if rank == 0:
        export_student(model, state, out)
        _assert_same_logits(Path(out), reference, VOCAB)
    else:
        assert state == {}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("dp", [1, 2], ids=["tp2", "fsdp2"])
def test_live_sharded_student_is_gathered_and_exported(tmp_path, dp):
    run_workers(_gather_and_export, 2, dp, str(tmp_path / f"hf{dp}"))
    assert (tmp_path / f"hf{dp}" / "model.safetensors").is_file()


CHECKPOINT_CASES = {
    "tiny-tp2": ("tiny", ["--tp", "2"]),
    "llama-tp2": ("llama", ["--tp", "2"]),
    "tiny-fsdp2": ("tiny", ["--dp", "2", "--batch-size", "2"]),
}


@pytest.fixture(scope="module")
def checkpoint_runs(tmp_path_factory):
    """fit_run.py on 2 processes writing a distributed checkpoint and the full student, each
    case in its own folder; all of them in one launch."""
    runs = fit_runs(tmp_path_factory.mktemp("export_fits"))
    for name, (family, layout) in CHECKPOINT_CASES.items():
        folder = runs.directory / name
        runs.add(name, "--devices", "2", *layout, "--steps", "3", "--samples", "12",
                 "--family", family, "--ckpt-dir", str(folder / "ckpt"), "--ckpt-every", "3",
                 "--save-student", str(runs.directory / f"{name}-student.pt"))  # fmt: skip
    return runs


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHECKPOINT_CASES))
def test_distributed_checkpoint_exports_the_trained_student(tmp_path, checkpoint_runs, name):
    """fit_run.py on 2 processes (TP=2, or FSDP2 over DP=2) writes a distributed checkpoint
    (DCP shards) and the full student; the export consolidates the checkpoint with DCP on one
    process."""
    family = CHECKPOINT_CASES[name][0]
    checkpoint_runs[name]
    ckpt_dir = checkpoint_runs.directory / name / "ckpt"
    ckpt = ckpt_dir / "epoch=0-step=3.ckpt"
    assert ckpt.is_dir()
    student, teacher = make_models() if family == "tiny" else make_hf_models(family)
    out = export_checkpoint(DistillationModule(student, teacher), ckpt, tmp_path / "hf")
    trained = make_models()[0] if family == "tiny" else make_hf_models(family)[0]
    student_file = checkpoint_runs.directory / f"{name}-student.pt"
    trained.load_state_dict(torch.load(student_file, weights_only=True))
    _assert_same_logits(out, trained, VOCAB)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["model_type"] == ("llama" if family == "tiny" else family)
