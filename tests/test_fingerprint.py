"""adamw_lm.fingerprint: the same inputs match, any changed, missing or new file is named."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from adamw_lm.fingerprint import DATA_FILES, differences, fingerprint


def test_model_fingerprint_covers_config_and_weights_only(tiny_model_path, tmp_path):
    found = fingerprint(tiny_model_path)
    names = sorted(found["files"])
    assert "config.json" in names and any(n.endswith(".safetensors") for n in names)
    assert not any(n.startswith("tokenizer") for n in names)  # not part of the weights' identity
    for name, record in found["files"].items():
        data = (tiny_model_path / name).read_bytes()
        assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert str(tiny_model_path) not in str(found)  # no path of this machine

    copy = tmp_path / "elsewhere"
    shutil.copytree(tiny_model_path, copy)
    assert fingerprint(copy) == found  # same files in another place: the same model
    assert differences(found, fingerprint(copy)) == []


def test_a_changed_weight_byte_or_config_is_named(tiny_model_path, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_path, copy)
    recorded = fingerprint(copy)
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    current = fingerprint(copy)
    assert current["sha256"] != recorded["sha256"]
    assert differences(recorded, current) == [
        f"config.json differs ({recorded['files']['config.json']['size']} -> "
        f"{current['files']['config.json']['size']} bytes)",
        f"{weights.name} differs (same size, other sha256)",
    ]
    weights.unlink()
    (copy / "extra.safetensors").write_bytes(b"x")
    assert differences(recorded, fingerprint(copy))[1:] == [
        "extra.safetensors is new", f"{weights.name} is missing"]


def test_data_files_and_single_files(data_dir, tmp_path):
    chat = data_dir / "chat"
    found = fingerprint(chat, DATA_FILES)
    assert set(found["files"]) == {n for n in DATA_FILES if (chat / n).is_file()}
    one = fingerprint(chat / "train.jsonl")
    assert one["files"] == {"train.jsonl": found["files"]["train.jsonl"]}


def test_nothing_to_fingerprint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fingerprint(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"no file matching train.jsonl"):
        fingerprint(tmp_path, DATA_FILES)
