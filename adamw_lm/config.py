"""Run configuration: the keys of ``mlx_lm lora``'s YAML, plus ``optimizer:``, ``checkpoint:`` and ``hub:``.

An existing ``mlx_lm lora`` config is accepted unchanged: there ``optimizer`` is a name (``adam`` or
``adamw``) and its hyper-parameters sit under ``optimizer_config.<name>``. Ours may instead give
``optimizer`` as a mapping (``name``, ``state_precision``, ...); ``optimizer_config.<name>`` is merged
into it. The name decides the defaults (those of ``mlx.optimizers.Adam`` / ``AdamW``); the mapping
adds storage settings. Both forms are normalised into :class:`OptimizerConfig`.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration value that is missing, unknown or of the wrong type."""


#: mlx-lm's optimizer names that adamw-lm runs, and the mlx class whose defaults each one takes.
OPTIMIZER_NAMES = {"adam": "Adam", "adamw": "AdamW"}

#: The hyper-parameters ``optimizer_config.<name>`` may set (keywords of the mlx class).
_HYPER_PARAMETERS = ("betas", "eps", "weight_decay", "bias_correction")

#: Words that YAML reads as strings but a config means as "no precision" (``None``).
_NONE_WORDS = ("none", "null", "~")


def _optimizer_name(name: Any) -> str:
    if not isinstance(name, str) or name.lower() not in OPTIMIZER_NAMES:
        raise ConfigError(
            f"config key 'optimizer' names {name!r}: adamw-lm trains with AdamW only "
            "(use 'adam' or 'adamw', as mlx_lm lora's optimizer names)"
        )
    return name.lower()


def _mlx_keywords(name: str) -> dict[str, Any]:
    """The hyper-parameters of ``mlx.optimizers.<Adam|AdamW>`` with their defaults, from its signature."""
    import mlx.optimizers as optim

    params = inspect.signature(getattr(optim, OPTIMIZER_NAMES[name]).__init__).parameters
    return {k: params[k].default for k in _HYPER_PARAMETERS if k in params}


def _none_word(value: Any) -> Any:
    return None if isinstance(value, str) and value.strip().lower() in _NONE_WORDS else value


@dataclass
class OptimizerConfig:
    """Settings of :class:`adamw_lm.AdamW` (``optimizer:`` section).

    Field names are AdamW's keywords, except ``name`` (mlx-lm's optimizer name, which decides the
    defaults of the hyper-parameters left ``None``) and ``overrides`` (``precision_overrides``);
    :meth:`adamw_kwargs` is the one place that maps them.
    """

    name: str = "adam"  # mlx_lm lora's default optimizer
    betas: Optional[list[float]] = None
    eps: Optional[float] = None
    weight_decay: Optional[float] = None
    bias_correction: Optional[bool] = None
    state_precision: Optional[str] = None
    overrides: dict[str, Optional[str]] = field(default_factory=dict)
    min_quantize_size: int = 4096
    memory_budget: Optional[int] = None
    weight_update: Optional[str] = None  # None: the optimizer's own default
    # ZeRO-1 under mlx.launch: each process keeps the state of its share of the parameters
    # (adamw_lm.sharding); not an AdamW argument.
    shard_state: bool = False

    def __post_init__(self) -> None:
        self.name = _optimizer_name(self.name)
        # Adam is AdamW with no weight decay, bit for bit (mlx multiplies by 1 - lr * 0).
        for key, value in {"weight_decay": 0.0, **_mlx_keywords(self.name)}.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.betas = list(self.betas)
        if len(self.betas) != 2:
            raise ConfigError(f"config key 'optimizer.betas' must be two numbers, got {self.betas!r}")
        self.state_precision = _none_word(self.state_precision)
        self.overrides = {k: _none_word(v) for k, v in self.overrides.items()}
        self.weight_update = _none_word(self.weight_update)

    def adamw_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`adamw_lm.AdamW` (all but ``learning_rate`` and ``seed``)."""
        kwargs = dataclasses.asdict(self)
        del kwargs["name"], kwargs["shard_state"]
        kwargs["precision_overrides"] = kwargs.pop("overrides")
        if kwargs["weight_update"] is None:
            del kwargs["weight_update"]
        return kwargs


@dataclass
class CheckpointConfig:
    """Where and how often full checkpoints are written (``checkpoint:`` section)."""

    dir: Optional[str] = None  # the run folder; defaults to adapter_path, as mlx_lm lora saves there
    every: Optional[int] = None  # defaults to save_every
    keep_last: Optional[int] = 3
    keep_best: Optional[int] = None


@dataclass
class HubConfig:
    """Where a run is pushed on the Hugging Face Hub (``hub:`` section); no ``repo_id``, no push.

    The token is never part of a config: it comes from ``HF_TOKEN`` or ``hf auth login``.
    """

    repo_id: Optional[str] = None
    private: bool = True  # a run's data and adapters are the user's
    push_every: int = 1  # every N-th saved checkpoint
    branch: str = "main"
    keep_remote: Optional[int] = None  # step folders kept on the Hub (0: all); null: checkpoint.keep_last
    push_final: bool = True


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
    # mlx_lm lora's keys that do not shape the training itself. `train: false` with `test: true` is
    # mlx-lm's test-only mode; `training_mode` must be "normal"; `config` names the YAML file itself.
    # Unlike mlx_lm lora, `train` defaults to true: the command is `adamw-lm train`.
    train: bool = True
    training_mode: str = "normal"
    clear_cache_threshold: int = 0
    report_to: Optional[str] = None
    project_name: Optional[str] = None
    trust_remote_code: bool = False
    config: Optional[str] = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    hub: HubConfig = field(default_factory=HubConfig)

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
        args = {k: v for k, v in self.to_dict().items() if k not in ("optimizer", "checkpoint", "hub")}
        return types.SimpleNamespace(**{k: v for k, v in args.items() if v is not None})


# -- parsing -----------------------------------------------------------------------------------

#: mlx-lm renamed these keys; an old config gets the new name in its error.
RENAMED_KEYS = {"lora_layers": "num_layers"}

#: ``lora_parameters`` keys that mlx-lm's ``linear_to_lora_layers`` reads.
_LORA_KEYS = ("rank", "dropout", "scale", "keys")

#: Far above any useful LoRA rank (hidden sizes are ~1e4), far below a size that overflows.
MAX_LORA_RANK = 65536

#: NumPy's seed is 32-bit and the data order of epoch ``e`` is seeded with ``seed + e``.
MAX_SEED = 2**31 - 1

_MAX_INT = 2**63 - 1  # mlx and JSON readers elsewhere keep integers in 64 bits


def _did_you_mean(key: str, names: typing.Iterable[str], where: str = "") -> str:
    names = list(names)
    if key in RENAMED_KEYS and RENAMED_KEYS[key] in names:
        return f"; mlx-lm renamed it to '{RENAMED_KEYS[key]}'"
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys{where}: {', '.join(names)}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is Union:
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return _is_number(value)
    if hint is int:
        return _is_int(value)
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


def _check_range(value: Any, path: str) -> None:
    """Numbers a run can use: finite floats, 64-bit ints (also inside lists such as ``betas``)."""
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_range(item, path)
    elif _is_int(value) and abs(value) > _MAX_INT:
        raise ConfigError(f"config key '{path}' is out of range (a 64-bit integer), got {value}")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{path}' must be a finite number, got {value}")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{where}' must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in hints:
            raise ConfigError(f"unknown config key '{path}'{_did_you_mean(key, names)}")
        hint = hints[key]
        if value is None and not where and not _type_ok(None, hint):
            continue  # `key: null` at the top: the default, as mlx_lm lora reads it
        if isinstance(value, str) and not _type_ok(value, hint) and _type_ok(None, hint):
            value = _none_word(value)  # `keep_best: None`, as Python writes it, where no text fits
        if dataclasses.is_dataclass(hint):
            value = _build(hint, {} if value is None else value, path)
        elif not _type_ok(value, hint):
            raise ConfigError(f"config key '{path}' must be {_describe(hint)}, got {value!r}")
        _check_range(value, path)
        values[key] = value
    return cls(**values)


def _same(a: Any, b: Any) -> bool:
    """Equal as settings: ``[0.9, 0.98] == (0.9, 0.98)`` and ``0 == 0.0``, but ``True != 1``."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def _normalise_optimizer(data: dict[str, Any]) -> dict[str, Any]:
    """Fold mlx_lm lora's ``optimizer: NAME`` + ``optimizer_config.NAME`` into our mapping.

    Settings given both in the mapping and in ``optimizer_config`` must agree. Settings for ``adamw``
    with no optimizer named (mlx-lm would run Adam and drop them) are refused rather than dropped.
    """
    data = dict(data)
    optimizer = data.get("optimizer")
    optimizer_config = data.pop("optimizer_config", None) or {}
    if not isinstance(optimizer_config, dict):
        raise ConfigError(f"config key 'optimizer_config' must be a mapping, got {optimizer_config!r}")
    if optimizer is None:
        section: dict[str, Any] = {}
    elif isinstance(optimizer, str):
        section = {"name": optimizer}
    elif isinstance(optimizer, dict):
        section = dict(optimizer)
    else:
        raise ConfigError(
            f"config key 'optimizer' must be a name (adam, adamw) or a mapping, got {optimizer!r}")
    name = section.get("name")
    if name is None:
        ignored = [n for n in OPTIMIZER_NAMES if n != "adam" and optimizer_config.get(n)]
        if ignored:
            raise ConfigError(
                f"config key 'optimizer_config.{ignored[0]}' has settings but no optimizer is named "
                f"(mlx_lm lora would run its default, adam, without them): add `name: {ignored[0]}` "
                f"to the optimizer mapping, or `optimizer: {ignored[0]}`"
            )
    name = section["name"] = _optimizer_name(name or "adam")
    settings = optimizer_config.get(name) or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"config key 'optimizer_config.{name}' must be a mapping, got {settings!r}")
    allowed = list(_mlx_keywords(name))
    for key, value in settings.items():
        if key not in allowed:
            raise ConfigError(f"unknown config key 'optimizer_config.{name}.{key}': "
                              f"mlx.optimizers.{OPTIMIZER_NAMES[name]} takes {', '.join(allowed)}")
        if key in section and not _same(section[key], value):
            raise ConfigError(
                f"config keys 'optimizer.{key}' ({section[key]!r}) and 'optimizer_config.{name}.{key}' "
                f"({value!r}) disagree: give the value once"
            )
        section[key] = value
    data["optimizer"] = section
    return data


def _check_lora_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """mlx-lm's ``lora_parameters``, one clear line per bad value; missing keys take mlx-lm's defaults."""
    for key in params:
        if key not in _LORA_KEYS:
            hint = ("; mlx-lm's LoRA uses 'scale', not 'alpha'" if key == "alpha"
                    else _did_you_mean(key, _LORA_KEYS))
            raise ConfigError(f"unknown config key 'lora_parameters.{key}'{hint}")
    params = {**TrainConfig().lora_parameters, **params}
    rank, dropout, scale, keys = (params.get(k) for k in _LORA_KEYS)
    if not _is_int(rank) or not 1 <= rank <= MAX_LORA_RANK:
        raise ConfigError(
            f"config key 'lora_parameters.rank' must be an int from 1 to {MAX_LORA_RANK}, got {rank!r}")
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise ConfigError(
            f"config key 'lora_parameters.dropout' must be a number in [0, 1), got {dropout!r}")
    if not _is_number(scale) or not math.isfinite(scale):
        raise ConfigError(f"config key 'lora_parameters.scale' must be a finite number, got {scale!r}")
    names_ok = isinstance(keys, list) and keys and all(isinstance(k, str) and k for k in keys)
    if keys is not None and not names_ok:
        raise ConfigError(
            "config key 'lora_parameters.keys' must be a non-empty list of module names inside a block "
            f"(e.g. [self_attn.q_proj, self_attn.v_proj]), got {keys!r}"
        )
    return params


def from_dict(data: Any) -> TrainConfig:
    """Validate plain data (a parsed YAML, a config saved in a checkpoint) into a :class:`TrainConfig`."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of keys, got {type(data).__name__}")
    _refuse_token(data)
    config = _build(TrainConfig, _normalise_optimizer(data), "")
    if config.fine_tune_type not in ("lora", "dora", "full"):
        raise ConfigError(
            f"config key 'fine_tune_type' must be one of lora, dora, full; got {config.fine_tune_type!r}"
        )
    if config.training_mode != "normal":
        raise ConfigError(
            f"config key 'training_mode': only 'normal' is supported, got {config.training_mode!r}")
    if not config.train and not config.test:
        raise ConfigError("config keys 'train' and 'test' are both false: nothing to do "
                          "(train: true trains, test: true evaluates the test set)")
    for key in ("iters", "batch_size", "steps_per_report", "steps_per_eval", "save_every",
                "grad_accumulation_steps", "max_seq_length"):
        if getattr(config, key) < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {getattr(config, key)}")
    if config.max_seq_length < 2:  # mlx-lm would train on empty inputs and fail inside mlx
        raise ConfigError("config key 'max_seq_length' must be >= 2 (an input token and the token it "
                          f"predicts), got {config.max_seq_length}")
    if not 0 <= config.seed <= MAX_SEED:
        raise ConfigError(
            f"config key 'seed' must be from 0 to {MAX_SEED} (NumPy and mlx seeds), got {config.seed}")
    config.lora_parameters = _check_lora_parameters(config.lora_parameters)
    _check_schedule(config.lr_schedule)
    for key in ("keep_last", "keep_best", "every"):
        value = getattr(config.checkpoint, key)
        if value is not None and value < 1:
            raise ConfigError(f"config key 'checkpoint.{key}' must be >= 1 or null, got {value}")
    _check_hub(config.hub)
    return config


def _refuse_token(data: dict[str, Any]) -> None:
    """A token in a config would be saved in every checkpoint and pushed with it."""
    hub = data.get("hub")
    for where, section in (("hub.token", hub), ("token", data), ("hf_token", data)):
        key = where.rsplit(".", 1)[-1]
        if isinstance(section, dict) and key in section:
            raise ConfigError(
                f"config key '{where}': a token never goes in a config (it would be saved in every "
                "checkpoint and pushed with it); set HF_TOKEN or run `hf auth login`")


def _check_hub(hub: HubConfig) -> None:
    from .hub import HubError, check_repo_id

    if hub.repo_id is not None:
        try:
            check_repo_id(hub.repo_id)
        except HubError as e:
            raise ConfigError(f"config key 'hub.repo_id': {e}") from None
    if hub.push_every < 1:
        raise ConfigError(f"config key 'hub.push_every' must be >= 1, got {hub.push_every}")
    if hub.keep_remote is not None and hub.keep_remote < 0:
        raise ConfigError(f"config key 'hub.keep_remote' must be >= 0 (0 keeps all) or null, got {hub.keep_remote}")
    if not hub.branch.strip() or any(c in hub.branch for c in " ~^:?*[\\") or ".." in hub.branch:
        raise ConfigError(f"config key 'hub.branch' must be a git branch name, got {hub.branch!r}")


def _check_schedule(schedule: Optional[dict[str, Any]]) -> None:
    """``lr_schedule`` as mlx-lm's ``build_schedule`` reads it: name, arguments, optional warmup."""
    if schedule is None:
        return
    import mlx.optimizers as optim
    from mlx_lm.tuner.utils import build_schedule

    unknown = set(schedule) - {"name", "arguments", "warmup", "warmup_init"}
    if unknown:
        raise ConfigError(f"unknown config key 'lr_schedule.{sorted(unknown)[0]}' "
                          "(valid: name, arguments, warmup, warmup_init)")
    name = schedule.get("name")
    known = [n for n in dir(optim.schedulers) if n.endswith(("_decay", "_schedule"))]
    if name not in known:
        raise ConfigError(f"config key 'lr_schedule.name' must name an mlx.optimizers schedule "
                          f"({', '.join(known)}); got {name!r}")
    arguments = schedule.get("arguments")
    if not isinstance(arguments, list) or not arguments or not all(_is_number(a) for a in arguments):
        raise ConfigError(f"config key 'lr_schedule.arguments' must be a non-empty list of numbers "
                          f"(e.g. [1e-5, 1000, 1e-7]); got {arguments!r}")
    warmup = schedule.get("warmup", 0)
    if not _is_int(warmup) or not 0 <= warmup <= _MAX_INT:
        raise ConfigError(f"config key 'lr_schedule.warmup' must be an int >= 0; got {warmup!r}")
    if not _is_number(schedule.get("warmup_init", 0.0)):
        raise ConfigError(f"config key 'lr_schedule.warmup_init' must be a number; "
                          f"got {schedule.get('warmup_init')!r}")
    try:
        build_schedule(schedule)
    except (TypeError, ValueError) as e:
        call = f"mlx.optimizers.{name}({', '.join(map(repr, arguments))})"
        raise ConfigError(f"config key 'lr_schedule': {call} fails: {e}") from None


def _yaml_loader() -> type:
    """mlx-lm's YAML loader (it reads ``1e-5`` as a float, as YAML 1.2 does), refusing duplicate keys."""
    from mlx_lm.lora import yaml_loader

    class StrictLoader(yaml_loader):  # type: ignore[misc, valid-type]
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, typing.Hashable) and key != "<<":
                    if key in seen:
                        raise ConfigError(
                            f"duplicate key {key!r} on line {line} (first on line {seen[key]})")
                    seen[key] = line
            return super().construct_mapping(node, deep)

    return StrictLoader


def parse_override(text: str) -> Any:
    """A command-line override value, read as YAML (``3``, ``1e-5``, ``true``, ``[1, 2]``, ...)."""
    try:
        return yaml.load(text, _yaml_loader())
    except yaml.YAMLError:
        return text  # not YAML (e.g. "a: b: c"): the plain string, as an option value is


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_dotted(d, "optimizer.state_precision", "int8")`` sets a nested key, creating sections."""
    keys = dotted.replace("-", "_").split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if isinstance(child, str) and key == "optimizer":
            child = {"name": child}  # `optimizer: adamw` is the mapping `{name: adamw}`
        if not isinstance(child, dict):
            child = {}
        node[key] = child = dict(child)
        node = child
    node[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``data`` with command-line ``overrides`` (dotted keys) set; ``--optimizer NAME`` names it."""
    data = dict(data)
    defaults = TrainConfig()
    for dotted, value in overrides.items():
        dotted = dotted.replace("-", "_")
        top = dotted.split(".")[0]
        if dotted == "optimizer" and isinstance(value, str):
            dotted = "optimizer.name"  # mlx_lm lora's --optimizer keeps our mapping's other settings
        if "." in dotted and top not in data and isinstance(getattr(defaults, top, None), dict):
            data[top] = dict(getattr(defaults, top))  # `--lora-parameters.rank 16` keeps the other defaults
        set_dotted(data, dotted, value)
    return data


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} " + ("is not a file" if path.exists() else "does not exist"))
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise ConfigError(f"config file {path}, line {line}: not UTF-8 (byte {raw[e.start]:#04x})") from None
        try:
            data = yaml.load(text, _yaml_loader())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
        except ConfigError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    try:
        return from_dict(apply_overrides(data, overrides or {}))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None
