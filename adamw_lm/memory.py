"""How many bytes a fine-tune needs, and which state precisions fit a budget.

* :func:`state_bytes` — bytes of both AdamW moments of one tensor at a precision, by arithmetic.
* :func:`plan_for_model` — weights, gradients and optimizer state of a live model (what is trainable
  now is what gets trained) or of a parameter tree (all of it is trained), per state precision.
* :func:`plan_from_config` — the same from a ``config.json`` alone. The mlx-lm model is built
  without weights: mlx arrays are lazy, so the shapes and dtypes of an 8B model cost no memory until
  evaluated, and nothing here evaluates them. Quantization (``nn.quantize``) and LoRA/DoRA layers
  (``mlx_lm.tuner.utils.linear_to_lora_layers``) are then applied by mlx's and mlx-lm's own code, so
  the counts are those of the model mlx-lm would train.
* :func:`choose_precisions` — per-tensor precisions under a byte budget, largest tensors lowest;
  ``AdamW(state_precision="auto", memory_budget=...)`` uses it.

Activations are not counted: they depend on batch size and sequence length, not on the optimizer.
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .codecs import PRECISIONS
from .weight_update import DEFAULT_WEIGHT_UPDATE, buffer_nbytes, check_weight_update

#: State precisions from the most to the fewest bytes per element (the registry's order on a tie);
#: ``"auto"`` lowers tensors along it.
STATE_LADDER: tuple[str, ...] = tuple(
    sorted(PRECISIONS, key=lambda name: -PRECISIONS[name].nbytes((1 << 20,)))
)

#: The rows :func:`plan_from_config` and :func:`plan_for_model` give by default.
DEFAULT_PRECISIONS: tuple[str | None, ...] = (None, *STATE_LADDER)

#: Element counts below this keep float32 moments under a lower precision (as in :class:`AdamW`).
MIN_QUANTIZE_SIZE = 4096

FINE_TUNE_TYPES = ("lora", "dora", "full")

PathLike = Union[str, Path]


def state_bytes(precision: str | None, shape: Sequence[int], dtype: mx.Dtype = mx.float32) -> int:
    """Bytes that both moments (``m`` and ``v``) of one tensor of ``shape`` occupy at ``precision``:
    the codecs' :meth:`~adamw_lm.codecs.Precision.nbytes`.

    ``None`` stores the moments in the parameter's ``dtype``; the others do not depend on it.
    ``min_quantize_size`` is not applied here: see :func:`stored_precision`.
    """
    if precision is None:
        return 2 * math.prod(shape) * dtype.size
    if precision in PRECISIONS:
        return PRECISIONS[precision].nbytes(tuple(shape))
    known = ", ".join(["None"] + [repr(p) for p in STATE_LADDER])
    raise ValueError(f"no state size is known for precision {precision!r}; known: {known}")


def weight_buffer_bytes(
    weight_update: str | None, precision: str | None, size: int, dtype: mx.Dtype
) -> int:
    """Bytes of the extra weight buffer (optimizer state) a parameter of ``size`` elements and
    ``dtype`` has at state ``precision`` under ``weight_update`` (see :mod:`adamw_lm.weight_update`;
    ``None``: AdamW's default): 2 per element for ``"exact"`` on bfloat16 / float16 weights, else
    0. Precision ``None`` is mlx's update, which has none."""
    check_weight_update(weight_update)
    if precision is None:
        return 0
    return buffer_nbytes(weight_update or DEFAULT_WEIGHT_UPDATE, size, dtype)


def stored_precision(precision: str | None, size: int, min_quantize_size: int) -> str | None:
    """The precision a tensor of ``size`` elements is stored at: below ``min_quantize_size``
    elements, precisions lower than ``"fp32"`` fall back to ``"fp32"``."""
    if precision not in (None, "fp32") and size < min_quantize_size:
        return "fp32"
    return precision


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _human(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def choose_precisions(
    named_shapes: Mapping[str, Sequence[int]],
    budget_bytes: int,
    *,
    overrides: Mapping[str, str | None] | None = None,
    min_quantize_size: int = MIN_QUANTIZE_SIZE,
    ladder: Sequence[str] = STATE_LADDER,
    dtypes: Mapping[str, mx.Dtype] | None = None,
    weight_update: str | None = None,
) -> dict[str, str | None]:
    """Per-tensor state precisions whose total :func:`state_bytes` is at most ``budget_bytes``.

    Every tensor starts at ``ladder[0]``. While the total is over budget, tensors move one step down
    the ladder, largest first; only once every tensor is on a step does the next step begin. So the
    plan keeps as much precision as the budget allows, the movable tensors sit on at most two
    neighbouring steps, and a larger one never holds a higher precision than a smaller one. A move
    that would not save bytes (a tiny tensor padded to a whole block) is not made.

    Args:
        named_shapes: ``{path: shape}`` of the trained tensors.
        budget_bytes: bytes the moments of all tensors may take together.
        overrides: ``{path: precision}`` pinned tensors (``None``: the parameter's dtype); they
            count against the budget but never move.
        min_quantize_size: tensors with fewer elements stay ``"fp32"`` when the ladder goes lower.
        ladder: precisions from the highest to the lowest.
        dtypes: ``{path: dtype}`` of the parameters (default float32), for paths pinned to
            ``None`` and for weight buffers.
        weight_update: the optimizer's ``weight_update``; the ``"exact"`` buffers of bfloat16 /
            float16 weights count against the budget (:func:`weight_buffer_bytes`).

    Raises:
        ValueError: bad arguments, or no plan fits (the message gives the bytes the smallest needs).
    """
    overrides = dict(overrides or {})
    dtypes = dict(dtypes or {})
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise ValueError(f"budget_bytes must be an int >= 0; got {budget_bytes!r}")
    if not ladder:
        raise ValueError("ladder must name at least one precision")
    for precision in (*ladder, *overrides.values()):
        state_bytes(precision, ())  # raises on an unknown precision
    unknown = sorted(set(overrides) - set(named_shapes))
    if unknown:
        raise ValueError(f"overrides name paths that are not among the tensors: {unknown}")

    def size_of(path: str) -> int:
        return math.prod(named_shapes[path])

    def cost(path: str, precision: str | None) -> int:
        dtype = dtypes.get(path, mx.float32)
        return state_bytes(precision, named_shapes[path], dtype) + weight_buffer_bytes(
            weight_update, precision, size_of(path), dtype
        )

    plan: dict[str, str | None] = {
        path: stored_precision(overrides[path], size_of(path), min_quantize_size)
        for path in overrides
    }
    pinned = sum(cost(path, precision) for path, precision in plan.items())
    free = sorted((p for p in named_shapes if p not in overrides), key=lambda p: (-size_of(p), p))
    plan.update({p: stored_precision(ladder[0], size_of(p), min_quantize_size) for p in free})
    total = pinned + sum(cost(p, plan[p]) for p in free)
    for step in ladder[1:]:
        for path in free:
            if total <= budget_bytes:
                break
            lower = stored_precision(step, size_of(path), min_quantize_size)
            saved = cost(path, plan[path]) - cost(path, lower)
            if saved > 0:
                plan[path] = lower
                total -= saved
    if total > budget_bytes:
        smallest = pinned + sum(
            min(cost(p, stored_precision(s, size_of(p), min_quantize_size)) for s in ladder)
            for p in free
        )
        raise ValueError(
            f"optimizer state does not fit the memory budget of {budget_bytes} bytes "
            f"({_gb(budget_bytes)}): the smallest plan ({ladder[-1]!r} for every tensor of at "
            f"least {min_quantize_size} elements, {len(overrides)} pinned by overrides) needs "
            f"{smallest} bytes ({_gb(smallest)})"
        )
    return {path: plan[path] for path in named_shapes}


# -- memory plans ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryRow:
    """Bytes of one fine-tune at one state precision."""

    precision: str | None
    weights: int
    grads: int
    state: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.state


@dataclass(frozen=True)
class MemoryPlan:
    """Memory of weights, gradients and optimizer state, one row per state precision."""

    description: str
    total_parameters: int
    trainable_parameters: int
    rows: tuple[MemoryRow, ...]

    def row(self, precision: str | None) -> MemoryRow:
        """The row of ``precision``."""
        for row in self.rows:
            if row.precision == precision:
                return row
        raise KeyError(f"no row for precision {precision!r} in this plan")

    def to_markdown(self) -> str:
        """A markdown table (decimal units: 1 GB = 10^9 bytes); activations are not included."""
        share = self.trainable_parameters / max(self.total_parameters, 1)
        lines = [
            f"{self.description}: {self.total_parameters:,} parameters, "
            f"{self.trainable_parameters:,} trainable ({100 * share:.2f} %).",
            "",
            "| state precision | state bytes/param | weights | gradients | optimizer state "
            "| total |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            name = "None (param dtype)" if r.precision is None else r.precision
            per_param = r.state / max(self.trainable_parameters, 1)
            lines.append(
                f"| {name} | {per_param:.4f} | {_human(r.weights)} | {_human(r.grads)} "
                f"| {_human(r.state)} | {_human(r.total)} |"
            )
        lines += ["", "Activations are not included: they depend on batch and sequence length."]
        return "\n".join(lines)


def _rows(
    weights: Iterable[mx.array],
    trainable: Iterable[mx.array],
    precisions: Sequence[str | None],
    min_quantize_size: int,
    weight_update: str | None,
) -> tuple[MemoryRow, ...]:
    trainable = list(trainable)
    weight_bytes = sum(a.nbytes for a in weights)
    grad_bytes = sum(a.nbytes for a in trainable)

    def state(precision: str | None) -> int:
        total = 0
        for a in trainable:
            stored = stored_precision(precision, a.size, min_quantize_size)
            total += state_bytes(stored, a.shape, a.dtype)
            total += weight_buffer_bytes(weight_update, stored, a.size, a.dtype)
        return total

    return tuple(MemoryRow(p, weight_bytes, grad_bytes, state(p)) for p in precisions)


def _check_precisions(precisions: Sequence[str | None], weight_update: str | None) -> None:
    if not precisions:
        raise ValueError("precisions must name at least one precision")
    for precision in precisions:
        state_bytes(precision, ())
    check_weight_update(weight_update)


def _weight_update_note(weight_update: str | None) -> str:
    return f", weight_update {weight_update!r}" if weight_update else ""


def plan_for_model(
    model: nn.Module | dict | list,
    precisions: Sequence[str | None] = DEFAULT_PRECISIONS,
    *,
    min_quantize_size: int = MIN_QUANTIZE_SIZE,
    weight_update: str | None = None,
) -> MemoryPlan:
    """The memory plan of a live model as it is set up now, or of a parameter tree.

    For an ``nn.Module`` its trainable parameters are the trained ones (so apply LoRA and freeze
    before calling); for a tree every array is trained. Quantized layers count their logical
    parameters in ``total_parameters`` and their stored bytes in ``weights``. ``weight_update``
    (``AdamW``'s) adds its buffers to the state (:func:`weight_buffer_bytes`).
    """
    _check_precisions(precisions, weight_update)
    if isinstance(model, nn.Module):
        from mlx_lm.utils import get_total_parameters

        params = [a for _, a in tree_flatten(model.parameters())]
        trainable = [a for _, a in tree_flatten(model.trainable_parameters())]
        total = get_total_parameters(model)
        description = type(model).__module__.rsplit(".", 1)[-1] + " model"
    elif isinstance(model, (dict, list)):
        params = trainable = [a for _, a in tree_flatten(model)]
        total = sum(a.size for a in params)
        description = "parameter tree"
    else:
        raise TypeError(f"model must be an mlx.nn.Module or a tree of arrays; got {type(model)}")
    return MemoryPlan(
        description + _weight_update_note(weight_update),
        total,
        sum(a.size for a in trainable),
        _rows(params, trainable, precisions, min_quantize_size, weight_update),
    )


def _read_config(config: PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(config, Mapping):
        return dict(config), "config"
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    try:
        return json.loads(path.read_text()), str(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"model config not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _build_lazy_model(config: dict[str, Any], where: str) -> nn.Module:
    from mlx_lm.utils import MODEL_REMAPPING

    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ValueError(f"{where}: 'model_type' must be a string like 'llama'; got {model_type!r}")
    module = MODEL_REMAPPING.get(model_type, model_type)
    try:
        arch = importlib.import_module(f"mlx_lm.models.{module}")
    except ImportError as e:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported by mlx-lm") from e
    try:
        return arch.Model(arch.ModelArgs.from_dict(config))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: not a valid {model_type!r} config: {e!r}") from e


def _quantize(model: nn.Module, config: dict[str, Any], where: str) -> str:
    """Quantize like ``mlx_lm.convert`` did: per-layer entries of ``quantization`` first, then every
    quantizable layer whose input size is a multiple of the group size."""
    q = config["quantization"]
    ints = isinstance(q, Mapping) and all(isinstance(q.get(k), int) for k in ("bits", "group_size"))
    if not ints:
        raise ValueError(
            f"{where}: 'quantization' must be a mapping with int 'bits' and 'group_size'; got {q!r}"
        )
    group_size, bits, mode = q["group_size"], q["bits"], q.get("mode", "affine")
    model_predicate = getattr(model, "quant_predicate", None)

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if path in q:
            return q[path]
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            return False
        return model_predicate(path, module) if model_predicate else True

    nn.quantize(model, group_size, bits, mode=mode, class_predicate=predicate)
    return f"{bits}-bit {mode}, group {group_size}"


def plan_from_config(
    config: PathLike | Mapping[str, Any],
    fine_tune_type: str = "lora",
    rank: int = 8,
    num_layers: int | None = 16,
    precisions: Sequence[str | None] = DEFAULT_PRECISIONS,
    weight_dtype: str | None = None,
    *,
    lora_keys: Sequence[str] | None = None,
    min_quantize_size: int = MIN_QUANTIZE_SIZE,
    weight_update: str | None = None,
) -> MemoryPlan:
    """The memory plan of fine-tuning the model described by a ``config.json`` (no weights needed).

    Args:
        config: a ``config.json`` path, a model directory holding one, or its contents as a dict.
            An mlx ``quantization: {bits, group_size[, mode]}`` entry makes a quantized base model
            (LoRA/DoRA only).
        fine_tune_type: ``"lora"``, ``"dora"`` (LoRA plus a magnitude vector) or ``"full"``, as in
            ``mlx_lm.lora``.
        rank: LoRA rank.
        num_layers: the last ``num_layers`` transformer blocks are trained, as in ``mlx_lm.lora``
            and ``adamw-lm train`` (``full`` trains those blocks' parameters only, embeddings and
            head stay frozen; ``<= 0`` means all blocks). ``None``: all blocks, and with ``full``
            every parameter (embeddings, final norm and head too: ``plan --all-parameters``).
        precisions: one row per state precision.
        weight_dtype: dtype of the stored weights (and of quantization scales); default the
            config's ``torch_dtype`` (or ``dtype``), else ``"bfloat16"``.
        lora_keys: module keys inside a block that get LoRA (mlx-lm's ``lora_parameters.keys``);
            default every linear layer of the block, as mlx-lm does.
        min_quantize_size: tensors with fewer elements keep fp32 moments under lower precisions.
        weight_update: ``AdamW``'s; its buffers count as state (:func:`weight_buffer_bytes`).
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import get_total_parameters

    data, where = _read_config(config)
    _check_precisions(precisions, weight_update)
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise ValueError(f"fine_tune_type must be one of {FINE_TUNE_TYPES}; got {fine_tune_type!r}")
    if fine_tune_type != "full" and not (isinstance(rank, int) and rank > 0):
        raise ValueError(f"rank must be an int > 0; got {rank!r}")
    dtype_name = weight_dtype or data.get("torch_dtype") or data.get("dtype") or "bfloat16"
    dtype = getattr(mx, str(dtype_name), None)
    if not isinstance(dtype, mx.Dtype) or not mx.issubdtype(dtype, mx.floating):
        raise ValueError(f"weight_dtype must be a floating mlx dtype name; got {dtype_name!r}")
    if fine_tune_type == "full" and "quantization" in data:
        raise ValueError(
            f"{where}: a quantized model cannot be fully fine-tuned (its packed weights take no "
            "gradient); plan fine_tune_type 'lora' or 'dora' for it, or use the unquantized config"
        )
    if "quantization" not in data and "quantization_config" in data:
        raise ValueError(
            f"{where}: 'quantization_config' (a Hugging Face quantized checkpoint) is not "
            "supported; give the mlx 'quantization': {'bits': ..., 'group_size': ...} entry "
            "of the model converted by mlx_lm.convert"
        )

    model = _build_lazy_model(data, where)
    model.set_dtype(dtype)
    details = [str(dtype_name)]
    if "quantization" in data:
        details.append(_quantize(model, data, where))

    n_blocks = len(model.layers)
    if num_layers is not None and num_layers > n_blocks:
        raise ValueError(f"num_layers={num_layers} but the model has only {n_blocks} layers (-1: all of them)")
    trained = n_blocks if num_layers is None or num_layers <= 0 else num_layers
    model.freeze()
    if fine_tune_type == "full":
        if num_layers is None:
            model.unfreeze()
            what = "full fine-tune of every parameter"
        else:
            for layer in model.layers[-trained:]:
                layer.unfreeze()
            what = f"full fine-tune of the last {trained} of {n_blocks} layers"
    else:
        lora_config: dict[str, Any] = {"rank": rank, "scale": 20.0, "dropout": 0.0}
        if lora_keys is not None:
            lora_config["keys"] = list(lora_keys)
        linear_to_lora_layers(model, trained, lora_config, use_dora=fine_tune_type == "dora")
        name = {"lora": "LoRA", "dora": "DoRA"}[fine_tune_type]
        what = f"{name} rank {rank} on the last {trained} of {n_blocks} layers"

    weight_arrays = [a for _, a in tree_flatten(model.parameters())]
    trainable = [a for _, a in tree_flatten(model.trainable_parameters())]
    return MemoryPlan(
        f"{data['model_type']}, {what}, weights {', '.join(details)}"
        + _weight_update_note(weight_update),
        get_total_parameters(model),
        sum(a.size for a in trainable),
        _rows(weight_arrays, trainable, precisions, min_quantize_size, weight_update),
    )


__all__ = [
    "DEFAULT_PRECISIONS",
    "FINE_TUNE_TYPES",
    "MIN_QUANTIZE_SIZE",
    "MemoryPlan",
    "MemoryRow",
    "STATE_LADDER",
    "choose_precisions",
    "plan_for_model",
    "plan_from_config",
    "state_bytes",
    "stored_precision",
    "weight_buffer_bytes",
]
