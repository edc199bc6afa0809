"""A memory-aware AdamW for MLX.

With ``state_precision=None`` every parameter is updated by ``mlx.optimizers.AdamW``'s own
``apply_single``, so results are bit-for-bit those of mlx. Any other precision keeps the moments in a
storage format from :mod:`adamw_lm.codecs` and runs decode → AdamW (in float32) → encode as one compiled
function per slice of ``chunk_size`` elements, so neither a full-model nor a full-tensor float32 copy
of the moments ever exists.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
from typing import Callable, Mapping, NamedTuple, Sequence, Union

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path

from .codecs import PRECISIONS, MomentCodec, Precision, Stored
from .memory import STATE_LADDER, choose_precisions, stored_precision

LearningRate = Union[float, Callable[[mx.array], mx.array]]

#: Precisions below float32; tensors smaller than ``min_quantize_size`` fall back to "fp32".
LOW_PRECISIONS = tuple(name for name in PRECISIONS if name != "fp32")


def _check_precision(value: str | None, what: str, auto: bool = False) -> None:
    if value is not None and value not in PRECISIONS and not (auto and value == "auto"):
        allowed = ", ".join(["None"] + [repr(p) for p in PRECISIONS] + (["'auto'"] if auto else []))
        raise ValueError(f"{what} must be one of {allowed}; got {value!r}")


class AdamW(optim.AdamW):
    """AdamW with optional low-precision moment storage.

    A subclass of ``mlx.optimizers.AdamW`` (so of ``mlx.optimizers.Optimizer``): it is used the same
    way, ``optimizer.update(model, grads)`` then ``mx.eval(model.parameters(), optimizer.state)``.

    Args:
        learning_rate: a float or a schedule ``step -> lr`` (as in ``mlx.optimizers``).
        betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: added to the denominator; must be ``> 0``.
        weight_decay: decoupled weight decay, ``>= 0``.
        bias_correction: apply Adam's bias correction.
        state_precision: ``None`` keeps each moment in its parameter's dtype and is bit-exact with
            ``mlx.optimizers.AdamW``; ``"fp32"`` keeps float32 moments and does the update in float32
            whatever the parameter's dtype; lower precisions are listed in
            :data:`adamw_lm.codecs.PRECISIONS`; ``"auto"`` picks one per parameter so that the whole
            state fits ``memory_budget`` (see :func:`adamw_lm.memory.choose_precisions`).
        precision_overrides: ``{regex: precision}``; the first pattern that ``re.search`` finds in a
            parameter's path (e.g. ``"embed_tokens"``, ``"norm"``) decides that parameter's precision.
        min_quantize_size: tensors with fewer elements keep float32 moments under a low precision.
        seed: seeds the random key (kept in the state) used for stochastic rounding.
        memory_budget: bytes the whole optimizer state may take (``state_nbytes()``); required by,
            and only allowed with, ``state_precision="auto"``.
        chunk_size: under a precision other than ``None``, tensors are updated in slices of this
            many elements (a multiple of 256, so that slices hold whole blocks): the step's
            temporaries are then a few slices, not a few copies of each tensor. Results do not
            depend on it. ``None``: 2^18 on the CPU, 2^22 on a GPU (fewer, larger kernels).
        streams: how many mlx streams the slices are spread over, in turn; results do not
            depend on it. ``None``: :func:`default_streams`.

    Under a precision other than ``None``, a step whose gradients hold a NaN or an infinity leaves
    parameters and moments unchanged and is counted in ``state["skipped_steps"]``; ``None`` keeps
    mlx's behaviour exactly, non-finite values included.
    """

    def __init__(
        self,
        learning_rate: LearningRate,
        betas: Sequence[float] = (0.9, 0.999),
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
    ):
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2); got {betas!r}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{i}] (beta{i + 1}) must be in [0, 1); got {beta}")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0; got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0; got {weight_decay}")
        if not callable(learning_rate) and not learning_rate >= 0.0:
            raise ValueError(f"learning_rate must be >= 0 (or a schedule); got {learning_rate}")
        _check_precision(state_precision, "state_precision", auto=True)
        if state_precision == "auto":
            if isinstance(memory_budget, bool) or not isinstance(memory_budget, int):
                raise ValueError(
                    f"state_precision='auto' needs memory_budget, an int number of bytes; "
                    f"got {memory_budget!r}"
                )
            if memory_budget <= 0:
                raise ValueError(f"memory_budget must be > 0 bytes; got {memory_budget}")
        elif memory_budget is not None:
            raise ValueError(
                f"memory_budget is only used with state_precision='auto'; "
                f"got state_precision={state_precision!r}"
            )
        overrides = dict(precision_overrides or {})
        for pattern, precision in overrides.items():
            _check_precision(precision, f"precision_overrides[{pattern!r}]")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"precision_overrides key {pattern!r} is not a regex: {e}") from e
        if chunk_size is not None and (chunk_size < 1 or chunk_size % 256):
            raise ValueError(f"chunk_size must be a positive multiple of 256; got {chunk_size}")
        if streams is not None and (isinstance(streams, bool) or streams < 1):
            raise ValueError(f"streams must be an int >= 1 (or None); got {streams!r}")
        if min_quantize_size < 0:
            raise ValueError(f"min_quantize_size must be >= 0; got {min_quantize_size}")

        super().__init__(learning_rate, list(betas), eps, weight_decay, bias_correction)
        if callable(learning_rate) and not self.state["learning_rate"].item() >= 0.0:
            raise ValueError(
                f"learning_rate schedule must give values >= 0; "
                f"got {self.state['learning_rate'].item()} at step 0"
            )
        self.state_precision = state_precision
        self.precision_overrides = overrides
        self.min_quantize_size = min_quantize_size
        self.seed = seed
        self.memory_budget = memory_budget
        self.chunk_size = chunk_size
        self.streams = streams
        self._plan: dict[str, str | None] = {}
        self._compiled: dict[tuple, Callable] = {}

    # -- which precision each parameter gets -------------------------------------------------------

    def _override_pattern(self, path: str) -> str | None:
        """The first ``precision_overrides`` pattern found in ``path``, if any."""
        return next((pat for pat in self.precision_overrides if re.search(pat, path)), None)

    def precision_for(self, path: str, parameter: mx.array) -> str | None:
        """The precision that the parameter at ``path`` gets under this optimizer's settings.

        Under ``"auto"`` a parameter no override names is decided with the whole tree, by
        :meth:`plan` (or :meth:`init`); before that this raises ``ValueError``.
        """
        pattern = self._override_pattern(path)
        if pattern is not None:
            precision = self.precision_overrides[pattern]
        elif self.state_precision == "auto":
            if path not in self._plan:
                raise ValueError(
                    f"state_precision='auto' decides {path!r} together with the whole tree: "
                    "call init(parameters) (or plan(parameters)) first"
                )
            return self._plan[path]
        else:
            precision = self.state_precision
        return stored_precision(precision, parameter.size, self.min_quantize_size)

    def plan(self, parameters: dict) -> dict[str, str | None]:
        """``{path: precision}`` for every array in the tree ``parameters``.

        Under ``"auto"`` the precisions are chosen so that the state of this whole tree, its
        scalars included, fits ``memory_budget``; ``ValueError`` if even the lowest cannot.
        """
        flat = tree_flatten(parameters)
        if self.state_precision != "auto":
            return {path: self.precision_for(path, p) for path, p in flat}
        pins = {
            path: self.precision_for(path, p)
            for path, p in flat
            if self._override_pattern(path) is not None
        }
        # Moments get the budget minus the state's scalars (step, learning rate, and the
        # skipped-step count and random key that init adds).
        scalars = {k: a for k, a in self.state.items() if isinstance(a, mx.array)}
        scalars.setdefault("skipped_steps", mx.array(0, mx.uint32))
        scalars.setdefault("key", mx.random.key(self.seed))
        scalar_bytes = sum(a.nbytes for a in scalars.values())
        try:
            return choose_precisions(
                {path: p.shape for path, p in flat},
                max(self.memory_budget - scalar_bytes, 0),
                overrides=pins,
                min_quantize_size=self.min_quantize_size,
                ladder=[p for p in STATE_LADDER if p in PRECISIONS],
                dtypes={path: p.dtype for path, p in flat},
            )
        except ValueError as e:
            raise ValueError(
                f"state_precision='auto' with memory_budget={self.memory_budget} bytes, of which "
                f"{scalar_bytes} go to the state's scalars: {e}"
            ) from e

    @property
    def precision_plan(self) -> dict[str, str | None]:
        """``{path: precision}`` of the parameters this optimizer holds state for (empty before init)."""
        return dict(self._plan)

    # -- mlx.optimizers.Optimizer interface ---------------------------------------------------------

    def init(self, parameters: dict) -> None:
        self._plan = self.plan(parameters)
        # The base class builds the state tree's structure; per-parameter state needs the
        # parameter's path (its precision depends on it), which init_single is not given.
        super().init(parameters)
        def fill(path: str, parameter: mx.array, state: dict) -> None:
            if not state:
                self._init_param(path, parameter, state)

        tree_map_with_path(fill, parameters, self._state)
        if any(PRECISIONS[p].stochastic for p in self._plan.values() if p is not None):
            self._state.setdefault("key", mx.random.key(self.seed))
        if any(p is not None for p in self._plan.values()):
            self._state.setdefault("skipped_steps", mx.array(0, mx.uint32))

    def init_single(self, parameter: mx.array, state: dict) -> None:
        """Left empty: :meth:`init` fills each parameter's state once its path is known."""

    def _init_param(self, path: str, parameter: mx.array, state: dict) -> None:
        precision = self._plan.get(path, self.precision_for(path, parameter))
        if precision is None:
            super().init_single(parameter, state)
        else:
            codecs = PRECISIONS[precision]
            state.update(m=codecs.m.zeros(parameter.shape), v=codecs.v.zeros(parameter.shape))

    def apply_gradients(self, gradients: dict, parameters: dict) -> dict:
        # Same order as mlx's Optimizer.apply_gradients (schedule at the old step, then increment),
        # but mapped with paths so each parameter's precision can be looked up.
        if not self._initialized:
            self.init(gradients)
        for name, schedule in self._schedulers.items():
            self.state[name] = schedule(self.step)
        self.state["step"] = self.step + 1

        flat = tree_flatten(gradients)
        low = [(path, g) for path, g in flat if self._plan.get(path) is not None]
        finite = coefficients = None
        if low:
            finite = mx.isfinite(sum(_sum_wide(g) for _, g in flat))
            self.state["skipped_steps"] = self.state["skipped_steps"] + (~finite).astype(mx.uint32)
            coefficients = self._coefficients(finite)
        keys = {}
        if "key" in self.state:
            stochastic = [p for p, _ in low if PRECISIONS[self._plan[p]].stochastic]
            split = mx.random.split(self.state["key"], len(stochastic) + 1)
            self.state["key"] = split[0]
            keys = {path: split[i + 1] for i, path in enumerate(stochastic)}

        # Each slice's update waits for the previous one in its lane: evaluated in sequence, one
        # slice's decoded moments and temporaries are freed before the next one's exist.
        lanes = _lanes(self.streams)
        chains: list[list[mx.array]] = [[] for _ in lanes]
        turns = itertools.count()  # slices take the lanes in turn, across parameters too

        def apply(path: str, g: mx.array, p: mx.array, s: dict) -> mx.array:
            precision = self._plan.get(path)
            if precision is None:
                return super(AdamW, self).apply_single(g, p, s)
            codecs = PRECISIONS[precision]
            update = self._update_fn(codecs)
            key = keys.get(path)
            chunk = self.chunk_size or _default_chunk_size()
            parts = []
            for start in range(0, g.size, chunk):
                stop = min(start + chunk, g.size)
                lane = next(turns) % len(lanes)
                previous = chains[lane]
                # Slicing too happens in the lane: a view made on another stream would wait there.
                with mx.stream(lanes[lane]):
                    if stop - start == g.size:
                        args = (g, p, s["m"], s["v"])
                    else:
                        args = (
                            g.reshape(-1)[start:stop],
                            p.reshape(-1)[start:stop],
                            _slice_stored(codecs.m, s["m"], start, stop),
                            _slice_stored(codecs.v, s["v"], start, stop),
                        )
                    g_part = mx.depends(args[0], previous) if previous else args[0]
                    # The offset waits for the slice too: random bits that depend on the key
                    # alone would be drawn for every slice at once, ahead of the chain.
                    offset = mx.depends(mx.array(start, mx.uint32), g_part)
                    out = update(g_part, *args[1:], coefficients, key, offset)
                previous[:] = [a for _, a in tree_flatten(out)]
                parts.append(out)
            if len(parts) == 1:
                new_p, s["m"], s["v"] = parts[0]
                return new_p
            s["m"] = _join_stored([m for _, m, _ in parts], p.shape)
            s["v"] = _join_stored([v for _, _, v in parts], p.shape)
            new_p = mx.concatenate([q for q, _, _ in parts]).reshape(p.shape)
            # The joins join the chains too, or they would all run last, with every slice alive.
            joined = [new_p, *(a for _, a in tree_flatten([s["m"], s["v"]]))]
            for chain in chains:
                chain[:] = joined
            return new_p

        return tree_map_with_path(apply, gradients, parameters, self.state)

    def _update_fn(self, precision: Precision) -> Callable:
        config = (precision.name, self.eps)
        if config not in self._compiled:
            self._compiled[config] = mx.compile(_fused_update(precision, self.eps))
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


def _sum_wide(g: mx.array) -> mx.array:
    """The sum of ``g`` in a float32-range type: NaN or infinite when any element is.

    One read of ``g``, unlike ``isfinite`` per element (5x slower on a CPU). Only gradients beyond
    ~1e28 overflow it, and their squares would overflow the second moment anyway.
    """
    return mx.sum(g.astype(mx.float32) if g.dtype == mx.float16 else g)


_LANES: dict[tuple[int, str], list[mx.Stream]] = {}


def default_streams() -> int:
    """Streams an :class:`AdamW` with ``streams=None`` uses on the default device: 2 on a CPU with
    two cores or more (mlx runs each CPU stream on its own thread, and an element-wise kernel on
    one core), else 1."""
    return min(2, os.cpu_count() or 1) if mx.default_device() == mx.cpu else 1


def _lanes(streams: int | None) -> list[mx.Stream]:
    """The streams slices are spread over: the default one first, then extra ones, made once per
    thread and device (mlx streams belong to the thread that makes them)."""
    device = mx.default_device()
    streams = streams or default_streams()
    made = _LANES.setdefault((threading.get_ident(), str(device)), [])
    while len(made) < streams - 1:
        made.append(mx.new_stream(device))
    return [mx.default_stream(device), *made[: streams - 1]]


def _default_chunk_size() -> int:
    return 1 << 18 if mx.default_device() == mx.cpu else 1 << 22


def _slice_stored(codec: MomentCodec, stored: Stored, start: int, stop: int) -> Stored:
    """Elements ``[start, stop)`` of a stored moment (``start`` a multiple of the codec's block)."""
    if isinstance(stored, dict):
        first, last = start // codec.block, -(-stop // codec.block)
        return {name: a[first:last] for name, a in stored.items()}
    return stored.reshape(-1)[start:stop]


def _join_stored(parts: list[Stored], shape: tuple[int, ...]) -> Stored:
    """The stored moment of ``shape`` made of consecutive slices ``parts``."""
    if isinstance(parts[0], dict):
        return {name: mx.concatenate([part[name] for part in parts]) for name in parts[0]}
    return mx.concatenate(parts).reshape(shape)


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


def _fused_update(precision: Precision, eps: float) -> Callable:
    """decode → AdamW in float32 → encode, for one slice of a parameter; compiled by the caller."""

    def update(g, p, m_stored, v_stored, k: _Coefficients, key, offset):
        shape = g.shape
        # A skipped step zeroes the gradient and its coefficients keep everything as it is
        # (β = 1, lr = 0); every codec encodes the decoded moments back to the same bits.
        g32 = mx.where(k.finite, g.astype(mx.float32), 0.0)
        m = k.beta1 * precision.m.decode(m_stored, shape) + k.one_minus_beta1 * g32
        v = k.beta2 * precision.v.decode(v_stored, shape) + k.one_minus_beta2 * (g32 * g32)
        w = p.astype(mx.float32) * k.decay - k.step_size * m / (mx.sqrt(v) * k.root_scale + eps)
        # One key for both moments: a stochastic pair draws disjoint bits of one hash, which
        # the compiler computes once.
        return (
            w.astype(p.dtype),
            precision.m.encode(m, key, offset),
            precision.v.encode(v, key, offset),
        )

    return update


__all__ = ["AdamW", "LOW_PRECISIONS", "default_streams"]
