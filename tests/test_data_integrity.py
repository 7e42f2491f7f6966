"""Untrusted input on the data side: corrupt token caches and files in other encodings."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_kd.data import TextDataModule
from lightning_kd.data.text_files import decode_file, read_documents

TEXT = "The little fox found a red ball in the garden. " * 40


def _module(tmp_path, **kwargs) -> TextDataModule:
    source = tmp_path / "doc.txt"
    if not source.exists():
        source.write_text(TEXT)
    kwargs.setdefault("paths", [str(source)])
    return TextDataModule(seq_len=16, batch_size=2, val_fraction=0.0,
                          cache_dir=str(tmp_path / "cache"), **kwargs)  # fmt: skip


def _first_tokens(module: TextDataModule) -> torch.Tensor:
    module.setup("fit")
    return torch.stack([module.train_dataset[i]["input_ids"] for i in range(3)])


# ---------------------------------------------------------------------------- token cache
@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_a_damaged_token_cache_is_rebuilt_with_a_warning_naming_it(tmp_path, damage):
    module = _module(tmp_path)
    module.prepare_data()
    expected = _first_tokens(module)
    path = module.cache_path
    data = bytearray(path.read_bytes())
    if damage == "flip":  # alter token bytes inside the file, keep it loadable
        cached = torch.load(path, weights_only=True)
        needle = cached["tokens"][:8].numpy().tobytes()
        at = data.find(needle)
        assert at > 0
        data[at] ^= 0x01
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"not a checkpoint" * 10)
    path.write_bytes(bytes(data))

    fresh = _module(tmp_path)
    with pytest.warns(UserWarning, match=rf"token cache {path}.*(checksum|cannot be read)"):
        tokens = _first_tokens(fresh)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)
    cached = torch.load(path, weights_only=True)  # rebuilt, and verifiable again
    assert "sha256" in cached


def test_a_changed_source_gets_a_new_cache_and_the_stale_one_is_removed(tmp_path):
    module = _module(tmp_path)
    module.prepare_data()
    old = module.cache_path
    (tmp_path / "doc.txt").write_text(TEXT + "And then it rained.")
    changed = _module(tmp_path)
    assert changed.cache_path != old
    with pytest.warns(UserWarning, match="removed the stale token cache"):
        changed.prepare_data()
    assert changed.cache_path.is_file() and not old.exists()


# ---------------------------------------------------------------------------- encodings
def test_latin1_read_as_utf8_is_refused_naming_the_file_and_encoding(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("Le café était très bon, à côté de la forêt.\n".encode("latin-1") * 5)
    with pytest.raises(
        ValueError, match=r"latin\.txt: \d+ of \d+ bytes are not valid utf-8.*encoding="
    ):
        list(read_documents([str(path)]))
    (text,) = read_documents([str(path)], encoding="latin-1")
    assert text.startswith("Le café était très bon")


def test_the_data_module_decodes_with_its_encoding_option(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(("Une forêt très sombre. " * 20).encode("latin-1"))
    with pytest.raises(ValueError, match="not valid utf-8"):
        _module(tmp_path, paths=[str(path)]).prepare_data()
    module = _module(tmp_path, paths=[str(path)], encoding="latin-1")
    module.setup("fit")
    text = module.tokenizer.decode(module.train_dataset[0]["input_ids"].tolist())
    assert "forêt" in text
    with pytest.raises(ValueError, match="encoding must be a Python codec name"):
        _module(tmp_path, encoding="no-such-codec")


def test_a_few_stray_bytes_are_replaced_with_a_counted_warning(tmp_path):
    path = tmp_path / "mostly.txt"
    path.write_bytes(b"hello world " * 1000 + b"\xff ok")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = decode_file(path)
    assert text.endswith("\ufffd ok")
    assert any("1 of 12004 bytes are not valid utf-8" in str(w.message) for w in caught)


def test_jsonl_files_are_decoded_with_the_encoding_too(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes('{"text": "Ça va très bien."}\n'.encode("latin-1"))
    assert list(read_documents([str(path)], encoding="latin-1")) == ["Ça va très bien."]
    with pytest.raises(ValueError, match=r"docs\.jsonl"):
        list(read_documents([str(path)]))
