"""adamw_lm.AdamW inside mlx-lm's own trainer: the same losses as mlx.optimizers.AdamW, step for step."""

import types

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
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
