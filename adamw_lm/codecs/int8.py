"""8-bit block-wise storage (blocks as in Dettmers et al., 2021, "8-bit Optimizers via Block-wise
Quantization"; levels on a bent square-root grid, rounded stochastically, instead of their dynamic
map).

Blocks of 256 elements with one float32 scale each: 2 + 2 · 4/256 = 2.03 bytes per parameter for
both moments. First moment: 255 signed levels ``±a_k / a_127``; second: 256 levels ``a_k``,
``k >= 1`` (no zero, the lowest ``1/256²``), where ``a_k`` is the number whose shift root
(:func:`.roots.shift_root`) is ``k/128`` (resp. ``k/256``): within 6 % of ``(k/128)²``, and found
with integer operations (:class:`.blockwise.ShiftRootMap`). Both round stochastically, with the
two halves of one random draw.
"""

from __future__ import annotations

from .blockwise import Blockwise, ShiftRootMap

BLOCK = 256

INT8_M = Blockwise(ShiftRootMap(bits=8, signed=True), BLOCK, half=1, name="root_levels")
"""First moment: signed shift-root levels."""

INT8_V = Blockwise(ShiftRootMap(bits=8, signed=False), BLOCK, half=0, name="root_levels")
"""Second moment: unsigned shift-root levels without zero."""
