"""float32 storage: the moment is kept as it is computed."""

from __future__ import annotations

import math

import mlx.core as mx


class _FP32:
    stochastic = False
    rotating = False
    block = 1

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return 4 * math.prod(shape)

    def zeros(self, shape: tuple[int, ...]) -> mx.array:
        return mx.zeros(shape, dtype=mx.float32)

    def encode(self, x: mx.array, key: mx.array | None, offset: mx.array | int = 0) -> mx.array:
        return x.astype(mx.float32)

    def decode(self, stored: mx.array, shape: tuple[int, ...]) -> mx.array:
        return stored


FP32 = _FP32()
