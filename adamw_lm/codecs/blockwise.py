"""Block-wise quantization of a moment on a non-linear code map (shared by "int8" and "int4").

A moment is cut into blocks of ``block`` consecutive elements (flattened, the last block
zero-padded); each block keeps one float32 scale and one ``bits``-bit code per element: the index of
the map value nearest to ``x / scale``. 4-bit codes are packed two per byte, element ``2k`` in the
low nibble.

The scale is the block's largest-magnitude element *with its sign*. The maps hold ``+1`` but not
``-1``, so that element is stored exactly, and ``encode(decode(s)) == s`` bit for bit, which the
optimizer relies on to leave a skipped step's state untouched.

Maps encode and decode with element-wise integer and float arithmetic only: no table gathers (on a
CPU one gather costs more than a whole AdamW step) and no selects (compiled CPU kernels turn them
into unpredictable branches), so ``mx.compile`` fuses them into a few kernels.
"""

from __future__ import annotations

import math

import mlx.core as mx

_I32, _F32 = mx.int32, mx.float32


def _bit(x: mx.array, mask: int) -> mx.array:
    """1 where ``x & mask`` is non-zero, else 0 (int32), without a comparison."""
    return mx.minimum(x & mask, 1)


def _at_least(x: mx.array, threshold: float) -> mx.array:
    """1 where ``x >= threshold``, else 0 (int32), for ``0 <= x < 2^31 * threshold``."""
    return mx.minimum((x * (1.0 / threshold)).astype(_I32), 1)


class DynamicMap:
    """The *dynamic* code map of Dettmers et al. (bitsandbytes ``create_dynamic_map``).

    ``E = bits - 1`` decades ``[10^(i-E), 10^(i-E+1))``, the top one ``[0.1, 1)``; decade ``i``
    holds ``2^i`` codes when ``signed`` (each with both signs) and ``2^(i+1)`` when not, at the
    midpoints of equal sub-intervals; plus ``0`` and ``1``. Codes are indices into the sorted map,
    as in bitsandbytes: ``bits=8, signed=True`` is its default (first moment) map,
    ``signed=False`` its second-moment map; ``bits=4, signed=True`` is Li et al.'s first-moment map.
    """

    def __init__(self, bits: int, signed: bool):
        if not 2 <= bits <= 8:
            raise ValueError(f"DynamicMap needs 2 <= bits <= 8; got {bits}")
        self.bits, self.signed = bits, signed
        self.size = 2**bits
        #: Index of the code 0.
        self.zero_index = 2 ** (bits - 1) - 1 if signed else 0
        self._e = bits - 1
        self._u = 0 if signed else 1
        # Codes in the top decade, and where 1 becomes the nearest code.
        self._top_count = 2 ** (self._e - 1 + self._u)
        self._one = 1 - 0.225 / self._top_count
        # 5^i from p = 2^(i+u): bit b of i is set for the powers of two in mask b.
        self._five_masks = [
            sum(1 << (i + self._u) for i in range(self._e) if i >> b & 1)
            for b in range(max(1, math.ceil(math.log2(self._e))))
        ]

    def values(self) -> list[float]:
        """The map, sorted (code ``k`` stands for ``values()[k]``), in double precision."""
        mags = []
        for i in range(self._e):
            n = 2 ** (i + self._u)
            mags += [10.0 ** (i - self._e + 1) * (0.1 + 0.9 * (j + 0.5) / n) for j in range(n)]
        if self.signed:
            return [-m for m in reversed(mags)] + [0.0] + mags + [1.0]
        return [0.0] + mags + [1.0]

    def decode(self, index: mx.array) -> mx.array:
        """The code values (float32) of ``index`` (an integer array)."""
        q = index.astype(_I32)
        if self.signed:
            d = q - self.zero_index
            w = mx.abs(d)  # rank + 1 among the codes of this sign; 0 for the zero code
        else:
            w = q + 1  # twice that, shifted; the code 1 is w = 2^(E+1)
        # p = 2^(i+u): the highest power of two <= w (smear the top bit down), i the decade.
        s = w | (w >> 1)
        s = s | (s >> 2)
        s = s | (s >> 4)
        p = mx.minimum((s >> 1) + 1, self._top_count)
        # A code is 10^(i-E+1) (0.1 + 0.9 (j + 1/2) / n) = 5^i (18 w - 16 p + 9) * c, integers
        # exact in float32; clamping the integer factor makes the zero code 0 and the top one 1.
        c = 10.0 ** (1 - self._e) / 20 / 2**self._u
        top = round(1 / (c * 5 ** (self._e - 1)))
        factor = mx.minimum(mx.maximum((w << 4) + (w << 1) - (p << 4) + 9, 0), top)
        fives = _power(5, [_bit(p, mask) for mask in self._five_masks])
        if self.signed:
            sign = 1 + ((d >> 31) << 1)  # d < 0: -1
        else:
            sign = mx.minimum(q, 1)  # the zero code
        return (factor * sign).astype(_F32) * fives * c

    def encode(self, x: mx.array) -> mx.array:
        """Index (uint8) of the code nearest to each element of ``x``, ``|x| <= 1``."""
        e, u = self._e, self._u
        a = mx.abs(x) if self.signed else x
        # Decade i: the decade starts a reaches. They are lowered by 2^-20, so a value rounded
        # across one lands in the upper decade, which the correction below undoes: a position in
        # a decade is never past its last code.
        i = sum(_at_least(a, 10.0 ** (k - e) * (1 - 2.0**-20)) for k in range(1, e))
        bits = range(len(self._five_masks))
        p = 2**u * _power(2, [i >> b & 1 for b in bits])  # codes in decade i
        tens = _power(10, [(e - 1 - i) >> b & 1 for b in bits])  # brings decade i to [0.1, 1)
        # Position of a in decade i, in code spacings from the decade start.
        y = a * (tens * p * (1 / 0.9)) - p * (1 / 9)
        # Below y = 0.2 a decade's first code loses to the previous decade's last code (below
        # `lowest`, decade 0's first code loses to 0); `back` is 1 there. y > -1 always.
        lowest = (0.225 - 0.05 * 2**u) / 0.9
        first = (1 - mx.minimum(i, 1)).astype(_F32)
        inverse = 1 / 1.2 + (1 / (1 + lowest) - 1 / 1.2) * first
        back = 1 - mx.minimum(((y + 1) * inverse).astype(_I32), 1)
        rank = (p - (2**u - 1)).astype(_I32) + y.astype(_I32) - back  # 0 is the code 0
        top = _at_least(a, self._one)
        if not self.signed:
            return mx.minimum(rank + top, self.size - 1).astype(mx.uint8)
        # Positive: past the last code's midpoint with 1 is the code 1; negative: there is no -1.
        positive = mx.minimum(mx.maximum((x * 1e7).astype(_I32), 0), 1)
        rank = mx.minimum(rank + top, self.zero_index + positive)
        flip = positive - 1  # 0 or -1: (rank ^ flip) - flip is rank or -rank
        return (self.zero_index + (rank ^ flip) - flip).astype(mx.uint8)


def _power(base: int, exponent_bits: list[mx.array]) -> mx.array:
    """``base^e`` (float32, exact) from the bits of the integer ``e``, lowest first."""
    factors = [1 + (base ** (2**b) - 1) * bit.astype(_F32) for b, bit in enumerate(exponent_bits)]
    return math.prod(factors[1:], start=factors[0])


class LinearMap:
    """The unsigned linear map without zero, ``(k + 1) / 2^bits``: Li et al.'s (2023) fix for the
    second moment, whose small values a map with a zero code rounds to 0, and ``1/sqrt(v)`` with
    them.
    """

    signed = False

    def __init__(self, bits: int):
        if not 1 <= bits <= 8:
            raise ValueError(f"LinearMap needs 1 <= bits <= 8; got {bits}")
        self.bits = bits
        self.size = 2**bits
        #: No code is 0; a zero block is a zero scale, which decodes to 0 through any code.
        self.zero_index = 0

    def values(self) -> list[float]:
        """The map, sorted (code ``k`` stands for ``values()[k]``)."""
        return [(k + 1) / self.size for k in range(self.size)]

    def decode(self, index: mx.array) -> mx.array:
        """The code values (float32) of ``index`` (an integer array)."""
        return (index.astype(_F32) + 1) * (1.0 / self.size)

    def encode(self, x: mx.array) -> mx.array:
        """Index (uint8) of the code nearest to each element of ``x``, ``0 <= x <= 1``."""
        # Midpoints are (k + 1.5) / size; truncation is the floor for the non-negative argument.
        k = (x * self.size + 0.5).astype(_I32) - 1
        return mx.minimum(mx.maximum(k, 0), self.size - 1).astype(mx.uint8)


CodeMap = DynamicMap | LinearMap


class Blockwise:
    """A moment stored as ``{"codes": uint8 (blocks, block*bits/8), "scales": float32 (blocks,)}``.

    Args:
        code_map: a :class:`DynamicMap` or :class:`LinearMap` of 8 or 4 bits.
        block: elements per block (even, so 4-bit codes pair up within a block).
    """

    stochastic = False

    def __init__(self, code_map: CodeMap, block: int):
        if code_map.bits not in (4, 8):
            raise ValueError(f"Blockwise stores 8- or 4-bit codes; the map has {code_map.bits}")
        if block < 2 or block % 2:
            raise ValueError(f"block must be an even number >= 2; got {block}")
        self.map, self.block = code_map, block
        self._packed = code_map.bits == 4

    def blocks(self, shape: tuple[int, ...]) -> int:
        """Number of blocks for a moment of ``shape`` (at least one)."""
        return max(1, math.ceil(math.prod(shape) / self.block))

    def zeros(self, shape: tuple[int, ...]) -> dict[str, mx.array]:
        """An all-zero moment: zero scales, every code the map's zero."""
        z = self.map.zero_index
        nb = self.blocks(shape)
        width = self.block // 2 if self._packed else self.block
        return {
            "codes": mx.full((nb, width), z | z << 4 if self._packed else z, dtype=mx.uint8),
            "scales": mx.zeros((nb,), dtype=_F32),
        }

    def encode(
        self, x: mx.array, key: mx.array | None = None, offset: mx.array | int = 0
    ) -> dict[str, mx.array]:
        """Quantize the float32 moment ``x`` (``key`` and ``offset`` are unused: rounding is to
        nearest)."""
        nb = self.blocks(x.shape)
        flat = x.astype(_F32).reshape(-1)
        if nb * self.block != flat.size:
            flat = mx.pad(flat, [(0, nb * self.block - flat.size)])
        blocks = flat.reshape(nb, self.block)
        if self.map.signed:
            hi, lo = mx.max(blocks, axis=1), mx.min(blocks, axis=1)
            scales = mx.where(hi >= -lo, hi, lo)
        else:
            scales = mx.max(blocks, axis=1)
        # Dividing (not multiplying by 1/scale) keeps denormal scales finite.
        divisor = mx.where(scales == 0, 1.0, scales)[:, None]
        if self._packed:
            low = self.map.encode(blocks[:, 0::2] / divisor)
            high = self.map.encode(blocks[:, 1::2] / divisor)
            codes = low | (high << 4)
        else:
            codes = self.map.encode(blocks / divisor)
        return {"codes": codes, "scales": scales}

    def decode(self, stored: dict[str, mx.array], shape: tuple[int, ...]) -> mx.array:
        """The float32 moment of ``shape`` that ``stored`` holds."""
        codes, scales = stored["codes"], stored["scales"]
        if self._packed:
            # (blocks, block/2, 1) against (2,): both nibbles, in element order, element-wise.
            codes = (codes[..., None] >> mx.array([0, 4], dtype=mx.uint8)) & 15
            codes = codes.reshape(codes.shape[0], self.block)
        flat = (self.map.decode(codes) * scales[:, None]).reshape(-1)
        size = math.prod(shape)
        if flat.size != size:
            flat = flat[:size]
        return flat.reshape(shape)
