"""ZeRO-1: each process of a data-parallel run keeps and updates the optimizer state of its share of
the parameters only, then the processes exchange the updated parameters.

:func:`partition` is a pure function of the parameter tree (paths, shapes, dtypes, state formats)
and the world size, so every process, and every later resume at any world size, computes the same
owners. :class:`ShardedOptimizer` wraps an unchanged :class:`adamw_lm.AdamW` that simply holds fewer
parameters; the single-process optimizer does not know it is sharded.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .optim import AdamW, zeros_state
from .slicing import all_finite

if TYPE_CHECKING:
    from .memory import MemoryPlan


def state_bytes(optimizer: AdamW, parameters: dict) -> dict[str, int]:
    """``{path: bytes}`` of the state each parameter of ``parameters`` gets from ``optimizer``
    (computed from shapes: nothing is allocated)."""
    formats = optimizer.state_formats(parameters)
    return {
        path: sum(a.nbytes for _, a in tree_flatten(zeros_state(formats[path], p)))
        for path, p in tree_flatten(parameters)
    }


def partition(nbytes: dict[str, int], world_size: int) -> dict[str, int]:
    """``{path: rank}``: whole tensors, largest first, each to the rank with the fewest bytes so far
    (ties to the lowest rank, equal sizes in path order), so the state is split evenly by bytes and
    the result depends only on the tree and the world size."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1; got {world_size}")
    loads = [0] * world_size
    owners = {}
    for path in sorted(nbytes, key=lambda p: (-nbytes[p], p)):
        r = min(range(world_size), key=lambda i: (loads[i], i))
        owners[path] = r
        loads[r] += nbytes[path]
    return owners


def _subtree(parameters: dict, paths: set[str]) -> dict:
    return tree_unflatten([(p, a) for p, a in tree_flatten(parameters) if p in paths])


def gather_all_gather(new: dict[str, mx.array], owners: dict[str, int], shapes: dict[str, tuple],
                      dtypes: dict[str, mx.Dtype], group: mx.distributed.Group) -> dict[str, mx.array]:
    """Every parameter from its owner: one ``all_gather`` per dtype of each rank's parameters,
    flattened and padded to the largest rank's size. Copies bits exactly."""
    out = {}
    world = group.size()
    for dtype in sorted({dtypes[p] for p in owners}, key=str):
        per_rank = [[p for p in sorted(owners) if owners[p] == r and dtypes[p] == dtype]
                    for r in range(world)]
        sizes = [sum(math.prod(shapes[p]) for p in paths) for paths in per_rank]
        width = max(sizes)
        if width == 0:
            continue
        mine = [new[p].reshape(-1) for p in per_rank[group.rank()]]
        padding = width - sizes[group.rank()]
        if padding or not mine:
            mine.append(mx.zeros((padding,), dtype))
        gathered = mx.distributed.all_gather(mx.concatenate(mine), group=group)
        for r, paths in enumerate(per_rank):
            start = r * width
            for p in paths:
                out[p] = gathered[start: start + math.prod(shapes[p])].reshape(shapes[p])
                start += math.prod(shapes[p])
    return out


def gather_all_sum(new: dict[str, mx.array], owners: dict[str, int], shapes: dict[str, tuple],
                   dtypes: dict[str, mx.Dtype], group: mx.distributed.Group) -> dict[str, mx.array]:
    """Every parameter from its owner: one ``all_sum`` per dtype of a buffer where each rank fills
    its own parameters and leaves zeros elsewhere (``x + 0`` is ``x``, but a ``-0.0`` comes back
    ``+0.0``)."""
    out = {}
    for dtype in sorted({dtypes[p] for p in owners}, key=str):
        paths = [p for p in sorted(owners) if dtypes[p] == dtype]
        parts = [new[p].reshape(-1) if owners[p] == group.rank() else mx.zeros((math.prod(shapes[p]),), dtype)
                 for p in paths]
        summed = mx.distributed.all_sum(mx.concatenate(parts), group=group)
        start = 0
        for p in paths:
            out[p] = summed[start: start + math.prod(shapes[p])].reshape(shapes[p])
            start += math.prod(shapes[p])
    return out


EXCHANGES: dict[str, Callable] = {"all_gather": gather_all_gather, "all_sum": gather_all_sum}


class ShardedOptimizer:
    """An :class:`AdamW` whose state is split over the processes of ``group`` (ZeRO-1).

    Used like the optimizer it wraps (``update(model, grads)``, ``state``, ``learning_rate``), with
    gradients already averaged over the processes. ``inner`` holds the state of this process's
    parameters (see :func:`partition`) and the scalars (step, learning rate, key), which every
    process keeps alike. After ``inner`` updates its parameters, ``exchange`` (``"all_gather"`` or
    ``"all_sum"``) gives every process every updated parameter.

    Results are bit-identical to the unsharded optimizer's under every precision: stochastic
    rounding draws each parameter's bits from the step's key and the parameter's path, whichever
    process holds it.
    """

    def __init__(self, inner: AdamW, group: Optional[mx.distributed.Group] = None,
                 exchange: str = "all_gather"):
        if inner.settings.state_precision == "auto":
            raise ValueError("state_precision 'auto' chooses precisions for the whole tree under one "
                             "budget; with shard_state give a precision (or overrides) instead")
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {', '.join(EXCHANGES)}; got {exchange!r}")
        self.inner = inner
        self.group = group or mx.distributed.init()
        self.exchange = exchange
        self.owners: dict[str, int] = {}
        self._plan: dict[str, str | None] = {}

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def world_size(self) -> int:
        return self.group.size()

    @property
    def state(self) -> dict:
        return self.inner.state

    @state.setter
    def state(self, state: dict) -> None:
        self.inner.state = state

    @property
    def learning_rate(self) -> mx.array:
        return self.inner.learning_rate

    @property
    def step(self) -> mx.array:
        return self.inner.step

    @property
    def precision_plan(self) -> dict[str, str | None]:
        """``{path: precision}`` of every parameter, whichever process keeps its state."""
        return dict(self._plan)

    def override_pattern(self, path: str) -> str | None:
        """The ``precision_overrides`` pattern that decides ``path``'s precision (see :class:`AdamW`)."""
        return self.inner.override_pattern(path)

    def owned(self, parameters: dict) -> dict:
        """The subtree of ``parameters`` whose state this process keeps."""
        if not self.owners:
            self.owners = partition(state_bytes(self.inner, parameters), self.world_size)
            self._plan = self.inner.plan(parameters)
        return _subtree(parameters, {p for p, r in self.owners.items() if r == self.rank})

    def init(self, parameters: dict) -> None:
        self.inner.init(self.owned(parameters))
        self._whole_scalars(parameters)

    def _whole_scalars(self, parameters: dict) -> None:
        """This process's state gets the scalars of the whole optimizer's (a random key, a count
        of skipped steps), whether or not its own share needs them: every process keeps them
        alike, and a checkpoint has them whoever writes it. After :meth:`owned` (the plan)."""
        self.inner._add_scalars({p: a.dtype for p, a in tree_flatten(parameters)}, self._plan)

    def set_full_state(self, state: dict, parameters: dict) -> None:
        """Keep this process's share of ``state``, a whole (unsharded) state tree for ``parameters``."""
        self.owners = {}
        self.owned(parameters)
        mine = {p for p, r in self.owners.items() if r == self.rank}
        full = dict(tree_flatten(parameters))
        kept = [(k, v) for k, v in tree_flatten(state) if owner_of(k, full) in mine | {None}]
        self.inner.state = tree_unflatten(kept)
        self.init(parameters)

    def apply_gradients(self, gradients: dict, parameters: dict) -> dict:
        flat_grads = dict(tree_flatten(gradients))
        mine = self.owned(parameters)
        if not self.inner._initialized:  # a first step, or a state set since: not at every step
            self._whole_scalars(parameters)
        my_grads = {p: flat_grads[p] for p, _ in tree_flatten(mine)}
        # The plan of the whole tree (``owned`` makes it), not the inner optimizer's: that one is
        # empty until its first step has begun. (A NaN in an empty tensor would be no NaN.)
        low = [p for p, g in my_grads.items() if self._plan.get(p) is not None and g.size]
        if any(p is not None for p in self._plan.values()):
            # A low-precision AdamW skips a step whose gradients are not finite; every process must
            # agree, so the whole tree decides: a non-finite gradient elsewhere poisons one of ours,
            # one the step would skip (a tensor pinned to None takes mlx's update, NaN and all).
            # A process with none of those counts the skipped step itself.
            finite = all_finite(list(flat_grads.values()), self.inner.settings.streams)
            if low:
                poisoned = my_grads[low[0]]
                my_grads[low[0]] = mx.where(finite, poisoned, mx.array(float("nan"), poisoned.dtype))
            else:
                state = self.inner.state
                state["skipped_steps"] = state["skipped_steps"] + (~finite).astype(mx.uint32)
        updated = dict(tree_flatten(self.inner.apply_gradients(tree_unflatten(list(my_grads.items())), mine)))
        if self.world_size == 1:
            return tree_unflatten(list(updated.items()))
        flat = dict(tree_flatten(parameters))
        new = EXCHANGES[self.exchange](
            updated, self.owners, {p: tuple(a.shape) for p, a in flat.items()},
            {p: a.dtype for p, a in flat.items()}, self.group,
        )
        return tree_unflatten([(p, new[p]) for p in flat])

    def update(self, model: nn.Module, gradients: dict) -> None:
        model.update(self.apply_gradients(gradients, model.trainable_parameters()))

    def state_nbytes(self) -> int:
        """Bytes of this process's optimizer state."""
        return self.inner.state_nbytes()


def owner_of(key: str, parameters: dict) -> Optional[str]:
    """The parameter path a flat state key belongs to (``a.b.m`` → ``a.b``), if any."""
    while "." in key:
        key = key.rsplit(".", 1)[0]
        if key in parameters:
            return key
    return None


def per_process_plan(plan: "MemoryPlan", world_size: int, shard_state: bool) -> "MemoryPlan":
    """``plan`` as each of ``world_size`` data-parallel processes holds it: the whole weights and
    gradients, and the optimizer state divided among them with ``shard_state`` (whole tensors go to
    one process each, so a share is about ``1/world_size``: shown rounded up)."""
    from dataclasses import replace

    if world_size < 1:
        raise ValueError(f"--world-size must be >= 1; got {world_size}")
    if world_size == 1 and not shard_state:
        return plan
    share = world_size if shard_state else 1
    rows = tuple(replace(r, state=-(-r.state // share)) for r in plan.rows)
    what = "optimizer state sharded (ZeRO-1), about 1/N each" if shard_state else "state not sharded"
    description = f"{plan.description} — per process of {world_size} ({what})"
    return replace(plan, rows=rows, description=description)
