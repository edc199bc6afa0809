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

* :func:`activation_bytes` — what a training step's forward pass keeps for the backward pass,
  and what one block's recomputation adds, for a batch and sequence length, with or without
  gradient checkpointing; :func:`step_temporaries` — the optimizer step's transient arrays.
  Given a ``batch_size``, the plans' rows carry them and :attr:`MemoryRow.peak` is a step's peak.
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Iterable, Mapping, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .codecs import PRECISIONS
from .weight_update import (
    DEFAULT_WEIGHT_UPDATE, LOW_DTYPES, buffer_nbytes, check_weight_update,
)

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


# -- a training step's activations and temporaries ------------------------------------------------

#: Slice-sized float32 arrays that one slice's compiled update (decode, AdamW, encode) has alive
#: at once, per state precision: measured (peak of one single-slice step minus what it holds;
#: mlx 0.32 CPU, checked by tests/test_memory.py), since they depend on how mlx's compiler fuses
#: each codec's graph. The int8/int4 stochastic level rounding keeps the most; fp32 updates nearly
#: in place. (int8/int4 were 18 before the codecs were reshaped for fusion, then 12 / 12; the
#: square roots made of multiplications add kernel boundaries: measured bf16 8, int8 14.5, int4
#: 16-16.2; one hash for both moments and int8's shift-root levels: bf16 6-9, int8 9.5-12.3, int4
#: 14.5-18 over one and three slices.)
SLICE_WORKING_ARRAYS = {"fp32": 3, "bf16": 7, "int8": 11, "int4": 16}


#: Share of a Mac's RAM that Metal lets one process use by default (its recommended working-set
#: size); ``sysctl iogpu.wired_limit_mb`` raises it.
METAL_WORKING_SET_SHARE = 0.75


def metal_limit_bytes(memory_gb: float) -> int:
    """Bytes Metal lets a process use by default on a Mac with ``memory_gb`` GB of RAM (about
    :data:`METAL_WORKING_SET_SHARE` of it)."""
    if isinstance(memory_gb, bool) or not isinstance(memory_gb, (int, float)) or not memory_gb > 0:
        raise ValueError(f"memory must be a number of GB > 0; got {memory_gb!r}")
    return int(METAL_WORKING_SET_SHARE * memory_gb * 1e9)


def default_chunk_size() -> int:
    """Slice size of ``AdamW(chunk_size=None)``: 2^18 elements on a CPU, 2^22 on a GPU (fewer,
    larger kernels)."""
    return 1 << 18 if mx.default_device() == mx.cpu else 1 << 22


def activation_bytes(
    config: Mapping[str, Any],
    batch_size: int,
    max_seq_length: int,
    *,
    grad_checkpoint: bool = False,
    trained_layers: int | None = None,
    dtype_size: int = 2,
) -> tuple[int, int]:
    """``(forward, recompute)``: bytes a training step of a Llama-like mlx-lm model keeps alive.

    Counted from what mlx-lm's forward pass (``models/llama.py``, qwen2, mistral: the same
    block) keeps for the backward pass, per token of a block, in the weights' dtype: the block
    input and its norm, the residual, the second norm and the MLP output (5 x hidden); queries
    before and after RoPE, the attention output and its transposed copy (4 x heads x head_dim);
    keys before and after RoPE and values (3 x kv_heads x head_dim); gate, up and their product
    (3 x intermediate); the attention scores and probabilities (2 x heads x sequence length, as
    mlx's attention materializes them for its gradient). Gradients flow only through the trained
    last ``trained_layers`` blocks (default all), so only theirs are kept.

    ``forward`` is what is alive when the backward pass starts: the trained blocks' activations
    (with ``grad_checkpoint`` as in ``mlx_lm.tuner.trainer.grad_checkpoint``: each block's input
    only), the final norm's input and output, and the logits' working set of mlx-lm's
    ``default_loss``, five arrays of batch x sequence x vocabulary in the weights' dtype: the
    logits, the softmax that is the log-sum-exp's gradient, the scattered gradient of the
    targets' logits, their sum (the logits' gradient) and the mask's product. ``recompute`` is,
    with checkpointing, what one block's backward pass holds while the gradients are alive: its
    rebuilt activations, with the attention's scores, probabilities and their two gradients in
    float32 (4 x 4 bytes x heads x sequence length per token; measured on mlx's CPU attention,
    which materializes them); 0 without.
    """
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    layers = config["num_hidden_layers"]
    trained = layers if trained_layers is None or trained_layers <= 0 else trained_layers
    tokens = batch_size * max_seq_length
    linear = dtype_size * (
        5 * hidden + 4 * heads * head_dim + 3 * kv_heads * head_dim
        + 3 * config["intermediate_size"]
    )  # fmt: skip
    block = tokens * (linear + 2 * dtype_size * heads * max_seq_length)
    kept = trained * tokens * hidden * dtype_size if grad_checkpoint else trained * block
    head = tokens * dtype_size * (2 * hidden + 5 * config["vocab_size"])
    if not grad_checkpoint:
        return kept + head, 0
    # A block's backward pass: its activations, with the attention's scores, probabilities and
    # both their gradients alive at once in float32 (mlx's softmax here is precise).
    return kept + head, tokens * (linear + 4 * 4 * heads * max_seq_length)


#: Precisions whose small tensors :class:`~adamw_lm.AdamW` updates together (:func:`update_bins`):
#: their update is 80 to 110 operations per tensor, each a dispatch to the stream's thread, more
#: than copying the tensors end to end costs. Measured on LoRA adapters, one stream, the same code
#: with and without bins: int8 -10 %, int4 -26 % a step; bf16 (~30 operations) -8 to +3 %, fp32
#: (a few) +37 % (docs/benchmarks.md, "Small tensors laid end to end").
BINNED_PRECISIONS: tuple[str, ...] = ("int8", "int4")


def update_bins(
    tensors: Iterable[tuple[Any, Hashable, str | None, int]], chunk: int
) -> list[list[Any]]:
    """The tensors :class:`~adamw_lm.AdamW` updates together, laid end to end in one slice: bins
    of two or more names, from ``tensors`` given as ``(name, kind, stored precision, size)`` in
    tree order. A bin holds tensors of one ``kind`` (the optimizer's: their dtypes) and one of the
    :data:`BINNED_PRECISIONS`, each smaller than a slice (``chunk`` elements) and of whole blocks
    (so codes and scales join as they are), at most ``chunk`` elements together."""
    bins: list[list[Any]] = []
    filling: dict[tuple, tuple[list[Any], int]] = {}
    for name, kind, precision, size in tensors:
        if precision not in BINNED_PRECISIONS:
            continue
        codecs = PRECISIONS[precision]
        if not 0 < size < chunk or size % math.lcm(codecs.m.block, codecs.v.block):
            continue
        names, filled = filling.get((precision, kind), ([], 0))
        if filled + size > chunk:
            bins.append(names)
            names, filled = [], 0
        filling[(precision, kind)] = (names + [name], filled + size)
    bins.extend(names for names, _ in filling.values())
    return [names for names in bins if len(names) > 1]


def step_temporaries(
    trainable: Iterable[mx.array],
    precision: str | None,
    *,
    weight_update: str | None = None,
    chunk_size: int | None = None,
    min_quantize_size: int = MIN_QUANTIZE_SIZE,
) -> int:
    """Bytes the optimizer step of ``AdamW(state_precision=precision)`` holds beyond weights,
    gradients and state: its largest tensor's, or its largest bin's.

    Under ``None`` (mlx's ``apply_single``): the new parameter and moments and one intermediate,
    in the parameter's dtype (measured). Otherwise a tensor is updated in slices of
    ``chunk_size`` elements (default :class:`AdamW`'s), each with :data:`SLICE_WORKING_ARRAYS`
    float32 arrays alive; slices run one after the other (one working set at a time), and a tensor
    of several slices is joined at the end: its new slices and the joined copy of parameter and
    state (and about a float32 copy of the tensor) exist together before the old ones are freed.
    Small tensors updated together (:func:`update_bins`) are one slice, whose inputs (parameters,
    gradients and state) are copied end to end, with a random start per element for each draw.
    """
    chunk = chunk_size or default_chunk_size()
    trainable = list(trainable)
    if precision is None:
        return max((4 * a.nbytes for a in trainable), default=0)
    stored = [stored_precision(precision, a.size, min_quantize_size) for a in trainable]
    held = [
        a.nbytes + state_bytes(s, a.shape, a.dtype)
        + weight_buffer_bytes(weight_update, s, a.size, a.dtype)
        for a, s in zip(trainable, stored)
    ]  # fmt: skip

    def working(stored_as: str, size: int) -> int:
        return SLICE_WORKING_ARRAYS.get(stored_as, max(SLICE_WORKING_ARRAYS.values())) * 4 * size

    bins = update_bins(
        ((i, a.dtype, s, a.size) for i, (a, s) in enumerate(zip(trainable, stored))), chunk
    )
    largest = 0
    for members in bins:
        size = sum(trainable[i].size for i in members)
        grads = sum(trainable[i].nbytes for i in members)
        bytes_held = sum(held[i] for i in members)
        # Each random draw of a bin reads one uint32 start per element (its tensor's): one for
        # fresh bits (both moments'), one for a rotating codec, one for the weight's rounding.
        codecs = PRECISIONS[stored[members[0]]]
        draws = [c.stochastic and not c.rotating for c in (codecs.m, codecs.v)]
        starts = int(any(draws)) + int(codecs.m.rotating or codecs.v.rotating)
        rounded = trainable[members[0]].dtype in LOW_DTYPES
        starts += int(rounded and (weight_update or DEFAULT_WEIGHT_UPDATE) == "stochastic")
        temporaries = 2 * bytes_held + grads + 4 * starts * size
        largest = max(largest, temporaries + working(stored[members[0]], size))
    binned = {i for members in bins for i in members}
    for i, (a, s) in enumerate(zip(trainable, stored)):
        if i in binned:
            continue
        # Several slices: the new slices and their joined copy coexist, and the joins hold about a
        # float32 copy of the tensor more (measured on a three-slice tensor, every precision).
        sliced = a.size > chunk
        joins = 4 * a.size if sliced else 0
        copies = 2 if sliced else 1
        largest = max(largest, copies * held[i] + working(s, min(a.size, chunk)) + joins)
    return largest


# -- memory plans ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryRow:
    """Bytes of one fine-tune at one state precision.

    ``activations``, ``recompute`` and ``temporaries`` are 0 unless the plan was given a batch
    (see :func:`activation_bytes` and :func:`step_temporaries`).
    """

    precision: str | None
    weights: int
    grads: int
    state: int
    activations: int = 0
    recompute: int = 0
    temporaries: int = 0

    @property
    def total(self) -> int:
        """Weights + gradients + optimizer state (what the model and optimizer hold)."""
        return self.weights + self.grads + self.state

    @property
    def peak(self) -> int:
        """A training step's peak: weights and state, plus the larger of its two phases. At the
        end of the forward pass the activations (and the logits' working set) are alive and no
        gradient yet; at the end of the backward pass every gradient is, with the first block's
        backward pass, and the optimizer's first temporaries already (measured: the moments'
        decoding does not wait for the gradients)."""
        late = self.grads + self.recompute + self.temporaries
        return self.weights + self.state + max(self.activations, late)


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

    def to_markdown(self, memory_gb: float | None = None) -> str:
        """A markdown table (decimal units: 1 GB = 10^9 bytes). With a batch in the plan, it has
        the activations and each row's step peak; with ``memory_gb`` (a Mac's RAM) it says
        which rows fit Metal's default working-set limit (:func:`metal_limit_bytes`)."""
        share = self.trainable_parameters / max(self.total_parameters, 1)
        with_step = any(r.activations for r in self.rows)
        lines = [
            f"{self.description}: {self.total_parameters:,} parameters, "
            f"{self.trainable_parameters:,} trainable ({100 * share:.2f} %).",
            "",
            "| state precision | state bytes/param | weights | gradients | optimizer state "
            "| total |" + (" activations | step temporaries | step peak |" if with_step else ""),
            "|---|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if with_step else ""),
        ]
        limit = None if memory_gb is None else metal_limit_bytes(memory_gb)
        for r in self.rows:
            name = "None (param dtype)" if r.precision is None else r.precision
            per_param = r.state / max(self.trainable_parameters, 1)
            line = (
                f"| {name} | {per_param:.4f} | {_human(r.weights)} | {_human(r.grads)} "
                f"| {_human(r.state)} | {_human(r.total)} |"
            )
            if with_step:
                needed = r.peak
                line += (
                    f" {_human(max(r.activations, r.recompute))} | {_human(r.temporaries)} "
                    f"| {_human(needed)}"
                    + ("" if limit is None else (" fits" if needed <= limit else " does not fit"))
                    + " |"
                )
            lines.append(line)
        if with_step:
            lines += ["", "Step peak: weights + state + the larger of the forward pass's "
                      "activations and gradients + a block's backward pass + the optimizer's "
                      "temporaries; checked against scripts/bench_memory.py."]
        else:
            lines += ["", "Activations are not included: give --batch-size (and "
                      "--max-seq-length, --grad-checkpoint) to count them."]
        if limit is not None:
            lines += [
                f"A {memory_gb:g} GB Mac: Metal's default working-set limit is about "
                f"{100 * METAL_WORKING_SET_SHARE:.0f} % of RAM, {_human(limit)}; "
                "`sudo sysctl iogpu.wired_limit_mb=N` raises it (leave the system a few GB)."
            ]
        return "\n".join(lines)


def _rows(
    weights: Iterable[mx.array],
    trainable: Iterable[mx.array],
    precisions: Sequence[str | None],
    min_quantize_size: int,
    weight_update: str | None,
    activations: tuple[int, int] = (0, 0),
    chunk_size: int | None = None,
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

    def temporaries(precision: str | None) -> int:
        if activations == (0, 0):
            return 0
        return step_temporaries(
            trainable, precision, weight_update=weight_update, chunk_size=chunk_size,
            min_quantize_size=min_quantize_size,
        )  # fmt: skip

    return tuple(
        MemoryRow(p, weight_bytes, grad_bytes, state(p), *activations, temporaries(p))
        for p in precisions
    )


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
    batch_size: int | None = None,
    max_seq_length: int = 2048,
    grad_checkpoint: bool = False,
    chunk_size: int | None = None,
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
        batch_size: sequences per step; given, each row also counts the step's activations for
            ``max_seq_length`` tokens a sequence, with or without ``grad_checkpoint``
            (:func:`activation_bytes`), and the optimizer's temporaries for ``chunk_size``
            (:func:`step_temporaries`), so that :attr:`MemoryRow.peak` is the step's peak.
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

    activations = (0, 0)
    if batch_size is not None:
        for name, value in (("batch_size", batch_size), ("max_seq_length", max_seq_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        activations = activation_bytes(
            _model_args(model, data), batch_size, max_seq_length,
            grad_checkpoint=grad_checkpoint, trained_layers=trained, dtype_size=dtype.size,
        )  # fmt: skip
        details.append(
            f"batch {batch_size} x {max_seq_length} tokens, gradient checkpointing "
            + ("on" if grad_checkpoint else "off")
        )
    weight_arrays = [a for _, a in tree_flatten(model.parameters())]
    trainable = [a for _, a in tree_flatten(model.trainable_parameters())]
    return MemoryPlan(
        f"{data['model_type']}, {what}, weights {', '.join(details)}"
        + _weight_update_note(weight_update),
        get_total_parameters(model),
        sum(a.size for a in trainable),
        _rows(weight_arrays, trainable, precisions, min_quantize_size, weight_update,
              activations, chunk_size),
    )


def _model_args(model: nn.Module, data: dict[str, Any]) -> dict[str, Any]:
    """The shape fields :func:`activation_bytes` reads, from the built model's arguments (they
    hold mlx-lm's defaults and derived values) over the config's."""
    args = getattr(model, "args", None)
    fields = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "num_hidden_layers", "intermediate_size", "vocab_size")
    return {f: getattr(args, f, None) or data.get(f) for f in fields}


__all__ = [
    "BINNED_PRECISIONS",
    "DEFAULT_PRECISIONS",
    "METAL_WORKING_SET_SHARE",
    "SLICE_WORKING_ARRAYS",
    "activation_bytes",
    "default_chunk_size",
    "metal_limit_bytes",
    "step_temporaries",
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
    "update_bins",
    "weight_buffer_bytes",
]
