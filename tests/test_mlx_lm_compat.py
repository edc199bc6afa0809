"""adamw_lm.AdamW inside mlx-lm's own trainer: the same losses as mlx.optimizers.AdamW, step for step;
and `adamw-lm train` against the real `mlx_lm lora` on the same YAML."""

import json
import subprocess
import sys
import types

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
import yaml
from mlx_lm import load
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.datasets import CacheDataset, load_dataset
from mlx_lm.tuner.trainer import TrainingArgs, train
from mlx_lm.tuner.utils import linear_to_lora_layers

from adamw_lm import AdamW


class Losses(TrainingCallback):
    def __init__(self):
        self.train, self.val = [], []

    def on_train_loss_report(self, info):
        self.train.append((info["iteration"], info["train_loss"], info["learning_rate"]))

    def on_val_loss_report(self, info):
        self.val.append((info["iteration"], info["val_loss"]))


def run_mlx_lm_train(model_path, data_dir, tmp_path, make_optimizer, iters=20):
    np.random.seed(0)
    mx.random.seed(0)
    model, tokenizer = load(str(model_path))
    args = types.SimpleNamespace(data=str(data_dir), train=True, test=False, mask_prompt=False)
    train_set, valid_set, _ = load_dataset(args, tokenizer)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "dropout": 0.1, "scale": 10.0})
    losses = Losses()
    train(
        model,
        make_optimizer(),
        CacheDataset(train_set),
        CacheDataset(valid_set),
        args=TrainingArgs(
            batch_size=4, iters=iters, val_batches=2, steps_per_report=1, steps_per_eval=10,
            steps_per_save=1000, max_seq_length=128,
            adapter_file=str(tmp_path / "adapters.safetensors"),
        ),
        training_callback=losses,
    )
    return losses, dict(mx.load(str(tmp_path / "adapters.safetensors")))


@pytest.mark.parametrize("bias_correction", [False, True])
def test_mlx_lm_trainer_losses_identical(tiny_model_path, data_dir, tmp_path, bias_correction):
    kwargs = dict(learning_rate=5e-3, weight_decay=0.05, bias_correction=bias_correction)
    (tmp_path / "ours").mkdir()
    (tmp_path / "ref").mkdir()
    ours, w_ours = run_mlx_lm_train(tiny_model_path, data_dir, tmp_path / "ours", lambda: AdamW(**kwargs))
    ref, w_ref = run_mlx_lm_train(tiny_model_path, data_dir, tmp_path / "ref", lambda: optim.AdamW(**kwargs))
    assert len(ours.train) == 20
    assert ours.train == ref.train  # exact float equality, every iteration
    assert ours.val == ref.val
    assert ours.train[-1][1] < ours.train[0][1]  # it learned something
    assert w_ours.keys() == w_ref.keys()
    for k in w_ours:
        assert mx.array_equal(w_ours[k], w_ref[k]).item(), k


@pytest.mark.parametrize("extra", [
    {},  # mlx_lm lora's defaults: Adam, constant learning rate
    {"optimizer": "adamw", "optimizer_config": {"adamw": {"weight_decay": 0.05}}, "grad_accumulation_steps": 2,
     "lr_schedule": {"name": "cosine_decay", "warmup": 2, "arguments": [1e-3, 8, 1e-5]},
     "fine_tune_type": "dora", "grad_checkpoint": True},
], ids=["adam", "adamw-schedule-accumulation-dora-checkpointing"])
def test_same_yaml_gives_bit_identical_adapters_to_mlx_lm_lora(extra, tiny_model_path, data_dir, tmp_path):
    """The same YAML through the real `mlx_lm lora` and `adamw-lm train`: LoRA dropout 0 and inside the
    first epoch (100 batches), the adapters are equal bit for bit, at save_every and at the end."""
    config = {
        "model": str(tiny_model_path), "train": True, "data": str(data_dir), "fine_tune_type": "lora",
        "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}, "batch_size": 4,
        "iters": 8, "val_batches": 1, "learning_rate": 1e-3, "steps_per_report": 4, "steps_per_eval": 4,
        "save_every": 4, "max_seq_length": 96, "seed": 5, **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    runs = {}
    for name, command in (("mlx_lm", ["-m", "mlx_lm", "lora", "--config", str(path)]),
                          ("adamw_lm", ["-m", "adamw_lm.cli", "train", str(path), "--no-progress"])):
        runs[name] = tmp_path / name
        done = subprocess.run([sys.executable, *command, f"--adapter-path={runs[name]}"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    for file in ("adapters.safetensors", "0000004_adapters.safetensors", "0000008_adapters.safetensors"):
        ours, theirs = (mx.load(str(runs[name] / file)) for name in ("adamw_lm", "mlx_lm"))
        assert ours.keys() == theirs.keys() and ours
        for key in theirs:
            assert ours[key].dtype == theirs[key].dtype and mx.array_equal(ours[key], theirs[key]).item(), (file, key)
    ours_config = json.loads((runs["adamw_lm"] / "adapter_config.json").read_text())
    theirs_config = json.loads((runs["mlx_lm"] / "adapter_config.json").read_text())
    for key in ("fine_tune_type", "num_layers", "lora_parameters"):
        assert ours_config[key] == theirs_config[key]
