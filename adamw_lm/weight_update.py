"""How AdamW writes a new weight back into a bfloat16 or float16 parameter.

bfloat16 keeps 8 significant bits: at a weight of 0.03 the next value is ~1.2e-4 away, so an Adam
step of 1e-5 rounds back to the weight it started from and nothing is learned. Three ways to write:

* ``"nearest"``: round to the nearest value (what ``mlx.optimizers.AdamW`` does); small steps are lost.
* ``"stochastic"``: round away from zero with probability equal to the dropped fraction, so the stored
  weight is unbiased and small steps add up on average (torchao's ``bf16_stochastic_round``). No
  extra memory. The random bits are a counter hash of the element's position and a key (see
  :func:`adamw_lm.codecs.bf16.random_bits`): a tensor updated in slices rounds as when whole.
* ``"exact"``: keep what rounding drops in a 2-byte buffer, optimizer state like the moments.
  bfloat16: the "16+16" master weight of bf16-fused-adam, a float32 whose high half is the weight
  and whose low half is the buffer (``"w_low"``, uint16), so the update is exactly float32-master
  AdamW's. Here the weight is the master rounded to nearest (ties away from zero) and the buffer
  the signed offset of the master's bits from the weight's, a better forward pass than the
  truncated master at the same cost. float16 has no such split (its exponent is narrower than
  float32's), so it gets a Kahan compensation buffer (``"w_comp"``, float16, as in optimi and
  AnyPrecisionAdamW): the update acts on weight + compensation, and the compensation keeps what
  writing the weight dropped. Not bit-exact with float32: weight and compensation hold ~23
  significant bits at |w| >= 0.25, but the compensation is a float16 too, whose subnormals (below
  6.1e-5) have a fixed step of 6e-8, so fewer at smaller weights: measured 20.7 at |w| ~ 0.05,
  17.4 at ~ 0.005, 15 at ~ 0.001 (still 4 to 12 bits more than the float16 weight alone).

float32 parameters are written as computed, whatever the mode.
"""

from __future__ import annotations

import mlx.core as mx

from .codecs.bf16 import random_bits, round_stochastic

#: The ways to write a bfloat16 / float16 weight.
WEIGHT_UPDATES: tuple[str, ...] = ("nearest", "stochastic", "exact")

#: What ``AdamW(weight_update=None)`` uses under a ``state_precision`` other than ``None``
#: (``None`` itself is mlx's update, ``"nearest"``). Measured by ``scripts/bench_quality.py``
#: (``docs/benchmarks.md``): a bf16 full fine-tune at lr 1e-5 ends +64 % over float32 weights with
#: "nearest", +0.15 % with "stochastic" and +0.0 % with "exact" (bf16 state); stochastic meets the
#: quality targets without the 2 bytes per parameter that exact adds (as much as int8 moments).
DEFAULT_WEIGHT_UPDATE = "stochastic"

#: Parameter dtypes a weight update applies to.
LOW_DTYPES = (mx.bfloat16, mx.float16)

_BUFFERS = {mx.bfloat16: "w_low", mx.float16: "w_comp"}
_BUFFER_DTYPES = {mx.bfloat16: mx.uint16, mx.float16: mx.float16}
_U32 = mx.uint32


def check_weight_update(value: str | None, what: str = "weight_update") -> None:
    """``ValueError`` naming ``what`` unless ``value`` is ``None`` or in :data:`WEIGHT_UPDATES`."""
    if value is not None and value not in WEIGHT_UPDATES:
        allowed = ", ".join(["None"] + [repr(w) for w in WEIGHT_UPDATES])
        raise ValueError(f"{what} must be one of {allowed}; got {value!r}")


def buffer_name(mode: str | None, dtype: mx.Dtype) -> str | None:
    """The state key of the extra buffer a parameter of ``dtype`` has under ``mode``, if any."""
    return _BUFFERS.get(dtype) if mode == "exact" else None


def buffer_nbytes(mode: str | None, size: int, dtype: mx.Dtype) -> int:
    """Bytes of that buffer for a parameter of ``size`` elements (2 per element, or 0)."""
    return 2 * size if buffer_name(mode, dtype) else 0


def zeros(mode: str | None, parameter: mx.array) -> dict[str, mx.array]:
    """The extra state of a parameter under ``mode``: ``{}`` or ``{name: zeros}``. A zero buffer
    means the weight is the master (or needs no compensation)."""
    name = buffer_name(mode, parameter.dtype)
    return {name: mx.zeros(parameter.shape, _BUFFER_DTYPES[parameter.dtype])} if name else {}


def read(p: mx.array, buffer: mx.array | None) -> mx.array:
    """The float32 weight the update starts from: the parameter, plus what its buffer holds."""
    if buffer is None:
        return p.astype(mx.float32)
    if p.dtype == mx.bfloat16:
        high = mx.view(p, mx.uint16).astype(_U32) << 16
        # The signed offset, added in wrapping uint32 arithmetic: bit patterns of floats of one
        # sign are ordered like their magnitudes, so the offset may cross a power of two.
        offset = mx.view(mx.view(buffer, mx.int16).astype(mx.int32), _U32)
        return mx.view(high + offset, mx.float32)
    return p.astype(mx.float32) + buffer.astype(mx.float32)


def write(
    w: mx.array,
    p: mx.array,
    buffer: mx.array | None,
    mode: str | None,
    key: mx.array | None,
    offset: mx.array | int,
    finite: mx.array,
) -> tuple[mx.array, mx.array | None]:
    """The float32 weight ``w`` stored in the dtype of ``p`` (the old parameter) under ``mode``, and
    the new buffer (``None`` without one; ``buffer`` is the old one). ``key`` and ``offset`` draw
    stochastic rounding as the codecs do; ``finite`` is false on a skipped step, which must leave
    parameter and buffer as they were."""
    if p.dtype not in LOW_DTYPES or mode in (None, "nearest"):
        return w.astype(p.dtype), None
    if mode == "stochastic":
        if key is None:
            raise ValueError("weight_update='stochastic' needs a random key")
        if p.dtype == mx.bfloat16:
            return round_stochastic(w, key, offset), None
        return _float16_stochastic(w, key, offset), None
    if p.dtype == mx.bfloat16:
        bits = mx.view(w, _U32)
        high = (bits + mx.array(0x8000, _U32)) >> 16
        low = (bits - (high << 16)).astype(mx.uint16)
        return mx.view(high.astype(mx.uint16), mx.bfloat16), low
    new = w.astype(mx.float16)
    compensation = (w - new.astype(mx.float32)).astype(mx.float16)
    # The other writes give back the same bits from a skipped step's unchanged weight; adding
    # weight and compensation in float32 can round, so here the old values are kept explicitly.
    return mx.where(finite, new, p), mx.where(finite, compensation, buffer)


def _float16_stochastic(w: mx.array, key: mx.array, offset: mx.array | int) -> mx.array:
    """``w`` (float32) to float16, away from zero with probability = the dropped fraction.

    Beyond float16's largest finite value the result is that value, not infinity (no neighbour
    above it is finite), unlike rounding to nearest."""
    nearest = w.astype(mx.float16)
    bits = mx.view(nearest, mx.uint16)
    # Step back one value towards zero where nearest rounded away from zero: below is then the
    # float16 at or below |w|, and the next bit pattern the one above it (sign-magnitude order).
    over = (mx.abs(nearest.astype(mx.float32)) > mx.abs(w)).astype(mx.uint16)
    below_bits = bits - over
    below = mx.view(below_bits, mx.float16).astype(mx.float32)
    above = mx.view(below_bits + mx.array(1, mx.uint16), mx.float16).astype(mx.float32)
    fraction = (mx.abs(w) - mx.abs(below)) / (mx.abs(above) - mx.abs(below))
    uniform = (random_bits(w.shape, key, offset) >> 8).astype(mx.float32) * 2.0**-24
    return mx.where(uniform < fraction, above, below).astype(mx.float16)


__all__ = [
    "DEFAULT_WEIGHT_UPDATE",
    "LOW_DTYPES",
    "WEIGHT_UPDATES",
    "buffer_name",
    "buffer_nbytes",
    "check_weight_update",
    "read",
    "write",
    "zeros",
]
