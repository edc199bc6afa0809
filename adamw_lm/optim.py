"""A memory-aware AdamW for MLX.

With ``state_precision=None`` every parameter is updated by ``mlx.optimizers.AdamW``'s own
``apply_single``, so results are bit-for-bit those of mlx. Any other precision keeps the moments in a
storage format from :mod:`adamw_lm.codecs` and runs decode → AdamW (in float32) → encode as one compiled
function per slice of ``chunk_size`` elements (slices, bins and streams: :mod:`adamw_lm.slicing`), so
neither a full-model nor a full-tensor float32 copy of the moments ever exists; bfloat16 / float16
weights are written back as ``weight_update`` says (:mod:`adamw_lm.weight_update`).

The optimizer owns its state's format: :class:`StateFormat` names how one parameter's state is
stored, :func:`zeros_state` makes it and :func:`convert_state` turns one format into another, so a
checkpoint stores arrays and JSON only.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Sequence

import mlx.core as mx
import mlx.optimizers as optim
import regex
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from . import weight_update as weights
from .codecs import PRECISIONS, Precision
from .memory import (
    STATE_LADDER, choose_precisions, default_chunk_size, stored_precision, update_bins,
)
from .optim_settings import LearningRate, Settings, check_adamw_arguments
from .slicing import Bin, Slices, StepKeys, all_finite, default_streams, join_flat

#: Seconds one ``precision_overrides`` pattern may take to search one parameter path.
PATTERN_TIMEOUT_S = 0.1

#: Precisions below float32; tensors smaller than ``min_quantize_size`` fall back to "fp32".
LOW_PRECISIONS = tuple(name for name in PRECISIONS if name != "fp32")


class StateFormat(NamedTuple):
    """How the optimizer state of one parameter is stored: the moments' precision (``None``: in
    the parameter's dtype, as mlx) and the weight update that applies to it (``None`` for float32
    parameters; ``"exact"`` adds a buffer, see :mod:`adamw_lm.weight_update`)."""

    precision: str | None
    weight_update: str | None = None

    @classmethod
    def of(cls, precision: str | None, dtype: mx.Dtype, weight_update: str | None) -> StateFormat:
        """The format of a parameter of ``dtype`` at ``precision`` under an optimizer's
        ``weight_update``: ``None`` for float32 parameters, ``"nearest"`` at precision ``None``
        (mlx's update)."""
        if dtype not in weights.LOW_DTYPES:
            return cls(precision, None)
        return cls(precision, "nearest" if precision is None else weight_update)

    def buffer(self, dtype: mx.Dtype) -> str | None:
        """The state key of the weight's buffer for a parameter of ``dtype``, if it has one (never
        under precision ``None``: mlx's update)."""
        if self.precision is None:
            return None
        return weights.buffer_name(self.weight_update, dtype)


def zeros_state(fmt: StateFormat, parameter: mx.array) -> dict:
    """The initial (all-zero) state of ``parameter`` stored as ``fmt``."""
    if fmt.precision is None:
        return {"m": mx.zeros_like(parameter), "v": mx.zeros_like(parameter)}
    codecs = PRECISIONS[fmt.precision]
    return {
        "m": codecs.m.zeros(parameter.shape),
        "v": codecs.v.zeros(parameter.shape),
        **weights.zeros(fmt.weight_update, parameter),
    }


def convert_state(
    state: dict,
    old: StateFormat,
    new: StateFormat,
    parameter: mx.array,
    key: mx.array,
    old_eps: float | None,
    new_eps: float | None,
) -> dict:
    """The state of ``parameter`` stored as ``old``, re-stored as ``new``.

    Moments are decoded to float32 and encoded again (stochastic codecs draw from ``key``). A first
    moment stored as its step (:class:`~adamw_lm.codecs.Precision`'s ``m_over_root_v``) is read
    with the optimizer's ``eps`` it was written with, ``old_eps``, and written with ``new_eps``. A
    weight buffer that ``new`` has and ``old`` had not starts at zero, which is exact: the master
    weight is then the parameter itself. One that ``old`` had and ``new`` has not is dropped: the
    weight keeps its rounded value, and what the buffer held (under half a unit in the last
    place) is lost.
    """
    if old.precision is None:
        m, v = state["m"].astype(mx.float32), state["v"].astype(mx.float32)
    else:
        m, v = PRECISIONS[old.precision].decode(state, parameter.shape, old_eps)
    if new.precision is None:
        converted = {"m": m.astype(parameter.dtype), "v": v.astype(parameter.dtype)}
    else:
        keys = tuple(mx.random.split(key))
        codecs = PRECISIONS[new.precision]
        if not codecs.exact_root:
            # An fp32 (or mlx) v may hold +inf where a gradient's square overflowed.
            v = _storable(v)
        converted = codecs.encode(m, v, keys, 0, new_eps)
    buffer = new.buffer(parameter.dtype)
    if buffer is not None:
        kept = old.buffer(parameter.dtype) == buffer
        converted[buffer] = state[buffer] if kept else zeros_state(new, parameter)[buffer]
    return converted


class AdamW(optim.AdamW):
    """AdamW with optional low-precision moment storage.

    A subclass of ``mlx.optimizers.AdamW`` (so of ``mlx.optimizers.Optimizer``): it is used the same
    way, ``optimizer.update(model, grads)`` then ``mx.eval(model.parameters(), optimizer.state)``.

    Args:
        learning_rate: a float or a schedule ``step -> lr`` (as in ``mlx.optimizers``).
        betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: added to the denominator; ``>= 0``, and ``> 0`` under a precision other than ``None``.
        weight_decay: decoupled weight decay.
        bias_correction: apply Adam's bias correction.
        state_precision: ``None`` keeps each moment in its parameter's dtype and is bit-exact with
            ``mlx.optimizers.AdamW``; ``"fp32"`` keeps float32 moments and does the update in float32
            whatever the parameter's dtype; lower precisions are listed in
            :data:`adamw_lm.codecs.PRECISIONS`; ``"auto"`` picks one per parameter so that the whole
            state fits ``memory_budget`` (see :func:`adamw_lm.memory.choose_precisions`).
        precision_overrides: ``{regex: precision}``; the first pattern found in a parameter's path
            (e.g. ``"embed_tokens"``, ``"norm"``) decides that parameter's precision. Patterns may
            come from a stranger's checkpoint: a search that takes longer than
            :data:`PATTERN_TIMEOUT_S` (catastrophic backtracking) raises ``ValueError``.
        min_quantize_size: tensors with fewer elements keep float32 moments under a low precision.
        seed: seeds the random key (kept in the state) used for stochastic rounding.
        memory_budget: bytes the whole optimizer state may take (``state_nbytes()``); required by,
            and only allowed with, ``state_precision="auto"``.
        chunk_size: under a precision other than ``None``, tensors are updated in slices of this
            many elements (a multiple of 256, so that slices hold whole blocks): the step's
            temporaries are then a few slices, not a few copies of each tensor. Under int8 and
            int4, smaller tensors of whole blocks (LoRA adapters) are laid end to end in bins of
            at most a slice and updated a bin at a time
            (:func:`adamw_lm.memory.update_bins`). Results do not depend on it. ``None``: 2^18
            on the CPU, 2^22 on a GPU (fewer, larger kernels).
        streams: how many mlx streams the slices are spread over, in turn; results do not
            depend on it. ``None``: :func:`default_streams` (1: more lanes cost memory).
        weight_update: how a new weight is written into a bfloat16 / float16 parameter whose
            precision is not ``None`` (see :mod:`adamw_lm.weight_update`): ``"nearest"`` (mlx's
            rounding; steps much smaller than the weight are lost), ``"stochastic"`` (unbiased
            rounding, no extra memory) or ``"exact"`` (a 2-byte buffer per element in the state:
            16+16 float32 master weights for bfloat16, Kahan compensation for float16).
            ``None``: ``"nearest"`` under ``state_precision=None`` (the only mode it allows: it is
            mlx's own update), else :data:`adamw_lm.weight_update.DEFAULT_WEIGHT_UPDATE`.
            Parameters a precision override pins to ``None`` and float32 parameters are unaffected.

    The arguments after ``bias_correction`` are checked and kept, as given but for a resolved
    ``weight_update``, in ``self.settings``, a frozen :class:`adamw_lm.optim_settings.Settings`.

    Under a precision other than ``None``, a step whose gradients hold a NaN or an infinity leaves
    parameters and moments unchanged and is counted in ``state["skipped_steps"]``; ``None`` keeps
    mlx's behaviour exactly, non-finite values included. In a mixed plan (``precision_overrides``
    pinning some tensors to ``None``) such a step is skipped for the other tensors only: the
    ``None`` ones take mlx's update.
    """

    def __init__(
        self,
        learning_rate: LearningRate,
        betas: Sequence[float] = [0.9, 0.999],  # mlx's default, a list too (never changed)
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        bias_correction: bool = False,
        *,
        state_precision: str | None = None,
        precision_overrides: Mapping[str, str | None] | None = None,
        min_quantize_size: int = 4096,
        seed: int = 0,
        memory_budget: int | None = None,
        chunk_size: int | None = None,
        streams: int | None = None,
        weight_update: str | None = None,
    ):
        settings = Settings(
            state_precision, precision_overrides or {}, min_quantize_size, seed, memory_budget,
            chunk_size, streams, weight_update,
        )  # fmt: skip
        check_adamw_arguments(betas, eps, settings.quantizing)
        super().__init__(learning_rate, betas, eps, weight_decay, bias_correction)
        self.settings = settings
        self._plan: dict[str, str | None] = {}
        self._compiled: dict[tuple, Callable] = {}

    def __getstate__(self) -> dict:
        # The compiled updates are a cache, and functions do not pickle: a copy compiles its own.
        return {**self.__dict__, "_compiled": {}}

    # -- which precision each parameter gets -------------------------------------------------------

    def override_pattern(self, path: str) -> str | None:
        """The first ``precision_overrides`` pattern found in ``path`` (the one that decides its
        precision), if any."""
        for pattern in self.settings.precision_overrides:
            try:
                if regex.search(pattern, path, timeout=PATTERN_TIMEOUT_S):
                    return pattern
            except TimeoutError:
                raise ValueError(
                    f"precision_overrides pattern {pattern!r} took over {PATTERN_TIMEOUT_S} s "
                    f"to search the path {path!r} (catastrophic backtracking?); simplify it"
                ) from None
        return None

    def precision_for(self, path: str, parameter: mx.array) -> str | None:
        """The precision that the parameter at ``path`` gets under this optimizer's settings.

        Under ``"auto"`` a parameter no override names is decided with the whole tree, by
        :meth:`plan` (or :meth:`init`); before that this raises ``ValueError``.
        """
        pattern = self.override_pattern(path)
        if pattern is not None:
            precision = self.settings.precision_overrides[pattern]
        elif self.settings.state_precision == "auto":
            if path not in self._plan:
                raise ValueError(
                    f"state_precision='auto' decides {path!r} together with the whole tree: "
                    "call init(parameters) (or plan(parameters)) first"
                )
            return self._plan[path]
        else:
            precision = self.settings.state_precision
        return stored_precision(precision, parameter.size, self.settings.min_quantize_size)

    def plan(self, parameters: dict) -> dict[str, str | None]:
        """``{path: precision}`` for every array in the tree ``parameters``.

        Under ``"auto"`` the precisions are chosen so that the state of this whole tree, its
        scalars included, fits ``memory_budget``; ``ValueError`` if even the lowest cannot.
        """
        return self._decide(parameters, {}, 0)

    def _decide(
        self, parameters: dict, held: Mapping[str, str | None], held_bytes: int
    ) -> dict[str, str | None]:
        """:meth:`plan`, with the precisions ``held`` (paths of ``parameters`` whose state exists)
        kept, and under ``"auto"`` ``held_bytes`` (state of paths outside the tree) counted."""
        flat = tree_flatten(parameters)
        if self.settings.state_precision != "auto":
            return {path: held[path] if path in held else self.precision_for(path, p)
                    for path, p in flat}  # fmt: skip
        pins = {
            path: self.precision_for(path, p)
            for path, p in flat
            if path not in held and self.override_pattern(path) is not None
        }
        pins.update(held)
        # Moments get the budget minus the state's scalars (step, learning rate, and the
        # skipped-step count and random key that init adds).
        scalars = {k: a for k, a in self.state.items() if isinstance(a, mx.array)}
        scalars.setdefault("skipped_steps", mx.array(0, mx.uint32))
        scalars.setdefault("key", mx.random.key(self.settings.seed))
        scalar_bytes = sum(a.nbytes for a in scalars.values())
        try:
            return choose_precisions(
                {path: p.shape for path, p in flat},
                max(self.settings.memory_budget - scalar_bytes - held_bytes, 0),
                overrides=pins,
                min_quantize_size=self.settings.min_quantize_size,
                ladder=[p for p in STATE_LADDER if p in PRECISIONS],
                dtypes={path: p.dtype for path, p in flat},
                weight_update=self.settings.weight_update,
            )
        except ValueError as e:
            kept = (
                f"; {len(held)} of these parameters already have state, which keeps its precision"
                " (a new optimizer, or convert_state, plans them again)" if held else ""
            ) + (f", and {held_bytes} bytes hold the state of parameters not in this tree"
                 if held_bytes else "")  # fmt: skip
            raise ValueError(
                f"state_precision='auto' with memory_budget={self.settings.memory_budget} bytes, "
                f"of which {scalar_bytes} go to the state's scalars{kept}: {e}"
            ) from e

    def _planned(self, parameters: dict) -> dict[str, str | None]:
        """The plan once :meth:`init` has taken ``parameters``: planned parameters (whose state
        exists) keep their precision, and under ``"auto"`` the others share what the budget
        leaves after the state of planned parameters outside the tree."""
        paths = {path for path, _ in tree_flatten(parameters)}
        held = {path: p for path, p in self._plan.items() if path in paths}
        elsewhere = {path: p for path, p in self._plan.items() if path not in paths}
        held_bytes = sum(a.nbytes for path in elsewhere
                         for _, a in tree_flatten(_subtree(self._state, path) or {}))  # fmt: skip
        return {**elsewhere, **self._decide(parameters, held, held_bytes)}

    @property
    def state(self) -> dict:
        """mlx's state tree. Setting it forgets the precision plan: :meth:`init` (which the next
        update calls, as in mlx) plans the parameters of the new state again."""
        return self._state

    @state.setter
    def state(self, state: dict) -> None:
        optim.Optimizer.state.fset(self, state)
        self._plan = {}

    @property
    def precision_plan(self) -> dict[str, str | None]:
        """``{path: precision}`` of the parameters this optimizer holds state for (empty before init)."""
        return dict(self._plan)

    def weight_update_for(self, precision: str | None, dtype: mx.Dtype) -> str | None:
        """How a parameter of ``dtype`` at state ``precision`` is written: ``None`` when as computed
        (float32), ``"nearest"`` under precision ``None`` (mlx's update), else ``weight_update``."""
        return self._format(precision, dtype).weight_update

    def _format(self, precision: str | None, dtype: mx.Dtype) -> StateFormat:
        return StateFormat.of(precision, dtype, self.settings.weight_update)

    def state_formats(self, parameters: dict, fresh: bool = False) -> dict[str, StateFormat]:
        """``{path: StateFormat}``: how the state of each array of ``parameters`` is stored (or,
        without state yet, will be), or with ``fresh`` how a state set from scratch is planned
        (see :meth:`plan`); :func:`convert_state` turns one format into another."""
        plan = self.plan(parameters) if fresh else self._planned(parameters)
        return {path: self._format(plan[path], p.dtype) for path, p in tree_flatten(parameters)}

    def hyperparameters(self) -> dict:
        """The settings that, with the learning rate, define this optimizer, as JSON values."""
        return {
            "betas": list(self.betas),
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "bias_correction": self.bias_correction,
            "state_precision": self.settings.state_precision,
            "precision_overrides": dict(self.settings.precision_overrides),
            "min_quantize_size": self.settings.min_quantize_size,
            "seed": self.settings.seed,
            "weight_update": self.settings.weight_update,
        }

    # -- mlx.optimizers.Optimizer interface ---------------------------------------------------------

    def init(self, parameters: dict) -> None:
        """mlx's ``init``: state for the parameters that have none; the state (and precision) of
        the others stays, so a second call with new parameters (LoRA layers added later) only adds
        theirs. Under ``"auto"`` the new ones share what ``memory_budget`` leaves."""
        self._init(parameters, parameters)

    def _init(self, parameters: dict, moments_like: dict) -> None:
        """:meth:`init`, with the moments of the parameters at precision ``None`` (mlx's update)
        made like those of ``moments_like`` (a tree of the same structure, the gradients: mlx
        makes its moments in the gradient's dtype)."""
        for name in ("key", "skipped_steps"):
            if self.settings.quantizing and isinstance(parameters, dict) and name in parameters:
                raise ValueError(
                    f"a parameter at the top of the tree is named {name!r}, as an entry of this "
                    f"optimizer's state (state_precision={self.settings.state_precision!r}): "
                    "nest it one level down"
                )
        planned = self._planned(parameters)  # first: a plan that does not fit changes nothing
        # The base class builds the state tree's structure; per-parameter state needs the
        # parameter's path (its precision depends on it), which init_single is not given.
        super().init(parameters)
        self._plan = planned

        def fill(path: str, parameter: mx.array, like: mx.array, state: dict) -> None:
            fmt = self._format(self._plan[path], parameter.dtype)
            fresh = zeros_state(fmt, like if fmt.precision is None else parameter)
            typed = fmt.precision is not None
            if not state:
                state.update(fresh)
            elif state_layout(state, typed) != state_layout(fresh, typed):
                # A state set from elsewhere (``optimizer.state = ...``) in another format would
                # otherwise fail deep inside the first step.
                raise ValueError(
                    f"the optimizer state of {path!r} is not stored as this optimizer stores it "
                    f"(state precision {fmt.precision!r}, weight update {fmt.weight_update!r}): "
                    "convert it with adamw_lm.optim.convert_state, or load the checkpoint with "
                    "convert_precision=True"
                )

        tree_map_with_path(fill, parameters, moments_like, self._state)
        self._add_scalars({path: p.dtype for path, p in tree_flatten(parameters)}, self._plan)

    def _add_scalars(self, dtypes: Mapping[str, mx.Dtype], plan: Mapping[str, str | None]) -> None:
        """The state's scalars that parameters of ``dtypes`` (by path) at ``plan`` need, if it has
        them not: the random key of stochastic rounding, the count of skipped steps."""
        if any(self._draws(plan.get(path), dtype) for path, dtype in dtypes.items()):
            self._state.setdefault("key", mx.random.key(self.settings.seed))
        if any(p is not None for p in plan.values()):
            self._state.setdefault("skipped_steps", mx.array(0, mx.uint32))

    def init_single(self, parameter: mx.array, state: dict) -> None:
        """Left empty: :meth:`init` fills each parameter's state once its path is known."""

    def _random(self, path: str, dtype: mx.Dtype) -> bool:
        """Whether the update of the parameter at ``path`` draws random bits."""
        return self._draws(self._plan.get(path), dtype)

    def _draws(self, precision: str | None, dtype: mx.Dtype) -> bool:
        """Whether the update of a parameter of ``dtype`` at ``precision`` draws random bits."""
        if precision is None:
            return False
        return PRECISIONS[precision].stochastic or (
            self.weight_update_for(precision, dtype) == "stochastic"
        )

    def apply_gradients(self, gradients: dict, parameters: dict) -> dict:
        # Same order as mlx's Optimizer.apply_gradients (schedule at the old step, then increment),
        # but mapped with paths so each parameter's precision can be looked up.
        if not self._initialized:
            # The parameters decide each state's format (a bfloat16 weight's buffer and random
            # key, whatever the gradients' dtype); the gradients' tree which parameters have one.
            self._init(tree_map(lambda _, p: p, gradients, parameters), gradients)
        for name, schedule in self._schedulers.items():
            self.state[name] = schedule(self.step)
        self.state["step"] = self.step + 1

        flat = tree_flatten(gradients)
        low = [(path, g) for path, g in flat if self._plan.get(path) is not None]
        grads = dict(low)
        leaves: dict[str, mx.array] = {}
        states: dict[str, dict] = {}

        def collect(path: str, _, p: mx.array, s: dict) -> None:
            leaves[path], states[path] = p, s

        tree_map_with_path(collect, gradients, parameters, self.state)

        buffers: dict[str, str | None] = {}  # each weight buffer's state key, found once

        def inputs(path: str) -> dict:
            p, s = leaves[path], states[path]
            tensors = {"g": grads[path], "p": p, "m": s["m"], "v": s["v"]}
            buffer = buffers[path] = self._format(self._plan[path], p.dtype).buffer(p.dtype)
            if buffer:
                tensors["buffer"] = s[buffer]
            return tensors

        # Small tensors are updated a bin at a time, laid end to end (each draws the bits it
        # draws alone): per tensor, a step is ~80 operations, each a dispatch to the stream's
        # thread, which bound the step of many small tensors (LoRA adapters) by their count.
        chunk = self.settings.chunk_size or default_chunk_size()
        kinds = ((path, (leaves[path].dtype, g.dtype), self._plan[path], g.size) for path, g in low)
        binned = update_bins(kinds, chunk)
        joined = {path for paths in binned for path in paths}
        for path in joined:
            # Flat once, for the bin's join and the check's (each reshape is a dispatch).
            grads[path] = grads[path].reshape(grads[path].size)
        bins = [Bin.join(paths, [inputs(p) for p in paths]) for paths in binned]
        finite = coefficients = None
        if low:
            # A bin's gradients are checked joined (the check is 8 operations per tensor), each
            # joined again: every update waits for the check, so the updates' own joined copies,
            # read by it, would all be alive before the first bin's update.
            checked = [join_flat([grads[p] for p in paths]) for paths in binned]
            checked += [g for p, g in flat if p not in joined]
            finite = all_finite(checked, self.settings.streams)
            self.state["skipped_steps"] = self.state["skipped_steps"] + (~finite).astype(mx.uint32)
            coefficients = self._coefficients(finite)
        stochastic: list[str] = []
        step_key = None
        if "key" in self.state:
            stochastic = [path for path, _ in low if self._random(path, leaves[path].dtype)]
            self.state["key"], step_key = mx.random.split(self.state["key"])
        keys = StepKeys(self.step, step_key, stochastic, [
            path for path in stochastic
            if self.weight_update_for(self._plan[path], leaves[path].dtype) == "stochastic"
        ])  # fmt: skip
        slices = Slices(self.settings.streams, chunk)

        def update(paths: list[str], tensors: dict, sizes: list[int]) -> dict:
            p = leaves[paths[0]]
            codecs = PRECISIONS[self._plan[paths[0]]]
            mode = self.weight_update_for(codecs.name, p.dtype)
            return slices.update(
                self._update_fn(codecs, mode), tensors, codecs,
                coefficients, keys.moments(paths, sizes, codecs), keys.weight(paths, sizes),
            )  # fmt: skip

        done = {}
        for b in bins:
            done.update(zip(b.paths, b.cut(update(b.paths, b.tensors, b.sizes))))

        def apply(path: str, g: mx.array, p: mx.array, s: dict) -> mx.array:
            precision = self._plan.get(path)
            if precision is None:
                return super(AdamW, self).apply_single(g, p, s)
            new = done[path] if path in done else update([path], inputs(path), [p.size])
            s["m"], s["v"] = new["m"], new["v"]
            if buffers[path]:
                s[buffers[path]] = new["buffer"]
            return new["p"]

        return tree_map_with_path(apply, gradients, parameters, self.state)

    def _update_fn(self, precision: Precision, mode: str | None) -> Callable:
        config = (precision.name, mode, self.eps)
        if config not in self._compiled:
            self._compiled[config] = mx.compile(_fused_update(precision, mode, self.eps))
        return self._compiled[config]

    def _coefficients(self, finite: mx.array) -> _Coefficients:
        """This step's scalars; a step with non-finite gradients gets the ones that skip it."""
        b1, b2 = self.betas
        lr = mx.where(finite, self.learning_rate.astype(mx.float32), 0.0)
        step_size, root_scale = lr, mx.array(1.0)
        if self.bias_correction:
            t = self.step.astype(mx.float32)
            step_size = lr / (1 - b1**t)
            root_scale = mx.rsqrt(1 - b2**t)
        return _Coefficients(
            finite=finite,
            beta1=mx.where(finite, b1, 1.0),
            one_minus_beta1=mx.where(finite, 1 - b1, 0.0),
            beta2=mx.where(finite, b2, 1.0),
            one_minus_beta2=mx.where(finite, 1 - b2, 0.0),
            decay=1 - lr * self.weight_decay,
            step_size=step_size,
            root_scale=root_scale,
        )

    # -- accounting -------------------------------------------------------------------------------

    def state_nbytes(self) -> int:
        """Bytes held by every array of the optimizer state (scales, step and keys included)."""
        return sum(a.nbytes for _, a in tree_flatten(self.state))


def state_layout(state: dict, dtypes: bool = True) -> dict[str, tuple]:
    """``{flat key: (shape, dtype)}`` (or ``(shape,)`` without ``dtypes``) of a parameter's state,
    a tree or already flat: what its :class:`StateFormat` decides (under precision ``None`` all
    but the moments' dtype, which follows the gradients, as mlx's)."""
    return {key: (tuple(a.shape), a.dtype) if dtypes else (tuple(a.shape),)
            for key, a in tree_flatten(state)}  # fmt: skip


def _subtree(tree, path: str):
    """The part of ``tree`` at a :func:`mlx.utils.tree_flatten` path, or ``None``."""
    for part in path.split("."):
        try:
            tree = tree[int(part)] if isinstance(tree, (list, tuple)) else tree[part]
        except (KeyError, IndexError, ValueError, TypeError):
            return None
    return tree


class _Coefficients(NamedTuple):
    """A step's scalars, computed once per step, not once per element of every slice."""

    finite: mx.array  # bool: whether this step's gradients are finite (else it is skipped)
    beta1: mx.array
    one_minus_beta1: mx.array
    beta2: mx.array
    one_minus_beta2: mx.array
    decay: mx.array  # 1 - lr * weight_decay
    step_size: mx.array  # lr, over (1 - beta1^t) with bias correction
    root_scale: mx.array  # 1, or rsqrt(1 - beta2^t) with bias correction


#: The largest finite bfloat16 (a float32 too): the ceiling of a stored second moment.
_V_MAX = float.fromhex("0x1.fep127")


def _storable(v: mx.array) -> mx.array:
    """The second moment ``v`` (float32) within what every format below float32 stores.

    A finite gradient whose square overflows (|g| > 1.8e19) makes v infinite: mlx's AdamW then
    freezes that element for good, but stored below float32 an infinite v is a NaN step (int4:
    inf · 0 in its block) or a state that a checkpoint cannot hold (states must be finite). So v
    stops at the largest bfloat16, which these formats store as it is (its block's other elements
    then decode to at least the lowest level of that, 1/65536 of it in int8: their steps all but
    stop too). A select, the form a CPU kernel vectorizes; a NaN stays NaN (for the loader's
    checks to find). (The codecs store any finite m.)
    """
    return mx.where(v > _V_MAX, _V_MAX, v)


def _fused_update(precision: Precision, mode: str | None, eps: float) -> Callable:
    """decode → AdamW in float32 → encode, for one slice of a parameter; compiled by the caller.

    Takes and gives ``{"g": gradient (in only), "p": parameter, "m": ..., "v": ...}`` and, when
    ``mode`` has one, the weight's ``"buffer"``.
    """

    shared_key = all(c.stochastic and not c.rotating for c in (precision.m, precision.v))

    def update(tensors: dict, k: _Coefficients, keys, weight_key, offset) -> dict:
        g, p, buffer = tensors["g"], tensors["p"], tensors.get("buffer")
        shape = g.shape
        # A skipped step zeroes the gradient and its coefficients keep everything as it is
        # (β = 1, lr = 0); every codec encodes the decoded moments back to the same bits. The
        # moments select their own gradient terms, two operations mx.compile does not merge and
        # fuses each into its moment's kernel: one zeroed gradient, read by both, was a pass of
        # its own.
        g32 = g.astype(mx.float32)
        gradient = mx.where(k.finite, g32, 0.0)
        m_stored = precision.m.decode(tensors["m"], shape)
        v_old = precision.v.decode(tensors["v"], shape)
        v = k.beta2 * v_old + k.one_minus_beta2 * mx.where(k.finite, g32 * g32, 0.0)
        if not precision.exact_root:
            # fp32 keeps mlx's arithmetic, where an infinite v freezes its element only: there
            # the select cost 25 % of the step (docs/benchmarks.md).
            v = _storable(v)
        root_v = precision.root(v)
        if not precision.exact_root:
            # Its own kernel, read by the update and (int4) the step's encoding: within theirs,
            # its dozen operations would take them past the depth where mx.compile cuts a chain.
            root_v = mx.contiguous(root_v)
        if precision.m_over_root_v:
            # The new m / (sqrt(v) + eps) from the stored old one: m_old = stored · root_old.
            root = root_v + eps
            inverse = 1 / root
            ratio = (precision.v.decode_root(tensors["v"], shape) + eps) * inverse
            # A skipped step (beta1 = 1, g = 0, v unchanged) must give the stored step back bit
            # for bit; the two roots of one v, computed two ways (per block from its codes, and
            # per element by roots.root), differ by up to roots.ROOT_ERROR.
            ratio = 1 + k.finite.astype(mx.float32) * (ratio - 1)
            m_stored = k.beta1 * m_stored * ratio + k.one_minus_beta1 * gradient * inverse
            m = m_stored * root
        else:
            m = m_stored = k.beta1 * m_stored + k.one_minus_beta1 * gradient
        old_w = weights.read(p, buffer)
        w = old_w * k.decay - k.step_size * m / (root_v * k.root_scale + eps)
        # A skipped step writes the old weight back, its bits too: p · 1 - 0 · step turns a -0
        # into +0 where the step is negative. (Every write gives back a weight it can store.)
        w = mx.where(k.finite, w, old_w)
        new_p, new_buffer = weights.write(w, p, buffer, mode, weight_key, offset, k.finite)
        # Moments that are not rotating share one key: a stochastic pair draws disjoint bits of
        # one hash, computed once only if both encodings read one traced array (mx.compile gives
        # each argument its own, even the same array passed twice: a hash pass more per slice).
        if shared_key:
            keys = (keys[0], keys[0])
        new = {
            "p": new_p,
            "m": precision.m.encode(m_stored, keys[0], offset),
            "v": precision.v.encode(v, keys[1], offset),
        }
        if new_buffer is not None:
            new["buffer"] = new_buffer
        return new

    return update


__all__ = [
    "AdamW",
    "LOW_PRECISIONS",
    "PATTERN_TIMEOUT_S",
    "StateFormat",
    "all_finite",
    "convert_state",
    "default_streams",
    "state_layout",
    "zeros_state",
]
