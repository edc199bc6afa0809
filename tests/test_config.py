"""Run configs: mlx_lm lora's keys and meanings, our sections, and clear errors."""

import dataclasses

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
        ({"train": False}, "'train' and 'test' are both false: nothing to do"),
        ({"lora_parameters": {"rnak": 16}}, "unknown config key 'lora_parameters.rnak'; did you mean 'rank'?"),
        ({"lora_parameters": {"alpha": 16}}, "'lora_parameters.alpha'; mlx-lm's LoRA uses 'scale'"),
        ({"lora_parameters": {"rank": "8"}}, "'lora_parameters.rank' must be an int from 1 to 65536, got '8'"),
        ({"lora_parameters": {"rank": 0}}, "'lora_parameters.rank' must be an int from 1"),
        ({"lora_parameters": {"rank": 2**31}}, "'lora_parameters.rank' must be an int from 1 to 65536, got 2147483648"),
        ({"lora_parameters": {"rank": 8.0}}, "'lora_parameters.rank' must be an int"),
        ({"lora_parameters": {"dropout": 1.5}}, "'lora_parameters.dropout' must be a number in [0, 1), got 1.5"),
        ({"lora_parameters": {"dropout": 1}}, "'lora_parameters.dropout' must be a number in [0, 1)"),
        ({"lora_parameters": {"scale": "big"}}, "'lora_parameters.scale' must be a finite number, got 'big'"),
        ({"lora_parameters": {"keys": "self_attn.q_proj"}}, "'lora_parameters.keys' must be a non-empty list"),
        ({"lora_parameters": {"keys": [1]}}, "'lora_parameters.keys' must be a non-empty list"),
        ({"lora_parameters": {"keys": []}}, "'lora_parameters.keys' must be a non-empty list"),
        ({"lora_parameters": [8]}, "config key 'lora_parameters' must be a dict, got [8]"),
        ({"lora_layers": 8}, "unknown config key 'lora_layers'; mlx-lm renamed it to 'num_layers'"),
        ({"seed": -1}, "config key 'seed' must be from 0 to 2147483647"),
        ({"seed": 2**32}, "config key 'seed' must be from 0 to 2147483647"),
        ({"iters": "10"}, "config key 'iters' must be int, got '10'"),
        ({"iters": 2**70}, "config key 'iters' is out of range (a 64-bit integer)"),
        ({"learning_rate": float("nan")}, "config key 'learning_rate' must be a finite number"),
        ({"optimizer": {"betas": [0.9, float("inf")]}}, "config key 'optimizer.betas' must be a finite number"),
        ({"optimizer": {"betas": [0.9]}}, "config key 'optimizer.betas' must be two numbers"),
        ({"lr_schedule": {"name": "cosine_decay", "arguments": []}}, "'lr_schedule.arguments' must be a non-empty list"),
        ({"lr_schedule": {"name": "cosine_decay", "arguments": ["1e-3", 10]}}, "'lr_schedule.arguments' must be"),
        ({"lr_schedule": {"name": "cosine_decay", "arguments": [1e-3]}}, "missing 1 required positional argument"),
        ({"lr_schedule": {"name": "join_schedules", "arguments": [1]}}, "'lr_schedule.name' must name"),
        ({"checkpoint": 5}, "config key 'checkpoint' must be a mapping of keys, got 5"),
        ({"checkpoint": {"every": "often"}}, "config key 'checkpoint.every' must be int or null"),
        ({"optimizer": 3}, "config key 'optimizer' must be a name (adam, adamw) or a mapping"),
        ({"optimizer": {"name": "sgd"}}, "AdamW only"),
    ],
)
def test_bad_config_messages(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    assert message in str(e.value)


@pytest.mark.parametrize("data", [[1, 2], "iters: 3", None, 7])
def test_a_config_that_is_not_a_mapping(data):
    with pytest.raises(ConfigError, match="a config must be a mapping of keys"):
        from_dict(data)


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


def test_lora_parameters_missing_keys_take_mlx_lm_defaults():
    config = from_dict({"lora_parameters": {"rank": 16, "keys": ["self_attn.q_proj"]}})
    assert config.lora_parameters == {**CONFIG_DEFAULTS["lora_parameters"], "rank": 16, "keys": ["self_attn.q_proj"]}


def test_optimizer_name_decides_the_defaults_as_mlx_does():
    adamw, adam = optim.AdamW(learning_rate=1e-3), optim.Adam(learning_rate=1e-3)
    named = from_dict({"optimizer": "adamw"}).optimizer
    assert named.weight_decay == adamw.weight_decay == 0.01  # mlx_lm lora's AdamW keeps mlx's decay
    assert (named.betas, named.eps, named.bias_correction) == (adamw.betas, adamw.eps, adamw.bias_correction)
    default = from_dict({}).optimizer
    assert default.name == "adam" and default.weight_decay == 0.0
    assert (default.betas, default.eps, default.bias_correction) == (adam.betas, adam.eps, adam.bias_correction)
    assert from_dict({"optimizer": {"name": "AdamW", "weight_decay": 0.1}}).optimizer.weight_decay == 0.1


def test_storage_override_keeps_mlx_lm_adam(tmp_path):
    """The README's example: an mlx-lm config with no optimizer key, plus our precision."""
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ndata: d\noptimizer_config:\n  adam:\n    betas: [0.8, 0.9]\n")
    config = load_config(path, {"optimizer.state_precision": "int8"})
    opt = build_optimizer(config)
    assert opt.weight_decay == 0.0 and opt.betas == [0.8, 0.9] and opt.settings.state_precision == "int8"
    # mlx_lm lora's --optimizer names it and keeps our storage settings
    config = load_config(path, {"optimizer.state_precision": "int8", "optimizer": "adamw"})
    assert config.optimizer.name == "adamw" and config.optimizer.weight_decay == 0.01
    assert config.optimizer.state_precision == "int8" and config.optimizer.betas == [0.9, 0.999]


def test_optimizer_mapping_merges_optimizer_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(MLX_LM_EXAMPLE.replace("optimizer: adamw", "optimizer:\n  name: adamw\n  state_precision: int8"
                                           "\n  eps: 1e-6"))
    o = load_config(path).optimizer
    assert (o.name, o.state_precision, o.betas, o.eps, o.weight_decay, o.bias_correction) == (
        "adamw", "int8", [0.9, 0.98], 1e-6, 0.05, True)
    # The same key twice with different values is refused, naming both places.
    conflict = MLX_LM_EXAMPLE.replace("optimizer: adamw", "optimizer:\n  name: adamw\n  weight_decay: 0.1")
    path.write_text(conflict)
    with pytest.raises(ConfigError, match=r"'optimizer.weight_decay' \(0.1\) and 'optimizer_config.adamw.weight_decay' "
                                          r"\(0.05\) disagree"):
        load_config(path)
    # Settings for adamw with no optimizer named would be dropped by mlx-lm's Adam: refused instead.
    path.write_text(MLX_LM_EXAMPLE.replace("optimizer: adamw", "optimizer:\n  state_precision: int8"))
    with pytest.raises(ConfigError, match="'optimizer_config.adamw' has settings but no optimizer is named"):
        load_config(path)
    with pytest.raises(ConfigError, match="'optimizer_config.adam.weight_decay': mlx.optimizers.Adam takes "
                                          "betas, eps, bias_correction"):
        from_dict({"optimizer": "adam", "optimizer_config": {"adam": {"weight_decay": 0.1}}})
    # mlx-lm's unused entries (CONFIG_DEFAULTS lists one per optimizer) are ignored, as there.
    assert from_dict({"optimizer": "adam", "optimizer_config": {"sgd": {"momentum": 0.9}}}).optimizer.name == "adam"


def test_adamw_kwargs_are_the_one_mapping_to_adamw():
    import inspect

    from adamw_lm import AdamW

    o = from_dict({"optimizer": {"name": "adamw", "state_precision": "int8", "overrides": {"norm": "fp32"},
                                 "min_quantize_size": 64, "betas": [0.8, 0.95], "bias_correction": True}}).optimizer
    kwargs = o.adamw_kwargs()
    assert "weight_update" not in kwargs and "name" not in kwargs  # None: AdamW's own default
    assert set(kwargs) <= set(inspect.signature(AdamW.__init__).parameters)
    opt = AdamW(learning_rate=1e-3, **kwargs)
    assert (opt.betas, opt.weight_decay, opt.bias_correction, opt.settings.state_precision) == ([0.8, 0.95], 0.01, True, "int8")
    assert build_optimizer(from_dict({"optimizer": dataclasses.asdict(o)})).betas == opt.betas
    assert from_dict({"optimizer": {"weight_update": "stochastic"}}).optimizer.adamw_kwargs()["weight_update"] == "stochastic"


def test_none_words_for_precisions(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  state_precision: None\n  overrides:\n    embed: null\n    norm: None\n")
    o = load_config(path).optimizer
    assert o.state_precision is None and o.overrides == {"embed": None, "norm": None}
    assert load_config(path, {"optimizer.state_precision": "none"}).optimizer.state_precision is None
    path.write_text("optimizer:\n  state_precision: int8\n  weight_update: None\n")
    assert load_config(path).optimizer.weight_update is None  # the default mode, as null
    path.write_text("checkpoint:\n  keep_best: None\nresume_adapter_file: None\n")
    config = load_config(path)
    assert config.checkpoint.keep_best is None  # no text fits there: the word means null
    assert config.resume_adapter_file == "None"  # a path may be called that, as mlx-lm reads it


def test_null_at_the_top_is_the_default_as_in_mlx_lm(tmp_path):
    """mlx_lm lora sets every key it reads as null to its default (CONFIG_DEFAULTS)."""
    keys = ["seed", "num_layers", "lora_parameters", "iters", "batch_size", "max_seq_length",
            "grad_checkpoint", "val_batches", "steps_per_eval", "fine_tune_type", "learning_rate"]
    path = tmp_path / "nulls.yaml"
    path.write_text("".join(f"{key}: null\n" for key in keys))
    config, defaults = load_config(path), load_config(None)
    for key in keys:
        assert getattr(config, key) == getattr(defaults, key) == CONFIG_DEFAULTS[key], key
    path.write_text("lora_parameters:\n  rank: null\n")  # nested: no default to take
    with pytest.raises(ConfigError, match="lora_parameters"):
        load_config(path)


def test_config_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"iters: 3\nmodel: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml, line 2: not UTF-8 \(byte 0xe9\)"):
        load_config(path)


def test_duplicate_yaml_key_names_key_and_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("iters: 3\nlora_parameters:\n  rank: 8\n  rank: 16\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: duplicate key 'rank' on line 4 \(first on line 3\)"):
        load_config(path)
    path.write_text("learning_rate: 1e-5\n")
    assert load_config(path).learning_rate == 1e-5  # mlx-lm's loader underneath: 1e-5 is a float


def test_test_only_mode_is_a_valid_config():
    config = from_dict({"train": False, "test": True, "adapter_path": "runs/x"})
    assert not config.train and config.test
