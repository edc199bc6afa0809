"""The optimizer's state in a checkpoint: its metadata, restoring it, converting its precision."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten

from ..codecs import PRECISIONS
from ..optim import AdamW, StateFormat, convert_state, state_layout, zeros_state
from ..weight_update import WEIGHT_UPDATES
from .format import (
    FORMAT_VERSION,
    MAX_LISTED,
    OPTIMIZER_FORMAT,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
)

# What mlx's own optimizers define, for a checkpoint of one of them.
_MLX_HYPERPARAMETERS = ("betas", "eps", "weight_decay", "bias_correction")


def optimizer_metadata(optimizer: optim.Optimizer, plan: dict[str, StateFormat]) -> dict[str, str]:
    if isinstance(optimizer, AdamW):
        hyper = optimizer.hyperparameters()
    else:
        hyper = {n: getattr(optimizer, n) for n in _MLX_HYPERPARAMETERS if hasattr(optimizer, n)}
    return {
        "format": OPTIMIZER_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
        "precision_plan": json.dumps({p: f.precision for p, f in plan.items()}, sort_keys=True),
        "hyperparameters": json.dumps(hyper, sort_keys=True),
    }


def plan_of(
    optimizer: optim.Optimizer, parameters: dict, fresh: bool = False
) -> dict[str, StateFormat]:
    """How ``optimizer`` stores the state of ``parameters``; ``fresh``: once a loaded state has
    replaced its own (see :meth:`AdamW.state_formats`)."""
    if isinstance(optimizer, AdamW):
        return optimizer.state_formats(parameters, fresh=fresh)
    # mlx's own optimizers keep raw moments in the parameter dtype, which is precision None.
    return {
        path: StateFormat.of(None, p.dtype, None) for path, p in tree_flatten(parameters)
    }


def fresh_state(optimizer: optim.Optimizer, trainable: dict) -> dict:
    """The state ``optimizer`` would start from for the tree ``trainable`` (its other entries, step
    and learning rate included, as they are), built on a shallow copy: ``optimizer`` itself is not
    touched, so a checkpoint can be checked against it before anything changes."""
    probe = copy.copy(optimizer)
    probe.state = {k: v for k, v in optimizer.state.items() if k not in trainable}
    probe.init(trainable)
    return probe.state


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


def _stored_formats(
    stored_plan: dict[str, str | None],
    hyperparameters: dict,
    path: Path,
    params: dict[str, mx.array],
) -> dict[str, StateFormat]:
    """The format each parameter's state was saved in: its precision from the (checked) plan, its
    weight update from the stored ``weight_update`` as AdamW derives it (checkpoints written before
    weight updates, and mlx's optimizers, have none: no buffer)."""
    mode = hyperparameters.get("weight_update")
    if mode is not None and mode not in WEIGHT_UPDATES:
        raise CorruptCheckpointError(
            f"{path}: metadata 'hyperparameters' has weight_update {mode!r}; expected null or "
            f"one of {', '.join(map(repr, WEIGHT_UPDATES))}"
        )
    missing = [p for p in params if p not in stored_plan]
    if missing:
        raise IncompatibleCheckpointError(
            f"{path}: the precision plan has no entry for {', '.join(missing[:MAX_LISTED])}"
        )
    return {p: StateFormat.of(stored_plan[p], a.dtype, mode) for p, a in params.items()}


def _stored_as_step(fmt: StateFormat) -> bool:
    return fmt.precision is not None and PRECISIONS[fmt.precision].m_over_root_v


def _differs(old: StateFormat, new: StateFormat, dtype: mx.Dtype) -> bool:
    """Whether state stored as ``old`` must be converted to be ``new`` (nearest and stochastic
    weight updates store the same arrays)."""
    return old.precision != new.precision or old.buffer(dtype) != new.buffer(dtype)


def restore_state(
    flat: dict[str, mx.array],
    stored_plan: dict[str, str | None],
    path: Path,
    trainable: dict,
    optimizer: optim.Optimizer,
    convert_precision: bool,
    stored_hyperparameters: dict | None = None,
) -> dict:
    """The state tree stored in ``flat``, checked against (and converted for) ``optimizer``.

    ``stored_plan`` is the file's precision plan, already checked (known precisions only), and
    ``stored_hyperparameters`` its hyper-parameters (their ``weight_update`` is checked here).
    """
    params = dict(tree_flatten(trainable))
    stored_formats = _stored_formats(stored_plan, stored_hyperparameters or {}, path, params)
    requested = plan_of(optimizer, trainable, fresh=True)  # the load then sets the state
    changed = [
        p for p in params if _differs(stored_formats[p], requested[p], params[p].dtype)
    ]
    if changed and not convert_precision:
        first = changed[0]
        old, new = stored_formats[first], requested[first]
        dtype = params[first].dtype
        old_text, new_text = repr(old.precision), repr(new.precision)
        if old.buffer(dtype) != new.buffer(dtype):
            old_text += f" with weight_update {old.weight_update!r}"
            new_text += f" with weight_update {new.weight_update!r}"
        raise IncompatibleCheckpointError(
            f"{path}: parameter {first} has optimizer state in precision {old_text}, but this "
            f"optimizer asks for {new_text} ({len(changed)} of {len(params)} parameters "
            f"differ); pass convert_precision=True (adamw-lm resume --convert-precision) to "
            f"convert the state"
        )

    fresh = fresh_state(optimizer, trainable)
    expected, _ = _group_by_parameter(dict(tree_flatten(fresh)), params)
    stored, stored_top = _group_by_parameter(flat, params)

    # A first moment stored as its step, m / (sqrt(v) + eps), is read with the eps it was written
    # with (check_optimizer_metadata made sure there is one) and, when this optimizer's differs,
    # written again with this one's.
    eps = (stored_hyperparameters or {}).get("eps"), getattr(optimizer, "eps", None)
    renormalized = [
        p for p in params
        if p not in changed and _stored_as_step(stored_formats[p]) and eps[0] != eps[1]
    ]  # fmt: skip
    keys = {}
    if changed or renormalized:
        # Rounding keys for stochastic codecs come from the optimizer's seed: a conversion is
        # reproducible.
        seed = optimizer.settings.seed if isinstance(optimizer, AdamW) else 0
        converted = changed + renormalized
        keys = dict(zip(converted, mx.random.split(mx.random.key(seed), len(converted))))
    problems = []
    restored = {}
    for name, parameter in params.items():
        entries = stored.get(name, {})
        if name in keys:
            old = stored_formats[name]
            found, wanted = state_layout(entries), state_layout(zeros_state(old, parameter))
            if found != wanted:
                problems.append(f"{name}: expected {wanted}, found {found}")
                continue
            tree = tree_unflatten(list(entries.items()))
            new = convert_state(tree, old, requested[name], parameter, keys[name], *eps)
            entries = dict(tree_flatten(new))
        found, wanted = state_layout(entries), state_layout(expected.get(name, {}))
        if found != wanted:
            problems.append(f"{name}: expected {wanted}, found {found}")
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
        for k, v in fresh.items()
    }

