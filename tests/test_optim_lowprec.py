"""AdamW with bf16 / int8 / int4 moments: training close to fp32, state size, skipped non-finite
steps, resuming from a copied state, and the int4 second-moment zero-point trap."""

import copy
import math
import pickle

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from helpers.trees import assert_trees_equal

from adamw_lm import AdamW
from adamw_lm.memory import update_bins
from adamw_lm.optim import all_finite
from adamw_lm.codecs import PRECISIONS, Precision
from adamw_lm.codecs.blockwise import Blockwise, PowerMap
from adamw_lm.codecs.int4 import INT4_M

LOW = ["bf16", "int8", "int4"]
ALL = [None, "fp32", *LOW]


def regression_problem(seed: int = 0):
    """A two-layer regression trained on mini-batches; its first weight (64 x 96) is big enough to
    be quantized, the others stay float32. Returns the parameters, ``loss_and_grad(params, step)``
    on the batch of that step, and the loss on the whole data set."""
    k = iter(mx.random.split(mx.random.key(seed), 6))
    x = mx.random.normal((1024, 96), key=next(k))
    teacher = mx.random.normal((96, 8), key=next(k)) / math.sqrt(96)
    # Label noise: the loss levels off instead of vanishing, so relative gaps mean something.
    y = mx.tanh(x @ teacher) * 3 + 0.5 * mx.random.normal((1024, 8), key=next(k))
    params = {
        "w1": mx.random.normal((64, 96), key=next(k)) / math.sqrt(96),
        "b1": mx.zeros((64,)),
        "w2": mx.random.normal((8, 64), key=next(k)) / math.sqrt(64),
    }

    def loss(p, xb, yb):
        h = nn.gelu(xb @ p["w1"].T + p["b1"])
        return mx.mean(mx.square(h @ p["w2"].T - yb))

    value_and_grad = mx.value_and_grad(loss)

    def loss_and_grad(p, step: int):
        rng = np.random.default_rng(seed * 10_000 + step)
        batch = mx.array(rng.choice(1024, 64, replace=False))
        return value_and_grad(p, x[batch], y[batch])

    return params, loss_and_grad, lambda p: loss(p, x, y).item()


def train(precision, steps: int, seed: int = 0, opt=None, params=None, **kwargs):
    """Steps of AdamW; the batch of each step is fixed by the optimizer's step count, so a resumed
    run sees the batches an uninterrupted one would."""
    start, loss_and_grad, _ = regression_problem(seed)
    params = params if params is not None else start
    opt = opt or AdamW(3e-3, state_precision=precision, seed=seed, **kwargs)
    losses = []
    for _ in range(steps):
        step = 0 if "step" not in opt.state else opt.step.item()
        loss, grads = loss_and_grad(params, step)
        params = opt.apply_gradients(grads, params)
        mx.eval(params, opt.state)
        losses.append(loss.item())
    return params, opt, losses



def test_plan_quantizes_big_tensors_only():
    params, _, _ = regression_problem()
    opt = AdamW(1e-3, state_precision="int4")
    opt.init(params)
    assert opt.precision_plan == {"w1": "int4", "b1": "fp32", "w2": "fp32"}
    assert set(opt.state["w1"]["m"]) == {"step_levels", "scales"}


@pytest.mark.parametrize("precision", LOW)
def test_low_precision_tracks_fp32(precision):
    _, _, full_loss = regression_problem()
    reference, _, _ = train("fp32", 300)
    params, _, losses = train(precision, 300)
    assert all(math.isfinite(v) for v in losses)
    ours, theirs = full_loss(params), full_loss(reference)
    assert ours < 0.2 * losses[0]  # it trains
    # int4's unbiased rounding costs a little noise on this mini-batch problem (+4.6 % at seed 0,
    # +2.3 to +4.6 % over seeds 0-2, against +3.5 to +6.0 % with fresh random bits for the first
    # moment and -2.0 to +2.3 % rounding to nearest); tests/test_convergence.py holds what it buys.
    assert abs(ours - theirs) <= {"bf16": 0.005, "int8": 0.01, "int4": 0.05}[precision] * theirs


def expected_state_bytes(precision, params, min_quantize_size=4096) -> int:
    total = 8 + 4  # step (uint64), learning_rate (float32)
    if precision is None:
        return total + sum(2 * p.nbytes for _, p in tree_flatten(params))
    total += 4  # skipped_steps (uint32)
    if precision != "fp32":
        total += 8  # the random key (2 x uint32) of stochastic rounding
    for _, p in tree_flatten(params):
        if p.size < min_quantize_size or precision == "fp32":
            total += 2 * 4 * p.size
        elif precision == "bf16":
            total += 2 * 2 * p.size
        else:
            block = {"int8": 256, "int4": 128}[precision]
            blocks = math.ceil(p.size / block)
            code_bytes = blocks * block * (1 if precision == "int8" else 0.5)
            total += 2 * (int(code_bytes) + 4 * blocks)
    return total


@pytest.mark.parametrize("precision", ALL)
def test_state_nbytes(precision):
    params = {
        "a": mx.zeros((1000, 300)),
        "odd": mx.zeros((4099,)),  # not a multiple of either block
        "small": mx.zeros((10, 10)),
    }
    opt = AdamW(1e-3, state_precision=precision)
    opt.init(params)
    mx.eval(opt.state)
    assert opt.state_nbytes() == expected_state_bytes(precision, params)
    per_param = {None: 8, "fp32": 8, "bf16": 4, "int8": 2 + 8 / 256, "int4": 1 + 8 / 128}[precision]
    big = {"a": mx.zeros((1024, 768))}  # a whole number of blocks
    opt = AdamW(1e-3, state_precision=precision)
    opt.init(big)
    bookkeeping = expected_state_bytes(precision, {})
    assert (opt.state_nbytes() - bookkeeping) / big["a"].size == pytest.approx(per_param)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("precision", ["fp32", *LOW])
def test_non_finite_gradient_skips_the_step(precision, bad):
    params, opt, _ = train(precision, 5)
    before_params = tree_map(mx.array, params)
    before = tree_map(mx.array, {k: v for k, v in opt.state.items() if k not in ("step", "key")})
    _, loss_and_grad, _ = regression_problem()
    _, grads = loss_and_grad(params, opt.step.item())
    grads["w2"] = grads["w2"].at[0, 0].add(bad)  # one bad value, in a tensor other than w1's
    params = opt.apply_gradients(grads, params)
    mx.eval(params, opt.state)
    assert_trees_equal(params, before_params)
    after = {k: v for k, v in opt.state.items() if k not in ("step", "key")}
    before["skipped_steps"] = before["skipped_steps"] + 1
    assert_trees_equal(after, before)
    assert opt.state["skipped_steps"].item() == 1 and opt.step.item() == 6
    _, _, losses = train(precision, 20, opt=opt, params=params)  # and training goes on
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("precision", ALL)
def test_resume_from_copied_state_is_exact(precision):
    params, opt, _ = train(precision, 6)
    saved_params = tree_map(mx.array, params)
    saved_state = tree_map(mx.array, opt.state)
    cont_params, _, cont_losses = train(precision, 6, opt=opt, params=params)
    # Another seed: the random key comes with the state.
    fresh = AdamW(3e-3, state_precision=precision, seed=123)
    fresh.state = saved_state
    res_params, res_opt, res_losses = train(precision, 6, opt=fresh, params=saved_params)
    assert res_losses == cont_losses
    assert_trees_equal(res_params, cont_params)
    assert_trees_equal(res_opt.state, opt.state)


@pytest.mark.parametrize("precision", ["fp32", *LOW])
def test_chunked_update_is_the_whole_tensor_update(precision):
    """Updating in slices, spread over streams, changes nothing: same parameters and same stored
    bits whatever the slice size and the number of streams, for sizes that are not multiples of a
    slice or of a block."""
    shapes = {"a": (97, 131), "b": (3, 2560), "c": (300,)}
    keys = iter(mx.random.split(mx.random.key(7), 2 * len(shapes)))
    params = {n: mx.random.normal(shape, key=next(keys)) for n, shape in shapes.items()}
    grads = [{n: mx.random.normal(shape, key=next(keys)) * 1e-2 for n, shape in shapes.items()}]
    grads.append({n: g * -0.5 for n, g in grads[0].items()})

    def run(chunk_size, streams):
        opt = AdamW(
            1e-2, state_precision=precision, min_quantize_size=0, chunk_size=chunk_size,
            streams=streams,
        )  # fmt: skip
        p = params
        for g in grads * 2:
            p = opt.apply_gradients(g, p)
            mx.eval(p, opt.state)
        return p, opt.state

    whole = run(1 << 20, 1)
    for chunk_size, streams in [(256, 1), (256, 3), (2560, 2)]:
        assert_trees_equal(run(chunk_size, streams), whole)


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize(
    "dtype, weight_update",
    [(mx.float32, None), (mx.bfloat16, "stochastic"), (mx.bfloat16, "exact"),
     (mx.float16, "stochastic"), (mx.float16, "exact")],
)  # fmt: skip
def test_small_tensors_updated_together_as_each_alone(precision, dtype, weight_update):
    """Small tensors of whole blocks are updated laid end to end, in bins of at most a slice
    (LoRA adapters: one update per bin, not per tensor; not under fp32 and bf16, whose updates
    are shorter than the copies); each gets the parameters and stored
    bits it gets alone (random keys from its path and position), across steps; tensors of
    partial blocks, a slice or more, or another dtype are updated on their own."""
    shapes = {"a": (64, 16), "b": (16, 128), "c": (2, 640), "d": (300,), "e": (4096,),
              "f": (8, 32), "g": (1024,)}  # fmt: skip
    keys = iter(mx.random.split(mx.random.key(5), 2 * len(shapes)))
    params = {"layers": {name: mx.random.normal(s, key=next(keys)).astype(dtype)
                         for name, s in shapes.items()}}  # fmt: skip
    params["layers"]["g"] = params["layers"]["g"].astype(mx.float32)
    grads = tree_map(lambda p: (1e-2 * mx.random.normal(p.shape, key=next(keys))).astype(p.dtype),
                     params)  # fmt: skip
    settings = dict(state_precision=precision, min_quantize_size=0, weight_update=weight_update,
                    chunk_size=4096)  # fmt: skip
    bins = update_bins([(path, p.dtype, precision, p.size) for path, p in tree_flatten(params)],
                       4096)  # fmt: skip
    # a + b + c would be past 4096 elements; d is of a partial block; g joins only its own dtype;
    # e is a whole slice.
    same_dtype = ["layers.g"] if dtype == mx.float32 else []
    assert bins == [["layers.a", "layers.b"], ["layers.c", "layers.f", *same_dtype]]
    for shorter in ("fp32", "bf16"):
        tensors = [(path, p.dtype, shorter, p.size) for path, p in tree_flatten(params)]
        assert update_bins(tensors, 4096) == []

    def run(params: dict, grads: dict, streams: int = 1):
        opt, p = AdamW(1e-2, streams=streams, **settings), params
        for scale in (1.0, -0.5, 2.0):
            p = opt.apply_gradients(tree_map(lambda g: g * scale, grads), p)
            mx.eval(p, opt.state)
        return p, opt.state

    together, state = run(params, grads)
    assert_trees_equal(run(params, grads, streams=2), (together, state))
    for name in shapes:
        alone = run(*({"layers": {name: t["layers"][name]}} for t in (params, grads)))
        assert_trees_equal(alone[0]["layers"][name], together["layers"][name])
        assert_trees_equal(alone[1]["layers"][name], state["layers"][name])

    # A NaN in one binned gradient skips the whole step, bins checked joined.
    opt = AdamW(1e-2, **settings)
    p = opt.apply_gradients(grads, params)
    mx.eval(p, opt.state)
    before = tree_map(lambda a: a, opt.state["layers"])
    bad = {"layers": {**grads["layers"], "b": grads["layers"]["b"].at[3, 5].add(mx.nan)}}
    assert_trees_equal(opt.apply_gradients(bad, p), p)
    assert_trees_equal(opt.state["layers"], before)
    assert opt.state["skipped_steps"].item() == 1


@pytest.mark.parametrize("precision", ["fp32", *LOW])
def test_step_peak_memory_is_a_few_tensors(precision):
    """A step's peak stays within what is held (weights, gradients, state) plus a few times the
    largest tensor in float32: slices bound the temporaries, and only the new parameter and
    moments, made of the slices, take room beside the old ones."""
    keys = iter(mx.random.split(mx.random.key(3), 16))
    params = {"layers": [mx.random.normal((1024, 1024), key=next(keys)) for _ in range(8)]}
    grads = tree_map(lambda p: 1e-3 * mx.random.normal(p.shape, key=next(keys)), params)
    opt = AdamW(1e-3, state_precision=precision, chunk_size=1 << 14)
    params = opt.apply_gradients(grads, params)
    mx.eval(params, grads, opt.state)
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    params = opt.apply_gradients(grads, params)
    mx.eval(params, opt.state)
    largest = 1024 * 1024 * 4
    # The new parameter and the new float32 moments each exist as slices and as their join.
    one_state = sum(a.nbytes for _, a in tree_flatten(opt.state["layers"][0]))
    joined = 2 * (largest + one_state) / largest
    assert (mx.get_peak_memory() - before) / largest < joined + 1


def test_chunk_size_and_streams_are_checked():
    for bad in (0, 100, 1000):
        with pytest.raises(ValueError, match="chunk_size"):
            AdamW(1e-3, state_precision="int8", chunk_size=bad)
    for bad in (0, -1, True, 1.5, 2.0):
        with pytest.raises(ValueError, match="streams"):
            AdamW(1e-3, state_precision="int8", streams=bad)
    # Checked when made, not at the first step; NumPy integers are ints.
    for name, bad in (("chunk_size", 256.0), ("min_quantize_size", 0.5), ("seed", 1.5),
                      ("seed", -1), ("seed", 2**64)):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            AdamW(1e-3, state_precision="int8", **{name: bad})
    settings = AdamW(1e-3, state_precision="int8", seed=np.int64(3), streams=np.int32(2)).settings
    assert (settings.seed, settings.streams) == (3, 2) and type(settings.seed) is int


@pytest.mark.parametrize("precision", LOW)
def test_compiled_training_step(precision):
    """As mlx-lm's trainer does it: optimizer.update inside mx.compile with the state captured."""
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 4))
    initial = tree_map(mx.array, model.parameters())
    x = mx.random.normal((32, 128), key=mx.random.key(1))
    y = mx.random.normal((32, 4), key=mx.random.key(2))
    loss_and_grad = nn.value_and_grad(model, lambda m: nn.losses.mse_loss(m(x), y))

    def run(compiled: bool):
        model.update(tree_map(mx.array, initial))
        opt = AdamW(3e-3, state_precision=precision, min_quantize_size=1024)
        state = [model.state, opt.state]

        def step():
            loss, grads = loss_and_grad(model)
            opt.update(model, grads)
            return loss

        fn = mx.compile(step, inputs=state, outputs=state) if compiled else step
        losses = []
        for _ in range(10):
            losses.append(fn())
            mx.eval(state, losses[-1])
        return [v.item() for v in losses], opt.precision_plan

    eager, plan = run(False)
    compiled, _ = run(True)
    assert plan["layers.0.weight"] == precision
    np.testing.assert_allclose(compiled, eager, rtol=1e-5)
    assert compiled[-1] < compiled[0]


def test_int4_first_moment_is_stored_as_its_step():
    """int4 stores ``u = m / (sqrt(v) + eps)``: each step's stored ``u`` is, to within one gap of
    its block's largest, a float64 NumPy reference computed from the decoded state before it
    (``m = u·(sqrt(v) + eps)``), on gradients of two scales a thousand times apart in each block."""
    eps, n = 1e-8, 1024
    codecs = PRECISIONS["int4"]
    assert codecs.m_over_root_v
    levels = codecs.m.map.values()
    gap = max(b - a for a, b in zip(levels, levels[1:]))
    rng = np.random.default_rng(0)
    scale = np.where(np.arange(n) % 2, 1.0, 1e-3)
    params = {"w": mx.zeros((n,))}
    opt = AdamW(1e-3, eps=eps, state_precision="int4", min_quantize_size=0, weight_decay=0.0)
    opt.init(params)
    for _ in range(4):
        state = opt.state["w"]
        u_old = np.array(codecs.m.decode(state["m"], (n,))).astype(np.float64)
        v_old = np.array(codecs.v.decode(state["v"], (n,))).astype(np.float64)
        g = (rng.normal(size=n) * scale).astype(np.float32)
        params = opt.apply_gradients({"w": mx.array(g)}, params)
        mx.eval(params, opt.state)
        g64 = g.astype(np.float64)
        v = 0.999 * v_old + 0.001 * g64**2
        expected = (0.9 * u_old * (np.sqrt(v_old) + eps) + 0.1 * g64) / (np.sqrt(v) + eps)
        u = np.array(codecs.m.decode(opt.state["w"]["m"], (n,))).astype(np.float64)
        blocks = lambda a: a.reshape(-1, codecs.m.block)  # noqa: E731
        largest = np.abs(blocks(expected)).max(1, keepdims=True)
        assert np.all(np.abs(blocks(u - expected)) <= gap * largest * (1 + 1e-5))
        m, _ = codecs.decode(opt.state["w"], (n,), eps)
        np.testing.assert_allclose(
            np.array(m), u * (np.sqrt(np.array(codecs.v.decode(opt.state["w"]["v"], (n,)))) + eps),
            rtol=1e-6,
        )


def test_int4_second_moment_has_no_zero_point(monkeypatch):
    """Li et al.'s zero-point problem: after one step of moderate gradients that then stop, their
    second moment is tiny next to the block's largest; on a map with a zero code (their B128/DE)
    it rounds to 0 while the first moment does not, and m / (sqrt(v) + eps) explodes. Without a
    zero code the steps stay near those of float32 AdamW (at most ~6.5 lr here): within a factor
    2, the ratio of the square roots of int4's two lowest levels, between which stochastic
    rounding may put a small v on either side. The map with a zero
    here is int4's signed one, rounding to nearest (9e-4 of the block's largest is below half its
    smallest level, 1/49)."""
    with_zero = Blockwise(PowerMap(bits=4, signed=True), 128, stochastic=False)
    zero_point = Precision("int4 with zero", INT4_M, with_zero)
    monkeypatch.setitem(PRECISIONS, "int4 with zero", zero_point)
    steady = mx.zeros((64, 128)).at[:, 0].add(10.0)
    first = steady + mx.zeros((64, 128)).at[:, 1:].add(0.3)
    largest = {}
    for precision in ("fp32", "int4", "int4 with zero"):
        opt = AdamW(1e-3, state_precision=precision, weight_decay=0.0)
        params = {"w": mx.zeros((64, 128))}
        worst = 0.0
        for t in range(10):
            new = opt.apply_gradients({"w": first if t == 0 else steady}, params)
            mx.eval(new, opt.state)
            worst = max(worst, mx.abs(new["w"] - params["w"]).max().item())
            params = new
        largest[precision] = worst
    assert largest["int4"] <= largest["fp32"] * 2
    assert largest["int4 with zero"] > 1000 * largest["fp32"]


class _OldLayout:
    """A codec storing its codes under main's old leaf name ``codes`` (the dynamic-map layout of
    before issue 11): same shapes and dtypes, another meaning."""

    def __init__(self, codec: Blockwise):
        self.codec, self.block = codec, codec.block
        self.stochastic, self.rotating = codec.stochastic, codec.rotating

    def nbytes(self, shape):
        return self.codec.nbytes(shape)

    def zeros(self, shape):
        return self._rename(self.codec.zeros(shape))

    def encode(self, x, key, offset=0):
        return self._rename(self.codec.encode(x, key, offset))

    def decode(self, stored, shape):
        codes = {self.codec.name: stored["codes"], "scales": stored["scales"]}
        return self.codec.decode(codes, shape)

    def _rename(self, stored):
        return {"codes": stored[self.codec.name], "scales": stored["scales"]}


def _dynamic_map_codecs(precision: str) -> Precision:
    new = PRECISIONS[precision]
    return Precision(precision, _OldLayout(new.m), _OldLayout(new.v))


def _int4_m_as_moment(precision: str) -> Precision:
    new = PRECISIONS[precision]
    m = Blockwise(new.m.map, new.m.block, half=new.m.half, rotating=new.m.rotating)
    return Precision(precision, m, new.v)


def _int8_power_map(precision: str) -> Precision:
    """int8 before its levels came from shift roots: square-root-companded levels (session 7)."""
    new = PRECISIONS[precision]
    return Precision(
        precision,
        Blockwise(PowerMap(8, signed=True), new.m.block, half=new.m.half),
        Blockwise(PowerMap(8, signed=False), new.v.block, half=new.v.half),
    )


@pytest.mark.parametrize(
    ("precision", "old_codecs", "leaves"),
    [
        ("int8", _dynamic_map_codecs, r"levels.*codes|codes.*levels"),
        ("int4", _dynamic_map_codecs, r"levels.*codes|codes.*levels"),
        # int4's first moment before it was stored as its step (m / (sqrt(v) + eps)).
        ("int4", _int4_m_as_moment, r"expected \{'m\.step_levels'[^\n]*found \{[^}]*'m\.levels'"),
        # int8 on power-2 levels, whose codes mean other values.
        ("int8", _int8_power_map, r"expected \{'m\.root_levels'[^\n]*found \{[^}]*'m\.levels'"),
    ],
)
def test_old_layout_checkpoint_is_refused(
    tiny_model_path, tmp_path, monkeypatch, precision, old_codecs, leaves
):
    """A checkpoint whose int8/int4 moments were written by older codecs must not be decoded with
    the new meaning: the loader sees another layout and refuses it, naming the leaves."""
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    from adamw_lm import checkpoint
    from adamw_lm.checkpoint import IncompatibleCheckpointError

    def lora_model():
        model, _ = load_model(tiny_model_path)
        model.freeze()
        linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
        return model

    def make():
        return AdamW(1e-2, state_precision=precision, min_quantize_size=0)

    old = old_codecs(precision)
    model = lora_model()
    tokens = mx.random.randint(0, 512, (2, 12), key=mx.random.key(0))
    loss_and_grad = nn.value_and_grad(
        model, lambda m, t: nn.losses.cross_entropy(m(t[:, :-1]), t[:, 1:]).mean()
    )
    with monkeypatch.context() as patch:
        patch.setitem(PRECISIONS, precision, old)
        opt = make()
        _, grads = loss_and_grad(model, tokens)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        config = {"fine_tune_type": "lora", "num_layers": 2, "model": str(tiny_model_path),
                  "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}}  # fmt: skip
        path = checkpoint.save(tmp_path, 1, model, opt, {}, config)
    with pytest.raises(IncompatibleCheckpointError, match=leaves):
        checkpoint.load(path, lora_model(), make())


@pytest.mark.parametrize("precision", ALL)
def test_empty_and_tiny_tensors_update_like_mlx(precision):
    """A tensor with no elements comes back as it is, and its state through the codecs (every
    tensor quantized: min_quantize_size=0)."""
    params = {"empty": mx.zeros((0, 8)), "one": mx.ones((1,)), "w": mx.ones((300,))}
    grads = {"empty": mx.zeros((0, 8)), "one": mx.full((1,), 0.5), "w": mx.full((300,), 0.1)}
    opt = AdamW(1e-2, state_precision=precision, min_quantize_size=0)
    new = opt.apply_gradients(grads, params)
    mx.eval(new, opt.state)
    assert new["empty"].shape == (0, 8) and new["empty"].dtype == mx.float32
    reference = optim.AdamW(1e-2).apply_gradients(grads, params)
    atol = {None: 0, "fp32": 1e-6}.get(precision, 1e-3)
    for name in ("one", "w"):
        assert mx.allclose(new[name], reference[name], rtol=0, atol=atol).item(), name


@pytest.mark.parametrize("precision", LOW)
def test_init_again_keeps_the_state_it_has(precision):
    """As mlx's init: a second call with new parameters (LoRA layers added later) adds their state;
    the state and precision of the others stay, and steps go on as without the second call."""
    w, lora = {"w": mx.linspace(-1, 1, 512)}, {"lora": mx.ones((300,))}
    grads = {"w": mx.full((512,), 0.1), "lora": mx.full((300,), 0.2)}
    runs = []
    for late in (False, True):
        opt = AdamW(1e-2, state_precision=precision, min_quantize_size=0)
        opt.init(w if late else {**w, **lora})
        params = opt.apply_gradients({"w": grads["w"]}, w)
        if late:
            opt.init(lora)
        params = {**params, **lora}
        params = opt.apply_gradients(grads, params)
        mx.eval(params, opt.state)
        assert opt.precision_plan == {"w": precision, "lora": precision}
        runs.append((params["w"], {k: opt.state["w"][k] for k in ("m", "v")}))
    assert_trees_equal(*runs)


def test_auto_init_again_keeps_precisions_and_budget():
    """Under "auto" a parameter that has state keeps its precision; the new ones take what the
    budget leaves, or a clear error says why there is not enough."""
    opt = AdamW(1e-2, state_precision="auto", memory_budget=8 * 8192 + 2 * 8192 + 200,
                min_quantize_size=0)  # fmt: skip
    params = {"w": mx.ones((8192,))}
    opt.init(params)
    assert opt.precision_plan == {"w": "fp32"}
    opt.init({**params, "lora": mx.ones((8192,))})
    assert opt.precision_plan == {"w": "fp32", "lora": "int4"}
    assert opt.state_nbytes() <= opt.settings.memory_budget
    with pytest.raises(ValueError, match="bytes hold the state of parameters not in this tree"):
        opt.init({"x": mx.ones((8192,))})


def test_state_formats_are_the_held_plan_and_setting_the_state_forgets_it():
    """What a checkpoint records (state_formats) is the plan the state was made with, also after
    a second init; a state set wholesale (a load) is planned again, from scratch, by the next
    init, which is what a load converts to (state_formats(fresh=True))."""
    def make() -> AdamW:
        return AdamW(1e-2, state_precision="auto", memory_budget=8 * 8192 + 2 * 8192 + 200,
                     min_quantize_size=0)  # fmt: skip

    tree = {"w": mx.ones((8192,)), "lora": mx.ones((8192,))}
    grads = {"w": mx.full((8192,), 0.1), "lora": mx.full((8192,), 0.1)}
    opt = make()
    opt.init({"w": tree["w"]})
    opt.init(tree)
    held = {"w": "fp32", "lora": "int4"}
    assert opt.precision_plan == held
    assert {p: f.precision for p, f in opt.state_formats(tree).items()} == held
    fresh = {p: f.precision for p, f in opt.state_formats(tree, fresh=True).items()}
    assert fresh == {"w": "bf16", "lora": "bf16"}
    other = make()
    other.init(tree)
    opt.state = tree_map(mx.array, other.state)
    params = opt.apply_gradients(grads, tree)
    mx.eval(params, opt.state)
    assert opt.precision_plan == fresh
    failed = make()
    with pytest.raises(ValueError, match="does not fit"):
        failed.init({"big": mx.ones((1 << 20,))})
    assert "big" not in failed.state  # a plan that does not fit leaves no state behind


@pytest.mark.parametrize("name", ["key", "skipped_steps"])
def test_parameter_named_as_a_state_entry_is_refused(name):
    params = {name: mx.ones((8,)), "w": mx.ones((8,))}
    with pytest.raises(ValueError, match=f"named '{name}'"):
        AdamW(1e-2, state_precision="bf16").init(params)
    AdamW(1e-2).init(params)  # None keeps neither entry, as mlx


@pytest.mark.parametrize("streams", [1, 2])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_all_finite_finds_every_nan_and_infinity(dtype, streams):
    """all_finite against NumPy's isfinite: each special value alone, in any tensor, at the
    edges of the float range (the largest finite, -0, subnormals), and finite values whose
    sum overflows (the sum this check replaced called those non-finite)."""
    big = float(np.finfo(np.float16).max) if dtype == mx.float16 else 3e38
    finite_edges = [big, -big, -0.0, 1e-40 if dtype != mx.float16 else 1e-7, 0.0]
    tensors = [mx.array(np.full((300,), big, np.float32)).astype(dtype),
               mx.array(finite_edges).astype(dtype), mx.zeros((0,), dtype)]  # fmt: skip
    assert all_finite(tensors, streams).item() is True
    for special in (math.nan, -math.nan, math.inf, -math.inf):
        for which in range(2):
            bad = [mx.array(t) for t in tensors]
            bad[which] = bad[which].at[1].add(mx.array(special, dtype))
            expected = all(np.isfinite(np.array(t.astype(mx.float32))).all() for t in bad)
            assert expected is False
            assert all_finite(bad, streams).item() is expected, (special, which)
    # NaNs with the sign bit set, and the lowest NaN bits above +inf's, made from their bits.
    bits = {mx.float16: (0xFE00, 0x7C01), mx.bfloat16: (0xFFC0, 0x7F81),
            mx.float32: (0xFFC00000, 0x7F800001)}[dtype]  # fmt: skip
    unsigned = mx.uint32 if dtype == mx.float32 else mx.uint16
    for pattern in bits:
        nan = mx.view(mx.array([pattern], dtype=unsigned), dtype)
        assert math.isnan(nan.astype(mx.float32).item())
        assert all_finite([tensors[0], mx.concatenate([tensors[1], nan])], streams).item() is False
    assert all_finite([], streams).item() is True
    with pytest.raises(TypeError, match="floating point"):
        all_finite([mx.zeros((3,), mx.int32)])


def assert_finite(tree) -> None:
    for path, a in tree_flatten(tree):
        if mx.issubdtype(a.dtype, mx.floating):
            assert mx.isfinite(a).all().item(), path


def finite_steps(precision: str, gradients: list[mx.array]) -> tuple[dict, AdamW]:
    """Steps of a 1024-element weight with ``gradients``: weights and state stay finite and no
    step is skipped."""
    params = {"w": mx.linspace(-1, 1, 1024)}
    opt = AdamW(1e-3, state_precision=precision, min_quantize_size=0)
    for g in gradients:
        params = opt.apply_gradients({"w": g}, params)
        mx.eval(params, opt.state)
    assert_finite((params, opt.state))
    assert opt.state["skipped_steps"].item() == 0
    return params, opt


@pytest.mark.parametrize("precision", LOW)
def test_overflowing_square_keeps_the_state_finite(precision):
    """A finite gradient whose square overflows float32: mlx's AdamW (and fp32 state) freezes that
    element (its v is infinite). Here v stops at the largest bfloat16: no NaN or infinity in weights
    or state (a checkpoint of it loads), and the other elements keep training."""
    huge = mx.where(mx.arange(1024) == 3, 1e20, 1e-3)
    params, _ = finite_steps(precision, [huge] + [mx.full((1024,), 1e-3)] * 5)
    # Outside the block of the huge element (256 elements at most), every weight moved.
    assert (params["w"][256:] != mx.linspace(-1, 1, 1024)[256:]).all().item()


@pytest.mark.parametrize("precision", ALL)
def test_copied_optimizer_goes_on_as_the_original(precision):
    """copy.deepcopy and pickle work after low-precision steps (the compiled updates, a cache
    of functions, are not copied), and the copy's steps are the original's."""
    params, opt, _ = train(precision, 3)
    copies = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    results = [train(precision, 3, opt=o, params=params) for o in [opt, *copies]]
    for other in results[1:]:
        assert other[2] == results[0][2]
        assert_trees_equal(other[0], results[0][0])
        assert_trees_equal(other[1].state, results[0][1].state)


@pytest.mark.parametrize("precision", LOW)
def test_gradients_near_the_largest_float_keep_the_state_finite(precision):
    """Finite gradients at float32's largest take m there: a bfloat16 m saturates at the largest
    bfloat16 (rounding up would give infinity), an int8 block's scale at the largest whose
    quotient by its map's unit is finite; v stops at the largest bfloat16. Weights and state stay
    finite, no step is skipped, and normal gradients after them train on."""
    largest = mx.full((1024,), float.fromhex("0x1.fffffep127"))
    _, opt = finite_steps(precision, [largest] * 40 + [mx.full((1024,), 1e-3)] * 3)
    m, v = PRECISIONS[precision].decode(opt.state["w"], (1024,), opt.eps)
    assert v.max().item() <= float.fromhex("0x1.fep127")
    assert m.min().item() > 1e38  # kept, not lost (0.9^3 of float32's largest, give or take)


@pytest.mark.parametrize("precision", LOW)
def test_converting_an_infinite_second_moment_keeps_it_finite(precision):
    """An fp32 (or mlx) state holds v = +inf where a gradient's square overflowed; converted to a
    lower precision, v stops at the largest bfloat16 as in a step: no NaN after it."""
    from adamw_lm.optim import StateFormat, convert_state

    params = {"w": mx.linspace(-1, 1, 1024)}
    opt = AdamW(1e-3, state_precision="fp32")
    params = opt.apply_gradients({"w": mx.where(mx.arange(1024) == 3, 1e20, 1e-3)}, params)
    mx.eval(params, opt.state)
    assert mx.isinf(opt.state["w"]["v"]).any().item()
    state = convert_state(opt.state["w"], StateFormat("fp32"), StateFormat(precision),
                          params["w"], mx.random.key(0), opt.eps, opt.eps)  # fmt: skip
    assert_finite(state)
    lower = AdamW(1e-3, state_precision=precision, min_quantize_size=0)
    lower.init(params)
    lower.state["w"] = state
    params = lower.apply_gradients({"w": mx.full((1024,), 1e-3)}, params)
    mx.eval(params, lower.state)
    assert mx.isfinite(params["w"]).all().item() and lower.state["skipped_steps"].item() == 0


def test_setting_a_state_of_another_format_is_refused_clearly():
    """A state tree set by hand (``optimizer.state = ...``, as mlx resumes) in another format fails
    at the first step with the parameter and the way out, not deep inside the update."""
    params = {"w": mx.ones((64, 64))}
    grads = {"w": mx.full((64, 64), 1e-2)}
    source = AdamW(1e-3, state_precision="fp32")
    mx.eval(source.apply_gradients(grads, params), source.state)
    for precision in ("int8", "bf16"):  # other keys; the same keys and shapes, other dtypes
        target = AdamW(1e-3, state_precision=precision, min_quantize_size=0)
        target.state = source.state
        with pytest.raises(ValueError, match=f"state of 'w' is not stored as this optimizer.*"
                                             f"{precision}.*convert_state"):  # fmt: skip
            target.apply_gradients(grads, params)
