"""4-bit block-wise storage (blocks as in Li et al., 2023, "Memory Efficient Optimizers with 4-bit
States"; square-root-companded levels, rounded stochastically).

Blocks of 128 elements with one float32 scale each, two codes per byte: 0.5 + 4/128 = 0.53 bytes
per element and moment. The first moment has 15 signed levels ``±(k/7)^2``. The second has 16
levels ``(k/16)^2``, ``k >= 1``, *without zero*: on a map with a zero level the small values of a
block round to ``v = 0`` while their ``m`` does not, and ``m / (sqrt(v) + eps)`` explodes (the
zero-point problem of that paper; ``tests/test_optim_lowprec.py`` shows it). Its smallest level
is 1/256 of the block's largest (1/16 on a linear map). The first moment's noise rotates (see
:mod:`.blockwise`); the second's is fresh each step.

The first moment is stored divided by ``sqrt(v) + eps``, as the step it makes (see
:class:`~adamw_lm.codecs.Precision`): with 15 levels, a block's elements whose gradients are a
fraction of its largest's would otherwise take steps made mostly of rounding noise
(docs/benchmarks.md, "The first moment stored as its step").
"""

from __future__ import annotations

from .blockwise import Blockwise, PowerMap

BLOCK = 128

INT4_M = Blockwise(
    PowerMap(bits=4, signed=True), BLOCK, half=1, rotating=True, name="step_levels"
)
"""First moment, stored as ``m / (sqrt(v) + eps)``: signed square-root-companded levels,
golden-ratio rotating noise."""

INT4_V = Blockwise(PowerMap(bits=4, signed=False), BLOCK, half=0)
"""Second moment: unsigned square-root-companded levels without zero."""
