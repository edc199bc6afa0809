"""The settings of :class:`adamw_lm.AdamW`, checked once when they are made."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Callable, Mapping, Union

import mlx.core as mx
import numpy as np
import regex

from . import weight_update as weights
from .codecs import PRECISIONS

LearningRate = Union[float, Callable[[mx.array], mx.array]]


#: Limits on ``precision_overrides``, checked before a pattern is compiled: patterns may come from
#: a stranger's checkpoint, and compiling ``(?:a{3000}){3000}`` (20 characters) takes gigabytes.
MAX_PATTERNS = 256
MAX_PATTERN_CHARS = 1000
#: The pattern's length times the product of its counted repeats (``{n}``, ``{m,n}``): about the
#: size of what compiling it builds. Escaped braces count too: telling ``\{`` from ``\\{`` would
#: need the parser whose cost this bounds.
MAX_PATTERN_SIZE = 100_000
_COUNTED_REPEAT = regex.compile(r"\{(\d*)(?:,(\d*))?\}")
#: An inline flag group that turns verbose mode on, where ``{3 000}`` is a counted repeat.
_VERBOSE = regex.compile(r"\(\?[a-zA-Z0-9^-]*x")


def check_pattern(pattern: object) -> None:
    """``ValueError`` unless ``pattern`` is a regex within the limits above."""
    if not isinstance(pattern, str):
        raise ValueError(f"precision_overrides key {pattern!r} must be a string (a regex)")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"precision_overrides key {pattern[:40]!r}... has {len(pattern)} characters; "
                         f"at most {MAX_PATTERN_CHARS}")
    if _VERBOSE.search(pattern):
        raise ValueError(f"precision_overrides key {pattern[:40]!r}: verbose mode ((?x)) is not "
                         "taken (it would hide counted repeats from the limits below)")
    size = len(pattern)
    for low, high in _COUNTED_REPEAT.findall(pattern):
        size *= max(int(low or 0), int(high or 0), 1)
        if size > MAX_PATTERN_SIZE:
            raise ValueError(f"precision_overrides key {pattern[:40]!r}: its counted repeats "
                             f"({{n}}, {{m,n}}) would expand it past {MAX_PATTERN_SIZE} characters")
    try:
        regex.compile(pattern)
    except (regex.error, RecursionError, OverflowError, MemoryError) as e:
        what = "nests too deeply" if isinstance(e, RecursionError) else f"is not a regex: {e}"
        raise ValueError(f"precision_overrides key {pattern[:40]!r} {what}") from None


def check_precision(value: str | None, what: str, auto: bool = False) -> None:
    """``ValueError`` naming ``what`` unless ``value`` is ``None``, a known precision, or (with
    ``auto``) ``"auto"``."""
    if value is not None and value not in PRECISIONS and not (auto and value == "auto"):
        allowed = ", ".join(["None"] + [repr(p) for p in PRECISIONS] + (["'auto'"] if auto else []))
        raise ValueError(f"{what} must be one of {allowed}; got {value!r}")


@dataclass(frozen=True)
class Settings:
    """What :class:`adamw_lm.AdamW` adds to ``mlx.optimizers.AdamW``'s arguments (documented
    there). ``weight_update`` is resolved: ``None`` becomes the mode that applies."""

    state_precision: str | None = None
    precision_overrides: Mapping[str, str | None] = field(default_factory=dict)
    min_quantize_size: int = 4096
    seed: int = 0
    memory_budget: int | None = None
    chunk_size: int | None = None
    streams: int | None = None
    weight_update: str | None = None

    def __post_init__(self) -> None:
        check_precision(self.state_precision, "state_precision", auto=True)
        budget = self.memory_budget
        if self.state_precision == "auto":
            if not _is_int(budget):
                raise ValueError(
                    f"state_precision='auto' needs memory_budget, an int number of bytes; "
                    f"got {budget!r}"
                )
            if budget <= 0:
                raise ValueError(f"memory_budget must be > 0 bytes; got {budget}")
        elif budget is not None:
            raise ValueError(
                f"memory_budget is only used with state_precision='auto'; "
                f"got state_precision={self.state_precision!r}"
            )
        overrides = dict(self.precision_overrides or {})
        if len(overrides) > MAX_PATTERNS:
            raise ValueError(f"precision_overrides has {len(overrides)} patterns; at most {MAX_PATTERNS}")
        for pattern, precision in overrides.items():
            check_pattern(pattern)
            check_precision(precision, f"precision_overrides[{pattern!r}]")
        if self.chunk_size is not None and (
            not _is_int(self.chunk_size) or self.chunk_size < 1 or self.chunk_size % 256
        ):
            raise ValueError(
                f"chunk_size must be a positive multiple of 256 (or None); got {self.chunk_size!r}"
            )
        if self.streams is not None and (not _is_int(self.streams) or self.streams < 1):
            raise ValueError(f"streams must be an int >= 1 (or None); got {self.streams!r}")
        if not _is_int(self.min_quantize_size) or self.min_quantize_size < 0:
            raise ValueError(f"min_quantize_size must be an int >= 0; got {self.min_quantize_size!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be an int from 0 to 2^64 - 1 (mlx's keys); got {self.seed!r}")
        weights.check_weight_update(self.weight_update)
        if self.state_precision is None and self.weight_update not in (None, "nearest"):
            raise ValueError(
                f"weight_update={self.weight_update!r} needs a state_precision other than None: "
                "None is mlx's own update, which rounds the weight to nearest"
            )
        default = "nearest" if self.state_precision is None else weights.DEFAULT_WEIGHT_UPDATE
        object.__setattr__(self, "precision_overrides", overrides)
        # Plain ints (a NumPy integer is no JSON value in a checkpoint's settings).
        for name in ("min_quantize_size", "seed", "memory_budget", "chunk_size", "streams"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "weight_update", self.weight_update or default)

    @property
    def quantizing(self) -> bool:
        """Whether any parameter can get a state precision other than ``None``."""
        return self.state_precision is not None or any(
            p is not None for p in self.precision_overrides.values()
        )


def _is_int(value: object) -> bool:
    """An integer (NumPy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_adamw_arguments(betas, eps: float, quantizing: bool) -> None:
    """``ValueError`` naming the first of mlx's AdamW arguments that is out of its range.

    As mlx: ``betas`` in ``[0, 1)`` (and a pair, which mlx would only find deep inside its update),
    ``eps >= 0``. A low-precision state (``quantizing``) also needs ``eps > 0``: with 0, a block of
    zero moments makes its step 0 / 0, and a NaN stays in the stored moments for good. Signs of the
    learning rate and of the weight decay are free, as in mlx (a negative rate ascends the loss).
    """
    if isinstance(betas, (str, bytes)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2); got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"betas[{i}] (beta{i + 1}) must be in [0, 1); got {beta}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0; got {eps}")
    if quantizing and eps == 0.0:
        raise ValueError("eps must be > 0 with a low-precision state (a state_precision or "
                         "precision_overrides other than None); got 0")


__all__ = ["LearningRate", "Settings", "check_adamw_arguments", "check_precision"]
