"""8-bit block-wise storage (blocks as in Dettmers et al., 2021, "8-bit Optimizers via Block-wise
Quantization"; square-root-companded levels, rounded stochastically, instead of their dynamic
map).

Blocks of 256 elements with one float32 scale each: 2 + 2 · 4/256 = 2.03 bytes per parameter for
both moments. First moment: 255 signed levels ``±(k/127)^2``; second: 256 levels ``(k/256)^2``,
``k >= 1`` (no zero). Both round stochastically, with the two halves of one random draw.
"""

from __future__ import annotations

from .blockwise import Blockwise, PowerMap

BLOCK = 256

INT8_M = Blockwise(PowerMap(bits=8, signed=True), BLOCK, half=1)
"""First moment: signed square-root-companded levels."""

INT8_V = Blockwise(PowerMap(bits=8, signed=False), BLOCK, half=0)
"""Second moment: unsigned square-root-companded levels without zero."""
