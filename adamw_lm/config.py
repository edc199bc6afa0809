"""Run configuration: the keys of ``mlx_lm lora``'s YAML, plus ``optimizer:`` and ``checkpoint:``.

An existing ``mlx_lm lora`` config is accepted unchanged: there ``optimizer`` is a name (``adam`` or
``adamw``) and its hyper-parameters sit under ``optimizer_config.<name>``. Ours may instead give
``optimizer`` as a mapping (``state_precision``, ``betas``, ``eps``, ``weight_decay``, ...). Both are
normalised into :class:`OptimizerConfig`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration value that is missing, unknown or of the wrong type."""


@dataclass
class OptimizerConfig:
    """Hyper-parameters of :class:`adamw_lm.AdamW` (``optimizer:`` section)."""

    state_precision: Optional[str] = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    bias_correction: bool = False
    overrides: dict[str, Optional[str]] = field(default_factory=dict)
    min_quantize_size: int = 4096
    memory_budget: Optional[int] = None
    weight_update: Optional[str] = None


@dataclass
class CheckpointConfig:
    """Where and how often full checkpoints are written (``checkpoint:`` section)."""

    dir: Optional[str] = None  # the run folder; defaults to adapter_path, as mlx_lm lora saves there
    every: Optional[int] = None  # defaults to save_every
    keep_last: Optional[int] = 3
    keep_best: Optional[int] = None


@dataclass
class TrainConfig:
    """One fine-tuning run. Field names and defaults are those of ``mlx_lm lora``."""

    model: str = "Qwen/Qwen3-0.6b"
    data: str = "mlx-community/WikiSQL"
    fine_tune_type: str = "lora"
    num_layers: int = 16
    lora_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rank": 8, "dropout": 0.0, "scale": 20.0}
    )
    batch_size: int = 4
    iters: int = 1000
    val_batches: int = 25
    learning_rate: float = 1e-5
    lr_schedule: Optional[dict[str, Any]] = None
    steps_per_report: int = 10
    steps_per_eval: int = 200
    save_every: int = 100
    adapter_path: str = "adapters"
    max_seq_length: int = 2048
    grad_checkpoint: bool = False
    grad_accumulation_steps: int = 1
    mask_prompt: bool = False
    seed: int = 0
    test: bool = False
    test_batches: int = 500
    resume_adapter_file: Optional[str] = None
    hf_dataset: Optional[Any] = None
    prompt_feature: Optional[str] = None
    completion_feature: Optional[str] = None
    chat_feature: Optional[str] = None
    text_feature: Optional[str] = None
    # mlx_lm lora's keys that do not shape the training itself; `train` must be true and
    # `training_mode` "normal" (checked in from_dict), `config` names the YAML file itself.
    train: bool = True
    training_mode: str = "normal"
    clear_cache_threshold: int = 0
    report_to: Optional[str] = None
    project_name: Optional[str] = None
    trust_remote_code: bool = False
    config: Optional[str] = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def run_dir(self) -> Path:
        """The folder that holds checkpoints, metrics and the final adapters."""
        return Path(self.checkpoint.dir or self.adapter_path)

    @property
    def checkpoint_every(self) -> int:
        return self.checkpoint.every or self.save_every

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON/YAML-ready), in our own layout."""
        return dataclasses.asdict(self)

    def mlx_lm_args(self) -> types.SimpleNamespace:
        """The namespace mlx-lm's helpers (``load_dataset``, ...) read their settings from."""
        args = {k: v for k, v in self.to_dict().items() if k not in ("optimizer", "checkpoint")}
        return types.SimpleNamespace(**{k: v for k, v in args.items() if v is not None})


# -- parsing -----------------------------------------------------------------------------------


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is Union:
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Union:
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) in (list, dict):
        return f"a {typing.get_origin(hint).__name__}"
    return getattr(hint, "__name__", str(hint))


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{path}'{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value or {}, path)
        elif not _type_ok(value, hint):
            raise ConfigError(f"config key '{path}' must be {_describe(hint)}, got {value!r}")
        values[key] = value
    return cls(**values)


def _normalise_optimizer(data: dict[str, Any]) -> dict[str, Any]:
    """Fold mlx_lm lora's ``optimizer: adamw`` + ``optimizer_config`` into our section."""
    data = dict(data)
    optimizer = data.get("optimizer")
    optimizer_config = data.pop("optimizer_config", None) or {}
    if not isinstance(optimizer_config, dict):
        raise ConfigError(f"config key 'optimizer_config' must be a mapping, got {optimizer_config!r}")
    if isinstance(optimizer, str) or optimizer is None:
        name = (optimizer or "adam").lower()  # mlx_lm lora's default optimizer is Adam
        if name not in ("adam", "adamw"):
            raise ConfigError(
                f"config key 'optimizer' is '{optimizer}': adamw-lm trains with AdamW only "
                "(use 'adam' or 'adamw', or an 'optimizer:' mapping)"
            )
        section = dict(optimizer_config.get(name) or {})
        if name == "adam":
            # Adam is AdamW without weight decay, bit for bit (mlx multiplies by 1 - lr * 0).
            section.setdefault("weight_decay", 0.0)
        data["optimizer"] = section
    return data


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """Validate plain data (a parsed YAML) into a :class:`TrainConfig`."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of keys, got {type(data).__name__}")
    config = _build(TrainConfig, _normalise_optimizer(data), "")
    if config.fine_tune_type not in ("lora", "dora", "full"):
        raise ConfigError(
            f"config key 'fine_tune_type' must be one of lora, dora, full; got {config.fine_tune_type!r}"
        )
    if config.training_mode != "normal":
        raise ConfigError(f"config key 'training_mode': only 'normal' is supported, got {config.training_mode!r}")
    if not config.train:
        raise ConfigError("config key 'train' is false: `adamw-lm train` always trains")
    for key in ("iters", "batch_size", "steps_per_report", "steps_per_eval", "save_every",
                "grad_accumulation_steps", "max_seq_length"):
        if getattr(config, key) < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {getattr(config, key)}")
    _check_schedule(config.lr_schedule)
    for key in ("keep_last", "keep_best", "every"):
        value = getattr(config.checkpoint, key)
        if value is not None and value < 1:
            raise ConfigError(f"config key 'checkpoint.{key}' must be >= 1 or null, got {value}")
    return config


def _check_schedule(schedule: Optional[dict[str, Any]]) -> None:
    """``lr_schedule`` as mlx-lm's ``build_schedule`` reads it: name, arguments, optional warmup."""
    if schedule is None:
        return
    import mlx.optimizers as optim

    name = schedule.get("name")
    if not isinstance(name, str) or not callable(getattr(optim.schedulers, name, None)):
        known = ", ".join(n for n in dir(optim.schedulers) if n.endswith(("_decay", "_schedule")))
        raise ConfigError(f"config key 'lr_schedule.name' must name an mlx.optimizers schedule ({known}); got {name!r}")
    if not isinstance(schedule.get("arguments"), list):
        raise ConfigError(f"config key 'lr_schedule.arguments' must be a list (e.g. [1e-5, 1000, 1e-7]); "
                          f"got {schedule.get('arguments')!r}")
    unknown = set(schedule) - {"name", "arguments", "warmup", "warmup_init"}
    if unknown:
        raise ConfigError(f"unknown config key 'lr_schedule.{sorted(unknown)[0]}' (valid: name, arguments, warmup, warmup_init)")
    if not isinstance(schedule.get("warmup", 0), int) or schedule.get("warmup", 0) < 0:
        raise ConfigError(f"config key 'lr_schedule.warmup' must be an int >= 0; got {schedule.get('warmup')!r}")


def parse_override(text: str) -> Any:
    """A command-line override value, read as YAML (``3``, ``1e-5``, ``true``, ``[1, 2]``, ...)."""
    from mlx_lm.lora import yaml_loader  # mlx-lm's loader reads 1e-5 as a float, as YAML 1.2 does

    return yaml.load(text, yaml_loader)


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_dotted(d, "optimizer.state_precision", "int8")`` sets a nested key, creating sections."""
    keys = dotted.replace("-", "_").split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply dotted overrides."""
    from mlx_lm.lora import yaml_loader

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.load(path.read_text(), yaml_loader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys")
    if isinstance(data.get("optimizer"), str) or "optimizer_config" in data:
        data = _normalise_optimizer(data)
    defaults = TrainConfig()
    for dotted, value in (overrides or {}).items():
        top = dotted.split(".")[0]
        if "." in dotted and top not in data and isinstance(getattr(defaults, top, None), dict):
            data[top] = dict(getattr(defaults, top))  # `--lora-parameters.rank 16` keeps the other defaults
        set_dotted(data, dotted, value)
    try:
        return from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None
