"""How one optimizer moment is stored.

A *codec* turns a float32 moment into its stored form and back. Each storage format lives in its
own module of this package with pure ``zeros`` / ``encode`` / ``decode`` functions and ``nbytes``,
the size of its stored form (from which :mod:`adamw_lm.memory` plans); a *precision* pairs the
codec of the first moment (signed) with the codec of the second (non-negative). Adding a format is
one new module plus one line in :data:`PRECISIONS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Union

import mlx.core as mx

from .bf16 import BF16_M, BF16_V
from .fp32 import FP32
from .int4 import INT4_M, INT4_V
from .int8 import INT8_M, INT8_V
from .roots import root

#: A stored moment: one array of the moment's shape, or, for block-wise formats, a small dict of
#: arrays (codes + scales) whose first axis counts blocks of ``codec.block`` elements.
Stored = Union[mx.array, dict[str, mx.array]]


class MomentCodec(Protocol):
    """Stores one moment tensor. All methods are pure and traceable by ``mx.compile``.

    ``encode(decode(s))`` must give back ``s`` bit for bit (with any key): a skipped step re-encodes
    the decoded moments and must leave the state unchanged.
    """

    #: Whether ``encode`` consumes a random key (stochastic rounding).
    stochastic: bool
    #: Whether that key is ``(seed, step)``, the same seed at every step of one tensor, instead of
    #: a fresh random key (see :mod:`adamw_lm.codecs.blockwise`).
    rotating: bool
    #: Elements per stored row: the optimizer updates a tensor in slices of whole blocks.
    block: int

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of the stored form of a moment of ``shape`` (what ``zeros(shape)`` holds)."""

    def zeros(self, shape: tuple[int, ...]) -> Stored:
        """The stored form of an all-zero moment of ``shape``."""

    def encode(self, x: mx.array, key: mx.array | None, offset: mx.array | int = 0) -> Stored:
        """Store the float32 moment ``x``; a stochastic codec draws its rounding from ``key`` and
        each element's flat position + ``offset`` (so a slice of a tensor, given the slice's start,
        is stored exactly as within the whole tensor)."""

    def decode(self, stored: Stored, shape: tuple[int, ...]) -> mx.array:
        """The float32 moment of ``shape`` that ``stored`` holds."""


@dataclass(frozen=True)
class Precision:
    """A storage choice for both moments of one parameter. The optimizer passes one fresh key to
    both codecs that are not rotating, so such a pair must draw disjoint random bits from it.

    ``m_over_root_v``: the first moment is stored as ``m / (sqrt(v) + eps)``, the (uncorrected)
    step AdamW takes, ``v`` being the second moment it is stored with and ``eps`` the optimizer's.
    A block of a block-wise format then spends its levels on the steps of its elements rather than
    on their gradients' scales: an element whose gradients are small next to its block's largest
    takes a step as precise as the others' instead of one made of rounding noise. ``sqrt(v)`` is
    then the second moment's ``decode_root`` (:meth:`.blockwise.Blockwise.decode_root`).

    ``exact_root``: the step divides by ``mx.sqrt(v)``, as mlx's AdamW does; otherwise by
    :func:`.roots.root` (within 4.8e-6 of it, and much faster on a CPU), which a state rounded to
    8 bits or fewer cannot tell from it.
    """

    name: str
    m: MomentCodec
    v: MomentCodec
    m_over_root_v: bool = False
    exact_root: bool = False

    def __post_init__(self):
        # A block-wise second moment has decode_root only through its map (a square-law one).
        if self.m_over_root_v and not hasattr(getattr(self.v, "map", self.v), "decode_root"):
            raise ValueError(f"{self.name}: m_over_root_v needs a second moment with decode_root")

    @property
    def stochastic(self) -> bool:
        return self.m.stochastic or self.v.stochastic

    def root(self, v: mx.array) -> mx.array:
        """``sqrt(v)`` as this precision's step takes it (see ``exact_root``)."""
        return mx.sqrt(v) if self.exact_root else root(v)

    def decode(
        self, stored: dict[str, Stored], shape: tuple[int, ...], eps: float
    ) -> tuple[mx.array, mx.array]:
        """The float32 moments ``(m, v)`` that ``{"m": ..., "v": ...}`` holds."""
        v = self.v.decode(stored["v"], shape)
        m = self.m.decode(stored["m"], shape)
        if self.m_over_root_v:
            m = m * (self.v.decode_root(stored["v"], shape) + eps)
        return m, v

    def encode(
        self,
        m: mx.array,
        v: mx.array,
        keys: tuple[mx.array | None, mx.array | None],
        offset: mx.array | int,
        eps: float,
    ) -> dict[str, Stored]:
        """The stored form ``{"m": ..., "v": ...}`` of the float32 moments ``m`` and ``v``;
        ``keys``: the codecs' random keys (see :meth:`MomentCodec.encode`)."""
        if self.m_over_root_v:
            m = m / (self.root(v) + eps)
        return {"m": self.m.encode(m, keys[0], offset), "v": self.v.encode(v, keys[1], offset)}

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of both stored moments of a tensor of ``shape``."""
        return self.m.nbytes(shape) + self.v.nbytes(shape)


#: Every precision, from the most to the least precise (``"auto"`` lowers tensors in this order).
PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", FP32, FP32, exact_root=True),
    "bf16": Precision("bf16", BF16_M, BF16_V),
    "int8": Precision("int8", INT8_M, INT8_V),
    "int4": Precision("int4", INT4_M, INT4_V, m_over_root_v=True),
}
