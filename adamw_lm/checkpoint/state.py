"""The optimizer's state in a checkpoint: its metadata, restoring it, converting its precision."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten

from ..codecs import PRECISIONS
from ..optim import AdamW
from .format import (
    FORMAT_VERSION,
    MAX_LISTED,
    OPTIMIZER_FORMAT,
    IncompatibleCheckpointError,
)


def optimizer_metadata(optimizer: optim.Optimizer, plan: dict[str, str | None]) -> dict[str, str]:
    names = (
        "betas", "eps", "weight_decay", "bias_correction", "state_precision",
        "precision_overrides", "min_quantize_size", "seed",
    )  # fmt: skip
    hyper = {name: getattr(optimizer, name) for name in names if hasattr(optimizer, name)}
    return {
        "format": OPTIMIZER_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
        "precision_plan": json.dumps(plan, sort_keys=True),
        "hyperparameters": json.dumps(hyper, sort_keys=True),
    }


def plan_of(optimizer: optim.Optimizer, parameters: dict) -> dict[str, str | None]:
    if isinstance(optimizer, AdamW):
        return optimizer.plan(parameters)
    # mlx's own optimizers keep raw moments in the parameter dtype, which is precision None.
    return {path: None for path, _ in tree_flatten(parameters)}


def _group_by_parameter(
    flat: dict[str, mx.array], params: dict[str, mx.array]
) -> tuple[dict[str, dict[str, mx.array]], dict[str, mx.array]]:
    """Split flat state keys into ``{parameter: {suffix: array}}`` and the other (top) keys."""
    groups: dict[str, dict[str, mx.array]] = {}
    top = {}
    for key, value in flat.items():
        owner, suffix = key, ""
        while owner not in params and "." in owner:
            owner, last = owner.rsplit(".", 1)
            suffix = f"{last}.{suffix}" if suffix else last
        if owner in params and suffix:
            groups.setdefault(owner, {})[suffix] = value
        else:
            top[key] = value
    return groups, top


def _layout(arrays: dict[str, mx.array]) -> dict[str, tuple]:
    return {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}


def _moments(precision: str | None, parameter: mx.array) -> dict[str, mx.array]:
    """The flat stored moments of AdamW for ``parameter`` at ``precision`` (all zero, lazily)."""
    if precision is None:
        moments = {"m": mx.zeros_like(parameter), "v": mx.zeros_like(parameter)}
    else:
        codecs = PRECISIONS[precision]
        moments = {"m": codecs.m.zeros(parameter.shape), "v": codecs.v.zeros(parameter.shape)}
    return dict(tree_flatten(moments))


def _convert(
    stored: dict[str, mx.array],
    old: str | None,
    new: str | None,
    parameter: mx.array,
    key: mx.array,
) -> dict[str, mx.array]:
    """Re-store AdamW's moments of one parameter from precision ``old`` in precision ``new``."""
    tree = tree_unflatten(list(stored.items()))
    converted = {}
    for moment, moment_key in zip(("m", "v"), mx.random.split(key)):
        if old is None:
            x = tree[moment].astype(mx.float32)
        else:
            x = getattr(PRECISIONS[old], moment).decode(tree[moment], parameter.shape)
        if new is None:
            converted[moment] = x.astype(parameter.dtype)
        else:
            codec = getattr(PRECISIONS[new], moment)
            converted[moment] = codec.encode(x, moment_key if codec.stochastic else None)
    return dict(tree_flatten(converted))


def restore_state(
    flat: dict[str, mx.array],
    stored_plan: dict[str, str | None],
    path: Path,
    trainable: dict,
    optimizer: optim.Optimizer,
    convert_precision: bool,
) -> dict:
    """The state tree stored in ``flat``, checked against (and converted for) ``optimizer``.

    ``stored_plan`` is the file's precision plan, already checked (known precisions only).
    """
    params = dict(tree_flatten(trainable))
    requested = plan_of(optimizer, trainable)
    missing = [p for p in params if p not in stored_plan]
    if missing:
        raise IncompatibleCheckpointError(
            f"{path}: the precision plan has no entry for {', '.join(missing[:MAX_LISTED])}"
        )
    changed = [p for p in params if stored_plan[p] != requested[p]]
    if changed and not convert_precision:
        first = changed[0]
        raise IncompatibleCheckpointError(
            f"{path}: parameter {first} has optimizer state in precision "
            f"{stored_plan[first]!r}, but this optimizer asks for {requested[first]!r} "
            f"({len(changed)} of {len(params)} parameters differ); pass convert_precision=True "
            f"(adamw-lm resume --convert-precision) to convert the moments"
        )

    # A shallow copy initialized from scratch shows the state this optimizer expects, without
    # touching the optimizer itself before every check has passed.
    probe = copy.copy(optimizer)
    probe.state = {k: v for k, v in optimizer.state.items() if k not in trainable}
    probe.init(trainable)
    expected, _ = _group_by_parameter(dict(tree_flatten(probe.state)), params)
    stored, stored_top = _group_by_parameter(flat, params)

    keys = {}
    if changed:
        # Rounding keys for stochastic codecs come from the optimizer's seed: a conversion is
        # reproducible.
        seed = getattr(optimizer, "seed", 0)
        keys = dict(zip(changed, mx.random.split(mx.random.key(seed), len(changed))))
    problems = []
    restored = {}
    for name, parameter in params.items():
        entries = stored.get(name, {})
        if name in keys:
            old_layout = _layout(_moments(stored_plan[name], parameter))
            if _layout(entries) != old_layout:
                problems.append(f"{name}: expected {old_layout}, found {_layout(entries)}")
                continue
            entries = _convert(entries, stored_plan[name], requested[name], parameter, keys[name])
        if _layout(entries) != _layout(expected.get(name, {})):
            problems.append(
                f"{name}: expected {_layout(expected.get(name, {}))}, found {_layout(entries)}"
            )
            continue
        # In the fresh state's order, so the tree flattens exactly like a never-saved optimizer's.
        restored[name] = tree_unflatten([(k, entries[k]) for k in expected[name]])
    if problems:
        raise IncompatibleCheckpointError(
            f"{path}: optimizer state does not fit this optimizer and model ({len(problems)} "
            f"parameters; first {min(len(problems), MAX_LISTED)} listed as "
            f"{{key: (shape, dtype)}}):\n  "
            + "\n  ".join(problems[:MAX_LISTED])
        )
    per_parameter = tree_map_with_path(lambda path, _: restored[path], trainable)
    # The fresh state's key order, with stored values (step, learning rate, RNG key, ...) where the
    # checkpoint has them; entries of the old precision that the new one lacks are dropped.
    return {
        k: per_parameter[k] if k in trainable else stored_top.get(k, v)
        for k, v in probe.state.items()
    }

