"""Tests of lightning_kd.data: tokenizer, corpus, datamodule batches, DP sharding, and exact
mid-epoch resumption through a real Lightning Trainer."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_kd.data import (
    ByteTokenizer,
    ResumableDataLoader,
    ResumableSampler,
    TextDataModule,
    generate_corpus,
    read_documents,
)
from lightning_kd.data.corpus import expand_paths
from lightning_kd.data.text_datamodule import DocumentSequences

TOK = ByteTokenizer()


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha1(tensor.contiguous().numpy().tobytes()).hexdigest()[:12]


def split_documents(stream: torch.Tensor) -> list[str]:
    """The documents of an EOS-separated token stream."""
    text = TOK.decode([t if t != TOK.eos_id else 0 for t in stream.tolist()])
    assert text.endswith("\x00")
    return text[:-1].split("\x00")


def small_dm(tmp_path: Path, **kwargs) -> TextDataModule:
    args = dict(synthetic_chars=4000, seq_len=16, batch_size=4, cache_dir=str(tmp_path / "c"))
    args.update(kwargs)
    return TextDataModule(**args)


def fake_trainer(num_replicas: int, rank: int) -> SimpleNamespace:
    # What Trainer.distributed_sampler_kwargs returns under a ParallelStrategy (for
    # ModelParallelStrategy: the data-parallel size and rank).
    return SimpleNamespace(distributed_sampler_kwargs={"num_replicas": num_replicas, "rank": rank})


# --------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_and_specials():
    text = "Hello, wörld! 你好 🙂\n\ttabs"
    ids = TOK.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert TOK.decode(ids) == text
    assert (TOK.vocab_size, TOK.eos_id, TOK.pad_id) == (258, 256, 257)
    assert TOK.decode([TOK.eos_id, *TOK.encode("ab"), TOK.pad_id, TOK.eos_id]) == "ab"
    assert TOK.decode(torch.tensor(ids)) == text
    assert TOK.decode(TOK.encode("é")[:1]) == "\ufffd"  # cut multi-byte char: replaced
    with pytest.raises(ValueError, match="outside"):
        TOK.decode([258])


# --------------------------------------------------------------------------------- corpus
def test_generate_corpus_is_deterministic_and_pinned():
    stories = generate_corpus(20000, seed=7)
    assert stories == generate_corpus(20000, seed=7)
    assert stories != generate_corpus(20000, seed=8)
    assert sum(map(len, stories)) >= 20000
    assert sum(map(len, stories[:-1])) < 20000  # stops once the target is reached
    # Pinned: the same text on every machine (a grammar change must bump CORPUS_VERSION).
    pinned = "36c22c5914aa4f654b70bb6bf81f24a43ac32470e487f888216ad843aa0ebc74"
    assert hashlib.sha256("\x00".join(stories).encode()).hexdigest() == pinned
    with pytest.raises(ValueError, match="num_chars"):
        generate_corpus(0)


def test_generated_corpus_has_structure_and_agreement():
    text = " ".join(generate_corpus(200_000, seed=3))
    assert text.isascii()
    # articles agree with the next word
    assert not re.search(r"\b[Aa] [aeiouAEIOU]", text)
    assert not re.search(r"\b[Aa]n [^aeiouAEIOU]", text)
    # subject-verb and determiner agreement, in narration and dialogue
    assert not re.search(r"\b([Hh]e|[Ss]he|[Ii]t) were\b|\b[Tt]hey (was|is)\b", text)
    assert not re.search(r"\b[Tt]hese \w+ is\b|\b[Tt]his \w+s are\b", text)
    assert re.search(r"\bThey were (two|three|four|some) [a-z ]+s!", text)  # plurals
    assert re.search(r"\bIt was an? \w+ \w+!", text)
    # dialogue, with sentence-initial capitals inside quotes
    assert text.count('" said ') + text.count('," said ') > 100
    assert not re.search(r'(^|[.!?] )"[a-z]', text)
    assert not re.search(r"[.!?] [a-z]", text)
    # variety: many distinct sentences, and a small vocabulary
    sentences = set(re.split(r"(?<=[.!?]) ", text))
    assert len(sentences) > 2000
    assert len(set(re.findall(r"[A-Za-z]+", text))) < 600


def test_read_documents_txt_jsonl_globs(tmp_path):
    (tmp_path / "b.txt").write_text("second file", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first ✓", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    lines = [{"text": "j1", "id": 1}, {"text": "j2"}]
    (tmp_path / "sub" / "d.jsonl").write_text(
        "\n".join(json.dumps(r) for r in lines) + "\n\n", encoding="utf-8"
    )
    (tmp_path / "sub" / "c.jsonl").write_text(json.dumps({"body": "c"}) + "\n")
    assert list(read_documents([str(tmp_path / "*.txt")])) == ["first ✓", "second file"]
    docs = list(read_documents([str(tmp_path / "sub" / "d.jsonl"), str(tmp_path / "a.txt")]))
    assert docs == ["j1", "j2", "first ✓"]
    # globs are sorted, a file named twice is read once, text_field picks the key
    docs = list(read_documents([str(tmp_path / "**" / "c.jsonl")], text_field="body"))
    assert docs == ["c"]
    assert list(read_documents([str(tmp_path / "b.txt"), str(tmp_path / "*.txt")])) == [
        "second file",
        "first ✓",
    ]
    # a directory: its txt/jsonl files, recursively and sorted; other files are ignored
    (tmp_path / "notes.md").write_text("not a document")
    names = [p.relative_to(tmp_path).as_posix() for p in expand_paths([str(tmp_path)])]
    assert names == ["a.txt", "b.txt", "sub/c.jsonl", "sub/d.jsonl"]


def test_read_documents_errors(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match=re.escape(repr(missing))):
        read_documents([missing])  # raised at the call, not at the first document
    with pytest.raises(ValueError, match=r"\*\.jsonl"):
        read_documents([str(tmp_path / "*.jsonl")])
    with pytest.raises(ValueError, match="empty"):
        read_documents([])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported extension"):
        read_documents([str(tmp_path / "x.csv")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:2") + ".*'text'"):
        list(read_documents([str(bad)]))
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=re.escape(f"{bad}:2") + ".*invalid JSON"):
        list(read_documents([str(bad)]))
    bad.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match=re.escape(f"{bad}:1") + ".*expected a string"):
        list(read_documents([str(bad)]))


# --------------------------------------------------------------------------------- datamodule
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_len": 0}, "seq_len must be an int >= 1"),
        ({"batch_size": 2.0}, "batch_size must be an int >= 1"),
        ({"val_fraction": 1.0}, r"val_fraction must be a float in \[0, 1\)"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"packing": "yes"}, "packing must be a bool"),
        ({"synthetic_chars": 0}, "synthetic_chars"),
        ({"num_workers": -1}, "num_workers must be an int >= 0"),
        ({"ignore_index": 5}, r"ignore_index=5 is a token id.*\[0, 258\)"),
        ({"ignore_index": 257}, "is a token id"),
        ({"text_field": ""}, "text_field"),
        ({"paths": "a.txt"}, "paths must be a list"),
        ({"paths": ["/definitely/not/here.txt"]}, "/definitely/not/here.txt"),
    ],
)
def test_datamodule_validates_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_dm(tmp_path, **kwargs)


def test_packed_batches_shapes_and_label_shift(tmp_path):
    dm = small_dm(tmp_path, val_fraction=0.1)
    assert dm.vocab_size == 258 and isinstance(dm.tokenizer, ByteTokenizer)  # before setup
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "index"}
    for key in ("input_ids", "labels"):
        assert batch[key].shape == (4, 16) and batch[key].dtype == torch.int64
    assert batch["index"].shape == (4,) and batch["index"].dtype == torch.int64
    for i, index in enumerate(batch["index"].tolist()):  # the sequence's index in its split
        assert torch.equal(dm.train_dataset[index]["input_ids"], batch["input_ids"][i])
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    assert int(batch["input_ids"].max()) < 257 and int(batch["input_ids"].min()) >= 0
    ds = dm.train_dataset
    for i in range(len(ds) - 1):  # the last label is the first token of the next window
        assert ds[i]["labels"][-1] == ds[i + 1]["input_ids"][0]
    # windows are real text: document boundaries are EOS, no padding, no ignored labels
    stream = torch.cat([ds[i]["input_ids"] for i in range(len(ds))])
    assert (stream == TOK.eos_id).sum() >= 3 and not (stream == TOK.pad_id).any()
    pieces = TOK.decode(stream.tolist())
    assert "Once upon a time" in pieces or "There was once" in pieces or " was a" in pieces
    # train and val hold whole documents, disjoint, together the whole corpus
    val = dm.val_dataset
    assert len(val) >= 1 and len(dm.val_dataloader()) >= 1
    train_docs, val_docs = split_documents(ds.stream), split_documents(val.stream)
    assert train_docs and val_docs and not set(train_docs) & set(val_docs)
    assert sorted(train_docs + val_docs) == sorted(generate_corpus(4000, seed=0))


def test_unpacked_batches_pad_and_ignore_index_exactly(tmp_path):
    docs = ["short", "a bit longer document", "x" * 40, "é!", ""]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"t": d}) for d in docs), encoding="utf-8")
    seq_len = 12
    dm = small_dm(
        tmp_path,
        paths=[str(path)],
        text_field="t",
        seq_len=seq_len,
        batch_size=2,
        packing=False,
        val_fraction=0.0,
        ignore_index=-7,
    )
    dm.setup("fit")
    ds = dm.train_dataset
    assert len(ds) == 4  # the empty document is skipped
    for i, doc in enumerate(d for d in docs if d):
        window = (TOK.encode(doc) + [TOK.eos_id] + [TOK.pad_id] * (seq_len + 1))[: seq_len + 1]
        expected_labels = [-7 if t == TOK.pad_id else t for t in window[1:]]
        item = ds[i]
        assert item["input_ids"].tolist() == window[:-1]
        assert item["labels"].tolist() == expected_labels
    # the long document is truncated (no EOS, no ignored label); the short one is padded
    assert (ds[2]["labels"] != -7).all() and (ds[0]["labels"] == -7).sum() == seq_len - 5
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].shape == (2, seq_len) and batch["labels"].dtype == torch.int64
    # in the batch too: a label is ignored exactly where its target (the next input) is PAD
    ignored = batch["labels"] == -7
    assert ignored.any() and torch.equal(ignored[:, :-1], batch["input_ids"][:, 1:] == TOK.pad_id)


def test_unpacked_padding_is_masked_by_position_when_pad_is_eos():
    """HF tokenizers without a PAD token pad with EOS: the document's own EOS stays a target."""
    eos = 9
    tokens = torch.tensor([3, 4, eos, 5, 6, 7, 8, eos])
    ds = DocumentSequences(tokens, torch.tensor([0, 3, 8]), torch.tensor([0, 1]), seq_len=5,
                           pad_id=eos, ignore_index=-100)  # fmt: skip
    assert ds[0]["input_ids"].tolist() == [3, 4, eos, eos, eos]
    assert ds[0]["labels"].tolist() == [4, eos, -100, -100, -100]
    assert ds[1]["labels"].tolist() == [6, 7, 8, eos, -100]


def test_unpacked_split_needs_two_documents(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("only one document here")
    dm = small_dm(tmp_path, paths=[str(path)], packing=False, val_fraction=0.1)
    with pytest.raises(ValueError, match="at least 2 documents"):
        dm.setup("fit")
    # with packing the single document is split by position
    dm = small_dm(tmp_path, paths=[str(path)], seq_len=4, batch_size=1, val_fraction=0.25)
    dm.setup("fit")
    assert len(dm.train_dataset) >= 3 and len(dm.val_dataset) >= 1


def test_datamodules_are_deterministic(tmp_path):
    batches = []
    for name in ("one", "two"):
        dm = small_dm(tmp_path, cache_dir=str(tmp_path / name))
        dm.prepare_data()
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(1)
        batches.append(
            [digest(b["input_ids"]) for b in loader]
            + [digest(b["input_ids"]) for b in dm.val_dataloader()]
        )
    assert batches[0] == batches[1]
    assert len(set(batches[0])) == len(batches[0])
    # another seed: another order
    dm = small_dm(tmp_path, seed=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    assert [digest(b["input_ids"]) for b in loader] != batches[0][: len(loader)]


def test_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text("some text " * 50)
    dm = small_dm(tmp_path, paths=[str(text)])
    dm.prepare_data()
    files = sorted((tmp_path / "c").iterdir())
    assert files == [dm.cache_path] and files[0].name.startswith("tokens-")
    # same inputs, other sequence settings: the same cache, read without tokenising
    monkeypatch.setattr(
        TextDataModule, "_tokenize", lambda *a: pytest.fail("tokenised a cached corpus")
    )
    again = small_dm(tmp_path, paths=[str(text)], seq_len=8, packing=False, val_fraction=0.0)
    assert again.cache_path == dm.cache_path
    again.prepare_data()
    again.setup("fit")
    assert len(again.train_dataset) == 1
    # other inputs: another cache file
    cached = dm.cache_path
    text.write_text("other text " * 60)
    assert small_dm(tmp_path, paths=[str(text)]).cache_path != cached
    assert small_dm(tmp_path, paths=[str(text)], text_field="body").cache_path != cached
    assert small_dm(tmp_path, synthetic_chars=999).cache_path != small_dm(tmp_path).cache_path


def test_train_loader_needs_enough_sequences(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("x" * 300)  # 4 sequences of 64 tokens
    dm = small_dm(tmp_path, paths=[str(text)], seq_len=64, batch_size=8, val_fraction=0.0)
    with pytest.raises(ValueError, match="fewer than batch_size=8"):
        dm.train_dataloader()


# --------------------------------------------------------------------------------- sharding
def _epoch_indices(dm: TextDataModule, epoch: int) -> list[int]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return list(loader.sampler)


def test_dp_ranks_get_disjoint_shards(tmp_path):
    per_rank = []
    for rank in (0, 1):
        dm = small_dm(tmp_path)
        dm.trainer = fake_trainer(2, rank)
        per_rank.append(_epoch_indices(dm, epoch=3))
        again = small_dm(tmp_path)
        again.trainer = fake_trainer(2, rank)
        assert _epoch_indices(again, epoch=3) == per_rank[-1]  # same rank, same data
        loader = dm.train_dataloader()
        first = next(iter(loader))["input_ids"]
        second = next(iter(again.train_dataloader()))["input_ids"]
        assert torch.equal(first, second)
    n = len(dm.train_dataset)
    half = n // 2
    assert len(per_rank[0]) == len(per_rank[1]) == (n + 1) // 2
    assert not set(per_rank[0][:half]) & set(per_rank[1][:half])
    assert set(per_rank[0]) | set(per_rank[1]) == set(range(n))
    # one rank alone sees the whole epoch, in the order the two ranks interleave
    single = small_dm(tmp_path)
    whole = _epoch_indices(single, epoch=3)
    assert whole[: 2 * half : 2] == per_rank[0][:half]
    assert whole[1 : 2 * half : 2] == per_rank[1][:half]
    # validation: sequential, disjoint, the same number of batches on every rank
    val = []
    for rank in (0, 1):
        dm = small_dm(tmp_path, val_fraction=0.3)
        dm.trainer = fake_trainer(2, rank)
        loader = dm.val_dataloader()
        val.append(list(loader.sampler))
    assert len(val[0]) == len(val[1]) > 0 and not set(val[0]) & set(val[1])
    assert sorted(val[0] + val[1]) == list(range(len(val[0]) * 2))


# --------------------------------------------------------------------------------- sampler
def test_loader_resumes_exactly_with_worker_prefetch():
    data = torch.arange(100).unsqueeze(1)
    reference_sampler = ResumableSampler(data, num_replicas=1, rank=0, seed=5)
    reference_sampler.set_epoch(2)
    reference = [b.flatten().tolist() for b in ResumableDataLoader(data, 8, reference_sampler)]

    sampler = ResumableSampler(data, num_replicas=1, rank=0, seed=5)
    loader = ResumableDataLoader(data, 8, sampler, num_workers=2)
    sampler.set_epoch(2)
    iterator = iter(loader)
    seen = [next(iterator).flatten().tolist() for _ in range(3)]
    state = loader.state_dict()
    # the workers have fetched indices ahead; the state counts only yielded batches
    assert sampler.state_dict()["samples_seen"] > 24
    assert state["samples_seen"] == 24 and state["epoch"] == 2
    del iterator

    fresh_sampler = ResumableSampler(data, num_replicas=1, rank=0, seed=5)
    fresh = ResumableDataLoader(data, 8, fresh_sampler)
    fresh.load_state_dict(state)
    fresh_sampler.set_epoch(2)  # Lightning sets the same epoch again: position kept
    rest = [b.flatten().tolist() for b in fresh]
    assert seen + rest == reference
    assert len(fresh) == len(reference)  # len() stays the whole epoch
    # after the epoch, the next epoch starts from its beginning
    fresh_sampler.set_epoch(3)
    assert fresh.state_dict()["samples_seen"] == 0
    assert len(list(fresh)) == len(reference)


def test_sampler_state_is_rank_independent_and_elastic():
    data = list(range(40))
    samplers = [ResumableSampler(data, num_replicas=2, rank=r, seed=1) for r in (0, 1)]
    consumed = []
    for sampler in samplers:
        sampler.set_epoch(4)
        iterator = iter(sampler)
        consumed += [next(iterator) for _ in range(6)]
    states = [s.state_dict() for s in samplers]
    assert states[0] == states[1] and states[0]["samples_seen"] == 12
    # resume on one rank: exactly the samples not yet seen, in the global order
    single = ResumableSampler(data, num_replicas=1, rank=0, seed=1)
    single.load_state_dict(states[0])
    rest = list(single)
    reference = ResumableSampler(data, num_replicas=1, rank=0, seed=1)
    reference.set_epoch(4)
    assert rest == list(reference)[12:]
    assert sorted(consumed + rest) == data
    # positions that do not split over the ranks, or another dataset, are refused
    with pytest.raises(ValueError, match="split evenly over 5"):
        ResumableSampler(data, num_replicas=5, rank=0, seed=1).load_state_dict(states[0])
    with pytest.raises(ValueError, match="dataset_len=40"):
        ResumableSampler(data[:-1], num_replicas=2, rank=0, seed=1).load_state_dict(states[0])
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(data, num_replicas=2, rank=0, seed=2).load_state_dict(states[0])


# --------------------------------------------------------------------------------- trainer
class BatchRecorder(L.LightningModule):
    """Records a digest of every training batch; its parameter never changes."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[str] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(digest(batch["input_ids"]))
        return self.weight * batch["input_ids"].float().mean()

    def validation_step(self, batch, batch_idx):
        self.log("val", batch["input_ids"].float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def run_fit(tmp_path, max_steps, *, every=None, ckpt_path=None, num_workers=0) -> list[str]:
    module = BatchRecorder()
    callbacks = []
    if every:
        callbacks.append(ModelCheckpoint(tmp_path / f"ckpt{max_steps}", every_n_train_steps=every))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=bool(every),
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=2,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    dm = TextDataModule(
        synthetic_chars=900,
        seq_len=16,
        batch_size=8,
        val_fraction=0.1,
        cache_dir=str(tmp_path / "cache"),
        num_workers=num_workers,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    assert not [w for w in caught if "not resumable" in str(w.message)]
    return module.seen


@pytest.mark.parametrize(
    ("stops", "num_workers"),
    [((3, 5, 8), 0), ((5, 7), 1)],
    ids=["mid-epoch,epoch-end,next-epoch", "workers"],
)
def test_trainer_resume_sees_the_uninterrupted_batch_sequence(tmp_path, stops, num_workers):
    total = 12
    full = run_fit(tmp_path, total, num_workers=num_workers)
    dm = TextDataModule(
        synthetic_chars=900, seq_len=16, batch_size=8, val_fraction=0.1, cache_dir=str(tmp_path)
    )
    per_epoch = len(dm.train_dataloader())
    assert per_epoch == 5  # the stops below cover mid-epoch, epoch end and the next epoch
    assert len(full) == total and len(set(full)) == total  # every batch distinct
    for stop in stops:
        before = run_fit(tmp_path, stop, every=stop, num_workers=num_workers)
        (ckpt,) = (tmp_path / f"ckpt{stop}").glob("*.ckpt")
        assert f"step={stop}" in ckpt.name and f"epoch={(stop - 1) // per_epoch}" in ckpt.name
        after = run_fit(tmp_path, total, ckpt_path=str(ckpt), num_workers=num_workers)
        assert before == full[:stop]
        assert after == full[stop:], f"resumed at step {stop}"
