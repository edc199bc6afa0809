"""Square roots made of multiplications, for the low-precision step.

``mx.sqrt`` in a kernel that ``mx.compile`` writes for a CPU keeps the whole kernel scalar: gcc
builds those kernels with ``errno`` semantics, so each square root is a ``sqrtss`` and a branch to
libm, and a kernel with one does not vectorize (docs/benchmarks.md, "Square roots without
sqrt"). The inverse square root's classic start (an integer subtraction on the float's bits),
refined by Newton's steps, is additions and multiplications, which vectorize; on Metal and CUDA
the dozen operations cost nothing next to the memory traffic of the step.

The precisions with float32 moments keep ``mx.sqrt``: their step is AdamW's to the rounding.
"""

from __future__ import annotations

import mlx.core as mx

#: ``bits(1/sqrt(x)) ~ MAGIC - bits(x) / 2``: the start of Quake III's inverse square root.
_MAGIC = 0x5F3759DF

#: Largest relative error of :func:`root` over the normal float32 numbers, by Newton steps
#: (measured: 1.7523e-3 and 4.756e-6; ``tests/test_codecs.py`` holds them).
ROOT_ERROR = {1: 1.76e-3, 2: 4.8e-6}


def root(x: mx.array, newton_steps: int = 2) -> mx.array:
    """``sqrt(x)`` for float32 ``x >= 0``, within ``ROOT_ERROR[newton_steps]`` of it (relative).

    Exact at 0 and, with two steps, at infinity; NaN stays NaN. Below the normal floats (``x <
    2^-126``) the result is under ``2^-63`` but not that close: next to AdamW's ``eps`` (1e-8 by
    default) both are 0, and a quantization level that small rounds to 0 either way. Each step is
    ``y * (1.5 - (x/2 * y) * y)``, multiplied in that order so that ``y*y`` cannot overflow where
    ``x`` is 0 or tiny and ``y`` huge.
    """
    if newton_steps not in ROOT_ERROR:
        raise ValueError(f"root takes 1 or 2 Newton steps; got {newton_steps}")
    bits = mx.view(x.astype(mx.float32), mx.uint32)
    y = mx.view(mx.array(_MAGIC, dtype=mx.uint32) - (bits >> 1), mx.float32)
    half = 0.5 * x
    for _ in range(newton_steps):
        y = y * (1.5 - (half * y) * y)
    return x * y


#: ``bits(sqrt(x)) ~ bits(x) / 2 + HALF_ONE``: exact where ``x`` is a power of 4 (``bits(1) / 2``).
HALF_ONE = 0x1FC00000


def shift_root(x: mx.array, at_most: float | None = None) -> mx.array:
    """The *shift root* of float32 ``|x|``: the float whose bits are ``bits(|x|) / 2 + HALF_ONE``
    (three integer operations, the sign bit's mask included), or ``at_most`` (a float > 0) where
    it is larger (compared as bits, in the same integer kernel).

    Equal to ``sqrt(x)`` at the powers of 4, ``1.5 · 2^j`` at ``2 · 4^j``, linear between powers
    of 2, so within 6.1 % of ``sqrt(x)`` above it; monotonic. :func:`shift_square` inverts it on
    its values (0 has none: the shift root of 0 is ~8e-20).
    """
    magnitude = mx.view(x.astype(mx.float32), mx.uint32) & mx.array(0x7FFFFFFF, dtype=mx.uint32)
    bits = (magnitude >> 1) + mx.array(HALF_ONE, dtype=mx.uint32)
    if at_most is not None:
        bits = mx.minimum(bits, mx.view(mx.array(at_most, dtype=mx.float32), mx.uint32))
    return mx.view(bits, mx.float32)


def shift_square(s: mx.array) -> mx.array:
    """The ``x`` whose :func:`shift_root` is ``s`` (float32, at least ``2^-63``): ``bits(x) =
    2 · (bits(s) - HALF_ONE)``."""
    bits = mx.view(s.astype(mx.float32), mx.uint32)
    return mx.view((bits - mx.array(HALF_ONE, dtype=mx.uint32)) << 1, mx.float32)
