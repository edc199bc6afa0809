"""adamw_lm.checkpoint: round trips, mlx-lm compatibility, rotation, bad inputs (issue 4)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm import load as mlx_lm_load
from mlx_lm.utils import load_model, save_config

from adamw_lm import AdamW, checkpoint
from adamw_lm.checkpoint import (
    CheckpointWriteError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    NoCheckpointError,
)
from adamw_lm.codecs import PRECISIONS
from helpers.trees import assert_trees_equal
from helpers.training import LORA, lm_steps, lora_model

ALL_PRECISIONS = [None, *PRECISIONS]


def adapter_config(model_path: Path, rank: int = 4, num_layers: int = 2) -> dict:
    return {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {**LORA, "rank": rank},
        "model": str(model_path),
    }


def make_optimizer(precision: str | None) -> AdamW:
    # min_quantize_size=0: the tiny model's LoRA matrices get the low precision under test.
    return AdamW(1e-2, weight_decay=0.01, state_precision=precision, min_quantize_size=0, seed=3)


def logits(model: nn.Module) -> mx.array:
    return model(mx.arange(20).reshape(2, 10))


@pytest.fixture
def run(tiny_model_path, tmp_path):
    """A run with checkpoints at steps 1 and 2 of a trained LoRA model (fp32 moments)."""
    model = lora_model(tiny_model_path)
    optimizer = make_optimizer("fp32")
    config = adapter_config(tiny_model_path)
    for step in (1, 2):
        lm_steps(model, optimizer, 1, first=step)
        checkpoint.save(tmp_path / "run", step, model, optimizer, {"step": step}, config)
    return tmp_path / "run", model, optimizer


def warned(caplog, pattern: str) -> bool:
    """A single warning of the adamw_lm.checkpoint logger matched ``pattern``, on one line."""
    records = [r for r in caplog.records if r.name == "adamw_lm.checkpoint"]
    assert len(records) == 1 and records[0].levelname == "WARNING", records
    message = records[0].getMessage()
    assert "\n" not in message
    return re.search(pattern, message) is not None


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


def assert_untouched(run_dir: Path, steps: list[int]) -> None:
    """Every listed checkpoint still verifies."""
    for step in steps:
        assert checkpoint.verify(step_dir(run_dir, step))["step"] == step


# -- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ALL_PRECISIONS)
def test_round_trip_is_bit_identical_and_continues_identically(tiny_model_path, tmp_path,
                                                               precision):
    model, optimizer = lora_model(tiny_model_path), make_optimizer(precision)
    lm_steps(model, optimizer, 3)
    state = {"step": 3, "losses": [2.5, float("nan"), 0.1 + 0.2], "data": {"epoch": 0, "offset": 6}}
    path = checkpoint.save(tmp_path, 3, model, optimizer, state, adapter_config(tiny_model_path))

    assert path == step_dir(tmp_path, 3)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-0000003\n"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["adapters.safetensors", "adapter_config.json", "optimizer.safetensors",
         "trainer_state.json", "manifest.json"]
    )  # fmt: skip
    stored, metadata = mx.load(str(path / "optimizer.safetensors"), return_metadata=True)
    assert json.loads(metadata["precision_plan"]) == optimizer.precision_plan
    assert json.loads(metadata["hyperparameters"])["state_precision"] == precision
    # Quantized moments are stored as they are held (codes + scales), never re-expanded.
    assert stored.keys() == dict(tree_flatten(optimizer.state)).keys()

    model2, optimizer2 = lora_model(tiny_model_path), make_optimizer(precision)
    loaded = checkpoint.load(path, model2, optimizer2)

    assert loaded["step"] == 3 and loaded["data"] == state["data"]
    assert loaded["losses"][0] == 2.5 and math.isnan(loaded["losses"][1])
    assert loaded["losses"][2] == 0.1 + 0.2
    assert set(loaded["versions"]) == {"adamw_lm", "mlx", "mlx_lm"}
    assert_trees_equal(model2.trainable_parameters(), model.trainable_parameters())
    assert_trees_equal(optimizer2.state, optimizer.state)
    # The restored optimizer is live: further steps (random key included) match bit for bit.
    assert lm_steps(model2, optimizer2, 2, first=3) == lm_steps(model, optimizer, 2, first=3)
    assert_trees_equal(model2.trainable_parameters(), model.trainable_parameters())
    assert_trees_equal(optimizer2.state, optimizer.state)


def last_layer_trainable(model_path: Path) -> nn.Module:
    model, _ = load_model(model_path)
    model.freeze()
    model.model.layers[-1].unfreeze()
    return model


def test_full_fine_tune_and_step_zero_round_trip(tiny_model_path, tmp_path):
    model, optimizer = last_layer_trainable(tiny_model_path), make_optimizer("fp32")
    config = {"fine_tune_type": "full", "num_layers": 1, "lora_parameters": None}
    # Step 0: the optimizer has never stepped; the checkpoint still holds its complete state.
    path = checkpoint.save(tmp_path, 0, model, optimizer, {}, config)
    model2, optimizer2 = last_layer_trainable(tiny_model_path), make_optimizer("fp32")
    checkpoint.load(path, model2, optimizer2)
    assert_trees_equal(optimizer2.state, optimizer.state)
    assert lm_steps(model2, optimizer2, 2) == lm_steps(model, optimizer, 2)

    path = checkpoint.save(tmp_path, 2, model, optimizer, {}, config)
    model3, optimizer3 = last_layer_trainable(tiny_model_path), make_optimizer("fp32")
    checkpoint.load(path, model3, optimizer3)
    assert_trees_equal(model3.trainable_parameters(), model.trainable_parameters())
    assert_trees_equal(optimizer3.state, optimizer.state)
    # mlx-lm loads a full fine-tune's "adapters" as the trained weights.
    mlx_lm_model, _ = mlx_lm_load(str(tiny_model_path), adapter_path=str(path))
    assert mx.array_equal(logits(mlx_lm_model), logits(model)).item()


def test_mlx_optimizers_adamw_state_resumes_in_adamw_lm(tiny_model_path, tmp_path):
    model = lora_model(tiny_model_path)
    reference = optim.AdamW(1e-2, weight_decay=0.01)
    lm_steps(model, reference, 2)
    path = checkpoint.save(tmp_path, 2, model, reference, {}, adapter_config(tiny_model_path))

    model2, ours = lora_model(tiny_model_path), make_optimizer(None)
    checkpoint.load(path, model2, ours)
    assert lm_steps(model2, ours, 2, first=2) == lm_steps(model, reference, 2, first=2)
    assert_trees_equal(ours.state, reference.state)


# -- mlx-lm compatibility ----------------------------------------------------------------------


def test_checkpoint_adapters_work_in_mlx_lm_load_and_fuse(tiny_model_path, tmp_path, monkeypatch):
    model, optimizer = lora_model(tiny_model_path), make_optimizer("fp32")
    lm_steps(model, optimizer, 3)
    config = adapter_config(tiny_model_path)
    path = checkpoint.save(tmp_path / "run", 3, model, optimizer, {}, config)

    mlx_lm_model, _ = mlx_lm_load(str(tiny_model_path), adapter_path=str(path))
    assert mx.array_equal(logits(mlx_lm_model), logits(model)).item()

    from mlx_lm import fuse

    fused_path = tmp_path / "fused"
    monkeypatch.setattr(
        sys, "argv",
        ["mlx_lm.fuse", "--model", str(tiny_model_path), "--adapter-path", str(path),
         "--save-path", str(fused_path)],
    )  # fmt: skip
    fuse.main()
    fused, _ = mlx_lm_load(str(fused_path))
    assert mx.allclose(logits(fused), logits(model), atol=1e-4).item()


def write_mlx_lm_adapter_folder(folder: Path, model: nn.Module, config: dict) -> None:
    """What `mlx_lm lora` leaves in --adapter-path: its arguments through save_config and
    dict(tree_flatten(model.trainable_parameters())) through mx.save_safetensors (see
    mlx_lm/lora.py and mlx_lm/tuner/trainer.py)."""
    folder.mkdir(parents=True)
    save_config({**config, "iters": 10, "learning_rate": 1e-5, "optimizer": "adamw"},
                folder / "adapter_config.json")
    mx.save_safetensors(str(folder / "adapters.safetensors"),
                        dict(tree_flatten(model.trainable_parameters())))


def test_mlx_lm_lora_adapters_seed_a_new_run(tiny_model_path, tmp_path):
    trained = lora_model(tiny_model_path)
    lm_steps(trained, make_optimizer(None), 2)
    folder = tmp_path / "adapters"
    write_mlx_lm_adapter_folder(folder, trained, adapter_config(tiny_model_path))

    model = lora_model(tiny_model_path)
    config = checkpoint.load_adapters_only(folder, model)
    assert config["lora_parameters"]["rank"] == 4 and config["iters"] == 10
    assert_trees_equal(model.trainable_parameters(), trained.trainable_parameters())
    mlx_lm_model, _ = mlx_lm_load(str(tiny_model_path), adapter_path=str(folder))
    assert mx.array_equal(logits(mlx_lm_model), logits(model)).item()
    # The seeded run trains with a fresh optimizer and checkpoints as usual.
    optimizer = make_optimizer("fp32")
    lm_steps(model, optimizer, 1)
    path = checkpoint.save(tmp_path / "run", 1, model, optimizer, {}, config)
    assert checkpoint.verify(path)["step"] == 1
    assert checkpoint.load_adapters_only(path, lora_model(tiny_model_path)) == config

    # The same key / shape checks as a checkpoint: another rank mismatches every LoRA matrix.
    other = lora_model(tiny_model_path, rank=8)
    before = dict(tree_flatten(other.trainable_parameters()))
    with pytest.raises(IncompatibleCheckpointError) as e:
        checkpoint.load_adapters_only(folder, other)
    message = str(e.value)
    assert str(folder / "adapters.safetensors") in message and "(28 mismatches" in message
    assert (
        "model.layers.0.mlp.down_proj.lora_a: expected (128, 8) float32, found (128, 4) float32"
        in message
    )
    assert_trees_equal(other.trainable_parameters(), before)

    (folder / "adapter_config.json").unlink()
    with pytest.raises(NoCheckpointError, match="adapter_config.json not found"):
        checkpoint.load_adapters_only(folder, model)


# -- rotation and temporaries ------------------------------------------------------------------


def test_rotation_keeps_newest_best_and_latest(tiny_model_path, tmp_path):
    model, optimizer = lora_model(tiny_model_path), make_optimizer(None)
    config = adapter_config(tiny_model_path)
    val = {1: 5.0, 2: 1.0, 3: 4.0, 4: float("nan"), 5: 2.0, 6: 6.0}
    for step, loss in val.items():
        path = checkpoint.save(tmp_path, step, model, optimizer, {}, config,
                               keep_last=2, keep_best=2, val_loss=loss)
        assert checkpoint.verify(path)["val_loss"] == (None if math.isnan(loss) else loss)

    def kept():
        return sorted(int(p.name[5:]) for p in (tmp_path / "checkpoints").glob("step-*"))

    assert kept() == [2, 5, 6]  # newest two (5, 6) + best two (2: 1.0, 5: 2.0)
    # A rollback: step 3 saved again becomes latest; it is kept though older than 6 and not best.
    checkpoint.save(tmp_path, 3, model, optimizer, {}, config, keep_last=1, val_loss=9.0)
    assert kept() == [3, 6]
    assert checkpoint.latest_checkpoint(tmp_path) == step_dir(tmp_path, 3)
    checkpoint.save(tmp_path, 7, model, optimizer, {}, config, keep_best=1, val_loss=7.0)
    assert kept() == [6, 7]  # best (6.0) + latest
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_saving_a_step_again_replaces_it(tiny_model_path, tmp_path):
    model, optimizer = lora_model(tiny_model_path), make_optimizer("fp32")
    config = adapter_config(tiny_model_path)
    checkpoint.save(tmp_path, 5, model, optimizer, {"try": 1}, config)
    lm_steps(model, optimizer, 1)
    checkpoint.save(tmp_path, 5, model, optimizer, {"try": 2}, config)

    model2, optimizer2 = lora_model(tiny_model_path), make_optimizer("fp32")
    assert checkpoint.load_latest(tmp_path, model2, optimizer2)[1]["try"] == 2
    assert_trees_equal(model2.trainable_parameters(), model.trainable_parameters())
    listing = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert listing == ["latest", "step-0000005"]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_stale_temporaries_are_ignored_then_cleaned(run):
    run_dir, model, optimizer = run
    root = run_dir / "checkpoints"
    dead = dead_pid()
    # A complete copy under a temporary name, with a higher step: still never a checkpoint.
    shutil.copytree(step_dir(run_dir, 2), root / f".tmp-step-0000009-{dead}")
    (root / f".trash-step-0000001-{dead}").mkdir()
    (root / f".tmp-latest-{dead}").write_text("step-0000009\n")
    live = root / f".tmp-step-0000010-{os.getppid()}"  # a save in progress in another process
    live.mkdir()

    (root / "latest").unlink()  # so that every folder is a candidate
    assert checkpoint.latest_checkpoint(run_dir) == step_dir(run_dir, 2)
    checkpoint.save(run_dir, 3, model, optimizer, {}, {})
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["latest", "step-0000001", "step-0000002", "step-0000003", live.name]
    )


def test_a_folder_a_killed_save_moved_aside_is_put_back_one_a_rotation_dropped_is_not(run):
    """A save replacing a step folder moves the old one aside (.trash-...) before renaming the new
    one into place; killed in between, the next save (and checkpoint.recover, which resume calls
    first) puts the old one back. A folder a rotation was deleting (.drop-...) stays deleted, and
    a half-deleted aside folder is not put back."""
    run_dir, model, optimizer = run
    root = run_dir / "checkpoints"
    dead, token = dead_pid(), "0123456789abcdef"
    (root / "step-0000002").rename(root / f".trash-step-0000002-{token}-{dead}")
    (root / "step-0000001").rename(root / f".drop-step-0000001-{token}-{dead}")
    assert checkpoint.recover(run_dir) == ["step-0000002"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000002"]
    checkpoint.verify(root / "step-0000002")

    (root / "step-0000002").rename(root / f".trash-step-0000002-{token}-{dead}")
    (root / f".trash-step-0000002-{token}-{dead}" / "manifest.json").unlink()
    checkpoint.save(run_dir, 3, model, optimizer, {}, {})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000003"]


# -- bad input ---------------------------------------------------------------------------------


def test_flipped_byte_is_a_checksum_mismatch_naming_both_hashes(run, caplog):
    run_dir, model, optimizer = run
    path = step_dir(run_dir, 2) / "optimizer.safetensors"
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    found = hashlib.sha256(bytes(data)).hexdigest()

    with pytest.raises(CorruptCheckpointError) as e:
        checkpoint.verify(path.parent)
    assert str(e.value).endswith(
        f"optimizer.safetensors: checksum mismatch: expected sha256 {expected}, found {found}"
    )
    before = dict(tree_flatten(model.trainable_parameters()))
    fresh = make_optimizer("fp32")
    with pytest.raises(CorruptCheckpointError, match="optimizer.safetensors: checksum mismatch"):
        checkpoint.load(path.parent, model, fresh)
    assert_trees_equal(model.trainable_parameters(), before)
    assert fresh.state["step"].item() == 0 and len(fresh.state) == 2  # nothing was loaded

    # latest names the corrupt checkpoint: fall back to the newest one that verifies, and say so.
    found_path, state = checkpoint.load_latest(run_dir, model, fresh)
    assert found_path == step_dir(run_dir, 1) and state["step"] == 1
    assert warned(caplog, "names an unusable checkpoint.*checksum mismatch")
    assert_untouched(run_dir, [1])


def test_truncated_file_reports_expected_and_found_size(run, caplog):
    run_dir, _, _ = run
    path = step_dir(run_dir, 2) / "adapters.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CorruptCheckpointError) as e:
        checkpoint.verify(path.parent)
    assert (
        f"adapters.safetensors is truncated or altered: expected {size} bytes, found {size - 100}"
    ) in str(e.value)
    assert checkpoint.latest_checkpoint(run_dir) == step_dir(run_dir, 1)
    assert warned(caplog, "names an unusable checkpoint.*adapters.safetensors is truncated")
    assert_untouched(run_dir, [1])


def test_missing_file(run):
    run_dir, _, _ = run
    (step_dir(run_dir, 2) / "trainer_state.json").unlink()
    missing = r"trainer_state.json is missing \(the manifest lists \d+ bytes\)"
    with pytest.raises(CorruptCheckpointError, match=missing):
        checkpoint.verify(step_dir(run_dir, 2))
    assert_untouched(run_dir, [1])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "manifest.json is missing: .* is not a complete checkpoint"),
        (b'{"format": "adamw', "manifest.json is not valid JSON \\(line 1 column 12\\)"),
        (b"[]", "manifest.json is not an adamw_lm checkpoint manifest: expected format 'adamw_lm"),
    ],
)
def test_missing_or_invalid_manifest_is_not_a_complete_checkpoint(run, content, message, caplog):
    run_dir, _, _ = run
    manifest = step_dir(run_dir, 2) / "manifest.json"
    if content is None:
        manifest.unlink()
    else:
        manifest.write_bytes(content)
    with pytest.raises(CorruptCheckpointError, match=message):
        checkpoint.verify(manifest.parent)
    assert checkpoint.latest_checkpoint(run_dir) == step_dir(run_dir, 1)
    assert warned(caplog, "names an unusable checkpoint.*" + message)


def test_manifest_file_names_cannot_leave_the_folder(run):
    run_dir, _, _ = run
    path = step_dir(run_dir, 2) / "manifest.json"
    manifest = json.loads(path.read_text())
    files = manifest["files"]
    files["../step-0000001/trainer_state.json"] = files["trainer_state.json"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match="is not a plain file name"):
        checkpoint.verify(path.parent)


def test_newer_format_version_asks_for_an_upgrade(run):
    run_dir, model, optimizer = run
    path = step_dir(run_dir, 2) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = checkpoint.FORMAT_VERSION + 1
    path.write_text(json.dumps(manifest))
    message = (
        f"written by a newer adamw_lm \\(format {checkpoint.FORMAT_VERSION + 1} > supported "
        f"{checkpoint.FORMAT_VERSION}\\); upgrade"
    )
    with pytest.raises(IncompatibleCheckpointError, match="manifest.json: " + message):
        checkpoint.verify(path.parent)
    # Resuming silently from an older checkpoint would lose training: latest_checkpoint raises too.
    with pytest.raises(IncompatibleCheckpointError, match=message):
        checkpoint.load_latest(run_dir, model, optimizer)
    assert_untouched(run_dir, [1])


@pytest.mark.parametrize(
    ("other", "count", "first"),
    [
        # LoRA rank 8 instead of 4: every matrix has another shape.
        ({"rank": 8}, 28,
         "model.layers.0.mlp.down_proj.lora_a: expected (128, 8) float32, found (128, 4) float32"),
        # LoRA on the last layer only: the file holds keys the model does not train.
        ({"num_layers": 1}, 14,
         "model.layers.0.mlp.down_proj.lora_a: (128, 4) float32 in the file, but not a trainable "
         "parameter"),
    ],
)  # fmt: skip
def test_another_models_checkpoint_lists_the_first_mismatches(run, tiny_model_path, other, count,
                                                              first):
    run_dir, _, _ = run
    path = step_dir(run_dir, 2)
    model, optimizer = lora_model(tiny_model_path, **other), make_optimizer("fp32")
    before = dict(tree_flatten(model.trainable_parameters()))
    with pytest.raises(IncompatibleCheckpointError) as e:
        checkpoint.load(path, model, optimizer)
    lines = str(e.value).splitlines()
    assert lines[0] == (
        f"{path / 'adapters.safetensors'} does not fit the model's trainable parameters "
        f"({count} mismatches, first 5 listed):"
    )
    assert lines[1].strip() == first and len(lines) == 1 + 5 + 1
    # Nothing was changed, in memory or on disk.
    assert_trees_equal(model.trainable_parameters(), before)
    assert len(optimizer.state) == 2
    assert_untouched(run_dir, [1, 2])


def test_precision_mismatch_needs_the_conversion_flag(run, tiny_model_path):
    run_dir, _, _ = run
    model, optimizer = lora_model(tiny_model_path), make_optimizer(None)
    with pytest.raises(IncompatibleCheckpointError) as e:
        checkpoint.load(step_dir(run_dir, 2), model, optimizer)
    message = str(e.value)
    assert "optimizer.safetensors: parameter model.layers.0.self_attn.q_proj.lora_a" in message
    assert "precision 'fp32'" in message and "asks for None" in message
    assert "convert_precision=True" in message
    assert len(optimizer.state) == 2
    checkpoint.load(step_dir(run_dir, 2), model, optimizer, convert_precision=True)
    assert optimizer.state["step"].item() == 2


CONVERSIONS = sorted(
    {("fp32", p) for p in ALL_PRECISIONS if p != "fp32"} | {(p, None) for p in PRECISIONS},
    key=str,
)


@pytest.mark.parametrize(("stored", "requested"), CONVERSIONS)
def test_precision_conversion_decodes_then_encodes(tiny_model_path, tmp_path, stored, requested):
    model, optimizer = lora_model(tiny_model_path), make_optimizer(stored)
    lm_steps(model, optimizer, 2)
    path = checkpoint.save(tmp_path, 2, model, optimizer, {}, adapter_config(tiny_model_path))
    model2, converted = lora_model(tiny_model_path), make_optimizer(requested)
    checkpoint.load(path, model2, converted, convert_precision=True)

    fresh = make_optimizer(requested)
    fresh.init(model2.trainable_parameters())
    layout = lambda opt: [(k, v.shape, v.dtype) for k, v in tree_flatten(opt.state)]  # noqa: E731
    assert layout(converted) == layout(fresh)
    assert converted.state["step"].item() == 2
    for name, param in tree_flatten(model.trainable_parameters()):
        olds = {which: moment(optimizer, name, which) for which in ("m", "v")}
        moments = (tuple(olds[which].astype(mx.float32) for which in ("m", "v")) if stored is None
                   else PRECISIONS[stored].decode(olds, param.shape, optimizer.eps))
        if requested is not None and PRECISIONS[requested].m_over_root_v:  # m stored as its step
            moments = (moments[0] / (mx.sqrt(moments[1]) + converted.eps), moments[1])
        for which, decoded in zip(("m", "v"), moments):
            new = moment(converted, name, which)
            if requested is None:
                assert mx.array_equal(new, decoded.astype(param.dtype)).item(), name
                continue
            codec = getattr(PRECISIONS[requested], which)
            if codec.stochastic:  # rounded with a key of its own: to a neighbouring level
                back = codec.decode(new, param.shape)
                if isinstance(new, dict):  # block-wise: within one gap of the block's largest
                    levels = codec.map.values()
                    gap = max(b - a for a, b in zip(levels, levels[1:]))
                    bound = gap * mx.abs(decoded).max().item() * (1 + 1e-6)
                    assert mx.abs(back - decoded).max().item() <= bound, name
                else:  # bfloat16: within one bfloat16 step
                    assert mx.allclose(back, decoded, rtol=2**-7, atol=0.0).item(), name
            else:
                assert_trees_equal(new, codec.encode(decoded, None))
    lm_steps(model2, converted, 1, first=2)


def test_int4_first_moment_is_reread_with_a_new_eps(tiny_model_path, tmp_path):
    """int4 stores m / (sqrt(v) + eps): resumed with another eps, the state is read with the eps it
    was written with and stored again with the new one, so m itself carries over (to within the
    rounding of the re-store); with the same eps it is restored bit for bit."""
    model, optimizer = lora_model(tiny_model_path), make_optimizer("int4")
    lm_steps(model, optimizer, 3)
    path = checkpoint.save(tmp_path, 3, model, optimizer, {}, adapter_config(tiny_model_path))
    same = make_optimizer("int4")
    checkpoint.load(path, lora_model(tiny_model_path), same)
    assert_trees_equal(same.state, optimizer.state)

    other = AdamW(1e-2, weight_decay=0.01, eps=1e-2, state_precision="int4", min_quantize_size=0)
    checkpoint.load(path, lora_model(tiny_model_path), other)
    codecs = PRECISIONS["int4"]
    largest_gap = max(b - a for a, b in zip(codecs.m.map.values(), codecs.m.map.values()[1:]))
    for name, param in tree_flatten(model.trainable_parameters()):
        stored = {which: moment(optimizer, name, which) for which in ("m", "v")}
        reread = {which: moment(other, name, which) for which in ("m", "v")}
        assert_trees_equal(reread["v"], stored["v"])  # v does not depend on eps
        m, v = codecs.decode(stored, param.shape, optimizer.eps)
        again, _ = codecs.decode(reread, param.shape, other.eps)
        root = mx.sqrt(v) + other.eps
        bound = largest_gap * mx.abs(m / root).max().item() * (1 + 1e-6)
        assert mx.abs((again - m) / root).max().item() <= bound, name
        # Read with the new eps, the old steps would make another m: off by more, on average.
        wrong, _ = codecs.decode(stored, param.shape, other.eps)
        error = lambda x: mx.abs((x - m) / root).mean().item()  # noqa: E731
        assert error(again) < error(wrong) / 2, name


def moment(optimizer: AdamW, name: str, which: str):
    """One stored moment (an array, or codes + scales) of parameter ``name``."""
    prefix = f"{name}.{which}"
    flat = {
        k: v for k, v in tree_flatten(optimizer.state) if k == prefix or k.startswith(prefix + ".")
    }
    if prefix in flat:
        return flat[prefix]
    return tree_unflatten([(k[len(prefix) + 1:], v) for k, v in flat.items()])


@contextmanager
def file_size_limit(nbytes: int):
    """Writes past nbytes fail with EFBIG, for root too (unlike permissions, which root ignores)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_unwritable_run_dir_fails_before_touching_anything(run, tmp_path):
    run_dir, model, optimizer = run
    # Tests run as root, which ignores permission bits, so chmod cannot make a folder unwritable.
    # A path through a regular file fails with ENOTDIR for every user.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    unwritable = "not-a-folder/run.*Not a directory.*expected a writable directory"
    with pytest.raises(CheckpointWriteError, match=unwritable):
        checkpoint.save(blocker / "run", 3, model, optimizer, {}, {})
    assert blocker.read_text() == "x"

    # checkpoints/ itself is a file.
    other = tmp_path / "other"
    other.mkdir()
    (other / "checkpoints").write_text("keep me")
    with pytest.raises(CheckpointWriteError, match="other.*expected a writable directory"):
        checkpoint.save(other, 3, model, optimizer, {}, {})
    assert (other / "checkpoints").read_text() == "keep me"

    # A write that fails half-way (a file size limit, like a full disk): nothing lost or left.
    with file_size_limit(50_000), pytest.raises(CheckpointWriteError) as e:
        checkpoint.save(run_dir, 3, model, optimizer, {}, {})
    assert "could not write checkpoint step-0000003" in str(e.value)
    assert "File too large" in str(e.value) and "previous checkpoints are untouched" in str(e.value)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "latest", "step-0000001", "step-0000002"
    ]
    assert checkpoint.latest_checkpoint(run_dir) == step_dir(run_dir, 2)
    assert_untouched(run_dir, [1, 2])



def test_latest_that_cannot_be_pointed_says_the_checkpoint_was_written(run):
    run_dir, model, optimizer = run
    root = run_dir / "checkpoints"
    # A folder where the pointer file goes: the step folder is committed, the pointer cannot move.
    (root / "latest").unlink()
    (root / "latest").mkdir()
    (root / "latest" / "x").write_text("x")
    with pytest.raises(CheckpointWriteError) as e:
        checkpoint.save(run_dir, 3, model, optimizer, {"step": 3}, {})
    message = str(e.value)
    assert "checkpoint step-0000003 was written" in message and "latest could not be pointed" in message
    assert "untouched" not in message
    assert checkpoint.verify(step_dir(run_dir, 3))["step"] == 3
    assert_untouched(run_dir, [1, 2])

def test_no_checkpoint(tmp_path, run, caplog):
    run_dir, model, optimizer = run
    assert checkpoint.latest_checkpoint(tmp_path / "nowhere") is None
    assert checkpoint.load_latest(tmp_path / "nowhere", model, optimizer) is None
    with pytest.raises(NoCheckpointError, match="no checkpoint folder at"):
        checkpoint.load(tmp_path / "nowhere", model, optimizer)
    with pytest.raises(NoCheckpointError, match="is a run directory.*load_latest"):
        checkpoint.load(run_dir, model, optimizer)
    # Without latest, the newest step-* folder that verifies; one without a manifest is skipped.
    (run_dir / "checkpoints" / "latest").unlink()
    (run_dir / "checkpoints" / "step-0000099").mkdir()
    assert checkpoint.latest_checkpoint(run_dir) == step_dir(run_dir, 2)
    assert warned(caplog, "skipping .*step-0000099")


def test_describe_a_run_and_a_checkpoint(run):
    run_dir, _, _ = run
    shown = checkpoint.describe(run_dir)
    assert shown.startswith(f"run {run_dir}: 2 checkpoint folder(s): step-0000002, step-0000001")
    assert f"checkpoint {step_dir(run_dir, 2)}: step 2, verified" in shown
    assert "moment precisions: fp32 x 28 parameters" in shown
    sha = checkpoint.verify(step_dir(run_dir, 1))["files"]["optimizer.safetensors"]["sha256"]
    assert sha in checkpoint.describe(step_dir(run_dir, 1))
    (step_dir(run_dir, 1) / "adapters.safetensors").write_bytes(b"broken")
    with pytest.raises(CorruptCheckpointError, match="adapters.safetensors is truncated"):
        checkpoint.describe(step_dir(run_dir, 1))


def test_bad_arguments_write_nothing(tiny_model_path, tmp_path):
    model, optimizer = lora_model(tiny_model_path), make_optimizer(None)
    with pytest.raises(ValueError, match="step must be an int from 0 to"):
        checkpoint.save(tmp_path / "a", -1, model, optimizer, {}, {})
    with pytest.raises(ValueError, match="keep_last must be None or an int >= 1"):
        checkpoint.save(tmp_path / "a", 1, model, optimizer, {}, {}, keep_last=0)
    with pytest.raises(TypeError, match="trainer_state must be JSON-serializable.*array"):
        checkpoint.save(tmp_path / "a", 1, model, optimizer, {"loss": mx.array(1.0)}, {})
    # What a load would refuse is never written: the checkpoint would be lost.
    refused = "trainer_state would not load back: trainer_state.json: iteration 2 is not the"
    with pytest.raises(ValueError, match=refused):
        checkpoint.save(tmp_path / "a", 1, model, optimizer, {"iteration": 2}, {})
    with pytest.raises(ValueError, match="adapter_config.json holds NaN.*a load would refuse it"):
        checkpoint.save(tmp_path / "a", 1, model, optimizer, {}, {"scale": float("nan")})
    frozen, _ = load_model(tiny_model_path)
    frozen.freeze()
    with pytest.raises(ValueError, match="no trainable parameters"):
        checkpoint.save(tmp_path / "a", 1, frozen, optimizer, {}, {})
    assert not (tmp_path / "a").exists()
