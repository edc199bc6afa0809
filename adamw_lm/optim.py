"""A memory-aware AdamW for MLX.

With ``state_precision=None`` every parameter is updated by ``mlx.optimizers.AdamW``'s own
``apply_single``, so results are bit-for-bit those of mlx. Any other precision keeps the moments in a
storage format from :mod:`adamw_lm.codecs` and runs decode → AdamW (in float32) → encode as one compiled
function per parameter, so a full-model float32 copy of the moments never exists.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence, Union

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
        finite = None
        if low:
            finite = mx.isfinite(sum(_sum_wide(g) for _, g in flat))
            self.state["skipped_steps"] = self.state["skipped_steps"] + (~finite).astype(mx.uint32)
        keys = {}
        if "key" in self.state:
            stochastic = [p for p, _ in low if PRECISIONS[self._plan[p]].stochastic]
            split = mx.random.split(self.state["key"], len(stochastic) + 1)
            self.state["key"] = split[0]
            keys = {path: split[i + 1] for i, path in enumerate(stochastic)}

        # Each low-precision update waits for the previous one: evaluated in sequence, one
        # chunk's decoded moments and temporaries are freed before the next one's exist.
        previous: list[mx.array] = []

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
                out = update(
                    g_part, *args[1:], self.learning_rate, self.step, finite, key,
                    mx.array(start, dtype=mx.uint32),
                )  # fmt: skip
                previous[:] = [a for _, a in tree_flatten(out)]
                parts.append(out)
            if len(parts) == 1:
                new_p, s["m"], s["v"] = parts[0]
                return new_p
            s["m"] = _join_stored([m for _, m, _ in parts], p.shape)
            s["v"] = _join_stored([v for _, _, v in parts], p.shape)
            new_p = mx.concatenate([q for q, _, _ in parts]).reshape(p.shape)
            # The joins join the chain too, or they would all run last, with every chunk alive.
            previous[:] = [new_p, *(a for _, a in tree_flatten([s["m"], s["v"]]))]
            return new_p

        return tree_map_with_path(apply, gradients, parameters, self.state)

    def _update_fn(self, precision: Precision) -> Callable:
        b1, b2 = self.betas
        config = (precision.name, b1, b2, self.eps, self.weight_decay, self.bias_correction)
        if config not in self._compiled:
            self._compiled[config] = mx.compile(_fused_update(precision, *config[1:]))
        return self._compiled[config]

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


def _fused_update(
    precision: Precision, b1: float, b2: float, eps: float, weight_decay: float, bias_correction: bool
) -> Callable:
    """decode → AdamW in float32 → encode, for one parameter; compiled by the caller."""

    def update(g, p, m_stored, v_stored, lr, step, finite, key, offset):
        shape = g.shape
        g32 = g.astype(mx.float32)
        lr = lr.astype(mx.float32)
        m_old = precision.m.decode(m_stored, shape)
        v_old = precision.v.decode(v_stored, shape)
        # A skipped step keeps the decoded moments, which every codec encodes back to the same
        # bits. Selecting here, not on the stored outputs, keeps the update one fused kernel.
        m = mx.where(finite, b1 * m_old + (1 - b1) * g32, m_old)
        v = mx.where(finite, b2 * v_old + (1 - b2) * mx.square(g32), v_old)
        w = p.astype(mx.float32) * (1 - lr * weight_decay)
        if bias_correction:
            t = step.astype(mx.float32)
            c1 = lr / (1 - b1**t)
            c2 = mx.rsqrt(1 - b2**t)
            w = w - c1 * m / (mx.sqrt(v) * c2 + eps)
        else:
            w = w - lr * m / (mx.sqrt(v) + eps)
        km, kv = (None, None) if key is None else mx.random.split(key)
        return (
            mx.where(finite, w.astype(p.dtype), p),
            precision.m.encode(m, km, offset),
            precision.v.encode(v, kv, offset),
        )

    return update


__all__ = ["AdamW", "LOW_PRECISIONS"]
