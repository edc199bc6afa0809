"""adamw_lm.AdamW against mlx.optimizers.AdamW (bit-exact) and a NumPy reference (fp32 mode)."""

import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from helpers.trees import assert_trees_equal

from adamw_lm import AdamW


def mixed_tree() -> dict:
    """Scalars, vectors and matrices in float32 / bfloat16 / float16, nested in dicts and lists."""
    k = iter(mx.random.split(mx.random.key(7), 16))

    def r(shape, dtype):
        return mx.random.normal(shape, key=next(k)).astype(dtype)

    return {
        "scalar": r((), mx.float32),
        "vec16": r((33,), mx.float16),
        "layers": [
            {"w": r((17, 9), mx.float32), "b": r((9,), mx.bfloat16)},
            {"w": r((8, 5, 3), mx.bfloat16), "norm": {"scale": r((5,), mx.float16)}},
        ],
        "big": r((64, 48), mx.float32),
    }


def grads_at(step: int, params: dict) -> dict:
    key = mx.random.key(1000 + step)
    flat = tree_flatten(params)
    keys = mx.random.split(key, len(flat))
    leaves = iter(
        (0.1 * mx.random.normal(p.shape, key=kk)).astype(p.dtype) for (_, p), kk in zip(flat, keys)
    )
    return tree_map(lambda _: next(leaves), params)


def warmup_cosine():
    return optim.join_schedules(
        [optim.linear_schedule(0.0, 1e-2, 10), optim.cosine_decay(1e-2, 90, 1e-4)], [10]
    )



@pytest.mark.parametrize("schedule", [False, True], ids=["float_lr", "warmup_cosine"])
@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_bit_exact_with_mlx_adamw(schedule, bias_correction, weight_decay):
    lr = warmup_cosine() if schedule else 3e-3
    kwargs = dict(betas=[0.9, 0.98], eps=1e-6, weight_decay=weight_decay)
    ours = AdamW(lr, bias_correction=bias_correction, **kwargs)
    ref = optim.AdamW(lr, bias_correction=bias_correction, **kwargs)
    p_ours = p_ref = mixed_tree()
    for step in range(100):
        g = grads_at(step, p_ours)
        p_ours = ours.apply_gradients(g, p_ours)
        p_ref = ref.apply_gradients(g, p_ref)
        mx.eval(p_ours, p_ref, ours.state, ref.state)
    assert_trees_equal(p_ours, p_ref)
    assert_trees_equal(ours.state, ref.state)


def test_drop_in_for_module_update():
    mx.random.seed(0)
    model_a = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model_b = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model_b.update(model_a.parameters())
    x = mx.random.normal((32, 8), key=mx.random.key(1))
    y = mx.random.normal((32, 4), key=mx.random.key(2))

    def loss(model):
        return nn.losses.mse_loss(model(x), y)

    ours, ref = AdamW(1e-2), optim.AdamW(1e-2)
    for model, opt in ((model_a, ours), (model_b, ref)):
        step = nn.value_and_grad(model, loss)
        for _ in range(10):
            _, g = step(model)
            opt.update(model, g)
            mx.eval(model.parameters(), opt.state)
    assert_trees_equal(model_a.parameters(), model_b.parameters())
    assert sorted(k for k, _ in tree_flatten(ours.state)) == sorted(
        k for k, _ in tree_flatten(ref.state)
    )


def test_state_is_plain_tree_and_nbytes():
    params = mixed_tree()
    opt = AdamW(1e-3)
    opt.init(params)
    flat = tree_flatten(opt.state)
    assert all(isinstance(v, mx.array) for _, v in flat)
    expected = sum(2 * p.nbytes for _, p in tree_flatten(params)) + 8 + 4  # + step, learning_rate
    assert opt.state_nbytes() == expected

    fp32 = AdamW(1e-3, state_precision="fp32")
    fp32.init(params)
    n = sum(p.size for _, p in tree_flatten(params))
    # + step, learning_rate, skipped_steps, and the key that rounds the bf16 weights stochastically
    assert fp32.state_nbytes() == 8 * n + 8 + 4 + 4 + 8


def to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even), kept as float32."""
    bits = x.astype(np.float32).view(np.uint32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("bias_correction", [False, True])
def test_fp32_mode_matches_numpy_reference_for_bf16_weights(bias_correction):
    b1, b2, eps, wd, lr = 0.9, 0.999, 1e-8, 0.05, 1e-2
    w = mx.random.normal((40, 30), key=mx.random.key(3)).astype(mx.bfloat16)
    opt = AdamW(
        lr, (b1, b2), eps, wd, bias_correction, state_precision="fp32", weight_update="nearest"
    )
    m_ref = np.zeros(w.shape)
    v_ref = np.zeros(w.shape)
    for t in range(1, 51):
        g = (0.01 * mx.random.normal(w.shape, key=mx.random.key(t))).astype(mx.bfloat16)
        w_prev = np.array(w.astype(mx.float32), dtype=np.float64)
        w = opt.apply_gradients({"w": g}, {"w": w})["w"]
        mx.eval(w, opt.state)

        # The reference steps from the optimizer's own previous weights, so a one-ulp bf16
        # rounding difference cannot compound over the run.
        g_ref = np.array(g.astype(mx.float32), dtype=np.float64)
        m_ref = b1 * m_ref + (1 - b1) * g_ref
        v_ref = b2 * v_ref + (1 - b2) * g_ref**2
        if bias_correction:
            step = lr / (1 - b1**t) * m_ref / (np.sqrt(v_ref / (1 - b2**t)) + eps)
        else:
            step = lr * m_ref / (np.sqrt(v_ref) + eps)
        w_ref = to_bf16((w_prev * (1 - lr * wd) - step).astype(np.float32))
        got = np.array(w.astype(mx.float32))
        ulp = 2.0 ** (np.floor(np.log2(np.abs(w_ref) + 1e-30)) - 7)
        assert np.all(np.abs(got - w_ref) <= ulp), f"step {t}: more than one bf16 ulp off"

    assert w.dtype == mx.bfloat16
    assert opt.state["w"]["m"].dtype == mx.float32
    np.testing.assert_allclose(np.array(opt.state["w"]["m"]), m_ref, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(np.array(opt.state["w"]["v"]), v_ref, rtol=1e-5, atol=1e-12)


def test_fp32_mode_equals_mlx_on_fp32_weights_within_rounding():
    params = {"a": mx.random.normal((50, 20), key=mx.random.key(4))}
    ours, ref = AdamW(1e-2, state_precision="fp32"), optim.AdamW(1e-2)
    p1 = p2 = params
    for step in range(30):
        g = grads_at(step, params)
        p1, p2 = ours.apply_gradients(g, p1), ref.apply_gradients(g, p2)
        mx.eval(p1, p2)
    assert mx.allclose(p1["a"], p2["a"], rtol=1e-6, atol=1e-7).item()


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(learning_rate=1e-3, betas=(1.0, 0.999)), "betas[0]"),
        (dict(learning_rate=1e-3, betas=(0.9, -0.1), state_precision="bf16"), "betas[1]"),
        (dict(learning_rate=1e-3, betas=(0.9,)), "betas"),
        (dict(learning_rate=1e-3, eps=0.0, state_precision="fp32"), "eps"),
        (dict(learning_rate=1e-3, eps=-1e-8), "eps"),
        (dict(learning_rate=1e-3, eps=0.0, precision_overrides={"w": "int4"}), "eps"),
        (dict(learning_rate=1e-3, state_precision="int3"), "state_precision"),
        (dict(learning_rate=1e-3, precision_overrides={"norm": "fp8"}), "precision_overrides"),
        (dict(learning_rate=1e-3, precision_overrides={"(": "fp32"}), "precision_overrides"),
        # Patterns may come from a stranger's checkpoint: limits before compiling, which would
        # take gigabytes for the first and overflow Python's stack for the second.
        (dict(learning_rate=1e-3, precision_overrides={"(?:a{3000}){3000}": "fp32"}),
         "counted repeats"),
        (dict(learning_rate=1e-3, precision_overrides={"(?:a\\{3000}){,3000}": "fp32"}),
         "counted repeats"),
        (dict(learning_rate=1e-3, precision_overrides={"(?x)(?:a{3 000}){3 000}": "fp32"}),
         "verbose mode"),
        (dict(learning_rate=1e-3, precision_overrides={"(?ix:a{3 000})": "fp32"}), "verbose mode"),
        (dict(learning_rate=1e-3, precision_overrides={"(" * 450 + ")" * 450: "fp32"}),
         "nests too deeply"),
        (dict(learning_rate=1e-3, precision_overrides={"x" * 1001: "fp32"}), "1001 characters"),
        (dict(learning_rate=1e-3, precision_overrides={f"p{i}": "fp32" for i in range(257)}),
         "257 patterns"),
        (dict(learning_rate=1e-3, precision_overrides={3: "fp32"}), "must be a string"),
    ],
)
def test_invalid_hyperparameters_name_the_argument(kwargs, needle):
    with pytest.raises(ValueError) as e:
        AdamW(**kwargs)
    assert needle in str(e.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(learning_rate=-1e-2),  # ascends the loss
        dict(learning_rate=optim.linear_schedule(1e-2, -1e-2, 4)),
        dict(learning_rate=1e-2, weight_decay=-0.1),
        dict(learning_rate=1e-2, eps=0.0),
        dict(learning_rate=1e-2, betas=(0.5, 0.0)),
    ],
    ids=["negative-lr", "schedule-turning-negative", "negative-decay", "eps-0", "betas-tuple"],
)
def test_none_takes_every_argument_mlx_takes(kwargs):
    """mlx checks none of AdamW's numbers; under ``state_precision=None`` neither does this one,
    and the steps stay mlx's, bit for bit (the NaNs of eps = 0 included)."""
    ours, ref = AdamW(**kwargs), optim.AdamW(**kwargs)
    assert ours.betas == ref.betas and type(ours.betas) is type(ref.betas)
    p_ours = p_ref = {"w": mx.random.normal((6, 5), key=mx.random.key(3)), "z": mx.zeros((4,))}
    for step in range(5):
        g = {**grads_at(step, p_ours), "z": mx.zeros((4,))}  # eps = 0 makes z 0 / 0
        p_ours, p_ref = ours.apply_gradients(g, p_ours), ref.apply_gradients(g, p_ref)
        mx.eval(p_ours, p_ref, ours.state, ref.state)
    assert_trees_equal(p_ours, p_ref)
    assert_trees_equal(ours.state, ref.state)


def test_error_states_allowed_range():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        AdamW(1e-3, betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="'fp32'"):
        AdamW(1e-3, state_precision="fp64")


def test_override_patterns_cannot_hang_the_optimizer():
    """Patterns may come from a stranger's checkpoint. ``(a+)+$`` backtracks catastrophically in
    Python's ``re`` against a long path of a's; searched here it returns at once, and a pattern
    that still backtracks without end is cut off by a timeout with a clear error naming it."""
    path = "model.layers." + "a" * 60 + "!"
    parameter = mx.zeros((8,))
    quick = AdamW(
        1e-3, state_precision="int8", precision_overrides={"(a+)+$": "fp32"}, min_quantize_size=0
    )
    start = time.perf_counter()
    assert quick.precision_for(path, parameter) == "int8"  # no match
    assert time.perf_counter() - start < 1.0
    assert quick.precision_for("model.layers.aaa", parameter) == "fp32"
    slow = AdamW(1e-3, state_precision="int8", precision_overrides={"(a|aa)+$": "fp32"})
    with pytest.raises(ValueError, match=r"precision_overrides pattern '\(a\|aa\)\+\$' took over"):
        slow.precision_for(path, parameter)
