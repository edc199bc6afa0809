"""The `adamw-lm` command line and the trainer behind it: formats, fine-tune types, accumulation,
and bad input (exit status 2, one clear line, no traceback)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
import yaml

from adamw_lm import checkpoint, resuming, trainer
from adamw_lm.config import ConfigError, from_dict


def base(model: Path, data: Path, run_dir: Path, **extra) -> dict:
    cfg = {
        "model": str(model), "data": str(data), "fine_tune_type": "lora", "num_layers": 2,
        "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}, "batch_size": 4, "iters": 4,
        "val_batches": 1, "learning_rate": 1e-3, "steps_per_report": 1, "steps_per_eval": 100,
        "max_seq_length": 64, "adapter_path": str(run_dir), "optimizer": {"state_precision": "fp32"},
    }
    cfg.update(extra)
    return cfg


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adamw_lm.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("fmt", ["text", "chat", "completions"])
def test_each_dataset_format_trains(fmt, tmp_path, tiny_model_path, data_dir):
    data = data_dir if fmt == "text" else data_dir / fmt
    cfg = base(tiny_model_path, data, tmp_path / "run", mask_prompt=fmt != "text")
    result = trainer.run(from_dict(cfg), progress=False)
    assert result.iteration == 4 and all(mx.isfinite(mx.array(result.losses)).tolist())
    assert (tmp_path / "run" / "adapters.safetensors").exists()
    checkpoint.verify(result.checkpoint)


@pytest.mark.parametrize("fine_tune_type", ["lora", "dora", "full"])
def test_fine_tune_types_save_mlx_lm_adapters(fine_tune_type, tmp_path, tiny_model_path, data_dir):
    from mlx_lm import load

    cfg = base(tiny_model_path, data_dir, tmp_path / "run", fine_tune_type=fine_tune_type, num_layers=1)
    result = trainer.run(from_dict(cfg), progress=False)
    saved = mx.load(str(tmp_path / "run" / "adapters.safetensors"))
    names = set(saved)
    if fine_tune_type == "full":
        assert any(n.endswith("mlp.down_proj.weight") for n in names) and not any("lora" in n for n in names)
    else:
        assert any(n.endswith("lora_a") for n in names)
        assert any(n.endswith(".m") for n in names) == (fine_tune_type == "dora")
    # mlx-lm itself loads the final adapters and each checkpoint's.
    for folder in (tmp_path / "run", result.checkpoint):
        model, _ = load(str(tiny_model_path), adapter_path=str(folder))
        loaded = dict(__import__("mlx.utils").utils.tree_flatten(model.parameters()))
        assert all(mx.array_equal(loaded[k], v).item() for k, v in saved.items())


def test_grad_accumulation_equals_double_batch(tmp_path, tiny_model_path):
    # Identical examples make every batch the same, so two accumulated batches of 4 must give the
    # update of one batch of 8 (up to float rounding of the sum).
    data = tmp_path / "data"
    data.mkdir()
    line = json.dumps({"text": "The capital of France is Paris. Two plus two is four."}) + "\n"
    (data / "train.jsonl").write_text(line * 32)
    (data / "valid.jsonl").write_text(line * 8)
    common = dict(lora_parameters={"rank": 4, "scale": 10.0, "dropout": 0.0}, val_batches=0)
    trainer.run(from_dict(base(tiny_model_path, data, tmp_path / "a", batch_size=8, iters=3, **common)),
                    progress=False)
    b = trainer.run(from_dict(base(tiny_model_path, data, tmp_path / "b", batch_size=4, iters=6,
                                   grad_accumulation_steps=2, **common)), progress=False)
    wa = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    wb = mx.load(str(tmp_path / "b" / "adapters.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert mx.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6).item(), k
    assert json.loads((b.checkpoint / "trainer_state.json").read_text())["iteration"] == 6
    b_opt = mx.load(str(b.checkpoint / "optimizer.safetensors"))
    assert b_opt["step"].item() == 3  # three optimizer updates for six micro-batches


def test_train_cli_with_overrides_and_inspect(tmp_path, tiny_model_path, data_dir):
    cfg = write_yaml(tmp_path / "c.yaml", base(tiny_model_path, data_dir, tmp_path / "run"))
    done = cli("train", str(cfg), "--no-progress", "--iters", "3", "--optimizer.state_precision", "int8",
               "--optimizer.min_quantize_size=64", "--checkpoint.every", "2")
    assert done.returncode == 0, done.stderr
    assert "checkpoint" in done.stdout and str(tmp_path / "run") in done.stdout
    states = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert states == ["step-0000002", "step-0000003"]

    shown = cli("inspect", str(tmp_path / "run"))
    assert shown.returncode == 0, shown.stderr
    assert "step-0000003" in shown.stdout and "int8" in shown.stdout and "verified" in shown.stdout
    # Into a pipe whose reader is gone (`inspect RUN | head -1`): quiet, as other tools are.
    read_end, write_end = os.pipe()
    os.close(read_end)
    closed = subprocess.run([sys.executable, "-m", "adamw_lm.cli", "inspect", str(tmp_path / "run")],
                            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300)
    os.close(write_end)
    assert closed.returncode == 141 and closed.stderr == "", closed.stderr

    (tmp_path / "run" / "checkpoints" / "step-0000003" / "adapters.safetensors").write_bytes(b"broken")
    shown = cli("inspect", str(tmp_path / "run" / "checkpoints" / "step-0000003"))
    assert shown.returncode == 2 and "adapters.safetensors" in shown.stderr


def test_plan_cli_from_config_json(tmp_path, tiny_model_path):
    done = cli("plan", "--model", str(tiny_model_path / "config.json"), "--fine-tune-type", "full",
               "--all-parameters", "--precision", "fp32", "int8")
    assert done.returncode == 0, done.stderr
    assert "| fp32 |" in done.stdout and "| int8 |" in done.stdout and "None" not in done.stdout


def _trainable(plan_output: str) -> int:
    return int(re.search(r"([\d,]+) trainable", plan_output).group(1).replace(",", ""))


def test_plan_full_counts_what_train_trains(tiny_model_path, main_in_process):
    from mlx.utils import tree_flatten
    from mlx_lm import load

    from adamw_lm.memory import plan_from_config

    model, _ = load(str(tiny_model_path))
    total = sum(a.size for _, a in tree_flatten(model.parameters()))
    for num_layers in ("1", "-1"):
        trainer.setup_trainable(model, from_dict({"fine_tune_type": "full", "num_layers": int(num_layers)}))
        trained = sum(a.size for _, a in tree_flatten(model.trainable_parameters()))
        code, out, err = main_in_process("plan", "--model", str(tiny_model_path), "--fine-tune-type", "full",
                                         "--num-layers", num_layers)
        assert code == 0, err
        assert _trainable(out) == trained < total  # embeddings and head stay frozen, as in train
    code, out, _ = main_in_process("plan", "--model", str(tiny_model_path), "--fine-tune-type", "full",
                                   "--all-parameters")
    assert _trainable(out) == total
    # No --num-layers: mlx_lm lora's 16, for full as for lora (Llama-3.2-1B has 16 blocks, tied embeddings).
    llama = Path(__file__).resolve().parents[1] / "recipes" / "model-configs" / "llama-3.2-1b.json"
    done = cli("plan", "--model", str(llama), "--fine-tune-type", "full")
    assert done.returncode == 0, done.stderr
    everything = plan_from_config(llama, "full", num_layers=None)
    assert _trainable(done.stdout) == plan_from_config(llama, "full", num_layers=16).trainable_parameters
    assert everything.trainable_parameters - _trainable(done.stdout) == 128256 * 2048 + 2048  # embed + norm
    code, _, err = main_in_process("plan", "--model", str(tiny_model_path), "--fine-tune-type", "full")
    assert code == 2 and "num_layers=16 but the model has only 2 layers (-1: all of them)" in err
    done = cli("plan", "--model", str(tiny_model_path), "--all-parameters")
    assert done.returncode == 2 and "--all-parameters" in done.stderr and "--fine-tune-type full" in done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_tiny_model_cli(tmp_path):
    done = cli("tiny-model", str(tmp_path / "m"), "--seed", "1")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m" / "model.safetensors").exists() and str(tmp_path / "m") in done.stdout


def bad(tmp_path, tiny_model_path, data_dir, **changes) -> subprocess.CompletedProcess:
    cfg = base(tiny_model_path, data_dir, tmp_path / "run")
    cfg.update(changes)
    done = cli("train", str(write_yaml(tmp_path / "bad.yaml", cfg)), "--no-progress")
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    return done


def test_missing_model_path(tmp_path, tiny_model_path, data_dir):
    done = bad(tmp_path, tiny_model_path, data_dir, model=str(tmp_path / "no-such-model"))
    assert "'model'" in done.stderr and "no-such-model" in done.stderr


def test_missing_data_folder(tmp_path, tiny_model_path, data_dir):
    done = bad(tmp_path, tiny_model_path, data_dir, data=str(tmp_path / "no-such-data"))
    assert "'data'" in done.stderr and "no-such-data" in done.stderr


def test_malformed_jsonl_line_names_file_and_line(tmp_path, tiny_model_path, data_dir):
    data = tmp_path / "data"
    data.mkdir()
    lines = (data_dir / "train.jsonl").read_text().splitlines()
    lines[6] = lines[6][:-3]  # cut the closing of line 7
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    (data / "valid.jsonl").write_text((data_dir / "valid.jsonl").read_text())
    done = bad(tmp_path, tiny_model_path, data_dir, data=str(data))
    assert f"{data / 'train.jsonl'}, line 7" in done.stderr


def test_unknown_key_suggests(tmp_path, tiny_model_path, data_dir):
    done = bad(tmp_path, tiny_model_path, data_dir, learning_rte=1e-3)
    assert "unknown config key 'learning_rte'; did you mean 'learning_rate'?" in done.stderr
    assert "bad.yaml" in done.stderr


def test_wrong_type(tmp_path, tiny_model_path, data_dir):
    done = bad(tmp_path, tiny_model_path, data_dir, iters="ten")
    assert "'iters' must be int, got 'ten'" in done.stderr


def test_bad_override_and_bad_optimizer_value(tmp_path, tiny_model_path, data_dir):
    cfg = write_yaml(tmp_path / "c.yaml", base(tiny_model_path, data_dir, tmp_path / "run"))
    done = cli("train", str(cfg), "--batch-size", "many")
    assert done.returncode == 2 and "argument --batch-size: invalid int value: 'many'" in done.stderr
    done = cli("train", str(cfg), "--optimizer.state_precision", "int3")
    assert done.returncode == 2 and "state_precision" in done.stderr and "'int8'" in done.stderr
    assert "Traceback" not in done.stderr


def test_callback_for_mlx_lm_trainer(tmp_path, tiny_model_path, data_dir):
    """People who keep mlx_lm.tuner.trainer.train get full checkpoints through the callback."""
    import types

    from mlx_lm import load
    from mlx_lm.tuner.datasets import CacheDataset, load_dataset
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from adamw_lm import AdamW

    model, tokenizer = load(str(tiny_model_path))
    train_set, valid_set, _ = load_dataset(
        types.SimpleNamespace(data=str(data_dir), train=True, test=False, mask_prompt=False), tokenizer)
    model.freeze()
    lora = {"rank": 4, "scale": 10.0, "dropout": 0.0}
    linear_to_lora_layers(model, 2, lora)
    optimizer = AdamW(1e-3, state_precision="int8", min_quantize_size=64)
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora}
    callback = trainer.CheckpointCallback(tmp_path / "run", model, optimizer, config, every=4)
    train(model, optimizer, CacheDataset(train_set), CacheDataset(valid_set),
          args=TrainingArgs(batch_size=4, iters=8, val_batches=1, steps_per_report=2, steps_per_eval=4,
                            steps_per_save=100, max_seq_length=64,
                            adapter_file=str(tmp_path / "adapters.safetensors")),
          training_callback=callback)
    assert [p.name for p in callback.saved] == ["step-0000004", "step-0000008"]

    fresh, _ = load(str(tiny_model_path))
    fresh.freeze()
    linear_to_lora_layers(fresh, 2, lora)
    restored = AdamW(1e-3, state_precision="int8", min_quantize_size=64)
    state = checkpoint.load(callback.saved[-1], fresh, restored)
    assert state["iteration"] == 8
    assert restored.state["step"].item() == 8
    final = mx.load(str(tmp_path / "adapters.safetensors"))
    params = dict(__import__("mlx.utils").utils.tree_flatten(fresh.trainable_parameters()))
    assert all(mx.array_equal(params[k], v).item() for k, v in final.items())


def test_resume_with_other_precision_needs_the_flag(tmp_path, tiny_model_path, data_dir):
    cfg = write_yaml(tmp_path / "c.yaml", base(tiny_model_path, data_dir, tmp_path / "run", iters=2,
                                                optimizer={"state_precision": "fp32", "min_quantize_size": 64}))
    assert cli("train", str(cfg), "--no-progress").returncode == 0
    before = checkpoint.latest_checkpoint(tmp_path / "run")
    done = cli("resume", str(tmp_path / "run"), "--iters", "4", "--optimizer.state_precision", "int8")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "'fp32'" in done.stderr and "'int8'" in done.stderr and "--convert-precision" in done.stderr
    assert checkpoint.latest_checkpoint(tmp_path / "run") == before  # nothing lost or changed
    checkpoint.verify(before)

    done = cli("resume", str(tmp_path / "run"), "--iters", "4", "--optimizer.state_precision", "int8",
               "--convert-precision", "--no-progress")
    assert done.returncode == 0, done.stderr
    latest = checkpoint.latest_checkpoint(tmp_path / "run")
    assert latest.name == "step-0000004"
    state = mx.load(str(latest / "optimizer.safetensors"))
    assert any(k.endswith(".m.codes") or ".m." in k for k in state) and state["step"].item() == 4


def test_existing_run_folder_needs_resume_or_overwrite(tmp_path, tiny_model_path, data_dir):
    cfg = write_yaml(tmp_path / "c.yaml", base(tiny_model_path, data_dir, tmp_path / "run", iters=2,
                                               save_every=2))  # fmt: skip
    assert cli("train", "--config", str(cfg), "--no-progress").returncode == 0  # mlx_lm lora's --config
    assert (tmp_path / "run" / "0000002_adapters.safetensors").is_file()
    done = cli("train", str(cfg), "--no-progress")
    assert done.returncode == 2 and "already holds checkpoints" in done.stderr and "resume" in done.stderr
    assert checkpoint.latest_checkpoint(tmp_path / "run").name == "step-0000002"
    # A bad input with --overwrite fails before anything of the old run is deleted.
    done = cli("train", str(cfg), "--overwrite", "--model", str(tmp_path / "no-such-model"))
    assert done.returncode == 2 and checkpoint.latest_checkpoint(tmp_path / "run").name == "step-0000002"
    done = cli("train", str(cfg), "--no-progress", "--overwrite", "--iters", "1")
    assert done.returncode == 0, done.stderr
    names = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("step-")]
    assert names == ["step-0000001"]
    # Nothing of the old run passes for this one's: its numbered adapters went with it.
    assert not (tmp_path / "run" / "0000002_adapters.safetensors").exists()
    done = cli("train", str(cfg), "--config", str(cfg))
    assert done.returncode == 2 and "two config files" in done.stderr


def test_test_set_evaluation_and_seeding_from_mlx_lm_adapters(tmp_path, tiny_model_path, data_dir):
    first = trainer.run(from_dict(base(tiny_model_path, data_dir, tmp_path / "a", iters=2)), progress=False)
    # An mlx_lm lora adapters file seeds a new run: its weights are where the new run starts.
    seeded = base(tiny_model_path, data_dir, tmp_path / "b", iters=1, test=True, test_batches=2,
                  resume_adapter_file=str(tmp_path / "a" / "adapters.safetensors"),
                  optimizer={"state_precision": "fp32", "weight_decay": 0.0}, learning_rate=0.0)
    done = cli("train", str(write_yaml(tmp_path / "b.yaml", seeded)), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "Test loss" in done.stdout and "Test ppl" in done.stdout
    a = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "b" / "adapters.safetensors"))
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)  # learning rate 0: unchanged
    assert first.iteration == 2
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert any("test_loss" in r for r in records)

    wrong = base(tiny_model_path, data_dir, tmp_path / "c", iters=1,
                 lora_parameters={"rank": 2, "scale": 10.0, "dropout": 0.0},
                 resume_adapter_file=str(tmp_path / "a" / "adapters.safetensors"))
    done = cli("train", str(write_yaml(tmp_path / "c.yaml", wrong)), "--no-progress")
    assert done.returncode == 2 and "adapters.safetensors" in done.stderr and "expected" in done.stderr


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "a b c"}', "", '{"text": "d"}'], "line 2: empty line"),
        (['{"text": "a b c"}', '{"txt": "d"}'], "line 2: missing ['text']"),
        (['{"foo": 1}'], "line 1: no known data format"),
        (['["text"]'], "line 1: expected a JSON object"),
        # What mlx-lm would find out mid-run, in the tokenizer:
        (['{"text": "a b c"}', '{"text": null}'], "line 2: 'text' must be a string, got null"),
        (['{"messages": "hello"}'], "line 1: 'messages' must be a list of messages"),
        (['{"prompt": "a", "completion": 5}'], "line 1: 'completion' must be a string, got 5"),
        ([b'{"text": "caf\xe9"}'], "line 1: not UTF-8 (byte 0xe9 at column 14)"),
        ([], "is empty: give it records"),
    ],
)
def test_data_errors_name_file_and_line(lines, message, tmp_path, tiny_model_path, data_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n"
                                                for line in lines))  # fmt: skip
    done = bad(tmp_path, tiny_model_path, data_dir, data=str(data))
    assert f"{data / 'train.jsonl'}{' ' if not lines else ', '}{message}" in done.stderr


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_data_lines_end_as_mlx_lm_reads_them(newline, tmp_path, tiny_model_path, data_dir):
    """mlx-lm reads the files in text mode: a line ends at \\n, \\r\\n or a lone \\r."""
    from adamw_lm.loading import _check_jsonl

    path = tmp_path / "train.jsonl"
    path.write_bytes(newline.join([b'{"text": "a b"}', b'{"text": "c d"}', b""]))
    _check_jsonl(path, from_dict(base(tiny_model_path, data_dir, tmp_path / "run")))
    path.write_bytes(newline.join([b'{"text": "a b"}', b"", b'{"text": "c d"}']))
    with pytest.raises(ConfigError, match="line 2: empty line"):
        _check_jsonl(path, from_dict(base(tiny_model_path, data_dir, tmp_path / "run")))


@pytest.mark.parametrize("name, where", [("valid", "validation"), ("test", "test")])
def test_sets_smaller_than_a_batch_are_refused_before_training(name, where, tmp_path,
                                                              tiny_model_path, data_dir):
    """mlx-lm would stop at the first validation, or at the test once training is over."""
    data = tmp_path / "data"
    data.mkdir()
    for part in ("train", "valid", "test"):
        lines = (data_dir / f"{part}.jsonl").read_text().splitlines()
        (data / f"{part}.jsonl").write_text("\n".join(lines[:2] if part == name else lines) + "\n")
    done = bad(tmp_path, tiny_model_path, data_dir, data=str(data), test=True)
    assert f"'batch_size' is 4 but the {where} set (data {data}) has only 2 examples" in done.stderr


def test_lora_key_of_a_layer_lora_cannot_replace(tmp_path, tiny_model_path, data_dir):
    lora = {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": ["input_layernorm"]}
    done = bad(tmp_path, tiny_model_path, data_dir, lora_parameters=lora)
    assert "config key 'lora_parameters.keys'" in done.stderr and "RMSNorm" in done.stderr


def test_num_layers_0_is_every_layer_as_in_mlx_lm(tmp_path, tiny_model_path, data_dir):
    """mlx-lm slices ``layers[-num_layers:]``: 0 takes them all, with keys given or not."""
    lora = {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]}
    cfg = base(tiny_model_path, data_dir, tmp_path / "run", iters=1, num_layers=0, lora_parameters=lora)
    done = cli("train", str(write_yaml(tmp_path / "zero.yaml", cfg)), "--no-progress")
    assert done.returncode == 0, done.stderr
    layers = {k.split(".")[2] for k in mx.load(str(tmp_path / "run" / "adapters.safetensors"))}
    count = json.loads((tiny_model_path / "config.json").read_text())["num_hidden_layers"]
    assert layers == {str(i) for i in range(count)}


def test_missing_resume_adapter_file_names_the_key(tmp_path, tiny_model_path, data_dir):
    done = bad(tmp_path, tiny_model_path, data_dir, resume_adapter_file=str(tmp_path / "nope.safetensors"))
    assert f"config key 'resume_adapter_file': {tmp_path / 'nope.safetensors'} not found" in done.stderr


def test_resume_with_a_model_of_another_shape_names_the_model(tmp_path, tiny_model_path, data_dir):
    """The fingerprints are compared before the adapters: another model is named as such, not as
    adapters that do not fit."""
    from adamw_lm.tiny import build_tiny_model

    cfg = write_yaml(tmp_path / "c.yaml", base(tiny_model_path, data_dir, tmp_path / "run", iters=2))
    assert cli("train", str(cfg), "--no-progress").returncode == 0
    other = build_tiny_model(tmp_path / "medium", size="medium", seed=0)
    done = cli("resume", str(tmp_path / "run"), "--iters", "3", "--model", str(other))
    assert done.returncode == 2 and "the model differs from the one this run trained on" in done.stderr


def test_max_seq_length_needs_two_tokens(tmp_path, tiny_model_path, data_dir):
    done = bad(tmp_path, tiny_model_path, data_dir, max_seq_length=1)
    assert "'max_seq_length' must be >= 2" in done.stderr


def test_quantized_model_full_fine_tune_and_parameter_count(tmp_path, tiny_model_path, data_dir):
    """A quantized model's packed weights take no gradient: a full fine-tune is a config error
    before training. LoRA on it trains, and the header counts its logical parameters, as mlx-lm."""
    from mlx_lm import load
    from mlx_lm.convert import convert
    from mlx_lm.utils import get_total_parameters

    quantized = tmp_path / "quantized"
    convert(str(tiny_model_path), mlx_path=str(quantized), quantize=True, q_group_size=32)
    done = bad(tmp_path, quantized, data_dir, fine_tune_type="full")
    assert "config key 'fine_tune_type' is 'full' but the model" in done.stderr
    assert "QuantizedLinear" in done.stderr
    cfg = base(quantized, data_dir, tmp_path / "lora", iters=1)
    done = cli("train", str(write_yaml(tmp_path / "lora.yaml", cfg)), "--no-progress")
    assert done.returncode == 0, done.stderr
    total = get_total_parameters(load(str(quantized))[0]) / 1e6
    assert re.search(rf"Trainable parameters: [0-9.]+% \([0-9.]+M/{total:.3f}M\)", done.stdout), done.stdout


@pytest.mark.parametrize(
    "schedule, message",
    [
        ({"name": "cosine_decay"}, "lr_schedule.arguments"),
        ({"name": "no_such_decay", "arguments": [1]}, "lr_schedule.name"),
        ({"name": "cosine_decay", "arguments": [1e-3]}, "lr_schedule"),
        ({"name": "cosine_decay", "arguments": [1e-3, 10], "warmpu": 3}, "lr_schedule.warmpu"),
    ],
)
def test_bad_schedule(schedule, message, tmp_path, tiny_model_path, data_dir):
    done = bad(tmp_path, tiny_model_path, data_dir, lr_schedule=schedule)
    assert message in done.stderr


def test_defaults_follow_mlx_lm(tmp_path, tiny_model_path, data_dir):
    from adamw_lm.config import load_config

    path = write_yaml(tmp_path / "c.yaml", {"model": "m", "data": "d"})
    config = load_config(path, {"lora_parameters.rank": 16})
    assert trainer.build_optimizer(config).weight_decay == 0.0  # mlx_lm lora's default is Adam
    assert config.lora_parameters == {"rank": 16, "dropout": 0.0, "scale": 20.0}


def test_mask_prompt_masks(tmp_path, tiny_model_path, data_dir):
    losses = {}
    for mask in (False, True):
        cfg = base(tiny_model_path, data_dir / "completions", tmp_path / f"run{mask}", iters=2,
                   mask_prompt=mask, val_batches=0)
        losses[mask] = trainer.run(from_dict(cfg), progress=False).losses
    assert losses[True][0] != losses[False][0]  # same batch, fewer tokens in the loss


def test_checkpoints_fall_on_updates_and_keep_best_uses_matching_val_loss(tmp_path, tiny_model_path,
                                                                          data_dir):
    cfg = base(tiny_model_path, data_dir, tmp_path / "run", iters=7, grad_accumulation_steps=2,
               steps_per_eval=4, checkpoint={"every": 3, "keep_last": 10})
    result = trainer.run(from_dict(cfg), progress=False)
    folders = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("step-"))
    # due at 3 -> first update at 4; due at 6 -> 6; the end -> 7
    assert folders == ["step-0000004", "step-0000006", "step-0000007"]
    manifests = {n: json.loads((tmp_path / "run" / "checkpoints" / n / "manifest.json").read_text())
                 for n in folders}
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    val = dict((i, v) for i, v in state["val_losses"])
    assert sorted(val) == [0, 4, 7]
    assert manifests["step-0000004"]["val_loss"] == val[4]
    assert manifests["step-0000006"]["val_loss"] is None
    assert manifests["step-0000007"]["val_loss"] == val[7]


# -- the command lines mlx_lm lora users type ---------------------------------------------------

# Every option of mlx_lm lora, one unit each (an option with its value, or a switch alone).
MLX_LM_UNITS = [
    ["--model", "M"], ["--train"], ["--data", "D"], ["--fine-tune-type", "dora"], ["--optimizer", "adamw"],
    ["--mask-prompt"], ["--num-layers", "-1"], ["--batch-size=2"], ["--iters", "2"], ["--val-batches", "-1"],
    ["--learning-rate", "1e-4"], ["--steps-per-report", "5"], ["--steps-per-eval", "9"],
    ["--grad-accumulation-steps", "2"], ["--resume-adapter-file", "a.safetensors"], ["--adapter-path", "out"],
    ["--save-every", "7"], ["--test"], ["--test-batches", "3"], ["--max-seq-length", "128"],
    ["--grad-checkpoint"], ["--clear-cache-threshold", "2GB"], ["--report-to", "wandb"],
    ["--project-name", "p"], ["--seed", "3"], ["--trust-remote-code"],
]


@pytest.mark.parametrize("order", ["as listed", "reversed", "config in the middle"])
def test_every_mlx_lm_option_means_what_mlx_lm_parses(order):
    from mlx_lm.lora import build_parser as mlx_lm_parser

    from adamw_lm.cli import parse_run_args

    parser = mlx_lm_parser()
    options = {s for a in parser._actions for s in a.option_strings if s.startswith("--")} - {"--help", "--config"}
    assert options == {u[0].split("=")[0] for u in MLX_LM_UNITS}  # a new mlx-lm option fails here
    units = MLX_LM_UNITS[::-1] if order == "reversed" else list(MLX_LM_UNITS)
    if order == "config in the middle":
        units.insert(len(units) // 2, ["cfg.yaml"])
    line = [token for unit in units for token in unit]
    defaults = vars(parser.parse_args([]))
    expected = {k: v for k, v in vars(parser.parse_args([t for t in line if t != "cfg.yaml"])).items()
                if v != defaults[k]}
    args = parse_run_args("train", line)
    assert args.overrides == expected
    assert args.path == ("cfg.yaml" if order == "config in the middle" else None)


@pytest.mark.parametrize(
    "line, path, overrides, flags",
    [
        (["-c", "c.yaml", "--iters", "2"], "c.yaml", {"iters": 2}, {}),
        (["--iters", "2", "c.yaml"], "c.yaml", {"iters": 2}, {}),
        (["--config=c.yaml", "--adapter-path", "X"], "c.yaml", {"adapter_path": "X"}, {}),
        (["-cc.yaml", "--adapter_path=X"], "c.yaml", {"adapter_path": "X"}, {}),
        (["c.yaml", "--optimizer.state_precision", "int8", "--checkpoint.keep_last=2", "--lora-parameters.rank",
          "16", "--overwrite", "--no-progress", "--grad_checkpoint=false"], "c.yaml",
         {"optimizer.state_precision": "int8", "checkpoint.keep_last": 2, "lora_parameters.rank": 16,
          "grad_checkpoint": False}, {"overwrite": True, "no_progress": True}),
        (["--optimizer.overrides", "{norm: fp32}", "--hf-dataset", "{path: org/name}", "c.yaml"], "c.yaml",
         {"optimizer.overrides": {"norm": "fp32"}, "hf_dataset": {"path": "org/name"}}, {}),
    ],
)
def test_train_lines_in_any_order(line, path, overrides, flags):
    from adamw_lm.cli import parse_run_args

    args = parse_run_args("train", line)
    assert (args.path, args.overrides) == (path, overrides)
    assert {k: getattr(args, k) for k in flags} == flags


@pytest.mark.parametrize("line", [
    ["RUN", "--iters", "60", "--step", "4", "--trust-remote-code", "--report-to", "wandb", "--hf-dataset"],
    ["--iters=60", "--hf-dataset", "--step", "4", "--report-to", "wandb", "--trust-remote-code", "RUN"],
])
def test_resume_passes_step_and_the_users_word_again(line, monkeypatch, main_in_process):
    calls = []
    monkeypatch.setattr(resuming, "resume", lambda run_dir, **kw: calls.append((run_dir, kw)) or trainer.RunResult(
        Path(run_dir), 60, None))
    assert main_in_process("resume", *line)[0] == 0
    assert calls == [("RUN", {"convert_precision": False, "progress": True, "step": 4, "overrides": {
        "iters": 60, "trust_remote_code": True, "report_to": "wandb", "hf_dataset": True},
        "accept_changed": frozenset()})]


def test_hub_resume_options_reach_resume_from_hub(monkeypatch, main_in_process):
    calls = []
    monkeypatch.setattr(resuming, "resume_from_hub", lambda source, **kw: calls.append((source, kw))
                        or trainer.RunResult(Path("runs/x"), 8, None))
    line = ["hub:alice/run@v1", "--run-dir", "here", "--repo-id", "bob/run", "--accept-changed-data",
            "--step", "4", "--iters", "8"]
    assert main_in_process("resume", *line)[0] == 0
    assert calls == [("hub:alice/run@v1", {"run_dir": "here", "repo_id": "bob/run", "convert_precision": False,
                                           "overrides": {"iters": 8}, "progress": True, "step": 4,
                                           "accept_changed": frozenset({"data"})})]
    code, _, err = main_in_process("resume", "RUN", "--run-dir", "here")
    assert code == 2 and "--run-dir is for a run resumed from the Hub" in err


def test_mlx_lm_forms_run(tmp_path, tiny_model_path, data_dir):
    """mlx-lm's config-less form, options before the config, -c with --adapter-path, resume --iters N RUN."""
    run = tmp_path / "run"
    done = cli("train", "--model", str(tiny_model_path), "--train", "--data", str(data_dir), "--iters", "2",
               "--num-layers", "2", "--batch-size", "4", "--val-batches", "1", "--max-seq-length", "64",
               "--learning-rate", "1e-3", "--steps-per-report", "1", "--adapter-path", str(run),
               "--lora-parameters.rank", "4", "--optimizer.state_precision", "int8",
               "--optimizer.min_quantize_size=64", "--checkpoint.keep_last", "1", "--no-progress")
    assert done.returncode == 0, done.stderr
    saved = json.loads((checkpoint.latest_checkpoint(run) / "trainer_state.json").read_text())["config"]
    assert (saved["iters"], saved["lora_parameters"]["rank"], saved["checkpoint"]["keep_last"]) == (2, 4, 1)
    assert saved["optimizer"]["name"] == "adam" and saved["optimizer"]["weight_decay"] == 0.0  # mlx-lm's Adam
    assert saved["optimizer"]["state_precision"] == "int8"

    done = cli("resume", "--iters", "3", "--no-progress", str(run))
    assert done.returncode == 0, done.stderr
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")] == ["step-0000003"]

    cfg = write_yaml(tmp_path / "c.yaml", base(tiny_model_path, data_dir, tmp_path / "from-yaml", iters=4))
    done = cli("train", "--iters", "2", str(cfg), "--adapter-path", str(tmp_path / "a"), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert checkpoint.latest_checkpoint(tmp_path / "a").name == "step-0000002"
    done = cli("train", "-c", str(cfg), "--iters", "1", "--adapter-path", str(tmp_path / "b"), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert checkpoint.latest_checkpoint(tmp_path / "b").name == "step-0000001"
    assert not (tmp_path / "from-yaml").exists()

    # A warning from our code is one plain line, not a Python UserWarning with its source line.
    (run / "checkpoints" / "latest").write_text("garbage")
    shown = cli("inspect", str(run))
    assert shown.returncode == 0, shown.stderr
    assert shown.stderr.splitlines() == [
        f"adamw-lm: warning: ignoring {run / 'checkpoints' / 'latest'}: it does not hold a checkpoint name"]


BAD_LINES = [
    (["train", "CFG", "--itres", "2"], "adamw-lm train: error: unknown option --itres; did you mean --iters?"),
    (["train", "CFG", "--iters", "two"], "adamw-lm train: error: argument --iters: invalid int value: 'two'"),
    (["train", "CFG", "--fine-tune-type", "qlora"], "argument --fine-tune-type: invalid choice: 'qlora'"),
    (["train", "CFG", "--clear-cache-threshold", "2XB"],
     "argument --clear-cache-threshold: invalid value '2XB'"),  # mlx-lm's parse_size: KeyError
    (["train", "CFG", "--clear-cache-threshold", "banana"],
     "argument --clear-cache-threshold: invalid value 'banana'"),  # decimal.InvalidOperation
    (["train", "CFG", "--iters"], "option --iters expects a value"),
    (["train", "CFG", "--step", "3"], "option --step belongs to `adamw-lm resume`, not `train`"),
    (["train", "CFG", "CFG"], "unexpected argument"),
    (["train", "CFG", "--train=maybe"], "option --train is a switch"),
    (["train", "CFG", "--lora-parameters.rnak", "4"], "unknown config key 'lora_parameters.rnak'; did you mean 'rank'?"),
    (["train", "CFG", "--optimizer.state_precison", "int8"], "'optimizer.state_precison'; did you mean 'state_precision'?"),
    (["train", "CFG", "--lora-layers", "4"], "unknown option --lora-layers; mlx-lm renamed it to --num-layers"),
    (["train", "CFG", "--train=false"], "'train' and 'test' are both false: nothing to do"),
    (["train", "CFG", "--seed", "-3"], "config key 'seed' must be from 0 to 2147483647"),
    (["train", "CFG", "--optimizer", "sgd"], "AdamW only"),
    (["train", "DUP"], "duplicate key 'iters' on line 3 (first on line 1)"),
    (["resume", "RUN", "--overwrite"], "adamw-lm resume: error: option --overwrite belongs to `adamw-lm train`"),
    (["resume", "--iters", "3"], "resume needs the run folder"),
    (["resume", "RUN", "--step", "last"], "option --step expects an int, got 'last'"),
    (["resume", "RUN", "-c", "CFG"], "resume reads the config saved in the run's checkpoint"),
]


@pytest.fixture
def main_in_process(monkeypatch, capsys):
    """``adamw_lm.cli.main`` in this process (for many cheap cases); logging and warnings restored after."""
    import logging
    import warnings

    from adamw_lm.cli import main

    logger = logging.getLogger("adamw_lm")
    for name in ("handlers", "propagate", "level"):
        monkeypatch.setattr(logger, name, getattr(logger, name))
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


# These few run as the real command; every line of BAD_LINES also runs through main() in-process.
SUBPROCESS_LINES = {0, 1, 12, 15, 16}


@pytest.mark.parametrize("index", range(len(BAD_LINES)), ids=lambda i: " ".join(BAD_LINES[i][0]))
def test_bad_command_lines_exit_2_with_one_line(index, tmp_path, tiny_model_path, data_dir, main_in_process):
    line, message = BAD_LINES[index]
    cfg = write_yaml(tmp_path / "c.yaml", base(tiny_model_path, data_dir, tmp_path / "run"))
    (tmp_path / "dup.yaml").write_text("iters: 3\nbatch_size: 2\niters: 4\n")
    paths = {"CFG": str(cfg), "DUP": str(tmp_path / "dup.yaml"), "RUN": str(tmp_path / "run")}
    args = [paths.get(t, t) for t in line]
    code, _, stderr = main_in_process(*args)
    if index in SUBPROCESS_LINES:
        done = cli(*args)
        assert done.stdout == "" and done.stderr == stderr
        code = done.returncode
    assert code == 2, (code, stderr)
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert message in stderr, stderr
    assert not (tmp_path / "run").exists()  # nothing was started


def test_logger_warnings_are_one_plain_line(capsys, main_in_process):
    import logging

    from adamw_lm.cli import configure_messages

    configure_messages()
    configure_messages()  # twice (main called twice in one process): still one line per warning
    logging.getLogger("adamw_lm.checkpoint").warning("falling back to %s", "step-0000002")
    logging.getLogger("adamw_lm").info("not shown")
    assert capsys.readouterr().err == "adamw-lm: warning: falling back to step-0000002\n"


def test_plan_step_options_and_memory(tmp_path):
    qwen = Path(__file__).resolve().parents[1] / "recipes" / "model-configs" / "qwen2.5-7b.json"
    done = cli("plan", "--model", str(qwen), "--fine-tune-type", "full", "--num-layers", "-1",
               "--batch-size", "1", "--max-seq-length", "2048", "--grad-checkpoint",
               "--memory", "64", "--precision", "none", "int4")
    assert done.returncode == 0, done.stderr
    assert "batch 1 x 2048 tokens, gradient checkpointing on" in done.stdout
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert rows["None (param dtype)"].endswith("does not fit |") and rows["int4"].endswith(" fits |")
    assert "about 75 % of RAM, 48.00 GB" in done.stdout
    for bad, message in ((["--batch-size", "0"], "--batch-size must be >= 1"),
                         (["--max-seq-length", "-3"], "--max-seq-length must be >= 1"),
                         (["--memory", "0"], "--memory must be a Mac's RAM in GB")):
        done = cli("plan", "--model", str(qwen), "--fine-tune-type", "full", *bad)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
