"""bfloat16 storage written with stochastic rounding.

Rounding to nearest would make small AdamW increments vanish (``β2·v`` and ``v`` are often the
same bfloat16); rounding away from zero with probability equal to the dropped fraction keeps the
stored moment unbiased. The random bits are a counter-based hash of each element's position and
the key: reproducible from the key alone, and a few integer operations per element, where an
``mx.random`` draw of the same size takes longer than a whole AdamW step on a CPU.
"""

from __future__ import annotations

import math

import mlx.core as mx

_HIGH_HALF = 0xFFFF0000


def _fmix32(h: mx.array) -> mx.array:
    """MurmurHash3's 32-bit finalizer: a bijection mixing every input bit into every output bit."""
    h = h ^ (h >> 16)
    h = h * mx.array(0x85EBCA6B, dtype=mx.uint32)
    h = h ^ (h >> 13)
    h = h * mx.array(0xC2B2AE35, dtype=mx.uint32)
    return h ^ (h >> 16)


def random_bits(
    shape: tuple[int, ...], key: mx.array, offset: mx.array | int = 0
) -> mx.array:
    """Uniform uint32 bits of ``shape``, a pure function of ``key`` (an ``mx.random.key``) and of
    each element's flat position plus ``offset``: a slice of a tensor starting at element
    ``offset`` draws the same bits as that part of the whole tensor."""
    cols = shape[-1] if shape else 1
    rows = math.prod(shape) // cols if cols else 0
    # Broadcast row and column counters instead of an arange over every element: element-wise only.
    position = mx.arange(rows, dtype=mx.uint32)[:, None] * mx.array(cols, dtype=mx.uint32)
    position = position + (mx.arange(cols, dtype=mx.uint32) + mx.array(offset, dtype=mx.uint32))
    key = key.astype(mx.uint32)
    h = _fmix32(position * mx.array(0x9E3779B9, dtype=mx.uint32) + key[0])
    return _fmix32(h ^ key[1]).reshape(shape)


def round_stochastic(x: mx.array, key: mx.array, offset: mx.array | int = 0) -> mx.array:
    """``x`` (float32) to bfloat16, away from zero with probability = the dropped fraction;
    ``offset`` as in :func:`random_bits`."""
    bits = mx.view(x.astype(mx.float32), mx.uint32)
    noise = random_bits(x.shape, key, offset) >> 16
    # A carry out of the low half is the round-up; bfloat16 is the float32's high half.
    rounded = (bits + noise) & mx.array(_HIGH_HALF, dtype=mx.uint32)
    return mx.view(rounded, mx.float32).astype(mx.bfloat16)


class _BF16:
    stochastic = True
    block = 1

    def zeros(self, shape: tuple[int, ...]) -> mx.array:
        return mx.zeros(shape, dtype=mx.bfloat16)

    def encode(self, x: mx.array, key: mx.array | None, offset: mx.array | int = 0) -> mx.array:
        if key is None:
            raise ValueError("the bf16 codec rounds stochastically: encode needs a random key")
        return round_stochastic(x, key, offset)

    def decode(self, stored: mx.array, shape: tuple[int, ...]) -> mx.array:
        return stored.astype(mx.float32)


BF16 = _BF16()
"""Both moments in bfloat16 (2 bytes per element), stochastically rounded."""
