"""The unfriendly cases issue 21's fault probe found, each one line naming what is wrong:

- a config written by ``lightning-kd fit --print_config`` is accepted by ``cache-teacher`` and
  ``export`` (it holds ``ckpt_path`` and ``weights_only``, keys of ``fit``);
- an existing file (or a path under one) as ``--output_dir`` of ``cache-teacher``/``export``;
- ``ChatDataModule(encoding=...)`` reads files in another encoding, as its error suggests;
- a Parquet file pyarrow cannot read is named;
- ``KDLoss`` refuses labels outside ``[0, V)`` that are not ``ignore_index``, whatever
  ``kd_ratio`` (padding marked -1 was distilled silently with ``kd_ratio=1``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_kd import KDLoss
from lightning_kd.cli import main
from lightning_kd.data import ChatDataModule
from lightning_kd.data.chat_records import RecordFields, read_chat_records
from lightning_kd.io import ensure_writable_dir

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("lightning-kd: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


# ---------------------------------------------------------------------------- --print_config
@pytest.fixture(scope="module")
def printed_config(tmp_path_factory) -> str:
    """``lightning-kd fit --config quickstart.yaml --print_config``, as a file."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        main(["fit", "--config", QUICKSTART, "--print_config"])
    assert stop.value.code in (0, None)
    text = out.getvalue()
    assert "ckpt_path" in text and "weights_only" in text  # what the commands used to refuse
    path = tmp_path_factory.mktemp("printed") / "config.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.slow
def test_cache_teacher_accepts_a_printed_config(printed_config, tmp_path, capsys):
    # The config is parsed (0.2 exited 2: "Option 'ckpt_path' is not accepted"); the model
    # then stops at its teacher checkpoint, which this test has not trained.
    args = ["cache-teacher", "--config", printed_config, "--output_dir", str(tmp_path / "c"),
            "--top_k", "2"]  # fmt: skip
    assert main(args) == 1
    assert "teacher_checkpoint" in _one_line_error(capsys)


@pytest.mark.slow
def test_export_accepts_a_printed_config(printed_config, tmp_path, capsys):
    ckpt = tmp_path / "not_a.ckpt"
    ckpt.write_bytes(b"not a checkpoint")
    args = ["export", "--config", printed_config, "--ckpt_path", str(ckpt),
            "--output_dir", str(tmp_path / "hf")]  # fmt: skip
    assert main(args) == 1
    line = _one_line_error(capsys)
    assert "not accepted" not in line and ("teacher_checkpoint" in line or "not_a.ckpt" in line)


# ---------------------------------------------------------------------------- --output_dir
@pytest.mark.parametrize("command", ["cache-teacher", "export"])
@pytest.mark.parametrize("under", [False, True])
def test_a_file_as_output_dir_is_one_line_naming_it(command, under, tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    output_dir = blocker / "cache" if under else blocker
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"")
    extra = ["--top_k", "2"] if command == "cache-teacher" else ["--ckpt_path", str(ckpt)]
    assert main([command, "--config", QUICKSTART, "--output_dir", str(output_dir), *extra]) == 1
    line = _one_line_error(capsys)
    assert str(output_dir) in line and "is a file" in line, line


def test_output_dir_check_names_the_path(tmp_path):
    assert ensure_writable_dir(tmp_path / "new" / "deeper", "d") == tmp_path / "new" / "deeper"
    assert ensure_writable_dir(tmp_path, "d") == tmp_path
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match=r"d '.*f' cannot be created: '.*f' is a file"):
        ensure_writable_dir(tmp_path / "f", "d")
    with pytest.raises(ValueError, match=r"cannot be created: '.*f' is a file"):
        ensure_writable_dir(tmp_path / "f" / "sub" / "dir", "d")


# ---------------------------------------------------------------------------- chat data
LATIN = "Crème brûlée, café au lait, à la française: déjà vu, garçon, naïve, señor."


def _latin1_records(tmp_path: Path) -> Path:
    path = tmp_path / "latin.jsonl"
    lines = [
        json.dumps({"messages": [{"role": "user", "content": f"{LATIN} {i}?"},
                                 {"role": "assistant", "content": LATIN}]},
                   ensure_ascii=False)
        for i in range(12)
    ]  # fmt: skip
    path.write_bytes("\n".join(lines).encode("latin-1"))
    return path


def test_chat_datamodule_reads_another_encoding(tmp_path):
    path = _latin1_records(tmp_path)
    args = dict(paths=[str(path)], seq_len=512, batch_size=2, val_fraction=0.25,
                cache_dir=str(tmp_path / "cache"))  # fmt: skip
    with pytest.raises(ValueError, match=r"latin\.jsonl.*not valid utf-8.*encoding="):
        ChatDataModule(**args).setup("fit")
    dm = ChatDataModule(**args, encoding="latin-1")
    dm.setup("fit")
    assert len(dm.train_dataset) > 0
    (where, messages), *_ = read_chat_records([str(path)], RecordFields(), encoding="latin-1")
    assert messages[1]["content"] == LATIN, where
    # Another encoding is another cache (the same bytes decode to other text).
    assert dm.cache_path != ChatDataModule(**args, encoding="cp1252").cache_path


def test_chat_datamodule_refuses_an_unknown_encoding(tmp_path):
    with pytest.raises(ValueError, match="encoding must be a Python codec name"):
        ChatDataModule(paths=[str(_latin1_records(tmp_path))], encoding="no-such-codec")


def test_an_unreadable_parquet_file_is_named(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "garbage.parquet"
    path.write_bytes(b"this is not a parquet file at all" * 10)
    with pytest.raises(ValueError, match=r"garbage\.parquet: not a readable Parquet file"):
        list(read_chat_records([str(path)], RecordFields()))


# ---------------------------------------------------------------------------- KDLoss labels
@pytest.mark.parametrize("kd_ratio", [1.0, 0.5])
@pytest.mark.parametrize("bad", [-1, 7, -5])
def test_kd_loss_refuses_labels_outside_the_vocabulary(kd_ratio, bad):
    student, teacher = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    labels = torch.tensor([[1, 2, -100], [0, bad, 6]])
    with pytest.raises(ValueError, match=rf"ignore_index or vocabulary ids in \[0, 7\), got {bad}"):
        KDLoss(kd_ratio=kd_ratio)(student, teacher, labels)


def test_kd_loss_takes_ignore_index_and_every_vocabulary_id():
    student, teacher = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    labels = torch.tensor([[0, 6, -1, 3], [-1, -1, 5, 1]])
    out = KDLoss(kd_ratio=1.0, ignore_index=-1)(student, teacher, labels, return_per_token=True)
    assert int(out.valid_mask.sum()) == 5 and torch.isfinite(out.loss)
