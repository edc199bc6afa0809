"""4-bit block-wise storage (Li et al., 2023, "Memory Efficient Optimizers with 4-bit States").

Blocks of 128 elements with one float32 scale each, two codes per byte (0.5 + 4/128 = 0.53 bytes
per element and moment). The first moment uses the signed 4-bit dynamic map. The second moment
uses the linear map *without zero*, ``(k + 1)/16``: on a map with a zero code the small values of
a block round to ``v = 0`` while their ``m`` does not, and ``m / (sqrt(v) + eps)`` explodes (the
zero-point problem of that paper; ``tests/test_optim_lowprec.py`` shows both).
"""

from __future__ import annotations

from .blockwise import Blockwise, DynamicMap, LinearMap

BLOCK = 128

INT4_M = Blockwise(DynamicMap(bits=4, signed=True), BLOCK)
"""First moment: signed 4-bit dynamic map."""

INT4_V = Blockwise(LinearMap(bits=4), BLOCK)
"""Second moment: linear map without zero."""
