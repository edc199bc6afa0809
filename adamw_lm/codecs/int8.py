"""8-bit block-wise storage (Dettmers et al., 2021, "8-bit Optimizers via Block-wise Quantization").

Blocks of 256 elements with one float32 scale each (2 + 4/256 · 2 = 2.03 bytes per parameter for
both moments), on bitsandbytes' dynamic map: signed for the first moment, unsigned for the second.
"""

from __future__ import annotations

from .blockwise import Blockwise, DynamicMap

BLOCK = 256

INT8_M = Blockwise(DynamicMap(bits=8, signed=True), BLOCK)
"""First moment: signed dynamic map."""

INT8_V = Blockwise(DynamicMap(bits=8, signed=False), BLOCK)
"""Second moment: unsigned dynamic map (its 256 codes all spent on ``[0, 1]``)."""
