"""Moment codecs against NumPy references: maps, nearest-code encoding, block scales, 4-bit packing,
odd sizes, zeros, extreme magnitudes, and bf16 stochastic rounding."""

import math

import mlx.core as mx
import numpy as np
import pytest

from adamw_lm.codecs import PRECISIONS
from adamw_lm.codecs.bf16 import BF16_M, BF16_V, random_bits
from adamw_lm.codecs.blockwise import Blockwise, DynamicMap, LinearMap
from adamw_lm.codecs.int4 import INT4_M, INT4_V
from adamw_lm.codecs.int8 import INT8_M, INT8_V

# -- NumPy references -----------------------------------------------------------------------------


def np_dynamic_map(signed: bool, bits: int) -> np.ndarray:
    """bitsandbytes' create_dynamic_map(signed, max_exponent_bits=bits - 1, total_bits=bits), in
    float32 as it computes it (linspace, interval means, times a power of ten), sorted."""
    e = bits - 1
    data = []
    for i in range(e):
        n = 2**i + 1 if signed else 2 ** (i + 1) + 1
        bounds = np.linspace(0.1, 1, n, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        data += list(np.float32(10.0 ** (i - e + 1)) * means)
        if signed:
            data += list(-np.float32(10.0 ** (i - e + 1)) * means)
    data += [0.0, 1.0]
    assert len(data) == 2**bits
    return np.sort(np.array(data, dtype=np.float32))


def np_nearest(x: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted ``values`` (ties to the lower one)."""
    mids = (values[1:].astype(np.float64) + values[:-1]) / 2
    return np.searchsorted(mids, x.astype(np.float64), side="left")


def np_blockwise(x: np.ndarray, values: np.ndarray, block: int, signed: bool):
    """Reference block quantization: (codes (blocks, block), scales (blocks,))."""
    flat = x.astype(np.float32).reshape(-1)
    nb = max(1, math.ceil(flat.size / block))
    blocks = np.zeros(nb * block, np.float32)
    blocks[: flat.size] = flat
    blocks = blocks.reshape(nb, block)
    if signed:
        hi, lo = blocks.max(1), blocks.min(1)
        scales = np.where(hi >= -lo, hi, lo)
    else:
        scales = blocks.max(1)
    normalized = blocks / np.where(scales == 0, 1, scales)[:, None]
    return np_nearest(normalized, values), scales


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


def np_random_bits(shape: tuple, key: np.ndarray) -> np.ndarray:
    position = np.arange(math.prod(shape), dtype=np.uint32).reshape(shape)
    with np.errstate(over="ignore"):
        h = np_fmix32(position * np.uint32(0x9E3779B9) + key[0])
        return np_fmix32(h ^ key[1])


MAPS = {
    "int8 m": (INT8_M.map, np_dynamic_map(True, 8)),
    "int8 v": (INT8_V.map, np_dynamic_map(False, 8)),
    "int4 m": (INT4_M.map, np_dynamic_map(True, 4)),
    "int4 v": (INT4_V.map, np.arange(1, 17, dtype=np.float32) / 16),
}
BLOCKWISE = {"int8 m": INT8_M, "int8 v": INT8_V, "int4 m": INT4_M, "int4 v": INT4_V}


def decoded_map(code_map) -> np.ndarray:
    return np.array(code_map.decode(mx.arange(code_map.size)))


def sample(signed: bool, n: int = 20000, seed: int = 0) -> np.ndarray:
    """Uniform values and log-uniform magnitudes down to 1e-9, both signs if ``signed``."""
    rng = np.random.default_rng(seed)
    logs = rng.choice([-1, 1], n) * 10 ** rng.uniform(-9, 0, n)
    x = np.concatenate([rng.uniform(-1, 1, n), logs])
    return (x if signed else np.abs(x)).astype(np.float32)


# -- maps -----------------------------------------------------------------------------------------


def test_dynamic_maps_are_bitsandbytes_maps():
    for name in ("int8 m", "int8 v", "int4 m"):
        code_map, reference = MAPS[name]
        np.testing.assert_allclose(code_map.values(), reference, rtol=2e-7, atol=0, err_msg=name)
        np.testing.assert_allclose(decoded_map(code_map), reference, rtol=3e-7, err_msg=name)
    signed8, unsigned8, signed4 = (decoded_map(MAPS[k][0]) for k in ("int8 m", "int8 v", "int4 m"))
    # Values worked out by hand from create_dynamic_map's definition.
    assert signed8[127] == 0 and signed8[255] == 1 and unsigned8[0] == 0 and unsigned8[255] == 1
    np.testing.assert_allclose(
        signed8[[128, 126, 0, 254]], [5.5e-7, -5.5e-7, -0.99296875, 0.99296875]
    )
    np.testing.assert_allclose(unsigned8[[1, 2, 254]], [3.25e-7, 7.75e-7, 0.996484375])
    np.testing.assert_allclose(
        signed4, [-0.8875, -0.6625, -0.4375, -0.2125, -0.0775, -0.0325, -0.0055, 0,
                  0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875, 1.0], rtol=1e-6
    )  # fmt: skip


def test_linear_map_has_no_zero():
    code_map, reference = MAPS["int4 v"]
    np.testing.assert_array_equal(decoded_map(code_map), reference)
    assert decoded_map(code_map).min() == 1 / 16


@pytest.mark.parametrize("name", MAPS)
def test_encode_is_nearest_code(name):
    code_map, _ = MAPS[name]
    values = decoded_map(code_map)
    mids = (values[1:] + values[:-1]) / 2
    # Random values, and values at and next to every midpoint and every decade boundary.
    edges = np.concatenate([mids * (1 + d) for d in (-1e-6, 0, 1e-6)] + [10.0 ** -np.arange(9)])
    mirrored = -edges if code_map.signed else edges
    x = np.concatenate([sample(code_map.signed), edges, mirrored, [0, 1]]).astype(np.float32)
    ours = np.array(code_map.encode(mx.array(x))).astype(int)
    reference = np_nearest(x, values)
    # float32 arithmetic may pick the other code only within a few 1e-6 of a midpoint.
    distance = np.min(np.abs(x[:, None].astype(np.float64) - mids[None, :]), axis=1)
    near_mid = distance <= 4e-6 * np.abs(x)
    assert np.all((ours == reference) | near_mid)
    err_ours = np.abs(x.astype(np.float64) - values[ours])
    err_reference = np.abs(x.astype(np.float64) - values[reference])
    assert np.all(err_ours <= err_reference + 8e-6 * np.abs(x))


@pytest.mark.parametrize("name", MAPS)
def test_every_code_encodes_back_to_itself(name):
    code_map, _ = MAPS[name]
    index = mx.arange(code_map.size)
    again = code_map.encode(code_map.decode(index))
    np.testing.assert_array_equal(np.array(again), np.array(index))


def test_negative_one_goes_to_the_most_negative_code():
    # The signed maps have +1 but no -1.
    assert INT8_M.map.encode(mx.array([-1.0, 1.0])).tolist() == [0, 255]
    assert INT4_M.map.encode(mx.array([-1.0, 1.0])).tolist() == [0, 15]


def test_bad_map_and_block_arguments():
    with pytest.raises(ValueError, match="bits"):
        DynamicMap(bits=9, signed=True)
    with pytest.raises(ValueError, match="bits"):
        LinearMap(bits=0)
    with pytest.raises(ValueError, match="8- or 4-bit"):
        Blockwise(DynamicMap(bits=6, signed=True), 64)
    with pytest.raises(ValueError, match="even"):
        Blockwise(LinearMap(4), 7)


# -- block-wise codecs ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", BLOCKWISE)
@pytest.mark.parametrize("shape", [(4096,), (7, 333), (3, 5, 129), (1,)])
def test_blockwise_matches_reference(name, shape):
    codec, (code_map, _) = BLOCKWISE[name], MAPS[name]
    values = decoded_map(code_map)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 10 ** rng.uniform(-6, 2, shape)).astype(np.float32)
    if not code_map.signed:
        x = np.square(x)
    stored = codec.encode(mx.array(x), None)
    codes, scales = np_blockwise(x, values, codec.block, code_map.signed)
    nb = codes.shape[0]
    assert nb == math.ceil(math.prod(shape) / codec.block)  # padding stays below one block
    np.testing.assert_array_equal(np.array(stored["scales"]), scales)
    ours = np.array(stored["codes"])
    if code_map.bits == 4:
        assert ours.shape == (nb, codec.block // 2)
        ours = np_unpack4(ours)
    assert ours.shape == (nb, codec.block) and stored["codes"].dtype == mx.uint8
    assert (ours != codes).mean() < 1e-3  # ties only (checked exactly in test_encode_is_nearest)
    decoded = np.array(codec.decode(stored, shape))
    assert decoded.shape == shape
    np.testing.assert_allclose(
        decoded.reshape(-1),
        (values[ours] * scales[:, None]).reshape(-1)[: x.size],
        rtol=1e-6,
    )
    # Per block, the error is at most the map's largest distance to a code, scaled.
    lowest = -1.0 if code_map.signed else 0.0
    half_gap = max(values[0] - lowest, np.diff(values).max() / 2, 1 - values[-1])
    padded = np.zeros(nb * codec.block, np.float32)
    padded[: x.size] = (decoded - x).reshape(-1)
    err = np.abs(padded.reshape(nb, codec.block)).max(1)
    assert np.all(err <= half_gap * np.abs(scales) * (1 + 1e-6))


def test_int4_packing_matches_numpy():
    codes = np.random.default_rng(2).integers(0, 16, (5, 128)).astype(np.uint8)
    values = decoded_map(INT4_M.map)
    scales = np.ones(5, np.float32)
    stored = {"codes": mx.array(np_pack4(codes)), "scales": mx.array(scales)}
    decoded = np.array(INT4_M.decode(stored, (5 * 128,)))
    np.testing.assert_array_equal(decoded, values[codes].reshape(-1))
    encoded = INT4_M.encode(mx.array(values[codes].reshape(-1)), None)
    np.testing.assert_array_equal(np.array(encoded["codes"]), np_pack4(codes))


@pytest.mark.parametrize("name", BLOCKWISE)
def test_zero_blocks(name):
    codec = BLOCKWISE[name]
    x = np.zeros(3 * codec.block + 5, np.float32)
    x[codec.block : 2 * codec.block] = np.linspace(0, 1, codec.block)  # one non-zero block
    stored = codec.encode(mx.array(x), None)
    decoded = np.array(codec.decode(stored, x.shape))
    assert np.isfinite(decoded).all()
    assert np.array_equal(decoded[: codec.block], np.zeros(codec.block))
    assert np.array_equal(decoded[2 * codec.block :], np.zeros(codec.block + 5))
    zeros = codec.zeros(x.shape)
    assert zeros["codes"].shape == stored["codes"].shape and zeros["scales"].shape == (4,)
    np.testing.assert_array_equal(np.array(codec.decode(zeros, x.shape)), np.zeros(x.shape))
    for key in ("codes", "scales"):  # zeros() is what encoding zeros gives
        np.testing.assert_array_equal(
            np.array(codec.encode(mx.zeros(x.shape), None)[key]), np.array(zeros[key])
        )


def test_int4_second_moment_never_decodes_positive_to_zero():
    v = np.full(INT4_V.block, 1e-30, np.float32)
    v[0], v[1], v[2] = 1.0, 0.0, 1e-12
    decoded = np.array(INT4_V.decode(INT4_V.encode(mx.array(v), None), v.shape))
    assert np.all(decoded[v > 0] > 0) and decoded[1] > 0  # 0 is not a code either
    assert decoded.min() == 1 / 16
    # A map with a zero code (int4 affine, as mx.quantize) turns the small ones into 0.
    w, scales, biases = mx.quantize(mx.array(v)[None], group_size=128, bits=4)
    assert (np.array(mx.dequantize(w, scales, biases, group_size=128, bits=4)) == 0).sum() > 100


@pytest.mark.parametrize("name", BLOCKWISE)
def test_huge_and_tiny_magnitudes(name):
    codec, (code_map, _) = BLOCKWISE[name], MAPS[name]
    for magnitude in (1e30, 1e-30, 1e-38):
        x = np.random.default_rng(3).uniform(0.5, 1, 4 * codec.block).astype(np.float32) * magnitude
        if code_map.signed:
            x[::2] *= -1
        decoded = np.array(codec.decode(codec.encode(mx.array(x), None), x.shape))
        assert np.isfinite(decoded).all()
        half_gap = np.diff(decoded_map(code_map)).max() / 2
        assert np.all(np.abs(decoded - x) <= half_gap * np.abs(x).max() * (1 + 1e-5))


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


# -- bf16 stochastic rounding ---------------------------------------------------------------------


def test_random_bits_match_numpy():
    key = mx.random.key(5)
    for shape in [(3, 1000), (17,), ()]:
        np.testing.assert_array_equal(
            np.array(random_bits(shape, key)), np_random_bits(shape, np.array(key))
        )
    # A slice starting at element k draws the bits of the whole tensor's elements k, k+1, ...
    whole = np.array(random_bits((5, 700), key)).reshape(-1)
    np.testing.assert_array_equal(np.array(random_bits((1000,), key, 1234)), whole[1234:2234])
    bits = np.array(random_bits((1000, 1000), key)) >> 16
    assert abs(bits.mean() / 65536 - 0.5) < 1e-3  # the 16 bits used are uniform
    assert np.unique(bits).size == 65536


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
