"""A run's parts from its config, with mlx-lm's own loaders: the model, the data (checked line by
line first), the trainable layers and the optimizer. Errors name the config key and what was expected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional

import mlx.nn as nn
from mlx_lm.tuner.datasets import CacheDataset, load_dataset
from mlx_lm.tuner.utils import build_schedule, linear_to_lora_layers

from .config import ConfigError, TrainConfig
from .optim import AdamW


def _is_local(spec: str) -> bool:
    """Whether a ``model`` / ``data`` value names a local path rather than a Hub id (``org/name``)."""
    return Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1


def _not_found(key: str, spec: str, expected: str) -> ConfigError:
    where = Path(spec).expanduser().absolute()
    return ConfigError(f"config key '{key}': {spec} does not exist ({where}; expected {expected})")


def _hub_failure(spec: str, e: Exception) -> ConfigError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return ConfigError(f"config key 'model': {spec} does not exist as a local path "
                       f"({Path(spec).expanduser().absolute()}), and loading it as a Hugging Face Hub repo id "
                       f"failed ({type(e).__name__}: {first[:200]})")


def load_model(config: TrainConfig) -> tuple[nn.Module, Any]:
    """``mlx_lm.load`` with a clear error for a model path that does not exist."""
    from mlx_lm import load

    path = Path(config.model).expanduser()
    if _is_local(config.model) and not path.exists():
        raise _not_found("model", config.model, "a model folder with config.json")
    if path.exists() and not (path / "config.json").is_file():
        raise ConfigError(f"config key 'model': {config.model} has no config.json (expected an mlx-lm model folder)")
    try:
        return load(
            str(path) if path.exists() else config.model,
            tokenizer_config={"trust_remote_code": config.trust_remote_code},
            trust_remote_code=config.trust_remote_code,
        )
    except ValueError as e:
        if path.exists():  # mlx-lm's own clear messages (unknown model type, custom code refused...)
            raise ConfigError(f"config key 'model' ({config.model}): {e}") from None
        raise _hub_failure(config.model, e) from None
    except Exception as e:
        if path.exists():
            raise
        # An org/name that is no local folder: a Hub repo id (not found, offline, gated...).
        raise _hub_failure(config.model, e) from None


def setup_trainable(model: nn.Module, config: TrainConfig) -> None:
    """Freeze the model and open up what ``fine_tune_type`` trains, exactly as ``mlx_lm lora`` does."""
    model.freeze()
    if config.num_layers > len(model.layers):
        raise ConfigError(
            f"config key 'num_layers' is {config.num_layers} but the model has {len(model.layers)} layers"
        )
    # As mlx-lm slices them: num_layers 0 is every layer (layers[-0:]).
    layers = model.layers[-max(config.num_layers, 0):]
    if config.fine_tune_type == "full":
        quantized = [(name, type(m).__name__) for layer in layers for name, m in layer.named_modules()
                     if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]  # fmt: skip
        if quantized:
            raise ConfigError(
                f"config key 'fine_tune_type' is 'full' but the model {config.model} is quantized "
                f"({quantized[0][0]} is a {quantized[0][1]}): its packed weights take no gradient; "
                "use 'lora' or 'dora', or an unquantized model")
        for layer in layers:
            layer.unfreeze()
    else:
        _check_lora_keys(model, config, layers)
        try:
            linear_to_lora_layers(
                model, config.num_layers, config.lora_parameters,
                use_dora=config.fine_tune_type == "dora",
            )
        except KeyError as e:
            raise ConfigError(f"config key 'lora_parameters': {e}") from None
        except ValueError as e:  # a key naming a module mlx-lm cannot turn into LoRA
            raise ConfigError(f"config key 'lora_parameters.keys': {e}") from None


def _check_lora_keys(model: nn.Module, config: TrainConfig, layers: list[nn.Module]) -> None:
    """Each ``lora_parameters.keys`` entry must name a module, in the trained layers (as
    ``self_attn.q_proj``) or in the whole model (as ``lm_head``), as ``linear_to_lora_layers`` reads it."""
    keys = config.lora_parameters.get("keys")
    if keys is None:
        return
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ConfigError(f"config key 'lora_parameters.keys' must be a list of module names, got {keys!r}")
    names = {name for layer in layers for name, _ in layer.named_modules()}
    names |= {name for name, _ in model.named_modules()}
    for key in keys:
        if key not in names:
            examples = sorted(n for n in names if n.count(".") == 1 and n.endswith("proj"))[:6]
            raise ConfigError(
                f"config key 'lora_parameters.keys': {key!r} matches no layer of the model "
                f"(names look like {', '.join(examples) or 'self_attn.q_proj'})"
            )


def adapter_config(config: TrainConfig) -> dict[str, Any]:
    """The ``adapter_config.json`` that ``mlx_lm.load(..., adapter_path=...)`` and ``mlx_lm.fuse`` read."""
    data = config.mlx_lm_args().__dict__
    if config.fine_tune_type == "full":
        data["lora_parameters"] = None
    # Keys in one order at every level: a resumed run's config comes back from the checkpoint's
    # JSON sorted, and its adapter_config.json must be byte for byte the uninterrupted run's.
    return json.loads(json.dumps(data, sort_keys=True))


def _format_keys(config: TrainConfig, record: dict[str, Any]) -> dict[str, type]:
    """The keys every record needs, with the type of their values, in the format mlx-lm's
    ``create_dataset`` picks from the first record."""
    prompt = config.prompt_feature or "prompt"
    completion = config.completion_feature or "completion"
    chat = config.chat_feature or "messages"
    text = config.text_feature or "text"
    for keys in ({prompt: str, completion: str}, {chat: list}, {text: str}):
        if all(k in record for k in keys):
            return keys
    raise ConfigError(
        f"no known data format: expected keys {text!r} (text), {chat!r} (chat) or {prompt!r} + "
        f"{completion!r} (completions); found {sorted(record)}"
    )


def _check_jsonl(path: Path, config: TrainConfig) -> None:
    """Every line a JSON object in one format, before mlx-lm reads it (it stops at the first bad
    line without saying which, and processes records lazily, mid-run)."""
    keys: Optional[dict[str, type]] = None
    with open(path, "rb") as f:
        for number, raw in enumerate(_universal_lines(f), 1):
            where = f"{path}, line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
            if not line.strip():
                raise ConfigError(f"{where}: empty line (every line must be one JSON object)")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
            try:
                keys = keys or _format_keys(config, record)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            missing = [k for k in keys if k not in record]
            if missing:
                raise ConfigError(f"{where}: missing {missing} (line 1 set the format to keys {list(keys)})")
            for key, kind in keys.items():  # mlx-lm would find out mid-run, in the tokenizer
                if not isinstance(record[key], kind):
                    raise ConfigError(f"{where}: {key!r} must be a {'list of messages' if kind is list else 'string'}, "
                                      f"got {json.dumps(record[key])[:40]}")
    if keys is None:
        raise ConfigError(f"{path} is empty: give it records (one JSON object per line), or remove it")


def _universal_lines(f: Any) -> Iterator[bytes]:
    """The lines of a binary file as mlx-lm's text-mode read splits them: at ``\n``, ``\r\n``
    and a lone ``\r`` (bytes, so that a line that is not UTF-8 can be named)."""
    for raw in f:
        pieces = raw.replace(b"\r\n", b"\n").split(b"\r")
        if len(pieces) > 1 and not pieces[-1]:
            pieces.pop()  # the file ended on a lone \r
        yield from pieces


def load_data(config: TrainConfig, tokenizer: Any, *, need_train: bool = True) -> tuple[Any, Any, Any]:
    """Train/valid/test sets through mlx-lm's ``load_dataset``, after checking local files line by line."""
    data = Path(config.data).expanduser()
    if config.hf_dataset is None:
        if _is_local(config.data):
            if not data.exists():
                raise _not_found("data", config.data, "a folder with train.jsonl, valid.jsonl")
            if not data.is_dir():
                raise ConfigError(f"config key 'data': {config.data} is not a folder (expected a folder with "
                                  "train.jsonl, valid.jsonl)")
            if need_train and not (data / "train.jsonl").is_file():
                raise ConfigError(f"config key 'data': {data / 'train.jsonl'} does not exist")
            for name in ("train", "valid", "test"):
                if (data / f"{name}.jsonl").is_file():
                    _check_jsonl(data / f"{name}.jsonl", config)
    args = config.mlx_lm_args()
    args.data = str(data) if data.exists() else config.data
    args.train = need_train
    # With hf_dataset, the data come from there: errors name that key, not a local `data` folder.
    key = "hf_dataset" if config.hf_dataset is not None else "data"
    try:
        train_set, valid_set, test_set = load_dataset(args, tokenizer)
    except ImportError as e:
        where = "" if key == "hf_dataset" else (f"{config.data} does not exist as a local folder "
                                                f"({data.absolute()}), and ")
        raise ConfigError(f"config key '{key}': {where}loading a Hugging Face dataset needs the `datasets` "
                          f"package ({e})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"config key '{key}' ({config.hf_dataset if key == 'hf_dataset' else config.data}): "
                          f"{e}") from None
    # mlx-lm's batches need batch_size examples; it would find out at the first validation, or
    # at the test after training. An empty validation set is no validation, as in mlx-lm.
    for name, found, used in (("training", train_set, need_train),
                              ("validation", valid_set, need_train and config.val_batches != 0
                               and len(valid_set) > 0),
                              ("test", test_set, config.test)):  # fmt: skip
        if used and len(found) < config.batch_size:
            raise ConfigError(f"config key 'batch_size' is {config.batch_size} but the {name} set "
                              f"({key} {config.hf_dataset if key == 'hf_dataset' else config.data}) "
                              f"has only {len(found)} examples")
    return CacheDataset(train_set), CacheDataset(valid_set), CacheDataset(test_set)


def build_optimizer(config: TrainConfig) -> AdamW:
    """The run's :class:`~adamw_lm.AdamW`; schedules are rebuilt from the config, never pickled."""
    try:
        lr = build_schedule(config.lr_schedule) if config.lr_schedule else config.learning_rate
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"config key 'lr_schedule' {config.lr_schedule}: {e}") from None
    try:
        return AdamW(lr, **config.optimizer.adamw_kwargs(), seed=config.seed)
    except ValueError as e:
        raise ConfigError(f"config section 'optimizer': {e}") from None
