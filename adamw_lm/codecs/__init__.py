"""How one optimizer moment is stored.

A *codec* turns a float32 moment into its stored form and back. Each storage format lives in its own
module of this package with pure ``zeros`` / ``encode`` / ``decode`` functions; a *precision* pairs the
codec of the first moment (signed) with the codec of the second (non-negative). Adding a format is one
new module plus one line in :data:`PRECISIONS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Union

import mlx.core as mx

from .fp32 import FP32

#: A stored moment: one array, or a small dict of arrays (codes + scales) for quantized formats.
Stored = Union[mx.array, dict[str, mx.array]]


class MomentCodec(Protocol):
    """Stores one moment tensor. All methods are pure and traceable by ``mx.compile``."""

    #: Whether ``encode`` consumes a random key (stochastic rounding).
    stochastic: bool

    def zeros(self, shape: tuple[int, ...]) -> Stored:
        """The stored form of an all-zero moment of ``shape``."""
        ...

    def encode(self, x: mx.array, key: mx.array | None) -> Stored:
        """Store the float32 moment ``x``."""
        ...

    def decode(self, stored: Stored, shape: tuple[int, ...]) -> mx.array:
        """The float32 moment of ``shape`` that ``stored`` holds."""
        ...


@dataclass(frozen=True)
class Precision:
    """A storage choice for both moments of one parameter."""

    name: str
    m: MomentCodec
    v: MomentCodec

    @property
    def stochastic(self) -> bool:
        return self.m.stochastic or self.v.stochastic


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", FP32, FP32),
}
