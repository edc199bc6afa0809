"""Block-wise quantization of a moment on a companded grid (shared by "int8" and "int4").

A moment is cut into blocks of ``block`` consecutive elements (flattened, the last block
zero-padded); each block keeps one float32 scale and one ``bits``-bit level per element. 4-bit
levels are packed two per byte, element ``2k`` in the low nibble.

The scale is the block's largest magnitude, stored exactly: elements of that magnitude are the
levels ``±1``, and no decoded element exceeds it, so ``encode(decode(s)) == s`` bit for bit, which
the optimizer relies on to leave a skipped step's state untouched. A block whose largest is so
small that its lowest level would decode to a subnormal float (below ~1e-34 for int8) is stored as
zeros, where that would not hold.

Rounding is stochastic by default, keyed by the element's position (as bf16's): AdamW's moments
move by small fractions of a step (``m`` by 10 %, ``v`` by 0.1 %), which rounding to the nearest
level undoes every step, so the stored moments stall where they are; an unbiased rounding keeps
their average right (docs/benchmarks.md, "Low-bit states that converge", has the measurements).

A *rotating* codec (int4's first moment) draws its noise from a golden-ratio sequence instead of
fresh random bits: each element has a fixed random phase ``u`` and at step ``t`` its noise is
``frac(u + t/φ)``. Over the elements, each step's noise is uniform, so the rounding stays
unbiased; over the steps of one element, the roundings up and down alternate as evenly as the
stored value allows, so their errors cancel within a few steps instead of adding up as a random
walk, which is what the parameters integrate. At 4 bits this took the first moment's excess loss
on noise-free least squares from +18 % to about 0 (same docs section); at 8 bits the gaps are 16
times finer and fresh noise already matches float32 moments.

Maps encode and decode with element-wise arithmetic only: no table gathers (on a CPU one gather
costs more than a whole AdamW step), so ``mx.compile`` fuses them into a few kernels.
"""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx
import numpy as np

from .bf16 import GOLDEN, random_bits
from .roots import root, shift_root, shift_square

_F32 = mx.float32

#: Within this fraction of a gap from a level, rounding goes to that level whatever the noise.
_MARGIN = 2.0**-12

#: The bits of float32's +infinity.
_INFINITY_BITS = 0x7F800000


class _Levels:
    """The codes of a map of ``bits`` bits, shared by :class:`PowerMap` and :class:`ShiftRootMap`:
    signed, level ``k`` in ``[-N, N]`` with ``N = 2^(bits-1) - 1``, stored as ``k + N``; unsigned,
    ``k`` in ``[1, N]`` with ``N = 2^bits``, stored as ``k - 1``."""

    #: What :meth:`encode_units` takes for 1 (see :class:`ShiftRootMap`).
    unit = 1.0

    def __init__(self, bits: int, signed: bool):
        if not 2 <= bits <= 8:
            raise ValueError(f"{type(self).__name__} needs 2 <= bits <= 8; got {bits}")
        self.bits, self.signed = bits, signed
        self.size = 2**bits
        #: ``N``: the level that stands for 1.
        self.levels = 2 ** (bits - 1) - 1 if signed else 2**bits
        #: Code of the level 0 (signed); an unsigned map has none: a zero block is a zero scale.
        self.zero_index = self.levels if signed else 0

    def encode_units(self, x: mx.array, noise: mx.array | float = 0.5) -> mx.array:
        """:meth:`encode` of ``x / unit`` (``x`` itself where ``unit`` is 1)."""
        return self.encode(x, noise)


class PowerMap(_Levels):
    """Levels on a power-companded grid: level ``k`` stands for ``(k / N)^power``.

    Signed: ``k`` in ``[-N, N]`` with ``N = 2^(bits-1) - 1``, stored as ``k + N`` (0, ``+1`` and
    ``-1`` are levels; the code ``2^bits - 1`` is unused). Unsigned: ``k`` in ``[1, N]`` with
    ``N = 2^bits``, stored as ``k - 1``. An unsigned map has no 0, so a second moment is never
    decoded to 0 where its first moment is not (Li et al., 2023: the zero-point problem, which
    makes ``m / sqrt(v)`` explode); its smallest level is ``N^-power`` of the block's largest.

    ``power`` 2 (square-root companding) puts levels densely near 0, where most of a block's
    elements are, and needs one square root to encode; 1 and 4 are there to be measured against.
    """

    def __init__(self, bits: int, signed: bool, power: int = 2):
        super().__init__(bits, signed)
        if power not in (1, 2, 4):
            raise ValueError(f"PowerMap needs power 1, 2 or 4; got {power}")
        self.power = power

    def values(self) -> list[float]:
        """The values of the codes ``0, 1, ...`` that are used, sorted, in double precision."""
        n, p = self.levels, self.power
        if self.signed:
            return [math.copysign(abs(k / n) ** p, k) for k in range(-n, n + 1)]
        return [(k / n) ** p for k in range(1, n + 1)]

    def _pow(self, k: mx.array) -> mx.array:
        if self.power == 1:
            return k
        return k * k if self.power == 2 else mx.square(k * k)

    def decode(self, code: mx.array) -> mx.array:
        """The values (float32) of ``code`` (an integer array)."""
        # Divided by N^p, not multiplied by a rounded 1/N^p: the top level is exactly 1.
        scale = float(self.levels) ** self.power
        if self.signed:
            k = code.astype(_F32) - self.levels
            return mx.sign(k) * self._pow(mx.abs(k)) / scale
        return self._pow(code.astype(_F32) + 1) / scale

    def decode_root(self, code: mx.array) -> mx.array:
        """The square roots of the values (float32) of ``code``, an unsigned map's: on a
        square-law map (power 2) ``k / N``, with no square root per element."""
        if self.signed:
            raise ValueError("decode_root takes the codes of an unsigned map")
        k = (code.astype(_F32) + 1) / self.levels
        if self.power == 1:
            return mx.sqrt(k)
        return k if self.power == 2 else k * k

    def encode(self, x: mx.array, noise: mx.array | float = 0.5) -> mx.array:
        """Codes (uint8) of ``x`` (``|x| <= 1``; ``x >= 0`` when unsigned).

        Between the two levels around ``x``, the upper one is taken when the fraction of the gap
        that ``x`` covers, plus ``noise``, reaches 1: ``noise`` uniform in ``[0, 1)`` rounds
        stochastically and without bias, ``noise = 1/2`` to the nearest level (in value). Within
        ``2^-12`` of a gap from a level, ``x`` takes that level: a decoded value, off by a float32
        rounding, encodes back to its own code. Below an unsigned map's lowest level, ``x`` takes
        that level.
        """
        n = float(self.levels)
        # x on the levels' scale: level k stands for y = k^power.
        y = (mx.abs(x) if self.signed else x) * n**self.power
        # The level nearest to the root of y, from a root without mx.sqrt (see roots): one Newton
        # step is within 1.76e-3 · 256 < 0.45 of a level, so y's level from below (the floor of
        # its root) is k or k - 1. Float compares and truncating casts, not floor or clip: those
        # compile to libm calls and branches, which keep the CPU kernel scalar.
        if self.power == 1:
            r = y
        else:
            r = root(y, newton_steps=1) if self.power == 2 else root(root(y))
        k = (r + 0.5).astype(mx.int32).astype(_F32)
        # At least 1, or 2 on an unsigned map, so that k - 1 is a level (the lowest unsigned level
        # is 1: x below it takes it).
        k = k + mx.where(k < 1, 1.0, 0.0)
        if not self.signed:
            k = k + mx.where(k < 2, 1.0, 0.0)
        # k and (below) the threshold each in a kernel of their own, so that what follows fits in
        # one (see ``random_bits``: a chain over 11 deep is cut where a broadcast constant becomes
        # a strided input).
        k = mx.contiguous(k)
        # Up from a level j when covered + noise >= 1, the margins included: (covered - M) / (1 -
        # 2M) >= 1 - noise, i.e. covered >= M + (1 - noise)(1 - 2M), i.e. without dividing by the
        # gap: y >= j^p + gap_j · threshold. x takes k - 1, plus one for each of the thresholds
        # above k - 1 and above k that it reaches.
        if not isinstance(noise, mx.array):
            noise = mx.array(noise, dtype=_F32)
        threshold = mx.contiguous((1 - _MARGIN) - noise * (1 - 2 * _MARGIN))
        below = k - 1
        low_below, low_k = self._pow(below), self._pow(k)
        # ``where``, not a bool cast, and (below) a sign product, not a second ``where``: the
        # forms gcc vectorizes.
        level = (
            below
            + mx.where(y >= low_below + (low_k - low_below) * threshold, 1.0, 0.0)
            + mx.where(y >= low_k + (self._pow(k + 1) - low_k) * threshold, 1.0, 0.0)
        )
        if self.signed:
            return (n + mx.sign(x) * level).astype(mx.uint8)
        return (level - 1).astype(mx.uint8)


def _minimum(a: mx.array, b: mx.array) -> mx.array:
    """``minimum(a, b)`` of floats, NaN aside, written as the select a CPU kernel vectorizes:
    gcc turns ``a < b ? a : b`` into a vector minimum, where mlx's ``minimum`` tests for NaN and
    any other select keeps the whole kernel scalar."""
    return mx.where(a < b, a, b)


def shift_square_exact(s: float) -> float:
    """The inverse of :func:`.roots.shift_root` by its definition, in double precision: linear
    between ``(2^j, 4^j)`` and ``(1.5 · 2^j, 2 · 4^j)`` and between that and ``(2^(j+1), 4^(j+1))``
    (``s > 0``)."""
    low = 2.0 ** math.floor(math.log2(s))
    if s <= 1.5 * low:
        return low * low + (s - low) * 2 * low
    return 2 * low * low + (s - 1.5 * low) * 4 * low


class ShiftRootMap(_Levels):
    """Levels equally spaced in the shift root (:func:`.roots.shift_root`, a piecewise-linear
    square root made of integer operations): level ``k`` stands for the ``x`` whose shift root is
    ``k / Q``, ``Q`` a power of two.

    The grid is the square-root-companded one of :class:`PowerMap` (power 2) bent by at most
    6 %, and as good in the convergence benchmark (docs/benchmarks.md, "Levels from the bits"),
    but finding a level needs no square root and no compare against the levels: the shift root of
    ``x`` times ``Q``, plus the noise, truncated. It is exact in value: the shift root is linear
    between powers of two, and with ``Q`` a power of two every power of two from ``4/Q²`` up is a
    level (``k = 2^i`` at ``4^j``, ``k = 3 · 2^i`` at ``2 · 4^j``), so between two levels a
    fraction of the shift root's gap is the same fraction of the value's. Below level 2 (where the
    shift root bends between levels) the fraction is taken in value.

    Signed: ``k`` in ``[-N, N]`` with ``N = 2^(bits-1) - 1`` and ``Q = N + 1``, stored as ``k + N``;
    values are divided by level ``N``'s, so that the top level is 1. Unsigned: ``k`` in ``[1, N]``,
    ``N = Q = 2^bits``, stored as ``k - 1``; no zero (see :class:`PowerMap`), the lowest level is
    ``1 / Q²``.
    """

    def __init__(self, bits: int, signed: bool):
        super().__init__(bits, signed)
        self._q = float(self.levels + 1 if signed else self.levels)
        #: The top level's shift square: exact in float32 (a shift square of k / Q is).
        self._top = shift_square_exact(self.levels / self._q)

    def values(self) -> list[float]:
        """The values of the codes ``0, 1, ...`` that are used, sorted, in double precision."""
        q, top = self._q, self._top
        if self.signed:
            n = self.levels
            return [math.copysign(shift_square_exact(abs(k) / q) / top, k) if k else 0.0
                    for k in range(-n, n + 1)]  # fmt: skip
        return [shift_square_exact(k / q) for k in range(1, self.levels + 1)]

    def decode(self, code: mx.array) -> mx.array:
        """The values (float32) of ``code`` (an integer array)."""
        if self.signed:
            magnitude = shift_square(mx.abs(code.astype(_F32) - self.levels) * (1 / self._q))
            # The sign from the codes again, as integers (the float k above, read twice, would
            # be a pass of its own) and by arithmetic shifts (mx.sign on integers keeps a CPU
            # kernel scalar); at k = 0 the shift square is -4, times the sign 0. Divided, not
            # multiplied by a rounded inverse: the top level is exactly 1.
            k = code.astype(mx.int32)
            sign = (((k - self.levels) >> 31) - ((self.levels - k) >> 31)).astype(_F32)
            return sign * magnitude / self._top
        return shift_square((code.astype(_F32) + 1) * (1 / self._q))

    @property
    def unit(self) -> float:
        """What :meth:`encode_units` takes for 1: level ``N``'s shift square (signed), or 1."""
        return self._top if self.signed else 1.0

    def encode(self, x: mx.array, noise: mx.array | float = 0.5) -> mx.array:
        """Codes (uint8) of ``x``, as :meth:`PowerMap.encode`: ``noise`` uniform in ``[0, 1)``
        rounds stochastically without bias, ``1/2`` to the nearest level; within ``2^-12`` of a
        gap from a level, ``x`` takes that level; below an unsigned map's lowest level, that
        level."""
        return self.encode_units(x * self.unit if self.signed else x, noise)

    def encode_units(self, x: mx.array, noise: mx.array | float = 0.5) -> mx.array:
        """:meth:`encode` of ``x / unit``: a block-wise codec divides by its scale over ``unit``
        instead of multiplying by ``unit`` after, one pass less."""
        q = self._q
        # Level k and a fraction: from the shift root, or below level 2 in value, where levels
        # 0, 1 and 2 stand for b = |x|·Q² = 0, 1 and 4: there min(b, (b + 2) / 3), which is at
        # most the shift root's position below level 2 and at least it above (equal at 2).
        scaled = mx.abs(x) * (q * q)
        # At most level N's shift root: an x above the unit (a caller's, or a block's largest
        # divided by a scale / unit rounded the other way) takes level N, not a code past it.
        above = shift_root(x, at_most=self.levels / q) * q
        position = _minimum(_minimum(above, scaled), (scaled + 2) * (1 / 3))
        if not isinstance(noise, mx.array):
            noise = mx.array(noise, dtype=_F32)
        # The margins: within M of a gap from a level, x takes that level whatever the noise.
        noise = noise * (1 - 2 * _MARGIN) + _MARGIN
        k = (position + noise).astype(mx.int32)
        if self.signed:
            # N + k or N - k by x's sign bit s (0 or -1): (k ^ s) - s is k or -k, in integers: a
            # shallower chain than a float sign and product, which must fit in this kernel (a
            # chain mx.compile cuts makes a kernel strided, see random_bits).
            s = mx.view(x, mx.int32) >> 31
            return ((k ^ s) + (self.levels - s)).astype(mx.uint8)
        return (mx.maximum(k, 1) - 1).astype(mx.uint8)


def _per_element(per_block: mx.array, block: int) -> mx.array:
    """``per_block[:, None]`` over the ``block`` elements of each block, as a strided view.

    ``mx.compile`` fuses a broadcast with the operation that reads it into a kernel indexed
    through strides, which a CPU runs element by element; a view it does not fuse leaves the
    operation alone, and mlx's own kernel for it runs each block's row as a vector times a
    scalar (0.55 against 0.82 ns per element: docs/benchmarks.md, "Timed in phases, and fewer
    passes per slice").
    """
    return mx.as_strided(per_block, (per_block.size, block), (1, 0))


class Blockwise:
    """A moment stored as ``{name: uint8 (blocks, block*bits/8), "scales": float32 (blocks,)}``.

    Args:
        code_map: a :class:`PowerMap` or :class:`ShiftRootMap` of 8 or 4 bits.
        block: elements per block (even, so 4-bit codes pair up within a block).
        stochastic: round stochastically (``encode`` needs a key), else to the nearest level.
        half: which 16 bits of the element's random draw are the noise: the high (1) or low (0)
            ones. Two codecs given one key must use different halves.
        rotating: draw the noise from a golden-ratio sequence (see the module's docstring); its
            key is then ``(seed, step)``: ``seed`` fixes each element's phase, and must stay the
            same from step to step of one tensor, ``step`` advances it. Uses the high half.
        name: the key of the codes in the stored dict. Codes that mean something else (another
            map, or another quantity: see :class:`~adamw_lm.codecs.Precision`) take another name,
            so that a checkpoint's state is never decoded with the wrong meaning.
    """

    def __init__(
        self,
        code_map: PowerMap | ShiftRootMap,
        block: int,
        stochastic: bool = True,
        half: int = 1,
        rotating: bool = False,
        name: str = "levels",
    ):
        if code_map.bits not in (4, 8):
            raise ValueError(f"Blockwise stores 8- or 4-bit codes; the map has {code_map.bits}")
        if block < 2 or block % 2:
            raise ValueError(f"block must be an even number >= 2; got {block}")
        if half not in (0, 1):
            raise ValueError(f"half must be 0 or 1; got {half!r}")
        if rotating and not (stochastic and half):
            # The low half of ``u + t·GOLDEN`` turns by 0x79B9 / 2^16 ≈ 0.48 a step: nearly
            # a period of two, which would not spread the roundings evenly.
            raise ValueError("a rotating codec rounds stochastically with the high half (half=1)")
        self.map, self.block = code_map, block
        self.stochastic, self.half, self.rotating = stochastic, half, rotating
        self.name = name
        self._packed = code_map.bits == 4
        # The bits of the smallest scale a block keeps; a block whose largest is smaller is stored
        # as zeros. Below it, the lowest levels times the scale would decode to subnormal floats,
        # whose grid is too coarse for decoding then encoding again to give the same codes (which
        # a skipped step relies on). What is lost is tiny: 2^-126 / 2^-16 = 7.7e-34 for the
        # int8 second moment, whose square root is far below any eps.
        smallest_level = min(abs(value) for value in code_map.values() if value)
        self._smallest_scale = int(np.float32(2.0**-126 / smallest_level).view(np.int32))
        # The bits of the largest scale whose quotient by the map's unit is finite: a block whose
        # largest is above (near float32's largest, with a unit below 1) keeps this scale, and
        # its elements above it take the top level.
        largest = np.float32(np.finfo(np.float32).max * code_map.unit)
        with np.errstate(over="ignore"):
            while not np.isfinite(largest / np.float32(code_map.unit)):
                largest = np.nextafter(largest, np.float32(0))
        self._largest_scale = int(largest.view(np.int32))

    def blocks(self, shape: tuple[int, ...]) -> int:
        """Number of blocks for a moment of ``shape``."""
        return -(-math.prod(shape) // self.block)

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of the stored form of a moment of ``shape`` (the last block's codes in full)."""
        return self.blocks(shape) * (self.block * self.map.bits // 8 + 4)

    def zeros(self, shape: tuple[int, ...]) -> dict[str, mx.array]:
        """An all-zero moment: zero scales, every code the map's zero (or lowest) level."""
        z = self.map.zero_index
        nb = self.blocks(shape)
        width = self.block // 2 if self._packed else self.block
        return {
            self.name: mx.full((nb, width), z | z << 4 if self._packed else z, dtype=mx.uint8),
            "scales": mx.zeros((nb,), dtype=_F32),
        }

    def encode(
        self, x: mx.array, key: mx.array | None = None, offset: mx.array | int = 0
    ) -> dict[str, mx.array]:
        """Quantize the float32 moment ``x``; a stochastic codec draws its noise from ``key`` and
        each element's flat position plus ``offset`` (see
        :func:`~adamw_lm.codecs.bf16.random_bits`); a rotating one's ``key`` is ``(seed, step)``
        (uint32), or a tuple ``(phase_key, step)`` whose ``phase_key`` is what ``random_bits``
        takes (``(seed, 0)``, its start, or one start per element). Any finite ``x`` gives
        finite scales."""
        nb = self.blocks(x.shape)
        # reshape(size): mlx gives a flat x back as it is, with no operation to dispatch.
        flat = x.astype(_F32).reshape(x.size)
        if nb * self.block != flat.size:
            flat = mx.pad(flat, [(0, nb * self.block - flat.size)])
        blocks = flat.reshape(nb, self.block)
        # The largest magnitude of a block, compared as integers: a non-negative float's bits
        # order as the float does, and an integer maximum has no NaN test, which keeps a float
        # maximum scalar on a CPU (twice slower). A NaN's bits are above infinity's, so a NaN
        # still wins, as with a float maximum.
        magnitude = mx.view(blocks, mx.int32)
        if self.map.signed:
            magnitude = magnitude & 0x7FFFFFFF
        largest = mx.max(magnitude, axis=1)
        # Per block: a NaN's bits are above infinity's (or, unsigned, negative, with its sign
        # bit), and neither bound takes them: a NaN block keeps a NaN scale, as a -0 one its -0.
        tiny = (largest >= 0) & (largest < self._smallest_scale)
        above = (largest > self._largest_scale) & (largest <= _INFINITY_BITS)
        largest = mx.where(tiny, 0, mx.where(above, self._largest_scale, largest))
        scales = mx.view(largest, _F32)
        # The map's unit goes with the scale (one pass less than multiplying by it after): the
        # block's largest may come out an ulp off it, which the map's margins absorb.
        divisor = mx.where(scales == 0, 1.0, scales) / self.map.unit
        # A kernel of its own: fused into the map's, the scales' strided view would make it strided.
        normalized = mx.contiguous(blocks / _per_element(divisor, self.block))
        if self.stochastic:
            if key is None:
                raise ValueError("this codec rounds stochastically: encode needs a random key")
            if self.rotating:
                if isinstance(key, tuple):
                    seed, step = key
                else:
                    key = key.astype(mx.uint32)
                    seed, step = key * mx.array([1, 0], dtype=mx.uint32), key[1]
                phase = random_bits(blocks.shape, seed, offset)
                drawn = phase + step.astype(mx.uint32) * mx.array(GOLDEN, dtype=mx.uint32)
            else:
                drawn = random_bits(blocks.shape, key, offset)
            drawn = drawn >> 16 if self.half else drawn & mx.array(0xFFFF, dtype=mx.uint32)
            noise = drawn.astype(_F32) * 2.0**-16
        else:
            noise = mx.array(0.5, dtype=_F32)
        codes = self.map.encode_units(normalized, noise)
        if self._packed:
            # Each pair of codes, read as one little-endian uint16, packed into one byte: element-
            # wise on contiguous data, where splitting even and odd elements reads with a stride.
            pairs = mx.view(codes, mx.uint16)
            codes = ((pairs & 0xF) | ((pairs >> 4) & 0xF0)).astype(mx.uint8)
        return {self.name: codes, "scales": scales}

    def decode(self, stored: dict[str, mx.array], shape: tuple[int, ...]) -> mx.array:
        """The float32 moment of ``shape`` that ``stored`` holds."""
        return self._decoded(stored, shape, self.map.decode, lambda scales: scales)

    def decode_root(self, stored: dict[str, mx.array], shape: tuple[int, ...]) -> mx.array:
        """The square root of :meth:`decode`'s moment (unsigned maps), computed per block, not
        per element, on a square-law map (:meth:`PowerMap.decode_root`). Not bit-identical with
        a root of the decoded moment computed per element (see the int4 step in
        ``adamw_lm.optim``, which compares the two)."""
        if not hasattr(self.map, "decode_root"):
            raise ValueError(f"decode_root needs a square-law map; this codec's is {self.map!r}")
        return self._decoded(stored, shape, self.map.decode_root, mx.sqrt)

    def _decoded(
        self,
        stored: dict[str, mx.array],
        shape: tuple[int, ...],
        values: Callable[[mx.array], mx.array],
        scaled: Callable[[mx.array], mx.array],
    ) -> mx.array:
        codes, scales = stored[self.name], stored["scales"]
        if self._packed:
            # Each byte's two nibbles spread into the two bytes of a little-endian uint16.
            wide = codes.astype(mx.uint16)
            codes = mx.view((wide & 0xF) | ((wide & 0xF0) << 4), mx.uint8)
        # The levels' values in a contiguous kernel, then the scales in a product of its own (see
        # _per_element): one strided kernel converting bytes runs at half the speed
        # (docs/benchmarks.md).
        flat = (mx.contiguous(values(codes)) * _per_element(scaled(scales), self.block)).reshape(-1)
        size = math.prod(shape)
        if flat.size != size:
            flat = flat[:size]
        return flat.reshape(shape)
