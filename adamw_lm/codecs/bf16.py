"""bfloat16 storage written with stochastic rounding.

Rounding to nearest would make small AdamW increments vanish (``β2·v`` and ``v`` are often the
same bfloat16); rounding away from zero with probability equal to the dropped fraction keeps the
stored moment unbiased. The random bits are a counter-based hash of each element's position and
the key: reproducible from the key alone, and a few integer operations per element, where an
``mx.random`` draw of the same size takes longer than a whole AdamW step on a CPU.
"""

from __future__ import annotations

import itertools
import math

import mlx.core as mx


#: ``2^32 / φ`` (odd): the step of the Weyl sequence that :func:`random_bits` hashes, and of a
#: rotating codec's noise (:mod:`.blockwise`), both in 32-bit fixed point.
GOLDEN = 0x9E3779B9

#: ``G·i`` for the positions ``i`` of a slice of up to 2^18 elements (a slice on a CPU, see
#: ``adamw_lm.memory.default_chunk_size``), made once: the hash reads them, where ``mx.arange``
#: and the product in each step would be two more passes over the slice (~5 % of a bf16 step; a
#: product of constants is not fused into the hash's kernel). Larger draws make their own.
_WEYL = mx.arange(1 << 18, dtype=mx.uint32) * mx.array(GOLDEN, dtype=mx.uint32)
mx.eval(_WEYL)


def _fmix32(h: mx.array) -> mx.array:
    """MurmurHash3's 32-bit finalizer: a bijection mixing every input bit into every output bit."""
    h = h ^ (h >> 16)
    h = h * mx.array(0x85EBCA6B, dtype=mx.uint32)
    h = h ^ (h >> 13)
    h = h * mx.array(0xC2B2AE35, dtype=mx.uint32)
    return h ^ (h >> 16)


def key_start(key: mx.array) -> mx.array:
    """The start (uint32) that ``key`` (an ``mx.random.key``) picks for :func:`random_bits`: a
    hash of both its words. ``key`` may be a stack of keys on its last axis, ``(n, 2)``: their
    ``n`` starts."""
    key = key.astype(mx.uint32)
    return _fmix32(key[..., 0] ^ _fmix32(key[..., 1]))


def random_bits(
    shape: tuple[int, ...], key: mx.array, offset: mx.array | int = 0
) -> mx.array:
    """Uniform uint32 bits of ``shape``, a pure function of ``key`` (an ``mx.random.key``, or its
    :func:`key_start`) and of each element's flat position plus ``offset``: a slice of a tensor
    starting at element ``offset`` draws the same bits as that part of the whole tensor.

    Element ``i`` gets ``fmix32(G·(offset + i) + s)``, ``G`` the golden-ratio constant and ``s``
    the key's start: one finalizer over a Weyl sequence, the counter-based generator of
    SplitMix, with a start the key picks. A caller drawing for many slices with one key passes
    its start: hashing the key takes a handful of scalar kernels, each a dispatch to the
    stream's thread.

    ``key`` may also hold one start per element (uint32, ``shape``'s size, any shape but
    ``(2,)``, which is a key): tensors laid end to end then each draw their own bits, element
    ``i`` of a tensor starting at ``b`` with start ``s`` taking ``s - G·b`` (:func:`starts_at`).
    """
    golden = mx.array(GOLDEN, dtype=mx.uint32)
    # Everything that does not depend on the element is one scalar, so the per-element chain
    # (add, finalizer) is 9 operations deep: mx.compile fuses at most 11 levels into
    # one kernel, and where it cuts a longer chain, a broadcast constant becomes an input and
    # the kernel indexes every element through strides (not vectorized on a CPU: this hash took
    # two such kernels before, docs/benchmarks.md, "Fusion-friendly codecs").
    size = math.prod(shape)
    if key.ndim == 0:
        start = key.astype(mx.uint32)
    elif key.shape == (2,):
        start = key_start(key)
    elif key.size == size:
        start = key.astype(mx.uint32).reshape(shape)
    else:
        raise ValueError(f"random_bits: a key of shape {key.shape} for a draw of shape {shape}")
    start = mx.array(offset, dtype=mx.uint32) * golden + start
    weyl = _WEYL[:size] if size <= _WEYL.size else mx.arange(size, dtype=mx.uint32) * golden
    # Its own kernel: consumers start a fresh chain, and two roundings share the bits.
    return mx.contiguous(_fmix32(weyl.reshape(shape) + start))


def starts_at(starts: mx.array, sizes: list[int]) -> mx.array:
    """One start per element for tensors of ``sizes`` elements laid end to end, each drawing with
    its own start (``starts``, uint32 ``(len(sizes),)``) the bits it draws alone: shape
    ``(sum(sizes), 1)`` (never a key's ``(2,)``), for :func:`random_bits`."""
    positions = itertools.accumulate(sizes[:-1], initial=0)
    # Element i of a tensor at b: G·i + s = G·(b + i) + (s - G·b), in wrapping uint32.
    shifts = mx.array([GOLDEN * b % 2**32 for b in positions], dtype=mx.uint32)
    parts = mx.split(starts.astype(mx.uint32) - shifts, len(sizes))
    # A broadcast per tensor and one copy: a gather of the starts costs ~7 times as much.
    return mx.concatenate([mx.broadcast_to(p, (size, 1)) for p, size in zip(parts, sizes)])


def round_stochastic(
    x: mx.array, key: mx.array, offset: mx.array | int = 0, half: int = 1, saturate: bool = False
) -> mx.array:
    """``x`` (float32) to bfloat16, away from zero with probability = the dropped fraction.

    The noise is the high (``half=1``) or low (``half=0``) 16 bits of :func:`random_bits`
    (``offset`` as there): two roundings with the same key and different halves are independent,
    and, compiled together, share one hash. With ``saturate``, what would round to an infinity
    takes the largest bfloat16 (3.39e38) of its sign instead: a finite ``x`` beyond it, an
    infinity too, and a NaN whose payload lies in its low 16 bits only (which rounding would
    make an infinity either way; mlx's NaNs stay NaN).
    """
    bits = mx.view(x.astype(mx.float32), mx.uint32)
    drawn = random_bits(x.shape, key, offset)
    noise = drawn >> 16 if half else drawn & mx.array(0xFFFF, dtype=mx.uint32)
    # A carry out of the low half is the round-up; bfloat16 is the float32's high half, taken
    # as integers in the same kernel (a cast from float32 would be a pass of its own).
    rounded = (bits + noise) >> 16
    if saturate:
        # Rounded up into an infinity's bits (from a finite x): one step back to the largest.
        infinite = (rounded & mx.array(0x7FFF, dtype=mx.uint32)) == mx.array(0x7F80, mx.uint32)
        rounded = rounded - mx.where(infinite, 1, 0).astype(mx.uint32)
    return mx.view(rounded.astype(mx.uint16), mx.bfloat16)


class _BF16:
    """bfloat16 storage; ``half`` picks the 16 random bits (see :func:`round_stochastic`), and
    ``saturate`` whether a finite value beyond the largest bfloat16 is stored as it."""

    stochastic = True
    rotating = False
    block = 1

    def __init__(self, half: int, saturate: bool):
        self.half, self.saturate = half, saturate

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return 2 * math.prod(shape)

    def zeros(self, shape: tuple[int, ...]) -> mx.array:
        return mx.zeros(shape, dtype=mx.bfloat16)

    def encode(self, x: mx.array, key: mx.array | None, offset: mx.array | int = 0) -> mx.array:
        if key is None:
            raise ValueError("the bf16 codec rounds stochastically: encode needs a random key")
        return round_stochastic(x, key, offset, self.half, self.saturate)

    def decode(self, stored: mx.array, shape: tuple[int, ...]) -> mx.array:
        return stored.astype(mx.float32)


BF16_M = _BF16(half=1, saturate=True)
"""First moment in bfloat16 (2 bytes per element), stochastically rounded; near float32's
largest, at the largest bfloat16 (rounding up would give an infinity, which a state never holds)."""

BF16_V = _BF16(half=0, saturate=False)
"""Second moment in bfloat16, rounded with the other 16 bits of the same draw as the first. Not
saturating: the optimizer stores v at most the largest bfloat16, which rounds to itself."""
