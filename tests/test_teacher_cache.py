"""The offline teacher cache (issue 15): codec, top-k (whole and vocabulary-sharded), writer
(exact and top-k, resume, settings checks), reader errors, and the cache-teacher command on
1 process, DP=2 and TP=2."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist

from lightning_kd import DistillationModule, KDLoss, TinyLlama
from lightning_kd.cli import main
from lightning_kd.teacher_cache import (
    CacheMetadata,
    TeacherCache,
    data_fingerprint,
    topk_logprobs,
    topk_with_tail,
    write_teacher_cache,
)
from lightning_kd.teacher_cache.codec import decode_topk, decode_topk_with_tail, encode_topk
from lightning_kd.teacher_cache.format import (
    METADATA_FILENAME,
    encode_shard,
    read_record,
    read_shard_header,
    shard_path,
)
from lightning_kd.teacher_cache.writer import STOP_AFTER_ENV, CacheWriteInterrupted
from lightning_kd.training.cached_teacher import CachedTeacherSource
from tests.helpers.cli import SMALL_DATA, cli_env
from tests.helpers.distributed import run_workers
from tests.helpers.runs import ROOT

T = 2.0
SHARD, BATCH = 4, 2  # micro-batches never cross a shard


class _Tokens(torch.utils.data.Dataset):
    """Random sequences whose first ``i % 5`` targets are ignored (valid counts differ)."""

    def __init__(self, count: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 258, (count, 17), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i, 1:].clone()
        labels[: i % 5] = -100
        return {"input_ids": self.ids[i, :-1], "labels": labels}


class _TokensData(L.LightningDataModule):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.seq_len = BATCH, 16
        self.train_dataset, self.val_dataset = _Tokens(10, seed), _Tokens(3, seed + 1)


def _parts(tmp: Path, temperature: float = T, seed: int = 0):
    torch.manual_seed(0)
    teacher = TinyLlama(vocab_size=258, dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                        hidden_dim=64, max_seq_len=32, init_std=0.3)  # fmt: skip
    student = TinyLlama(vocab_size=258, dim=16, n_layers=1, n_heads=2, n_kv_heads=2,
                        hidden_dim=32, max_seq_len=32)  # fmt: skip
    module = DistillationModule(student, teacher, loss=KDLoss(temperature=temperature))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    return module, _TokensData(seed), trainer


def _write(tmp: Path, out: Path, top_k: int, **kwargs) -> tuple[CacheMetadata, tuple]:
    parts = _parts(tmp, **kwargs)
    meta = write_teacher_cache(*parts, out, top_k, shard_size=SHARD, batch_size=BATCH)
    return meta, parts


def _reference(module, dataset, indices):
    """The teacher's log_softmax(logits / T) computed in the writer's micro-batches."""
    out = []
    for begin in range(0, len(indices), BATCH):
        ids = torch.stack([dataset[i]["input_ids"] for i in indices[begin : begin + BATCH]])
        with torch.no_grad():
            out.append(torch.log_softmax(module.teacher(ids).float() / T, -1))
    return torch.cat(out)


def _batch(dataset, indices):
    labels = torch.stack([dataset[i]["labels"] for i in indices])
    return torch.tensor(indices), labels != -100


@pytest.fixture(scope="module")
def exact_cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exact")
    meta, parts = _write(tmp, tmp / "cache", 0)
    return tmp / "cache", meta, parts


# ------------------------------------------------------------------------------ codec, top-k
def _realistic_logits(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
    rows = [(-1.1 * ranks.log())[torch.randperm(vocab, generator=gen)] for _ in range(n)]
    return torch.stack(rows) * 3 + 0.3 * torch.randn(n, vocab, generator=gen)


def test_codec_round_trip_keeps_ids_and_tail_and_fits_the_size_budget():
    vocab, k = 5000, 32
    lp = torch.log_softmax(_realistic_logits(64, vocab), -1)
    values, ids = lp.topk(k)
    record = encode_topk(ids, values, vocab)
    assert len(record) / (64 * k) <= 4.0
    dec_ids, dec_lp = decode_topk(record, 64, k)
    order = ids.argsort(-1)
    assert torch.equal(dec_ids, ids.gather(-1, order))
    expected = values.gather(-1, order)
    step = (values[:, 0] - values[:, -1]) / 255
    assert ((dec_lp - expected).abs() <= step[:, None] + 1e-5).all()
    mass = lambda x: x.double().exp().sum(-1)
    torch.testing.assert_close(mass(dec_lp), mass(expected), rtol=0, atol=1e-6)


def test_codec_handles_minus_infinity_and_flat_rows():
    ids = torch.tensor([[5, 1, 9, 0], [3, 2, 7, 100]])
    lp = torch.tensor([[-0.1, float("-inf"), -3.0, float("-inf")], [-math.log(4)] * 4])
    dec_ids, dec_lp = decode_topk(encode_topk(ids, lp, 101), 2, 4)
    assert torch.equal(dec_ids, ids.sort(-1).values)
    assert torch.isfinite(dec_lp).all()
    torch.testing.assert_close(dec_lp[1], torch.full((4,), -math.log(4)))
    torch.testing.assert_close(dec_lp[0].exp().sum(), lp[0].exp().sum())


def test_topk_logprobs_matches_torch_topk():
    logits = torch.randn(10, 300)
    ids, lp = topk_logprobs(logits, 7, 1.5)
    ref = torch.log_softmax(logits / 1.5, -1).topk(7)
    assert torch.equal(ids, ref.indices)
    torch.testing.assert_close(lp, ref.values)
    with pytest.raises(ValueError, match="top_k must be in"):
        topk_logprobs(logits, 301, 1.0)


def _reference_tail(logits, ids, temperature):
    """float64 log of the softmax mass outside ``ids``."""
    log_p = torch.log_softmax(logits.double() / temperature, -1)
    return torch.logsumexp(log_p.scatter(-1, ids, -math.inf), -1)


def test_codec_stores_the_tail_log_mass_and_reads_old_records():
    lp = torch.log_softmax(_realistic_logits(8, 300), -1)
    values, ids = lp.topk(6)
    tail = torch.logsumexp(lp.scatter(-1, ids, -math.inf), -1)
    tail[0] = -50.0  # a tail of 2e-22: 1 − Σ P_i cannot hold it, the stored log-mass does
    tail[1] = -math.inf
    dec_ids, dec_lp, dec_tail = decode_topk_with_tail(encode_topk(ids, values, 300, tail), 8, 6)
    assert torch.equal(dec_tail, tail) and torch.equal(dec_ids, ids.sort(-1).values)
    old_ids, old_lp, no_tail = decode_topk_with_tail(encode_topk(ids, values, 300), 8, 6)
    assert no_tail is None and torch.equal(old_ids, dec_ids) and torch.equal(old_lp, dec_lp)
    assert len(decode_topk(encode_topk(ids, values, 300, tail), 8, 6)) == 2


def test_topk_with_tail_is_exact_for_tiny_tails():
    logits = torch.randn(5, 40)
    logits[:2, 4:] -= 60.0  # rows 0, 1: tails around e^-60
    for k in (1, 4, 40):
        ids, lp, tail = topk_with_tail(logits, k, 1.5)
        torch.testing.assert_close(lp, topk_logprobs(logits, k, 1.5)[1])
        ref = _reference_tail(logits, ids, 1.5)
        if k == 40:
            assert torch.isinf(tail).all() and (tail < 0).all()
        else:
            torch.testing.assert_close(tail.double(), ref, rtol=0, atol=1e-5)
    assert float(topk_with_tail(logits, 4, 1.0)[2][0]) < -30


def _sharded_topk_worker(rank, world_size, vocab):
    torch.manual_seed(0)
    logits = torch.randn(6, vocab) * 4
    logits[0, 10:] -= 80.0  # a tiny tail, its entries on both shards
    bounds = [0, (vocab + 1) // 2, vocab]  # uneven shards for odd V
    local = logits[:, bounds[rank] : bounds[rank + 1]]
    for k in (1, 5, bounds[1] - bounds[0] + 3, vocab):
        ids, lp = topk_logprobs(local, k, 2.0, dist.group.WORLD)
        ref = torch.log_softmax(logits / 2.0, -1).topk(k)
        assert torch.equal(ids, ref.indices), (k, ids, ref.indices)
        torch.testing.assert_close(lp, ref.values, rtol=1e-6, atol=1e-6)
        tail = topk_with_tail(local, k, 2.0, dist.group.WORLD)[2]
        if k == vocab:
            assert torch.isinf(tail).all()
        else:
            torch.testing.assert_close(tail.double(), _reference_tail(logits, ids, 2.0),
                                       rtol=0, atol=1e-5)  # fmt: skip


@pytest.mark.distributed
@pytest.mark.slow
def test_topk_over_vocab_sharded_logits_equals_single_process():
    run_workers(_sharded_topk_worker, 2, 101)


# ------------------------------------------------------------------------------ writer + reader
def test_exact_mode_reads_back_the_teachers_log_softmax_exactly(exact_cache):
    directory, meta, (module, data, _) = exact_cache
    cache = TeacherCache(directory)
    assert cache.metadata == meta and meta.complete and meta.top_k == 0
    assert meta.vocab_size == 258 and meta.temperature == T and meta.seq_len == 16
    for split in ("train", "val"):
        dataset = getattr(data, f"{split}_dataset")
        assert meta.num_sequences[split] == len(dataset)
        assert meta.splits[split] == data_fingerprint(dataset)
        indices = list(range(len(dataset)))
        idx, valid = _batch(dataset, indices)
        assert valid.any() and (split == "val" or not valid.all())  # padded: some invalid
        out = cache.read(split, idx, valid)
        assert out.ids is None and out.logprobs.dtype == torch.float32
        ref = _reference(module, dataset, indices)
        assert torch.equal(out.logprobs[valid], ref[valid])
        placeholder = out.logprobs[~valid]
        torch.testing.assert_close(placeholder, torch.full_like(placeholder, -math.log(258)))
    # Any order, any batch: indexed by sequence, not by step.
    dataset = data.train_dataset
    idx, valid = _batch(dataset, [5, 0, 3])
    ref = _reference(module, dataset, list(range(8)))[[5, 0, 3]]
    assert torch.equal(cache.read("train", idx, valid).logprobs[valid], ref[valid])


def test_topk_mode_equals_torch_topk_within_codec_tolerance(tmp_path):
    meta, (module, data, _) = _write(tmp_path, tmp_path / "cache", 16)
    assert meta.codec == "q8rice"
    cache = TeacherCache(tmp_path / "cache")
    dataset = data.train_dataset
    indices = list(range(len(dataset)))
    idx, valid = _batch(dataset, indices)
    out = cache.read("train", idx, valid)
    ref = _reference(module, dataset, indices)
    values, ids = ref.topk(16)
    order = ids.argsort(-1)
    assert torch.equal(out.ids[valid], ids.gather(-1, order)[valid])
    expected = values.gather(-1, order)[valid]
    step = (values[..., 0] - values[..., -1])[valid] / 255
    assert ((out.logprobs[valid] - expected).abs() <= step[:, None] + 1e-5).all()
    tail = 1 - ref[valid].exp().topk(16).values.double().sum(-1)
    cached_tail = (1 - out.logprobs.double().exp().sum(-1)).clamp_min(0)
    torch.testing.assert_close(cached_tail[valid], tail, rtol=0, atol=1e-5)
    assert torch.equal(out.ids[~valid][0], torch.arange(16))
    # The stored tail log-mass (format version 2) is the teacher's, from its logits.
    assert meta.format_version == 2 and out.tail_logprob.shape == valid.shape
    ref_tail = _reference_tail(ref[valid], ids[valid], 1.0)  # ref: log-probabilities already
    torch.testing.assert_close(out.tail_logprob[valid].double(), ref_tail, rtol=0, atol=1e-5)
    assert torch.isinf(out.tail_logprob[~valid]).all()


def _as_version_1(directory: Path) -> None:
    """Rewrite a top-k cache as format version 1 wrote it (no tail log-mass)."""
    for path in sorted(directory.glob("*/shard-*.bin")):
        header = read_shard_header(path)
        fields = {k: v for k, v in header.fields.items() if k not in ("sizes", "sha256")}
        records = []
        for position, n in enumerate(fields["num_valid"]):
            ids, lp, _ = decode_topk_with_tail(read_record(header, position), n, fields["top_k"])
            records.append(encode_topk(ids, lp, fields["vocab_size"]))
        path.write_bytes(encode_shard(fields, records))
    meta = directory / METADATA_FILENAME
    meta.write_text(meta.read_text().replace('"format_version": 2', '"format_version": 1'))


def test_a_version_1_cache_loads_and_trains_forward_kl_only(tmp_path):
    _write(tmp_path, tmp_path / "cache", 8)
    data = _TokensData()
    idx, valid = _batch(data.train_dataset, [0, 3, 6])
    before = TeacherCache(tmp_path / "cache").read("train", idx, valid)
    _as_version_1(tmp_path / "cache")
    old = TeacherCache(tmp_path / "cache")
    assert old.metadata.format_version == 1
    after = old.read("train", idx, valid)
    assert after.tail_logprob is None and torch.equal(after.ids, before.ids)
    torch.testing.assert_close(after.logprobs, before.logprobs, rtol=0, atol=0.05)  # requantised
    source = CachedTeacherSource(str(tmp_path / "cache"))
    source.check_loss(KDLoss())
    with pytest.raises(ValueError, match=r"format version 1.*forward_kl only.*Write it again"):
        source.check_loss(KDLoss(divergence="jsd"))
    # Continuing it with this writer would mix records: refused, naming the version.
    with pytest.raises(ValueError, match="format_version: cache 1, run 2"):
        _write(tmp_path, tmp_path / "cache", 8)


def test_check_compatible_names_every_field_that_differs(exact_cache):
    cache = TeacherCache(exact_cache[0])
    meta = cache.metadata
    good = dict(vocab_size=258, temperature=T, tokenizer=meta.tokenizer,
                fingerprints=dict(meta.splits))  # fmt: skip
    cache.check_compatible(**good)
    cases = {
        "vocab_size: cache 258, run 300": dict(vocab_size=300),
        "temperature: cache 2.0, run 1.0": dict(temperature=1.0),
        "tokenizer: cache unknown, run HFTokenizer(x)": dict(tokenizer="HFTokenizer(x)"),
        "data (train): cache": dict(fingerprints={"train": "0" * 64}),
        "data (test): cache (not cached)": dict(fingerprints={"test": "0" * 64}),
    }
    for message, change in cases.items():
        with pytest.raises(ValueError, match=r"does not match this run: .*" + re.escape(message)):
            cache.check_compatible(**{**good, **change})
    with pytest.raises(ValueError) as info:
        cache.check_compatible(**{**good, "temperature": 1.0, "vocab_size": 1})
    assert "temperature" in str(info.value) and "vocab_size" in str(info.value)


def _copy(exact_cache, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(exact_cache[0], target)
    return target


def _read_all(directory: Path, data) -> None:
    dataset = data.train_dataset
    TeacherCache(directory).read("train", *_batch(dataset, list(range(len(dataset)))))


def test_corrupt_truncated_and_missing_shards_are_errors_naming_the_file(exact_cache, tmp_path):
    data = exact_cache[2][1]
    directory = _copy(exact_cache, tmp_path)
    shard = shard_path(directory, "train", 1)
    raw = bytearray(shard.read_bytes())
    raw[-100] ^= 0x01  # a record byte
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"corrupt shard {re.escape(str(shard))}.*checksum"):
        _read_all(directory, data)
    raw[-100] ^= 0x01
    raw[60] ^= 0x20  # a header byte
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"corrupt shard {re.escape(str(shard))}"):
        _read_all(directory, data)
    raw[60] ^= 0x20
    shard.write_bytes(bytes(raw[:-10]))
    with pytest.raises(ValueError, match=f"corrupt shard {re.escape(str(shard))}.*truncated"):
        _read_all(directory, data)
    shard.unlink()
    with pytest.raises(ValueError, match=f"lacks shard {re.escape(str(shard))}"):
        _read_all(directory, data)


def test_indices_and_valid_tokens_that_do_not_match_are_errors(exact_cache):
    directory, meta, (_, data, _) = exact_cache
    cache = TeacherCache(directory)
    n = meta.num_sequences["train"]
    idx, valid = _batch(data.train_dataset, [0])
    with pytest.raises(ValueError, match=f"sequence {n} of split 'train' is not in"):
        cache.read("train", torch.tensor([n]), valid)
    with pytest.raises(ValueError, match="has no split 'test'"):
        cache.read("test", idx, valid)
    valid[0, 0] = ~valid[0, 0]
    with pytest.raises(ValueError, match="the cache does not match the data"):
        cache.read("train", idx, valid)


def test_bad_metadata_is_an_error_naming_the_problem(exact_cache, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        TeacherCache(tmp_path / "nowhere")
    directory = _copy(exact_cache, tmp_path)
    path = directory / METADATA_FILENAME
    text = path.read_text()
    path.write_text(text[:-5])
    with pytest.raises(ValueError, match="is not valid JSON"):
        TeacherCache(directory)
    path.write_text(text.replace('"format_version": 2', '"format_version": 99'))
    with pytest.raises(ValueError, match="format_version 99"):
        TeacherCache(directory)
    path.write_text(text.replace('"complete": true', '"complete": false'))
    with pytest.raises(ValueError, match="incomplete"):
        TeacherCache(directory)
    path.unlink()
    with pytest.raises(ValueError, match=r"has no metadata\.json"):
        TeacherCache(directory)


def _contents(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}  # fmt: skip


def test_interrupted_writer_resumes_to_the_same_cache(tmp_path, monkeypatch):
    _write(tmp_path, tmp_path / "straight", 8)
    crashed = tmp_path / "crashed"
    monkeypatch.setenv(STOP_AFTER_ENV, "2")
    with pytest.raises(CacheWriteInterrupted):
        _write(tmp_path, crashed, 8)
    monkeypatch.delenv(STOP_AFTER_ENV)
    assert len(list(crashed.glob("train/shard-*.bin"))) == 2
    with pytest.raises(ValueError, match="incomplete"):
        TeacherCache(crashed)
    # A torn shard (e.g. from a non-atomic copy) and a leftover temporary file do not count.
    shard_path(crashed, "train", 2).write_bytes(shard_path(crashed, "train", 1).read_bytes()[:99])
    (crashed / "train" / ".shard-000003.bin.x.tmp").write_bytes(b"partial")
    before = shard_path(crashed, "train", 0).stat().st_mtime_ns
    with pytest.warns(UserWarning, match="rewriting .*shard-000002.bin"):
        _write(tmp_path, crashed, 8)
    assert shard_path(crashed, "train", 0).stat().st_mtime_ns == before  # skipped, not redone
    (crashed / "train" / ".shard-000003.bin.x.tmp").unlink()
    assert _contents(crashed) == _contents(tmp_path / "straight")


def test_restart_with_other_settings_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(STOP_AFTER_ENV, "1")
    with pytest.raises(CacheWriteInterrupted):
        _write(tmp_path, tmp_path / "cache", 8)
    monkeypatch.delenv(STOP_AFTER_ENV)
    for change, message in ((dict(top_k=4), "top_k: cache 8, run 4"),
                            (dict(temperature=1.0), "temperature: cache 2.0, run 1.0"),
                            (dict(seed=1), "splits: cache")):  # fmt: skip
        top_k = change.pop("top_k", 8)
        with pytest.raises(ValueError, match=f"other settings: .*{re.escape(message)}"):
            _write(tmp_path, tmp_path / "cache", top_k, **change)


def test_writer_argument_errors(tmp_path):
    parts = _parts(tmp_path)
    for kwargs, message in ((dict(top_k=-1), "top_k must be"), (dict(splits=["test"]), "splits"),
                            (dict(top_k=300), "exceeds the teacher's vocabulary")):  # fmt: skip
        args = {"top_k": 4, "splits": ["train"], **kwargs}
        with pytest.raises(ValueError, match=message):
            write_teacher_cache(*parts, tmp_path / f"c{len(message)}", args["top_k"],
                                args["splits"], shard_size=SHARD)  # fmt: skip


# ------------------------------------------------------------------------------ CLI
def _cli_args(config: str, out: Path, ckpt: Path, top_k: int, *extra: str) -> list[str]:
    return ["cache-teacher", "--config", str(ROOT / "configs" / config), "--output_dir", str(out),
            "--top_k", str(top_k), "--shard_size", "16",
            "--model.init_args.teacher_checkpoint", str(ckpt),
            "--trainer.enable_progress_bar", "false", *SMALL_DATA, *extra]  # fmt: skip


def _decoded(directory: Path, split: str) -> tuple:
    cache = TeacherCache(directory)
    meta = cache.metadata
    n = meta.num_sequences[split]
    outs = []
    for shard in range(math.ceil(n / meta.shard_size)):
        header = read_shard_header(shard_path(directory, split, shard))
        valid = torch.zeros(len(header.fields["num_valid"]), meta.seq_len, dtype=torch.bool)
        for row, count in enumerate(header.fields["num_valid"]):
            valid[row, :count] = True  # only the count matters to the reader
        first = header.fields["first"]
        outs.append(cache.read(split, torch.arange(first, first + len(valid)), valid))
    ids = None if outs[0].ids is None else torch.cat([o.ids for o in outs])
    return ids, torch.cat([o.logprobs for o in outs])


@pytest.mark.slow
def test_cache_teacher_command_writes_and_reports_mismatches(tmp_path, monkeypatch, teacher_ckpt,
                                                             capsys):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert main(_cli_args("quickstart.yaml", tmp_path / "c", teacher_ckpt, 8,
                          "--splits", "val")) == 0  # fmt: skip
    meta = TeacherCache(tmp_path / "c").metadata
    assert meta.top_k == 8 and list(meta.splits) == ["val"] and meta.vocab_size == 258
    assert str(teacher_ckpt) in meta.teacher and "config sha256:" in meta.teacher
    capsys.readouterr()
    assert main(_cli_args("quickstart.yaml", tmp_path / "c", teacher_ckpt, 4,
                          "--splits", "val")) == 1  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lightning-kd: error: ") and "top_k: cache 8, run 4" in err[-1]


def _run_cli(args: list[str], cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lightning_kd", *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]


@pytest.mark.distributed
@pytest.mark.slow
def test_dp2_and_tp2_write_the_same_cache_as_one_process(tmp_path, monkeypatch, teacher_ckpt):
    for name, config, top_k, extra in (
        ("one_exact", "quickstart.yaml", 0, []),
        ("one_topk", "quickstart.yaml", 8, []),
        ("dp2_exact", "quickstart_tp2.yaml", 0,
         ["--trainer.strategy.init_args.data_parallel_size", "2",
          "--trainer.strategy.init_args.tensor_parallel_size", "1"]),
        ("tp2_topk", "quickstart_tp2.yaml", 8, []),
    ):  # fmt: skip
        run = tmp_path / name
        run.mkdir()
        args = _cli_args(config, run / "cache", teacher_ckpt, top_k, "--splits", "val", *extra)
        if name.startswith("one_"):  # one process: in this process, no interpreter start
            monkeypatch.chdir(run)
            assert main(args) == 0
        else:
            _run_cli(args, run)
    one_ids, one_lp = _decoded(tmp_path / "one_exact/cache", "val")
    dp_ids, dp_lp = _decoded(tmp_path / "dp2_exact/cache", "val")
    assert one_ids is None and dp_ids is None
    torch.testing.assert_close(dp_lp, one_lp, rtol=1e-5, atol=1e-5)
    one_ids, one_lp = _decoded(tmp_path / "one_topk/cache", "val")
    tp_ids, tp_lp = _decoded(tmp_path / "tp2_topk/cache", "val")
    assert torch.equal(tp_ids, one_ids)
    torch.testing.assert_close(tp_lp, one_lp, rtol=0, atol=0.02)  # within a quantisation step
