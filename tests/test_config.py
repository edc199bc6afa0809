"""Run configs: mlx_lm lora's keys and meanings, our sections, and clear errors."""

import mlx.optimizers as optim
import pytest
import yaml
from mlx_lm.lora import CONFIG_DEFAULTS

from adamw_lm.config import ConfigError, from_dict, load_config
from adamw_lm.trainer import build_optimizer

# mlx-lm's examples/lora_config.yaml, keys and values as shipped (comments dropped).
MLX_LM_EXAMPLE = """
model: "mlx_model"
train: true
fine_tune_type: lora
training_mode: "normal"
optimizer: adamw
optimizer_config:
  adamw:
    betas: [0.9, 0.98]
    eps: 1e-6
    weight_decay: 0.05
    bias_correction: true
data: "/path/to/training/data"
seed: 0
num_layers: 16
batch_size: 4
iters: 1000
val_batches: 25
learning_rate: 1e-5
steps_per_report: 10
steps_per_eval: 200
resume_adapter_file: null
adapter_path: "adapters"
save_every: 100
test: false
test_batches: 100
max_seq_length: 2048
grad_checkpoint: false
lora_parameters:
  keys: ["self_attn.q_proj", "self_attn.v_proj"]
  rank: 8
  scale: 20.0
  dropout: 0.0
lr_schedule:
  name: cosine_decay
  warmup: 100
  warmup_init: 1e-7
  arguments: [1e-5, 1000, 1e-7]
"""


def test_mlx_lm_example_config_accepted_unchanged(tmp_path):
    path = tmp_path / "lora_config.yaml"
    path.write_text(MLX_LM_EXAMPLE)
    config = load_config(path)
    assert config.model == "mlx_model"
    assert config.lora_parameters["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert config.learning_rate == 1e-5 and isinstance(config.learning_rate, float)
    assert config.optimizer.betas == [0.9, 0.98]
    assert config.optimizer.eps == 1e-6
    assert config.optimizer.weight_decay == 0.05
    assert config.optimizer.bias_correction is True
    assert config.optimizer.state_precision is None  # mlx-exact unless asked otherwise
    assert config.run_dir.name == "adapters"
    opt = build_optimizer(config)
    assert opt.betas == [0.9, 0.98] and opt.bias_correction
    # The schedule is mlx-lm's own build_schedule: warm-up from 1e-7, then cosine.
    assert abs(opt.learning_rate.item() - 1e-7) < 1e-12


def test_every_mlx_lm_default_key_is_accepted():
    data = dict(CONFIG_DEFAULTS, train=True)
    config = from_dict(data)
    # mlx-lm's default optimizer is Adam: AdamW with no weight decay, bit for bit.
    assert CONFIG_DEFAULTS["optimizer"] == "adam" and config.optimizer.weight_decay == 0.0
    for key, value in CONFIG_DEFAULTS.items():
        if key not in ("optimizer", "optimizer_config", "train"):
            assert getattr(config, key) == value, key


def test_our_sections_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "model": "m", "data": "d",
        "optimizer": {"state_precision": "fp32", "weight_decay": 0.0},
        "checkpoint": {"every": 5, "keep_last": 2, "dir": "runs/x"},
    }))
    config = load_config(path, {"iters": 7, "optimizer.state_precision": None, "learning_rate": 1e-3})
    assert config.iters == 7 and config.learning_rate == 1e-3
    assert config.optimizer.state_precision is None and config.optimizer.weight_decay == 0.0
    assert config.checkpoint_every == 5 and str(config.run_dir) == "runs/x"
    assert from_dict(config.to_dict()) == config  # plain data round-trips (trainer_state keeps it)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"iter": 10}, "unknown config key 'iter'; did you mean 'iters'?"),
        ({"optimizer": {"state_precison": "int8"}}, "did you mean 'state_precision'?"),
        ({"checkpoint": {"keep_lst": 2}}, "'checkpoint.keep_lst'; did you mean 'keep_last'?"),
        ({"iters": "ten"}, "config key 'iters' must be int, got 'ten'"),
        ({"learning_rate": "fast"}, "'learning_rate' must be float"),
        ({"grad_checkpoint": "yes"}, "'grad_checkpoint' must be bool"),
        ({"fine_tune_type": "qlora"}, "lora, dora, full"),
        ({"optimizer": "sgd"}, "AdamW only"),
        ({"iters": 0}, "'iters' must be >= 1"),
        ({"checkpoint": {"keep_last": 0}}, "'checkpoint.keep_last' must be >= 1"),
        ({"train": False}, "'train' is false"),
    ],
)
def test_bad_config_messages(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    assert message in str(e.value)


def test_bad_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("iters: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("batchsize: 4\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key 'batchsize'; did you mean 'batch_size'"):
        load_config(typo)


def test_adam_is_adamw_without_decay():
    config = from_dict({"optimizer": "adam", "optimizer_config": {"adam": {"betas": [0.8, 0.9]}}})
    opt = build_optimizer(config)
    assert opt.weight_decay == 0.0 and opt.betas == [0.8, 0.9]
    assert isinstance(opt, optim.AdamW)
