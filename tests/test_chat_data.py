"""ChatDataModule: record formats, chat templates, offset-based completion masks (byte and a
local BPE tokenizer), packing with position ids, overlong and malformed records, the embedded
instruction set, resumable and data-parallel loading, and YAML instantiation."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from lightning_kd.data import ByteTokenizer, ChatDataModule, ChatEncoder, generate_instructions
from lightning_kd.data.chat_records import RecordFields, read_chat_records
from lightning_kd.data.chat_template import BYTE_EOS_TEXT, targets_from_offsets
from lightning_kd.data.tokenizer import HFTokenizer

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Where did Tom go?"},
    {"role": "assistant", "content": "The answer is the park."},
    {"role": "user", "content": "And then?"},
    {"role": "assistant", "content": "Then Tom went home."},
]
IGNORE = -100


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def conversations(n: int) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"Question {i}?"},
                      {"role": "assistant", "content": f"Answer number {i}."}]}
        for i in range(n)
    ]  # fmt: skip


def chat_dm(tmp_path: Path, **kwargs) -> ChatDataModule:
    args = dict(synthetic_conversations=60, seq_len=512, batch_size=4, val_fraction=0.1,
                cache_dir=str(tmp_path / "cache"))  # fmt: skip
    args.update(kwargs)
    return ChatDataModule(**args)


def fake_trainer(num_replicas: int, rank: int) -> SimpleNamespace:
    return SimpleNamespace(distributed_sampler_kwargs={"num_replicas": num_replicas, "rank": rank})


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> str:
    """A byte-level BPE tokenizer trained here, without pre-tokenizer splits, so merges cross
    the boundary between the role marker's newline and the assistant's first word."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    text = ["assistant\nThe answer is the park.", "assistant\nThen Tom went home.",
            "user\nWhere did Tom go? And then?", "system\nBe kind."] * 30  # fmt: skip
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(text, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )  # fmt: skip
    fast.chat_template = CHATML
    path = tmp_path_factory.mktemp("bpe")
    fast.save_pretrained(path)
    return str(path)


# --------------------------------------------------------------------------------- records
def test_formats_jsonl_json_parquet_and_prompt_completion(tmp_path):
    records = conversations(3)
    write_jsonl(tmp_path / "a.jsonl", records[:1])
    (tmp_path / "b.json").write_text(json.dumps(records[1:2]))
    (tmp_path / "c.json").write_text(json.dumps({"data": records[2:]}))
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    fields = RecordFields()
    read = list(read_chat_records([str(tmp_path / "*.json*"), str(tmp_path / "d.parquet")], fields))
    assert [m for _, m in read] == [r["messages"] for r in records] * 2
    assert [w.rsplit("/", 1)[-1] for w, _ in read][:4] == ["a.jsonl:1", "b.json[0]", "c.json[0]",
                                                          "d.parquet[0]"]  # fmt: skip
    # prompt/completion with custom field names; "auto" decides per record
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"q": "Hi?", "a": "Hello."}, records[0]])
    custom = RecordFields(prompt_field="q", completion_field="a")
    (_, first), (_, second) = read_chat_records([str(pairs)], custom)
    assert first == [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    assert second == records[0]["messages"]
    forced = list(read_chat_records([str(pairs)], RecordFields("prompt_completion", "m", "q", "a")))
    assert isinstance(forced[1][1], ValueError) and "'q' and 'a'" in str(forced[1][1])


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r"lightning_kd\[data\]"):
        list(read_chat_records([str(tmp_path / "d.parquet")], RecordFields()))
    with pytest.raises(ValueError, match="unsupported extension"):
        (tmp_path / "x.csv").write_text("a")
        ChatDataModule(paths=[str(tmp_path / "x.csv")])


def test_malformed_records_are_counted_or_strict_errors(tmp_path, caplog):
    good = conversations(4)
    path = tmp_path / "bad.jsonl"
    bad_role = {"messages": [{"role": "bot", "content": "x"}]}
    blank = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}
    lines = [json.dumps(good[0]), "{not json", json.dumps(bad_role), "", json.dumps(blank),
             json.dumps([1]), json.dumps(good[1])]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.INFO, logger="lightning_kd.data"):
        dm = chat_dm(tmp_path, paths=[str(path)], val_fraction=0.0, batch_size=1)
        dm.setup()
    assert dm.read_stats.kept == 2 and dm.read_stats.skipped == {"malformed": 3, "empty": 1}
    assert "2 conversations kept, skipped: 1 empty, 3 malformed" in caplog.text
    assert "bad.jsonl:2: malformed: invalid JSON" not in caplog.text  # kind is in the counts
    assert "bad.jsonl:2: invalid JSON" in caplog.text
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        chat_dm(tmp_path, paths=[str(path)], strict=True).prepare_data()
    array = tmp_path / "bad.json"
    array.write_text(json.dumps([good[0], good[1], {"messages": "hi"}]))
    with pytest.raises(ValueError, match=r"bad\.json\[2\]: 'messages' must be a list"):
        chat_dm(tmp_path, paths=[str(array)], strict=True).prepare_data()
    write_jsonl(tmp_path / "none.jsonl", [{"x": 1}])
    with pytest.raises(ValueError, match="no usable conversation"):
        chat_dm(tmp_path, paths=[str(tmp_path / "none.jsonl")]).prepare_data()


# --------------------------------------------------------------------------------- masks
def _target_text(encoder: ChatEncoder, messages) -> tuple[str, list[str], list[bool]]:
    text = encoder.render(messages)
    _ids, offsets = encoder.tokenize(text)
    _, targets = encoder.encode(messages)
    return text, [text[a:b] for a, b in offsets], targets


def test_byte_template_targets_exactly_the_assistant_content_and_eos():
    encoder = ChatEncoder(ByteTokenizer())
    text = encoder.render(CONVERSATION)
    assert text.startswith("<|system|>\nBe kind.<|eos|><|user|>\nWhere did Tom go?<|eos|>")
    ids, targets = encoder.encode(CONVERSATION)
    assert ids.count(256) == len(CONVERSATION) and len(ids) == len(targets)
    picked = [i for i, t in zip(ids, targets, strict=True) if t]
    expected = []
    for message in CONVERSATION[2::2]:
        expected += [*message["content"].encode(), 256]
    assert picked == expected
    assert encoder.render(CONVERSATION[:2], add_generation_prompt=True).endswith("<|assistant|>\n")
    # a custom template; non-ASCII content keeps byte offsets per character
    custom = ChatEncoder(ByteTokenizer(), "{% for m in messages %}{{ m['role'] }}: "
                         "{{ m['content'] }}{{ eos_token }}{% endfor %}")  # fmt: skip
    ids, targets = custom.encode([{"role": "user", "content": "é?"},
                                  {"role": "assistant", "content": "né"}])  # fmt: skip
    assert [i for i, t in zip(ids, targets, strict=True) if t] == [*"né".encode(), 256]
    assert BYTE_EOS_TEXT not in ByteTokenizer().decode(ids)


def test_targets_from_offsets_overlap_rule():
    offsets = [(0, 2), (2, 5), (5, 6), (6, 6), (6, 9), (9, 12)]
    # a zero-width token counts as covering its start character: (6, 6) is outside (4, 6)
    flags = targets_from_offsets(offsets, [(4, 6), (10, 11)])
    assert flags == [False, True, True, False, False, True]
    assert targets_from_offsets(offsets, [(6, 7)]) == [False, False, False, True, True, False]


def test_bpe_mask_multi_turn_and_merge_boundary(bpe_dir):
    tokenizer = HFTokenizer(bpe_dir)
    encoder, hf = ChatEncoder(tokenizer), tokenizer.hf_tokenizer
    text, pieces, targets = _target_text(encoder, CONVERSATION)
    assert text == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                           for m in CONVERSATION)  # fmt: skip
    # the expected spans, from the template's known layout
    spans, position = [], 0
    for message in CONVERSATION:
        head = f"<|im_start|>{message['role']}\n"
        start = position + len(head)
        end = start + len(message["content"]) + len("<|im_end|>")
        if message["role"] == "assistant":
            spans.append((start, end))
        position = end + 1
    _, offsets = encoder.tokenize(text)
    expected = [any(a < s_end and max(b, a + 1) > s for s, s_end in spans) for a, b in offsets]
    assert targets == expected
    # each assistant turn is one run of target tokens: its content and <|im_end|>, after at most
    # one token that BPE merged across the boundary with the role marker
    runs, current = [], []
    for (a, b), is_target in zip(offsets, targets, strict=True):
        if is_target:
            current.append((a, b))
        elif current:
            runs, current = [*runs, current], []
    assert len(runs) == 2
    for run, (start, end), message in zip(runs, spans, CONVERSATION[2::2], strict=True):
        assert text[start:end] == message["content"] + "<|im_end|>"
        assert run[-1][1] == end and run[0][0] <= start and run[1][0] >= start
        assert "<|im_start|>assistant\n".endswith(text[run[0][0] : start])
    # the BPE merged the newline of the role marker into the first answer token: a token that
    # straddles the boundary, which tokenising the pieces separately would not produce
    assert any(run[0][0] < start for run, (start, _) in zip(runs, spans, strict=True)), pieces
    head = "<|im_start|>assistant\n"
    separate = hf.encode(head, add_special_tokens=False) + hf.encode(
        "The answer is the park.", add_special_tokens=False
    )
    joint = hf.encode(head + "The answer is the park.", add_special_tokens=False)
    assert separate != joint
    # no system or user character is covered by a target token
    for (a, b), is_target in zip(offsets, targets, strict=True):
        if is_target:
            assert any(a < e and b > s for s, e in spans)


def test_hf_tokenizer_needs_a_chat_template(tmp_path, bpe_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bpe_dir)
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "plain")
    (tmp_path / "plain" / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="no chat template"):
        ChatDataModule(tokenizer=str(tmp_path / "plain"))
    dm = ChatDataModule(tokenizer=str(tmp_path / "plain"), chat_template=CHATML)
    assert dm.encoder.render(CONVERSATION[1:3]).startswith("<|im_start|>user\n")


# --------------------------------------------------------------------------------- packing
def _documents_of(dataset, pad_id: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(inputs, labels) of every document in every row, split at position_ids == 0."""
    found = []
    for row in (dataset[i] for i in range(len(dataset))):
        starts = [*torch.nonzero(row["position_ids"] == 0).flatten().tolist(), len(row["labels"])]
        for begin, end in itertools.pairwise(starts):
            assert torch.equal(row["position_ids"][begin:end], torch.arange(end - begin))
            inputs, labels = row["input_ids"][begin:end], row["labels"][begin:end]
            if (inputs == pad_id).all() and end == len(row["labels"]):
                assert (labels == IGNORE).all()  # the padding block: no target
                continue
            found.append((tuple(inputs.tolist()), tuple(labels.tolist())))
    return found


@pytest.mark.parametrize("packing", [True, False])
def test_rows_hold_whole_documents_and_every_target_once(tmp_path, packing):
    dm = chat_dm(tmp_path, seq_len=1100, packing=packing, synthetic_conversations=40,
                 overlong="drop")  # fmt: skip
    dm.setup()
    expected = []
    for messages in generate_instructions(40, seed=0):
        ids, targets = dm.encoder.encode(messages)
        if len(ids) <= 1101:
            labels = [i if t else IGNORE for i, t in zip(ids[1:], targets[1:], strict=True)]
            expected.append((tuple(ids[:-1]), tuple(labels)))
    found = _documents_of(dm.train_dataset, dm.tokenizer.pad_id)
    found += _documents_of(dm.val_dataset, dm.tokenizer.pad_id)
    assert Counter(found) == Counter(expected) and len(found) == 40
    rows = len(dm.train_dataset) + len(dm.val_dataset)
    assert (rows < len(found)) if packing else (rows == len(found))
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "position_ids", "index"}
    assert all(batch[k].shape == (4, 1100) and batch[k].dtype == torch.int64
               for k in ("input_ids", "labels", "position_ids"))  # fmt: skip
    assert batch["index"].shape == (4,) and batch["index"].dtype == torch.int64
    for i, index in enumerate(batch["index"].tolist()):  # the row's index in its split
        assert torch.equal(dm.train_dataset[index]["labels"], batch["labels"][i])


def test_truncate_keeps_the_start_and_drop_counts(tmp_path, caplog):
    # byte template: 27 tokens + the completion; seq_len 64 holds documents of <= 65 tokens
    records = [{"prompt": "Q?", "completion": "A" * n} for n in (2, 60, 2, 80)]
    records.append({"prompt": "Q" * 80, "completion": "late answer"})  # answer cut off entirely
    path = write_jsonl(tmp_path / "pc.jsonl", records)
    with caplog.at_level(logging.INFO, logger="lightning_kd.data"):
        dm = chat_dm(tmp_path, paths=[str(path)], seq_len=64, val_fraction=0.0, batch_size=1)
        dm.setup()
    assert "2 truncated, 0 dropped; 1 dropped without targets" in caplog.text
    ids, _ = dm.encoder.encode([{"role": "user", "content": "Q?"},
                                {"role": "assistant", "content": "A" * 60}])  # fmt: skip
    rows = [dm.train_dataset[i] for i in range(len(dm.train_dataset))]
    assert len(ids) > 65 and any(row["input_ids"].tolist() == ids[:64] for row in rows)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightning_kd.data"):
        dropped = chat_dm(tmp_path, paths=[str(path)], seq_len=64, val_fraction=0.0,
                          batch_size=1, overlong="drop")  # fmt: skip
        dropped.setup()
    assert "0 truncated, 3 dropped; 0 dropped without targets" in caplog.text
    assert len(dropped.train_dataset) == 1  # the two short ones share one row
    row = dropped.train_dataset[0]
    assert int((row["position_ids"] == 0).sum()) == 3  # two documents and the padding


def test_train_on_all_tokens(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", conversations(2))
    kwargs = dict(paths=[str(path)], seq_len=128, val_fraction=0.0, batch_size=1, packing=False)
    masked, full = (chat_dm(tmp_path, **kwargs, train_on_all_tokens=v) for v in (False, True))
    assert masked.cache_path == full.cache_path
    m, f = masked.train_dataset[0], full.train_dataset[0]
    real = m["input_ids"] != masked.tokenizer.pad_id
    assert int((m["labels"] != IGNORE).sum()) == len("Answer number 0.") + 1
    assert torch.equal(f["labels"][real], torch.cat([m["input_ids"][real][1:],
                                                     torch.tensor([256])]))  # fmt: skip
    assert (f["labels"][~real] == IGNORE).all()


# --------------------------------------------------------------------------------- default
def test_embedded_instructions_are_deterministic_and_answerable():
    first = generate_instructions(200, seed=0)
    assert first == generate_instructions(200, seed=0) != generate_instructions(200, seed=1)
    digest = hashlib.sha256(json.dumps(first).encode()).hexdigest()[:16]
    assert digest == PINNED_INSTRUCTIONS, digest
    roles = Counter(m[0]["role"] for m in first)
    assert 40 < roles["system"] < 110 and any(len(m) >= 6 for m in first)
    for messages in first:
        story = next(m["content"] for m in messages if m["role"] == "user")
        for answer in (m["content"] for m in messages if m["role"] == "assistant"):
            names = [w.strip(".,") for w in answer.split() if w[0].isupper()][1:]
            assert all(n in story for n in names), (answer, story)


PINNED_INSTRUCTIONS = "c81b318c1190daf1"


# --------------------------------------------------------------------------------- loaders
def test_loader_resumes_mid_epoch_and_dp_shards(tmp_path):
    dm = chat_dm(tmp_path, seq_len=1024, synthetic_conversations=80, batch_size=2)
    reference = dm.train_dataloader()
    reference.sampler.set_epoch(1)
    full = [b["input_ids"] for b in reference]
    loader = chat_dm(tmp_path, seq_len=1024, synthetic_conversations=80, batch_size=2)
    loader = loader.train_dataloader()
    loader.sampler.set_epoch(1)
    iterator = iter(loader)
    seen = [next(iterator)["input_ids"] for _ in range(3)]
    state = loader.state_dict()
    assert state["samples_seen"] == 6
    fresh = chat_dm(tmp_path, seq_len=1024, synthetic_conversations=80, batch_size=2)
    fresh_loader = fresh.train_dataloader()
    fresh_loader.load_state_dict(state)
    fresh_loader.sampler.set_epoch(1)
    rest = [b["input_ids"] for b in fresh_loader]
    assert len(seen + rest) == len(full)
    assert all(torch.equal(a, b) for a, b in zip(seen + rest, full, strict=True))
    shards = []
    for rank in (0, 1):
        sharded = chat_dm(tmp_path, seq_len=1024, synthetic_conversations=80, batch_size=2)
        sharded.trainer = fake_trainer(2, rank)
        sampler = sharded.train_dataloader().sampler
        sampler.set_epoch(1)
        shards.append(list(sampler))
        shards.append(list(sharded.val_dataloader().sampler))
    n = len(dm.train_dataset)
    assert len(shards[0]) == len(shards[2]) == (n + 1) // 2
    assert set(shards[0]) | set(shards[2]) == set(range(n))
    assert len(shards[1]) == len(shards[3]) > 0 and not set(shards[1]) & set(shards[3])


def test_cache_is_reused_and_keyed_on_what_changes_tokens(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", conversations(6))
    dm = chat_dm(tmp_path, paths=[str(path)], seq_len=64, batch_size=1)
    dm.prepare_data()
    monkeypatch.setattr(ChatDataModule, "_tokenize", lambda *a: pytest.fail("tokenised again"))
    again = chat_dm(tmp_path, paths=[str(path)], seq_len=32, packing=False, overlong="drop")
    again.setup()
    assert again.cache_path == dm.cache_path
    for change in ({"messages_field": "turns"}, {"strict": True},
                   {"chat_template": "{{ messages[0]['content'] }}"}):  # fmt: skip
        assert chat_dm(tmp_path, paths=[str(path)], **change).cache_path != dm.cache_path


# --------------------------------------------------------------------------------- config
@pytest.mark.parametrize("hf", [False, True], ids=["byte", "bpe"])
def test_instantiates_from_yaml(tmp_path, hf, request):
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    data = write_jsonl(tmp_path / "pc.jsonl", [{"q": f"Q{i}?", "a": f"A{i}."} for i in range(8)])
    init_args = {"paths": [str(data)], "seq_len": 64, "batch_size": 2, "prompt_field": "q",
                 "completion_field": "a", "format": "prompt_completion", "overlong": "drop",
                 "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.25}  # fmt: skip
    if hf:
        init_args["tokenizer"] = request.getfixturevalue("bpe_dir")
    config = tmp_path / "data.yaml"
    spec = {"class_path": "lightning_kd.data.ChatDataModule", "init_args": init_args}
    config.write_text(yaml.safe_dump({"data": spec}))
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_argument("--data", type=LightningDataModule)
    parsed = parser.parse_args(["--config", str(config)])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    dm = instantiate(parsed).data
    assert isinstance(dm, ChatDataModule) and dm.fields.prompt_field == "q"
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].shape == (2, 64) and int((batch["labels"] != IGNORE).sum()) > 0
    spec["init_args"]["overlong"] = "cut"  # refused by the Literal type already at parsing
    config.write_text(yaml.safe_dump({"data": spec}))
    with pytest.raises(Exception, match="overlong"):
        parser.parse_args(["--config", str(config)])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"overlong": "cut"}, "overlong must be one of"), ({"format": "csv"}, "format must be"),
     ({"seq_len": 0}, "seq_len"), ({"ignore_index": 5}, "is a token id"),
     ({"packing": "yes"}, "packing must be a bool"), ({"paths": "a.jsonl"}, "list of paths"),
     ({"messages_field": ""}, "messages_field"), ({"chat_template": 3}, "chat_template")],
)  # fmt: skip
def test_validates_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        chat_dm(tmp_path, **kwargs)


# --------------------------------------------------------------------------------- end to end
def test_distils_hf_models_on_chat_data_with_a_local_tokenizer(tmp_path, bpe_dir):
    """ChatDataModule with a local HF tokenizer and its chat template, packed rows, two tiny
    HF models: a few real distillation steps, with the loss counted on the answers only."""
    import lightning as L

    from lightning_kd import DistillationModule, KDLoss
    from lightning_kd.models.hf import HFCausalLM

    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CONVERSATION}] * 24)
    dm = ChatDataModule(paths=[str(path)], tokenizer=bpe_dir, seq_len=96, batch_size=2,
                        val_fraction=0.0, cache_dir=str(tmp_path / "cache"))  # fmt: skip

    def config(hidden: int) -> dict:
        return dict(model_type="qwen2", vocab_size=dm.vocab_size, hidden_size=hidden,
                    intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=128,
                    tie_word_embeddings=False)  # fmt: skip

    tokens = []

    class Count(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            assert "position_ids" in batch and outputs["valid_mask"].shape == batch["labels"].shape
            tokens.append(int(outputs["valid_mask"].sum()))

    module = DistillationModule(HFCausalLM(config=config(16)), HFCausalLM(config=config(32)),
                                loss=KDLoss(kd_ratio=0.5), fused_head=True)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Count()])  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
    batch = next(iter(dm.train_dataloader()))
    answers = (batch["labels"] != IGNORE).sum()
    assert 0 < answers < (batch["position_ids"] > 0).sum()  # answers only, not every token
    assert all(0 < t <= 2 * 96 for t in tokens)


# --------------------------------------------------------------------------------- review fixes
def test_cache_key_follows_tokenizer_settings_that_change_tokens(tmp_path, bpe_dir):
    import shutil

    path = write_jsonl(tmp_path / "c.jsonl", conversations(2))

    def key(directory) -> Path:
        return chat_dm(tmp_path, paths=[str(path)], tokenizer=str(directory)).cache_path

    base = key(bpe_dir)
    assert key(bpe_dir) == base  # the same files, the same key
    edited = shutil.copytree(bpe_dir, tmp_path / "edited")
    config = json.loads((edited / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|endoftext|>"  # what templates render as {{ eos_token }}
    (edited / "tokenizer_config.json").write_text(json.dumps(config))
    assert key(edited) != base
    serialised = tmp_path / "serialised"  # the vocabulary stays, the pipeline changes
    shutil.copytree(bpe_dir, serialised)
    backend = json.loads((serialised / "tokenizer.json").read_text())
    backend["normalizer"] = {"type": "Lowercase"}
    (serialised / "tokenizer.json").write_text(json.dumps(backend))
    assert (
        HFTokenizer(str(serialised)).hf_tokenizer.get_vocab()
        == HFTokenizer(bpe_dir).hf_tokenizer.get_vocab()
    )
    assert key(serialised) != base


def test_chat_source_holds_the_end_of_turn_texts(tmp_path, monkeypatch):
    base = chat_dm(tmp_path).cache_path
    monkeypatch.setattr(ChatEncoder, "special_texts", ["<|eos|>", "<|end|>"])
    assert chat_dm(tmp_path).cache_path != base


RAISES_ON_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}{% endfor %}"
)


@pytest.mark.parametrize("hf", [False, True], ids=["byte", "bpe"])
def test_template_errors_are_unrenderable_records(tmp_path, hf, request, caplog):
    template = RAISES_ON_SYSTEM
    kwargs = {"chat_template": template}
    if hf:
        kwargs["tokenizer"] = request.getfixturevalue("bpe_dir")
    records = conversations(3)
    records.insert(1, {"messages": [{"role": "system", "content": "S."}, *CONVERSATION[1:3]]})
    path = write_jsonl(tmp_path / "c.jsonl", records)
    with caplog.at_level(logging.INFO, logger="lightning_kd.data"):
        dm = chat_dm(tmp_path, paths=[str(path)], val_fraction=0.0, **kwargs)
        dm.setup()
    assert dm.read_stats.kept == 3 and dm.read_stats.skipped == {"unrenderable": 1}
    assert "c.jsonl:2: System role not supported" in caplog.text
    with pytest.raises(ValueError, match=r"c\.jsonl:2: System role not supported"):
        chat_dm(tmp_path / "strict", paths=[str(path)], strict=True, **kwargs).prepare_data()


TRIMMING_CHATML = CHATML.replace("{{ message['content'] }}", "{{ message['content'] | trim }}")


def test_assistant_span_is_searched_in_its_own_turn(bpe_dir):
    encoder = ChatEncoder(HFTokenizer(bpe_dir), TRIMMING_CHATML)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure. "},
                {"role": "user", "content": "Sure. I want more"},
                {"role": "assistant", "content": "OK."}]  # fmt: skip
    text = encoder.render(messages)
    answer = text.index("assistant\nSure.<|im_end|>") + len("assistant\n")
    last = text.index("assistant\nOK.") + len("assistant\n")
    assert encoder.assistant_spans(text, messages) == [
        (answer, answer + len("Sure.<|im_end|>")), (last, last + len("OK.<|im_end|>"))
    ]  # fmt: skip
    _ids, targets = encoder.encode(messages)
    _, offsets = encoder.tokenize(text)
    user = text.index("Sure. I want more")
    covered = [(a, b) for (a, b), t in zip(offsets, targets, strict=True) if t]
    assert not any(a < user + len("Sure. I want more") and b > user for a, b in covered)
    assert any(a < answer + len("Sure.") and b > answer for a, b in covered)  # the real answer


def test_skipped_counts_are_logged_from_a_warm_cache(tmp_path, caplog, monkeypatch):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in conversations(2)] + ["{oops"]) + "\n")
    chat_dm(tmp_path, paths=[str(path)], val_fraction=0.0).setup()
    monkeypatch.setattr(ChatDataModule, "_tokenize", lambda *a: pytest.fail("tokenised again"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightning_kd.data"):
        warm = chat_dm(tmp_path, paths=[str(path)], val_fraction=0.0)
        warm.setup()
    assert "2 conversations kept, skipped: 1 malformed" in caplog.text
    assert "bad.jsonl:3: invalid JSON" in caplog.text
    assert warm.read_stats.kept == 2 and warm.read_stats.skipped == {"malformed": 1}
    stats = warm.cache_path.with_suffix(".stats.json")
    assert stats.is_file() and len(list(stats.parent.glob("*.stats.json"))) == 1
    stats.unlink()  # a cache without its counts says so instead of staying silent
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightning_kd.data"):
        chat_dm(tmp_path, paths=[str(path)], val_fraction=0.0).setup()
    assert "counts of skipped records are unknown" in caplog.text


def test_documents_too_short_for_a_label_are_counted(tmp_path, caplog):
    only_answers = ("{% for m in messages %}{% if m['role'] == 'assistant' %}"
                    "{{ m['content'] }}{% endif %}{% endfor %}")  # fmt: skip
    records = [{"prompt": "Q?", "completion": "A"}, {"prompt": "Q?", "completion": "Hello"}]
    path = write_jsonl(tmp_path / "pc.jsonl", records)
    with caplog.at_level(logging.INFO, logger="lightning_kd.data"):
        dm = chat_dm(tmp_path, paths=[str(path)], val_fraction=0.0, chat_template=only_answers)
        dm.setup()
    assert "1 conversations in 1 rows" in caplog.text
    assert "1 shorter than 2 tokens" in caplog.text


def test_instantiates_messages_format_from_yaml(tmp_path, bpe_dir):
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    records = [{"turns": CONVERSATION}] + [{"turns": c["messages"]} for c in conversations(5)]
    data = write_jsonl(tmp_path / "chats.jsonl", [*records, *conversations(1)])
    init_args = {"paths": [str(data)], "tokenizer": bpe_dir, "format": "messages",
                 "messages_field": "turns", "seq_len": 96, "batch_size": 2, "packing": False,
                 "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.0}  # fmt: skip
    config = tmp_path / "data.yaml"
    spec = {"class_path": "lightning_kd.data.ChatDataModule", "init_args": init_args}
    config.write_text(yaml.safe_dump({"data": spec}))
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_argument("--data", type=LightningDataModule)
    parsed = parser.parse_args(["--config", str(config)])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    dm = instantiate(parsed).data
    assert isinstance(dm, ChatDataModule) and dm.fields.format == "messages"
    assert isinstance(dm.tokenizer, HFTokenizer) and dm.vocab_size < 500
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].shape == (2, 96)
    labels = batch["labels"][batch["labels"] != IGNORE]
    assert len(labels) > 0 and dm.tokenizer.eos_id in labels.tolist()  # answers end with EOS
    # the last record has no "turns": with format="messages" it is skipped as malformed
    assert dm.read_stats.kept == 6 and dm.read_stats.skipped == {"malformed": 1}
