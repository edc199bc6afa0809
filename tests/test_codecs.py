"""Moment codecs against NumPy references: power-companded and shift-root maps, nearest and
stochastic level choice, block scales, 4-bit packing, odd sizes, zeros, extreme magnitudes, stored
sizes, and bf16 stochastic rounding."""

import math

import mlx.core as mx
import numpy as np
import pytest

from adamw_lm.codecs import PRECISIONS, Precision
from adamw_lm.codecs.bf16 import (
    BF16_M, BF16_V, key_start, random_bits, round_stochastic, starts_at,
)
from adamw_lm.codecs.blockwise import Blockwise, PowerMap, ShiftRootMap
from adamw_lm.codecs.int4 import INT4_M, INT4_V
from adamw_lm.codecs.int8 import INT8_M, INT8_V
from adamw_lm.codecs.roots import (
    HALF_ONE,
    ROOT_ERROR,
    root,
    shift_root,
    shift_square,
)

# -- NumPy references -----------------------------------------------------------------------------


def np_power_map(bits: int, signed: bool, power: int) -> np.ndarray:
    """The levels by their definition: ``sign(k) |k/N|^power``, ``k`` in ``[-N, N]``, ``N =
    2^(bits-1) - 1`` (signed), or ``(k/N)^power``, ``k`` in ``[1, N]``, ``N = 2^bits``."""
    if signed:
        n = 2 ** (bits - 1) - 1
        k = np.arange(-n, n + 1, dtype=np.float64)
        return np.sign(k) * np.abs(k / n) ** power
    n = 2**bits
    return (np.arange(1, n + 1, dtype=np.float64) / n) ** power


def np_shift_root_map(bits: int, signed: bool) -> np.ndarray:
    """The levels by their definition: the float32 ``x`` whose bits are twice those of ``k / Q``
    less ``HALF_ONE``'s (so that ``bits(k/Q) = bits(x) / 2 + HALF_ONE``), ``Q = 2^(bits-1)``,
    divided by that of ``k = Q - 1`` (signed), or ``Q = 2^bits`` (unsigned, ``k >= 1``)."""
    q = 2 ** (bits - 1) if signed else 2**bits
    k = np.arange(1, q, dtype=np.float64) if signed else np.arange(1, q + 1, dtype=np.float64)
    s = (k / q).astype(np.float32).view(np.uint32).astype(np.int64)
    x = ((s - HALF_ONE) * 2).astype(np.uint32).view(np.float32).astype(np.float64)
    if not signed:
        return x
    x = x / x[-1]
    return np.concatenate([-x[::-1], [0.0], x])


def np_values(code_map) -> np.ndarray:
    """The NumPy reference of a map's levels."""
    if isinstance(code_map, ShiftRootMap):
        return np_shift_root_map(code_map.bits, code_map.signed)
    return np_power_map(code_map.bits, code_map.signed, code_map.power)


MARGIN = 2.0**-12


def np_encode(x: np.ndarray, values: np.ndarray, noise) -> np.ndarray:
    """Reference level choice: between the levels around ``x`` (float64), the upper one when
    ``clip((fraction of the gap - m) / (1 - 2m), 0, 1) + noise >= 1``; below the lowest level,
    the lowest."""
    x = x.astype(np.float64)
    lower = np.clip(np.searchsorted(values, x, side="right") - 1, 0, values.size - 2)
    # Magnitudes are rounded, not signed values: a negative x goes up in magnitude, i.e. down.
    lo, hi = values[lower], values[lower + 1]
    positive = lo >= 0
    near, far = np.where(positive, lo, hi), np.where(positive, hi, lo)
    covered = np.clip(((np.abs(x) - np.abs(near)) / (np.abs(far) - np.abs(near)) - MARGIN)
                      / (1 - 2 * MARGIN), 0, 1)
    away = np.floor(covered + noise).astype(int)
    return np.where(positive, lower + away, lower + 1 - away)


def np_blockwise(x: np.ndarray, values: np.ndarray, block: int, signed: bool, noise=0.5):
    """Reference block quantization: (codes (blocks, block), scales (blocks,))."""
    flat = x.astype(np.float32).reshape(-1)
    nb = math.ceil(flat.size / block)
    blocks = np.zeros(nb * block, np.float32)
    blocks[: flat.size] = flat
    blocks = blocks.reshape(nb, block)
    scales = np.abs(blocks).max(1) if signed else blocks.max(1)
    normalized = blocks / np.where(scales == 0, 1, scales)[:, None]
    return np_encode(normalized, values, noise), scales


def np_pack4(codes: np.ndarray) -> np.ndarray:
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def np_unpack4(packed: np.ndarray) -> np.ndarray:
    out = np.empty((packed.shape[0], packed.shape[1] * 2), np.uint8)
    out[:, 0::2], out[:, 1::2] = packed & 15, packed >> 4
    return out


def np_fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def np_random_bits(shape: tuple, key: np.ndarray, offset: int = 0) -> np.ndarray:
    """SplitMix32's finalizer over a Weyl sequence whose start hashes both words of the key."""
    position = np.arange(offset, offset + math.prod(shape), dtype=np.uint32).reshape(shape)
    golden = np.uint32(0x9E3779B9)
    key = np.asarray(key, dtype=np.uint32)
    with np.errstate(over="ignore"):
        start = np_fmix32(key[0] ^ np_fmix32(key[1]))
        return np_fmix32(position * golden + start)


def np_noise(shape: tuple, key: mx.array, half: int, offset: int = 0, rotating: bool = False):
    """The noise in [0, 1) of a codec's elements; a rotating codec's key is (seed, step): a phase
    hashed from the seed alone, advanced by step / golden ratio (in 32-bit fixed point)."""
    key = np.array(key).astype(np.uint32)
    if rotating:
        with np.errstate(over="ignore"):
            phase = np_random_bits(shape, np.array([key[0], 0], np.uint32), offset)
            drawn = phase + key[1] * np.uint32(round(2**32 / ((1 + 5**0.5) / 2)))
    else:
        drawn = np_random_bits(shape, key, offset)
    return ((drawn >> np.uint32(16)) if half else (drawn & np.uint32(0xFFFF))) / 65536.0


CODECS = {"int8 m": INT8_M, "int8 v": INT8_V, "int4 m": INT4_M, "int4 v": INT4_V}
#: Every map a codec uses, and the others the benchmark measures.
MAPS = {
    f"{bits}-bit {'signed' if signed else 'unsigned'} power {power}": PowerMap(bits, signed, power)
    for bits in (8, 4) for signed in (True, False) for power in (1, 2, 4)
} | {
    f"{bits}-bit {'signed' if signed else 'unsigned'} shift root": ShiftRootMap(bits, signed)
    for bits in (8, 4) for signed in (True, False)
}  # fmt: skip


def decoded_map(code_map) -> np.ndarray:
    return np.array(code_map.decode(mx.arange(len(code_map.values()))))


def sample(signed: bool, n: int = 20000, seed: int = 0) -> np.ndarray:
    """Uniform values and log-uniform magnitudes down to 1e-9, both signs if ``signed``."""
    rng = np.random.default_rng(seed)
    logs = rng.choice([-1, 1], n) * 10 ** rng.uniform(-9, 0, n)
    x = np.concatenate([rng.uniform(-1, 1, n), logs])
    return (x if signed else np.abs(x)).astype(np.float32)


def near_a_threshold(x: np.ndarray, values: np.ndarray, noise, tolerance: float) -> np.ndarray:
    """Where float32 arithmetic may decide the other way: ``covered + noise`` within
    ``tolerance`` of 1."""
    x = x.astype(np.float64)
    lower = np.clip(np.searchsorted(values, x, side="right") - 1, 0, values.size - 2)
    lo, hi = values[lower], values[lower + 1]
    covered = (x - lo) / (hi - lo)
    positive = lo >= 0
    covered = np.where(positive, covered, 1 - covered)
    covered = np.clip((covered - MARGIN) / (1 - 2 * MARGIN), 0, 1)
    return np.abs(covered + noise - np.round(covered + noise)) <= tolerance


# -- maps -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MAPS)
def test_map_values_are_their_definition(name):
    code_map = MAPS[name]
    reference = np_values(code_map)
    np.testing.assert_allclose(code_map.values(), reference, rtol=1e-12, atol=0)
    np.testing.assert_allclose(decoded_map(code_map), reference, rtol=3e-7, atol=0)
    decoded = decoded_map(code_map)
    assert decoded[-1] == 1.0  # exactly: the scale is stored as the top level
    if code_map.signed:
        assert decoded[0] == -1.0 and decoded[code_map.zero_index] == 0.0
        assert len(decoded) == code_map.size - 1  # one code is unused
    else:
        assert decoded.min() > 0 and len(decoded) == code_map.size  # no zero level


def test_codec_maps_by_hand():
    np.testing.assert_allclose(
        decoded_map(INT4_M.map),
        [-1, -36 / 49, -25 / 49, -16 / 49, -9 / 49, -4 / 49, -1 / 49, 0,
         1 / 49, 4 / 49, 9 / 49, 16 / 49, 25 / 49, 36 / 49, 1], rtol=1e-6,
    )  # fmt: skip
    np.testing.assert_allclose(decoded_map(INT4_V.map), (np.arange(1, 17) / 16) ** 2, rtol=1e-6)
    # Shift squares by hand: k/Q between 2^j and 1.5 * 2^j (or 1.5 * 2^j and 2^(j+1)) stands for
    # 4^j + (k/Q - 2^j) * 2 * 2^j (or 2 * 4^j + (k/Q - 1.5 * 2^j) * 4 * 2^j); the signed map is
    # divided by its top level's, 127/128 -> 0.5 + (127/128 - 0.75) * 2 = 63/64.
    np.testing.assert_array_equal(decoded_map(INT8_V.map)[:4], np.array([1, 4, 8, 16]) / 65536)
    assert decoded_map(INT8_V.map)[-1] == 1.0
    assert decoded_map(INT8_V.map)[159] == 0.25 + (160 / 256 - 0.5) * 2 * 0.5  # 0.375
    assert decoded_map(INT8_V.map)[191] == 0.5  # 192/256 = 1.5 * 2^-1 -> 2 * 4^-1
    int8_m = decoded_map(INT8_M.map)
    assert int8_m[128] == np.float32(1 / 16384 / (63 / 64))  # nearly (1/127)^2 = 1 / 16129
    assert int8_m[253] == np.float32((0.5 + (126 / 128 - 0.75) * 2) / (63 / 64))  # 62/63
    assert int8_m[254] == 1.0 and int8_m[0] == -1.0 and int8_m[127] == 0.0


@pytest.mark.parametrize("name", MAPS)
def test_encode_nearest_matches_reference(name):
    code_map = MAPS[name]
    values = np_values(code_map)
    mids = (values[1:] + values[:-1]) / 2
    # Random values, and values at and next to every midpoint and every level.
    edges = np.concatenate([m * (1 + d) for m in (mids, values) for d in (-1e-5, 0, 1e-5)])
    edges = np.clip(edges, -1, 1)
    x = np.concatenate([sample(code_map.signed), edges, [0, 1]]).astype(np.float32)
    if not code_map.signed:
        x = np.abs(x)
    ours = np.array(code_map.encode(mx.array(x))).astype(int)
    reference = np_encode(x, values, 0.5)
    differ = ours != reference
    assert not np.any(differ & ~near_a_threshold(x, values, 0.5, 1e-5))
    # Nearest in value: never farther than half a gap (plus the margin) from x, or, below an
    # unsigned map's lowest level, than that level.
    bound = (0.5 + 2 * MARGIN) * np.diff(values).max()
    bound = max(bound, 0 if code_map.signed else values[0])
    assert np.all(np.abs(values[ours] - x) <= bound + 1e-7)


@pytest.mark.parametrize("name", MAPS)
def test_encode_stochastic_matches_reference(name):
    code_map = MAPS[name]
    values = np_values(code_map)
    values32 = values.astype(np.float32)
    # Random values, and values at and next to every level, where the level below x's root and
    # the one below that (which the encoding tells apart without a square root) meet.
    edges = np.concatenate([values32 * (1 + d) for d in (-1e-6, -1e-7, 0, 1e-7, 1e-6)])
    x = np.concatenate([sample(code_map.signed, 5000, seed=1), np.clip(edges, -1, 1)])
    x = x.astype(np.float32)
    noise = (np.random.default_rng(2).integers(0, 65536, x.size) / 65536).astype(np.float32)
    noise[::7] = 0.0  # the thresholds at the levels themselves
    noise[1::7] = 1 - 2**-16
    ours = np.array(code_map.encode(mx.array(x), mx.array(noise))).astype(int)
    reference = np_encode(x, values, noise)
    assert not np.any((ours != reference) & ~near_a_threshold(x, values, noise, 1e-5))
    # Only the two levels around x are ever taken.
    lower = np.clip(np.searchsorted(values, x, side="right") - 1, 0, values.size - 2)
    assert np.all((ours == lower) | (ours == lower + 1))


@pytest.mark.parametrize("name", MAPS)
def test_stochastic_rounding_is_unbiased(name):
    code_map = MAPS[name]
    values = np_values(code_map)
    low = values[0] if not code_map.signed else -1.0
    x = np.linspace(low, 1, 37).astype(np.float32)
    draws = 4096
    noise = (np.arange(draws) + 0.5) / draws  # every noise value evenly: the exact mean
    codes = code_map.encode(mx.array(np.repeat(x[None], draws, 0)), mx.array(noise[:, None]))
    mean = np.array(code_map.decode(codes)).astype(np.float64).mean(0)
    gap = np.diff(values).max()
    np.testing.assert_allclose(mean, x, atol=(2 * MARGIN + 1 / draws) * gap + 1e-6)


@pytest.mark.parametrize("name", MAPS)
def test_every_code_encodes_back_to_itself(name):
    """With any noise: decode-then-encode is the identity (a skipped step changes nothing)."""
    code_map = MAPS[name]
    index = mx.arange(len(code_map.values()))
    for noise in (0.0, 0.5, 1 - 2**-16):
        again = code_map.encode(code_map.decode(index), mx.array(noise, dtype=mx.float32))
        np.testing.assert_array_equal(np.array(again), np.array(index))


def test_bad_map_and_block_arguments():
    with pytest.raises(ValueError, match="bits"):
        PowerMap(bits=9, signed=True)
    with pytest.raises(ValueError, match="power"):
        PowerMap(bits=8, signed=True, power=3)
    with pytest.raises(ValueError, match="8- or 4-bit"):
        Blockwise(PowerMap(bits=6, signed=True), 64)
    with pytest.raises(ValueError, match="even"):
        Blockwise(PowerMap(4, signed=False), 7)
    with pytest.raises(ValueError, match="half"):
        Blockwise(PowerMap(4, signed=False), 128, half=2)
    with pytest.raises(ValueError, match="key"):
        INT8_M.encode(mx.ones((300,)), None)
    with pytest.raises(ValueError, match="rotating"):
        Blockwise(PowerMap(4, signed=True), 128, half=0, rotating=True)
    with pytest.raises(ValueError, match="rotating"):
        Blockwise(PowerMap(4, signed=True), 128, stochastic=False, rotating=True)


# -- block-wise codecs ----------------------------------------------------------------------------


def moment_like(shape: tuple, signed: bool, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 10 ** rng.uniform(-6, 2, shape)).astype(np.float32)
    return x if signed else np.square(x)


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("shape", [(4096,), (7, 333), (3, 5, 129), (1,)])
def test_blockwise_matches_reference(name, shape):
    codec = CODECS[name]
    code_map = codec.map
    values = np_values(code_map)
    x = moment_like(shape, code_map.signed)
    key, offset = mx.random.key(5), 3 * codec.block
    stored = codec.encode(mx.array(x), key, offset)
    nb = math.ceil(math.prod(shape) / codec.block)
    noise = np_noise((nb, codec.block), key, codec.half, offset, codec.rotating)
    codes, scales = np_blockwise(x, values, codec.block, code_map.signed, noise)
    assert set(stored) == {codec.name, "scales"}
    np.testing.assert_array_equal(np.array(stored["scales"]), scales)
    ours = np.array(stored[codec.name])
    if code_map.bits == 4:
        assert ours.shape == (nb, codec.block // 2)
        ours = np_unpack4(ours)
    assert ours.shape == (nb, codec.block) and stored[codec.name].dtype == mx.uint8
    assert (ours != codes).mean() < 1e-3  # float32 ties only (checked in the map tests)
    decoded = np.array(codec.decode(stored, shape))
    assert decoded.shape == shape
    np.testing.assert_allclose(
        decoded.reshape(-1),
        (values[ours] * scales[:, None]).reshape(-1)[: x.size],
        rtol=1e-6,
    )
    # Per block, the error is at most one gap of the map, scaled (the lowest level for v).
    gap = max(np.diff(values).max(), values[0] if not code_map.signed else 0)
    padded = np.zeros(nb * codec.block, np.float32)
    padded[: x.size] = (decoded - x).reshape(-1)
    err = np.abs(padded.reshape(nb, codec.block)).max(1)
    assert np.all(err <= gap * np.abs(scales) * (1 + 1e-6))
    # The same codec rounding to nearest is the reference with noise 1/2.
    nearest = Blockwise(code_map, codec.block, stochastic=False, name=codec.name)
    near_codes = np.array(nearest.encode(mx.array(x))[codec.name])
    near_codes = np_unpack4(near_codes) if code_map.bits == 4 else near_codes
    reference, _ = np_blockwise(x, values, codec.block, code_map.signed, 0.5)
    assert (near_codes != reference).mean() < 1e-3


@pytest.mark.parametrize("name", CODECS)
def test_slices_round_as_the_whole(name):
    """A slice given its start draws the noise of those elements of the whole tensor."""
    codec = CODECS[name]
    x = mx.array(moment_like((6 * codec.block + 10,), codec.map.signed, seed=4))
    key = mx.random.key(8)
    whole = codec.encode(x, key)
    part = codec.encode(x[2 * codec.block :], key, 2 * codec.block)
    for leaf in (codec.name, "scales"):
        assert mx.array_equal(part[leaf], whole[leaf][2:]).item()


def _rounded_up(codec, x: np.ndarray, keys: list) -> np.ndarray:
    """Per encoding (rows) and element: whether ``x`` (between the map's two top levels) took the
    upper one."""
    ups = []
    for key in keys:
        stored = codec.encode(mx.array(x), key)
        ups.append(np.array(codec.decode(stored, x.shape)) > x)
    return np.array(ups)


def test_rotating_noise_spreads_roundings_evenly():
    """Why int4's first moment's noise rotates: over the steps of one element, the share of
    roundings up equals the fraction of the gap its value covers to within ~1/steps (golden-ratio
    sequence), where fresh random bits are off by ~sqrt(c(1-c)/steps); and at each step, over
    the elements, the rounding is unbiased."""
    codec = INT4_M
    values = np.array(codec.map.values())
    rng = np.random.default_rng(0)
    covered = rng.uniform(0.05, 0.95, 4 * codec.block)
    x = (values[-2] + covered * (values[-1] - values[-2])).astype(np.float32)
    x[:: codec.block] = 1.0  # each block's largest, so its scale is 1
    inside = np.ones(x.size, bool)
    inside[:: codec.block] = False
    steps = 200
    seed = 12345
    rotating = _rounded_up(codec, x, [mx.array([seed, t], mx.uint32) for t in range(1, steps + 1)])
    fresh_codec = Blockwise(codec.map, codec.block, half=codec.half)
    fresh = _rounded_up(fresh_codec, x, list(mx.random.split(mx.random.key(3), steps)))
    rotating_error = np.abs(rotating.mean(0) - covered)[inside]
    fresh_error = np.abs(fresh.mean(0) - covered)[inside]
    assert rotating_error.max() <= 0.02
    assert fresh_error.max() >= 0.05 and np.median(fresh_error) > 4 * np.median(rotating_error)
    # Unbiased at every step: over the elements (of one covered fraction, many phases).
    same = np.full(x.size, values[-2] + 0.3 * (values[-1] - values[-2]), np.float32)
    same[:: codec.block] = 1.0
    for t in (1, 2, 50):
        share = _rounded_up(codec, same, [mx.array([seed, t], mx.uint32)])[0][inside].mean()
        assert abs(share - 0.3) < 0.06, t


@pytest.mark.parametrize("codec", [INT4_V], ids=["int4 v"])
def test_decode_root_is_the_square_root_of_decode(codec):
    x = np.abs(moment_like((5 * codec.block + 7,), False, seed=6)).astype(np.float32)
    stored = codec.encode(mx.array(x), mx.random.key(2))
    decoded = np.array(codec.decode(stored, x.shape)).astype(np.float64)
    np.testing.assert_allclose(
        np.array(codec.decode_root(stored, x.shape)), np.sqrt(decoded), rtol=1e-6, atol=0
    )
    with pytest.raises(ValueError, match="unsigned map"):
        INT4_M.map.decode_root(mx.zeros((4,), mx.uint8))
    with pytest.raises(ValueError, match="square-law map"):
        INT8_V.decode_root(INT8_V.zeros((256,)), (256,))
    with pytest.raises(ValueError, match="m_over_root_v needs a second moment with decode_root"):
        Precision("int8 m/√v", INT8_M, INT8_V, m_over_root_v=True)


@pytest.mark.parametrize("name", [n for n in MAPS if "shift root" in n])
def test_encode_units_takes_levels_times_unit_an_ulp_off(name):
    """A block-wise codec divides by its scale over the map's unit, so the block's largest (and
    any level) comes to encode_units as level * unit, rounded: within an ulp either way, every
    level must still encode to itself, whatever the noise."""
    code_map = MAPS[name]
    assert code_map.unit == ((63 / 64 if code_map.bits == 8 else 3 / 4) if code_map.signed else 1)
    codes = np.arange(len(code_map.values()))
    levels = np.array(code_map.decode(mx.array(codes))) * np.float32(code_map.unit)
    levels = levels.astype(np.float32)
    for ulps in (-1, 0, 1):
        y = (levels.view(np.int32) + ulps * (levels != 0)).astype(np.int32).view(np.float32)
        for noise in (0.0, 0.5, 1 - 2**-16):
            got = code_map.encode_units(mx.array(y), mx.array(noise, dtype=mx.float32))
            np.testing.assert_array_equal(np.array(got), codes)


def test_int4_packing_matches_numpy():
    codes = np.random.default_rng(2).integers(0, 15, (5, 128)).astype(np.uint8)
    values = decoded_map(INT4_M.map)
    scales = np.ones(5, np.float32)
    stored = {INT4_M.name: mx.array(np_pack4(codes)), "scales": mx.array(scales)}
    decoded = np.array(INT4_M.decode(stored, (5 * 128,)))
    np.testing.assert_array_equal(decoded, values[codes].reshape(-1))
    encoded = INT4_M.encode(mx.array(values[codes].reshape(-1)), mx.random.key(0))
    np.testing.assert_array_equal(np.array(encoded[INT4_M.name]), np_pack4(codes))


@pytest.mark.parametrize("name", CODECS)
def test_zero_blocks(name):
    codec = CODECS[name]
    x = np.zeros(3 * codec.block + 5, np.float32)
    x[codec.block : 2 * codec.block] = np.linspace(0, 1, codec.block)  # one non-zero block
    key = mx.random.key(1)
    stored = codec.encode(mx.array(x), key)
    decoded = np.array(codec.decode(stored, x.shape))
    assert np.isfinite(decoded).all()
    assert np.array_equal(decoded[: codec.block], np.zeros(codec.block))
    assert np.array_equal(decoded[2 * codec.block :], np.zeros(codec.block + 5))
    zeros = codec.zeros(x.shape)
    assert zeros[codec.name].shape == stored[codec.name].shape and zeros["scales"].shape == (4,)
    np.testing.assert_array_equal(np.array(codec.decode(zeros, x.shape)), np.zeros(x.shape))
    for leaf in (codec.name, "scales"):  # zeros() is what encoding zeros gives
        np.testing.assert_array_equal(
            np.array(codec.encode(mx.zeros(x.shape), key)[leaf]), np.array(zeros[leaf])
        )


def test_int4_second_moment_never_decodes_positive_to_zero():
    v = np.full(INT4_V.block, 1e-30, np.float32)
    v[0], v[1], v[2] = 1.0, 0.0, 1e-12
    for seed in range(20):
        decoded = np.array(INT4_V.decode(INT4_V.encode(mx.array(v), mx.random.key(seed)), v.shape))
        assert decoded.min() == 1 / 256  # 0 is not a level: the smallest is (1/16)^2
    # A map with a zero level (int4 affine, as mx.quantize) turns the small ones into 0.
    w, scales, biases = mx.quantize(mx.array(v)[None], group_size=128, bits=4)
    assert (np.array(mx.dequantize(w, scales, biases, group_size=128, bits=4)) == 0).sum() > 100


def smallest_scale(codec) -> float:
    """The smallest scale a block keeps: below it its lowest level would decode to a subnormal."""
    return 2.0**-126 / min(abs(v) for v in codec.map.values() if v)


@pytest.mark.parametrize("name", CODECS)
def test_huge_and_tiny_magnitudes(name):
    codec = CODECS[name]
    for magnitude in (3.3e38, 1e30, 1e-30, 2 * smallest_scale(codec)):
        x = np.random.default_rng(3).uniform(0.5, 1, 4 * codec.block).astype(np.float32) * magnitude
        if codec.map.signed:
            x[::2] *= -1
        decoded = np.array(codec.decode(codec.encode(mx.array(x), mx.random.key(2)), x.shape))
        assert np.isfinite(decoded).all()
        gap = np.diff(decoded_map(codec.map)).max()
        assert np.all(np.abs(decoded - x) <= gap * np.abs(x).max() * (1 + 1e-5))
    # Blocks whose largest is below the smallest scale, subnormal floats among them, are stored
    # as zeros: every code the map's zero (or lowest) level, the scale 0.
    for magnitude in (0.9 * smallest_scale(codec), 1e-38, 1e-44, 3e-45):
        x = np.random.default_rng(4).uniform(0.5, 1, 4 * codec.block).astype(np.float32) * magnitude
        if codec.map.signed:
            x[::2] *= -1
        stored = codec.encode(mx.array(x), mx.random.key(2))
        assert not np.array(stored["scales"]).any()
        zeros = codec.zeros(x.shape)
        assert mx.array_equal(stored[codec.name], zeros[codec.name]).item()
        assert not np.array(codec.decode(stored, x.shape)).any()


@pytest.mark.parametrize("name", CODECS)
def test_a_stored_block_encodes_back_to_itself_at_every_scale(name):
    """Any codes with any scale, from 2^-149 (subnormal) to float32's largest: encoding what they
    decode to gives a state that decoding and encoding again (with another key) gives back bit for
    bit."""
    codec, rng = CODECS[name], np.random.default_rng(5)
    levels = len(codec.map.values())
    exponents = np.repeat(np.arange(-149, 128), 32)
    codes = rng.integers(0, levels, (exponents.size, codec.block)).astype(np.uint8)
    codes[:, 0] = levels - 1  # the top level: the block's largest is its scale
    scales = (2.0**exponents * rng.uniform(1, 2, exponents.size)).astype(np.float32)
    packed = codes[:, 0::2] | codes[:, 1::2] << 4 if codec.map.bits == 4 else codes
    shape = (codes.size,)
    keys = [mx.array([7, 3], mx.uint32), mx.array([7, 4], mx.uint32)] if codec.rotating else [
        mx.random.key(1), mx.random.key(2)]  # fmt: skip
    stored = codec.encode(codec.decode({codec.name: mx.array(packed), "scales": mx.array(scales)},
                                       shape), keys[0])  # fmt: skip
    again = codec.encode(codec.decode(stored, shape), keys[1])
    for key in stored:
        assert mx.array_equal(stored[key], again[key]).item(), key
    kept = np.array(stored["scales"]) > 0
    assert kept.sum() == (scales >= np.float32(smallest_scale(codec))).sum() > 7000
    assert np.isfinite(np.array(stored["scales"])).all()


@pytest.mark.parametrize("name", CODECS)
def test_a_nan_block_keeps_a_nan_scale(name):
    """Neither bound on a block's scale takes a NaN, of either sign (mlx's 0 · inf is -NaN on
    this CPU): the loader must still find it."""
    codec = CODECS[name]
    for nan_bits in (0x7FC00000, 0xFFC00000):
        x = mx.view(mx.full((codec.block,), nan_bits, mx.uint32), mx.float32)
        key = mx.array([3, 1], mx.uint32) if codec.rotating else mx.random.key(0)
        assert mx.isnan(codec.encode(x, key)["scales"]).all().item(), hex(nan_bits)


@pytest.mark.parametrize("name", CODECS)
def test_magnitudes_up_to_the_largest_float_store_finite(name):
    """A block's scale over its map's unit (int8's first moment: 0.984) must stay finite: a
    block whose largest is above the largest such scale keeps that one, and its largest
    elements take the top level."""
    codec = CODECS[name]
    top = np.finfo(np.float32).max
    x = np.random.default_rng(6).uniform(0.5, 1, 2 * codec.block).astype(np.float32) * top
    x[0] = x[codec.block] = top
    if codec.map.signed:
        x[1::2] *= -1
    key = mx.array([3, 1], mx.uint32) if codec.rotating else mx.random.key(0)
    stored = codec.encode(mx.array(x), key)
    decoded = np.array(codec.decode(stored, x.shape))
    scales = np.array(stored["scales"])
    assert np.isfinite(scales).all() and np.isfinite(decoded).all()
    assert np.all(scales <= top) and np.all(scales >= np.float32(top * 0.98))
    gap = np.diff(decoded_map(codec.map)).max()
    assert np.all(np.abs(decoded.astype(np.float64) - x) <= (gap + 0.02) * top)
    again = codec.encode(codec.decode(stored, x.shape), key)
    assert all(mx.array_equal(stored[k], again[k]).item() for k in stored)


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_nbytes_is_the_stored_size(precision):
    for shape in [(4096,), (7, 333), (1,), (0, 5), ()]:
        for codec in (PRECISIONS[precision].m, PRECISIONS[precision].v):
            stored = codec.zeros(shape)
            leaves = stored.values() if isinstance(stored, dict) else [stored]
            assert codec.nbytes(shape) == sum(a.nbytes for a in leaves), shape


# -- every codec ----------------------------------------------------------------------------------


def random_stored(precision: str, codec, shape, seed: int):
    x = mx.random.normal(shape, key=mx.random.key(seed))
    if codec in (INT8_V, INT4_V) or (precision in ("fp32", "bf16") and seed % 2):
        x = mx.square(x)
    return codec.encode(x, mx.random.key(seed) if codec.stochastic else None)


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_decode_then_encode_is_identity(precision):
    """The optimizer relies on it to leave a skipped step's state untouched."""
    shape = (9, 300)
    for seed, codec in enumerate((PRECISIONS[precision].m, PRECISIONS[precision].v)):
        stored = random_stored(precision, codec, shape, seed)
        key = mx.random.key(99) if codec.stochastic else None
        again = codec.encode(codec.decode(stored, shape), key)
        for a, b in zip(_leaves(stored), _leaves(again)):
            assert a.dtype == b.dtype and mx.array_equal(a, b).item()


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_compiled_equals_eager(precision):
    shape = (5, 257)
    for seed, codec in enumerate((PRECISIONS[precision].m, PRECISIONS[precision].v)):
        x = mx.abs(mx.random.normal(shape, key=mx.random.key(seed)))
        key = mx.random.key(7) if codec.stochastic else None
        eager = codec.encode(x, key)
        compiled = mx.compile(lambda x, k: codec.encode(x, k))(x, key)
        for a, b in zip(_leaves(eager), _leaves(compiled)):
            assert mx.array_equal(a, b).item()
        dec = mx.compile(lambda s: codec.decode(s, shape))(eager)
        assert mx.array_equal(dec, codec.decode(eager, shape)).item()


def _leaves(stored):
    return list(stored.values()) if isinstance(stored, dict) else [stored]


# -- square roots ---------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", sorted(ROOT_ERROR))
def test_root_is_within_its_error_of_sqrt(steps):
    rng = np.random.default_rng(0)
    # Every normal float32 (random bit patterns), and one octave pair densely: the start's error
    # repeats every two octaves.
    every = rng.integers(0x00800000, 0x7F800000, 1_000_000, dtype=np.uint32).view(np.float32)
    dense = np.linspace(1, 4, 1_000_001, dtype=np.float32)
    x = np.concatenate([every, dense])
    exact = np.sqrt(x.astype(np.float64))
    got = np.array(root(mx.array(x), steps)).astype(np.float64)
    error = np.abs(got / exact - 1)
    assert error.max() <= ROOT_ERROR[steps]
    assert error.max() > ROOT_ERROR[steps] / 2  # the bound is the error's, not a loose one
    special = np.array([0.0, np.nan, 1e-40, 1e-45], np.float32)
    got = np.array(root(mx.array(special), steps))
    assert got[0] == 0 and np.isnan(got[1]) and np.all((got[2:] >= 0) & (got[2:] < 2.0**-63))
    if steps == 2:
        assert np.array(root(mx.array([np.inf], dtype=mx.float32), 2))[0] == np.inf


def test_root_takes_one_or_two_steps():
    with pytest.raises(ValueError, match="1 or 2 Newton steps"):
        root(mx.array([1.0]), 3)


def test_shift_root_bends_sqrt_between_powers_of_two():
    rng = np.random.default_rng(1)
    x = rng.integers(0x00800000, 0x7F000000, 1_000_000, dtype=np.uint32).view(np.float32)
    ratio = np.array(shift_root(mx.array(x))).astype(np.float64) / np.sqrt(x.astype(np.float64))
    assert ratio.min() >= 1 - 1e-7 and 1.06 < ratio.max() <= 1.061  # 1.5 / sqrt(2) at most
    powers = np.float32(2.0) ** np.arange(-40, 41).astype(np.float32)
    roots = np.array(shift_root(mx.array(powers)))
    np.testing.assert_array_equal(roots[::2], np.sqrt(powers[::2]))  # the powers of 4
    np.testing.assert_array_equal(roots[1::2], 1.5 * np.sqrt(powers[1::2] / 2))
    # Linear in between, and shift_square its inverse on the shift roots.
    np.testing.assert_allclose(np.array(shift_root(mx.array([1.25, 3.0]))), [1.125, 1.75])
    s = mx.array(np.arange(1, 4097) / 4096, dtype=mx.float32)
    assert mx.array_equal(shift_root(shift_square(s)), s).item()
    assert mx.array_equal(shift_root(-shift_square(s)), s).item()  # of the magnitude
    clamped = np.array(shift_root(shift_square(s), at_most=0.5))
    np.testing.assert_array_equal(clamped, np.minimum(np.array(s), 0.5))
    assert np.all(np.diff(np.array(shift_square(s))) > 0)


def test_low_precisions_step_with_root_and_fp32_with_sqrt():
    v = mx.array([0.0, 1e-12, 0.3, 7.0, 1e20])
    np.testing.assert_array_equal(np.array(PRECISIONS["fp32"].root(v)), np.array(mx.sqrt(v)))
    for name in ("bf16", "int8", "int4"):
        np.testing.assert_array_equal(np.array(PRECISIONS[name].root(v)), np.array(root(v)))


# -- bf16 stochastic rounding ---------------------------------------------------------------------


def test_random_bits_match_numpy():
    key = mx.random.key(5)
    # Sizes within the positions made once (2^18), at their end and past it.
    for shape in [(3, 1000), (17,), (), (1 << 18,), ((1 << 18) + 5,)]:
        np.testing.assert_array_equal(
            np.array(random_bits(shape, key)), np_random_bits(shape, np.array(key))
        )
    # A slice starting at element k draws the bits of the whole tensor's elements k, k+1, ...
    whole = np.array(random_bits((5, 700), key)).reshape(-1)
    np.testing.assert_array_equal(np.array(random_bits((1000,), key, 1234)), whole[1234:2234])
    bits = np.array(random_bits((1000, 1000), key)) >> 16
    assert abs(bits.mean() / 65536 - 0.5) < 1e-3  # the 16 bits used are uniform
    assert np.unique(bits).size == 65536


def test_random_bits_per_element_starts_draw_each_tensors_own_bits():
    """Tensors laid end to end, each with its own start (starts_at), draw the bits each draws
    alone; a rotating codec given its phase's start and step encodes as from (seed, step)."""
    keys = mx.random.split(mx.random.key(8), 3)
    sizes = [256, 1024, 768]
    starts = key_start(keys)
    joined = np.array(random_bits((sum(sizes),), starts_at(starts, sizes)))
    alone = np.concatenate([np_random_bits((n,), np.array(k)) for n, k in zip(sizes, keys)])
    np.testing.assert_array_equal(joined, alone)
    # Any shape of the draw's size but a key's (2,).
    np.testing.assert_array_equal(
        np.array(random_bits((8, 256), starts_at(starts, sizes))).reshape(-1), alone
    )
    with pytest.raises(ValueError, match="shape"):
        random_bits((100,), starts_at(starts, sizes))
    x = mx.random.normal((sum(sizes),), key=mx.random.key(1)) * 1e-2
    seed_step = mx.array([12345, 7], mx.uint32)
    phase = key_start(seed_step * mx.array([1, 0], mx.uint32))
    expected = INT4_M.encode(x, seed_step)
    given = INT4_M.encode(x, (phase, mx.array(7, mx.uint32)))
    for name in expected:
        np.testing.assert_array_equal(np.array(given[name]), np.array(expected[name]))


def test_random_bits_are_independent():
    """The noise of neighbours, of one block's ends, of the two halves (m's and v's) and of two
    keys (two steps) is uncorrelated, and each half is uniform: a single finalizer over a counter
    is enough for stochastic rounding (correlations within 5 standard errors, chi-square within
    6 standard deviations of its mean)."""
    n = 1 << 18
    first, second = mx.random.split(mx.random.key(3))
    bits = np.array(random_bits((n,), first)).astype(np.int64)
    other = np.array(random_bits((n,), second)).astype(np.int64)
    high, low = (bits >> 16) / 65536, (bits & 0xFFFF) / 65536
    pairs = {
        "neighbours (high)": (high[:-1], high[1:]),
        "neighbours (low)": (low[:-1], low[1:]),
        "256 apart": (high[:-256], high[256:]),
        "high and low halves": (high, low),
        "two keys": (high, (other >> 16) / 65536),
    }
    for name, (x, y) in pairs.items():
        assert abs(np.corrcoef(x, y)[0, 1]) < 5 / n**0.5, name
    for half in (high, low):
        counts = np.histogram(half, 256, (0, 1))[0]
        chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum()
        assert abs(chi2 - 255) < 6 * (2 * 255) ** 0.5


@pytest.mark.parametrize("codec", [BF16_M, BF16_V], ids=["m: high bits", "v: low bits"])
def test_stochastic_rounding_matches_numpy(codec):
    key = mx.random.key(11)
    x = (np.random.default_rng(4).standard_normal((7, 300)) * 1e-3).astype(np.float32)
    drawn = np_random_bits(x.shape, np.array(key))
    noise = drawn >> np.uint32(16) if codec is BF16_M else drawn & np.uint32(0xFFFF)
    with np.errstate(over="ignore"):
        bits = (x.view(np.uint32) + noise) & np.uint32(0xFFFF0000)
    ours = np.array(codec.encode(mx.array(x), key).astype(mx.float32))
    np.testing.assert_array_equal(ours, bits.view(np.float32))
    # Offsets as in a slice of a bigger tensor.
    ours = np.array(codec.encode(mx.array(x[3:]).reshape(-1), key, 3 * 300).astype(mx.float32))
    np.testing.assert_array_equal(ours, bits.view(np.float32)[3:].reshape(-1))


def test_moments_round_with_independent_bits():
    """One key serves both moments; the two halves of the draw must not move together."""
    x = mx.full((200_000,), 1 + 2**-8, dtype=mx.float32)  # half-way: rounds up half the time
    up_m = np.array(BF16_M.encode(x, mx.random.key(2)).astype(mx.float32)) > 1 + 2**-8
    up_v = np.array(BF16_V.encode(x, mx.random.key(2)).astype(mx.float32)) > 1 + 2**-8
    assert abs(up_m.mean() - 0.5) < 0.01 and abs(up_v.mean() - 0.5) < 0.01
    assert abs((up_m & up_v).mean() - 0.25) < 0.01


def test_stochastic_rounding_is_unbiased_and_reproducible():
    x = mx.array([1 + 2**-9, -3.3e-5, 123.456, 1e-30, 7.0], dtype=mx.float32)
    n = 4000
    keys = mx.random.split(mx.random.key(0), n)
    rounded = mx.stack([BF16_M.encode(mx.broadcast_to(x, (50, 5)), k) for k in keys[: n // 50]])
    rounded = np.array(rounded.astype(mx.float32)).reshape(-1, 5)
    exact = np.array(x)
    for j in range(5):
        # Only the two bf16 neighbours, each as often as its nearness says.
        assert len(np.unique(rounded[:, j])) <= 2
        spread = np.abs(np.unique(rounded[:, j]) - exact[j]).max()
        bound = 4 * spread / np.sqrt(rounded.shape[0]) + 1e-12
        assert abs(rounded[:, j].mean() - exact[j]) <= bound
    assert rounded[:, 4].tolist() == [7.0] * rounded.shape[0]  # representable: exact
    np.testing.assert_allclose(rounded.mean(0), exact, rtol=1e-3)
    same = BF16_M.encode(mx.broadcast_to(x, (50, 5)), keys[0])
    assert mx.array_equal(same, BF16_M.encode(mx.broadcast_to(x, (50, 5)), keys[0])).item()
    assert not mx.array_equal(same, BF16_M.encode(mx.broadcast_to(x, (50, 5)), keys[1])).item()


def test_bf16_needs_a_key():
    with pytest.raises(ValueError, match="key"):
        BF16_M.encode(mx.ones((3,)), None)


def test_bf16_first_moment_saturates_at_the_largest_bfloat16():
    """A finite first moment beyond the largest bfloat16 (3.39e38) is stored as it, never as
    infinity (which rounding up would give, and a checkpoint refuses); a NaN stays NaN.
    round_stochastic itself, which writes bfloat16 weights, keeps infinities; the second moment,
    at most the largest bfloat16 in the optimizer, is stored as it is."""
    codec = BF16_M
    v_max = mx.full((1000,), float.fromhex("0x1.fep127"))
    assert mx.array_equal(BF16_V.encode(v_max, mx.random.key(4)).astype(mx.float32), v_max).item()
    top = float(np.finfo(np.float32).max)
    x = mx.array([top, -top, float.fromhex("0x1.ff0000p127"), 1.5, float("nan")] * 1000)
    stored = np.array(codec.encode(x, mx.random.key(4)).astype(mx.float32))
    largest = float.fromhex("0x1.fep127")
    assert np.all(np.abs(stored.reshape(-1, 5)[:, :3]) == largest)
    assert np.all(stored.reshape(-1, 5)[:, 3] == 1.5) and np.isnan(stored.reshape(-1, 5)[:, 4]).all()
    weights = np.array(round_stochastic(x, mx.random.key(4), half=codec.half).astype(mx.float32))
    assert np.isinf(weights.reshape(-1, 5)[:, 0]).any()
